"""A fine-tune's output folder: it exists from the moment training starts and always says where the run stands.

    <output>/
      status.json       state (running, interrupted, failed, finished), stage, step, what failed, the resume command
      config.yaml       the effective configuration: every option of `gora finetune` (the fields of DataConfig,
                        TrainConfig and GoraConfig, and the preset), a --config file: `gora finetune --config
                        <output>/config.yaml` repeats the run, `--resume <output>` reads it back (`load_run_config`)
      progress.json     what the report needs from before and during training: metrics before training and after
                        GoRA's initialization, parameter counts, timings, fingerprints of the model and the data, and
                        (once trained) the training log
      init/             the step-0 adapter (PEFT `save_pretrained` + gora_record.json) and, for GoRA, the gradient
                        statistics (gradient_stats.safetensors, for `--load-stats`; not with --no-keep-stats)
      checkpoints/      the Trainer's checkpoint-N folders (adapter, optimizer, scheduler, RNG, trainer state)
      adapter/, report.json, ranks.png, loss.png   the final artifacts, each written whole once it is ready

Every file is written with `gora.fileio.atomic_write` (folders with `staged_folder`), so whenever the run stops the
files it left are whole. `gora finetune --resume <output>` continues from the last complete checkpoint (or step 0)
with the saved configuration; which options a resume may change, and why, is `RESUME_MAY_CHANGE` / `RESUME_FIXED`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import socket
import typing
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ...config import GoraConfig
from ...fileio import atomic_write_text
from ..config.cliconfig import field_types, name_options, option_name
from ..config.runconfig import DataConfig, TrainConfig
from ..errors import UsageError

STATUS = "status.json"
CONFIG = "config.yaml"
PROGRESS = "progress.json"
INIT = "init"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
SERVING = "adapter-serving"  # the same adapter exported for serving engines (gora.export_adapter)
STATS = "gradient_stats.safetensors"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint: its presence = complete

RUNNING, INTERRUPTED, FAILED, FINISHED = "running", "interrupted", "failed", "finished"

# --- what a resume may change -------------------------------------------------------------------------------------
# Every option of `gora finetune` is in exactly one of these two tables (tests/test_app_runfolder.py checks it), so a
# new option needs a decision. A resumed run continues the saved run; an option that would make its result differ
# from the uninterrupted run's is refused, naming it.

RESUME_MAY_CHANGE: dict[str, str] = {
    "threads": "CPU threads: speed only",
    "eval_batch_size": "how many evaluation examples go through the model at once: memory only (e.g. after an "
    "out-of-memory error in the final evaluation); training is unaffected, metrics agree up to float rounding",
    "logging_steps": "how often the training loss is logged: the loss curve's resolution, not the weights",
    "save_strategy": "when checkpoints are written: disk use and how much work a crash can lose, not the weights",
    "save_steps": "when checkpoints are written: disk use and how much work a crash can lose, not the weights",
    "save_total_limit": "how many checkpoints are kept: disk use",
    "offload_to_cpu": "where gradient estimation keeps its sums; a resumed run never estimates",
    "gradient_route": "how gradient estimation reads G (weight gradients or module hooks, equal up to float "
    "rounding); a resumed run never estimates",
    "keep_stats": "whether the statistics were saved in init/ when the run started; a resume neither reads nor "
    "writes them",
    "gradient_checkpointing": "activations recomputed in the backward pass instead of kept: memory and time (e.g. "
    "after an out-of-memory error); the gradients are the same computation",
    "report_to": "where the training log is also sent (tensorboard, ...): logging only",
}

_EXAMPLES = "it selects the examples that train and evaluate the adapter"
_READ = "it sets what the model reads and learns from each example"
_SCORE = "it sets how the evaluation scores answers (before and after training are scored alike)"
_STEPS = "it sets the optimizer's steps (schedule, batches, data order, dropout)"
_GORA = "it sets the adapter's targets, ranks and step-0 initialization (saved in init/)"

RESUME_FIXED: dict[str, str] = {
    "preset": "it selects the built-in model and data",
    "model": "it is the base model the adapter is trained on",
    "dtype": "it sets the precision of the base model's weights and of training's mixed precision",
    "load_in_4bit": "it sets the base model the adapter is trained on (its 4-bit quantization)",
    "load_in_8bit": "it sets the base model the adapter is trained on (its 8-bit quantization)",
    "task": "it is the task the adapter is trained for",
    **dict.fromkeys(("train_file", "eval_file", "eval_fraction", "max_train_samples", "max_eval_samples"), _EXAMPLES),
    **dict.fromkeys(
        (
            "text_column",
            "text_pair_column",
            "label_column",
            "num_labels",
            "sft_format",
            "messages_column",
            "prompt_column",
            "completion_column",
            "response_column",
        ),
        _READ,
    ),
    "max_length": _READ,
    **dict.fromkeys(("answer_column", "max_new_tokens", "eval_metric"), _SCORE),
    "eval_before": "the evaluation before training was made (or not) when the run started",
    **dict.fromkeys(
        (
            "method",
            "epochs",
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "weight_decay",
            "warmup_ratio",
            "lr_scheduler",
            "loraplus_lr_ratio",
            "train_seed",
        ),
        _STEPS,
    ),
    "output_dir": "a resumed run continues in its own folder, the one given to --resume",
    "overwrite": "a resumed run continues its folder; it never replaces one",
    "load_stats": "the run's gradient statistics are saved in init/ and never estimated or loaded again",
    **dict.fromkeys(
        (
            "target_modules",
            "target_parameters",
            "r",
            "min_rank",
            "max_rank",
            "lora_alpha",
            "lora_dropout",
            "gamma",
            "gamma_candidates",
            "gamma_batches",
            "gamma_search",
            "num_batches",
            "seed",
            "importance",
            "features",
            "rounding",
            "scaling",
            "gradient_store",
            "sketch_samples",
            "adaptive_batches",
            "adaptive_threshold",
            "adaptive_min_batches",
            "lora_kwargs",
        ),
        _GORA,
    ),
}


class RunStopped(Exception):
    """The run stopped after its folder was written, and deleted nothing.

    `str(err)` is the one-line message for the user: what happened, what is safe, and the resume command;
    `exit_status` is the command's exit status (1 for a failure, 128 + the signal number for a signal).
    """

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def now() -> str:
    """The time in ISO 8601, local with its UTC offset."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class RunFolder:
    """A fine-tune's output folder (see the module docstring for its layout).

    Args:
        path: The folder, as the user gave it (messages quote it that way; status.json holds the absolute path).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..parallel import main_process

        self.path = Path(path)
        self.writes = main_process()  # under torchrun, rank 0 alone writes; the others' writes are no-ops

    init = property(lambda self: self.path / INIT)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    adapter = property(lambda self: self.path / ADAPTER)

    def resume_command(self, *, absolute: bool = False, processes: int | None = None) -> str:
        """`gora finetune --resume <folder>`, quoted for a POSIX shell; for a run of several processes (default:
        this one's), started the same way: `torchrun --nproc_per_node K -m gora finetune --resume <folder>`."""
        from ..parallel import launch_prefix

        folder = self.path.resolve() if absolute else self.path
        return f"{launch_prefix(processes)}gora finetune --resume {shlex.quote(str(folder))}"

    def is_run(self) -> bool:
        return (self.path / STATUS).is_file()

    # --- the JSON files ----------------------------------------------------------------------------------------

    def read(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as err:
            raise UsageError(
                f"{str(self.path)!r} has no {name}: give --resume the output folder of a `gora finetune` run"
            ) from err
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON ({err}): was it edited by hand?") from err

    def write(self, name: str, data: Mapping[str, Any]) -> None:
        self.write_text(name, json.dumps(data, indent=2, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.writes:
            atomic_write_text(self.path / name, text)

    def status(self) -> dict[str, Any]:
        return self.read(STATUS)

    def status_fields(self, **fields: Any) -> dict[str, Any]:
        """`fields` with what every status.json update carries: the time, this process, the resume command."""
        return {
            **fields,
            "updated": now(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "resume": self.resume_command(absolute=True),
        }

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json (see `status_fields`) and write it whole."""
        status = {**(self.read(STATUS) if self.is_run() else {}), **self.status_fields(**fields)}
        self.write(STATUS, status)
        return status

    def progress(self) -> dict[str, Any]:
        return self.read(PROGRESS)

    def update_progress(self, **fields: Any) -> dict[str, Any]:
        progress = {**self.progress(), **fields}
        self.write(PROGRESS, progress)
        return progress

    # --- checkpoints -------------------------------------------------------------------------------------------

    def checkpoint_steps(self) -> dict[int, Path]:
        """step -> checkpoint folder, for the complete checkpoints (with trainer_state.json, written last)."""
        found = {}
        for folder in self.checkpoints.glob("checkpoint-*"):
            match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
            if match and (folder / TRAINER_STATE).is_file():
                found[int(match.group(1))] = folder
        return dict(sorted(found.items()))

    def last_checkpoint(self) -> Path | None:
        """The complete checkpoint of the latest step, or None."""
        steps = self.checkpoint_steps()
        return steps[max(steps)] if steps else None

    def incomplete_checkpoints(self) -> list[Path]:
        """checkpoint-N folders without trainer_state.json: a save that was cut off (a second signal, a kill)."""
        complete = set(self.checkpoint_steps().values())
        return sorted(p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir() and p not in complete)

    def cut_off_writes(self) -> list[Path]:
        """What a write cut off by a kill leaves in the run folder: a staged folder (`.adapter.partial-*`, see
        `gora.fileio.staged_folder`) or an atomic file's temporary (`.report.*.tmp.json`). Never part of a result;
        a resume removes them once it knows the run is not running."""
        return sorted(
            p for p in self.path.iterdir() if p.name.startswith(".") and (".partial-" in p.name or ".tmp" in p.name)
        )

    def relative(self, path: Path | None) -> str | None:
        return None if path is None else str(path.relative_to(self.path))


# --- saving and loading the configuration --------------------------------------------------------------------------


def config_dict(preset: str | None, data: DataConfig, train: Any, gora: GoraConfig) -> dict[str, Any]:
    """The effective configuration as plain JSON data: {"preset", "data", "train", "gora"} (field -> value), as
    report.json carries it."""
    return {
        "preset": preset,
        "data": dataclasses.asdict(data),
        "train": dataclasses.asdict(train),
        "gora": gora.to_dict(),
    }


def config_yaml(command: str, preset: str | None, data: DataConfig, train: Any, gora: GoraConfig) -> str:
    """The effective configuration as a `--config` file of `gora <command>`: every option, grouped, commented.

    `output_dir` is left unset (so `--config` on this file starts a new run folder rather than colliding with the
    one it came from) and `overwrite` off; the PEFT task type that follows `task` is left out of `lora_kwargs`.
    """
    import yaml

    from ..config.runconfig import TASK_TYPES

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    def typed(values: dict[str, Any], cls: type) -> dict[str, Any]:  # 16 -> 16.0 for a float field, as parsed back
        floats = {name for name, tp in field_types(cls).items() if float in _members(tp)}
        return {
            k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in values.items()
        }

    data_fields = typed(dataclasses.asdict(data), type(data))
    run = typed({**dataclasses.asdict(train), "output_dir": None, "overwrite": False}, type(train))
    gora_fields = typed(gora.to_dict(), type(gora))
    lora_kwargs = dict(gora_fields.pop("lora_kwargs"))
    if lora_kwargs.get("task_type") == TASK_TYPES[data.task]:
        del lora_kwargs["task_type"]
    sections = [
        ("the built-in model, data and settings under the options below", {"preset": preset}),
        ("model and data (DataConfig)", data_fields),
        (f"{type(train).__doc__.splitlines()[0].rstrip('.').lower()} ({type(train).__name__})", run),
        ("GoRA (GoraConfig)", {**gora_fields, "lora_kwargs": lora_kwargs}),
    ]
    lines = [
        f"# gora {command}: the effective configuration. Repeat the run: gora {command} --config <this file>",
        "# (options given on the command line override it; output_dir is unset: a new folder each time).",
    ]
    for title, values in sections:
        lines.append(f"\n# {title}")
        dumped = yaml.dump(plain(values), Dumper=_flow_list_dumper(), sort_keys=False, width=1000)
        lines.append(dumped.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_args(tp) and typing.get_origin(tp) is not Literal else (tp,)


def _flow_list_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block mappings, lists on one line (`target_modules: [q_proj, v_proj]`)."""

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return Dumper


def load_run_config(path: str | os.PathLike[str]) -> tuple[str | None, DataConfig, TrainConfig, GoraConfig]:
    """The dataclasses of a saved configuration (`config_yaml`'s output, e.g. <run>/config.yaml), read exactly as
    `gora finetune --config <path>` reads it.

    Raises:
        UsageError: no such file, keys this version does not know, or values it refuses (a config.yaml of another
            version).
    """
    from ..config.cliconfig import dataclass_kwargs
    from ..config.options import command_classes, parse
    from ..config.runconfig import TASK_TYPES

    if not Path(path).is_file():
        raise UsageError(
            f"{str(Path(path).parent)!r} has no {CONFIG}: give --resume the output folder of a `gora finetune` run"
        )
    try:
        args = parse("finetune", ["--config", str(path)])
        data_cls, train_cls, gora_cls = command_classes("finetune")
        data = data_cls(**dataclass_kwargs(data_cls, args))
        gora_kw = dataclass_kwargs(gora_cls, args)
        lora_kwargs = dict(gora_kw.pop("lora_kwargs", None) or {})
        lora_kwargs.setdefault("task_type", TASK_TYPES[data.task])
        return (
            getattr(args, "preset", None),
            data,
            train_cls(**dataclass_kwargs(train_cls, args)),
            gora_cls(**gora_kw, lora_kwargs=lora_kwargs),
        )
    except (TypeError, ValueError) as err:
        raise UsageError(
            f"the saved configuration ({path}) cannot be read by this version of gora ({err}): resume it with the "
            "gora version that started it"
        ) from err


def resume_configs(
    run: RunFolder,
    *,
    preset: str | None = None,
    data: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
    gora: Mapping[str, Any] | None = None,
) -> tuple[str | None, DataConfig, TrainConfig, GoraConfig]:
    """The run's saved configuration, with the given settings that a resume may change (`RESUME_MAY_CHANGE`)
    layered over it. `train["output_dir"]` is the run's folder.

    Args:
        run: The run folder (its config.yaml is read).
        preset, data, train, gora: What the user gave for this resume (field -> value; only what was given).

    Raises:
        UsageError: one message naming every given option that would change the result (`RESUME_FIXED`), with the
            saved value and why; or an allowed value that is not valid.
    """
    saved_preset, *saved = load_run_config(run.path / CONFIG)
    given = [dict(data or {}), dict(train or {}), dict(gora or {})]
    given_train = given[1]
    if "output_dir" in given_train and Path(given_train["output_dir"]).resolve() == run.path.resolve():
        del given_train["output_dir"]  # the same folder, named again
    refused = []
    if preset is not None and preset != saved_preset:
        refused.append(f"--preset {preset} (the run has {saved_preset}): {RESUME_FIXED['preset']}")
    for config, values in zip(saved, given):
        for name, value in values.items():
            if name in RESUME_MAY_CHANGE or _normal(value) == _normal(getattr(config, name)):
                continue
            reason = RESUME_FIXED.get(name, "it is not listed in RESUME_MAY_CHANGE")
            refused.append(
                f"{option_name(name)} {_show(value)} (the run has {_show(getattr(config, name))}): {reason}"
            )
    if refused:
        raise UsageError(
            f"--resume {run.path} continues the run with the configuration it started with, so options that would "
            f"change its result are refused: {'; '.join(refused)}. Drop "
            f"{'it' if len(refused) == 1 else 'them'}, or start a new run with another --output-dir"
        )
    classes = (DataConfig, TrainConfig, GoraConfig)
    try:
        resumed = [dataclasses.replace(c, **v) for c, v in zip(saved, given)]
    except ValueError as err:
        raise UsageError(name_options(str(err), *classes)) from err
    data_config, train_config, gora_config = resumed
    train_config = dataclasses.replace(train_config, output_dir=str(run.path), overwrite=False)
    return saved_preset, data_config, train_config, gora_config


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def check_resumable(run: RunFolder) -> dict[str, Any]:
    """The status of a run that `--resume` may continue.

    Raises:
        UsageError: not a run folder, a finished run, or a run whose process is still alive on this machine.
    """
    if not run.path.is_dir():
        raise UsageError(f"--resume {run.path}: no such folder: give the output folder of a `gora finetune` run")
    status = run.status()
    state = status.get("state")
    if state == FINISHED:
        raise UsageError(f"--resume {run.path}: the run has finished; its results are in {run.path}")
    if state == RUNNING and status.get("host") == socket.gethostname() and _alive(status.get("pid")):
        raise UsageError(
            f"--resume {run.path}: the run is still running (process {status['pid']}): stop it first (Ctrl-C, or "
            f"kill -TERM {status['pid']}), then resume"
        )
    return status


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
