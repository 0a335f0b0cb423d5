"""Command-line options generated from typed config dataclasses: one source of truth for the library and the CLI.

`add_dataclass_arguments(parser, GoraConfig)` turns every field into an option (`--min-rank`, `--no-adaptive-batches`,
...) from its type annotation and `metadata` (`help`, `choices`, `cli=False` to leave a field out):

| annotation | option |
|---|---|
| `bool` | `--flag` / `--no-flag` |
| `int`, `float`, `str` | one value of that type |
| `Literal["a", "b"]` | one of the choices |
| `tuple[T, ...]`, `Sequence[T]`, `list[T]` | one or more values of type T |
| `X | None` | as X; the word `none` gives None |
| `float | Literal["auto"]` (any union) | the first member that parses: a number, else a listed word, else a string |
| `Sequence[str] | str` | one or more names; a single value that is not a plain name (`all-linear`, a regex) stays a string |

The parser records only the options the user gave (`argparse.SUPPRESS` defaults), so callers can layer them over
presets; `dataclass_kwargs` reads them back and the dataclass validates them on construction. Its error messages
name fields (`min_rank`, for Python callers); `name_options` rewrites them into the options the user typed
(`--min-rank`).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import logging
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

logger = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_SEQUENCES = (tuple, list, collections.abc.Sequence)


class UnsupportedFieldType(TypeError):
    """A field type the builder cannot express as an option (mark the field `metadata={"cli": False}`)."""


def option_name(field_name: str) -> str:
    """`min_rank` -> `--min-rank`."""
    return "--" + field_name.replace("_", "-")


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that are meant to be options (not `init=False`, not `metadata={"cli": False}`)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True) is not False]


def name_options(message: str, *classes: type) -> str:
    """`message` with the fields of `classes` written as the options that set them, for a command-line user.

    `min_rank (9) > max_rank (4)` -> `--min-rank (9) > --max-rank (4)`; `gamma='auto'` -> `--gamma auto`. A name is
    rewritten only as a whole word that is not already part of an option, a quoted value or an index
    (`--min-rank`, `'query'`, `lora_kwargs[...]` stay as they are).
    """
    names = sorted({f.name for cls in classes for f in option_fields(cls)}, key=len, reverse=True)
    if not names:
        return message
    pattern = re.compile(
        r"(?<![\w\-\['\"./])(" + "|".join(map(re.escape, names)) + r")(?:=('[^']*'|\"[^\"]*\"|[\w.+\-]+))?(?![\w\-\[])"
    )

    def option(match: re.Match[str]) -> str:
        value = match.group(2)
        flag = option_name(match.group(1))
        return flag if value is None else f"{flag} {value.strip(chr(39) + chr(34))}"

    return pattern.sub(option, message)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> list[str]:
    """Add one option per field of dataclass `cls` to `parser`, in an argument group.

    Args:
        parser: The parser (or subparser) to extend.
        cls: A dataclass whose fields carry `metadata["help"]` (and optionally `"choices"`, `"cli"`).
        title: Title of the argument group (default: the class name).
        defaults: Defaults to show in the help instead of the dataclass's own (e.g. a preset's values).
        strict: Raise on a field type the builder cannot express; otherwise skip the field with a warning.

    Returns:
        The names of the fields that became options.
    """
    doc = (cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(title or cls.__name__, doc[0] if doc else None)
    shown = dict(defaults or {})
    hints = typing.get_type_hints(cls)
    names = []
    for f in option_fields(cls):
        try:
            kwargs = _argparse_kwargs(hints[f.name], f.name)
        except UnsupportedFieldType:
            if strict:
                raise
            logger.warning(
                "%s.%s has type %s, which has no command-line form: skipped", cls.__name__, f.name, hints[f.name]
            )
            continue
        if "choices" in f.metadata and kwargs.get("action") is None:
            kwargs["choices"] = tuple(f.metadata["choices"])
        default = shown[f.name] if f.name in shown else _field_default(f)
        help_text = f.metadata.get("help", "")
        if default is not dataclasses.MISSING and "default" not in help_text:
            help_text = f"{help_text} (default: {_show(default)})" if help_text else f"default: {_show(default)}"
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        group.add_argument(
            option_name(f.name), dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"), **kwargs
        )
        names.append(f.name)
    return names


def dataclass_kwargs(cls: type, namespace: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The values of `cls`'s fields that the user gave on the command line (absent options are left out)."""
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if f.init and f.name in given}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "none"
    return "none" if value is None else str(value)


def _argparse_kwargs(tp: Any, name: str) -> dict[str, Any]:
    """argparse keyword arguments (type/nargs/choices/action/metavar) for a field annotated `tp`."""
    members = _union_members(tp)
    optional = type(None) in members
    members = [m for m in members if m is not type(None)]
    if members == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    sequences = [m for m in members if typing.get_origin(m) in _SEQUENCES or m in _SEQUENCES]
    scalars = [m for m in members if m not in sequences]
    if sequences:
        if len(sequences) > 1 or any(m is not str for m in scalars):
            raise UnsupportedFieldType(f"{name}: {tp}")
        item = _sequence_item(sequences[0], name)
        convert = _converter(_union_members(item), optional=optional, name=name)
        kwargs: dict[str, Any] = {"nargs": "+", "type": convert, "metavar": _metavar(_union_members(item))}
        kwargs["action"] = _sequence_action(keep_single_string=bool(scalars), optional=optional)
        return kwargs
    convert = _converter(scalars, optional=optional, name=name)
    if scalars == [str]:
        return {"type": convert, "metavar": name.upper()}
    literal_values = [v for m in scalars if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    if len(scalars) == 1 and literal_values and not optional:
        return {"type": _literal_type(literal_values), "choices": tuple(literal_values)}
    return {"type": convert, "metavar": _metavar(scalars, optional)}


def _union_members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        out = []
        for arg in typing.get_args(tp):
            out.extend(_union_members(arg))
        return out
    return [tp]


def _sequence_item(tp: Any, name: str) -> Any:
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if len(set(args)) > 1:
        raise UnsupportedFieldType(f"{name}: fixed-length tuples of mixed types are not supported ({tp})")
    return args[0] if args else str


def _literal_type(values: list[Any]) -> Callable[[str], Any]:
    kinds = {type(v) for v in values}
    return kinds.pop() if len(kinds) == 1 else str


def _converter(members: list[Any], *, optional: bool, name: str) -> Callable[[str], Any]:
    """A function str -> value that tries the members of a union in a fixed order (int, float, words, str)."""
    words: list[Any] = []
    kinds: list[type] = []
    for m in members:
        if typing.get_origin(m) is Literal:
            words.extend(typing.get_args(m))
        elif m in (int, float, str):
            kinds.append(m)
        else:
            raise UnsupportedFieldType(f"{name}: {m}")

    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(text)
                except ValueError:
                    pass
        for word in words:
            if str(word) == text:
                return word
        if str in kinds:
            return text
        expected = (
            [k.__name__ for k in kinds if k is not str] + [repr(w) for w in words] + (["none"] if optional else [])
        )
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(expected)}")

    convert.__name__ = "/".join([k.__name__ for k in kinds] + [str(w) for w in words]) or "value"
    return convert


def _metavar(members: list[Any], optional: bool = False) -> str:
    parts: list[str] = []
    for m in members:
        if typing.get_origin(m) is Literal:
            parts.extend(str(v) for v in typing.get_args(m))
        else:
            parts.append(getattr(m, "__name__", str(m)).upper())
    if optional:
        parts.append("none")
    return parts[0] if len(parts) == 1 else "{" + ",".join(parts) + "}"


def _sequence_action(*, keep_single_string: bool, optional: bool) -> type[argparse.Action]:
    class SequenceAction(argparse.Action):
        """Store one or more values as a tuple; `none` alone gives None; one non-plain name may stay a string."""

        def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
            values = list(values)
            if optional and None in values:
                if len(values) > 1:
                    parser.error(f"{option_string}: 'none' stands alone (it means: not set)")
                value: Any = None
            elif keep_single_string and len(values) == 1 and not _PLAIN_NAME.match(str(values[0])):
                value = values[0]
            else:
                value = tuple(values)
            setattr(namespace, self.dest, value)

    return SequenceAction
