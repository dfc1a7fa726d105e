"""Parameters as plain ``dict[str, Tensor]`` and their flat (P,) view, plus the few tree helpers
every engine shares.

The flat order is the dict's insertion order, each tensor flattened row-major, exactly as
``torch.cat([p.reshape(-1) for p in params.values()])``. Hessians and Jacobians returned as
(P, P) matrices use this order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Params, Batch], Tensor]
ModelFn = Callable[[Params, Tensor], Tensor]


def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate every tensor of ``params``, flattened row-major, into one (P,) vector.

    >>> flatten_params({"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor(3.0)})
    tensor([1., 2., 3.])
    """
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_params(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten_params`: cut a (P,) vector into tensors shaped like ``like``.

    >>> unflatten_params(torch.arange(3.0), {"w": torch.zeros(1, 2), "b": torch.zeros(())})
    {'w': tensor([[0., 1.]]), 'b': tensor(2.)}
    """
    sizes = [p.numel() for p in like.values()]
    if vector.shape != (sum(sizes),):
        raise ValueError(f"vector must have shape ({sum(sizes)},), got {tuple(vector.shape)}")
    pieces = torch.split(vector, sizes)
    return {k: piece.reshape(p.shape) for (k, p), piece in zip(like.items(), pieces)}


def num_params(params: Mapping[str, Tensor]) -> int:
    """P, the total number of scalar parameters."""
    return sum(p.numel() for p in params.values())


def tree_axpy(scale: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """``y + scale·x`` key by key, in ``y``'s key order (a new dict; inputs unchanged).

    The one home of the pattern every engine uses: an SGD step is
    ``tree_axpy(-lr, grads, params)``.

    >>> tree_axpy(-0.5, {"w": torch.tensor(2.0)}, {"w": torch.tensor(1.0)})
    {'w': tensor(0.)}
    """
    return {k: y[k] + scale * x[k] for k in y}


def tree_detach(params: Mapping[str, Tensor]) -> Params:
    """A new dict of detached views (no autograd history; storage shared, nothing copied)."""
    return {k: p.detach() for k, p in params.items()}


def tree_zeros_like(params: Mapping[str, Tensor]) -> Params:
    """A new dict of zeros shaped like ``params``."""
    return {k: torch.zeros_like(p) for k, p in params.items()}


def tree_vdot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """⟨a, b⟩ summed over every key (a 0-d tensor; vmap-safe)."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]
