"""The meta-gradient engines against independent references.

References: float64 central finite differences of ``L_q(adapt(θ))``; closed forms for linear
least squares (H = c·XᵀX, ``inner_jacobian = (I − αH)^k``); ``torch.func.jacrev`` of ``adapt``;
Jacobian products built by hand from ``mamlkit.hessian`` along the trajectory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import central_difference
from torch import Tensor
from torch.func import grad, jacrev

import mamlkit
from mamlkit import (
    adapt,
    flatten_params,
    fomaml_grad,
    inner_jacobian,
    maml_grad,
    maml_grad_hvp,
    maml_grad_jacobian,
    unflatten_params,
)

F64 = torch.float64
STEPS = (0, 1, 2, 3)
LRS = (0.02, 0.1)
ENGINES = {
    "maml_grad": maml_grad,
    "maml_grad_hvp": maml_grad_hvp,
    "maml_grad_jacobian": maml_grad_jacobian,
}
MODELS = ("tanh_mlp", "linear", "multi_output", "scalar_param")
NONQUADRATIC = ("tanh_mlp", "multi_output", "scalar_param")
# rows and outputs of the support / query sets (different on purpose)
N_SUPPORT, N_QUERY = 6, 5


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


def _tanh_mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return mamlkit.mlp(p, x, activation="tanh")


def _linear(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return x @ p["w"] + p["b"]


def _multi_output(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ p["W"].T) + p["b"]


def _scalar_param(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return p["a"] * torch.tanh(x @ p["w"]) + p["c"]


@dataclass(frozen=True)
class Case:
    """A model, its parameters, a support and a query batch, and the loss convention."""

    name: str
    model_fn: Callable[[dict[str, Tensor], Tensor], Tensor]
    params: dict[str, Tensor]
    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    reduction: str

    @property
    def loss_fn(self) -> Callable:
        return mamlkit.make_mse_loss(self.model_fn, reduction=self.reduction)


def make_case(name: str, dtype: torch.dtype = F64, reduction: str | None = None) -> Case:
    """Seeded tiny problems (P ≤ 17); query inputs are shifted so H_s ≠ H_q."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    if name == "tanh_mlp":
        params = mamlkit.init_mlp((2, 4, 1), seed=1, dtype=F64)
        model, d_in, d_out, red = _tanh_mlp, 2, (1,), "mean"
    elif name == "linear":
        model, params, d_in, d_out, red = (
            _linear,
            {"w": randn(3), "b": randn(())},
            3,
            (),
            "half_sum",
        )
    elif name == "multi_output":
        params = {"W": 0.7 * randn(2, 3), "b": 0.1 * randn(2)}
        model, d_in, d_out, red = _multi_output, 3, (2,), "sum"
    elif name == "scalar_param":
        params = {
            "a": torch.tensor(0.8, dtype=F64),
            "w": randn(2),
            "c": torch.tensor(-0.3, dtype=F64),
        }
        model, d_in, d_out, red = _scalar_param, 2, (), "mean"
    else:  # pragma: no cover
        raise ValueError(name)
    support = (0.7 * randn(N_SUPPORT, d_in), randn(N_SUPPORT, *d_out))
    query = (1.3 * randn(N_QUERY, d_in) + 0.4, randn(N_QUERY, *d_out))
    cast = lambda t: t.to(dtype)  # noqa: E731
    return Case(
        name,
        model,
        {k: cast(v) for k, v in params.items()},
        (cast(support[0]), cast(support[1])),
        (cast(query[0]), cast(query[1])),
        reduction or red,
    )


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def meta_objective(case: Case, lr: float, steps: int) -> Callable[[Tensor], Tensor]:
    """v ↦ L_q(θ_k(v)), the flat meta-objective."""

    def f(vector: Tensor) -> Tensor:
        theta = unflatten_params(vector, case.params)
        adapted = adapt(case.loss_fn, theta, case.support, lr=lr, steps=steps)
        return case.loss_fn(adapted, case.query)

    return f


def flat(tree: dict[str, Tensor]) -> Tensor:
    return flatten_params(tree)


def trajectory(case: Case, lr: float, steps: int) -> list[dict[str, Tensor]]:
    return [
        adapt(case.loss_fn, case.params, case.support, lr=lr, steps=j) for j in range(steps + 1)
    ]


def step_jacobians(case: Case, lr: float, steps: int) -> list[Tensor]:
    """J_j = I − α H_s(θ_j) for j = 0 … k−1, each from mamlkit.hessian at its own iterate."""
    path = trajectory(case, lr, steps)
    eye = torch.eye(mamlkit.num_params(case.params), dtype=F64)
    return [eye - lr * mamlkit.hessian(case.loss_fn, path[j], case.support) for j in range(steps)]


def chain(factors: list[Tensor], size: int) -> Tensor:
    """factors[-1] @ … @ factors[0] (later steps on the left)."""
    product = torch.eye(size, dtype=F64)
    for factor in factors:
        product = factor @ product
    return product


# ---------------------------------------------------------------------------------------------
# Exactness: finite differences, agreement between engines, steps = 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", MODELS)
def test_maml_grad_matches_central_differences(model: str, steps: int, lr: float) -> None:
    case = make_case(model)
    expected = central_difference(meta_objective(case, lr, steps), flat(case.params))
    actual = maml_grad(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps)
    torch.testing.assert_close(flat(actual), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("engine", ["maml_grad_hvp", "maml_grad_jacobian"])
@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", MODELS)
def test_exact_engines_agree(model: str, steps: int, lr: float, engine: str) -> None:
    case = make_case(model)
    args = (case.loss_fn, case.params, case.support, case.query)
    reference = maml_grad(*args, lr=lr, steps=steps)
    actual = ENGINES[engine](*args, lr=lr, steps=steps)
    assert list(actual) == list(case.params)
    torch.testing.assert_close(flat(actual), flat(reference), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", [*ENGINES, "fomaml_grad"])
@pytest.mark.parametrize("model", MODELS)
def test_zero_steps_is_the_plain_query_gradient(model: str, engine: str) -> None:
    case = make_case(model)
    fn = {**ENGINES, "fomaml_grad": fomaml_grad}[engine]
    actual = fn(case.loss_fn, case.params, case.support, case.query, lr=0.1, steps=0)
    query_loss = lambda v: case.loss_fn(unflatten_params(v, case.params), case.query)  # noqa: E731
    expected = central_difference(query_loss, flat(case.params))
    torch.testing.assert_close(flat(actual), expected, rtol=1e-6, atol=1e-8)
    # and ∂θ_0/∂θ_0 = I, the identity, not a vector of ones
    eye = torch.eye(expected.numel(), dtype=F64)
    jac = inner_jacobian(case.loss_fn, case.params, case.support, lr=0.1, steps=0)
    torch.testing.assert_close(jac, eye, rtol=0, atol=0)


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", MODELS)
def test_adapt_takes_plain_gradient_steps_on_the_support_set(
    model: str, steps: int, lr: float
) -> None:
    case = make_case(model)
    support_loss = lambda v: case.loss_fn(unflatten_params(v, case.params), case.support)  # noqa: E731
    theta = flat(case.params)
    for _ in range(steps):  # θ_{j+1} = θ_j − α ∇L_s(θ_j), the gradient by finite differences
        theta = theta - lr * central_difference(support_loss, theta)
    actual = adapt(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    assert list(actual) == list(case.params)
    torch.testing.assert_close(flat(actual), theta, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Linear least squares: everything in closed form
# ---------------------------------------------------------------------------------------------


def _design(x: Tensor) -> Tensor:
    """[X, 1]: the linear model x·w + b as a matrix product with θ = (w, b)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _scale(reduction: str, n: int) -> float:
    """L = c·½‖Xθ − y‖², so ∇L = c·Xᵀ(Xθ − y) and H = c·XᵀX."""
    return {"half_sum": 1.0, "sum": 2.0, "mean": 2.0 / n}[reduction]


@pytest.mark.parametrize("reduction", ["half_sum", "sum", "mean"])
@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("steps", STEPS)
def test_linear_least_squares_closed_forms(reduction: str, steps: int, lr: float) -> None:
    case = make_case("linear", reduction=reduction)
    (xs, ys), (xq, yq) = case.support, case.query
    a_s, a_q = _design(xs), _design(xq)
    c_s, c_q = _scale(reduction, N_SUPPORT), _scale(reduction, N_QUERY)
    h_s = c_s * a_s.T @ a_s
    eye = torch.eye(4, dtype=F64)

    # H = c XᵀX (constant in θ)
    torch.testing.assert_close(mamlkit.hessian(case.loss_fn, case.params, case.support), h_s)

    # θ_k by the explicit recursion
    theta = flat(case.params)
    for _ in range(steps):
        theta = theta - lr * c_s * a_s.T @ (a_s @ theta - ys)
    adapted = adapt(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    torch.testing.assert_close(flat(adapted), theta, rtol=1e-12, atol=1e-12)

    # ∂θ_k/∂θ = (I − αH)^k
    jac = torch.linalg.matrix_power(eye - lr * h_s, steps)
    actual_jac = inner_jacobian(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    torch.testing.assert_close(actual_jac, jac, rtol=1e-12, atol=1e-12)

    # dL_q(θ_k)/dθ = ((I − αH_s)^k)ᵀ ∇L_q(θ_k), ∇L_q(θ_k) = c_q X_qᵀ(X_q θ_k − y_q)
    expected = jac.T @ (c_q * a_q.T @ (a_q @ theta - yq))
    for engine in ENGINES.values():
        actual = engine(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps)
        torch.testing.assert_close(flat(actual), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The inner-loop Jacobian and the order of its factors
# ---------------------------------------------------------------------------------------------


def _adapt_jacrev(case: Case, lr: float, steps: int, first_order: bool = False) -> Tensor:
    def flat_adapt(vector: Tensor) -> Tensor:
        theta = unflatten_params(vector, case.params)
        return flat(
            adapt(case.loss_fn, theta, case.support, lr=lr, steps=steps, first_order=first_order)
        )

    return jacrev(flat_adapt)(flat(case.params))


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", MODELS)
def test_inner_jacobian_matches_jacrev_of_adapt(model: str, steps: int, lr: float) -> None:
    case = make_case(model)
    expected = _adapt_jacrev(case, lr, steps)
    actual = inner_jacobian(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    p = mamlkit.num_params(case.params)
    assert actual.shape == (p, p)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("model", NONQUADRATIC)
def test_inner_jacobian_product_order(model: str, steps: int) -> None:
    """∂θ_k/∂θ_0 = J_{k−1} ⋯ J_0 (later steps on the left); J_0 ⋯ J_{k−1} is wrong."""
    case, lr = make_case(model), 0.3
    factors = step_jacobians(case, lr, steps)
    p = mamlkit.num_params(case.params)
    ordered = chain(factors, p)
    reversed_order = chain(factors[::-1], p)
    by_jacrev = _adapt_jacrev(case, lr, steps)
    torch.testing.assert_close(ordered, by_jacrev, rtol=1e-12, atol=1e-12)
    actual = inner_jacobian(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    torch.testing.assert_close(actual, ordered, rtol=1e-12, atol=1e-12)
    # the reversed product is measurably different (the J_j do not commute)
    gap = (reversed_order - by_jacrev).abs().max()
    assert gap > 1e-4 * by_jacrev.abs().max(), f"reversed order is indistinguishable: {gap}"
    # and the meta-gradient uses the transpose of the correctly ordered product
    query_grad = flat(
        fomaml_grad(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps)
    )
    meta = flat(maml_grad(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps))
    torch.testing.assert_close(meta, ordered.T @ query_grad, rtol=1e-12, atol=1e-12)
    assert (meta - reversed_order.T @ query_grad).abs().max() > 1e-6 * meta.abs().max()


# ---------------------------------------------------------------------------------------------
# First-order MAML really is first order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", MODELS)
def test_fomaml_is_the_query_gradient_at_the_adapted_point(
    model: str, steps: int, lr: float
) -> None:
    case = make_case(model)
    theta_k = adapt(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    query_loss = lambda v: case.loss_fn(unflatten_params(v, case.params), case.query)  # noqa: E731
    expected = central_difference(query_loss, flat(theta_k))
    actual = fomaml_grad(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps)
    torch.testing.assert_close(flat(actual), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("steps", STEPS)
def test_fomaml_result_has_no_graph_back_to_theta(steps: int) -> None:
    case = make_case("tanh_mlp")
    params = {k: v.clone().requires_grad_(True) for k, v in case.params.items()}
    out = fomaml_grad(case.loss_fn, params, case.support, case.query, lr=0.1, steps=steps)
    for key, value in out.items():
        assert value.grad_fn is None, key
        assert not value.requires_grad, key


@pytest.mark.parametrize("engine", list(ENGINES))
def test_exact_engines_return_values_not_graphs(engine: str) -> None:
    case = make_case("tanh_mlp")
    params = {k: v.clone().requires_grad_(True) for k, v in case.params.items()}
    out = ENGINES[engine](case.loss_fn, params, case.support, case.query, lr=0.1, steps=2)
    assert all(v.grad_fn is None and not v.requires_grad for v in out.values())


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", MODELS)
def test_first_order_adapt_has_identity_jacobian(model: str, steps: int) -> None:
    case = make_case(model)
    lr = 0.1
    jac = _adapt_jacrev(case, lr, steps, first_order=True)
    eye = torch.eye(jac.shape[0], dtype=F64)
    torch.testing.assert_close(jac, eye, rtol=0, atol=1e-15)
    # the iterate itself is the same point as the second-order one
    second = adapt(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    first = adapt(case.loss_fn, case.params, case.support, lr=lr, steps=steps, first_order=True)
    torch.testing.assert_close(flat(first), flat(second), rtol=0, atol=0)
    # ... and differentiating L_q there gives FOMAML
    fo = grad(
        lambda p: case.loss_fn(
            adapt(case.loss_fn, p, case.support, lr=lr, steps=steps, first_order=True), case.query
        )
    )(case.params)
    expected = fomaml_grad(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps)
    torch.testing.assert_close(flat(fo), flat(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("model", MODELS)
def test_one_step_maml_minus_fomaml_is_alpha_h_s_times_query_grad(model: str, lr: float) -> None:
    """k = 1: (I − αH_s(θ))ᵀ∇L_q(θ′) − ∇L_q(θ′) = −αH_s(θ)∇L_q(θ′), exactly."""
    case = make_case(model)
    args = (case.loss_fn, case.params, case.support, case.query)
    exact = flat(maml_grad(*args, lr=lr, steps=1))
    first = flat(fomaml_grad(*args, lr=lr, steps=1))
    h_s = mamlkit.hessian(case.loss_fn, case.params, case.support)  # at θ, on the support set
    torch.testing.assert_close(first - exact, lr * h_s @ first, rtol=1e-10, atol=1e-13)
    assert (first - exact).abs().max() > 1e-6  # the two are genuinely different here


# ---------------------------------------------------------------------------------------------
# Support versus query
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("model", MODELS)
def test_support_sets_the_inner_loop_query_sets_the_outer_gradient(model: str, steps: int) -> None:
    case, lr = make_case(model), 0.1
    h_s = mamlkit.hessian(case.loss_fn, case.params, case.support)
    h_q = mamlkit.hessian(case.loss_fn, case.params, case.query)
    assert (h_s - h_q).abs().max() > 1e-2 * h_s.abs().max(), "the test needs H_s ≠ H_q"

    swapped = dataclasses.replace(case, support=case.query, query=case.support)
    jac_s = chain(step_jacobians(case, lr, steps), h_s.shape[0])
    jac_q = chain(step_jacobians(swapped, lr, steps), h_s.shape[0])
    theta_k = adapt(case.loss_fn, case.params, case.support, lr=lr, steps=steps)
    grad_q = flat(grad(case.loss_fn)(theta_k, case.query))
    grad_s = flat(grad(case.loss_fn)(theta_k, case.support))
    right = jac_s.T @ grad_q
    wrong = {
        "H from the query set": jac_q.T @ grad_q,
        "outer gradient on the support set": jac_s.T @ grad_s,
    }

    for name, engine in ENGINES.items():
        actual = flat(
            engine(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps)
        )
        torch.testing.assert_close(actual, right, rtol=1e-10, atol=1e-12, msg=name)
        for what, value in wrong.items():
            assert (actual - value).abs().max() > 1e-6, f"{name}: indistinguishable from {what}"
        turned = flat(
            engine(case.loss_fn, case.params, case.query, case.support, lr=lr, steps=steps)
        )
        assert (actual - turned).abs().max() > 1e-4, (
            f"{name}: swapping support and query changed nothing"
        )

    fo = flat(fomaml_grad(case.loss_fn, case.params, case.support, case.query, lr=lr, steps=steps))
    torch.testing.assert_close(fo, grad_q, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The loss convention: mean = (2 / (N·O)) · half_sum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [*ENGINES, "fomaml_grad"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model", ["tanh_mlp", "multi_output"])
def test_mean_and_half_sum_conventions_differ_by_a_rescaled_lr(
    model: str, steps: int, engine: str
) -> None:
    """L_mean = (2/n)·L_half over n = N·O entries; so α_mean on the support set acts like
    α_half = α_mean·2/n_s, and the meta-gradient carries the query's factor 2/n_q."""
    fn = {**ENGINES, "fomaml_grad": fomaml_grad}[engine]
    mean, half = make_case(model, reduction="mean"), make_case(model, reduction="half_sum")
    n_s, n_q = mean.support[1].numel(), mean.query[1].numel()
    assert n_s != n_q
    lr = 0.2
    g_mean = fn(mean.loss_fn, mean.params, mean.support, mean.query, lr=lr, steps=steps)
    g_half = fn(half.loss_fn, half.params, half.support, half.query, lr=lr * 2 / n_s, steps=steps)
    torch.testing.assert_close(flat(g_mean), (2 / n_q) * flat(g_half), rtol=1e-12, atol=1e-14)
    if steps > 0:  # without rescaling lr the two differ: the constant is not cosmetic
        g_naive = fn(half.loss_fn, half.params, half.support, half.query, lr=lr, steps=steps)
        assert (flat(g_mean) - (2 / n_q) * flat(g_naive)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# dtype, keys, order, shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [*ENGINES, "fomaml_grad", "adapt"])
@pytest.mark.parametrize("model", MODELS)
def test_float32_in_float32_out(model: str, engine: str) -> None:
    case32, case64 = make_case(model, dtype=torch.float32), make_case(model)
    if engine == "adapt":
        run = lambda c: adapt(c.loss_fn, c.params, c.support, lr=0.1, steps=2)  # noqa: E731
    else:
        fn = {**ENGINES, "fomaml_grad": fomaml_grad}[engine]
        run = lambda c: fn(c.loss_fn, c.params, c.support, c.query, lr=0.1, steps=2)  # noqa: E731
    out32, out64 = run(case32), run(case64)
    assert list(out32) == list(case32.params)
    for key, value in out32.items():
        assert value.dtype == torch.float32, key
        assert value.shape == case32.params[key].shape, key
    torch.testing.assert_close(flat(out32), flat(out64).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_inner_jacobian_float32(model: str) -> None:
    case = make_case(model, dtype=torch.float32)
    jac = inner_jacobian(case.loss_fn, case.params, case.support, lr=0.1, steps=2)
    p = mamlkit.num_params(case.params)
    assert jac.dtype == torch.float32 and jac.shape == (p, p)


def test_key_order_is_preserved_when_not_sorted() -> None:
    case = make_case("scalar_param")
    params = {k: case.params[k] for k in ("w", "c", "a")}
    for fn in (*ENGINES.values(), fomaml_grad):
        out = fn(case.loss_fn, params, case.support, case.query, lr=0.1, steps=1)
        assert list(out) == ["w", "c", "a"]
        assert [tuple(v.shape) for v in out.values()] == [(2,), (), ()]
    assert list(adapt(case.loss_fn, params, case.support, lr=0.1)) == ["w", "c", "a"]
