"""The ``"compiled"`` backend: ahead-of-time compiled fused kernels, and ``torch.compile`` of the
vmap path for any other model.

For the built-in MLP the fused kernels of ``mamlkit._fused`` are exported
(``torch.export``) and compiled by AOTInductor into a shared library with a C++ runner, one per
problem (method, its hyper-parameters, lr, steps, shapes, dtype, device, threads). Compiling
takes tens of seconds, so the package is cached on disk — in ``$MAMLKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/mamlkit``, else ``~/.cache/mamlkit`` — under a key that also holds the torch
version and a hash of the kernel source, and loading a cached one takes a fraction of a second.
Delete the folder (or run ``python -m mamlkit cache --clear``) to rebuild. Every other model
goes through ``torch.compile`` of the vmap path, which keeps its own cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _fused

_RUNNERS: dict[str, Callable[..., Any]] = {}
COMPILE_LOG: list[dict[str, Any]] = []
"""One record per compiled problem in this process: key, seconds, and whether it was cold."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("MAMLKIT_CACHE_DIR"):
        return Path(os.environ["MAMLKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mamlkit"


def clear_cache() -> int:
    """Delete every cached compiled kernel; return how many files were removed."""
    removed = 0
    folder = cache_dir()
    if folder.is_dir():
        for path in folder.glob("fused-*.pt2"):
            path.unlink()
            removed += 1
    _RUNNERS.clear()
    return removed


def _source_hash() -> str:
    digest = hashlib.sha256()
    for source in (_fused.__file__, __file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


class _LayerKernel(torch.nn.Module):
    """``(W_0, b_0, …, W_{L−1}, b_{L−1}, xs, ys, xq, yq) → (∇W_0, ∇b_0, …, query losses)``."""

    def __init__(self, method: str, spec: _fused.MLPSpec, lr: float, steps: int,
                 hypers: dict[str, Any]) -> None:
        super().__init__()
        self.method, self.spec, self.lr, self.steps, self.hypers = method, spec, lr, steps, hypers

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        *layers, xs, ys, xq, yq = tensors
        problem = _fused.Problem(xs, ys, xq, yq)
        gw, gb, losses = _fused.run(self.method, self.spec, list(layers[0::2]), list(layers[1::2]),
                                    problem, self.lr, self.steps, self.hypers, loops=True)
        return (*(t for pair in zip(gw, gb) for t in pair), losses)


def fused_runner(
    method: str,
    spec: _fused.MLPSpec,
    lr: float,
    steps: int,
    hypers: dict[str, Any],
    example: tuple[Tensor, ...],
) -> Callable[..., tuple[Tensor, Tensor]]:
    """The compiled ``_LayerKernel`` for this problem, from memory, the disk cache, or compiled
    now. ``example`` is ``(W_0, b_0, …, xs, ys, xq, yq)`` with the shapes, dtype and device to
    compile for.
    """
    theta = example[0]  # W_0: the dtype and device of the parameters
    if theta.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the compiled backend runs on cpu or cuda, got device {theta.device}")
    record = {
        "torch": torch.__version__,
        "source": _source_hash(),
        "method": method,
        "spec": list(spec),
        "lr": lr,
        "steps": steps,
        "hypers": hypers,
        "shapes": [list(t.shape) for t in example],
        "dtype": str(theta.dtype),
        "device": str(theta.device),
        "threads": torch.get_num_threads(),
    }
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]
    if key in _RUNNERS:
        return _RUNNERS[key]
    start = time.perf_counter()
    path = cache_dir() / f"fused-{key}.pt2"
    cold = not path.is_file()
    if cold:
        path.parent.mkdir(parents=True, exist_ok=True)
        module = _LayerKernel(method, spec, lr, steps, hypers)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            exported = torch.export.export(module, tuple(example))
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
            os.close(fd)
            try:
                torch._inductor.aoti_compile_and_package(exported, package_path=tmp)
                os.replace(tmp, path)  # atomic: a half-written package is never loaded
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = torch._inductor.aoti_load_package(str(path))
    _RUNNERS[key] = runner
    COMPILE_LOG.append({"key": key, "method": method, "seconds": time.perf_counter() - start,
                        "cold": cold})
    return runner


_COMPILED_VMAP: dict[tuple[Any, ...], Callable[..., Any]] = {}


def compiled_vmap(key: tuple[Any, ...], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, kept per ``key`` so repeated calls reuse the compiled graph."""
    if key not in _COMPILED_VMAP:
        if len(_COMPILED_VMAP) >= 16:
            _COMPILED_VMAP.pop(next(iter(_COMPILED_VMAP)))
        _COMPILED_VMAP[key] = torch.compile(fn, dynamic=False)
    return _COMPILED_VMAP[key]
