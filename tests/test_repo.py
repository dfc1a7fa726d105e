"""The repository's files agree with each other: pyproject.toml is the one dependency list."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _conda_packages(environment: dict) -> list[str]:
    return [d for d in environment["dependencies"] if isinstance(d, str)]


def _pip_section(environment: dict) -> list[str]:
    sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip: section"
    return sections[0]


def _conda_spec(entry: str) -> tuple[str, str]:
    """'python=3.11' → ('python', '3.11'); conda's '=' pins a version prefix."""
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*=?\s*([0-9.]*)", entry.strip())
    assert match, entry
    return match.group(1), match.group(2)


def test_environment_pins_a_python_that_pyproject_supports(
    pyproject: dict, environment: dict
) -> None:
    specs = dict(_conda_spec(e) for e in _conda_packages(environment))
    assert specs.get("python"), "environment.yml must pin the interpreter (python=3.X)"
    assert Version(specs["python"]) in SpecifierSet(pyproject["project"]["requires-python"])


def test_environment_lists_only_python_and_pip_from_conda(environment: dict) -> None:
    names = sorted(_conda_spec(e)[0] for e in _conda_packages(environment))
    assert names == ["pip", "python"], f"dependencies belong in pyproject.toml, not conda: {names}"


def test_environment_pip_installs_the_package_with_a_cpu_torch(
    pyproject: dict, environment: dict
) -> None:
    pip = _pip_section(environment)
    assert pip[0].strip() == "--extra-index-url https://download.pytorch.org/whl/cpu", pip
    assert len(pip) == 2, f"the pip section should install the package only, got {pip}"
    match = re.fullmatch(r"-e\s+\.\[([A-Za-z0-9_,\- ]+)\]", pip[1].strip())
    assert match, f"expected '-e .[extras]', got {pip[1]!r}"
    extras = {e.strip() for e in match.group(1).split(",")}
    available = set(pyproject["project"]["optional-dependencies"])
    assert extras <= available, f"unknown extras {sorted(extras - available)}"


def test_optional_dependency_self_references_exist(pyproject: dict) -> None:
    groups = pyproject["project"]["optional-dependencies"]
    for group, requirements in groups.items():
        for line in requirements:
            req = Requirement(line)
            if req.name == pyproject["project"]["name"]:
                assert req.extras <= set(groups), f"[{group}] refers to missing extras {req.extras}"


def test_constraints_pin_torch_inside_the_supported_range(pyproject: dict) -> None:
    lines = [
        line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
    ]
    pins = {Requirement(line).name: Requirement(line) for line in lines if line}
    assert "torch" in pins, "constraints.txt must pin torch"
    (spec,) = pins["torch"].specifier
    assert spec.operator == "==", f"torch must be pinned exactly, got {spec}"
    supported = {
        Requirement(d).name: Requirement(d).specifier for d in pyproject["project"]["dependencies"]
    }
    assert Version(spec.version) in supported["torch"], (
        f"torch {spec.version} not in {supported['torch']}"
    )
    for name, req in pins.items():  # every pin constrains something pyproject actually depends on
        (pin,) = req.specifier
        if name in supported:
            assert Version(pin.version) in supported[name], (
                f"{name} {pin.version} not in {supported[name]}"
            )


def test_ci_runs_make_test() -> None:
    script = ROOT / ".ci" / "run"
    commands = [
        shlex.split(line)
        for line in script.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ["make", "test"] in commands, ".ci/run must call `make test`"
    assert script.stat().st_mode & 0o111, ".ci/run must be executable"


def test_makefile_has_the_two_reader_targets() -> None:
    targets = re.findall(r"^([A-Za-z_-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert {"lab", "test"} <= set(targets)


def test_readme_gives_the_two_commands() -> None:
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text()
    assert "make lab" in text and "make test" in text


def test_pytest_configuration(pyproject: dict) -> None:
    options = pyproject["tool"]["pytest"]["ini_options"]
    assert "tests" in options["testpaths"]
    assert "_build" in options["norecursedirs"]


def test_torch_floor_excludes_the_weights_only_loading_cve(pyproject: dict) -> None:
    """torch ≤ 2.5.1 can execute code while loading with weights_only=True (CVE-2025-32434)."""
    supported = {
        Requirement(d).name: Requirement(d).specifier for d in pyproject["project"]["dependencies"]
    }
    assert Version("2.5.1") not in supported["torch"] and Version("2.6.0") in supported["torch"]


def test_the_readme_python_examples_run(tmp_path: Path) -> None:
    """The README's Python blocks, in order, in one namespace, in a fresh process (one registers
    a method): an example that drifts from the API fails."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 4
    checks = """
assert set(grads) == {n for n, _ in net.named_parameters()}
assert all(torch.isfinite(v).all() for v in g_fo.values())
assert "joint" in mk.METHODS and set(g) == {"w0", "b0", "w1", "b1"}
assert run.config["optimizer"]["name"] == "SGD" and run.history.shape == (200,)
print("README examples ran")
"""
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks) + checks)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "README examples ran" in result.stdout, result.stderr
