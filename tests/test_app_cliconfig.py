"""Options and YAML run files from the config dataclasses (jsonargparse): every field is an option and a file key,
gora's command-line forms on top of jsonargparse's, file keys checked, errors in one line naming the option."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from jsonargparse import ArgumentParser

import gora
from gora.app.commands.cli import build_parser, main
from gora.app.config.cliconfig import (
    UnsupportedFieldType,
    add_dataclass_arguments,
    dataclass_kwargs,
    field_types,
    name_options,
    normalize_argv,
    parse_args,
)
from gora.app.config.runconfig import AllocateConfig, DataConfig, ExportConfig, MergeConfig, TrainConfig
from gora.app.errors import UsageError


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
    extra: Mapping[str, Any] = field(default_factory=dict)


def _parse(cls: type, argv: list[str]) -> dict:
    parser = ArgumentParser(exit_on_error=False)
    from jsonargparse import ActionConfigFile

    parser.add_argument("--config", action=ActionConfigFile)
    add_dataclass_arguments(parser, cls)
    types = field_types(cls)
    return dataclass_kwargs(cls, parse_args(parser, argv, types, types, what="an option"))


@pytest.mark.parametrize("cls", [gora.GoraConfig, DataConfig, TrainConfig, AllocateConfig, MergeConfig, ExportConfig])
def test_every_config_field_is_an_option_or_marked_off(cls):
    """Protects "one source of truth": a new field (e.g. another engineer's GoraConfig option) either gets an option
    from its type or says cli=False; the builder never silently drops one."""
    names = add_dataclass_arguments(ArgumentParser(), cls)
    expected = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True) is not False]
    assert names == expected


def test_types_map_to_options():
    """Protects the command-line forms: bool flags, Literal choices, number-or-word unions, words as lists, `none`,
    a single name as a one-name list but `all-linear` as a string, mappings, and jsonargparse's own YAML forms."""
    got = _parse(Sample, ["--flag", "--count", "7", "--ratio", "none", "--mode", "b", "--step", "auto"])
    assert got == {"flag": True, "count": 7, "ratio": None, "mode": "b", "step": "auto"}
    got = _parse(Sample, ["--no-flag", "--step", "0.25", "--values", "1", "2e-3", "--names", "q_proj", "v_proj"])
    assert got == {"flag": False, "step": 0.25, "values": (1.0, 2e-3), "names": ["q_proj", "v_proj"]}
    assert _parse(Sample, ["--names", "all-linear"])["names"] == "all-linear"  # not a plain name: a string
    assert _parse(Sample, ["--names", "query"])["names"] == ["query"]  # a plain name: a one-name list
    assert _parse(Sample, ["--names", "[q_proj, v_proj]"])["names"] == ["q_proj", "v_proj"]  # jsonargparse's form
    assert _parse(Sample, ["--values", "-0.5"])["values"] == (-0.5,)  # a negative number is a value
    assert _parse(Sample, ["--extra", "{bias: all}"])["extra"] == {"bias": "all"}
    assert _parse(Sample, ["--label", "123"])["label"] == "123"  # a string field keeps the text
    assert _parse(Sample, []) == {}  # only what the user gave


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "c"], "--mode 'c' is not one of a, b"),
        (["--step", "fast"], "--step 'fast' is not a number or one of auto"),
        (["--count", "1.5"], "--count '1.5' is not an integer"),
        (["--cuont", "2"], "unknown option --cuont (did you mean --count?)"),
        (["--ratio", "1", "2"], "--ratio takes one value, got 2: 1 2"),
    ],
)
def test_bad_values_are_one_line_usage_errors(argv, message):
    """Protects the bad-input contract at the parsing level: one line naming the option and what it takes."""
    with pytest.raises(UsageError) as info:
        _parse(Sample, argv)
    assert str(info.value) == message


def test_config_file_under_the_command_line(tmp_path):
    """Protects the layering: a --config file sets typed values (lists, null, mappings) and every option on the
    command line overrides it, before or after --config."""
    path = tmp_path / "run.yaml"
    path.write_text("count: 5\nratio: 0.5\nnames: [q_proj, v_proj]\nvalues: null\nextra: {bias: all}\nflag: true\n")
    got = _parse(Sample, ["--count", "9", "--config", str(path), "--no-flag"])
    expected = {"count": 9, "ratio": 0.5, "names": ["q_proj", "v_proj"], "values": None, "extra": {"bias": "all"}}
    assert got == {**expected, "flag": False}
    assert got == _parse(Sample, ["--config", str(path), "--count", "9", "--no-flag"])
    assert normalize_argv(["--count", "9", "--config", "f.yaml"], field_types(Sample))[:2] == ["--config", "f.yaml"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cuont: 2\n", "'cuont' is not an option; the nearest is 'count'"),
        ("- count\n", "must hold a mapping of option names to values"),
        ("count: [\n", "is not valid YAML"),
        ("count: many\n", "--count 'many' is not an integer"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    """Protects config files: an unknown key is named with the nearest valid one (difflib); a list, broken YAML or a
    value of the wrong type is one line naming the problem."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=None) as info:
        _parse(Sample, ["--config", str(path)])
    assert message in str(info.value)
    with pytest.raises(UsageError, match="no such file"):
        _parse(Sample, ["--config", str(tmp_path / "nope.yaml")])


@dataclass
class Odd:
    sampler: threading.Thread | None = None


def test_non_data_field_types_fail_loudly():
    """Protects against fields that would make jsonargparse import things a file names: a field typed with a class
    (or any type that is not plain data) raises instead of becoming an option."""

    with pytest.raises(UnsupportedFieldType, match="not plain data"):
        add_dataclass_arguments(ArgumentParser(), Odd)


def test_gora_options_build_a_valid_config():
    """Protects the round trip: parsed options construct the library's own GoraConfig."""
    kwargs = _parse(gora.GoraConfig, ["--r", "4", "--target-modules", "q_proj", "v_proj", "--gamma", "auto"])
    config = gora.GoraConfig(**kwargs)
    assert config.r == 4 and config.target_modules == ("q_proj", "v_proj") and config.gamma == "auto"


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
    assert name_options(message, DataConfig, gora.GoraConfig) == message.replace(
        "; lora_kwargs must", "; --lora-kwargs must"
    )
    assert name_options("num_labels and max_rank", DataConfig) == "--num-labels and max_rank"


def test_help_lists_every_option():
    """Protects the generated help: every option of gora finetune shows on --help with its help text."""
    text = build_parser("finetune").format_help()
    for option in ("--config", "--min-rank", "--lora-kwargs", "--no-eval-before", "--dtype", "--eval-metric"):
        assert option in text
    assert "smallest rank of a layer" in text


def test_command_line_errors_exit_2_with_one_line(capsys):
    """Protects the command's contract for options: a wrong value or an unknown command is status 2 and one line."""
    assert main(["finetune", "--min-rank", "x"]) == 2
    assert capsys.readouterr().err.strip() == "gora finetune: error: --min-rank 'x' is not an integer"
    assert main(["fine-tune"]) == 2
    assert "invalid choice: 'fine-tune'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "--learning", "1e-4"], "unknown option --learning (did you mean --learning-rate?)"),
        (["finetune", "--lr", "1e-4"], "unknown option --lr (did you mean --learning-rate?)"),
        (["finetune", "--lr-sched", "constant"], "unknown option --lr-sched (did you mean --lr-scheduler?)"),
        (["allocate", "--bs", "4"], "unknown option --bs (did you mean --batch-size?)"),
    ],
)
def test_options_are_never_expanded_from_a_prefix(capsys, argv, message):
    """Protects against a silent wrong setting: an option must be spelt out (argparse would expand --lr to
    --lr-scheduler, jsonargparse 5 refuses prefixes: gora refuses them under every version), and the error names
    the option meant, by spelling or by its words' initials."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"gora {argv[0]}: error: {message}"
