"""The hand-written batched fast path against per-task references.

References: per-task loops of ``maml_grad``, ``fomaml_grad``, ``reptile_grad`` and
``imaml_grad`` (autodiff through ``torch.func``), ``meta_batch_grad`` (vmap), float64 central
finite differences of the meta-objective, and for iMAML a dense solve with ``mamlkit.hessian``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from mamlkit import (
    adapt,
    flatten_params,
    fomaml_grad,
    hessian,
    imaml,
    imaml_grad,
    init_mlp,
    make_mse_loss,
    maml_grad,
    mlp,
    reptile_grad,
    unflatten_params,
)
from mamlkit._fast import fast_meta_batch_grad, supports_fast_path
from mamlkit._metabatch import _vmap_meta_batch_grad


def vmap_meta_batch_grad(method, loss_fn, params, support, query, **kw):
    """The general (vmap) path of ``meta_batch_grad``, which the fast path must equal."""
    return _vmap_meta_batch_grad(method, loss_fn, dict(params), support, query, **kw)

F64 = torch.float64
METHODS = ("maml", "fomaml", "reptile", "imaml")
SIZES = ((1, 40, 40, 1), (2, 5, 3, 4, 2))
LR, LAM, CG_STEPS = 0.05, 2.0, 4
N_TASKS, N_SUPPORT, N_QUERY = 3, 6, 5  # support and query sizes differ on purpose


def _model(activation: str):
    return mlp if activation == "relu" else functools.partial(mlp, activation=activation)


def _problem(sizes, seed=0, dtype=F64, tasks=N_TASKS, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=F64) * 4 - 2).to(dtype=dtype, device=device)

    params = init_mlp(sizes, seed=seed, dtype=dtype, device=device)
    support = (rand(tasks, N_SUPPORT, sizes[0]), rand(tasks, N_SUPPORT, sizes[-1]))
    query = (rand(tasks, N_QUERY, sizes[0]), rand(tasks, N_QUERY, sizes[-1]))
    return params, support, query


def _per_task(method, loss, params, support, query, steps):
    """The task mean of the per-task estimator, and each task's query loss, by a Python loop."""
    grads, losses = [], []
    for t in range(support[0].shape[0]):
        s, q = (support[0][t], support[1][t]), (query[0][t], query[1][t])
        if method == "maml":
            g = maml_grad(loss, params, s, q, lr=LR, steps=steps)
        elif method == "fomaml":
            g = fomaml_grad(loss, params, s, q, lr=LR, steps=steps)
        elif method == "reptile":
            g = reptile_grad(loss, params, s, lr=LR, steps=steps)
        else:
            g = imaml_grad(loss, params, s, q, lam=LAM, lr=LR, steps=steps, cg_steps=CG_STEPS)
        if method == "imaml":
            adapted = imaml(loss, params, s, q, lam=LAM, lr=LR, steps=steps, cg_steps=CG_STEPS).phi
        else:
            adapted = adapt(loss, params, s, lr=LR, steps=steps)
        grads.append(g)
        losses.append(loss(adapted, q))
    mean = {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}
    return mean, torch.stack(losses)


def _fast(method, loss, params, support, query, steps, **kw):
    return fast_meta_batch_grad(
        method, loss, params, support, query, lr=LR, steps=steps, lam=LAM, cg_steps=CG_STEPS, **kw
    )


def _assert_tree_close(actual, expected, **tol):
    assert list(actual) == list(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol)


# ------------------------------------------------------------------------- against the engines


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", (1, 2, 5))
@pytest.mark.parametrize("activation", ("relu", "tanh"))
@pytest.mark.parametrize("sizes", SIZES)
def test_matches_per_task_loop_float64(method, steps, activation, sizes):
    loss = make_mse_loss(_model(activation))
    params, support, query = _problem(sizes, seed=steps)
    grads, losses = _fast(method, loss, params, support, query, steps)
    ref_grads, ref_losses = _per_task(method, loss, params, support, query, steps)
    _assert_tree_close(grads, ref_grads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "half_sum"))
@pytest.mark.parametrize("activation", ("relu", "tanh"))
def test_matches_meta_batch_grad_every_reduction(method, reduction, activation):
    loss = make_mse_loss(_model(activation), reduction=reduction)
    params, support, query = _problem((3, 6, 4, 2), seed=7)
    kw = dict(lr=0.01, steps=2, lam=LAM, cg_steps=CG_STEPS)
    grads, losses = fast_meta_batch_grad(method, loss, params, support, query, **kw)
    ref_grads, ref_losses = vmap_meta_batch_grad(method, loss, params, support, query, **kw)
    _assert_tree_close(grads, ref_grads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ("maml", "fomaml"))
def test_zero_steps_is_the_query_gradient(method):
    loss = make_mse_loss(mlp)
    params, support, query = _problem((1, 8, 1))
    grads, losses = _fast(method, loss, params, support, query, 0)
    ref = [torch.func.grad(loss)(params, (query[0][t], query[1][t])) for t in range(N_TASKS)]
    _assert_tree_close(
        grads, {k: sum(r[k] for r in ref) / N_TASKS for k in params}, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        losses, torch.stack([loss(params, (query[0][t], query[1][t])) for t in range(N_TASKS)])
    )


# ------------------------------------------------------------------- independent references


@pytest.mark.parametrize("activation", ("relu", "tanh"))
@pytest.mark.parametrize("steps", (1, 3))
def test_maml_against_central_finite_differences(activation, steps):
    """d/dθ of (1/T) Σ_t L_q^t(θ_k^t(θ)), by central differences on every parameter."""
    loss = make_mse_loss(_model(activation))
    params, support, query = _problem((2, 3, 2, 1), seed=11)
    grads, _ = fast_meta_batch_grad("maml", loss, params, support, query, lr=0.1, steps=steps)

    def meta_objective(vector: Tensor) -> float:
        p = unflatten_params(vector, params)
        total = 0.0
        for t in range(N_TASKS):
            adapted = adapt(loss, p, (support[0][t], support[1][t]), lr=0.1, steps=steps)
            total += float(loss(adapted, (query[0][t], query[1][t])))
        return total / N_TASKS

    theta, eps = flatten_params(params), 1e-6
    fd = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        fd[i] = (meta_objective(theta + e) - meta_objective(theta - e)) / (2 * eps)
    torch.testing.assert_close(flatten_params(grads), fd, rtol=1e-6, atol=1e-8)


def test_fomaml_is_maml_without_the_hessian_term():
    """One step: g_maml − g_fomaml = −α (1/T) Σ_t H_s^t(θ) ∇L_q^t(θ′), H from a dense Hessian."""
    loss = make_mse_loss(functools.partial(mlp, activation="tanh"))
    params, support, query = _problem((1, 4, 3, 1), seed=3)
    g_maml, _ = fast_meta_batch_grad("maml", loss, params, support, query, lr=LR)
    g_fo, _ = fast_meta_batch_grad("fomaml", loss, params, support, query, lr=LR)
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
    params, support, query = _problem((1, 6, 1), seed=5)
    grads, _ = fast_meta_batch_grad("reptile", loss, params, support, query, lr=LR, steps=3)
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
    params, support, query = _problem((1, 3, 1), seed=2)
    n = flatten_params(params).numel()
    grads, _ = fast_meta_batch_grad(
        "imaml", loss, params, support, query, lr=0.1, steps=5, lam=3.0, cg_steps=n
    )
    expected = torch.zeros(n, dtype=F64)
    for t in range(N_TASKS):
        s, q = (support[0][t], support[1][t]), (query[0][t], query[1][t])
        phi = imaml(loss, params, s, q, lam=3.0, lr=0.1, steps=5, cg_steps=1).phi
        a = torch.eye(n, dtype=F64) + hessian(loss, phi, s) / 3.0
        expected += torch.linalg.solve(a, flatten_params(torch.func.grad(loss)(phi, q))) / N_TASKS
    torch.testing.assert_close(flatten_params(grads), expected, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------------ dtypes, devices, API


@pytest.mark.parametrize("method", METHODS)
def test_float32_in_float32_out_and_close_to_float64(method):
    loss = make_mse_loss(mlp)
    p64, s64, q64 = _problem((1, 40, 40, 1), seed=1, tasks=25)
    p32 = {k: v.float() for k, v in p64.items()}
    s32, q32 = tuple(t.float() for t in s64), tuple(t.float() for t in q64)
    g32, l32 = _fast(method, loss, p32, s32, q32, 2)
    g64, l64 = _fast(method, loss, p64, s64, q64, 2)
    assert all(v.dtype == torch.float32 for v in g32.values()) and l32.dtype == torch.float32
    _assert_tree_close({k: v.double() for k, v in g32.items()}, g64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_device_is_preserved(device, method):
    """On the meta device any hidden .cpu() or host tensor would fail or land elsewhere."""
    loss = make_mse_loss(mlp)
    params, support, query = _problem((1, 5, 4, 1), dtype=torch.float32, device=device)
    grads, losses = _fast(method, loss, params, support, query, 2)
    assert {v.device.type for v in grads.values()} == {torch.device(device).type}
    assert losses.device.type == torch.device(device).type and losses.shape == (N_TASKS,)
    assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in params.items()}


@pytest.mark.parametrize("method", METHODS)
def test_no_mutation_no_history(method):
    loss = make_mse_loss(functools.partial(mlp, activation="tanh"))
    params, support, query = _problem((1, 6, 1))
    params = {k: v.clone().requires_grad_(k.startswith("w")) for k, v in params.items()}
    keep = {k: v.detach().clone() for k, v in params.items()}
    keep_data = [t.clone() for t in (*support, *query)]
    view = dict(params)
    grads, losses = _fast(method, loss, view, support, query, 2)
    assert view == params and list(view) == list(keep)
    for k, v in params.items():
        assert torch.equal(v.detach(), keep[k]) and v.grad is None
        assert v.requires_grad == k.startswith("w")
    for t, kept in zip((*support, *query), keep_data):
        assert torch.equal(t, kept)
    assert not losses.requires_grad and all(not g.requires_grad for g in grads.values())
    for g in grads.values():
        g.add_(1.0)  # the result owns its memory
    assert all(torch.equal(v.detach(), keep[k]) for k, v in params.items())


def test_key_order_and_extra_point_dimensions():
    """Grads follow the params' key order; x (T, N, M, in) is N·M points, as the slow path."""
    loss = make_mse_loss(mlp)
    params, _, _ = _problem((2, 5, 3))
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
    grads, losses = fast_meta_batch_grad("maml", loss, shuffled, support, query, lr=LR, steps=2)
    ref, ref_losses = vmap_meta_batch_grad("maml", loss, shuffled, support, query, lr=LR, steps=2)
    assert list(grads) == list(shuffled)
    _assert_tree_close(grads, ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(losses, ref_losses)


def test_supports_fast_path():
    params = init_mlp((1, 8, 8, 1))
    assert supports_fast_path(make_mse_loss(mlp), params)
    for reduction in ("sum", "half_sum"):
        assert supports_fast_path(make_mse_loss(mlp, reduction=reduction), params)
    assert supports_fast_path(make_mse_loss(functools.partial(mlp, activation="tanh")), params)
    assert supports_fast_path(make_mse_loss(functools.partial(mlp)), params)
    assert supports_fast_path(make_mse_loss(mlp), {k: params[k] for k in reversed(params)})
    not_supported = [
        (lambda p, b: (mlp(p, b[0]) - b[1]).pow(2).mean(), params),  # same loss, opaque
        (make_mse_loss(lambda p, x: mlp(p, x)), params),
        (make_mse_loss(functools.partial(mlp, activation="gelu")), params),
        (make_mse_loss(functools.partial(mlp, params)), params),
        (make_mse_loss(mlp), {k: v for k, v in params.items() if k != "b1"}),
        (make_mse_loss(mlp), {**params, "w3": torch.zeros(1, 1)}),
        (make_mse_loss(mlp), {**params, "w1": torch.zeros(8, 7)}),
        (make_mse_loss(mlp), {**params, "b0": torch.zeros(8, 1)}),
        (make_mse_loss(mlp), {**params, "b2": params["b2"].double()}),
        (make_mse_loss(mlp), {k: v.long() for k, v in params.items()}),
        (make_mse_loss(mlp), {**params, "b2": params["b2"].to("meta")}),
        (make_mse_loss(mlp), {}),
        (make_mse_loss(mlp), list(params.values())),
        (make_mse_loss(mlp), {0: params["w0"], 1: params["b0"]}),
    ]
    for loss_fn, p in not_supported:
        assert supports_fast_path(loss_fn, p) is False


def _bad(**change):
    params, support, query = _problem((1, 4, 1), dtype=torch.float32)
    args = dict(
        method="maml", loss_fn=make_mse_loss(mlp), params=params, support=support, query=query
    )
    kw = dict(lr=0.1, steps=1, lam=1.0, cg_steps=2)
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    return args, kw


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(method="sgd"), ValueError, "method"),
        (dict(loss_fn=lambda p, b: p["w0"].sum()), ValueError, "supports_fast_path"),
        (dict(params=[1.0]), TypeError, "params"),
        (dict(support=(torch.zeros(3, 6, 2), torch.zeros(3, 6, 1))), ValueError, "support x"),
        (dict(query=(torch.zeros(3, 5, 1), torch.zeros(3, 5))), ValueError, "query y"),
        (dict(query=(torch.zeros(3, 5, 1), torch.zeros(3, 4, 1))), ValueError, "query y"),
        (dict(query=(torch.zeros(2, 5, 1), torch.zeros(2, 5, 1))), ValueError, "tasks"),
        (dict(query=(torch.zeros(3, 5, 1, dtype=F64), torch.zeros(3, 5, 1))), TypeError, "dtype"),
        (dict(query=torch.zeros(3, 5, 1)), TypeError, "query"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(steps=1.5), TypeError, "steps"),
        (dict(method="reptile", steps=0), ValueError, "steps"),
        (dict(method="imaml", steps=0), ValueError, "steps"),
        (dict(method="imaml", lam=0.0), ValueError, "lam"),
        (dict(method="imaml", cg_steps=0), ValueError, "cg_steps"),
    ],
)
def test_bad_input_is_refused_by_name(change, error, match):
    args, kw = _bad(**change)
    with pytest.raises(error, match=match):
        fast_meta_batch_grad(**args, **kw)


def test_lam_and_cg_steps_are_ignored_outside_imaml():
    args, kw = _bad(lam=-1.0, cg_steps=0)
    fast_meta_batch_grad(**args, **kw)  # as meta_batch_grad: no error for MAML


def test_fast_adam_step_is_torch_optim_adam():
    """Ten steps against torch.optim.Adam on leaf tensors (and the inputs stay unchanged)."""
    from mamlkit._fast import fast_adam_step

    params = init_mlp((1, 5, 1), dtype=F64)
    leaves = [v.clone().requires_grad_() for v in params.values()]
    opt = torch.optim.Adam(leaves, lr=0.01)
    state = {"t": 0, "m": {k: torch.zeros_like(v) for k, v in params.items()}}
    state["v"] = {k: torch.zeros_like(v) for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    theta = params
    for _ in range(10):
        grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
        old, kept = theta, {k: v.clone() for k, v in theta.items()}
        kept_m = {k: v.clone() for k, v in state["m"].items()}
        for leaf, gk in zip(leaves, grads.values()):
            leaf.grad = gk.clone()
        opt.step()
        old_m = state["m"]
        theta, state = fast_adam_step(theta, grads, state, 0.01)
        assert all(torch.equal(old[k], kept[k]) and torch.equal(old_m[k], kept_m[k]) for k in kept)
    for v, leaf in zip(theta.values(), leaves):
        torch.testing.assert_close(v, leaf.detach(), rtol=1e-12, atol=1e-14)
    assert state["t"] == 10 and list(theta) == list(params)


def test_benchmark_implementations_compute_the_exact_meta_gradient():
    """benchmarks/bench_meta.py asserts this before timing; keep it true between runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_meta.py"
    spec = importlib.util.spec_from_file_location("bench_meta", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = [(bench.FAST, s) for s in bench.SETTINGS]
    cases += [
        (impl, s) for impl in (bench.BASELINE, "torch.func vmap") for s in bench.PEER_SETTINGS
    ]
    errors = bench.check_gradients(cases)
    assert len(errors) == len(cases) and max(errors.values()) < 1e-9


def test_imaml_zero_right_hand_side_stays_finite():
    """θ = 0 and y = 0: φ = θ, ∇L_q(φ) = 0, so CG meets pᵀAp = 0 and ‖r‖ = 0 at once; those
    steps must be no-ops (zero gradient), not 0/0 = nan (as mamlkit.imaml with cg_tol=0)."""
    loss = make_mse_loss(mlp)
    params = {k: torch.zeros_like(v) for k, v in init_mlp((1, 4, 1), dtype=F64).items()}
    x = torch.linspace(-1, 1, N_TASKS * 5, dtype=F64).reshape(N_TASKS, 5, 1)
    batch = (x, torch.zeros_like(x))
    grads, losses = fast_meta_batch_grad("imaml", loss, params, batch, batch, lr=0.1, steps=2)
    ref, _ = vmap_meta_batch_grad("imaml", loss, params, batch, batch, lr=0.1, steps=2)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
    _assert_tree_close(grads, ref)
    assert torch.equal(losses, torch.zeros(N_TASKS, dtype=F64))
