"""Fault tests: real processes stopped by SIGINT, SIGTERM and SIGKILL (also in the middle of a
checkpoint write), then resumed and compared bit for bit with runs that were never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlkit.train import load_checkpoint

ROOT = Path(__file__).parents[1]
TRAIN = [
    "train",
    "--method",
    "maml",
    "--sizes",
    "1",
    "8",
    "1",
    "--iterations",
    "1500",
    "--backend",
    "fused",
    "--no-progress",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mamlkit", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
        start_new_session=True,
    )


def _run(*argv: str) -> subprocess.CompletedProcess:
    """``python -m mamlkit *argv`` to completion (five minutes at most)."""
    return subprocess.run(
        [sys.executable, "-m", "mamlkit", *argv],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _same_run(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.status == y.status == "finished" and x.iteration == y.iteration
    assert torch.equal(x.history, y.history)
    assert all(torch.equal(x.params[k], y.params[k]) for k in x.params)
    assert all(torch.equal(x.optimizer.m[k], y.optimizer.m[k]) for k in x.params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _run(*TRAIN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_with_one_line_and_resume_is_bit_identical(
    tmp_path, uninterrupted, signum, code
):
    process = _start(*TRAIN, "--out", str(tmp_path), "--checkpoint-every", "200")
    _wait_for(tmp_path / "checkpoint.pt")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert err.strip().count("\n") == 0 and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path).status == "interrupted"
    resumed = _run(*TRAIN, "--out", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tmp_path, uninterrupted)


def test_sigkill_even_during_a_save_never_leaves_a_broken_checkpoint(tmp_path, uninterrupted):
    """A checkpoint every iteration, so the kills land in and around writes."""
    for delay in (0.3, 0.9):
        process = _start(
            *TRAIN,
            "--out",
            str(tmp_path),
            "--checkpoint-every",
            "1",
            *(["--resume"] if (tmp_path / "checkpoint.pt").exists() else []),
        )
        _wait_for(tmp_path / "checkpoint.pt")
        time.sleep(delay)
        process.kill()
        process.wait(timeout=60)
        saved = load_checkpoint(tmp_path)  # never torn: the old file or the new one
        assert saved.iteration == saved.history.numel() and saved.status in ("running", "finished")
    resumed = _run(*TRAIN, "--out", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tmp_path, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mamlkit.lock", "checkpoint.pt"]


REPRODUCE = [
    "reproduce",
    "sinusoid",
    "--quick",
    "--methods",
    "fomaml",
    "--seeds",
    "0",
    "1",
    "--workers",
    "2",
    "--iterations",
    "2500",
    "--eval-tasks",
    "10",
    "--no-figures",
    "--backend",
    "fused",
]


def _group_is_gone(process: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_reproduce_with_workers_stops_them_all_on_sigterm_and_resumes(tmp_path):
    process = _start(*REPRODUCE, "--out", str(tmp_path))
    _wait_for(tmp_path / "checkpoints" / "fomaml-seed1" / "checkpoint.pt", timeout=120)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("mamlkit: interrupted by SIGTERM")
    assert _group_is_gone(process), "a worker outlived its parent"
    for seed in (0, 1):
        assert load_checkpoint(tmp_path / "checkpoints" / f"fomaml-seed{seed}").status in (
            "interrupted",
            "finished",
        )
    done = _run(*REPRODUCE, "--out", str(tmp_path), "--resume")
    assert done.returncode in (0, 1), done.stderr  # 1: a check failed (a quick run is short)
    assert (tmp_path / "results.json").is_file()
    assert "fomaml/seed0: iteration" in done.stderr  # progress for every job with workers > 1


def test_workers_stop_when_their_parent_is_killed(tmp_path):
    process = _start(*REPRODUCE, "--out", str(tmp_path))
    _wait_for(tmp_path / "checkpoints" / "fomaml-seed1" / "checkpoint.pt", timeout=120)
    process.kill()
    process.wait(timeout=30)
    assert _group_is_gone(process, timeout=120), "orphaned workers kept training"
