r"""Meta-test evaluation as in the MAML paper's code: fine-tune on K points, score the query set.

For each of N fresh tasks, θ is fine-tuned with plain SGD on the task's K support points,
``θ_{j+1} = θ_j − α∇L_s(θ_j)``, and the query loss ``L_q(θ_j)`` is recorded after j = 0 … k
steps. The summary per step is the mean over tasks and the half-width of a 95 % interval,

.. math:: \bar{L} = \frac1N \sum_i L_i, \qquad h = 1.96\,\frac{σ}{\sqrt N},
    \quad σ = \sqrt{\tfrac1N \sum_i (L_i − \bar{L})^2}

(σ with divisor N, ``np.std``'s default, as ``main.py`` of Finn et al. computes it). All N tasks
are fine-tuned at once with ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import (
    check_finite,
    check_int,
    check_meta_task,
    check_params,
    checked_loss,
)
from ._methods import Adaptation, get_method, sgd_adaptation
from ._params import Batch, LossFn, Params, tree_detach

Z95 = 1.96


class EvalResult(NamedTuple):
    """Query losses (and, for classification, accuracies) after 0 … k fine-tuning steps.

    Attributes:
        loss: (k+1,) mean query loss over tasks after j steps (the MSE for a squared error).
        ci95: (k+1,) half-width of the 95 % interval over tasks, ``1.96·σ/√N``.
        losses: (N, k+1) every task's query loss after j steps.
        accuracy: (k+1,) mean query accuracy over tasks, for a loss with an ``accuracy``
            method (:func:`mamlkit.make_cross_entropy_loss`); else None.
        accuracy_ci95: its 95 % half-width over tasks, or None.
        accuracies: (N, k+1) every task's accuracy, or None.
    """

    loss: Tensor
    ci95: Tensor
    losses: Tensor
    accuracy: Tensor | None = None
    accuracy_ci95: Tensor | None = None
    accuracies: Tensor | None = None


def mean_ci95(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over dim 0 and the 95 % half-width ``1.96·σ/√N`` (σ with divisor N).

    Example:
        >>> mean_ci95(torch.tensor([1.0, 3.0]))            # σ = 1, N = 2
        (tensor(2.), tensor(1.3859))
    """
    if not isinstance(values, Tensor) or values.ndim == 0 or values.shape[0] < 1:
        raise ValueError("values must be a tensor with at least one entry along dim 0")
    n = values.shape[0]
    return values.mean(0), Z95 * values.std(0, correction=0) / n**0.5


def _finetune_curve(loss: LossFn, adaptation: Adaptation, steps: int, scores: list):
    """Per task: the query loss, and every score in ``scores`` (e.g. accuracy), after 0 … k
    fine-tuning steps on the support set."""

    def task(meta: Params, support: Batch, query: Batch) -> Tensor:
        theta = adaptation.start(meta)
        curves = [[loss(theta, query), *(f(theta, query) for f in scores)]]
        for j in range(steps):
            theta = adaptation.step(meta, theta, support, j)
            curves.append([loss(theta, query), *(f(theta, query) for f in scores)])
        return torch.stack([torch.stack(c) for c in curves], -1)  # (1 + scores, k+1)

    return task


def evaluate(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 10,
    method: str | None = None,
    **hypers: Any,
) -> EvalResult:
    r"""Fine-tune ``params`` on each task's support set; query losses after 0…k steps.

    The fine-tuning is plain SGD, or, with ``method``, the test-time adaptation that method's
    record gives (:attr:`mamlkit.Method.adaptation`: SGD for most built-in methods; Meta-SGD steps
    with its learned rates, ANIL the head alone, MAML with per-step parameters with each step's
    copies).

    Args:
        loss_fn: ``loss_fn(params, batch)`` for one task (the MSE of the paper's code).
        params: θ; never modified.
        support: ``(x, y)`` of shape (N, K, …): the K points each task is fine-tuned on (every
            step uses the same K points, as in the paper).
        query: ``(x, y)`` of shape (N, K_q, …): the points it is scored on.
        lr: the fine-tuning step size α.
        steps: k ≥ 0.
        method: a key of :data:`mamlkit.METHODS` whose adaptation to use (``params`` are then
            that method's meta-parameters), or ``None`` for plain SGD.
        **hypers: the method's own hyper-parameters (only with ``method``).

    Returns:
        :class:`EvalResult` with ``loss``, ``ci95`` of shape (k+1,) and ``losses`` (N, k+1), and
        accuracies for a classification loss (one with an ``accuracy`` method).

    Example:
        >>> L = lambda p, b: ((b[0] * p["w"] - b[1]) ** 2).mean()
        >>> x = torch.ones(2, 1, 1); y = torch.stack([torch.zeros(1, 1), 2 * torch.ones(1, 1)])
        >>> evaluate(L, {"w": torch.tensor(1.0)}, (x, y), (x, y), lr=0.25, steps=1).losses
        tensor([[1.0000, 0.2500],
                [1.0000, 0.2500]])
    """
    loss = checked_loss(loss_fn)
    params = tree_detach(check_params(params))
    lr, steps = check_finite(lr, "lr"), check_int(steps, "steps")
    if method is None:
        if hypers:
            raise TypeError(
                f"evaluate takes hyper-parameters only with a method, got {sorted(hypers)}"
            )
        adaptation = sgd_adaptation(loss, lr)
    else:
        entry = get_method(method)
        resolved = entry.resolve(hypers)
        # fine-tuning may run past the trained steps (per-step rates: the last step's reused)
        entry.check(params, lr=lr, steps=min(steps, 1), **resolved)
        adaptation = entry.adaptation(loss, lr, **resolved)
    support, query = check_meta_task(loss_fn, adaptation.start(params), support, query)
    accuracy = getattr(loss_fn, "accuracy", None)
    scores = [accuracy] if callable(accuracy) else []
    with torch.no_grad():
        curve = _finetune_curve(loss, adaptation, steps, scores)
        curves = vmap(curve, in_dims=(None, 0, 0))(params, support, query)
    losses = curves[:, 0]
    mean, ci95 = mean_ci95(losses)
    if not scores:
        return EvalResult(mean, ci95, losses)
    accuracies = curves[:, 1]
    return EvalResult(mean, ci95, losses, *mean_ci95(accuracies), accuracies)


__all__ = ["EvalResult", "evaluate", "mean_ci95"]
