"""Report writers: ``results.json`` and ``results.md`` (written atomically, before any figure),
then the figures, which need matplotlib (an optional dependency)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_models(path: Path, models: dict[str, dict[str, torch.Tensor]]) -> None:
    """``{run: params}`` in one ``torch.save`` file, written atomically (load it with
    ``torch.load(path, weights_only=True)``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({k: {n: t.detach().cpu() for n, t in p.items()} for k, p in models.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out / "results.md", markdown)


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
                notes.append(f"{method}, K = {k}: {'/'.join(map(str, counts))} of {results['protocol']['eval_tasks']} "
                             "test tasks (per seed)")
    if not notes:
        return ""
    return ("\nPlain SGD fine-tuning diverged (query MSE non-finite or above 100) on "
            + "; ".join(notes) + ". Those tasks are left out of the means above (the same tasks at every "
            "step); with them a mean is infinite. Fixed-step SGD diverges along support-loss curvature "
            "h > 2/α, and a meta-trained model is sharp enough to meet that on a few five-point tasks.\n")


def sinusoid_markdown(results: dict[str, Any], paper: dict[str, dict[int, float]], source: str) -> str:
    """``results.md`` of the sinusoid experiment."""
    proto = results["protocol"]
    seeds = results["training_seeds"]
    several = len(seeds) > 1
    rows = ["| method | K | MSE, 0 steps | 1 step | 5 steps | 10 steps |", "|---|---|---|---|---|---|"]
    for method, record in results["methods"].items():
        for k, curve in record.get("summary", {}).items():
            rows.append(f"| {method} | {k} | " + " | ".join(_cell(curve, j, several) for j in (0, 1, 5, 10)) + " |")
    for method, reading in paper.items():
        cells = " | ".join(f"{reading[j]:.2f}" for j in (1, 5, 10))
        rows.append(f"| {method}, {source} | 5 | — | {cells} |")
    timing = ", ".join(
        f"{m}/seed {s} {r['train_seconds']:.0f} s"
        for m, rec in results["methods"].items() for s, r in rec["runs"].items()
    )
    checks = "\n".join(f"- [{'x' if c['passed'] else ' '}] {c['name']}: {c['detail']}"
                       for c in results["checks"])
    warnings = "".join(f"- {w}\n" for w in results["warnings"])
    reduced = " (REDUCED: fewer meta-iterations than the paper's)" if results["reduced"] else ""
    plus = ("mean over the training seeds ± the 95 % half-width over test tasks (1.96·σ/√N, "
            "averaged over seeds), with the between-seed standard deviation in parentheses"
            if several else "mean ± the 95 % half-width over test tasks (1.96·σ/√N); one training "
            "seed, so the spread between training runs is not measured")
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

Training time ({results["environment"]["workers"]} worker(s), wall {results["environment"]["wall_seconds"]} s): \
{timing}.

## Checks

{checks}
{"## Warnings" + chr(10) + chr(10) + warnings if warnings else ""}{figures}"""


def sinusoid_figures(results: dict[str, Any], trained: dict[str, dict[str, torch.Tensor]],
                     out: Path) -> list[str]:
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
    ax.set_title(f"Meta-training, seed {results['training_seeds'][0]} (binned means)", fontsize="medium")
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

    shown = [m for m in ("maml", "pretrained") if m in trained]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.5), sharey=True, squeeze=False)
        for ax, method in zip(axes[0], shown):
            plot_adaptation(ax, trained[method], k=5, lr=results["protocol"]["lr"])
            ax.set_title(f"{method}, K = 5")
        fig.tight_layout()
        fig.savefig(out / "fits.png", dpi=100)
        written.append("fits.png")
        plt.close(fig)
    return written


def plot_adaptation(ax: Any, params: dict[str, torch.Tensor], *, k: int, lr: float, seed: int = 123) -> None:
    """Fig. 2 of the paper on one held-out task: the prediction before and after 1 and 10 SGD
    steps on K points, the true function, and the K points used for the gradient."""
    from .._metagrad import adapt
    from .._models import make_mse_loss, mlp
    from .._tasks import sample_sinusoid_tasks, sinusoid_grid

    dtype = next(iter(params.values())).dtype
    task = sample_sinusoid_tasks(1, k_support=k, generator=torch.Generator().manual_seed(seed), dtype=dtype)
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


def glyphs_markdown(results: dict[str, Any]) -> str:
    """``results.md`` of the glyph experiment."""
    proto = results["protocol"]
    rows = ["| method | 5-way 1-shot | 5-way 5-shot |", "|---|---|---|"]
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results["results"]:
        by_method.setdefault(r["method"], {})[r["shots"]] = r
    for method, cells in by_method.items():
        rows.append(f"| {method} | " + " | ".join(
            f"{100 * cells[s]['accuracy']:.1f} ± {100 * cells[s]['ci95']:.1f} %" if s in cells else "—"
            for s in (1, 5)) + " |")
    checks = "\n".join(f"- [{'x' if c['passed'] else ' '}] {c['name']}: {c['detail']}" for c in results["checks"])
    chars = results["benchmark"]["characters"]
    timing = ", ".join(f"{k} {r['train_seconds']:.0f} s" for k, r in results["runs"].items())
    figures = "".join(f"\n![{f}]({f})\n" for f in results.get("figures", []))
    warnings = "".join(f"- {w}\n" for w in results["warnings"])
    return f"""# Few-shot glyph classification (the Omniglot protocol of Finn et al. 2017, §5.2), {results["mode"]} mode

{chars["train"]} meta-train, {chars["val"]} meta-val and {chars["test"]} meta-test characters \
({results["benchmark"]["renderings"]} renderings in all), split by script; 28 × 28 images with a \
random face and affine distortion each. Network: 4 × [3×3 conv, stride 2, BatchNorm (batch \
statistics), ReLU] with {proto["channels"]} channels (the paper: 64) and a linear head. Meta-trained \
{proto["iterations"]} iterations at {proto["ways"]}-way {proto["train_shots"]}-shot ({proto["meta_batch_size"]} \
tasks, {proto["train_queries"]} query image(s) per class, one inner step of α = {proto["lr"]}, Adam \
β = {proto["meta_lr"]}), training seed(s) {", ".join(map(str, proto["training_seeds"]))}; evaluated on \
{proto["eval_tasks"]} meta-test tasks per shot setting, {proto["eval_queries"]} query images per class, \
after {proto["eval_steps"]} fine-tuning steps of α. Accuracy ± the 95 % half-width over test tasks \
(the spread between training seeds is not measured here).

{chr(10).join(rows)}

Every model was meta-trained at 1-shot and is evaluated at both settings (the paper trains one model
per setting; here the CPU budget of the full mode is 15 minutes on two cores). For scale, the paper
reports 98.7 % and 99.9 % on Omniglot with 64 channels and 60 000 iterations.

Training time ({results["environment"]["workers"]} worker(s), wall {results["environment"]["wall_seconds"]} s): {timing}.

## Checks

{checks}
{"## Warnings" + chr(10) + chr(10) + warnings if warnings else ""}{figures}"""


def glyph_figures(results: dict[str, Any], bank: Any, out: Path) -> list[str]:
    """``glyphs_by_script.png`` (sample characters per script, several faces) and
    ``accuracy_vs_steps.png``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scripts = list(dict.fromkeys(bank.scripts))
    fig, axes = plt.subplots(len(scripts), 8, figsize=(8, 0.9 * len(scripts)))
    for row, script in enumerate(scripts):
        chars = [i for i, s in enumerate(bank.scripts) if s == script][:8]
        for col in range(8):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if col < len(chars):
                start = int(bank.char_start[chars[col]])
                ax.imshow(bank.images[start].numpy(), cmap="gray_r", vmin=0, vmax=255)
        axes[row][0].set_ylabel(script.title(), rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("The glyph benchmark: eight characters of each script (regular face)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "glyphs_by_script.png", dpi=100)
    written.append("glyphs_by_script.png")
    plt.close(fig)

    curves = [r for r in results["results"] if "curve" in r]
    if curves:
        shots = sorted({r["shots"] for r in curves})
        fig, axes = plt.subplots(1, len(shots), figsize=(5 * len(shots), 3.5), sharey=True, squeeze=False)
        for ax, k in zip(axes[0], shots):
            for r in (r for r in curves if r["shots"] == k):
                ax.plot(range(len(r["curve"])), [100 * a for a in r["curve"]], marker="o", label=r["method"])
            ax.set(title=f"5-way {k}-shot, meta-test", xlabel="fine-tuning steps", ylabel="accuracy (%)")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_steps.png", dpi=100)
        written.append("accuracy_vs_steps.png")
        plt.close(fig)
    return written
