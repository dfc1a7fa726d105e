r"""The method table: every meta-learning method mamlkit trains, one entry each.

An entry holds the method's name, its hyper-parameters (with defaults and checks), the least
number of inner steps it needs, and its per-task rule ``g_i(θ; S_i, Q_i)``, from which the
meta-batch gradient is the task mean ``g = (1/T) Σ_i g_i``. ``meta_batch_grad``, ``meta_train``,
the command line (its ``--method`` choices and its flags), the experiments and the fused kernels
all read from :data:`METHODS`; adding a method is one entry here (plus a kernel in
``mamlkit._fused`` if it wants one).

Per task, with θ_k the result of k SGD steps of size α on the support set S:

========== ========================================================================================
maml       ``dL_Q(θ_k)/dθ = (I − αH_S(θ_0))ᵀ ⋯ (I − αH_S(θ_{k−1}))ᵀ ∇L_Q(θ_k)`` (Finn et al. 2017)
fomaml     ``∇L_Q(θ_k)``: every inner Jacobian replaced by I
reptile    ``(θ − θ_k)/α = Σ_j ∇L_S(θ_j)`` (Nichol et al. 2018; Q only scores)
imaml      ``(I + H_S(φ)/λ)⁻¹ ∇L_Q(φ)``, φ from k steps on ``L_S + λ/2‖φ − θ‖²``, CG on HVPs
           (Rajeswaran et al. 2019)
pretrained ``∇_θ L(θ; S ∪ Q)``: joint training on every point of the task, no inner loop (the
           baseline of Finn et al. 2017)
========== ========================================================================================

Every rule also returns the task's query loss after adaptation, ``L_Q(θ_k)`` (``L_Q(φ)`` for
iMAML), the quantity training reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value

from ._checks import check_positive, check_positive_int
from ._estimators import _imaml, _reptile
from ._metagrad import _adapt
from ._params import Batch, LossFn, Params, tree_detach

TaskRule = Callable[[Params, Batch, Batch], tuple[Params, Tensor]]


@dataclass(frozen=True)
class Hyper:
    """A method's own hyper-parameter: its name, default, Python type, check and help text."""

    name: str
    default: Any
    kind: type
    check: Callable[[object, str], Any]
    help: str


@dataclass(frozen=True)
class Method:
    """One entry of the method table.

    Attributes:
        name: the key in :data:`METHODS` and the CLI's ``--method`` choice.
        summary: one line, for help texts.
        hypers: the method's own hyper-parameters (beyond ``lr`` and ``steps``).
        min_steps: the least number of inner steps the rule accepts.
        second_order: whether the rule differentiates through the inner loop (uses H_S).
        rule: ``rule(loss, lr, steps, **hypers)`` → ``task(θ, support, query)`` returning
            ``(g_i, query loss)`` for one task; unchecked, vmap-safe.
    """

    name: str
    summary: str
    hypers: tuple[Hyper, ...]
    min_steps: int
    second_order: bool
    rule: Callable[..., TaskRule]

    def resolve(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The checked hyper-parameters: ``kwargs`` over the defaults; an unknown keyword is a
        ``TypeError`` naming it."""
        allowed = [h.name for h in self.hypers]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(
                f"method {self.name!r} takes no keyword argument(s) {unknown}; "
                f"its hyper-parameters are {allowed}"
            )
        return {h.name: h.check(kwargs.get(h.name, h.default), h.name) for h in self.hypers}

    def check_steps(self, steps: int) -> int:
        if steps < self.min_steps:
            raise ValueError(f"steps must be >= {self.min_steps} for {self.name!r}, got {steps}")
        return steps


def _maml(loss: LossFn, lr: float, steps: int) -> TaskRule:
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        def meta_objective(p: Params) -> Tensor:
            return loss(_adapt(loss, p, support, lr, steps, first_order=False), query)

        return grad_and_value(meta_objective)(theta)

    return task


def _fomaml(loss: LossFn, lr: float, steps: int) -> TaskRule:
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        theta_k = tree_detach(_adapt(loss, theta, support, lr, steps, first_order=True))
        return grad_and_value(loss)(theta_k, query)

    return task


def _reptile_rule(loss: LossFn, lr: float, steps: int) -> TaskRule:
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        g, theta_k = _reptile(loss, theta, support, lr, steps)
        return g, loss(theta_k, query)

    return task


def _imaml_rule(loss: LossFn, lr: float, steps: int, lam: float, cg_steps: int) -> TaskRule:
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        result = _imaml(loss, theta, support, query, lam, lr, steps, cg_steps, 0.0)
        return result.grad, loss(result.phi, query)

    return task


def _pretrained(loss: LossFn, lr: float, steps: int) -> TaskRule:
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        both = (torch.cat((support[0], query[0])), torch.cat((support[1], query[1])))
        theta_k = _adapt(loss, theta, support, lr, steps, first_order=True)
        return tree_detach(grad(loss)(theta, both)), loss(tree_detach(theta_k), query)

    return task


_LAM = Hyper("lam", 1.0, float, check_positive, "iMAML's proximal strength λ > 0")
_CG = Hyper("cg_steps", 5, int, check_positive_int, "iMAML's conjugate-gradient iterations")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("maml", "exact second-order MAML", (), 0, True, _maml),
        Method("fomaml", "first-order MAML (inner Jacobians set to I)", (), 0, False, _fomaml),
        Method("reptile", "Reptile: (θ − θ_k)/α", (), 1, False, _reptile_rule),
        Method("imaml", "implicit MAML (CG on Hessian-vector products)", (_LAM, _CG), 1, True,
               _imaml_rule),
        Method("pretrained", "joint training on S ∪ Q (no inner loop; a baseline)", (), 0, False,
               _pretrained),
    )
}
"""Every method by name; see the module docstring for each rule."""


def get_method(name: object) -> Method:
    """The table entry of ``name``, or a ``ValueError`` listing the choices."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def hyper_table() -> dict[str, Hyper]:
    """Every hyper-parameter of every method, by name (the CLI's extra flags)."""
    return {h.name: h for m in METHODS.values() for h in m.hypers}


__all__ = ["METHODS", "Hyper", "Method", "get_method", "hyper_table"]
