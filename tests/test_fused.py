"""The hand-written fused kernels against independent references: float64 central finite
differences of the meta-objective, the Hessian term from a dense ``mamlkit.hessian``, Reptile's
displacement, and iMAML's dense linear solve. (Equality with the per-task engines and the vmap
backend, for every method, is in ``test_metabatch.py``.)"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import F64, central_difference, random_mlp_problem
from torch import Tensor

from mamlkit import (
    adapt,
    flatten_params,
    hessian,
    imaml,
    make_mse_loss,
    meta_batch_grad,
    mlp,
    unflatten_params,
)

LR = 0.05
N_TASKS = 3


def _model(activation: str):
    return mlp if activation == "relu" else functools.partial(mlp, activation=activation)


def fused(method, loss, params, support, query, **kw):
    return meta_batch_grad(method, loss, params, support, query, backend="fused", **kw)


# ------------------------------------------------------------------- independent references


@pytest.mark.parametrize("activation", ("relu", "tanh"))
@pytest.mark.parametrize("steps", (1, 3))
def test_maml_against_central_finite_differences(activation, steps):
    """d/dθ of (1/T) Σ_t L_q^t(θ_k^t(θ)), by central differences on every parameter."""
    loss = make_mse_loss(_model(activation))
    params, support, query = random_mlp_problem((2, 3, 2, 1), seed=11)
    grads, _ = fused("maml", loss, params, support, query, lr=0.1, steps=steps)

    def meta_objective(vector: Tensor) -> float:
        p = unflatten_params(vector, params)
        total = 0.0
        for t in range(N_TASKS):
            adapted = adapt(loss, p, (support[0][t], support[1][t]), lr=0.1, steps=steps)
            total += float(loss(adapted, (query[0][t], query[1][t])))
        return total / N_TASKS

    fd = central_difference(
        lambda v: torch.tensor(meta_objective(v), dtype=F64), flatten_params(params)
    )
    torch.testing.assert_close(flatten_params(grads), fd, rtol=1e-6, atol=1e-8)


def test_fomaml_is_maml_without_the_hessian_term():
    """One step: g_maml − g_fomaml = −α (1/T) Σ_t H_s^t(θ) ∇L_q^t(θ′), H from a dense Hessian."""
    loss = make_mse_loss(functools.partial(mlp, activation="tanh"))
    params, support, query = random_mlp_problem((1, 4, 3, 1), seed=3)
    g_maml, _ = fused("maml", loss, params, support, query, lr=LR)
    g_fo, _ = fused("fomaml", loss, params, support, query, lr=LR)
    expected = torch.zeros_like(flatten_params(params))
    for t in range(N_TASKS):
        s, q = (support[0][t], support[1][t]), (query[0][t], query[1][t])
        theta1 = adapt(loss, params, s, lr=LR)
        v = flatten_params(torch.func.grad(loss)(theta1, q))
        expected -= LR * hessian(loss, params, s) @ v / N_TASKS
    torch.testing.assert_close(
        flatten_params(g_maml) - flatten_params(g_fo), expected, rtol=1e-9, atol=1e-13
    )


def test_reptile_is_the_displacement_over_alpha():
    loss = make_mse_loss(mlp)
    params, support, query = random_mlp_problem((1, 6, 1), seed=5)
    grads, _ = fused("reptile", loss, params, support, query, lr=LR, steps=3)
    theta = flatten_params(params)
    moved = [
        flatten_params(adapt(loss, params, (support[0][t], support[1][t]), lr=LR, steps=3))
        for t in range(N_TASKS)
    ]
    expected = sum((theta - m) / LR for m in moved) / N_TASKS
    torch.testing.assert_close(flatten_params(grads), expected, rtol=1e-9, atol=1e-12)


def test_imaml_against_a_dense_solve():
    """With as many CG iterations as parameters, x = (I + H_s(φ)/λ)⁻¹ ∇L_q(φ) per task."""
    loss = make_mse_loss(functools.partial(mlp, activation="tanh"))
    params, support, query = random_mlp_problem((1, 3, 1), seed=2)
    n = flatten_params(params).numel()
    grads, _ = fused("imaml", loss, params, support, query, lr=0.1, steps=5, lam=3.0, cg_steps=n)
    expected = torch.zeros(n, dtype=F64)
    for t in range(N_TASKS):
        s, q = (support[0][t], support[1][t]), (query[0][t], query[1][t])
        phi = imaml(loss, params, s, q, lam=3.0, lr=0.1, steps=5, cg_steps=1).phi
        a = torch.eye(n, dtype=F64) + hessian(loss, phi, s) / 3.0
        expected += torch.linalg.solve(a, flatten_params(torch.func.grad(loss)(phi, q))) / N_TASKS
    torch.testing.assert_close(flatten_params(grads), expected, rtol=1e-7, atol=1e-10)
