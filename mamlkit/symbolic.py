r"""Symbolic receipts (sympy) for the meta-gradient derivations.

Every function takes a sympy expression ``loss`` in the parameter symbols ``params`` (a list,
the flat order), so the notebooks and ``python -m mamlkit verify`` can state an identity and
check it exactly. Layout: gradients are column vectors (P × 1); a Jacobian ``∂u/∂θ`` has
row p, column q equal to ``∂u_p/∂θ_q`` (numerator layout), as ``sympy.Matrix.jacobian`` does.

Example:
    >>> import sympy as sp
    >>> t1, t2, a = sp.symbols("theta1 theta2 alpha")
    >>> L = t1**2 * t2 + sp.sin(t2)
    >>> assert_identity(inner_update_jacobian(L, [t1, t2], a),
    ...                 sp.eye(2) - a * hessian(L, [t1, t2]), label="J = I - alpha H")
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp

Expr = sp.Expr
Symbols = Sequence[sp.Symbol]


def gradient(loss: Expr, params: Symbols) -> sp.Matrix:
    """∇L as a (P, 1) column vector."""
    return sp.Matrix([sp.diff(loss, p) for p in params])


def hessian(loss: Expr, params: Symbols) -> sp.Matrix:
    """∇²L, the (P, P) matrix of ``∂²L/∂θ_p∂θ_q``."""
    return sp.hessian(loss, list(params))


def inner_update(loss: Expr, params: Symbols, alpha: Expr) -> sp.Matrix:
    """One inner step ``θ′ = θ − α∇L(θ)`` as a (P, 1) vector of expressions in θ."""
    return sp.Matrix(params) - alpha * gradient(loss, params)


def inner_update_jacobian(loss: Expr, params: Symbols, alpha: Expr) -> sp.Matrix:
    """``∂θ′/∂θ`` computed by differentiating the update itself, entry by entry.

    Nothing about Hessians is assumed here, so comparing the result with ``I − αH`` is a
    genuine check of the derivation, not a restatement of it.
    """
    return inner_update(loss, params, alpha).jacobian(list(params))


def unrolled(loss: Expr, params: Symbols, alpha: Expr, steps: int) -> list[sp.Matrix]:
    """The iterates θ_0, …, θ_k of k inner steps, each as expressions in θ = θ_0."""
    grad = gradient(loss, params)
    path = [sp.Matrix(params)]
    for _ in range(steps):
        path.append(path[-1] - alpha * _evaluate_at(grad, params, path[-1]))
    return path


def _evaluate_at(expr: sp.Matrix, params: Symbols, point: sp.Matrix) -> sp.Matrix:
    """``expr`` with every parameter replaced by the matching entry of ``point``, at once.

    Two stages through fresh dummies: ``subs(..., simultaneous=True)`` is not simultaneous
    inside unevaluated derivatives of an undefined function ``L(θ1, θ2)``.
    """
    dummies = [sp.Dummy() for _ in params]
    staged = expr.subs(dict(zip(params, dummies)))
    return staged.subs(dict(zip(dummies, point)))


def unrolled_jacobian(loss: Expr, params: Symbols, alpha: Expr, steps: int) -> sp.Matrix:
    """``∂θ_k/∂θ_0`` by differentiating the fully unrolled θ_k(θ) directly."""
    return unrolled(loss, params, alpha, steps)[-1].jacobian(list(params))


def jacobian_product(
    loss: Expr, params: Symbols, alpha: Expr, steps: int, *, reverse: bool = False
) -> sp.Matrix:
    """The chain-rule product ``J_{k−1} ⋯ J_1 J_0`` with ``J_j = I − αH(θ_j)``.

    Each factor is evaluated at the iterate its step starts from. ``reverse=True`` multiplies
    in the wrong order, ``J_0 J_1 ⋯ J_{k−1}``, to show that the order matters.
    """
    hess = hessian(loss, params)
    path = unrolled(loss, params, alpha, steps)
    eye = sp.eye(len(params))
    product = eye
    for theta_j in path[:-1]:
        factor = eye - alpha * _evaluate_at(hess, params, theta_j)
        product = product * factor if reverse else factor * product
    return product


def mse_hessian_split(
    model: Expr, params: Symbols, x: sp.Symbol, data: Sequence[tuple[Expr, Expr]]
) -> tuple[sp.Matrix, sp.Matrix, sp.Matrix]:
    r"""For ``L = ½ Σ_j (f(x_j; θ) − y_j)²``: the Hessian and its two parts.

    .. math:: ∇²L = Σ_j ∇f_j ∇f_jᵀ + Σ_j (f_j − y_j) ∇²f_j

    Args:
        model: f(x; θ), an expression in ``x`` and ``params`` (single output).
        params: the parameter symbols.
        x: the input symbol of ``model``.
        data: pairs ``(x_j, y_j)``, numbers or symbols.

    Returns:
        ``(hessian, gauss_newton, residual)``: ∇²L computed directly from L, and the two parts
        computed from f alone.
    """
    rows = [(model.subs(x, xj), yj) for xj, yj in data]
    loss = sp.Rational(1, 2) * sum((fj - yj) ** 2 for fj, yj in rows)
    gauss_newton = sp.zeros(len(params))
    residual = sp.zeros(len(params))
    for fj, yj in rows:
        grad_f = gradient(fj, params)
        gauss_newton += grad_f * grad_f.T
        residual += (fj - yj) * hessian(fj, params)
    return hessian(loss, params), gauss_newton, residual


def residual(lhs: Expr | sp.Matrix, rhs: Expr | sp.Matrix) -> Expr | sp.Matrix:
    """``lhs − rhs`` simplified (entrywise for matrices): zero when the identity holds."""
    difference = sp.Matrix(lhs) - sp.Matrix(rhs) if isinstance(lhs, sp.MatrixBase) else lhs - rhs

    def simplify(e: Expr) -> Expr:
        e = sp.expand(e)
        return e if e == 0 else sp.simplify(e)

    if isinstance(difference, sp.MatrixBase):
        return difference.applyfunc(simplify)
    return simplify(sp.sympify(difference))


def is_zero(value: Expr | sp.Matrix) -> bool:
    """True when ``value`` (already simplified) is exactly zero."""
    if isinstance(value, sp.MatrixBase):
        return value.is_zero_matrix is True
    return value == 0


def assert_identity(
    lhs: Expr | sp.Matrix, rhs: Expr | sp.Matrix, *, label: str = "identity"
) -> None:
    """Assert ``lhs == rhs`` exactly; on failure the message shows the simplified residual.

    Example:
        >>> x = sp.Symbol("x")
        >>> assert_identity(sp.sin(x) ** 2 + sp.cos(x) ** 2, 1, label="Pythagoras")
        >>> assert_identity(x**2, x, label="wrong")
        Traceback (most recent call last):
        ...
        AssertionError: wrong does not hold: lhs - rhs = x*(x - 1)
    """
    diff = residual(lhs, rhs)
    if not is_zero(diff):
        raise AssertionError(f"{label} does not hold: lhs - rhs = {diff}")


def assert_not_identity(
    lhs: Expr | sp.Matrix, rhs: Expr | sp.Matrix, *, label: str
) -> Expr | sp.Matrix:
    """Assert ``lhs != rhs`` (e.g. the reversed Jacobian product); return the nonzero residual."""
    diff = residual(lhs, rhs)
    if is_zero(diff):
        raise AssertionError(f"{label}: expected a difference, but lhs - rhs simplifies to 0")
    return diff
