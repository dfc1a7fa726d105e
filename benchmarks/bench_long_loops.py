"""Long inner loops: peak memory and time of one meta-gradient against the number of inner steps k,
every route on one model.

Model and problem: the glyph benchmark's conv net (``conv_net(5, 16)`` through ``from_module``,
BatchNorm with batch statistics), 8 tasks of 5-way 1-shot with one query image per class, inner
step α = 0.1, float32, one thread, ``meta_batch_grad(..., backend="vmap")`` — the call users make.
Routes: MAML's exact meta-gradient with ``reverse="unroll"``, ``"hvp"`` and ``"checkpointed"``;
a forward-mode meta-gradient (``jvp`` through the inner loop, one tangent per parameter: timed
for 64 tangents and scaled to all P of them, since P forward passes per meta-gradient is where
forward mode stops); iMAML (flat in k, a different gradient) and FOMAML (no reverse pass).

Each (route, k) runs in a fresh process: peak tensor memory by ``mamlkit.profiling.PeakMemory``
(every storage created inside the call, exact) and the process's peak resident memory
(``ru_maxrss``) above what it held before the call, and the median time of three calls after one
warm-up. Targets: at k = 40 the ``hvp`` and ``checkpointed`` peak increments over k = 1 at most a
quarter of the unroll's; at k = 100 the exact meta-gradient runs in the memory the unroll needs at
k ≈ 10 or less. Writes ``benchmarks/results/long_loops.{md,json,png}``.

Usage: ``python benchmarks/bench_long_loops.py [--quick]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.func import grad, jvp, vmap

import mamlkit as mk
from mamlkit.profiling import PeakMemory
from mamlkit.tasks import conv_net

OUT = Path(__file__).parent / "results"
TASKS, WAYS, ALPHA, TANGENTS = 8, 5, 0.1, 64
ROUTES = ("unroll", "hvp", "checkpointed", "forward mode", "imaml", "fomaml")


def problem():
    params, model_fn = mk.from_module(conv_net(WAYS, 16, seed=0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TASKS, 2 * WAYS, 1, 28, 28, generator=g)
    y = torch.arange(WAYS).repeat(TASKS, 2)
    return (
        mk.make_cross_entropy_loss(model_fn),
        params,
        (x[:, :WAYS], y[:, :WAYS]),
        (x[:, WAYS:], y[:, WAYS:]),
    )


def _forward_mode(loss, params, support, query, k):
    """Directional derivatives of the meta-objective along ``TANGENTS`` parameter directions, by
    jvp through the unrolled loop (the whole meta-gradient needs P of them)."""
    flat = mk.flatten_params(params)

    def objective(vector, xs, ys, xq, yq):
        theta = mk.unflatten_params(vector, params)
        for _ in range(k):
            g = grad(loss)(theta, (xs, ys))
            theta = {n: theta[n] - ALPHA * g[n] for n in theta}
        return loss(theta, (xq, yq))

    def directional(tangent):
        return vmap(lambda *d: jvp(lambda v: objective(v, *d), (flat,), (tangent,))[1])(
            *support, *query
        ).mean()

    return vmap(directional)(torch.eye(flat.numel())[:TANGENTS])


def call(route: str, k: int):
    loss, params, support, query = problem()
    if route == "forward mode":
        return lambda: _forward_mode(loss, params, support, query, k)
    if route in ("imaml", "fomaml"):
        kw = {"lam": 2.0, "cg_steps": 5} if route == "imaml" else {}
        return lambda: mk.meta_batch_grad(
            route, loss, params, support, query, lr=ALPHA, steps=max(k, 1), backend="vmap", **kw
        )
    return lambda: mk.meta_batch_grad(
        "maml", loss, params, support, query, lr=ALPHA, steps=k, backend="vmap", reverse=route
    )


def measure_one(route: str, k: int) -> dict:
    """In this process: peak tensor bytes, peak RSS growth, median seconds."""
    torch.set_num_threads(1)
    fn = call(route, k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PeakMemory() as meter:
        fn()
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if route == "forward mode":  # scale to the P tangents of a whole meta-gradient
        seconds *= mk.num_params(problem()[1]) / TANGENTS
    return {"peak_tensor_bytes": meter.peak, "peak_rss_growth_bytes": rss, "seconds": seconds}


def measure(route: str, k: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, __file__, "--one", route, str(k)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{route} k={k}: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: k up to 10")
    parser.add_argument(
        "--rewrite", action="store_true", help="rewrite the table and figure from the stored JSON"
    )
    parser.add_argument("--one", nargs=2, metavar=("ROUTE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rewrite:
        report = json.loads((OUT / "long_loops.json").read_text())
        report["results"] = {
            r: {int(k): v for k, v in points.items()} for r, points in report["results"].items()
        }
        report["targets"] = targets(report["results"], report["ks"])
        write(report)
        return report
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]))))
        return {}
    ks = [1, 5, 10] if args.quick else [1, 5, 10, 25, 40, 50, 100]
    results = {r: {} for r in ROUTES}
    for route in ROUTES:
        for k in ks:
            if route == "forward mode" and k > 25:
                continue  # an hour per meta-gradient already at k = 25: where forward mode stops
            results[route][k] = measure(route, k)
            print(route, k, results[route][k], flush=True)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "ks": ks,
        "params": mk.num_params(problem()[1]),
        "results": results,
        "quick": args.quick,
    }
    report["targets"] = targets(results, ks)
    write(report)
    return report


def targets(results: dict, ks: list[int]) -> list[dict]:
    rows = []
    peak = lambda route, k: results[route][k]["peak_tensor_bytes"]  # noqa: E731
    if 40 in ks:
        unroll = peak("unroll", 40) - peak("unroll", 1)
        for route in ("hvp", "checkpointed"):
            growth = peak(route, 40) - peak(route, 1)
            rows.append(
                {
                    "target": f"{route}: peak growth k = 1 → 40 ≤ ¼ of the unroll's",
                    "value": f"{growth / unroll:.3f} of it",
                    "met": growth <= unroll / 4,
                }
            )
    if 100 in ks:
        for route in ("hvp", "checkpointed"):
            need = peak(route, 100)
            above = [k for k in ks if peak("unroll", k) >= need]
            value = f"{need / 2**20:.1f} MiB" + (
                f", less than the unroll's {peak('unroll', above[0]) / 2**20:.1f} MiB at "
                f"k = {above[0]}"
                if above
                else ""
            )
            rows.append(
                {
                    "target": f"{route} at k = 100 in the memory the unroll needs at k ≤ 10",
                    "value": value,
                    "met": need <= peak("unroll", 10),
                }
            )
    return rows


def write(report: dict) -> None:
    ks, results = report["ks"], report["results"]
    mib = 2**20
    lines = [
        "# Long inner loops: one meta-gradient's peak memory and time against k",
        "",
        f"Date: {report['date']}. torch {report['torch']}, one thread. The glyph conv net "
        f"(16 channels, P = {report['params']:,}) through `from_module`, {TASKS} tasks of "
        f"{WAYS}-way 1-shot, one query image per class, α = {ALPHA}, float32, "
        '`backend="vmap"`; each (route, k) in a fresh process. '
        "Peak tensor memory by `mamlkit.profiling.PeakMemory` (exact); RSS growth by `ru_maxrss`; "
        "time the median of three calls. Forward mode: jvp through the loop, timed for "
        f"{TANGENTS} tangents and scaled to all P; memory for {TANGENTS} tangents at once.",
        "",
        "| route | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for route, points in results.items():
        cells = [
            f"{points[k]['peak_tensor_bytes'] / mib:.1f} MiB, {points[k]['seconds']:.2f} s"
            if k in points
            else "—"
            for k in ks
        ]
        lines.append(f"| {route} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Peak RSS growth (MiB): "
        + "; ".join(
            f"{route} "
            + ", ".join(f"k={k}: {p['peak_rss_growth_bytes'] / mib:.0f}" for k, p in points.items())
            for route, points in results.items()
        ),
    ]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
        for t in report["targets"]
    ]
    lines += ["", "![memory and time against k](long_loops.png)", ""]
    OUT.mkdir(exist_ok=True)
    (OUT / "long_loops.md").write_text("\n".join(lines))
    (OUT / "long_loops.json").write_text(json.dumps(report, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for route, points in results.items():
        k = sorted(points)
        left.plot(k, [points[j]["peak_tensor_bytes"] / mib for j in k], marker="o", label=route)
        right.plot(k, [points[j]["seconds"] for j in k], marker="o", label=route)
    left.set(
        xlabel="inner steps k",
        ylabel="peak tensor memory (MiB)",
        title="memory of one meta-gradient",
    )
    right.set(
        xlabel="inner steps k",
        ylabel="seconds (forward mode: all P tangents)",
        yscale="log",
        title="time of one meta-gradient",
    )
    left.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(OUT / "long_loops.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
