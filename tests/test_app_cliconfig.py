"""The generic dataclass -> argparse builder: every config field becomes an option without a hand-written copy."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pytest

import gora
from gora.app.cliconfig import UnsupportedFieldType, add_dataclass_arguments, dataclass_kwargs, name_options
from gora.app.runconfig import AllocateConfig, DataConfig, ExportConfig, MergeConfig, TrainConfig


@dataclass(frozen=True)
class Sample:
    flag: bool = field(default=False, metadata={"help": "a flag"})
    count: int = 3
    ratio: float | None = None
    mode: Literal["a", "b"] = "a"
    step: float | Literal["auto"] = 0.5
    values: tuple[float, ...] | None = None
    names: Sequence[str] | str | None = None
    label: str = "x"


def _parse(cls: type, argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, cls, strict=True)
    return dataclass_kwargs(cls, parser.parse_args(argv))


@pytest.mark.parametrize("cls", [gora.GoraConfig, DataConfig, TrainConfig, AllocateConfig, MergeConfig, ExportConfig])
def test_every_config_field_is_an_option_or_marked_off(cls):
    """Protects "one source of truth": a new field (e.g. another engineer's GoraConfig option) either gets an option
    from its type or says cli=False; the builder never silently drops one."""
    parser = argparse.ArgumentParser()
    names = add_dataclass_arguments(parser, cls, strict=True)
    expected = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True) is not False]
    assert names == expected


def test_types_map_to_options():
    """Protects the type rules: bool flags, Literal choices, number-or-word unions, tuples, `none`, name lists."""
    got = _parse(Sample, ["--flag", "--count", "7", "--ratio", "none", "--mode", "b", "--step", "auto"])
    assert got == {"flag": True, "count": 7, "ratio": None, "mode": "b", "step": "auto"}
    got = _parse(Sample, ["--no-flag", "--step", "0.25", "--values", "1", "2e-3", "--names", "q_proj", "v_proj"])
    assert got == {"flag": False, "step": 0.25, "values": (1.0, 2e-3), "names": ("q_proj", "v_proj")}
    assert _parse(Sample, ["--names", "all-linear"])["names"] == "all-linear"  # not a plain name: a string
    assert _parse(Sample, ["--names", "query"])["names"] == ("query",)  # a plain name: a one-name list
    assert _parse(Sample, []) == {}  # only what the user gave


@pytest.mark.parametrize("argv", [["--mode", "c"], ["--step", "fast"], ["--count", "1.5"]])
def test_bad_values_are_usage_errors(argv):
    """Protects argparse-level validation: a value of the wrong type exits with status 2."""
    with pytest.raises(SystemExit) as info:
        _parse(Sample, argv)
    assert info.value.code == 2


def test_unsupported_types_fail_loudly_when_strict():
    """Protects against silently skipped fields: a type with no option form raises under strict=True."""

    @dataclass
    class Odd:
        table: dict[str, int] = field(default_factory=dict)

    with pytest.raises(UnsupportedFieldType):
        add_dataclass_arguments(argparse.ArgumentParser(), Odd, strict=True)


def test_gora_options_build_a_valid_config():
    """Protects the round trip: parsed options construct the library's own GoraConfig."""
    config = gora.GoraConfig(**_parse(gora.GoraConfig, ["--r", "4", "--target-modules", "q_proj", "v_proj"]))
    assert config.r == 4 and config.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"sketch_samples": 0}, "--sketch-samples must be a positive integer, got 0"),
        ({"min_rank": 9, "max_rank": 4}, "--min-rank (9) > --max-rank (4): lower --min-rank or raise --max-rank"),
        ({"gamma": 0.5, "gamma_candidates": (1.0,)}, "only used with --gamma auto (--gamma is 0.5): set --gamma auto"),
    ],
)
def test_config_errors_name_the_options(kwargs, expected):
    """Protects CLI error messages: a validation error that names dataclass fields (right for Python callers) is
    rewritten to name the options the user typed, values included (`gamma='auto'` -> `--gamma auto`)."""
    with pytest.raises(ValueError) as info:
        gora.GoraConfig(**kwargs)
    assert "--" not in str(info.value)  # the library names fields
    assert expected in name_options(str(info.value), DataConfig, TrainConfig, gora.GoraConfig)


def test_name_options_leaves_options_values_and_other_words_alone():
    """Protects against mangled messages: existing options, quoted values, indexed names, fields of other classes
    and fields marked cli=False are not rewritten."""
    message = "pass --num-labels 3; target 'r' in lora_kwargs['r']; lora_kwargs must be a mapping; seedling"
    assert name_options(message, DataConfig, gora.GoraConfig) == message
    assert name_options("num_labels and max_rank", DataConfig) == "--num-labels and max_rank"
