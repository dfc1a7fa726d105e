r"""Adam on plain dicts, with a typed state (as optax's ``ScaleByAdamState``), and clipping.

.. math::

    m ← β_1 m + (1 − β_1) g, \quad v ← β_2 v + (1 − β_2) g², \quad
    θ ← θ − \frac{lr}{1 − β_1^t} \frac{m}{\sqrt{v / (1 − β_2^t)} + ε}

— the update of ``torch.optim.Adam`` (tested equal), written with ``torch._foreach_*`` kernels
(a handful of dispatches for any number of tensors) and pure: nothing passed in is changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_like, check_params, check_positive
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
    """The built-in meta-optimizer as a value: ``torch.optim.Adam``'s update on plain dicts.

    ``meta_train`` runs it inside the compiled whole-iteration step where a backend has one.

    Attributes:
        lr: the step size β > 0 (a schedule may change it per iteration).
        betas: (β₁, β₂).
        eps: ε.
    """

    lr: float
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS

    def init(self, params: Mapping[str, Tensor]) -> AdamState:
        """The state before the first step (see :func:`adam_init`)."""
        return adam_init(params)

    def update(
        self, params: Params, grads: Mapping[str, Tensor], state: AdamState, lr: float | None = None
    ) -> tuple[Params, AdamState]:
        """One step of size ``lr`` (default :attr:`lr`), unchecked (training's inner loop)."""
        return _adam_update(
            params, grads, state, self.lr if lr is None else lr, self.betas, self.eps
        )


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
