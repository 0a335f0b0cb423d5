"""Adaptive γ (`GoraConfig(gamma="auto")`): choose the initial step size by the loss on held-out batches.

B0 is linear in γ (initialize.py: B0 = −(γ·√(n/r_i)/s_i)·G·A0ᵀ(A0A0ᵀ)⁻¹), so B0 is solved once at γ = 1 and each
candidate only rescales it in place: lora_B ← γ_k·B0(1). For every candidate γ_k the held-out loss is

    L(γ_k) = (1/K) Σ_j L_j(W0 + s_i·γ_k·B0(1)·A0),   j over K held-out batches, eval mode (no dropout), no grad

and it is compared with L(0), the loss of the unmodified pretrained model (B0 = 0 gives exactly its output):

    γ* = argmin_k { L(γ_k) : L(γ_k) < L(0) },   γ* = 0 when no candidate lowers the loss.

Unlike the research code (spec §3), the reference is the pretrained model itself rather than a perturbed one, the
held-out batches are not the gradient batches (nor one random batch), dropout is off, and every loss is reported.

Which candidates are evaluated (`GoraConfig.gamma_search`):
    grid     every γ_k: K forwards for L(0) plus K per candidate (9 candidates by default);
    bracket  at most BRACKET_EVALS = 3 candidates (`bracket_losses`): start at the candidate nearest the paper's
             γ = 5e-2; if it lowers the loss, step up while the loss keeps falling (else try one below); if it raises
             the loss, back off by two grid steps (4x) until one lowers it, then try the one between. On a loss that
             is unimodal in log γ it finds the grid's γ* whenever γ* lies within one step up or two steps down of the
             start; benchmarks/studies/gamma_search.py measures how often it does on real models.

The start check (`StartCheck`): with a fixed γ the library compares L(γ) with L(0) on held-out batches when it has
some (`eval_dataloader`), and `gora finetune` compares the eval loss after GoRA's initialization with the loss before
training; a start that raises the loss by more than START_TOLERANCE (relative) is reported at once, with the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import ForwardFn, batch_loss, eval_mode, first_batches, model_device, seeded, take
from .config import GoraConfig
from .distributed import is_distributed, ranks_where_false, sum_floats, world_size
from .experts import lora_layer
from .record import GoraRecord

logger = logging.getLogger(__name__)

# γ_k = 5e-2 · 2^k, k = −6..2: 7.8e-4 … 0.2, factor 2 apart. The grid holds the paper's recommended γ = 5e-2 exactly,
# reaches ~1.5 decades below it (where ΔW0 is too small to change the loss beyond noise, so γ = 0 is the honest
# answer) and 4x above it (a step of ‖ΔW0‖ ≈ γ‖G‖ larger than that overshoots on pretrained models). 9 candidates
# cost 9 forwards per held-out batch; the research code's 0.8^k grid costs 52.
PAPER_GAMMA = 5e-2  # the paper's γ: the default of GoraConfig.gamma and where the bracket search starts
DEFAULT_GAMMA_CANDIDATES: tuple[float, ...] = tuple(PAPER_GAMMA * 2.0**k for k in range(-6, 3))
BRACKET_EVALS = 3  # candidates the bracket search evaluates at most (besides L(0), which every search needs)
# a start "raises the loss" when L(γ) > L(0) + START_TOLERANCE·|L(0)|: 0.1%, above float noise between two evaluations of
# one model, far below the raises that matter (the case that prompted the check went 3.96 -> 5.14)
START_TOLERANCE = 1e-3


@dataclass
class GammaSearch:
    """The outcome of the γ search, kept in `GoraRecord.extra["gamma_search"]`.

    Attributes:
        candidates: γ_k, ascending.
        losses: L(γ_k), the mean held-out loss of each candidate (inf where it was not finite).
        base_loss: L(0), the mean held-out loss of the pretrained model (B0 = 0).
        gamma: γ*, the chosen value (0.0 when no candidate lowers the loss).
        num_batches: K, the number of held-out batches (over all ranks under torch.distributed).
        source: Where the held-out batches came from.
        search: "grid" (every candidate evaluated) or "bracket" (`candidates` holds the ones it evaluated).
    """

    candidates: list[float]
    losses: list[float]
    base_loss: float
    gamma: float
    num_batches: int
    source: str
    search: str = "grid"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["losses"] = [loss if math.isfinite(loss) else None for loss in self.losses]  # JSON has no inf
        return out

    def apply_to(self, record: GoraRecord) -> None:
        """Write γ* into the record and the full search into `record.extra["gamma_search"]`."""
        record.gamma = self.gamma
        record.extra["gamma_search"] = self.to_dict()


@dataclass
class StartCheck:
    """Does GoRA's initial step lower the loss? Kept in `GoraRecord.extra["start_check"]` and in `gora finetune`'s
    report.json.

    Attributes:
        base_loss: L(0), the loss of the pretrained model (no adapter, or B0 = 0).
        init_loss: L(γ), the loss with GoRA's initial adapter.
        gamma: The γ of the initial adapter (the chosen one under gamma="auto").
        source: What the losses were measured on ("held-out batches", "eval set").
        raised: L(γ) > L(0) + START_TOLERANCE·|L(0)|: the start is worse than the pretrained model.
    """

    base_loss: float
    init_loss: float
    gamma: float
    source: str
    raised: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        margin = START_TOLERANCE * abs(self.base_loss)
        self.raised = not (self.init_loss <= self.base_loss + margin)  # also when L(γ) is not finite

    def message(self) -> str:
        change = self.init_loss - self.base_loss
        return (
            f"GoRA's initial step (gamma={self.gamma:g}) raised the loss on the {self.source} from "
            f"{self.base_loss:.4f} to {self.init_loss:.4f} ({change:+.4f}, {change / abs(self.base_loss):+.1%}): "
            "the adapter starts worse than the pretrained model. Choose gamma on held-out batches with "
            f"gamma='auto' (gora finetune --gamma auto) or use a smaller gamma (e.g. {self.gamma / 4:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["init_loss"] = self.init_loss if math.isfinite(self.init_loss) else None  # JSON has no inf
        if self.raised:
            out["message"] = self.message()
        return out


def check_start(base_loss: float, init_loss: float, gamma: float, source: str) -> StartCheck:
    """The start check; a start that raises the loss is logged as a warning at once."""
    check = StartCheck(float(base_loss), float(init_loss), float(gamma), source)
    if check.raised:
        logger.warning(check.message())
    else:
        logger.info(
            "GoRA's initial step (gamma=%g) lowers the loss on the %s: %.4f -> %.4f",
            gamma,
            source,
            base_loss,
            init_loss,
        )
    return check


def gamma_candidates(config: GoraConfig) -> tuple[float, ...]:
    """The candidate grid: `config.gamma_candidates` or `DEFAULT_GAMMA_CANDIDATES`, ascending."""
    return tuple(sorted(config.gamma_candidates or DEFAULT_GAMMA_CANDIDATES))


def unit_gamma_config(config: GoraConfig) -> GoraConfig:
    """The same configuration with γ = 1, to solve B0(1) once."""
    return dataclasses.replace(config, gamma=1.0, gamma_candidates=None)


def start_index(grid: Sequence[float]) -> int:
    """The index of the candidate nearest PAPER_GAMMA in log scale (the smaller one on a tie)."""
    return min(range(len(grid)), key=lambda i: (abs(math.log(grid[i] / PAPER_GAMMA)), grid[i]))


def bracket_losses(
    num: int, start: int, loss_at: Callable[[int], float], base_loss: float, evals: int = BRACKET_EVALS
) -> dict[int, float]:
    """The bracket search over an ascending grid of `num` candidates: index -> loss of each candidate it evaluated
    (at most `evals`, each once), starting at `start`.

    The step at `start` lowers the loss below `base_loss`: go up one index while the loss keeps falling; when the
    first step up does not fall (or there is none), try one below `start` instead. The step raises the loss: back off
    two indices at a time (4x on the default grid) until a candidate lowers it, then try the one between that and
    the last that raised it. `choose_gamma` then picks among the evaluated candidates (γ = 0 if none lowers it).
    """
    seen: dict[int, float] = {}

    def f(i: int) -> float:
        if i not in seen:
            seen[i] = loss_at(i)
        return seen[i]

    if f(start) < base_loss:  # the paper's step helps: look up while the loss keeps falling
        i = start
        while i + 1 < num and len(seen) < evals and f(i + 1) < f(i):
            i += 1
        if i == start and start > 0 and len(seen) < evals:
            f(start - 1)
        return seen
    above = start  # the smallest candidate known to raise the loss
    i = start - 2 if start >= 2 else start - 1
    while i >= 0 and len(seen) < evals:
        if f(i) < base_loss:
            if i + 1 < above and len(seen) < evals:
                f(i + 1)
            break
        above, i = i, (i - 2 if i >= 2 else i - 1)
    return seen


def choose_gamma(candidates: Sequence[float], losses: Sequence[float], base_loss: float) -> float:
    """γ* = the candidate with the lowest loss among those below `base_loss` (the smallest γ on ties), else 0."""
    best, best_loss = 0.0, base_loss
    for gamma, loss in sorted(zip(candidates, losses)):
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = gamma, loss
    return best


class HeldOutBatches(list):
    """A list of held-out batches that remembers where they came from (`source`, written into the record)."""

    def __init__(self, batches: Iterable[Any], source: str) -> None:
        super().__init__(batches)
        self.source = source


def held_out_batches(
    config: GoraConfig, dataloader: Iterable[Any], eval_dataloader: Iterable[Any] | None = None
) -> HeldOutBatches:
    """The K = `config.gamma_batches` held-out batches for the γ search.

    With `eval_dataloader`, its first K batches. Otherwise the K batches of `dataloader` that follow the first
    `config.num_batches` (the gradient batches): a one-shot iterator simply continues where estimation stopped; a
    re-iterable (list, DataLoader) is iterated afresh and its first `num_batches` are skipped, which is disjoint from
    the gradient batches when it yields the same order on every pass (no shuffling).

    Raises:
        ValueError: when the source runs out before K batches.
    """
    k = config.gamma_batches
    if eval_dataloader is not None:
        batches = take(iter(eval_dataloader), k)
        _check_enough(
            len(batches),
            k,
            f"eval_dataloader yielded {len(batches)} batch(es) but gamma='auto' needs gamma_batches={k}: "
            "give it more batches or lower gamma_batches",
        )
        return HeldOutBatches(batches, "eval_dataloader")
    iterator = iter(dataloader)
    if iterator is dataloader:  # estimation took exactly the first num_batches (first_batches): no batch is lost
        batches, source = take(iterator, k), "dataloader (next batches after estimation)"
    else:
        if isinstance(getattr(dataloader, "sampler", None), torch.utils.data.RandomSampler):
            logger.warning(
                "gamma='auto': the dataloader shuffles, so the batches after the first num_batches on a new pass "
                "may repeat gradient samples; pass eval_dataloader=... for truly held-out batches"
            )
        skipped = sum(1 for _ in first_batches(iterator, config.num_batches))
        batches = take(iterator, k) if skipped == config.num_batches else []
        source = f"dataloader (batches {config.num_batches}..{config.num_batches + k - 1})"
    _check_enough(
        len(batches),
        k,
        f"the dataloader ran out: gamma='auto' takes gamma_batches={k} held-out batch(es) after the "
        f"num_batches={config.num_batches} gradient batches and found {len(batches)}. Pass "
        "eval_dataloader=... to get_gora_model, give the dataloader more batches, or lower num_batches/gamma_batches",
    )
    return HeldOutBatches(batches, source)


def _check_enough(found: int, needed: int, message: str) -> None:
    """Raise `message` when a rank found fewer than `needed` held-out batches: on every rank under torch.distributed,
    since the held-out losses are averaged over ranks and a rank left alone would wait for the others forever."""
    short = ranks_where_false(found >= needed)
    if not short:
        return
    if found >= needed:
        message = f"rank(s) {short} could not take their gamma_batches={needed} held-out batch(es); see their error"
    elif is_distributed():
        message = f"rank(s) {short}: {message}"
    raise ValueError(message)


@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    forward_fn: ForwardFn | None = None,
    seed: int = 0,
    strict: bool = True,
) -> float:
    """The mean loss (1/K) Σ_j L_j over `batches`, in eval mode and without gradients.

    Under torch.distributed the mean is over every rank's batches (one all-reduce), so every rank sees the same
    losses and chooses the same γ; every rank must call it (`held_out_batches` checks they all have K batches).
    Every module's train/eval flag (and any bitsandbytes CPU repacking switch) is restored afterwards, and the
    caller's RNG state is untouched.

    Args:
        model: The model to run (a plain model, or the base model inside a PeftModel).
        batches: Dicts of keyword arguments giving `.loss`, or anything `forward_fn(model, batch)` takes.
        forward_fn: Optional `forward_fn(model, batch) -> loss`.
        seed: Seed of any randomness left in the forward.
        strict: Raise on a non-finite loss (else return inf).

    Raises:
        ValueError: a batch that gives no scalar loss, or (strict) a non-finite loss.
    """
    device = model_device(model)
    losses = []
    bad: tuple[int, float] | None = None  # (index, loss) of the first non-finite batch
    with eval_mode(model), seeded(seed, device):
        for index, batch in enumerate(batches):
            loss = float(batch_loss(model, batch, forward_fn, device, f"held-out batch {index}").float())
            if not math.isfinite(loss):
                bad = (index, loss)
                break
            losses.append(loss)
    total, count = math.fsum(losses), len(losses)
    bad_ranks = ranks_where_false(bad is None)  # also the all-reduce below: the same outcome on every rank
    if bad_ranks:
        if strict:
            what = (
                f"held-out batch {bad[0]} gives a non-finite loss ({bad[1]})"
                if bad
                else "a held-out batch gives a non-finite loss"
            )
            ranks = f" (non-finite on rank(s) {bad_ranks})" if is_distributed() else ""
            raise ValueError(f"{what} on the pretrained model{ranks}: check its inputs and labels")
        return math.inf
    total, count = sum_floats([total, float(count)])
    return total / count


@torch.no_grad()
def search_gamma(
    peft_model: Any,
    unit_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Sequence[Any],
    config: GoraConfig,
    *,
    base_loss: float,
    forward_fn: ForwardFn | None = None,
    adapter_name: str = "default",
) -> GammaSearch:
    """Try every candidate γ_k by rescaling lora_B in place, pick γ*, and leave lora_B = γ*·B0(1).

    Args:
        peft_model: The PeftModel whose layers already hold A0 (and any B).
        unit_weights: Module name -> (A0, B0(1)), the initialization at γ = 1.
        batches: The held-out batches.
        config: The configuration (candidates, seed).
        base_loss: L(0), the held-out loss of the pretrained model.
        forward_fn: Optional `forward_fn(model, batch) -> loss`; it receives the model with LoRA layers inside.
        adapter_name: The adapter whose lora_B is set.

    It leaves `peft_model` as it is on failure: its caller (`model.build_gora_model`) removes the LoRA layers.
    """
    model = peft_model.get_base_model()
    lora_B = {name: lora_layer(model, name).lora_B[adapter_name].weight for name in unit_weights}
    grid = list(gamma_candidates(config))

    def loss_at(i: int) -> float:
        _scale_lora_B(lora_B, unit_weights, grid[i])  # lora_B ← γ_k·B0(1)
        return held_out_loss(model, batches, forward_fn=forward_fn, seed=config.seed, strict=False)

    if config.gamma_search == "grid":
        seen = {i: loss_at(i) for i in range(len(grid))}
    else:
        seen = bracket_losses(len(grid), start_index(grid), loss_at, base_loss)
    candidates = [grid[i] for i in sorted(seen)]
    losses = [seen[i] for i in sorted(seen)]
    chosen = choose_gamma(candidates, losses, base_loss)
    _scale_lora_B(lora_B, unit_weights, chosen)
    source = getattr(batches, "source", "eval_batches")
    search = GammaSearch(
        candidates, losses, base_loss, chosen, len(batches) * world_size(), source, config.gamma_search
    )
    _log_search(search)
    return search


def _scale_lora_B(
    lora_B: Mapping[str, torch.Tensor], unit_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], gamma: float
) -> None:
    for name, weight in lora_B.items():
        unit = unit_weights[name][1]
        weight.copy_((unit * gamma).to(device=weight.device, dtype=weight.dtype))


def _log_search(search: GammaSearch) -> None:
    rows = "\n".join(
        f"  {gamma:>10.3e}  {loss:>12.6f}  {loss - search.base_loss:>+12.3e}"
        + ("  <- chosen" if gamma == search.gamma else "")
        for gamma, loss in zip(search.candidates, search.losses)
    )
    logger.info(
        "GoRA gamma search (%s) on %d held-out batches (%s):\n  %10s  %12s  %12s\n  %10.3e  %12.6f  (pretrained)\n%s",
        search.search,
        search.num_batches,
        search.source,
        "gamma",
        "loss",
        "vs pretrained",
        0.0,
        search.base_loss,
        rows,
    )
    if search.gamma == 0:
        logger.warning(
            "GoRA gamma='auto': no candidate in %.3g..%.3g lowers the held-out loss below the pretrained model's "
            "%.6f, so gamma = 0 (B0 = 0: the adapter starts as plain LoRA with GoRA's ranks)",
            search.candidates[0],
            search.candidates[-1],
            search.base_loss,
        )
    else:
        logger.info(
            "GoRA gamma='auto': gamma = %.3e (held-out loss %.6f -> %.6f)",
            search.gamma,
            search.base_loss,
            search.losses[search.candidates.index(search.gamma)],
        )
        if search.gamma == search.candidates[-1]:
            logger.info(
                "GoRA gamma='auto': the largest candidate won; a larger gamma may do better (gamma_candidates)"
            )
