"""Hessians, Hessian-vector products and the MSE split, against independent references.

References: ``torch.func.hessian`` of a flat loss written by hand, the closed form H = c·XᵀX of
linear least squares, central differences of the gradient, per-row ``jacrev`` Jacobians.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.func import grad, jacrev

import mamlkit
from mamlkit import flatten_params, hessian, hvp, mse_hessian_parts, unflatten_params

F64 = torch.float64
N = 7

# torch.func.hessian is forward-over-reverse (jacfwd∘jacrev), a different path from mamlkit's
# reverse-over-reverse; its forward-mode decompositions go through torch.jit.script, which warns
# inside torch itself on this torch version.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tanh_mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return mamlkit.mlp(p, x, activation="tanh")


def _tanh_mlp_1d(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return mamlkit.mlp(p, x, activation="tanh")[:, 0]


def _linear(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return x @ p["w"] + p["b"]


def _linear_multi(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return x @ p["W"].T + p["b"]


def _scalar_param(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return p["a"] * torch.tanh(x @ p["w"]) + p["c"]


def _problem(name: str) -> tuple[Callable, dict[str, Tensor], Tensor, Tensor]:
    """(model_fn, params, x, y) with y shaped like the predictions; P ≤ 25."""
    g = _gen(sum(map(ord, name)))
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    if name == "tanh_mlp":  # (N, 2) outputs
        return _tanh_mlp, mamlkit.init_mlp((2, 4, 2), seed=3, dtype=F64), randn(N, 2), randn(N, 2)
    if name == "tanh_mlp_1d":  # (N,) outputs
        return _tanh_mlp_1d, mamlkit.init_mlp((1, 5, 1), seed=4, dtype=F64), randn(N, 1), randn(N)
    if name == "scalar_param":  # 0-d parameters, (N,) outputs
        params = {
            "a": torch.tensor(1.2, dtype=F64),
            "w": randn(3),
            "c": torch.tensor(0.1, dtype=F64),
        }
        return _scalar_param, params, randn(N, 3), randn(N)
    if name == "linear":
        return _linear, {"w": randn(3), "b": randn(())}, randn(N, 3), randn(N)
    if name == "linear_multi":
        return _linear_multi, {"W": randn(2, 3), "b": randn(2)}, randn(N, 3), randn(N, 2)
    raise ValueError(name)  # pragma: no cover


MODELS = ("tanh_mlp", "tanh_mlp_1d", "scalar_param", "linear", "linear_multi")
NONLINEAR = ("tanh_mlp", "tanh_mlp_1d", "scalar_param")
LINEAR = ("linear", "linear_multi")
REDUCTIONS = ("mean", "sum", "half_sum")


def _half_sum_by_hand(model_fn: Callable, params: dict[str, Tensor], x: Tensor, y: Tensor):
    """v ↦ ½ Σ ‖f(x_j; v) − y_j‖², written without mamlkit's loss."""

    def loss(vector: Tensor) -> Tensor:
        return 0.5 * ((model_fn(unflatten_params(vector, params), x) - y) ** 2).sum()

    return loss


def _scale(reduction: str, entries: int) -> float:
    return {"half_sum": 1.0, "sum": 2.0, "mean": 2.0 / entries}[reduction]


def _design_matrix(name: str, x: Tensor) -> Tensor:
    """The (N·O, P) matrix A with f(θ) = Aθ (flat order), for the linear models."""
    ones = torch.ones(x.shape[0], 1, dtype=F64)
    if name == "linear":
        return torch.cat([x, ones], dim=1)
    # f_{j,o} = Σ_i W_{o,i} x_{j,i} + b_o, θ = (W row-major, b)
    outputs = 2
    eye = torch.eye(outputs, dtype=F64)
    rows = [
        torch.cat([torch.kron(eye[o], x[j]), eye[o]])
        for j in range(x.shape[0])
        for o in range(outputs)
    ]
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# hessian
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("model", MODELS)
def test_hessian_matches_torch_func_hessian(model: str, reduction: str) -> None:
    model_fn, params, x, y = _problem(model)
    loss = mamlkit.make_mse_loss(model_fn, reduction=reduction)
    scale = _scale(reduction, y.numel())
    by_hand = _half_sum_by_hand(model_fn, params, x, y)
    expected = scale * torch.func.hessian(by_hand)(flatten_params(params))
    actual = hessian(loss, params, (x, y))
    p = mamlkit.num_params(params)
    assert actual.shape == (p, p) and actual.dtype == F64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual, actual.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("model", LINEAR)
def test_hessian_of_linear_least_squares_is_xtx(model: str, reduction: str) -> None:
    model_fn, params, x, y = _problem(model)
    a = _design_matrix(model, x)
    # the design matrix is right: f(θ) = Aθ
    torch.testing.assert_close(model_fn(params, x).reshape(-1), a @ flatten_params(params))
    loss = mamlkit.make_mse_loss(model_fn, reduction=reduction)
    expected = _scale(reduction, y.numel()) * a.T @ a
    torch.testing.assert_close(hessian(loss, params, (x, y)), expected, rtol=1e-12, atol=1e-12)


def test_hessian_flat_order_follows_dict_insertion_order() -> None:
    # L = w₀²·b + 3 b², θ = (w₀, w₁, b): the (w₀, b) entry sits at (0, 2)
    loss = lambda p, batch: p["w"][0] ** 2 * p["b"] + 3 * p["b"] ** 2  # noqa: E731
    params = {"w": torch.tensor([2.0, 5.0], dtype=F64), "b": torch.tensor(0.5, dtype=F64)}
    batch = (torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64))
    expected = torch.tensor([[1.0, 0.0, 4.0], [0.0, 0.0, 0.0], [4.0, 0.0, 6.0]], dtype=F64)
    torch.testing.assert_close(hessian(loss, params, batch), expected, rtol=0, atol=0)
    swapped = {"b": params["b"], "w": params["w"]}
    order = [2, 0, 1]
    torch.testing.assert_close(
        hessian(loss, swapped, batch), expected[order][:, order], rtol=0, atol=0
    )


# ---------------------------------------------------------------------------------------------
# hvp
# ---------------------------------------------------------------------------------------------


def _direction(params: dict[str, Tensor], seed: int = 11) -> dict[str, Tensor]:
    v = torch.randn(mamlkit.num_params(params), generator=_gen(seed), dtype=F64)
    return unflatten_params(v, params)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("model", LINEAR)
def test_hvp_of_linear_least_squares_is_xtx_v(model: str, reduction: str) -> None:
    model_fn, params, x, y = _problem(model)
    a = _design_matrix(model, x)
    v = _direction(params)
    loss = mamlkit.make_mse_loss(model_fn, reduction=reduction)
    expected = _scale(reduction, y.numel()) * a.T @ (a @ flatten_params(v))
    actual = hvp(loss, params, (x, y), v)
    assert list(actual) == list(params)
    assert all(actual[k].shape == params[k].shape for k in params)
    torch.testing.assert_close(flatten_params(actual), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_hvp_matches_dense_hessian_and_gradient_differences(model: str) -> None:
    model_fn, params, x, y = _problem(model)
    loss = mamlkit.make_mse_loss(model_fn, reduction="mean")
    v = _direction(params)
    actual = flatten_params(hvp(loss, params, (x, y), v))
    dense = hessian(loss, params, (x, y)) @ flatten_params(v)
    torch.testing.assert_close(actual, dense, rtol=1e-12, atol=1e-12)
    # H v = d/dε ∇L(θ + εv) at 0, by central differences of the first-order gradient
    eps = 1e-5

    def grad_at(t: float) -> Tensor:
        shifted = {k: params[k] + t * v[k] for k in params}
        return flatten_params(grad(loss)(shifted, (x, y)))

    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    torch.testing.assert_close(actual, fd, rtol=1e-6, atol=1e-8)


def test_hvp_float32_in_float32_out() -> None:
    model_fn, params, x, y = _problem("tanh_mlp")
    params32 = {k: v.float() for k, v in params.items()}
    v32 = {k: t.float() for k, t in _direction(params).items()}
    loss = mamlkit.make_mse_loss(model_fn)
    out = hvp(loss, params32, (x.float(), y.float()), v32)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert hessian(loss, params32, (x.float(), y.float())).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# mse_hessian_parts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_mse_hessian_parts_sum_to_the_half_sum_hessian(model: str) -> None:
    model_fn, params, x, y = _problem(model)
    gauss_newton, residual = mse_hessian_parts(model_fn, params, x, y)
    p = mamlkit.num_params(params)
    assert gauss_newton.shape == residual.shape == (p, p)
    full = torch.func.hessian(_half_sum_by_hand(model_fn, params, x, y))(flatten_params(params))
    torch.testing.assert_close(gauss_newton + residual, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_gauss_newton_is_the_sum_of_per_row_jtj(model: str) -> None:
    model_fn, params, x, y = _problem(model)
    gauss_newton, _ = mse_hessian_parts(model_fn, params, x, y)
    p = mamlkit.num_params(params)
    expected = torch.zeros(p, p, dtype=F64)
    for j in range(x.shape[0]):  # J_j = ∂f(x_j)/∂θ, shape (O, P)

        def f_j(vector: Tensor, j: int = j) -> Tensor:
            return model_fn(unflatten_params(vector, params), x[j : j + 1]).reshape(-1)

        jac = jacrev(f_j)(flatten_params(params))
        expected += jac.T @ jac
    torch.testing.assert_close(gauss_newton, expected, rtol=1e-12, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(gauss_newton)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.abs().max(), "Gauss-Newton must be PSD"


@pytest.mark.parametrize("model", NONLINEAR)
def test_residual_part_is_residual_weighted_model_hessian(model: str) -> None:
    model_fn, params, x, y = _problem(model)
    _, residual = mse_hessian_parts(model_fn, params, x, y)
    vector = flatten_params(params)
    r = (model_fn(params, x) - y).reshape(-1)  # f − y, the sign convention of the docstring
    expected = torch.zeros_like(residual)
    for i in range(r.numel()):

        def f_i(v: Tensor, i: int = i) -> Tensor:
            return model_fn(unflatten_params(v, params), x).reshape(-1)[i]

        expected += r[i] * torch.func.hessian(f_i)(vector)
    torch.testing.assert_close(residual, expected, rtol=1e-12, atol=1e-12)
    assert residual.abs().max() > 1e-3, "a nonlinear model with nonzero residuals has R ≠ 0"
    # R is indefinite in general, unlike Gauss-Newton
    eigenvalues = torch.linalg.eigvalsh(residual)
    assert eigenvalues.min() < 0


@pytest.mark.parametrize("model", LINEAR)
def test_residual_part_vanishes_for_a_model_linear_in_theta(model: str) -> None:
    model_fn, params, x, y = _problem(model)
    gauss_newton, residual = mse_hessian_parts(model_fn, params, x, y)
    assert (model_fn(params, x) - y).abs().max() > 0.1  # nonzero residuals, still R = 0
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-14)
    a = _design_matrix(model, x)
    torch.testing.assert_close(gauss_newton, a.T @ a, rtol=1e-12, atol=1e-12)


def test_mse_hessian_parts_residual_vanishes_at_an_interpolating_point() -> None:
    model_fn, params, x, _ = _problem("tanh_mlp_1d")
    y = model_fn(params, x).detach()  # zero residual: H = GN exactly
    gauss_newton, residual = mse_hessian_parts(model_fn, params, x, y)
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-14)
    full = torch.func.hessian(_half_sum_by_hand(model_fn, params, x, y))(flatten_params(params))
    torch.testing.assert_close(gauss_newton, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "bad_shape"),
    [("tanh_mlp_1d", (N, 1)), ("tanh_mlp", (N,)), ("tanh_mlp", (N, 1)), ("linear", (N, 1))],
)
def test_mse_hessian_parts_refuses_y_shaped_unlike_the_predictions(
    model: str, bad_shape: tuple
) -> None:
    model_fn, params, x, _ = _problem(model)
    with pytest.raises(ValueError, match=r"y must have the shape"):
        mse_hessian_parts(model_fn, params, x, torch.zeros(bad_shape, dtype=F64))


def test_mse_hessian_parts_refuses_y_with_other_rows() -> None:
    model_fn, params, x, _ = _problem("tanh_mlp_1d")
    with pytest.raises(ValueError, match=r"same number of rows"):
        mse_hessian_parts(model_fn, params, x, torch.zeros(N + 1, dtype=F64))
