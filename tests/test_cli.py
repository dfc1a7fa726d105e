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
    monkeypatch.setattr(mamlkit._verify, "run_checks", lambda seed=0: checks)
    monkeypatch.setenv("MAMLKIT_NUM_THREADS", "1")
    assert mamlkit._cli.main(["verify"]) == code
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"2 passed, {code} failed"
    assert ("FAIL" in out) == bool(code)
