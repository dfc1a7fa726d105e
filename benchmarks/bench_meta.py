"""The MAML sinusoid meta-gradient: mamlkit beside the fastest alternatives, in one process.

Setting (Finn et al. 2017, §5.1): a 1→40→40→1 ReLU MLP, 25 tasks per meta-batch, K = 10 support
and 10 query points, α = 0.01, mean-squared error, float32, one torch thread. Timed: the
task-mean meta-gradient only (one fixed meta-batch; no sampling, no optimizer step).

Implementations (each is a ``grad(support, query) -> dict`` of the meta-gradient):

- ``mamlkit compiled`` / ``mamlkit fused`` / ``mamlkit vmap``: the public call users make,
  ``mamlkit.meta_batch_grad(..., backend=...)`` every time (``"compiled"`` resolves to the
  ``fused-compiled`` backend here);
- ``mamlkit compiled, plan only``: the runner of that call's cached plan, called directly (what the
  public call adds on top of it is its per-call lookup; an internal row, labelled as such);
- ``torch.compile(vmap(grad))``: 20 lines of plain ``torch.func`` (the meta-objective unrolled,
  ``grad`` of it, ``vmap`` over tasks, then the mean), compiled with ``torch.compile`` defaults;
- ``torch.compile(grad(mean(vmap)))``: the same program with the mean inside the gradient;
- ``jax.jit(grad(mean(vmap)))``: the same program in JAX on XLA CPU (one thread);
- ``torch.func vmap`` (eager), ``autograd loop`` (a Python loop over tasks with
  ``autograd.grad(create_graph=True)``), ``higher``, ``torchopt``: the eager ways and libraries.

Method: (1) every implementation's meta-gradient is computed in float64 and asserted equal
(relative error < 1e-9) to mamlkit's exact per-task engines before any timing; (2) warm-up, then
shuffled rounds in which every case runs a block of calls; medians over rounds and ratios taken
within each round; (3) the FLOPs of one meta-gradient (matrix products, counted by
``torch.utils.flop_counter`` on the eager torch.func program) and each implementation's
achieved GFLOP/s; (4) compile times, cold (fresh caches, in a new process) and warm (caches
kept), for mamlkit's compiled backend, torch.compile and JAX; (5) peak memory against the
number of inner steps for mamlkit's engines.

Run on a quiet machine: ``make bench`` (or ``python benchmarks/bench_meta.py``; ``--quick`` for a
smoke run). Writes ``benchmarks/results/report.{md,json}`` and ``meta_gradient.png``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import numpy as np
import torch
import torch.nn.functional as F
from _cold_warm import cold_and_warm
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import mamlkit
from mamlkit._metabatch import plan_meta_batch  # the internal "plan only" row, labelled as such
from mamlkit.tasks import sample_sinusoid_tasks

SIZES = (1, 40, 40, 1)
TASKS, K, ALPHA, SEED = 25, 10, 0.01, 0
NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")
MSE = mamlkit.make_mse_loss(mamlkit.mlp)
SETTINGS: dict[str, tuple[str, int]] = {
    "maml k=1": ("maml", 1),
    "fomaml k=1": ("fomaml", 1),
    "maml k=5": ("maml", 5),
}
COMPILED, PLAN, JAX = (
    "mamlkit compiled",
    "mamlkit compiled, plan only (internal)",
    "jax.jit(grad(mean(vmap)))",
)
TORCH_COMPILE, TORCH_COMPILE_MEAN = "torch.compile(vmap(grad))", "torch.compile(grad(mean(vmap)))"
EAGER_LIBRARIES = ("higher", "torchopt")
Batch = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------- implementations


def _mse(pred: Tensor, y: Tensor) -> Tensor:
    return (pred - y).pow(2).mean()


def _net(p: dict[str, Tensor] | list[Tensor], x: Tensor) -> Tensor:
    """The 1-40-40-1 ReLU MLP written out (independent of mamlkit)."""
    w = list(p.values()) if isinstance(p, dict) else p
    h = F.relu(F.linear(x, w[0], w[1]))
    h = F.relu(F.linear(h, w[2], w[3]))
    return F.linear(h, w[4], w[5])


def _meta_objective(method: str, steps: int) -> Callable[..., Tensor]:
    """One task's meta-objective, the inner loop unrolled (what a user writes instead)."""
    inner_grad = grad(lambda p, x, y: _mse(_net(p, x), y))

    def meta_objective(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = inner_grad(p, xs, ys)
            if method == "fomaml":
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - ALPHA * g[k] for k in p}
        return _mse(_net(p, xq), yq)

    return meta_objective


def _torch_func_program(method: str, steps: int) -> Callable[..., dict[str, Tensor]]:
    """``vmap(grad(meta_objective))`` over tasks, then the mean."""
    per_task = vmap(grad(_meta_objective(method, steps)), in_dims=(None, 0, 0, 0, 0))

    def meta_gradient(p, xs, ys, xq, yq):
        return {k: v.mean(0) for k, v in per_task(p, xs, ys, xq, yq).items()}

    return meta_gradient


def _torch_func_mean_program(method: str, steps: int) -> Callable[..., dict[str, Tensor]]:
    """``grad(mean(vmap(meta_objective)))``: the mean inside the gradient."""
    batched = vmap(_meta_objective(method, steps), in_dims=(None, 0, 0, 0, 0))
    return grad(lambda p, *data: batched(p, *data).mean())


def _jax_program(method: str, steps: int) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp

    def net(p, x):
        h = jax.nn.relu(x @ p["w0"].T + p["b0"])
        h = jax.nn.relu(h @ p["w1"].T + p["b1"])
        return h @ p["w2"].T + p["b2"]

    def mse(p, x, y):
        return jnp.mean((net(p, x) - y) ** 2)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = jax.grad(mse)(p, xs, ys)
            if method == "fomaml":
                g = jax.lax.stop_gradient(g)
            p = jax.tree.map(lambda a, b: a - ALPHA * b, p, g)
        return mse(p, xq, yq)

    def objective(p, xs, ys, xq, yq):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq))

    return jax.jit(jax.grad(objective))


class Impl:
    """``grad(support, query)``: the task-mean meta-gradient as a dict (keys w0 … b2)."""

    def __init__(self, params: dict[str, Tensor], setting: str) -> None:
        self.params = params
        self.method, self.steps = SETTINGS[setting]

    def grad(self, support: Batch, query: Batch) -> dict[str, Tensor]:
        raise NotImplementedError


class MamlkitBackend(Impl):
    """The public call, every time."""

    backend = "compiled"

    def grad(self, support, query):
        return mamlkit.meta_batch_grad(
            self.method,
            MSE,
            self.params,
            support,
            query,
            lr=ALPHA,
            steps=self.steps,
            backend=self.backend,
        )[0]


class MamlkitPlan(Impl):
    """The runner of the public call's cached plan, called directly (internal)."""

    def grad(self, support, query):
        if not hasattr(self, "run"):
            self.run = plan_meta_batch(
                self.method,
                MSE,
                self.params,
                support,
                query,
                lr=ALPHA,
                steps=self.steps,
                backend="compiled",
            ).run
        return self.run(self.params, support, query)[0]


class MamlkitFused(MamlkitBackend):
    backend = "fused"


class MamlkitVmap(MamlkitBackend):
    backend = "vmap"


class TorchCompile(Impl):
    program = staticmethod(_torch_func_program)

    def grad(self, support, query):
        if not hasattr(self, "fn"):
            self.fn = torch.compile(self.program(self.method, self.steps))
        return self.fn(self.params, *support, *query)


class TorchCompileMean(TorchCompile):
    program = staticmethod(_torch_func_mean_program)


class TorchFuncEager(Impl):
    def grad(self, support, query):
        return _torch_func_program(self.method, self.steps)(self.params, *support, *query)


class Jax(Impl):
    def grad(self, support, query):
        import jax

        if not hasattr(self, "fn"):
            self.fn = _jax_program(self.method, self.steps)
            self.p = {k: jax.numpy.asarray(v.numpy()) for k, v in self.params.items()}
            self.data = {}
        key = id(support)
        if key not in self.data:  # device arrays made once per meta-batch, as a JAX user would
            self.data = {key: [jax.numpy.asarray(t.numpy()) for t in (*support, *query)]}
        return jax.block_until_ready(
            self.fn(self.p, *self.data[key])
        )  # JAX arrays: no conversion timed


class AutogradLoop(Impl):
    def grad(self, support, query):
        leaves = [self.params[k].clone().requires_grad_() for k in NAMES]
        (xs, ys), (xq, yq) = support, query
        n = xs.shape[0]
        for t in range(n):
            fast = leaves
            for _ in range(self.steps):
                g = torch.autograd.grad(
                    _mse(_net(fast, xs[t]), ys[t]), fast, create_graph=self.method == "maml"
                )
                fast = [w - ALPHA * gw for w, gw in zip(fast, g)]
            (_mse(_net(fast, xq[t]), yq[t]) / n).backward()
        return {k: leaf.grad for k, leaf in zip(NAMES, leaves)}


def _module(params: dict[str, Tensor]) -> nn.Module:
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    net = net.to(params["w0"].dtype)
    with torch.no_grad():
        for p, key in zip(net.parameters(), NAMES):
            p.copy_(params[key])
    return net


class Higher(Impl):
    """higher.innerloop_ctx(copy_initial_weights=False, track_higher_grads=not first_order)."""

    def grad(self, support, query):
        import higher

        net = _module(self.params)
        inner = torch.optim.SGD(net.parameters(), lr=ALPHA)
        (xs, ys), (xq, yq) = support, query
        n = xs.shape[0]
        for t in range(n):
            with higher.innerloop_ctx(
                net, inner, copy_initial_weights=False, track_higher_grads=self.method == "maml"
            ) as (fnet, diffopt):
                for _ in range(self.steps):
                    diffopt.step(_mse(fnet(xs[t]), ys[t]))
                loss = _mse(fnet(xq[t]), yq[t]) / n
                if self.method == "maml":
                    loss.backward()
                else:
                    for p, g in zip(
                        net.parameters(), torch.autograd.grad(loss, list(fnet.parameters()))
                    ):
                        p.grad = g if p.grad is None else p.grad + g
        return {k: p.grad for k, p in zip(NAMES, net.parameters())}


class TorchOpt(Impl):
    """torchopt.MetaSGD with extract/recover_state_dict (its MAML example); first order:
    torchopt.sgd + apply_updates on detached gradients."""

    def grad(self, support, query):
        import torchopt

        net = _module(self.params)
        leaves, names = list(net.parameters()), [name for name, _ in net.named_parameters()]
        (xs, ys), (xq, yq) = support, query
        n = xs.shape[0]
        inner, sgd = torchopt.MetaSGD(net, lr=ALPHA), torchopt.sgd(lr=ALPHA)
        for t in range(n):
            if self.method == "fomaml":
                fast = tuple(leaves)
                state = sgd.init(fast)
                for _ in range(self.steps):
                    g = torch.autograd.grad(
                        _mse(torch.func.functional_call(net, dict(zip(names, fast)), xs[t]), ys[t]),
                        fast,
                    )
                    updates, state = sgd.update(g, state, inplace=False)
                    fast = torchopt.apply_updates(fast, updates, inplace=False)
                (
                    _mse(torch.func.functional_call(net, dict(zip(names, fast)), xq[t]), yq[t]) / n
                ).backward()
                continue
            net_state, opt_state = (
                torchopt.extract_state_dict(net),
                torchopt.extract_state_dict(inner),
            )
            for _ in range(self.steps):
                inner.step(_mse(net(xs[t]), ys[t]))
            (_mse(net(xq[t]), yq[t]) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner, opt_state)
        return {k: p.grad for k, p in zip(NAMES, leaves)}


def _as_torch(value: Any) -> Tensor:
    """A torch tensor of a torch or JAX result (JAX arrays are read-only: copied)."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value).copy())


IMPLS: dict[str, type[Impl]] = {
    COMPILED: MamlkitBackend,
    PLAN: MamlkitPlan,
    "mamlkit fused": MamlkitFused,
    "mamlkit vmap": MamlkitVmap,
    TORCH_COMPILE: TorchCompile,
    TORCH_COMPILE_MEAN: TorchCompileMean,
    JAX: Jax,
    "torch.func vmap (eager)": TorchFuncEager,
    "autograd loop": AutogradLoop,
    "higher": Higher,
    "torchopt": TorchOpt,
}


def available(name: str) -> str | None:
    """None when usable here, else why not."""
    module = {"higher": "higher", "torchopt": "torchopt", JAX: "jax"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:
        return f"not installed or not importable: {type(error).__name__}: {error}"[:200]
    return None


# -------------------------------------------------------------------------------- the problem


def problem(dtype: torch.dtype) -> tuple[dict[str, Tensor], Batch, Batch]:
    tasks = sample_sinusoid_tasks(
        TASKS, k_support=K, generator=torch.Generator().manual_seed(SEED), dtype=dtype
    )
    params = mamlkit.init_mlp(SIZES, seed=SEED, dtype=dtype)
    return (
        params,
        tuple(t.contiguous() for t in tasks.support),
        tuple(t.contiguous() for t in tasks.query),
    )


def reference(setting: str, params, support, query) -> dict[str, Tensor]:
    """mamlkit's exact per-task engines, task-averaged (never a meta-batch backend)."""
    method, steps = SETTINGS[setting]
    engine = mamlkit.maml_grad if method == "maml" else mamlkit.fomaml_grad
    grads = [
        engine(
            MSE,
            params,
            (support[0][t], support[1][t]),
            (query[0][t], query[1][t]),
            lr=ALPHA,
            steps=steps,
        )
        for t in range(support[0].shape[0])
    ]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}


def check_gradients(cases: list[tuple[str, str]]) -> dict[str, float]:
    """float64: every implementation's meta-gradient equals mamlkit's exact one (assert)."""
    if any(impl == JAX for impl, _ in cases):
        import jax

        jax.config.update("jax_enable_x64", True)
    params, support, query = problem(torch.float64)
    errors = {}
    refs = {s: reference(s, params, support, query) for s in {s for _, s in cases}}
    for impl, setting in cases:
        got = {
            k: _as_torch(v) for k, v in IMPLS[impl](params, setting).grad(support, query).items()
        }
        ref = refs[setting]
        scale = max(float(v.abs().max()) for v in ref.values())
        error = max(float((got[k].to(torch.float64) - ref[k]).abs().max()) for k in ref) / scale
        errors[f"{impl} | {setting}"] = error
        assert error < 1e-9, (
            f"{impl} {setting}: relative error {error:.2e} against mamlkit's exact engines"
        )
    return errors


# -------------------------------------------------------------------------------------- timing


def _quantiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "min": min(values)}


def time_cases(
    cases: list[tuple[str, str]], rounds: int, warmup: int, block_s: float
) -> dict[tuple[str, str], list[float]]:
    """ms per meta-gradient of every case in every round (rounds interleave all cases)."""
    params, support, query = problem(torch.float32)
    objects = {c: IMPLS[c[0]](params, c[1]) for c in cases}
    reps = {}
    for c, obj in objects.items():
        for _ in range(warmup):
            obj.grad(support, query)
        start = time.perf_counter()
        obj.grad(support, query)
        reps[c] = max(1, min(2000, round(block_s / (time.perf_counter() - start))))
    rng = random.Random(SEED)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for c in order:
            obj, n = objects[c], reps[c]
            start = time.perf_counter()
            for _ in range(n):
                obj.grad(support, query)
            times[c].append((time.perf_counter() - start) / n * 1e3)
    return times


def per_round_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    return _quantiles([a / b for a, b in zip(numerator, denominator)])


def flops(setting: str) -> int:
    """Matrix-product FLOPs of one meta-gradient, counted on the eager torch.func program."""
    params, support, query = problem(torch.float32)
    method, steps = SETTINGS[setting]
    with FlopCounterMode(display=False) as counter:
        _torch_func_program(method, steps)(params, *support, *query)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------- compile times

_COMPILE_PROBE = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import bench_meta as b
which, setting = sys.argv[1], sys.argv[2]
params, support, query = b.problem(torch.float32)
impl = b.IMPLS[which](params, setting)
start = time.perf_counter()
impl.grad(support, query)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def compile_times(which: str, setting: str) -> dict[str, float]:
    """First call in a fresh process with empty caches (cold), then again with the caches the
    first one left (warm)."""
    code = _COMPILE_PROBE.format(bench=str(Path(__file__).parent))
    return cold_and_warm([sys.executable, "-c", code, which, setting])


# ------------------------------------------------------------------------------------- memory


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (allocated − freed) bytes of torch's CPU allocator during ``fn()``, between
    top-level operators (torch.profiler memory events); the inputs are not counted."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.end
    )
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage
        peak = max(peak, current)
    return peak


def memory_sweep(ks: list[int]) -> dict[str, dict[int, int]]:
    params, support, query = problem(torch.float32)
    s, q = (support[0][0], support[1][0]), (query[0][0], query[1][0])
    engines: dict[str, Callable[[int], Any]] = {
        "maml_grad (autodiff through the loop)": lambda k: mamlkit.maml_grad(
            MSE, params, s, q, lr=ALPHA, steps=k
        ),
        "maml_grad_hvp (reverse HVP pass)": lambda k: mamlkit.maml_grad_hvp(
            MSE, params, s, q, lr=ALPHA, steps=k
        ),
        "fomaml_grad": lambda k: mamlkit.fomaml_grad(MSE, params, s, q, lr=ALPHA, steps=k),
        **{
            f"fused kernels, all 25 tasks, reverse={route!r}": functools.partial(
                _fused_meta_batch, params, support, query, route
            )
            for route in ("unroll", "hvp")
        },
    }
    return {name: {k: peak_bytes(lambda f=f, k=k: f(k)) for k in ks} for name, f in engines.items()}


def _fused_meta_batch(params, support, query, route: str, k: int) -> Any:
    return mamlkit.meta_batch_grad(
        "maml", MSE, params, support, query, lr=ALPHA, steps=k, backend="fused", reverse=route
    )


def slope(points: dict[int, int]) -> float:
    ks, ys = list(points), list(points.values())
    mk_, my = statistics.mean(ks), statistics.mean(ys)
    return sum((k - mk_) * (y - my) for k, y in zip(ks, ys)) / sum((k - mk_) ** 2 for k in ks)


# ------------------------------------------------------------------------------------- report


def summarize(
    times: dict, cases: list[tuple[str, str]], flop_counts: dict[str, int]
) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}, "ratios": {}}
    for impl, setting in cases:
        row = _quantiles(times[(impl, setting)])
        row["gflops"] = flop_counts[setting] / (row["median"] * 1e-3) / 1e9
        out["cases"][f"{impl} | {setting}"] = row
    for setting in SETTINGS:
        if (COMPILED, setting) not in times:
            continue
        ours = times[(COMPILED, setting)]
        for rival in (
            TORCH_COMPILE,
            TORCH_COMPILE_MEAN,
            JAX,
            PLAN,
            "mamlkit fused",
            "torch.func vmap (eager)",
            "autograd loop",
        ):
            if (rival, setting) in times:
                out["ratios"][f"{rival} / mamlkit compiled, {setting}"] = per_round_ratio(
                    times[(rival, setting)], ours
                )
        eager = [times[(lib, setting)] for lib in EAGER_LIBRARIES if (lib, setting) in times]
        if eager:
            fastest = [min(values) for values in zip(*eager)]
            out["ratios"][f"fastest eager library / mamlkit compiled, {setting}"] = per_round_ratio(
                fastest, ours
            )
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows, ratios = [], summary["ratios"]

    def add(name: str, key: str, bound: float) -> None:
        q = ratios.get(key)
        rows.append({"target": name, "value": q and q["median"], "met": q and q["median"] >= bound})

    for setting in ("maml k=1", "maml k=5"):
        for rival in (TORCH_COMPILE, TORCH_COMPILE_MEAN, JAX):
            add(
                f"{setting}: the public call ≥ 1.5× faster than {rival}",
                f"{rival} / mamlkit compiled, {setting}",
                1.5,
            )
        add(
            f"{setting}: the public call within 10 % of its plan (plan / public ≥ 0.91)",
            f"{PLAN} / mamlkit compiled, {setting}",
            1 / 1.1,
        )
    add(
        "maml k=1: ≥ 40× faster than the fastest eager library",
        "fastest eager library / mamlkit compiled, maml k=1",
        40,
    )
    return rows


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def _fmt(q: dict[str, float], digits: int = 2) -> str:
    return f"{q['median']:.{digits}f} [{q['q25']:.{digits}f}, {q['q75']:.{digits}f}]"


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    env, summary = result["environment"], result["summary"]
    lines = ["# The MAML sinusoid meta-gradient: mamlkit beside the fastest alternatives", ""]
    if result["preliminary"]:
        lines += [
            f"> **PRELIMINARY**: {result['preliminary']}. "
            "Re-run on a quiet machine for numbers to quote.",
            "",
        ]
    lines += [
        f"Date: {result['date']}. Command: `{result['command']}`. {env['cpus']} CPUs, "
        "torch threads "
        f"{env['torch_threads']}, OMP_NUM_THREADS={env['omp']}, OMP_WAIT_POLICY={env['wait']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; {env['platform']}.",
        "",
        "One task-mean meta-gradient: 25 tasks, K = 10 + 10, α = 0.01, float32. "
        f"{result['rounds']} "
        "interleaved shuffled rounds after warm-up; median [interquartile range] over rounds; "
        "ratios are taken within each round, then the median over rounds.",
        "",
        "## Correctness first (float64, relative max error against mamlkit's per-task engines)",
        "",
        "| implementation | setting | error |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {k.split(' | ')[0]} | {k.split(' | ')[1]} | {e:.1e} |"
        for k, e in result["gradient_errors"].items()
    ]
    lines += [
        "",
        "## Time per meta-gradient",
        "",
        "| implementation | " + " | ".join(SETTINGS) + " |",
        "| --- |" + " --- |" * len(SETTINGS),
    ]
    impls = list(dict.fromkeys(k.split(" | ")[0] for k in summary["cases"]))
    for impl in impls:
        cells = []
        for setting in SETTINGS:
            row = summary["cases"].get(f"{impl} | {setting}")
            cells.append(f"{row['median']:.3f} ms ({row['gflops']:.1f} GFLOP/s)" if row else "—")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "FLOPs of one meta-gradient (matrix products of the torch.func program, "
        "`torch.utils.flop_counter`): "
        + ", ".join(f"{s}: {f / 1e6:.1f} MFLOP" for s, f in result["flops"].items())
        + ". GFLOP/s = those FLOPs / the median time (so a program that does fewer FLOPs can "
        "exceed its true rate).",
        "",
        "## Ratios (per round: theirs / mamlkit compiled; median [IQR])",
        "",
        "| ratio | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {_fmt(q)} |" for k, q in summary["ratios"].items()]
    lines += [
        "",
        "## The targets in this run",
        "",
        "| target | value | met |",
        "| --- | --- | --- |",
    ]
    for row in result["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.2f}×"
        lines.append(f"| {row['target']} | {value} | {_met(row['met'])} |")
    if result["compile_times"]:
        lines += [
            "",
            "## Compile time of the first call (s)",
            "",
            "Cold: a new process with empty caches; warm: a new process with the caches the cold "
            "one left.",
            "",
            "| implementation | setting | cold | warm |",
            "| --- | --- | --- | --- |",
        ]
        for key, t in result["compile_times"].items():
            impl, setting = key.split(" | ")
            lines.append(f"| {impl} | {setting} | {t['cold']:.1f} | {t['warm']:.1f} |")
    if result["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())]
    mem = result["memory"]
    ks = sorted({int(k) for p in mem.values() for k in p})
    lines += [
        "",
        "## Peak memory of one meta-gradient (KiB) against the inner steps k",
        "",
        "| engine | " + " | ".join(f"k={k}" for k in ks) + " | KiB per extra step |",
        "| --- |" + " --- |" * (len(ks) + 1),
    ]
    for name, points in mem.items():
        p = {int(k): v for k, v in points.items()}
        lines.append(
            f"| {name} | "
            + " | ".join(f"{p[k] / 1024:.0f}" for k in ks)
            + f" | {slope(p) / 1024:.1f} |"
        )
    lines += ["", "![time per meta-gradient](meta_gradient.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["summary"]["cases"]
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(5 * len(SETTINGS), 4), sharex=False)
    for ax, setting in zip(axes, SETTINGS):
        rows = {k.split(" | ")[0]: v for k, v in cases.items() if k.endswith(setting)}
        names = list(rows)
        ax.barh(
            range(len(names)),
            [rows[n]["median"] for n in names],
            color=["tab:green" if n.startswith("mamlkit") else "tab:gray" for n in names],
        )
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set(xlabel="ms per meta-gradient (log scale)", title=f"{setting}, 25 tasks, 1 thread")
    fig.tight_layout()
    fig.savefig(out / "meta_gradient.png", dpi=110)
    plt.close(fig)


def busy(load: float) -> str | None:
    cpus = os.cpu_count() or 1
    return f"load average {load:.1f} on {cpus} CPUs" if load > cpus - 0.5 else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few rounds, no compile-time probes"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 5 quick, 25 full)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = args.rounds or (5 if args.quick else 25)
    skipped = {name: why for name in IMPLS if (why := available(name))}
    cases = [(impl, s) for impl in IMPLS if impl not in skipped for s in SETTINGS]
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    errors = check_gradients(cases)
    if any(impl == JAX for impl, _ in cases):
        import jax

        jax.config.update("jax_enable_x64", False)
    times = time_cases(cases, rounds, warmup=3, block_s=0.02 if args.quick else 0.2)
    flop_counts = {s: flops(s) for s in SETTINGS}
    summary = summarize(times, cases, flop_counts)
    compile_report = {}
    if not args.quick:
        for impl in (COMPILED, TORCH_COMPILE, TORCH_COMPILE_MEAN, JAX):
            if impl not in skipped:
                for setting in ("maml k=1", "maml k=5"):
                    compile_report[f"{impl} | {setting}"] = compile_times(impl, setting)
    memory = memory_sweep([1, 2, 5] if args.quick else [1, 2, 5, 10, 20])
    load_end = os.getloadavg()[0]
    versions = {"torch": torch.__version__, "mamlkit": mamlkit.__version__}
    for name in ("jax", "higher", "torchopt"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_meta.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "preliminary": "a --quick smoke run" if args.quick else busy(max(load_start, load_end)),
        "rounds": rounds,
        "environment": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "wait": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "versions": versions,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": [load_start, load_end],
        },
        "gradient_errors": errors,
        "times_ms": {f"{i} | {s}": v for (i, s), v in times.items()},
        "flops": flop_counts,
        "summary": summary,
        "targets": targets(summary),
        "compile_times": compile_report,
        "memory": memory,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }
    write_report(result, args.out)
    plot(result, args.out)
    print((args.out / "report.md").read_text())
    return result


if __name__ == "__main__":
    main()
