"""Eager, specific input checks: fail at the door with the argument's name, not three calls deep.

Every public function validates its inputs here, once, and then calls unchecked cores, so that
every path (the per-task engines, each backend of ``meta_batch_grad``, training, evaluation)
has the same error contract:

- ``params``: a non-empty ``dict[str, Tensor]`` of floating-point tensors, all of one dtype and
  on one device (``TypeError``/``ValueError`` naming the key).
- data ``(x, y)``: tensors on the device of ``params``; ``x`` of any real dtype (token ids for
  an embedding are the model's business), floating ``x`` in the dtype of ``params``; ``y`` either
  floating-point with that dtype (regression targets) or an integer tensor (class labels, for
  losses that take them); complex tensors, and bool targets, are refused.
  NaN or inf *values* are not inspected: NaN in the data gives NaN out (training stops on it).
- one task's batch: at least one point, ``x`` and ``y`` with the same number of rows.
- a meta-batch: ``x`` of shape (tasks, points, features…) — at least three dimensions — and
  ``y`` of shape (tasks, points, …), at least one task and one point, support and query with
  the same number of tasks. A single task is a meta-batch of one: ``x[None]``, ``y[None]``.

Only shapes, dtypes, devices and Python values are inspected, never tensor values, so the
checks also work under ``torch.func.vmap`` and ``torch.func.grad``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ._params import Batch, LossFn, Params

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed accepts 0 … 2⁶⁴ − 1


def check_params(params: object, name: str = "params") -> Params:
    """Return ``params`` as a new dict after checking the contract above."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict[str, Tensor], got {type(params).__name__}")
    if not params:
        raise ValueError(f"{name} must contain at least one tensor, got an empty dict")
    first: Tensor | None = None
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating-point tensor, got {value.dtype}")
        if first is None:
            first = value
        elif value.dtype != first.dtype:
            raise TypeError(
                f"{name} must all have one dtype, got {first.dtype} and {value.dtype} "
                f"({name}[{key!r}])"
            )
        elif value.device != first.device:
            raise ValueError(
                f"{name} must all be on one device, got {first.device} and {value.device} "
                f"({name}[{key!r}])"
            )
    return dict(params)


def reference_tensor(params: Mapping[str, Tensor]) -> Tensor:
    """The tensor whose dtype and device the data must match (any one of checked params)."""
    return next(iter(params.values()))


def check_data(value: object, where: str, role: str, like: Tensor | None) -> Tensor:
    """One data tensor: ``where`` names it in errors (e.g. ``"support x"``); ``role`` is ``"x"``
    (model inputs: any real dtype — token ids and masks are the model's business — with floating
    inputs in the dtype of the parameters) or ``"y"`` (targets: floating, or integer labels)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} must be a Tensor, got {type(value).__name__}")
    if value.is_complex() or (role == "y" and value.dtype == torch.bool):
        raise TypeError(
            f"{where} must be a real floating-point or integer tensor, got {value.dtype}"
        )
    if like is None:
        return value
    if value.is_floating_point() and value.dtype != like.dtype:
        raise TypeError(f"{where} must have the dtype of params ({like.dtype}), got {value.dtype}")
    if value.device != like.device:
        raise ValueError(
            f"{where} must be on the device of params ({like.device}), got {value.device}"
        )
    return value


def check_pair(batch: object, name: str, like: Tensor | None = None) -> Batch:
    """``batch`` is a pair ``(x, y)`` of data tensors (nothing about shapes)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of tensors, got {type(batch).__name__}")
    x, y = batch
    return check_data(x, f"{name} x", "x", like), check_data(y, f"{name} y", "y", like)


def check_batch(batch: object, name: str, like: Tensor | None = None) -> Batch:
    """One task's ``(x, y)``: the same number of rows (dim 0), at least one.

    A y with a different number of rows, e.g. shape (1,) against x of shape (N, 1), would
    broadcast silently inside a loss; it is refused here, as is an empty set of points.
    """
    x, y = check_pair(batch, name, like)
    for part, value in (("x", x), ("y", y)):
        if value.ndim == 0:
            raise ValueError(f"{name} {part} must have a leading batch dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} x and y must have the same number of rows, got x {tuple(x.shape)} "
            f"and y {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one point, got x {tuple(x.shape)}")
    return x, y


def check_meta_batch(
    support: object, query: object, like: Tensor | None = None
) -> tuple[Batch, Batch]:
    """A meta-batch: x (tasks, points, features…), y (tasks, points, …); see the module doc."""
    batches = []
    for name, batch in (("support", support), ("query", query)):
        x, y = check_pair(batch, name, like)
        if x.ndim < 3:
            raise ValueError(
                f"{name} x must have shape (tasks, points, features...), at least 3 dimensions, "
                f"got {tuple(x.shape)}; for a single task pass x[None] and y[None]"
            )
        if y.ndim < 2:
            raise ValueError(f"{name} y must have shape (tasks, points, ...), got {tuple(y.shape)}")
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(
                f"{name} x and y must agree in (tasks, points), got x {tuple(x.shape)} "
                f"and y {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one task, got x {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(
                f"{name} must hold at least one point per task, got x {tuple(x.shape)}"
            )
        batches.append((x, y))
    if batches[0][0].shape[0] != batches[1][0].shape[0]:
        raise ValueError(
            f"support and query must hold the same number of tasks, got {batches[0][0].shape[0]} "
            f"and {batches[1][0].shape[0]}"
        )
    return batches[0], batches[1]


def check_finite(value: object, name: str) -> float:
    """A finite real number (bool and tensors are refused)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_int(value: object, name: str, minimum: int = 0) -> int:
    """An int >= ``minimum`` (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0."""
    value = check_finite(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_nonnegative(value: object, name: str) -> float:
    """A finite real number >= 0."""
    value = check_finite(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """An int >= 1."""
    return check_int(value, name, minimum=1)


def check_seed(seed: object, name: str = "seed") -> int:
    """An int in torch's seed range 0 … 2⁶⁴ − 1."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be in 0 … 2**64 - 1 (torch's seed range), got {seed}")
    return seed


def derived_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into torch's seed range (for the seeds a recipe derives)."""
    return (seed + offset) % (SEED_MAX + 1)


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_names(value: object, name: str) -> tuple[str, ...] | None:
    """``None`` or a non-empty list/tuple of names (str), as a tuple."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be None or a non-empty list of names, got {value!r}")
    if not all(isinstance(k, str) for k in value):
        raise TypeError(f"{name} must list names (str), got {value!r}")
    return tuple(value)


def check_numbers(value: object, name: str) -> tuple[float, ...] | None:
    """``None`` or a non-empty list/tuple of finite numbers, as a tuple of floats."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be None or a non-empty list of numbers, got {value!r}")
    return tuple(check_finite(v, name) for v in value)


def check_like(tree: object, params: Params, name: str) -> Params:
    """``tree`` has exactly the keys (same order), shapes, dtype and device of ``params``."""
    tree = check_params(tree, name)
    if list(tree) != list(params):
        raise ValueError(f"{name} must have the keys of params {list(params)}, got {list(tree)}")
    like = reference_tensor(params)
    for key, value in tree.items():
        if value.shape != params[key].shape:
            raise ValueError(
                f"{name}[{key!r}] must have shape {tuple(params[key].shape)}, "
                f"got {tuple(value.shape)}"
            )
    check_data(next(iter(tree.values())), name, "x", like)
    return tree


_DROPOUTS = {
    F.dropout: 1,  # the position of p; training follows it
    F.dropout1d: 1,
    F.dropout2d: 1,
    F.dropout3d: 1,
    F.alpha_dropout: 1,
    F.feature_alpha_dropout: 1,
}
_RANDOM = {
    torch.bernoulli,
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.multinomial,
    torch.normal,
    torch.poisson,
    Tensor.bernoulli_,
    Tensor.uniform_,
    Tensor.normal_,
    Tensor.random_,
    Tensor.exponential_,
    Tensor.geometric_,
    Tensor.log_normal_,
    Tensor.cauchy_,
    F.rrelu,
}


def _is_random(func: object, args: tuple[object, ...], kwargs: dict[str, object]) -> bool:
    if func in _DROPOUTS:
        at = _DROPOUTS[func]  # type: ignore[index]
        p = kwargs.get("p", args[at] if len(args) > at else 0.5)
        training = kwargs.get("training", args[at + 1] if len(args) > at + 1 else True)
        return bool(training) and float(p) > 0  # type: ignore[arg-type]
    if func is F.rrelu:
        return bool(kwargs.get("training", args[3] if len(args) > 3 else False))
    return func in _RANDOM


class _ExactPasses(TorchFunctionMode):
    """Within a loss evaluation: refuse every draw of random numbers (a meta-gradient must see
    the same function in its inner and outer passes, and vmap over tasks cannot share one
    random stream), and run attention with the math kernel, the one whose second derivative
    torch implements on every device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if _is_random(func, args, kwargs):
            name = getattr(func, "__name__", str(func))
            raise ValueError(
                f"loss_fn draws random numbers ({name}: dropout or another random operation); "
                "a meta-gradient needs the same function in its inner and outer passes: put the "
                "module in eval mode, set dropout's p=0, or remove it"
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_passes(guard: bool = True) -> Iterator[None]:
    """The context every loss evaluation runs in: attention with the math kernel, and (with
    ``guard``) every random draw refused (see :class:`_ExactPasses`). The meta-batch backends,
    whose speed matters, check a problem once, when its plan is made (one loss evaluation
    under the guard), and run without it."""
    with sdpa_kernel([SDPBackend.MATH]):
        if guard:
            with _ExactPasses():
                yield
        else:
            yield


def checked_loss(loss_fn: object, *, guard: bool = True) -> LossFn:
    """Wrap ``loss_fn``: it runs in :func:`exact_passes`, and a return value that is not a
    floating-point scalar tensor is a clear error naming the loss."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}")

    def loss(params: Params, batch: Batch) -> Tensor:
        with exact_passes(guard):
            value = loss_fn(params, batch)
        if not isinstance(value, Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"loss_fn must return a floating-point tensor, got {value.dtype}")
        if value.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar (0-d) tensor, got {tuple(value.shape)}")
        return value

    return loss


def target_check(loss_fn: object, params: Params, x: Tensor) -> Any:
    """The loss's check of its targets for a model and inputs like ``x`` (one task's), if it has
    one (``loss_fn.target_check``: class labels against the model's number of classes), as a
    function ``check(y, name)``; else ``None``."""
    make = getattr(loss_fn, "target_check", None)
    if not callable(make):
        return None
    with exact_passes():
        return make(params, x)


def check_targets(loss_fn: object, params: Params, x: Tensor, y: Tensor, name: str) -> None:
    """:func:`target_check` applied once, on concrete tensors at an engine's door; ``y`` may hold
    any number of tasks' targets."""
    check = target_check(loss_fn, params, x)
    if check is not None:
        check(y, name)


def check_task(loss_fn: object, params: Params, batch: object, name: str) -> Batch:
    """One task's ``(x, y)`` (:func:`check_batch`) and the loss's check of its targets."""
    x, y = check_batch(batch, name, reference_tensor(params))
    check_targets(loss_fn, params, x, y, f"{name} y")
    return x, y


def check_meta_task(
    loss_fn: object, params: Params, support: object, query: object
) -> tuple[Batch, Batch]:
    """A meta-batch (:func:`check_meta_batch`) and the loss's check of its targets."""
    support, query = check_meta_batch(support, query, reference_tensor(params))
    for name, (x, y) in (("support", support), ("query", query)):
        check_targets(loss_fn, params, x[0], y, f"{name} y")
    return support, query


def check_callable(value: object, name: str, signature: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable as {signature}, got {type(value).__name__}")
