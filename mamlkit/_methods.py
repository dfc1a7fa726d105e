r"""The method table: every meta-learning method mamlkit trains, one record each.

A :class:`Method` holds the method's name, its hyper-parameters (with defaults and checks), the
least number of inner steps it needs, its per-task rule ``g_i(θ; S_i, Q_i)`` — from which the
meta-batch gradient is the task mean ``g = (1/T) Σ_i g_i`` — how it adapts at test time, and how
its meta-parameters are initialised. ``meta_batch_grad``, ``meta_train``, ``evaluate``, the
command line (its ``--method`` choices and flags) and the experiments all read
:data:`METHODS`; :func:`register_method` adds an entry, which every default path then accepts
(the fused kernels, keyed by method name in ``mamlkit._fused.KERNELS``, are an optional speed-up).

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

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from ._checks import check_int, check_positive, check_positive_int
from ._estimators import CG_STEPS, _imaml, _reptile
from ._metagrad import _adapt, _sgd_step
from ._params import Batch, LossFn, Params, tree_axpy, tree_detach

TaskRule = Callable[[Params, Batch, Batch], tuple[Params, Tensor]]
"""``task(θ, support, query) → (g_i, L_Q)`` for one task: unchecked and vmap-safe."""


@dataclass(frozen=True)
class Hyper:
    """A method's own hyper-parameter: its name, default, Python type, check and help text.

    ``check(value, name)`` returns the checked value or raises a ``TypeError``/``ValueError``
    naming ``name``.
    """

    name: str
    default: Any
    kind: type
    check: Callable[[object, str], Any]
    help: str


class Adaptation(NamedTuple):
    """How a method fine-tunes at test time.

    Attributes:
        start: ``start(meta) → θ_0``, the model's parameters inside the meta-parameters.
        step: ``step(meta, θ_j, support, j) → θ_{j+1}``, one fine-tuning step (vmap-safe).
    """

    start: Callable[[Params], Params]
    step: Callable[[Params, Params, Batch, int], Params]


def sgd_adaptation(loss: LossFn, lr: float, **hypers: Any) -> Adaptation:
    """Plain SGD from θ: ``θ_{j+1} = θ_j − α∇L_S(θ_j)`` (the paper's test-time fine-tuning)."""
    return Adaptation(
        dict, lambda meta, theta, support, j: _sgd_step(loss, theta, support, lr, False)
    )


def same_parameters(params: Params, **hypers: Any) -> Params:
    """The meta-parameters of a method that learns θ alone: θ itself (a new dict)."""
    return dict(params)


_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")


@dataclass(frozen=True)
class Method:
    """One entry of the method table.

    Only ``name``, ``summary`` and ``rule`` are required; every other field has the default of
    a method that learns θ alone and fine-tunes by SGD.

    Attributes:
        name: the key in :data:`METHODS` and the CLI's ``--method`` choice (lower case letters,
            digits, ``-`` and ``_``).
        summary: one line, for help texts.
        rule: ``rule(loss, lr, steps, **hypers)`` → ``task(θ, support, query)`` returning
            ``(g_i, query loss)`` for one task; unchecked, vmap-safe.
        hypers: the method's own hyper-parameters (beyond ``lr`` and ``steps``).
        min_steps: the least number of inner steps the rule accepts.
        second_order: whether the rule differentiates through the inner loop (uses H_S).
        adaptation: ``adaptation(loss, lr, **hypers)`` → :class:`Adaptation`, how the method
            fine-tunes at test time (``evaluate`` asks it); default :func:`sgd_adaptation`.
        init: ``init(params, **hypers)`` → the meta-parameters training optimises, from θ
            (methods that learn more than θ add their own entries); default θ itself.

    Example:
        >>> from torch.func import grad_and_value
        >>> def joint(loss, lr, steps):                       # ∇L on S ∪ Q, no inner loop
        ...     def task(theta, support, query):
        ...         both = tuple(torch.cat(pair) for pair in zip(support, query))
        ...         return grad_and_value(loss)(theta, both)
        ...     return task
        >>> Method("joint", "joint training", joint).second_order
        False
    """

    name: str
    summary: str
    rule: Callable[..., TaskRule]
    hypers: tuple[Hyper, ...] = ()
    min_steps: int = 0
    second_order: bool = False
    adaptation: Callable[..., Adaptation] = sgd_adaptation
    init: Callable[..., Params] = same_parameters

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"name must be lower case letters, digits, '-' or '_' (a CLI choice), "
                f"got {self.name!r}"
            )
        if not isinstance(self.summary, str) or not self.summary:
            raise TypeError(f"summary must be a non-empty str, got {self.summary!r}")
        for field in ("rule", "adaptation", "init"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field} must be callable, got {getattr(self, field)!r}")
        if not isinstance(self.hypers, tuple) or not all(isinstance(h, Hyper) for h in self.hypers):
            raise TypeError(f"hypers must be a tuple of Hyper, got {self.hypers!r}")
        check_int(self.min_steps, "min_steps")
        if not isinstance(self.second_order, bool):
            raise TypeError(f"second_order must be a bool, got {self.second_order!r}")

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

    def check_steps(self, steps: object) -> int:
        """``steps`` as an int of at least :attr:`min_steps`."""
        steps = check_int(steps, "steps")
        if steps < self.min_steps:
            raise ValueError(f"steps must be >= {self.min_steps} for {self.name!r}, got {steps}")
        return steps


# --------------------------------------------------------------------------------- the rules


def _maml(loss: LossFn, lr: float, steps: int) -> TaskRule:
    """The reverse pass written out: each inner step keeps the pullback of its gradient,
    ``v ↦ H_S(θ_j)v``, and the query gradient is carried back through them,
    ``g ← g − α H_S(θ_j) g`` for j = k−1 … 0 — the same numbers as autodiff through the unrolled
    loop (:func:`mamlkit.maml_grad`), about 10 % faster under vmap (measured on the glyph conv
    net: the query pass is not traced one transform level up)."""

    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        pullbacks = []
        for _ in range(steps):
            g, pullback = vjp(lambda p: grad(loss)(p, support), theta)
            pullbacks.append(pullback)
            theta = tree_axpy(-lr, g, theta)
        g, value = grad_and_value(loss)(theta, query)
        for pullback in reversed(pullbacks):
            g = tree_axpy(-lr, pullback(g)[0], g)
        return g, value

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
_CG = Hyper("cg_steps", CG_STEPS, int, check_positive_int, "iMAML's conjugate-gradient iterations")

_TABLE: dict[str, Method] = {}


class MethodTable(Mapping[str, Method]):
    """Every method by name, read-only: add one with :func:`mamlkit.register_method`.

    The built-in entries are ``maml``, ``fomaml``, ``reptile``, ``imaml`` and ``pretrained``
    (see :mod:`mamlkit._methods` for each rule).
    """

    def __getitem__(self, name: str) -> Method:
        return _TABLE[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_TABLE)

    def __len__(self) -> int:
        return len(_TABLE)

    def __repr__(self) -> str:
        return f"MethodTable({list(_TABLE)})"


METHODS: Mapping[str, Method] = MethodTable()


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` and return it.

    Every default path then accepts it: ``meta_batch_grad`` (the ``"auto"`` backend falls back to
    vmap where no fused kernel exists), ``meta_train``, ``evaluate`` and the command line.

    Raises:
        TypeError: ``method`` is not a :class:`Method`.
        ValueError: a method of that name exists, or one of its hyper-parameters shares a name
            with another method's hyper-parameter of another type (the CLI has one flag per
            name).
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a mamlkit.Method, got {type(method).__name__}")
    if method.name in _TABLE:
        raise ValueError(f"a method named {method.name!r} is already registered")
    for hyper in method.hypers:
        if hyper.name in ("lr", "steps"):
            raise ValueError(f"hyper-parameter {hyper.name!r} is every method's own argument")
        other = hyper_table().get(hyper.name)
        if other is not None and other.kind is not hyper.kind:
            raise ValueError(
                f"hyper-parameter {hyper.name!r} is already a {other.kind.__name__} of another "
                f"method; {method.name!r} declares it {hyper.kind.__name__}"
            )
    _TABLE[method.name] = method
    return method


def get_method(name: object) -> Method:
    """The table entry of ``name``, or a ``ValueError`` listing the choices."""
    if not isinstance(name, str) or name not in _TABLE:
        raise ValueError(f"method must be one of {tuple(_TABLE)}, got {name!r}")
    return _TABLE[name]


def hyper_table() -> dict[str, Hyper]:
    """Every hyper-parameter of every method, by name (the CLI's extra flags)."""
    return {h.name: h for m in _TABLE.values() for h in m.hypers}


for _entry in (
    Method("maml", "exact second-order MAML", _maml, second_order=True),
    Method("fomaml", "first-order MAML (inner Jacobians set to I)", _fomaml),
    Method("reptile", "Reptile: (θ − θ_k)/α", _reptile_rule, min_steps=1),
    Method(
        "imaml",
        "implicit MAML (CG on Hessian-vector products)",
        _imaml_rule,
        (_LAM, _CG),
        min_steps=1,
        second_order=True,
    ),
    Method("pretrained", "joint training on S ∪ Q (no inner loop; a baseline)", _pretrained),
):
    register_method(_entry)


__all__ = [
    "METHODS",
    "Adaptation",
    "Hyper",
    "Method",
    "TaskRule",
    "get_method",
    "hyper_table",
    "register_method",
    "sgd_adaptation",
]
