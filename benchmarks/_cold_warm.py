"""The first call of a compiled program, cold and warm, for the benchmarks that time it."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile


def cold_and_warm(command: list[str]) -> dict[str, float]:
    """Run ``command`` (a probe that prints ``{"seconds": …}`` as its last line) in a new process
    with empty compile caches (cold), then in another that finds the caches the first one left
    (warm): torch.compile's (``TORCHINDUCTOR_CACHE_DIR``) and mamlkit's (``MAMLKIT_CACHE_DIR``)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {
            **os.environ,
            "MAMLKIT_CACHE_DIR": cache + "/mamlkit",
            "TORCHINDUCTOR_CACHE_DIR": cache + "/inductor",
            "OMP_NUM_THREADS": "1",
        }
        out = {}
        for label in ("cold", "warm"):
            run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if run.returncode != 0:
                raise RuntimeError(f"{command[-1]}: {run.stderr.strip().splitlines()[-1]}")
            out[label] = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]
        return out
