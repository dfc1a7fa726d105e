"""Your own nn.Module: from_module (with and without BatchNorm) through every engine and backend,
the cross-entropy loss and its Hessian split — against the module itself, torch.autograd's
non-vmap Hessian, finite differences, per-task loops and closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    F64,
    assert_tree_close,
    central_difference,
    meta_parameters,
    per_task_reference,
)
from torch import nn

import mamlkit as mk
from mamlkit import flatten_params, unflatten_params

TOL = {"rtol": 1e-9, "atol": 1e-11}


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def plain_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(tasks=3, n=6, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, n, 2, generator=g, dtype=F64)
    return x, torch.randint(0, classes, (tasks, n), generator=g)


def snapshot(module):
    return (
        copy.deepcopy(module.state_dict()),
        module.training,
        [m.training for m in module.modules()],
    )


def assert_unchanged(module, before):
    state, training, flags = before
    after = module.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert module.training == training and [m.training for m in module.modules()] == flags


# --- the bridge ---------------------------------------------------------------------------------


def test_params_are_detached_views_of_the_modules_parameters_in_order():
    net = bn_net()
    params, _ = mk.from_module(net)
    assert list(params) == [n for n, _ in net.named_parameters()]
    for (_, p), q in zip(net.named_parameters(), params.values()):
        assert torch.equal(p, q) and not q.requires_grad and q.data_ptr() == p.data_ptr()


@pytest.mark.parametrize("train_mode", [True, False])
def test_batch_statistics_match_the_module_in_train_mode_and_nothing_is_updated(train_mode):
    net = bn_net()
    net.train(train_mode)
    before = snapshot(net)
    params, model_fn = mk.from_module(net, batch_norm="batch")
    x = data()[0][0]
    reference = copy.deepcopy(net).train()(x)  # train-mode BatchNorm: the batch's statistics
    torch.testing.assert_close(model_fn(params, x), reference)
    model_fn(params, x * 3 + 1)
    assert_unchanged(net, before)


def test_running_statistics_match_the_module_in_eval_mode():
    net = bn_net()
    net.train()
    for _ in range(3):  # give the running statistics something to hold
        net(torch.randn(8, 2, dtype=F64))
    before = snapshot(net)
    params, model_fn = mk.from_module(net, batch_norm="running")
    x = data()[0][0]
    torch.testing.assert_close(model_fn(params, x), copy.deepcopy(net).eval()(x))
    torch.testing.assert_close(
        model_fn(params, x[:1]), copy.deepcopy(net).eval()(x[:1])
    )  # inductive
    assert_unchanged(net, before)


def test_batch_mode_is_transductive_running_mode_is_not():
    net = bn_net()
    x = data()[0][0]
    for mode, depends in (("batch", True), ("running", False)):
        params, model_fn = mk.from_module(net, batch_norm=mode)
        alone, together = model_fn(params, x[:2]), model_fn(params, x)[:2]
        assert (not torch.allclose(alone, together)) == depends


@pytest.mark.parametrize(
    ("module", "kwargs", "error", "match"),
    [
        (
            nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)),
            {},
            ValueError,
            r"Dropout\(p=0.5\) in training mode: a meta-gradient needs the same function",
        ),
        (
            nn.Linear(2, 2),
            {"batch_norm": "eval"},
            ValueError,
            "batch_norm must be 'batch' or 'running'",
        ),
        (nn.ReLU(), {}, ValueError, "module has no parameters"),
        (
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)),
            {"batch_norm": "running"},
            ValueError,
            "keeps no running statistics",
        ),
        ("not a module", {}, TypeError, "module must be a torch.nn.Module"),
    ],
)
def test_what_from_module_does_not_support_is_a_clear_error(module, kwargs, error, match):
    with pytest.raises(error, match=match):
        mk.from_module(module, **kwargs)


def test_other_buffers_are_refused():
    net = nn.Linear(2, 2)
    net.register_buffer("counter", torch.zeros(()))
    with pytest.raises(ValueError, match=r"buffers outside BatchNorm layers \['counter'\]"):
        mk.from_module(net)


# --- every engine -------------------------------------------------------------------------------


def test_the_hessian_through_batchnorm_is_right():
    """torch.func's vmap-based Jacobians are silently wrong through the native batch_norm kernel
    in training mode (not even symmetric); from_module's BatchNorm is plain operations. Reference:
    torch.autograd.functional.hessian, which uses no vmap, and central differences of the
    gradient."""
    params, model_fn = mk.from_module(bn_net())
    loss = mk.make_cross_entropy_loss(model_fn)
    x, y = data()
    batch = (x[0], y[0])
    h = mk.hessian(loss, params, batch)
    flat = flatten_params(params)
    reference = torch.autograd.functional.hessian(
        lambda v: loss(unflatten_params(v, params), batch), flat
    )
    torch.testing.assert_close(h, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h, h.T, rtol=0, atol=1e-12)
    v = unflatten_params(torch.linspace(-1, 1, flat.numel(), dtype=F64), params)
    fd = central_difference(
        lambda t: (
            flatten_params(torch.func.grad(loss)(unflatten_params(t, params), batch))
            @ flatten_params(v)
        ),
        flat,
    )
    torch.testing.assert_close(
        flatten_params(mk.hvp(loss, params, batch, v)), fd, rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("make", [bn_net, plain_net], ids=["batchnorm", "plain"])
def test_every_exact_engine_agrees_through_a_module(make):
    params, model_fn = mk.from_module(make())
    loss = mk.make_cross_entropy_loss(model_fn)
    x, y = data()
    s, q = (x[0], y[0]), (x[1], y[1])
    exact = mk.maml_grad(loss, params, s, q, lr=0.3, steps=2)
    assert_tree_close(mk.maml_grad_hvp(loss, params, s, q, lr=0.3, steps=2), exact, **TOL)
    assert_tree_close(mk.maml_grad_jacobian(loss, params, s, q, lr=0.3, steps=2), exact, **TOL)

    def meta_objective(v):
        p = unflatten_params(v, params)
        return loss(mk.adapt(loss, p, s, lr=0.3, steps=2), q)

    torch.testing.assert_close(
        flatten_params(exact),
        central_difference(meta_objective, flatten_params(params)),
        rtol=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("method", list(mk.METHODS))
@pytest.mark.parametrize("backend", ["vmap", "auto"])
def test_meta_batch_grad_through_a_batchnorm_module(method, backend):
    params, model_fn = mk.from_module(bn_net())
    loss = mk.make_cross_entropy_loss(model_fn)
    support, query = data(seed=1), data(seed=2)
    steps = max(2, mk.METHODS[method].min_steps)
    hypers = {"lam": 2.0, "cg_steps": 4} if method == "imaml" else {}
    params = meta_parameters(method, params, lr=0.2, steps=steps)
    grads, losses = mk.meta_batch_grad(
        method, loss, params, support, query, lr=0.2, steps=steps, backend=backend, **hypers
    )
    ref, ref_losses = per_task_reference(
        method, loss, params, support, query, lr=0.2, steps=steps, **hypers
    )
    assert_tree_close(grads, ref, **TOL)
    torch.testing.assert_close(losses, ref_losses)
    assert support[1].dtype == torch.int64  # labels are never cast


def test_compiled_backend_through_a_batchnorm_module():
    """torch.compile of the vmap path (the fused kernels are for the built-in MLP only)."""
    params, model_fn = mk.from_module(
        nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    )
    loss = mk.make_mse_loss(model_fn)
    g = torch.Generator().manual_seed(0)
    support = (
        torch.randn(3, 5, 2, generator=g, dtype=F64),
        torch.randn(3, 5, 1, generator=g, dtype=F64),
    )
    grads, _ = mk.meta_batch_grad(
        "maml", loss, params, support, support, lr=0.1, steps=2, backend="compiled"
    )
    ref, _ = per_task_reference("maml", loss, params, support, support, lr=0.1, steps=2)
    assert_tree_close(grads, ref, **TOL)
    with pytest.raises(ValueError, match=r"make_mse_loss\(mamlkit\.mlp\) only"):
        mk.meta_batch_grad("maml", loss, params, support, support, lr=0.1, backend="fused")


def test_meta_train_and_evaluate_a_classifier_with_integer_labels():
    params, model_fn = mk.from_module(bn_net())
    loss = mk.make_cross_entropy_loss(model_fn)

    def sample(n, *, generator, dtype):
        centres = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]], dtype=F64)
        labels = torch.randint(0, 3, (n, 12), generator=generator)
        x = (centres[labels] + 0.3 * torch.randn(n, 12, 2, generator=generator, dtype=F64)).to(
            dtype
        )
        from mamlkit.tasks import SinusoidTasks  # any NamedTuple with support and query works

        return SinusoidTasks((x[:, :6], labels[:, :6]), (x[:, 6:], labels[:, 6:]), None, None)

    run = mk.train.meta_train(
        "maml",
        loss,
        params,
        sample,
        meta_batch_size=4,
        iterations=40,
        lr=0.3,
        meta_lr=0.05,
        steps=1,
        seed=0,
        progress=False,
    )
    assert run.history[-5:].mean() < run.history[:5].mean()
    test = sample(50, generator=torch.Generator().manual_seed(9), dtype=F64)
    result = mk.train.evaluate(loss, run.params, test.support, test.query, lr=0.3, steps=2)
    assert result.accuracy.shape == (3,) and result.accuracies.shape == (50, 3)
    torch.testing.assert_close(result.accuracy, result.accuracies.mean(0))
    assert result.accuracy[-1] > 0.8
    manual = [
        (
            loss.logits(
                mk.adapt(
                    loss, run.params, (test.support[0][i], test.support[1][i]), lr=0.3, steps=2
                ),
                test.query[0][i],
            ).argmax(-1)
            == test.query[1][i]
        )
        .double()
        .mean()
        for i in range(50)
    ]
    torch.testing.assert_close(result.accuracies[:, 2], torch.stack(manual))


# --- cross-entropy ------------------------------------------------------------------------------


def test_cross_entropy_loss_is_torchs_and_refuses_float_labels():
    params, model_fn = mk.from_module(plain_net())
    loss = mk.make_cross_entropy_loss(model_fn)
    x, y = data()
    torch.testing.assert_close(
        loss(params, (x[0], y[0])), nn.functional.cross_entropy(model_fn(params, x[0]), y[0])
    )
    with pytest.raises(TypeError, match="y must be an integer tensor of class labels"):
        loss(params, (x[0], y[0].double()))
    with pytest.raises(ValueError, match=r"\(N, classes\) logits and y must be \(N,\) labels"):
        loss(params, (x[0], y[0][:, None]))


def test_cross_entropy_hessian_split_against_torch_func_hessian():
    params, model_fn = mk.from_module(plain_net())
    x, y = data(n=7)
    gn, residual = mk.cross_entropy_hessian_parts(model_fn, params, x[0], y[0])
    loss = mk.make_cross_entropy_loss(model_fn)
    full = torch.func.hessian(lambda v: loss(unflatten_params(v, params), (x[0], y[0])))(
        flatten_params(params)
    )
    torch.testing.assert_close(gn + residual, full, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(gn).min() > -1e-12  # positive semi-definite
    assert torch.linalg.eigvalsh(residual).min() < -1e-6  # the residual part is not
    assert gn.shape == residual.shape == (flatten_params(params).numel(),) * 2


def test_cross_entropy_hessian_of_softmax_regression_in_closed_form():
    """Linear logits z = W x: the residual part is 0 and the Gauss–Newton part is
    (1/N) Σ_n (diag p_n − p_n p_nᵀ) ⊗ x_n x_nᵀ in W's row-major flat order."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, generator=g, dtype=F64)
    x = torch.randn(9, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (9,), generator=g)
    gn, residual = mk.cross_entropy_hessian_parts(lambda p, x: x @ p["w"].T, {"w": w}, x, y)
    p = torch.softmax(x @ w.T, -1)
    closed = (
        sum(
            torch.kron(torch.diag(p[n]) - torch.outer(p[n], p[n]), torch.outer(x[n], x[n]))
            for n in range(9)
        )
        / 9
    )
    torch.testing.assert_close(gn, closed, rtol=1e-12, atol=1e-14)
    assert residual.abs().max() == 0
    with pytest.raises(TypeError, match="integer class labels"):
        mk.cross_entropy_hessian_parts(lambda p, x: x @ p["w"].T, {"w": w}, x, y.double())


def test_the_logit_hessian_is_positive_semi_definite_for_any_probabilities():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(6, generator=g, dtype=F64) * 3, -1)
        m = torch.diag(p) - torch.outer(p, p)
        assert torch.linalg.eigvalsh(m).min() > -1e-15
        v = torch.randn(6, generator=g, dtype=F64)  # vᵀMv = Var_p(v) ≥ 0
        assert math.isclose(
            float(v @ m @ v),
            float((p * v**2).sum() - (p * v).sum() ** 2),
            rel_tol=1e-9,
            abs_tol=1e-15,
        )
