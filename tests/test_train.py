"""meta_batch_grad against per-task loops, meta_train, checkpoints and evaluation."""

import copy
import json
import math

import pytest
import torch

import mamlkit
from mamlkit import (
    SinusoidFamily,
    TrainResult,
    adapt,
    evaluate,
    evaluate_tasks,
    fomaml_grad,
    imaml,
    imaml_grad,
    init_mlp,
    load_checkpoint,
    make_mse_loss,
    maml_grad,
    mean_ci95,
    meta_batch_grad,
    meta_train,
    mlp,
    quadratic_loss,
    reptile_grad,
    sample_quadratic_tasks,
    sample_sinusoid_tasks,
    save_checkpoint,
)
from mamlkit._fast import fast_adam_step

F64 = torch.float64
MSE = make_mse_loss(mlp)
TANH_MSE = make_mse_loss(lambda p, x: mlp(p, x, "tanh"))


def sinusoid_problem(tasks=4, k=5, seed=0):
    t = sample_sinusoid_tasks(
        tasks, k_support=k, k_query=k + 2, generator=torch.Generator().manual_seed(seed), dtype=F64
    )
    return init_mlp((1, 8, 8, 1), seed=seed, dtype=F64), t.support, t.query


def quadratic_problem(tasks=4, seed=0):
    t = sample_quadratic_tasks(tasks, generator=torch.Generator().manual_seed(seed), dtype=F64)
    g_query = t.query[1] + 0.3  # a different linear term on the query side
    return {"x": torch.tensor([0.7, -0.2], dtype=F64)}, t.support, (t.query[0], g_query)


def per_task(support, query, i):
    return (support[0][i], support[1][i]), (query[0][i], query[1][i])


def reference(method, loss, params, support, query, *, lr, steps, lam=1.0, cg_steps=5):
    """A plain Python loop over tasks with the single-task engines."""
    grads, losses = [], []
    for i in range(support[0].shape[0]):
        s, q = per_task(support, query, i)
        if method == "maml":
            g = maml_grad(loss, params, s, q, lr=lr, steps=steps)
        elif method == "fomaml":
            g = fomaml_grad(loss, params, s, q, lr=lr, steps=steps)
        elif method == "reptile":
            g = reptile_grad(loss, params, s, lr=lr, steps=steps)
        else:
            g = imaml_grad(loss, params, s, q, lam=lam, lr=lr, steps=steps, cg_steps=cg_steps)
            phi = imaml(loss, params, s, q, lam=lam, lr=lr, steps=steps, cg_steps=cg_steps).phi
        grads.append(g)
        adapted = phi if method == "imaml" else adapt(loss, params, s, lr=lr, steps=steps)
        losses.append(loss(adapted, q))
    mean = {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}
    return mean, torch.stack(losses)


# --- meta_batch_grad -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "imaml"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("problem", ["relu", "tanh", "quadratic"])
def test_meta_batch_grad_matches_a_loop_over_tasks(method, steps, problem):
    if problem == "quadratic":
        loss, (params, support, query), lr = quadratic_loss, quadratic_problem(), 0.2
    else:
        loss, (params, support, query), lr = (
            (MSE if problem == "relu" else TANH_MSE),
            sinusoid_problem(),
            0.05,
        )
    grads, losses = meta_batch_grad(
        method, loss, params, support, query, lr=lr, steps=steps, lam=2.0, cg_steps=4
    )
    ref_grads, ref_losses = reference(
        method, loss, params, support, query, lr=lr, steps=steps, lam=2.0, cg_steps=4
    )
    for k in params:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-10, atol=1e-12)
    assert losses.shape == (support[0].shape[0],)


def test_meta_batch_grad_maml_loss_is_the_differentiated_value():
    params, support, query = sinusoid_problem()
    _, losses = meta_batch_grad("maml", MSE, params, support, query, lr=0.01, steps=2)
    for i in range(4):
        s, q = per_task(support, query, i)
        expected = MSE(adapt(MSE, params, s, lr=0.01, steps=2), q)
        torch.testing.assert_close(losses[i], expected)


def test_meta_batch_grad_is_pure_and_detached():
    params, support, query = sinusoid_problem()
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    before = copy.deepcopy({k: v.detach().clone() for k, v in params.items()})
    frozen = dict(params)
    for method in ("maml", "fomaml", "reptile", "imaml"):
        grads, losses = meta_batch_grad(method, MSE, params, support, query, lr=0.01, steps=1)
        assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())
        assert losses.grad_fn is None
    assert params == frozen
    assert all(
        torch.equal(params[k].detach(), before[k]) and params[k].requires_grad for k in params
    )
    assert all(p.grad is None for p in params.values())


def test_meta_batch_grad_is_the_mean_not_the_sum():
    params, support, query = sinusoid_problem(tasks=3)
    one, _ = meta_batch_grad("maml", MSE, params, support, query, lr=0.01)
    tripled = tuple(torch.cat([t] * 3) for t in support), tuple(torch.cat([t] * 3) for t in query)
    three, _ = meta_batch_grad("maml", MSE, params, *tripled, lr=0.01)
    for k in params:
        torch.testing.assert_close(one[k], three[k])


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_meta_train_max_grad_norm_is_torch_clip_grad_norm_then_adam(max_norm):
    """Reference: meta_batch_grad, torch.nn.utils.clip_grad_norm_ and torch.optim.Adam."""
    params, family = tiny_params(), SinusoidFamily(k_support=5)
    run = meta_train(
        "maml", MSE, params, family, **(TINY | {"iterations": 3}), max_grad_norm=max_norm
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(leaves.values(), lr=TINY["meta_lr"])
    gen, norms = torch.Generator().manual_seed(TINY["seed"]), []
    for _ in range(3):
        tasks = family(5, generator=gen, dtype=F64)
        theta = {k: v.detach() for k, v in leaves.items()}
        g, _ = meta_batch_grad("maml", MSE, theta, tasks.support, tasks.query, lr=0.01, steps=1)
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(leaves.values()), max_norm)))
        opt.step()
    assert (min(norms) > max_norm) if max_norm < 1 else (max(norms) < max_norm)  # active / not
    for k in params:
        torch.testing.assert_close(run.params[k], leaves[k].detach(), rtol=1e-10, atol=1e-12)
    assert run.config["max_grad_norm"] == max_norm
    plain = meta_train("maml", MSE, params, family, **(TINY | {"iterations": 3}))
    same = all(torch.equal(run.params[k], plain.params[k]) for k in params)
    assert same == (max_norm > 1) and plain.config["max_grad_norm"] is None


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"method": "sgd"}, ValueError, "method must be one of"),
        ({"lr": math.inf}, ValueError, "lr must be finite"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"support": "bad"}, TypeError, "support must be a pair"),
        ({"query": (torch.zeros(3), torch.zeros(3))}, ValueError, "query x must have shape"),
        ({"query": (torch.zeros(3, 7, 1), torch.zeros(3, 6, 1))}, ValueError, "query x and y"),
        (
            {"query": (torch.zeros(3, 7, 1, dtype=F64), torch.zeros(3, 7, 1, dtype=F64))},
            ValueError,
            "same number of tasks",
        ),
        ({"method": "reptile", "steps": 0}, ValueError, "steps must be >= 1"),
        ({"method": "imaml", "lam": 0.0}, ValueError, "lam must be > 0"),
        ({"method": "imaml", "cg_steps": 0}, ValueError, "cg_steps must be >= 1"),
        ({"params": {}}, ValueError, "params must contain"),
    ],
)
def test_meta_batch_grad_bad_inputs(change, error, match):
    params, support, query = sinusoid_problem()
    args = {
        "method": "maml",
        "params": params,
        "support": support,
        "query": query,
        "lr": 0.01,
        "steps": 1,
    } | change
    with pytest.raises(error, match=match):
        meta_batch_grad(
            args.pop("method"),
            MSE,
            args.pop("params"),
            args.pop("support"),
            args.pop("query"),
            **args,
        )


# --- Adam ------------------------------------------------------------------------------------


def test_training_adam_matches_torch_optim_adam():
    p0 = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64), "b": torch.tensor(0.3, dtype=F64)}
    leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = torch.optim.Adam(leaves.values(), lr=0.05)
    params, state = (
        p0,
        {
            "t": 0,
            "m": {k: torch.zeros_like(v) for k, v in p0.items()},
            "v": {k: torch.zeros_like(v) for k, v in p0.items()},
        },
    )
    for step in range(5):
        g = {
            "w": torch.tensor([0.1, -3.0, 2.0], dtype=F64) * (step + 1),
            "b": torch.tensor(-0.7, dtype=F64),
        }
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        opt.step()
        params, state = fast_adam_step(params, g, state, 0.05)
    for k in p0:
        torch.testing.assert_close(params[k], leaves[k].detach(), rtol=1e-12, atol=1e-14)


# --- meta_train ------------------------------------------------------------------------------

TINY = {
    "meta_batch_size": 5,
    "iterations": 60,
    "lr": 0.01,
    "meta_lr": 0.01,
    "steps": 1,
    "seed": 3,
    "progress": False,
}


# a low-noise family (nearly one function), so the meta-loss falls clearly in a few iterations
TINY_FAMILY = SinusoidFamily(k_support=5, amplitude_range=(0.9, 1.1), phase_range=(0.0, 0.3))


def tiny_params():
    return init_mlp((1, 16, 1), seed=1, dtype=F64)


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "imaml", "pretrained"])
def test_meta_train_reduces_the_meta_loss_deterministically(method):
    params = tiny_params()
    snapshot = {k: v.clone() for k, v in params.items()}
    kwargs = {"lam": 2.0, "cg_steps": 3} if method == "imaml" else {}
    steps = 3 if method in ("reptile", "imaml") else 1
    run = meta_train(method, MSE, params, TINY_FAMILY, **(TINY | {"steps": steps}), **kwargs)
    again = meta_train(method, MSE, params, TINY_FAMILY, **(TINY | {"steps": steps}), **kwargs)
    assert torch.equal(run.history, again.history)
    assert all(torch.equal(run.params[k], again.params[k]) for k in params)
    assert run.history.shape == (60,) and run.history.dtype == F64
    assert run.history[-10:].mean() < 0.6 * run.history[:10].mean()
    assert all(torch.equal(params[k], snapshot[k]) for k in params)  # caller's params untouched
    assert run.config["method"] == method and run.config["tasks"]["k_support"] == 5
    json.dumps(run.config)  # JSON-ready


def test_meta_train_seed_changes_the_tasks():
    a = meta_train(
        "fomaml", MSE, tiny_params(), SinusoidFamily(k_support=5), **(TINY | {"iterations": 3})
    )
    b = meta_train(
        "fomaml",
        MSE,
        tiny_params(),
        SinusoidFamily(k_support=5),
        **(TINY | {"iterations": 3, "seed": 4}),
    )
    assert not torch.equal(a.history, b.history)


def test_meta_train_first_iterate_is_one_adam_step_of_meta_batch_grad():
    params, family = tiny_params(), SinusoidFamily(k_support=5)
    run = meta_train("maml", MSE, params, family, **(TINY | {"iterations": 1}))
    tasks = family(5, generator=torch.Generator().manual_seed(3), dtype=F64)
    g, losses = meta_batch_grad("maml", MSE, params, tasks.support, tasks.query, lr=0.01, steps=1)
    # Adam's first step moves every coordinate by lr·sign(g) (up to ε)
    for k in params:
        torch.testing.assert_close(run.params[k], params[k] - 0.01 * g[k] / (g[k].abs() + 1e-8))
    assert run.history[0].item() == pytest.approx(losses.mean().item(), rel=1e-12)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"method": "sgd"}, ValueError, "method must be one of"),
        ({"meta_batch_size": 0}, ValueError, "meta_batch_size"),
        ({"iterations": -1}, ValueError, "iterations"),
        ({"meta_lr": 0.0}, ValueError, "meta_lr must be > 0"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"log_every": 0}, ValueError, "log_every"),
        ({"lam": 1.0}, TypeError, "takes no keyword"),
        ({"method": "imaml", "lam": -1.0}, ValueError, "lam must be > 0"),
        ({"sample_tasks": 3}, TypeError, "sample_tasks must be callable"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0"),
        ({"max_grad_norm": "1"}, TypeError, "max_grad_norm"),
    ],
)
def test_meta_train_bad_inputs(change, error, match):
    args = {"method": "maml", "sample_tasks": SinusoidFamily()} | TINY | change
    with pytest.raises(error, match=match):
        meta_train(args.pop("method"), MSE, tiny_params(), args.pop("sample_tasks"), **args)


def test_checkpoint_round_trip(tmp_path):
    run = meta_train(
        "maml", MSE, tiny_params(), SinusoidFamily(k_support=5), **(TINY | {"iterations": 4})
    )
    loaded = load_checkpoint(save_checkpoint(run, tmp_path / "ckpt"))
    assert isinstance(loaded, TrainResult)
    assert loaded.config == json.loads(json.dumps(run.config))
    assert torch.equal(loaded.history, run.history)
    assert list(loaded.params) == list(run.params)
    assert all(
        torch.equal(loaded.params[k], run.params[k]) and loaded.params[k].dtype == F64
        for k in run.params
    )
    with pytest.raises(FileNotFoundError, match=r"params\.pt"):
        load_checkpoint(tmp_path / "missing")


# --- evaluation ------------------------------------------------------------------------------


def test_mean_ci95_against_a_hand_computation():
    values = torch.tensor([[1.0, 10.0], [2.0, 10.0], [6.0, 10.0]], dtype=F64)
    mean, half = mean_ci95(values)
    # column 0: mean 3, σ² = (4 + 1 + 9)/3 (divisor N, as np.std), half-width 1.96·σ/√3
    torch.testing.assert_close(mean, torch.tensor([3.0, 10.0], dtype=F64))
    torch.testing.assert_close(
        half, torch.tensor([1.96 * math.sqrt(14 / 3) / math.sqrt(3), 0.0], dtype=F64)
    )
    with pytest.raises(ValueError, match="values"):
        mean_ci95(torch.tensor(1.0))


def test_evaluate_matches_a_loop_of_sgd_steps():
    params, support, query = sinusoid_problem(tasks=6)
    result = evaluate(MSE, params, support, query, lr=0.02, steps=4)
    assert result.losses.shape == (6, 5) and result.mse.shape == result.ci95.shape == (5,)
    for i in range(6):
        s, q = per_task(support, query, i)
        for j in range(5):
            expected = MSE(adapt(MSE, params, s, lr=0.02, steps=j), q)
            torch.testing.assert_close(result.losses[i, j], expected)
    n = 6
    std = result.losses.std(0, correction=0)
    torch.testing.assert_close(result.ci95, 1.96 * std / math.sqrt(n))
    torch.testing.assert_close(result.mse, result.losses.mean(0))


def test_evaluate_tasks_is_seeded_and_uses_the_family():
    params = tiny_params()
    family = SinusoidFamily(k_support=5)
    a = evaluate_tasks(MSE, params, family, num_tasks=20, lr=0.01, steps=2, seed=7)
    b = evaluate_tasks(MSE, params, family, num_tasks=20, lr=0.01, steps=2, seed=7)
    assert torch.equal(a.losses, b.losses)
    tasks = family(20, generator=torch.Generator().manual_seed(7), dtype=F64)
    direct = evaluate(MSE, params, tasks.support, tasks.query, lr=0.01, steps=2)
    torch.testing.assert_close(a.losses, direct.losses)
    with pytest.raises(ValueError, match="num_tasks"):
        evaluate_tasks(MSE, params, family, num_tasks=0, lr=0.01)


def test_meta_train_stops_at_the_first_non_finite_meta_loss():
    with pytest.raises(
        FloatingPointError, match="fomaml diverged: non-finite meta-loss at iteration"
    ):
        meta_train("fomaml", MSE, tiny_params(), TINY_FAMILY, **(TINY | {"lr": 1e200}))


def test_meta_batch_grad_takes_the_fast_path_for_the_builtin_mlp(monkeypatch):
    """make_mse_loss(mlp) is routed to mamlkit._fast; any other loss to the vmap path."""
    import mamlkit._metabatch as metabatch

    calls = []
    real = metabatch.fast_meta_batch_grad
    monkeypatch.setattr(
        metabatch, "fast_meta_batch_grad", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    params = mamlkit.init_mlp((1, 4, 1), seed=0)
    xs, ys = torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)
    meta_batch_grad("maml", mamlkit.make_mse_loss(mamlkit.mlp), params, (xs, ys), (xs, ys), lr=0.1)
    assert calls == [1]
    other = mamlkit.make_mse_loss(lambda p, x: mamlkit.mlp(p, x))
    meta_batch_grad("maml", other, params, (xs, ys), (xs, ys), lr=0.1)
    assert calls == [1]
