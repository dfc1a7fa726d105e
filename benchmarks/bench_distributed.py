"""Scaling over ranks: meta-training iterations per second on 1 and 2 gloo ranks, one thread each.

Two models: the glyph benchmark's conv net (16 channels, 5-way 1-shot, one query image per
class, 32 tasks per meta-batch, ``backend="vmap"``) and the sinusoid MLP (1-40-40-1, 25 tasks,
``backend="fused"``). Each rank runs ``meta_train(..., group="world")`` — the call users make —
with a callback that stamps the time; the rate is taken over the iterations after a warm-up, and
the median of three runs of each is reported. Every rank draws the same meta-batch and computes
its share; one all_reduce of P + T + 1 numbers per iteration.

Target: ≥ 1.7× iterations per second at 2 ranks on the conv net (a 2-core machine); the sinusoid
figure is reported whatever it is (its iterations are too short to pay for the collective).
Writes ``benchmarks/results/distributed.{md,json}``.

Usage: ``python benchmarks/bench_distributed.py [--quick]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mamlkit as mk
from mamlkit.tasks import SinusoidFamily, conv_net
from mamlkit.train import meta_train

OUT = Path(__file__).parent / "results"


def _images(n: int, *, generator: torch.Generator, dtype: torch.dtype):
    """5-way 1-shot tasks of random 28 × 28 images (the speed does not depend on the pixels)."""
    x = torch.randn(n, 10, 1, 28, 28, generator=generator, dtype=dtype)
    y = torch.arange(5).repeat(n, 2)
    return (x[:, :5], y[:, :5]), (x[:, 5:], y[:, 5:])


def _setup(model: str):
    if model == "conv":
        params, model_fn = mk.from_module(conv_net(5, 16, seed=0))
        return mk.make_cross_entropy_loss(model_fn), params, _images, 32, 0.4, "vmap"
    return (
        mk.make_mse_loss(mk.mlp),
        mk.init_mlp((1, 40, 40, 1)),
        SinusoidFamily(),
        25,
        0.01,
        "fused",
    )


def _rank(rank: int, world: int, port: int, model: str, warmup: int, timed: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        group = "world"
    loss, params, tasks, batch, lr, backend = _setup(model)
    stamps: dict[int, float] = {}
    meta_train(
        "maml",
        loss,
        params,
        tasks,
        meta_batch_size=batch,
        iterations=warmup + timed,
        lr=lr,
        meta_lr=1e-3,
        steps=1,
        seed=0,
        backend=backend,
        progress=False,
        log_every=1,
        callback=lambda p: stamps.setdefault(p.iteration, time.perf_counter()),
        group=group,
    )
    if rank == 0:
        rate = timed / (stamps[warmup + timed] - stamps[warmup])
        Path(out).write_text(json.dumps({"rate": rate}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate(model: str, world: int, warmup: int, timed: int) -> float:
    """Iterations per second of one run on ``world`` ranks."""
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rate.json")
        mp.spawn(
            _rank, args=(world, _free_port(), model, warmup, timed, out), nprocs=world, join=True
        )
        return json.loads(Path(out).read_text())["rate"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: short and one repeat")
    args = parser.parse_args(argv)
    plan = {"conv": (3, 10 if args.quick else 60), "sinusoid": (50, 300 if args.quick else 3000)}
    repeats = 1 if args.quick else 3
    results: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "quick": args.quick,
        "models": {},
    }
    for model, (warmup, timed) in plan.items():
        rates = {
            world: statistics.median(rate(model, world, warmup, timed) for _ in range(repeats))
            for world in (1, 2)
        }
        results["models"][model] = {"iterations_per_second": rates, "speedup": rates[2] / rates[1]}
    conv = results["models"]["conv"]["speedup"]
    results["target"] = {"conv speed-up at 2 ranks ≥ 1.7×": conv, "met": conv >= 1.7}
    lines = [
        "# Scaling over ranks: meta-training iterations per second, 1 and 2 gloo ranks",
        "",
        f"Date: {results['date']}. {results['cpus']} CPUs, torch {results['torch']}, one thread "
        f"per rank; {'a --quick smoke run; ' if args.quick else ''}median of {repeats} run(s); "
        "the public `meta_train(..., group='world')`.",
        "",
        "| model | 1 rank (it/s) | 2 ranks (it/s) | speed-up |",
        "|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        rates = r["iterations_per_second"]
        lines.append(f"| {model} | {rates[1]:.2f} | {rates[2]:.2f} | {r['speedup']:.2f}× |")
    lines += [
        "",
        f"Target: the conv net at 2 ranks ≥ 1.7×: {conv:.2f}×, "
        f"{'met' if conv >= 1.7 else 'not met'}.",
    ]
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed.md").write_text("\n".join(lines) + "\n")
    (OUT / "distributed.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
