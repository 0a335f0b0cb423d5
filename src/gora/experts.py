"""GoRA on bare parameters (`GoraConfig.target_parameters`): the fused expert stacks of mixture-of-experts models.

In transformers 5 the experts of Mixtral, Qwen3-MoE, gpt-oss, ... are one module with 3-D parameters, e.g.
`gate_up_proj` (E, 2·I, H) and `down_proj` (E, H, I), expert e computing y = x·W_eᵀ with W_e = param[e] in the
[out, in] layout (or param[e]ᵀ where the module sets `is_transposed`, storing (E, in, out)). PEFT adapts such a
parameter with `LoraConfig(target_parameters=[...])`: one `ParamWrapper` per parameter, one rank r for all E experts,

    lora_A  (r·E, n):  rows e·r … e·r + r − 1 are expert e's A_e            (A.reshape(E, r, n)[e])
    lora_B  (m, r·E):  columns k·E + e, k = 0 … r − 1, are expert e's B_e     (B.reshape(m, r, E)[:, :, e])

and ΔW_e = s·B_e·A_e with s = α/√r under rsLoRA (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight).
This module holds what is specific to such targets: matching parameters by PEFT's rule, finding a parameter (or
its PEFT wrapper) by its full name, the per-expert ↔ PEFT layout, and the experts that no token reached.
The method itself stays in its stages (importance.py, allocate.py, initialize.py); docs/moe.md states it.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .config import ALL_EXPERTS

logger = logging.getLogger(__name__)


def match_parameters(model: nn.Module, target_parameters: Sequence[str] | str) -> list[tuple[str, nn.Module]]:
    """(full parameter name, the module that holds it) for every parameter that `target_parameters` selects, in
    `named_modules` order, by PEFT's rule: the name `f"{module}.{param}"` equals an entry or ends with `"." + entry`
    (peft/tuners/tuners_utils.py, `_inject_parameters`); `"all-experts"` selects every 3-D floating-point parameter.
    A parameter of the top-level module cannot be wrapped by PEFT and is refused."""
    out: list[tuple[str, nn.Module]] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if target_parameters == ALL_EXPERTS:
                hit = param.dim() == 3 and param.is_floating_point()
            else:
                hit = any(key == t or key.endswith(f".{t}") for t in target_parameters)
            if hit and not module_name:
                raise ValueError(
                    f"target_parameters selects {key!r}, a parameter of the top-level module, which PEFT cannot wrap"
                )
            if hit:
                out.append((key, module))
    return out


def parameter_shape(name: str, module: nn.Module) -> tuple[int, int, int, bool]:
    """(E, m, n, transposed) of a targeted parameter as PEFT's ParamWrapper reads it: E = 0 for a 2-D parameter
    ([m, n], like nn.Linear.weight); for a 3-D one, E experts of [m, n] = [out, in], stored (E, m, n), or (E, n, m)
    where the module sets `is_transposed` (transformers' `use_experts_implementation(is_transposed=True)`)."""
    param = getattr(module, name.rpartition(".")[2])
    if param.dim() == 2:
        m, n = param.shape
        return 0, m, n, False
    if param.dim() != 3:
        raise ValueError(
            f"target parameter {name} has {param.dim()} dimensions {tuple(param.shape)}: PEFT adapts 2-D parameters "
            "and 3-D expert stacks only; narrow target_parameters"
        )
    experts, first, second = param.shape
    transposed = bool(getattr(module, "is_transposed", False))
    return (experts, second, first, True) if transposed else (experts, first, second, False)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds parameter `name` (inside PEFT's wrappers, if the model has been wrapped since)."""
    parent_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(parent_name)
    while param_name not in module._parameters and hasattr(module, "base_layer"):
        module = module.base_layer
    if param_name not in module._parameters:
        raise ValueError(f"the model has no parameter {name!r}")
    return module, param_name


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter `name` (a target of `target_parameters`), looking through PEFT's ParamWrappers."""
    module, param_name = _owner(model, name)
    return module._parameters[param_name]


def lora_layer(model: nn.Module, name: str) -> nn.Module:
    """The PEFT LoRA layer that adapts target `name`: the module itself, or the ParamWrapper of parameter `name`
    (ParamWrappers of one module nest, each around the next, so the chain is walked)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is not None and hasattr(module, "lora_A"):
        return module
    parent_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(parent_name)
    while getattr(module, "parameter_name", None) != param_name:
        if not hasattr(module, "base_layer"):
            raise ValueError(f"no LoRA layer adapts {name!r}")
        module = module.base_layer
    return module


def to_peft_layout(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors A [E, r, n], B [E, m, r] → PEFT's ParamWrapper tensors lora_A (r·E, n), lora_B (m, r·E)."""
    experts, rank, n = A.shape
    return A.reshape(experts * rank, n), B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)


def from_peft_layout(lora_A: torch.Tensor, lora_B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `to_peft_layout`: (A [E, r, n], B [E, m, r]) of a ParamWrapper over E experts."""
    rank = lora_A.shape[0] // experts
    return lora_A.reshape(experts, rank, -1), lora_B.reshape(lora_B.shape[0], rank, experts).permute(2, 0, 1)


def unreached_experts(gradients: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Expert stack name -> the experts whose mean gradient G_e is exactly zero: no token was routed to them in any
    of the N batches (a routed token gives a non-zero G_e unless its upstream gradient vanishes exactly)."""
    out = {}
    for name, G in gradients.items():
        if G.dim() == 3:
            zero = [e for e in range(G.shape[0]) if not bool(G[e].any())]
            if zero:
                out[name] = zero
    return out


def report_unreached_experts(gradients: Mapping[str, torch.Tensor], info: dict, batches: int) -> None:
    """Log the experts that no token reached and keep them in `info["unreached_experts"]` (the statistics' info,
    which the adapter's record carries): they get B0_e = 0 and stay out of their stack's importance."""
    unreached = unreached_experts(gradients)
    if unreached:
        info["unreached_experts"] = unreached
        logger.warning(
            "GoRA: no token reached these experts in %d batches (their G_e = 0, B0_e = 0; their stack's importance is "
            "E times the mean over the experts reached): %s",
            batches,
            "; ".join(f"{name}: {experts}" for name, experts in unreached.items()),
        )


_PATTERN_WARNING = "keys did not match any targeted module and were ignored: "


@contextlib.contextmanager
def parameter_patterns_quiet(parameters: Sequence[str]) -> Iterator[None]:
    """Drop PEFT's warning that `rank_pattern` keys of `parameters` "did not match any targeted module": PEFT
    (0.21) checks that warning against module names only, yet applies those ranks to the ParamWrappers (the
    tests check the shapes). A warning that names anything else is passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        if _PATTERN_WARNING in text:
            listed = text.split(_PATTERN_WARNING, 1)[1].rstrip(".")
            with contextlib.suppress(ValueError, SyntaxError):
                if set(ast.literal_eval(listed)) <= set(parameters):
                    continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def check_parameter_layers(
    model: nn.Module, target_parameters: Sequence[str], layers: Mapping[str, tuple[torch.Size, torch.Size]]
) -> tuple[list[str], set[str]]:
    """Whether a saved adapter's parameter layers fit `model`: (problems, the saved layer names they cover).

    PEFT saves the ParamWrappers of one module under that module's name, nested ones under `….base_layer`, so a
    saved (lora_A, lora_B) pair is matched to a parameter of the module by its (in, out) shape: the multiset of
    the saved pairs' (in, out) must be that of the module's targeted parameters as PEFT reads them.
    """
    problems: list[str] = []
    covered: set[str] = set()
    owners: dict[str, list[tuple[int, int]]] = {}
    for name in target_parameters:
        owner = name.rpartition(".")[0]
        try:
            module, _ = _owner(model, name)
        except (AttributeError, ValueError):
            problems.append(f"{name} does not exist in the base model")
            continue
        _, m, n, _ = parameter_shape(name, module)
        owners.setdefault(owner, []).append((n, m))
    for owner, expected in owners.items():
        saved = {k: v for k, v in layers.items() if k.replace(".base_layer", "") == owner}
        covered |= set(saved)
        got = sorted((int(A[1]), int(B[0])) for A, B in saved.values())
        if got != sorted(expected):
            problems.append(f"{owner} has parameters of (in, out) {sorted(expected)}, the adapter's are {got}")
    return problems, covered
