"""mamlkit.train: meta_train (every method and backend), Adam, clipping, checkpoints, resume,
signals, divergence, and evaluation — against torch.optim.Adam, clip_grad_norm_, per-task loops
and uninterrupted runs."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from helpers import F64, task

import mamlkit as mk
from mamlkit import meta_batch_grad
from mamlkit._fused import KERNELS
from mamlkit.tasks import SinusoidFamily, sample_sinusoid_tasks
from mamlkit.train import (
    AdamState,
    Checkpoint,
    CheckpointError,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    adam_init,
    adam_update,
    clip_global_norm,
    evaluate,
    load_checkpoint,
    mean_ci95,
    meta_train,
    save_checkpoint,
)

MSE = mk.make_mse_loss(mk.mlp)
TINY = {
    "meta_batch_size": 5,
    "iterations": 60,
    "lr": 0.01,
    "meta_lr": 0.01,
    "steps": 1,
    "seed": 3,
    "progress": False,
}
# a low-noise family (nearly one function), so the meta-loss falls clearly in a few iterations
TINY_FAMILY = SinusoidFamily(k_support=5, amplitude_range=(0.9, 1.1), phase_range=(0.0, 0.3))
HYPERS = {"imaml": {"lam": 2.0, "cg_steps": 3}}


def tiny_params():
    return mk.init_mlp((1, 16, 1), seed=1, dtype=F64)


def drawn_like_meta_train(config, iterations):
    """The meta-batches meta_train draws: ``config["sample_chunk"]`` iterations per sampler call
    (T·chunk tasks, split in order), from one generator seeded with the run's seed."""
    t, chunk = config["meta_batch_size"], config["sample_chunk"]
    gen, out = torch.Generator().manual_seed(config["seed"]), []
    while len(out) < iterations:
        tasks = TINY_FAMILY(t * chunk, generator=gen, dtype=F64)
        for i in range(chunk):
            out.append(
                tuple(
                    tuple(x[i * t : (i + 1) * t] for x in pair)
                    for pair in (tasks.support, tasks.query)
                )
            )
    return out[:iterations]


def train(method="maml", **change):
    args = (
        TINY
        | {"steps": 3 if method in ("reptile", "imaml") else 1}
        | HYPERS.get(method, {})
        | change
    )
    return meta_train(method, MSE, tiny_params(), args.pop("sample_tasks", TINY_FAMILY), **args)


# --- meta_train ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "backend"),
    [(m, b) for m in mk.METHODS for b in ("vmap", "fused") if b == "vmap" or m in KERNELS],
)
def test_meta_train_reduces_the_meta_loss_deterministically(method, backend):
    params = tiny_params()
    snapshot = {k: v.clone() for k, v in params.items()}
    run, again = train(method, backend=backend), train(method, backend=backend)
    assert torch.equal(run.history, again.history)
    assert all(torch.equal(run.params[k], again.params[k]) for k in params)
    assert run.history.shape == (60,) and run.history.dtype == F64
    assert run.history[-10:].mean() < 0.8 * run.history[:10].mean()
    assert all(torch.equal(params[k], snapshot[k]) for k in params)
    assert run.config["method"] == method and run.config["backend"] == backend
    assert run.config["tasks"]["k_support"] == 5 and run.config["seed"] == 3
    assert (
        run.config["threads"] == torch.get_num_threads()
        and run.config["torch"] == torch.__version__
    )
    json.dumps(run.config)  # JSON-ready


def test_backends_train_to_the_same_parameters():
    a, b = (
        train("maml", backend="vmap", iterations=20),
        train("maml", backend="fused", iterations=20),
    )
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-9, atol=1e-11)


def test_the_first_iterate_is_one_adam_step_of_meta_batch_grad():
    run = train("maml", iterations=1)
    ((support, query),) = drawn_like_meta_train(run.config, 1)
    g, losses = meta_batch_grad("maml", MSE, tiny_params(), support, query, lr=0.01)
    for k, p in tiny_params().items():  # Adam's first step moves by lr·sign(g) (up to ε)
        torch.testing.assert_close(run.params[k], p - 0.01 * g[k] / (g[k].abs() + 1e-8))
    assert run.history[0].item() == pytest.approx(losses.mean().item(), rel=1e-12)


def test_the_seed_changes_the_tasks():
    assert not torch.equal(
        train("fomaml", iterations=3).history, train("fomaml", iterations=3, seed=4).history
    )


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_max_grad_norm_is_clip_grad_norm_then_torch_adam(max_norm):
    run = train("maml", iterations=3, max_grad_norm=max_norm)
    leaves = {k: v.clone().requires_grad_(True) for k, v in tiny_params().items()}
    opt = torch.optim.Adam(leaves.values(), lr=TINY["meta_lr"])
    norms = []
    for support, query in drawn_like_meta_train(run.config, 3):
        g, _ = meta_batch_grad(
            "maml", MSE, {k: v.detach() for k, v in leaves.items()}, support, query, lr=0.01
        )
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(leaves.values()), max_norm)))
        opt.step()
    assert (min(norms) > max_norm) if max_norm < 1 else (max(norms) < max_norm)  # active / not
    for k in run.params:
        torch.testing.assert_close(run.params[k], leaves[k].detach(), rtol=1e-10, atol=1e-12)
    assert run.config["max_grad_norm"] == max_norm


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"method": "sgd"}, ValueError, "method must be one of"),
        ({"meta_batch_size": 0}, ValueError, "meta_batch_size must be >= 1"),
        ({"iterations": -1}, ValueError, "iterations must be >= 0"),
        ({"meta_lr": 0.0}, ValueError, "meta_lr must be > 0"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": -1}, ValueError, r"seed must be in 0 … 2\*\*64 - 1"),
        ({"seed": 2**64}, ValueError, r"seed must be in 0 … 2\*\*64 - 1"),
        ({"log_every": 0}, ValueError, "log_every"),
        ({"lam": 1.0}, TypeError, "takes no keyword"),
        ({"method": "imaml", "lam": -1.0}, ValueError, "lam must be > 0"),
        ({"method": "reptile", "steps": 0}, ValueError, "steps must be >= 1 for 'reptile'"),
        ({"sample_tasks": 3}, TypeError, "sample_tasks must be a sampler"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0"),
        ({"max_grad_norm": "1"}, TypeError, "max_grad_norm"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
        ({"checkpoint_every": 5}, ValueError, "checkpoint_every needs checkpoint_dir"),
        ({"resume": True}, ValueError, "resume needs checkpoint_dir"),
        ({"checkpoint_dir": "/proc/no-such/x"}, ValueError, "checkpoint_dir .* is not writable"),
        ({"progress": 1}, TypeError, "progress must be a bool"),
    ],
)
def test_meta_train_bad_inputs_fail_before_any_iteration(change, error, match):
    change = dict(change)
    method = change.pop("method", "maml")
    with pytest.raises(error, match=match):
        train(method, **change)


def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        train(checkpoint_dir=tmp_path / "afile")
    with pytest.raises(ValueError, match="is not writable"):
        train(checkpoint_dir=tmp_path / "afile" / "sub")


def test_samplers_are_not_cast_data_of_another_dtype_is_an_error():
    def float32_tasks(n, *, generator, dtype):
        return SinusoidFamily(k_support=5)(n, generator=generator, dtype=torch.float32)

    with pytest.raises(
        TypeError, match=r"support x must have the dtype of params \(torch.float64\)"
    ):
        train(sample_tasks=float32_tasks)


# --- divergence, signals, resume --------------------------------------------------------------


def test_divergence_stops_with_the_last_finite_state_saved(tmp_path):
    with pytest.raises(TrainingDiverged, match="non-finite meta-loss at iteration") as caught:
        train("fomaml", lr=1e200, checkpoint_dir=tmp_path)
    error = caught.value
    assert error.result.history.shape == (error.iteration,)
    saved = load_checkpoint(tmp_path)
    assert saved.status == "diverged" and saved.iteration == error.iteration
    assert all(torch.isfinite(v).all() for v in saved.params.values())


def test_nan_in_the_data_stops_training_with_a_clear_message():
    def nan_tasks(n, *, generator, dtype):
        t = TINY_FAMILY(n, generator=generator, dtype=dtype)
        return t._replace(query=(t.query[0], torch.full_like(t.query[1], math.nan)))

    with pytest.raises(TrainingDiverged, match="NaN/inf in the data"):
        train(sample_tasks=nan_tasks)


def _interrupt_at(iteration, signum=signal.SIGINT):
    def on_log(done, value):
        if done == iteration:
            os.kill(os.getpid(), signum)

    return on_log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("method", ["maml", "imaml"])
def test_a_signal_checkpoints_and_resume_is_bit_identical(tmp_path, signum, method):
    full = train(method, iterations=40)
    with pytest.raises(TrainingInterrupted) as caught:
        train(
            method,
            iterations=40,
            checkpoint_dir=tmp_path,
            checkpoint_every=7,
            log_every=1,
            on_log=_interrupt_at(17, signum),
        )
    assert caught.value.signum == signum and caught.value.iteration == 17
    assert load_checkpoint(tmp_path).status == "interrupted"
    resumed = train(method, iterations=40, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(resumed.history, full.history)
    assert all(torch.equal(resumed.params[k], full.params[k]) for k in full.params)
    final = load_checkpoint(tmp_path)
    assert final.status == "finished" and final.iteration == 40
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_resume_extends_a_finished_run_bit_identically(tmp_path):
    full = train("fomaml", iterations=30)
    train("fomaml", iterations=12, checkpoint_dir=tmp_path)
    longer = train("fomaml", iterations=30, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(longer.history, full.history)


def test_resume_refuses_other_settings(tmp_path):
    train("fomaml", iterations=5, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume .* the settings differ \(meta_lr"):
        train("fomaml", iterations=10, checkpoint_dir=tmp_path, resume=True, meta_lr=0.5)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train("fomaml", iterations=10, checkpoint_dir=tmp_path / "empty", resume=True)


# --- checkpoints -------------------------------------------------------------------------------


def _checkpoint(run: TrainResult) -> Checkpoint:
    return Checkpoint(
        run.params,
        adam_init(run.params),
        run.history.numel(),
        torch.Generator().manual_seed(0).get_state(),
        run.history,
        run.config,
        "finished",
    )


def test_checkpoint_round_trip_is_exact(tmp_path):
    run = train("maml", iterations=4, checkpoint_dir=tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == json.loads(json.dumps(run.config))
    assert torch.equal(loaded.history, run.history) and loaded.iteration == 4
    assert list(loaded.params) == list(run.params)
    assert all(torch.equal(loaded.params[k], run.params[k]) for k in run.params)
    assert isinstance(loaded.optimizer, AdamState) and loaded.optimizer.step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".mamlkit.lock",
        "checkpoint.pt",
    ]  # no temporary left


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
            "cannot read checkpoint",
        ),
        (lambda p: p.write_bytes(b""), "cannot read checkpoint"),
        (lambda p: p.write_bytes(os.urandom(4096)), "cannot read checkpoint"),
        (lambda p: torch.save({"format": "other"}, p), "is not a mamlkit checkpoint"),
        (lambda p: torch.save({"format": "mamlkit-checkpoint", "version": 1}, p), "lacks"),
    ],
)
def test_a_damaged_checkpoint_is_an_error_that_names_the_file(tmp_path, damage, match):
    path = save_checkpoint(_checkpoint(train("maml", iterations=2)), tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=f"{match}.*|.*{path}.*") as caught:
        load_checkpoint(tmp_path)
    assert str(path) in str(caught.value)


def test_an_inconsistent_checkpoint_is_refused(tmp_path):
    ckpt = _checkpoint(train("maml", iterations=3))
    path = save_checkpoint(ckpt._replace(history=ckpt.history[:1]), tmp_path)
    with pytest.raises(CheckpointError, match=f"{path}.* is inconsistent"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_malicious_pickle_is_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "mamlkit-checkpoint", "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


# --- Adam and clipping ------------------------------------------------------------------------


def test_adam_update_is_torch_optim_adam_and_pure():
    p0 = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64), "b": torch.tensor(0.3, dtype=F64)}
    leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = torch.optim.Adam(leaves.values(), lr=0.05)
    params, state = p0, adam_init(p0)
    for step in range(5):
        g = {
            "w": torch.tensor([0.1, -3.0, 2.0], dtype=F64) * (step + 1),
            "b": torch.tensor(-0.7, dtype=F64),
        }
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        opt.step()
        old, old_m = (
            {k: v.clone() for k, v in params.items()},
            {k: v.clone() for k, v in state.m.items()},
        )
        new, state_new = adam_update(params, g, state, lr=0.05)
        assert all(torch.equal(params[k], old[k]) and torch.equal(state.m[k], old_m[k]) for k in p0)
        params, state = new, state_new
    for k in p0:
        torch.testing.assert_close(params[k], leaves[k].detach(), rtol=1e-12, atol=1e-14)
    assert state.step == 5


def test_clip_global_norm_is_clip_grad_norm():
    g = {"a": torch.tensor([3.0, 0.0], dtype=F64), "b": torch.tensor([[4.0]], dtype=F64)}
    leaves = [torch.zeros_like(v, requires_grad=True) for v in g.values()]
    for leaf, v in zip(leaves, g.values()):
        leaf.grad = v.clone()
    torch.nn.utils.clip_grad_norm_(leaves, 2.0)
    clipped = clip_global_norm(g, 2.0)
    for leaf, v in zip(leaves, clipped.values()):
        torch.testing.assert_close(v, leaf.grad)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_global_norm(g, 0.0)


def test_adam_update_bad_inputs():
    p = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"grads must have the keys of params"):
        adam_update(p, {"v": torch.zeros(2)}, adam_init(p), lr=0.1)
    with pytest.raises(TypeError, match="state must be an AdamState"):
        adam_update(p, p, {"t": 0}, lr=0.1)


# --- evaluation -------------------------------------------------------------------------------


def test_mean_ci95_against_a_hand_computation():
    values = torch.tensor([[1.0, 10.0], [2.0, 10.0], [6.0, 10.0]], dtype=F64)
    mean, half = mean_ci95(values)
    # column 0: mean 3, σ² = (4 + 1 + 9)/3 (divisor N, as np.std), half-width 1.96·σ/√3
    torch.testing.assert_close(mean, torch.tensor([3.0, 10.0], dtype=F64))
    torch.testing.assert_close(
        half, torch.tensor([1.96 * math.sqrt(14 / 3) / math.sqrt(3), 0.0], dtype=F64)
    )
    with pytest.raises(ValueError, match="values"):
        mean_ci95(torch.tensor(1.0))


def test_evaluate_matches_a_loop_of_sgd_steps():
    t = sample_sinusoid_tasks(
        6, k_support=5, k_query=7, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    params = mk.init_mlp((1, 8, 8, 1), dtype=F64)
    result = evaluate(MSE, params, t.support, t.query, lr=0.02, steps=4)
    assert result.losses.shape == (6, 5) and result.loss.shape == result.ci95.shape == (5,)
    for i in range(6):
        s, q = task(t.support, t.query, i)
        for j in range(5):
            torch.testing.assert_close(
                result.losses[i, j], MSE(mk.adapt(MSE, params, s, lr=0.02, steps=j), q)
            )
    torch.testing.assert_close(
        result.ci95, 1.96 * result.losses.std(0, correction=0) / math.sqrt(6)
    )


def test_the_95_interval_covers_a_known_mean_about_95_percent_of_the_time():
    """Coverage where the truth is known: 400 replications of 600 draws from N(μ, σ²); an interval
    made too small (as a bug dividing by N instead of √N would) covers far less often."""
    g = torch.Generator().manual_seed(0)
    draws = 2.0 + 3.0 * torch.randn(400, 600, generator=g, dtype=F64)
    mean, half = mean_ci95(draws.T)
    covered = ((mean - 2.0).abs() <= half).double().mean().item()
    assert 0.92 <= covered <= 0.98, covered
    assert ((mean - 2.0).abs() <= half / 24).double().mean().item() < 0.2


def test_a_diverged_checkpoint_holds_the_generator_from_before_its_chunk_was_drawn(tmp_path):
    """The run diverges inside the first chunk of tasks, after that chunk was drawn: resuming must
    draw the same chunk again, so the checkpoint holds the freshly seeded generator."""
    with pytest.raises(TrainingDiverged) as first:
        train("fomaml", lr=1e200, checkpoint_dir=tmp_path, iterations=250)
    saved = load_checkpoint(tmp_path)
    assert saved.iteration == first.value.iteration < saved.config["sample_chunk"]
    assert torch.equal(saved.generator, torch.Generator().manual_seed(TINY["seed"]).get_state())
    with pytest.raises(TrainingDiverged) as again:
        train("fomaml", lr=1e200, checkpoint_dir=tmp_path, iterations=250, resume=True)
    assert again.value.iteration == first.value.iteration


def test_a_divergence_inside_a_drawn_chunk_resumes_on_the_same_tasks(tmp_path):
    """Stop on a chunk boundary after its tasks were drawn: the checkpoint must hold the
    generator from before that draw."""
    full = train("maml", iterations=40)
    chunk = full.config["sample_chunk"]
    with pytest.raises(TrainingInterrupted):
        train(
            "maml",
            iterations=40,
            checkpoint_dir=tmp_path,
            log_every=1,
            on_log=_interrupt_at(min(chunk, 20)),
        )
    resumed = train("maml", iterations=40, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(resumed.history, full.history)
