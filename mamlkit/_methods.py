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

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from ._checks import (
    check_bool,
    check_int,
    check_names,
    check_numbers,
    check_positive,
    check_positive_int,
)
from ._estimators import CG_STEPS, _imaml, _reptile
from ._metagrad import (
    _adapt,
    _sgd_step,
    check_per_step_keys,
    model_view,
    multi_step_objective,
    per_step_params,
    split_per_step,
    step_key,
    unrolled_path,
)
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
    choices: tuple[Any, ...] | None = None
    item: type | None = None  # the element type of a tuple-kinded hyper-parameter


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


def same_parameters(params: Params, **settings: Any) -> Params:
    """The meta-parameters of a method that learns θ alone: θ itself (a new dict)."""
    return dict(params)


def no_check(params: Params, **settings: Any) -> None:
    """The meta-parameters of a method that learns θ alone need no check of their own."""


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
        init: ``init(params, lr=..., steps=..., **hypers)`` → the meta-parameters training
            optimises, from θ (methods that learn more than θ add their own entries; given
            meta-parameters already, it returns them); default θ itself.
        check: ``check(params, lr=..., steps=..., **hypers)`` raises a ``ValueError`` naming
            ``params`` when they are not this method's meta-parameters (every door calls it).
        first_order: the name of the method's first-order counterpart (MAML++'s
            derivative-order annealing trains with it first), or ``None``.

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
    check: Callable[..., None] = no_check
    first_order: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"name must be lower case letters, digits, '-' or '_' (a CLI choice), "
                f"got {self.name!r}"
            )
        if not isinstance(self.summary, str) or not self.summary:
            raise TypeError(f"summary must be a non-empty str, got {self.summary!r}")
        for field in ("rule", "adaptation", "init", "check"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field} must be callable, got {getattr(self, field)!r}")
        if not isinstance(self.hypers, tuple) or not all(isinstance(h, Hyper) for h in self.hypers):
            raise TypeError(f"hypers must be a tuple of Hyper, got {self.hypers!r}")
        check_int(self.min_steps, "min_steps")
        if not isinstance(self.second_order, bool):
            raise TypeError(f"second_order must be a bool, got {self.second_order!r}")
        if self.first_order is not None and not isinstance(self.first_order, str):
            raise TypeError(f"first_order must be a method name or None, got {self.first_order!r}")

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


REVERSES = ("auto", "unroll", "hvp", "checkpointed")
"""How MAML's reverse pass ``g ← g − α H_S(θ_j) g``, j = k−1 … 0, gets each step's curvature:

- ``"unroll"``: every inner step keeps the pullback of its gradient (its whole graph): memory
  grows with k times one step's activations;
- ``"hvp"``: only the iterates θ_0 … θ_{k−1} are kept and each step's graph is rebuilt for its
  Hessian-vector product: k·P numbers plus one step's graph;
- ``"checkpointed"``: only every ⌈√k⌉-th iterate is kept; each segment is recomputed forward
  before its sweep: about 2√k·P numbers plus one step's graph, one extra forward pass per step;
- ``"auto"``: ``"unroll"`` up to :data:`UNROLL_UP_TO` steps, ``"hvp"`` beyond.

Every route gives the same meta-gradient (to rounding)."""

UNROLL_UP_TO = 10
"""``reverse="auto"`` unrolls up to this many inner steps: there the unroll is the fastest route
and its memory is a few steps' graphs (measured on the glyph conv net,
``benchmarks/bench_long_loops.py``)."""


def route(reverse: str, steps: int) -> str:
    """The concrete route of ``reverse`` for ``steps`` inner steps."""
    if reverse == "auto":
        return "unroll" if steps <= UNROLL_UP_TO else "hvp"
    return reverse


def _check_reverse(value: object, name: str) -> str:
    if value not in REVERSES:
        raise ValueError(f"{name} must be one of {REVERSES}, got {value!r}")
    return str(value)


def _check_truncate(value: object, name: str) -> int | None:
    return None if value is None else check_positive_int(value, name)


def _maml(
    loss: LossFn,
    lr: float,
    steps: int,
    reverse: str = "auto",
    truncate: int | None = None,
    step_weights: tuple[float, ...] | None = None,
    per_step_keys: tuple[str, ...] | None = None,
) -> TaskRule:
    """The reverse pass written out, ``g ← ∇L_Q(θ_k)``, then ``g ← g − α H_S(θ_j) g`` for
    j = k−1 … 0, by the ``reverse`` route (see :data:`REVERSES`) — the same numbers as autodiff
    through the unrolled loop (:func:`mamlkit.maml_grad`), and with ``"unroll"`` about 10 %
    faster under vmap (measured on the glyph conv net: the query pass is not traced one transform
    level up). With ``truncate=m`` only the last m steps are differentiated, the first k − m
    taken as first order: ``J_{k−m}ᵀ ⋯ J_{k−1}ᵀ ∇L_Q(θ_k)``, a biased gradient in bounded
    memory. With ``step_weights`` (the multi-step loss) or ``per_step_keys`` (per-step
    parameters, MAML++'s BNWB) it differentiates through the unrolled loop."""
    if per_step_keys is not None and steps < 1:
        raise ValueError(f"per_step_keys needs at least one inner step, got steps={steps}")
    if per_step_keys is not None and step_weights is None:
        if reverse not in ("auto", "unroll") or truncate is not None:
            raise ValueError(
                "per_step_keys (per-step parameters) differentiates through the unrolled loop: "
                "use reverse='unroll' (or 'auto') and no truncate"
            )
        return _multi_step(loss, lr, steps, None, None, per_step_keys)
    if step_weights is not None:  # the multi-step loss, by autodiff through the loop
        if len(step_weights) != steps:
            raise ValueError(
                f"step_weights must hold one weight per inner step ({steps}), got "
                f"{len(step_weights)}"
            )
        if reverse not in ("auto", "unroll") or truncate is not None:
            raise ValueError(
                "step_weights (the multi-step loss) differentiates through the "
                "unrolled loop: use reverse='unroll' (or 'auto') and no truncate"
            )
        return _multi_step(loss, lr, steps, step_weights, None, per_step_keys)
    how = route(reverse, steps)
    kept = steps if truncate is None else min(truncate, steps)

    def sweep(g: Params, theta: Params, support: Batch) -> Params:  # g ← g − α H_S(θ) g
        _, pullback = vjp(lambda p: grad(loss)(p, support), theta)
        return tree_axpy(-lr, pullback(g)[0], g)

    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        theta = tree_detach(_adapt(loss, theta, support, lr, steps - kept, first_order=True))
        if how == "unroll":
            pullbacks = []
            for _ in range(kept):
                g, pullback = vjp(lambda p: grad(loss)(p, support), theta)
                pullbacks.append(pullback)
                theta = tree_axpy(-lr, g, theta)
            g, value = grad_and_value(loss)(theta, query)
            for pullback in reversed(pullbacks):
                g = tree_axpy(-lr, pullback(g)[0], g)
            return g, value
        every = 1 if how == "hvp" else max(1, math.ceil(math.sqrt(kept)))
        marks = []  # θ_0, θ_every, θ_2·every, …: where each segment's recomputation starts
        for j in range(kept):
            if j % every == 0:
                marks.append(theta)
            theta = _sgd_step(loss, theta, support, lr, first_order=True)
        g, value = grad_and_value(loss)(theta, query)
        for start in reversed(range(0, kept, every)):
            segment = [marks[start // every]]
            for _ in range(min(every, kept - start) - 1):
                segment.append(_sgd_step(loss, segment[-1], support, lr, first_order=True))
            for theta_j in reversed(segment):
                g = sweep(g, theta_j, support)
        return g, value

    return task


def _maml_init(
    params: Params, *, steps: int, per_step_keys: tuple[str, ...] | None = None, **_: Any
) -> Params:
    """θ itself, or with ``per_step_keys`` θ with those parameters copied once per inner step
    (``step{j}/<name>``, clones); meta-parameters that hold the copies already are
    returned as they are."""
    if per_step_keys is None or any(step_key(k, 0) in params for k in per_step_keys):
        return dict(params)
    return per_step_params(params, per_step_keys, steps=max(steps, 1))


def _maml_check(
    params: Params, *, steps: int, per_step_keys: tuple[str, ...] | None = None, **_: Any
) -> None:
    check_per_step_keys(per_step_keys, params, max(steps, 1))


def _maml_adaptation(
    loss: LossFn, lr: float, per_step_keys: tuple[str, ...] | None = None, **_: Any
) -> Adaptation:
    """Plain SGD; with per-step parameters, step j runs with step j's copies (the last trained
    step's beyond them) and θ_{j+1} holds them."""
    if per_step_keys is None:
        return sgd_adaptation(loss, lr)

    def trained_steps(meta: Params) -> int:
        return sum(step_key(per_step_keys[0], j) in meta for j in range(len(meta)))

    def start(meta: Params) -> Params:
        return model_view(meta, per_step_keys)

    def step(meta: Params, theta: Params, support: Batch, j: int) -> Params:
        _, copies = split_per_step(meta, per_step_keys, min(j, trained_steps(meta) - 1) + 1)
        adapted = tuple(k for k in theta if k not in per_step_keys)
        return _sgd_step(loss, {**theta, **copies[-1]}, support, lr, False, adapted)

    return Adaptation(start, step)


def _multi_step(
    loss: LossFn,
    lr: Any,
    steps: int,
    weights: tuple[float, ...] | None,
    keys: tuple[str, ...] | None,
    per_step_keys: tuple[str, ...] | None = None,
) -> TaskRule:
    """Autodiff through the unrolled loop of ``Σ_j w_j L_Q(θ_j)`` (or ``L_Q(θ_k)``); the loss
    reported is ``L_Q(θ_k)``."""

    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        def objective(p: Params) -> tuple[Tensor, Tensor]:
            path = unrolled_path(loss, p, support, lr, steps, keys, per_step_keys)
            last = loss(path[-1] if path else p, query)
            total = multi_step_objective(loss, path, query, weights) if weights else last
            return total, last

        g, last = grad(objective, has_aux=True)(theta)
        return g, last

    return task


# --------------------------------------------------------------------- partial adaptation (ANIL)


def head_keys(params: Params) -> tuple[str, ...]:
    """The parameters of the model's last layer: for ``from_module`` names (``"13.weight"``) the
    entries of the last module; for :func:`mamlkit.init_mlp` the last ``w``/``b`` pair."""
    last = list(params)[-1]
    if "." in last:
        module = last.rsplit(".", 1)[0]
        return tuple(k for k in params if k.rsplit(".", 1)[0] == module)
    index = last.lstrip("abcdefghijklmnopqrstuvwxyz_")
    return tuple(k for k in params if k.lstrip("abcdefghijklmnopqrstuvwxyz_") == index)


def adapted_keys(params: Params, part: str, head: tuple[str, ...] | None) -> tuple[str, ...]:
    """The keys that take inner steps: the head (ANIL) or everything else (BOIL)."""
    top = head if head is not None else head_keys(params)
    unknown = [k for k in top if k not in params]
    if unknown:
        raise ValueError(f"head names keys params does not have: {unknown}")
    keys = top if part == "head" else tuple(k for k in params if k not in top)
    if not keys:
        raise ValueError(f"adapting the {part} leaves no parameter to adapt (head = {list(top)})")
    return keys


def _anil(
    loss: LossFn, lr: float, steps: int, adapt: str = "head", head: tuple[str, ...] | None = None
) -> TaskRule:
    """MAML with only the head (ANIL, Raghu et al. 2020) or only the body (BOIL, Oh et al.
    2021) taking inner steps; the meta-gradient is exact and with respect to every parameter."""

    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        return _multi_step(loss, lr, steps, None, adapted_keys(theta, adapt, head))(
            theta, support, query
        )

    return task


def _anil_adaptation(
    loss: LossFn, lr: float, adapt: str = "head", head: tuple[str, ...] | None = None
) -> Adaptation:
    return Adaptation(
        dict,
        lambda meta, theta, support, j: _sgd_step(
            loss, theta, support, lr, False, adapted_keys(theta, adapt, head)
        ),
    )


def _check_part(value: object, name: str) -> str:
    if value not in ("head", "body"):
        raise ValueError(f"{name} must be 'head' (ANIL) or 'body' (BOIL), got {value!r}")
    return str(value)


# ------------------------------------------------------------------------ learned rates (Meta-SGD)

RATE = "lr/"
"""Meta-SGD's rates sit beside θ in the meta-parameters: ``"lr/w0"`` (``"lr3/w0"`` for step 3
with per-step rates)."""

_RATE_KEY = re.compile(r"lr\d*/")


def is_rate(key: str) -> bool:
    """Whether ``key`` names one of Meta-SGD's rates."""
    return bool(_RATE_KEY.match(key))


def _rate_key(key: str, step: int | None) -> str:
    return f"{RATE}{key}" if step is None else f"lr{step}/{key}"


def _split_rates(meta: Params, steps: int, per_step: bool) -> tuple[Params, Any]:
    theta = {k: v for k, v in meta.items() if not is_rate(k)}
    if per_step:
        return theta, [{k: meta[_rate_key(k, j)] for k in theta} for j in range(steps)]
    return theta, {k: meta[_rate_key(k, None)] for k in theta}


def _metasgd(
    loss: LossFn, lr: float, steps: int, rates: str = "element", per_step: bool = False
) -> TaskRule:
    """Meta-SGD: inner steps ``θ ← θ − α ⊙ ∇L_S(θ)`` with learned rates α (per entry or per
    tensor; per step with ``per_step``, as MAML++'s LSLR); the meta-gradient with respect to θ
    and α, exact."""

    def task(meta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        def objective(m: Params) -> tuple[Tensor, Tensor]:
            theta, alpha = _split_rates(m, steps, per_step)
            value = loss(_adapt(loss, theta, support, alpha, steps, False), query)
            return value, value

        return grad(objective, has_aux=True)(meta)

    return task


def _metasgd_init(
    params: Params,
    *,
    lr: float,
    steps: int,
    rates: str = "element",
    per_step: bool = False,
    **_: Any,
) -> Params:
    """θ and rates α = ``lr`` everywhere (per entry, or one per tensor), once or per step; the
    rates are raw numbers, free to change sign, as in Meta-SGD (no parametrisation keeps them
    positive). Meta-parameters that hold rates already are returned as they are."""
    if any(is_rate(k) for k in params):
        return dict(params)
    out = dict(params)
    for j in [None] if not per_step else list(range(max(steps, 1))):
        for k, v in params.items():
            shape = v.shape if rates == "element" else ()
            out[_rate_key(k, j)] = torch.full(shape, float(lr), dtype=v.dtype, device=v.device)
    return out


def _metasgd_check(
    params: Params, *, steps: int, rates: str = "element", per_step: bool = False, **_: Any
) -> None:
    theta = [k for k in params if not is_rate(k)]
    wanted = [
        _rate_key(k, j) for j in ([None] if not per_step else range(max(steps, 1))) for k in theta
    ]
    missing = [k for k in wanted if k not in params]
    if missing:
        raise ValueError(
            f"params must hold Meta-SGD's rates too (missing {missing[:3]}): make them with "
            "mamlkit.METHODS['metasgd'].init(params, lr=..., steps=...), or let meta_train do it"
        )
    for k in theta:
        for j in [None] if not per_step else range(max(steps, 1)):
            shape = params[_rate_key(k, j)].shape
            if torch.broadcast_shapes(shape, params[k].shape) != params[k].shape:
                raise ValueError(
                    f"params[{_rate_key(k, j)!r}] {tuple(shape)} must broadcast to "
                    f"params[{k!r}] {tuple(params[k].shape)}"
                )


def _metasgd_adaptation(
    loss: LossFn, lr: float, rates: str = "element", per_step: bool = False
) -> Adaptation:
    """At test time the learned rates step θ (the last step's rates beyond the trained steps)."""

    def start(meta: Params) -> Params:
        return {k: v for k, v in meta.items() if not is_rate(k)}

    def step(meta: Params, theta: Params, support: Batch, j: int) -> Params:
        if per_step:
            last = max(int(k.split("/", 1)[0][2:]) for k in meta if is_rate(k))
            alpha = {k: meta[_rate_key(k, min(j, last))] for k in theta}
        else:
            alpha = {k: meta[_rate_key(k, None)] for k in theta}
        return _sgd_step(loss, theta, support, alpha, False)

    return Adaptation(start, step)


def _check_rates_kind(value: object, name: str) -> str:
    if value not in ("element", "tensor"):
        raise ValueError(
            f"{name} must be 'element' (one rate per entry) or 'tensor' (one per tensor), "
            f"got {value!r}"
        )
    return str(value)


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
_REVERSE = Hyper(
    "reverse",
    "auto",
    str,
    _check_reverse,
    "MAML's reverse pass: unroll, hvp (store the iterates), checkpointed (√k of them) "
    "or auto (unroll up to 10 steps, hvp beyond)",
    REVERSES,
)
_TRUNCATE = Hyper(
    "truncate",
    None,
    int,
    _check_truncate,
    "differentiate only the last m inner steps (a biased gradient; default: all)",
)
_CG = Hyper("cg_steps", CG_STEPS, int, check_positive_int, "iMAML's conjugate-gradient iterations")
_STEP_WEIGHTS = Hyper(
    "step_weights",
    None,
    tuple,
    check_numbers,
    "MAML++'s multi-step loss: weights w_1 … w_k of L_Q(θ_j) (default: L_Q(θ_k))",
    item=float,
)
_PER_STEP_KEYS = Hyper(
    "per_step_keys",
    None,
    tuple,
    check_names,
    "MAML++'s per-step parameters (BNWB): these parameters get one copy per inner step, "
    "meta-learned, not adapted (default: none)",
    item=str,
)
_ADAPT = Hyper(
    "adapt",
    "head",
    str,
    _check_part,
    "what takes inner steps: the head (ANIL) or the body (BOIL)",
    ("head", "body"),
)
_HEAD = Hyper(
    "head",
    None,
    tuple,
    check_names,
    "the head's parameter names (default: the last layer's)",
    item=str,
)
_RATES = Hyper(
    "rates",
    "element",
    str,
    _check_rates_kind,
    "Meta-SGD: one learned rate per entry or per tensor",
    ("element", "tensor"),
)
_PER_STEP = Hyper(
    "per_step", False, bool, check_bool, "Meta-SGD: rates per inner step (MAML++'s LSLR)"
)

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
    Method(
        "maml",
        "exact second-order MAML",
        _maml,
        (_REVERSE, _TRUNCATE, _STEP_WEIGHTS, _PER_STEP_KEYS),
        second_order=True,
        adaptation=_maml_adaptation,
        init=_maml_init,
        check=_maml_check,
        first_order="fomaml",
    ),
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
    Method(
        "anil",
        "ANIL: only the head adapts (adapt='body': BOIL)",
        _anil,
        (_ADAPT, _HEAD),
        second_order=True,
        adaptation=_anil_adaptation,
    ),
    Method(
        "metasgd",
        "Meta-SGD: learned inner rates (per_step: MAML++'s LSLR)",
        _metasgd,
        (_RATES, _PER_STEP),
        second_order=True,
        adaptation=_metasgd_adaptation,
        init=_metasgd_init,
        check=_metasgd_check,
    ),
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
