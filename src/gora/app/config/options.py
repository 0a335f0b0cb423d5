"""The options of the `gora` commands: one parser per command, generated from the config dataclasses
(cliconfig.py), and `parse`, which reads a command line or a --config file into them.

Used by the command (cli.py) and by the run folder, which reads a saved config.yaml exactly as `--config` does
(runfolder.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal

from .cliconfig import CONFIG_OPTION, add_dataclass_arguments, field_types, parse_args

COMMANDS = ("finetune", "allocate", "merge", "export")
SUMMARIES = {
    "finetune": "GoRA (or LoRA) fine-tune, evaluate, save adapter + serving export + report + config.yaml",
    "allocate": "gradient estimation + rank allocation only; rank table and heatmap",
    "merge": "merge a saved adapter into its base model",
    "export": "write an adapter that llama.cpp, SGLang, any vLLM and PEFT compute the same way",
}
SINGLE_CLASS = ("merge", "export")  # commands configured by one dataclass, without presets


def _configs() -> tuple[Any, ...]:
    from ...config import GoraConfig
    from .runconfig import AllocateConfig, DataConfig, MergeConfig, TrainConfig

    return GoraConfig, DataConfig, TrainConfig, AllocateConfig, MergeConfig


def command_classes(command: str) -> tuple[type, ...]:
    """The config dataclasses whose fields are the options of `command` (and the keys of its --config files)."""
    from .runconfig import ExportConfig

    gora_cls, data_cls, train_cls, alloc_cls, merge_cls = _configs()
    return {
        "finetune": (data_cls, train_cls, gora_cls),
        "allocate": (data_cls, alloc_cls, gora_cls),
        "merge": (merge_cls,),
        "export": (ExportConfig,),
    }[command]


def config_keys(command: str) -> set[str]:
    """The keys a --config file of `command` may hold: every option field, and `preset` (not merge, export)."""
    keys = set(field_types(*command_classes(command)))
    return keys if command in SINGLE_CLASS else keys | {"preset"}


def build_parser(command: str | None = None) -> Any:
    """The `gora` parser (command None: the commands and their summaries) or the parser of one command, each option
    generated from a dataclass field (a jsonargparse `ArgumentParser`)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .runconfig import DEFAULT_PRESET, PRESETS

    def new(prog: str, **kwargs: Any) -> Any:
        # every option spelt out (jsonargparse 4.x expands prefixes with a deprecation warning, 5.x refuses them)
        return ArgumentParser(
            prog=prog, exit_on_error=False, print_config=None, default_env=False, allow_abbrev=False, **kwargs
        )

    if command is None:
        parser = new(
            "gora",
            description="GoRA (gradient-driven adaptive LoRA) for PEFT: fine-tune, allocate ranks, merge adapters, "
            "export them for serving engines. "
            "`gora` alone runs `gora finetune` on the embedded default; `gora <command> --help` lists the options.",
        )
        subcommands = parser.add_subcommands(dest="command", required=False)
        for name in COMMANDS:
            subcommands.add_subcommand(name, build_parser(name), help=SUMMARIES[name])
        return parser
    preset = PRESETS[DEFAULT_PRESET]
    presets = "; ".join(f"{name}: {p.summary}" for name, p in PRESETS.items())
    descriptions = {
        "finetune": "Load a model and data, run GoRA (gradient estimation -> rank allocation -> initialization), "
        "train with transformers' Trainer, evaluate before and after, and write the adapter, gora_record.json, "
        "report.json, plots and config.yaml (the effective configuration: --config <output>/config.yaml repeats the "
        "run). --load-stats: reuse the gradient statistics of `gora allocate --save-stats` instead of estimating. "
        "Training writes checkpoints; Ctrl-C (or SIGTERM) finishes the step, writes one and stops, a second Ctrl-C "
        "stops at once; --resume continues. With no options: " + preset.summary + ".",
        "allocate": "Estimate gradients (or reuse saved statistics) and allocate ranks; print the rank table and "
        "write the heatmap. --save-stats keeps the statistics so other r/min_rank/max_rank reuse them.",
        "merge": "Merge a saved adapter into its base model and save a standalone model (a plain transformers "
        "folder, safetensors, in --dtype) that loads without PEFT.",
        "export": "Write a saved LoRA adapter (GoRA's, or any PEFT LoRA adapter with rank_pattern / alpha_pattern / "
        "rsLoRA) as one plain LoRA adapter whose every layer computes the same delta W under PEFT's, vLLM's, "
        "SGLang's and llama.cpp's scaling rules: each layer's scaling folded into lora_B, all layers zero-padded to "
        "one rank. vLLM >= 0.32 also serves the adapter as trained; llama.cpp, SGLang and older vLLM need the "
        "export. Prints the --max-lora-rank vLLM needs and the llama.cpp conversion commands.",
    }
    parser = new(
        f"gora {command}",
        description=descriptions[command],
        epilog=f"Defaults shown are those of --preset {DEFAULT_PRESET}." if command not in SINGLE_CLASS else None,
    )
    parser.add_argument(
        CONFIG_OPTION,
        action=ActionConfigFile,
        help="a YAML file of options (keys: the option names with underscores, e.g. 'min_rank: 4'); the options on "
        "the command line override it",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars; only warnings and the summary")
    classes = command_classes(command)
    if command in SINGLE_CLASS:
        add_dataclass_arguments(parser, classes[0], title=command)
        return parser
    if command == "finetune":
        parser.add_argument(
            "--resume",
            metavar="RUN_DIR",
            type=str,
            default=None,
            help="continue the run in RUN_DIR (its output folder) from its last checkpoint, with its saved "
            "configuration (RUN_DIR/config.yaml); options that would change the result are refused (threads, "
            "progress, logging and checkpointing may differ)",
        )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as YAML (a complete --config file) and exit without running",
    )
    parser.add_argument(
        "--preset",
        type=Literal[tuple(sorted(PRESETS))] | None,  # type: ignore[misc]
        default=argparse.SUPPRESS,  # absent = DEFAULT_PRESET; kept apart so that --resume sees whether it was given
        metavar="{" + ",".join(sorted(PRESETS)) + "}",
        help=f"built-in model, data and settings that the other options override (default: {DEFAULT_PRESET}). "
        + presets.replace("%", "%%"),
    )
    data_cls, run_cls, gora_cls = classes
    add_dataclass_arguments(parser, data_cls, title="model and data", defaults=preset.data)
    add_dataclass_arguments(parser, run_cls, title=run_cls.__doc__.splitlines()[0].rstrip("."), defaults=preset.train)
    add_dataclass_arguments(parser, gora_cls, title="GoRA", defaults=preset.gora)
    return parser


def parse(command: str, argv: Sequence[str]) -> Any:
    """The options of `gora <command> argv...` (what was given, in --config files and on the line).

    Raises:
        UsageError: an unknown option or file key (named with the nearest valid one), a value of the wrong type, a
            --config file that cannot be read.
    """
    types = field_types(*command_classes(command))
    return parse_args(build_parser(command), argv, types, config_keys(command), what=f"an option of gora {command}")
