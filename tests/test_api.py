"""The public surface: every name in ``mamlkit.__all__`` exists, is documented and typed."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import mamlkit
from mamlkit import symbolic


def _public_functions_of(module: types.ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == module.__name__
    )


def _assert_fully_typed(fn: typing.Callable, where: str) -> None:
    hints = typing.get_type_hints(fn)  # also fails if an annotation does not resolve
    missing = [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if name not in hints and name not in ("self", "cls")
    ]
    assert not missing, f"{where}: parameters without type hints: {missing}"
    assert "return" in hints, f"{where}: no return type hint"


def test_all_is_a_list_of_unique_names() -> None:
    assert isinstance(mamlkit.__all__, list)
    assert len(set(mamlkit.__all__)) == len(mamlkit.__all__), "duplicates in __all__"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from mamlkit import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(mamlkit.__all__)


@pytest.mark.parametrize("name", mamlkit.__all__)
def test_public_name_exists_and_is_documented(name: str) -> None:
    value = getattr(mamlkit, name)  # AttributeError if __all__ lists a missing name
    doc = inspect.getdoc(value)
    assert doc and doc.strip(), f"mamlkit.{name} has no docstring"


@pytest.mark.parametrize(
    "name", [n for n in mamlkit.__all__ if inspect.isfunction(getattr(mamlkit, n))]
)
def test_public_function_has_type_hints(name: str) -> None:
    _assert_fully_typed(getattr(mamlkit, name), f"mamlkit.{name}")


@pytest.mark.parametrize(
    "name", [n for n in mamlkit.__all__ if inspect.isclass(getattr(mamlkit, n))]
)
def test_public_class_methods_have_type_hints_and_docs(name: str) -> None:
    cls = getattr(mamlkit, name)
    typing.get_type_hints(cls)  # field annotations resolve
    for attr, value in vars(cls).items():
        if inspect.isfunction(value) and (not attr.startswith("_") or attr == "__call__"):
            _assert_fully_typed(value, f"mamlkit.{name}.{attr}")
        if isinstance(value, property) and not attr.startswith("_"):
            assert value.fget is not None
            assert "return" in typing.get_type_hints(value.fget), (
                f"mamlkit.{name}.{attr}: no return hint"
            )


@pytest.mark.parametrize("name", _public_functions_of(symbolic))
def test_symbolic_functions_are_documented_and_typed(name: str) -> None:
    fn = getattr(symbolic, name)
    assert inspect.getdoc(fn), f"mamlkit.symbolic.{name} has no docstring"
    _assert_fully_typed(fn, f"mamlkit.symbolic.{name}")


def test_package_is_marked_typed() -> None:
    assert (Path(mamlkit.__file__).parent / "py.typed").is_file()


def test_version_matches_pyproject() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser from PyPI
        import tomli as tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert mamlkit.__version__ == pyproject["project"]["version"]


def test_import_mamlkit_does_not_import_matplotlib() -> None:
    """The package is a library: plotting stays in the notebooks (and their optional extras)."""
    code = (
        "import sys, mamlkit, mamlkit.symbolic\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", f"import mamlkit pulled in {out.stdout.strip()}"


SUBMODULES = ("profiling", "tasks", "train")


@pytest.mark.parametrize("module", SUBMODULES)
def test_public_submodules_list_documented_names(module: str) -> None:
    sub = getattr(mamlkit, module)
    assert isinstance(sub.__all__, list) and len(set(sub.__all__)) == len(sub.__all__)
    assert inspect.getdoc(sub)
    for name in sub.__all__:
        value = getattr(sub, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert inspect.getdoc(value), f"mamlkit.{module}.{name} has no docstring"
        if inspect.isfunction(value):
            _assert_fully_typed(value, f"mamlkit.{module}.{name}")


def test_the_top_level_is_the_derivation_and_no_name_is_public_twice() -> None:
    top = set(mamlkit.__all__)
    for module in SUBMODULES:
        assert not top & set(getattr(mamlkit, module).__all__), (
            f"{module} names repeated at the top"
        )
    assert (
        len(top - {"profiling", "symbolic", "tasks", "train"}) <= 33
    )  # functions, types, the two tables


def test_import_mamlkit_is_light() -> None:
    """sympy (a quarter of a second) and matplotlib load only when asked for."""
    code = (
        "import sys, mamlkit, mamlkit.tasks, mamlkit.train\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sympy', 'matplotlib'}))\n"
        "mamlkit.symbolic\n"
        "print('sympy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["[]", "True"], out.stdout


def test_peak_memory_counts_storages_once_and_frees_them():
    import torch

    from mamlkit.profiling import PeakMemory

    with PeakMemory() as meter:
        first = torch.zeros(1000, dtype=torch.float32)  # 4 000 bytes
        second = torch.zeros(2000, dtype=torch.float32)  # 12 000 alive
        view = second[:10]  # a view: no new storage
        del first  # 8 000 alive
        third = torch.zeros(1000, dtype=torch.float32)  # 12 000 again, peak unchanged
    assert (meter.peak, meter.live) == (12_000, 12_000)
    del second, third, view
    assert meter.live == 0
