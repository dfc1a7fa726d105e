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

_RUNNERS: dict[str, Any] = {}
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

    def grads(self, layers: tuple[Tensor, ...], data: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor]:
        gw, gb, losses = _fused.run(self.method, self.spec, list(layers[0::2]), list(layers[1::2]),
                                    _fused.Problem(*data), self.lr, self.steps, self.hypers, loops=True)
        return [t for pair in zip(gw, gb) for t in pair], losses

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        grads, losses = self.grads(tensors[:-4], tensors[-4:])
        return (*grads, losses)


class _StepKernel(_LayerKernel):
    """One whole meta-iteration: the gradient, the optional global-norm clip and Adam.

    ``(θ…, m…, v…, [lr/(1 − β₁ᵗ), 1/(1 − β₂ᵗ)], xs, ys, xq, yq) → (θ′…, m′…, v′…, query losses)``,
    the update of ``torch.optim.Adam`` (``mamlkit.train.adam_update``) in the same graph.
    """

    def __init__(self, method: str, spec: _fused.MLPSpec, lr: float, steps: int,
                 hypers: dict[str, Any], betas: tuple[float, float], eps: float,
                 max_grad_norm: float | None) -> None:
        super().__init__(method, spec, lr, steps, hypers)
        self.betas, self.eps, self.max_grad_norm = betas, eps, max_grad_norm

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        n = 2 * len(self.spec.names)
        params, m, v = tensors[:n], tensors[n : 2 * n], tensors[2 * n : 3 * n]
        step_size, inverse_correction = tensors[3 * n][0], tensors[3 * n][1]
        grads, losses = self.grads(params, tensors[3 * n + 1 :])
        if self.max_grad_norm is not None:  # g·min(1, c/(‖g‖ + 10⁻⁶)), as clip_grad_norm_
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            scale = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            grads = [g * scale for g in grads]
        beta1, beta2 = self.betas
        new_m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
        new_v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads)]
        new_p = [p - step_size * mi / (torch.sqrt(vi * inverse_correction) + self.eps)
                 for p, mi, vi in zip(params, new_m, new_v)]
        return (*new_p, *new_m, *new_v, losses)


class _Runner:
    """A loaded package, called with a flat list of tensors (no pytree round trip per call)."""

    def __init__(self, package: Any) -> None:
        self._run = getattr(getattr(package, "loader", None), "boxed_run", None)
        self._package = package

    def __call__(self, *tensors: Tensor) -> list[Tensor]:
        if self._run is not None:
            return self._run(list(tensors))
        return list(self._package(*tensors))


def _load_or_compile(kind: str, module: torch.nn.Module, record: dict[str, Any],
                     example: tuple[Tensor, ...]) -> _Runner:
    device = example[0].device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the compiled backend runs on cpu or cuda, got device {device}")
    record = {**record, "kind": kind, "torch": torch.__version__, "source": _source_hash(),
              "shapes": [list(t.shape) for t in example], "dtype": str(example[0].dtype),
              "device": str(device), "threads": torch.get_num_threads()}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]
    if key in _RUNNERS:
        return _RUNNERS[key]
    start = time.perf_counter()
    path = cache_dir() / f"fused-{key}.pt2"
    cold = not path.is_file()
    if cold:
        path.parent.mkdir(parents=True, exist_ok=True)
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
        runner = _Runner(torch._inductor.aoti_load_package(str(path)))
    _RUNNERS[key] = runner
    COMPILE_LOG.append({"key": key, "kind": kind, "method": record["method"],
                        "seconds": time.perf_counter() - start, "cold": cold})
    return runner


def fused_runner(method: str, spec: _fused.MLPSpec, lr: float, steps: int,
                 hypers: dict[str, Any], example: tuple[Tensor, ...]) -> _Runner:
    """The compiled gradient kernel for this problem, from memory, the disk cache, or compiled
    now; ``example`` is ``(W_0, b_0, …, xs, ys, xq, yq)`` with the shapes, dtype and device to
    compile for. Called with those tensors it returns ``[∇W_0, ∇b_0, …, query losses]``."""
    record = {"method": method, "spec": list(spec), "lr": lr, "steps": steps, "hypers": hypers}
    return _load_or_compile("grad", _LayerKernel(method, spec, lr, steps, hypers), record, example)


def fused_step_runner(method: str, spec: _fused.MLPSpec, lr: float, steps: int,
                      hypers: dict[str, Any], betas: tuple[float, float], eps: float,
                      max_grad_norm: float | None, example: tuple[Tensor, ...]) -> _Runner:
    """The compiled whole meta-iteration (see :class:`_StepKernel`) for this problem."""
    record = {"method": method, "spec": list(spec), "lr": lr, "steps": steps, "hypers": hypers,
              "betas": list(betas), "eps": eps, "max_grad_norm": max_grad_norm}
    module = _StepKernel(method, spec, lr, steps, hypers, betas, eps, max_grad_norm)
    return _load_or_compile("step", module, record, example)


_COMPILED_VMAP: dict[tuple[Any, ...], Callable[..., Any]] = {}


def compiled_vmap(key: tuple[Any, ...], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, kept per ``key`` so repeated calls reuse the compiled graph."""
    if key not in _COMPILED_VMAP:
        if len(_COMPILED_VMAP) >= 16:
            _COMPILED_VMAP.pop(next(iter(_COMPILED_VMAP)))
        _COMPILED_VMAP[key] = torch.compile(fn, dynamic=False)
    return _COMPILED_VMAP[key]
