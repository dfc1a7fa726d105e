"""meta_batch_grad: every method and backend against the per-task engines (float64), the method
table, the backend rules, and the one error contract shared by every backend."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    F64,
    assert_tree_close,
    meta_parameters,
    per_task_reference,
    random_mlp_problem,
)

import mamlkit as mk
from mamlkit import METHODS, meta_batch_grad
from mamlkit._fused import KERNELS
from mamlkit._metabatch import plan_meta_batch
from mamlkit.tasks import quadratic_loss, sample_quadratic_tasks, sample_sinusoid_tasks

MSE = mk.make_mse_loss(mk.mlp)
TANH = mk.make_mse_loss(functools.partial(mk.mlp, activation="tanh"))
OPAQUE = mk.make_mse_loss(lambda p, x: mk.mlp(p, x))  # the same function, not recognisable
HYPERS = {"imaml": {"lam": 2.0, "cg_steps": 4}}
TOL = {"rtol": 1e-9, "atol": 1e-11}


WITH_KERNEL = [m for m in METHODS if m in KERNELS]  # the rest run on vmap (the fallback)


def _steps(method: str, steps: int) -> int:
    return max(steps, METHODS[method].min_steps)


def _combinations(backends: list[str]) -> list[tuple[str, str]]:
    """Every (method, backend) that can run: "fused" only for the methods with a kernel."""
    return [(m, b) for m in METHODS for b in backends if b != "fused" or m in KERNELS]


def _quadratic(tasks=4, seed=0):
    t = sample_quadratic_tasks(tasks, generator=torch.Generator().manual_seed(seed), dtype=F64)
    # the quadratic family has no points dimension: C (T, 2, 2) and g (T, 2) are one "batch"
    return {"x": torch.tensor([0.7, -0.2], dtype=F64)}, t.support, (t.query[0], t.query[1] + 0.3)


# ------------------------------------------------------------------ every method, every backend


@pytest.mark.parametrize(("method", "backend"), _combinations(["vmap", "fused", "auto"]))
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("loss", [MSE, TANH], ids=["relu", "tanh"])
def test_mlp_matches_the_per_task_engines(method, steps, backend, loss):
    steps = _steps(method, steps)
    params, support, query = random_mlp_problem((2, 5, 3, 1), seed=steps)
    params = meta_parameters(method, params, lr=0.05, steps=steps)
    kw = HYPERS.get(method, {})
    grads, losses = meta_batch_grad(
        method, loss, params, support, query, lr=0.05, steps=steps, backend=backend, **kw
    )
    ref, ref_losses = per_task_reference(
        method, loss, params, support, query, lr=0.05, steps=steps, **kw
    )
    assert_tree_close(grads, ref, **TOL)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "pretrained"])
def test_any_loss_through_vmap_matches_the_per_task_engines(method):
    """(The quadratic family has no points to pool, so the joint-training baseline is not defined
    on it.)"""
    params, support, query = _quadratic()
    steps = _steps(method, 2)
    kw = HYPERS.get(method, {})
    if method == "anil":  # one parameter: the head is all of it
        kw = {"head": ["x"]}
    params = meta_parameters(method, params, lr=0.2, steps=steps)
    grads, losses = meta_batch_grad(
        method, quadratic_loss, params, support, query, lr=0.2, steps=steps, **kw
    )
    ref, ref_losses = per_task_reference(
        method, quadratic_loss, params, support, query, lr=0.2, steps=steps, **kw
    )
    assert_tree_close(grads, ref, **TOL)
    torch.testing.assert_close(losses, ref_losses)


@pytest.mark.parametrize("method", ["maml"])
def test_compiled_fused_matches_the_per_task_engines(method, tmp_path, monkeypatch):
    """Ahead-of-time compiled kernels. A cold compile takes tens of seconds, so `make test` holds
    one method to it (MAML, whose kernel holds every contraction the others use);
    `make test-compiled` runs tests/test_compiled.py, every method on both compiled backends."""
    monkeypatch.setenv("MAMLKIT_CACHE_DIR", str(tmp_path))
    params, support, query = random_mlp_problem((1, 4, 3, 1), seed=1)
    grads, losses = meta_batch_grad(
        method, MSE, params, support, query, lr=0.05, steps=2, backend="compiled"
    )
    ref, ref_losses = per_task_reference(method, MSE, params, support, query, lr=0.05, steps=2)
    assert_tree_close(grads, ref, **TOL)
    torch.testing.assert_close(losses, ref_losses)
    assert len(list(tmp_path.glob("fused-*.pt2"))) == 1  # compiled once, cached on disk


@pytest.mark.parametrize("method", WITH_KERNEL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "half_sum"])
def test_fused_equals_vmap_for_every_reduction_and_deep_nets(method, reduction):
    loss = mk.make_mse_loss(functools.partial(mk.mlp, activation="tanh"), reduction=reduction)
    params, support, query = random_mlp_problem((3, 6, 4, 5, 2), seed=7)
    kw = {"lr": 0.01, "steps": _steps(method, 2), **HYPERS.get(method, {})}
    a = meta_batch_grad(method, loss, params, support, query, backend="fused", **kw)
    b = meta_batch_grad(method, loss, params, support, query, backend="vmap", **kw)
    assert_tree_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1])


def test_a_method_without_a_kernel_runs_on_vmap_and_fused_says_why_not():
    assert set(KERNELS) <= set(METHODS)
    params, support, query = random_mlp_problem((1, 5, 1))
    for method in set(METHODS) - set(KERNELS):
        meta = meta_parameters(method, params, lr=0.1, steps=1)
        plan = plan_meta_batch(method, MSE, meta, support, query, lr=0.1, steps=1)
        assert plan.backend.name == "vmap"
        with pytest.raises(ValueError, match=f"no fused kernel for method '{method}'"):
            meta_batch_grad(method, MSE, meta, support, query, lr=0.1, backend="fused")


def test_the_result_is_the_mean_over_tasks_not_the_sum():
    params, support, query = random_mlp_problem((1, 8, 1), tasks=3)
    one, _ = meta_batch_grad("maml", MSE, params, support, query, lr=0.01)
    tripled = tuple(torch.cat([t] * 3) for t in support), tuple(torch.cat([t] * 3) for t in query)
    three, _ = meta_batch_grad("maml", MSE, params, *tripled, lr=0.01)
    assert_tree_close(one, three)


def test_key_order_and_extra_point_dimensions():
    """Grads follow the caller's key order; x (T, N, M, in) counts as N·M points per task."""
    params, _, _ = random_mlp_problem((2, 5, 3))
    shuffled = {k: params[k] for k in ("b1", "w0", "w1", "b0")}
    g = torch.Generator().manual_seed(9)
    support = (
        torch.randn(2, 3, 4, 2, generator=g, dtype=F64),
        torch.randn(2, 3, 4, 3, generator=g, dtype=F64),
    )
    query = (
        torch.randn(2, 5, 2, generator=g, dtype=F64),
        torch.randn(2, 5, 3, generator=g, dtype=F64),
    )
    fused, lf = meta_batch_grad(
        "maml", MSE, shuffled, support, query, lr=0.05, steps=2, backend="fused"
    )
    ref, lr_ = meta_batch_grad(
        "maml", MSE, shuffled, support, query, lr=0.05, steps=2, backend="vmap"
    )
    assert list(fused) == list(shuffled)
    assert_tree_close(fused, ref, **TOL)
    torch.testing.assert_close(lf, lr_)


@pytest.mark.parametrize("method", list(METHODS))
def test_float32_in_float32_out_and_close_to_float64(method):
    p64, s64, q64 = random_mlp_problem((1, 40, 40, 1), seed=1, tasks=25)
    p64 = meta_parameters(method, p64, lr=0.01, steps=2)
    p32 = {k: v.float() for k, v in p64.items()}
    s32, q32 = tuple(t.float() for t in s64), tuple(t.float() for t in q64)
    kw = {"lr": 0.01, "steps": 2, **HYPERS.get(method, {})}
    backend = "fused" if method in KERNELS else "vmap"
    g32, l32 = meta_batch_grad(method, MSE, p32, s32, q32, backend=backend, **kw)
    g64, _ = meta_batch_grad(method, MSE, p64, s64, q64, backend=backend, **kw)
    assert all(v.dtype == torch.float32 for v in g32.values()) and l32.dtype == torch.float32
    assert_tree_close({k: v.double() for k, v in g32.items()}, g64, rtol=1e-4, atol=1e-5)


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", WITH_KERNEL)
def test_fused_keeps_the_device(device, method):
    """On the meta device any hidden .cpu() or host tensor would fail or land elsewhere."""
    params, support, query = random_mlp_problem((1, 5, 4, 1), dtype=torch.float32, device=device)
    grads, losses = meta_batch_grad(
        method,
        MSE,
        params,
        support,
        query,
        lr=0.1,
        steps=2,
        backend="fused",
        **HYPERS.get(method, {}),
    )
    assert {v.device.type for v in grads.values()} == {torch.device(device).type}
    assert losses.device.type == torch.device(device).type and losses.shape == (3,)


@pytest.mark.parametrize(("method", "backend"), _combinations(["vmap", "fused"]))
def test_no_mutation_no_history(method, backend):
    params, support, query = random_mlp_problem((1, 6, 1))
    params = meta_parameters(method, params, lr=0.1, steps=2)
    params = {k: v.clone().requires_grad_(k.startswith("w")) for k, v in params.items()}
    keep = {k: v.detach().clone() for k, v in params.items()}
    keep_data = [t.clone() for t in (*support, *query)]
    view = dict(params)
    grads, losses = meta_batch_grad(
        method,
        MSE,
        view,
        support,
        query,
        lr=0.1,
        steps=2,
        backend=backend,
        **HYPERS.get(method, {}),
    )
    assert view == params
    for k, v in params.items():
        assert (
            torch.equal(v.detach(), keep[k])
            and v.grad is None
            and v.requires_grad == k.startswith("w")
        )
    assert all(torch.equal(t, kept) for t, kept in zip((*support, *query), keep_data))
    assert not losses.requires_grad and all(not g.requires_grad for g in grads.values())
    for g in grads.values():
        g.add_(1.0)  # the result owns its memory
    assert all(torch.equal(v.detach(), keep[k]) for k, v in params.items())


def test_imaml_zero_right_hand_side_stays_finite():
    """θ = 0 and y = 0: ∇L_q(φ) = 0, so CG meets pᵀAp = 0 and ‖r‖ = 0 at once: no-op steps, a
    zero gradient, not 0/0 = nan (on both backends)."""
    params = {k: torch.zeros_like(v) for k, v in mk.init_mlp((1, 4, 1), dtype=F64).items()}
    x = torch.linspace(-1, 1, 15, dtype=F64).reshape(3, 5, 1)
    batch = (x, torch.zeros_like(x))
    for backend in ("fused", "vmap"):
        grads, losses = meta_batch_grad(
            "imaml", MSE, params, batch, batch, lr=0.1, steps=2, backend=backend
        )
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
        assert torch.equal(losses, torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------------- backends, the table


def _chosen(backend, loss, method="maml"):
    params, support, query = random_mlp_problem((1, 4, 1))
    return plan_meta_batch(
        method, loss, params, support, query, lr=0.1, steps=1, backend=backend
    ).backend.name


def test_backend_rules():
    assert _chosen("auto", MSE) == "fused"
    assert _chosen("auto", OPAQUE) == "vmap"
    assert _chosen("compiled", OPAQUE) == "vmap-compiled"
    assert _chosen("compiled", MSE) == "fused-compiled"
    assert _chosen("vmap", MSE) == "vmap"
    assert set(mk.BACKENDS) == {"vmap", "fused", "fused-compiled", "vmap-compiled"}
    with pytest.raises(ValueError, match="backend must be one of"):
        _chosen("gpu", MSE)


@pytest.mark.parametrize(
    ("loss", "params", "match"),
    [
        (OPAQUE, mk.init_mlp((1, 4, 1)), "model_fn is not mamlkit.mlp"),
        (
            lambda p, b: (mk.mlp(p, b[0]) - b[1]).pow(2).mean(),
            mk.init_mlp((1, 4, 1)),
            "make_mse_loss",
        ),
        (
            # the loss itself is checked first (one guarded evaluation when the plan is made)
            mk.make_mse_loss(functools.partial(mk.mlp, activation="gelu")),
            mk.init_mlp((1, 4, 1)),
            "activation must be one of",
        ),
        (MSE, {"w": torch.zeros(2, 1)}, "keys w0, b0"),
    ],
)
def test_fused_on_anything_else_is_a_value_error_that_says_why(loss, params, match):
    x = torch.zeros(2, 3, 1)
    with pytest.raises(ValueError, match=match):
        meta_batch_grad("maml", loss, params, (x, x), (x, x), lr=0.1, backend="fused")


def test_a_keyword_the_method_does_not_take_is_a_type_error():
    params, support, query = random_mlp_problem((1, 4, 1))
    for backend in ("vmap", "fused"):
        with pytest.raises(
            TypeError, match=r"method 'maml' takes no keyword argument\(s\) \['lam'\]"
        ):
            meta_batch_grad("maml", MSE, params, support, query, lr=0.1, lam="x", backend=backend)
    with pytest.raises(TypeError, match=r"takes no keyword argument\(s\) \['lamda'\]"):
        meta_batch_grad("imaml", MSE, params, support, query, lr=0.1, lamda=1.0)


def test_the_table_describes_every_method():
    for name, method in METHODS.items():
        assert method.name == name and method.summary
        assert method.resolve({}) == {h.name: h.default for h in method.hypers}
    assert [h.name for h in METHODS["imaml"].hypers] == ["lam", "cg_steps"]
    assert METHODS["reptile"].min_steps == METHODS["imaml"].min_steps == 1
    assert METHODS["maml"].second_order and not METHODS["fomaml"].second_order


def test_a_repeated_call_reuses_its_plan_and_any_other_is_checked_in_full():
    params, support, query = random_mlp_problem((1, 4, 1))
    kw = {"lr": 0.1, "steps": 1, "backend": "fused"}
    first = plan_meta_batch("maml", MSE, params, support, query, **kw)
    assert plan_meta_batch("maml", MSE, dict(params), support, query, **kw) is first
    assert plan_meta_batch("maml", MSE, params, support, query, **{**kw, "lr": 0.2}) is not first
    for backend in ("fused", "vmap"):
        meta_batch_grad("maml", MSE, params, support, query, lr=0.1, backend=backend)
        with pytest.raises(ValueError, match="same number of tasks"):
            meta_batch_grad(
                "maml", MSE, params, support, (query[0][:2], query[1][:2]), lr=0.1, backend=backend
            )
        with pytest.raises(TypeError, match="dtype of params"):
            meta_batch_grad(
                "maml", MSE, params, support, (query[0].float(), query[1]), lr=0.1, backend=backend
            )
        with pytest.raises(TypeError, match="lr must be a real number"):
            meta_batch_grad("maml", MSE, params, support, query, lr=True, backend=backend)
        with pytest.raises(ValueError, match="lr must be finite"):
            meta_batch_grad("maml", MSE, params, support, query, lr=float("nan"), backend=backend)


def test_sinusoid_sampler_feeds_the_fused_path():
    t = sample_sinusoid_tasks(4, k_support=5, generator=torch.Generator().manual_seed(0), dtype=F64)
    params = mk.init_mlp((1, 8, 8, 1), dtype=F64)
    a = meta_batch_grad("maml", MSE, params, t.support, t.query, lr=0.01, backend="fused")
    b = meta_batch_grad("maml", MSE, params, t.support, t.query, lr=0.01, backend="vmap")
    assert_tree_close(a[0], b[0], **TOL)
