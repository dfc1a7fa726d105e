"""Second derivatives of a loss: the Hessian, Hessian-vector products, and the squared-error
and cross-entropy splits into Gauss–Newton and residual parts."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import grad, jacrev, vjp

from ._checks import (
    check_batch,
    check_like,
    check_params,
    check_task,
    checked_loss,
    reference_tensor,
)
from ._params import Batch, LossFn, ModelFn, Params, flatten_params, tree_detach, unflatten_params


def _hvp(loss: LossFn, params: Params, batch: Batch, v: Params) -> Params:
    """H(θ)·v as the vector-Jacobian product of the gradient (H is symmetric); H is never formed.

    Reverse-over-reverse works for every op with a backward formula (forward-mode coverage is
    narrower) and costs about two gradient evaluations.
    """
    _, pullback = vjp(lambda p: grad(loss)(p, batch), params)
    return pullback(v)[0]


def _hessian(loss: LossFn, params: Params, batch: Batch) -> Tensor:
    """The (P, P) Hessian in the flat order (unchecked core)."""

    def flat_loss(vector: Tensor) -> Tensor:
        return loss(unflatten_params(vector, params), batch)

    return jacrev(jacrev(flat_loss))(flatten_params(params))


def hvp(
    loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch, v: Mapping[str, Tensor]
) -> Params:
    r"""Hessian-vector product ``H(θ)·v`` of ``loss_fn`` at ``params``, without forming H.

    .. math:: H(θ)v = ∇_θ \big( ∇L(θ)ᵀ v \big)

    computed as the vector-Jacobian product of the gradient (a "gradient of a gradient"): about
    two gradients' cost, O(P) memory.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: ``dict[str, Tensor]``, the point θ.
        batch: ``(x, y)``, the data L is evaluated on.
        v: a direction with the keys and shapes of ``params``.

    Returns:
        ``H(θ)·v`` as a dict shaped like ``params``.

    Raises:
        ValueError: if ``v`` does not match ``params`` or the loss is not a scalar.

    Example:
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> half_sq = lambda p, b: 0.5 * (b[0] @ p["w"]).pow(2).sum()  # H = XᵀX
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> hvp(half_sq, p, (X, torch.zeros(2)), {"w": torch.tensor([1.0, 0.0])})["w"]
        tensor([2., 1.])
    """
    params = check_params(params)
    v = check_like(v, params, "v")
    batch = check_task(loss_fn, params, batch, "batch")
    return _hvp(checked_loss(loss_fn), tree_detach(params), batch, tree_detach(v))


def hessian(loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
    r"""The (P, P) Hessian ``H_pq = ∂²L/∂θ_p∂θ_q`` of ``loss_fn`` at ``params``.

    Rows and columns follow the flat order of :func:`mamlkit.flatten_params` (dict insertion
    order, row-major). Costs O(P²) memory: for teaching and small models; use :func:`hvp` otherwise.

    Example:
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> half_sq = lambda p, b: 0.5 * (b[0] @ p["w"] - b[1]).pow(2).sum()
        >>> hessian(half_sq, {"w": torch.zeros(2)}, (X, torch.zeros(2)))  # XᵀX
        tensor([[2., 1.],
                [1., 1.]])
    """
    params = check_params(params)
    batch = check_task(loss_fn, params, batch, "batch")
    return _hessian(checked_loss(loss_fn), tree_detach(params), batch)


def mse_hessian_parts(
    model_fn: ModelFn, params: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Split the Hessian of ``L = ½ Σ_j ‖f(x_j; θ) − y_j‖²`` into Gauss–Newton and residual parts.

    .. math::

        ∇²L = \underbrace{Σ_j J_jᵀ J_j}_{\text{Gauss–Newton, PSD}}
            + \underbrace{Σ_j Σ_o (f_o(x_j) − y_{jo})\, ∇²_θ f_o(x_j)}_{
                \text{residual-weighted model Hessian}}

    with ``J_j = ∂f(x_j)/∂θ`` of shape (O, P). The residual is taken as ``f − y``; written with
    ``y − f`` the second term carries a minus sign. Both parts are (P, P); the O×O matrix that
    sits between ``J_jᵀ`` and ``J_j`` is the Hessian of the loss in the *outputs*, here the
    identity.

    Args:
        model_fn: ``model_fn(params, x)`` returning predictions of shape (N,) or (N, O).
        params: the point θ.
        x: inputs, N rows.
        y: targets with exactly the shape of ``model_fn(params, x)`` (no broadcasting).

    Returns:
        ``(gauss_newton, residual)``, each (P, P), summing to ``∇²L``.

    Example:
        >>> line = lambda p, x: p["w"] * x[:, 0]   # linear in θ: the residual part vanishes
        >>> gn, r = mse_hessian_parts(line, {"w": torch.tensor(2.0)}, torch.ones(3, 1),
        ...                           torch.zeros(3))
        >>> gn, r
        (tensor([[3.]]), tensor([[0.]]))
    """
    params = tree_detach(check_params(params))
    check_batch((x, y), "(x, y)", reference_tensor(params))
    vector = flatten_params(params)

    def predict(v: Tensor) -> Tensor:
        return model_fn(unflatten_params(v, params), x)

    prediction = predict(vector)
    if prediction.shape != y.shape:
        raise ValueError(
            f"y must have the shape of model_fn(params, x), {tuple(prediction.shape)}, "
            f"got {tuple(y.shape)}"
        )
    jac = jacrev(predict)(vector).reshape(-1, vector.numel())  # (N·O, P)
    gauss_newton = jac.T @ jac
    residual_weights = (prediction - y).reshape(-1).detach()

    def residual_weighted_output(v: Tensor) -> Tensor:
        return (residual_weights * predict(v).reshape(-1)).sum()

    residual = jacrev(jacrev(residual_weighted_output))(vector)
    return gauss_newton, residual


def cross_entropy_hessian_parts(
    model_fn: ModelFn, params: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Split the Hessian of the mean cross-entropy ``L = −(1/N) Σ_n log softmax(z_n)[y_n]``
    (logits ``z_n = f(x_n; θ)``) into a Gauss–Newton and a residual part.

    .. math::

        ∇²L = \underbrace{\frac1N Σ_n J_nᵀ (\mathrm{diag}\, p_n − p_n p_nᵀ) J_n}_{
                \text{Gauss–Newton, PSD}}
            + \underbrace{\frac1N Σ_n Σ_o (p_{no} − y_{no})\, ∇²_θ z_{no}}_{
                \text{residual-weighted model Hessian}}

    with ``p_n = softmax(z_n)``, ``y_{no}`` the one-hot label and ``J_n = ∂z_n/∂θ`` (O, P). The
    O×O matrix ``diag p − ppᵀ`` is the Hessian of the loss in the logits (it replaces the identity
    of the squared error, :func:`mse_hessian_parts`); it is positive semi-definite (its
    quadratic form is the variance of a vector under p), so the first part is too. Both parts are
    (P, P) in the flat order of :func:`mamlkit.flatten_params`.

    Args:
        model_fn: ``model_fn(params, x)`` returning (N, O) logits.
        params: the point θ.
        x: inputs, N rows.
        y: (N,) integer labels.

    Returns:
        ``(gauss_newton, residual)``, each (P, P), summing to ``∇²L``.

    Example:
        >>> lin = lambda p, x: x @ p["w"]          # linear logits: the residual part vanishes
        >>> x, y = torch.ones(3, 1), torch.tensor([0, 1, 1])
        >>> gn, r = cross_entropy_hessian_parts(lin, {"w": torch.zeros(1, 2)}, x, y)
        >>> gn, r.abs().max()
        (tensor([[ 0.2500, -0.2500],
                [-0.2500,  0.2500]]), tensor(0.))
    """
    params = tree_detach(check_params(params))
    like = reference_tensor(params)
    check_batch((x, y), "(x, y)", like)
    if y.is_floating_point() or y.ndim != 1:
        raise TypeError(
            f"y must be (N,) integer class labels, got {y.dtype} of shape {tuple(y.shape)}"
        )
    vector = flatten_params(params)

    def logits(v: Tensor) -> Tensor:
        return model_fn(unflatten_params(v, params), x)

    z = logits(vector)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"model_fn must return (N, classes) logits, got {tuple(z.shape)}")
    n, classes = z.shape
    p = torch.softmax(z.detach(), -1)
    jac = jacrev(logits)(vector).reshape(n, classes, -1)  # (N, O, P)
    curvature = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, O, O)
    gauss_newton = torch.einsum("nop,noq,nqr->pr", jac, curvature, jac) / n
    weights = (p - torch.nn.functional.one_hot(y, classes).to(p.dtype)).detach()

    def residual_weighted_logits(v: Tensor) -> Tensor:
        return (weights * logits(v)).sum() / n

    residual = jacrev(jacrev(residual_weighted_logits))(vector)
    return gauss_newton, residual
