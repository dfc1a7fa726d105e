"""The methods people use now: Meta-SGD's learned rates (once or per step), ANIL/BOIL's partial
adaptation, MAML++'s multi-step loss and derivative-order annealing. Every gradient against float64
central differences or plain autograd written out (tests/helpers.py), never against mamlkit."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from helpers import (
    F64,
    assert_tree_close,
    central_difference,
    per_task_reference,
    random_mlp_problem,
    task,
    unrolled_autograd,
)
from torch import nn

import mamlkit as mk
from mamlkit.tasks import SinusoidFamily

TANH = mk.make_mse_loss(functools.partial(mk.mlp, activation="tanh"))
FD = {"rtol": 1e-6, "atol": 1e-8}


def _one_task(seed=0):
    params, support, query = random_mlp_problem((1, 4, 1), tasks=1, seed=seed)
    s, q = task(support, query, 0)
    return params, s, q


def _fd(objective, tree):
    """d objective / d tree by central differences, as a tree."""
    flat = mk.flatten_params(tree)
    return mk.unflatten_params(
        central_difference(lambda v: objective(mk.unflatten_params(v, tree)), flat), tree
    )


# --------------------------------------------------------------------------- Meta-SGD's rates


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("shape", ["tensor", "element"])
def test_metasgd_grad_is_the_derivative_in_params_and_in_rates(steps, shape):
    params, s, q = _one_task()
    g = torch.Generator().manual_seed(1)
    lrs = {
        k: 0.05 + 0.1 * torch.rand(() if shape == "tensor" else v.shape, generator=g, dtype=F64)
        for k, v in params.items()
    }

    def objective(tree):
        theta = {k: tree[k] for k in params}
        for _ in range(steps):
            grads = torch.func.grad(TANH)(theta, s)
            theta = {k: theta[k] - tree[f"lr/{k}"] * grads[k] for k in theta}
        return TANH(theta, q)

    both = {**params, **{f"lr/{k}": v for k, v in lrs.items()}}
    expected = _fd(objective, both)
    got_params, got_rates = mk.metasgd_grad(TANH, params, lrs, s, q, steps=steps)
    assert_tree_close(got_params, {k: expected[k] for k in params}, **FD)
    assert_tree_close(got_rates, {k: expected[f"lr/{k}"] for k in params}, **FD)


def test_one_step_rates_gradient_is_minus_the_product_of_the_two_gradients():
    """∂L_Q(θ_1)/∂α = −∇L_Q(θ_1) ⊙ ∇L_S(θ) (per entry), the identity notebook 10 derives."""
    params, s, q = _one_task(seed=3)
    lrs = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    theta_1 = {k: v - 0.1 * torch.func.grad(TANH)(params, s)[k] for k, v in params.items()}
    closed = {
        k: -torch.func.grad(TANH)(theta_1, q)[k] * torch.func.grad(TANH)(params, s)[k]
        for k in params
    }
    assert_tree_close(mk.metasgd_grad(TANH, params, lrs, s, q)[1], closed, rtol=1e-12, atol=1e-14)


def test_per_step_rates_are_one_dict_per_step_and_each_gets_its_gradient():
    params, s, q = _one_task(seed=4)
    lrs = [{k: torch.tensor(0.05 * (j + 1), dtype=F64) for k in params} for j in range(3)]
    meta = {**params, **{f"lr{j}/{k}": lrs[j][k] for j in range(3) for k in params}}
    expected, _ = unrolled_autograd(TANH, meta, s, q, steps=3, rate=lambda k, j: f"lr{j}/{k}")
    got_params, got_rates = mk.metasgd_grad(TANH, params, lrs, s, q, steps=3)
    assert isinstance(got_rates, list) and len(got_rates) == 3
    assert_tree_close(got_params, {k: expected[k] for k in params}, rtol=1e-10, atol=1e-12)
    for j in range(3):
        assert_tree_close(
            got_rates[j], {k: expected[f"lr{j}/{k}"] for k in params}, rtol=1e-10, atol=1e-12
        )


def _rates(value):
    return lambda p: {k: torch.tensor(value, dtype=F64) for k in p}


@pytest.mark.parametrize(
    ("lrs", "error", "match"),
    [
        (
            lambda p: {"w0": torch.tensor(0.1, dtype=F64)},
            ValueError,
            r"lrs must have the keys of params: missing \['b0'",
        ),
        (
            lambda p: {**_rates(0.1)(p), "x": torch.tensor(0.1, dtype=F64)},
            ValueError,
            r"not in params \['x'\]",
        ),
        (
            lambda p: {k: torch.ones(7, dtype=F64) for k in p},
            ValueError,
            r"lrs\['w0'\] \(7,\) would broadcast params\['w0'\]",
        ),
        (
            lambda p: {k: torch.tensor(0.1) for k in p},
            TypeError,
            r"lrs\['w0'\] must have the dtype",
        ),
        (lambda p: {k: 0.1 for k in p}, TypeError, r"lrs\['w0'\] must be a Tensor"),
        (
            lambda p: [_rates(0.1)(p)],
            ValueError,
            r"a list of 2 \(one per inner step\), got a list of 1",
        ),
        (lambda p: "fast", TypeError, "lrs must be a dict"),
    ],
)
def test_bad_rates_are_refused_naming_lrs(lrs, error, match):
    params, s, q = _one_task()
    with pytest.raises(error, match=match):
        mk.metasgd_grad(TANH, params, lrs(params), s, q, steps=2)


def test_metasgd_method_learns_rates_and_meta_params_are_checked():
    params, support, query = random_mlp_problem((1, 5, 1))
    with pytest.raises(ValueError, match=r"params must hold Meta-SGD's rates"):
        mk.meta_batch_grad("metasgd", TANH, params, support, query, lr=0.1, steps=2)
    meta = mk.METHODS["metasgd"].init(params, lr=0.1, steps=2, per_step=True)
    assert set(meta) == set(params) | {f"lr{j}/{k}" for j in (0, 1) for k in params}
    assert all(torch.equal(meta[f"lr1/{k}"], torch.full_like(v, 0.1)) for k, v in params.items())
    with pytest.raises(ValueError, match=r"missing \['lr2/w0'"):  # trained for 2 steps, asked 3
        mk.meta_batch_grad("metasgd", TANH, meta, support, query, lr=0.1, steps=3, per_step=True)


# ----------------------------------------------------------------------- ANIL, BOIL, partial


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_grad_with_adapt_keys_is_the_derivative_of_the_partial_loop(steps):
    params, s, q = random_mlp_problem((1, 4, 3, 1), tasks=1, seed=2)
    s, q = task(s, q, 0)
    head = ["w2", "b2"]

    def objective(p):
        theta = dict(p)
        for _ in range(steps):
            grads = torch.func.grad(TANH)(theta, s)
            theta = {k: v - 0.2 * grads[k] if k in head else v for k, v in theta.items()}
        return TANH(theta, q)

    exact = mk.maml_grad(TANH, params, s, q, lr=0.2, steps=steps, adapt_keys=head)
    assert_tree_close(exact, _fd(objective, params), **FD)
    assert exact["w0"].abs().sum() > 0  # the body gets its gradient through the head's steps


def test_fomaml_grad_with_adapt_keys_is_the_query_gradient_at_the_partly_adapted_point():
    params, s, q = _one_task(seed=5)
    theta = dict(params)
    for _ in range(2):
        grads = torch.func.grad(TANH)(theta, s)
        theta = {k: v - 0.2 * grads[k] if k in ("w1", "b1") else v for k, v in theta.items()}
    expected = _fd(lambda p: TANH(p, q), theta)
    got = mk.fomaml_grad(TANH, params, s, q, lr=0.2, steps=2, adapt_keys=["w1", "b1"])
    assert_tree_close(got, expected, **FD)


def test_anil_block_structure_the_body_block_of_the_inner_jacobian_is_the_identity():
    """ANIL's inner step moves the head only: its Jacobian is [[I, 0], [−αH_hb, I − αH_hh]] — the
    body rows are the identity, and the body still gets a second-order term through H_hb."""
    params, s, _ = _one_task(seed=6)
    keys = list(params)
    flat = mk.flatten_params(params)

    def step(v):
        theta = mk.unflatten_params(v, params)
        grads = torch.func.grad(TANH)(theta, s)
        moved = {k: theta[k] - 0.3 * grads[k] if k in ("w1", "b1") else theta[k] for k in keys}
        return mk.flatten_params(moved)

    jacobian = torch.func.jacrev(step)(flat)
    body = sum(params[k].numel() for k in ("w0", "b0"))
    torch.testing.assert_close(jacobian[:body], torch.eye(len(flat), dtype=F64)[:body])
    hessian = mk.hessian(TANH, params, s)
    torch.testing.assert_close(jacobian[body:, :body], -0.3 * hessian[body:, :body])
    assert hessian[body:, :body].abs().max() > 1e-3  # the coupling block is not zero


@pytest.mark.parametrize("adapt", ["head", "body"])
def test_anil_and_boil_through_a_batchnorm_module_equal_plain_autograd(adapt):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3)
    ).double()
    params, model_fn = mk.from_module(net)
    loss = mk.make_cross_entropy_loss(model_fn)
    g = torch.Generator().manual_seed(1)
    support = (torch.randn(2, 6, 1, 6, 6, generator=g, dtype=F64), torch.arange(3).repeat(2, 2))
    query = (torch.randn(2, 3, 1, 6, 6, generator=g, dtype=F64), torch.arange(3).repeat(2, 1))
    grads, losses = mk.meta_batch_grad(
        "anil", loss, params, support, query, lr=0.3, steps=2, adapt=adapt
    )
    ref, ref_losses = per_task_reference(
        "anil", loss, params, support, query, lr=0.3, steps=2, adapt=adapt
    )
    assert_tree_close(grads, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(losses, ref_losses)  # the reference's head: 4.weight, 4.bias


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda p, s, q: mk.maml_grad(TANH, p, s, q, lr=0.1, adapt_keys=["w9"]),
            ValueError,
            r"adapt_keys.*w9",
        ),
        (
            lambda p, s, q: mk.maml_grad(TANH, p, s, q, lr=0.1, adapt_keys="w0"),
            TypeError,
            "adapt_keys must be",
        ),
        (
            lambda p, s, q: mk.fomaml_grad(TANH, p, s, q, lr=0.1, adapt_keys=[]),
            TypeError,
            "adapt_keys must be None or a non-empty list",
        ),
        (
            lambda p, s, q: mk.maml_grad(TANH, p, s, q, lr=0.1, steps=2, step_weights=[1.0]),
            ValueError,
            r"step_weights.*2",
        ),
        (
            lambda p, s, q: mk.maml_grad(TANH, p, s, q, lr=0.1, step_weights=[float("nan")]),
            ValueError,
            "step_weights",
        ),
    ],
)
def test_bad_partial_and_multi_step_arguments_are_refused_by_name(call, error, match):
    params, s, q = _one_task()
    with pytest.raises(error, match=match):
        call(params, s, q)


def test_anil_head_that_is_not_a_parameter_is_refused():
    params, support, query = random_mlp_problem((1, 5, 1))
    with pytest.raises(ValueError, match=r"head names keys params does not have: \['fc'\]"):
        mk.meta_batch_grad("anil", TANH, params, support, query, lr=0.1, head=["fc"])


# --------------------------------------------------------------------- MAML++'s multi-step loss


def test_step_weights_give_the_derivative_of_the_weighted_sum_of_query_losses():
    params, s, q = _one_task(seed=7)
    weights = [0.2, 0.3, 0.5]

    def objective(p):
        total, theta = 0.0, dict(p)
        for w in weights:
            grads = torch.func.grad(TANH)(theta, s)
            theta = {k: theta[k] - 0.2 * grads[k] for k in theta}
            total = total + w * TANH(theta, q)
        return total

    got = mk.maml_grad(TANH, params, s, q, lr=0.2, steps=3, step_weights=weights)
    assert_tree_close(got, _fd(objective, params), **FD)


@pytest.mark.parametrize("reverse", ["unroll", "auto"])
def test_step_weights_on_the_meta_batch_equal_plain_autograd(reverse):
    params, support, query = random_mlp_problem((1, 5, 1), seed=8)
    weights = [0.5, 0.0, 1.0]
    grads, _ = mk.meta_batch_grad(
        "maml", TANH, params, support, query, lr=0.1, steps=3, step_weights=weights,
        reverse=reverse,
    )  # fmt: skip
    per_task = [
        unrolled_autograd(
            TANH, params, *task(support, query, i), steps=3, rate=lambda k, j: 0.1,
            step_weights=weights,
        )[0]
        for i in range(3)
    ]  # fmt: skip
    mean = {k: torch.stack([g[k] for g in per_task]).mean(0) for k in params}
    assert_tree_close(grads, mean, rtol=1e-10, atol=1e-12)
    for sweep in ("hvp", "checkpointed"):  # the sweeps carry one query gradient, not k
        with pytest.raises(ValueError, match=r"step_weights .* use reverse='unroll'"):
            mk.meta_batch_grad(
                "maml", TANH, params, support, query, lr=0.1, steps=3, step_weights=weights,
                reverse=sweep,
            )  # fmt: skip
    with pytest.raises(ValueError, match="no multi-step loss"):
        mk.meta_batch_grad(
            "maml", mk.make_mse_loss(mk.mlp), params, support, query, lr=0.1, steps=3,
            step_weights=weights, backend="fused",
        )  # fmt: skip


# ------------------------------------------------------------------- training and annealing


def _train(method, iterations=12, **kw):
    return mk.train.meta_train(
        method, TANH, mk.init_mlp((1, 8, 1), seed=0), SinusoidFamily(k_support=5, k_query=5),
        meta_batch_size=4, iterations=iterations, lr=0.05, meta_lr=1e-2, steps=2, seed=1,
        progress=False, **kw,
    )  # fmt: skip


def test_derivative_order_annealing_is_fomaml_then_maml():
    annealed = _train("maml", first_order_until=5)
    first = _train("fomaml", iterations=5)
    assert torch.equal(annealed.history[:5], first.history)  # fomaml up to iteration 5
    plain, first_order = _train("maml"), _train("fomaml")
    assert not torch.equal(annealed.history[5:], plain.history[5:])  # it started first order
    assert not torch.equal(annealed.history[6:], first_order.history[6:])  # and switched
    assert annealed.config["first_order_until"] == 5
    with pytest.raises(ValueError, match="first_order_until: method 'reptile'"):
        _train("reptile", first_order_until=3)


def test_metasgd_trains_its_rates_and_resumes_bit_identically(tmp_path):
    whole = _train("metasgd", rates="tensor", per_step=True)
    assert set(whole.params) >= {"lr0/w0", "lr1/b1"}
    assert not torch.equal(
        whole.params["lr0/w0"], torch.tensor(0.05, dtype=whole.params["lr0/w0"].dtype)
    )
    _train("metasgd", iterations=5, rates="tensor", per_step=True, checkpoint_dir=tmp_path)
    resumed = _train("metasgd", rates="tensor", per_step=True, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(resumed.history, whole.history)
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)


def test_evaluate_fine_tunes_with_the_learned_rates():
    trained = _train("metasgd", iterations=3)
    family = SinusoidFamily(k_support=5, k_query=5)
    tasks = family(2, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    curve = mk.train.evaluate(
        TANH, trained.params, tasks.support, tasks.query, lr=0.05, steps=1, method="metasgd"
    )
    theta = {k: v for k, v in trained.params.items() if not k.startswith("lr")}
    expected = []
    for i in range(2):
        s, q = task(tasks.support, tasks.query, i)
        grads = torch.func.grad(TANH)(theta, s)
        moved = {k: theta[k] - trained.params[f"lr/{k}"] * grads[k] for k in theta}
        expected.append(TANH(moved, q))
    torch.testing.assert_close(curve.losses[:, 1], torch.stack(expected))


def test_the_command_line_takes_the_new_methods(tmp_path):
    for i, flags in enumerate(
        [
            ["--method", "metasgd", "--per-step", "--rates", "tensor"],
            ["--method", "anil", "--adapt", "body"],
            ["--method", "maml", "--step-weights", "0.5", "1", "--first-order-until", "2"],
        ]
    ):
        out = tmp_path / f"run{i}"
        done = subprocess.run(
            [sys.executable, "-m", "mamlkit", "train", *flags, "--iterations", "4", "--steps",
             "2", "--meta-batch-size", "3", "--sizes", "1", "8", "1", "--no-progress",
             "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert mk.train.load_checkpoint(out).config["method"] == flags[1]
    bad = subprocess.run(
        [sys.executable, "-m", "mamlkit", "train", "--method", "anil", "--per-step", "--out",
         str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--per-step: method 'anil' does not take it" in bad.stderr
