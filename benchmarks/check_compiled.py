"""Every method on both compiled paths, against the per-task engines in float64.

``make test-compiled`` runs this (a cold compile of each kernel takes tens of seconds, so
``make test`` holds only MAML to the same check). Exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import per_task_reference, random_mlp_problem

import mamlkit as mk
from mamlkit.tasks import quadratic_loss, sample_quadratic_tasks

HYPERS = {"imaml": {"lam": 2.0, "cg_steps": 4}}


def _error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-30)) for k in b)


def main() -> int:
    torch.set_num_threads(1)
    mse = mk.make_mse_loss(mk.mlp)
    params, support, query = random_mlp_problem((1, 4, 3, 1), seed=1)
    tq = sample_quadratic_tasks(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    qparams = {"x": torch.tensor([0.7, -0.2], dtype=torch.float64)}
    worst = 0.0
    for method in mk.METHODS:
        steps = max(2, mk.METHODS[method].min_steps)
        cases = [("fused kernels", mse, params, support, query, 0.05)]
        if method != "pretrained":  # the quadratic family has no points to pool
            cases.append(("torch.compile of vmap", quadratic_loss, qparams, tq.support, tq.query, 0.2))
        for label, loss, p, s, q, lr in cases:
            start = time.perf_counter()
            got, _ = mk.meta_batch_grad(method, loss, p, s, q, lr=lr, steps=steps, backend="compiled",
                                        **HYPERS.get(method, {}))
            ref, _ = per_task_reference(method, loss, p, s, q, lr=lr, steps=steps, **HYPERS.get(method, {}))
            error = _error(got, ref)
            worst = max(worst, error)
            print(f"{method:10s} {label:22s} relative error {error:.1e}  ({time.perf_counter() - start:.1f} s)")
    print(f"worst relative error {worst:.1e}: {'PASS' if worst < 1e-9 else 'FAIL'}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
