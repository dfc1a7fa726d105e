r"""Meta-gradient estimators beyond MAML: Reptile, implicit MAML, ES-MAML, and a checker.

Notation (as in the notebooks): θ = θ_0 the meta-parameters, α = ``lr`` the inner step size,
θ_{j+1} = θ_j − α∇L_s(θ_j) on the *support* batch, θ′ = θ_k, L_q the *query* loss, H_s the
support-loss Hessian, and ``maml_grad`` the exact meta-gradient ``dL_q(θ_k)/dθ``.

- :func:`reptile_grad` (Nichol et al. 2018): ``(θ − θ_k)/α = Σ_j ∇L(θ_j)``, no Hessian.
- :func:`imaml` (Rajeswaran et al. 2019): the gradient of ``L_q(φ(θ))``
  where φ(θ) minimises ``L_s(φ) + λ/2‖φ − θ‖²``, by the implicit function theorem and conjugate
  gradient on Hessian-vector products.
- :func:`es_maml_grad` (Song et al. 2020): antithetic Gaussian smoothing of ``F(θ) = L_q(θ_k)``,
  zero-order in θ.
- :func:`compare_meta_gradient`: says whether a gradient is MAML's, FOMAML's, or neither.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vmap

from ._checks import (
    check_finite,
    check_int,
    check_like,
    check_nonnegative,
    check_params,
    check_positive,
    check_positive_int,
    check_seed,
    check_task,
    checked_loss,
)
from ._curvature import _hvp
from ._metagrad import _adapt, fomaml_grad, maml_grad
from ._params import (
    Batch,
    LossFn,
    Params,
    flatten_params,
    tree_axpy,
    tree_detach,
    tree_vdot,
    tree_zeros_like,
)

# --------------------------------------------------------------------------------------- Reptile


def reptile_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Batch,
    *,
    lr: float,
    steps: int,
) -> Params:
    r"""The Reptile direction ``(θ − θ_k)/α``: the sum of the inner gradients along the path.

    .. math::

        g_{\text{Reptile}} = \frac{θ − θ_k}{α} = \sum_{j=0}^{k−1} ∇L(θ_j),
        \qquad θ_{j+1} = θ_j − α∇L(θ_j)

    It is computed as the sum (no cancellation in θ − θ_k for small α). No Hessian appears, and
    the cost is k gradient evaluations with O(P) memory. For k = 1 it is the plain gradient
    ∇L(θ); for k = 2 (Nichol et al. 2018, §5), with ḡ = ∇L(θ) and H̄ = ∇²L(θ),

    .. math:: g_{\text{Reptile}} = ∇L(θ) + ∇L(θ_1) = 2ḡ − αH̄ḡ + O(α²),

    whereas one-step MAML on the same batch is ``ḡ − 2αH̄ḡ + O(α²)``: both contain the term that
    aligns gradients across steps, with different weights relative to ḡ.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; never modified.
        batch: ``(x, y)`` for the inner steps (Reptile uses one task's data; split it yourself
            if you want the "different minibatch per step" variant).
        lr: the inner step size α (finite; α = 0 gives the limit k·∇L(θ)).
        steps: the number of inner steps k ≥ 1.

    Returns:
        A detached dict with the keys, shapes and dtypes of ``params``.

    Raises:
        ValueError: if ``steps < 1``, ``lr`` is not finite, or the batch is malformed.

    References:
        A. Nichol, J. Achiam, J. Schulman, "On First-Order Meta-Learning Algorithms", 2018.

    Example:
        >>> L = lambda p, b: 0.5 * (p["w"] ** 2).sum()            # ∇L = w: θ = 1 → ½ → ¼
        >>> reptile_grad(L, {"w": torch.tensor([1.0])}, (torch.zeros(1), torch.zeros(1)),
        ...              lr=0.5, steps=2)                           # (1 − ¼)/½ = 1 + ½
        {'w': tensor([1.5000])}
    """
    loss = checked_loss(loss_fn)
    params = tree_detach(check_params(params))
    batch = check_task(loss_fn, params, batch, "batch")
    return _reptile(
        loss, params, batch, check_finite(lr, "lr"), check_positive_int(steps, "steps")
    )[0]


def _reptile(
    loss: LossFn, params: Params, batch: Batch, lr: float, steps: int
) -> tuple[Params, Params]:
    """(Σ_j ∇L(θ_j), θ_k), the unchecked core (vmap-safe)."""
    total, theta = tree_zeros_like(params), params
    for _ in range(steps):
        g = tree_detach(grad(loss)(theta, batch))
        total = tree_axpy(1.0, g, total)
        theta = tree_axpy(-lr, g, theta)
    return total, theta


# ----------------------------------------------------------------------------------------- iMAML

CG_STEPS = 5
"""The default number of conjugate-gradient iterations of :func:`imaml` (and of the method table's
``"imaml"`` entry)."""


class IMAMLResult(NamedTuple):
    """What :func:`imaml` returns.

    Attributes:
        grad: the implicit meta-gradient ``(I + H_s(φ)/λ)⁻¹ ∇L_q(φ)``, shaped like ``params``.
        phi: the inner solution φ, shaped like ``params``.
        cg_iterations: how many conjugate-gradient iterations ran (a Python int).
        cg_residual: the relative CG residual ``‖b − A x‖ / ‖b‖`` of the last iterate, from the
            CG recurrence (a 0-d tensor; 0 when b = 0).
    """

    grad: Params
    phi: Params
    cg_iterations: int
    cg_residual: Tensor


def _proximal_inner(
    loss: LossFn, theta: Params, support: Batch, lam: float, lr: float, steps: int
) -> Params:
    """``steps`` gradient steps on ``L_s(φ) + λ/2‖φ − θ‖²`` from φ = θ (no history kept)."""
    phi = theta
    for _ in range(steps):  # φ ← φ − α(∇L_s(φ) + λ(φ − θ))
        g = tree_axpy(-lam, theta, tree_axpy(lam, phi, tree_detach(grad(loss)(phi, support))))
        phi = tree_axpy(-lr, g, phi)
    return phi


def _cg(
    loss: LossFn,
    phi: Params,
    support: Batch,
    rhs: Params,
    lam: float,
    cg_steps: int,
    cg_tol: float,
) -> tuple[Params, int, Tensor]:
    """Solve ``(I + H_s(φ)/λ) x = rhs`` by conjugate gradient from x = 0, H by HVPs only.

    With ``cg_tol == 0`` exactly ``cg_steps`` iterations run and no tensor value reaches Python
    control flow (vmap-safe): a step whose curvature pᵀAp is not positive, or whose residual is
    exactly zero, becomes a no-op through ``torch.where`` instead of a division by zero.
    """

    def apply_a(v: Params) -> Params:
        return tree_axpy(1 / lam, tree_detach(_hvp(loss, phi, support, v)), v)

    x = tree_zeros_like(rhs)
    r = dict(rhs)
    p = dict(rhs)
    rs = tree_vdot(r, r)
    b_norm = rs.sqrt()
    zero = torch.zeros_like(rs)
    iterations = 0
    for _ in range(cg_steps):
        if cg_tol > 0:
            try:
                converged = bool(rs.sqrt() <= cg_tol * b_norm)
            except RuntimeError as error:  # vmap refuses data-dependent control flow
                raise ValueError(
                    "cg_tol must be 0.0 under torch.func.vmap (a fixed number of CG "
                    f"iterations, cg_steps); got cg_tol={cg_tol}"
                ) from error
            if converged:
                break
        ap = apply_a(p)
        curvature = tree_vdot(p, ap)
        ok = curvature > 0
        alpha = torch.where(ok, rs / torch.where(ok, curvature, torch.ones_like(rs)), zero)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = tree_vdot(r, r)
        nonzero = rs > 0
        beta = torch.where(nonzero, rs_new / torch.where(nonzero, rs, torch.ones_like(rs)), zero)
        p = tree_axpy(beta, p, r)
        rs = rs_new
        iterations += 1
    positive = b_norm > 0
    residual = torch.where(
        positive, rs.sqrt() / torch.where(positive, b_norm, torch.ones_like(b_norm)), zero
    )
    return x, iterations, residual


def imaml(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lam: float,
    lr: float,
    steps: int,
    cg_steps: int = CG_STEPS,
    cg_tol: float = 0.0,
) -> IMAMLResult:
    r"""Implicit MAML: the inner solution φ and the implicit meta-gradient, Hessian-free.

    The inner problem is proximal: φ(θ) = argmin_φ′ ``L_s(φ′) + λ/2‖φ′ − θ‖²``, approximated by
    ``steps`` gradient steps of size ``lr`` on that objective from φ′ = θ. Its stationarity
    condition ``∇L_s(φ) + λ(φ − θ) = 0`` differentiated in θ (implicit function theorem) gives
    ``dφ/dθ = (I + H_s(φ)/λ)⁻¹``, symmetric, so

    .. math:: g = \frac{dL_q(φ(θ))}{dθ} = \Big(I + \frac{H_s(φ)}{λ}\Big)^{-1} ∇L_q(φ).

    The right-hand side is the **query** gradient at φ; the matrix holds the **support** Hessian
    at φ. The system is solved by conjugate gradient from x = 0 with one Hessian-vector product
    per iteration; H is never formed and nothing is differentiated through the inner loop, so
    memory is O(P) whatever ``steps`` is. For large λ, φ → θ and g → ∇L_q(θ); to first order in
    1/λ, g ≈ (I − H_s/λ)∇L_q, the one-step MAML gradient with α = 1/λ.

    **Under torch.func.vmap** (e.g. over tasks) pass ``cg_tol=0.0`` (the default): then exactly
    ``cg_steps`` iterations run with no data-dependent Python control flow (no ``.item()``, no
    early exit); an iteration that has already converged (zero residual) or meets non-positive
    curvature leaves x unchanged instead of dividing by zero. With ``cg_tol > 0`` (outside
    vmap) CG stops as soon as ``‖r‖ ≤ cg_tol·‖b‖``; under vmap that raises a ValueError. The
    full :class:`IMAMLResult` holds a Python int, so vmap a function that returns
    ``imaml(...).grad``
    rather than this one.

    CG needs ``I + H_s(φ)/λ`` positive definite, i.e. λ > −(smallest eigenvalue of H_s(φ)); the
    inner steps converge for ``0 < lr < 2/(λ + largest eigenvalue of H_s)``. Check
    ``cg_residual`` if in doubt.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; never modified.
        support: ``(x, y)`` for the inner problem (and the Hessian).
        query: ``(x, y)`` for the meta-objective (the right-hand side).
        lam: the proximal strength λ > 0.
        lr: the step size of the inner gradient steps (finite).
        steps: the number of inner steps ≥ 0 (0 gives φ = θ).
        cg_steps: the maximum number of CG iterations ≥ 1 (exactly this many if cg_tol = 0).
        cg_tol: relative residual at which CG stops early (≥ 0; 0 = never).

    Returns:
        An :class:`IMAMLResult` ``(grad, phi, cg_iterations, cg_residual)``, all detached.

    Raises:
        ValueError: on lam ≤ 0, non-finite lr, steps < 0, cg_steps < 1, cg_tol < 0, malformed
            batches, or cg_tol > 0 under vmap.

    References:
        A. Rajeswaran, C. Finn, S. Kakade, S. Levine, "Meta-Learning with Implicit Gradients",
        NeurIPS 2019.

    Example:
        >>> L = lambda p, b: 0.5 * ((p["w"] - b[1]) ** 2).sum()      # H_s = 1
        >>> s, q = (torch.zeros(1), torch.zeros(1)), (torch.zeros(1), -torch.ones(1))
        >>> r = imaml(L, {"w": torch.tensor(2.0)}, s, q, lam=1.0, lr=0.5, steps=1, cg_steps=1)
        >>> r.phi["w"], r.grad["w"]        # φ = λθ/(1 + λ) = 1;  g = ∇L_q(φ)/(1 + 1/λ) = 2/2
        (tensor(1.), tensor(1.))
    """
    loss = checked_loss(loss_fn)
    params = tree_detach(check_params(params))
    support = check_task(loss_fn, params, support, "support")
    query = check_task(loss_fn, params, query, "query")
    lam = check_positive(lam, "lam")
    lr = check_finite(lr, "lr")
    steps = check_int(steps, "steps")
    cg_steps = check_positive_int(cg_steps, "cg_steps")
    cg_tol = check_nonnegative(cg_tol, "cg_tol")
    return _imaml(loss, params, support, query, lam, lr, steps, cg_steps, cg_tol)


def _imaml(
    loss: LossFn,
    params: Params,
    support: Batch,
    query: Batch,
    lam: float,
    lr: float,
    steps: int,
    cg_steps: int,
    cg_tol: float,
) -> IMAMLResult:
    """The unchecked core of :func:`imaml` (vmap-safe with ``cg_tol=0``)."""
    phi = _proximal_inner(loss, params, support, lam, lr, steps)
    rhs = tree_detach(grad(loss)(phi, query))
    g, iterations, residual = _cg(loss, phi, support, rhs, lam, cg_steps, cg_tol)
    return IMAMLResult(tree_detach(g), tree_detach(phi), iterations, residual.detach())


# ---------------------------------------------------------------------------------------- ES-MAML


def es_maml_grad(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int,
    num_samples: int,
    sigma: float,
    seed: int,
) -> Params:
    r"""A zero-order (ES) estimate of the meta-gradient: antithetic Gaussian smoothing.

    With the meta-objective ``F(θ) = L_q(θ_k(θ))`` (θ_k from ``steps`` plain gradient steps of
    size ``lr`` on the support batch, as in :func:`mamlkit.adapt`) and ε_i ~ N(0, I) drawn from a
    ``torch.Generator`` seeded with ``seed``:

    .. math::

        g = \frac{1}{2σN} \sum_{i=1}^{N} \big[F(θ + σε_i) − F(θ − σε_i)\big]\, ε_i,
        \qquad E[g] = ∇F_σ(θ), \quad F_σ(θ) = E_ε\, F(θ + σε).

    So it estimates the gradient of the *Gaussian-smoothed* meta-objective, which tends to the
    MAML gradient ∇F as σ → 0 (the bias is O(σ²) for smooth F and exactly zero when F is
    quadratic); its standard deviation falls like 1/√N. The antithetic pairs cancel F(θ) and the
    even terms, so the variance stays bounded as σ → 0. θ is never differentiated: no Hessian and
    no graph through the inner loop (the inner steps still use gradients; ES-MAML also describes
    zero-order inner steps, which are not implemented here). The 2N evaluations of F run under
    ``torch.func.vmap``, so ``loss_fn`` must be vmap-compatible; to vmap this function itself
    over tasks, use ``randomness="same"``.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; never modified.
        support: ``(x, y)`` for the inner steps.
        query: ``(x, y)`` for the meta-objective.
        lr: the inner step size α (finite).
        steps: the number of inner steps k ≥ 0.
        num_samples: N ≥ 1, the number of antithetic pairs (2N evaluations of F).
        sigma: the smoothing scale σ > 0.
        seed: seeds the private generator (the global RNG is untouched); same seed, same result.

    Returns:
        A detached dict with the keys, shapes and dtypes of ``params``.

    Raises:
        ValueError: on sigma ≤ 0, num_samples < 1, steps < 0, non-finite lr.
        TypeError: on a non-int seed.

    References:
        X. Song, W. Gao, Y. Yang, K. Choromanski, A. Pacchiano, Y. Tang, "ES-MAML: Simple
        Hessian-Free Meta Learning", ICLR 2020.

    Example:
        >>> L = lambda p, b: 0.5 * ((p["w"] - b[1]) ** 2).sum()   # F(w) = ½w², ∇F = w
        >>> s = q = (torch.zeros(1), torch.zeros(1))
        >>> g = es_maml_grad(L, {"w": torch.tensor([1.0])}, s, q, lr=0.0, steps=0,
        ...                  num_samples=4000, sigma=0.1, seed=0)
        >>> abs(g["w"].item() - 1.0) < 0.1
        True
    """
    loss = checked_loss(loss_fn)
    params = tree_detach(check_params(params))
    support = check_task(loss_fn, params, support, "support")
    query = check_task(loss_fn, params, query, "query")
    lr = check_finite(lr, "lr")
    steps = check_int(steps, "steps")
    num_samples = check_positive_int(num_samples, "num_samples")
    sigma = check_positive(sigma, "sigma")
    seed = check_seed(seed)

    flat = flatten_params(params)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(num_samples, flat.numel(), generator=generator, dtype=torch.float64)
    eps = eps.to(dtype=flat.dtype, device=flat.device)
    noise: Params = {}
    offset = 0
    for key, value in params.items():
        noise[key] = eps[:, offset : offset + value.numel()].reshape(num_samples, *value.shape)
        offset += value.numel()

    def meta_objective(theta: Params) -> Tensor:
        return loss(_adapt(loss, theta, support, lr, steps, first_order=True), query)

    plus = {k: params[k] + sigma * noise[k] for k in params}
    minus = {k: params[k] - sigma * noise[k] for k in params}
    difference = vmap(meta_objective)(plus) - vmap(meta_objective)(minus)  # (N,)
    weights = (difference / (2 * sigma * num_samples)).detach()
    return {k: torch.tensordot(weights, noise[k], dims=1) for k in params}


# ----------------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class MetaGradientReport:
    """How a meta-gradient compares with exact MAML and with first-order MAML.

    Attributes:
        verdict: ``"maml"``, ``"fomaml"``, ``"neither"``, or ``"ambiguous"`` when MAML and FOMAML
            are themselves within ``rtol`` of each other on this problem (no curvature to tell
            them apart: raise lr or steps, or use a curved loss).
        rel_to_maml: ``‖g − g_MAML‖ / ‖g_MAML‖``.
        rel_to_fomaml: ``‖g − g_FO‖ / ‖g_FO‖``.
        cos_to_maml: cosine between g and g_MAML.
        cos_to_fomaml: cosine between g and g_FO.
        scale_to_maml: the least-squares factor c minimising ‖g − c·g_MAML‖ (a c far from 1 with
            a cosine near 1 points at a loss-convention mismatch: ½Σ vs Σ vs mean).
        maml_vs_fomaml: ``‖g_MAML − g_FO‖ / ‖g_MAML‖``, the size of the second-order term.
        rtol: the relative tolerance used for the verdict.
    """

    verdict: str
    rel_to_maml: float
    rel_to_fomaml: float
    cos_to_maml: float
    cos_to_fomaml: float
    scale_to_maml: float
    maml_vs_fomaml: float
    rtol: float

    def __str__(self) -> str:
        meaning = {
            "maml": "matches exact MAML (second order)",
            "fomaml": "matches first-order MAML (the Hessian terms are missing)",
            "neither": "matches neither MAML nor first-order MAML",
            "ambiguous": "cannot be told apart: MAML and FOMAML agree within rtol here",
        }[self.verdict]
        lines = [
            f"verdict: {self.verdict} ({meaning})",
            f"  vs MAML:   relative distance {self.rel_to_maml:.2e}, "
            f"cosine {self.cos_to_maml:+.6f}",
            f"  vs FOMAML: relative distance {self.rel_to_fomaml:.2e}, "
            f"cosine {self.cos_to_fomaml:+.6f}",
            f"  MAML vs FOMAML differ by {self.maml_vs_fomaml:.2e} (relative); "
            f"rtol = {self.rtol:.0e}",
        ]
        if self.verdict == "neither" and self.cos_to_maml > 0.999:
            lines.append(
                f"  hint: parallel to MAML but {self.scale_to_maml:.4g}× as long: "
                "check the loss convention (½Σ, Σ or mean) and lr"
            )
        return "\n".join(lines)


def _relative(a: Tensor, reference: Tensor) -> float:
    scale = max(reference.norm().item(), torch.finfo(reference.dtype).tiny)
    return (a - reference).norm().item() / scale


def _cosine(a: Tensor, b: Tensor) -> float:
    denominator = a.norm().item() * b.norm().item()
    return (a @ b).item() / denominator if denominator > 0 else 0.0


def compare_meta_gradient(
    grad: Mapping[str, Tensor],
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    rtol: float = 1e-4,
) -> MetaGradientReport:
    r"""Tell whether ``grad`` is the exact MAML gradient, the first-order one, or neither.

    Computes the references ``g_MAML = dL_q(θ_k)/dθ`` (:func:`mamlkit.maml_grad`) and
    ``g_FO = ∇L_q(θ_k)`` (:func:`mamlkit.fomaml_grad`) on the same problem and reports the
    relative distance and cosine of ``grad`` to each. The verdict is the reference within
    ``rtol`` (relative distance), ``"neither"`` if none is, and ``"ambiguous"`` if both are —
    which happens when ``‖g_MAML − g_FO‖`` (one-step: ``α‖H_s ∇L_q(θ′)‖``) is below ``rtol``:
    pick a problem with curvature and a larger ``lr`` so that a missing Hessian term shows.
    Run it in float64 for a sharp answer.

    Args:
        grad: the meta-gradient to check, shaped like ``params``.
        loss_fn, params, support, query, lr, steps: the problem, as for :func:`maml_grad`.
        rtol: relative distance under which ``grad`` counts as equal to a reference (> 0).

    Returns:
        A :class:`MetaGradientReport`; ``print`` it for a readable summary.

    Example:
        >>> L = lambda p, b: 0.5 * ((b[0] * p["w"] - b[1]) ** 2).sum()
        >>> f64 = torch.float64
        >>> s = q = (torch.tensor([1.0, 1.0], dtype=f64), torch.zeros(2, dtype=f64))
        >>> p = {"w": torch.tensor(1.0, dtype=torch.float64)}
        >>> compare_meta_gradient({"w": torch.tensor(1.28, dtype=f64)}, L, p, s, q, lr=0.1).verdict
        'maml'
        >>> compare_meta_gradient({"w": torch.tensor(1.6, dtype=f64)}, L, p, s, q, lr=0.1).verdict
        'fomaml'
    """
    params = check_params(params)
    grad = check_like(grad, params, "grad")
    rtol = check_positive(rtol, "rtol")
    g_maml = flatten_params(maml_grad(loss_fn, params, support, query, lr=lr, steps=steps))
    g_fo = flatten_params(fomaml_grad(loss_fn, params, support, query, lr=lr, steps=steps))
    g = flatten_params(tree_detach(grad)).to(dtype=g_maml.dtype, device=g_maml.device)
    rel_maml, rel_fo = _relative(g, g_maml), _relative(g, g_fo)
    close_maml, close_fo = rel_maml <= rtol, rel_fo <= rtol
    if close_maml and close_fo:
        verdict = "ambiguous"
    elif close_maml:
        verdict = "maml"
    elif close_fo:
        verdict = "fomaml"
    else:
        verdict = "neither"
    norm_sq = (g_maml @ g_maml).item()
    scale = (g @ g_maml).item() / norm_sq if norm_sq > 0 else math.nan
    return MetaGradientReport(
        verdict=verdict,
        rel_to_maml=rel_maml,
        rel_to_fomaml=rel_fo,
        cos_to_maml=_cosine(g, g_maml),
        cos_to_fomaml=_cosine(g, g_fo),
        scale_to_maml=scale,
        maml_vs_fomaml=_relative(g_fo, g_maml),
        rtol=rtol,
    )


__all__ = [
    "IMAMLResult",
    "MetaGradientReport",
    "compare_meta_gradient",
    "es_maml_grad",
    "imaml",
    "reptile_grad",
]
