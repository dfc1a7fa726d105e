"""Why iMAML diverges on the sinusoid protocol: meta_train's loop with curvature diagnostics.

Same initialisation (``init_mlp((1, 40, 40, 1), seed=0)``), task stream (seed 1), meta-batch
(25 tasks, K = 10), fast meta-gradient and Adam (β = 10⁻³) as ``reproduce sinusoid``. Every
``--every`` iterations, on that iteration's meta-batch (maximum or median over its 25 tasks):

- ``hmax_theta``, ``hmin_theta``: largest / smallest eigenvalue of the support-loss Hessian
  H_s(θ) (40 power iterations with Hessian-vector products; the smallest on H − 1.05·h_max·I,
  so it is an upper bound on the true smallest eigenvalue);
- ``hmax_phi``: the largest eigenvalue of H_s(φ) at iMAML's inner solution φ, and
  ``lr*(lam+hmax)``: the inner gradient descent on ``L_s(φ) + λ/2‖φ − θ‖²`` is stable only
  while this is < 2;
- ``res_med``, ``res_max``: the stationarity residual ``‖∇L_s(φ) + λ(φ − θ)‖ / ‖∇L_s(θ)‖``
  of the φ actually used (0 for an exactly solved proximal problem);
- ``gnorm``: the global norm of the meta-gradient; ``theta``: ‖θ‖; ``loss``: the meta-loss.

Usage (from the repository root, one thread)::

    OMP_NUM_THREADS=1 python benchmarks/imaml_probe.py NAME imaml LAM LR STEPS \
        CG ITERATIONS [--clip C] [--every N] [--eval]
    OMP_NUM_THREADS=1 python benchmarks/imaml_probe.py NAME maml 0 0.01 1 0 4000

``--eval``: after training, the protocol's evaluation (plain SGD with α = 0.01 on 5 support
points, MSE on the query points, 200 tasks, seed 5) after 0 … 10 steps.
"""

import argparse
import json
import math
import time

import torch
from torch.func import grad, vjp, vmap

import mamlkit
from mamlkit import init_mlp, make_mse_loss, meta_batch_grad, mlp
from mamlkit.tasks import SinusoidFamily
from mamlkit.train import adam_init, adam_update, evaluate

parser = argparse.ArgumentParser()
parser.add_argument("name")
parser.add_argument("method", choices=["maml", "imaml"])
parser.add_argument("lam", type=float)
parser.add_argument("lr", type=float)
parser.add_argument("steps", type=int)
parser.add_argument("cg_steps", type=int)
parser.add_argument("iterations", type=int)
parser.add_argument("--clip", type=float, default=None, help="global meta-gradient norm clip")
parser.add_argument("--every", type=int, default=100)
parser.add_argument("--eval", action="store_true")
args = parser.parse_args()

mamlkit.set_cpu_threads(1)
loss = make_mse_loss(mlp)
family = SinusoidFamily(k_support=10)
theta = init_mlp((1, 40, 40, 1), seed=0)
generator = torch.Generator().manual_seed(1)
state = adam_init(theta)


def norm(d):
    return torch.sqrt(sum((t * t).sum() for t in d.values()))


def hvp(p, s, v):
    return vjp(lambda q: grad(loss)(q, s), p)[1](v)[0]


def eigen(p, s, shift=0.0, n=40):
    """Rayleigh quotient after n power iterations on H − shift·I, per task (p batched)."""
    v0 = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) for k, t in p.items()}

    def one(p_, s_, v):
        est = torch.zeros(())
        for _ in range(n):
            v = {k: t / norm(v) for k, t in v.items()}
            h = hvp(p_, s_, v)
            h = {k: h[k] - shift * v[k] for k in h}
            est = sum((h[k] * v[k]).sum() for k in h)
            v = h
        return est + shift

    return vmap(one)(p, s, v0)


def inner(theta, s):
    """iMAML's φ (the same gradient steps as the fast path) and its relative residual."""

    def one(s_):
        phi = theta
        for _ in range(args.steps):
            g = grad(loss)(phi, s_)
            phi = {k: phi[k] - args.lr * (g[k] + args.lam * (phi[k] - theta[k])) for k in phi}
        g = grad(loss)(phi, s_)
        residual = {k: g[k] + args.lam * (phi[k] - theta[k]) for k in g}
        return phi, norm(residual) / norm(grad(loss)(theta, s_))

    return vmap(one)(s)


status, start = "ok", time.perf_counter()
for it in range(args.iterations):
    tasks = family(25, generator=generator, dtype=torch.float32)
    s, q = tasks.support, tasks.query
    extra = {"lam": args.lam, "cg_steps": args.cg_steps} if args.method == "imaml" else {}
    grads, losses = meta_batch_grad(
        args.method, loss, theta, s, q, lr=args.lr, steps=args.steps, backend="fused", **extra
    )
    gnorm, meta_loss = norm(grads).item(), losses.mean().item()
    if not (math.isfinite(meta_loss) and math.isfinite(gnorm)):
        bad = int((~torch.isfinite(losses)).sum())
        status = f"diverged at {it} ({bad} of 25 task losses non-finite; gradient norm {gnorm:.3g})"
        break
    if it % args.every == 0 or it == args.iterations - 1:
        with torch.no_grad():
            batched = {k: t.expand(25, *t.shape).contiguous() for k, t in theta.items()}
            hmax = eigen(batched, s)
            hmin = eigen(batched, s, shift=1.05 * float(hmax.max()))
            row = {
                "it": it,
                "loss": round(meta_loss, 3),
                "gnorm": round(gnorm, 3),
                "theta": round(norm(theta).item(), 2),
                "hmax_theta": round(hmax.max().item(), 1),
                "hmin_theta": round(hmin.min().item(), 1),
            }
            if args.method == "imaml":
                phi, rel = inner(theta, s)
                hmax_phi = eigen(phi, s).max().item()
                row |= {
                    "hmax_phi": round(hmax_phi, 1),
                    "lr*(lam+hmax)": round(args.lr * (args.lam + hmax_phi), 2),
                    "res_med": round(rel.median().item(), 3),
                    "res_max": round(rel.max().item(), 3),
                }
        print(args.name, json.dumps(row), flush=True)
    if args.clip is not None and gnorm > args.clip:
        grads = {k: g * (args.clip / gnorm) for k, g in grads.items()}
    theta, state = adam_update(theta, grads, state, lr=1e-3)
print(args.name, "STATUS", status, f"({time.perf_counter() - start:.0f} s)", flush=True)
if args.eval and status == "ok":
    test = SinusoidFamily(k_support=5)(200, generator=torch.Generator().manual_seed(5))
    ev = evaluate(loss, theta, test.support, test.query, lr=0.01, steps=10)
    print(args.name, "EVAL K=5, 0..10 steps", [round(v, 3) for v in ev.loss.tolist()], flush=True)
