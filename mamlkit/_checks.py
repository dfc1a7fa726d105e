"""Eager, specific input checks: fail at the door with the argument's name, not three calls deep.

Only shapes, types and Python numbers are inspected, never tensor values, so every check also
works under ``torch.func.vmap`` and ``torch.func.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

from torch import Tensor

from ._params import Batch, LossFn, Params


def check_params(params: object, name: str = "params") -> Params:
    """Return ``params`` as a new dict after checking it is a non-empty ``dict[str, Tensor]``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict[str, Tensor], got {type(params).__name__}")
    if not params:
        raise ValueError(f"{name} must contain at least one tensor, got an empty dict")
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating-point tensor, got {value.dtype}")
    return dict(params)


def check_pair(batch: object, name: str) -> Batch:
    """Check that ``batch`` is a pair ``(x, y)`` of tensors (nothing about shapes)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of tensors, got {type(batch).__name__}")
    x, y = batch
    for part, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} {part} must be a Tensor, got {type(value).__name__}")
    return x, y


def check_batch(batch: object, name: str) -> Batch:
    """Check ``batch = (x, y)``: two tensors with the same number of rows (dim 0).

    A y with a different number of rows, e.g. shape (1,) against x of shape (N, 1), would
    broadcast silently inside a loss; it is refused here.
    """
    x, y = check_pair(batch, name)
    for part, value in (("x", x), ("y", y)):
        if value.ndim == 0:
            raise ValueError(f"{name} {part} must have a leading batch dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} x and y must have the same number of rows, got x {tuple(x.shape)} "
            f"and y {tuple(y.shape)}"
        )
    return x, y


def check_task_batches(support: object, query: object) -> tuple[Batch, Batch]:
    """Check a meta-batch: ``support`` and ``query`` are pairs ``(x, y)`` whose tensors have a
    leading task dimension and a points dimension, ``x.shape[:2] == y.shape[:2]``, and the two
    hold the same number of tasks."""
    batches = []
    for name, batch in (("support", support), ("query", query)):
        x, y = check_pair(batch, name)
        for part, value in (("x", x), ("y", y)):
            if value.ndim < 2:
                raise ValueError(
                    f"{name} {part} must have shape (tasks, points, ...), got {tuple(value.shape)}"
                )
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(
                f"{name} x and y must agree in (tasks, points), got x {tuple(x.shape)} "
                f"and y {tuple(y.shape)}"
            )
        batches.append((x, y))
    check_same_tasks(*batches)
    return batches[0], batches[1]


def check_same_tasks(support: Batch, query: Batch) -> None:
    """``support`` and ``query`` hold the same number of tasks (dim 0)."""
    if support[0].shape[0] != query[0].shape[0]:
        raise ValueError(
            f"support and query must hold the same number of tasks, got {support[0].shape[0]} "
            f"and {query[0].shape[0]}"
        )


def check_lr(lr: object, name: str = "lr") -> float:
    """A finite real number (bool and tensors are refused)."""
    if isinstance(lr, bool) or not isinstance(lr, Real):
        raise TypeError(f"{name} must be a real number, got {type(lr).__name__}")
    if not math.isfinite(float(lr)):
        raise ValueError(f"{name} must be finite, got {lr}")
    return float(lr)


def check_steps(steps: object, name: str = "steps") -> int:
    """A non-negative int (bool is refused)."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return steps


def check_like(tree: object, params: Params, name: str) -> Params:
    """Check that ``tree`` has exactly the keys (same order) and shapes of ``params``."""
    tree = check_params(tree, name)
    if list(tree) != list(params):
        raise ValueError(f"{name} must have the keys of params {list(params)}, got {list(tree)}")
    for key, value in tree.items():
        if value.shape != params[key].shape:
            raise ValueError(
                f"{name}[{key!r}] must have shape {tuple(params[key].shape)}, "
                f"got {tuple(value.shape)}"
            )
    return tree


def checked_loss(loss_fn: object) -> LossFn:
    """Wrap ``loss_fn`` so that a non-scalar return value raises a clear ValueError."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}")

    def loss(params: Params, batch: Batch) -> Tensor:
        value = loss_fn(params, batch)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss_fn must return a scalar (0-d) tensor, got {shape}")
        return value

    return loss


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0."""
    value = check_lr(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """An int >= 1."""
    value = check_steps(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


__all__ = [
    "check_batch",
    "check_like",
    "check_lr",
    "check_pair",
    "check_params",
    "check_positive",
    "check_positive_int",
    "check_same_tasks",
    "check_steps",
    "check_task_batches",
    "checked_loss",
]
