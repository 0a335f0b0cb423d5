"""Layer importance I(W) from the weight W and the mean gradient G, in float32 whatever the model dtype.

The paper's metric is I(W) = avg(|W ⊙ G|) ("parameter sensitivity"); the others serve its ablation.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Importance
from .distributed import sync_importances, unwrap_model
from .stats import GradientStats
from .targets import get_weight

_ROW_CHUNK_ELEMENTS = 1 << 24  # rows are processed in chunks of ~16M elements so huge layers need no fp32 copy of W


def layer_importance(weight: torch.Tensor, grad: torch.Tensor, metric: Importance) -> float:
    """I(W) of one layer; `weight` and `grad` share the [m, n] layout ([E, m, n] for an expert stack)."""
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and gradient {tuple(grad.shape)} differ in shape")
    if weight.dim() == 3:  # E experts sharing one rank: I = E · mean over the experts reached of I(W_e, G_e)
        reached = [e for e in range(grad.shape[0]) if bool(grad[e].any())]  # G_e = 0: no token routed to e
        values = [layer_importance(weight[e], grad[e], metric) for e in reached]
        return grad.shape[0] * sum(values) / len(values) if values else 0.0
    grad = grad.to(device=weight.device, dtype=torch.float32)
    if metric == "grad_nuclear":  # ‖G‖_*
        return float(torch.linalg.svdvals(grad).sum())
    if metric == "grad_frobenius":  # ‖G‖_F
        return float(torch.linalg.vector_norm(grad))
    if metric == "wg_nuclear":  # ‖W ⊙ G‖_*
        return float(torch.linalg.svdvals(weight.float() * grad).sum())
    rows = max(1, _ROW_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        wg = weight[start : start + rows].float() * grad[start : start + rows]  # W ⊙ G, one chunk
        if metric == "mean_abs_wg":
            total += wg.abs().sum(dtype=torch.float64)
        elif metric == "wg_frobenius":
            total += wg.square().sum(dtype=torch.float64)
        else:
            raise ValueError(f"unknown importance metric {metric!r}")
    if metric == "mean_abs_wg":  # avg(|W ⊙ G|)
        return float(total / weight.numel())
    return float(total.sqrt())  # ‖W ⊙ G‖_F


@torch.no_grad()
def compute_importances(model: nn.Module, stats: GradientStats, metric: Importance) -> dict[str, float]:
    """I(W_i) for every target that received a gradient, keyed by module name, in model order.

    Layers held as a sketch (`gradient_store="sketch"`) carry the importance estimated during estimation.
    FSDP2-sharded weights are gathered, and bitsandbytes weights dequantized, one layer at a time (Ŵ = deq(Q(W0)),
    the base that is trained); a DDP wrapper is looked through. Under
    torch.distributed every rank gets rank 0's values, so the allocation is identical on every rank.
    """
    if stats.sketches and metric != stats.importance_metric:
        raise ValueError(
            f"these statistics are a sketch whose importances were estimated as {stats.importance_metric!r}; "
            f"{metric!r} needs the full gradient: re-estimate with gradient_store='full' or use that metric"
        )
    model = unwrap_model(model)
    by_name = {t.name: t for t in stats.targets}
    out: dict[str, float] = {}
    for name in stats.shapes:
        if name in stats.gradients:  # W of this layer only: an FSDP2 shard gathered, a quantized layer dequantized
            out[name] = layer_importance(get_weight(model, by_name[name]), stats.gradients[name], metric)
        else:
            out[name] = stats.importances[name]
    return sync_importances(out)
