"""How each target's batch gradient reaches the gradient store during estimation (`GoraConfig.gradient_route`).

- `_WeightRoute` (nn.Linear, Conv1D): a post-accumulate-grad hook on W folds ∂L/∂W into the store as soon as
  backward has produced it, then frees it;
- `_ModuleRoute` (bitsandbytes layers, whose packed weight has no gradient; any layer on request): module hooks that
  see the layer's input x and output gradient dy fold G_b = Σ_tokens dyᵀ x without any weight gradient.

`choose_routes` picks one per target. A route folds into the estimation that owns it (`estimate._Estimation`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import GoraConfig
from .distributed import full_tensor, is_dtensor
from .qlayers import bnb_kind, check_backpropagates
from .targets import Target


class _Estimation(Protocol):
    """What a route folds into: `estimate._Estimation`, one batch's gradient of one target at a time."""

    def fold(self, target: Target, grad: torch.Tensor) -> None: ...

    def fold_outer(self, target: Target, x: torch.Tensor, dy: torch.Tensor) -> None: ...


class _WeightRoute:
    """Route "weights": a post-accumulate-grad hook on W folds ∂L/∂W into the store once backward has produced it,
    then frees it. Under FSDP2 (a sharded W) there is no hook: the gathered gradient is folded after backward."""

    kind = "weights"

    def __init__(self, run: _Estimation, target: Target, weight: nn.Parameter) -> None:
        self.run, self.target, self.weight = run, target, weight
        self.sharded = is_dtensor(weight)

    def attach(self) -> list[RemovableHandle]:
        return [] if self.sharded else [self.weight.register_post_accumulate_grad_hook(self)]

    def __call__(self, param: torch.Tensor) -> None:
        self.run.fold(self.target, _layout(self.target, param.grad.detach()))
        param.grad = None  # memory stays bounded by the statistics plus ~one gradient

    def after_backward(self) -> None:
        if self.sharded and self.weight.grad is not None:  # FSDP2: a sharded grad, already averaged over ranks
            self.run.fold(self.target, _layout(self.target, full_tensor(self.weight.grad.detach())))
            self.weight.grad = None


class _ModuleRoute:
    """Route "hooks": g = Σ_tokens dyᵀ x from the layer's input x and output gradient dy; no weight gradient.

    A forward hook keeps x and puts a hook on the output tensor; backward hands that hook dy, which folds (x, dy)
    into the store and lets go of x, so x lives from the layer's forward to its backward only (as long as autograd
    keeps it for a weight gradient). Every forward call gets its own output hook, so several calls per batch add up
    as a weight gradient does. When nothing upstream requires grad (frozen embeddings, the first layer), a forward
    pre-hook gives the layer a detached alias of x that requires grad (no copy), so that its output has a gradient;
    the alias's own gradient is dropped as soon as it is accumulated.

    A hook on the output tensor rather than `register_full_backward_hook`: the latter wraps inputs and outputs in
    autograd views (which in-place operations after the layer reject), and with frozen inputs it warns and still
    needs an input that requires grad; the output hook needs neither.
    """

    kind = "hooks"

    def __init__(self, run: _Estimation, target: Target, module: nn.Module) -> None:
        self.run, self.target, self.module = run, target, module
        self.calls = 0  # forwards whose output had a gradient path: 0 after a batch = the hooks never saw the layer

    def attach(self) -> list[RemovableHandle]:
        return [
            self.module.register_forward_pre_hook(self.before, with_kwargs=True),
            self.module.register_forward_hook(self.after, with_kwargs=True),
        ]

    def after_backward(self) -> None:
        pass

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = _layer_input(args, kwargs)
        if not torch.is_grad_enabled() or x is None or x.requires_grad or not x.is_floating_point():
            return None
        alias = x.detach().requires_grad_(True)
        alias.register_post_accumulate_grad_hook(_drop_grad)
        return ((alias, *args[1:]), kwargs) if args else ((), {**kwargs, _input_key(kwargs): alias})

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = _layer_input(args, kwargs)
        if isinstance(output, torch.Tensor) and output.requires_grad and x is not None:
            self.calls += 1
            output.register_hook(_OutputGrad(self, x))


class _OutputGrad:
    """The hook on one forward call's output: receives dy, folds Σ dyᵀ x into the store, drops x."""

    def __init__(self, route: _ModuleRoute, x: torch.Tensor) -> None:
        self.route, self.x, self.version = route, x, x._version

    def __call__(self, dy: torch.Tensor) -> None:
        x, self.x = self.x, None
        if x is None:  # a second backward through a retained graph: this call was folded already
            return
        if x._version != self.version:
            raise ValueError(
                f"the input of {self.route.target.name} was modified in place between its forward and backward, "
                "so its gradient cannot be read from it: use gradient_route='weights' for this layer's type"
            )
        self.route.run.fold_outer(self.route.target, x.detach(), dy.detach())


def _drop_grad(tensor: torch.Tensor) -> None:
    tensor.grad = None


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    value = kwargs.get(_input_key(kwargs)) if kwargs else None
    return value if isinstance(value, torch.Tensor) else None


def _input_key(kwargs: dict) -> str:
    return "input" if "input" in kwargs else "x" if "x" in kwargs else next(iter(kwargs))


Route = _WeightRoute | _ModuleRoute


def choose_routes(model: nn.Module, targets: list[Target], config: GoraConfig) -> dict[str, str]:
    """Module name -> "weights" or "hooks" (`GoraConfig.gradient_route`; "auto": hooks for bitsandbytes layers).

    Raises:
        ValueError: bitsandbytes targets with gradient_route="weights" (they have no weight gradient), or 4-bit
            layers anywhere in the model in bitsandbytes' CPU inference layout (no backward through them).
    """
    modules = {t.name: model.get_submodule(t.name) for t in targets if not t.parameter}
    quantized = {name: module for name, module in modules.items() if bnb_kind(module) is not None}
    if quantized and config.gradient_route == "weights":
        raise ValueError(
            f"gradient_route='weights' reads weight gradients, which bitsandbytes layers do not have: "
            f"{', '.join(list(quantized)[:4])}{' ...' if len(quantized) > 4 else ''}. "
            "Use gradient_route='auto' (module hooks for these layers)"
        )
    check_backpropagates({name: module for name, module in model.named_modules() if bnb_kind(module) == "4bit"})
    hooks = config.gradient_route == "hooks"
    routes = {name: "hooks" if hooks or name in quantized else "weights" for name in modules}
    return {t.name: routes.get(t.name, "weights") for t in targets}  # parameters: their own gradient


def _layout(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """A weight or gradient in the [m, n] layout (Conv1D stores [n, m])."""
    return tensor.transpose(-2, -1) if target.transposed else tensor
