"""Reptile, iMAML, ES-MAML and the meta-gradient checker against independent references.

References: closed forms on least squares (φ = (A + λI)⁻¹(λθ + b), g = (I + A/λ)⁻¹∇L_q(φ) by
``torch.linalg.solve``), dense Hessians from ``torch.func.hessian``, float64 central finite
differences, and log-log slopes for the O(α²) expansions.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, jacrev, vmap

from mamlkit import (
    IMAMLResult,
    MetaGradientReport,
    adapt,
    compare_meta_gradient,
    es_maml_grad,
    flatten_params,
    fomaml_grad,
    imaml,
    init_mlp,
    make_mse_loss,
    maml_grad,
    maml_grad_hvp,
    mlp,
    reptile_grad,
    unflatten_params,
)
from mamlkit._estimators import _cg


def imaml_grad(*args, **kwargs):
    """``imaml(...).grad``: the gradient alone (vmap-safe with cg_tol=0)."""
    return imaml(*args, **kwargs).grad


F64 = torch.float64


# ------------------------------------------------------------------------------------- problems


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_loss(params, batch):
    """½‖Xw + c − y‖²: a quadratic in θ = (w, c) with Hessian ZᵀZ, Z = [X | 1]."""
    x, y = batch
    return 0.5 * (x @ params["w"] + params["c"] - y).pow(2).sum()


def linear_problem(seed: int = 0, n: int = 3, rows: int = 6, dtype=F64):
    g = _gen(seed)
    params = {
        "w": torch.randn(n, generator=g, dtype=F64).to(dtype),
        "c": torch.randn((), generator=g, dtype=F64).to(dtype),
    }
    support = (
        torch.randn(rows, n, generator=g, dtype=F64).to(dtype),
        torch.randn(rows, generator=g, dtype=F64).to(dtype),
    )
    query = (
        torch.randn(rows + 2, n, generator=g, dtype=F64).to(dtype),
        torch.randn(rows + 2, generator=g, dtype=F64).to(dtype),
    )
    return params, support, query


def design(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


tanh_loss = make_mse_loss(lambda p, x: mlp(p, x, "tanh"))


def tanh_problem(seed: int = 0, dtype=F64):
    g = _gen(seed + 100)
    params = init_mlp((1, 4, 1), seed=seed, dtype=dtype)
    xs = torch.rand(5, 1, generator=g, dtype=F64).to(dtype) * 4 - 2
    xq = torch.rand(7, 1, generator=g, dtype=F64).to(dtype) * 4 - 2
    return params, (xs, torch.sin(xs)), (xq, torch.sin(xq + 0.5))


def flat_hessian(loss, params, batch):
    loss_flat = lambda v: loss(unflatten_params(v, params), batch)  # noqa: E731
    return jacrev(jacrev(loss_flat))(flatten_params(params))


def flat_grad(loss, params, batch):
    return flatten_params(grad(loss)(params, batch))


def slope(xs, ys):
    """Least-squares slope of log ys against log xs."""
    lx, ly = torch.log(torch.tensor(xs, dtype=F64)), torch.log(torch.tensor(ys, dtype=F64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx @ ly) / (lx @ lx))


def flat(tree):
    return flatten_params(tree)


# --------------------------------------------------------------------------------------- Reptile


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("problem", ["linear", "tanh"])
def test_reptile_one_step_is_the_plain_gradient(dtype, problem):
    if problem == "linear":
        params, support, _ = linear_problem(dtype=dtype)
        loss = linear_loss
    else:
        params, support, _ = tanh_problem(dtype=dtype)
        loss = tanh_loss
    out = reptile_grad(loss, params, support, lr=0.3, steps=1)
    # Independent reference: central finite differences in float64.
    p64 = {k: v.to(F64) for k, v in params.items()}
    s64 = tuple(t.to(F64) for t in support)
    v = flat(p64)
    h = 1e-6
    fd = torch.stack(
        [
            (
                loss(unflatten_params(v + h * e, p64), s64)
                - loss(unflatten_params(v - h * e, p64), s64)
            )
            / (2 * h)
            for e in torch.eye(v.numel(), dtype=F64)
        ]
    )
    tol = 1e-7 if dtype == F64 else 1e-4
    torch.testing.assert_close(flat(out).to(F64), fd, rtol=tol, atol=tol)
    assert all(out[k].dtype == dtype and out[k].shape == params[k].shape for k in params)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("lr", [0.05, 0.3])
def test_reptile_is_the_displacement_over_lr(steps, lr):
    params, support, _ = tanh_problem()
    out = reptile_grad(tanh_loss, params, support, lr=lr, steps=steps)
    theta_k = adapt(tanh_loss, params, support, lr=lr, steps=steps)
    expected = {k: (params[k] - theta_k[k]) / lr for k in params}
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_reptile_two_step_expansion_is_second_order_in_alpha():
    """g_Reptile(k=2) = 2ḡ − αH̄ḡ + O(α²) (Nichol et al. 2018, §5): residual slope ≈ 2."""
    params, support, _ = tanh_problem(seed=1)
    g_bar = flat_grad(tanh_loss, params, support)
    h_bar = flat_hessian(tanh_loss, params, support)
    alphas = [0.002, 0.004, 0.008, 0.016, 0.032]
    residuals, first_order_residuals = [], []
    for alpha in alphas:
        out = flat(reptile_grad(tanh_loss, params, support, lr=alpha, steps=2))
        residuals.append(float((out - (2 * g_bar - alpha * h_bar @ g_bar)).norm()))
        first_order_residuals.append(float((out - 2 * g_bar).norm()))
    assert abs(slope(alphas, residuals) - 2.0) < 0.15
    # The α term is really there: dropping it leaves an O(α) residual.
    assert abs(slope(alphas, first_order_residuals) - 1.0) < 0.15


def test_maml_one_step_same_batch_expansion_coefficients():
    """One-step MAML with support = query: ḡ − 2αH̄ḡ + O(α²) — twice Reptile's Hessian weight."""
    params, support, _ = tanh_problem(seed=2)
    g_bar = flat_grad(tanh_loss, params, support)
    hg = flat_hessian(tanh_loss, params, support) @ g_bar
    alphas = [0.002, 0.004, 0.008, 0.016, 0.032]
    res = [
        float(
            (
                flat(maml_grad(tanh_loss, params, support, support, lr=a)) - (g_bar - 2 * a * hg)
            ).norm()
        )
        for a in alphas
    ]
    assert abs(slope(alphas, res) - 2.0) < 0.15


def test_reptile_bad_inputs_name_the_argument():
    params, support, _ = linear_problem()
    with pytest.raises(ValueError, match="steps"):
        reptile_grad(linear_loss, params, support, lr=0.1, steps=0)
    with pytest.raises(TypeError, match="steps"):
        reptile_grad(linear_loss, params, support, lr=0.1, steps=1.0)
    with pytest.raises(ValueError, match="lr"):
        reptile_grad(linear_loss, params, support, lr=math.inf, steps=1)
    with pytest.raises(TypeError, match="batch"):
        reptile_grad(linear_loss, params, support[0], lr=0.1, steps=1)


# ----------------------------------------------------------------------------------------- iMAML


def imaml_closed_form(params, support, query, lam):
    """φ = (A + λI)⁻¹(λθ + b) and g = (I + A/λ)⁻¹ ∇L_q(φ) for L_s = ½‖Zθ − y‖²."""
    z_s, z_q = design(support[0]), design(query[0])
    a, b = z_s.T @ z_s, z_s.T @ support[1]
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    phi = torch.linalg.solve(a + lam * eye, lam * flat(params) + b)
    query_grad = z_q.T @ (z_q @ phi - query[1])
    return phi, torch.linalg.solve(eye + a / lam, query_grad), a


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_imaml_matches_the_closed_form_on_least_squares(lam, seed):
    params, support, query = linear_problem(seed=seed)
    phi_ref, g_ref, a = imaml_closed_form(params, support, query, lam)
    eig = torch.linalg.eigvalsh(a)
    lr = 1.0 / (lam + float(eig[-1]))
    rate = 1 - (lam + float(eig[0])) / (lam + float(eig[-1]))
    steps = math.ceil(math.log(1e-14) / math.log(rate))
    out = imaml(linear_loss, params, support, query, lam=lam, lr=lr, steps=steps, cg_steps=12)
    assert isinstance(out, IMAMLResult)
    torch.testing.assert_close(flat(out.phi), phi_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat(out.grad), g_ref, rtol=1e-9, atol=1e-9)
    assert out.cg_iterations == 12 and float(out.cg_residual) < 1e-10
    # The right-hand side is the QUERY gradient: the support gradient would give another answer.
    z_s = design(support[0])
    wrong = torch.linalg.solve(
        torch.eye(4, dtype=F64) + a / lam, z_s.T @ (z_s @ phi_ref - support[1])
    )
    assert (wrong - g_ref).norm() > 1e-3 * g_ref.norm()
    torch.testing.assert_close(
        imaml_grad(linear_loss, params, support, query, lam=lam, lr=lr, steps=steps, cg_steps=12),
        out.grad,
    )


def test_imaml_uses_the_support_hessian_at_phi():
    """Non-quadratic loss: g = (I + H_s(φ)/λ)⁻¹∇L_q(φ) with a dense Hessian at φ, and φ
    stationary."""
    params, support, query = tanh_problem(seed=3)
    lam = 2.0
    out = imaml(tanh_loss, params, support, query, lam=lam, lr=0.2, steps=400, cg_steps=40)
    phi = out.phi
    stationarity = flat(grad(tanh_loss)(phi, support)) + lam * (flat(phi) - flat(params))
    assert stationarity.norm() < 1e-10
    h_phi = flat_hessian(tanh_loss, phi, support)
    eye = torch.eye(h_phi.shape[0], dtype=F64)
    g_ref = torch.linalg.solve(eye + h_phi / lam, flat_grad(tanh_loss, phi, query))
    torch.testing.assert_close(flat(out.grad), g_ref, rtol=1e-8, atol=1e-10)
    # The Hessian at θ instead of φ gives a measurably different vector.
    h_theta = flat_hessian(tanh_loss, params, support)
    wrong = torch.linalg.solve(eye + h_theta / lam, flat_grad(tanh_loss, phi, query))
    assert (wrong - g_ref).norm() > 1e-4 * g_ref.norm()


def test_imaml_is_the_derivative_of_the_implicit_meta_objective():
    """Central finite differences of θ ↦ L_q(φ*(θ)) along random directions (float64)."""
    params, support, query = tanh_problem(seed=4)
    lam, lr, steps = 3.0, 0.2, 300

    def meta(theta):
        res = imaml(tanh_loss, theta, support, query, lam=lam, lr=lr, steps=steps, cg_steps=1)
        return float(tanh_loss(res.phi, query))

    g = flat(
        imaml_grad(tanh_loss, params, support, query, lam=lam, lr=lr, steps=steps, cg_steps=40)
    )
    v, h = flat(params), 1e-5
    directions = torch.randn(3, v.numel(), generator=_gen(7), dtype=F64)
    for d in directions:
        fd = (
            meta(unflatten_params(v + h * d, params)) - meta(unflatten_params(v - h * d, params))
        ) / (2 * h)
        assert abs(fd - float(g @ d)) < 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("size", [3, 8, 15])
@pytest.mark.parametrize("lam", [0.3, 1.0, 5.0])
def test_cg_solves_random_spd_systems_like_a_dense_solve(size, lam):
    g = _gen(size)
    m = torch.randn(size, size, generator=g, dtype=F64)
    a = m @ m.T / size  # PSD: H
    rhs = torch.randn(size, generator=g, dtype=F64)

    def quad(params, batch):  # Hessian = batch[0]
        return 0.5 * params["v"] @ batch[0] @ params["v"]

    point = {"v": torch.zeros(size, dtype=F64)}
    batch = (a, torch.zeros(size, dtype=F64))
    x, iterations, residual = _cg(quad, point, batch, {"v": rhs}, lam, 3 * size, 0.0)
    system = torch.eye(size, dtype=F64) + a / lam
    torch.testing.assert_close(x["v"], torch.linalg.solve(system, rhs), rtol=1e-9, atol=1e-9)
    assert iterations == 3 * size
    true_residual = (rhs - system @ x["v"]).norm() / rhs.norm()
    assert float(residual) < 1e-9 and float(true_residual) < 1e-9
    # Early stop with a tolerance: fewer iterations, residual below the tolerance.
    x, iterations, residual = _cg(quad, point, batch, {"v": rhs}, lam, 3 * size, 1e-6)
    true_residual = (rhs - system @ x["v"]).norm() / rhs.norm()
    assert iterations <= size + 1 and float(residual) <= 1e-6 and float(true_residual) < 1e-5


def test_cg_fixed_iterations_stay_finite_after_convergence_and_for_zero_rhs():
    params, support, query = linear_problem()
    out = imaml(linear_loss, params, support, query, lam=1.0, lr=0.05, steps=5, cg_steps=60)
    assert out.cg_iterations == 60
    assert all(torch.isfinite(v).all() for v in out.grad.values())
    zero_query = (query[0], query[0] @ out.phi["w"] + out.phi["c"])  # ∇L_q(φ) = 0
    out0 = imaml(linear_loss, params, support, zero_query, lam=1.0, lr=0.05, steps=5, cg_steps=7)
    assert all((v == 0).all() for v in out0.grad.values()) and float(out0.cg_residual) == 0.0
    early = imaml(linear_loss, params, support, zero_query, lam=1.0, lr=0.05, steps=5, cg_tol=1e-8)
    assert early.cg_iterations == 0


def test_imaml_grad_under_vmap_over_tasks_matches_a_loop():
    params, _, _ = tanh_problem()
    g = _gen(11)
    xs = torch.rand(4, 5, 1, generator=g, dtype=F64) * 4 - 2
    xq = torch.rand(4, 6, 1, generator=g, dtype=F64) * 4 - 2
    ys, yq = torch.sin(xs), torch.sin(xq)

    def task(a, b, c, d):
        return imaml_grad(tanh_loss, params, (a, b), (c, d), lam=2.0, lr=0.1, steps=10, cg_steps=6)

    batched = vmap(task)(xs, ys, xq, yq)
    for t in range(4):
        torch.testing.assert_close(
            {k: v[t] for k, v in batched.items()}, task(xs[t], ys[t], xq[t], yq[t])
        )
    with pytest.raises(ValueError, match="cg_tol"):
        vmap(
            lambda a, b, c, d: imaml_grad(
                tanh_loss, params, (a, b), (c, d), lam=2.0, lr=0.1, steps=1, cg_tol=1e-6
            )
        )(xs, ys, xq, yq)


def test_imaml_tends_to_the_query_gradient_at_theta_as_lambda_grows():
    """φ → θ and g → ∇L_q(θ) like 1/λ."""
    params, support, query = tanh_problem(seed=5)
    target = flat_grad(tanh_loss, params, query)
    lams = [1e2, 1e3, 1e4]
    errors = []
    for lam in lams:
        out = imaml_grad(tanh_loss, params, support, query, lam=lam, lr=1 / (lam + 10), steps=30)
        errors.append(float((flat(out) - target).norm()))
    assert errors[-1] < 1e-3 * target.norm()
    assert abs(slope(lams, errors) + 1.0) < 0.1


def test_imaml_with_lambda_one_over_alpha_matches_one_step_maml_to_second_order():
    """(I + H/λ)⁻¹ ≈ I − αH and φ ≈ θ − α∇L_s(θ) with α = 1/λ: the difference is O(α²)."""
    params, support, query = tanh_problem(seed=6)
    alphas = [1e-3, 2e-3, 4e-3, 8e-3]
    diffs, to_theta = [], []
    target = flat_grad(tanh_loss, params, query)
    for alpha in alphas:
        lam = 1 / alpha
        g_i = flat(
            imaml_grad(tanh_loss, params, support, query, lam=lam, lr=1 / (lam + 10), steps=40)
        )
        g_m = flat(maml_grad(tanh_loss, params, support, query, lr=alpha, steps=1))
        diffs.append(float((g_i - g_m).norm()))
        to_theta.append(float((g_m - target).norm()))
    assert abs(slope(alphas, diffs) - 2.0) < 0.15
    assert abs(slope(alphas, to_theta) - 1.0) < 0.15  # each alone is only O(α) from ∇L_q(θ)


def test_imaml_bad_inputs_name_the_argument():
    params, support, query = linear_problem()
    kw = dict(lam=1.0, lr=0.1, steps=2)
    for bad_lam in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="lam"):
            imaml(linear_loss, params, support, query, **{**kw, "lam": bad_lam})
    with pytest.raises(ValueError, match="cg_steps"):
        imaml_grad(linear_loss, params, support, query, **kw, cg_steps=0)
    with pytest.raises(ValueError, match="cg_tol"):
        imaml_grad(linear_loss, params, support, query, **kw, cg_tol=-1e-3)
    with pytest.raises(ValueError, match="steps"):
        imaml_grad(linear_loss, params, support, query, lam=1.0, lr=0.1, steps=-1)
    with pytest.raises(TypeError, match="query"):
        imaml_grad(linear_loss, params, support, None, **kw)


# ---------------------------------------------------------------------------------------- ES-MAML


def test_es_error_falls_like_one_over_sqrt_n_on_a_quadratic_meta_objective():
    """Least squares: F(θ) = L_q(θ_1(θ)) is quadratic, so F_σ has exactly ∇F = maml_grad."""
    params, support, query = linear_problem(seed=2)
    lr = 0.02
    exact = flat(maml_grad(linear_loss, params, support, query, lr=lr, steps=1))
    sizes = [16, 64, 256, 1024]
    rms = []
    for n in sizes:
        errs = [
            float(
                (
                    flat(
                        es_maml_grad(
                            linear_loss,
                            params,
                            support,
                            query,
                            lr=lr,
                            steps=1,
                            num_samples=n,
                            sigma=0.7,
                            seed=s,
                        )
                    )
                    - exact
                ).norm()
                ** 2
            )
            for s in range(16)
        ]
        rms.append(math.sqrt(sum(errs) / len(errs)))
    assert abs(slope(sizes, rms) + 0.5) < 0.15
    assert rms[-1] < 0.2 * exact.norm()


def test_es_estimates_the_smoothed_gradient_not_the_gradient():
    """F(θ) = ¼Σθ⁴: ∇F_σ = θ³ + 3σ²θ, not θ³ (steps=0 so F = L_q)."""

    def quartic(params, batch):
        return 0.25 * params["w"].pow(4).sum()

    params = {"w": torch.tensor([1.0, -0.5, 0.8], dtype=F64)}
    data = (torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64))
    sigma = 0.5
    w = params["w"]
    smoothed, true = w**3 + 3 * sigma**2 * w, w**3
    est = es_maml_grad(
        quartic, params, data, data, lr=0.0, steps=0, num_samples=20000, sigma=sigma, seed=3
    )["w"]
    assert (est - smoothed).norm() < 0.05 * smoothed.norm()
    assert (est - true).norm() > 0.5 * (smoothed - true).norm()


def test_es_is_seeded_and_deterministic():
    params, support, query = tanh_problem()
    kw = dict(lr=0.1, steps=2, num_samples=32, sigma=0.05)
    a = es_maml_grad(tanh_loss, params, support, query, **kw, seed=5)
    b = es_maml_grad(tanh_loss, params, support, query, **kw, seed=5)
    c = es_maml_grad(tanh_loss, params, support, query, **kw, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.random.get_rng_state()
    es_maml_grad(tanh_loss, params, support, query, **kw, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_es_bad_inputs_name_the_argument():
    params, support, query = linear_problem()
    kw = dict(lr=0.1, steps=1, num_samples=4, sigma=0.1, seed=0)
    for bad in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="sigma"):
            es_maml_grad(linear_loss, params, support, query, **{**kw, "sigma": bad})
    with pytest.raises(ValueError, match="num_samples"):
        es_maml_grad(linear_loss, params, support, query, **{**kw, "num_samples": 0})
    with pytest.raises(TypeError, match="seed"):
        es_maml_grad(linear_loss, params, support, query, **{**kw, "seed": 1.5})
    with pytest.raises(ValueError, match="steps"):
        es_maml_grad(linear_loss, params, support, query, **{**kw, "steps": -1})


# ----------------------------------------------------------------------------------- the checker


@pytest.mark.parametrize("steps", [1, 3])
def test_compare_meta_gradient_verdicts(steps):
    params, support, query = tanh_problem(seed=8)
    kw = dict(lr=0.3, steps=steps)
    report = compare_meta_gradient(
        maml_grad(tanh_loss, params, support, query, **kw), tanh_loss, params, support, query, **kw
    )
    assert isinstance(report, MetaGradientReport)
    assert report.verdict == "maml" and report.rel_to_maml < 1e-12 and report.cos_to_maml > 0.999999
    assert "verdict: maml" in str(report)
    hvp_engine = maml_grad_hvp(tanh_loss, params, support, query, **kw)
    assert (
        compare_meta_gradient(hvp_engine, tanh_loss, params, support, query, **kw).verdict == "maml"
    )
    first = fomaml_grad(tanh_loss, params, support, query, **kw)
    report = compare_meta_gradient(first, tanh_loss, params, support, query, **kw)
    assert report.verdict == "fomaml" and report.rel_to_fomaml < 1e-12
    assert report.maml_vs_fomaml > 1e-3 and abs(report.rel_to_maml - report.maml_vs_fomaml) < 1e-12
    noise = {k: torch.randn(v.shape, generator=_gen(1), dtype=F64) for k, v in params.items()}
    report = compare_meta_gradient(noise, tanh_loss, params, support, query, **kw)
    assert report.verdict == "neither" and abs(report.cos_to_maml) < 0.9


def test_compare_meta_gradient_flags_a_loss_convention_factor_and_no_curvature():
    params, support, query = tanh_problem(seed=9)
    doubled = {k: 2 * v for k, v in maml_grad(tanh_loss, params, support, query, lr=0.3).items()}
    report = compare_meta_gradient(doubled, tanh_loss, params, support, query, lr=0.3)
    assert report.verdict == "neither" and abs(report.scale_to_maml - 2.0) < 1e-12
    assert "2×" in str(report)

    def linear_in_theta(p, batch):  # H = 0: MAML = FOMAML
        return (p["w"] * batch[0]).sum()

    p = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    data = (torch.tensor([[1.0, 3.0]], dtype=F64), torch.zeros(1, dtype=F64))
    g = maml_grad(linear_in_theta, p, data, data, lr=0.5)
    assert compare_meta_gradient(g, linear_in_theta, p, data, data, lr=0.5).verdict == "ambiguous"


def test_compare_meta_gradient_bad_inputs():
    params, support, query = linear_problem()
    with pytest.raises(ValueError, match="grad"):
        compare_meta_gradient({"w": params["w"]}, linear_loss, params, support, query, lr=0.1)
    with pytest.raises(ValueError, match="rtol"):
        compare_meta_gradient(params, linear_loss, params, support, query, lr=0.1, rtol=0.0)


# ---------------------------------------------------------------------- purity and conventions


def _snapshot(tree):
    return {k: (v.clone(), v.requires_grad, v.grad) for k, v in tree.items()}


@pytest.mark.parametrize(
    "call",
    [
        lambda p, s, q: reptile_grad(tanh_loss, p, s, lr=0.1, steps=3),
        lambda p, s, q: imaml_grad(tanh_loss, p, s, q, lam=2.0, lr=0.1, steps=3, cg_steps=3),
        lambda p, s, q: imaml(tanh_loss, p, s, q, lam=2.0, lr=0.1, steps=3, cg_tol=1e-8).phi,
        lambda p, s, q: es_maml_grad(
            tanh_loss, p, s, q, lr=0.1, steps=2, num_samples=3, sigma=0.1, seed=0
        ),
    ],
    ids=["reptile", "imaml_grad", "imaml_phi", "es"],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_mutation_detached_same_keys_shapes_dtypes(call, dtype):
    params, support, query = tanh_problem(dtype=dtype)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    before, keys = _snapshot(params), list(params)
    data_before = [t.clone() for t in (*support, *query)]
    out = call(params, support, query)
    assert list(params) == keys and list(out) == keys
    for k, (value, requires_grad, g) in before.items():
        assert torch.equal(params[k], value) and params[k].requires_grad == requires_grad
        assert params[k].grad is g
    assert all(torch.equal(a, b) for a, b in zip((*support, *query), data_before))
    for k in keys:
        assert out[k].shape == params[k].shape and out[k].dtype == dtype
        assert not out[k].requires_grad and out[k].grad_fn is None
