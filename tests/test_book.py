"""The book (`make book`) and the notebooks stay in step: every notebook is a chapter, in order, and
every chapter has the parts a reader relies on (notation table, exercises with hidden, checked
solutions, references)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _toc_files(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["file"]] if "file" in node else []
        return found + [f for value in node.values() for f in _toc_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _toc_files(item)]
    return []


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_the_table_of_contents_lists_every_notebook_once_in_order() -> None:
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"], *_toc_files(toc.get("parts", []))]
    chapters = [f for f in files if f.startswith("notebooks/")]
    assert chapters == [f"notebooks/{p.stem}" for p in NOTEBOOKS]
    for entry in files:
        assert any((ROOT / f"{entry}{ext}").is_file() for ext in (".md", ".ipynb")), entry
    assert {"book/intro", "book/notation", "book/references"} <= set(files)


def test_the_book_builds_offline_from_stored_outputs() -> None:
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert "sphinx-mathjax-offline" in config["sphinx"]["extra_extensions"]
    assert config["sphinx"]["config"]["nb_ipywidgets_js"] == {}  # no widget scripts from a CDN


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_notation_exercises_and_references(path: Path) -> None:
    cells = _cells(path)
    markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    assert any(m.startswith("## Notation") for m in markdown[:3]), "a notation table at the top"
    assert markdown[-1].startswith("## References") and "arxiv.org" in markdown[-1]
    start = next(i for i, c in enumerate(cells) if "".join(c["source"]).startswith("## Exercises"))
    solutions = [c for c in cells[start:] if c["cell_type"] == "code"]
    assert 2 <= len(solutions) <= 4, "2-4 exercises, each with a solution"
    for cell in solutions:
        assert "hide-input" in cell["metadata"].get("tags", []), "solutions start collapsed"
        source = "".join(cell["source"])
        assert "assert" in source or "close(" in source, "every solution is checked"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_slider_cells_have_a_static_twin_and_cannot_block_headless_runs(path: Path) -> None:
    for i, cell in enumerate(_cells(path)):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and "interact(" in source:
            assert 'os.environ.get("MAMLKIT_HEADLESS") == "1"' in source, f"cell {i}"
            assert any(
                "plt.show()" in "".join(c["source"]) for c in _cells(path)[max(0, i - 4) : i]
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_has_an_alt_text_that_describes_it(path: Path) -> None:
    """The book shows a figure's alt text to readers who cannot see it (cell metadata
    ``mystnb.image.alt``): a sentence, not the image's file name."""
    for i, cell in enumerate(_cells(path)):
        if any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
            alt = cell["metadata"].get("mystnb", {}).get("image", {}).get("alt", "")
            assert len(alt.split()) >= 8, f"cell {i}: alt text {alt!r}"
