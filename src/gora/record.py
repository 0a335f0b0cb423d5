"""GoRA's own record (importances, ranks, budget, γ, N, seed, versions), saved beside the adapter as JSON.

It never goes into adapter_config.json: the adapter stays a plain LoRA adapter that PEFT loads without gora.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .fileio import atomic_write_text
from .provenance import base_fingerprint, versions

RECORD_NAME = "gora_record.json"


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
    base_model: dict[str, Any] = field(default_factory=dict)  # provenance.base_fingerprint of the model it was made on
    versions: dict[str, str] = field(default_factory=versions)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `gora_record.json` into `directory` atomically."""
        return atomic_write_text(Path(directory) / RECORD_NAME, self.to_json())

    def check_base(self, model: nn.Module) -> bool:
        """Refuse a base model other than the one this adapter was made on, even one whose shapes all fit (another
        checkpoint of the architecture, e.g. the instruct model for the base): GoRA's initialization, and the
        training that followed, depend on the base weights, so the adapter computes another function there.

        Args:
            model: The base model (a PeftModel's base is read through `get_base_model()`), in any dtype.

        Returns:
            True when checked; False when the record cannot tell (written before gora recorded the base, or made
            on a quantized base, whose dequantized values a full-precision load does not reproduce).

        Raises:
            ValueError: the weights differ, or a recorded module is missing.
        """
        base = self.base_model
        if not base.get("sha256") or base.get("quantized"):
            return False
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        try:
            now = base_fingerprint(model, base["modules"])
        except ValueError as err:
            raise ValueError(f"this is not the base model the adapter was made on: {err}") from err
        if now["sha256"] != base["sha256"]:
            raise ValueError(
                "this is not the base model the adapter was made on: the leading weights of "
                f"{', '.join(base['modules'])} differ from those recorded in {RECORD_NAME} (base_model; compared "
                "rounded to bfloat16, so the dtype the model is loaded in does not matter). Use the checkpoint the "
                "adapter was made on"
            )
        return True

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> GoraRecord:
        path = Path(directory) / RECORD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {RECORD_NAME} in {directory}: was this adapter made with gora?")
        return cls(**json.loads(path.read_text()))
