"""Functional models and losses: ``model_fn(params, x)`` and ``loss_fn(params, batch)``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_seed
from ._params import Batch, ModelFn, Params

Activation = Literal["relu", "tanh"]
Reduction = Literal["mean", "sum", "half_sum"]
_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}
_REDUCTIONS = ("mean", "sum", "half_sum")


def init_mlp(
    sizes: Sequence[int],
    *,
    seed: int = 0,
    scheme: Literal["torch", "paper"] = "torch",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Params:
    """Seeded parameters ``{"w0", "b0", "w1", "b1", …}`` of an MLP with layer widths ``sizes``.

    ``w_l`` has shape (sizes[l+1], sizes[l]) as in ``torch.nn.Linear``.

    Args:
        sizes: layer widths, input first, e.g. ``(1, 40, 40, 1)`` for the MAML sinusoid network.
        seed: the seed of a private generator (the global RNG is not touched).
        scheme: ``"torch"``: U(±1/√fan_in) weights and biases, as ``nn.Linear``;
            ``"paper"``: truncated-normal(σ = 0.01) weights and zero biases, as the MAML code.
        dtype: defaults to ``torch.get_default_dtype()``.
        device: where the tensors live.

    Example:
        >>> {k: tuple(v.shape) for k, v in init_mlp((1, 40, 40, 1)).items()}
        {'w0': (40, 1), 'b0': (40,), 'w1': (40, 40), 'b1': (40,), 'w2': (1, 40), 'b2': (1,)}
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive ints, got {sizes}")
    if scheme not in ("torch", "paper"):
        raise ValueError(f"scheme must be 'torch' or 'paper', got {scheme!r}")
    dtype = dtype or torch.get_default_dtype()
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
            ) from error
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    gen = torch.Generator().manual_seed(check_seed(seed))
    params: Params = {}
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if scheme == "torch":
            bound = 1.0 / math.sqrt(fan_in)
            w = (torch.rand(fan_out, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            b = (torch.rand(fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        else:
            w = torch.nn.init.trunc_normal_(
                torch.empty(fan_out, fan_in, dtype=torch.float64),
                std=0.01,
                a=-0.02,
                b=0.02,
                generator=gen,
            )
            b = torch.zeros(fan_out, dtype=torch.float64)
        params[f"w{layer}"] = w.to(dtype=dtype, device=device)
        params[f"b{layer}"] = b.to(dtype=dtype, device=device)
    return params


def mlp(params: Params, x: Tensor, activation: Activation = "relu") -> Tensor:
    """Apply the MLP of :func:`init_mlp`: ``x`` of shape (..., sizes[0]) → (..., sizes[-1]).

    Hidden layers use ``activation`` ("relu" or "tanh"); the output layer is linear.

    Example:
        >>> p = init_mlp((1, 8, 1), seed=0)
        >>> mlp(p, torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    n_layers = mlp_layers(params)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor for mamlkit.mlp, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != params["w0"].shape[1]:
        raise ValueError(f"x must have shape (..., {params['w0'].shape[1]}), got {tuple(x.shape)}")
    act = _ACTIVATIONS[activation]
    h = x
    for layer in range(n_layers):
        h = torch.nn.functional.linear(h, params[f"w{layer}"], params[f"b{layer}"])
        if layer < n_layers - 1:
            h = act(h)
    return h


def mlp_layers(params: Params) -> int:
    """The number of layers L of an :func:`init_mlp` parameter dict, after checking that it holds
    exactly ``w0, b0, …, w{L−1}, b{L−1}`` with chained shapes (shapes only: vmap-safe)."""
    n_layers = len(params) // 2
    expected = [f"{p}{i}" for i in range(n_layers) for p in "wb"]
    if n_layers == 0 or len(params) % 2 or set(params) != set(expected):
        raise ValueError(
            f"params must hold exactly the keys w0, b0, …, w{{L-1}}, b{{L-1}} of init_mlp, "
            f"got {sorted(params)}"
        )
    fan_in = params["w0"].shape[-1] if params["w0"].ndim == 2 else None
    for i in range(n_layers):
        w, b = params[f"w{i}"], params[f"b{i}"]
        if w.ndim != 2 or w.shape[1] != fan_in or b.shape != (w.shape[0],):
            raise ValueError(
                f"params w{i} and b{i} must have shapes (out, {fan_in}) and (out,), "
                f"got {tuple(w.shape)} and {tuple(b.shape)}"
            )
        fan_in = w.shape[0]
    return n_layers


@dataclass(frozen=True)
class MSELoss:
    """A squared-error ``loss_fn(params, (x, y))`` built from ``model_fn`` (see
    :func:`make_mse_loss`).

    Its fields stay inspectable: ``meta_batch_grad(..., backend="fused")`` checks that
    ``model_fn`` is :func:`mlp` before it runs the hand-written MLP kernels.
    """

    model_fn: ModelFn
    reduction: Reduction = "mean"

    def __call__(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        prediction = self.model_fn(params, x)  # the model's own errors about x come first
        if not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor for a squared error, got {y.dtype}")
        if prediction.shape != y.shape:
            raise ValueError(
                f"y must have the shape of the model's prediction {tuple(prediction.shape)}, "
                f"got {tuple(y.shape)}"
            )
        squared = (prediction - y).pow(2)
        if self.reduction == "mean":
            return squared.mean()
        return squared.sum() if self.reduction == "sum" else 0.5 * squared.sum()


def _check_label_dtype(y: Tensor, name: str) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class labels, got {y.dtype}")


@dataclass(frozen=True)
class CrossEntropyLoss:
    """The mean softmax cross-entropy ``loss_fn(params, (x, y))`` of ``model_fn``'s logits over
    rows, ``y`` integer class labels; see :func:`make_cross_entropy_loss`."""

    model_fn: ModelFn

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """The model's (N, classes) logits."""
        return self.model_fn(params, x)

    def __call__(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        _check_label_dtype(y, "y")
        logits = self.model_fn(params, x)
        if logits.ndim != 2 or y.shape != logits.shape[:1]:
            raise ValueError(
                f"the model must return (N, classes) logits and y must be (N,) labels, got logits "
                f"{tuple(logits.shape)} and y {tuple(y.shape)}"
            )
        return torch.nn.functional.cross_entropy(logits, y.long())

    def target_check(self, params: Params, x: Tensor) -> Callable[[Tensor, str], None]:
        """The check of class labels for this model and inputs like ``x`` (one task's): labels
        in 0 … C − 1, C the number of logits the model returns for one row of ``x``. Run on
        concrete tensors at the door of every engine, since inside ``vmap`` values cannot be
        inspected and torch would drop a label of −100 (its ``ignore_index``) silently or fail
        with an index error on one past the last class. (A plan keeps the check: C is found
        once, then each call compares two numbers.)"""
        with torch.no_grad():
            classes = self.model_fn(params, x[:1]).shape[-1]
        return functools.partial(_check_labels, classes=classes)

    def accuracy(self, params: Params, batch: Batch) -> Tensor:
        """The fraction of rows whose largest logit is the label (a 0-d tensor)."""
        x, y = batch
        return (self.model_fn(params, x).argmax(-1) == y).to(torch.get_default_dtype()).mean()


def _check_labels(y: Tensor, name: str, classes: int) -> None:
    _check_label_dtype(y, name)
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} must be class labels in 0 … {classes - 1} (the model returns {classes} "
                f"logits), got {bad}"
                + (" (torch's ignore_index: every point must count here)" if bad == -100 else "")
            )


def make_cross_entropy_loss(model_fn: ModelFn) -> CrossEntropyLoss:
    r"""Turn ``model_fn(params, x) → logits (N, C)`` into the classification loss
    ``loss_fn(params, (x, y)) = −(1/N) Σ_n log softmax(z_n)[y_n]`` with integer labels ``y`` (N,).

    Integer labels are never cast to float anywhere in mamlkit (meta-batches, training,
    evaluation); any integer dtype works (``int32`` and ``uint8`` labels are read as ``int64``).
    Every engine checks at its door that the labels lie in 0 … C − 1 (torch's ``ignore_index``
    of −100 is refused, not dropped). ``mamlkit.train.evaluate`` also reports accuracy.

    Example:
        >>> loss = make_cross_entropy_loss(lambda p, x: x @ p["w"])
        >>> batch = (torch.ones(4, 2), torch.tensor([0, 1, 2, 0]))
        >>> round(loss({"w": torch.zeros(2, 3)}, batch).item(), 4)
        1.0986
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(params, x), got {model_fn!r}")
    return CrossEntropyLoss(model_fn)


def make_mse_loss(model_fn: ModelFn, *, reduction: Reduction = "mean") -> MSELoss:
    r"""Turn ``model_fn(params, x)`` into ``loss_fn(params, (x, y))``, a squared error.

    ``reduction`` fixes the convention, which scales the gradient, the Hessian and so the
    effective inner step size (question 5 of the notebooks):

    - ``"mean"``: ``(1/n) Σ (f − y)²`` over all n entries (the MAML paper's code);
    - ``"sum"``: ``Σ (f − y)²``;
    - ``"half_sum"``: ``½ Σ (f − y)²`` (the textbook form; ∇²L = Gauss–Newton + residual part).

    Predictions and targets must have exactly the same shape: a (N,) target against (N, 1)
    predictions would silently broadcast to (N, N), so it raises instead.

    Example:
        >>> line = lambda p, x: p["w"] * x
        >>> loss = make_mse_loss(line, reduction="half_sum")
        >>> loss({"w": torch.tensor(2.0)}, (torch.ones(3, 1), torch.zeros(3, 1)))
        tensor(6.)
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(params, x), got {model_fn!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return MSELoss(model_fn, reduction)
