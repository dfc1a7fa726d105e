"""``mamlkit.symbolic`` against independent sympy computations and against the torch engines.

The torch losses are generated from the very same sympy expressions with ``sympy.lambdify``, so a
numeric disagreement can only come from the derivative machinery, not from a transcription slip.
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath
import pytest
import sympy as sp
import torch
from torch import Tensor

import mamlkit
from mamlkit import symbolic as S

F64 = torch.float64
T1, T2, ALPHA = sp.symbols("theta1 theta2 alpha")
PARAMS = [T1, T2]
NONQUADRATIC = T1**4 / 4 + T1**2 * T2 + sp.cos(T2)
TORCH_FUNCTIONS = {"cos": torch.cos, "sin": torch.sin, "tanh": torch.tanh, "exp": torch.exp}
POINT = {T1: sp.Rational(7, 10), T2: sp.Rational(-2, 5)}
LR = 0.3


def _to_torch_loss(expr: sp.Expr, symbols: list[sp.Symbol]) -> Callable:
    """loss_fn(params, batch) evaluating ``expr`` with params {"theta1": …, "theta2": …} (0-d)."""
    f = sp.lambdify(symbols, expr, modules=[TORCH_FUNCTIONS])

    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return f(*(params[s.name] for s in symbols))

    return loss_fn


def _torch_point(point: dict, symbols: list[sp.Symbol]) -> dict[str, Tensor]:
    return {s.name: torch.tensor(float(point[s]), dtype=F64) for s in symbols}


def _numeric(matrix: sp.Matrix, values: dict) -> Tensor:
    return torch.tensor(
        [[float(sp.N(e.subs(values), 30)) for e in row] for row in matrix.tolist()], dtype=F64
    )


DUMMY = (torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64))


# ---------------------------------------------------------------------------------------------
# against independent sympy computations
# ---------------------------------------------------------------------------------------------


def test_gradient_and_hessian_by_derive_by_array() -> None:
    grad = sp.Matrix(sp.derive_by_array(NONQUADRATIC, PARAMS))
    hess = sp.Matrix(
        sp.derive_by_array(sp.derive_by_array(NONQUADRATIC, PARAMS), PARAMS).tomatrix()
    )
    assert S.gradient(NONQUADRATIC, PARAMS).shape == (2, 1)
    S.assert_identity(S.gradient(NONQUADRATIC, PARAMS), grad, label="gradient")
    S.assert_identity(S.hessian(NONQUADRATIC, PARAMS), hess, label="hessian")
    # written out by hand
    S.assert_identity(grad, sp.Matrix([T1**3 + 2 * T1 * T2, T1**2 - sp.sin(T2)]), label="by hand")
    S.assert_identity(
        hess, sp.Matrix([[3 * T1**2 + 2 * T2, 2 * T1], [2 * T1, -sp.cos(T2)]]), label="by hand"
    )


@pytest.mark.parametrize(
    "loss", [NONQUADRATIC, sp.Function("L")(T1, T2)], ids=["nonquadratic", "generic"]
)
def test_inner_update_and_its_jacobian(loss: sp.Expr) -> None:
    grad = sp.Matrix([sp.diff(loss, T1), sp.diff(loss, T2)])
    S.assert_identity(
        S.inner_update(loss, PARAMS, ALPHA), sp.Matrix(PARAMS) - ALPHA * grad, label="θ′"
    )
    # entry by entry: ∂θ′_p/∂θ_q = δ_pq − α ∂²L/∂θ_p∂θ_q
    for p, tp in enumerate(PARAMS):
        for q, tq in enumerate(PARAMS):
            expected = (1 if p == q else 0) - ALPHA * sp.diff(loss, tp, tq)
            S.assert_identity(
                S.inner_update_jacobian(loss, PARAMS, ALPHA)[p, q], expected, label=f"J[{p},{q}]"
            )


def test_unrolled_quadratic_matches_the_linear_recursion() -> None:
    """L = ½θᵀAθ − bᵀθ: θ_{j+1} = (I − αA)θ_j + αb and ∂θ_k/∂θ = (I − αA)^k."""
    a, b, c, g1, g2 = sp.symbols("a b c g1 g2")
    A = sp.Matrix([[a, b], [b, c]])
    g = sp.Matrix([g1, g2])
    theta = sp.Matrix(PARAMS)
    loss = (theta.T * A * theta)[0] / 2 - (g.T * theta)[0]
    M = sp.eye(2) - ALPHA * A
    path = S.unrolled(loss, PARAMS, ALPHA, 3)
    expected = theta
    for j in range(4):
        S.assert_identity(path[j], expected, label=f"θ_{j}")
        expected = M * expected + ALPHA * g
    S.assert_identity(S.unrolled_jacobian(loss, PARAMS, ALPHA, 3), M**3, label="(I − αA)³")
    # Hessians are constant here, so every ordering of the product agrees
    S.assert_identity(
        S.jacobian_product(loss, PARAMS, ALPHA, 3, reverse=True), M**3, label="reversed"
    )


@pytest.mark.parametrize("steps", [1, 2])
def test_jacobian_product_order_on_a_nonquadratic_loss(steps: int) -> None:
    unrolled = S.unrolled_jacobian(NONQUADRATIC, PARAMS, ALPHA, steps)
    S.assert_identity(
        unrolled, S.jacobian_product(NONQUADRATIC, PARAMS, ALPHA, steps), label="J_(k-1)⋯J_0"
    )
    # built here from scratch: J_j = I − αH(θ_j) at the j-th iterate, later factors on the left
    hess = sp.hessian(NONQUADRATIC, PARAMS)
    path = S.unrolled(NONQUADRATIC, PARAMS, ALPHA, steps)
    factors = [
        sp.eye(2) - ALPHA * hess.subs(dict(zip(PARAMS, path[j])), simultaneous=True)
        for j in range(steps)
    ]
    product = sp.eye(2)
    for factor in factors:
        product = factor * product
    S.assert_identity(
        S.jacobian_product(NONQUADRATIC, PARAMS, ALPHA, steps), product, label="by hand"
    )
    if steps > 1:
        diff = S.assert_not_identity(
            unrolled,
            S.jacobian_product(NONQUADRATIC, PARAMS, ALPHA, steps, reverse=True),
            label="reversed",
        )
        assert not S.is_zero(diff)


# ---------------------------------------------------------------------------------------------
# against the torch engines at a numeric point
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_symbolic_jacobians_match_mamlkit_inner_jacobian(steps: int) -> None:
    loss_fn = _to_torch_loss(NONQUADRATIC, PARAMS)
    params = _torch_point(POINT, PARAMS)
    at = {**POINT, ALPHA: sp.Rational(3, 10)}
    torch_jac = mamlkit.inner_jacobian(loss_fn, params, DUMMY, lr=LR, steps=steps)
    product = _numeric(S.jacobian_product(NONQUADRATIC, PARAMS, ALPHA, steps), at)
    torch.testing.assert_close(torch_jac, product, rtol=1e-12, atol=1e-12)
    unrolled = _numeric(S.unrolled_jacobian(NONQUADRATIC, PARAMS, ALPHA, steps), at)
    torch.testing.assert_close(torch_jac, unrolled, rtol=1e-12, atol=1e-12)
    if steps == 1:
        one = _numeric(S.inner_update_jacobian(NONQUADRATIC, PARAMS, ALPHA), at)
        torch.testing.assert_close(torch_jac, one, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            one,
            torch.eye(2, dtype=F64) - LR * mamlkit.hessian(loss_fn, params, DUMMY),
            rtol=1e-12,
            atol=1e-12,
        )
    if steps >= 2:
        wrong = _numeric(S.jacobian_product(NONQUADRATIC, PARAMS, ALPHA, steps, reverse=True), at)
        assert (torch_jac - wrong).abs().max() > 1e-3
    # and the iterates themselves
    theta_k = S.unrolled(NONQUADRATIC, PARAMS, ALPHA, steps)[-1]
    adapted = mamlkit.adapt(loss_fn, params, DUMMY, lr=LR, steps=steps)
    torch.testing.assert_close(
        mamlkit.flatten_params(adapted), _numeric(theta_k, at)[:, 0], rtol=1e-12, atol=1e-12
    )


X_DATA, Y_DATA = sp.symbols("x y")
SUPPORT_ROWS = [(sp.Rational(1, 2), 1), (-1, sp.Rational(1, 3)), (2, -1)]
QUERY_ROWS = [(sp.Rational(3, 2), 2), (-2, 0)]


def _split_losses(model: sp.Expr) -> tuple[sp.Expr, sp.Expr, Callable]:
    """L_s, L_q = ½Σ(f − y)² over the support / query rows, and the same loss as a torch loss_fn."""
    row_loss = sp.Rational(1, 2) * (model - Y_DATA) ** 2
    l_s = sum(row_loss.xreplace({X_DATA: xj, Y_DATA: yj}) for xj, yj in SUPPORT_ROWS)
    l_q = sum(row_loss.xreplace({X_DATA: xj, Y_DATA: yj}) for xj, yj in QUERY_ROWS)
    per_row = sp.lambdify([T1, T2, X_DATA, Y_DATA], row_loss, modules=[TORCH_FUNCTIONS])

    def loss_fn(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return per_row(params["theta1"], params["theta2"], batch[0], batch[1]).sum()

    return l_s, l_q, loss_fn


def _as_batch(rows: list) -> tuple[Tensor, Tensor]:
    x, y = zip(*rows)
    return torch.tensor([float(v) for v in x], dtype=F64), torch.tensor(
        [float(v) for v in y], dtype=F64
    )


def _engines_at_point(loss_fn: Callable, steps: int) -> list[Tensor]:
    params = _torch_point(POINT, PARAMS)
    support, query = _as_batch(SUPPORT_ROWS), _as_batch(QUERY_ROWS)
    return [
        mamlkit.flatten_params(engine(loss_fn, params, support, query, lr=LR, steps=steps))
        for engine in (mamlkit.maml_grad, mamlkit.maml_grad_hvp, mamlkit.maml_grad_jacobian)
    ]


def test_exact_symbolic_meta_gradient_matches_the_torch_engines() -> None:
    """k = 1, a polynomial model: d/dθ L_q(θ − α∇L_s(θ)) differentiated by sympy as a whole."""
    model = T2 * T1 * X_DATA + T1**2 * X_DATA**2 / 3 + T2**2 * X_DATA / 5
    l_s, l_q, loss_fn = _split_losses(model)
    theta_1 = S.unrolled(l_s, PARAMS, ALPHA, 1)[-1]
    meta = S.gradient(l_q.subs(dict(zip(PARAMS, theta_1)), simultaneous=True), PARAMS)
    expected = _numeric(meta, {**POINT, ALPHA: sp.Rational(3, 10)})[:, 0]
    for got in _engines_at_point(loss_fn, steps=1):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_high_precision_meta_gradient_matches_the_torch_engines(steps: int) -> None:
    """A tanh model, k steps: the inner loop run in 40-digit mpmath with sympy's ∇L_s, and the
    outer derivative by mpmath's numerical differentiation (no chain rule, no autodiff)."""
    model = T2 * sp.tanh(T1 * X_DATA) + T1 * T2
    l_s, l_q, loss_fn = _split_losses(model)
    grad_s = sp.lambdify(PARAMS, list(S.gradient(l_s, PARAMS)), "mpmath")
    loss_q = sp.lambdify(PARAMS, l_q, "mpmath")

    with mpmath.workdps(40):
        alpha = mpmath.mpf(3) / 10

        def meta_objective(*theta: mpmath.mpf) -> mpmath.mpf:
            for _ in range(steps):
                theta = tuple(t - alpha * g for t, g in zip(theta, grad_s(*theta)))
            return loss_q(*theta)

        point = tuple(mpmath.mpf(POINT[s].p) / POINT[s].q for s in PARAMS)
        expected = torch.tensor(
            [float(mpmath.diff(meta_objective, point, order)) for order in ((1, 0), (0, 1))],
            dtype=F64,
        )
    for got in _engines_at_point(loss_fn, steps):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the MSE split
# ---------------------------------------------------------------------------------------------

W1, W2, B, X = sp.symbols("w1 w2 b x")
MODEL = W2 * sp.tanh(W1 * X + B)
WEIGHTS = [W1, W2, B]
DATA = [(sp.Rational(1, 2), 1), (-1, sp.Rational(1, 3)), (2, -1)]


def test_mse_hessian_split_parts_sum_to_the_hessian() -> None:
    full, gauss_newton, residual = S.mse_hessian_split(MODEL, WEIGHTS, X, DATA)
    S.assert_identity(gauss_newton + residual, full, label="GN + R = H")
    # H computed here from scratch, and GN as JᵀJ of the stacked predictions
    f = sp.Matrix([MODEL.subs(X, xj) for xj, _ in DATA])
    loss = sum(sp.Rational(1, 2) * (f[j] - yj) ** 2 for j, (_, yj) in enumerate(DATA))
    S.assert_identity(full, sp.hessian(loss, WEIGHTS), label="H")
    jac = f.jacobian(WEIGHTS)
    S.assert_identity(gauss_newton, jac.T * jac, label="GN = JᵀJ")


def test_mse_hessian_split_with_symbolic_targets_is_linear_in_the_residual() -> None:
    y1, y2 = sp.symbols("y1 y2")
    full, gauss_newton, residual = S.mse_hessian_split(MODEL, WEIGHTS, X, [(1, y1), (-2, y2)])
    S.assert_identity(gauss_newton + residual, full, label="GN + R = H")
    assert not gauss_newton.has(y1) and not gauss_newton.has(y2)  # GN does not see the targets
    # R = Σ_j (f_j − y_j) ∇²f_j: its y_1-coefficient is −∇²f_1 (sign convention f − y)
    S.assert_identity(residual.diff(y1), -sp.hessian(MODEL.subs(X, 1), WEIGHTS), label="∂R/∂y₁")
    # a model linear in θ has no residual part
    _, _, linear_residual = S.mse_hessian_split(W1 * X + B, [W1, B], X, [(1, y1), (-2, y2)])
    assert S.is_zero(linear_residual)


def test_mse_hessian_split_matches_mamlkit_mse_hessian_parts() -> None:
    full, gauss_newton, residual = S.mse_hessian_split(MODEL, WEIGHTS, X, DATA)
    point = {W1: sp.Rational(3, 5), W2: sp.Rational(-6, 5), B: sp.Rational(1, 10)}
    model_of = sp.lambdify([W1, W2, B, X], MODEL, modules=[TORCH_FUNCTIONS])

    def model_fn(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return model_of(params["w1"], params["w2"], params["b"], x[:, 0])

    params = {s.name: torch.tensor(float(point[s]), dtype=F64) for s in WEIGHTS}
    x = torch.tensor([[float(xj)] for xj, _ in DATA], dtype=F64)
    y = torch.tensor([float(yj) for _, yj in DATA], dtype=F64)
    gn_torch, r_torch = mamlkit.mse_hessian_parts(model_fn, params, x, y)
    torch.testing.assert_close(gn_torch, _numeric(gauss_newton, point), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_torch, _numeric(residual, point), rtol=1e-12, atol=1e-12)
    half_sum = mamlkit.make_mse_loss(model_fn, reduction="half_sum")
    torch.testing.assert_close(
        mamlkit.hessian(half_sum, params, (x, y)), _numeric(full, point), rtol=1e-12, atol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# assert_identity, assert_not_identity, residual, is_zero
# ---------------------------------------------------------------------------------------------


def test_assert_identity_passes_on_true_identities() -> None:
    S.assert_identity(sp.sin(T1) ** 2 + sp.cos(T1) ** 2, 1, label="Pythagoras")
    S.assert_identity(sp.Matrix([[(T1 + T2) ** 2]]), sp.Matrix([[T1**2 + 2 * T1 * T2 + T2**2]]))


def test_assert_identity_raises_with_the_residual_on_a_false_identity() -> None:
    with pytest.raises(
        AssertionError, match=r"^binomial does not hold: lhs - rhs = 2\*theta1\*theta2$"
    ):
        S.assert_identity((T1 + T2) ** 2, T1**2 + T2**2, label="binomial")
    with pytest.raises(
        AssertionError, match=r"^J does not hold: lhs - rhs = Matrix\(\[\[0, 0\], \[0, alpha\]\]\)"
    ):
        S.assert_identity(sp.eye(2), sp.eye(2) - sp.diag(0, ALPHA), label="J")
    # the wrong-order product of a non-quadratic loss is caught, residual shown
    with pytest.raises(AssertionError, match=r"reversed order does not hold: lhs - rhs = Matrix"):
        S.assert_identity(
            S.unrolled_jacobian(NONQUADRATIC, PARAMS, ALPHA, 2),
            S.jacobian_product(NONQUADRATIC, PARAMS, ALPHA, 2, reverse=True),
            label="reversed order",
        )


def test_assert_not_identity() -> None:
    diff = S.assert_not_identity(T1**2, T1, label="square")
    assert sp.expand(diff - (T1**2 - T1)) == 0
    with pytest.raises(AssertionError, match=r"^same: expected a difference"):
        S.assert_not_identity(sp.sin(T1) ** 2 + sp.cos(T1) ** 2, 1, label="same")


def test_residual_and_is_zero() -> None:
    assert S.residual(sp.sin(T1) ** 2 + sp.cos(T1) ** 2, 1) == 0
    assert S.is_zero(S.residual(sp.Matrix([T1 * (T1 + 1)]), sp.Matrix([T1**2 + T1])))
    assert not S.is_zero(S.residual(sp.Matrix([T1, 0]), sp.Matrix([0, 0])))
    assert not S.is_zero(T1)


@pytest.mark.parametrize("steps", [2, 3])
def test_unrolled_generic_function_matches_explicit_loss(steps: int) -> None:
    """Iterates of a generic L(θ1, θ2), with L replaced afterwards, equal the explicit ones.

    Regression: ``subs(simultaneous=True)`` is not simultaneous inside unevaluated derivatives.
    """
    t1, t2 = sp.symbols("theta1 theta2")
    alpha = sp.Rational(1, 10)
    explicit = t1**4 / 4 + t1**2 * t2 + sp.cos(t2)
    generic = sp.Function("L")(t1, t2)
    point = {t1: sp.Rational(1, 3), t2: sp.Rational(-1, 2)}

    def at_point(matrix: sp.Matrix) -> sp.Matrix:
        replaced = matrix.replace(sp.Function("L"), sp.Lambda((t1, t2), explicit)).doit()
        return replaced.subs(point).evalf(30)

    via_generic = S.unrolled(generic, [t1, t2], alpha, steps)[-1]
    via_explicit = S.unrolled(explicit, [t1, t2], alpha, steps)[-1].subs(point).evalf(30)
    assert (at_point(via_generic) - via_explicit).norm() < 1e-25
    product_generic = S.jacobian_product(generic, [t1, t2], alpha, steps)
    product_explicit = S.jacobian_product(explicit, [t1, t2], alpha, steps).subs(point).evalf(30)
    assert (at_point(product_generic) - product_explicit).norm() < 1e-25
