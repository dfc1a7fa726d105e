"""``python -m mamlkit verify``: one line per identity and per family of code the notebooks rely on.

Symbolic identities are checked exactly with sympy (max error is then 0 or the identity fails);
numeric ones in float64 on small networks, against central finite differences, closed forms,
dense matrices and plain autograd written out here — never one mamlkit path against itself only.
The families: the one- and k-step meta-gradient and its engines; the MSE and cross-entropy
Hessian splits; the MSE "mean" convention; the meta-batch engine (task mean, every method of the
table against its per-task function, the fused kernels with relu and tanh, the reverse routes
and truncation); BatchNorm through ``from_module`` (batch vs running statistics); iMAML (support
≠ query), Reptile and ES-MAML; Meta-SGD's rates, ANIL and the multi-step loss. ``compiled=True``
adds the ahead-of-time compiled kernels (a cold compile takes about 30 s per kernel).
The function returns the list of results; the CLI prints them and sets the exit code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
import torch

from . import symbolic as S
from ._curvature import cross_entropy_hessian_parts, hessian, hvp, mse_hessian_parts
from ._estimators import es_maml_grad, imaml, reptile_grad
from ._metabatch import meta_batch_grad
from ._metagrad import (
    adapt,
    fomaml_grad,
    maml_grad,
    maml_grad_hvp,
    maml_grad_jacobian,
    metasgd_grad,
)
from ._methods import METHODS
from ._models import init_mlp, make_cross_entropy_loss, make_mse_loss, mlp
from ._module import from_module
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
    return float((flatten_params(a) - flatten_params(b)).detach().abs().max())


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
    flat = flatten_params(params)

    def first_order_path(vector: torch.Tensor) -> torch.Tensor:
        start = unflatten_params(vector, params)
        return flatten_params(adapt(loss, start, support, lr=lr, steps=3, first_order=True))

    jacobian = torch.func.jacrev(first_order_path)(flat)
    checks.append(
        Check(
            "adapt(first_order=True): dθ_k/dθ = I (inner gradients held constant, k=3)",
            "float64 jacrev",
            float((jacobian - torch.eye(len(flat), dtype=dtype)).abs().max()),
            0.0,
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


Tree = dict[str, torch.Tensor]
F64 = torch.float64


def _plain_loop(
    loss: Callable, theta: Tree, batch: tuple, rate: Callable[[str, int], object], steps: int
) -> Tree:
    """θ_{j+1}[n] = θ_j[n] − rate(n, j)·∂L/∂θ_j[n] by torch.autograd (rate None: n stays)."""
    theta = {n: v if v.requires_grad else v.detach().requires_grad_(True) for n, v in theta.items()}
    for j in range(steps):
        moving = [n for n in theta if rate(n, j) is not None]
        grads = torch.autograd.grad(
            loss(theta, batch), [theta[n] for n in moving], create_graph=True
        )
        theta = dict(theta)
        for n, g in zip(moving, grads):
            theta[n] = theta[n] - rate(n, j) * g  # type: ignore[operator]
    return theta


def _leaves(tree: Tree) -> Tree:
    return {k: v.detach().clone().requires_grad_(True) for k, v in tree.items()}


def _problem(seed: int, sizes: tuple[int, ...] = (1, 6, 1), tasks: int = 3) -> tuple:
    gen = torch.Generator().manual_seed(seed + 1)
    params = init_mlp(sizes, seed=seed, dtype=F64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=F64) * 4 - 2

    support = (rand(tasks, 6, sizes[0]), rand(tasks, 6, sizes[-1]))
    query = (rand(tasks, 5, sizes[0]), rand(tasks, 5, sizes[-1]))
    return params, support, query


def _task(batch: tuple, i: int) -> tuple:
    return batch[0][i], batch[1][i]


def _task_mean(per_task: list[Tree]) -> Tree:
    return {k: torch.stack([g[k] for g in per_task]).mean(0) for k in per_task[0]}


def _per_task_rules(lr: float, steps: int, head: list[str]) -> dict[str, Callable]:
    """Each method of the table as the single-task function it must average."""

    def joint_grad(loss: Callable, p: Tree, s: tuple, q: tuple) -> Tree:
        leaves = _leaves(p)
        both = (torch.cat((s[0], q[0])), torch.cat((s[1], q[1])))
        return dict(zip(leaves, torch.autograd.grad(loss(leaves, both), list(leaves.values()))))

    def metasgd(loss: Callable, p: Tree, s: tuple, q: tuple) -> Tree:
        theta = {k: v for k, v in p.items() if not k.startswith("lr/")}
        rates = {k: p[f"lr/{k}"] for k in theta}
        g_theta, g_rates = metasgd_grad(loss, theta, rates, s, q, steps=steps)
        return {**g_theta, **{f"lr/{k}": v for k, v in g_rates.items()}}  # type: ignore[union-attr]

    return {
        "maml": lambda loss, p, s, q: maml_grad(loss, p, s, q, lr=lr, steps=steps),
        "fomaml": lambda loss, p, s, q: fomaml_grad(loss, p, s, q, lr=lr, steps=steps),
        "reptile": lambda loss, p, s, q: reptile_grad(loss, p, s, lr=lr, steps=steps),
        "imaml": lambda loss, p, s, q: (
            imaml(loss, p, s, q, lam=2.0, lr=lr, steps=steps, cg_steps=4).grad
        ),
        "pretrained": joint_grad,
        "anil": lambda loss, p, s, q: maml_grad(loss, p, s, q, lr=lr, steps=steps, adapt_keys=head),
        "metasgd": metasgd,
    }


def _metabatch_checks(seed: int) -> list[Check]:
    params, support, query = _problem(seed)
    lr, steps, head = 0.1, 2, ["w1", "b1"]
    rules = _per_task_rules(lr, steps, head)
    hypers = {"imaml": {"lam": 2.0, "cg_steps": 4}}
    checks = []
    for activation in ("tanh", "relu"):
        loss = make_mse_loss(lambda p, x, a=activation: mlp(p, x, activation=a))
        fused_loss = make_mse_loss(functools.partial(mlp, activation=activation))
        worst_fused = 0.0
        for method, rule in rules.items():
            meta = (
                METHODS[method].init(params, lr=lr, steps=steps) if method == "metasgd" else params
            )
            reference = _task_mean(
                [rule(loss, meta, _task(support, i), _task(query, i)) for i in range(3)]
            )
            if activation == "tanh":  # the method table, once
                got, _ = meta_batch_grad(
                    method,
                    loss,
                    meta,
                    support,
                    query,
                    lr=lr,
                    steps=steps,
                    backend="vmap",
                    **hypers.get(method, {}),
                )
                name = "task mean of its per-task function"
                checks.append(
                    Check(
                        f"method table: meta_batch_grad({method!r}) = {name}",
                        "float64, T = 3",
                        _max_error(got, reference),
                        1e-10,
                    )
                )
            if method in ("anil", "metasgd"):
                continue  # no fused kernel: they run on vmap
            got, _ = meta_batch_grad(
                method,
                fused_loss,
                meta,
                support,
                query,
                lr=lr,
                steps=steps,
                backend="fused",
                **hypers.get(method, {}),
            )
            worst_fused = max(worst_fused, _max_error(got, reference))
        checks.append(
            Check(
                f"fused kernels ({activation}) = per-task engines, every kernel",
                "float64, T = 3",
                worst_fused,
                1e-10,
            )
        )
    loss = make_mse_loss(lambda p, x: mlp(p, x, activation="tanh"))
    one = _task_mean([rules["maml"](loss, params, _task(support, 0), _task(query, 0))])
    tripled = (
        tuple((t[:1].repeat(3, *[1] * (t.dim() - 1))) for t in support),
        tuple((t[:1].repeat(3, *[1] * (t.dim() - 1))) for t in query),
    )
    got, _ = meta_batch_grad("maml", loss, params, *tripled, lr=lr, steps=steps)
    checks.append(
        Check(
            "meta-batch of 3 copies of a task = that task (a mean, not a sum)",
            "float64",
            _max_error(got, one),
            1e-12,
        )
    )
    routes = [
        meta_batch_grad("maml", loss, params, support, query, lr=lr, steps=4, reverse=r)[0]
        for r in ("unroll", "hvp", "checkpointed")
    ]
    checks.append(
        Check(
            "reverse routes: unroll = hvp = checkpointed (k=4)",
            "float64",
            max(_max_error(routes[0], r) for r in routes[1:]),
            1e-12,
        )
    )
    return checks


def _compiled_checks(seed: int) -> list[Check]:
    params, support, query = _problem(seed)
    checks = []
    for activation in ("tanh", "relu"):
        loss = make_mse_loss(functools.partial(mlp, activation=activation))
        reference = _task_mean(
            [
                maml_grad(loss, params, _task(support, i), _task(query, i), lr=0.1, steps=2)
                for i in range(3)
            ]
        )
        got, _ = meta_batch_grad(
            "maml", loss, params, support, query, lr=0.1, steps=2, backend="fused-compiled"
        )
        checks.append(
            Check(
                f"compiled MAML kernel ({activation}) = per-task engine",
                "float64, AOT",
                _max_error(got, reference),
                1e-10,
            )
        )
    return checks


def _curvature_and_layer_checks(seed: int) -> list[Check]:
    gen = torch.Generator().manual_seed(seed + 2)
    params = init_mlp((2, 5, 3), seed=seed, dtype=F64)

    def model(p: Tree, x: torch.Tensor) -> torch.Tensor:
        return mlp(p, x, activation="tanh")

    x = torch.randn(7, 2, generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (7,), generator=gen)
    gauss_newton, residual = cross_entropy_hessian_parts(model, params, x, labels)
    full = hessian(make_cross_entropy_loss(model), params, (x, labels))
    checks = [
        Check(
            "cross_entropy_hessian_parts: GN + R = H, GN ⪰ 0",
            "float64 vs torch.func.hessian",
            max(
                float((gauss_newton + residual - full).abs().max()),
                max(0.0, -float(torch.linalg.eigvalsh(gauss_newton).min()) - 1e-12),
            ),
            1e-12,
        )
    ]
    y = torch.randn(7, 3, generator=gen, dtype=F64)
    closed = ((model(params, x) - y) ** 2).sum() / (7 * 3)
    checks.append(
        Check(
            "MSE 'mean' = Σ r² / (N·O) (points × outputs)",
            "float64 closed form",
            abs(float(make_mse_loss(model)(params, (x, y)) - closed)),
            1e-15,
        )
    )
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)).double()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(4, generator=gen, dtype=F64) + 0.5)
        bn.weight.copy_(torch.randn(4, generator=gen, dtype=F64))
    h = net[0](x).detach()
    for mode, mean, var in (
        ("batch", h.mean(0), h.var(0, unbiased=False)),
        ("running", bn.running_mean, bn.running_var),
    ):
        p, model_fn = from_module(net, batch_norm=mode)  # type: ignore[arg-type]
        expected = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        error = float((model_fn(p, x) - expected).detach().abs().max())
        checks.append(
            Check(
                f"from_module(batch_norm={mode!r}): the {mode} statistics",
                "float64 closed form",
                error,
                1e-12,
            )
        )
    return checks


def _estimator_checks(seed: int) -> list[Check]:
    params, support, query = _problem(seed)
    s, q = _task(support, 0), _task(query, 0)
    loss = make_mse_loss(lambda p, x: mlp(p, x, activation="tanh"))
    lam = 2.0
    result = imaml(loss, params, s, q, lam=lam, lr=0.1, steps=30, cg_steps=60)
    h_s = hessian(loss, result.phi, s)
    rhs = flatten_params(_grad_at(loss, result.phi, q))
    dense = torch.linalg.solve(torch.eye(len(rhs), dtype=F64) + h_s / lam, rhs)
    checks = [
        Check(
            "iMAML = (I + H_s(φ)/λ)⁻¹ ∇L_q(φ), support ≠ query",
            "float64 dense solve",
            float((flatten_params(result.grad) - dense).abs().max()),
            1e-8,
        )
    ]
    theta_k = _plain_loop(loss, _leaves(params), s, lambda n, j: 0.1, 3)
    expected = {k: (params[k] - theta_k[k].detach()) / 0.1 for k in params}
    checks.append(
        Check(
            "reptile_grad = (θ − θ_k)/α",
            "float64 autograd loop",
            _max_error(reptile_grad(loss, params, s, lr=0.1, steps=3), expected),
            1e-10,
        )
    )
    from .tasks import quadratic_loss, sample_quadratic_tasks

    quad = sample_quadratic_tasks(1, generator=torch.Generator().manual_seed(seed), dtype=F64)
    qs, qq = _task(quad.support, 0), _task(quad.query, 0)
    x0 = {"x": torch.tensor([0.7, -0.2], dtype=F64)}
    exact = maml_grad(quadratic_loss, x0, qs, qq, lr=0.2, steps=2)
    estimate = es_maml_grad(
        quadratic_loss, x0, qs, qq, lr=0.2, steps=2, num_samples=40_000, sigma=0.1, seed=seed
    )
    relative = float((estimate["x"] - exact["x"]).norm() / exact["x"].norm())
    checks.append(
        Check(
            "es_maml_grad → MAML gradient (quadratic F: unbiased), N = 40 000",
            "relative",
            relative,
            0.03,
        )
    )
    return checks


def _grad_at(loss: Callable, params: Tree, batch: tuple) -> Tree:
    leaves = _leaves(params)
    return dict(zip(leaves, torch.autograd.grad(loss(leaves, batch), list(leaves.values()))))


def _new_method_checks(seed: int) -> list[Check]:
    params, support, query = _problem(seed, sizes=(1, 4, 1))
    s, q = _task(support, 0), _task(query, 0)
    loss = make_mse_loss(lambda p, x: mlp(p, x, activation="tanh"))
    gen = torch.Generator().manual_seed(seed + 3)
    rates = {
        k: 0.05 + 0.1 * torch.rand(v.shape, generator=gen, dtype=F64) for k, v in params.items()
    }
    both = {**params, **{f"lr/{k}": v for k, v in rates.items()}}

    def rates_objective(tree: Tree) -> torch.Tensor:
        theta = {k: tree[k] for k in params}
        return loss(_plain_loop(loss, theta, s, lambda n, j: tree[f"lr/{n}"], 2), q)

    g_theta, g_rates = metasgd_grad(loss, params, rates, s, q, steps=2)
    got = {**g_theta, **{f"lr/{k}": v for k, v in g_rates.items()}}  # type: ignore[union-attr]
    checks = [
        Check(
            "metasgd_grad (θ and rates, k=2) = finite differences",
            "float64 central FD",
            _max_error(got, _central_difference(rates_objective, both)),
            1e-7,
        )
    ]
    head = ["w1", "b1"]
    anil = maml_grad(loss, params, s, q, lr=0.3, steps=2, adapt_keys=head)
    checks.append(
        Check(
            "maml_grad(adapt_keys = head) (ANIL, k=2) = finite differences",
            "float64 central FD",
            _max_error(
                anil,
                _central_difference(
                    lambda p: loss(
                        _plain_loop(loss, p, s, lambda n, j: 0.3 if n in head else None, 2), q
                    ),
                    params,
                ),
            ),
            1e-7,
        )
    )
    weights = [0.3, 0.2, 0.5]

    def msl(p: Tree) -> torch.Tensor:
        total, theta = torch.zeros((), dtype=F64), p
        for w in weights:
            theta = _plain_loop(loss, theta, s, lambda n, j: 0.2, 1)
            total = total + w * loss(theta, q)
        return total

    checks.append(
        Check(
            "maml_grad(step_weights) (multi-step loss, k=3) = finite differences",
            "float64 central FD",
            _max_error(
                maml_grad(loss, params, s, q, lr=0.2, steps=3, step_weights=weights),
                _central_difference(msl, params),
            ),
            1e-7,
        )
    )
    per_step = ("b0",)  # one copy of the first bias per inner step, as MAML++'s BNWB
    copies = METHODS["maml"].init(params, lr=0.2, steps=2, per_step_keys=per_step)
    copies["step1/b0"] = copies["step1/b0"] + 0.3  # copies that differ

    def per_step_objective(tree: Tree) -> torch.Tensor:
        theta = {n: v for n, v in tree.items() if not n.startswith("step")}
        for j in range(2):
            view = {**theta, "b0": tree[f"step{j}/b0"]}
            theta = _plain_loop(loss, view, s, lambda n, _: None if n in per_step else 0.2, 1)
        return loss(theta, q)

    checks.append(
        Check(
            "maml_grad(per_step_keys) (per-step copies, BNWB, k=2) = finite differences",
            "float64 central FD",
            _max_error(
                maml_grad(loss, copies, s, q, lr=0.2, steps=2, per_step_keys=per_step),
                _central_difference(per_step_objective, copies),
            ),
            1e-7,
        )
    )
    return checks


def run_checks(seed: int = 0, compiled: bool = False) -> list[Check]:
    """Run every symbolic and numeric check; return one :class:`Check` per identity or family
    (``compiled`` adds the ahead-of-time compiled kernels)."""
    with torch.enable_grad():
        return (
            _symbolic_checks()
            + _numeric_checks(seed)
            + _curvature_and_layer_checks(seed)
            + _metabatch_checks(seed)
            + _estimator_checks(seed)
            + _new_method_checks(seed)
            + (_compiled_checks(seed) if compiled else [])
        )


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
