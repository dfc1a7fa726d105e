"""What every experiment shares: the evaluation recipe, summaries over training seeds, and a
job runner that trains in parallel processes and can be stopped at any moment.

The runner executes independent jobs (one method and one training seed each) in up to
``workers`` spawned processes with one torch thread each, prints a progress line for every job
(one job at a time in-process shows a tqdm bar instead), and on SIGINT or SIGTERM stops starting
jobs, forwards SIGTERM to the running ones — each finishes its iteration, writes a checkpoint and
exits — and raises :class:`ExperimentInterrupted`. A worker whose parent disappears (the parent
was killed) checkpoints and exits too, so no orphan keeps training.
"""

from __future__ import annotations

import math
import os
import queue as queue_module
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import torch

from .. import _train
from .._checks import derived_seed
from .._evaluate import EvalResult, evaluate
from .._runtime import set_cpu_threads
from .._train import TrainingInterrupted, deferred_signals

EVAL_SEED = 10_000  # test tasks for K are drawn with seed EVAL_SEED + K, for every method and seed


class ExperimentInterrupted(Exception):
    """SIGINT/SIGTERM stopped an experiment; every running job checkpointed first."""

    def __init__(self, signum: int, resume_hint: str) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {resume_hint}")
        self.signum = signum


class ExperimentFailed(RuntimeError):
    """A job raised an error other than divergence (its message is kept)."""


def evaluate_tasks(
    loss_fn: Callable[..., Any],
    params: Mapping[str, torch.Tensor],
    family: Callable[..., Any],
    *,
    num_tasks: int,
    lr: float,
    steps: int,
    seed: int,
) -> EvalResult:
    """The one evaluation recipe: ``num_tasks`` fresh tasks from ``family`` drawn with a generator
    seeded with ``seed`` in the parameters' dtype, fine-tuned and scored by
    :func:`mamlkit.train.evaluate`."""
    dtype = next(iter(params.values())).dtype
    tasks = family(num_tasks, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return evaluate(loss_fn, params, tasks.support, tasks.query, lr=lr, steps=steps)


def eval_seed(k: int) -> int:
    return derived_seed(EVAL_SEED, k)


def binned(history: torch.Tensor, bins: int = 200) -> dict[str, list[float]]:
    """Means of the history over ``bins`` equal windows (a learning curve, not every iteration)."""
    n = history.numel()
    if n == 0:
        return {"iteration": [], "meta_loss": []}
    width = max(1, math.ceil(n / bins))
    edges = list(range(0, n, width))
    return {"iteration": [i + width / 2 for i in edges],
            "meta_loss": [history[i : i + width].mean().item() for i in edges]}


def over_seeds(curves: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """Summarise per-seed curves ``{"mean": [...], "ci95": [...]}`` (the test-task mean and its
    95 % half-width, per fine-tuning step) over training seeds: the mean over seeds, the
    between-seed standard deviation (n − 1; 0 for one seed), and the mean test-task half-width."""
    steps = len(curves[0]["mean"])
    out: dict[str, Any] = {"mean": [], "seed_sd": [], "ci95": []}
    for j in range(steps):
        values = [c["mean"][j] for c in curves]
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out["mean"].append(mean)
        out["seed_sd"].append(spread)
        out["ci95"].append(sum(c["ci95"][j] for c in curves) / len(curves))
    if all("diverged" in c for c in curves):
        out["diverged"] = [c["diverged"] for c in curves]
    return out


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(**kwargs, progress=..., on_log=...)`` in a worker, by name."""

    key: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a job ended with: ``status`` is ``"done"`` or ``"failed"``."""

    status: str
    payload: Any = None
    message: str = ""


def _call(job: Job, progress: bool, on_log: Callable[[int, float], None] | None) -> Outcome:
    return Outcome("done", job.fn(**job.kwargs, progress=progress, on_log=on_log))


def _worker(jobs: Any, messages: Any, parent: int) -> None:
    """A spawned process that runs jobs from ``jobs`` until it reads ``None``: one thread,
    signals deferred to meta_train, orphan detection. Kept for several jobs, so that torch is
    imported and compiled kernels are loaded once per worker, not once per job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it forwards SIGTERM
    _train.SECOND_SIGNAL_STOPS_AT_ONCE = False
    set_cpu_threads(1)
    while (job := jobs.get()) is not None:
        messages.put(("started", job.key, None))

        def on_log(iteration: int, value: float, key: str = job.key) -> None:
            if os.getppid() != parent:  # orphaned: checkpoint at the end of this iteration, stop
                os.kill(os.getpid(), signal.SIGTERM)
            messages.put(("log", key, (iteration, value)))

        try:
            outcome = _call(job, False, on_log)
        except TrainingInterrupted:
            messages.put(("interrupted", job.key, None))
            return
        except Exception as error:  # reported to the parent, which stops the experiment
            outcome = Outcome("failed", None, f"{type(error).__name__}: {error}")
        messages.put(("outcome", job.key, outcome))


def run_jobs(
    jobs: Sequence[Job], *, workers: int, progress: bool, resume_hint: str,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Outcome]:
    """Run every job (see the module docstring); return each job's :class:`Outcome` by key."""
    if workers == 1:
        results = {}
        for job in jobs:
            try:
                results[job.key] = _call(job, progress, None)
            except TrainingInterrupted as error:
                raise ExperimentInterrupted(error.signum, resume_hint) from error
        return results
    context = get_context("spawn")
    queue, messages = context.Queue(), context.Queue()
    for job in jobs:
        queue.put(job)
    processes = [context.Process(target=_worker, args=(queue, messages, os.getpid()), daemon=True)
                 for _ in range(min(workers, len(jobs)))]
    for process in processes:
        queue.put(None)
        process.start()
    results: dict[str, Outcome] = {}
    started: dict[str, float] = {}
    stopping = False
    with deferred_signals() as caught:
        while len(results) < len(jobs):
            if caught and not stopping:
                stopping = True
                for process in processes:
                    if process.is_alive():
                        process.terminate()  # SIGTERM: checkpoint after this iteration, exit
            try:
                kind, key, payload = messages.get(timeout=0.5)
            except queue_module.Empty:
                if not any(p.is_alive() for p in processes):
                    if not stopping:  # every worker is gone with jobs unfinished
                        for job in jobs:
                            results.setdefault(job.key, Outcome("failed", None, "its worker exited"))
                    break
                continue
            if kind == "started":
                started[key] = time.perf_counter()
                log(f"{key}: started")
            elif kind == "log":
                log(f"{key}: iteration {payload[0]}, meta-loss {payload[1]:.4f}")
            elif kind == "outcome":
                results[key] = payload
                log(f"{key}: {payload.status} ({time.perf_counter() - started[key]:.0f} s)")
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
        if caught:
            raise ExperimentInterrupted(caught[0], resume_hint)
    failed = {k: o.message for k, o in results.items() if o.status == "failed"}
    if failed:
        raise ExperimentFailed("; ".join(f"{k}: {m}" for k, m in failed.items()))
    return results


def check_figures_possible() -> str | None:
    """None if matplotlib imports, else the one-line note the report prints instead of figures."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "figures skipped: matplotlib is not installed (pip install 'mamlkit[notebooks]')"
    return None
