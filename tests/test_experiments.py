"""The sinusoid reproduction: protocol, the method settings, the checks, and tiny end-to-end
runs through the Python API and the command line (several training seeds, resume, reports)."""

from __future__ import annotations

import json

import pytest
import torch

from mamlkit import METHODS
from mamlkit._cli import main
from mamlkit._experiments import common
from mamlkit._experiments.common import over_seeds
from mamlkit._experiments.sinusoid import (
    EXPERIMENT,
    PAPER_FIG3,
    PAPER_SOURCE,
    SETTINGS,
    SinusoidProtocol,
    method_settings,
    reproduce_sinusoid,
)
from mamlkit.train import load_checkpoint


def test_protocol_defaults_are_the_papers():
    p = SinusoidProtocol()
    assert p.sizes == (1, 40, 40, 1) and p.k_train == 10 and p.lr == 0.01 and p.meta_lr == 1e-3
    assert p.meta_batch_size == 25 and p.iterations == 70_000
    assert p.eval_k == (5, 10, 20) and p.eval_tasks == 600 and p.eval_steps == 10
    assert len(p.training_seeds) >= 3 and set(p.methods) <= set(METHODS)
    assert set(p.methods) == {"maml", "fomaml", "reptile", "imaml", "pretrained", "metasgd", "anil"}
    quick = SinusoidProtocol.quick()
    assert quick.iterations < p.iterations and quick.eval_tasks < p.eval_tasks
    assert quick.lr == p.lr and quick.meta_batch_size == p.meta_batch_size


def test_settings_are_the_protocol_and_the_table_with_the_experiment_changes():
    assert method_settings("imaml", 0.01) == {"lr": 0.01, "steps": 5, "lam": 10.0, "cg_steps": 5}
    assert method_settings("maml", 0.01) == {
        "lr": 0.01,
        "steps": 1,
        "reverse": "auto",
        "truncate": None,
        "step_weights": None,
        "per_step_keys": None,
    }
    assert method_settings("reptile", 0.01) == {"lr": 0.02, "steps": 5}
    assert set(SETTINGS) <= set(METHODS)
    with pytest.raises(TypeError, match="method 'maml' takes no keyword"):
        method_settings("maml", 0.01, {"lam": 3.0})
    with pytest.raises(ValueError, match="steps must be >= 1 for 'reptile'"):
        method_settings("reptile", 0.01, {"steps": 0})


def test_over_seeds_separates_the_two_kinds_of_uncertainty():
    curves = [{"mean": [1.0, 2.0], "ci95": [0.1, 0.2]}, {"mean": [3.0, 2.0], "ci95": [0.3, 0.2]}]
    s = over_seeds(curves)
    assert s["mean"] == [2.0, 2.0] and s["ci95"] == [pytest.approx(0.2), 0.2]
    assert s["seed_sd"][0] == pytest.approx(2**0.5) and s["seed_sd"][1] == 0.0
    assert over_seeds(curves[:1])["seed_sd"] == [0.0, 0.0]


def fake(maml, pretrained, half=0.1, sd=0.0):
    def curve(v):
        return {"mean": [3.0] + [v] * 10, "ci95": [0.2] + [half] * 10, "seed_sd": [0.0] + [sd] * 10}

    return {
        "protocol": {"eval_k": [5]},
        "methods": {
            "maml": {"summary": {"5": curve(maml)}},
            "pretrained": {"summary": {"5": curve(pretrained)}},
        },
    }


@pytest.mark.parametrize(
    ("maml", "pretrained", "sd", "quick", "expected"),
    [
        (0.4, 2.0, 0.0, True, [True]),
        (1.95, 2.0, 0.0, True, [False]),  # better mean, overlapping intervals: not a win
        (1.6, 2.0, 0.15, True, [False]),  # disjoint by test tasks alone, not with the seed spread
        (2.5, 2.0, 0.0, True, [False]),
        (0.4, 2.0, 0.0, False, [True, True, True, True]),  # + the Fig. 3 readings at 1, 5, 10 steps
        (0.46, 2.0, 0.0, False, [True, True, True, False]),  # 0.46 > 0.35 + 0.1 after 10 steps
        (0.75, 2.0, 0.0, False, [True, True, False, False]),  # 0.75 ≤ 0.67 + 0.1, > 0.38 + 0.1
    ],
)
def test_run_checks(maml, pretrained, sd, quick, expected):
    checks = EXPERIMENT.checks(fake(maml, pretrained, sd=sd), quick)
    assert [c["passed"] for c in checks] == expected
    if not quick:
        assert all(
            str(b) in checks[i + 1]["name"] for i, b in enumerate(PAPER_FIG3["maml"].values())
        )


def test_the_paper_readings():
    assert PAPER_FIG3 == {
        "maml": {1: 0.67, 5: 0.38, 10: 0.35},
        "pretrained": {1: 2.41, 5: 2.23, 10: 2.19},
    }
    assert "Fig. 3" in PAPER_SOURCE and "no table" in PAPER_SOURCE


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"methods": ["sgd"]}, ValueError, "method must be one of"),
        ({"methods": []}, ValueError, "methods must be a non-empty subset"),
        ({"workers": 0}, ValueError, "workers must be >= 1"),
        ({"eval_tasks": 0}, ValueError, "eval_tasks must be >= 1"),
        ({"seeds": [-1]}, ValueError, "seeds must be in"),
        ({"seeds": []}, ValueError, "seeds must list"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        reproduce_sinusoid(tmp_path, quick=True, **change)
    assert not (tmp_path / "checkpoints").exists()


def test_an_output_path_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        reproduce_sinusoid(tmp_path / "file", quick=True)


TINY = {"quick": True, "iterations": 30, "eval_tasks": 12, "progress": False}


def test_several_seeds_end_to_end(tmp_path):
    results = reproduce_sinusoid(tmp_path, methods=["maml", "pretrained"], seeds=[0, 1], **TINY)
    assert results["training_seeds"] == [0, 1] and results["mode"] == "quick"
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"]["maml"]["summary"] == results["methods"]["maml"]["summary"]
    for record in results["methods"].values():
        assert set(record["runs"]) == {"0", "1"}
        for k in ("5", "10", "20"):
            s = record["summary"][k]
            assert len(s["mean"]) == len(s["ci95"]) == len(s["seed_sd"]) == 11
            per_seed = [record["runs"][i]["eval"][k]["mean"][-1] for i in ("0", "1")]
            assert s["mean"][-1] == pytest.approx(sum(per_seed) / 2)
    a, b = (results["methods"]["maml"]["runs"][s]["eval"]["5"]["mean"] for s in ("0", "1"))
    assert a != b  # two seeds, two models
    text = (tmp_path / "results.md").read_text()
    assert "| maml | 5 |" in text and "(sd " in text and "between-seed standard deviation" in text
    assert f"| maml, {PAPER_SOURCE} | 5 | — | 0.67 | 0.38 | 0.35 |" in text
    for name in ("learning_curves.png", "mse_vs_steps.png", "fits.png"):
        assert (tmp_path / name).stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "maml-seed1")
    assert (
        ckpt.status == "finished" and ckpt.iteration == 30 and ckpt.params["w1"].shape == (40, 40)
    )


def test_results_are_written_before_figures_and_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "check_figures_possible", lambda: "figures skipped: no matplotlib")
    results = reproduce_sinusoid(tmp_path, methods=["maml"], **TINY)
    assert results["notes"] == ["figures skipped: no matplotlib"]
    assert (tmp_path / "results.json").is_file() and not list(tmp_path.glob("*.png"))


def test_a_diverging_method_is_reported_not_evaluated(tmp_path, monkeypatch):
    monkeypatch.setitem(SETTINGS, "fomaml", {"lr": 1e30})
    results = reproduce_sinusoid(tmp_path, methods=["maml", "fomaml"], figures=False, **TINY)
    run = results["methods"]["fomaml"]["runs"]["0"]
    assert "diverged" in run and "eval" not in run and "summary" not in results["methods"]["fomaml"]
    assert "summary" in results["methods"]["maml"]
    assert len(results["warnings"]) == 1 and results["warnings"][0].startswith(
        "fomaml seed 0 diverged"
    )
    assert "## Warnings" in (tmp_path / "results.md").read_text()


def test_resume_reuses_finished_runs(tmp_path):
    first = reproduce_sinusoid(tmp_path, methods=["fomaml"], figures=False, **TINY)
    again = reproduce_sinusoid(tmp_path, methods=["fomaml"], figures=False, resume=True, **TINY)
    assert again["methods"]["fomaml"]["runs"]["0"]["resumed"]
    assert again["methods"]["fomaml"]["summary"] == first["methods"]["fomaml"]["summary"]


def test_cli_train_then_evaluate(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = [
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
    assert main(argv) == 0
    capsys.readouterr()
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
    assert len(curves["5"]["mean"]) == 3 and all(torch.isfinite(torch.tensor(curves["5"]["mean"])))
    out = capsys.readouterr().out
    assert "| steps | K = 5 |" in out and "mean ± 95 % half-width over 20 test tasks" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_cli_train_imaml_takes_its_hyper_parameters(tmp_path):
    argv = [
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
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    config = load_checkpoint(tmp_path).config
    assert config["hypers"] == {"lam": 3.0, "cg_steps": 2} and config["steps"] == 5
