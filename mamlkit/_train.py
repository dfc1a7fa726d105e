r"""Meta-training with Adam as the meta-optimizer, the joint-training ("pretrained") baseline,
and small checkpoints.

One meta-iteration (Finn et al. 2017, Algorithm 1) draws a meta-batch of T tasks, asks
:func:`mamlkit.meta_batch_grad` for the task-averaged meta-gradient g, and takes one Adam step

.. math::

    m ← β_1 m + (1 − β_1) g, \quad v ← β_2 v + (1 − β_2) g^2, \quad
    θ ← θ − β \frac{m / (1 − β_1^t)}{\sqrt{v / (1 − β_2^t)} + ε}

with the meta step size β = ``meta_lr`` and torch's defaults β_1 = 0.9, β_2 = 0.999,
ε = 10⁻⁸ (the update of ``torch.optim.Adam``, written on plain dicts so that the caller's
tensors are never touched).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import (
    check_lr,
    check_params,
    check_positive,
    check_positive_int,
    check_steps,
    checked_loss,
)
from ._fast import fast_adam_step
from ._metabatch import METHODS, meta_batch_grad
from ._params import LossFn, Params, tree_detach

TRAIN_METHODS: tuple[str, ...] = (*METHODS, "pretrained")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_METHOD_KWARGS = {"imaml": ("lam", "cg_steps")}


class TrainResult(NamedTuple):
    """What :func:`meta_train` returns.

    Attributes:
        params: the trained θ, new detached tensors.
        history: (iterations,) float64, the meta-batch mean of the post-adaptation query loss
            at each iteration (before that iteration's update): ``L_q(θ_k)`` after ``steps``
            SGD steps of size ``lr`` on the support set for every method except iMAML, whose
            adapted parameters are its proximal solution φ (see ``meta_batch_grad``).
        config: a JSON-ready dict of everything needed to reproduce the run.
    """

    params: Params
    history: Tensor
    config: dict[str, Any]


def _describe(obj: object) -> Any:
    """A JSON-ready description of a loss or task sampler (dataclass fields where possible)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, **fields}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (tuple, list)):
        return [_describe(v) for v in obj]
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _clip_global_norm(grads: Params, max_norm: float) -> Params:
    r"""``g·min(1, c/(‖g‖ + 10⁻⁶))`` with ‖g‖ the L2 norm over every tensor of the dict (new tensors).

    Example:
        >>> _clip_global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
    )
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # 1e-6 as clip_grad_norm_
    return {k: g * scale.to(g.dtype) for k, g in grads.items()}


def _check_method_kwargs(method: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    allowed = _METHOD_KWARGS.get(method, ())
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"method {method!r} takes no keyword argument(s) {unknown}; allowed: {list(allowed)}"
        )
    checked = dict(kwargs)
    if "lam" in checked:
        checked["lam"] = check_positive(checked["lam"], "lam")
    if "cg_steps" in checked:
        checked["cg_steps"] = check_positive_int(checked["cg_steps"], "cg_steps")
    return checked


def meta_train(
    method: str,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    sample_tasks: Callable[..., Any],
    *,
    meta_batch_size: int,
    iterations: int,
    lr: float,
    meta_lr: float,
    steps: int,
    seed: int,
    progress: bool = True,
    log_every: int = 100,
    max_grad_norm: float | None = None,
    **method_kwargs: Any,
) -> TrainResult:
    r"""Train θ with ``method`` and Adam; deterministic for a given ``seed``.

    Each iteration draws ``tasks = sample_tasks(meta_batch_size, generator=g, dtype=d)`` from one
    ``torch.Generator`` seeded with ``seed`` (``tasks.support``/``tasks.query`` batched as
    (T, K, …), e.g. :class:`mamlkit.SinusoidFamily`), computes the meta-gradient and takes an
    Adam step of size ``meta_lr``:

    - ``"maml"``, ``"fomaml"``, ``"reptile"``, ``"imaml"``: ``mamlkit.meta_batch_grad``
      (``lam`` and ``cg_steps`` go to iMAML);
    - ``"pretrained"``: the baseline of Finn et al. — the same network trained jointly on all
      tasks, ``∇_θ (1/T) Σ_i L(θ; S_i ∪ Q_i)`` (plain regression on every point of the sampled
      tasks, no inner loop), with the same optimizer and budget. (The paper's code pre-trains on
      the K support points only; using all 2K is the fairer data budget.)

    Args:
        method: one of ``"maml"``, ``"fomaml"``, ``"reptile"``, ``"imaml"``, ``"pretrained"``.
        loss_fn: ``loss_fn(params, batch)`` for one task.
        params: the initial θ; never modified (training runs on copies).
        sample_tasks: ``sample_tasks(num_tasks, *, generator, dtype)`` → object with
            ``support`` and ``query`` batched pairs, drawn in the dtype of ``params``.
        meta_batch_size: T ≥ 1 tasks per iteration.
        iterations: the number of meta-iterations ≥ 0.
        lr: the inner step size α (also the step size of the progress measure).
        meta_lr: Adam's step size β > 0.
        steps: inner steps k.
        seed: seeds the task generator.
        progress: show a tqdm bar (imported only when used).
        log_every: how often (iterations) the bar shows the running mean meta-loss.
        max_grad_norm: off (``None``, the default) or a bound c > 0 on the global L2 norm of
            the meta-gradient before the Adam step: ``g ← g·min(1, c/(‖g‖ + 10⁻⁶))`` (norm over all
            parameters together, as ``torch.nn.utils.clip_grad_norm_``). Recorded in ``config``.
        **method_kwargs: ``lam``, ``cg_steps`` for ``"imaml"``; anything else raises.

    Returns:
        :class:`TrainResult` ``(params, history, config)``.

    Example:
        >>> from mamlkit import SinusoidFamily, init_mlp, make_mse_loss, mlp
        >>> result = meta_train("maml", make_mse_loss(mlp), init_mlp((1, 8, 1)), SinusoidFamily(),
        ...                     meta_batch_size=4, iterations=3, lr=0.01, meta_lr=1e-3, steps=1,
        ...                     seed=0, progress=False)
        >>> result.history.shape, result.config["method"]
        (torch.Size([3]), 'maml')
    """
    if method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {TRAIN_METHODS}, got {method!r}")
    checked_loss(loss_fn)  # callable check; the loss itself is checked by meta_batch_grad
    theta = {k: v.detach().clone() for k, v in check_params(params).items()}
    if not callable(sample_tasks):
        raise TypeError(f"sample_tasks must be callable, got {type(sample_tasks).__name__}")
    meta_batch_size = check_positive_int(meta_batch_size, "meta_batch_size")
    iterations = check_steps(iterations, "iterations")
    lr, meta_lr = check_lr(lr), check_positive(meta_lr, "meta_lr")
    steps = check_steps(steps)
    log_every = check_positive_int(log_every, "log_every")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    method_kwargs = _check_method_kwargs(method, method_kwargs)
    if max_grad_norm is not None:
        max_grad_norm = check_positive(max_grad_norm, "max_grad_norm")

    config: dict[str, Any] = {
        "method": method,
        "meta_batch_size": meta_batch_size,
        "iterations": iterations,
        "lr": lr,
        "meta_lr": meta_lr,
        "steps": steps,
        "seed": seed,
        "method_kwargs": method_kwargs,
        "max_grad_norm": max_grad_norm,
        "optimizer": {"name": "adam", "betas": list(ADAM_BETAS), "eps": ADAM_EPS},
        "loss": _describe(loss_fn),
        "tasks": _describe(sample_tasks),
        "param_shapes": {k: list(v.shape) for k, v in theta.items()},
        "dtype": str(next(iter(theta.values())).dtype).removeprefix("torch."),
    }
    dtype = next(iter(theta.values())).dtype
    device = next(iter(theta.values())).device
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {
        "t": 0,
        "m": {k: torch.zeros_like(v) for k, v in theta.items()},
        "v": {k: torch.zeros_like(v) for k, v in theta.items()},
    }
    history = torch.empty(iterations, dtype=torch.float64)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, desc=method, leave=False)
    for it in range(iterations):
        tasks = sample_tasks(meta_batch_size, generator=generator, dtype=dtype)
        # tasks are drawn on the CPU (one seeded generator) and sent to the parameters' device
        support = tuple(t.to(device=device, dtype=dtype) for t in tasks.support)
        query = tuple(t.to(device=device, dtype=dtype) for t in tasks.query)
        if method == "pretrained":  # plain regression on all of each task's points
            both = (torch.cat([support[0], query[0]], 1), torch.cat([support[1], query[1]], 1))
            grads, _ = meta_batch_grad("fomaml", loss_fn, theta, support, both, lr=lr, steps=0)
            _, losses = meta_batch_grad(
                "fomaml", loss_fn, theta, support, query, lr=lr, steps=steps
            )
        else:
            grads, losses = meta_batch_grad(
                method, loss_fn, theta, support, query, lr=lr, steps=steps, **method_kwargs
            )
        history[it] = losses.mean().item()
        if not math.isfinite(history[it]):
            raise FloatingPointError(f"{method} diverged: non-finite meta-loss at iteration {it}")
        if max_grad_norm is not None:
            grads = _clip_global_norm(grads, max_grad_norm)
        theta, state = fast_adam_step(theta, grads, state, meta_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        if bar is not None:
            bar.update(1)
            if (it + 1) % log_every == 0:
                bar.set_postfix(meta_loss=f"{history[it + 1 - log_every : it + 1].mean():.4f}")
    if bar is not None:
        bar.close()
    if not all(math.isfinite(float(v.abs().max())) for v in theta.values()):
        raise FloatingPointError(f"{method} diverged: non-finite parameters after training")
    return TrainResult(tree_detach(theta), history, config)


def save_checkpoint(result: TrainResult, directory: str | Path, *, history: bool = True) -> Path:
    """Write ``params.pt`` (``torch.save`` of the params dict) and ``config.json`` (config and,
    if ``history``, the history) into ``directory`` (created if needed); return the directory.

    Example:
        >>> import tempfile
        >>> r = TrainResult({"w": torch.ones(2)}, torch.zeros(1, dtype=torch.float64), {"a": 1})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     load_checkpoint(save_checkpoint(r, d)).params
        {'w': tensor([1., 1.])}
    """
    if not isinstance(result, TrainResult):
        raise TypeError(f"result must be a TrainResult, got {type(result).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in result.params.items()}, directory / "params.pt")
    record = {"config": result.config, "history": result.history.tolist() if history else []}
    (directory / "config.json").write_text(json.dumps(record, indent=1) + "\n")
    return directory


def load_checkpoint(directory: str | Path) -> TrainResult:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors loaded with
    ``weights_only=True``)."""
    directory = Path(directory)
    for name in ("params.pt", "config.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"directory {str(directory)!r} has no {name}")
    params = torch.load(directory / "params.pt", weights_only=True)
    record = json.loads((directory / "config.json").read_text())
    history = torch.tensor(record["history"], dtype=torch.float64)
    return TrainResult(check_params(params), history, record["config"])


__all__ = ["TRAIN_METHODS", "TrainResult", "load_checkpoint", "meta_train", "save_checkpoint"]
