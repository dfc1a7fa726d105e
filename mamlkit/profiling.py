"""Measuring what a meta-gradient costs: peak tensor memory of a block of code.

The notebooks compare engines (unrolled autodiff, the HVP reverse pass, first-order methods) by
the bytes of tensor storage they keep alive at once. :class:`PeakMemory` counts them below
``torch.func`` (saved-for-backward tensors, stored iterates and temporaries all count), on any
device, without a profiler.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once while the ``with`` block runs.

    Every storage an operation creates inside the block is counted once when it appears (views
    share their base's storage and add nothing) and subtracted by a finalizer when it is freed.
    Tensors created before the block are not counted. Exact and deterministic: the same code gives
    the same count on every run, unlike timings.

    Attributes:
        peak: the largest number of live bytes seen.
        live: the bytes still alive (0 once everything created inside has been freed).

    Example:
        >>> with PeakMemory() as meter:
        ...     a = torch.zeros(1000)          # 4 000 bytes
        ...     b = a + 1                      # 8 000 alive
        ...     del a                          # 4 000 alive
        >>> meter.peak
        8000
    """

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen: dict[int, int] = {}  # id(storage) → bytes

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self._seen:
                self._seen[id(s)] = s.nbytes()
                weakref.finalize(s, self._free, id(s))
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
        return out
