"""Reproduce the sinusoid regression experiment of Finn et al. (2017, §5.1), several training
seeds per method.

The protocol (paper §5.1 and its ``main.py``): a 1→40→40→1 ReLU MLP, mean-squared error, K = 10
support and 10 query points per training task, one inner SGD step of α = 0.01, Adam with
β = 10⁻³, 25 tasks per meta-batch, 70 000 meta-iterations. Evaluation: 600 fresh tasks per
K ∈ {5, 10, 20} (the same tasks for every method and seed), each method's test-time adaptation
(plain SGD with α = 0.01 for every built-in method) on the K support points, MSE on K query
points after 0 … 10 steps.

Two kinds of uncertainty are reported separately: the 95 % half-width over test tasks,
1.96·σ/√N (how precisely one trained model is scored), and the standard deviation over training
seeds (how much training itself varies: initialisation and task stream; bit-identical on one
machine, but amplified by 70 000 iterations of floating-point differences between CPUs).

Inner-loop settings: the protocol's α and one step, the method table's hyper-parameter defaults,
and the changes of :data:`SETTINGS`: Reptile five steps of 0.02 (the sine-wave demo that
accompanies Nichol et al. 2018; one step would make Reptile joint training); iMAML λ = 10 and
five steps. Why iMAML diverges under this protocol is measured in
``results/sinusoid/imaml_diagnosis/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import _checkpoint, _files
from .._evaluate import mean_ci95
from .._models import init_mlp, make_mse_loss, mlp
from .._tasks import SinusoidFamily
from .common import (
    Experiment,
    Protocol,
    Setup,
    checks_markdown,
    eval_seed,
    evaluate_tasks,
    over_seeds,
    run_dir,
)

SETTINGS: dict[str, dict[str, Any]] = {
    "reptile": {"lr": 0.02, "steps": 5},
    "imaml": {"steps": 5, "lam": 10.0},
}
"""The inner-loop settings that differ from the protocol's α, one step and the method table's
defaults, per method; evaluation always uses each method's test-time adaptation with the
protocol's α."""

PAPER_FIG3: dict[str, dict[int, float]] = {
    "maml": {1: 0.67, 5: 0.38, 10: 0.35},
    "pretrained": {1: 2.41, 5: 2.23, 10: 2.19},
}
"""5-shot query MSE after 1, 5 and 10 fine-tuning steps read off Fig. 3 of Finn et al. (2017),
K = 5 (the paper prints no table; a reading, with an error of a few hundredths). The paper's
pretrained baseline was fine-tuned with step 0.01 for K = 5 and 0.02 for K = 10, 20 (its figure
legends); ours uses α = 0.01 for every K, the paper's setting for the K = 5 curves read here."""

PAPER_SOURCE = "read off Fig. 3 of Finn et al. (2017), K = 5 (the paper prints no table)"

PAPER_METHODS = ("maml", "fomaml", "reptile", "imaml", "pretrained")
METHODS_RUN = (*PAPER_METHODS, "metasgd", "anil")
"""The paper's methods and two refinements: learned inner rates and head-only adaptation."""


def method_settings(
    method: str, lr: float, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The inner-loop settings of ``method`` under the sinusoid protocol with α = ``lr``
    (see :meth:`mamlkit._experiments.common.Protocol.settings`)."""
    return SinusoidProtocol(lr=lr, changes={method: changes or {}}).settings(method)


@dataclass(frozen=True)
class SinusoidProtocol(Protocol):
    """The sinusoid protocol; the defaults are the paper's (``quick()`` shrinks it)."""

    methods: tuple[str, ...] = METHODS_RUN
    training_seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 70_000
    eval_tasks: int = 600
    checkpoint_every: int = 5_000
    sizes: tuple[int, ...] = (1, 40, 40, 1)
    k_train: int = 10
    eval_k: tuple[int, ...] = (5, 10, 20)
    eval_steps: int = 10

    overrides: ClassVar[dict[str, dict[str, Any]]] = SETTINGS

    @classmethod
    def quick(cls, **changes: Any) -> SinusoidProtocol:
        """A few thousand iterations, one seed, a small evaluation (well under a minute)."""
        return replace(
            cls(iterations=2_000, eval_tasks=200, training_seeds=(0,), checkpoint_every=1_000),
            **changes,
        )


DIVERGED = 100.0
"""A test task's fine-tuning diverged when its query MSE is non-finite or above this at any step
(the targets are at most 5 in magnitude: predicting 0 everywhere scores at most 25)."""


def evaluate_sinusoid(
    params: dict[str, torch.Tensor],
    *,
    ks: tuple[int, ...],
    num_tasks: int,
    lr: float,
    steps: int,
    method: str | None = None,
    hypers: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The protocol's evaluation of one model: per K, the mean query MSE over the test tasks
    after 0 … ``steps`` fine-tuning steps with its 95 % half-width, and how many tasks' fine-tuning
    diverged. Plain SGD with a fixed α diverges on a task whose support loss has curvature
    h > 2/α along the path; a sharply meta-trained model meets that on a few of 600 five-point
    tasks, and one such task makes the mean infinite. So the mean and interval are over the
    tasks whose fine-tuning stayed finite (the same tasks at every step), and ``diverged``
    counts the others."""
    out = {}
    for k in ks:
        r = evaluate_tasks(
            make_mse_loss(mlp),
            params,
            SinusoidFamily(k_support=k),
            num_tasks=num_tasks,
            lr=lr,
            steps=steps,
            seed=eval_seed(k),
            method=method,
            hypers=hypers,
        )
        ok = (torch.isfinite(r.losses) & (r.losses < DIVERGED)).all(1)
        mean, half = mean_ci95(r.losses[ok]) if ok.any() else (r.loss, r.ci95)
        out[str(k)] = {"mean": mean.tolist(), "ci95": half.tolist(), "diverged": int((~ok).sum())}
    return out


class Sinusoid(Experiment):
    """The sinusoid regression experiment."""

    name = "sinusoid"
    protocol_type = SinusoidProtocol

    def setup(self, protocol: Any, method: str, seed: int) -> Setup:
        """The protocol's network initialised with ``seed``; tasks drawn with ``seed + 1``."""
        p: SinusoidProtocol = protocol
        params = init_mlp(tuple(p.sizes), seed=seed, device=p.device)
        family = SinusoidFamily(k_support=p.k_train)
        return Setup(make_mse_loss(mlp), params, family, p.config(method, seed))

    def evaluate(
        self, protocol: Any, method: str, setup: Setup, params: dict[str, torch.Tensor]
    ) -> Any:
        p: SinusoidProtocol = protocol
        return evaluate_sinusoid(
            params,
            ks=p.eval_k,
            num_tasks=p.eval_tasks,
            lr=p.lr,
            steps=p.eval_steps,
            method=method,
            hypers=dict(setup.config.hypers),
        )

    def results(self, protocol: Any, runs: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
        p: SinusoidProtocol = protocol
        results: dict[str, Any] = {
            "experiment": "sinusoid regression, Finn et al. (2017) §5.1",
            "reduced": p.iterations < SinusoidProtocol().iterations,
            "protocol": {**_protocol_record(p)},
            "training_seeds": list(p.training_seeds),
            "uncertainty": {
                "ci95": "95 % half-width over test tasks, 1.96·σ/√N, averaged over training seeds",
                "seed_sd": "standard deviation of the test-task mean over training seeds (n − 1)",
            },
            "paper": {
                "source": PAPER_SOURCE,
                "k": 5,
                "mse": {m: {str(j): v for j, v in r.items()} for m, r in PAPER_FIG3.items()},
            },
            "methods": {},
        }
        models = {}  # every finished run's parameters, for the notebooks (models.pt, weights only)
        for method in p.methods:
            by_seed = {str(s): runs[f"{method}/seed{s}"] for s in p.training_seeds}
            finished = {s: r for s, r in by_seed.items() if "eval" in r}
            for seed in finished:
                models[f"{method}-seed{seed}"] = _checkpoint.load_checkpoint(
                    run_dir(out, method, int(seed))
                ).params
            record: dict[str, Any] = {"settings": p.settings(method), "runs": by_seed}
            if finished:
                record["summary"] = {
                    str(k): over_seeds([r["eval"][str(k)] for r in finished.values()])
                    for k in p.eval_k
                }
            results["methods"][method] = record
        _files.save_torch(
            out / "models.pt",
            {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in models.items()},
        )
        return results

    def checks(self, results: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
        """MAML beats pretrained after the last step with disjoint intervals (both modes;
        interval = test-task half-width plus one between-seed sd), and, in full mode, MAML's
        5-shot MSE after 1, 5 and 10 steps is at most the Fig. 3 reading plus its interval."""
        checks: list[dict[str, Any]] = []
        summary = {m: r["summary"] for m, r in results["methods"].items() if "summary" in r}

        def interval(curve: dict[str, list[float]], j: int) -> float:
            return curve["ci95"][j] + curve["seed_sd"][j]

        if "maml" in summary and "pretrained" in summary:
            for k in results["protocol"]["eval_k"]:
                m, p = summary["maml"][str(k)], summary["pretrained"][str(k)]
                upper, lower = m["mean"][-1] + interval(m, -1), p["mean"][-1] - interval(p, -1)
                checks.append(
                    {
                        "name": f"MAML beats pretrained, K={k}, {len(m['mean']) - 1} steps",
                        "passed": bool(upper < lower),
                        "detail": f"MAML {m['mean'][-1]:.3f} ± {interval(m, -1):.3f} vs pretrained "
                        f"{p['mean'][-1]:.3f} ± {interval(p, -1):.3f} (intervals must not overlap)",
                    }
                )
        if not quick and "maml" in summary and "5" in summary["maml"]:
            curve = summary["maml"]["5"]
            for step, reading in PAPER_FIG3["maml"].items():
                if step < len(curve["mean"]):
                    value, half = curve["mean"][step], interval(curve, step)
                    checks.append(
                        {
                            "name": f"MAML 5-shot MSE after {step} step(s) <= {reading} "
                            "(Fig. 3 reading) "
                            "+ its interval",
                            "passed": bool(value <= reading + half),
                            "detail": f"{value:.3f} ± {half:.3f} vs Fig. 3 reading {reading}",
                        }
                    )
        return checks

    def markdown(self, results: dict[str, Any]) -> str:
        return _markdown(results)

    def figures(self, results: dict[str, Any], out: Path) -> list[str]:
        return _figures(results, out)


def _protocol_record(p: SinusoidProtocol) -> dict[str, Any]:
    from dataclasses import asdict

    record = asdict(p)
    record["settings"] = {m: p.settings(m) for m in p.methods}
    return record


EXPERIMENT = Sinusoid()


def reproduce_sinusoid(out: str | Path, **options: Any) -> dict[str, Any]:
    """``reproduce("sinusoid", out, **options)`` (:func:`mamlkit._experiments.common.reproduce`)."""
    from .common import reproduce

    return reproduce("sinusoid", out, **options)


# ---------------------------------------------------------------------------------- the report


def _cell(curve: dict[str, list[float]], j: int, seeds: bool) -> str:
    if j >= len(curve["mean"]):
        return ""
    text = f"{curve['mean'][j]:.3f} ± {curve['ci95'][j]:.3f}"
    return text + (f" (sd {curve['seed_sd'][j]:.3f})" if seeds else "")


def _diverged_note(results: dict[str, Any]) -> str:
    notes = []
    for method, record in results["methods"].items():
        for k, curve in record.get("summary", {}).items():
            counts = curve.get("diverged", [])
            if any(counts):
                notes.append(
                    f"{method}, K = {k}: {'/'.join(map(str, counts))} of "
                    f"{results['protocol']['eval_tasks']} test tasks (per seed)"
                )
    if not notes:
        return ""
    return (
        "\nPlain SGD fine-tuning diverged (query MSE non-finite or above 100) on "
        + "; ".join(notes)
        + ". Those tasks are left out of the means above (the same tasks at "
        "every step); with them a mean is infinite. Fixed-step SGD diverges along support-loss "
        "curvature h > 2/α, and a meta-trained model is sharp enough to meet that on a few "
        "five-point tasks.\n"
    )


def _markdown(results: dict[str, Any]) -> str:
    """``results.md`` of the sinusoid experiment."""
    proto = results["protocol"]
    seeds = results["training_seeds"]
    several = len(seeds) > 1
    rows = [
        "| method | K | MSE, 0 steps | 1 step | 5 steps | 10 steps |",
        "|---|---|---|---|---|---|",
    ]
    for method, record in results["methods"].items():
        for k, curve in record.get("summary", {}).items():
            rows.append(
                f"| {method} | {k} | "
                + " | ".join(_cell(curve, j, several) for j in (0, 1, 5, 10))
                + " |"
            )
    for method, reading in PAPER_FIG3.items():
        cells = " | ".join(f"{reading[j]:.2f}" for j in (1, 5, 10))
        rows.append(f"| {method}, {PAPER_SOURCE} | 5 | — | {cells} |")
    timing = ", ".join(
        f"{m}/seed {s} {r['train_seconds']:.0f} s"
        for m, rec in results["methods"].items()
        for s, r in rec["runs"].items()
    )
    warnings = "".join(f"- {w}\n" for w in results["warnings"])
    reduced = " (REDUCED: fewer meta-iterations than the paper's)" if results["reduced"] else ""
    plus = (
        "mean over the training seeds ± the 95 % half-width over test tasks (1.96·σ/√N, "
        "averaged over seeds), with the between-seed standard deviation in parentheses"
        if several
        else "mean ± the 95 % half-width over test tasks (1.96·σ/√N); one training "
        "seed, so the spread between training runs is not measured"
    )
    figures = "".join(f"\n![{f}]({f})\n" for f in results.get("figures", []))
    return f"""# Sinusoid regression (Finn et al. 2017, §5.1), {results["mode"]} mode{reduced}

Trained {proto["iterations"]} meta-iterations (meta-batch {proto["meta_batch_size"]}, K = \
{proto["k_train"]}, Adam β = {proto["meta_lr"]}), {" → ".join(map(str, proto["sizes"]))} ReLU \
MLP, MSE loss, training seeds {", ".join(map(str, seeds))}. Evaluated on {proto["eval_tasks"]} \
fresh tasks per K (the same tasks for every model): plain SGD with α = {proto["lr"]} on the K \
support points, MSE on K query points. Each cell: {plus}.

{chr(10).join(rows)}
{_diverged_note(results)}
The paper shows these curves as plots (Fig. 3 and its appendix) and prints no table; its rows
above are values read off Fig. 3 (K = 5), so they carry a reading error of a few hundredths.
The paper's pretrained baseline was fine-tuned with step 0.01 for K = 5 and 0.02 for K = 10, 20
(its figure legends); our evaluation uses α = 0.01 for every method and every K.

Inner-loop settings: {json.dumps({m: proto["settings"][m] for m in results["methods"]})}

Training time ({results["environment"]["workers"]} worker(s), \
wall {results["environment"]["wall_seconds"]} s): \
{timing}.

## Checks

{checks_markdown(results["checks"])}
{"## Warnings" + chr(10) + chr(10) + warnings if warnings else ""}{figures}"""


def _figures(results: dict[str, Any], out: Path) -> list[str]:
    """``learning_curves.png``, ``mse_vs_steps.png`` and ``fits.png``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = {m: r for m, r in results["methods"].items() if "summary" in r}
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, record in methods.items():
        curve = next(r["learning_curve"] for r in record["runs"].values() if "learning_curve" in r)
        ax.plot(curve["iteration"], curve["meta_loss"], label=method)
    ax.set(xlabel="meta-iteration", ylabel="query MSE after adaptation", yscale="log")
    ax.set_title(
        f"Meta-training, seed {results['training_seeds'][0]} (binned means)", fontsize="medium"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    written.append("learning_curves.png")
    plt.close(fig)

    ks = results["protocol"]["eval_k"]
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.5), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for method, record in methods.items():
            curve = record["summary"][str(k)]
            steps = range(len(curve["mean"]))
            mean = torch.tensor(curve["mean"])
            half = torch.tensor(curve["ci95"]) + torch.tensor(curve["seed_sd"])
            ax.plot(steps, mean, marker="o", ms=3, label=method)
            ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
        ax.set(title=f"K = {k}", xlabel="gradient steps at meta-test", ylabel="query MSE")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "mse_vs_steps.png", dpi=100)
    written.append("mse_vs_steps.png")
    plt.close(fig)

    models = torch.load(out / "models.pt", weights_only=True)
    first = {
        m: models[f"{m}-seed{results['training_seeds'][0]}"]
        for m in ("maml", "pretrained")
        if f"{m}-seed{results['training_seeds'][0]}" in models
    }
    if first:
        fig, axes = plt.subplots(
            1, len(first), figsize=(5 * len(first), 3.5), sharey=True, squeeze=False
        )
        for ax, (method, params) in zip(axes[0], first.items()):
            plot_adaptation(ax, params, k=5, lr=results["protocol"]["lr"])
            ax.set_title(f"{method}, K = 5")
        fig.tight_layout()
        fig.savefig(out / "fits.png", dpi=100)
        written.append("fits.png")
        plt.close(fig)
    return written


def plot_adaptation(
    ax: Any, params: dict[str, torch.Tensor], *, k: int, lr: float, seed: int = 123
) -> None:
    """Fig. 2 of the paper on one held-out task: the prediction before and after 1 and 10 SGD
    steps on K points, the true function, and the K points used for the gradient."""
    from .._metagrad import adapt
    from .._tasks import sample_sinusoid_tasks, sinusoid_grid

    dtype = next(iter(params.values())).dtype
    task = sample_sinusoid_tasks(
        1, k_support=k, generator=torch.Generator().manual_seed(seed), dtype=dtype
    )
    support = (task.support[0][0], task.support[1][0])
    x, y = sinusoid_grid(task.amplitude, task.phase)
    loss = make_mse_loss(mlp)
    ax.plot(x[:, 0], y[0, :, 0], color="tab:red", lw=2, label="ground truth")
    for steps, style in ((0, ":"), (1, "--"), (10, "-")):
        adapted = adapt(loss, params, support, lr=lr, steps=steps)
        label = "pre-update" if steps == 0 else f"{steps} grad step{'s' if steps > 1 else ''}"
        ax.plot(x[:, 0], mlp(adapted, x)[:, 0].detach(), style, color="tab:green", label=label)
    ax.plot(support[0][:, 0], support[1][:, 0], "^", color="tab:purple", label="used for grad")
    ax.set(xlabel="x", ylabel="y")
    ax.legend(fontsize="small")


__all__ = [
    "EXPERIMENT",
    "PAPER_FIG3",
    "PAPER_METHODS",
    "PAPER_SOURCE",
    "SETTINGS",
    "SinusoidProtocol",
    "evaluate_sinusoid",
    "method_settings",
    "plot_adaptation",
    "reproduce_sinusoid",
]
