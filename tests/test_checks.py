"""Bad input fails at the door with a ValueError/TypeError that names the argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import mamlkit
from mamlkit import (
    adapt,
    fomaml_grad,
    hessian,
    hvp,
    inner_jacobian,
    maml_grad,
    maml_grad_hvp,
    maml_grad_jacobian,
    mse_hessian_parts,
)

F64 = torch.float64
N = 5


def _model(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ p["w"]) * p["a"]  # (N, 1) @ (1, 1) → (N, 1)


LOSS = mamlkit.make_mse_loss(_model, reduction="mean")


def _params() -> dict[str, Tensor]:
    return {"w": torch.tensor([[0.5]], dtype=F64), "a": torch.tensor(1.5, dtype=F64)}


def _batch(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)


def _defaults() -> dict[str, Any]:
    return {
        "loss_fn": LOSS,
        "params": _params(),
        "support": _batch(seed=0),
        "query": _batch(seed=1),
        "lr": 0.1,
        "steps": 2,
    }


# name → how to call it from the keyword arguments of _defaults() (single-batch functions use
# the support batch as their `batch` argument)
META = {
    "maml_grad": maml_grad,
    "maml_grad_hvp": maml_grad_hvp,
    "maml_grad_jacobian": maml_grad_jacobian,
    "fomaml_grad": fomaml_grad,
}


def _meta_call(fn: Callable[..., object]) -> Callable[[dict[str, Any]], object]:
    def call(a: dict[str, Any]) -> object:
        return fn(a["loss_fn"], a["params"], a["support"], a["query"], lr=a["lr"], steps=a["steps"])

    return call


CALLS: dict[str, Callable[..., object]] = {
    **{name: _meta_call(fn) for name, fn in META.items()},
    "adapt": lambda a: adapt(a["loss_fn"], a["params"], a["support"], lr=a["lr"], steps=a["steps"]),
    "inner_jacobian": lambda a: inner_jacobian(
        a["loss_fn"], a["params"], a["support"], lr=a["lr"], steps=a["steps"]
    ),
}
WITH_QUERY = tuple(META)
WITH_LR = tuple(CALLS)
CURVATURE = {
    "hessian": lambda a: hessian(a["loss_fn"], a["params"], a["support"]),
    "hvp": lambda a: hvp(a["loss_fn"], a["params"], a["support"], a["params"]),
}
ALL = {**CALLS, **CURVATURE}
# the name the error must use for the (x, y) batch of each single-batch function
BATCH_NAME = {
    **dict.fromkeys(WITH_QUERY, "support"),
    **dict.fromkeys(("adapt", "inner_jacobian", "hessian", "hvp"), "batch"),
}


def _call(name: str, **changes: Any) -> object:
    arguments = {**_defaults(), **changes}
    return ALL[name](arguments)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_support_x_and_y_with_different_rows(name: str) -> None:
    x, y = _batch()
    with pytest.raises(
        ValueError, match=rf"^{BATCH_NAME[name]} x and y must have the same number of rows"
    ):
        _call(name, support=(x, y[:-1]))


@pytest.mark.parametrize("name", WITH_QUERY)
def test_query_x_and_y_with_different_rows(name: str) -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match=r"^query x and y must have the same number of rows"):
        _call(name, query=(x[:-1], y))


@pytest.mark.parametrize("which", ["support", "query"])
@pytest.mark.parametrize("name", WITH_QUERY)
def test_y_that_would_silently_broadcast_is_refused(name: str, which: str) -> None:
    # y of shape (1,) against x of shape (N, 1): (f − y)² would broadcast to (N, 1)
    x, _ = _batch()
    with pytest.raises(
        ValueError, match=rf"^{which} x and y must have the same number of rows.*\(5, 1\).*\(1,\)"
    ):
        _call(name, **{which: (x, torch.zeros(1, dtype=F64))})


@pytest.mark.parametrize("name", list(ALL))
def test_flat_target_against_column_predictions_is_refused(name: str) -> None:
    # y of shape (N,) against predictions (N, 1) would broadcast to (N, N) inside the loss
    x, y = _batch()
    with pytest.raises(
        ValueError, match=r"y must have the shape of the model's prediction \(5, 1\), got \(5,\)"
    ):
        _call(name, support=(x, y[:, 0]))


def test_make_mse_loss_refuses_broadcasting_targets_directly() -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match=r"y must have the shape of the model's prediction"):
        LOSS(_params(), (x, y[:, 0]))
    with pytest.raises(ValueError, match=r"y must have the shape of the model's prediction"):
        LOSS(_params(), (x, y[:1]))  # (1, 1) also broadcasts; the loss itself refuses it too


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        ("not a batch", TypeError, r"must be a pair \(x, y\) of tensors"),
        ((torch.zeros(N, 1),), TypeError, r"must be a pair \(x, y\) of tensors"),
        (
            (torch.zeros(N, 1, dtype=F64), np.zeros((N, 1))),
            TypeError,
            r" y must be a Tensor, got ndarray",
        ),
        (([0.0] * N, torch.zeros(N, 1)), TypeError, r" x must be a Tensor, got list"),
        (
            (torch.tensor(1.0, dtype=F64), torch.zeros(N, 1, dtype=F64)),
            ValueError,
            r" x must have a leading batch dimension",
        ),
    ],
)
@pytest.mark.parametrize("name", list(ALL))
def test_malformed_batch(name: str, batch: object, error: type, message: str) -> None:
    with pytest.raises(error, match=rf"^{BATCH_NAME[name]}.*{message}"):
        _call(name, support=batch)


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------


def _per_row_loss(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return ((_model(params, x) - y) ** 2)[:, 0]  # (N,), forgot the reduction


@pytest.mark.parametrize("name", list(ALL))
def test_loss_returning_a_non_scalar(name: str) -> None:
    with pytest.raises(
        ValueError, match=r"^loss_fn must return a scalar \(0-d\) tensor, got \(5,\)"
    ):
        _call(name, loss_fn=_per_row_loss)


@pytest.mark.parametrize("name", list(ALL))
def test_loss_returning_a_python_number(name: str) -> None:
    with pytest.raises(TypeError, match=r"^loss_fn must return a tensor, got float"):
        _call(name, loss_fn=lambda p, b: 1.0)


@pytest.mark.parametrize("name", list(ALL))
def test_loss_returning_an_integer_tensor(name: str) -> None:
    """(It used to give an all-zero gradient on some engines and a raw crash on others.)"""
    with pytest.raises(TypeError, match=r"^loss_fn must return a floating-point tensor, got torch"):
        _call(name, loss_fn=lambda p, b: next(iter(p.values())).sum().long())


@pytest.mark.parametrize("name", list(ALL))
def test_loss_that_is_not_callable(name: str) -> None:
    with pytest.raises(TypeError, match=r"^loss_fn must be callable"):
        _call(name, loss_fn="mse")


# ---------------------------------------------------------------------------------------------
# steps and lr
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_LR)
def test_negative_steps(name: str) -> None:
    with pytest.raises(ValueError, match=r"^steps must be >= 0, got -1"):
        _call(name, steps=-1)


@pytest.mark.parametrize("steps", [1.0, True, "2", None])
@pytest.mark.parametrize("name", WITH_LR)
def test_steps_that_is_not_an_int(name: str, steps: object) -> None:
    with pytest.raises(TypeError, match=r"^steps must be an int"):
        _call(name, steps=steps)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -float("inf"), np.float64("nan")])
@pytest.mark.parametrize("name", WITH_LR)
def test_non_finite_lr(name: str, lr: float) -> None:
    with pytest.raises(ValueError, match=r"^lr must be finite, got (nan|inf|-inf)"):
        _call(name, lr=lr)


@pytest.mark.parametrize("lr", [True, False, "0.1", None, torch.tensor(0.1), 1j])
@pytest.mark.parametrize("name", WITH_LR)
def test_lr_that_is_not_a_real_number(name: str, lr: object) -> None:
    with pytest.raises(TypeError, match=r"^lr must be a real number"):
        _call(name, lr=lr)


@pytest.mark.parametrize("lr", [0, 0.0, 1, -0.1, np.float64(0.1), np.float32(0.1)])
@pytest.mark.parametrize("name", WITH_LR)
def test_ordinary_real_lr_is_accepted(name: str, lr: object) -> None:
    _call(name, lr=lr)


def test_first_order_must_be_a_bool() -> None:
    a = _defaults()
    with pytest.raises(TypeError, match=r"^first_order must be a bool, got int"):
        adapt(a["loss_fn"], a["params"], a["support"], lr=0.1, first_order=1)


# ---------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ([torch.zeros(1)], TypeError, r"^params must be a dict\[str, Tensor\], got list"),
        (torch.zeros(2), TypeError, r"^params must be a dict\[str, Tensor\], got Tensor"),
        ({}, ValueError, r"^params must contain at least one tensor"),
        (
            {"w": torch.tensor([[1]]), "a": torch.tensor(1.0)},
            TypeError,
            r"^params\['w'\] must be a floating-point tensor, got torch.int64",
        ),
        (
            {"w": torch.tensor([[True]])},
            TypeError,
            r"^params\['w'\] must be a floating-point tensor, got torch.bool",
        ),
        (
            {"w": [[0.5]], "a": torch.tensor(1.0)},
            TypeError,
            r"^params\['w'\] must be a Tensor, got list",
        ),
        ({0: torch.zeros(1, 1)}, TypeError, r"^params keys must be str, got 0"),
    ],
)
@pytest.mark.parametrize("name", list(ALL))
def test_bad_params(name: str, params: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _call(name, params=params)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ([torch.zeros(1)], TypeError, r"^params must be a dict"),
        ({}, ValueError, r"^params must contain at least one tensor"),
        (
            {"w": torch.tensor([[1]]), "a": torch.tensor(1.0)},
            TypeError,
            r"^params\['w'\] must be a floating-point",
        ),
    ],
)
def test_bad_params_mse_hessian_parts(params: object, error: type, message: str) -> None:
    x, y = _batch()
    with pytest.raises(error, match=message):
        mse_hessian_parts(_model, params, x, y)


def test_mse_hessian_parts_bad_data() -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match=r"x and y must have the same number of rows"):
        mse_hessian_parts(_model, _params(), x, y[:1])
    with pytest.raises(
        ValueError, match=r"^y must have the shape of model_fn\(params, x\), \(5, 1\), got \(5,\)"
    ):
        mse_hessian_parts(_model, _params(), x, y[:, 0])


# ---------------------------------------------------------------------------------------------
# the direction v of hvp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v", "error", "message"),
    [
        (
            {"w": torch.ones(1, 1, dtype=F64)},
            ValueError,
            r"^v must have the keys of params \['w', 'a'\], got \['w'\]",
        ),
        (
            {"w": torch.ones(1, 1), "a": torch.ones(()), "b": torch.ones(())},
            ValueError,
            r"^v must have the keys of params",
        ),
        (
            {"a": torch.ones(()), "w": torch.ones(1, 1)},
            ValueError,
            r"^v must have the keys of params \['w', 'a'\], got \['a', 'w'\]",
        ),
        (
            {"w": torch.ones(1, dtype=F64), "a": torch.ones((), dtype=F64)},
            ValueError,
            r"^v\['w'\] must have shape \(1, 1\), got \(1,\)",
        ),
        (
            {"w": torch.ones(1, 1, dtype=F64), "a": torch.ones(1, dtype=F64)},
            ValueError,
            r"^v\['a'\] must have shape \(\), got \(1,\)",
        ),
        (
            {"w": torch.ones(1, 1, dtype=torch.int64), "a": torch.ones(())},
            TypeError,
            r"^v\['w'\] must be a floating-point tensor",
        ),
        (torch.ones(2), TypeError, r"^v must be a dict"),
        ({}, ValueError, r"^v must contain at least one tensor"),
    ],
)
def test_hvp_bad_direction(v: object, error: type, message: str) -> None:
    a = _defaults()
    with pytest.raises(error, match=message):
        hvp(a["loss_fn"], a["params"], a["support"], v)


# ---------------------------------------------------------------------------------------------
# models, losses, helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(1,), (), (1, 0, 1), (1, -3), (1.0, 4), (True, 4)])
def test_init_mlp_bad_sizes(sizes: tuple) -> None:
    with pytest.raises(ValueError, match=r"^sizes must list at least two positive ints"):
        mamlkit.init_mlp(sizes)


def test_init_mlp_bad_scheme() -> None:
    with pytest.raises(ValueError, match=r"^scheme must be 'torch' or 'paper', got 'xavier'"):
        mamlkit.init_mlp((1, 2), scheme="xavier")


def test_mlp_bad_activation_and_input() -> None:
    params = mamlkit.init_mlp((3, 4, 1))
    with pytest.raises(
        ValueError, match=r"^activation must be one of \['relu', 'tanh'\], got 'gelu'"
    ):
        mamlkit.mlp(params, torch.zeros(2, 3), activation="gelu")
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., 3\), got \(2, 1\)"):
        mamlkit.mlp(params, torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"^x must have shape"):
        mamlkit.mlp(params, torch.tensor(1.0))


def test_make_mse_loss_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"^reduction must be one of \('mean', 'sum', 'half_sum'\), got 'avg'"
    ):
        mamlkit.make_mse_loss(_model, reduction="avg")
    with pytest.raises(TypeError, match=r"^model_fn must be callable"):
        mamlkit.make_mse_loss("mlp")


def test_unflatten_params_bad_vector() -> None:
    with pytest.raises(ValueError, match=r"^vector must have shape \(2,\), got \(3,\)"):
        mamlkit.unflatten_params(torch.zeros(3), _params())


@pytest.mark.parametrize(
    ("threads", "error", "message"),
    [
        (0, ValueError, r"^num_threads must be >= 1, got 0"),
        (-1, ValueError, r"^num_threads must be >= 1, got -1"),
        (True, TypeError, r"^num_threads must be an int, got bool"),
        (1.5, TypeError, r"^num_threads must be an int, got float"),
    ],
)
def test_set_cpu_threads_bad_count(threads: object, error: type, message: str) -> None:
    before = torch.get_num_threads()
    with pytest.raises(error, match=message):
        mamlkit.set_cpu_threads(threads)
    assert torch.get_num_threads() == before
