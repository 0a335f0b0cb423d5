"""Which modules GoRA adapts: PEFT's own matching rules, restricted to layers whose gradient GoRA can read
(nn.Linear, GPT-2's Conv1D, and bitsandbytes 4-bit / 8-bit linear layers), plus the 2-D and 3-D (expert stack)
parameters of `target_parameters` (experts.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .config import GoraConfig
from .distributed import full_tensor
from .experts import get_parameter, match_parameters, parameter_shape
from .qlayers import bnb_kind, dequantize, is_other_quantized

try:  # transformers' GPT-2 style linear layer, weight stored transposed as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A module that GoRA adapts. `m` = out_features, `n` = in_features (the torch layout of an nn.Linear).

    A bitsandbytes layer is a Target like an nn.Linear: its shapes are those of the weight it quantizes.
    A parameter of `target_parameters` is named by its full parameter name; a 3-D one holds `experts` = E matrices
    [m, n] that share one rank (docs/moe.md).
    """

    name: str
    m: int
    n: int
    transposed: bool  # True for Conv1D, whose weight is stored as [n, m] (and expert stacks stored (E, n, m))
    parameter: bool = False  # a parameter of target_parameters (PEFT's ParamWrapper), not a module
    experts: int = 0  # E of a 3-D expert stack; 0 for a 2-D weight

    @property
    def shape(self) -> tuple[int, ...]:
        """(m, n), or (E, m, n) for an expert stack: the shape of G and of the allocation's cost term."""
        return (self.experts, self.m, self.n) if self.experts else (self.m, self.n)


def base_lora_config(config: GoraConfig, model: nn.Module):
    """A `LoraConfig` with the user's target_modules and pass-through options, for PEFT's matching rules."""
    from peft import LoraConfig

    target_modules = config.target_modules
    if target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults and config.target_parameters is not None:
            return LoraConfig(target_modules=[], **config.lora_kwargs)  # PEFT: the parameters alone
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is not set and PEFT has no default targets for model type {model_type!r}: "
                "set GoraConfig(target_modules=[...]) to the names of the linear layers to adapt"
            )
        target_modules = defaults[model_type]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return LoraConfig(target_modules=target_modules, **config.lora_kwargs)


def find_targets(model: nn.Module, config: GoraConfig) -> list[Target]:
    """The target modules of `model`, in `named_modules` order, as PEFT would match them, then the targeted
    parameters (`target_parameters`, docs/moe.md) in model order.

    Raises:
        ValueError: when nothing matches, when the model already carries PEFT adapters, or when a matched module is
            none of nn.Linear, Conv1D, bitsandbytes `Linear4bit` / `Linear8bitLt` (e.g. a GPTQ, AWQ, HQQ or FP8
            layer, named in the message).
    """
    from peft.tuners.tuners_utils import (
        BaseTunerLayer,
        _maybe_include_all_linear_layers,
        check_target_module_exists,
    )

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "the model already carries PEFT adapter layers: pass the base model (e.g. peft_model.get_base_model() "
            "after unloading the adapter), not a PeftModel"
        )
    lora_config = _maybe_include_all_linear_layers(base_lora_config(config, model), model)
    parameters = _parameter_targets(model, config)
    targets: list[Target] = []
    unsupported: list[str] = []
    quantized: list[str] = []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(lora_config, name):
            continue
        if bnb_kind(module) is not None:  # an nn.Linear subclass holding packed integers
            targets.append(Target(name, module.out_features, module.in_features, transposed=False))
        elif is_other_quantized(module):
            quantized.append(f"{name} ({type(module).__name__})")
        elif isinstance(module, nn.Linear):
            targets.append(Target(name, module.out_features, module.in_features, transposed=False))
        elif Conv1D and isinstance(module, Conv1D):
            n, m = module.weight.shape
            targets.append(Target(name, m, n, transposed=True))
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if quantized:
        raise ValueError(
            f"GoRA reads quantized layers of bitsandbytes only (4-bit Linear4bit, 8-bit Linear8bitLt); these targets "
            f"are quantized another way: {_short(quantized)}. Load the model with "
            "transformers.BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True, or in full precision "
            "(get_qgora_model quantizes it to 4-bit after estimation), or leave these layers out of target_modules"
        )
    if unsupported:
        raise ValueError(
            f"GoRA adapts nn.Linear and Conv1D layers only; these targets are neither: {_short(unsupported)}. "
            "Narrow target_modules (or use exclude_modules in lora_kwargs)"
        )
    _check_shared_weights(model, targets)
    if not targets and config.target_modules != ():  # [] = parameters only, as in PEFT
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no nn.Linear/Conv1D module of this "
            f"{type(model).__name__}. Module names look like: {_short(_linear_names(model))}"
        )
    _check_parameters_apart(targets, parameters)
    return targets + parameters


def _parameter_targets(model: nn.Module, config: GoraConfig) -> list[Target]:
    """The targets of `config.target_parameters` (docs/moe.md), in model order."""
    if config.target_parameters is None:
        return []
    if any(bnb_kind(module) is not None for module in model.modules()):
        raise ValueError(
            "target_parameters on a bitsandbytes-quantized model is not supported (PEFT's parameter adapters over a "
            "quantized base are untested here): load the model in full precision, or drop target_parameters"
        )
    matched = match_parameters(model, config.target_parameters)
    if not matched:
        shown = _short([n for n, p in model.named_parameters() if p.dim() == 3])
        raise ValueError(
            f"target_parameters={config.target_parameters!r} matches no parameter of this {type(model).__name__}. "
            f"Its 3-D (expert) parameters: {shown}{_fused_experts_hint(shown)}"
        )
    targets = []
    for name, module in matched:
        experts, m, n, transposed = parameter_shape(name, module)
        targets.append(Target(name, m, n, transposed, parameter=True, experts=experts))
    return targets


def _fused_experts_hint(shown: str) -> str:
    """Under transformers 4.x, where experts are per-expert nn.Linear modules: how to reach them instead."""
    import transformers

    if shown != "(none)" or int(transformers.__version__.split(".")[0]) >= 5:
        return ""
    return (
        f". Fused expert stacks need transformers>=5 (here {transformers.__version__}, which builds one nn.Linear per "
        "expert): target the experts' linear layers with target_modules instead (docs/moe.md)"
    )


def _check_parameters_apart(modules: list[Target], parameters: list[Target]) -> None:
    """Refuse a parameter target whose module is also a module target (PEFT would wrap it twice), and Conv1D
    module targets beside parameter targets (fan_in_fan_out, which PEFT's ParamWrapper refuses)."""
    names = {t.name for t in modules}
    both = [p.name for p in parameters if p.name.rpartition(".")[0] in names]
    if both:
        raise ValueError(
            f"{_short(both)} are parameters of modules that target_modules adapts already: adapt each weight once "
            "(drop them from target_parameters or narrow target_modules)"
        )
    if parameters and any(t.transposed for t in modules):
        raise ValueError(
            "target_parameters cannot be combined with Conv1D module targets (PEFT's parameter adapters refuse "
            "fan_in_fan_out): adapt one kind at a time"
        )


def _check_shared_weights(model: nn.Module, targets: list[Target]) -> None:
    """Refuse two targets that share one weight Parameter; warn about a target tied to a module that is not one.

    A shared weight has one gradient, the sum over all its uses, so two targets on it could not get gradients,
    importances or initializations of their own (and each would start with the whole step).
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    target_names = {t.name for t in targets}
    shared = [names for names in owners.values() if sum(n in target_names for n in names) > 1]
    for t in targets:
        others = [n for n in owners.get(id(model.get_submodule(t.name).weight), []) if n != t.name]
        if others and not any(n in target_names for n in others):
            logger.warning(
                "target %s shares its weight with %s: its gradient G is the sum over all uses, and the adapter "
                "applies to %s only",
                t.name,
                ", ".join(others),
                t.name,
            )
    if shared:
        raise ValueError(
            f"target modules that share one weight Parameter: {'; '.join(' = '.join(g) for g in shared[:4])}. "
            "A shared weight has one gradient (the sum over its uses), so GoRA cannot give each of them its own importance, rank and "
            "initialization: target only one module of each group (narrow target_modules or use exclude_modules)"
        )


def get_weight(model: nn.Module, target: Target) -> torch.Tensor:
    """W of a target in the [m, n] layout, detached: a view of a plain weight (an FSDP2 shard gathered), or
    Ŵ = deq(Q(W0)) of a bitsandbytes layer, dequantized now (a new tensor of this one layer); [E, m, n] for an
    expert stack."""
    if target.parameter:
        weight = full_tensor(get_parameter(model, target.name).detach())
        return weight.transpose(-2, -1) if target.transposed else weight
    module = model.get_submodule(target.name)
    if bnb_kind(module) is not None:
        return dequantize(module)
    weight = full_tensor(module.weight.detach())
    return weight.T if target.transposed else weight


def target_weight(model: nn.Module, target: Target) -> nn.Parameter:
    """The Parameter whose gradient is G of `target`: the module's weight, or the targeted parameter itself."""
    return get_parameter(model, target.name) if target.parameter else model.get_submodule(target.name).weight


def _linear_names(model: nn.Module) -> list[str]:
    kinds = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _short(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"
