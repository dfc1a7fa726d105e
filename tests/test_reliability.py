"""Nothing lost, no silent wrong answer: one writer per run folder, a folder holding a run is
never overwritten by accident, a damaged compiled kernel is rebuilt, a signal during start-up
and a full disk are one line — each in real processes."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mamlkit._cli import main
from mamlkit.train import load_checkpoint

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TRAIN = ["train", "--sizes", "1", "8", "1", "--backend", "fused", "--no-progress"]


def _run(*argv: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mamlkit", *argv],
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=ROOT,
        timeout=300,
        **kw,
    )


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("mamlkit: compiling")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_one_writer_per_folder(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mamlkit",
            *TRAIN,
            "--iterations",
            "1000000",
            "--checkpoint-every",
            "100000",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "pid" not in _read(out / ".mamlkit.lock"):
            time.sleep(0.1)
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = _run(*TRAIN, "--iterations", "3", "--out", str(out), *extra)
            if extra == ["--resume"] and "no checkpoint" in second.stderr:
                continue  # the first run has not written one yet: refused before the lock
            assert second.returncode == 1, second.stderr
            assert f"is in use by another mamlkit run (pid {first.pid})" in _one_line(second.stderr)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143  # it checkpointed and stopped, untouched by the others
    assert load_checkpoint(out).status == "interrupted"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_a_folder_that_holds_a_run_is_resumed_or_replaced_on_purpose(tmp_path):
    out = str(tmp_path / "run")
    assert _run(*TRAIN, "--iterations", "4", "--out", out).returncode == 0
    again = _run(*TRAIN, "--iterations", "6", "--out", out)
    assert again.returncode == 1
    line = _one_line(again.stderr)
    assert "holds a run at iteration 4" in line and "--resume" in line and "--overwrite" in line
    assert load_checkpoint(out).iteration == 4  # untouched
    assert _run(*TRAIN, "--iterations", "2", "--out", out, "--overwrite").returncode == 0
    assert load_checkpoint(out).iteration == 2


KERNEL = """
import torch, mamlkit as mk
p = mk.init_mlp((1, 3, 1), dtype=torch.float64)
x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4, 1)
g, _ = mk.meta_batch_grad("maml", mk.make_mse_loss(mk.mlp), p, (x, x.sin()), (x, x.cos()), lr=0.1,
                          backend="fused-compiled")
print(float(g["w0"].sum()))
"""


def test_a_damaged_kernel_cache_is_rebuilt_and_said_in_one_line(tmp_path):
    env = {**ENV, "MAMLKIT_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run(
        [sys.executable, "-c", KERNEL], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stderr
    assert "compiling the fused maml grad kernel ahead of time" in first.stderr
    (package,) = (tmp_path / "cache").glob("fused-*.pt2")
    package.write_bytes(b"not a zip archive" * 10)
    second = subprocess.run(
        [sys.executable, "-c", KERNEL], capture_output=True, text=True, env=env, timeout=600
    )
    assert second.returncode == 0, second.stderr
    assert (
        f"the cached kernel {package} is damaged" in second.stderr
        and "compiling it again" in second.stderr
    )
    assert second.stdout == first.stdout  # the same gradient from the rebuilt kernel
    shown = _run("cache", env=env)
    assert "compiled fused kernels: 1 file(s)" in shown.stdout
    cleared = _run("cache", "--clear", env=env)
    assert "removed 1 file(s)" in cleared.stdout and not list((tmp_path / "cache").glob("fused-*"))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_is_one_line(signum, code):
    process = subprocess.Popen(
        [sys.executable, "-m", "mamlkit", "verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    time.sleep(0.4)  # Python is up; mamlkit is importing torch (about a second)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert _one_line(err) == f"mamlkit: interrupted by {signal.Signals(signum).name}"


def test_a_full_disk_before_the_first_checkpoint_is_one_line_naming_the_folder(tmp_path):
    def small_files() -> None:  # a file cannot grow past 4 KiB: writes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "run"
    result = _run(
        *TRAIN,
        "--sizes",
        "1",
        "40",
        "40",
        "1",
        "--iterations",
        "2",
        "--out",
        str(out),
        preexec_fn=small_files,
    )
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith(f"mamlkit: error: cannot write {out / 'checkpoint.pt'}")
    assert "is the disk full?" in line


def test_the_glyph_benchmark_trains_and_evaluates_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "glyphs"
    argv = [
        "train",
        "--task",
        "glyphs",
        "--method",
        "fomaml",
        "--iterations",
        "2",
        "--channels",
        "4",
        "--meta-batch-size",
        "2",
        "--ways",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    saved = load_checkpoint(out)
    assert saved.config["tasks"]["type"] == "GlyphFamily" and saved.config["tasks"]["ways"] == 3
    capsys.readouterr()
    assert main(["evaluate", str(out), "--tasks", "6", "--steps", "1", "--k", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("query accuracy (%) after 0 … 1 fine-tuning steps of α = 0.4")
    assert (
        "| steps | 3-way 1-shot |" in text and max(len(line) for line in text.splitlines()) <= 100
    )
