"""Inject realistic bugs into a copy of the package, one at a time, and report who catches each.

For every bug in :data:`BUGS` the repository's tracked files are copied to a temporary folder,
the one-line change is made there, and three receivers run against the copy (``PYTHONPATH``
first, so the copy's ``mamlkit`` is imported): ``python -m mamlkit verify``, the unit tests
(``pytest -x tests``) and the notebooks (``pytest --nbval-lax notebooks``, quick mode). A bug is
caught by a receiver that fails. The table goes to ``benchmarks/results/mutations.md`` (and
``.json``); the script exits non-zero when ``verify`` or every notebook misses a bug.

Slow (a few minutes per bug on two cores), so not part of ``make test``:

    python benchmarks/mutation_test.py            # every bug
    python benchmarks/mutation_test.py --only 3   # re-check bug 3, keep the other rows
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Bug:
    """One realistic mistake: in ``path``, ``old`` (exactly once) becomes ``new``."""

    name: str
    path: str
    old: str
    new: str


BUGS = [
    Bug("fused tanh: σ′ = 1 + h²", "mamlkit/_fused.py",
        "dacts.append(1.0 - h * h)", "dacts.append(1.0 + h * h)"),
    Bug("fused R-op: the tanh σ″ term's sign", "mamlkit/_fused.py",
        "rdelta = rdelta - 2.0 * deltas", "rdelta = rdelta + 2.0 * deltas"),
    Bug("meta-batch: the sum over tasks, not the mean", "mamlkit/_backends.py",
        "g.detach().mean(0)", "g.detach().sum(0)"),
    Bug("method table: FOMAML's rule differentiates at θ, not θ_k", "mamlkit/_methods.py",
        "return grad_and_value(loss)(theta_k, query)", "return grad_and_value(loss)(theta, query)"),
    Bug("cross-entropy Hessian: residual p − y as y − p", "mamlkit/_curvature.py",
        "(p - torch.nn.functional.one_hot(y, classes).to(p.dtype))",
        "(torch.nn.functional.one_hot(y, classes).to(p.dtype) - p)"),
    Bug("BatchNorm: batch and running statistics swapped", "mamlkit/_module.py",
        'if self.stats == "batch":', 'if self.stats != "batch":'),
    Bug("iMAML: right-hand side from the support set", "mamlkit/_estimators.py",
        "rhs = tree_detach(grad(loss)(phi, query))", "rhs = tree_detach(grad(loss)(phi, support))"),
    Bug("Reptile: the direction's sign", "mamlkit/_estimators.py",
        "total = tree_axpy(1.0, g, total)", "total = tree_axpy(-1.0, g, total)"),
    Bug("MSE 'mean' over N points, not N·O entries", "mamlkit/_models.py",
        "return squared.mean()", "return squared.sum() / squared.shape[0]"),
    Bug("reverse sweep: g + αH g", "mamlkit/_methods.py",
        "return tree_axpy(-lr, pullback(g)[0], g)", "return tree_axpy(lr, pullback(g)[0], g)"),
    Bug("first-order inner steps keep their graph (adapt's Jacobian ≠ I)", "mamlkit/_metagrad.py",
        "    if first_order:\n        g = tree_detach(g)",
        "    if False:\n        g = tree_detach(g)"),
    Bug("Meta-SGD: the rates detached (no gradient reaches them)", "mamlkit/_metagrad.py",
        "return {k: v - lr[k] * g[k] if k in g else v",
        "return {k: v - lr[k].detach() * g[k] if k in g else v"),
    Bug("ANIL: the body adapts instead of the head", "mamlkit/_methods.py",
        'keys = top if part == "head" else', 'keys = top if part == "body" else'),
    Bug("multi-step loss: the weights in reverse order", "mamlkit/_metagrad.py",
        "zip(step_weights, path)", "zip(reversed(step_weights), path)"),
    Bug("ES-MAML: the ½ of the antithetic difference dropped", "mamlkit/_estimators.py",
        "(2 * sigma * num_samples)", "(sigma * num_samples)"),
    Bug("per-step copies: step j runs with the next step's copy", "mamlkit/_metagrad.py",
        "{**theta, **copies[j]},", "{**theta, **copies[min(j + 1, steps - 1)]},"),
]  # fmt: skip


def _copy(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, files.split("\0")):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)


def _inject(copy: Path, bug: Bug) -> None:
    path = copy / bug.path
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"bug {bug.name!r}: {bug.old!r} occurs {text.count(bug.old)} times")
    path.write_text(text.replace(bug.old, bug.new))


def _run(command: list[str], copy: Path, timeout: int) -> tuple[bool, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "OMP_NUM_THREADS": "1",
        "MAMLKIT_QUICK": "1",
        "MAMLKIT_HEADLESS": "1",
        "MAMLKIT_CACHE_DIR": str(copy / ".cache"),
    }
    try:
        done = subprocess.run(
            command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return True, "timed out"
    return done.returncode != 0, done.stdout[-3000:] + done.stderr[-2000:]


def _failing_notebooks(log: str) -> list[str]:
    return sorted(set(re.findall(r"FAILED notebooks/(\d\d)_", log)))


def check(bug: Bug) -> dict:
    """Who catches ``bug``: verify, the unit tests, which notebooks."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder)
        _copy(copy)
        _inject(copy, bug)
        python = sys.executable
        verify, _ = _run([python, "-m", "mamlkit", "verify"], copy, 300)
        units, _ = _run(
            [python, "-m", "pytest", "-x", "-q", "-n", "2", "-o", "addopts=", "-m", "not slow",
             "tests"], copy, 900,
        )  # fmt: skip
        _, log = _run(
            [python, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "-o", "addopts=",
             "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "notebooks"],
            copy, 900,
        )  # fmt: skip
    return {"bug": bug.name, "verify": verify, "unit tests": units,
            "notebooks": _failing_notebooks(log)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", type=int, nargs="+", help="bug numbers (1-based)")
    args = parser.parse_args(argv)
    stored = OUT / "mutations.json"
    # --only re-checks those bugs and keeps the stored rows of the others
    kept = (
        {r["bug"]: r for r in json.loads(stored.read_text())}
        if args.only and stored.exists()
        else {}
    )
    rows = []
    for i, bug in enumerate(BUGS, 1):
        if args.only and i not in args.only:
            if bug.name in kept:
                rows.append(kept[bug.name])
            continue
        start = time.perf_counter()
        rows.append(check(bug))
        print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    lines = [
        "# Injected bugs and who catches them",
        "",
        "`python benchmarks/mutation_test.py`: each bug alone in a copy of the repository; "
        "verify = `python -m mamlkit verify`, unit tests = `pytest -x tests`, notebooks = the "
        "notebooks (quick mode) whose asserts fail.",
        "",
        "| # | bug | verify | unit tests | notebooks |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        lines.append(
            f"| {i} | {row['bug']} | {'caught' if row['verify'] else '**missed**'} | "
            f"{'caught' if row['unit tests'] else '**missed**'} | "
            f"{', '.join(row['notebooks']) or '**none**'} |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "mutations.md").write_text("\n".join(lines) + "\n")
    (OUT / "mutations.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0 if all(r["verify"] and r["notebooks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
