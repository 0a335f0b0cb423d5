"""Where gradient estimation keeps its statistics: the `GradientStore` interface the stores share, the full store
(S = Σ_k g_k per target, float32), and the token chunks in which the module-hook route's x and dy are read in float32.

`estimate.py` feeds a store batch by batch; `sketch.SketchStore` is the bounded-memory one (built on `FullStore` for
its small layers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

from .config import GoraConfig
from .distributed import all_reduce_sum_
from .importance import layer_importance
from .targets import Target

_CHUNK_ELEMENTS = 1 << 22  # float32 numbers per token chunk of x or dy (16 MiB) in the module-hook route


class GradientStore(Protocol):
    """What estimation keeps per target: folded batch by batch, summed over ranks and divided once at the end."""

    needs_pilot: bool  # whether `pilot_fold` / `finish_pilot` run over the first batch before the N batches

    def pilot_fold(self, target: Target, grad: torch.Tensor | Outer, weight: torch.Tensor) -> None: ...

    def finish_pilot(self, weight_of: Callable[[str], torch.Tensor], reduce: dict[str, bool]) -> None: ...

    def fold(self, target: Target, grad: torch.Tensor) -> None:
        """Add one batch's gradient g [m, n] (float32 or lower) of `target`."""

    def fold_outer(self, target: Target, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Add one batch's g = Σ_tokens dyᵀ x from the layer's input x [..., n] and output gradient dy [..., m]."""

    def running_importance(
        self, target: Target, weight_of: Callable[[str], torch.Tensor], reduce: bool, batches: int
    ) -> float | None:
        """I of the running mean after `batches` batches (summed over ranks when `reduce`); None before a gradient.
        `weight_of(name)` gives W [m, n] (dequantized, for a quantized layer), called only when W is needed."""

    def finish(self, name: str, reduce: bool, batches: int) -> tuple[str, torch.Tensor, float | None]:
        """("gradients" or "sketches", the mean statistic, the estimated importance or None) of one layer."""

    def nbytes(self) -> int: ...


class FullStore:
    """`gradient_store="full"`: S = Σ_k g_k in float32 per target (also the small layers of the sketch store)."""

    needs_pilot = False

    def __init__(self, targets: Iterable[Target], config: GoraConfig, device: torch.device) -> None:
        self.config = config
        self.sums = {t.name: torch.zeros(t.shape, dtype=torch.float32, device=device) for t in targets}

    def pilot_fold(self, target: Target, grad: torch.Tensor | Outer, weight: torch.Tensor) -> None:
        raise RuntimeError("the full store has no pilot pass")

    def finish_pilot(self, weight_of: Callable[[str], torch.Tensor], reduce: dict[str, bool]) -> None:
        raise RuntimeError("the full store has no pilot pass")

    def fold(self, target: Target, grad: torch.Tensor) -> None:
        S = self.sums[target.name]
        S.add_(grad if grad.device == S.device else grad.to(S.device))  # S += g_k (promoted to float32 in place)

    def fold_outer(self, target: Target, x: torch.Tensor, dy: torch.Tensor) -> None:
        S = self.sums[target.name]
        if S.device != x.device:  # statistics offloaded: g_k on the model's device, then added
            self.fold(target, Outer(x, dy).rows())
            return
        for x_c, dy_c in token_chunks(x, dy):
            S.addmm_(dy_c.T, x_c)  # S += Σ_tokens dyᵀ x, no g_k formed

    def running_importance(
        self, target: Target, weight_of: Callable[[str], torch.Tensor], reduce: bool, batches: int
    ) -> float | None:
        S = self.sums[target.name]
        S = all_reduce_sum_(S.clone()) if reduce else S
        if not bool(S.any()):
            return None
        # I(S/k) = I(S)/k: 1-homogeneous
        return layer_importance(weight_of(target.name), S, self.config.importance) / batches

    def finish(self, name: str, reduce: bool, batches: int) -> tuple[str, torch.Tensor, float | None]:
        S = self.sums.pop(name)
        return "gradients", (all_reduce_sum_(S) if reduce else S).div_(batches), None

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.sums.values())


def token_chunks(x: torch.Tensor, dy: torch.Tensor, width: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x_c [T, n], dy_c [T, m]) in float32, T tokens at a time, so that no float32 copy holds more than about
    `_CHUNK_ELEMENTS` numbers (nor T·width, for a caller that makes a [T, width] intermediate)."""
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"a layer's input has {x.shape[0]} tokens but its output gradient {dy.shape[0]}")
    step = max(1, _CHUNK_ELEMENTS // max(x.shape[1], dy.shape[1], width))
    for start in range(0, x.shape[0], step):
        yield x[start : start + step].float(), dy[start : start + step].float()


class Outer:
    """g = Σ_tokens dyᵀ x [m, n] of one forward call (module hooks), formed on demand in float32: whole, or a block
    of rows at a time (the sketch's pilot), so that it need never exist whole."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.x, self.dy = x, dy
        self.shape = (dy.shape[-1], x.shape[-1])

    def rows(self, rows: slice = slice(None)) -> torch.Tensor:
        g = torch.zeros(len(range(*rows.indices(self.shape[0]))), self.shape[1], device=self.x.device)
        for x_c, dy_c in token_chunks(self.x, self.dy):
            g.addmm_(dy_c[:, rows].T, x_c)
        return g
