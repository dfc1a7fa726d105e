"""A method registered from outside the package runs through every default path: the meta-batch
gradient on the default backend, training, evaluation (which asks the method how it adapts),
the command line and a reproduction — checked against an independent per-task reference."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import F64, assert_tree_close, random_mlp_problem, task
from torch.func import grad_and_value

import mamlkit as mk
from mamlkit import _methods
from mamlkit._cli import main
from mamlkit._experiments.sinusoid import reproduce_sinusoid
from mamlkit.tasks import SinusoidFamily
from mamlkit.train import evaluate, load_checkpoint, meta_train

NAME = "damped-fomaml"
MSE = mk.make_mse_loss(mk.mlp)


def _damped(loss, lr, steps, damping):
    """First-order MAML whose inner steps are ``damping·lr`` long."""

    def task_rule(theta, support, query):
        for _ in range(steps):
            g, _ = grad_and_value(loss)(theta, support)
            theta = {k: theta[k] - damping * lr * g[k].detach() for k in theta}
        theta = {k: v.detach() for k, v in theta.items()}
        return grad_and_value(loss)(theta, query)

    return task_rule


def _adapt_damped(loss, lr, damping):
    return mk.Adaptation(
        dict, lambda meta, theta, support, j: mk.adapt(loss, theta, support, lr=damping * lr)
    )


DAMPING = mk.Hyper(
    "damping", 0.5, float, mk.METHODS["imaml"].hypers[0].check, "inner step scale > 0"
)


@pytest.fixture
def damped():
    method = mk.register_method(
        mk.Method(
            NAME, "FOMAML with damped inner steps", _damped, (DAMPING,), adaptation=_adapt_damped
        )
    )
    yield method
    _methods._TABLE.pop(NAME)


def _reference(params, support, query, lr, steps, damping):
    grads = []
    for i in range(support[0].shape[0]):
        s, q = task(support, query, i)
        grads.append(mk.fomaml_grad(MSE, params, s, q, lr=damping * lr, steps=steps))
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}


def test_meta_batch_grad_on_the_default_backend(damped):
    params, support, query = random_mlp_problem((1, 5, 1), seed=3)
    grads, losses = mk.meta_batch_grad(
        NAME, MSE, params, support, query, lr=0.1, steps=2, damping=0.25
    )
    assert_tree_close(
        grads, _reference(params, support, query, 0.1, 2, 0.25), rtol=1e-10, atol=1e-12
    )
    assert losses.shape == (3,)
    with pytest.raises(ValueError, match=f"no fused kernel for method '{NAME}'"):
        mk.meta_batch_grad(NAME, MSE, params, support, query, lr=0.1, backend="fused")
    with pytest.raises(TypeError, match="takes no keyword"):
        mk.meta_batch_grad(NAME, MSE, params, support, query, lr=0.1, lam=1.0)


def test_training_and_evaluation_ask_the_method(damped):
    params = mk.init_mlp((1, 8, 1), seed=0, dtype=F64)
    family = SinusoidFamily(k_support=5)
    kw = {
        "meta_batch_size": 4,
        "iterations": 30,
        "lr": 0.05,
        "meta_lr": 0.01,
        "steps": 1,
        "seed": 1,
        "progress": False,
    }
    run = meta_train(NAME, MSE, params, family, damping=0.5, **kw)
    again = meta_train(NAME, MSE, params, family, damping=0.5, **kw)
    assert torch.equal(run.history, again.history) and torch.isfinite(run.history).all()
    assert run.config["method"] == NAME and run.config["backend"] == "vmap"
    assert run.config["hypers"] == {"damping": 0.5}
    tasks = family(6, generator=torch.Generator().manual_seed(9), dtype=F64)
    asked = evaluate(
        MSE, run.params, tasks.support, tasks.query, lr=0.05, steps=3, method=NAME, damping=0.5
    )
    plain = evaluate(MSE, run.params, tasks.support, tasks.query, lr=0.025, steps=3)  # SGD at 0.5·α
    torch.testing.assert_close(asked.losses, plain.losses, rtol=1e-12, atol=1e-14)


def test_the_command_line_and_a_reproduction(damped, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        NAME,
        "--damping",
        "0.3",
        "--iterations",
        "4",
        "--sizes",
        "1",
        "8",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    saved = load_checkpoint(out)
    assert saved.config["method"] == NAME and saved.config["hypers"] == {"damping": 0.3}
    assert main(["evaluate", str(out), "--k", "5", "--tasks", "10", "--steps", "2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert NAME in text and "--damping" in text
    results = reproduce_sinusoid(
        tmp_path / "repro",
        quick=True,
        methods=[NAME],
        iterations=10,
        eval_tasks=8,
        progress=False,
        figures=False,
    )
    assert "summary" in results["methods"][NAME]
    assert json.loads((tmp_path / "repro" / "results.json").read_text())["protocol"]["settings"][
        NAME
    ] == {"lr": 0.01, "steps": 1, "damping": 0.5}


def test_a_method_needs_only_a_name_a_summary_and_a_rule():
    method = mk.Method("joint-query", "the query gradient at θ", lambda loss, lr, steps: None)
    assert method.hypers == () and method.min_steps == 0 and not method.second_order
    assert method.adaptation is _methods.sgd_adaptation and method.init(
        {"w": torch.zeros(1)}
    ).keys() == {"w"}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: mk.register_method(mk.METHODS["maml"]),
            ValueError,
            "'maml' is already registered",
        ),
        (lambda: mk.register_method("maml"), TypeError, "must be a mamlkit.Method"),
        (lambda: mk.Method("Bad Name", "x", _damped), ValueError, "name must be lower case"),
        (lambda: mk.Method("x", "", _damped), TypeError, "summary"),
        (lambda: mk.Method("x", "x", 3), TypeError, "rule must be callable"),
        (
            lambda: mk.Method("x", "x", _damped, hypers=[DAMPING]),
            TypeError,
            "hypers must be a tuple",
        ),
        (lambda: mk.Method("x", "x", _damped, min_steps=-1), ValueError, "min_steps must be >= 0"),
        (
            lambda: mk.register_method(
                mk.Method("x", "x", _damped, (mk.Hyper("lam", 1, int, int, ""),))
            ),
            ValueError,
            "'lam' is already a float",
        ),
    ],
)
def test_bad_methods_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()
    assert "x" not in mk.METHODS


def test_the_table_is_read_only():
    with pytest.raises(TypeError):
        mk.METHODS["x"] = mk.METHODS["maml"]  # type: ignore[index]
