r"""The backend table: every way mamlkit computes a meta-batch gradient, one record each.

A :class:`Backend` says whether it can run a :class:`Problem` and, if not, why
(:attr:`Backend.why_not`), and how to run it: ``build(problem)`` returns the gradient runner
``run(params, support, query) → (grads, query_losses)``, and ``build_step`` (where a backend has
one) a whole training iteration — gradient, clipping and the optimizer step — as one program.

========================= ======================================================================
``"vmap"``                ``torch.func.vmap`` over the method's per-task rule: any model, loss
                          and method
``"fused"``               hand-written kernels (``mamlkit._fused``): ``make_mse_loss(mlp)`` and a
                          method with a kernel in ``_fused.KERNELS``
``"fused-compiled"``      those kernels compiled ahead of time by AOTInductor, cached on disk;
                          in training the whole iteration is one compiled program
``"vmap-compiled"``       ``torch.compile`` of the vmap runner: any model, compiled per problem
========================= ======================================================================

Besides the records, a *choice* may name an ordered preference (:data:`SELECTORS`):
``"auto"`` is the first of ``fused``, ``vmap`` that can run the problem (a single call never
compiles), and ``"compiled"`` the first of ``fused-compiled``, ``vmap-compiled``. The choice is
resolved once, when a plan is made (:func:`resolve`); nothing downstream tests a name again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.func import vmap

from . import _compiled, _fused
from ._methods import Method
from ._optim import Adam, AdamState
from ._params import Batch, LossFn, Params, tree_detach


@dataclass(frozen=True, eq=False)
class Problem:
    """A checked meta-batch problem: what a backend needs to decide and to build its runner.

    ``params``, ``support`` and ``query`` are stand-ins on the ``meta`` device with the shapes
    and dtypes of the caller's tensors (no data, nothing kept alive); ``device`` is where the
    real tensors live.
    """

    method: Method
    hypers: Mapping[str, Any]
    loss_fn: object
    loss: LossFn
    lr: float
    steps: int
    params: Params
    support: Batch
    query: Batch
    device: torch.device
    start: Callable[[Params], Params] = dict

    def task_rule(self) -> Callable[[Params, Batch, Batch], tuple[Params, Tensor]]:
        """The method's per-task rule for this problem."""
        return self.method.rule(self.loss, self.lr, self.steps, **self.hypers)


class GradRunner(Protocol):
    """``run(params, support, query) → (grads, query_losses)``: the task-mean meta-gradient (a
    dict in ``params``' key order, no autograd history) and the (T,) query losses."""

    def __call__(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]: ...


class StepRunner(Protocol):
    """One meta-iteration: ``step(params, state, support, query, lr) → (params, state, losses)``,
    the meta-gradient, the optional global-norm clip and one Adam step of size ``lr``."""

    def __call__(
        self, params: Params, state: AdamState, support: Batch, query: Batch, lr: float
    ) -> tuple[Params, AdamState, Tensor]: ...


@dataclass(frozen=True, eq=False)
class Backend:
    """One entry of the backend table.

    Attributes:
        name: the ``backend=`` value and the CLI choice.
        summary: one line, for help texts.
        why_not: ``why_not(problem)`` → ``None`` when the backend can run ``problem``, else the
            reason, in words.
        build: ``build(problem)`` → a :class:`GradRunner`.
        build_step: ``build_step(problem, optimizer, max_grad_norm)`` → a :class:`StepRunner`
            for the built-in Adam, or ``None``: training then runs the gradient runner, the clip
            and the optimizer as separate steps.
        compiles: whether building compiles (seconds to minutes the first time).
    """

    name: str
    summary: str
    why_not: Callable[[Problem], str | None]
    build: Callable[[Problem], GradRunner]
    build_step: Callable[[Problem, Adam, float | None], StepRunner] | None = None
    compiles: bool = False


# ---------------------------------------------------------------------------------------- vmap


def _batchable(problem: Problem) -> str | None:
    """None, unless the model holds layers torch.func.vmap cannot batch (``from_module`` lists
    them)."""
    layers = getattr(getattr(problem.loss_fn, "model_fn", None), "unbatchable", ())
    if layers:
        return (
            f"torch.func.vmap cannot batch the recurrent layer(s) {', '.join(layers)} (torch's "
            "RNN kernels write in place); use the single-task engines (maml_grad, ...) per task"
        )
    return None


def _vmap_runner(problem: Problem) -> GradRunner:
    batched = vmap(problem.task_rule(), in_dims=(None, 0, 0))

    def run(params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        grads, losses = batched(tree_detach(params), support, query)
        return {k: g.detach().mean(0) for k, g in grads.items()}, losses.detach()

    return run


def _vmap_compiled_runner(problem: Problem) -> GradRunner:
    return _compiled.compile_runner(_vmap_runner(problem), problem)


# --------------------------------------------------------------------------------------- fused


def _fused_why_not(problem: Problem) -> str | None:
    reason = _fused.why_not(problem.method.name, problem.hypers)
    if reason is not None:
        return reason
    try:
        _fused.fused_spec(problem.loss_fn, problem.start(problem.params))
    except ValueError as error:
        return str(error)
    return None


class _FusedRunner:
    """The fused kernels on one problem: the spec and the key order are worked out once."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.spec = _fused.fused_spec(problem.loss_fn, problem.start(problem.params))
        for x, y in (problem.support, problem.query):  # the errors the vmap path would raise
            _fused.fused_data_shapes(self.spec, x, y)
        self.names = [k for pair in self.spec.names for k in pair]
        self.order = list(problem.params)

    def layers(self, params: Params) -> list[Tensor]:
        return [params[k] for k in self.names]

    def result(self, grads: list[Tensor], losses: Tensor) -> tuple[Params, Tensor]:
        out = dict(zip(self.names, grads))
        return {k: out[k] for k in self.order}, losses

    def __call__(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        p = self.problem
        layers = self.layers(params)
        with torch.no_grad():
            grads, losses = _fused.run(
                p.method.name,
                self.spec,
                layers,
                _fused.problem(support, query),
                p.lr,
                p.steps,
                p.hypers,
                compiled=False,
            )
        return self.result(grads, losses)


class _AotRunner(_FusedRunner):
    """The fused kernels compiled ahead of time (on the first call, or loaded from the cache)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self._run: Callable[[list[Tensor]], list[Tensor]] | None = None

    def __call__(self, params: Params, support: Batch, query: Batch) -> tuple[Params, Tensor]:
        inputs = [*self.layers(params), *_fused.problem(support, query)]
        if self._run is None:
            p = self.problem
            self._run = _compiled.fused_runner(
                p.method.name, self.spec, p.lr, p.steps, p.hypers, inputs
            )
        *grads, losses = self._run(inputs)
        return self.result(grads, losses)


class _AotStep(_FusedRunner):
    """The whole meta-iteration — gradient, clip, Adam — as one compiled program."""

    def __init__(self, problem: Problem, optimizer: Adam, max_grad_norm: float | None) -> None:
        super().__init__(problem)
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self._run: Callable[[list[Tensor]], list[Tensor]] | None = None

    def __call__(
        self, params: Params, state: AdamState, support: Batch, query: Batch, lr: float
    ) -> tuple[Params, AdamState, Tensor]:
        beta1, beta2 = self.optimizer.betas
        t = state.step + 1
        like = params[self.names[0]]
        corrections = torch.tensor(
            [lr / (1 - beta1**t), 1 / (1 - beta2**t)], dtype=like.dtype, device=like.device
        )
        names = self.names
        inputs = [
            *(params[k] for k in names),
            *(state.m[k] for k in names),
            *(state.v[k] for k in names),
            corrections,
            *_fused.problem(support, query),
        ]
        if self._run is None:
            p = self.problem
            self._run = _compiled.fused_step_runner(
                p.method.name,
                self.spec,
                p.lr,
                p.steps,
                p.hypers,
                self.optimizer.betas,
                self.optimizer.eps,
                self.max_grad_norm,
                inputs,
            )
        out = self._run(inputs)
        n = len(names)
        new_p, m, v = (dict(zip(names, out[i * n : (i + 1) * n])) for i in range(3))
        order = self.order
        return (
            {k: new_p[k] for k in order},
            AdamState(t, {k: m[k] for k in order}, {k: v[k] for k in order}),
            out[-1],
        )


def _aot_why_not(problem: Problem) -> str | None:
    if problem.device.type not in ("cpu", "cuda"):
        return f"AOTInductor compiles for cpu or cuda, not {problem.device.type}"
    return _fused_why_not(problem)


def _compile_why_not(problem: Problem) -> str | None:
    if problem.device.type not in ("cpu", "cuda"):
        return f"torch.compile runs on cpu or cuda here, not {problem.device.type}"
    return _batchable(problem)


# ---------------------------------------------------------------------------------- the table

BACKENDS: Mapping[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "vmap",
            "torch.func.vmap over the per-task rule (any model, loss and method)",
            _batchable,
            _vmap_runner,
        ),
        Backend(
            "fused",
            "hand-written kernels for make_mse_loss(mamlkit.mlp)",
            _fused_why_not,
            _FusedRunner,
        ),
        Backend(
            "fused-compiled",
            "the fused kernels compiled ahead of time, cached on disk",
            _aot_why_not,
            _AotRunner,
            _AotStep,
            compiles=True,
        ),
        Backend(
            "vmap-compiled",
            "torch.compile of the vmap backend (any model)",
            _compile_why_not,
            _vmap_compiled_runner,
            compiles=True,
        ),
    )
}
"""Every backend by name."""

SELECTORS: Mapping[str, tuple[str, ...]] = {
    "auto": ("fused", "vmap"),
    "compiled": ("fused-compiled", "vmap-compiled"),
}
"""Choices that name an ordered preference instead of one backend."""

CHOICES: tuple[str, ...] = (*SELECTORS, *BACKENDS)
"""Every value ``backend=`` (and the CLI's ``--backend``) accepts."""


def candidates(choice: object) -> tuple[str, ...]:
    """The backend names ``choice`` stands for, in order of preference."""
    if not isinstance(choice, str) or choice not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {choice!r}")
    return SELECTORS.get(choice, (choice,))


def resolve(choice: object, problem: Problem, order: tuple[str, ...] | None = None) -> Backend:
    """The backend record that runs ``problem`` for ``choice`` (or for the explicit preference
    ``order``): the first candidate that can, or a ``ValueError`` that gives each one's reason."""
    names = order if order is not None else candidates(choice)
    reasons = []
    for name in names:
        backend = BACKENDS[name]
        reason = backend.why_not(problem)
        if reason is None:
            return backend
        reasons.append(reason if len(names) == 1 else f"{name}: {reason}")
    if len(names) == 1:
        raise ValueError(f"the {names[0]} backend cannot run this problem: {reasons[0]}")
    raise ValueError(f"backend={choice!r}: no backend can run this problem ({'; '.join(reasons)})")


__all__ = [
    "BACKENDS",
    "CHOICES",
    "SELECTORS",
    "Backend",
    "GradRunner",
    "Problem",
    "StepRunner",
    "candidates",
    "resolve",
]
