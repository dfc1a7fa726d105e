r"""Meta-training with Adam: seeded, checkpointed, resumable, and safe to stop.

One meta-iteration (Finn et al. 2017, Algorithm 1) draws a meta-batch of T tasks, computes the
task-averaged meta-gradient g of the chosen method (``mamlkit.meta_batch_grad``'s backends) and
takes one Adam step of size β = ``meta_lr``. Everything the run depends on is recorded in its
config (method, settings, seeds, backend, threads, torch version), and its whole state
(parameters, Adam's moments, the iteration, the task generator, the history) goes into one
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._adam import ADAM_BETAS, ADAM_EPS, AdamState, adam_init
from ._checkpoint import Checkpoint, checkpoint_path, load_checkpoint, save_checkpoint
from ._checks import (
    check_bool,
    check_callable,
    check_lr,
    check_params,
    check_positive,
    check_positive_int,
    check_seed,
    check_steps,
    checked_loss,
    reference_tensor,
)
from ._fused import fused_spec
from ._metabatch import BACKENDS, plan_meta_batch
from ._methods import get_method
from ._params import LossFn, Params, tree_detach

AUTO_COMPILE_ITERATIONS = 20_000
"""``backend="auto"`` compiles (for the built-in MLP) from this many iterations on: a cold
compile costs 15–45 s, which the compiled kernels win back within about this many iterations."""


class TrainResult(NamedTuple):
    """What :func:`meta_train` returns.

    Attributes:
        params: the trained θ, new detached tensors.
        history: (iterations,) float64, the meta-batch mean of the post-adaptation query loss
            at each iteration, before that iteration's update.
        config: a JSON-ready dict of everything needed to reproduce the run.
    """

    params: Params
    history: Tensor
    config: dict[str, Any]


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a finished iteration (state checkpointed)."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None, result: TrainResult):
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name} after iteration "
                         f"{iteration}{where}")
        self.signum, self.iteration, self.checkpoint, self.result = signum, iteration, checkpoint, result


class TrainingDiverged(FloatingPointError):
    """The meta-loss became non-finite; the last finite state is attached (and checkpointed)."""

    def __init__(self, message: str, iteration: int, checkpoint: Path | None, result: TrainResult):
        super().__init__(message)
        self.iteration, self.checkpoint, self.result = iteration, checkpoint, result


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


def check_writable_folder(folder: object, name: str) -> Path:
    """``folder`` exists or can be created, is a folder, and accepts a file — checked now, before
    any work, with a probe file that is removed again."""
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"{name} must be a path, got {type(folder).__name__}")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".mamlkit-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r} is not writable: {error.strerror or error}") from error
    return path


SECOND_SIGNAL_STOPS_AT_ONCE = True
"""In an interactive process a second Ctrl-C stops at once; experiment workers, which may get
both the terminal's SIGINT and their parent's SIGTERM, turn this off."""


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM are recorded in the yielded list instead of
    stopping the process (a second one raises ``KeyboardInterrupt`` at once, unless
    :data:`SECOND_SIGNAL_STOPS_AT_ONCE` is off). Only in the main thread; elsewhere signals are
    left as they are."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        if caught and SECOND_SIGNAL_STOPS_AT_ONCE:
            raise KeyboardInterrupt
        caught.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def resolve_train_backend(backend: str, loss_fn: object, params: Params, iterations: int) -> str:
    """The concrete backend of a training run: ``"auto"`` compiles the built-in MLP from
    :data:`AUTO_COMPILE_ITERATIONS` iterations on, runs it fused below, and vmaps anything else."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        fused_spec(loss_fn, params)
    except ValueError:
        return "vmap"
    return "compiled" if iterations >= AUTO_COMPILE_ITERATIONS else "fused"


_RESUMABLE_KEYS = ("iterations", "checkpoint_every", "train_seconds")  # may differ between a run and its resume


def meta_train(
    method: str,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    sample_tasks: Callable[..., Any],
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
    progress: bool = True,
    log_every: int = 100,
    on_log: Callable[[int, float], None] | None = None,
    **hypers: Any,
) -> TrainResult:
    r"""Train θ with ``method`` and Adam; deterministic for a given ``seed``.

    Each iteration draws ``tasks = sample_tasks(meta_batch_size, generator=g, dtype=d)`` from one
    ``torch.Generator`` seeded with ``seed`` (``tasks.support`` and ``tasks.query`` batched as
    (T, K, …), e.g. :class:`mamlkit.tasks.SinusoidFamily`; d is the dtype of ``params``; tensors
    are moved to the parameters' device, never cast), computes the meta-gradient of ``method``
    (any key of :data:`mamlkit.METHODS`, the ``"pretrained"`` joint-training baseline included)
    and takes an Adam step of size ``meta_lr``.

    Args:
        method: a key of :data:`mamlkit.METHODS`.
        loss_fn: ``loss_fn(params, batch)`` for one task.
        params: the initial θ; never modified (training runs on copies).
        sample_tasks: ``sample_tasks(num_tasks, *, generator, dtype)`` → object with
            ``support`` and ``query`` batched pairs.
        meta_batch_size: T ≥ 1 tasks per iteration.
        iterations: the number of meta-iterations ≥ 0 (the total, when resuming).
        lr: the inner step size α.
        meta_lr: Adam's step size β > 0.
        steps: inner steps k.
        seed: seeds the task generator (0 … 2⁶⁴ − 1).
        backend: as ``meta_batch_grad``; ``"auto"`` compiles the built-in MLP from
            :data:`AUTO_COMPILE_ITERATIONS` iterations on, uses the fused kernels below that,
            and vmap for any other model.
        max_grad_norm: off (``None``) or a bound c > 0 on the global L2 norm of the
            meta-gradient, ``g ← g·min(1, c/(‖g‖ + 10⁻⁶))``, before the Adam step.
        checkpoint_dir: where ``checkpoint.pt`` is kept (checked writable before training); it
            is written every ``checkpoint_every`` iterations, on SIGINT/SIGTERM, on divergence
            and at the end.
        checkpoint_every: the period in iterations (needs ``checkpoint_dir``).
        resume: continue the run checkpointed in ``checkpoint_dir`` (its settings must match,
            except ``iterations``); the result is bit-identical to an uninterrupted run.
        progress: show a tqdm bar (imported only when used).
        log_every: how often the bar (and ``on_log``) shows the running mean meta-loss.
        on_log: called as ``on_log(iteration, running_mean)`` every ``log_every`` iterations.
        **hypers: the method's own hyper-parameters (iMAML: ``lam``, ``cg_steps``).

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
    entry = get_method(method)
    checked_loss(loss_fn)
    theta = {k: v.detach().clone() for k, v in check_params(params).items()}
    check_callable(sample_tasks, "sample_tasks", "sample_tasks(num_tasks, *, generator, dtype)")
    meta_batch_size = check_positive_int(meta_batch_size, "meta_batch_size")
    iterations = check_steps(iterations, "iterations")
    lr, meta_lr = check_lr(lr), check_positive(meta_lr, "meta_lr")
    steps = entry.check_steps(check_steps(steps))
    seed = check_seed(seed)
    log_every = check_positive_int(log_every, "log_every")
    check_bool(progress, "progress")
    check_bool(resume, "resume")
    hypers = entry.resolve(hypers)
    if max_grad_norm is not None:
        max_grad_norm = check_positive(max_grad_norm, "max_grad_norm")
    if checkpoint_every is not None:
        checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")
    folder = check_writable_folder(checkpoint_dir, "checkpoint_dir") if checkpoint_dir is not None else None
    if on_log is not None:
        check_callable(on_log, "on_log", "on_log(iteration, running_mean)")
    concrete = resolve_train_backend(backend, loss_fn, theta, iterations)
    like = reference_tensor(theta)
    dtype, device = like.dtype, like.device

    config: dict[str, Any] = {
        "method": entry.name,
        "meta_batch_size": meta_batch_size,
        "iterations": iterations,
        "lr": lr,
        "meta_lr": meta_lr,
        "steps": steps,
        "seed": seed,
        "hypers": hypers,
        "max_grad_norm": max_grad_norm,
        "backend": concrete,
        "optimizer": {"name": "adam", "betas": list(ADAM_BETAS), "eps": ADAM_EPS},
        "loss": _describe(loss_fn),
        "tasks": _describe(sample_tasks),
        "param_shapes": {k: list(v.shape) for k, v in theta.items()},
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "checkpoint_every": checkpoint_every,
    }
    chunk = _chunk_size(sample_tasks, meta_batch_size, dtype)
    config["sample_chunk"] = chunk
    generator = torch.Generator().manual_seed(seed)
    adam = adam_init(theta)
    history = torch.empty(iterations, dtype=torch.float64)
    start, previous_seconds, session_start = 0, 0.0, time.perf_counter()
    if resume:
        assert folder is not None
        saved = load_checkpoint(folder)
        _check_same_run(saved.config, config, checkpoint_path(folder))
        if saved.iteration > iterations:
            raise ValueError(f"the checkpoint in {str(folder)!r} is at iteration {saved.iteration}, "
                             f"past iterations={iterations}")
        theta = {k: v.to(device) for k, v in saved.params.items()}
        adam = AdamState(saved.adam.step, {k: v.to(device) for k, v in saved.adam.m.items()},
                         {k: v.to(device) for k, v in saved.adam.v.items()})
        generator.set_state(saved.generator)
        start = saved.iteration
        previous_seconds = float(saved.config.get("train_seconds", 0.0))
        history[:start] = saved.history

    batches: list[tuple[Any, Any]] = []
    drawn_chunk = -1  # the chunk `batches` holds
    values: list[float] = history[:start].tolist()
    chunk_start_state = generator.get_state()

    state: Any = None  # the plan's packed (params, Adam) while training

    def current() -> tuple[Params, AdamState]:
        return (theta, adam) if plan is None else plan.unpack(state)

    def stamp() -> None:  # training wall time, summed over the sessions of a resumed run
        config["train_seconds"] = round(previous_seconds + time.perf_counter() - session_start, 3)

    def snapshot(done: int, status: str) -> Checkpoint:
        # the generator as it was before drawing the chunk that holds iteration `done`
        drawn = drawn_chunk == done // chunk  # iteration `done`'s tasks are already drawn
        generator_state = chunk_start_state if drawn else generator.get_state()
        params_now, adam_now = current()
        history[:done] = torch.tensor(values[:done], dtype=torch.float64)
        return Checkpoint(tree_detach(params_now), adam_now, done, generator_state, history[:done].clone(),
                          config, status)

    def save(done: int, status: str) -> Path | None:
        stamp()  # the saved config and the returned result carry the same training time
        return save_checkpoint(snapshot(done, status), folder) if folder is not None else None

    def result(done: int) -> TrainResult:
        if folder is None:
            stamp()
        params_now, _ = current()
        history[:done] = torch.tensor(values[:done], dtype=torch.float64)
        return TrainResult(tree_detach(params_now), history[:done].clone(), config)

    plan = None
    bar = None
    if progress and iterations > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=start, desc=entry.name, leave=False)
    with deferred_signals() as caught:
        for it in range(start, iterations):
            if it % chunk == 0 or it == start:
                chunk_start_state = generator.get_state()
                batches = _draw_chunk(sample_tasks, meta_batch_size, chunk, generator, dtype, device)
                drawn_chunk = it // chunk
                if plan is None:
                    plan = plan_meta_batch(entry.name, loss_fn, theta, *batches[0], lr=lr,
                                           steps=steps, backend=concrete, hypers=hypers)
                    state = plan.pack(theta, adam)
                plan.recheck(*batches[0])  # every meta-batch of a draw has the same shapes
            support, query = batches[it % chunk]
            new_state, losses = plan.train_step(state, support, query, meta_lr, max_grad_norm)
            value = losses.mean().item()
            if not math.isfinite(value):
                path = save(it, "diverged")
                if bar is not None:
                    bar.close()
                raise TrainingDiverged(
                    f"{entry.name} stopped: non-finite meta-loss at iteration {it} (a diverging "
                    "method, or NaN/inf in the data); the last finite state is "
                    + (f"in {path}" if path else "in .result"), it, path, result(it))
            values.append(value)
            state = new_state
            done = it + 1
            if bar is not None:
                bar.update(1)
            if done % log_every == 0:
                running = sum(values[done - log_every : done]) / log_every
                if bar is not None:
                    bar.set_postfix(meta_loss=f"{running:.4f}")
                if on_log is not None:
                    on_log(done, running)
            if caught:
                path = save(done, "interrupted")
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(caught[0], done, path, result(done))
            if checkpoint_every is not None and done % checkpoint_every == 0 and done < iterations:
                save(done, "running")
        if bar is not None:
            bar.close()
        save(iterations, "finished")
    return result(iterations)


SAMPLE_BUDGET = 2_000_000
"""Tasks are drawn for several iterations at once, as many as keep one draw under this many
numbers (at most 100 iterations): one sampler call instead of one per iteration."""


def _chunk_size(sample_tasks: Callable[..., Any], meta_batch_size: int, dtype: torch.dtype) -> int:
    """Iterations per draw, from the size of one meta-batch (probed with a private generator,
    so the run's task stream is untouched)."""
    probe = sample_tasks(meta_batch_size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    numbers = sum(t.numel() for t in (*probe.support, *probe.query))
    return max(1, min(100, SAMPLE_BUDGET // max(1, numbers)))


def _draw_chunk(sample_tasks: Callable[..., Any], meta_batch_size: int, chunk: int,
                generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> list[tuple[Any, Any]]:
    """``chunk`` meta-batches from one call of the sampler (its tasks split in order), on the
    parameters' device; tensors are moved, never cast."""
    tasks = sample_tasks(meta_batch_size * chunk, generator=generator, dtype=dtype)

    def split(pair: Any) -> list[tuple[Tensor, ...]]:
        parts = [t.to(device).reshape(chunk, meta_batch_size, *t.shape[1:]) for t in pair]
        return [tuple(p[i] for p in parts) for i in range(chunk)]

    return list(zip(split(tasks.support), split(tasks.query)))


def _check_same_run(saved: dict[str, Any], requested: dict[str, Any], path: Path) -> None:
    differ = sorted(k for k in set(saved) | set(requested)
                    if k not in _RESUMABLE_KEYS and saved.get(k) != requested.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {requested.get(k)!r}"
                            for k in differ[:4])
        raise ValueError(f"cannot resume from {str(path)!r}: the settings differ ({details})")


def trained(checkpoint: Checkpoint) -> TrainResult:
    """The :class:`TrainResult` of a checkpoint (its parameters, history and config)."""
    return TrainResult(checkpoint.params, checkpoint.history, checkpoint.config)


__all__ = [
    "AUTO_COMPILE_ITERATIONS",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "check_writable_folder",
    "deferred_signals",
    "meta_train",
    "resolve_train_backend",
    "trained",
]
