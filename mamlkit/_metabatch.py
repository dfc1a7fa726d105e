r"""The meta-batch gradient: one call, every method, all tasks at once with ``torch.func.vmap``.

For a meta-batch of T tasks with support sets ``(x_s, y_s)`` and query sets ``(x_q, y_q)``
stacked along a leading task dimension, the meta-gradient is the task average

.. math:: g = \frac1T \sum_{i=1}^{T} g_i(θ; \mathcal{D}^s_i, \mathcal{D}^q_i),

where ``g_i`` is the per-task gradient of the chosen method (MAML, FOMAML, Reptile, iMAML).
Two paths, one answer: for the built-in MLP with a squared-error loss (``make_mse_loss(mlp)``)
the hand-written batched backward of ``mamlkit._fast`` (no autograd, no vmap; about 4× faster
than vmap, see ``benchmarks/``); for any other loss the per-task engines mapped over tasks with
``torch.func.vmap`` (no Python loop over tasks). Tests hold the two paths equal in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor
from torch.func import grad_and_value, vmap

from ._checks import (
    check_lr,
    check_params,
    check_positive,
    check_positive_int,
    check_steps,
    check_task_batches,
    checked_loss,
)
from ._estimators import imaml, reptile_grad
from ._fast import fast_meta_batch_grad, supports_fast_path
from ._metagrad import _adapt
from ._params import Batch, LossFn, Params, tree_detach

Method = Literal["maml", "fomaml", "reptile", "imaml"]
METHODS: tuple[str, ...] = ("maml", "fomaml", "reptile", "imaml")


def _maml_task(loss: LossFn, lr: float, steps: int):
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        def meta_objective(p: Params) -> Tensor:
            return loss(_adapt(loss, p, support, lr, steps, first_order=False), query)

        return grad_and_value(meta_objective)(theta)

    return task


def _fomaml_task(loss: LossFn, lr: float, steps: int):
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        theta_k = tree_detach(_adapt(loss, theta, support, lr, steps, first_order=True))
        return grad_and_value(loss)(theta_k, query)

    return task


def _reptile_task(loss: LossFn, lr: float, steps: int):
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        g = reptile_grad(loss, theta, support, lr=lr, steps=steps)
        theta_k = {k: theta[k] - lr * g[k] for k in theta}  # (θ − θ_k)/α = g
        return g, loss(theta_k, query)

    return task


def _imaml_task(loss: LossFn, lr: float, steps: int, lam: float, cg_steps: int):
    def task(theta: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        result = imaml(
            loss, theta, support, query, lam=lam, lr=lr, steps=steps, cg_steps=cg_steps, cg_tol=0.0
        )
        return result.grad, loss(result.phi, query)

    return task


def meta_batch_grad(
    method: Method,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    lam: float = 1.0,
    cg_steps: int = 5,
) -> tuple[Params, Tensor]:
    r"""The task-averaged meta-gradient of ``method`` and the per-task query losses.

    Per task i (support ``S_i``, query ``Q_i``, θ_k = k SGD steps of size α on ``S_i``):

    - ``"maml"``: ``dL_{Q_i}(θ_k)/dθ = (I − αH_{S_i}(θ_0))ᵀ⋯(I − αH_{S_i}(θ_{k−1}))ᵀ∇L_{Q_i}(θ_k)``,
      computed with its value in one ``grad_and_value`` pass (no extra forward);
    - ``"fomaml"``: ``∇L_{Q_i}(θ_k)`` (every inner Jacobian replaced by I);
    - ``"reptile"``: ``mamlkit.reptile_grad``, ``(θ − θ_k)/α`` after k steps on the support
      set (Reptile has no outer evaluation set: the query set enters only ``query_losses``);
    - ``"imaml"``: ``mamlkit.imaml``'s implicit gradient ``(I + H_{S_i}(φ)/λ)⁻¹∇L_{Q_i}(φ)``,
      φ from ``steps`` gradient steps of size ``lr`` on ``L_{S_i}(φ) + λ/2‖φ − θ‖²`` and
      ``cg_steps`` conjugate-gradient iterations (``cg_tol=0``: vmap-safe).

    The result is ``g = (1/T) Σ_i g_i``. For ``make_mse_loss(mlp)`` (ReLU or tanh) the call
    takes the fast batched path of ``mamlkit._fast``; any other loss goes through ``vmap``. ``query_losses[i]`` is the query loss at the method's
    own adapted parameters, at no extra cost: ``L_{Q_i}(θ_k)`` after ``steps`` plain SGD steps
    of size ``lr`` on ``S_i`` for MAML, FOMAML and Reptile (the same quantity for all three),
    ``L_{Q_i}(φ)`` for iMAML.

    Args:
        method: ``"maml"``, ``"fomaml"``, ``"reptile"`` or ``"imaml"``.
        loss_fn: ``loss_fn(params, batch)`` for one task, returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; never modified.
        support: ``(x, y)`` with a leading task dimension: shapes (T, K_s, …).
        query: ``(x, y)`` with shapes (T, K_q, …), the same T.
        lr: the inner step size α.
        steps: the number of inner steps k (≥ 1 for Reptile and iMAML).
        lam: iMAML's proximal strength λ > 0 (ignored by the other methods).
        cg_steps: iMAML's conjugate-gradient iterations (ignored by the other methods).

    Returns:
        ``(grads, query_losses)``: a dict shaped like ``params`` (no autograd history) and a
        (T,) tensor.

    Raises:
        ValueError: unknown ``method``, mismatched task dimensions, bad ``lr``/``steps``.

    Example:
        >>> L = lambda p, b: ((b[0] * p["w"] - b[1]) ** 2).mean()
        >>> xs = torch.ones(3, 2, 1); ys = torch.zeros(3, 2, 1)
        >>> g, losses = meta_batch_grad("maml", L, {"w": torch.tensor(1.0)}, (xs, ys), (xs, ys), lr=0.1)
        >>> g["w"], losses                      # θ′ = 0.8, g = (1 − 0.2)·2·0.8
        (tensor(1.2800), tensor([0.6400, 0.6400, 0.6400]))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    loss = checked_loss(loss_fn)
    params = tree_detach(check_params(params))
    support, query = check_task_batches(support, query)
    lr, steps = check_lr(lr), check_steps(steps)
    if supports_fast_path(loss_fn, params):
        return fast_meta_batch_grad(
            method, loss_fn, params, support, query, lr=lr, steps=steps, lam=lam, cg_steps=cg_steps
        )
    return _vmap_meta_batch_grad(
        method, loss, params, support, query, lr=lr, steps=steps, lam=lam, cg_steps=cg_steps
    )


def _vmap_meta_batch_grad(
    method: Method,
    loss: LossFn,
    params: Params,
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int,
    lam: float = 1.0,
    cg_steps: int = 5,
) -> tuple[Params, Tensor]:
    """The general path of :func:`meta_batch_grad` (any loss): the per-task engines under vmap."""
    if method == "maml":
        task = _maml_task(loss, lr, steps)
    elif method == "fomaml":
        task = _fomaml_task(loss, lr, steps)
    elif method == "reptile":
        task = _reptile_task(loss, lr, check_positive_int(steps, "steps"))
    else:
        lam, cg_steps = check_positive(lam, "lam"), check_positive_int(cg_steps, "cg_steps")
        task = _imaml_task(loss, lr, check_positive_int(steps, "steps"), lam, cg_steps)
    grads, losses = vmap(task, in_dims=(None, 0, 0))(params, support, query)
    return {k: g.mean(0) for k, g in tree_detach(grads).items()}, losses.detach()


__all__ = ["METHODS", "meta_batch_grad"]
