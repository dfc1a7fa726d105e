"""Pure functions: the caller's dicts, tensors, ``requires_grad`` and ``.grad`` come back untouched.

Each public function of the foundation modules is called on parameters of three kinds (plain
float64 tensors, leaves with ``requires_grad=True``, and ``dict(nn.Linear(...).named_parameters())``
with a ``.grad`` already set), and everything the caller handed over is compared before and after:
dict keys and order, the identity of every value, the values bit for bit, the in-place version
counter, ``requires_grad``, ``grad_fn``, and ``.grad`` (identity and values). Global state too:
grad mode, default dtype and the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mamlkit

F64 = torch.float64
FOUNDATION_MODULES = {
    "mamlkit._metagrad",
    "mamlkit._curvature",
    "mamlkit._params",
    "mamlkit._models",
}


@dataclass(frozen=True)
class TensorState:
    """Everything about a caller's tensor that a pure function must leave alone."""

    identity: int
    value: Tensor
    version: int  # torch's in-place counter: catches a change even if the value is restored
    requires_grad: bool
    grad_fn: object
    grad: tuple[int, Tensor, int] | None

    @classmethod
    def of(cls, t: Tensor) -> TensorState:
        g = t.grad
        return cls(
            id(t),
            t.detach().clone(),
            t._version,
            t.requires_grad,
            t.grad_fn,
            None if g is None else (id(g), g.clone(), g._version),
        )

    def assert_same(self, other: TensorState, where: str) -> None:
        assert self.identity == other.identity, f"{where}: replaced by another tensor"
        assert self.value.dtype == other.value.dtype, f"{where}: dtype changed"
        assert self.value.shape == other.value.shape, f"{where}: shape changed"
        assert torch.equal(self.value, other.value), f"{where}: values changed"
        assert self.version == other.version, f"{where}: modified in place"
        assert self.requires_grad == other.requires_grad, f"{where}: requires_grad changed"
        assert self.grad_fn is other.grad_fn, f"{where}: grad_fn changed"
        assert (self.grad is None) == (other.grad is None), f"{where}: .grad appeared/disappeared"
        if self.grad is not None:
            (i0, g0, v0), (i1, g1, v1) = self.grad, other.grad
            assert i0 == i1 and v0 == v1 and torch.equal(g0, g1), f"{where}: .grad changed"


def _state(obj: Any) -> Any:
    """A deep snapshot of dicts / tuples / lists of tensors, with container identities."""
    if isinstance(obj, Tensor):
        return TensorState.of(obj)
    if isinstance(obj, (dict, tuple, list)):
        items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
        return (type(obj), id(obj), [(k, _state(v)) for k, v in items])
    return (type(obj), id(obj))


def _assert_same(before: Any, after: Any, where: str = "") -> None:
    if isinstance(before, TensorState):
        assert isinstance(after, TensorState), where
        before.assert_same(after, where)
        return
    assert before[:2] == after[:2], f"{where}: container replaced"
    if len(before) == 3:
        assert [k for k, _ in before[2]] == [k for k, _ in after[2]], f"{where}: keys changed"
        for (k, b), (_, a) in zip(before[2], after[2]):
            _assert_same(b, a, f"{where}[{k!r}]")


# ---------------------------------------------------------------------------------------------
# three kinds of parameters
# ---------------------------------------------------------------------------------------------


def _linear_module() -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(3, 2, dtype=F64)


def _setup(kind: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    if kind == "nn.Linear":
        module = _linear_module()
        params = dict(module.named_parameters())
        params["weight"].grad = torch.full_like(params["weight"], 7.0)  # a stale .grad must survive

        def model_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(module, p, (x,))

    else:
        params = {"W": randn(2, 3), "b": randn(2)}
        if kind == "requires_grad":
            params = {k: v.requires_grad_(True) for k, v in params.items()}

        def model_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.tanh(x @ p["W"].T) + p["b"]

    support = (randn(5, 3), randn(5, 2))
    query = (randn(4, 3), randn(4, 2))
    v = {k: torch.ones_like(p).requires_grad_(kind != "plain") for k, p in params.items()}
    return {
        "model_fn": model_fn,
        "loss_fn": mamlkit.make_mse_loss(model_fn, reduction="mean"),
        "params": params,
        "support": support,
        "query": query,
        "v": v,
        "vector": randn(mamlkit.num_params(params)),
        "labels": torch.tensor([0, 1, 1, 0, 1]),  # class labels for the two outputs as logits
        "lrs": {
            k: torch.full_like(p.detach(), 0.1).requires_grad_(kind != "plain")
            for k, p in params.items()
        },
    }


KINDS = ("plain", "requires_grad", "nn.Linear")

# name → call(setup) → result; every argument the caller owns is in `setup` and is compared
CALLS: dict[str, Callable[[dict[str, Any]], object]] = {
    "adapt[k=0]": lambda s: mamlkit.adapt(s["loss_fn"], s["params"], s["support"], lr=0.1, steps=0),
    "adapt[k=2]": lambda s: mamlkit.adapt(s["loss_fn"], s["params"], s["support"], lr=0.1, steps=2),
    "adapt[first_order]": lambda s: mamlkit.adapt(
        s["loss_fn"], s["params"], s["support"], lr=0.1, steps=2, first_order=True
    ),
    "maml_grad": lambda s: mamlkit.maml_grad(
        s["loss_fn"], s["params"], s["support"], s["query"], lr=0.1, steps=2
    ),
    "maml_grad[adapt_keys, step_weights]": lambda s: mamlkit.maml_grad(
        s["loss_fn"],
        s["params"],
        s["support"],
        s["query"],
        lr=0.1,
        steps=2,
        adapt_keys=list(s["params"])[-1:],
        step_weights=[0.5, 1.0],
    ),
    "fomaml_grad[adapt_keys]": lambda s: mamlkit.fomaml_grad(
        s["loss_fn"],
        s["params"],
        s["support"],
        s["query"],
        lr=0.1,
        steps=2,
        adapt_keys=list(s["params"])[:1],
    ),
    "metasgd_grad": lambda s: mamlkit.metasgd_grad(
        s["loss_fn"], s["params"], s["lrs"], s["support"], s["query"], steps=2
    ),
    "maml_grad_hvp": lambda s: mamlkit.maml_grad_hvp(
        s["loss_fn"], s["params"], s["support"], s["query"], lr=0.1, steps=2
    ),
    "maml_grad_jacobian": lambda s: mamlkit.maml_grad_jacobian(
        s["loss_fn"], s["params"], s["support"], s["query"], lr=0.1, steps=2
    ),
    "fomaml_grad": lambda s: mamlkit.fomaml_grad(
        s["loss_fn"], s["params"], s["support"], s["query"], lr=0.1, steps=2
    ),
    "inner_jacobian": lambda s: mamlkit.inner_jacobian(
        s["loss_fn"], s["params"], s["support"], lr=0.1, steps=2
    ),
    "hessian": lambda s: mamlkit.hessian(s["loss_fn"], s["params"], s["support"]),
    "hvp": lambda s: mamlkit.hvp(s["loss_fn"], s["params"], s["support"], s["v"]),
    "mse_hessian_parts": lambda s: mamlkit.mse_hessian_parts(
        s["model_fn"], s["params"], *s["support"]
    ),
    "cross_entropy_hessian_parts": lambda s: mamlkit.cross_entropy_hessian_parts(
        s["model_fn"], s["params"], s["support"][0], s["labels"]
    ),
    "make_cross_entropy_loss": lambda s: mamlkit.make_cross_entropy_loss(s["model_fn"])(
        s["params"], (s["support"][0], s["labels"])
    ),
    "make_mse_loss": lambda s: mamlkit.make_mse_loss(s["model_fn"], reduction="half_sum")(
        s["params"], s["query"]
    ),
    "flatten_params": lambda s: mamlkit.flatten_params(s["params"]),
    "unflatten_params": lambda s: mamlkit.unflatten_params(s["vector"], s["params"]),
    "num_params": lambda s: mamlkit.num_params(s["params"]),
}
# the public name each entry exercises
COVERS = {name.split("[")[0] for name in CALLS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CALLS))
def test_caller_arguments_are_unchanged(name: str, kind: str) -> None:
    setup = _setup(kind)
    owned = {k: setup[k] for k in ("params", "support", "query", "v", "vector", "labels", "lrs")}
    before = _state(owned)
    grad_mode, dtype, rng = (
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
        torch.get_rng_state(),
    )

    result = CALLS[name](setup)

    _assert_same(before, _state(owned), name)
    assert torch.is_grad_enabled() == grad_mode
    assert torch.get_default_dtype() == dtype
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    if isinstance(result, dict):
        assert result is not setup["params"], "returned the caller's own dict"


@pytest.mark.parametrize("kind", ["requires_grad", "nn.Linear"])
@pytest.mark.parametrize(
    "name", ["maml_grad", "maml_grad_hvp", "maml_grad_jacobian", "fomaml_grad", "hvp"]
)
def test_leaf_parameters_get_no_grad_and_results_no_graph(name: str, kind: str) -> None:
    setup = _setup(kind)
    stale = {k: None if p.grad is None else p.grad.clone() for k, p in setup["params"].items()}
    result = CALLS[name](setup)
    for key, p in setup["params"].items():
        assert (p.grad is None) == (stale[key] is None), key
        if p.grad is not None:
            assert torch.equal(p.grad, stale[key]), key
    assert all(not t.requires_grad for t in result.values())


@pytest.mark.parametrize(
    "name", ["adapt[k=2]", "maml_grad", "fomaml_grad", "hessian", "mse_hessian_parts"]
)
def test_repeated_calls_give_identical_results(name: str) -> None:
    """Deterministic and stateless: the same call twice gives bit-identical answers."""
    setup = _setup("nn.Linear")
    first, second = CALLS[name](setup), CALLS[name](setup)
    for a, b in zip(_tensors(first), _tensors(second), strict=True):
        assert torch.equal(a, b)


def _tensors(result: object) -> list[Tensor]:
    if isinstance(result, dict):
        return list(result.values())
    return list(result) if isinstance(result, tuple) else [result]


def test_init_mlp_and_mlp_leave_global_state_and_inputs_alone() -> None:
    rng = torch.get_rng_state()
    params = mamlkit.init_mlp((2, 5, 1), seed=3, dtype=F64)
    again = mamlkit.init_mlp((2, 5, 1), seed=3, dtype=F64)
    mamlkit.init_mlp((2, 5, 1), seed=3, scheme="paper", dtype=F64)
    assert torch.equal(torch.get_rng_state(), rng), "init_mlp must use a private generator"
    assert all(torch.equal(params[k], again[k]) for k in params)

    params = {k: v.requires_grad_(True) for k, v in params.items()}
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    owned = {"params": params, "x": x}
    before = _state(owned)
    for activation in ("relu", "tanh"):
        mamlkit.mlp(params, x, activation=activation)
    _assert_same(before, _state(owned), "mlp")


def test_every_foundation_function_is_covered() -> None:
    """A new public function in a foundation module must be added to CALLS above."""
    public = {
        name
        for name in mamlkit.__all__
        if callable(getattr(mamlkit, name))
        and getattr(getattr(mamlkit, name), "__module__", "") in FOUNDATION_MODULES
        and not isinstance(getattr(mamlkit, name), type)
    }
    untested = public - COVERS - {"init_mlp", "mlp"}
    assert not untested, f"no mutation test for {sorted(untested)}"
