"""Per-step parameters (MAML++'s per-step BatchNorm weights and biases, BNWB): each inner step j
runs with its own copy ψ_j of the named parameters; the copies take no inner step and are
meta-learned. References: plain autograd written out, float64 central differences, and the
chain-rule identity Σ_j dL/dψ_j = dL/dw when every copy equals w."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, assert_tree_close, central_difference
from torch import nn

import mamlkit as mk
from mamlkit.tasks import SinusoidFamily

KEYS = ["1.weight", "1.bias"]  # the BatchNorm layer's weight and bias
LR = 0.1


def _copies(params, keys, *, steps):
    """θ with each of ``keys`` copied once per inner step: the "maml" method's meta-parameters."""
    return mk.METHODS["maml"].init(params, lr=LR, steps=steps, per_step_keys=tuple(keys))


def _net(inputs=2, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():  # BatchNorm starts at γ = 1, β = 0: move it off that point
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.double()


def _problem(steps=2, seed=0, tasks=None):
    params, model_fn = mk.from_module(_net(seed=seed))
    loss = mk.make_mse_loss(model_fn)
    g = torch.Generator().manual_seed(seed + 1)
    shape = () if tasks is None else (tasks,)
    s = (
        torch.randn(*shape, 6, 2, generator=g, dtype=F64),
        torch.randn(*shape, 6, 1, generator=g, dtype=F64),
    )
    q = (
        torch.randn(*shape, 7, 2, generator=g, dtype=F64),
        torch.randn(*shape, 7, 1, generator=g, dtype=F64),
    )
    meta = _copies(params, KEYS, steps=steps)
    with torch.no_grad():  # copies that differ, so that a mixed-up index shows
        for j in range(steps):
            for k in KEYS:
                meta[f"step{j}/{k}"] += (
                    0.1 * (j + 1) * torch.randn(meta[f"step{j}/{k}"].shape, generator=g, dtype=F64)
                )
    return loss, params, meta, s, q  # fmt: skip


def _reference(loss, meta, s, q, steps, weights=None):
    """Plain autograd through the loop: step j differentiates L_S at θ_j ∪ ψ_j in the shared
    parameters only; the query loss at θ_{j+1} sees ψ_j."""
    meta = {k: v.detach().clone().requires_grad_() for k, v in meta.items()}
    shared = [k for k in meta if not k.startswith("step")]
    theta = {k: meta[k] for k in shared}
    total = torch.zeros((), dtype=F64)
    for j in range(steps):
        view = {**theta, **{k: meta[f"step{j}/{k}"] for k in KEYS}}
        grads = torch.autograd.grad(loss(view, s), [view[k] for k in shared], create_graph=True)
        theta = {**view, **{k: view[k] - LR * g for k, g in zip(shared, grads)}}
        if weights is not None:
            total = total + weights[j] * loss(theta, q)
    if weights is None:
        total = loss(theta, q)
    return dict(zip(meta, torch.autograd.grad(total, list(meta.values()))))


# ----------------------------------------------------------------------------- the gradient


@pytest.mark.parametrize("steps", [1, 3])
def test_per_step_meta_gradient_equals_plain_autograd(steps):
    loss, _, meta, s, q = _problem(steps)
    got = mk.maml_grad(loss, meta, s, q, lr=LR, steps=steps, per_step_keys=KEYS)
    assert_tree_close(got, _reference(loss, meta, s, q, steps), rtol=1e-10, atol=1e-12)


def test_per_step_meta_gradient_equals_finite_differences():
    loss, _, meta, s, q = _problem(2)

    def objective(flat):
        view = mk.unflatten_params(flat, meta)
        shared = [k for k in view if not k.startswith("step")]
        theta = {k: view[k] for k in shared}
        for j in range(2):
            step = {**theta, **{k: view[f"step{j}/{k}"] for k in KEYS}}
            grads = torch.func.grad(lambda p, step=step: loss({**step, **p}, s))(
                {k: step[k] for k in shared}
            )
            theta = {**step, **{k: step[k] - LR * grads[k] for k in shared}}
        return loss(theta, q)

    expected = mk.unflatten_params(central_difference(objective, mk.flatten_params(meta)), meta)
    got = mk.maml_grad(loss, meta, s, q, lr=LR, steps=2, per_step_keys=KEYS)
    assert_tree_close(got, expected, rtol=1e-6, atol=1e-8)


def test_equal_copies_sum_to_the_shared_parameters_gradient():
    """Chain rule: with ψ_j = w for every j, Σ_j dL/dψ_j = dL/dw of MAML whose inner steps leave
    w fixed (adapt_keys = the other parameters)."""
    loss, params, _, s, q = _problem(3)
    meta = _copies(params, KEYS, steps=3)
    got = mk.maml_grad(loss, meta, s, q, lr=LR, steps=3, per_step_keys=KEYS)
    others = [k for k in params if k not in KEYS]
    shared = mk.maml_grad(loss, params, s, q, lr=LR, steps=3, adapt_keys=others)
    for k in KEYS:
        total = sum(got[f"step{j}/{k}"] for j in range(3))
        torch.testing.assert_close(total, shared[k], rtol=1e-10, atol=1e-13)
    assert_tree_close({k: got[k] for k in others}, {k: shared[k] for k in others})


def test_the_multi_step_loss_with_per_step_parameters():
    loss, _, meta, s, q = _problem(3)
    weights = [0.2, 0.3, 1.0]
    got = mk.maml_grad(loss, meta, s, q, lr=LR, steps=3, per_step_keys=KEYS, step_weights=weights)
    expected = _reference(loss, meta, s, q, 3, weights)
    assert_tree_close(got, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- every engine


@pytest.mark.parametrize("backend", ["vmap", "auto"])
def test_meta_batch_grad_is_the_task_mean(backend):
    loss, _, meta, s, q = _problem(2, tasks=3)
    grads, losses = mk.meta_batch_grad(
        "maml", loss, meta, s, q, lr=LR, steps=2, per_step_keys=KEYS, backend=backend
    )
    per_task = [
        mk.maml_grad(loss, meta, (s[0][i], s[1][i]), (q[0][i], q[1][i]), lr=LR, steps=2,
                     per_step_keys=KEYS)
        for i in range(3)
    ]  # fmt: skip
    mean = {k: torch.stack([g[k] for g in per_task]).mean(0) for k in meta}
    assert_tree_close(grads, mean, rtol=1e-10, atol=1e-12)
    assert losses.shape == (3,)


def test_routes_and_backends_that_cannot_are_refused_with_the_reason():
    loss, _, meta, s, q = _problem(2, tasks=2)
    for route in ("hvp", "checkpointed"):
        with pytest.raises(ValueError, match=r"per_step_keys .* use reverse='unroll'"):
            mk.meta_batch_grad(
                "maml", loss, meta, s, q, lr=LR, steps=2, per_step_keys=KEYS, reverse=route
            )
    mlp_meta = _copies(mk.init_mlp((2, 4, 1), seed=0), ["b0"], steps=2)
    with pytest.raises(ValueError, match="no per-step parameters"):
        mk.meta_batch_grad(
            "maml", mk.make_mse_loss(mk.mlp), mlp_meta, (s[0].float(), s[1].float()),
            (q[0].float(), q[1].float()), lr=LR, steps=2, per_step_keys=["b0"], backend="fused",
        )  # fmt: skip


# ----------------------------------------------------------------------------- bad input


def test_bad_per_step_input_names_the_argument():
    loss, params, meta, s, q = _problem(2)
    with pytest.raises(ValueError, match=r"per_step_keys: params lacks \['step1/1.weight'"):
        mk.maml_grad(loss, _copies(params, KEYS, steps=1), s, q, lr=LR, steps=2,
                     per_step_keys=KEYS)  # fmt: skip
    with pytest.raises(ValueError, match=r"per_step_keys: params holds '1\.weight' itself"):
        mk.maml_grad(loss, params, s, q, lr=LR, steps=2, per_step_keys=KEYS)
    with pytest.raises(ValueError, match="per_step_keys needs at least one inner step"):
        mk.maml_grad(loss, meta, s, q, lr=LR, steps=0, per_step_keys=KEYS)
    batch = tuple(t.expand(2, *t.shape) for t in s), tuple(t.expand(2, *t.shape) for t in q)
    with pytest.raises(ValueError, match="per_step_keys needs at least one inner step"):
        mk.meta_batch_grad("maml", loss, meta, *batch, lr=LR, steps=0, per_step_keys=KEYS)
    with pytest.raises(TypeError, match="per_step_keys"):
        mk.maml_grad(loss, meta, s, q, lr=LR, steps=2, per_step_keys="1.weight")
    with pytest.raises(
        ValueError, match=r"per_step_keys names keys params does not have: \['nope'\]"
    ):
        _copies(params, ["nope"], steps=2)


def test_nothing_the_caller_passes_is_changed():
    loss, params, meta, s, q = _problem(2)
    before = {k: v.clone() for k, v in meta.items()}
    keys_before = list(meta)
    mk.maml_grad(loss, meta, s, q, lr=LR, steps=2, per_step_keys=KEYS)
    copies = _copies(params, KEYS, steps=2)
    assert list(meta) == keys_before
    assert all(torch.equal(meta[k], before[k]) for k in meta)
    assert set(params) >= set(KEYS)  # init returned a new dict
    assert copies["step0/1.weight"].data_ptr() != params["1.weight"].data_ptr()


# ----------------------------------------------------------------- training and evaluation


def _train(iterations=6, **kw):
    params, model_fn = mk.from_module(_net(inputs=1).float())
    return mk.train.meta_train(
        "maml", mk.make_mse_loss(model_fn), params, SinusoidFamily(k_support=5, k_query=5),
        meta_batch_size=3, iterations=iterations, lr=0.05, meta_lr=1e-2, steps=2, seed=1,
        progress=False, per_step_keys=KEYS, **kw,
    )  # fmt: skip


def test_meta_train_learns_the_copies_apart_and_resumes_bit_identically(tmp_path):
    whole = _train()
    assert {"step0/1.weight", "step1/1.bias"} <= set(whole.params)
    assert "1.weight" not in whole.params
    assert not torch.equal(whole.params["step0/1.weight"], whole.params["step1/1.weight"])
    _train(iterations=3, checkpoint_dir=tmp_path)
    resumed = _train(checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(resumed.history, whole.history)
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)
    with pytest.raises(ValueError, match="first_order_until: the first-order counterpart"):
        _train(first_order_until=2)


def test_evaluate_fine_tunes_with_each_steps_copies():
    trained = _train(iterations=2)
    _, model_fn = mk.from_module(_net(inputs=1).float())
    loss = mk.make_mse_loss(model_fn)
    tasks = SinusoidFamily(k_support=5, k_query=5)(
        2, generator=torch.Generator().manual_seed(9), dtype=torch.float32
    )
    curve = mk.train.evaluate(
        loss, trained.params, tasks.support, tasks.query, lr=0.05, steps=3, method="maml",
        per_step_keys=KEYS,
    )  # fmt: skip
    meta = trained.params
    shared = [k for k in meta if not k.startswith("step")]
    for i in range(2):
        s, q = (tasks.support[0][i], tasks.support[1][i]), (tasks.query[0][i], tasks.query[1][i])
        theta = {**{k: meta[k] for k in shared}, **{k: meta[f"step0/{k}"] for k in KEYS}}
        expected = [loss(theta, q)]
        for j in range(3):  # step j with copy min(j, 1): two copies were trained
            view = {**theta, **{k: meta[f"step{min(j, 1)}/{k}"] for k in KEYS}}
            grads = torch.func.grad(lambda p, view=view, s=s: loss({**view, **p}, s))(
                {k: view[k] for k in shared}
            )
            theta = {**view, **{k: view[k] - 0.05 * grads[k] for k in shared}}
            expected.append(loss(theta, q))
        torch.testing.assert_close(curve.losses[i], torch.stack(expected))


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "maml", "--per-step-keys", "1.weight", "1.bias", "--steps", "2"],
        ["--method", "metasgd", "--rates", "tensor"],  # rates of shape (): once an IndexError
    ],
)
def test_glyph_checkpoints_with_more_than_the_model_evaluate_from_the_command_line(
    tmp_path, capsys, flags
):
    """The CLI reads the number of classes from the model's head, not from the last entry of the
    meta-parameters (a per-step copy or a rate)."""
    from mamlkit._cli import main

    out = tmp_path / "run"
    argv = ["train", "--task", "glyphs", *flags, "--iterations", "2", "--channels", "4",
            "--meta-batch-size", "2", "--ways", "3", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--tasks", "4", "--steps", "1", "--k", "1"]) == 0
    assert "| steps | 3-way 1-shot |" in capsys.readouterr().out
