"""Reproduce the sinusoid regression experiment of Finn et al. (2017, §5.1), several training
seeds per method.

The protocol (paper §5.1 and its ``main.py``): a 1→40→40→1 ReLU MLP, mean-squared error, K = 10
support and 10 query points per training task, one inner SGD step of α = 0.01, Adam with
β = 10⁻³, 25 tasks per meta-batch, 70 000 meta-iterations. Evaluation: 600 fresh tasks per
K ∈ {5, 10, 20} (the same tasks for every method and seed), plain SGD with α = 0.01 on the K
support points, MSE on K query points after 0 … 10 steps.

Two kinds of uncertainty are reported separately: the 95 % half-width over test tasks,
1.96·σ/√N (how precisely one trained model is scored), and the standard deviation over training
seeds (how much training itself varies: initialisation and task stream; bit-identical on one
machine, but amplified by 70 000 iterations of floating-point differences between CPUs).

Inner-loop settings per method (:data:`SETTINGS`; the meta-optimizer, budget and evaluation are
shared): MAML and FOMAML one step of 0.01; Reptile five steps of 0.02 (the sine-wave demo that
accompanies Nichol et al. 2018; one step would make Reptile joint training); iMAML λ = 10,
five steps of 0.01 and five CG iterations; pretrained one step of 0.01 as its progress measure.
Why iMAML diverges under this protocol is measured in ``results/sinusoid/imaml_diagnosis/``.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import _checkpoint
from .._checks import check_positive_int, check_seed, derived_seed
from .._evaluate import mean_ci95
from .._methods import METHODS, get_method
from .._models import init_mlp, make_mse_loss, mlp
from .._tasks import SinusoidFamily
from .._train import TrainingDiverged, TrainResult, check_writable_folder, meta_train
from . import report
from .common import (
    Job,
    binned,
    check_figures_possible,
    eval_seed,
    evaluate_tasks,
    over_seeds,
    run_jobs,
)

SETTINGS: dict[str, dict[str, Any]] = {
    "maml": {"lr": 0.01, "steps": 1},
    "fomaml": {"lr": 0.01, "steps": 1},
    "reptile": {"lr": 0.02, "steps": 5},
    "imaml": {"lr": 0.01, "steps": 5, "lam": 10.0, "cg_steps": 5},
    "pretrained": {"lr": 0.01, "steps": 1},
}
"""Inner-loop settings per method (``lr`` and ``steps`` of training plus the method's own
hyper-parameters); evaluation always uses plain SGD with the protocol's α."""

PAPER_FIG3: dict[str, dict[int, float]] = {
    "maml": {1: 0.67, 5: 0.38, 10: 0.35},
    "pretrained": {1: 2.41, 5: 2.23, 10: 2.19},
}
"""5-shot query MSE after 1, 5 and 10 fine-tuning steps read off Fig. 3 of Finn et al. (2017),
K = 5 (the paper prints no table; a reading, with an error of a few hundredths). The paper's
pretrained baseline was fine-tuned with step 0.01 for K = 5 and 0.02 for K = 10, 20 (its figure
legends); ours uses α = 0.01 for every K, the paper's setting for the K = 5 curves read here."""

PAPER_SOURCE = "read off Fig. 3 of Finn et al. (2017), K = 5 (the paper prints no table)"


def check_settings(settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every entry names a method of the table, has ``lr`` and ``steps`` that method accepts,
    and only the hyper-parameters it takes (with their defaults filled in)."""
    out = {}
    for name, entry in settings.items():
        method = get_method(name)
        extra = {k: v for k, v in entry.items() if k not in ("lr", "steps")}
        method.check_steps(entry["steps"])
        out[name] = {"lr": float(entry["lr"]), "steps": entry["steps"], **method.resolve(extra)}
    return out


@dataclass(frozen=True)
class Protocol:
    """The sinusoid protocol; the defaults are the paper's (``quick()`` shrinks it)."""

    sizes: tuple[int, ...] = (1, 40, 40, 1)
    k_train: int = 10
    lr: float = 0.01
    meta_lr: float = 1e-3
    meta_batch_size: int = 25
    iterations: int = 70_000
    eval_k: tuple[int, ...] = (5, 10, 20)
    eval_tasks: int = 600
    eval_steps: int = 10
    training_seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    settings: dict[str, dict[str, Any]] = field(default_factory=lambda: check_settings(SETTINGS))
    backend: str = "auto"
    checkpoint_every: int = 5_000

    @classmethod
    def quick(cls, **changes: Any) -> Protocol:
        """A few thousand iterations, one seed, a small evaluation (well under a minute)."""
        return replace(cls(iterations=2_000, eval_tasks=200, training_seeds=(0,),
                           checkpoint_every=1_000), **changes)


def train_sinusoid(
    method: str,
    settings: dict[str, Any],
    *,
    sizes: tuple[int, ...],
    k_train: int,
    meta_batch_size: int,
    iterations: int,
    meta_lr: float,
    seed: int,
    backend: str = "auto",
    device: torch.device | str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    on_log: Any = None,
) -> TrainResult:
    """The sinusoid network meta-trained with ``method``: the one recipe behind both
    ``python -m mamlkit train`` and ``reproduce sinusoid``. Parameters are initialised with
    ``seed``, tasks drawn with ``seed + 1``."""
    settings = dict(settings)
    lr, steps = settings.pop("lr"), settings.pop("steps")
    return meta_train(
        method,
        make_mse_loss(mlp),
        init_mlp(tuple(sizes), seed=seed, device=device),
        SinusoidFamily(k_support=k_train),
        meta_batch_size=meta_batch_size,
        iterations=iterations,
        lr=lr,
        meta_lr=meta_lr,
        steps=steps,
        seed=derived_seed(seed, 1),
        backend=backend,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
        log_every=max(1, iterations // 10),
        on_log=on_log,
        **settings,
    )


DIVERGED = 100.0
"""A test task's fine-tuning diverged when its query MSE is non-finite or above this at any step
(the targets are at most 5 in magnitude: predicting 0 everywhere scores at most 25)."""


def evaluate_sinusoid(params: dict[str, torch.Tensor], *, ks: tuple[int, ...], num_tasks: int,
                      lr: float, steps: int) -> dict[str, dict[str, Any]]:
    """The protocol's evaluation of one model: per K, the mean query MSE over the test tasks
    after 0 … ``steps`` SGD steps with its 95 % half-width, and how many tasks' fine-tuning
    diverged. Plain SGD with a fixed α diverges on a task whose support loss has curvature
    h > 2/α along the path; a sharply meta-trained model meets that on a few of 600 five-point
    tasks, and one such task makes the mean infinite. So the mean and interval are over the
    tasks whose fine-tuning stayed finite (the same tasks at every step), and ``diverged``
    counts the others."""
    out = {}
    for k in ks:
        r = evaluate_tasks(make_mse_loss(mlp), params, SinusoidFamily(k_support=k),
                           num_tasks=num_tasks, lr=lr, steps=steps, seed=eval_seed(k))
        ok = (torch.isfinite(r.losses) & (r.losses < DIVERGED)).all(1)
        mean, half = mean_ci95(r.losses[ok]) if ok.any() else (r.loss, r.ci95)
        out[str(k)] = {"mean": mean.tolist(), "ci95": half.tolist(), "diverged": int((~ok).sum())}
    return out


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "checkpoints" / f"{method}-seed{seed}"


def _job(method: str, seed: int, protocol: dict[str, Any], out: str, resume: bool,
         progress: bool, on_log: Any) -> dict[str, Any]:
    """Train and evaluate one (method, seed); a divergence is reported, not raised."""
    p = Protocol(**{**protocol, "sizes": tuple(protocol["sizes"]), "eval_k": tuple(protocol["eval_k"])})
    folder = run_dir(Path(out), method, seed)
    can_resume = resume and _checkpoint.checkpoint_path(folder).is_file()
    start = time.perf_counter()
    try:
        result = train_sinusoid(method, p.settings[method], sizes=p.sizes, k_train=p.k_train,
                                meta_batch_size=p.meta_batch_size, iterations=p.iterations,
                                meta_lr=p.meta_lr, seed=seed, backend=p.backend,
                                checkpoint_dir=folder, checkpoint_every=p.checkpoint_every,
                                resume=can_resume, progress=progress, on_log=on_log)
    except TrainingDiverged as error:
        return {"diverged": str(error), "iteration": error.iteration,
                "train_seconds": round(error.result.config.get("train_seconds", time.perf_counter() - start), 1)}
    return {
        "train_seconds": round(result.config["train_seconds"], 1),
        "resumed": can_resume,
        "backend": result.config["backend"],
        "final_meta_loss": (binned(result.history, 20)["meta_loss"] or [None])[-1],
        "learning_curve": binned(result.history),
        "eval": evaluate_sinusoid(result.params, ks=p.eval_k, num_tasks=p.eval_tasks, lr=p.lr,
                                  steps=p.eval_steps),
    }


def run_checks(results: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """The assertions of a run, on the means over training seeds: MAML beats pretrained after
    the last step with disjoint intervals (both modes; interval = test-task half-width plus one
    between-seed sd), and, in full mode, MAML's 5-shot MSE after 1, 5 and 10 steps is at most the
    Fig. 3 reading plus its interval. Returns ``[{"name", "passed", "detail"}]``."""
    checks: list[dict[str, Any]] = []
    summary = {m: r["summary"] for m, r in results["methods"].items() if "summary" in r}

    def interval(curve: dict[str, list[float]], j: int) -> float:
        return curve["ci95"][j] + curve["seed_sd"][j]

    if "maml" in summary and "pretrained" in summary:
        for k in results["protocol"]["eval_k"]:
            m, p = summary["maml"][str(k)], summary["pretrained"][str(k)]
            upper, lower = m["mean"][-1] + interval(m, -1), p["mean"][-1] - interval(p, -1)
            checks.append({
                "name": f"MAML beats pretrained, K={k}, {len(m['mean']) - 1} steps",
                "passed": bool(upper < lower),
                "detail": f"MAML {m['mean'][-1]:.3f} ± {interval(m, -1):.3f} vs pretrained "
                f"{p['mean'][-1]:.3f} ± {interval(p, -1):.3f} (intervals must not overlap)",
            })
    if not quick and "maml" in summary and "5" in summary["maml"]:
        curve = summary["maml"]["5"]
        for step, reading in PAPER_FIG3["maml"].items():
            if step < len(curve["mean"]):
                value, half = curve["mean"][step], interval(curve, step)
                checks.append({
                    "name": f"MAML 5-shot MSE after {step} step(s) <= {reading} (Fig. 3 reading) "
                    "+ its interval",
                    "passed": bool(value <= reading + half),
                    "detail": f"{value:.3f} ± {half:.3f} vs Fig. 3 reading {reading}",
                })
    return checks


def reproduce_sinusoid(
    out: str | Path,
    *,
    quick: bool = False,
    iterations: int | None = None,
    methods: tuple[str, ...] | list[str] | None = None,
    eval_tasks: int | None = None,
    seeds: tuple[int, ...] | list[int] | None = None,
    workers: int = 1,
    backend: str = "auto",
    resume: bool = False,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and report every (method, training seed); write ``results.json``,
    ``results.md`` and ``models.pt`` (every run's final parameters) first, then the PNG figures,
    and keep one checkpoint per run under ``out/checkpoints/`` (``resume=True`` continues the
    runs found there).

    Every setting and the output folder are checked before any training starts.

    Returns:
        The results dict written to ``results.json``; ``results["checks"]`` holds the
        assertions (see :func:`run_checks`).
    """
    protocol = Protocol.quick() if quick else Protocol()
    changes: dict[str, Any] = {"backend": backend}
    if iterations is not None:
        changes["iterations"] = check_positive_int(iterations, "iterations")
    if eval_tasks is not None:
        changes["eval_tasks"] = check_positive_int(eval_tasks, "eval_tasks")
    if methods is not None:
        if not methods:
            raise ValueError(f"methods must be a non-empty subset of {tuple(METHODS)}")
        changes["methods"] = tuple(get_method(m).name for m in methods)
    if seeds is not None:
        if not seeds:
            raise ValueError("seeds must list at least one training seed")
        changes["training_seeds"] = tuple(check_seed(s, "seeds") for s in seeds)
    protocol = replace(protocol, **changes)
    check_positive_int(workers, "workers")
    out = check_writable_folder(out, "out")
    figure_note = check_figures_possible() if figures else None
    # the longest runs first (more inner steps), so the workers finish together
    order = sorted(protocol.methods, key=lambda m: -protocol.settings[m]["steps"])
    jobs = [Job(f"{m}/seed{s}", _job, {"method": m, "seed": s, "protocol": asdict(protocol),
                                       "out": str(out), "resume": resume})
            for m in order for s in protocol.training_seeds]
    start = time.perf_counter()
    outcomes = run_jobs(jobs, workers=workers, progress=progress,
                        resume_hint=f"continue with --resume (checkpoints in {out / 'checkpoints'})")
    wall = time.perf_counter() - start

    results: dict[str, Any] = {
        "experiment": "sinusoid regression, Finn et al. (2017) §5.1",
        "mode": "quick" if quick else "full",
        "reduced": protocol.iterations < Protocol().iterations,
        "protocol": asdict(protocol),
        "training_seeds": list(protocol.training_seeds),
        "uncertainty": {
            "ci95": "95 % half-width over test tasks, 1.96·σ/√N, averaged over training seeds",
            "seed_sd": "standard deviation of the test-task mean over training seeds (n − 1)",
        },
        "paper": {"source": PAPER_SOURCE, "k": 5,
                  "mse": {m: {str(j): v for j, v in r.items()} for m, r in PAPER_FIG3.items()}},
        "methods": {},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
                        "workers": workers, "wall_seconds": round(wall, 1)},
    }
    trained = {}  # the first finished seed's model of each method, for the figures
    models = {}  # every finished run's parameters, for the notebooks (models.pt, weights only)
    for method in protocol.methods:
        runs = {str(s): outcomes[f"{method}/seed{s}"].payload for s in protocol.training_seeds}
        finished = {s: r for s, r in runs.items() if "eval" in r}
        for seed in finished:
            models[f"{method}-seed{seed}"] = _checkpoint.load_checkpoint(run_dir(out, method, int(seed))).params
        if finished:
            trained[method] = models[f"{method}-seed{next(iter(finished))}"]
        record: dict[str, Any] = {"settings": protocol.settings[method], "runs": runs}
        if finished:
            record["summary"] = {str(k): over_seeds([r["eval"][str(k)] for r in finished.values()])
                                 for k in protocol.eval_k}
        results["methods"][method] = record
    results["checks"] = run_checks(results, quick)
    results["warnings"] = [f"{m} seed {s} diverged and was not evaluated: {r['diverged']}"
                           for m, rec in results["methods"].items()
                           for s, r in rec["runs"].items() if "diverged" in r]
    results["figures"] = []
    report.save_models(out / "models.pt", models)
    report.write_results(out, results, report.sinusoid_markdown(results, PAPER_FIG3, PAPER_SOURCE))
    if figures and figure_note is None:
        results["figures"] = report.sinusoid_figures(results, trained, out)
        report.write_results(out, results, report.sinusoid_markdown(results, PAPER_FIG3, PAPER_SOURCE))
    elif figures:
        results["notes"] = [figure_note]
    return results


__all__ = [
    "PAPER_FIG3",
    "PAPER_SOURCE",
    "SETTINGS",
    "Protocol",
    "check_settings",
    "evaluate_sinusoid",
    "reproduce_sinusoid",
    "run_checks",
    "train_sinusoid",
]
