"""GoRA's own record (importances, ranks, budget, γ, N, seed, versions), saved beside the adapter as JSON.

It never goes into adapter_config.json: the adapter stays a plain LoRA adapter that PEFT loads without gora.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORD_NAME = "gora_record.json"


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the result."""
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "gora": __version__,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class GoraRecord:
    """Everything GoRA decided for one adapter."""

    config: dict[str, Any]
    num_batches: int
    budget: float
    trainable_params: int
    lora_params: int
    ranks: dict[str, int]
    importances: dict[str, float]
    advantages: dict[str, float]
    shapes: dict[str, list[int]]
    scalings: dict[str, float]
    no_grad: list[str]
    dropped: list[str]
    gamma: float
    timings_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `gora_record.json` into `directory` atomically."""
        return atomic_write_text(Path(directory) / RECORD_NAME, self.to_json())

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> GoraRecord:
        path = Path(directory) / RECORD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {RECORD_NAME} in {directory}: was this adapter made with gora?")
        return cls(**json.loads(path.read_text()))


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary file in the same folder, fsync it and rename it over `path`, so no truncated
    file is ever left, whatever happens in between."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target` to fill; on success it is renamed to `target` (replacing it
    with `overwrite`), on any failure it is deleted, so `target` ends up complete or as it was.

    Raises:
        ValueError: `target` is a file, or a non-empty folder and `overwrite` is False (checked before yielding).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output path {str(target)!r} is a file: choose a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"output folder {str(target)!r} is not empty: choose another folder or allow replacing it "
            "(overwrite=True, --overwrite)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
