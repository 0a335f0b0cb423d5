"""The `gora` command: `gora finetune` (and `gora finetune --resume <run>`), `gora allocate`, `gora merge`,
`gora export`.

Options come from the typed config dataclasses (GoraConfig, DataConfig, TrainConfig, AllocateConfig, MergeConfig,
ExportConfig) through one generic builder (cliconfig.py); only the options the user gives are layered over the
preset's values (or, with --resume, over the run's saved configuration). This module is the user interface, so it
prints; the library logs. Bad input exits with status 2 and one message; a run that stops once training has started
exits with 1 (a failure) or 128 + the signal number, and one message saying what is safe and how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from .cliconfig import add_dataclass_arguments, dataclass_kwargs, name_options
from .runfolder import RunStopped

EXIT_USAGE = 2


def _configs() -> tuple[Any, ...]:
    from ..config import GoraConfig
    from .runconfig import AllocateConfig, DataConfig, MergeConfig, TrainConfig

    return GoraConfig, DataConfig, TrainConfig, AllocateConfig, MergeConfig


def _export_config() -> type:
    from .runconfig import ExportConfig

    return ExportConfig


def build_parser() -> argparse.ArgumentParser:
    """The `gora` parser with its four subcommands (each option generated from a dataclass field)."""
    from .runconfig import DEFAULT_PRESET, PRESETS

    gora_cls, data_cls, train_cls, alloc_cls, merge_cls = _configs()
    parser = argparse.ArgumentParser(
        prog="gora",
        description="GoRA (gradient-driven adaptive LoRA) for PEFT: fine-tune, allocate ranks, merge adapters, "
        "export them for serving engines. "
        "`gora` alone runs `gora finetune` on the embedded default; `gora <command> --help` lists the options.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars; only warnings and the summary")
    subparsers = parser.add_subparsers(dest="command", metavar="{finetune,allocate,merge,export}")
    presets = "; ".join(f"{name}: {p.summary}" for name, p in PRESETS.items())
    preset = PRESETS[DEFAULT_PRESET]

    def add_common(sub: argparse.ArgumentParser, run_cls: type) -> None:
        sub.add_argument(
            "--preset",
            choices=sorted(PRESETS),
            default=None,  # None = DEFAULT_PRESET; kept apart so that --resume sees whether it was given
            help=f"built-in model, data and settings that the other options override (default: {DEFAULT_PRESET}). "
            + presets.replace("%", "%%"),
        )
        add_dataclass_arguments(sub, data_cls, title="model and data", defaults=preset.data)
        add_dataclass_arguments(sub, run_cls, title=run_cls.__doc__.splitlines()[0].rstrip("."), defaults=preset.train)
        add_dataclass_arguments(sub, gora_cls, title="GoRA", defaults=preset.gora)

    epilog = f"Defaults shown are those of --preset {DEFAULT_PRESET}."
    finetune = subparsers.add_parser(
        "finetune",
        help="GoRA (or LoRA) fine-tune, evaluate, save adapter + report",
        description="Load a model and data, run GoRA (gradient estimation -> rank allocation -> initialization), "
        "train with transformers' Trainer, evaluate before and after, and write the adapter, gora_record.json, "
        "report.json and plots (--load-stats: reuse the gradient statistics of `gora allocate --save-stats` instead "
        "of estimating). Training writes checkpoints; Ctrl-C (or SIGTERM) finishes the step, writes one and stops, a "
        "second Ctrl-C stops at once; --resume continues. With no options: " + preset.summary + ".",
        epilog=epilog,
        parents=[common],
    )
    finetune.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (its output folder) from its last checkpoint, with its saved configuration; "
        "options that would change the result are refused (threads, progress, logging and checkpointing may differ)",
    )
    add_common(finetune, train_cls)
    allocate = subparsers.add_parser(
        "allocate",
        help="gradient estimation + rank allocation only; rank table and heatmap",
        description="Estimate gradients (or reuse saved statistics) and allocate ranks; print the rank table and "
        "write the heatmap. --save-stats keeps the statistics so other r/min_rank/max_rank reuse them.",
        epilog=epilog,
        parents=[common],
    )
    add_common(allocate, alloc_cls)
    merge = subparsers.add_parser(
        "merge", help="merge a saved adapter into its base model", description=merge_cls.__doc__, parents=[common]
    )
    add_dataclass_arguments(merge, merge_cls, title="merge")
    export_cls = _export_config()
    export = subparsers.add_parser(
        "export",
        help="write an adapter that vLLM, llama.cpp and PEFT compute the same way",
        description=" ".join(export_cls.__doc__.split())
        + " Prints the --max-lora-rank vLLM needs and the llama.cpp conversion commands.",
        parents=[common],
    )
    add_dataclass_arguments(export, export_cls, title="export")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gora` console script; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "finetune"
    if args.command is None:  # `gora` alone = `gora finetune`
        args = parser.parse_args(["finetune", *(argv if argv is not None else sys.argv[1:])])
    _setup_logging(args.quiet)
    try:
        if command == "merge":
            return _merge(args)
        if command == "export":
            return _export(args)
        return _run(command, args, started)
    except RunStopped as err:  # after training started: what is safe and the resume command, on one line
        print(f"gora {command}: {err}", file=sys.stderr)
        return err.exit_status
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"gora {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"gora {command}: interrupted before training started; no output folder was left behind", file=sys.stderr
        )
        return 130


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gora").setLevel(level)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional QGoRA backend's import-time notices
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _run(command: str, args: argparse.Namespace, started: float) -> int:
    from .runconfig import DEFAULT_PRESET, resolve_configs
    from .train import allocate_only, finetune, resume_finetune

    gora_cls, data_cls, train_cls, alloc_cls, _ = _configs()
    run_cls = train_cls if command == "finetune" else alloc_cls
    show = not args.quiet
    if command == "finetune" and args.resume is not None:
        report = resume_finetune(
            args.resume,
            preset=args.preset,
            data=dataclass_kwargs(data_cls, args),
            train=dataclass_kwargs(train_cls, args),
            gora=dataclass_kwargs(gora_cls, args),
            show_progress=show,
        )
        print_finetune(report, time.perf_counter() - started)
        return 0
    preset = args.preset or DEFAULT_PRESET
    with _options_in_errors(data_cls, run_cls, gora_cls):
        data, run, gora = resolve_configs(
            preset,
            dataclass_kwargs(data_cls, args),
            dataclass_kwargs(run_cls, args),
            dataclass_kwargs(gora_cls, args),
            train_cls=run_cls,
        )
    if command == "finetune":
        report = finetune(data, run, gora, preset=preset, show_progress=show)
        print_finetune(report, time.perf_counter() - started)
    else:
        report = allocate_only(data, run, gora, preset=preset, show_progress=show)
        print_allocation(report, time.perf_counter() - started)
    return 0


@contextlib.contextmanager
def _options_in_errors(*classes: type) -> Iterator[None]:
    """Re-raise a config validation error (which names dataclass fields) naming the options the user typed."""
    try:
        yield
    except ValueError as err:
        raise ValueError(name_options(str(err), *classes)) from err


def _merge(args: argparse.Namespace) -> int:
    from .train import merge_adapter

    _, _, _, _, merge_cls = _configs()
    with _options_in_errors(merge_cls):
        config = merge_cls(**dataclass_kwargs(merge_cls, args))
    result = merge_adapter(
        config.adapter, config.output_dir, base=config.base, dtype=config.dtype, overwrite=config.overwrite
    )
    print(
        f"merged {result['adapter']} into {result['base']}: standalone {result['dtype']} model in {result['model']} "
        "(loads with transformers alone)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..export import export_adapter

    export_cls = _export_config()
    with _options_in_errors(export_cls):
        config = export_cls(**dataclass_kwargs(export_cls, args))
    result = export_adapter(
        config.adapter, config.output_dir, rank=config.rank, dtype=config.dtype, overwrite=config.overwrite
    )
    print(result.summary())
    return 0


def _params_line(params: dict[str, Any], method: str) -> str:
    name = "GoRA" if method == "gora" else method
    return (
        f"{name} adapter {params['adapter']:,} vs LoRA at r (same targets) {params['lora_same_r']:,} "
        f"({params['ratio_to_lora']:.3f}x)"
    )


def print_finetune(report: dict[str, Any], wall_s: float) -> None:
    """The end-of-run summary: metric before/after, parameters, rank table, stage times, outputs."""
    from .report import RankTable, format_rank_table

    metric = report["metric"]
    m = report["metrics"]
    print()
    print(
        f"== gora finetune: {report['method']} on {report['task']} ({report['sizes']['train']} train / "
        f"{report['sizes']['eval']} eval) =="
    )
    print(f"model: {report['sources']['model']}")
    parts = []
    for stage, label in (("before", "before training"), ("init", "after GoRA init"), ("after", "after training")):
        if stage in m:
            parts.append(f"{label} {m[stage][metric]:.4f}")
    print(f"{metric}: " + " | ".join(parts))
    if "before" in m:
        print(f"eval loss: {m['before']['loss']:.4f} -> {m['after']['loss']:.4f}")
    p = report["params"]
    print(
        f"trainable parameters: {_params_line(p, report['method'])}; all trainable incl. heads "
        f"{p['trainable_total']:,} of {p['model_total']:,}"
    )
    table = report["rank_table"]
    print("ranks (layer x module type):")
    print(format_rank_table(RankTable(table["layers"], table["module_types"], table["ranks"])))
    times = report["timings_s"]
    print(
        "time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in times.items()) + f"; total {wall_s:.1f}s"
    )
    if report.get("sessions", 1) > 1:
        print(f"resumed: {report['sessions']} sessions (the figures above cover the whole run)")
    if report["config"]["train"].get("load_stats"):
        print(f"gradient statistics reused from {report['config']['train']['load_stats']} (no estimation)")
    print("outputs: " + ", ".join(f"{k} {v}" for k, v in report["outputs"].items()))
    if report.get("serving"):
        print_deploy(report["serving"])


def print_deploy(serving: dict[str, Any]) -> None:
    """Which folder goes to which tool: PEFT reads adapter/, the engines read adapter-serving/ (or cannot)."""
    print(
        f"deploy: PEFT -> {serving['adapter_dir']} (as trained, with gora_record.json) or {serving['output_dir']}; "
        f"vLLM and llama.cpp -> {serving['output_dir']} (each layer's scaling folded in, one rank "
        f"{serving['rank']}: the engines ignore rank_pattern/alpha_pattern, llama.cpp also rsLoRA); merged weights "
        f"-> gora merge --adapter {serving['adapter_dir']}"
    )
    for note in (n for n in serving["engines"] if n["engine"] != "PEFT"):
        print(f"  {note['engine']}: " + (note["note"] if note["servable"] else f"NOT servable: {note['note']}"))


def print_allocation(report: dict[str, Any], wall_s: float) -> None:
    """Rank table, parameters, times and outputs of `gora allocate`."""
    from .report import RankTable, format_rank_table

    table = report["rank_table"]
    print()
    print(f"== gora allocate: {len(report['ranks'])} layers, N = {report['num_batches']} batches ==")
    print(format_rank_table(RankTable(table["layers"], table["module_types"], table["ranks"])))
    print(f"trainable parameters: {_params_line(report['params'], 'gora')}")
    times = report["timings_s"]
    print(
        "time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in times.items()) + f"; total {wall_s:.1f}s"
    )
    stats = report["stats"]
    if stats["saved_to"]:
        print(f"gradient statistics saved to {stats['saved_to']} (reuse with --load-stats)")
    if stats["loaded_from"]:
        print(f"gradient statistics reused from {stats['loaded_from']}")
    print("outputs: " + ", ".join(f"{k} {v}" for k, v in report["outputs"].items()))


if __name__ == "__main__":
    sys.exit(main())
