"""The offline glyph benchmark: what the bank holds, how tasks are sampled, the conv net, and a
tiny reproduction end to end."""

from __future__ import annotations

import json

import pytest
import torch

from mamlkit._experiments.glyphs import (
    EXPERIMENT,
    GlyphProtocol,
    nearest_neighbour,
    reproduce_glyphs,
)
from mamlkit._glyphs import DUPLICATE, SPLITS
from mamlkit.tasks import GlyphFamily, conv_net, glyph_bank


@pytest.fixture(scope="module")
def bank():
    return glyph_bank()


def test_the_bank_has_over_a_thousand_distinct_characters(bank):
    n = bank.codepoints.numel()
    assert n >= 1000 and len(set(bank.codepoints.tolist())) == n
    assert bank.char_start[0] == 0 and bank.char_start[-1] == bank.images.shape[0]
    assert bank.images.shape[1:] == (28, 28) and bank.images.dtype == torch.uint8
    regular = bank.images[bank.char_start[:-1]].float() / 255  # each character's first face
    assert (regular.sum((1, 2)) > 3).all()  # none blank
    distance = torch.cdist(regular.flatten(1), regular.flatten(1), p=1) / (28 * 28)
    distance.fill_diagonal_(1.0)
    assert distance.min() >= DUPLICATE  # none a duplicate of another
    assert ((bank.char_start[1:] - bank.char_start[:-1]) >= 2).all()  # at least two "drawers"


def test_splits_are_disjoint_scripts(bank):
    splits = {name: set(bank.split(name).tolist()) for name in SPLITS}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["val"])
    assert sum(map(len, splits.values())) == bank.codepoints.numel()
    test_scripts = {bank.scripts[i] for i in splits["test"]}
    assert test_scripts <= set(SPLITS["test"]) and len(splits["test"]) >= 200
    with pytest.raises(ValueError, match="split must be one of"):
        bank.split("dev")


def test_tasks_are_batched_seeded_and_balanced():
    family = GlyphFamily(ways=5, shots=2, queries=3, split="test")
    a = family(4, generator=torch.Generator().manual_seed(0))
    b = family(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.classes, b.classes)
    (xs, ys), (xq, yq) = a.support, a.query
    assert (
        xs.shape == (4, 10, 1, 28, 28)
        and xq.shape == (4, 15, 1, 28, 28)
        and xs.dtype == torch.get_default_dtype()
    )
    assert ys.dtype == yq.dtype == torch.int64
    assert all(
        torch.equal(torch.bincount(ys[t], minlength=5), torch.full((5,), 2)) for t in range(4)
    )
    assert all(len(set(c.tolist())) == 5 for c in a.classes)  # N different characters per task
    assert 0 <= xs.min() and xs.max() <= 1
    c = family(4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.support[0], c.support[0])
    assert (
        GlyphFamily()(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        .support[0]
        .dtype
        == torch.float64
    )


def test_distortions_differ_per_image():
    t = GlyphFamily(ways=1, shots=8, queries=1, split="train")(
        1, generator=torch.Generator().manual_seed(0)
    )
    images = t.support[0][0, :, 0]
    assert (images[1:] - images[:1]).abs().sum((1, 2)).min() > 0


@pytest.mark.parametrize(
    ("change", "match"),
    [({"ways": 0}, "ways"), ({"split": "x"}, "split"), ({"shots": 1.5}, "shots")],
)
def test_bad_families(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GlyphFamily(**change)


def test_conv_net_shapes_and_seed():
    net = conv_net(5, 8, seed=1)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    assert all(
        torch.equal(p, q) for p, q in zip(net.parameters(), conv_net(5, 8, seed=1).parameters())
    )
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 4


def test_nearest_neighbour_is_above_chance():
    result = nearest_neighbour(GlyphProtocol(eval_tasks=50))
    assert 0.2 < result["1"]["accuracy"] < result["5"]["accuracy"] < 1


def test_run_checks():
    rows = [
        {"method": "maml", "shots": 1, "accuracy": 0.93, "ci95": 0.01},
        {"method": "pretrained", "shots": 1, "accuracy": 0.5, "ci95": 0.02},
    ]
    results = {"protocol": {"eval_shots": [1]}, "results": rows}
    assert [c["passed"] for c in EXPERIMENT.checks(results, quick=False)] == [True, True]
    rows[0]["accuracy"] = 0.85
    checks = EXPERIMENT.checks(results, quick=False)
    assert [c["passed"] for c in checks] == [True, False] and "-5.0 points" in checks[1]["detail"]


def test_a_tiny_reproduction_writes_its_report(tmp_path):
    results = reproduce_glyphs(tmp_path, quick=True, iterations=4, eval_tasks=8, progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["shots"]) for r in on_disk["results"]} >= {
        ("maml", 1),
        ("maml", 5),
        ("fomaml", 5),
        ("pretrained", 1),
        ("nearest neighbour (pixels)", 5),
    }
    assert all(0 <= r["accuracy"] <= 1 and r["ways"] == 5 for r in results["results"])
    assert "| maml |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "glyphs_by_script.png").stat().st_size > 1000
