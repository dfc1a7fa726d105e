"""Thread settings for small models on small CPUs."""

from __future__ import annotations

import os

import torch


def set_cpu_threads(num_threads: int | None = None) -> int:
    """Choose torch's intra-op thread count and return it.

    Small meta-learning models (the 1-40-40-1 sinusoid MLP) gain nothing from several threads,
    and on a 2-vCPU machine two OpenMP threads spin-waiting on each other were measured 10-30×
    slower than one. So: ``num_threads`` if given, else ``$MAMLKIT_NUM_THREADS``, else
    ``$OMP_NUM_THREADS`` if set, else 1.
    """
    if num_threads is None:
        env = os.environ.get("MAMLKIT_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        num_threads = int(env) if env else 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    torch.set_num_threads(num_threads)
    return num_threads
