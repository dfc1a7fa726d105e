"""Long inner loops: MAML's reverse pass by every route — unrolled, rebuilt per step from stored
iterates (hvp), rebuilt per segment from √k of them (checkpointed) — gives one meta-gradient, on
the MLP and on a conv net with BatchNorm, on every backend that takes the route; truncation's bias
is its closed form on the quadratic family."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, assert_tree_close, per_task_reference, random_mlp_problem

import mamlkit as mk
from mamlkit._cli import main
from mamlkit.tasks import conv_net, quadratic_hessian, quadratic_loss, sample_quadratic_tasks
from mamlkit.train import load_checkpoint

MSE = mk.make_mse_loss(mk.mlp)
TANH = mk.make_mse_loss(lambda p, x: mk.mlp(p, x, "tanh"))
TOL = {"rtol": 1e-11, "atol": 1e-13}
ROUTES = ("unroll", "hvp", "checkpointed", "auto")


@pytest.mark.parametrize("steps", [1, 3, 7, 12])
@pytest.mark.parametrize("loss", [MSE, TANH], ids=["relu", "tanh"])
def test_every_route_is_the_unrolled_autodiff_on_the_mlp(steps, loss):
    params, support, query = random_mlp_problem((1, 6, 4, 1), tasks=3, seed=steps)
    reference, _ = per_task_reference(
        "maml", loss, params, support, query, lr=0.05, steps=steps
    )  # maml_grad
    for reverse in ROUTES:
        grads, _ = mk.meta_batch_grad(
            "maml",
            loss,
            params,
            support,
            query,
            lr=0.05,
            steps=steps,
            backend="vmap",
            reverse=reverse,
        )
        assert_tree_close(grads, reference, **TOL)


@pytest.mark.parametrize("reverse", ["unroll", "hvp", "auto"])
@pytest.mark.parametrize("truncate", [None, 2])
def test_the_fused_kernels_take_the_unroll_and_hvp_routes(reverse, truncate):
    params, support, query = random_mlp_problem((2, 5, 3, 1), tasks=3, seed=1)
    kw = {"lr": 0.05, "steps": 5, "reverse": reverse, "truncate": truncate}
    fused, losses = mk.meta_batch_grad("maml", MSE, params, support, query, backend="fused", **kw)
    vmap, vlosses = mk.meta_batch_grad("maml", MSE, params, support, query, backend="vmap", **kw)
    assert_tree_close(fused, vmap, **TOL)
    torch.testing.assert_close(losses, vlosses)


def test_a_backend_that_cannot_take_a_route_says_why():
    params, support, query = random_mlp_problem((1, 4, 1))
    with pytest.raises(ValueError, match="the fused kernels keep every inner step's weights"):
        mk.meta_batch_grad(
            "maml", MSE, params, support, query, lr=0.1, backend="fused", reverse="checkpointed"
        )
    grads, _ = mk.meta_batch_grad(
        "maml", MSE, params, support, query, lr=0.1, reverse="checkpointed"
    )
    assert set(grads) == set(params)  # "auto" chose vmap, which takes it


@pytest.mark.parametrize("steps", [2, 5])
def test_every_route_through_a_conv_net_with_batch_norm(steps):
    torch.manual_seed(0)
    params, model_fn = mk.from_module(conv_net(3, 4, seed=0).double())
    loss = mk.make_cross_entropy_loss(model_fn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 1, 28, 28, generator=g, dtype=F64)
    y = torch.arange(3).repeat(2, 2)
    support, query = (x[:, :3], y[:, :3]), (x[:, 3:], y[:, 3:])
    reference, _ = per_task_reference("maml", loss, params, support, query, lr=0.1, steps=steps)
    for reverse in ROUTES:
        grads, _ = mk.meta_batch_grad(
            "maml", loss, params, support, query, lr=0.1, steps=steps, reverse=reverse
        )
        assert_tree_close(grads, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_truncation_drops_exactly_the_earlier_jacobians_on_the_quadratic_family(m):
    """For a quadratic the inner Jacobian is the constant J = I − αH, so the exact meta-gradient is
    Jᵏ∇L_q(θ_k) and the one truncated to the last m steps is Jᵐ∇L_q(θ_k): the bias is
    (Jᵏ − Jᵐ)∇L_q(θ_k), which shrinks like (1 − αμ)ᵐ along each eigenvalue μ of H."""
    k, alpha = 8, 0.1
    t = sample_quadratic_tasks(1, generator=torch.Generator().manual_seed(0), dtype=F64)
    params = {"x": torch.tensor([0.7, -0.2], dtype=F64)}
    s, q = (t.support[0][0], t.support[1][0]), (t.query[0][0], t.query[1][0])
    h = quadratic_hessian(params, s)
    j = torch.eye(2, dtype=F64) - alpha * h
    theta_k = mk.adapt(quadratic_loss, params, s, lr=alpha, steps=k)
    query_grad = torch.func.grad(quadratic_loss)(theta_k, q)["x"]
    exact, _ = mk.meta_batch_grad(
        "maml", quadratic_loss, params, t.support, t.query, lr=alpha, steps=k
    )
    truncated, _ = mk.meta_batch_grad(
        "maml", quadratic_loss, params, t.support, t.query, lr=alpha, steps=k, truncate=m
    )
    torch.testing.assert_close(exact["x"], torch.linalg.matrix_power(j, k) @ query_grad)
    torch.testing.assert_close(
        exact["x"] - truncated["x"],
        (torch.linalg.matrix_power(j, k) - torch.linalg.matrix_power(j, m)) @ query_grad,
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"reverse": "sideways"}, "reverse must be one of"),
        ({"truncate": 0}, "truncate must be >= 1"),
        ({"truncate": 1.5}, "truncate must be an int"),
    ],
)
def test_bad_routes_are_refused_naming_the_argument(change, match):
    params, support, query = random_mlp_problem((1, 4, 1))
    with pytest.raises((ValueError, TypeError), match=match):
        mk.meta_batch_grad("maml", MSE, params, support, query, lr=0.1, **change)
    with pytest.raises(TypeError, match="takes no keyword"):
        mk.meta_batch_grad("fomaml", MSE, params, support, query, lr=0.1, reverse="hvp")


def test_training_and_the_command_line_take_the_route(tmp_path):
    argv = [
        "train",
        "--sizes",
        "1",
        "8",
        "1",
        "--iterations",
        "4",
        "--steps",
        "12",
        "--no-progress",
    ]
    assert main([*argv, "--reverse", "checkpointed", "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--reverse", "unroll", "--out", str(tmp_path / "b")]) == 0
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.config["hypers"]["reverse"] == "checkpointed" and a.config["backend"] == "vmap"
    assert b.config["backend"] == "fused"
    torch.testing.assert_close(a.history, b.history, rtol=1e-5, atol=1e-7)
