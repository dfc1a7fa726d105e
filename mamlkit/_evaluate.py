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

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vmap

from ._checks import (
    check_lr,
    check_params,
    check_positive_int,
    check_steps,
    check_task_batches,
    checked_loss,
)
from ._params import Batch, LossFn, Params, tree_detach

Z95 = 1.96


class EvalResult(NamedTuple):
    """Query losses after 0 … k fine-tuning steps.

    Attributes:
        mse: (k+1,) mean query loss over tasks after j steps.
        ci95: (k+1,) half-width of the 95 % interval, ``1.96·σ/√N``.
        losses: (N, k+1) every task's query loss after j steps.
    """

    mse: Tensor
    ci95: Tensor
    losses: Tensor


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


def _finetune_curve(loss: LossFn, lr: float, steps: int):
    def task(theta: Params, support: Batch, query: Batch) -> Tensor:
        curve = [loss(theta, query)]
        for _ in range(steps):
            g = grad(loss)(theta, support)
            theta = {k: theta[k] - lr * g[k] for k in theta}
            curve.append(loss(theta, query))
        return torch.stack(curve)

    return task


def evaluate(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 10,
) -> EvalResult:
    r"""Fine-tune ``params`` on each task's support set with SGD; query losses after 0…k steps.

    Args:
        loss_fn: ``loss_fn(params, batch)`` for one task (the MSE of the paper's code).
        params: θ; never modified.
        support: ``(x, y)`` of shape (N, K, …): the K points each task is fine-tuned on (every
            step uses the same K points, as in the paper).
        query: ``(x, y)`` of shape (N, K_q, …): the points it is scored on.
        lr: the fine-tuning step size α.
        steps: k ≥ 0.

    Returns:
        :class:`EvalResult` with ``mse``, ``ci95`` of shape (k+1,) and ``losses`` (N, k+1).

    Example:
        >>> L = lambda p, b: ((b[0] * p["w"] - b[1]) ** 2).mean()
        >>> x = torch.ones(2, 1, 1); y = torch.stack([torch.zeros(1, 1), 2 * torch.ones(1, 1)])
        >>> evaluate(L, {"w": torch.tensor(1.0)}, (x, y), (x, y), lr=0.25, steps=1).losses
        tensor([[1.0000, 0.2500],
                [1.0000, 0.2500]])
    """
    loss = checked_loss(loss_fn)
    params = tree_detach(check_params(params))
    support, query = check_task_batches(support, query)
    lr, steps = check_lr(lr), check_steps(steps)
    with torch.no_grad():
        losses = vmap(_finetune_curve(loss, lr, steps), in_dims=(None, 0, 0))(
            params, support, query
        )
    mse, ci95 = mean_ci95(losses)
    return EvalResult(mse, ci95, losses)


def evaluate_tasks(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    sample_tasks: Callable[..., Any],
    *,
    num_tasks: int = 600,
    lr: float,
    steps: int = 10,
    seed: int = 1,
) -> EvalResult:
    """:func:`evaluate` on ``num_tasks`` fresh tasks from ``sample_tasks(n, generator=g, dtype=d)``.

    The generator is seeded with ``seed`` (the paper's ``main.py`` seeds its test tasks with 1),
    so every method is scored on the same tasks; d is the dtype of ``params``.

    Example:
        >>> from mamlkit import SinusoidFamily, init_mlp, make_mse_loss, mlp
        >>> r = evaluate_tasks(make_mse_loss(mlp), init_mlp((1, 8, 1)), SinusoidFamily(k_support=5),
        ...                    num_tasks=10, lr=0.01, steps=2)
        >>> r.mse.shape, r.losses.shape
        (torch.Size([3]), torch.Size([10, 3]))
    """
    params = check_params(params)
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    if not callable(sample_tasks):
        raise TypeError(f"sample_tasks must be callable, got {type(sample_tasks).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    dtype = next(iter(params.values())).dtype
    tasks = sample_tasks(num_tasks, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    support = tuple(t.to(dtype) for t in tasks.support)
    query = tuple(t.to(dtype) for t in tasks.query)
    return evaluate(loss_fn, params, support, query, lr=lr, steps=steps)


__all__ = ["EvalResult", "evaluate", "evaluate_tasks", "mean_ci95"]
