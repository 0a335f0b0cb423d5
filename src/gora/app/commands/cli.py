"""The `gora` command: `gora finetune` (and `gora finetune --resume <run>`), `gora allocate`, `gora merge`,
`gora export`.

Options come from the typed config dataclasses (GoraConfig, DataConfig, TrainConfig, AllocateConfig, MergeConfig,
ExportConfig) through jsonargparse (cliconfig.py); `--config run.yaml` sets any of them from a file, and the options on the line
override it. Only the options the user gives (in the file or on the line) are layered over the preset's values (or,
with --resume, over the run's saved configuration). This module is the user interface, so it prints; the library
logs. Bad input exits with status 2 and one message; a run that stops once training has started exits with 1 (a
failure) or 128 + the signal number, and one message saying what is safe and how to resume. Under torchrun /
accelerate launch every rank runs this; rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ..config.cliconfig import CONFIG_OPTION, UsageError, config_files, dataclass_kwargs, name_options
from ..config.options import COMMANDS, build_parser, command_classes, parse
from ..run.runfolder import RunStopped

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gora` console script; returns the exit status."""
    _offline_by_default()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # `gora` alone = `gora finetune`
        argv = ["finetune"]
    command = argv[0]
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate launch: rank 0 prints
    if command not in COMMANDS:
        from jsonargparse import ArgumentError

        try:
            build_parser().parse_args(argv)  # --help prints the commands (SystemExit 0)
        except ArgumentError as err:
            print(f"gora: error: {' '.join(str(err).split())}", file=sys.stderr)
        else:
            print(f"gora: error: unknown command {command!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parse(command, argv[1:])
        _setup_logging(args.quiet, main_rank)
        if command == "merge":
            return _merge(args)
        if command == "export":
            return _export(args)
        return _run(command, args, started, argv[1:], main_rank)
    except RunStopped as err:  # after training started: what is safe and the resume command, on one line
        if main_rank:
            print(f"gora {command}: {err}", file=sys.stderr)
        return err.exit_status
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        if main_rank:
            print(f"gora {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if main_rank:
            print(
                f"gora {command}: interrupted before training started; no output folder was left behind",
                file=sys.stderr,
            )
        return 130


def _offline_by_default() -> None:
    """gora never reaches the Hugging Face Hub unless the user says so (HF_HUB_OFFLINE=0, or TRANSFORMERS_OFFLINE=0):
    models and data come from local folders and the local cache. huggingface_hub reads the variable when it is
    imported, which `import gora` (transformers) has done before this runs, so its constant is set too."""
    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def _setup_logging(quiet: bool, main_rank: bool = True) -> None:
    level = logging.WARNING if quiet or not main_rank else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gora").setLevel(level)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional QGoRA backend's import-time notices
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        if quiet or not main_rank:  # also the "Loading weights" bar of from_pretrained
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _run(command: str, args: Any, started: float, argv: Sequence[str], main_rank: bool) -> int:
    from ..config.runconfig import DEFAULT_PRESET, resolve_configs
    from ..run.runfolder import config_yaml
    from ..run.train import finetune, resume_finetune
    from .allocate import allocate_only

    data_cls, run_cls, gora_cls = command_classes(command)
    show = not args.quiet and main_rank
    given_preset = getattr(args, "preset", None)
    if command == "finetune" and args.resume is not None:
        if config_files(argv):
            raise UsageError(
                f"--resume {args.resume} continues the run with its own configuration ({args.resume}/config.yaml): "
                f"drop {CONFIG_OPTION}"
            )
        report = resume_finetune(
            args.resume,
            preset=given_preset,
            data=dataclass_kwargs(data_cls, args),
            train=dataclass_kwargs(run_cls, args),
            gora=dataclass_kwargs(gora_cls, args),
            show_progress=show,
        )
        if main_rank:
            print_finetune(report, time.perf_counter() - started)
        return 0
    preset = given_preset or DEFAULT_PRESET
    with _options_in_errors(data_cls, run_cls, gora_cls):
        data, run, gora = resolve_configs(
            preset,
            dataclass_kwargs(data_cls, args),
            dataclass_kwargs(run_cls, args),
            dataclass_kwargs(gora_cls, args),
            train_cls=run_cls,
        )
    if args.print_config:
        if main_rank:
            print(config_yaml(command, preset, data, run, gora), end="")
        return 0
    if command == "finetune":
        report = finetune(data, run, gora, preset=preset, show_progress=show)
        if main_rank:
            print_finetune(report, time.perf_counter() - started)
    else:
        report = allocate_only(data, run, gora, preset=preset, show_progress=show)
        if main_rank:
            print_allocation(report, time.perf_counter() - started)
    return 0


@contextlib.contextmanager
def _options_in_errors(*classes: type) -> Iterator[None]:
    """Re-raise a config validation error (which names dataclass fields) naming the options the user typed."""
    try:
        yield
    except ValueError as err:
        raise ValueError(name_options(str(err), *classes)) from err


def _merge(args: Any) -> int:
    from .merge import merge_adapter

    (merge_cls,) = command_classes("merge")
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


def _export(args: Any) -> int:
    from ...export import export_adapter

    (export_cls,) = command_classes("export")
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
    from ..run.report import RankTable, format_rank_table

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
    if (report.get("start_check") or {}).get("raised"):
        print(f"WARNING: {report['start_check']['message']}")
    if "before" in m and metric != "loss":
        print(f"eval loss: {m['before']['loss']:.4f} -> {m['after']['loss']:.4f}")
    if "generated" in m["after"]:
        print(f"exact match on {m['after']['generated']} generated answers")
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
    """Which folder goes to which tool: PEFT and vLLM >= 0.32 read adapter/ as trained; older vLLM, SGLang and
    llama.cpp read adapter-serving/ (or cannot serve the adapter)."""
    if serving.get("exported") is False:  # target_parameters: no engine export (docs/moe.md)
        print(
            f"deploy: PEFT -> {serving['adapter_dir']}; merged weights -> gora merge --adapter {serving['adapter_dir']}"
        )
    else:
        vllm_ok = any(n["engine"] == "vLLM" and n["servable"] for n in serving["engines"])
        as_trained = "PEFT and vLLM >= 0.32" if vllm_ok else "PEFT"
        print(
            f"deploy: {as_trained} -> {serving['adapter_dir']} (as trained: rank_pattern/alpha_pattern, "
            f"rsLoRA; PEFT also reads {serving['output_dir']}); vLLM < 0.32, SGLang and llama.cpp -> "
            f"{serving['output_dir']} (each layer's scaling folded in, one rank {serving['rank']}: they read one r "
            f"and lora_alpha, llama.cpp no rsLoRA); merged weights -> gora merge --adapter {serving['adapter_dir']}"
        )
    for note in (n for n in serving["engines"] if n["engine"] != "PEFT"):
        print(f"  {note['engine']}: " + (note["note"] if note["servable"] else f"NOT servable: {note['note']}"))


def print_allocation(report: dict[str, Any], wall_s: float) -> None:
    """Rank table, parameters, times and outputs of `gora allocate`."""
    from ..run.report import RankTable, format_rank_table

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
