"""One error contract on every path: the same bad input gives the same error type and message
in every core function, every meta-batch backend and evaluation (mamlkit._checks)."""

from __future__ import annotations

import math

import pytest
import torch

import mamlkit as mk
from mamlkit.train import evaluate

F64 = torch.float64
MSE = mk.make_mse_loss(mk.mlp)


def params(dtype=F64, device="cpu"):
    return mk.init_mlp((1, 4, 1), seed=0, dtype=dtype, device=device)


def batch(n=5, dtype=F64, device="cpu", y_dtype=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g, dtype=F64).to(dtype=dtype, device=device)
    return x, torch.randn(n, 1, generator=g, dtype=F64).to(dtype=y_dtype or dtype, device=device)


SINGLE = {  # every single-task function, called on (params, support, query)
    "adapt": lambda p, s, q: mk.adapt(MSE, p, s, lr=0.1),
    "maml_grad": lambda p, s, q: mk.maml_grad(MSE, p, s, q, lr=0.1),
    "maml_grad_hvp": lambda p, s, q: mk.maml_grad_hvp(MSE, p, s, q, lr=0.1),
    "maml_grad_jacobian": lambda p, s, q: mk.maml_grad_jacobian(MSE, p, s, q, lr=0.1),
    "fomaml_grad": lambda p, s, q: mk.fomaml_grad(MSE, p, s, q, lr=0.1),
    "inner_jacobian": lambda p, s, q: mk.inner_jacobian(MSE, p, s, lr=0.1),
    "hessian": lambda p, s, q: mk.hessian(MSE, p, s),
    "hvp": lambda p, s, q: mk.hvp(MSE, p, s, p),
    "reptile_grad": lambda p, s, q: mk.reptile_grad(MSE, p, s, lr=0.1, steps=2),
    "imaml": lambda p, s, q: mk.imaml(MSE, p, s, q, lam=1.0, lr=0.1, steps=2),
    "es_maml_grad": lambda p, s, q: mk.es_maml_grad(
        MSE, p, s, q, lr=0.1, steps=1, num_samples=2, sigma=0.1, seed=0
    ),
}
BATCH_NAME = {
    "adapt": "batch",
    "inner_jacobian": "batch",
    "hessian": "batch",
    "hvp": "batch",
    "reptile_grad": "batch",
}


def meta(backend):
    def call(p, s, q):
        return mk.meta_batch_grad("maml", MSE, p, s, q, lr=0.1, backend=backend)

    return call


META = {
    **{f"meta_batch_grad[{b}]": meta(b) for b in ("vmap", "fused", "auto")},
    "evaluate": lambda p, s, q: evaluate(MSE, p, s, q, lr=0.1, steps=1),
}


def tasks(t=3, n=5, **kw):
    x, y = batch(t * n, **kw)
    return x.reshape(t, n, 1), y.reshape(t, n, 1)


@pytest.mark.parametrize("name", list(SINGLE))
def test_data_of_another_dtype_single(name):
    where = BATCH_NAME.get(name, "support")
    with pytest.raises(
        TypeError,
        match=rf"^{where} x must have the dtype of params \(torch.float32\), got torch.float64",
    ):
        SINGLE[name](params(torch.float32), batch(), batch())


@pytest.mark.parametrize("name", list(META))
def test_data_of_another_dtype_meta(name):
    with pytest.raises(
        TypeError,
        match=r"^query x must have the dtype of params \(torch.float32\), got torch.float64",
    ):
        META[name](params(torch.float32), tasks(dtype=torch.float32), tasks())


@pytest.mark.parametrize("name", [*SINGLE, *META])
@pytest.mark.parametrize(
    ("data", "match"),
    [
        (  # integer inputs are the model's business: mamlkit.mlp takes floats
            dict(dtype=torch.int64),
            r"x must be a floating-point tensor for mamlkit.mlp, got torch.int64",
        ),
        (
            dict(dtype=torch.complex128),
            r"x must be a real floating-point or integer tensor, got torch.complex128",
        ),
        (  # bool x is the model's business, bool targets are refused at the door
            dict(dtype=torch.bool),
            r"y must be a real floating-point or integer tensor, got torch.bool",
        ),
    ],
)
def test_integer_complex_and_bool_data_are_refused(name, data, match):
    fn = SINGLE.get(name) or META[name]
    make = batch if name in SINGLE else tasks
    with pytest.raises(TypeError, match=match):
        fn(params(), make(**data), make())


@pytest.mark.parametrize("name", [*SINGLE, *META])
def test_a_squared_error_refuses_integer_targets(name):
    fn = SINGLE.get(name) or META[name]
    make = batch if name in SINGLE else tasks
    with pytest.raises(TypeError, match="y must be a floating-point tensor for a squared error"):
        fn(params(), make(y_dtype=torch.int64), make(y_dtype=torch.int64))


@pytest.mark.parametrize("name", [*SINGLE, *META])
def test_data_on_another_device(name):
    fn = SINGLE.get(name) or META[name]
    make = batch if name in SINGLE else tasks
    with pytest.raises(ValueError, match=r"x must be on the device of params \(meta\), got cpu"):
        fn(params(device="meta"), make(), make())


@pytest.mark.parametrize("name", [*SINGLE, *META])
def test_mixed_dtype_params(name):
    fn = SINGLE.get(name) or META[name]
    make = batch if name in SINGLE else tasks
    p = {**params(), "b1": params()["b1"].float()}
    with pytest.raises(
        TypeError,
        match=r"^params must all have one dtype, got torch.float64 and torch.float32 "
        r"\(params\['b1'\]\)",
    ):
        fn(p, make(), make())


@pytest.mark.parametrize("name", [*SINGLE, *META])
def test_an_incomplete_mlp_dict(name):
    fn = SINGLE.get(name) or META[name]
    make = batch if name in SINGLE else tasks
    p = {k: v for k, v in params().items() if k != "b1"}
    with pytest.raises(ValueError, match="params must hold exactly the keys w0, b0"):
        fn(p, make(), make())


@pytest.mark.parametrize("name", [n for n in SINGLE if n not in BATCH_NAME or n == "reptile_grad"])
def test_an_empty_support_or_query_set_single(name):
    empty = batch(0)
    with pytest.raises(ValueError, match=r"must hold at least one point"):
        SINGLE[name](params(), empty, batch())
    if name not in BATCH_NAME:
        with pytest.raises(ValueError, match=r"^query must hold at least one point"):
            SINGLE[name](params(), batch(), empty)


@pytest.mark.parametrize("name", list(META))
@pytest.mark.parametrize(
    ("support", "match"),
    [
        (tasks(t=0), r"^support must hold at least one task"),
        (tasks(n=0), r"^support must hold at least one point per task"),
        (batch(), r"^support x must have shape \(tasks, points, features...\).*x\[None\]"),
        (None, r"^support must be a pair \(x, y\) of tensors, got NoneType"),
    ],
)
def test_malformed_meta_batches(name, support, match):
    with pytest.raises((ValueError, TypeError), match=match):
        META[name](params(), support, tasks())


@pytest.mark.parametrize("name", [n for n in SINGLE if n not in BATCH_NAME])
def test_query_none_is_refused_not_skipped(name):
    with pytest.raises(TypeError, match=r"^query must be a pair \(x, y\) of tensors, got NoneType"):
        SINGLE[name](params(), batch(), None)


@pytest.mark.parametrize("name", list(META))
def test_query_none_is_refused_meta(name):
    with pytest.raises(TypeError, match=r"^query must be a pair"):
        META[name](params(), tasks(), None)


@pytest.mark.parametrize("name", list(META)[:3])
def test_shape_errors_are_the_same_on_every_backend(name):
    x, y = tasks()
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., 1\), got \(5, 2\)"):
        META[name](params(), (torch.cat((x, x), -1), y), tasks())
    with pytest.raises(
        ValueError, match=r"^y must have the shape of the model's prediction \(5, 1\), got \(5, 2\)"
    ):
        META[name](params(), (x, torch.cat((y, y), -1)), tasks())


def test_nan_in_the_data_gives_nan_out():
    x, y = batch()
    y = y.clone()
    y[0] = math.nan
    assert all(
        torch.isnan(g).any() for g in mk.maml_grad(MSE, params(), (x, y), batch(), lr=0.1).values()
    )
    _, losses = mk.meta_batch_grad(
        "maml", MSE, params(), (x[None], y[None]), tasks(t=1), lr=0.1, backend="fused"
    )
    assert torch.isnan(losses).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, "float"])
def test_init_mlp_needs_a_floating_dtype(dtype):
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        mk.init_mlp((1, 2), dtype=dtype)


def test_mlp_refuses_a_missing_key_instead_of_ignoring_it():
    p = {k: v for k, v in params().items() if k != "w1"}
    with pytest.raises(ValueError, match="params must hold exactly the keys"):
        mk.mlp(p, torch.zeros(3, 1, dtype=F64))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True])
def test_seeds_are_checked_against_torchs_range(seed):
    with pytest.raises((ValueError, TypeError), match="seed must be"):
        mk.init_mlp((1, 2), seed=seed)
