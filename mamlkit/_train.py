r"""Meta-training with Adam: seeded, checkpointed, resumable, and safe to stop.

One meta-iteration (Finn et al. 2017, Algorithm 1) draws a meta-batch of T tasks, computes the
task-averaged meta-gradient g of the chosen method (``mamlkit.meta_batch_grad``'s backends) and
takes one Adam step of size β = ``meta_lr``. A frozen :class:`TrainConfig` holds the settings;
with the facts of the run (loss, task family, shapes, dtype, device, threads, torch version,
backend) it is the run's record, stored in every checkpoint and compared on resume. The whole
state (parameters, Adam's moments, the iteration, the task generator, the history) goes into one
atomically written checkpoint, so that a resumed run is bit-identical to one never stopped.
SIGINT and SIGTERM finish the current iteration, write a checkpoint and raise
:class:`TrainingInterrupted`; a non-finite meta-loss saves the last finite state and raises
:class:`TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ._backends import BACKENDS, StepRunner, candidates
from ._checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from ._checks import (
    check_bool,
    check_callable,
    check_finite,
    check_int,
    check_nonnegative,
    check_params,
    check_positive,
    check_positive_int,
    check_seed,
    checked_loss,
    reference_tensor,
)
from ._distributed import Sharding, broadcast
from ._distributed import resolve as resolve_group
from ._files import check_writable_folder, folder_lock, remove_temporaries
from ._metabatch import Plan, plan_meta_batch
from ._methods import METHODS, get_method
from ._optim import (
    Adam,
    CosineSchedule,
    OptimizerState,
    TorchOptimizer,
    TorchOptimizerState,
    _clip_global_norm,
    restore_state,
    state_record,
)
from ._params import Batch, LossFn, Params, tree_detach

AUTO_COMPILE_ITERATIONS = 20_000
"""``backend="auto"`` compiles (for the built-in MLP) from this many iterations on: a cold
compile costs 15–45 s, which the compiled kernels win back within about this many iterations."""

SCHEDULES = ("constant", "cosine")
"""The meta-optimizer's step-size schedules."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a training run, checked when made.

    Attributes:
        method: a key of :data:`mamlkit.METHODS`.
        meta_batch_size: T ≥ 1 tasks per iteration.
        iterations: the number of meta-iterations ≥ 0 (the total, when resuming).
        lr: the inner step size α.
        meta_lr: the meta-optimizer's step size β > 0 (its start, with a schedule).
        steps: inner steps k (≥ the method's ``min_steps``).
        seed: seeds the task generator (0 … 2⁶⁴ − 1).
        backend: a choice of :data:`mamlkit.BACKENDS` or ``"auto"``/``"compiled"``; ``"auto"``
            compiles the built-in MLP from :data:`AUTO_COMPILE_ITERATIONS` iterations on, runs
            the fused kernels below that, and vmap for anything else.
        max_grad_norm: off (``None``) or a bound c > 0 on the global L2 norm of the
            meta-gradient, ``g ← g·min(1, c/(‖g‖ + 10⁻⁶))``, before the optimizer step.
        checkpoint_every: the checkpoint period in iterations, or ``None``.
        hypers: the method's own hyper-parameters (defaults filled in).
        optimizer: the meta-optimizer, a value: :class:`mamlkit.train.Adam` (the default; with
            the ``fused-compiled`` backend gradient, clip and Adam run as one compiled program)
            or :class:`mamlkit.train.TorchOptimizer` (any ``torch.optim`` class with its
            arguments).
        schedule: ``"constant"`` (β throughout) or ``"cosine"``: β annealed to ``min_meta_lr``
            over ``iterations`` (:class:`mamlkit.train.CosineSchedule`, as MAML++).
        min_meta_lr: the end of the cosine schedule (≥ 0).
        first_order_until: MAML++'s derivative-order annealing: iterations before this one
            take the method's first-order counterpart (``maml`` → ``fomaml``), the rest the
            method itself; 0 (the default) is the method throughout.
    """

    method: str
    meta_batch_size: int
    iterations: int
    lr: float
    meta_lr: float
    steps: int
    seed: int
    backend: str = "auto"
    max_grad_norm: float | None = None
    checkpoint_every: int | None = None
    hypers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: Adam | TorchOptimizer = dataclasses.field(default_factory=Adam)
    schedule: str = "constant"
    min_meta_lr: float = 0.0
    first_order_until: int = 0

    def __post_init__(self) -> None:
        entry = get_method(self.method)
        checked = {
            "meta_batch_size": check_positive_int(self.meta_batch_size, "meta_batch_size"),
            "iterations": check_int(self.iterations, "iterations"),
            "lr": check_finite(self.lr, "lr"),
            "meta_lr": check_positive(self.meta_lr, "meta_lr"),
            "steps": entry.check_steps(self.steps),
            "seed": check_seed(self.seed),
            "hypers": entry.resolve(self.hypers),
        }
        candidates(self.backend)
        if not isinstance(self.optimizer, (Adam, TorchOptimizer)):
            raise TypeError(
                "optimizer must be mamlkit.train.Adam(...) or mamlkit.train.TorchOptimizer(cls, "
                f"**kwargs), got {type(self.optimizer).__name__}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        checked["min_meta_lr"] = check_nonnegative(self.min_meta_lr, "min_meta_lr")
        checked["first_order_until"] = check_int(self.first_order_until, "first_order_until")
        if checked["first_order_until"] and entry.first_order is None:
            raise ValueError(
                f"first_order_until: method {self.method!r} has no first-order counterpart "
                "(maml has: fomaml)"
            )
        if checked["first_order_until"] and checked["hypers"].get("per_step_keys"):
            raise ValueError(
                "first_order_until: the first-order counterpart (fomaml) has no per-step "
                "parameters; train per_step_keys with second-order MAML throughout"
            )
        if self.max_grad_norm is not None:
            checked["max_grad_norm"] = check_positive(self.max_grad_norm, "max_grad_norm")
        if self.checkpoint_every is not None:
            checked["checkpoint_every"] = check_positive_int(
                self.checkpoint_every, "checkpoint_every"
            )
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def meta_lr_at(self, iteration: int) -> float:
        """The meta-optimizer's step size at ``iteration`` (the schedule's value)."""
        if self.schedule == "constant" or self.iterations == 0:
            return self.meta_lr
        return CosineSchedule(self.meta_lr, self.iterations, self.min_meta_lr)(iteration)

    def method_at(self, iteration: int) -> tuple[str, Mapping[str, Any]]:
        """The method and hyper-parameters iteration ``iteration`` takes (derivative-order
        annealing: the first-order counterpart before ``first_order_until``)."""
        if iteration < self.first_order_until:
            return get_method(self.method).first_order, {}  # type: ignore[return-value]
        return self.method, self.hypers

    def backend_order(self) -> tuple[str, ...]:
        """The backends this run prefers, in order (``"auto"`` compiles long runs)."""
        if self.backend == "auto" and self.iterations >= AUTO_COMPILE_ITERATIONS:
            return ("fused-compiled", "fused", "vmap")
        return candidates(self.backend)


class TrainResult(NamedTuple):
    """What :func:`meta_train` returns.

    Attributes:
        params: the trained θ, new detached tensors.
        history: (iterations,) float64, the meta-batch mean of the post-adaptation query loss
            at each iteration, before that iteration's update.
        config: the run's record: a JSON-ready dict of everything needed to reproduce it.
    """

    params: Params
    history: Tensor
    config: dict[str, Any]


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a finished iteration (state checkpointed)."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None, result: TrainResult):
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after iteration {iteration}{where}"
        )
        self.signum, self.iteration, self.checkpoint, self.result = (
            signum,
            iteration,
            checkpoint,
            result,
        )


class TrainingDiverged(FloatingPointError):
    """The meta-loss became non-finite; the last finite state is attached (and checkpointed)."""

    def __init__(self, message: str, iteration: int, checkpoint: Path | None, result: TrainResult):
        super().__init__(message)
        self.iteration, self.checkpoint, self.result = iteration, checkpoint, result


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM are recorded in the yielded list instead of
    stopping the process; a second one raises ``KeyboardInterrupt`` at once. A signal the
    process ignores (``SIG_IGN``, as experiment workers ignore the terminal's SIGINT) stays
    ignored. Only in the main thread; elsewhere signals are left as they are."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, h in old.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _describe(obj: object) -> Any:
    """A JSON-ready description of a loss or task sampler (dataclass fields where possible)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, **fields}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (tuple, list)):
        return [_describe(v) for v in obj]
    return getattr(obj, "__qualname__", None) or type(obj).__name__


# ---------------------------------------------------------------------------------- the tasks

SAMPLE_BUDGET = 2_000_000
"""Tasks are drawn for several iterations at once, as many as keep one draw under this many
numbers (at most 100 iterations): one sampler call instead of one per iteration."""


class TaskStream:
    """The run's meta-batches from a sampler: drawn ``chunk`` iterations at a time from one
    seeded generator, on the parameters' device (tensors moved, never cast)."""

    def __init__(
        self,
        sample_tasks: Callable[..., Any],
        meta_batch_size: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.sample_tasks, self.meta_batch_size = sample_tasks, meta_batch_size
        self.dtype, self.device = dtype, device
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk = self._chunk_size()
        self._batches: list[tuple[Batch, Batch]] = []
        self._drawn = -1  # the chunk _batches holds
        self._before_drawn = self.generator.get_state()

    def _chunk_size(self) -> int:
        """Iterations per draw, from the size of one meta-batch (probed with a private
        generator, so the run's task stream is untouched)."""
        support, query = self._draw(self.meta_batch_size, torch.Generator().manual_seed(0))
        numbers = sum(t.numel() for t in (*support, *query))
        return max(1, min(100, SAMPLE_BUDGET // max(1, numbers)))

    def batch(self, iteration: int, fresh: bool) -> tuple[Batch, Batch]:
        """The meta-batch of ``iteration`` (``fresh``: draw its chunk now, as after a resume)."""
        if fresh or iteration % self.chunk == 0:
            self._before_drawn = self.generator.get_state()
            support, query = self._draw(self.meta_batch_size * self.chunk, self.generator)
            self._batches = list(zip(self._split(support), self._split(query)))
            self._drawn = iteration // self.chunk
        return self._batches[iteration % self.chunk]

    def _draw(self, num_tasks: int, generator: torch.Generator) -> tuple[Batch, Batch]:
        """One call of the sampler."""
        tasks = self.sample_tasks(num_tasks, generator=generator, dtype=self.dtype)
        return _as_pair(tasks, "sample_tasks", num_tasks)

    def _split(self, pair: Any) -> list[Batch]:
        n, t = self.chunk, self.meta_batch_size
        parts = [x.to(self.device).reshape(n, t, *x.shape[1:]) for x in pair]
        return [(parts[0][i], parts[1][i]) for i in range(n)]

    def state_before(self, iteration: int) -> Tensor:
        """The generator as it was before drawing the chunk that holds ``iteration``."""
        drawn = self._drawn == iteration // self.chunk
        return self._before_drawn if drawn else self.generator.get_state()


class BatchStream(TaskStream):
    """The run's meta-batches from an iterable of ``(support, query)`` pairs, in order: the
    iterable decides which tasks, the seed nothing. A resumed run iterates it again from the start
    and skips the iterations done, so it must give the same meta-batches again (a list, or a
    loader with a seeded generator)."""

    def __init__(
        self,
        batches: Iterable[Any],
        meta_batch_size: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.batches, self.meta_batch_size = batches, meta_batch_size
        self.dtype, self.device = dtype, device
        self.generator = torch.Generator().manual_seed(seed)  # unused; kept in checkpoints
        self.chunk = 1
        self._iterator: Iterator[Any] = iter(batches)
        self._next = 0

    def batch(self, iteration: int, fresh: bool) -> tuple[Batch, Batch]:
        if fresh and iteration != self._next:
            self._iterator, self._next = iter(self.batches), 0
            for _ in range(iteration):
                next(self._iterator, None)
            self._next = iteration
        try:
            item = next(self._iterator)
        except StopIteration:
            raise ValueError(
                f"sample_tasks ran out of meta-batches after {iteration} (iterations asks for more)"
            ) from None
        self._next += 1
        support, query = _as_pair(item, "sample_tasks", self.meta_batch_size)
        move = self.device
        return (support[0].to(move), support[1].to(move)), (query[0].to(move), query[1].to(move))

    def state_before(self, iteration: int) -> Tensor:
        return self.generator.get_state()


def _as_pair(tasks: Any, name: str, num_tasks: int) -> tuple[Batch, Batch]:
    """``(support, query)`` from an object with ``.support`` and ``.query`` or from a pair of
    ``(x, y)`` pairs, each batched as (num_tasks, points, …)."""
    pair = (tasks.support, tasks.query) if hasattr(tasks, "support") else tasks
    if not (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in pair)
        and all(isinstance(t, Tensor) and t.ndim > 0 for b in pair for t in b)
    ):
        raise TypeError(
            f"{name} must give an object with .support and .query, or a pair (support, query), "
            f"each an (x, y) pair of tensors batched as (tasks, points, …); got "
            f"{type(tasks).__name__}"
        )
    (xs, ys), (xq, yq) = pair
    if any(t.shape[0] != num_tasks for t in (xs, ys, xq, yq)):
        raise ValueError(
            f"{name} must give {num_tasks} tasks along dim 0, got shapes "
            f"{[tuple(t.shape) for t in (xs, ys, xq, yq)]}"
        )
    return (xs, ys), (xq, yq)


def task_stream(
    sample_tasks: Any, meta_batch_size: int, seed: int, dtype: torch.dtype, device: torch.device
) -> TaskStream:
    """A :class:`TaskStream` for a sampler, a :class:`BatchStream` for an iterable of
    meta-batches; anything else is a ``TypeError`` naming ``sample_tasks``."""
    if callable(sample_tasks):
        return TaskStream(sample_tasks, meta_batch_size, seed, dtype, device)
    if isinstance(sample_tasks, Iterable):
        return BatchStream(sample_tasks, meta_batch_size, seed, dtype, device)
    raise TypeError(
        "sample_tasks must be a sampler, sample_tasks(num_tasks, *, generator, dtype), or an "
        f"iterable of (support, query) meta-batches, got {type(sample_tasks).__name__}"
    )


# ------------------------------------------------------------------------------------ the run


class TaskSampler(Protocol):
    """What :func:`meta_train` draws tasks from: ``sample_tasks(num_tasks, *, generator, dtype)``
    returning an object with ``.support`` and ``.query``, or a pair ``(support, query)``, each
    an ``(x, y)`` pair batched as (num_tasks, points, …) (e.g.
    :class:`mamlkit.tasks.SinusoidFamily`, :class:`mamlkit.tasks.GlyphFamily`)."""

    def __call__(
        self, num_tasks: int, *, generator: torch.Generator, dtype: torch.dtype
    ) -> Any: ...


class TrainState(NamedTuple):
    """The trainer's state between iterations."""

    params: Params
    optimizer: OptimizerState
    iteration: int


class Progress(NamedTuple):
    """What a ``callback`` sees every ``log_every`` iterations.

    Attributes:
        iteration: the iterations done.
        running_mean: the mean meta-loss over the last ``log_every`` iterations.
        history: (iteration,) float64, every meta-loss so far.
        params: θ now (no autograd history; do not modify).
        optimizer_state: the meta-optimizer's state now.
        meta_lr: the step size the last iteration took.
    """

    iteration: int
    running_mean: float
    history: Tensor
    params: Params
    optimizer_state: OptimizerState
    meta_lr: float


def _dict_step(
    plan: Plan, optimizer: Adam | TorchOptimizer, max_grad_norm: float | None
) -> StepRunner:
    """Gradient, optional clip and the optimizer as three steps (any backend, any optimizer)."""

    def step(
        params: Params, state: Any, support: Batch, query: Batch, lr: float
    ) -> tuple[Params, Any, Tensor]:
        grads, losses = plan.run(params, support, query)
        if max_grad_norm is not None:
            grads = _clip_global_norm(grads, max_grad_norm)
        params, state = optimizer.update(params, grads, state, lr)
        return params, state, losses

    return step


class _Run:
    """One training session: its record, state, task stream and checkpoint folder."""

    def __init__(
        self,
        config: TrainConfig,
        loss_fn: LossFn,
        params: Params,
        sample_tasks: Any,
        folder: Path | None,
        resume: bool,
        sharding: Sharding | None = None,
    ) -> None:
        self.config, self.loss_fn, self.folder, self.sharding = config, loss_fn, folder, sharding
        self.lead = sharding is None or sharding.rank == 0  # the rank that writes and reports
        like = reference_tensor(params)
        if sharding is not None:  # every rank starts from rank 0's θ
            params = {k: v.to(like.device) for k, v in broadcast(sharding, params).items()}
        self.tasks = task_stream(
            sample_tasks, config.meta_batch_size, config.seed, like.dtype, like.device
        )
        self.order = config.backend_order()
        self.record = _record(config, loss_fn, params, sample_tasks, self.tasks.chunk)
        self.record["world_size"] = 1 if sharding is None else sharding.world
        state = config.optimizer.init(params)
        if isinstance(state, TorchOptimizerState):  # the optimizer steps its own leaves
            params = {k: v.detach() for k, v in state.leaves.items()}
        self.state = TrainState(params, state, 0)
        self.meta_lr = config.meta_lr_at(0)
        self.values: list[float] = []
        self.previous_seconds, self.session_start = 0.0, time.perf_counter()
        self._steps: dict[int, tuple[Plan, StepRunner]] = {}
        self._saved: tuple[int, TrainResult] | None = None
        if folder is not None and self.lead:
            remove_temporaries(checkpoint_path(folder))  # left by a process killed mid-save
        if resume:
            assert folder is not None
            saved = load_checkpoint(folder) if self.lead else None
            self._resume(saved if sharding is None else broadcast(sharding, saved), like.device)

    def _resume(self, saved: Checkpoint, device: torch.device) -> None:
        _check_same_run(saved.config, self.record, checkpoint_path(self.folder))  # type: ignore[arg-type]
        if saved.iteration > self.config.iterations:
            raise ValueError(
                f"the checkpoint in {str(self.folder)!r} is at iteration "
                f"{saved.iteration}, past iterations={self.config.iterations}"
            )
        move = {k: v.to(device) for k, v in saved.params.items()}
        record = (
            saved.optimizer if isinstance(saved.optimizer, dict) else state_record(saved.optimizer)
        )
        state = restore_state(self.config.optimizer, move, record, device)
        if isinstance(state, TorchOptimizerState):
            move = {k: v.detach() for k, v in state.leaves.items()}
        self.state = TrainState(move, state, saved.iteration)
        if saved.config.get("backend") in BACKENDS:  # the same backend: bit-identical numbers
            self.order = (saved.config["backend"],)
        self.tasks.generator.set_state(saved.generator)
        self.previous_seconds = float(saved.config.get("train_seconds", 0.0))
        self.values = saved.history.tolist()

    def step(self, fresh: bool, stop: bool = False) -> tuple[float, bool]:
        """One meta-iteration; returns its meta-loss (the state moves on only when finite) and
        whether to stop after it (``stop`` here, or on any rank)."""
        support, query = self.tasks.batch(self.state.iteration, fresh)
        plan, runner = self._runner(support, query)
        plan.check_targets(self.state.params, support, query)
        self.meta_lr = self.config.meta_lr_at(self.state.iteration)
        if self.sharding is None:
            params, opt, losses = runner(
                self.state.params, self.state.optimizer, support, query, self.meta_lr
            )
        else:  # the reduce sits between the gradient and the optimizer
            grads, losses, stop = plan.run_sharded(self.state.params, support, query, stop)
            if self.config.max_grad_norm is not None:
                grads = _clip_global_norm(grads, self.config.max_grad_norm)
            params, opt = self.config.optimizer.update(
                self.state.params,
                grads,
                self.state.optimizer,
                self.meta_lr,  # type: ignore[arg-type]
            )
        value = losses.mean().item()
        if math.isfinite(value):
            self.values.append(value)
            self.state = TrainState(params, opt, self.state.iteration + 1)
        return value, stop

    def _runner(self, support: Batch, query: Batch) -> tuple[Plan, StepRunner]:
        """This meta-batch's plan and its step runner (made once per plan)."""
        c = self.config
        method, hypers = c.method_at(self.state.iteration)
        plan = plan_meta_batch(
            method,
            self.loss_fn,
            self.state.params,
            support,
            query,
            lr=c.lr,
            steps=c.steps,
            backend=c.backend,
            hypers=hypers,
            order=self.order,
            group=None if self.sharding is None else self.sharding.group,
        )
        found = self._steps.get(id(plan))
        if found is None or found[0] is not plan:
            build = plan.backend.build_step
            whole = build is not None and isinstance(c.optimizer, Adam) and self.sharding is None
            runner = (
                build(plan.problem, c.optimizer, c.max_grad_norm)  # type: ignore[misc]
                if whole
                else _dict_step(plan, c.optimizer, c.max_grad_norm)
            )
            found = self._steps[id(plan)] = (plan, runner)
            self.record["backend"] = plan.backend.name
        return found

    def seconds(self) -> float:
        return round(self.previous_seconds + time.perf_counter() - self.session_start, 3)

    def result(self) -> TrainResult:
        """The state as a :class:`TrainResult`, the training time stamped now (or at the last
        save, if nothing ran since: the saved record and the returned one then agree)."""
        if self._saved is not None and self._saved[0] == self.state.iteration:
            return self._saved[1]
        self.record["train_seconds"] = self.seconds()
        history = torch.tensor(self.values, dtype=torch.float64)
        return TrainResult(tree_detach(self.state.params), history, dict(self.record))

    def save(self, status: str) -> Path | None:
        """Checkpoint the state (on the lead rank only)."""
        if self.folder is None or not self.lead:
            return None
        self._saved = None
        result = self.result()
        done = self.state.iteration
        self._saved = (done, result)
        return save_checkpoint(
            Checkpoint(
                result.params,
                self.state.optimizer,
                done,
                self.tasks.state_before(done),
                result.history,
                result.config,
                status,
            ),
            self.folder,
        )


def _record(
    config: TrainConfig, loss_fn: object, params: Params, sample_tasks: object, chunk: int
) -> dict[str, Any]:
    """The run's record: the settings and the facts a resume must find unchanged."""
    like = reference_tensor(params)
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["hypers"] = dict(config.hypers)
    record["backend_choice"] = config.backend  # "backend" becomes the record that ran
    record.update(
        {
            "optimizer": config.optimizer.describe(),
            "loss": _describe(loss_fn),
            "tasks": _describe(sample_tasks),
            "param_shapes": {k: list(v.shape) for k, v in params.items()},
            "dtype": str(like.dtype).removeprefix("torch."),
            "device": str(like.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "sample_chunk": chunk,
        }
    )
    return record


NEWER = ("backend_choice", "schedule", "min_meta_lr", "world_size", "first_order_until")
"""Record entries of mamlkit 0.3: a run recorded without them is resumed with their defaults."""


def _check_same_run(saved: dict[str, Any], requested: dict[str, Any], path: Path) -> None:
    may_change = {"checkpoint_every", "train_seconds", "backend", "world_size"}
    if saved.get("schedule", "constant") == "constant":  # a cosine schedule spans the iterations
        may_change.add("iterations")
    if "hypers" in saved and saved.get("method") in METHODS:  # defaults added since: filled in
        saved = {**saved, "hypers": METHODS[saved["method"]].resolve(saved["hypers"])}
    differ = sorted(
        k
        for k in set(saved) | set(requested)
        if k not in may_change
        and not (k in NEWER and k not in saved)
        and saved.get(k) != requested.get(k)
    )
    if differ:
        details = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r}, now {requested.get(k)!r}" for k in differ[:4]
        )
        raise ValueError(f"cannot resume from {str(path)!r}: the settings differ ({details})")


# ---------------------------------------------------------------------------------- the loop


def run_training(
    config: TrainConfig,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    sample_tasks: TaskSampler | Iterable[Any],
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_every: int = 100,
    on_log: Callable[[int, float], None] | None = None,
    callback: Callable[[Progress], None] | None = None,
    group: object = None,
) -> TrainResult:
    """:func:`meta_train` with its settings in a :class:`TrainConfig` (what the command line
    and the experiments call); see :func:`meta_train` for the rest."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    checked_loss(loss_fn)
    theta = {k: v.detach().clone() for k, v in check_params(params).items()}
    entry = get_method(config.method)  # a method that learns more than θ adds its entries
    theta = entry.init(theta, lr=config.lr, steps=config.steps, **config.hypers)
    entry.check(theta, lr=config.lr, steps=config.steps, **config.hypers)
    log_every = check_positive_int(log_every, "log_every")
    check_bool(progress, "progress")
    check_bool(resume, "resume")
    check_bool(overwrite, "overwrite")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if reference_tensor(theta).device.type == "meta":
        raise ValueError(
            "params are on the meta device, which holds no values: training needs real numbers "
            "(use cpu or cuda)"
        )
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")
    if on_log is not None:
        check_callable(on_log, "on_log", "on_log(iteration, running_mean)")
    if callback is not None:
        check_callable(callback, "callback", "callback(progress)")
    sharding = resolve_group(group)
    lead = sharding is None or sharding.rank == 0
    folder = (
        check_writable_folder(checkpoint_dir, "checkpoint_dir")
        if checkpoint_dir is not None
        else None
    )
    locked = folder is not None and lead  # one writer: the lead rank
    with folder_lock(folder, "checkpoint_dir") if locked else contextlib.nullcontext():  # type: ignore[arg-type]
        if folder is not None and not resume and not overwrite:
            _refuse_a_run_in(folder)
        run = _Run(config, loss_fn, theta, sample_tasks, folder, resume, sharding)
        return _train(
            run, progress and lead, log_every, on_log if lead else None, callback if lead else None
        )


def _refuse_a_run_in(folder: Path) -> None:
    """A folder that holds a run is resumed or overwritten on purpose, never by accident."""
    if checkpoint_path(folder).is_file():
        try:
            held = f"a run at iteration {load_checkpoint(folder).iteration}"
        except (CheckpointError, OSError):
            held = "an unreadable checkpoint"
        raise ValueError(
            f"checkpoint_dir {str(folder)!r} holds {held}: resume it (--resume), replace it "
            "(--overwrite), or choose another folder"
        )


def _train(
    run: _Run,
    progress: bool,
    log_every: int,
    on_log: Callable[[int, float], None] | None,
    callback: Callable[[Progress], None] | None,
) -> TrainResult:
    config = run.config
    first = run.state.iteration
    with deferred_signals() as caught, _progress_bar(progress, config, first) as bar:
        while run.state.iteration < config.iterations:
            it = run.state.iteration
            value, stop = run.step(fresh=it == first, stop=bool(caught))
            if not math.isfinite(value):  # the same on every rank: the losses are reduced
                path = run.save("diverged")
                raise TrainingDiverged(
                    f"{config.method} stopped: non-finite meta-loss at iteration {it} (a diverging "
                    "method, or NaN/inf in the data); the last finite state is "
                    + (f"in {path}" if path else "in .result"),
                    it,
                    path,
                    run.result(),
                )
            _report(run, bar, log_every, on_log, callback)
            done = run.state.iteration
            if stop if run.sharding else caught:  # sharded: every rank stops after the same
                signum = caught[0] if caught else signal.SIGTERM  # iteration, by the reduced flag
                raise TrainingInterrupted(signum, done, run.save("interrupted"), run.result())
            every = config.checkpoint_every
            if every is not None and done % every == 0 and done < config.iterations:
                run.save("running")
        run.save("finished")
    return run.result()


@contextlib.contextmanager
def _progress_bar(progress: bool, config: TrainConfig, start: int) -> Iterator[Any]:
    if not progress or start >= config.iterations:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=config.iterations, initial=start, desc=config.method, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _report(
    run: _Run,
    bar: Any,
    log_every: int,
    on_log: Callable[[int, float], None] | None,
    callback: Callable[[Progress], None] | None,
) -> None:
    done = run.state.iteration
    if bar is not None:
        bar.update(1)
    if done % log_every == 0:
        running = sum(run.values[done - log_every : done]) / log_every
        if bar is not None:
            bar.set_postfix(meta_loss=f"{running:.4f}")
        if on_log is not None:
            on_log(done, running)
        if callback is not None:
            history = torch.tensor(run.values, dtype=torch.float64)
            callback(
                Progress(
                    done,
                    running,
                    history,
                    tree_detach(run.state.params),
                    run.state.optimizer,
                    run.meta_lr,
                )
            )


def meta_train(
    method: str,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    sample_tasks: TaskSampler | Iterable[Any],
    *,
    meta_batch_size: int,
    iterations: int,
    lr: float,
    meta_lr: float,
    steps: int,
    seed: int,
    backend: str = "auto",
    max_grad_norm: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_every: int = 100,
    on_log: Callable[[int, float], None] | None = None,
    optimizer: Adam | TorchOptimizer | None = None,
    schedule: str = "constant",
    min_meta_lr: float = 0.0,
    first_order_until: int = 0,
    callback: Callable[[Progress], None] | None = None,
    group: object = None,
    **hypers: Any,
) -> TrainResult:
    r"""Train θ with ``method``; deterministic for a given ``seed``.

    Each iteration draws ``tasks = sample_tasks(meta_batch_size, generator=g, dtype=d)`` from one
    ``torch.Generator`` seeded with ``seed`` (``tasks.support`` and ``tasks.query`` — or a pair
    ``(support, query)`` — batched as (T, K, …), e.g. :class:`mamlkit.tasks.SinusoidFamily`;
    d is the dtype of ``params``; tensors are moved to the parameters' device, never cast), or
    takes the next meta-batch of an iterable, computes the meta-gradient of ``method`` (any key of
    :data:`mamlkit.METHODS`, the ``"pretrained"`` joint-training baseline included) and takes
    one step of the meta-optimizer (Adam by default) of size ``meta_lr`` (or its schedule's
    value). The settings are those of :class:`TrainConfig`; the rest:

    Args:
        method, meta_batch_size, iterations, lr, meta_lr, steps, seed, backend, max_grad_norm,
            checkpoint_every, optimizer, schedule, min_meta_lr, first_order_until: see
            :class:`TrainConfig`
            (``optimizer=None`` is the built-in Adam).
        loss_fn: ``loss_fn(params, batch)`` for one task.
        params: the initial θ; never modified (training runs on copies).
        sample_tasks: a :class:`TaskSampler`, ``sample_tasks(num_tasks, *, generator, dtype)``,
            or an iterable of ``(support, query)`` meta-batches (taken in order; a resumed run
            iterates it again and skips what is done).
        checkpoint_dir: where ``checkpoint.pt`` is kept (checked writable before training); it
            is written every ``checkpoint_every`` iterations, on SIGINT/SIGTERM, on divergence
            and at the end.
        resume: continue the run checkpointed in ``checkpoint_dir`` (its settings must match,
            except ``iterations``); the result is bit-identical to an uninterrupted run.
        overwrite: replace the run checkpointed in ``checkpoint_dir``. Without ``resume`` or
            ``overwrite`` a folder that holds a checkpoint is refused; a folder another run is
            using (an exclusive lock, held for the whole run) is refused either way.
        progress: show a tqdm bar (imported only when used).
        log_every: how often the bar (and ``on_log``) shows the running mean meta-loss.
        on_log: called as ``on_log(iteration, running_mean)`` every ``log_every`` iterations.
        callback: called as ``callback(progress)`` every ``log_every`` iterations with a
            :class:`Progress` (iteration, running mean, history, θ, optimizer state, step size).
        group: ``None`` (one process), ``"world"`` or a ``torch.distributed`` ``ProcessGroup``:
            the meta-batch is sharded over its ranks (see :func:`mamlkit.meta_batch_grad`); every
            rank draws the same tasks and takes its share, θ and the optimizer's state start from
            rank 0's (also on resume), only rank 0 writes checkpoints, shows progress and calls
            ``on_log``/``callback``; a signal on any rank stops every rank after the same
            iteration. N ranks compute what one process does (to rounding).
        **hypers: the method's own hyper-parameters (see each :class:`mamlkit.Method`'s
            ``hypers``; iMAML: ``lam``, ``cg_steps``; Meta-SGD: ``rates``, ``per_step``).

    Returns:
        :class:`TrainResult` ``(params, history, config)``.

    Raises:
        TrainingInterrupted: after SIGINT/SIGTERM (the state is checkpointed first).
        TrainingDiverged: a non-finite meta-loss (NaN in the data, or a diverging method);
            ``.result`` and the checkpoint hold the last finite state.

    Example:
        >>> from mamlkit import init_mlp, make_mse_loss, mlp
        >>> from mamlkit.tasks import SinusoidFamily
        >>> result = meta_train("maml", make_mse_loss(mlp), init_mlp((1, 8, 1)), SinusoidFamily(),
        ...                     meta_batch_size=4, iterations=3, lr=0.01, meta_lr=1e-3, steps=1,
        ...                     seed=0, progress=False)
        >>> result.history.shape, result.config["method"]
        (torch.Size([3]), 'maml')
    """
    config = TrainConfig(
        method,
        meta_batch_size,
        iterations,
        lr,
        meta_lr,
        steps,
        seed,
        backend,
        max_grad_norm,
        checkpoint_every,
        hypers,
        Adam() if optimizer is None else optimizer,
        schedule,
        min_meta_lr,
        first_order_until,
    )
    return run_training(
        config,
        loss_fn,
        params,
        sample_tasks,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        log_every=log_every,
        on_log=on_log,
        callback=callback,
        group=group,
    )


def trained(checkpoint: Checkpoint) -> TrainResult:
    """The :class:`TrainResult` of a checkpoint (its parameters, history and config)."""
    return TrainResult(checkpoint.params, checkpoint.history, checkpoint.config)


__all__ = [
    "AUTO_COMPILE_ITERATIONS",
    "BatchStream",
    "Progress",
    "TaskSampler",
    "TaskStream",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "TrainingInterrupted",
    "deferred_signals",
    "meta_train",
    "run_training",
    "trained",
]
