"""Past one process: meta-batches sharded over torch.distributed ranks (gloo, on this CPU).

The receipts: N ranks compute what one process does — the meta-gradient of every method in float64
through the Python API, with shards of unequal size, and whole training runs under ``torchrun``;
a run resumes across world sizes; and the job survives the faults a cluster sees: a rank killed,
the launcher stopped, a rank that raises, a start-up that never completes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import F64, assert_tree_close, meta_parameters, random_mlp_problem

import mamlkit as mk
from mamlkit.tasks import SinusoidFamily
from mamlkit.train import load_checkpoint, meta_train

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
MSE = mk.make_mse_loss(mk.mlp)
HYPERS = {"imaml": {"lam": 2.0, "cg_steps": 3}}
TRAIN = ["train", "--sizes", "1", "8", "1", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


# --- the meta-gradient --------------------------------------------------------------------------

CASES = [
    (method, backend, tasks)
    for method in mk.METHODS
    for backend in ("auto", "vmap")
    for tasks in (25, 7, 2)
]


def _gradients(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    results = {}
    for method, backend, tasks in CASES:
        steps = max(2, mk.METHODS[method].min_steps)
        params, support, query = random_mlp_problem((1, 6, 1), tasks=tasks, seed=tasks)
        params = meta_parameters(method, params, lr=0.05, steps=steps)
        results[(method, backend, tasks)] = mk.meta_batch_grad(
            method,
            MSE,
            params,
            support,
            query,
            lr=0.05,
            steps=steps,
            backend=backend,
            group="world",
            **HYPERS.get(method, {}),
        )
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_compute_the_meta_gradient_one_process_does(tmp_path, world):
    """Every method, both backends, 25 tasks (13/12 or 9/8/8), 7 and 2 tasks (an empty shard on
    one of three ranks): every rank holds the meta-batch mean and every task's loss."""
    _spawn(_gradients, world, str(tmp_path))
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for method, backend, tasks in CASES:
            steps = max(2, mk.METHODS[method].min_steps)
            params, support, query = random_mlp_problem((1, 6, 1), tasks=tasks, seed=tasks)
            params = meta_parameters(method, params, lr=0.05, steps=steps)
            grads, losses = mk.meta_batch_grad(
                method,
                MSE,
                params,
                support,
                query,
                lr=0.05,
                steps=steps,
                backend=backend,
                **HYPERS.get(method, {}),
            )
            assert_tree_close(got[(method, backend, tasks)][0], grads, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(
                got[(method, backend, tasks)][1], losses, rtol=1e-12, atol=1e-14
            )


def test_the_mean_of_per_rank_means_is_not_the_meta_batch_mean():
    """The trap sharded meta-learning falls into: 25 tasks as 13 + 12, averaged as DDP averages."""
    params, support, query = random_mlp_problem((1, 6, 1), tasks=25, seed=25)
    per_task = [
        mk.maml_grad(
            MSE, params, (support[0][i], support[1][i]), (query[0][i], query[1][i]), lr=0.05
        )
        for i in range(25)
    ]
    flat = torch.stack([mk.flatten_params(g) for g in per_task])
    truth = flat.mean(0)
    mean_of_means = (flat[:13].mean(0) + flat[13:].mean(0)) / 2
    sum_over_total = (flat[:13].sum(0) + flat[13:].sum(0)) / 25
    assert (mean_of_means - truth).norm() / truth.norm() > 1e-3
    torch.testing.assert_close(sum_over_total, truth, rtol=1e-14, atol=1e-15)


TRAIN_SETTINGS = dict(
    meta_batch_size=7, iterations=15, lr=0.02, meta_lr=0.01, steps=1, seed=4, backend="vmap",
    progress=False,
)  # fmt: skip


def _train_ranks(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    run = meta_train(
        "maml",
        MSE,
        mk.init_mlp((1, 8, 1), seed=rank, dtype=F64),
        SinusoidFamily(k_support=5),
        **TRAIN_SETTINGS,
        group="world",
    )
    torch.save({"params": run.params, "history": run.history}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_meta_train_on_ranks_is_meta_train_in_one_process(tmp_path):
    """θ starts from rank 0's (each rank was given another initialisation on purpose)."""
    _spawn(_train_ranks, 2, str(tmp_path))
    one = meta_train(
        "maml",
        MSE,
        mk.init_mlp((1, 8, 1), seed=0, dtype=F64),
        SinusoidFamily(k_support=5),
        **TRAIN_SETTINGS,
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert_tree_close(got["params"], one.params, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["history"], one.history, rtol=1e-12, atol=1e-14)


def _raising(rank: int, world: int, port: int) -> None:
    _join(rank, world, port)
    if rank == 1:
        raise ValueError("rank 1 fails before its first collective")
    meta_train(
        "maml",
        MSE,
        mk.init_mlp((1, 8, 1)),
        SinusoidFamily(),
        meta_batch_size=4,
        iterations=3,
        lr=0.02,
        meta_lr=0.01,
        steps=1,
        seed=0,
        progress=False,
        group="world",
    )


def test_a_rank_that_raises_ends_the_job(tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails"):
        _spawn(_raising, 2)
    assert time.monotonic() - start < 120  # rank 0 did not wait for ever (its timeout is 20 s)


def test_group_without_torch_distributed_is_a_clear_error():
    params, support, query = random_mlp_problem((1, 6, 1))
    with pytest.raises(
        ValueError, match=r"group needs an initialised torch\.distributed process group"
    ):
        mk.meta_batch_grad("maml", MSE, params, support, query, lr=0.1, group="world")


# --- torchrun -----------------------------------------------------------------------------------


def _torchrun(ranks: int, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "mamlkit",
            *argv,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
        **kw,
    )


def _one(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mamlkit", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )


def _same_run(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.iteration == y.iteration and x.status == y.status == "finished"
    torch.testing.assert_close(x.history, y.history, rtol=1e-4, atol=1e-6)
    assert_tree_close(x.params, y.params, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("ranks", "tasks", "method", "backend"), [(2, 25, "maml", "auto"), (3, 7, "fomaml", "vmap")]
)
def test_torchrun_trains_what_one_process_trains(tmp_path, ranks, tasks, method, backend):
    argv = [
        *TRAIN,
        "--iterations",
        "12",
        "--meta-batch-size",
        str(tasks),
        "--method",
        method,
        "--backend",
        backend,
    ]
    assert _one(*argv, "--out", str(tmp_path / "one")).returncode == 0
    run = _torchrun(ranks, *argv, "--out", str(tmp_path / "many"))
    assert run.returncode == 0, run.stderr
    assert (
        f"{ranks} ranks" in run.stdout and run.stdout.count("final meta-loss") == 1
    )  # rank 0 reports
    _same_run(tmp_path / "one", tmp_path / "many")


def test_a_run_resumes_across_world_sizes(tmp_path):
    argv = [*TRAIN, "--meta-batch-size", "25", "--backend", "fused"]
    assert _one(*argv, "--iterations", "20", "--out", str(tmp_path / "whole")).returncode == 0
    assert _torchrun(2, *argv, "--iterations", "8", "--out", str(tmp_path / "a")).returncode == 0
    assert (
        _one(*argv, "--iterations", "20", "--out", str(tmp_path / "a"), "--resume").returncode == 0
    )
    assert _one(*argv, "--iterations", "8", "--out", str(tmp_path / "b")).returncode == 0
    resumed = _torchrun(2, *argv, "--iterations", "20", "--out", str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tmp_path / "whole", tmp_path / "a")
    _same_run(tmp_path / "whole", tmp_path / "b")


def _ranks_by_hand(world: int, argv: list[str]) -> list[subprocess.Popen]:
    """The ranks as torchrun starts them: its environment, one process each."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "mamlkit", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={
                **ENV,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(world)
    ]


def test_sigterm_stops_every_rank_after_the_same_iteration_and_resume_finishes(tmp_path):
    argv = [
        *TRAIN,
        "--iterations",
        "400",
        "--meta-batch-size",
        "25",
        "--backend",
        "fused",
        "--checkpoint-every",
        "50",
    ]
    assert _one(*argv, "--out", str(tmp_path / "whole")).returncode == 0
    out = tmp_path / "stopped"
    ranks = _ranks_by_hand(2, [*argv, "--out", str(out)])
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in ranks:  # what torchrun does with a SIGTERM: it forwards it to every rank
        process.send_signal(signal.SIGTERM)
    outputs = [process.communicate(timeout=120) for process in ranks]
    assert [process.returncode for process in ranks] == [143, 143], outputs
    saved = load_checkpoint(out)
    assert saved.status == "interrupted" and 0 < saved.iteration < 400
    for _, err in outputs:
        assert f"interrupted by SIGTERM after iteration {saved.iteration}" in err
    resumed = _torchrun(2, *argv, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tmp_path / "whole", out)


def test_a_killed_rank_ends_the_job_and_leaves_the_last_checkpoint_whole(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "mamlkit",
            *TRAIN,
            "--iterations",
            "1000000",
            "--backend",
            "fused",
            "--checkpoint-every",
            "20",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(job.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    os.kill(workers[-1], signal.SIGKILL)
    start = time.monotonic()
    job.communicate(timeout=90)
    assert job.returncode != 0 and time.monotonic() - start < 60
    saved = load_checkpoint(out)  # the last complete one, never torn
    assert saved.iteration == saved.history.numel() and saved.iteration % 20 == 0


def test_a_start_up_that_never_completes_is_one_line(tmp_path):
    """Rank 0 of a job of two whose second rank never comes."""
    port = _free_port()
    solo = subprocess.run(
        [
            sys.executable,
            "-m",
            "mamlkit",
            *TRAIN,
            "--iterations",
            "3",
            "--dist-timeout",
            "3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={
            **ENV,
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        },
    )
    assert solo.returncode == 1
    lines = solo.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mamlkit: error: torch.distributed did not start"
    ), solo.stderr
