"""Compilation for the two compiled backends, and the cache they share with the glyph images.

``fused-compiled``: the fused kernels of ``mamlkit._fused`` are exported (``torch.export``) and
compiled by AOTInductor into a shared library with a C++ runner, one per problem (method, its
hyper-parameters, lr, steps, shapes, dtype, device, threads). A cold compile takes tens of
seconds, so the package is kept in the cache folder (``mamlkit._files.cache_dir``) under a key
that also holds the torch version and a hash of the kernel source; loading it takes a fraction
of a second. A damaged package is reported in one line, deleted and compiled again.

``vmap-compiled``: ``torch.compile`` of the vmap runner. Dynamo traces in every process, but the
compiled code is reused across processes: after the first compile of a problem mamlkit saves
torch's cache artifacts (``torch.compiler.save_cache_artifacts``) in the cache folder and loads
them before compiling the same problem in a later process.

Both say so in one line on stderr before a compile that waits. ``python -m mamlkit cache`` lists
what the cache folder holds; ``--clear`` deletes it (:func:`cache_entries`, :func:`clear_cache`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _files, _fused, _methods

KINDS = {
    "fused-": "compiled fused kernels",
    "compile-": "torch.compile artifacts",
    "glyphs-": "rendered glyph images",
}
"""The cache folder's files by name prefix, and what each is."""

_RUNNERS: dict[str, Callable[[list[Tensor]], list[Tensor]]] = {}
COMPILE_LOG: list[dict[str, Any]] = []
"""One record per compiled or loaded problem in this process: key, seconds, and whether cold."""


def announce(message: str) -> None:
    """One line on stderr before a wait the caller did not ask to watch."""
    print(f"mamlkit: {message}", file=sys.stderr, flush=True)


def cache_entries() -> dict[str, list[Path]]:
    """The files of the cache folder, by kind (see :data:`KINDS`)."""
    folder = _files.cache_dir()
    found: dict[str, list[Path]] = {kind: [] for kind in KINDS.values()}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            for prefix, kind in KINDS.items():
                if path.name.startswith(prefix) and path.is_file():
                    found[kind].append(path)
    return found


def clear_cache() -> int:
    """Delete every file :func:`cache_entries` lists; return how many were removed."""
    removed = 0
    for paths in cache_entries().values():
        for path in paths:
            path.unlink(missing_ok=True)
            removed += 1
    _RUNNERS.clear()
    return removed


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """A hash of the kernel source (read once per process)."""
    digest = hashlib.sha256()
    for source in (_fused.__file__, _methods.__file__, __file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _key(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------ fused-compiled


class _LayerKernel(torch.nn.Module):
    """``(W_0, b_0, …, W_{L−1}, b_{L−1}, xs, ys, xq, yq) → (∇W_0, ∇b_0, …, query losses)``."""

    def __init__(
        self, method: str, spec: _fused.MLPSpec, lr: float, steps: int, hypers: dict[str, Any]
    ) -> None:
        super().__init__()
        self.method, self.spec, self.lr, self.steps, self.hypers = method, spec, lr, steps, hypers

    def grads(
        self, layers: tuple[Tensor, ...], data: tuple[Tensor, ...]
    ) -> tuple[list[Tensor], Tensor]:
        return _fused.run(
            self.method,
            self.spec,
            list(layers),
            _fused.Problem(*data),
            self.lr,
            self.steps,
            self.hypers,
            compiled=True,
        )

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        grads, losses = self.grads(tensors[:-4], tensors[-4:])
        return (*grads, losses)


class _StepKernel(_LayerKernel):
    """One whole meta-iteration: the gradient, the optional global-norm clip and Adam.

    ``(θ…, m…, v…, [lr/(1 − β₁ᵗ), 1/(1 − β₂ᵗ)], xs, ys, xq, yq) → (θ′…, m′…, v′…, query losses)``,
    the update of ``torch.optim.Adam`` (``mamlkit.train.adam_update``) in the same graph.
    """

    def __init__(
        self,
        method: str,
        spec: _fused.MLPSpec,
        lr: float,
        steps: int,
        hypers: dict[str, Any],
        betas: tuple[float, float],
        eps: float,
        max_grad_norm: float | None,
    ) -> None:
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
        new_p = [
            p - step_size * mi / (torch.sqrt(vi * inverse_correction) + self.eps)
            for p, mi, vi in zip(params, new_m, new_v)
        ]
        return (*new_p, *new_m, *new_v, losses)


def _boxed(package: Any) -> Callable[[list[Tensor]], list[Tensor]]:
    """A loaded package as ``run(list of tensors) → list of tensors`` (no pytree round trip)."""
    run = getattr(getattr(package, "loader", None), "boxed_run", None)
    if run is not None:
        return run  # type: ignore[no-any-return]
    return lambda tensors: list(package(*tensors))


def _load(path: Path) -> Callable[[list[Tensor]], list[Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _boxed(torch._inductor.aoti_load_package(str(path)))


def _compile_package(module: torch.nn.Module, example: list[Tensor], path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, tuple(example))

        def produce(tmp: str) -> None:
            torch._inductor.aoti_compile_and_package(exported, package_path=tmp)

        _files.atomic_produce(path, produce)  # a half-written package is never loaded


def _load_or_compile(
    kind: str, module: torch.nn.Module, record: dict[str, Any], example: list[Tensor]
) -> Callable[[list[Tensor]], list[Tensor]]:
    device = example[0].device
    record = {
        **record,
        "kind": kind,
        "torch": torch.__version__,
        "source": _source_hash(),
        "shapes": [list(t.shape) for t in example],
        "dtype": str(example[0].dtype),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    key = _key(record)
    if key in _RUNNERS:
        return _RUNNERS[key]
    start = time.perf_counter()
    path = _files.cache_dir() / f"fused-{key}.pt2"
    cold = not path.is_file()
    runner = None
    if not cold:
        try:
            runner = _load(path)
        except Exception as error:  # a damaged package: say so, delete it, compile again
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
            announce(f"the cached kernel {path} is damaged ({reason}); compiling it again")
            path.unlink(missing_ok=True)
            cold = True
    if runner is None:
        announce(
            f"compiling the fused {record['method']} {kind} kernel ahead of time (about "
            f"30 s, once; cached in {path.parent})"
        )
        _compile_package(module, example, path)
        runner = _load(path)
    _RUNNERS[key] = runner
    COMPILE_LOG.append(
        {
            "key": key,
            "kind": kind,
            "method": record["method"],
            "seconds": time.perf_counter() - start,
            "cold": cold,
        }
    )
    return runner


def fused_runner(
    method: str,
    spec: _fused.MLPSpec,
    lr: float,
    steps: int,
    hypers: dict[str, Any],
    example: list[Tensor],
) -> Callable[[list[Tensor]], list[Tensor]]:
    """The compiled gradient kernel for this problem, from memory, the disk cache, or compiled
    now; ``example`` is ``[W_0, b_0, …, xs, ys, xq, yq]`` with the shapes, dtype and device to
    compile for. Called with such a list it returns ``[∇W_0, ∇b_0, …, query losses]``."""
    record = {"method": method, "spec": list(spec), "lr": lr, "steps": steps, "hypers": hypers}
    return _load_or_compile(
        "grad", _LayerKernel(method, spec, lr, steps, dict(hypers)), record, example
    )


def fused_step_runner(
    method: str,
    spec: _fused.MLPSpec,
    lr: float,
    steps: int,
    hypers: dict[str, Any],
    betas: tuple[float, float],
    eps: float,
    max_grad_norm: float | None,
    example: list[Tensor],
) -> Callable[[list[Tensor]], list[Tensor]]:
    """The compiled whole meta-iteration (see :class:`_StepKernel`) for this problem."""
    record = {
        "method": method,
        "spec": list(spec),
        "lr": lr,
        "steps": steps,
        "hypers": hypers,
        "betas": list(betas),
        "eps": eps,
        "max_grad_norm": max_grad_norm,
    }
    module = _StepKernel(method, spec, lr, steps, dict(hypers), betas, eps, max_grad_norm)
    return _load_or_compile("step", module, record, example)


# ------------------------------------------------------------------------------- vmap-compiled


def describe_loss(loss_fn: object, short: bool = False) -> str:
    """A description of a loss: for cache keys, its module's whole structure when it wraps one
    (else its qualified name); ``short``, one line for messages."""
    model = getattr(loss_fn, "model_fn", None)
    module = getattr(model, "module", None)
    if isinstance(module, torch.nn.Module):
        if short:
            count = sum(p.numel() for p in module.parameters())
            return f"{type(loss_fn).__name__} of a {type(module).__name__} ({count:,} parameters)"
        return f"{type(loss_fn).__name__}({module})"
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__
    if short:
        return name
    return f"{getattr(loss_fn, '__module__', '')}.{name}({getattr(model, '__qualname__', '')})"


def compile_runner(run: Callable[..., Any], problem: Any) -> Callable[..., Any]:
    """``torch.compile(run)`` that announces its first compile and keeps torch's cache artifacts
    for this problem in the cache folder (loaded before compiling in a later process)."""
    compiled = torch.compile(run, dynamic=False)
    record = {
        "loss": describe_loss(problem.loss_fn),
        "method": problem.method.name,
        "hypers": dict(problem.hypers),
        "lr": problem.lr,
        "steps": problem.steps,
        "params": {k: list(v.shape) for k, v in problem.params.items()},
        "data": [list(t.shape) for t in (*problem.support, *problem.query)],
        "dtype": str(next(iter(problem.params.values())).dtype),
        "device": str(problem.device),
        "torch": torch.__version__,
    }
    path = _files.cache_dir() / f"compile-{_key(record)}.bin"
    state = {"first": True}

    def first_call(*args: Any) -> Any:
        start = time.perf_counter()
        warm = path.is_file()
        if warm:
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
            except Exception:  # unreadable artifacts only cost a full compile
                path.unlink(missing_ok=True)
                warm = False
        wait = "seconds: cached artifacts found" if warm else "tens of seconds to minutes, once"
        announce(
            f"compiling the {problem.method.name} meta-gradient of "
            f"{describe_loss(problem.loss_fn, short=True)} with torch.compile ({wait})"
        )
        out = compiled(*args)
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None and not warm:
            _files.atomic_write(path, lambda f: f.write(saved[0]))
        COMPILE_LOG.append(
            {
                "key": path.stem,
                "kind": "torch.compile",
                "method": problem.method.name,
                "seconds": time.perf_counter() - start,
                "cold": not warm,
            }
        )
        state["first"] = False
        return out

    def call(*args: Any) -> Any:
        if state["first"]:
            return first_call(*args)
        return compiled(*args)

    return call


__all__ = [
    "COMPILE_LOG",
    "KINDS",
    "announce",
    "cache_entries",
    "clear_cache",
    "compile_runner",
    "describe_loss",
    "fused_runner",
    "fused_step_runner",
]
