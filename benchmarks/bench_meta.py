"""One meta-iteration of the MAML sinusoid, mamlkit's fast path against the usual ways, side by side.

Setting (Finn et al. 2017, §5.1): a 1→40→40→1 ReLU MLP, 25 tasks per meta-batch, K = 10 support
and 10 query points, α = 0.01, mean-squared error, float32; one meta-iteration = the task-mean
meta-gradient + one Adam step (lr 10⁻³). Task sampling is excluded (one fixed meta-batch).

Implementations, all timed in this one process, interleaved in shuffled rounds after warm-up:

- ``mamlkit fast``: ``fast_meta_batch_grad`` (hand-written batched backward and R-op, no
  autograd) + ``fast_adam_step``; MAML k=1 and k=5, FOMAML, Reptile, iMAML, and the joint
  ("pretrained") gradient, with the reproduction protocol's inner settings;
- ``mamlkit.meta_batch_grad``: the public entry point (vmap today; the fast path once wired);
- ``autograd loop``: a Python loop over tasks with ``torch.autograd.grad(create_graph=True)``,
  ``.backward()`` and ``torch.optim.Adam`` (the baseline every ratio refers to);
- ``torch.func vmap``: ``vmap(grad(meta_objective))`` over tasks + ``torch.optim.Adam``;
- ``higher``, ``torchopt``, ``learn2learn``: each library's MAML recipe, when it imports.

Before any timing, every implementation's meta-gradient is computed in float64 and asserted equal
to mamlkit's exact one (a per-task loop of ``maml_grad``/``fomaml_grad``/``reptile_grad``/
``imaml_grad``): speed is never bought with a wrong gradient.

Memory: the peak of (bytes allocated − bytes freed) by torch's CPU allocator during one
meta-gradient call, summed between top-level operators from ``torch.profiler``'s memory events.

Run (quiet machine): ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_meta.py``;
``--quick`` is a smoke run (< 30 s). Writes ``benchmarks/results/report.{md,json}`` and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
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

import torch
import torch.nn.functional as F
from mamlkit._fast import fast_adam_step, fast_meta_batch_grad
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.profiler import ProfilerActivity, profile

import mamlkit

SIZES = (1, 40, 40, 1)
TASKS, K, ALPHA, META_LR, SEED = 25, 10, 0.01, 1e-3, 0
NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")
# setting -> (method, inner lr, steps, extra): MAML/FOMAML as the paper; Reptile and iMAML with
# the inner settings of mamlkit's reproduction protocol (mamlkit._reproduce.METHOD_SETTINGS, read
# at import when it exists); "joint" = the pretrained baseline's gradient (all 2K points, at θ).
try:
    from mamlkit._reproduce import METHOD_SETTINGS as _PROTOCOL
except ImportError:  # pragma: no cover - older trees
    _PROTOCOL = {}
_REPTILE = {"lr": 0.02, "steps": 5, **_PROTOCOL.get("reptile", {})}
_IMAML = {"lr": 0.01, "steps": 5, "lam": 10.0, "cg_steps": 5, **_PROTOCOL.get("imaml", {})}
SETTINGS: dict[str, tuple[str, float, int, dict[str, Any]]] = {
    "maml k=1": ("maml", ALPHA, 1, {}),
    "fomaml k=1": ("fomaml", ALPHA, 1, {}),
    "maml k=5": ("maml", ALPHA, 5, {}),
    f"reptile k={_REPTILE['steps']}": ("reptile", _REPTILE["lr"], _REPTILE["steps"], {}),
    f"imaml k={_IMAML['steps']}": (
        "imaml",
        _IMAML["lr"],
        _IMAML["steps"],
        {"lam": _IMAML["lam"], "cg_steps": _IMAML["cg_steps"]},
    ),
    "joint": ("joint", ALPHA, 0, {}),
}
PEER_SETTINGS = ("maml k=1", "fomaml k=1", "maml k=5")
BASELINE = "autograd loop"
FAST = "mamlkit fast"
PEERS = ("higher", "torchopt", "learn2learn")
Batch = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------- implementations


def _mse(pred: Tensor, y: Tensor) -> Tensor:
    return (pred - y).pow(2).mean()


def _net(p: list[Tensor] | dict[str, Tensor], x: Tensor) -> Tensor:
    """The 1-40-40-1 ReLU MLP written out (independent of mamlkit)."""
    w = list(p.values()) if isinstance(p, dict) else p
    h = F.relu(F.linear(x, w[0], w[1]))
    h = F.relu(F.linear(h, w[2], w[3]))
    return F.linear(h, w[4], w[5])


def _module(params: dict[str, Tensor]) -> nn.Module:
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    net = net.to(params["w0"].dtype)
    with torch.no_grad():
        for p, key in zip(net.parameters(), NAMES):
            p.copy_(params[key])
    return net


class Impl:
    """``grad(support, query)``: the meta-gradient (keys w0…b2); ``step``: gradient + Adam."""

    def __init__(self, params: dict[str, Tensor], setting: str) -> None:
        self.method, self.lr, self.steps, self.extra = SETTINGS[setting]
        self.first_order = self.method == "fomaml"

    def grad(self, support: Batch, query: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def step(self, support: Batch, query: Batch) -> None:
        raise NotImplementedError


class Fast(Impl):
    """mamlkit's fast path and fused Adam (the training path)."""

    meta_batch_grad: Callable[..., tuple[dict[str, Tensor], Tensor]] = staticmethod(
        fast_meta_batch_grad
    )

    def __init__(self, params, setting):
        super().__init__(params, setting)
        self.params = dict(params)
        self.loss = mamlkit.make_mse_loss(mamlkit.mlp)
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        self.state = {"t": 0, "m": zeros, "v": dict(zeros)}

    def grad(self, support, query):
        if self.method == "joint":  # ∇ of the loss on all 2K points of each task, at θ
            both = tuple(torch.cat((s, q), 1) for s, q in zip(support, query))
            return self.meta_batch_grad(
                "fomaml", self.loss, self.params, support, both, lr=self.lr, steps=0
            )[0]
        return self.meta_batch_grad(
            self.method, self.loss, self.params, support, query,
            lr=self.lr, steps=self.steps, **self.extra,
        )[0]

    def step(self, support, query):
        self.params, self.state = fast_adam_step(
            self.params, self.grad(support, query), self.state, META_LR
        )


class Public(Fast):
    """``mamlkit.meta_batch_grad``, whatever it dispatches to, + the same Adam."""

    meta_batch_grad = staticmethod(mamlkit.meta_batch_grad)


class Leaves(Impl):
    """Leaf tensors + ``torch.optim.Adam``: the usual training loop of the baselines."""

    def __init__(self, params, setting):
        super().__init__(params, setting)
        self.leaves = [params[k].clone().requires_grad_() for k in NAMES]
        self.opt = torch.optim.Adam(self.leaves, lr=META_LR)

    def backward(self, support: Batch, query: Batch) -> None:
        raise NotImplementedError

    def grad(self, support, query):
        self.opt.zero_grad(set_to_none=True)
        self.backward(support, query)
        return {k: leaf.grad.clone() for k, leaf in zip(NAMES, self.leaves)}

    def step(self, support, query):
        self.opt.zero_grad(set_to_none=True)
        self.backward(support, query)
        self.opt.step()


class AutogradLoop(Leaves):
    """for task: k × autograd.grad(create_graph=not first_order); (L_q/T).backward()."""

    def backward(self, support, query):
        (xs, ys), (xq, yq) = support, query
        n = xs.shape[0]
        for t in range(n):
            fast = self.leaves
            for _ in range(self.steps):
                g = torch.autograd.grad(
                    _mse(_net(fast, xs[t]), ys[t]), fast, create_graph=not self.first_order
                )
                fast = [w - self.lr * gw for w, gw in zip(fast, g)]
            (_mse(_net(fast, xq[t]), yq[t]) / n).backward()


class VmapFunc(Leaves):
    """vmap(grad(meta_objective)) over tasks, the straightforward torch.func version."""

    def __init__(self, params, setting):
        super().__init__(params, setting)
        steps, lr, first_order = self.steps, self.lr, self.first_order
        inner_grad = grad(lambda p, x, y: _mse(_net(p, x), y))

        def meta_objective(p, xs, ys, xq, yq):
            for _ in range(steps):
                g = inner_grad(p, xs, ys)
                if first_order:
                    g = {k: v.detach() for k, v in g.items()}
                p = {k: p[k] - lr * g[k] for k in p}
            return _mse(_net(p, xq), yq)

        self.fn = vmap(grad(meta_objective), in_dims=(None, 0, 0, 0, 0))

    def backward(self, support, query):
        p = {k: leaf.detach() for k, leaf in zip(NAMES, self.leaves)}
        g = self.fn(p, *support, *query)
        for k, leaf in zip(NAMES, self.leaves):
            leaf.grad = g[k].mean(0)


class Modules(Leaves):
    """An ``nn.Module`` and ``torch.optim.Adam`` on its parameters (the libraries' way)."""

    def __init__(self, params, setting):
        Impl.__init__(self, params, setting)
        self.net = _module(params)
        self.leaves = list(self.net.parameters())
        self.opt = torch.optim.Adam(self.leaves, lr=META_LR)

    def accumulate(self, grads: tuple[Tensor, ...], n: int) -> None:
        for p, g in zip(self.leaves, grads):
            p.grad = g / n if p.grad is None else p.grad + g / n


class Higher(Modules):
    """higher.innerloop_ctx(copy_initial_weights=False, track_higher_grads=not first_order)."""

    def __init__(self, params, setting):
        super().__init__(params, setting)
        import higher

        self.higher = higher
        self.inner_opt = torch.optim.SGD(self.net.parameters(), lr=self.lr)

    def backward(self, support, query):
        (xs, ys), (xq, yq) = support, query
        n = xs.shape[0]
        for t in range(n):
            with self.higher.innerloop_ctx(
                self.net,
                self.inner_opt,
                copy_initial_weights=False,
                track_higher_grads=not self.first_order,
            ) as (fnet, diffopt):
                for _ in range(self.steps):
                    diffopt.step(_mse(fnet(xs[t]), ys[t]))
                query_loss = _mse(fnet(xq[t]), yq[t])
                if self.first_order:
                    self.accumulate(torch.autograd.grad(query_loss, list(fnet.parameters())), n)
                else:
                    (query_loss / n).backward()


class TorchOpt(Modules):
    """Second order: torchopt.MetaSGD with extract/recover_state_dict (torchopt's MAML example);
    first order: torchopt.sgd + apply_updates on detached gradients (its functional API)."""

    def __init__(self, params, setting):
        super().__init__(params, setting)
        import torchopt

        self.torchopt = torchopt
        self.inner = torchopt.MetaSGD(self.net, lr=self.lr)
        self.sgd = torchopt.sgd(lr=self.lr)
        self.names = [name for name, _ in self.net.named_parameters()]

    def backward(self, support, query):
        (xs, ys), (xq, yq) = support, query
        n, to = xs.shape[0], self.torchopt
        for t in range(n):
            if self.first_order:
                fast = tuple(self.leaves)
                state = self.sgd.init(fast)
                for _ in range(self.steps):
                    call = torch.func.functional_call(self.net, dict(zip(self.names, fast)), xs[t])
                    g = torch.autograd.grad(_mse(call, ys[t]), fast)
                    updates, state = self.sgd.update(g, state, inplace=False)
                    fast = to.apply_updates(fast, updates, inplace=False)
                call = torch.func.functional_call(self.net, dict(zip(self.names, fast)), xq[t])
                (_mse(call, yq[t]) / n).backward()
                continue
            net_state = to.extract_state_dict(self.net)
            opt_state = to.extract_state_dict(self.inner)
            for _ in range(self.steps):
                self.inner.step(_mse(self.net(xs[t]), ys[t]))
            (_mse(self.net(xq[t]), yq[t]) / n).backward()
            to.recover_state_dict(self.net, net_state)
            to.recover_state_dict(self.inner, opt_state)


class Learn2Learn(Modules):
    """l2l.algorithms.MAML(first_order=...): clone() per task, adapt() k times."""

    def __init__(self, params, setting):
        super().__init__(params, setting)
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(self.net, lr=self.lr, first_order=self.first_order)

    def backward(self, support, query):
        (xs, ys), (xq, yq) = support, query
        n = xs.shape[0]
        for t in range(n):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(_mse(learner(xs[t]), ys[t]))
            (_mse(learner(xq[t]), yq[t]) / n).backward()


IMPLS: dict[str, type[Impl]] = {
    FAST: Fast,
    "mamlkit.meta_batch_grad": Public,
    BASELINE: AutogradLoop,
    "torch.func vmap": VmapFunc,
    "higher": Higher,
    "torchopt": TorchOpt,
    "learn2learn": Learn2Learn,
}


def _available(name: str) -> str | None:
    """None when usable, else why not."""
    module = {"higher": "higher", "torchopt": "torchopt", "learn2learn": "learn2learn"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # a library that does not import is reported, not fatal
        return f"not usable here: {type(error).__name__}: {error}"[:200]
    return None


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "mamlkit": mamlkit.__version__}
    for name in ("higher", "torchopt", "learn2learn"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------- the problem


def _problem(dtype: torch.dtype) -> tuple[dict[str, Tensor], Batch, Batch]:
    tasks = mamlkit.sample_sinusoid_tasks(
        TASKS, k_support=K, generator=torch.Generator().manual_seed(SEED), dtype=dtype
    )
    params = mamlkit.init_mlp(SIZES, seed=SEED, dtype=dtype)
    contiguous = tuple(tuple(t.contiguous() for t in b) for b in (tasks.support, tasks.query))
    return params, contiguous[0], contiguous[1]


def _reference(setting: str, params, support, query) -> dict[str, Tensor]:
    """mamlkit's exact per-task engines, task-averaged (never the fast path)."""
    method, lr, steps, extra = SETTINGS[setting]
    loss = mamlkit.make_mse_loss(mamlkit.mlp)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = support[0].shape[0]
    for t in range(n):
        s, q = (support[0][t], support[1][t]), (query[0][t], query[1][t])
        if method == "maml":
            g = mamlkit.maml_grad(loss, params, s, q, lr=lr, steps=steps)
        elif method == "fomaml":
            g = mamlkit.fomaml_grad(loss, params, s, q, lr=lr, steps=steps)
        elif method == "reptile":
            g = mamlkit.reptile_grad(loss, params, s, lr=lr, steps=steps)
        elif method == "imaml":
            g = mamlkit.imaml_grad(loss, params, s, q, lr=lr, steps=steps, **extra)
        else:
            both = (torch.cat((s[0], q[0])), torch.cat((s[1], q[1])))
            g = torch.func.grad(loss)(params, both)
        total = {k: total[k] + g[k] / n for k in total}
    return total


def check_gradients(cases: list[tuple[str, str]]) -> dict[str, float]:
    """float64: every implementation's meta-gradient equals mamlkit's exact one (assert)."""
    params, support, query = _problem(torch.float64)
    errors = {}
    refs = {s: _reference(s, params, support, query) for s in {s for _, s in cases}}
    for impl, setting in cases:
        got = IMPLS[impl](params, setting).grad(support, query)
        ref = refs[setting]
        scale = max(float(v.abs().max()) for v in ref.values())
        err = max(float((got[k] - ref[k]).abs().max()) for k in ref) / scale
        errors[f"{impl} | {setting}"] = err
        assert err < 1e-9, f"{impl} {setting}: relative error {err:.2e} against mamlkit's exact"
    return errors


# ----------------------------------------------------------------------------------- timing


def _quantiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "min": min(values)}


def time_cases(
    cases: list[tuple[str, str]], rounds: int, warmup: int, block_s: float, seed: int
) -> dict[tuple[str, str], list[float]]:
    """ms per meta-iteration of every case in every round (rounds interleave all cases)."""
    params, support, query = _problem(torch.float32)
    objs = {c: IMPLS[c[0]](params, c[1]) for c in cases}
    reps = {}
    for c, obj in objs.items():
        for _ in range(warmup):
            obj.step(support, query)
        start = time.perf_counter()
        obj.step(support, query)
        reps[c] = max(1, min(500, round(block_s / (time.perf_counter() - start))))
    rng = random.Random(seed)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for c in order:
            obj, n = objs[c], reps[c]
            start = time.perf_counter()
            for _ in range(n):
                obj.step(support, query)
            times[c].append((time.perf_counter() - start) / n * 1e3)
    return times


def _per_round_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    return _quantiles([a / b for a, b in zip(num, den)])


# ----------------------------------------------------------------------------------- memory


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
    params, support, query = _problem(torch.float32)
    loss = mamlkit.make_mse_loss(mamlkit.mlp)
    s, q = (support[0][0], support[1][0]), (query[0][0], query[1][0])
    engines: dict[str, Callable[[int], Any]] = {
        "maml_grad (autodiff through the loop)": lambda k: mamlkit.maml_grad(
            loss, params, s, q, lr=ALPHA, steps=k
        ),
        "maml_grad_hvp (reverse HVP pass)": lambda k: mamlkit.maml_grad_hvp(
            loss, params, s, q, lr=ALPHA, steps=k
        ),
        "fomaml_grad": lambda k: mamlkit.fomaml_grad(loss, params, s, q, lr=ALPHA, steps=k),
        "imaml_grad (λ=10, 5 CG)": lambda k: mamlkit.imaml_grad(
            loss, params, s, q, lam=10.0, lr=_IMAML["lr"], steps=k, cg_steps=5
        ),
        "fast path maml, all 25 tasks": lambda k: fast_meta_batch_grad(
            "maml", loss, params, support, query, lr=ALPHA, steps=k
        ),
    }
    return {name: {k: peak_bytes(lambda f=f, k=k: f(k)) for k in ks} for name, f in engines.items()}


def _slope(points: dict[int, int]) -> float:
    """Least-squares bytes per extra inner step."""
    ks, ys = list(points), list(points.values())
    mk, my = statistics.mean(ks), statistics.mean(ys)
    return sum((k - mk) * (y - my) for k, y in zip(ks, ys)) / sum((k - mk) ** 2 for k in ks)


# ----------------------------------------------------------------------------------- report


def is_busy(*load_averages: float) -> bool:
    """True when something besides this benchmark loaded the machine.

    The benchmark keeps about one core busy itself, so the 1-minute load average of a quiet
    machine sits near 1; more than ``cpus − 0.5`` means other work shared the cores.
    """
    return max(load_averages) > (os.cpu_count() or 1) - 0.5


def environment(threads: int) -> dict[str, Any]:
    info = torch.__config__.parallel_info().splitlines()
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "requested_threads": threads,
        "env": {
            k: os.environ.get(k, "(unset)")
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
        },
        "parallel_info": [line.strip() for line in info if line.strip()][:8],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": _versions(),
        "loadavg_start": list(os.getloadavg()),
    }


def summarize(times, cases, settings) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}, "ratios": {}}
    for impl, setting in cases:
        row = _quantiles(times[(impl, setting)])
        if (BASELINE, setting) in times:
            row["speedup_vs_baseline"] = _per_round_ratio(
                times[(BASELINE, setting)], times[(impl, setting)]
            )
        out["cases"][f"{impl} | {setting}"] = row
    fast = {s: times[(FAST, s)] for s in settings if (FAST, s) in times}
    for setting in PEER_SETTINGS:
        peers = [times[(p, setting)] for p in PEERS if (p, setting) in times]
        if peers and setting in fast:
            fastest = [min(vals) for vals in zip(*peers)]
            out["ratios"][f"fastest peer / fast, {setting}"] = _per_round_ratio(
                fastest, fast[setting]
            )
        if ("torch.func vmap", setting) in times and setting in fast:
            out["ratios"][f"torch.func vmap / fast, {setting}"] = _per_round_ratio(
                times[("torch.func vmap", setting)], fast[setting]
            )
    for impl in IMPLS:
        if (impl, "maml k=1") in times and (impl, "fomaml k=1") in times:
            out["ratios"][f"2nd/1st order, {impl}"] = _per_round_ratio(
                times[(impl, "maml k=1")], times[(impl, "fomaml k=1")]
            )
    protocol = [s for s in settings if s != "maml k=5"]  # the five methods of the protocol
    if all(s in fast for s in protocol):
        ms = sum(statistics.median(fast[s]) for s in protocol)
        out["protocol_minutes"] = ms * 70_000 / 1e3 / 60
    return out


def targets(summary: dict[str, Any], memory: dict[str, dict[int, int]]) -> list[dict[str, Any]]:
    """The issue's targets, each with this run's value and whether it was met."""
    ratios, rows = summary["ratios"], []

    def add(name: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        rows.append({"target": name, "value": value, "unit": unit, "met": ok})

    peer = ratios.get("fastest peer / fast, maml k=1")
    add("MAML k=1 ≥ 10× faster than the fastest peer library", peer and peer["median"],
        peer and peer["median"] >= 10, "×")
    vm = ratios.get("torch.func vmap / fast, maml k=1")
    add("MAML k=1 ≥ 1.5× faster than torch.func + vmap", vm and vm["median"],
        vm and vm["median"] >= 1.5, "×")
    so = ratios.get(f"2nd/1st order, {FAST}")
    add("2nd/1st-order cost ratio ≤ 1.5 (meta-iteration)", so and so["median"],
        so and so["median"] <= 1.5)
    auto = [v for k, v in memory.items() if k.startswith("maml_grad (")]
    hvp = [v for k, v in memory.items() if k.startswith("maml_grad_hvp")]
    if auto and hvp:
        ratio = _slope(auto[0]) / _slope(hvp[0])
        add("maml_grad_hvp's memory grows clearly slower with k than maml_grad's (slope ratio > 1.5)",
            ratio, ratio > 1.5, "×")
    minutes = summary.get("protocol_minutes")
    add("full protocol (70,000 × 5 methods) ≤ 10 min", minutes,
        None if minutes is None else minutes <= 10, " min")
    return rows


def _fmt_q(q: dict[str, float], digits: int = 2) -> str:
    return f"{q['median']:.{digits}f} [{q['q25']:.{digits}f}, {q['q75']:.{digits}f}]"


def write_report(result: dict[str, Any], out_dir: Path, quick: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    env, summary = result["environment"], result["summary"]
    lines = ["# Meta-iteration benchmark: MAML sinusoid, 25 tasks, K = 10, float32", ""]
    if quick or result["preliminary"]:
        lines += [
            "> **PRELIMINARY** — "
            + ("a `--quick` smoke run" if quick else "")
            + (" on a busy machine" if result["preliminary"] else "")
            + f" (load average {env['loadavg_start'][0]:.1f} at start, "
            f"{result['loadavg_end'][0]:.1f} at end on {env['cpu_count']} CPUs). "
            "Re-run on a quiet machine for numbers to quote.",
            "",
        ]
    lines += [
        f"Date: {result['date']}. Command: `{result['command']}`.",
        "",
        f"Threads: torch intra-op {env['torch_threads']}, inter-op {env['torch_interop_threads']}; "
        + ", ".join(f"{k}={v}" for k, v in env["env"].items())
        + f"; {env['cpu_count']} CPUs; {env['platform']}; Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
        f"One meta-iteration = meta-gradient (mean over {TASKS} tasks) + one Adam step, "
        f"{result['rounds']} interleaved shuffled rounds after {result['warmup']} warm-up "
        "iterations; median [interquartile range] over rounds. Speed-ups are per-round ratios "
        f"to the `{BASELINE}` of the same setting, then the median over rounds.",
        "",
        "## Correctness first (float64, relative max error against mamlkit's exact engines)",
        "",
        "| implementation | setting | error |",
        "| --- | --- | --- |",
    ]
    for key, err in result["gradient_errors"].items():
        impl, setting = key.split(" | ")
        lines.append(f"| {impl} | {setting} | {err:.1e} |")
    lines += ["", "## Time per meta-iteration", ""]
    lines += [
        "| implementation | setting | ms | speed-up vs autograd loop |",
        "| --- | --- | --- | --- |",
    ]
    for key, row in summary["cases"].items():
        impl, setting = key.split(" | ")
        speed = _fmt_q(row["speedup_vs_baseline"], 1) + "×" if "speedup_vs_baseline" in row else ""
        lines.append(f"| {impl} | {setting} | {_fmt_q(row, 3)} | {speed} |")
    lines += ["", "## Ratios (per round, median [IQR])", "", "| ratio | value |", "| --- | --- |"]
    for key, q in summary["ratios"].items():
        lines.append(f"| {key} | {_fmt_q(q)} |")
    if "protocol_minutes" in summary:
        lines += [
            "",
            "Projected full paper protocol with the fast path (70,000 meta-iterations × maml, "
            "fomaml, reptile, imaml, joint; gradient + Adam only, no task sampling or "
            f"evaluation): **{summary['protocol_minutes']:.1f} min** on one thread.",
        ]
    lines += ["", "## The issue's targets in this run", "", "| target | value | met |"]
    lines += ["| --- | --- | --- |"]
    for row in result["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.2f}{row['unit']}"
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {value} | {met} |")
    if result["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())]
    mem = result["memory"]
    ks = sorted({k for points in mem.values() for k in points})
    lines += [
        "",
        "## Peak memory of one meta-gradient (KiB) against the number of inner steps k",
        "",
        "Peak of (bytes allocated − bytes freed) by torch's CPU allocator during one call, "
        "summed between top-level operators from torch.profiler's memory events (inputs not "
        "counted). One sinusoid task for mamlkit's engines; the whole 25-task meta-batch for "
        "the fast path.",
        "",
        "| engine | " + " | ".join(f"k={k}" for k in ks) + " | KiB per extra step |",
        "| --- | " + " | ".join("---" for _ in ks) + " | --- |",
    ]
    for name, points in mem.items():
        cells = " | ".join(f"{points[k] / 1024:.0f}" for k in ks)
        lines.append(f"| {name} | {cells} | {_slope(points) / 1024:.1f} |")
    lines += ["", "![meta-iteration times and memory](meta_iteration.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))


def plot(result: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    cases = result["summary"]["cases"]
    labels = list(cases)
    med = [cases[k]["median"] for k in labels]
    err = [
        [cases[k]["median"] - cases[k]["q25"] for k in labels],
        [cases[k]["q75"] - cases[k]["median"] for k in labels],
    ]
    colors = ["tab:green" if k.startswith(FAST) else "tab:gray" for k in labels]
    ax1.barh(range(len(labels)), med, xerr=err, color=colors)
    ax1.set_yticks(range(len(labels)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("ms per meta-iteration (log scale; median, IQR)")
    threads = result["environment"]["torch_threads"]
    ax1.set_title(f"One meta-iteration, 25 sinusoid tasks, {threads} torch thread(s)")
    for name, points in result["memory"].items():
        ks = sorted(points, key=int)
        ax2.plot([int(k) for k in ks], [points[k] / 1024 for k in ks], marker="o", label=name)
    ax2.set_yscale("log")
    ax2.set_xlabel("inner steps k")
    ax2.set_ylabel("peak allocator KiB of one call (log scale)")
    ax2.set_title("Memory of one meta-gradient against k")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "meta_iteration.png", dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 30 s)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3 quick, 25 full)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-peers", action="store_true", help="skip higher/torchopt/l2l")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (7 if args.quick else 25)
    warmup, block_s = (1, 0.005) if args.quick else (10, 0.25)
    ks = [1, 2, 5] if args.quick else [1, 2, 5, 10, 20]

    skipped: dict[str, str] = {}
    cases = [(FAST, s) for s in SETTINGS] + [("mamlkit.meta_batch_grad", s) for s in SETTINGS]
    others = [BASELINE, "torch.func vmap"] + ([] if args.no_peers else list(PEERS))
    for impl in others:
        why = _available(impl)
        if why is None:
            cases += [(impl, s) for s in PEER_SETTINGS]
        else:
            skipped[impl] = why
    if args.no_peers:
        skipped.update({p: "--no-peers" for p in PEERS})

    env = environment(args.threads)
    t0 = time.perf_counter()
    errors = check_gradients(cases)
    times = time_cases(cases, rounds, warmup, block_s, SEED)
    memory = memory_sweep(ks)
    load_end = list(os.getloadavg())
    summary = summarize(times, cases, SETTINGS)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_meta.py " + " ".join(argv if argv else sys.argv[1:]),
        "quick": args.quick,
        "preliminary": args.quick or is_busy(env["loadavg_start"][0], load_end[0]),
        "rounds": rounds,
        "warmup": warmup,
        "environment": env,
        "loadavg_end": load_end,
        "gradient_errors": errors,
        "times_ms": {f"{i} | {s}": v for (i, s), v in times.items()},
        "summary": summary,
        "targets": targets(summary, memory),
        "memory": memory,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }
    write_report(result, args.out, args.quick)
    plot(result, args.out)
    print((args.out / "report.md").read_text())
    return result


if __name__ == "__main__":
    main()
