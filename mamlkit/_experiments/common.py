"""The skeleton every experiment shares: a protocol with a quick mode, one job per (method,
training seed), the evaluation recipe, summaries over training seeds, a job runner that trains in
parallel processes and can be stopped at any moment, and the report writer.

An experiment is one module that defines an :class:`Experiment` (its protocol, how one job's
model, tasks and training settings are made, how a trained model is evaluated, the results, the
checks and the report) and is listed in :data:`EXPERIMENTS`; :func:`reproduce` runs any of them.

The runner executes independent jobs (one method and one training seed each) in up to
``workers`` spawned processes with one torch thread each, prints a progress line for every job
(one job at a time in-process shows a tqdm bar instead), and on SIGINT or SIGTERM stops starting
jobs, forwards SIGTERM to the running ones — each finishes its iteration, writes a checkpoint and
exits — and raises :class:`ExperimentInterrupted`. A worker whose parent disappears (the parent
was killed) checkpoints and exits too, so no orphan keeps training.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import queue as queue_module
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import _checkpoint, _files
from .._checks import check_positive_int, check_seed, derived_seed
from .._evaluate import EvalResult, evaluate
from .._methods import get_method
from .._runtime import set_cpu_threads
from .._train import (
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    deferred_signals,
    run_training,
)

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
    method: str | None = None,
    hypers: Mapping[str, Any] | None = None,
) -> EvalResult:
    """The one evaluation recipe: ``num_tasks`` fresh tasks from ``family`` drawn with a generator
    seeded with ``seed`` in the parameters' dtype, fine-tuned as ``method`` adapts and scored by
    :func:`mamlkit.train.evaluate`."""
    dtype = next(iter(params.values())).dtype
    tasks = family(num_tasks, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return evaluate(
        loss_fn,
        params,
        tasks.support,
        tasks.query,
        lr=lr,
        steps=steps,
        method=method,
        **(hypers or {}),
    )


def eval_seed(k: int) -> int:
    return derived_seed(EVAL_SEED, k)


def binned(history: torch.Tensor, bins: int = 200) -> dict[str, list[float]]:
    """Means of the history over ``bins`` equal windows (a learning curve, not every iteration)."""
    n = history.numel()
    if n == 0:
        return {"iteration": [], "meta_loss": []}
    width = max(1, math.ceil(n / bins))
    edges = list(range(0, n, width))
    return {
        "iteration": [i + width / 2 for i in edges],
        "meta_loss": [history[i : i + width].mean().item() for i in edges],
    }


def over_seeds(curves: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """Summarise per-seed curves ``{"mean": [...], "ci95": [...]}`` (the test-task mean and its
    95 % half-width, per fine-tuning step) over training seeds: the mean over seeds, the
    between-seed standard deviation (n − 1; 0 for one seed), and the mean test-task half-width."""
    steps = len(curves[0]["mean"])
    out: dict[str, Any] = {"mean": [], "seed_sd": [], "ci95": []}
    for j in range(steps):
        values = [c["mean"][j] for c in curves]
        mean = sum(values) / len(values)
        spread = (
            math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            if len(values) > 1
            else 0.0
        )
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
    jobs: Sequence[Job],
    *,
    workers: int,
    progress: bool,
    resume_hint: str,
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
    processes = [
        context.Process(target=_worker, args=(queue, messages, os.getpid()), daemon=True)
        for _ in range(min(workers, len(jobs)))
    ]
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
                            results.setdefault(
                                job.key, Outcome("failed", None, "its worker exited")
                            )
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


# ----------------------------------------------------------------------------- the skeleton


@dataclass(frozen=True)
class Protocol:
    """What every protocol holds (an experiment's protocol adds its own fields); the defaults of
    a subclass are its full mode, :meth:`quick` its quick mode."""

    methods: tuple[str, ...] = ()
    training_seeds: tuple[int, ...] = (0,)
    iterations: int = 1
    eval_tasks: int = 1
    backend: str = "auto"
    checkpoint_every: int = 1
    device: str = "cpu"
    lr: float = 0.01
    steps: int = 1
    meta_lr: float = 1e-3
    meta_batch_size: int = 25
    schedule: str = "constant"
    first_order_until: int = 0  # MAML++'s derivative-order annealing (a method with first_order)
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)

    overrides: ClassVar[dict[str, dict[str, Any]]] = {}
    """The experiment's own inner-loop settings per method, where they differ from the
    protocol's ``lr``, ``steps`` and the method table's defaults."""

    @classmethod
    def quick(cls, **changes: Any) -> Protocol:
        """The small version (a subclass says what it shrinks)."""
        return replace(cls(), **changes)

    def settings(self, method: str) -> dict[str, Any]:
        """``lr``, ``steps`` and the hyper-parameters of ``method`` under this protocol: the
        protocol's α and steps (at least the method's ``min_steps``), the table's defaults, then
        :attr:`overrides`, then :attr:`changes` (the caller's); checked by the method's record."""
        entry = get_method(method)
        settings: dict[str, Any] = {
            "lr": self.lr,
            "steps": max(self.steps, entry.min_steps),
            **self.overrides.get(method, {}),
            **self.changes.get(method, {}),
        }
        extra = {k: v for k, v in settings.items() if k not in ("lr", "steps")}
        return {
            "lr": float(settings["lr"]),
            "steps": entry.check_steps(settings["steps"]),
            **entry.resolve(extra),
        }

    def config(self, method: str, seed: int) -> TrainConfig:
        """The training settings of one job (tasks drawn with ``seed + 1``)."""
        settings = self.settings(method)
        lr, steps = settings.pop("lr"), settings.pop("steps")
        return TrainConfig(
            method,
            self.meta_batch_size,
            self.iterations,
            lr,
            self.meta_lr,
            steps,
            derived_seed(seed, 1),
            self.backend,
            checkpoint_every=self.checkpoint_every,
            hypers=settings,
            schedule=self.schedule,
            first_order_until=self.first_order_until,
        )

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Protocol:
        """The protocol of ``asdict(protocol)`` (lists become tuples again)."""
        return cls(
            **{
                f.name: tuple(record[f.name])
                if isinstance(record[f.name], list)
                else record[f.name]
                for f in fields(cls)
                if f.name in record
            }
        )


@dataclass(frozen=True)
class Setup:
    """One job's model, task family and training settings."""

    loss_fn: Callable[..., Any]
    params: dict[str, torch.Tensor]
    sample_tasks: Callable[..., Any]
    config: TrainConfig

    def train(
        self,
        folder: Path,
        *,
        resume: bool,
        overwrite: bool,
        progress: bool,
        on_log: Any = None,
        group: object = None,
    ) -> TrainResult:
        """Train this job, checkpointed in ``folder`` (progress ten times a run), on one process
        or sharded over ``group``."""
        return run_training(
            self.config,
            self.loss_fn,
            self.params,
            self.sample_tasks,
            checkpoint_dir=folder,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            log_every=max(1, self.config.iterations // 10),
            on_log=on_log,
            group=group,
        )


class Experiment:
    """One paper experiment. Subclasses set the attributes and define the methods below."""

    name: str = ""
    protocol_type: type[Protocol] = Protocol

    def setup(self, protocol: Any, method: str, seed: int) -> Setup:
        """The model (initialised from ``seed``), the training tasks and the settings of one job."""
        raise NotImplementedError

    def evaluate(
        self, protocol: Any, method: str, setup: Setup, params: dict[str, torch.Tensor]
    ) -> Any:
        """The evaluation of one trained model (JSON-ready)."""
        raise NotImplementedError

    def prepare(self, protocol: Any) -> None:
        """Work to do once before the jobs start (e.g. render a benchmark's images)."""

    def results(self, protocol: Any, runs: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
        """The results dict from every job's record (``runs["method/seedN"]``)."""
        raise NotImplementedError

    def checks(self, results: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
        """The assertions of a run: ``[{"name", "passed", "detail"}]``."""
        raise NotImplementedError

    def markdown(self, results: dict[str, Any]) -> str:
        """``results.md``."""
        raise NotImplementedError

    def figures(self, results: dict[str, Any], out: Path) -> list[str]:
        """Write the PNG figures; return their names."""
        raise NotImplementedError


EXPERIMENTS: dict[str, str] = {
    "sinusoid": "mamlkit._experiments.sinusoid",
    "glyphs": "mamlkit._experiments.glyphs",
}
"""Every experiment by name, and the module that defines it (imported when used)."""


def get_experiment(name: object) -> Experiment:
    """The :class:`Experiment` called ``name``, or a ``ValueError`` listing the choices."""
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {tuple(EXPERIMENTS)}, got {name!r}")
    experiment: Experiment = importlib.import_module(EXPERIMENTS[name]).EXPERIMENT
    return experiment


def run_dir(out: Path, method: str, seed: int) -> Path:
    """Where one job keeps its checkpoint."""
    return out / "checkpoints" / f"{method}-seed{seed}"


def train_job(
    experiment: str,
    method: str,
    seed: int,
    protocol: dict[str, Any],
    out: str,
    resume: bool,
    overwrite: bool,
    progress: bool,
    on_log: Any,
) -> dict[str, Any]:
    """Train and evaluate one (method, seed) of an experiment; a divergence is reported, not
    raised."""
    exp = get_experiment(experiment)
    p = exp.protocol_type.from_dict(protocol)
    setup = exp.setup(p, method, seed)
    folder = run_dir(Path(out), method, seed)
    can_resume = resume and _checkpoint.checkpoint_path(folder).is_file()
    start = time.perf_counter()
    try:
        result = setup.train(
            folder, resume=can_resume, overwrite=overwrite, progress=progress, on_log=on_log
        )
    except TrainingDiverged as error:
        seconds = error.result.config.get("train_seconds", time.perf_counter() - start)
        return {
            "diverged": str(error),
            "iteration": error.iteration,
            "train_seconds": round(seconds, 1),
        }
    return {
        "train_seconds": round(result.config["train_seconds"], 1),
        "resumed": can_resume,
        "backend": result.config["backend"],
        "final_meta_loss": (binned(result.history, 20)["meta_loss"] or [None])[-1],
        "learning_curve": binned(result.history),
        "eval": exp.evaluate(p, method, setup, result.params),
    }


def configure(
    experiment: Experiment,
    *,
    quick: bool,
    iterations: int | None,
    methods: Sequence[str] | None,
    eval_tasks: int | None,
    seeds: Sequence[int] | None,
    backend: str,
) -> Any:
    """The experiment's protocol (full or quick) with the caller's changes, every one checked."""
    protocol = experiment.protocol_type.quick() if quick else experiment.protocol_type()
    changes: dict[str, Any] = {"backend": backend}
    if iterations is not None:
        changes["iterations"] = check_positive_int(iterations, "iterations")
    if eval_tasks is not None:
        changes["eval_tasks"] = check_positive_int(eval_tasks, "eval_tasks")
    if methods is not None:
        if not methods:
            raise ValueError("methods must be a non-empty subset of the method table")
        changes["methods"] = tuple(get_method(m).name for m in methods)
    if seeds is not None:
        if not seeds:
            raise ValueError("seeds must list at least one training seed")
        changes["training_seeds"] = tuple(check_seed(s, "seeds") for s in seeds)
    protocol = replace(protocol, **changes)
    for method in protocol.methods:  # every job's settings, checked before any work
        experiment.setup(protocol, method, protocol.training_seeds[0])
    return protocol


def reproduce(
    name: str,
    out: str | Path,
    *,
    quick: bool = False,
    iterations: int | None = None,
    methods: Sequence[str] | None = None,
    eval_tasks: int | None = None,
    seeds: Sequence[int] | None = None,
    workers: int = 1,
    backend: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and report every (method, training seed) of experiment ``name``; write
    ``results.json`` and ``results.md`` first, then the PNG figures, and keep one checkpoint per
    run under ``out/checkpoints/`` (``resume=True`` continues the runs found there,
    ``overwrite=True`` replaces them; with neither, a run found there is an error).

    Every setting and the output folder are checked before any training starts.

    Returns:
        The results dict written to ``results.json``; ``results["checks"]`` holds the
        assertions.
    """
    experiment = get_experiment(name)
    protocol = configure(
        experiment,
        quick=quick,
        iterations=iterations,
        methods=methods,
        eval_tasks=eval_tasks,
        seeds=seeds,
        backend=backend,
    )
    check_positive_int(workers, "workers")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    out = _files.check_writable_folder(out, "out")
    figure_note = check_figures_possible() if figures else None
    held = [
        f"{m}/seed{s}"
        for m in protocol.methods
        for s in protocol.training_seeds
        if _checkpoint.checkpoint_path(run_dir(out, m, s)).is_file()
    ]
    if held and not (resume or overwrite):
        raise ValueError(
            f"out {str(out)!r} holds runs ({', '.join(held[:3])}{', …' if len(held) > 3 else ''}): "
            "resume them (--resume), replace them (--overwrite), or choose another folder"
        )
    experiment.prepare(protocol)
    # the longest runs first (more inner steps, second order), so the workers finish together
    order = sorted(protocol.methods, key=lambda m: -_cost(experiment.setup(protocol, m, 0).config))
    jobs = [
        Job(
            f"{m}/seed{s}",
            train_job,
            {
                "experiment": name,
                "method": m,
                "seed": s,
                "protocol": asdict(protocol),
                "out": str(out),
                "resume": resume,
                "overwrite": overwrite,
            },
        )
        for m in order
        for s in protocol.training_seeds
    ]
    start = time.perf_counter()
    outcomes = run_jobs(
        jobs,
        workers=workers,
        progress=progress,
        resume_hint=f"continue with --resume (checkpoints in {out / 'checkpoints'})",
    )
    runs = {key: outcome.payload for key, outcome in outcomes.items()}
    results = {"mode": "quick" if quick else "full", **experiment.results(protocol, runs, out)}
    results["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
        "workers": workers,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    results["checks"] = experiment.checks(results, quick)
    results["warnings"] = [
        f"{key.replace('/seed', ' seed ')} diverged: {r['diverged']}"
        for key, r in runs.items()
        if "diverged" in r
    ]
    results["figures"] = []
    write_results(out, results, experiment.markdown(results))
    if figures and figure_note is None:
        results["figures"] = experiment.figures(results, out)
        write_results(out, results, experiment.markdown(results))
    elif figures:
        results["notes"] = [figure_note]
    return results


def _cost(config: TrainConfig) -> int:
    return config.steps * (2 if get_method(config.method).second_order else 1)


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    """``results.json`` and ``results.md``, each written atomically."""
    import json

    _files.write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    _files.write_text(out / "results.md", markdown)


def checks_markdown(checks: Sequence[Mapping[str, Any]]) -> str:
    """The checks as a Markdown task list."""
    return "\n".join(
        f"- [{'x' if c['passed'] else ' '}] {c['name']}: {c['detail']}" for c in checks
    )
