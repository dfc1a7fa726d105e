"""Second derivatives of a loss: the Hessian, Hessian-vector products, and the MSE split."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor
from torch.func import grad, jacrev, vjp

from ._checks import check_batch, check_like, check_params, checked_loss, reference_tensor
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
    batch = check_batch(batch, "batch", reference_tensor(params))
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
    batch = check_batch(batch, "batch", reference_tensor(params))
    return _hessian(checked_loss(loss_fn), tree_detach(params), batch)


def mse_hessian_parts(
    model_fn: ModelFn, params: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Split the Hessian of ``L = ½ Σ_j ‖f(x_j; θ) − y_j‖²`` into Gauss–Newton and residual parts.

    .. math::

        ∇²L = \underbrace{Σ_j J_jᵀ J_j}_{\text{Gauss–Newton, PSD}}
            + \underbrace{Σ_j Σ_o (f_o(x_j) − y_{jo})\, ∇²_θ f_o(x_j)}_{\text{residual-weighted model Hessian}}

    with ``J_j = ∂f(x_j)/∂θ`` of shape (O, P). The residual is taken as ``f − y``; written with
    ``y − f`` the second term carries a minus sign. Both parts are (P, P); the O×O matrix that
    sits between ``J_jᵀ`` and ``J_j`` is the Hessian of the loss in the *outputs*, here the identity.

    Args:
        model_fn: ``model_fn(params, x)`` returning predictions of shape (N,) or (N, O).
        params: the point θ.
        x: inputs, N rows.
        y: targets with exactly the shape of ``model_fn(params, x)`` (no broadcasting).

    Returns:
        ``(gauss_newton, residual)``, each (P, P), summing to ``∇²L``.

    Example:
        >>> line = lambda p, x: p["w"] * x[:, 0]   # linear in θ: the residual part vanishes
        >>> gn, r = mse_hessian_parts(line, {"w": torch.tensor(2.0)}, torch.ones(3, 1), torch.zeros(3))
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
