"""Command-line options and YAML run files generated from the typed config dataclasses, through jsonargparse.

One source of truth: every init field of `GoraConfig`, `DataConfig`, `TrainConfig`, `AllocateConfig` and
`MergeConfig` is both an option (`--min-rank 4`) and a key of a run file (`min_rank: 4`, read with
`--config run.yaml`). jsonargparse reads the field's type annotation and validates values against it, on the command
line and in the file alike (ints, floats, `Literal` choices, unions such as `float | Literal["auto"]`, `X | None`,
sequences, mappings); the help text is the field's `metadata["help"]`; `metadata={"cli": False}` leaves a field out.

jsonargparse takes a list as one YAML value (`--target-modules '[q_proj, v_proj]'`) and None as `null`; `normalize_argv`
keeps gora's own command-line forms on top of that, so both work:

| command line | value |
|---|---|
| `--flag` / `--no-flag` | True / False (`bool` fields) |
| `--target-modules q_proj v_proj` | a list: the words up to the next option |
| `--target-modules query` / `--target-modules all-linear` | one plain name (or number) is a one-item list; one other word (`all-linear`, a regex) stays a string |
| `--save-total-limit none` | None (for fields that may be None) |
| `--config run.yaml` anywhere | the file first, then every other option over it, wherever it stands on the line |

Only what the user gave (in a file or on the line) is recorded (`argparse.SUPPRESS` defaults), so callers layer it
over presets; `dataclass_kwargs` reads it back and the dataclass validates it on construction. Validation errors
name fields (`min_rank`, for Python callers); `name_options` rewrites them into options (`--min-rank`), and
`usage_message` turns jsonargparse's errors into one line naming the option.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from ..errors import UsageError

CONFIG_OPTION = "--config"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_SEQUENCES = (tuple, list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


class UnsupportedFieldType(TypeError):
    """A field type jsonargparse cannot express as an option (mark the field `metadata={"cli": False}`)."""


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


# --- building the parser -------------------------------------------------------------------------------------------


def add_dataclass_arguments(
    parser: Any,
    cls: type,
    *,
    title: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Add one option per field of dataclass `cls` to the jsonargparse `parser`, in an argument group.

    Args:
        parser: A `jsonargparse.ArgumentParser`.
        cls: A dataclass whose fields carry `metadata["help"]` (and optionally `"cli": False`).
        title: Title of the argument group (default: the class name).
        defaults: Defaults to show in the help instead of the dataclass's own (e.g. a preset's values).

    Returns:
        The names of the fields that became options.

    Raises:
        UnsupportedFieldType: a field type jsonargparse cannot parse (mark the field `cli=False`).
    """
    from jsonargparse import ActionYesNo

    doc = (cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(title or cls.__name__, doc[0] if doc else None)
    shown = dict(defaults or {})
    hints = typing.get_type_hints(cls)
    names = []
    for f in option_fields(cls):
        default = shown[f.name] if f.name in shown else _field_default(f)
        help_text = f.metadata.get("help", "")
        if default is not dataclasses.MISSING and "default" not in help_text:
            help_text = f"{help_text} (default: {_show(default)})" if help_text else f"default: {_show(default)}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        _check_plain(hints[f.name], f"{cls.__name__}.{f.name}")
        if hints[f.name] is bool:
            kwargs["action"] = ActionYesNo(no_prefix="no-")
        else:
            kwargs["type"] = hints[f.name]
            kwargs["metavar"] = _metavar(hints[f.name], f.name)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        try:
            group.add_argument(option_name(f.name), **kwargs)
        except ValueError as err:  # jsonargparse: a type it does not support
            raise UnsupportedFieldType(f"{cls.__name__}.{f.name}: {hints[f.name]} ({err})") from err
        names.append(f.name)
    return names


def _check_plain(tp: Any, where: str) -> None:
    """Only plain data (bool, int, float, str, None, Literal, sequences of them, mappings) become options:
    jsonargparse would also take classes and callables, as import paths a file could name."""
    origin = typing.get_origin(tp)
    if tp in (bool, int, float, str, type(None), Any) or origin is Literal:
        return
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)) or _is_sequence(tp):
        for arg in typing.get_args(tp):
            if arg is not Ellipsis:
                _check_plain(arg, where)
        return
    if (origin or tp) in _MAPPINGS:
        for arg in typing.get_args(tp):
            _check_plain(arg, where)
        return
    raise UnsupportedFieldType(f"{where}: {tp} is not plain data (bool, int, float, str, Literal, lists, mappings)")


def field_types(*classes: type) -> dict[str, Any]:
    """field name -> type annotation, over the option fields of `classes`."""
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        out.update({f.name: hints[f.name] for f in option_fields(cls)})
    return out


def dataclass_kwargs(cls: type, namespace: Any) -> dict[str, Any]:
    """The values of `cls`'s fields that the user gave (absent options are left out)."""
    if isinstance(namespace, Mapping):
        given = dict(namespace)
    elif hasattr(namespace, "as_dict"):  # jsonargparse's Namespace (it escapes keys such as `values` in vars())
        given = namespace.as_dict()
    else:
        given = dict(vars(namespace))
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
    if isinstance(value, Mapping):
        return json.dumps(dict(value)) if value else "none"
    return "none" if value is None else str(value)


def _union_members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        out = []
        for arg in typing.get_args(tp):
            out.extend(_union_members(arg))
        return out
    return [tp]


def _is_sequence(tp: Any) -> bool:
    return (typing.get_origin(tp) or tp) in _SEQUENCES and tp is not str


def _metavar(tp: Any, name: str) -> str:
    members = _union_members(tp)
    words = [str(v) for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    if words and all(typing.get_origin(m) is Literal or m is type(None) for m in members):
        return "{" + ",".join(words + (["none"] if type(None) in members else [])) + "}"
    if any(_is_sequence(m) for m in members):
        return f"{name.upper()} [...]"
    return name.upper()


def describe(tp: Any) -> str:
    """What a value of type `tp` must be, in words: `int | None` -> "an integer or none"."""
    parts = []
    for m in _union_members(tp):
        if m is type(None):
            parts.append("none")
        elif m is bool:
            parts.append("true or false")
        elif m is int:
            parts.append("an integer")
        elif m is float:
            parts.append("a number")
        elif m is str:
            parts.append("a string")
        elif typing.get_origin(m) is Literal:
            parts.append("one of " + ", ".join(map(str, typing.get_args(m))))
        elif _is_sequence(m):
            item = [a for a in typing.get_args(m) if a is not Ellipsis]
            parts.append(
                "a list" + (f" of {describe(item[0]).removeprefix('a ').removeprefix('an ')}s" if item else "")
            )
        elif (typing.get_origin(m) or m) in _MAPPINGS:
            parts.append("a mapping (e.g. '{key: value}')")
        else:
            parts.append(getattr(m, "__name__", str(m)))
    return " or ".join(parts)


# --- the command line ----------------------------------------------------------------------------------------------


def normalize_argv(argv: Sequence[str], types_by_field: Mapping[str, Any]) -> list[str]:
    """`argv` in jsonargparse's forms (see the module docstring): `--config FILE` moved first (so every other option
    overrides the file), a sequence given as separate words joined into one YAML list, `none` written `null` for
    fields that may be None. Options that are not fields pass through untouched."""
    by_option = {option_name(name): tp for name, tp in types_by_field.items()}
    configs: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        option, has_equals, inline = token.partition("=")
        if option == CONFIG_OPTION:
            if has_equals:
                configs += [option, inline]
                i += 1
            else:
                configs += argv[i : i + 2]
                i += 2
            continue
        tp = by_option.get(option)
        if tp is None or tp is bool:
            out.append(token)
            i += 1
            continue
        if has_equals:
            values, i = [inline], i + 1
        else:
            j = i + 1
            while j < len(argv) and not _is_option(argv[j]):
                j += 1
            values, i = list(argv[i + 1 : j]), j
            if not values:  # jsonargparse says "expected one argument"
                out.append(option)
                continue
        out += [option, _value(values, tp, option)]
    return configs + out


def _is_option(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value


def _value(values: list[str], tp: Any, option: str) -> str:
    members = _union_members(tp)
    optional = type(None) in members
    if optional and len(values) == 1 and values[0].lower() == "none":
        return "null"
    if not any(_is_sequence(m) for m in members):
        if len(values) > 1:
            raise UsageError(f"{option} takes one value, got {len(values)}: {' '.join(values)}")
        return values[0]
    if len(values) == 1 and not _plain(values[0]):
        return values[0]  # one YAML value ('[a, b]') or a single non-plain word (all-linear, a regex)
    if optional and any(v.lower() == "none" for v in values):
        raise UsageError(f"{option}: 'none' stands alone (it means: not set)")
    return "[" + ", ".join(v if _plain(v) else json.dumps(v) for v in values) + "]"


def _plain(word: str) -> bool:
    if _PLAIN_NAME.match(word):
        return True
    try:
        float(word)
    except ValueError:
        return False
    return True


def config_files(argv: Sequence[str]) -> list[str]:
    """The files named by `--config` in `argv` (raw or normalized), in order."""
    files = []
    for i, token in enumerate(argv):
        option, has_equals, inline = token.partition("=")
        if option == CONFIG_OPTION:
            if has_equals:
                files.append(inline)
            elif i + 1 < len(argv):
                files.append(argv[i + 1])
    return files


def check_config_file(path: str | Path, allowed: Iterable[str], *, what: str = "an option") -> dict[str, Any]:
    """The mapping in YAML file `path`, after checking that every key is one of `allowed`.

    Raises:
        UsageError: no such file, not YAML, not a mapping, or a key that is not allowed (named with the nearest
            allowed key, by difflib).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{CONFIG_OPTION} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"{CONFIG_OPTION} {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{CONFIG_OPTION} {path} must hold a mapping of option names to values (e.g. 'r: 8')")
    allowed = sorted(set(allowed))
    for key in data:
        if key not in allowed:
            nearest = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.0)
            hint = f"; the nearest is {nearest[0]!r}" if nearest else ""
            raise UsageError(f"{CONFIG_OPTION} {path}: {key!r} is not {what}{hint}")
    return data


def parse_args(
    parser: Any, argv: Sequence[str], types_by_field: Mapping[str, Any], allowed_keys: Iterable[str], *, what: str
) -> Any:
    """Parse `argv` with the jsonargparse `parser` built by `add_dataclass_arguments`: gora's command-line forms
    (`normalize_argv`), every --config file's keys checked against `allowed_keys` first, errors as one line.

    Raises:
        UsageError: an unknown option or file key (named with the nearest valid one), a value of the wrong type, a
            --config file that cannot be read.
    """
    from jsonargparse import ArgumentError

    normalized = normalize_argv(argv, types_by_field)
    allowed = set(allowed_keys)
    for path in config_files(normalized):
        check_config_file(path, allowed, what=what)
    try:
        return parser.parse_args(normalized)
    except ArgumentError as err:
        known = [o for a in parser._actions for o in a.option_strings]
        raise UsageError(usage_message(err, types_by_field, known)) from err


def usage_message(err: BaseException, types_by_field: Mapping[str, Any], known_options: Iterable[str]) -> str:
    """jsonargparse's error as one line naming the option: `--min-rank: '1.5' is not an integer`."""
    text = str(err)
    match = re.search(r'Parser key "([\w.]+)"', text)
    if match and match.group(1) in types_by_field:
        name = match.group(1)
        given = re.search(r"(?:Given value|Got value): (.*)$", text.strip(), re.MULTILINE)
        value = f" {given.group(1).strip()!r}" if given else ""
        return f"{option_name(name)}{value} is not {describe(types_by_field[name])}"
    match = re.search(r"unrecognized arguments: (.*)", text, re.IGNORECASE)
    if match:
        unknown = match.group(1).split()[0]
        nearest = nearest_option(unknown.partition("=")[0], list(known_options))
        return f"unknown option {unknown}" + (f" (did you mean {nearest}?)" if nearest else "")
    return " ".join(text.split())


def nearest_option(given: str, known: Sequence[str]) -> str | None:
    """The option a mistyped `given` most likely meant: one whose words' initials it spells (--lr: --learning-rate,
    --bs: --batch-size), else the closest spelling (difflib), else None."""
    bare = given.lstrip("-")
    for option in known:
        words = option.lstrip("-").split("-")
        if len(words) > 1 and "".join(w[:1] for w in words) == bare:
            return option
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return close[0] if close else None
