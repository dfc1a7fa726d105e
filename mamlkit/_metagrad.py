r"""The MAML meta-gradient, three exact ways, and its first-order approximation.

Notation (as in the notebooks): θ = θ_0 the meta-parameters, α = ``lr`` the inner step size,
θ_{j+1} = θ_j − α∇L_s(θ_j) for j = 0 … k−1 on the *support* batch, θ′ = θ_k, and the
meta-objective L_q(θ_k) on the *query* batch. By the chain rule,

.. math::

    \frac{dL_q(θ_k)}{dθ} = J_0ᵀ J_1ᵀ ⋯ J_{k−1}ᵀ ∇L_q(θ_k),
    \qquad J_j = \frac{∂θ_{j+1}}{∂θ_j} = I − α H_s(θ_j),

where H_s is the support-loss Hessian. ``maml_grad`` differentiates through the unrolled loop,
``maml_grad_hvp`` runs this product right to left with one Hessian-vector product per step,
``maml_grad_jacobian`` forms every J_j. ``fomaml_grad`` replaces every J_j by I.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import grad

from ._checks import (
    check_bool,
    check_finite,
    check_int,
    check_names,
    check_numbers,
    check_params,
    check_task,
    checked_loss,
    reference_tensor,
)
from ._curvature import _hessian, _hvp
from ._params import (
    Batch,
    LossFn,
    Params,
    flatten_params,
    tree_axpy,
    tree_detach,
    unflatten_params,
)

Rates = float | Params
"""An inner step size: one number α, or per-key rates broadcastable to each parameter (Meta-SGD)."""


def _sgd_step(
    loss: LossFn,
    params: Params,
    batch: Batch,
    lr: Rates,
    first_order: bool,
    keys: tuple[str, ...] | None = None,
) -> Params:
    """θ − lr·∇L(θ): the one inner step every engine, estimator and kernel reference uses.

    ``lr`` is α or per-key rates (``θ_k − α_k ⊙ ∇_k L``); with ``keys`` only those entries step
    (the others are constants of the step: partial adaptation), and only their gradient is
    computed."""
    if keys is None:
        g = grad(loss)(params, batch)
    else:
        g = grad(lambda part: loss({**params, **part}, batch))({k: params[k] for k in keys})
    if first_order:
        g = tree_detach(g)
    if isinstance(lr, dict):
        return {k: v - lr[k] * g[k] if k in g else v for k, v in params.items()}
    return {k: v - lr * g[k] if k in g else v for k, v in params.items()}


def _adapt(
    loss: LossFn,
    params: Params,
    batch: Batch,
    lr: Rates | list[Params],
    steps: int,
    first_order: bool,
    keys: tuple[str, ...] | None = None,
) -> Params:
    """``steps`` inner steps; ``lr`` may be a list of per-step rates (MAML++'s LSLR)."""
    for j in range(steps):
        params = _sgd_step(
            loss, params, batch, lr[j] if isinstance(lr, list) else lr, first_order, keys
        )
    return params


def _path(
    loss: LossFn,
    params: Params,
    batch: Batch,
    lr: Rates | list[Params],
    steps: int,
    keys: tuple[str, ...] | None = None,
) -> list[Params]:
    """θ_1, …, θ_k, each differentiable with respect to θ_0 (and the rates)."""
    path = []
    for j in range(steps):
        params = _sgd_step(loss, params, batch, lr[j] if isinstance(lr, list) else lr, False, keys)
        path.append(params)
    return path


_STEP_KEY = re.compile(r"step(\d+)/(.+)\Z")


def step_key(key: str, j: int) -> str:
    """The name of inner step j's own copy of the parameter ``key`` (per-step parameters)."""
    return f"step{j}/{key}"


def _copy_of(key: str) -> str | None:
    """The parameter a per-step copy's name ``step{j}/<name>`` copies, else ``None``."""
    match = _STEP_KEY.match(key)
    return match[2] if match else None


def per_step_params(
    params: Mapping[str, Tensor], keys: list[str] | tuple[str, ...], *, steps: int
) -> Params:
    r"""θ with each parameter named in ``keys`` replaced by ``steps`` copies of it, one per inner
    step: ``step0/<key>``, …, ``step{k−1}/<key>``, each a clone of the original (MAML++'s per-step
    BatchNorm weights and biases, BNWB, for ``keys`` = the BatchNorm layers' weights and biases).

    The meta-parameters ``maml_grad(..., per_step_keys=keys)`` and the ``"maml"`` method with
    ``per_step_keys`` take (``mamlkit.METHODS["maml"].init`` calls this); ``params`` is not
    modified.

    Example:
        >>> p = per_step_params({"w": torch.ones(2), "g": torch.ones(2)}, ["g"], steps=2)
        >>> sorted(p)
        ['step0/g', 'step1/g', 'w']
    """
    params = check_params(params)
    steps = check_int(steps, "steps")
    if steps < 1:
        raise ValueError(f"steps must be at least 1 for per-step parameters, got {steps}")
    names = check_names(keys, "per_step_keys")
    if names is None:
        raise TypeError("per_step_keys must be a non-empty list of parameter names, got None")
    unknown = [k for k in names if k not in params]
    if unknown:
        raise ValueError(
            f"per_step_keys names keys params does not have: {unknown} (params: {list(params)})"
        )
    out = {k: v for k, v in params.items() if k not in names}
    for j in range(steps):
        out |= {step_key(k, j): params[k].detach().clone() for k in names}
    return out


_MAKE_COPIES = (
    "make them with mamlkit.METHODS['maml'].init(params, lr=..., steps=..., per_step_keys=...)"
)


def check_per_step_keys(
    per_step_keys: object, params: Params, steps: int
) -> tuple[str, ...] | None:
    """``None``, or names whose per-step copies ``step{j}/<name>`` (j < ``steps``) ``params``
    holds, with one shape per name and no shared entry of that name."""
    keys = check_names(per_step_keys, "per_step_keys")
    if keys is None:
        return None
    keys = tuple(dict.fromkeys(keys))
    if steps < 1:
        raise ValueError(f"per_step_keys needs at least one inner step, got steps={steps}")
    for k in keys:
        if k in params:
            raise ValueError(
                f"per_step_keys: params holds {k!r} itself; per-step parameters replace it by "
                f"copies step0/{k} … ({_MAKE_COPIES})"
            )
        missing = [step_key(k, j) for j in range(steps) if step_key(k, j) not in params]
        if missing:
            raise ValueError(
                f"per_step_keys: params lacks {missing[:3]} (one copy of {k!r} per inner step; "
                f"{_MAKE_COPIES})"
            )
        shapes = {tuple(params[step_key(k, j)].shape) for j in range(steps)}
        if len(shapes) > 1:
            raise ValueError(f"per_step_keys: the copies of {k!r} differ in shape: {shapes}")
    return keys


def model_view(meta: Params, per_step_keys: tuple[str, ...] | None) -> Params:
    """The model's parameters inside the meta-parameters: θ with step 0's copies under the plain
    names (the meta-parameters themselves when there are no per-step parameters)."""
    if per_step_keys is None:
        return meta
    shared, copies = split_per_step(meta, per_step_keys, 1)
    return {**shared, **copies[0]}


def split_per_step(meta: Params, keys: tuple[str, ...], steps: int) -> tuple[Params, list[Params]]:
    """The shared parameters, and for each inner step j its copies under the plain names."""
    shared = {k: v for k, v in meta.items() if _copy_of(k) not in keys}
    return shared, [{k: meta[step_key(k, j)] for k in keys} for j in range(steps)]


def unrolled_path(
    loss: LossFn,
    meta: Params,
    batch: Batch,
    lr: Rates | list[Params],
    steps: int,
    keys: tuple[str, ...] | None = None,
    per_step_keys: tuple[str, ...] | None = None,
) -> list[Params]:
    r"""θ_1, …, θ_k, differentiable with respect to the meta-parameters.

    With ``per_step_keys``, step j runs with step j's copies of those parameters — the
    support gradient at ``θ_j ∪ ψ_j`` — and they take no inner step themselves, so θ_{j+1} holds
    ``ψ_j`` (the query loss at θ_{j+1} uses the copies of the step that made it, as MAML++)."""
    if per_step_keys is None:
        return _path(loss, meta, batch, lr, steps, keys)
    theta, copies = split_per_step(meta, per_step_keys, steps)
    adapted = keys if keys is not None else tuple(theta)
    path = []
    for j in range(steps):
        theta = _sgd_step(
            loss,
            {**theta, **copies[j]},
            batch,
            lr[j] if isinstance(lr, list) else lr,
            False,
            adapted,
        )
        path.append(theta)
    return path


def check_adapt_keys(adapt_keys: object, params: Params) -> tuple[str, ...] | None:
    """``None`` (every key adapts) or a non-empty sequence of keys of ``params``."""
    keys = check_names(adapt_keys, "adapt_keys")
    unknown = [k for k in keys or () if k not in params]
    if unknown:
        raise ValueError(
            f"adapt_keys names keys params does not have: {unknown} (params: {list(params)})"
        )
    return None if keys is None else tuple(dict.fromkeys(keys))


def check_step_weights(step_weights: object, steps: int) -> tuple[float, ...] | None:
    """``None`` or k finite weights, one per inner step (the multi-step loss)."""
    weights = check_numbers(step_weights, "step_weights")
    if weights is not None and len(weights) != steps:
        raise ValueError(
            f"step_weights must hold one weight per inner step ({steps}), got {len(weights)}"
        )
    return weights


def multi_step_objective(
    loss: LossFn, path: list[Params], query: Batch, step_weights: tuple[float, ...] | None
) -> Tensor:
    """``L_Q(θ_k)``, or MAML++'s multi-step loss ``Σ_j w_j L_Q(θ_j)`` over j = 1 … k."""
    if step_weights is None:
        return loss(path[-1], query)
    return sum(w * loss(theta, query) for w, theta in zip(step_weights, path))  # type: ignore[return-value]


def _trajectory(loss: LossFn, params: Params, batch: Batch, lr: float, steps: int) -> list[Params]:
    """θ_0, θ_1, …, θ_k with no autograd history: what the reverse pass must store."""
    path = [params]
    for _ in range(steps):
        path.append(tree_detach(_sgd_step(loss, path[-1], batch, lr, first_order=True)))
    return path


def _checked(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    lr: float,
    steps: int,
) -> tuple[LossFn, Params, Batch, Batch, float, int]:
    """The door of every two-batch engine: the query is required and checked like the support."""
    loss, params, support, lr, steps = _checked_single(
        loss_fn, params, support, lr, steps, "support"
    )
    return loss, params, support, check_task(loss_fn, params, query, "query"), lr, steps


def _checked_single(
    loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch, lr: float, steps: int, name: str
) -> tuple[LossFn, Params, Batch, float, int]:
    loss = checked_loss(loss_fn)
    params = check_params(params)
    batch = check_task(loss_fn, params, batch, name)
    return loss, params, batch, check_finite(lr, "lr"), check_int(steps, "steps")


def adapt(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Batch,
    *,
    lr: float,
    steps: int = 1,
    first_order: bool = False,
) -> Params:
    r"""The inner loop: ``steps`` plain gradient steps ``θ_{j+1} = θ_j − lr·∇L(θ_j)``.

    The result is differentiable with respect to ``params`` (through the gradients themselves:
    ``∂θ_k/∂θ = (I − αH(θ_{k−1}))⋯(I − αH(θ_0))``). With ``first_order=True`` each inner
    gradient is treated as a constant (detached), so θ_k depends on θ only through the identity
    path and ``∂θ_k/∂θ = I``: differentiating a loss at θ_k then gives the first-order (FOMAML)
    gradient.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: θ_0, a ``dict[str, Tensor]``; never modified.
        batch: the support data ``(x, y)``.
        lr: the inner step size α (a finite real number).
        steps: k ≥ 0; ``steps=0`` returns a new dict holding the caller's tensors (not clones).
        first_order: detach the inner gradients.

    Returns:
        θ_k, a new dict with the keys, shapes and dtypes of ``params``.

    Example:
        >>> L = lambda p, b: 0.5 * (p["w"] ** 2).sum()            # ∇L = w
        >>> adapt(L, {"w": torch.tensor([1.0])}, (torch.zeros(1), torch.zeros(1)), lr=0.5, steps=2)
        {'w': tensor([0.2500])}
    """
    loss, params, batch, lr, steps = _checked_single(loss_fn, params, batch, lr, steps, "batch")
    check_bool(first_order, "first_order")
    return _adapt(loss, params, batch, lr, steps, first_order)


def maml_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    adapt_keys: list[str] | tuple[str, ...] | None = None,
    step_weights: list[float] | tuple[float, ...] | None = None,
    per_step_keys: list[str] | tuple[str, ...] | None = None,
) -> Params:
    r"""The exact MAML meta-gradient ``dL_q(θ_k)/dθ``, by autodiff through the unrolled loop.

    .. math:: \frac{dL_q(θ_k)}{dθ} = (I − αH_s(θ_0))ᵀ ⋯ (I − αH_s(θ_{k−1}))ᵀ ∇L_q(θ_k)

    Reverse mode over the k inner steps keeps every step's graph alive: memory grows with k
    like k forward-and-backward passes. ``steps=0`` gives the plain query gradient ∇L_q(θ).

    With ``adapt_keys`` only those entries take inner steps (ANIL: the head; BOIL: the body);
    the meta-gradient is still with respect to every parameter, and exact: a fixed entry b
    enters through the adapted entries' gradients, ``dθ_k[A]/db = −α Σ_j ∂²L_s/∂a∂b ⋯``. With
    ``step_weights`` ``[w_1, …, w_k]`` the meta-objective is MAML++'s multi-step loss
    ``Σ_j w_j L_q(θ_j)``. With ``per_step_keys`` (MAML++'s per-step BatchNorm weights, BNWB)
    ``params`` holds one copy ``ψ_j`` of each named parameter per inner step, ``step{j}/<name>``
    (``mamlkit.METHODS["maml"].init(params, lr=α, steps=k, per_step_keys=[...])`` makes them):
    step j computes the support gradient at ``θ_j ∪ ψ_j``, the copies take no inner step, the
    query loss at θ_{j+1} uses ``ψ_j``, and the meta-gradient includes every copy's,
    ``dL_q/dψ_j = −α (∂²L_s/∂ψ∂θ)(θ_j, ψ_j) v_{j+1}`` (plus ``∂L_q/∂ψ`` for the last copy),
    with ``v_{j+1} = dL_q/dθ_{j+1}``.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; treated as values (no autograd history is kept
            in the result), never modified.
        support: ``(x, y)`` for the inner steps.
        query: ``(x, y)`` for the meta-objective.
        lr: the inner step size α.
        steps: the number of inner steps k ≥ 0.
        adapt_keys: the keys that take inner steps (default: every key).
        step_weights: the multi-step loss's weights w_1 … w_k (default: ``L_q(θ_k)`` alone).
        per_step_keys: parameters with one copy per inner step (default: none).

    Returns:
        The meta-gradient as a dict with the keys, shapes and dtypes of ``params``.

    Example:
        >>> L = lambda p, b: 0.5 * ((b[0] * p["w"] - b[1]) ** 2).sum()   # H = Σx² = 2
        >>> s = q = (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
        >>> maml_grad(L, {"w": torch.tensor(1.0)}, s, q, lr=0.1)["w"]      # (1 − 0.2)·2·0.8
        tensor(1.2800)
    """
    params = check_params(params)
    per_step = check_per_step_keys(per_step_keys, params, check_int(steps, "steps"))
    loss, _, support, query, lr, steps = _checked(
        loss_fn, model_view(params, per_step), support, query, lr, steps
    )
    keys = check_adapt_keys(adapt_keys, params)
    weights = check_step_weights(step_weights, steps)

    def meta_objective(theta: Params) -> Tensor:
        if weights is None and per_step is None:
            return loss(_adapt(loss, theta, support, lr, steps, False, keys), query)
        path = unrolled_path(loss, theta, support, lr, steps, keys, per_step)
        return multi_step_objective(loss, path, query, weights)

    return grad(meta_objective)(tree_detach(params))


def maml_grad_hvp(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
) -> Params:
    r"""The exact MAML meta-gradient by a hand-written reverse pass of Hessian-vector products.

    .. math::

        g ← ∇L_q(θ_k); \quad \text{for } j = k−1, …, 0: \; g ← g − α H_s(θ_j) g

    which is ``J_0ᵀ ⋯ J_{k−1}ᵀ ∇L_q(θ_k)`` evaluated right to left (each J_j is symmetric).
    No Hessian is formed and no graph is kept between steps: only the k+1 iterates θ_j are
    stored, so memory grows like k·P rather than k full computation graphs.

    Args and Returns: as :func:`maml_grad`.

    Example:
        >>> L = lambda p, b: 0.5 * ((b[0] * p["w"] - b[1]) ** 2).sum()
        >>> s = q = (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
        >>> maml_grad_hvp(L, {"w": torch.tensor(1.0)}, s, q, lr=0.1)["w"]
        tensor(1.2800)
    """
    loss, params, support, query, lr, steps = _checked(loss_fn, params, support, query, lr, steps)
    path = _trajectory(loss, tree_detach(params), support, lr, steps)
    g = grad(loss)(path[-1], query)
    for theta_j in reversed(path[:-1]):
        g = tree_axpy(-lr, _hvp(loss, theta_j, support, g), g)
    return g


def inner_jacobian(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Batch,
    *,
    lr: float,
    steps: int = 1,
) -> Tensor:
    r"""The (P, P) Jacobian of the whole inner loop, ``∂θ_k/∂θ_0 = J_{k−1} ⋯ J_1 J_0``.

    Each factor ``J_j = I − α H(θ_j)`` is the Jacobian of one step at the point that step starts
    from; later steps multiply on the *left* (numerator layout: row p, column q is ∂θ_{k,p}/∂θ_q).
    ``steps=0`` gives the identity. Forms Hessians: for teaching and small models.

    Example:
        >>> L = lambda p, b: 0.5 * (p["w"] ** 2).sum()             # H = I
        >>> batch = (torch.zeros(1), torch.zeros(1))
        >>> inner_jacobian(L, {"w": torch.zeros(2)}, batch, lr=0.5, steps=2)
        tensor([[0.2500, 0.0000],
                [0.0000, 0.2500]])
    """
    loss, params, batch, lr, steps = _checked_single(loss_fn, params, batch, lr, steps, "batch")
    path = _trajectory(loss, tree_detach(params), batch, lr, steps)
    return _jacobian_product(loss, path, batch, lr)


def _jacobian_product(loss: LossFn, path: list[Params], batch: Batch, lr: float) -> Tensor:
    vector = flatten_params(path[0])
    eye = torch.eye(vector.numel(), dtype=vector.dtype, device=vector.device)
    product = eye
    for theta_j in path[:-1]:
        product = (eye - lr * _hessian(loss, theta_j, batch)) @ product
    return product


def maml_grad_jacobian(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
) -> Params:
    r"""The exact MAML meta-gradient by forming every ``J_j = I − αH_s(θ_j)`` and multiplying.

    .. math:: \frac{dL_q(θ_k)}{dθ} = (J_{k−1} ⋯ J_0)ᵀ ∇L_q(θ_k)

    O(P²) memory and O(k·P³) time: for teaching and for checking the other engines.

    Args and Returns: as :func:`maml_grad`.

    Example:
        >>> L = lambda p, b: 0.5 * ((b[0] * p["w"] - b[1]) ** 2).sum()
        >>> s = q = (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
        >>> maml_grad_jacobian(L, {"w": torch.tensor(1.0)}, s, q, lr=0.1)["w"]
        tensor(1.2800)
    """
    loss, params, support, query, lr, steps = _checked(loss_fn, params, support, query, lr, steps)
    path = _trajectory(loss, tree_detach(params), support, lr, steps)
    query_grad = flatten_params(grad(loss)(path[-1], query))
    jacobian = _jacobian_product(loss, path, support, lr)
    return unflatten_params(jacobian.T @ query_grad, params)


def fomaml_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    adapt_keys: list[str] | tuple[str, ...] | None = None,
) -> Params:
    r"""The first-order MAML (FOMAML) gradient: ``∇L_q(θ_k)``, every ``J_j`` replaced by ``I``.

    .. math::

        g_{FO} = ∇L_q(θ_k) = \frac{dL_q(θ_k)}{dθ} + O(α)

    It keeps the post-update evaluation point θ_k (where most of MAML's benefit comes from) and
    drops every term containing the support Hessian; the difference to :func:`maml_grad` for
    one step is exactly ``α H_s(θ) ∇L_q(θ′)``. Only the current iterate is kept: O(P) memory
    for any k. The result has no autograd history.

    Args and Returns: as :func:`maml_grad` (``adapt_keys``: only those entries adapt; the
    first-order gradient is ``∇L_q(θ_k)`` with respect to every entry).

    Example:
        >>> L = lambda p, b: 0.5 * ((b[0] * p["w"] - b[1]) ** 2).sum()
        >>> s = q = (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
        >>> fomaml_grad(L, {"w": torch.tensor(1.0)}, s, q, lr=0.1)["w"]    # 2·0.8
        tensor(1.6000)
    """
    loss, params, support, query, lr, steps = _checked(loss_fn, params, support, query, lr, steps)
    keys = check_adapt_keys(adapt_keys, params)
    theta_k = _adapt(loss, tree_detach(params), support, lr, steps, True, keys)
    return tree_detach(grad(loss)(theta_k, query))


def check_rates(lrs: object, params: Params, steps: int) -> Params | list[Params]:
    """Meta-SGD's rates: a dict with the keys of ``params`` whose values broadcast to each
    parameter (0-d: one rate per tensor; the parameter's shape: one per entry), or a list of
    ``steps`` such dicts (one per inner step)."""
    if isinstance(lrs, (list, tuple)):
        if len(lrs) != steps:
            raise ValueError(
                f"lrs must be one dict of rates or a list of {steps} (one per inner step), "
                f"got a list of {len(lrs)}"
            )
        return [check_rates(r, params, 1) for r in lrs]  # type: ignore[misc]
    rates = check_params(lrs, "lrs")
    if set(rates) != set(params):
        missing, extra = (
            [k for k in params if k not in rates],
            [k for k in rates if k not in params],
        )
        raise ValueError(
            f"lrs must have the keys of params: missing {missing}, not in params {extra}"
        )
    rates = {k: rates[k] for k in params}  # the order of params
    like = reference_tensor(params)
    for k, r in rates.items():
        if r.dtype != like.dtype or r.device != like.device:
            raise TypeError(
                f"lrs[{k!r}] must have the dtype and device of params, got {r.dtype} on {r.device}"
            )
        try:
            torch.broadcast_shapes(r.shape, params[k].shape)
        except RuntimeError:
            raise ValueError(
                f"lrs[{k!r}] must broadcast to params[{k!r}] {tuple(params[k].shape)}, "
                f"got {tuple(r.shape)}"
            ) from None
        if torch.broadcast_shapes(r.shape, params[k].shape) != params[k].shape:
            raise ValueError(
                f"lrs[{k!r}] {tuple(r.shape)} would broadcast params[{k!r}] "
                f"{tuple(params[k].shape)} to another shape"
            )
    return rates


def metasgd_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    lrs: Mapping[str, Tensor] | list[Mapping[str, Tensor]],
    support: Batch,
    query: Batch,
    *,
    steps: int = 1,
) -> tuple[Params, Params | list[Params]]:
    r"""Meta-SGD's meta-gradient with respect to θ and to the learned inner rates, both exact.

    The inner steps are ``θ_{j+1} = θ_j − α ⊙ ∇L_s(θ_j)`` (Li et al. 2017), or with one set of
    rates per step ``α_j`` (MAML++'s LSLR, Antoniou et al. 2019). For one step,

    .. math::

        \frac{∂L_q(θ_1)}{∂α} = −∇L_q(θ_1) ⊙ ∇L_s(θ), \qquad
        \frac{∂L_q(θ_1)}{∂θ} = (I − \mathrm{diag}(α) H_s(θ))ᵀ ∇L_q(θ_1),

    and for k steps the same chain rule through every step (autodiff through the unrolled loop).

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: θ; never modified.
        lrs: the rates, a dict with the keys of ``params`` (each 0-d, or broadcastable to its
            parameter), or a list of ``steps`` such dicts (one per step).
        support, query: ``(x, y)`` for the inner steps and for the meta-objective.
        steps: k ≥ 0.

    Returns:
        ``(grad_params, grad_lrs)``: shaped like ``params`` and like ``lrs``, no autograd history.

    Example:
        >>> L = lambda p, b: 0.5 * ((p["w"] - b[1]) ** 2).sum()         # ∇L = w − y, H = 1
        >>> s = q = (torch.zeros(1), torch.zeros(1))
        >>> g, ga = metasgd_grad(L, {"w": torch.tensor([2.0])}, {"w": torch.tensor(0.25)}, s, q)
        >>> g["w"], ga["w"]      # θ₁ = 1.5: (1 − ¼)·1.5 and −∇L_q(θ₁)·∇L_s(θ) = −1.5·2
        (tensor([1.1250]), tensor(-3.))
    """
    loss, params, support, query, _, steps = _checked(loss_fn, params, support, query, 0.0, steps)
    rates = check_rates(lrs, params, steps)

    def meta_objective(theta: Params, alpha: Params | list[Params]) -> Tensor:
        return loss(_adapt(loss, theta, support, alpha, steps, False), query)

    g_params, g_rates = grad(meta_objective, argnums=(0, 1))(tree_detach(params), _detached(rates))
    return tree_detach(g_params), _detached(g_rates)


def _detached(rates: Params | list[Params]) -> Params | list[Params]:
    return [tree_detach(r) for r in rates] if isinstance(rates, list) else tree_detach(rates)
