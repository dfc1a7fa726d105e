"""Thread settings for small models on small CPUs."""

from __future__ import annotations

import os

import torch

from ._checks import check_positive_int


def threads_from_environment() -> int | None:
    """The thread count ``$MAMLKIT_NUM_THREADS`` or ``$OMP_NUM_THREADS`` asks for, or None.

    ``OMP_NUM_THREADS`` is read as OpenMP reads it: a comma-separated list whose first entry is
    the count for the outermost level (``"4,2"`` → 4). Anything else is a ``ValueError`` naming
    the variable.
    """
    for name in ("MAMLKIT_NUM_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        first = raw.split(",")[0].strip() if name == "OMP_NUM_THREADS" else raw
        if not first.isdigit() or int(first) < 1:
            raise ValueError(
                f"{name} must be a positive integer"
                f"{' (or a list of them)' if name == 'OMP_NUM_THREADS' else ''}, got {raw!r}"
            )
        return int(first)
    return None


def set_cpu_threads(num_threads: int | None = None) -> int:
    """Choose torch's intra-op thread count and return it.

    Small meta-learning models (the 1-40-40-1 sinusoid MLP) gain nothing from several threads,
    and on a 2-vCPU machine two OpenMP threads spin-waiting on each other were measured 10-30×
    slower than one. So: ``num_threads`` if given, else ``$MAMLKIT_NUM_THREADS``, else
    ``$OMP_NUM_THREADS`` (its first entry) if set, else 1.
    """
    if num_threads is None:
        num_threads = threads_from_environment() or 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    num_threads = check_positive_int(num_threads, "num_threads")
    torch.set_num_threads(num_threads)
    return num_threads
