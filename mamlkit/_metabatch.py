r"""The meta-batch gradient: one call, every method of the table, all tasks at once.

For a meta-batch of T tasks with support sets ``(x_s, y_s)`` and query sets ``(x_q, y_q)``
stacked along a leading task dimension, the meta-gradient is the task average

.. math:: g = \frac1T \sum_{i=1}^{T} g_i(θ; \mathcal{D}^s_i, \mathcal{D}^q_i),

with ``g_i`` the per-task rule of the chosen method (``mamlkit._methods``). Inputs are checked
once, here, by ``mamlkit._checks``, whatever backend then computes it:

- ``"vmap"``: ``torch.func.vmap`` over the per-task rules — any model, any loss;
- ``"fused"``: the hand-written kernels of ``mamlkit._fused`` — ``make_mse_loss(mlp)`` only;
- ``"compiled"``: the fused kernels compiled ahead of time when the problem is fused-eligible,
  else ``torch.compile`` of the vmap path (any model and loss);
- ``"auto"``: ``"fused"`` when eligible, else ``"vmap"`` (a single call never compiles).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

from . import _compiled, _fused
from ._adam import ADAM_BETAS, ADAM_EPS, AdamState, _adam_update, _clip_global_norm
from ._checks import (
    check_lr,
    check_meta_batch,
    check_params,
    check_steps,
    checked_loss,
    reference_tensor,
)
from ._methods import Method, get_method
from ._params import Batch, LossFn, Params, tree_detach

Backend = Literal["auto", "vmap", "fused", "compiled"]
BACKENDS: tuple[str, ...] = ("auto", "vmap", "fused", "compiled")


def _signature(support: Batch, query: Batch) -> tuple[Any, ...]:
    return tuple((t.shape, t.dtype, t.device) for t in (*support, *query))


@dataclass
class MetaBatchPlan:
    """A checked meta-batch problem, ready to run many times (what ``meta_train`` holds).

    Build it with :func:`plan_meta_batch`; call it with ``(params, support, query)`` of the
    same keys, shapes, dtype and device. A meta-batch of other shapes or dtypes is checked in
    full again, so the error contract never weakens.
    """

    method: Method
    loss: LossFn
    loss_fn: Any
    lr: float
    steps: int
    hypers: dict[str, Any]
    backend: str
    keys: list[str]
    spec: _fused.MLPSpec | None
    signature: tuple[Any, ...]
    _like: Tensor = field(repr=False)
    _runner: Any = field(default=None, repr=False)
    _step_runner: Any = field(default=None, repr=False)
    _step_norm: float | None = field(default=None, repr=False)

    def recheck(self, support: Batch, query: Batch) -> None:
        """Check a meta-batch in full if its shapes, dtypes or devices differ from the last one."""
        if _signature(support, query) != self.signature:
            support, query = check_meta_batch(support, query, self._like)
            self._check_shapes(support, query)
            self.signature = _signature(support, query)
            self._runner = self._step_runner = None

    def __call__(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        self.recheck(support, query)
        if self.backend == "vmap":
            return self._vmap(params, support, query)
        if self.spec is None:  # compiled, any model
            fn = _compiled.compiled_vmap(self._key(), self._vmap)
            return fn(params, support, query)
        problem = _problem(self.spec, support, query)
        layers = [params[k] for pair in self.spec.names for k in pair]
        if self.backend == "fused":
            with torch.no_grad():
                gw, gb, losses = _fused.run(self.method.name, self.spec, layers[0::2],
                                            layers[1::2], problem, self.lr, self.steps,
                                            self.hypers, loops=False)
            out = dict(zip(self._canonical, (t for pair in zip(gw, gb) for t in pair)))
            return {k: out[k] for k in self.keys}, losses
        if self._runner is None:
            self._runner = _compiled.fused_runner(self.method.name, self.spec, self.lr,
                                                  self.steps, self.hypers, (*layers, *problem))
        *grads, losses = self._runner(*layers, *problem)
        out = dict(zip(self._canonical, grads))
        return {k: out[k] for k in self.keys}, losses

    # -------------------------------------------------------------- training (meta_train)
    def pack(self, params: Params, adam: AdamState) -> Any:
        """The training state in this plan's own layout (lists in kernel order when compiled)."""
        if self.backend != "compiled" or self.spec is None:
            return params, adam
        names = self._canonical
        return [*(params[k] for k in names), *(adam.m[k] for k in names), *(adam.v[k] for k in names)], adam.step

    def unpack(self, state: Any) -> tuple[Params, AdamState]:
        """``(params, AdamState)`` from :meth:`pack`'s layout, in the caller's key order."""
        if self.backend != "compiled" or self.spec is None:
            return state
        tensors, step = state
        n = len(self._canonical)
        new, m, v = (dict(zip(self._canonical, tensors[i * n : (i + 1) * n])) for i in range(3))
        order = self.keys
        return {k: new[k] for k in order}, AdamState(step, {k: m[k] for k in order}, {k: v[k] for k in order})

    def train_step(self, state: Any, support: Batch, query: Batch, meta_lr: float,
                   max_grad_norm: float | None) -> tuple[Any, Tensor]:
        """One meta-iteration on a packed state (the batch must have this plan's signature:
        :meth:`recheck` it first): the gradient, the optional global-norm clip, one Adam step.

        On the compiled backend for the built-in MLP all three run in one compiled graph;
        elsewhere as :func:`mamlkit.train.clip_global_norm` and :func:`mamlkit.train.adam_update`.
        """
        if self.backend != "compiled" or self.spec is None:
            params, adam = state
            grads, losses = self(params, support, query)
            if max_grad_norm is not None:
                grads = _clip_global_norm(grads, max_grad_norm)
            return _adam_update(params, grads, adam, meta_lr, ADAM_BETAS, ADAM_EPS), losses
        tensors, step = state
        t = step + 1
        corrections = torch.tensor([meta_lr / (1 - ADAM_BETAS[0] ** t), 1 / (1 - ADAM_BETAS[1] ** t)],
                                   dtype=self._like.dtype, device=self._like.device)
        inputs = (*tensors, corrections, *_problem(self.spec, support, query))
        if self._step_runner is None or self._step_norm != max_grad_norm:
            self._step_norm = max_grad_norm
            self._step_runner = _compiled.fused_step_runner(
                self.method.name, self.spec, self.lr, self.steps, self.hypers, ADAM_BETAS, ADAM_EPS,
                max_grad_norm, inputs)
        *out, losses = self._step_runner(*inputs)
        return (out, t), losses

    @property
    def _canonical(self) -> list[str]:
        assert self.spec is not None
        return [k for pair in self.spec.names for k in pair]

    def _vmap(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        task = self.method.rule(self.loss, self.lr, self.steps, **self.hypers)
        grads, losses = vmap(task, in_dims=(None, 0, 0))(tree_detach(params), support, query)
        return {k: g.mean(0) for k, g in tree_detach(grads).items()}, losses.detach()

    def _key(self) -> tuple[Any, ...]:
        return (id(self.loss_fn), self.loss_fn, self.method.name, self.lr, self.steps,
                tuple(sorted(self.hypers.items())))

    def _check_shapes(self, support: Batch, query: Batch) -> None:
        if self.spec is not None:
            for x, y in (support, query):
                _fused.fused_data_shapes(self.spec, x, y)


def _problem(spec: _fused.MLPSpec, support: Batch, query: Batch) -> _fused.Problem:
    """The meta-batch as the kernels want it: (T, N, in) and (T, N, out), contiguous."""
    parts = []
    for x, y in (support, query):
        if x.ndim != 3 or y.ndim != 3 or not (x.is_contiguous() and y.is_contiguous()):
            x = x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()
            y = y.reshape(y.shape[0], -1, y.shape[-1]).contiguous()
        parts += [x, y]
    return _fused.Problem(*parts)


def resolve_backend(backend: object, loss_fn: object, params: Params) -> tuple[str, _fused.MLPSpec | None]:
    """The concrete backend for ``backend`` and the fused spec it needs (see the module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "vmap":
        return "vmap", None
    if backend == "fused":
        return "fused", _fused.fused_spec(loss_fn, params)  # ValueError saying why not
    try:
        spec = _fused.fused_spec(loss_fn, params)
    except ValueError:
        spec = None
    if backend == "compiled":
        return "compiled", spec
    return ("fused", spec) if spec is not None else ("vmap", None)


def plan_meta_batch(
    method: object,
    loss_fn: object,
    params: Mapping[str, Tensor],
    support: object,
    query: object,
    *,
    lr: object,
    steps: object,
    backend: object = "auto",
    hypers: Mapping[str, Any] | None = None,
) -> MetaBatchPlan:
    """Check every input once and return the :class:`MetaBatchPlan` that computes it."""
    entry = get_method(method)
    loss = checked_loss(loss_fn)
    params = check_params(params)
    like = reference_tensor(params)
    support, query = check_meta_batch(support, query, like)
    lr = check_lr(lr)
    steps = entry.check_steps(check_steps(steps))
    checked = entry.resolve(hypers or {})
    concrete, spec = resolve_backend(backend, loss_fn, params)
    plan = MetaBatchPlan(entry, loss, loss_fn, lr, steps, checked, concrete, list(params), spec,
                         _signature(support, query), like)
    plan._check_shapes(support, query)
    return plan


def meta_batch_grad(
    method: str,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    backend: Backend = "auto",
    **hypers: Any,
) -> tuple[Params, Tensor]:
    r"""The task-averaged meta-gradient of ``method`` and the per-task query losses.

    Per task i (support ``S_i``, query ``Q_i``, θ_k = k SGD steps of size α on ``S_i``):

    - ``"maml"``: ``(I − αH_{S_i}(θ_0))ᵀ⋯(I − αH_{S_i}(θ_{k−1}))ᵀ∇L_{Q_i}(θ_k)``;
    - ``"fomaml"``: ``∇L_{Q_i}(θ_k)`` (every inner Jacobian replaced by I);
    - ``"reptile"``: ``(θ − θ_k)/α = Σ_j ∇L_{S_i}(θ_j)`` (the query set only scores);
    - ``"imaml"``: ``(I + H_{S_i}(φ)/λ)⁻¹∇L_{Q_i}(φ)``, φ from ``steps`` steps of size ``lr`` on
      ``L_{S_i}(φ) + λ/2‖φ − θ‖²``, ``cg_steps`` conjugate-gradient iterations;
    - ``"pretrained"``: ``∇_θ L(θ; S_i ∪ Q_i)``, joint training with no inner loop.

    The result is ``g = (1/T) Σ_i g_i``; ``query_losses[i]`` is ``L_{Q_i}(θ_k)`` (``L_{Q_i}(φ)``
    for iMAML), the post-adaptation loss at no extra cost (after first-order steps for
    ``"pretrained"``, as a progress measure).

    Args:
        method: a key of :data:`mamlkit.METHODS`.
        loss_fn: ``loss_fn(params, batch)`` for one task, returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; never modified.
        support: ``(x, y)`` with x (T, K_s, features…) and y (T, K_s, …).
        query: ``(x, y)`` with the same T.
        lr: the inner step size α.
        steps: the number of inner steps k (≥ 1 for Reptile and iMAML).
        backend: ``"auto"`` (``"fused"`` when eligible, else ``"vmap"``), ``"vmap"``,
            ``"fused"`` (``make_mse_loss(mlp)`` only; anything else is a ``ValueError`` saying
            why) or ``"compiled"`` (compiled once per problem and cached; any model).
        **hypers: the method's own hyper-parameters (iMAML: ``lam=1.0``, ``cg_steps=5``); a
            keyword the method does not take is a ``TypeError``.

    Returns:
        ``(grads, query_losses)``: a dict shaped like ``params`` (no autograd history) and a
        (T,) tensor.

    Raises:
        ValueError: unknown ``method`` or ``backend``, malformed meta-batches, bad values.
        TypeError: wrong types, an unknown hyper-parameter, data of another dtype.

    Example:
        >>> L = lambda p, b: ((b[0] * p["w"] - b[1]) ** 2).mean()
        >>> xs = torch.ones(3, 2, 1); ys = torch.zeros(3, 2, 1)
        >>> g, losses = meta_batch_grad("maml", L, {"w": torch.tensor(1.0)}, (xs, ys), (xs, ys), lr=0.1)
        >>> g["w"], losses                      # θ′ = 0.8, g = (1 − 0.2)·2·0.8
        (tensor(1.2800), tensor([0.6400, 0.6400, 0.6400]))
    """
    plan = plan_meta_batch(method, loss_fn, params, support, query, lr=lr, steps=steps,
                           backend=backend, hypers=hypers)
    return plan(dict(params), support, query)


__all__ = ["BACKENDS", "MetaBatchPlan", "meta_batch_grad", "plan_meta_batch", "resolve_backend"]
