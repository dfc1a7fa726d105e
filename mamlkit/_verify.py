"""``python -m mamlkit verify``: every identity the notebooks claim, one line each.

Symbolic identities are checked exactly with sympy (max error is then 0 or the identity fails);
numeric ones in float64 on a small tanh network, against central finite differences and against
each other. The function returns the list of results; the CLI prints them and sets the exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
import torch

from . import symbolic as S
from ._curvature import hessian, hvp, mse_hessian_parts
from ._metagrad import adapt, fomaml_grad, maml_grad, maml_grad_hvp, maml_grad_jacobian
from ._models import init_mlp, make_mse_loss, mlp
from ._params import flatten_params, unflatten_params


@dataclass(frozen=True)
class Check:
    """One verified identity: its name, how it was checked, the max error, and the tolerance."""

    name: str
    method: str
    max_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance


def _symbolic(name: str, lhs: sp.Matrix, rhs: sp.Matrix) -> Check:
    diff = S.residual(lhs, rhs)
    error = 0.0 if S.is_zero(diff) else float("inf")
    return Check(name, "sympy, exact", error, 0.0)


def _symbolic_checks() -> list[Check]:
    t1, t2, alpha = sp.symbols("theta1 theta2 alpha")
    params = [t1, t2]
    generic = sp.Function("L")(t1, t2)
    nonquadratic = t1**4 / 4 + t1**2 * t2 + sp.cos(t2)
    checks = [
        _symbolic(
            "one-step Jacobian dθ'/dθ = I - αH (generic L)",
            S.inner_update_jacobian(generic, params, alpha),
            sp.eye(2) - alpha * S.hessian(generic, params),
        ),
    ]
    for k in (2, 3):
        checks.append(
            _symbolic(
                f"k={k} Jacobian = J_(k-1)⋯J_0 (non-quadratic L)",
                S.unrolled_jacobian(nonquadratic, params, alpha, k),
                S.jacobian_product(nonquadratic, params, alpha, k),
            )
        )
    reversed_diff = S.residual(
        S.unrolled_jacobian(nonquadratic, params, alpha, 2),
        S.jacobian_product(nonquadratic, params, alpha, 2, reverse=True),
    )
    checks.append(
        Check(
            "k=2 reversed order J_0 J_1 differs (order matters)",
            "sympy, exact",
            0.0 if not S.is_zero(reversed_diff) else float("inf"),
            0.0,
        )
    )
    w1, w2, b, x = sp.symbols("w1 w2 b x")
    data = [(sp.Rational(1, 2), 1), (-1, sp.Rational(1, 3)), (2, -1)]
    full, gauss_newton, residual = S.mse_hessian_split(
        w2 * sp.tanh(w1 * x + b), [w1, w2, b], x, data
    )
    checks.append(
        _symbolic("MSE Hessian = Gauss-Newton + residual part", full, gauss_newton + residual)
    )
    return checks


def _max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float((flatten_params(a) - flatten_params(b)).abs().max())


def _central_difference(
    f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    vector = flatten_params(params)
    out = torch.empty_like(vector)
    for i in range(vector.numel()):
        step = torch.zeros_like(vector)
        step[i] = eps
        plus = f(unflatten_params(vector + step, params))
        minus = f(unflatten_params(vector - step, params))
        out[i] = (plus - minus) / (2 * eps)
    return unflatten_params(out, params)


def _numeric_checks(seed: int) -> list[Check]:
    dtype = torch.float64
    gen = torch.Generator().manual_seed(seed)
    params = init_mlp((1, 6, 1), seed=seed, dtype=dtype)

    def model(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return mlp(p, x, activation="tanh")

    loss = make_mse_loss(model, reduction="mean")
    support = (
        torch.randn(8, 1, generator=gen, dtype=dtype),
        torch.randn(8, 1, generator=gen, dtype=dtype),
    )
    query = (
        torch.randn(8, 1, generator=gen, dtype=dtype),
        torch.randn(8, 1, generator=gen, dtype=dtype),
    )
    lr, tol = 0.3, 1e-7
    checks = []
    for steps in (1, 3):
        kw = {"lr": lr, "steps": steps}
        exact = maml_grad(loss, params, support, query, **kw)

        def meta_loss(p: dict[str, torch.Tensor], steps: int = steps) -> torch.Tensor:
            return loss(adapt(loss, p, support, lr=lr, steps=steps), query)

        checks += [
            Check(
                f"maml_grad = finite differences (k={steps})",
                "float64 central FD",
                _max_error(exact, _central_difference(meta_loss, params)),
                tol,
            ),
            Check(
                f"maml_grad_hvp = maml_grad (k={steps})",
                "float64",
                _max_error(maml_grad_hvp(loss, params, support, query, **kw), exact),
                1e-12,
            ),
            Check(
                f"maml_grad_jacobian = maml_grad (k={steps})",
                "float64",
                _max_error(maml_grad_jacobian(loss, params, support, query, **kw), exact),
                1e-12,
            ),
        ]
        theta_k = adapt(loss, params, support, **kw)
        fd_query_grad = _central_difference(lambda p: loss(p, query), theta_k)
        checks.append(
            Check(
                f"fomaml_grad = ∇L_q(θ_k) (k={steps})",
                "float64 central FD",
                _max_error(fomaml_grad(loss, params, support, query, **kw), fd_query_grad),
                tol,
            )
        )
    v = unflatten_params(
        torch.randn(flatten_params(params).numel(), generator=gen, dtype=dtype), params
    )
    dense = hessian(loss, params, support) @ flatten_params(v)
    checks.append(
        Check(
            "hvp = H·v",
            "float64 vs dense Hessian",
            float((flatten_params(hvp(loss, params, support, v)) - dense).abs().max()),
            1e-12,
        )
    )
    half_sum = make_mse_loss(model, reduction="half_sum")
    gauss_newton, residual = mse_hessian_parts(model, params, *support)
    checks.append(
        Check(
            "mse_hessian_parts: GN + R = H",
            "float64 vs torch.func.hessian",
            float((gauss_newton + residual - hessian(half_sum, params, support)).abs().max()),
            1e-12,
        )
    )
    return checks


def run_checks(seed: int = 0) -> list[Check]:
    """Run every symbolic and numeric identity; return one :class:`Check` per identity."""
    return _symbolic_checks() + _numeric_checks(seed)


def format_report(checks: list[Check]) -> str:
    """One aligned line per check: name, method, max error, PASS/FAIL."""
    width = max(len(c.name) for c in checks)
    method_width = max(len(c.method) for c in checks)
    lines = [
        f"{c.name:<{width}}  {c.method:<{method_width}}  max err {c.max_error:9.2e}  "
        f"{'PASS' if c.passed else 'FAIL'}"
        for c in checks
    ]
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed} passed, {failed} failed")
    return "\n".join(lines)
