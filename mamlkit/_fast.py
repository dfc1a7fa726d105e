r"""A fast batched meta-gradient for an MLP with a squared-error loss (no autograd, no vmap).

For ``loss_fn = make_mse_loss(mlp)`` (ReLU or tanh hidden layers) the inner-loop gradient, the
support-loss Hessian-vector product and the query gradient are all written out as explicit
tensor formulas over a leading *task* dimension, so one meta-batch costs a few dozen batched
matrix products and no autograd graph at all.

Notation: layer l maps ``h_l`` to ``z_l = h_l W_lᵀ + b_l``, ``h_{l+1} = σ(z_l)`` (the last layer
is linear, ``f = z_{L−1}``); the loss is ``c/2 · Σ (f − y)²`` with ``c = 2/(N·O)`` for
``"mean"``, ``2`` for ``"sum"`` and ``1`` for ``"half_sum"``.

- Backward (the gradient): ``δ_{L−1} = c (f − y)``, ``∇W_l = δ_lᵀ h_l``, ``∇b_l = Σ_n δ_l``,
  ``δ_{l−1} = (δ_l W_l) ⊙ σ′(z_{l−1})``.
- R-op (Pearlmutter 1994; ``H v = d/dε ∇L(θ + εv)``) along ``v = (V_l, v_l)``:
  forward ``Rz_l = Rh_l W_lᵀ + h_l V_lᵀ + v_l``, ``Rh_{l+1} = σ′(z_l) ⊙ Rz_l``;
  backward ``Rδ_{L−1} = c·Rz_{L−1}``, ``(Hv)_{W_l} = Rδ_lᵀ h_l + δ_lᵀ Rh_l``,
  ``(Hv)_{b_l} = Σ_n Rδ_l``, ``Rδ_{l−1} = (Rδ_l W_l + δ_l V_l) ⊙ σ′(z_{l−1})
  + (δ_l W_l) ⊙ σ″(z_{l−1}) ⊙ Rz_{l−1}``, where for tanh ``(δ_l W_l) ⊙ σ″ = −2 δ_{l−1} ⊙ h_l``
  and for ReLU ``σ″ = 0`` (``σ′(0) = 0`` as in ``torch.relu``).

The MAML meta-gradient is then the reverse pass ``g ← ∇L_q(θ_k)``,
``g ← g − α H_s(θ_j) g`` for ``j = k−1, …, 0`` (as :func:`mamlkit.maml_grad_hvp`), reusing the
activations of the inner loop; at ``θ_0``, which all tasks share, the last contraction already
sums over tasks. Reptile sums the inner gradients; iMAML runs its proximal inner loop and a
fixed number of conjugate-gradient iterations on ``(I + H_s(φ)/λ) x = ∇L_q(φ)`` per task, with
the same R-op for ``H_s(φ)·p``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import (
    check_lr,
    check_pair,
    check_params,
    check_positive,
    check_positive_int,
    check_same_tasks,
    check_steps,
)
from ._models import MSELoss, mlp
from ._params import Batch, Params

METHODS = ("maml", "fomaml", "reptile", "imaml")
_SCALE = {"mean": 2.0, "sum": 2.0, "half_sum": 1.0}


def _activation_of(model_fn: object) -> str | None:
    """ "relu" or "tanh" when ``model_fn`` is :func:`mlp` or ``partial(mlp, activation=...)``."""
    if model_fn is mlp:
        return "relu"
    if (
        isinstance(model_fn, functools.partial)
        and model_fn.func is mlp
        and not model_fn.args
        and set(model_fn.keywords) <= {"activation"}
    ):
        activation = model_fn.keywords.get("activation", "relu")
        if activation in ("relu", "tanh"):
            return activation
    return None


def _layer_names(params: Mapping[str, Tensor]) -> list[tuple[str, str]] | None:
    """[("w0", "b0"), …] when ``params`` is exactly an MLP of :func:`mamlkit.init_mlp`."""
    n_layers = len(params) // 2
    names = [(f"w{i}", f"b{i}") for i in range(n_layers)]
    if n_layers == 0 or set(params) != {k for pair in names for k in pair}:
        return None
    first = params["w0"]
    fan_in = first.shape[-1] if first.ndim == 2 else -1
    for wk, bk in names:
        w, b = params[wk], params[bk]
        if not (isinstance(w, Tensor) and isinstance(b, Tensor)):
            return None
        if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[0] or w.shape[1] != fan_in:
            return None
        if not w.is_floating_point() or w.dtype != first.dtype or b.dtype != first.dtype:
            return None
        if w.device != first.device or b.device != first.device:
            return None
        fan_in = w.shape[0]
    return names


def supports_fast_path(loss_fn: object, params: Mapping[str, Tensor]) -> bool:
    """Whether :func:`fast_meta_batch_grad` can compute this meta-batch gradient.

    True exactly when ``loss_fn`` is a :class:`mamlkit.MSELoss` (any reduction) whose
    ``model_fn`` is :func:`mamlkit.mlp` or ``functools.partial(mlp, activation="relu"|"tanh")``,
    and ``params`` holds the ``w0, b0, …`` of :func:`mamlkit.init_mlp` with consistent shapes,
    one floating dtype and one device. Never raises.

    Example:
        >>> import functools, mamlkit
        >>> p = mamlkit.init_mlp((1, 40, 40, 1))
        >>> supports_fast_path(mamlkit.make_mse_loss(mamlkit.mlp), p)
        True
        >>> supports_fast_path(mamlkit.make_mse_loss(functools.partial(mamlkit.mlp, activation="tanh")), p)
        True
        >>> supports_fast_path(lambda p, b: mamlkit.mlp(p, b[0]).sum(), p)
        False
    """
    if not isinstance(loss_fn, MSELoss) or loss_fn.reduction not in _SCALE:
        return False
    if _activation_of(loss_fn.model_fn) is None or not isinstance(params, Mapping):
        return False
    if not all(isinstance(k, str) for k in params):
        return False
    return _layer_names(params) is not None


# ---------------------------------------------------------------------------------------------
# The kernels: every function below works on whole meta-batches and records no autograd graph.
# A layer is one matrix A_l = [W_l | b_l]: (out, in + 1) while all tasks share it (θ_0), or
# (T, out, in + 1) once each task has its own copy (θ_j, j ≥ 1); layer inputs carry a trailing
# column of ones, h̃_l = [h_l, 1], so z_l = h̃_l A_lᵀ and ∇A_l = δ_lᵀ h̃_l (bias gradient included).
# δ's are kept *unscaled* (δ̂_{L−1} = f − y): the gradient, the Hessian-vector product and so
# every update are linear in c, which is folded into the scalar factors of the matrix products.
# ---------------------------------------------------------------------------------------------


class _Tape(NamedTuple):
    """What one forward-and-backward pass at θ_j leaves for a Hessian-vector product there."""

    hts: list[Tensor]  # augmented layer inputs h̃_0 = [x, 1], …, h̃_{L−1}, each (T, N, in + 1)
    dacts: list[Tensor]  # σ′(z_l) of the hidden layers, each (T, N, out)
    deltas: list[Tensor]  # δ̂_l = ∂L/∂z_l / c per task, each (T, N, out)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """(T, N, i) × (i, o) as one (T·N, i) × (i, o) product, or (T, N, i) × (T, i, o) by bmm."""
    return torch.bmm(a, b) if b.ndim == 3 else torch.matmul(a, b)


def _forward(
    layers: list[Tensor], xt: Tensor, ones: Tensor, tanh: bool
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The prediction f (T, N, out), the layer inputs h̃_l and the σ′(z_l)."""
    hts, dacts = [xt], []
    h = xt
    for a_l in layers[:-1]:
        z = _mm(h, a_l.mT)
        if tanh:
            act = torch.tanh(z)
            dacts.append(1.0 - act * act)
        else:
            act = torch.relu(z)
            dacts.append(torch.sign(act))  # σ′(z) = 1[z > 0], as torch.relu's backward
        h = torch.cat((act, ones), -1)
        hts.append(h)
    return _mm(h, layers[-1].mT), hts, dacts


def _weights(layers: list[Tensor]) -> list[Tensor | None]:
    """The W_l views of each A_l that backpropagation needs (layer 0's is never used)."""
    return [None] + [a_l[..., :-1] for a_l in layers[1:]]


def _descend(
    layers: list[Tensor],
    weights: list[Tensor | None],
    hts: list[Tensor],
    dacts: list[Tensor],
    delta: Tensor,
    alpha: float,
    beta: float = 1.0,
    acc: list[Tensor] | None = None,
    acc_alpha: float = 0.0,
) -> tuple[list[Tensor], list[Tensor]]:
    """``β·A_l + α·Σ_n δ̂ᵀh̃`` per task for every layer (one gradient step), and the δ̂_l.

    With ``acc``, also ``acc_l ← acc_l + acc_alpha·Σ_t Σ_n δ̂ᵀh̃`` in place of the list.
    """
    n = len(layers)
    out: list[Tensor] = [delta] * n
    deltas: list[Tensor] = [delta] * n
    for i in range(n - 1, -1, -1):
        deltas[i] = delta
        out[i] = torch.baddbmm(layers[i], delta.mT, hts[i], beta=beta, alpha=alpha)
        if acc is not None:  # Σ_tasks Σ_n δ̂ᵀh̃, for Reptile's sum of inner gradients
            acc[i] = torch.addmm(
                acc[i], delta.flatten(0, 1).mT, hts[i].flatten(0, 1), alpha=acc_alpha
            )
        if i:
            delta = _mm(delta, weights[i]) * dacts[i - 1]
    return out, deltas


def _deltas(weights: list[Tensor | None], dacts: list[Tensor], delta: Tensor) -> list[Tensor]:
    """Every δ̂_l from δ̂_{L−1} (a backward pass without the weight gradients)."""
    n = len(weights)
    deltas: list[Tensor] = [delta] * n
    for i in range(n - 1, 0, -1):
        delta = _mm(delta, weights[i]) * dacts[i - 1]
        deltas[i - 1] = delta
    return deltas


def _gradient(
    weights: list[Tensor | None],
    hts: list[Tensor],
    dacts: list[Tensor],
    delta: Tensor,
    reduce: bool,
    scale: float,
    zero: Tensor,
) -> list[Tensor]:
    """``scale·Σ_n δ̂ᵀh̃`` per layer: per task (T, out, in+1), or also summed over tasks."""
    n = len(hts)
    out: list[Tensor] = [delta] * n
    for i in range(n - 1, -1, -1):
        if reduce:
            out[i] = torch.addmm(
                zero, delta.flatten(0, 1).mT, hts[i].flatten(0, 1), beta=0, alpha=scale
            )
        elif scale == 1.0:
            out[i] = torch.bmm(delta.mT, hts[i])
        else:
            out[i] = torch.baddbmm(zero, delta.mT, hts[i], beta=0, alpha=scale)
        if i:
            delta = _mm(delta, weights[i]) * dacts[i - 1]
    return out


def _hvp(
    weights: list[Tensor | None],
    tape: _Tape,
    v: list[Tensor],
    acc: list[Tensor],
    beta: float,
    alpha: float,
    reduce: bool,
    tanh: bool,
) -> list[Tensor]:
    """``β·acc + α·Ĥv`` per layer by the R-op, Ĥ = H/c at the θ where ``tape`` was recorded.

    ``v`` is per task (T, out, in+1); with ``reduce`` the Ĥv term is summed over tasks and
    ``acc`` is (out, in+1).
    """
    hts, dacts, deltas = tape
    n = len(hts)
    zeros = None if reduce else torch.zeros_like(hts[0][..., :1])
    rhs: list[Tensor | None] = [None] * n
    rzs: list[Tensor] = []
    rz = torch.bmm(hts[0], v[0].mT)
    for i in range(1, n):
        rh = rz * dacts[i - 1]
        rhs[i] = rh
        rzs.append(rz)
        rz = torch.baddbmm(_mm(rh, weights[i].mT), hts[i], v[i].mT)
    rdelta = rz
    out: list[Tensor] = [rz] * n
    for i in range(n - 1, -1, -1):
        delta, rh = deltas[i], rhs[i]
        if reduce:  # one (T·N)-row contraction per term, summing over tasks too
            o = torch.addmm(
                acc[i], rdelta.flatten(0, 1).mT, hts[i].flatten(0, 1), beta=beta, alpha=alpha
            )
            if rh is not None:
                o[:, :-1].addmm_(delta.flatten(0, 1).mT, rh.flatten(0, 1), alpha=alpha)
        elif rh is not None:  # [Rδ, δ] against [h̃, (Rh, 0)]: one contiguous bmm
            rdelta_delta = torch.cat((rdelta, delta), 1)
            h_rh = torch.cat((hts[i], torch.cat((rh, zeros), -1)), 1)
            o = torch.baddbmm(acc[i], rdelta_delta.mT, h_rh, beta=beta, alpha=alpha)
        else:
            o = torch.baddbmm(acc[i], rdelta.mT, hts[i], beta=beta, alpha=alpha)
        out[i] = o
        if i:
            t = torch.baddbmm(_mm(rdelta, weights[i]), delta, v[i][..., :-1])
            rdelta = t * dacts[i - 1]
            if tanh:  # (δ_l W_l) ⊙ σ″(z) Rz with σ″ = −2σσ′: −2 δ_{l−1} ⊙ h_l ⊙ Rz_{l−1}
                h_i = hts[i][..., :-1]  # σ(z_{i−1})
                rdelta = torch.addcmul(rdelta, deltas[i - 1] * h_i, rzs[i - 1], value=-2.0)
    return out


def _task_losses(residual: Tensor, reduction: str) -> Tensor:
    squared = residual * residual
    if reduction == "mean":
        return squared.mean((1, 2))
    total = squared.sum((1, 2))
    return total if reduction == "sum" else 0.5 * total


class _Problem(NamedTuple):
    """One meta-batch, with a column of ones appended to every input."""

    xs: Tensor  # (T, N_s, in + 1)
    ys: Tensor  # (T, N_s, out)
    ones_s: Tensor  # (T, N_s, 1)
    c_s: float
    xq: Tensor
    yq: Tensor
    ones_q: Tensor
    c_q: float
    n_tasks: int
    reduction: str
    tanh: bool


def _problem(support: Batch, query: Batch, reduction: str, tanh: bool) -> _Problem:
    parts = []
    for x, y in (support, query):
        ones = x.new_ones(x.shape[0], x.shape[1], 1)
        c = 2.0 / (y.shape[1] * y.shape[2]) if reduction == "mean" else _SCALE[reduction]
        parts += [torch.cat((x, ones), -1), y, ones, c]
    return _Problem(*parts, support[0].shape[0], reduction, tanh)


def _query(
    prob: _Problem, layers: list[Tensor]
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """Forward on the query set: (δ̂ = f − y, layer inputs, σ′'s, per-task losses)."""
    f, hts, dacts = _forward(layers, prob.xq, prob.ones_q, prob.tanh)
    residual = f - prob.yq
    return residual, hts, dacts, _task_losses(residual, prob.reduction)


def _maml(
    prob: _Problem,
    theta: list[Tensor],
    weights0: list[Tensor | None],
    lr: float,
    steps: int,
    first_order: bool,
) -> tuple[list[Tensor], Tensor]:
    c_s, n_tasks = prob.c_s, prob.n_tasks
    layers, weights = theta, weights0
    path, tapes = [], []
    for _ in range(steps):
        f, hts, dacts = _forward(layers, prob.xs, prob.ones_s, prob.tanh)
        new, deltas = _descend(layers, weights, hts, dacts, f - prob.ys, -lr * c_s)
        if not first_order:
            path.append(weights)
            tapes.append(_Tape(hts, dacts, deltas))
        layers = new
        weights = _weights(layers)
    residual, hts, dacts, losses = _query(prob, layers)
    zero = residual.new_zeros(())
    scale = prob.c_q / n_tasks
    if first_order or steps == 0:
        return _gradient(weights, hts, dacts, residual, True, scale, zero), losses
    g = _gradient(weights, hts, dacts, residual, False, 1.0, zero)  # ĝ = ∇L_q / c_q per task
    for j in range(steps - 1, 0, -1):  # ĝ ← ĝ − α c_s Ĥ_s(θ_j) ĝ
        g = _hvp(path[j], tapes[j], g, g, 1.0, -lr * c_s, False, prob.tanh)
    acc = [g_l.sum(0) for g_l in g]
    return _hvp(path[0], tapes[0], g, acc, scale, -lr * c_s * scale, True, prob.tanh), losses


def _reptile(
    prob: _Problem, theta: list[Tensor], weights0: list[Tensor | None], lr: float, steps: int
) -> tuple[list[Tensor], Tensor]:
    layers, weights = theta, weights0
    total = [theta[0].new_zeros(())] * len(theta)
    for _ in range(steps):
        f, hts, dacts = _forward(layers, prob.xs, prob.ones_s, prob.tanh)
        layers, _ = _descend(
            layers,
            weights,
            hts,
            dacts,
            f - prob.ys,
            -lr * prob.c_s,
            1.0,
            total,
            prob.c_s / prob.n_tasks,
        )
        weights = _weights(layers)
    return total, _query(prob, layers)[3]


def _imaml(
    prob: _Problem,
    theta: list[Tensor],
    weights0: list[Tensor | None],
    lr: float,
    steps: int,
    lam: float,
    cg_steps: int,
) -> tuple[list[Tensor], Tensor]:
    layers, weights = theta, weights0
    for _ in range(steps):  # φ ← φ − α(∇L_s(φ) + λ(φ − θ)) = (1 − αλ)φ + αλθ − α∇L_s(φ)
        f, hts, dacts = _forward(layers, prob.xs, prob.ones_s, prob.tanh)
        layers, _ = _descend(layers, weights, hts, dacts, f - prob.ys, -lr * prob.c_s, 1 - lr * lam)
        layers = [a_l.add_(t_l, alpha=lr * lam) for a_l, t_l in zip(layers, theta)]
        weights = _weights(layers)
    f, hts, dacts = _forward(layers, prob.xs, prob.ones_s, prob.tanh)
    tape = _Tape(hts, dacts, _deltas(weights, dacts, f - prob.ys))
    residual, hts_q, dacts_q, losses = _query(prob, layers)
    zero = residual.new_zeros(())
    rhs = _gradient(weights, hts_q, dacts_q, residual, False, prob.c_q, zero)
    shapes = [g_l.shape for g_l in rhs]
    sizes = [g_l[0].numel() for g_l in rhs]

    def split(flat: Tensor) -> list[Tensor]:
        return [part.view(s) for part, s in zip(flat.split(sizes, -1), shapes)]

    def apply_a(p: Tensor) -> Tensor:  # (I + H_s(φ)/λ) p per task
        parts = split(p)
        hv = _hvp(weights, tape, parts, parts, 1.0, prob.c_s / lam, False, prob.tanh)
        return torch.cat([h.flatten(1) for h in hv], 1)

    # Conjugate gradient from x = 0, exactly cg_steps iterations, per task: a step with
    # curvature pᵀAp ≤ 0 or an exactly zero residual is a no-op (as mamlkit.imaml, cg_tol=0).
    r = p = torch.cat([g_l.flatten(1) for g_l in rhs], 1)  # (T, P)
    x = torch.zeros_like(r)
    rs = torch.linalg.vecdot(r, r).unsqueeze(1)
    zero = torch.zeros_like(rs)
    for _ in range(cg_steps):  # no autograd here: a 0/0 discarded by torch.where is harmless
        ap = apply_a(p)
        curvature = torch.linalg.vecdot(p, ap).unsqueeze(1)
        step = torch.where(curvature > 0, rs / curvature, zero)
        x = torch.addcmul(x, step, p)
        r = torch.addcmul(r, step, ap, value=-1.0)
        rs_new = torch.linalg.vecdot(r, r).unsqueeze(1)
        p = torch.addcmul(r, torch.where(rs > 0, rs_new / rs, zero), p)
        rs = rs_new
    mean = x.mean(0)
    return [part.view(s[1:]) for part, s in zip(mean.split(sizes), shapes)], losses


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _check_meta_batch(batch: object, name: str, fan_in: int, fan_out: int, like: Tensor) -> Batch:
    """``(x, y)``: x (T, N, …, in), y = x.shape[:-1] + (out,); returned as (T, M, in), (T, M, out)."""
    x, y = check_pair(batch, name)
    for part, value in (("x", x), ("y", y)):
        if value.dtype != like.dtype:
            raise TypeError(
                f"{name} {part} must have the dtype of params ({like.dtype}), got {value.dtype}"
            )
        if value.device != like.device:
            raise ValueError(
                f"{name} {part} must be on the device of params ({like.device}), got {value.device}"
            )
    if x.ndim < 2 or x.shape[-1] != fan_in:
        raise ValueError(
            f"{name} x must have shape (tasks, points, …, {fan_in}), got {tuple(x.shape)}"
        )
    if y.shape != (*x.shape[:-1], fan_out):
        raise ValueError(
            f"{name} y must have the shape of the model's prediction "
            f"{(*x.shape[:-1], fan_out)}, got {tuple(y.shape)}"
        )
    n_tasks = x.shape[0]
    return x.reshape(n_tasks, -1, fan_in), y.reshape(n_tasks, -1, fan_out)


def fast_meta_batch_grad(
    method: str,
    loss_fn: MSELoss,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    lam: float = 1.0,
    cg_steps: int = 5,
) -> tuple[Params, Tensor]:
    r"""``mamlkit.meta_batch_grad`` for an MLP with a squared-error loss, without autograd.

    Same arguments, same result (to rounding): tasks are a leading dimension,
    ``support = (x, y)`` with x (T, N, in) and y (T, N, out), ``query`` likewise (its N may
    differ). For every task t the inner loop starts from the shared θ_0 = θ, and

    .. math::

        g = \frac{1}{T} \sum_t g_t, \qquad
        g_t^{\mathrm{maml}} = (I − αH_s^t(θ_0)) ⋯ (I − αH_s^t(θ_{k−1})) ∇L_q^t(θ_k),
        \quad g_t^{\mathrm{fomaml}} = ∇L_q^t(θ_k),

    ``g_t^{reptile} = Σ_j ∇L_s^t(θ_j) = (θ − θ_k)/α`` and
    ``g_t^{imaml} = (I + H_s^t(φ)/λ)^{-1} ∇L_q^t(φ)`` (φ from ``steps`` steps of size α on
    ``L_s + λ/2‖φ − θ‖²``, ``cg_steps`` conjugate-gradient iterations), together with the (T,)
    query losses at θ_k (at φ for iMAML). Every gradient and Hessian-vector product is an
    explicit batched formula (see the module docstring): no autograd graph, no vmap.

    Args:
        method: "maml", "fomaml", "reptile" or "imaml".
        loss_fn: a :class:`mamlkit.MSELoss` over :func:`mamlkit.mlp` (ReLU or tanh); see
            :func:`supports_fast_path`.
        params: θ, the ``w0, b0, …`` of :func:`mamlkit.init_mlp`; never modified.
        support: ``(x, y)`` with a leading task dimension, for the inner steps.
        query: ``(x, y)`` with the same tasks, for the meta-objective and the losses.
        lr: the inner step size α.
        steps: the number of inner steps k (≥ 0; ≥ 1 for Reptile and iMAML).
        lam: iMAML's proximal strength λ > 0 (ignored by the other methods).
        cg_steps: iMAML's conjugate-gradient iterations ≥ 1 (ignored by the other methods).

    Returns:
        ``(grads, query_losses)``: the task-mean gradient as a dict shaped like ``params`` (same
        dtype and device, no autograd history; ``w``/``b`` are views into one (out, in + 1)
        buffer per layer) and the (T,) query losses.

    Raises:
        ValueError: an unknown ``method``, a model the fast path does not cover, batches whose
            shapes or device do not fit ``params``, or bad ``lr``/``steps``/``lam``/``cg_steps``.
        TypeError: arguments of the wrong type or dtype.

    Example:
        >>> import mamlkit
        >>> p = mamlkit.init_mlp((1, 40, 40, 1), dtype=torch.float64)
        >>> loss = mamlkit.make_mse_loss(mamlkit.mlp)
        >>> x = torch.linspace(-5, 5, 3 * 10, dtype=torch.float64).reshape(3, 10, 1)
        >>> g, losses = fast_meta_batch_grad("maml", loss, p, (x, x.sin()), (x, x.cos()), lr=0.01)
        >>> ref = [mamlkit.maml_grad(loss, p, (x[t], x[t].sin()), (x[t], x[t].cos()), lr=0.01)
        ...        for t in range(3)]
        >>> torch.allclose(g["w1"], sum(r["w1"] for r in ref) / 3), losses.shape
        (True, torch.Size([3]))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = check_params(params)
    if not supports_fast_path(loss_fn, params):
        raise ValueError(
            "the fast path needs loss_fn = make_mse_loss(mlp or partial(mlp, activation=...)) "
            "and params = init_mlp(...): check supports_fast_path(loss_fn, params) first"
        )
    names = _layer_names(params)
    assert names is not None
    first, last = params[names[0][0]], params[names[-1][0]]
    fan_in, fan_out = first.shape[1], last.shape[0]
    support = _check_meta_batch(support, "support", fan_in, fan_out, first)
    query = _check_meta_batch(query, "query", fan_in, fan_out, first)
    check_same_tasks(support, query)
    lr, steps = check_lr(lr), check_steps(steps)
    if method in ("reptile", "imaml"):
        steps = check_positive_int(steps, "steps")
    if method == "imaml":
        lam, cg_steps = check_positive(lam, "lam"), check_positive_int(cg_steps, "cg_steps")
    tanh = _activation_of(loss_fn.model_fn) == "tanh"
    with torch.no_grad():
        prob = _problem(support, query, loss_fn.reduction, tanh)
        theta = [torch.cat((params[wk], params[bk].unsqueeze(1)), 1) for wk, bk in names]
        weights0: list[Tensor | None] = [None] + [params[wk] for wk, _ in names[1:]]
        if method == "maml" or method == "fomaml":
            g, losses = _maml(prob, theta, weights0, lr, steps, method == "fomaml")
        elif method == "reptile":
            g, losses = _reptile(prob, theta, weights0, lr, steps)
        else:
            g, losses = _imaml(prob, theta, weights0, lr, steps, lam, cg_steps)
    out = {}
    for (wk, bk), g_l in zip(names, g):
        out[wk], out[bk] = g_l[:, :-1], g_l[:, -1]
    return {k: out[k] for k in params}, losses


def fast_adam_step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: Mapping[str, object],
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, dict[str, object]]:
    r"""One Adam step on dicts with ``torch._foreach_*`` kernels: 8 dispatches for any number of
    tensors instead of ~8 per tensor.

    .. math::

        m ← β_1 m + (1 − β_1) g, \quad v ← β_2 v + (1 − β_2) g², \quad
        θ ← θ − \frac{lr}{1 − β_1^t} \frac{m}{\sqrt{v / (1 − β_2^t)} + ε}

    (``torch.optim.Adam``'s update). Pure: returns new parameters and a new
    ``state = {"t": int, "m": dict, "v": dict}``; nothing passed in is changed.

    Example:
        >>> p, g = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
        >>> state = {"t": 0, "m": {"w": torch.zeros(1)}, "v": {"w": torch.zeros(1)}}
        >>> new, state = fast_adam_step(p, g, state, 0.1)
        >>> new["w"], state["t"]                     # first step: θ − lr·sign(g)
        (tensor([0.9000]), 1)
    """
    keys = list(params)
    beta1, beta2 = betas
    t = int(state["t"]) + 1  # type: ignore[call-overload]
    m_in, v_in = state["m"], state["v"]
    g = [grads[k] for k in keys]
    m = torch._foreach_mul([m_in[k] for k in keys], beta1)  # type: ignore[index]
    torch._foreach_add_(m, g, alpha=1 - beta1)
    v = torch._foreach_mul([v_in[k] for k in keys], beta2)  # type: ignore[index]
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    denom = torch._foreach_div(v, 1 - beta2**t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    new = torch._foreach_addcdiv([params[k] for k in keys], m, denom, value=-lr / (1 - beta1**t))
    return dict(zip(keys, new)), {"t": t, "m": dict(zip(keys, m)), "v": dict(zip(keys, v))}


__all__ = ["fast_adam_step", "fast_meta_batch_grad", "supports_fast_path"]
