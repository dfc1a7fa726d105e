"""``python -m mamlkit verify``: one PASS line per check, a summary line, and the exit code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mamlkit._cli
import mamlkit._verify
from mamlkit._verify import Check, format_report

ROOT = Path(__file__).parents[1]
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")


def test_verify_passes_end_to_end() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, "-m", "mamlkit", "verify"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    *checks, summary = lines
    match = SUMMARY.match(summary)
    assert match, f"no summary line, got {summary!r}"
    passed, failed = map(int, match.groups())
    assert failed == 0
    assert passed == len(checks) >= 10
    for line in checks:
        assert line.rstrip().endswith("PASS"), line
        assert "max err" in line
    assert len(set(checks)) == len(checks), "duplicate check lines"
    assert result.stderr == "", result.stderr  # no warnings on the way


def _fake_checks() -> list[Check]:
    return [
        Check("an identity that holds", "float64", 1e-15, 1e-12),
        Check("an identity that does not", "float64", 3e-2, 1e-12),
        Check("a symbolic identity", "sympy, exact", 0.0, 0.0),
    ]


def test_check_passes_only_within_its_tolerance() -> None:
    assert [c.passed for c in _fake_checks()] == [True, False, True]
    assert not Check("x", "sympy, exact", float("inf"), 0.0).passed
    assert not Check("x", "float64", float("nan"), 1.0).passed  # a NaN error never passes


def test_format_report_marks_failures() -> None:
    lines = format_report(_fake_checks()).splitlines()
    assert len(lines) == 4
    assert lines[0].endswith("PASS") and "an identity that holds" in lines[0]
    assert lines[1].endswith("FAIL") and "an identity that does not" in lines[1]
    assert "3.00e-02" in lines[1]
    assert lines[2].endswith("PASS")
    assert lines[3] == "2 passed, 1 failed"


@pytest.mark.parametrize(("checks", "code"), [(_fake_checks(), 1), (_fake_checks()[::2], 0)])
def test_main_exit_code_follows_the_checks(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    checks: list[Check],
    code: int,
) -> None:
    monkeypatch.setattr(mamlkit._verify, "run_checks", lambda seed=0, compiled=False: checks)
    monkeypatch.setenv("MAMLKIT_NUM_THREADS", "1")
    assert mamlkit._cli.main(["verify"]) == code
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"2 passed, {code} failed"
    assert ("FAIL" in out) == bool(code)


# ------------------------------------------------------------------------------ errors, exit codes


def _run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    base = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    base.pop("MAMLKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "mamlkit", *argv],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=timeout,
    )


def test_version_and_help_show_defaults() -> None:
    assert _run("--version").stdout.strip() == f"mamlkit {mamlkit.__version__}"
    text = _run("train", "--help").stdout
    assert "sinusoid 70,000" in text and "(default: maml)" in text and "--checkpoint-every" in text
    assert "--task" in text and "glyphs" in text
    top = _run("--help").stdout
    assert "``" not in top and "one line" in top  # plain text, not reST
    for line in text.splitlines():
        if line.strip().startswith("--") and "  " in line.strip():
            assert line.split(None, 1)[1].strip(), f"flag without help: {line}"


@pytest.mark.parametrize(
    ("argv", "env", "code", "message"),
    [
        (
            ["train", "--out", "{tmp}/afile", "--iterations", "3"],
            None,
            1,
            "--out '{tmp}/afile' exists and is not a folder",
        ),
        (["train", "--out", "{tmp}/afile/sub", "--iterations", "3"], None, 1, "is not writable"),
        (["train", "--out", "{tmp}/o", "--lam", "2"], None, 2, "method 'maml' does not take it"),
        (["train", "--out", "{tmp}/o", "--device", "cuda"], None, 2, "CUDA is not available"),
        (["train", "--out", "{tmp}/o", "--seed", str(2**64)], None, 2, "torch's seed range"),
        (["train", "--out", "{tmp}/o", "--resume"], None, 2, "no checkpoint"),
        (["train", "--out", "{tmp}/o", "--resume", "--overwrite"], None, 2, "not allowed with"),
        (
            ["train", "--out", "{tmp}/o", "--task", "glyphs", "--sizes", "1", "8", "1"],
            None,
            2,
            "--sizes: applies to --task sinusoid, not glyphs",
        ),
        (["train", "--out", "{tmp}/o", "--device", "meta"], None, 2, "holds no values"),
        (["train", "--out", "{tmp}/o", "--device", "bogus"], None, 2, "not a torch device"),
        (["reproduce", "sinusoid", "--eval-tasks", "0"], None, 2, "must be >= 1"),
        (["reproduce", "sinusoid", "--out", "{tmp}/afile"], None, 1, "exists and is not a folder"),
        (["evaluate", "{tmp}/nothing"], None, 1, "no checkpoint at"),
        (["evaluate", "{tmp}/o", "--json", "/no/such/dir/x.json"], None, 2, "cannot write"),
        (["verify"], {"OMP_NUM_THREADS": "two"}, 1, "OMP_NUM_THREADS must be a positive integer"),
    ],
)
def test_mistakes_are_one_line_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv,
    env,
    code,
    message,
) -> None:
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.delenv("MAMLKIT_DEBUG", raising=False)
    monkeypatch.delenv("MAMLKIT_NUM_THREADS", raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    try:
        returncode = mamlkit._cli.main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        returncode = exit_.code
    stderr = capsys.readouterr().err
    assert returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert message.replace("{tmp}", str(tmp_path)) in lines[-1]
    assert "Traceback" not in stderr
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("mamlkit: error: ")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = _run("evaluate", str(tmp_path), env={"MAMLKIT_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_omp_num_threads_is_read_as_openmp_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from mamlkit._runtime import threads_from_environment

    monkeypatch.delenv("MAMLKIT_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert threads_from_environment() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        threads_from_environment()
    monkeypatch.setenv("MAMLKIT_NUM_THREADS", "3")
    assert threads_from_environment() == 3
