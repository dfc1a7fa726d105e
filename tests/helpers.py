"""The tests' shared, independent references: central differences, a per-task loop over the
single-task engines, and tree comparison. No test file writes its own copy of these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

import mamlkit as mk

F64 = torch.float64


def central_difference(f: Callable[[Tensor], Tensor], vector: Tensor, eps: float = 1e-6) -> Tensor:
    """∂f/∂v by float64 central differences, one coordinate at a time (no autograd)."""
    out = torch.empty_like(vector)
    with torch.no_grad():
        for i in range(vector.numel()):
            step = torch.zeros_like(vector)
            step[i] = eps
            out[i] = (f(vector + step) - f(vector - step)) / (2 * eps)
    return out


def unrolled_autograd(
    loss: Callable[..., Tensor],
    meta: Mapping[str, Tensor],
    support,
    query,
    *,
    steps: int,
    rate: Callable[[str, int], Tensor | float | None],
    step_weights=None,
) -> tuple[dict[str, Tensor], Tensor]:
    """d/d(meta) of Σ_j w_j L_Q(θ_j) by plain autograd through a Python loop (no torch.func, no
    mamlkit): θ_0 = the non-rate entries of ``meta``; step j moves key k by −rate(k, j)·∂L_S/∂k
    (``rate`` None: the key does not adapt); rates may be entries of ``meta``. Without
    ``step_weights`` the objective is L_Q(θ_k). Returns the gradient and L_Q(θ_k)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    theta = {k: v for k, v in leaves.items() if not k.startswith("lr")}
    objective = 0.0
    for j in range(steps):
        moving = [k for k in theta if rate(k, j) is not None]
        grads = torch.autograd.grad(
            loss(theta, support), [theta[k] for k in moving], create_graph=True
        )
        theta = dict(theta)
        for k, g in zip(moving, grads):
            r = rate(k, j)
            theta[k] = theta[k] - (leaves[r] if isinstance(r, str) else r) * g
        if step_weights is not None:
            objective = objective + step_weights[j] * loss(theta, query)
    last = loss(theta, query)
    if step_weights is None:
        objective = last
    grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return out, last.detach()


def meta_parameters(method: str, params: Mapping[str, Tensor], *, lr: float, steps: int, **hypers):
    """What ``method`` trains from θ (Meta-SGD adds its rates, here perturbed so that a rate
    that is ignored would show)."""
    meta = mk.METHODS[method].init(dict(params), lr=lr, steps=steps, **hypers)
    for k in meta:
        if k.startswith("lr"):
            g = torch.Generator().manual_seed(len(k))
            meta[k] = meta[k] * (1 + 0.5 * torch.rand(meta[k].shape, generator=g, dtype=F64)).to(
                meta[k]
            )
    return meta


def task(support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], i: int):
    """Task i of a meta-batch, as two single-task batches."""
    return (support[0][i], support[1][i]), (query[0][i], query[1][i])


def per_task_reference(
    method: str,
    loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    support,
    query,
    *,
    lr: float,
    steps: int,
    **hypers: Any,
) -> tuple[dict[str, Tensor], Tensor]:
    """The task mean of the single-task engines and each task's post-adaptation query loss, by
    a plain Python loop (the reference every meta-batch backend must equal)."""
    grads, losses = [], []
    for i in range(support[0].shape[0]):
        s, q = task(support, query, i)
        if method == "maml":
            g = mk.maml_grad(loss, params, s, q, lr=lr, steps=steps)
        elif method == "fomaml":
            g = mk.fomaml_grad(loss, params, s, q, lr=lr, steps=steps)
        elif method == "reptile":
            g = mk.reptile_grad(loss, params, s, lr=lr, steps=steps)
        elif method == "imaml":
            result = mk.imaml(loss, params, s, q, lr=lr, steps=steps, **hypers)
            g = result.grad
        elif method == "pretrained":
            both = (torch.cat((s[0], q[0])), torch.cat((s[1], q[1])))
            g = torch.func.grad(loss)(dict(params), both)
        elif method in ("anil", "metasgd"):
            g, value = unrolled_autograd(
                loss, params, s, q, steps=steps, rate=_rates(method, params, lr, **hypers)
            )
            grads.append(g)
            losses.append(value)
            continue
        else:
            raise ValueError(method)
        adapted = result.phi if method == "imaml" else mk.adapt(loss, params, s, lr=lr, steps=steps)
        grads.append(g)
        losses.append(loss(adapted, q).detach())
    mean = {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}
    return mean, torch.stack(losses)


def _rates(method: str, params, lr: float, adapt="head", head=None, per_step=False, **_):
    """Which key moves by which rate at step j, written out for ANIL/BOIL and Meta-SGD."""
    if method == "metasgd":
        return lambda k, j: f"lr{j}/{k}" if per_step else f"lr/{k}"
    last = list(params)[-1]
    top = head or [k for k in params if k.rsplit(".", 1)[0] == last.rsplit(".", 1)[0]]
    if "." not in last and head is None:  # init_mlp: the last w/b pair
        top = [f"w{last[1:]}", f"b{last[1:]}"]
    moving = set(top) if adapt == "head" else set(params) - set(top)
    return lambda k, j: lr if k in moving else None


def assert_tree_close(
    actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], **tol: Any
) -> None:
    """Same keys in the same order, and every tensor close."""
    assert list(actual) == list(expected), (list(actual), list(expected))
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def random_mlp_problem(sizes, *, tasks=3, n_support=6, n_query=5, seed=0, dtype=F64, device="cpu"):
    """An :func:`mamlkit.init_mlp` network and a meta-batch of uniform(−2, 2) data."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=F64) * 4 - 2).to(dtype=dtype, device=device)

    params = mk.init_mlp(sizes, seed=seed, dtype=dtype, device=device)
    support = (rand(tasks, n_support, sizes[0]), rand(tasks, n_support, sizes[-1]))
    query = (rand(tasks, n_query, sizes[0]), rand(tasks, n_query, sizes[-1]))
    return params, support, query
