"""Every method on both compiled backends against the per-task engines, in float64.

Cold compiles take tens of seconds each, so these run with ``make test-compiled`` (``pytest -m
slow``), not in ``make test``, which holds MAML alone to the same check
(``test_metabatch.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_tree_close, per_task_reference, random_mlp_problem

import mamlkit as mk
from mamlkit.tasks import quadratic_loss, sample_quadratic_tasks

pytestmark = pytest.mark.slow
HYPERS = {"imaml": {"lam": 2.0, "cg_steps": 4}}
TOL = {"rtol": 1e-9, "atol": 1e-11}
MSE = mk.make_mse_loss(mk.mlp)


@pytest.mark.parametrize("method", list(mk.METHODS))
def test_fused_compiled_matches_the_per_task_engines(method):
    params, support, query = random_mlp_problem((1, 4, 3, 1), seed=1)
    steps, kw = max(2, mk.METHODS[method].min_steps), HYPERS.get(method, {})
    got, losses = mk.meta_batch_grad(
        method, MSE, params, support, query, lr=0.05, steps=steps, backend="fused-compiled", **kw
    )
    ref, ref_losses = per_task_reference(
        method, MSE, params, support, query, lr=0.05, steps=steps, **kw
    )
    assert_tree_close(got, ref, **TOL)
    torch.testing.assert_close(losses, ref_losses)


@pytest.mark.parametrize("method", [m for m in mk.METHODS if m != "pretrained"])
def test_vmap_compiled_matches_the_per_task_engines(method):
    """(The quadratic family has no points to pool, so the joint-training baseline is not
    defined on it.)"""
    t = sample_quadratic_tasks(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {"x": torch.tensor([0.7, -0.2], dtype=torch.float64)}
    steps, kw = max(2, mk.METHODS[method].min_steps), HYPERS.get(method, {})
    got, _ = mk.meta_batch_grad(
        method,
        quadratic_loss,
        params,
        t.support,
        t.query,
        lr=0.2,
        steps=steps,
        backend="vmap-compiled",
        **kw,
    )
    ref, _ = per_task_reference(
        method, quadratic_loss, params, t.support, t.query, lr=0.2, steps=steps, **kw
    )
    assert_tree_close(got, ref, **TOL)
