"""GoRA's own record (importances, ranks, budget, γ, N, seed, versions), saved beside the adapter as JSON.

It never goes into adapter_config.json: the adapter stays a plain LoRA adapter that PEFT loads without gora.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

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
