r"""The meta-batch gradient: one call, every method of the table, all tasks at once.

For a meta-batch of T tasks with support sets ``(x_s, y_s)`` and query sets ``(x_q, y_q)``
stacked along a leading task dimension, the meta-gradient is the task average

.. math:: g = \frac1T \sum_{i=1}^{T} g_i(θ; \mathcal{D}^s_i, \mathcal{D}^q_i),

with ``g_i`` the per-task rule of the chosen method (``mamlkit._methods``), computed by the
chosen backend (``mamlkit._backends``). Inputs are checked once, here, by ``mamlkit._checks``,
whatever backend then runs.

A checked problem becomes a :class:`Plan` — the problem, the backend record that runs it and
that backend's runner — and plans are kept by everything that makes one problem differ from
another (method, hyper-parameters, loss, lr, steps, backend choice, and the keys, shapes, dtypes
and devices of the tensors). A repeated call finds its plan by that key and goes straight to the
runner: no checks to redo, no file read, no compile.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._backends import Backend, GradRunner, Problem, resolve
from ._checks import (
    check_finite,
    check_meta_task,
    check_params,
    checked_loss,
    reference_tensor,
    target_check,
)
from ._distributed import Sharding, sharded, task_slice
from ._distributed import resolve as resolve_group
from ._methods import get_method
from ._params import Batch, LossFn, Params

PLAN_CACHE_SIZE = 64
"""How many plans :func:`meta_batch_grad` keeps (least recently used first out)."""


class Plan:
    """A checked problem, the backend that runs it, and its runner.

    Call it with ``(params, support, query)`` of the keys, shapes, dtypes and devices it was made
    for (:func:`plan_meta_batch` checks them; the caller keeps that promise).
    """

    __slots__ = ("_check", "backend", "problem", "run", "sharding", "slice_run", "targets")

    def __init__(
        self, problem: Problem, backend: Backend, sharding: Sharding | None = None
    ) -> None:
        self.problem, self.backend, self.sharding = problem, backend, sharding
        self.targets = callable(getattr(problem.loss_fn, "target_check", None))
        self._check: Any = None  # the loss's target check, made on the first call
        if sharding is None:
            self.run: GradRunner = backend.build(problem)
            self.slice_run: GradRunner | None = None
            return
        part = sharding.slice(problem.support[0].shape[0])  # this rank's tasks, built for once
        sliced = dataclasses.replace(
            problem,
            support=task_slice(problem.support, part),
            query=task_slice(problem.query, part),
        )
        self.slice_run = backend.build(sliced) if part.stop > part.start else None
        self.run = self._sharded_run

    def run_sharded(
        self, params: Params, support: Batch, query: Batch, stop: bool = False
    ) -> tuple[Params, Tensor, bool]:
        """The meta-batch's mean gradient and every task's loss, this rank computing its slice
        (see ``mamlkit._distributed``), and whether any rank asked to ``stop``."""
        assert self.sharding is not None
        return sharded(self.slice_run, self.sharding, params, support, query, stop)

    def _sharded_run(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        grads, losses, _ = self.run_sharded(params, support, query)
        return grads, losses

    def check_targets(self, params: Params, support: Batch, query: Batch) -> None:
        """The loss's check of this meta-batch's targets (class labels: their values change from
        call to call, so a cached plan checks them every time)."""
        if self.targets:
            if self._check is None:
                theta = self.problem.start(dict(params))
                self._check = target_check(self.problem.loss_fn, theta, support[0][0])
            self._check(support[1], "support y")
            self._check(query[1], "query y")

    def __call__(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        return self.run(params, support, query)

    def __repr__(self) -> str:
        p = self.problem
        ranks = f", ranks={self.sharding.world}" if self.sharding else ""
        return (
            f"Plan(method={p.method.name!r}, backend={self.backend.name!r}, lr={p.lr}, "
            f"steps={p.steps}, hypers={dict(p.hypers)}{ranks})"
        )


def _stand_in(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def check_problem(
    method: object,
    loss_fn: object,
    params: object,
    support: object,
    query: object,
    *,
    lr: object,
    steps: object,
    hypers: Mapping[str, Any] | None,
) -> Problem:
    """Check every input once; the :class:`Problem` they make.

    The loss is evaluated once here, on the first task's support and query sets, under the guard of
    :func:`mamlkit._checks.exact_passes` (a loss that draws random numbers, or returns no
    floating-point scalar, is refused now); the plan's runners then evaluate it unguarded."""
    entry = get_method(method)
    guarded = checked_loss(loss_fn)
    checked = check_params(params)
    like = reference_tensor(checked)
    lr = check_finite(lr, "lr")
    steps = entry.check_steps(steps)
    resolved = entry.resolve(hypers or {})
    entry.check(checked, lr=lr, steps=steps, **resolved)
    start = entry.adaptation(guarded, lr, **resolved).start  # θ inside the meta-parameters
    theta = start(checked)
    support, query = check_meta_task(loss_fn, theta, support, query)
    with torch.no_grad():
        for x, y in (support, query):
            guarded(theta, (x[0], y[0]))
    return Problem(
        entry,
        resolved,
        loss_fn,
        checked_loss(loss_fn, guard=False),
        lr,
        steps,
        {k: _stand_in(v) for k, v in checked.items()},
        (_stand_in(support[0]), _stand_in(support[1])),
        (_stand_in(query[0]), _stand_in(query[1])),
        like.device,
        start,
    )


def plan_meta_batch(
    method: object,
    loss_fn: object,
    params: object,
    support: object,
    query: object,
    *,
    lr: object,
    steps: object,
    backend: object = "auto",
    hypers: Mapping[str, Any] | None = None,
    order: tuple[str, ...] | None = None,
    group: object = None,
) -> Plan:
    """The :class:`Plan` for these inputs: from the plan cache, or checked and made now.

    ``order`` overrides the preference ``backend`` stands for (training's ``"auto"`` compiles
    long runs); ``group`` shards the meta-batch over ``torch.distributed`` ranks. Both are part
    of the cache key.
    """
    try:
        key = _key(
            method, loss_fn, params, support, query, lr, steps, backend, hypers, (order, group)
        )
        plan = _PLANS[key]
    except (KeyError, TypeError, AttributeError, ValueError):
        problem = check_problem(
            method, loss_fn, params, support, query, lr=lr, steps=steps, hypers=hypers
        )
        sharding = resolve_group(group)
        plan = Plan(problem, resolve(backend, problem, order), sharding)
        key = _key(
            method, loss_fn, params, support, query, lr, steps, backend, hypers, (order, group)
        )
        _PLANS[key] = plan
        if len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


_PLANS: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()


def _tensors(tree: Any) -> tuple[Any, ...]:
    return tuple((k, v.__class__, v.shape, v.dtype, v.device) for k, v in tree.items())


def _data(pair: Any) -> tuple[Any, ...]:
    x, y = pair
    return (
        pair.__class__,
        x.__class__,
        x.shape,
        x.dtype,
        x.device,
        y.__class__,
        y.shape,
        y.dtype,
        y.device,
    )


def _key(
    method: object,
    loss_fn: object,
    params: Any,
    support: Any,
    query: Any,
    lr: object,
    steps: object,
    backend: object,
    hypers: Mapping[str, Any] | None,
    order: object,
) -> tuple[Any, ...]:
    """Everything the checks and the backend choice depend on (raises for inputs that are not
    dicts of tensors and pairs of tensors: those go to the full checks)."""
    try:
        hash(loss_fn)
        loss_key: object = loss_fn
    except TypeError:  # an unhashable callable: keyed by identity (the plan keeps it alive)
        loss_key = ("id", id(loss_fn))
    return (
        get_method(method),
        loss_key,
        lr.__class__,
        lr,
        steps.__class__,
        steps,
        backend,
        order,
        params.__class__,
        _tensors(params),
        _data(support),
        _data(query),
        tuple((k, v.__class__, _hashable(v)) for k, v in sorted(hypers.items())) if hypers else (),
    )


def _hashable(value: object) -> object:
    """A list-valued hyper-parameter (``head=[...]``, ``step_weights=[...]``) as a tuple."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def meta_batch_grad(
    method: str,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    backend: str = "auto",
    group: object = None,
    **hypers: Any,
) -> tuple[Params, Tensor]:
    r"""The task-averaged meta-gradient of ``method`` and the per-task query losses.

    Per task i (support ``S_i``, query ``Q_i``, θ_k = k SGD steps of size α on ``S_i``):

    - ``"maml"``: ``(I − αH_{S_i}(θ_0))ᵀ⋯(I − αH_{S_i}(θ_{k−1}))ᵀ∇L_{Q_i}(θ_k)``;
    - ``"fomaml"``: ``∇L_{Q_i}(θ_k)`` (every inner Jacobian replaced by I);
    - ``"reptile"``: ``(θ − θ_k)/α = Σ_j ∇L_{S_i}(θ_j)`` (the query set only scores);
    - ``"imaml"``: ``(I + H_{S_i}(φ)/λ)⁻¹∇L_{Q_i}(φ)``, φ from ``steps`` steps of size ``lr`` on
      ``L_{S_i}(φ) + λ/2‖φ − θ‖²``, ``cg_steps`` conjugate-gradient iterations;
    - ``"pretrained"``: ``∇_θ L(θ; S_i ∪ Q_i)``, joint training with no inner loop;
    - any method added with :func:`mamlkit.register_method`: its rule.

    The result is ``g = (1/T) Σ_i g_i``; ``query_losses[i]`` is ``L_{Q_i}(θ_k)`` (``L_{Q_i}(φ)``
    for iMAML), the post-adaptation loss at no extra cost (after first-order steps for
    ``"pretrained"``, as a progress measure).

    A repeated call with inputs of the same kind (keys, shapes, dtypes, devices, settings) reuses
    the plan of the first one: its checks, backend choice and compiled code.

    Args:
        method: a key of :data:`mamlkit.METHODS`.
        loss_fn: ``loss_fn(params, batch)`` for one task, returning a scalar tensor.
        params: θ, a ``dict[str, Tensor]``; never modified.
        support: ``(x, y)`` with x (T, K_s, features…) and y (T, K_s, …).
        query: ``(x, y)`` with the same T.
        lr: the inner step size α.
        steps: the number of inner steps k (≥ the method's ``min_steps``).
        backend: a record of :data:`mamlkit.BACKENDS` — ``"vmap"`` (any model), ``"fused"``
            (``make_mse_loss(mlp)`` only; anything else is a ``ValueError`` saying why),
            ``"fused-compiled"``, ``"vmap-compiled"`` — or a preference: ``"auto"`` (fused when
            it can, else vmap; never compiles) or ``"compiled"`` (fused-compiled when it can,
            else vmap-compiled; compiled once per problem and cached).
        group: ``None`` (one process), ``"world"`` (the default ``torch.distributed`` group) or
            a ``ProcessGroup``: every rank passes the same whole meta-batch and computes its
            contiguous share of the tasks with ``backend``; one ``all_reduce`` gives every rank
            the exact task mean (uneven shares included) and every task's loss.
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
        >>> theta = {"w": torch.tensor(1.0)}
        >>> g, losses = meta_batch_grad("maml", L, theta, (xs, ys), (xs, ys), lr=0.1)
        >>> g["w"], losses                      # θ′ = 0.8, g = (1 − 0.2)·2·0.8
        (tensor(1.2800), tensor([0.6400, 0.6400, 0.6400]))
    """
    plan = plan_meta_batch(
        method,
        loss_fn,
        params,
        support,
        query,
        lr=lr,
        steps=steps,
        backend=backend,
        hypers=hypers,
        group=group,
    )
    plan.check_targets(params, support, query)  # type: ignore[arg-type]
    return plan.run(params, support, query)  # type: ignore[arg-type]


__all__ = ["PLAN_CACHE_SIZE", "Plan", "check_problem", "meta_batch_grad", "plan_meta_batch"]
