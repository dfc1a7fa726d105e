r"""The meta-optimizer as a value: the built-in Adam on plain dicts (a typed state, as optax's
``ScaleByAdamState``), any ``torch.optim`` optimizer class with its arguments, learning-rate
schedules, and global-norm clipping.

The built-in Adam:

.. math::

    m ← β_1 m + (1 − β_1) g, \quad v ← β_2 v + (1 − β_2) g², \quad
    θ ← θ − \frac{lr}{1 − β_1^t} \frac{m}{\sqrt{v / (1 − β_2^t)} + ε}

— the update of ``torch.optim.Adam`` (tested equal), written with ``torch._foreach_*`` kernels
(a handful of dispatches for any number of tensors) and pure: nothing passed in is changed.
``meta_train`` runs it inside the compiled whole-iteration step where a backend has one.

Every optimizer value has ``init(params) → state`` and ``update(params, grads, state, lr) →
(params, state)``, and its state can be written to a checkpoint and read back (:func:`state_record`,
:func:`restore_state`) so that a resumed run is bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import (
    check_like,
    check_nonnegative,
    check_params,
    check_positive,
    check_positive_int,
)
from ._params import Params

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class AdamState(NamedTuple):
    """Adam's state: the step count t and the first and second moment estimates.

    Attributes:
        step: t, the number of updates taken (a Python int).
        m: the first-moment estimate, shaped like the parameters.
        v: the second-moment estimate, shaped like the parameters.
    """

    step: int
    m: Params
    v: Params


@dataclass(frozen=True)
class Adam:
    """The built-in meta-optimizer: ``torch.optim.Adam``'s update on plain dicts (the step size
    comes from training's ``meta_lr`` and schedule).

    Attributes:
        betas: (β₁, β₂), each in [0, 1).
        eps: ε > 0.
    """

    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS

    def __post_init__(self) -> None:
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(isinstance(b, float) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"betas must be two floats in [0, 1), got {self.betas!r}")
        check_positive(self.eps, "eps")

    def init(self, params: Mapping[str, Tensor]) -> AdamState:
        """The state before the first step (see :func:`adam_init`)."""
        return adam_init(params)

    def update(
        self, params: Params, grads: Mapping[str, Tensor], state: AdamState, lr: float
    ) -> tuple[Params, AdamState]:
        """One step of size ``lr``, unchecked (training's inner loop); inputs unchanged."""
        return _adam_update(params, grads, state, lr, self.betas, self.eps)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record (a run's config)."""
        return {"name": "adam", "betas": list(self.betas), "eps": self.eps}


class TorchOptimizerState:
    """A ``torch.optim`` optimizer over leaf copies of the parameters (updated in place)."""

    def __init__(self, optimizer: torch.optim.Optimizer, leaves: Params) -> None:
        self.optimizer, self.leaves = optimizer, leaves

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()


@dataclass(frozen=True, eq=False)
class TorchOptimizer:
    """Any ``torch.optim`` optimizer class with its arguments, as a meta-optimizer value.

    Example:
        >>> TorchOptimizer(torch.optim.SGD, momentum=0.9).describe()
        {'name': 'SGD', 'kwargs': {'momentum': 0.9}}
    """

    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]

    def __init__(self, cls: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise TypeError(f"cls must be a torch.optim.Optimizer class, got {cls!r}")
        if "lr" in kwargs:
            raise TypeError("lr comes from meta_lr (and its schedule), not the optimizer's kwargs")
        object.__setattr__(self, "cls", cls)
        object.__setattr__(self, "kwargs", dict(kwargs))
        cls([torch.zeros(1, requires_grad=True)], lr=1e-3, **kwargs)  # bad kwargs fail now

    def init(self, params: Mapping[str, Tensor]) -> TorchOptimizerState:
        """Leaf copies of ``params`` and the optimizer over them."""
        leaves = {k: v.detach().clone() for k, v in params.items()}
        return TorchOptimizerState(self.cls(list(leaves.values()), lr=1e-3, **self.kwargs), leaves)

    def update(
        self, params: Params, grads: Mapping[str, Tensor], state: TorchOptimizerState, lr: float
    ) -> tuple[Params, TorchOptimizerState]:
        """One ``optimizer.step()`` of size ``lr`` on the leaves (``params`` are the leaves)."""
        for k, leaf in state.leaves.items():
            leaf.grad = grads[k]
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            state.optimizer.step()
        for leaf in state.leaves.values():
            leaf.grad = None
        return {k: v.detach() for k, v in state.leaves.items()}, state

    def restore(self, params: Params, record: dict[str, Any]) -> TorchOptimizerState:
        """The state of a checkpoint: leaves holding ``params``, the optimizer's saved state."""
        state = self.init(params)
        state.optimizer.load_state_dict(record)
        return state

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record (a run's config)."""
        return {"name": self.cls.__name__, "kwargs": dict(self.kwargs)}


Optimizer = Adam | TorchOptimizer
OptimizerState = AdamState | TorchOptimizerState


def state_record(state: OptimizerState) -> dict[str, Any]:
    """The optimizer state as a checkpoint stores it (tensors on the CPU)."""
    if isinstance(state, AdamState):
        return {
            "kind": "adam",
            "step": state.step,
            "m": {k: v.detach().cpu() for k, v in state.m.items()},
            "v": {k: v.detach().cpu() for k, v in state.v.items()},
        }
    return {"kind": "torch", "state": state.state_dict()}


def restore_state(
    optimizer: Optimizer, params: Params, record: dict[str, Any], device: torch.device
) -> OptimizerState:
    """The inverse of :func:`state_record` for ``optimizer``, on ``device``."""
    if isinstance(optimizer, Adam):
        if record.get("kind") != "adam":
            raise ValueError(
                f"the checkpoint holds a {record.get('kind')!r} optimizer state, not Adam's"
            )
        return AdamState(
            record["step"],
            {k: v.to(device) for k, v in record["m"].items()},
            {k: v.to(device) for k, v in record["v"].items()},
        )
    if record.get("kind") != "torch":
        raise ValueError(
            f"the checkpoint holds a {record.get('kind')!r} optimizer state, not "
            f"{optimizer.cls.__name__}'s"
        )
    return optimizer.restore(params, record["state"])


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine annealing (as MAML++ uses): ``lr_t = min_lr + (lr − min_lr)(1 + cos(π t/T))/2``
    for iteration t of T.

    Example:
        >>> s = CosineSchedule(1e-3, 100)
        >>> s(0), round(s(50), 7), s(100)
        (0.001, 0.0005, 0.0)
    """

    lr: float
    iterations: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.lr, "lr")
        check_positive_int(self.iterations, "iterations")
        check_nonnegative(self.min_lr, "min_lr")

    def __call__(self, iteration: int) -> float:
        t = min(iteration, self.iterations) / self.iterations
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


def adam_init(params: Mapping[str, Tensor]) -> AdamState:
    """The state before the first step: t = 0 and zero moments.

    Example:
        >>> adam_init({"w": torch.ones(2)})
        AdamState(step=0, m={'w': tensor([0., 0.])}, v={'w': tensor([0., 0.])})
    """
    params = check_params(params)
    return AdamState(
        0,
        {k: torch.zeros_like(p) for k, p in params.items()},
        {k: torch.zeros_like(p) for k, p in params.items()},
    )


def adam_update(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: AdamState,
    *,
    lr: float,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
) -> tuple[Params, AdamState]:
    """One Adam step: new parameters and a new :class:`AdamState` (inputs unchanged).

    Example:
        >>> p, g = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
        >>> new, state = adam_update(p, g, adam_init(p), lr=0.1)
        >>> new["w"], state.step                     # first step: θ − lr·sign(g)
        (tensor([0.9000]), 1)
    """
    params = check_params(params)
    grads = check_like(grads, params, "grads")
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState, got {type(state).__name__}")
    return _adam_update(params, grads, state, check_positive(lr, "lr"), betas, eps)


def _adam_update(
    params: Params,
    grads: Mapping[str, Tensor],
    state: AdamState,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[Params, AdamState]:
    """The unchecked core of :func:`adam_update` (what training calls every iteration)."""
    keys = list(params)
    beta1, beta2 = betas
    t = state.step + 1
    g = [grads[k] for k in keys]
    m = torch._foreach_mul([state.m[k] for k in keys], beta1)
    torch._foreach_add_(m, g, alpha=1 - beta1)
    v = torch._foreach_mul([state.v[k] for k in keys], beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    denom = torch._foreach_div(v, 1 - beta2**t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    new = torch._foreach_addcdiv([params[k] for k in keys], m, denom, value=-lr / (1 - beta1**t))
    return dict(zip(keys, new)), AdamState(t, dict(zip(keys, m)), dict(zip(keys, v)))


def clip_global_norm(grads: Mapping[str, Tensor], max_norm: float) -> Params:
    r"""``g·min(1, c/(‖g‖ + 10⁻⁶))``, ‖g‖ the L2 norm over every tensor together (new tensors),
    as ``torch.nn.utils.clip_grad_norm_``.

    Example:
        >>> clip_global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """
    grads = check_params(grads, "grads")
    return _clip_global_norm(grads, check_positive(max_norm, "max_norm"))


def _clip_global_norm(grads: Params, max_norm: float) -> Params:
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
    )
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # 1e-6 as clip_grad_norm_
    return {k: g * scale.to(g.dtype) for k, g in grads.items()}
