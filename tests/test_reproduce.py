"""The sinusoid reproduction: protocol, checks, and the CLI end to end (tiny budgets)."""

import json

import pytest
import torch

from mamlkit import load_checkpoint
from mamlkit._cli import main
from mamlkit._reproduce import (
    FULL_BOUNDS,
    METHOD_SETTINGS,
    PAPER_FIG3,
    PAPER_SOURCE,
    Protocol,
    reproduce_sinusoid,
    run_checks,
)


def test_protocol_defaults_are_the_papers():
    p = Protocol()
    assert p.sizes == (1, 40, 40, 1) and p.k_train == 10 and p.lr == 0.01 and p.meta_lr == 1e-3
    assert p.meta_batch_size == 25 and p.iterations == 70_000
    assert p.eval_k == (5, 10, 20) and p.eval_tasks == 600 and p.eval_steps == 10
    assert METHOD_SETTINGS["maml"] == {"lr": 0.01, "steps": 1}
    assert set(p.methods) == {"maml", "fomaml", "reptile", "imaml", "pretrained"}
    quick = Protocol.quick()
    assert quick.iterations < p.iterations and quick.eval_tasks < p.eval_tasks
    assert quick.lr == p.lr and quick.meta_batch_size == p.meta_batch_size


def fake_results(maml, pretrained, half=0.1):
    curve = lambda v: {"mse": [3.0] + [v] * 10, "ci95": [0.2] + [half] * 10}  # noqa: E731
    return {
        "protocol": {"eval_k": [5]},
        "methods": {
            "maml": {"eval": {"5": curve(maml)}},
            "pretrained": {"eval": {"5": curve(pretrained)}},
        },
    }


@pytest.mark.parametrize(
    ("maml", "pretrained", "quick", "expected"),
    [
        (0.4, 2.0, True, [True]),
        (1.95, 2.0, True, [False]),  # better mean, overlapping intervals: not a win
        (2.5, 2.0, True, [False]),
        (0.4, 2.0, False, [True, True, True, True]),  # + the Fig. 3 bounds at 1, 5, 10 steps
        (0.46, 2.0, False, [True, True, True, False]),  # 0.46 > 0.35 + 0.1 after 10 steps
        (0.75, 2.0, False, [True, True, False, False]),  # 0.75 ≤ 0.67 + 0.1, > 0.38 + 0.1
    ],
)
def test_run_checks(maml, pretrained, quick, expected):
    checks = run_checks(fake_results(maml, pretrained), quick)
    assert [c["passed"] for c in checks] == expected
    assert all(c["name"] and c["detail"] for c in checks)
    if not quick:
        assert all(str(b) in checks[i + 1]["name"] for i, b in enumerate(FULL_BOUNDS.values()))


def test_full_bounds_are_the_fig3_reading_of_maml():
    assert FULL_BOUNDS == {1: 0.67, 5: 0.38, 10: 0.35} == PAPER_FIG3["maml"]
    assert PAPER_FIG3["pretrained"] == {1: 2.41, 5: 2.23, 10: 2.19}
    assert "Fig. 3" in PAPER_SOURCE and "K = 5" in PAPER_SOURCE and "no table" in PAPER_SOURCE


def test_reproduce_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="methods must be"):
        reproduce_sinusoid(tmp_path, quick=True, methods=["sgd"])
    with pytest.raises(ValueError, match="workers must be"):
        reproduce_sinusoid(tmp_path, quick=True, workers=0)


def test_cli_reproduce_quick_writes_its_files(tmp_path):
    out = tmp_path / "run"
    argv = ["reproduce", "sinusoid", "--quick", "--iterations", "40", "--eval-tasks", "30"]
    argv += ["--methods", "maml", "reptile", "pretrained", "--out", str(out), "--no-progress"]
    rc = main(argv)
    results = json.loads((out / "results.json").read_text())
    assert rc == (0 if all(c["passed"] for c in results["checks"]) else 1)
    assert results["mode"] == "quick" and results["protocol"]["iterations"] == 40
    assert list(results["methods"]) == ["maml", "reptile", "pretrained"]
    for record in results["methods"].values():
        for k in ("5", "10", "20"):
            assert len(record["eval"][k]["mse"]) == 11 and len(record["eval"][k]["ci95"]) == 11
        assert len(record["learning_curve"]["meta_loss"]) == 40
    assert [c["name"].startswith("MAML beats pretrained") for c in results["checks"]] == [True] * 3
    text = (out / "results.md").read_text()
    assert "| maml | 5 |" in text
    assert f"| maml, {PAPER_SOURCE} | 5 | — | 0.67 | 0.38 | 0.35 |" in text
    assert results["paper"]["mse"]["pretrained"] == {"1": 2.41, "5": 2.23, "10": 2.19}
    for name in ("learning_curves.png", "mse_vs_steps.png", "fits.png"):
        assert (out / name).stat().st_size > 1000
    ckpt = load_checkpoint(out / "checkpoints" / "maml")
    assert ckpt.config["iterations"] == 40 and ckpt.history.numel() == 0
    assert ckpt.params["w1"].shape == (40, 40)


def test_cli_train_then_evaluate(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert (
        main(
            [
                "train",
                "--method",
                "fomaml",
                "--iterations",
                "5",
                "--sizes",
                "1",
                "8",
                "1",
                "--out",
                str(ckpt),
                "--no-progress",
            ]
        )
        == 0
    )
    run = load_checkpoint(ckpt)
    assert run.history.shape == (5,) and run.config["method"] == "fomaml"
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                "--k",
                "5",
                "--tasks",
                "20",
                "--steps",
                "2",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    curves = json.loads(report.read_text())
    assert len(curves["5"]["mse"]) == 3 and all(torch.isfinite(torch.tensor(curves["5"]["mse"])))
    assert "| 5 |" in capsys.readouterr().out


def test_cli_train_imaml_takes_its_settings(tmp_path):
    ckpt = tmp_path / "imaml"
    assert (
        main(
            [
                "train",
                "--method",
                "imaml",
                "--iterations",
                "2",
                "--sizes",
                "1",
                "8",
                "1",
                "--lam",
                "3.0",
                "--cg-steps",
                "2",
                "--out",
                str(ckpt),
                "--no-progress",
            ]
        )
        == 0
    )
    config = load_checkpoint(ckpt).config
    assert config["method_kwargs"] == {"lam": 3.0, "cg_steps": 2} and config["steps"] == 5


def test_a_diverging_method_is_reported_not_evaluated(tmp_path, monkeypatch):
    monkeypatch.setitem(METHOD_SETTINGS, "fomaml", {"lr": 1e30, "steps": 1})
    results = reproduce_sinusoid(
        tmp_path,
        quick=True,
        iterations=5,
        eval_tasks=10,
        methods=["maml", "fomaml"],
        progress=False,
        figures=False,
    )
    assert "diverged" in results["methods"]["fomaml"] and "eval" not in results["methods"]["fomaml"]
    assert "eval" in results["methods"]["maml"]
    assert len(results["warnings"]) == 1 and results["warnings"][0].startswith("fomaml diverged")
    assert "## Warnings" in (tmp_path / "results.md").read_text()
