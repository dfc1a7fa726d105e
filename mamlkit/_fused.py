r"""Hand-written meta-gradient kernels for the built-in MLP with a squared-error loss.

For ``loss_fn = make_mse_loss(mlp)`` (ReLU or tanh hidden layers) the inner-loop gradient, the
support-loss Hessian-vector product and the query gradient are written out as tensor formulas
over a leading *task* dimension: no autograd graph, no vmap. ``meta_batch_grad(...,
backend="fused")`` runs them eagerly; ``backend="compiled"`` compiles them ahead of time
(``mamlkit._compiled``), which is where their small op count pays off.

Notation: layer l maps ``h_l`` to ``z_l = h_l W_lᵀ + b_l``, ``h_{l+1} = σ(z_l)``, the last layer
is linear, ``f = z_{L−1}``; the loss is ``c/2 · Σ (f − y)²`` with ``c = 2/(N·O)`` for ``"mean"``,
``2`` for ``"sum"``, ``1`` for ``"half_sum"``. Signals are kept unscaled, ``δ_{L−1} = f − y``:

- backward: ``δ_{l−1} = (δ_l W_l) ⊙ σ′(z_{l−1})``, ``∇W_l = c Σ_n δ_lᵀ h_l``, ``∇b_l = c Σ_n δ_l``;
- R-op along ``v = (V_l, v_l)`` (Pearlmutter 1994, ``Hv = d/dε ∇L(θ + εv)``): forward
  ``Rz_l = Rh_l W_lᵀ + h_l V_lᵀ + v_l``, ``Rh_{l+1} = σ′(z_l) ⊙ Rz_l``; backward
  ``Rδ_{L−1} = Rz_{L−1}``, ``(Hv)_{W_l} = c Σ_n (Rδ_lᵀ h_l + δ_lᵀ Rh_l)``,
  ``(Hv)_{b_l} = c Σ_n Rδ_l``,
  ``Rδ_{l−1} = (Rδ_l W_l + δ_l V_l) ⊙ σ′(z_{l−1}) + (δ_l W_l) ⊙ σ″(z_{l−1}) ⊙ Rz_{l−1}``, where
  for tanh ``(δ_l W_l) ⊙ σ″ = −2 δ_{l−1} ⊙ h_l`` and for ReLU ``σ″ = 0`` (``σ′(0) = 0``, as
  ``torch.relu``'s backward).

The MAML meta-gradient is the reverse pass ``g ← ∇L_q(θ_k)``, ``g ← g − α H_s(θ_j) g`` for
``j = k−1, …, 0`` (as :func:`mamlkit.maml_grad_hvp`), reusing the inner loop's activations; at
``θ_0``, which all tasks share, the last contraction also sums over tasks. Weights are shared
``(O, I)`` matrices at θ_0 and per-task ``(T, O, I)`` stacks after the first inner step.

Each contraction picks its kernel from the shapes alone (so a compiled trace is static): a
product with a dimension of 1 (the sinusoid's 1 → 40 and 40 → 1 layers) is a broadcast, which
the compiler fuses into a loop (``compiled=True``); everything else is a (batched) matrix product.
Measured on the sinusoid network: fusing the products over a task's 10 points into loops as well
was 10–15 % slower compiled than the batched matrix products.

:data:`KERNELS` maps a method name to its kernel; only the fused backends read it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._methods import route
from ._models import MSELoss, mlp

Layers = list[Tensor]


class MLPSpec(NamedTuple):
    """What the kernels need to know about ``make_mse_loss(mlp)`` and its parameters."""

    names: tuple[tuple[str, str], ...]  # ((w0, b0), (w1, b1), …)
    sizes: tuple[int, ...]  # (in, hidden…, out)
    activation: str  # "relu" or "tanh"
    reduction: str  # "mean", "sum" or "half_sum"


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
        return activation if activation in ("relu", "tanh") else None
    return None


def fused_spec(loss_fn: object, params: Mapping[str, Tensor]) -> MLPSpec:
    """The :class:`MLPSpec` of a fused-eligible problem, or a ``ValueError`` that says why not.

    Eligible: ``loss_fn`` is ``make_mse_loss(mlp)`` (any reduction; ``mlp`` or
    ``functools.partial(mlp, activation="relu" | "tanh")``) and ``params`` holds exactly the
    ``w0, b0, …`` of :func:`mamlkit.init_mlp` (``params`` must already be checked).
    """
    why = "the fused backend runs hand-written kernels for make_mse_loss(mamlkit.mlp) only"
    if not isinstance(loss_fn, MSELoss):
        raise ValueError(
            f"{why}; loss_fn is {getattr(loss_fn, '__qualname__', type(loss_fn).__name__)} "
            "(use backend='vmap' or 'compiled' for any other loss)"
        )
    activation = _activation_of(loss_fn.model_fn)
    if activation is None:
        raise ValueError(
            f"{why}; loss_fn.model_fn is not mamlkit.mlp (or partial(mlp, "
            "activation='relu'|'tanh')): use backend='vmap' or 'compiled'"
        )
    from ._models import mlp_layers

    n_layers = mlp_layers(dict(params))
    names = tuple((f"w{i}", f"b{i}") for i in range(n_layers))
    sizes = (params["w0"].shape[1], *(params[w].shape[0] for w, _ in names))
    return MLPSpec(names, sizes, activation, loss_fn.reduction)


def fused_data_shapes(spec: MLPSpec, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """x (T, N, …, in) and y = x.shape[:-1] + (out,) as (T, M, in), (T, M, out); the errors are
    those ``mlp`` and ``MSELoss`` raise on the vmap path, for one task."""
    fan_in, fan_out = spec.sizes[0], spec.sizes[-1]
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor for mamlkit.mlp, got {x.dtype}")
    if x.shape[-1] != fan_in:
        raise ValueError(f"x must have shape (..., {fan_in}), got {tuple(x.shape[1:])}")
    expected = (*x.shape[1:-1], fan_out)
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor for a squared error, got {y.dtype}")
    if tuple(y.shape[1:]) != expected:
        raise ValueError(
            f"y must have the shape of the model's prediction {expected}, got {tuple(y.shape[1:])}"
        )
    n_tasks = x.shape[0]
    return x.reshape(n_tasks, -1, fan_in), y.reshape(n_tasks, -1, fan_out)


def _scale(reduction: str, y: Tensor) -> float:
    """c in ``L = c/2 Σ (f − y)²`` for one task of y (T, N, O)."""
    if reduction == "mean":
        return 2.0 / (y.shape[1] * y.shape[2])
    return 2.0 if reduction == "sum" else 1.0


class _Tape(NamedTuple):
    """One forward-and-backward pass: layer inputs h_l, σ′(z_l), and the unscaled δ_l."""

    hs: Layers
    dacts: Layers
    deltas: Layers


@dataclass(frozen=True)
class Kernel:
    """The contractions and passes of one MLP; ``compiled`` selects the compile-friendly forms."""

    tanh: bool
    compiled: bool

    # ------------------------------------------------------------------ contractions
    def apply(self, h: Tensor, w: Tensor) -> Tensor:
        """``h Wᵀ``: h (T, N, I), W (O, I) shared or (T, O, I) per task → (T, N, O)."""
        o, i = w.shape[-2:]
        if w.ndim == 2:
            if i == 1:
                return h * w[:, 0]
            if o == 1 and self.compiled:
                return (h * w[0]).sum(-1, keepdim=True)
            return h @ w.T
        if i == 1:
            return h * w[:, :, 0].unsqueeze(1)
        if o == 1 and self.compiled:
            return (h * w[:, 0, :].unsqueeze(1)).sum(-1, keepdim=True)
        return torch.bmm(h, w.mT)

    def affine(self, h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """``h Wᵀ + b`` (eagerly one addmm/baddbmm where the product is a real matrix product)."""
        o, i = w.shape[-2:]
        if self.compiled or min(o, i) == 1:
            return self.apply(h, w) + (b.unsqueeze(1) if b.ndim == 2 else b)
        if w.ndim == 2:
            return torch.addmm(b, h.reshape(-1, i), w.T).view(*h.shape[:-1], o)
        return torch.baddbmm(b.unsqueeze(1), h, w.mT)

    def pull(self, d: Tensor, w: Tensor) -> Tensor:
        """``δ W``: δ (T, N, O), W (O, I) shared or (T, O, I) → (T, N, I)."""
        o, i = w.shape[-2:]
        if w.ndim == 2:
            if o == 1:
                return d * w[0]
            if i == 1 and self.compiled:
                return (d * w[:, 0]).sum(-1, keepdim=True)
            return d @ w
        if o == 1:
            return d * w[:, 0, :].unsqueeze(1)
        if i == 1 and self.compiled:
            return (d * w[:, :, 0].unsqueeze(1)).sum(-1, keepdim=True)
        return torch.bmm(d, w)

    def outer(self, d: Tensor, h: Tensor) -> Tensor:
        """Per task ``Σ_n δ_nᵀ h_n``: (T, N, O), (T, N, I) → (T, O, I)."""
        if self.compiled and (d.shape[-1] == 1 or h.shape[-1] == 1):
            return (d.unsqueeze(-1) * h.unsqueeze(-2)).sum(1)
        return torch.bmm(d.mT, h)

    def outer_sum(self, d: Tensor, h: Tensor) -> Tensor:
        """``Σ_t Σ_n δᵀh`` over tasks and points: → (O, I)."""
        d2, h2 = d.reshape(-1, d.shape[-1]), h.reshape(-1, h.shape[-1])
        if self.compiled and (d2.shape[1] == 1 or h2.shape[1] == 1):
            return (d2.unsqueeze(2) * h2.unsqueeze(1)).sum(0)
        return d2.mT @ h2

    # ------------------------------------------------------------------ passes
    def forward(self, ws: Layers, bs: Layers, x: Tensor) -> tuple[Tensor, Layers, Layers]:
        """The prediction (T, N, O), the layer inputs h_l and the σ′(z_l)."""
        hs, dacts, h = [x], [], x
        last = len(ws) - 1
        for layer, (w, b) in enumerate(zip(ws, bs)):
            z = self.affine(h, w, b)
            if layer == last:
                return z, hs, dacts
            if self.tanh:
                h = torch.tanh(z)
                dacts.append(1.0 - h * h)
            else:
                h = torch.relu(z)
                dacts.append((z > 0).to(z.dtype))  # σ′ = 1[z > 0], as torch.relu's backward
            hs.append(h)
        raise AssertionError("unreachable")

    def backward(self, ws: Layers, dacts: Layers, delta: Tensor) -> Layers:
        """Every unscaled δ_l from δ_{L−1}."""
        deltas = [delta] * len(ws)
        for layer in range(len(ws) - 1, 0, -1):
            delta = self.pull(delta, ws[layer]) * dacts[layer - 1]
            deltas[layer - 1] = delta
        return deltas

    def tape(self, ws: Layers, bs: Layers, x: Tensor, y: Tensor) -> tuple[_Tape, Tensor]:
        f, hs, dacts = self.forward(ws, bs, x)
        residual = f - y
        return _Tape(hs, dacts, self.backward(ws, dacts, residual)), residual

    def grad(self, tape: _Tape, scale: float) -> tuple[Layers, Layers]:
        """``scale·(Σ_n δᵀh, Σ_n δ)`` per task (the scale goes on δ, the smaller operand)."""
        deltas = [scale * d for d in tape.deltas]
        return [self.outer(d, h) for d, h in zip(deltas, tape.hs)], [d.sum(1) for d in deltas]

    def grad_sum(self, tape: _Tape, scale: float) -> tuple[Layers, Layers]:
        """``scale·(Σ_t Σ_n δᵀh, Σ_t Σ_n δ)``, summed over tasks."""
        deltas = [scale * d for d in tape.deltas]
        gw = [self.outer_sum(d, h) for d, h in zip(deltas, tape.hs)]
        return gw, [d.sum((0, 1)) for d in deltas]

    def accumulate(
        self, base: Tensor, pairs: list[tuple[Tensor, Tensor]], alpha: float, reduce: bool
    ) -> Tensor:
        """``base + α Σ_pairs Σ_n δᵀh`` per task, or summed over tasks too with ``reduce``.

        One product per pair, then the adds (measured compiled on the sinusoid network: stacking
        the pairs along the points into one product, or ``baddbmm``, was 10–15 % slower)."""
        outer = self.outer_sum if reduce else self.outer
        total = outer(*pairs[0])
        for d, h in pairs[1:]:
            total = total + outer(d, h)
        return base + alpha * total

    def sgd_step(self, ws: Layers, bs: Layers, tape: _Tape, alpha: float) -> tuple[Layers, Layers]:
        """``θ + α·∇L/c`` per task from one tape: ``W_l + α Σ_n δ_lᵀh_l``, ``b_l + α Σ_n δ_l``
        (shared weights become per-task stacks)."""
        new_w = [
            self.accumulate(w, [(d, h)], alpha, False) for w, d, h in zip(ws, tape.deltas, tape.hs)
        ]
        new_b = [b + alpha * d.sum(1) for b, d in zip(bs, tape.deltas)]
        return new_w, new_b

    def hvp_step(
        self, ws: Layers, tape: _Tape, vw: Layers, vb: Layers, alpha: float, reduce: bool
    ) -> tuple[Layers, Layers]:
        """``v + α Ĥv`` per task (Ĥ = H/c, v per task), or ``Σ_t (v + α Ĥv)`` with ``reduce``."""
        hs, dacts, deltas = tape
        n = len(ws)
        rhs: list[Tensor | None] = [None] * n
        rzs: Layers = []
        rh: Tensor | None = None
        for layer in range(n):
            rz = self.apply(hs[layer], vw[layer]) + vb[layer].unsqueeze(1)
            if rh is not None:
                rz = rz + self.apply(rh, ws[layer])
            rzs.append(rz)
            if layer < n - 1:
                rh = rz * dacts[layer]
                rhs[layer + 1] = rh
        rdelta = rzs[-1]
        out_w: Layers = list(vw)
        out_b: Layers = list(vb)
        for layer in range(n - 1, -1, -1):
            rh_l = rhs[layer]
            pairs = [(rdelta, hs[layer])] + ([(deltas[layer], rh_l)] if rh_l is not None else [])
            base_w, base_b = vw[layer], vb[layer]
            if reduce:
                base_w, base_b = base_w.sum(0), base_b.sum(0)
            out_w[layer] = self.accumulate(base_w, pairs, alpha, reduce)
            out_b[layer] = base_b + alpha * (rdelta.sum((0, 1)) if reduce else rdelta.sum(1))
            if layer:
                t = self.pull(rdelta, ws[layer]) + self.pull(deltas[layer], vw[layer])
                rdelta = t * dacts[layer - 1]
                if self.tanh:  # (δ_l W_l) ⊙ σ″ Rz = −2 δ_{l−1} ⊙ h_l ⊙ Rz_{l−1}
                    rdelta = rdelta - 2.0 * deltas[layer - 1] * hs[layer] * rzs[layer - 1]
        return out_w, out_b


def _step(ws: Layers, bs: Layers, gw: Layers, gb: Layers, lr: float) -> tuple[Layers, Layers]:
    """θ − lr·g per layer (shared weights become per-task stacks by broadcasting)."""
    return (
        [torch.add(w, g, alpha=-lr) for w, g in zip(ws, gw)],
        [torch.add(b, g, alpha=-lr) for b, g in zip(bs, gb)],
    )


class Problem(NamedTuple):
    """One meta-batch, reshaped for the kernels: x (T, N, I), y (T, N, O)."""

    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor


def _losses(residual: Tensor, reduction: str) -> Tensor:
    squared = residual * residual
    if reduction == "mean":
        return squared.mean((1, 2))
    total = squared.sum((1, 2))
    return total if reduction == "sum" else 0.5 * total


def _maml(
    k: Kernel,
    spec: MLPSpec,
    ws: Layers,
    bs: Layers,
    p: Problem,
    lr: float,
    steps: int,
    first_order: bool,
    reverse: str = "auto",
    truncate: int | None = None,
    step_weights: None = None,  # refused by why_not: the kernels have no multi-step loss
    per_step_keys: None = None,  # refused by why_not: nor per-step parameters
) -> tuple[Layers, Layers, Tensor]:
    """MAML (or, ``first_order``, FOMAML). ``reverse="unroll"`` keeps every step's tape;
    ``"hvp"`` keeps its weights only and recomputes its tape in the sweep; ``truncate=m``
    differentiates the last m steps only (see ``mamlkit._methods.REVERSES``)."""
    n_tasks = p.xs.shape[0]
    c_s, c_q = _scale(spec.reduction, p.ys), _scale(spec.reduction, p.yq)
    keep_tapes = route(reverse, steps) == "unroll"
    kept = 0 if first_order else steps if truncate is None else min(truncate, steps)
    tapes: list[_Tape | None] = []
    path: list[tuple[Layers, Layers]] = []
    for j in range(steps):
        tape, _ = k.tape(ws, bs, p.xs, p.ys)
        if j >= steps - kept:
            tapes.append(tape if keep_tapes else None)
            path.append((ws, bs))
        ws, bs = k.sgd_step(ws, bs, tape, -lr * c_s)
    tape, residual = k.tape(ws, bs, p.xq, p.yq)
    losses = _losses(residual, spec.reduction)
    if kept == 0:
        gw, gb = k.grad_sum(tape, c_q / n_tasks)
        return gw, gb, losses
    gw, gb = k.grad(tape, c_q)
    shared = kept == steps  # the sweep ends at the shared θ_0: sum over tasks in the last step
    for j in range(kept - 1, -1, -1):  # g ← g − α c_s Ĥ_s(θ_j) g, per task
        ws_j, bs_j = path[j]
        tape_j = tapes[j] or k.tape(ws_j, bs_j, p.xs, p.ys)[0]
        gw, gb = k.hvp_step(ws_j, tape_j, gw, gb, -lr * c_s, reduce=shared and j == 0)
    if not shared:
        gw, gb = [g.sum(0) for g in gw], [g.sum(0) for g in gb]
    return [g / n_tasks for g in gw], [g / n_tasks for g in gb], losses


def why_not(method: str, hypers: Mapping[str, Any]) -> str | None:
    """Why the kernel of ``method`` cannot run with these hyper-parameters, or None."""
    if method not in KERNELS:
        return (
            f"no fused kernel for method {method!r} (use backend='vmap' or 'compiled', which "
            "run every method)"
        )
    if hypers.get("step_weights") is not None:
        return "the fused kernels have no multi-step loss (use backend='vmap' for step_weights)"
    if hypers.get("per_step_keys") is not None:
        return (
            "the fused kernels have no per-step parameters (use backend='vmap' for per_step_keys)"
        )
    if hypers.get("reverse") == "checkpointed":
        return (
            "the fused kernels keep every inner step's weights (reverse='hvp' is their "
            "low-memory route); use reverse='hvp', or backend='vmap' for 'checkpointed'"
        )
    return None


def _reptile(
    k: Kernel, spec: MLPSpec, ws: Layers, bs: Layers, p: Problem, lr: float, steps: int
) -> tuple[Layers, Layers, Tensor]:
    n_tasks = p.xs.shape[0]
    c_s = _scale(spec.reduction, p.ys)
    total_w = [torch.zeros_like(w) for w in ws]
    total_b = [torch.zeros_like(b) for b in bs]
    for _ in range(steps):
        tape, _ = k.tape(ws, bs, p.xs, p.ys)
        gw, gb = k.grad(tape, c_s)
        total_w = [t + g.sum(0) / n_tasks for t, g in zip(total_w, gw)]
        total_b = [t + g.sum(0) / n_tasks for t, g in zip(total_b, gb)]
        ws, bs = _step(ws, bs, gw, gb, lr)
    f, _, _ = k.forward(ws, bs, p.xq)
    return total_w, total_b, _losses(f - p.yq, spec.reduction)


def _pretrained(
    k: Kernel, spec: MLPSpec, ws: Layers, bs: Layers, p: Problem, lr: float, steps: int
) -> tuple[Layers, Layers, Tensor]:
    n_tasks = p.xs.shape[0]
    x, y = torch.cat((p.xs, p.xq), 1), torch.cat((p.ys, p.yq), 1)
    tape, _ = k.tape(ws, bs, x, y)
    gw, gb = k.grad_sum(tape, _scale(spec.reduction, y) / n_tasks)
    _, _, losses = _maml(k, spec, ws, bs, p, lr, steps, first_order=True)
    return gw, gb, losses


def _imaml(
    k: Kernel,
    spec: MLPSpec,
    ws: Layers,
    bs: Layers,
    p: Problem,
    lr: float,
    steps: int,
    lam: float,
    cg_steps: int,
) -> tuple[Layers, Layers, Tensor]:
    c_s, c_q = _scale(spec.reduction, p.ys), _scale(spec.reduction, p.yq)
    theta_w, theta_b = ws, bs
    for _ in range(steps):  # φ ← φ − α(∇L_s(φ) + λ(φ − θ))
        tape, _ = k.tape(ws, bs, p.xs, p.ys)
        gw, gb = k.grad(tape, c_s)
        gw = [g + lam * (w - t) for g, w, t in zip(gw, ws, theta_w)]
        gb = [g + lam * (b - t) for g, b, t in zip(gb, bs, theta_b)]
        ws, bs = _step(ws, bs, gw, gb, lr)
    tape, _ = k.tape(ws, bs, p.xs, p.ys)
    tape_q, residual = k.tape(ws, bs, p.xq, p.yq)
    rhs_w, rhs_b = k.grad(tape_q, c_q)
    n_tasks = p.xs.shape[0]
    shapes = [t.shape for t in (*rhs_w, *rhs_b)]
    sizes = [t[0].numel() for t in (*rhs_w, *rhs_b)]
    n = len(rhs_w)

    def split(flat: Tensor) -> tuple[Layers, Layers]:
        parts = [part.reshape(-1, *s[1:]) for part, s in zip(flat.split(sizes, -1), shapes)]
        return parts[:n], parts[n:]

    def join(gw: Layers, gb: Layers) -> Tensor:
        return torch.cat([t.reshape(n_tasks, -1) for t in (*gw, *gb)], 1)

    def apply_a(vec: Tensor) -> Tensor:  # (I + H_s(φ)/λ) v per task
        return join(*k.hvp_step(ws, tape, *split(vec), c_s / lam, reduce=False))

    # Conjugate gradient from x = 0, exactly cg_steps iterations, per task: a step with
    # curvature pᵀAp ≤ 0 or an exactly zero residual is a no-op (as mamlkit.imaml, cg_tol=0).
    r = join(rhs_w, rhs_b)
    x, d = torch.zeros_like(r), r
    rs = (r * r).sum(1, keepdim=True)
    zero = torch.zeros_like(rs)
    for _ in range(cg_steps):  # no autograd here: a 0/0 discarded by torch.where is harmless
        ad = apply_a(d)
        curvature = (d * ad).sum(1, keepdim=True)
        step = torch.where(curvature > 0, rs / curvature, zero)
        x = x + step * d
        r = r - step * ad
        rs_new = (r * r).sum(1, keepdim=True)
        d = r + torch.where(rs > 0, rs_new / rs, zero) * d
        rs = rs_new
    gw, gb = split(x.mean(0, keepdim=True))
    return [g[0] for g in gw], [g[0] for g in gb], _losses(residual, spec.reduction)


KernelFn = Callable[..., tuple[Layers, Layers, Tensor]]

KERNELS: dict[str, KernelFn] = {
    "maml": functools.partial(_maml, first_order=False),
    "fomaml": functools.partial(_maml, first_order=True),
    "reptile": _reptile,
    "imaml": _imaml,
    "pretrained": _pretrained,
}
"""The fused kernel of each method that has one, by method name:
``kernel(k, spec, ws, bs, problem, lr, steps, **hypers) → (∇W_l…, ∇b_l…, query losses)``."""


def problem(support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor]) -> Problem:
    """The meta-batch as the kernels want it: (T, N, in) and (T, N, out), contiguous."""
    parts = []
    for x, y in (support, query):
        if x.ndim != 3 or y.ndim != 3 or not (x.is_contiguous() and y.is_contiguous()):
            x = x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()
            y = y.reshape(y.shape[0], -1, y.shape[-1]).contiguous()
        parts += [x, y]
    return Problem(*parts)


def run(
    method: str,
    spec: MLPSpec,
    layers: Layers,
    data: Problem,
    lr: float,
    steps: int,
    hypers: Mapping[str, Any],
    compiled: bool,
) -> tuple[Layers, Tensor]:
    """The task-mean gradient ``[∇W_0, ∇b_0, ∇W_1, …]`` of ``method`` and the (T,) query
    losses (unchecked; no autograd); ``layers`` is ``[W_0, b_0, W_1, …]``."""
    k = Kernel(spec.activation == "tanh", compiled)
    gw, gb, losses = KERNELS[method](k, spec, layers[0::2], layers[1::2], data, lr, steps, **hypers)
    return [t for pair in zip(gw, gb) for t in pair], losses
