"""Thread settings for the fast path: 1 vs 2 torch threads, with and without
OMP_WAIT_POLICY=PASSIVE.

OpenMP reads its environment once, at start-up, so each setting runs in its own worker process
(the same code, ``--worker``). All workers start first and wait; then, in shuffled rounds, the
parent asks one worker at a time for a block of meta-iterations (the fast path's MAML k=1
gradient + Adam on the sinusoid meta-batch of ``bench_meta.py``), so the settings are
interleaved in time and compared within a round. Reported per setting: median and interquartile
ms per meta-iteration, the slowest single iteration (stalls), and the ratio to 1 thread +
PASSIVE in the same round.

Run (quiet machine): ``python benchmarks/bench_threads.py`` (``--quick`` for a smoke run).
Writes ``benchmarks/results/threads.{md,json}``. The project default is 1 thread
(``mamlkit.set_cpu_threads``) and ``OMP_WAIT_POLICY=PASSIVE`` in the Makefile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_meta import busy

SETTINGS = [(1, None), (1, "PASSIVE"), (2, None), (2, "PASSIVE")]
REFERENCE = (1, "PASSIVE")


def _label(threads: int, policy: str | None) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}, OMP_WAIT_POLICY={policy or '(unset)'}"


def worker(threads: int, setting: str, reps: int) -> None:
    """Wait for 'go' lines on stdin; answer each with a JSON list of per-iteration ms."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_meta

    torch.set_num_threads(threads)
    params, support, query = bench_meta.problem(torch.float32)
    impl = bench_meta.MamlkitFused(params, setting)
    for _ in range(20):
        impl.grad(support, query)
    print(json.dumps({"ready": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            impl.grad(support, query)
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps(times), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 30 s)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--setting", default="maml k=1", help="a setting of bench_meta.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=None, help="meta-iterations per block")
    args = parser.parse_args(argv)
    reps = args.reps or (20 if args.quick else 200)
    if args.worker is not None:
        worker(args.worker, args.setting, reps)
        return {}
    rounds = args.rounds or (3 if args.quick else 20)
    procs = {}
    for threads, policy in SETTINGS:
        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        env["OMP_NUM_THREADS"] = str(threads)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--worker", str(threads), "--setting", args.setting]
        cmd += ["--reps", str(reps)]
        procs[(threads, policy)] = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    for p in procs.values():
        json.loads(p.stdout.readline())
    rng = random.Random(0)
    blocks: dict[tuple, list[list[float]]] = {s: [] for s in SETTINGS}
    load_start = os.getloadavg()
    for _ in range(rounds):
        order = list(SETTINGS)
        rng.shuffle(order)
        for s in order:
            procs[s].stdin.write("go\n")
            procs[s].stdin.flush()
            blocks[s].append(json.loads(procs[s].stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait(timeout=60)
    rows = {}
    for s in SETTINGS:
        per_round = [statistics.median(b) for b in blocks[s]]
        every = [t for b in blocks[s] for t in b]
        q = statistics.quantiles(every, n=4)
        ratio = [
            a / b for a, b in zip(per_round, (statistics.median(b) for b in blocks[REFERENCE]))
        ]
        rows[_label(*s)] = {
            "median_ms": statistics.median(every),
            "q25_ms": q[0],
            "q75_ms": q[2],
            "max_ms": max(every),
            "ratio_to_1_thread_passive": statistics.median(ratio),
        }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_threads.py " + " ".join(argv or sys.argv[1:]),
        "setting": args.setting,
        "rounds": rounds,
        "iterations_per_block": reps,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "quick": args.quick,
        "rows": rows,
    }
    write_report(result, args.out)
    return result


def write_report(result: dict, out_dir: Path) -> None:
    """threads.json and threads.md from one run's ``result``."""
    load_start, rows, rounds = result["loadavg_start"], result["rows"], result["rounds"]
    reps = result["iterations_per_block"]
    loaded = busy(max(load_start[0], result["loadavg_end"][0])) is not None
    lines = [f"# Thread settings: fused kernels, {result['setting']} (meta-gradient), sinusoid", ""]
    if result["quick"] or loaded:
        lines += [
            f"> **PRELIMINARY** — {'a --quick smoke run' if result['quick'] else 'a run'}"
            f"{' on a busy machine' if loaded else ''} (load average {load_start[0]:.1f} → "
            f"{result['loadavg_end'][0]:.1f} on {result['cpu_count']} CPUs). "
            "Re-run on a quiet machine.",
            "",
        ]
    lines += [
        f"Date: {result['date']}. Command: `{result['command']}`. {rounds} shuffled rounds of "
        f"{reps} meta-iterations per setting, one worker process per setting.",
        "",
        "| setting | median ms | IQR ms | slowest ms | × 1 thread + PASSIVE (per round) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['median_ms']:.3f} | {r['q25_ms']:.3f}–{r['q75_ms']:.3f} | "
            f"{r['max_ms']:.1f} | {r['ratio_to_1_thread_passive']:.2f} |"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
