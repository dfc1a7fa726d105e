"""The command line: ``python -m mamlkit <command>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._runtime import set_cpu_threads


def _verify(args: argparse.Namespace) -> int:
    from ._verify import format_report, run_checks

    checks = run_checks(seed=args.seed)
    print(format_report(checks))
    return 0 if all(c.passed for c in checks) else 1


def _train(args: argparse.Namespace) -> int:
    from ._reproduce import METHOD_SETTINGS, train_sinusoid
    from ._train import save_checkpoint

    settings = dict(METHOD_SETTINGS[args.method])
    for name in ("lr", "steps", "lam", "cg_steps"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    result = train_sinusoid(
        args.method,
        settings,
        sizes=tuple(args.sizes),
        k_train=args.k,
        meta_batch_size=args.meta_batch_size,
        iterations=args.iterations,
        meta_lr=args.meta_lr,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
    )
    save_checkpoint(result, args.out)
    tail = result.history[-max(1, args.iterations // 20) :]
    final = f"{tail.mean().item():.4f}" if tail.numel() else "n/a"
    print(f"{args.method}: {args.iterations} iterations, final meta-loss {final}; wrote {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from ._evaluate import evaluate_tasks
    from ._models import make_mse_loss, mlp
    from ._tasks import SinusoidFamily
    from ._train import load_checkpoint

    params = load_checkpoint(args.checkpoint).params
    record = {}
    print(f"| K | {' | '.join(f'{j} steps' for j in range(args.steps + 1))} |")
    for k in args.k:
        result = evaluate_tasks(
            make_mse_loss(mlp),
            params,
            SinusoidFamily(k_support=k),
            num_tasks=args.tasks,
            lr=args.lr,
            steps=args.steps,
            seed=args.seed + k,
        )
        record[str(k)] = {"mse": result.mse.tolist(), "ci95": result.ci95.tolist()}
        cells = " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in zip(result.mse, result.ci95))
        print(f"| {k} | {cells} |")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ._reproduce import reproduce_sinusoid

    out = args.out or ("results/sinusoid_quick" if args.quick else "results/sinusoid")
    results = reproduce_sinusoid(
        out,
        quick=args.quick,
        iterations=args.iterations,
        methods=args.methods,
        eval_tasks=args.eval_tasks,
        workers=args.workers,
        progress=not args.no_progress,
        figures=not args.no_figures,
        seed=args.seed,
    )
    for warning in results["warnings"]:
        print(f"[WARN] {warning}")
    for check in results["checks"]:
        print(f"[{'PASS' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    print(
        f"wrote {out}/results.json, results.md ({results['environment']['total_wall_seconds']} s)"
    )
    return 0 if all(c["passed"] for c in results["checks"]) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mamlkit", description=__doc__)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: $MAMLKIT_NUM_THREADS, $OMP_NUM_THREADS or 1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every identity the notebooks claim")
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(run=_verify)

    methods = ("maml", "fomaml", "reptile", "imaml", "pretrained")
    train = commands.add_parser("train", help="meta-train a sinusoid regressor, save a checkpoint")
    train.add_argument("--method", choices=methods, default="maml")
    train.add_argument("--out", required=True, help="checkpoint directory")
    train.add_argument("--iterations", type=int, default=70_000)
    train.add_argument("--meta-batch-size", type=int, default=25)
    train.add_argument("--k", type=int, default=10, help="support (= query) points per task")
    train.add_argument("--meta-lr", type=float, default=1e-3)
    train.add_argument("--lr", type=float, default=None, help="inner step (method default)")
    train.add_argument("--steps", type=int, default=None, help="inner steps (method default)")
    train.add_argument("--lam", type=float, default=None, help="iMAML's λ")
    train.add_argument("--cg-steps", type=int, default=None, help="iMAML's CG iterations")
    train.add_argument("--sizes", type=int, nargs="+", default=[1, 40, 40, 1])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="fine-tune a checkpoint on fresh tasks")
    evaluate.add_argument("checkpoint", help="directory written by `train`")
    evaluate.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    evaluate.add_argument("--tasks", type=int, default=600)
    evaluate.add_argument("--steps", type=int, default=10)
    evaluate.add_argument("--lr", type=float, default=0.01)
    evaluate.add_argument("--seed", type=int, default=10_000)
    evaluate.add_argument("--json", default=None, help="also write the curves to this file")
    evaluate.set_defaults(run=_evaluate)

    reproduce = commands.add_parser("reproduce", help="reproduce a paper experiment")
    reproduce.add_argument("experiment", choices=["sinusoid"])
    reproduce.add_argument("--quick", action="store_true", help="few thousand iterations")
    reproduce.add_argument("--iterations", type=int, default=None)
    reproduce.add_argument("--eval-tasks", type=int, default=None)
    reproduce.add_argument("--methods", nargs="+", choices=methods, default=None)
    reproduce.add_argument("--workers", type=int, default=1, help="parallel training processes")
    reproduce.add_argument("--out", default=None, help="default results/sinusoid[_quick]")
    reproduce.add_argument("--seed", type=int, default=0)
    reproduce.add_argument("--no-progress", action="store_true")
    reproduce.add_argument("--no-figures", action="store_true")
    reproduce.set_defaults(run=_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_threads(args.threads)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
