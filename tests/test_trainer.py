"""The open trainer: the meta-optimizer as a value (the built-in Adam or any torch.optim class),
a cosine schedule, an iterable of meta-batches as the task source, and callbacks that see the
training state — each against a hand-written torch.optim loop over meta_batch_grad, and each
resumed bit-identically from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from helpers import F64

import mamlkit as mk
from mamlkit.tasks import SinusoidFamily
from mamlkit.train import CosineSchedule, Progress, TorchOptimizer, load_checkpoint, meta_train

MSE = mk.make_mse_loss(mk.mlp)
FAMILY = SinusoidFamily(k_support=5)
SETTINGS = {
    "meta_batch_size": 4,
    "lr": 0.02,
    "meta_lr": 0.01,
    "steps": 1,
    "seed": 3,
    "progress": False,
}


def params():
    return mk.init_mlp((1, 8, 1), seed=0, dtype=F64)


def batches(n, seed=3):
    """The meta-batches a run with ``seed`` draws, one sampler call each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = FAMILY(4, generator=g, dtype=F64)
        out.append((t.support, t.query))
    return out


def hand_loop(optimizer_cls, n, schedule=None, **kwargs):
    """torch.optim on leaf tensors, stepped with meta_batch_grad's gradient."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params().items()}
    opt = optimizer_cls(leaves.values(), lr=SETTINGS["meta_lr"], **kwargs)
    scheduler = schedule(opt) if schedule else None
    for support, query in batches(n):
        g, _ = mk.meta_batch_grad(
            "maml",
            MSE,
            {k: v.detach() for k, v in leaves.items()},
            support,
            query,
            lr=SETTINGS["lr"],
        )
        for k, leaf in leaves.items():
            leaf.grad = g[k]
        opt.step()
        if scheduler:
            scheduler.step()
    return {k: v.detach() for k, v in leaves.items()}


@pytest.mark.parametrize(
    ("cls", "kwargs"), [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.AdamW, {})]
)
def test_any_torch_optimizer_is_the_hand_written_loop(cls, kwargs):
    run = meta_train(
        "maml",
        MSE,
        params(),
        batches(12),
        iterations=12,
        optimizer=TorchOptimizer(cls, **kwargs),
        **SETTINGS,
    )
    expected = hand_loop(cls, 12, **kwargs)
    for k in expected:
        torch.testing.assert_close(run.params[k], expected[k], rtol=1e-12, atol=1e-14)
    assert run.config["optimizer"] == {"name": cls.__name__, "kwargs": kwargs}


def test_a_cosine_schedule_is_cosine_annealing():
    run = meta_train(
        "maml", MSE, params(), batches(10), iterations=10, schedule="cosine", **SETTINGS
    )
    expected = hand_loop(
        torch.optim.Adam, 10, lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    )
    for k in expected:
        torch.testing.assert_close(run.params[k], expected[k], rtol=1e-10, atol=1e-12)
    s = CosineSchedule(1.0, 4, 0.2)
    assert [round(s(t), 12) for t in range(5)] == [
        1.0,
        round(0.6 + 0.4 * 2**-0.5, 12),
        0.6,
        round(0.6 - 0.4 * 2**-0.5, 12),
        0.2,
    ]


@pytest.mark.parametrize(
    "optimizer", [None, TorchOptimizer(torch.optim.SGD, momentum=0.9)], ids=["adam", "sgd"]
)
@pytest.mark.parametrize("source", ["sampler", "iterable"])
def test_resume_is_bit_identical_for_every_optimizer_and_source(tmp_path, optimizer, source):
    def run(iterations, **kw):
        tasks = batches(20) if source == "iterable" else FAMILY
        return meta_train(
            "maml",
            MSE,
            params(),
            tasks,
            iterations=iterations,
            optimizer=optimizer,
            schedule="constant",
            checkpoint_dir=tmp_path / "run" if kw else None,
            **kw,
            **SETTINGS,
        )

    full = meta_train(
        "maml",
        MSE,
        params(),
        batches(20) if source == "iterable" else FAMILY,
        iterations=20,
        optimizer=optimizer,
        **SETTINGS,
    )
    run(8, checkpoint_every=4)
    resumed = run(20, resume=True)
    assert torch.equal(resumed.history, full.history)
    assert all(torch.equal(resumed.params[k], full.params[k]) for k in full.params)
    saved = load_checkpoint(tmp_path / "run")
    assert saved.iteration == 20


def test_an_iterable_source_gives_its_meta_batches_in_order():
    run = meta_train("maml", MSE, params(), batches(6), iterations=6, **SETTINGS)
    expected = hand_loop(torch.optim.Adam, 6)
    for k in expected:
        torch.testing.assert_close(run.params[k], expected[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="sample_tasks ran out of meta-batches after 6"):
        meta_train("maml", MSE, params(), batches(6), iterations=7, **SETTINGS)


def test_callbacks_see_the_training_state():
    seen: list[Progress] = []
    meta_train(
        "maml",
        MSE,
        params(),
        FAMILY,
        iterations=6,
        log_every=3,
        schedule="cosine",
        callback=seen.append,
        **SETTINGS,
    )
    assert [p.iteration for p in seen] == [3, 6]
    assert seen[-1].history.shape == (6,) and set(seen[-1].params) == set(params())
    assert seen[-1].running_mean == pytest.approx(seen[-1].history[3:].mean().item())
    assert seen[0].meta_lr == pytest.approx(CosineSchedule(0.01, 6)(2))
    assert seen[-1].optimizer_state.step == 6


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"optimizer": torch.optim.SGD}, TypeError, "optimizer must be mamlkit.train.Adam"),
        ({"schedule": "linear"}, ValueError, "schedule must be one of"),
        ({"min_meta_lr": -1.0}, ValueError, "min_meta_lr must be >= 0"),
        ({"callback": 3}, TypeError, "callback must be callable"),
    ],
)
def test_bad_trainer_settings(change, error, match):
    with pytest.raises(error, match=match):
        meta_train("maml", MSE, params(), FAMILY, iterations=2, **{**SETTINGS, **change})


def test_bad_optimizer_values():
    with pytest.raises(TypeError, match="lr comes from meta_lr"):
        TorchOptimizer(torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"cls must be a torch\.optim\.Optimizer class"):
        TorchOptimizer(dict)
    with pytest.raises(TypeError):
        TorchOptimizer(torch.optim.SGD, momentom=0.9)  # torch's own check, at once
    with pytest.raises(ValueError, match="betas must be two floats"):
        mk.train.Adam(betas=(0.9, 1.5))


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    meta_train("maml", MSE, params(), FAMILY, iterations=2, checkpoint_dir=tmp_path, **SETTINGS)
    with pytest.raises(ValueError, match="the settings differ \\(optimizer"):
        meta_train(
            "maml",
            MSE,
            params(),
            FAMILY,
            iterations=4,
            checkpoint_dir=tmp_path,
            resume=True,
            optimizer=TorchOptimizer(torch.optim.SGD),
            **SETTINGS,
        )
