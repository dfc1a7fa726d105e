"""The command line: ``python -m mamlkit <command>`` (or ``mamlkit <command>``).

Every setting and output path is checked before any work starts. A usage mistake exits with
status 2 (argparse's message); any other mamlkit error prints one line, ``mamlkit: error: …``,
and exits with 1 — the traceback only with ``--debug`` or ``MAMLKIT_DEBUG=1``. A run stopped by
SIGINT or SIGTERM checkpoints, prints one line and exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._backends import CHOICES as BACKEND_CHOICES
from ._checks import SEED_MAX
from ._experiments.common import EXPERIMENTS
from ._methods import METHODS, get_method, hyper_table
from ._runtime import set_cpu_threads

DESCRIPTION = """The MAML meta-gradient, derived and checked, from the command line.

Every setting and output path is checked before any work starts. A usage mistake exits with
status 2; any other error prints one line and exits with 1 (the traceback with --debug or
MAMLKIT_DEBUG=1). A run stopped by SIGINT or SIGTERM checkpoints, prints one line and exits
with 130 or 143."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (unless the help text already says what the default is, or there is
    none), descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"must be in 0 … 2**64 - 1 (torch's seed range), got {value}"
        )
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _device(parser: argparse.ArgumentParser, name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"argument --device: not a torch device: {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            "argument --device: CUDA is not available in this torch build "
            f"({torch.__version__}); use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error("argument --device: MPS is not available here; use --device cpu")
    return name


def _output_file(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """An output file's folder must exist and be writable, and the path must not be a folder."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        parser.error(f"argument {flag}: {path!r} is a folder, not a file")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        parser.error(
            f"argument {flag}: cannot write {path!r} (folder {str(folder)!r} is missing "
            "or not writable)"
        )


def _method_changes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The command line's changes to the method's settings; a flag the method does not take is a
    usage error."""
    method = get_method(args.method)
    changes = {
        name: getattr(args, name) for name in ("lr", "steps") if getattr(args, name) is not None
    }
    taken = {h.name for h in method.hypers}
    for name in hyper_table():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in taken:
            parser.error(
                f"argument --{name.replace('_', '-')}: method {method.name!r} does not "
                f"take it (its hyper-parameters: {sorted(taken) or 'none'})"
            )
        changes[name] = value
    return changes


# ----------------------------------------------------------------------------------- commands


def _verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._verify import format_report, run_checks

    checks = run_checks(seed=args.seed)
    print(format_report(checks))
    return 0 if all(c.passed for c in checks) else 1


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._experiments.sinusoid import EXPERIMENT, SinusoidProtocol
    from ._files import check_writable_folder
    from ._train import run_training

    device = _device(parser, args.device)
    protocol = SinusoidProtocol(
        sizes=tuple(args.sizes),
        k_train=args.k,
        meta_batch_size=args.meta_batch_size,
        iterations=args.iterations,
        meta_lr=args.meta_lr,
        backend=args.backend,
        device=device,
        checkpoint_every=args.checkpoint_every,
        changes={args.method: _method_changes(parser, args)},
    )
    try:
        setup = EXPERIMENT.setup(protocol, args.method, args.seed)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    out = check_writable_folder(args.out, "--out")
    if args.resume and not (out / "checkpoint.pt").is_file():
        parser.error(f"argument --resume: no checkpoint in {str(out)!r} to resume")
    result = run_training(
        setup.config,
        setup.loss_fn,
        setup.params,
        setup.sample_tasks,
        checkpoint_dir=out,
        resume=args.resume,
        progress=not args.no_progress,
        log_every=max(1, args.iterations // 10),
    )
    tail = result.history[-max(1, args.iterations // 20) :]
    final = f"{tail.mean().item():.4f}" if tail.numel() else "n/a"
    print(
        f"{args.method}: {args.iterations} iterations ({result.config['backend']} backend), "
        f"final meta-loss {final}; wrote {out / 'checkpoint.pt'}"
    )
    return 0


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from ._checkpoint import load_checkpoint
    from ._experiments.sinusoid import evaluate_sinusoid

    _output_file(parser, "--json", args.json)
    saved = load_checkpoint(args.checkpoint)
    curves = evaluate_sinusoid(
        saved.params,
        ks=tuple(args.k),
        num_tasks=args.tasks,
        lr=args.lr,
        steps=args.steps,
        method=saved.config.get("method"),
        hypers=saved.config.get("hypers"),
    )
    print(f"| K | {' | '.join(f'{j} steps' for j in range(args.steps + 1))} |")
    for k, curve in curves.items():
        print(
            f"| {k} | "
            + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in zip(curve["mean"], curve["ci95"]))
            + " |"
        )
    if args.json is not None:
        Path(args.json).write_text(json.dumps(curves, indent=1) + "\n")
    return 0


def _reproduce(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._experiments.common import reproduce

    quick = "_quick" if args.quick else ""
    out = args.out or f"results/{args.experiment}{quick}"
    results = reproduce(
        args.experiment,
        out,
        quick=args.quick,
        iterations=args.iterations,
        methods=args.methods,
        eval_tasks=args.eval_tasks,
        seeds=args.seeds,
        workers=args.workers,
        backend=args.backend,
        resume=args.resume,
        progress=not args.no_progress,
        figures=not args.no_figures,
    )
    for warning in results["warnings"]:
        print(f"[WARN] {warning}")
    for note in results.get("notes", []):
        print(f"[NOTE] {note}")
    for check in results["checks"]:
        print(f"[{'PASS' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    print(f"wrote {out}/results.json, results.md ({results['environment']['wall_seconds']} s)")
    return 0 if all(c["passed"] for c in results["checks"]) else 1


def _cache(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._compiled import cache_entries, clear_cache
    from ._files import cache_dir

    if args.clear:
        print(f"removed {clear_cache()} file(s) from {cache_dir()}")
        return 0
    print(f"{cache_dir()}:")
    for kind, paths in cache_entries().items():
        size = sum(p.stat().st_size for p in paths) / 2**20
        print(f"  {kind}: {len(paths)} file(s), {size:.1f} MiB")
    return 0


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mamlkit", description=DESCRIPTION, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"mamlkit {__version__}")
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch threads (default: $MAMLKIT_NUM_THREADS, the first entry of "
        "$OMP_NUM_THREADS, or 1)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also: MAMLKIT_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify", help="check every identity the notebooks claim", formatter_class=_Formatter
    )
    verify.add_argument("--seed", type=_seed, default=0, help="seed of the numeric checks")
    verify.set_defaults(run=_verify, command_parser=verify)

    train = commands.add_parser(
        "train",
        formatter_class=_Formatter,
        help="meta-train a sinusoid regressor (checkpointed, resumable)",
    )
    train.add_argument(
        "--method",
        choices=tuple(METHODS),
        default="maml",
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
    )
    train.add_argument(
        "--out", required=True, help="folder for checkpoint.pt (checked before training)"
    )
    train.add_argument(
        "--iterations",
        type=_nonnegative,
        default=70_000,
        help="meta-iterations (the paper's 70,000)",
    )
    train.add_argument(
        "--meta-batch-size", type=_positive, default=25, help="tasks per meta-iteration"
    )
    train.add_argument("--k", type=_positive, default=10, help="support (= query) points per task")
    train.add_argument("--meta-lr", type=_float, default=1e-3, help="Adam's step size β")
    train.add_argument(
        "--lr", type=_float, default=None, help="inner step size α (default: the method's setting)"
    )
    train.add_argument(
        "--steps",
        type=_nonnegative,
        default=None,
        help="inner steps (default: the method's setting)",
    )
    for hyper in hyper_table().values():
        train.add_argument(
            f"--{hyper.name.replace('_', '-')}",
            type=_float if hyper.kind is float else _positive,
            default=None,
            help=f"{hyper.help} (default: the method's setting)",
        )
    train.add_argument(
        "--sizes", type=_positive, nargs="+", default=[1, 40, 40, 1], help="MLP layer widths"
    )
    train.add_argument(
        "--seed", type=_seed, default=0, help="initialisation seed (tasks use seed + 1)"
    )
    train.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    train.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="meta-gradient backend (auto: fused-compiled from 20,000 iterations, "
        "else fused; vmap for a method without a fused kernel)",
    )
    train.add_argument(
        "--checkpoint-every", type=_positive, default=1_000, help="iterations between checkpoints"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run checkpointed in --out"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train, command_parser=train)

    evaluate = commands.add_parser(
        "evaluate",
        formatter_class=_Formatter,
        help="fine-tune a trained sinusoid regressor on fresh tasks",
    )
    evaluate.add_argument("checkpoint", help="folder (or checkpoint.pt) written by `train`")
    evaluate.add_argument(
        "--k", type=_positive, nargs="+", default=[5, 10, 20], help="support points per test task"
    )
    evaluate.add_argument("--tasks", type=_positive, default=600, help="test tasks per K")
    evaluate.add_argument("--steps", type=_nonnegative, default=10, help="fine-tuning steps")
    evaluate.add_argument("--lr", type=_float, default=0.01, help="fine-tuning step size")
    evaluate.add_argument("--json", default=None, help="also write the curves to this file")
    evaluate.set_defaults(run=_evaluate, command_parser=evaluate)

    reproduce = commands.add_parser(
        "reproduce", formatter_class=_Formatter, help="reproduce a paper experiment"
    )
    reproduce.add_argument("experiment", choices=tuple(EXPERIMENTS), help="which experiment")
    reproduce.add_argument(
        "--quick", action="store_true", help="the small version (one seed, fewer iterations)"
    )
    reproduce.add_argument(
        "--iterations",
        type=_positive,
        default=None,
        help="meta-iterations (default: the protocol's)",
    )
    reproduce.add_argument(
        "--eval-tasks", type=_positive, default=None, help="test tasks (default: the protocol's)"
    )
    reproduce.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(METHODS),
        default=None,
        help="methods to run (default: the experiment's)",
    )
    reproduce.add_argument(
        "--seeds",
        type=_seed,
        nargs="+",
        default=None,
        help="training seeds (default: 0 1 2; --quick: 0)",
    )
    reproduce.add_argument(
        "--workers", type=_positive, default=1, help="parallel training processes"
    )
    reproduce.add_argument(
        "--backend", choices=BACKEND_CHOICES, default="auto", help="meta-gradient backend"
    )
    reproduce.add_argument(
        "--out", default=None, help="output folder (default: results/EXPERIMENT[_quick])"
    )
    reproduce.add_argument(
        "--resume", action="store_true", help="continue the runs checkpointed in --out"
    )
    reproduce.add_argument("--no-progress", action="store_true", help="no progress output")
    reproduce.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    reproduce.set_defaults(run=_reproduce, command_parser=reproduce)

    cache = commands.add_parser(
        "cache",
        formatter_class=_Formatter,
        help="what mamlkit keeps in its cache folder (compiled kernels, "
        "torch.compile artifacts, glyph images)",
    )
    cache.add_argument("--clear", action="store_true", help="delete all of it")
    cache.set_defaults(run=_cache, command_parser=cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MAMLKIT_DEBUG") == "1"
    from ._checkpoint import CheckpointError
    from ._experiments.common import ExperimentFailed, ExperimentInterrupted
    from ._train import TrainingDiverged, TrainingInterrupted

    try:
        set_cpu_threads(args.threads)
        return args.run(args, args.command_parser)
    except (TrainingInterrupted, ExperimentInterrupted) as error:
        if debug:
            raise
        hint = (
            "; continue with the same command and --resume"
            if isinstance(error, TrainingInterrupted)
            else ""
        )
        print(f"mamlkit: {error}{hint}", file=sys.stderr)
        return 128 + error.signum
    except KeyboardInterrupt:
        if debug:
            raise
        print("mamlkit: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (
        ValueError,
        TypeError,
        OSError,
        CheckpointError,
        TrainingDiverged,
        ExperimentFailed,
        RuntimeError,
    ) as error:
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mamlkit: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
