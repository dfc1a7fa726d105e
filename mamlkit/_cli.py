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
from ._distributed import init_from_environment, launched_by_torchrun, leave_process_group
from ._experiments.common import EXPERIMENTS
from ._methods import METHODS, Hyper, get_method, hyper_table
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


def _hyper_argument(hyper: Hyper) -> dict[str, Any]:
    """argparse settings for one method hyper-parameter: a flag, a value or a list of values."""
    if hyper.kind is bool:
        return {"action": "store_const", "const": True}
    convert = {float: _float, int: _positive}
    if hyper.kind is tuple:
        return {"type": convert.get(hyper.item, str), "nargs": "+"}
    return {"type": convert.get(hyper.kind, str), "choices": hyper.choices}


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
    if device.type == "meta":
        parser.error("argument --device: the meta device holds no values; use cpu or cuda")
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

    checks = run_checks(seed=args.seed, compiled=args.compiled)
    print(format_report(checks))
    return 0 if all(c.passed for c in checks) else 1


TASK_FLAGS: dict[str, dict[str, str]] = {
    "sinusoid": {"k": "k_train", "sizes": "sizes"},
    "glyphs": {"ways": "ways", "shots": "train_shots", "channels": "channels"},
}
"""Each task's own flags and the protocol field each sets."""

COMMON_FLAGS = (
    "iterations",
    "meta_batch_size",
    "meta_lr",
    "backend",
    "checkpoint_every",
    "schedule",
    "first_order_until",
)


def _protocol(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The task's protocol with the command line's changes; a flag of another task is a usage
    error."""
    from dataclasses import replace

    from ._experiments.common import get_experiment

    experiment = get_experiment(args.task)
    for task, flags in TASK_FLAGS.items():
        for flag in flags:
            if task != args.task and getattr(args, flag) is not None:
                parser.error(f"argument --{flag}: applies to --task {task}, not {args.task}")
    changes = {
        name: getattr(args, name) for name in COMMON_FLAGS if getattr(args, name) is not None
    }
    changes.update(
        {
            field: getattr(args, flag)
            for flag, field in TASK_FLAGS[args.task].items()
            if getattr(args, flag) is not None
        }
    )
    if "sizes" in changes:
        changes["sizes"] = tuple(changes["sizes"])
    changes["device"] = _device(parser, args.device)
    changes["changes"] = {args.method: _method_changes(parser, args)}
    protocol = replace(experiment.protocol_type(), **changes)
    try:
        return experiment, protocol, experiment.setup(protocol, args.method, args.seed)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
        raise  # unreachable


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._files import check_writable_folder

    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with argument --resume")
    _needs_matplotlib(parser, args.task)
    _, protocol, setup = _protocol(parser, args)
    out = check_writable_folder(args.out, "--out")
    if args.resume and not (out / "checkpoint.pt").is_file():
        parser.error(f"argument --resume: no checkpoint in {str(out)!r} to resume")
    group, lead = None, True
    if launched_by_torchrun():  # one rank of torchrun: shard every meta-batch over the job
        init_from_environment(protocol.device, args.dist_timeout)
        group, lead = "world", int(os.environ["RANK"]) == 0
    try:
        result = setup.train(
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=lead and not args.no_progress,
            group=group,
        )
    finally:  # a rank that leaves its process group alive aborts at exit
        if group is not None:
            leave_process_group()
    tail = result.history[-max(1, protocol.iterations // 20) :]
    final = f"{tail.mean().item():.4f}" if tail.numel() else "n/a"
    ranks = f", {result.config['world_size']} ranks" if result.config["world_size"] > 1 else ""
    if lead:
        print(
            f"{args.method} on {args.task}: {protocol.iterations} iterations "
            f"({result.config['backend']} backend{ranks}), final meta-loss {final}; wrote "
            f"{out / 'checkpoint.pt'}"
        )
    return 0


def _needs_matplotlib(parser: argparse.ArgumentParser, task: str) -> None:
    """The glyph benchmark renders characters from matplotlib's fonts: one line if it is missing."""
    if task == "glyphs":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(
                "the glyph benchmark needs matplotlib (its fonts): pip install 'mamlkit[glyphs]'"
            )


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from ._checkpoint import load_checkpoint

    _output_file(parser, "--json", args.json)
    saved = load_checkpoint(args.checkpoint)
    task = "glyphs" if _describes(saved.config.get("tasks"), "GlyphFamily") else "sinusoid"
    _needs_matplotlib(parser, task)
    method, hypers = saved.config.get("method"), saved.config.get("hypers") or {}
    lr = args.lr if args.lr is not None else saved.config.get("lr", 0.01)
    if task == "sinusoid":
        from ._experiments.sinusoid import evaluate_sinusoid

        ks = tuple(args.k or (5, 10, 20))
        curves = evaluate_sinusoid(
            saved.params,
            ks=ks,
            num_tasks=args.tasks,
            lr=lr,
            steps=args.steps,
            method=method,
            hypers=hypers,
        )
        rows = {f"K = {k}": (c["mean"], c["ci95"]) for k, c in curves.items()}
        what, scale, digits = "query MSE", 1.0, 3
    else:
        from ._experiments.glyphs import GlyphProtocol, evaluate_glyphs, model

        shapes = saved.config["param_shapes"]
        # the model's own names hold no "/" (Meta-SGD's rates and per-step copies do)
        head = [name for name in shapes if "/" not in name][-1]
        channels, ways = shapes["0.weight"][0], shapes[head][0]
        protocol = GlyphProtocol(
            ways=ways,
            channels=channels,
            eval_shots=tuple(args.k or (1, 5)),
            eval_tasks=args.tasks,
            lr=lr,
            eval_steps=args.steps,
        )
        loss = model(channels, ways, 0)[1]
        curves = evaluate_glyphs(saved.params, loss, protocol, method, hypers)
        rows = {f"{ways}-way {k}-shot": (c["accuracy"], c["ci95"]) for k, c in curves.items()}
        what, scale, digits = "query accuracy (%)", 100.0, 1
    print(
        f"{what} after 0 … {args.steps} fine-tuning steps of α = {lr} ({method}'s adaptation);\n"
        f"each cell: mean ± 95 % half-width over {args.tasks} test tasks"
    )
    print("| steps | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for j in range(args.steps + 1):
        cells = [f"{scale * m[j]:.{digits}f} ± {scale * h[j]:.{digits}f}" for m, h in rows.values()]
        print(f"| {j} | " + " | ".join(cells) + " |")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(curves, indent=1) + "\n")
    return 0


def _describes(record: object, type_name: str) -> bool:
    return isinstance(record, dict) and record.get("type") == type_name


def _reproduce(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._experiments.common import reproduce

    _needs_matplotlib(parser, args.experiment)
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
        overwrite=args.overwrite,
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
        "verify",
        help="check the derivations' identities and each family of code they rely on",
        description="One line per identity or family: the symbolic identities (sympy, exact), "
        "the meta-gradient engines, Hessian splits, the meta-batch engine (task mean, every "
        "method, the fused kernels, the reverse routes), BatchNorm through from_module, iMAML, "
        "Reptile, ES-MAML, Meta-SGD, ANIL and the multi-step loss (float64, against finite "
        "differences, closed forms and autograd written out).",
        formatter_class=_Formatter,
    )
    verify.add_argument("--seed", type=_seed, default=0, help="seed of the numeric checks")
    verify.add_argument(
        "--compiled",
        action="store_true",
        help="also the ahead-of-time compiled kernels (about 30 s each when not cached)",
    )
    verify.set_defaults(run=_verify, command_parser=verify)

    train = commands.add_parser(
        "train",
        formatter_class=_Formatter,
        help="meta-train on a task family (checkpointed, resumable)",
        description="Meta-train on the sinusoid regression family (a 1-40-40-1 MLP) or the offline "
        "glyph benchmark (the paper's conv net). Unset settings are the task's protocol "
        "(`reproduce` runs the same).",
    )
    train.add_argument(
        "--task",
        choices=tuple(EXPERIMENTS),
        default="sinusoid",
        help="the task family and its network",
    )
    train.add_argument(
        "--method",
        choices=tuple(METHODS),
        default="maml",
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
    )
    train.add_argument(
        "--out",
        required=True,
        help="folder for checkpoint.pt (checked, and locked, before training)",
    )
    protocol = "default: the task's protocol"
    train.add_argument(
        "--iterations",
        type=_nonnegative,
        default=None,
        help=f"meta-iterations ({protocol}: sinusoid 70,000, glyphs 2,000)",
    )
    train.add_argument(
        "--meta-batch-size",
        type=_positive,
        default=None,
        help=f"tasks per meta-iteration ({protocol})",
    )
    train.add_argument(
        "--meta-lr",
        type=_float,
        default=None,
        help=f"the meta-optimizer's step size β ({protocol})",
    )
    train.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default=None,
        help="β throughout, or annealed to 0 along a cosine (default: constant)",
    )
    train.add_argument(
        "--first-order-until",
        type=_nonnegative,
        default=None,
        help="MAML++'s derivative-order annealing: first order (fomaml) before this iteration, "
        "then the method (maml only; default 0: second order throughout)",
    )
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
            default=None,
            help=hyper.help
            if "default" in hyper.help
            else f"{hyper.help} (default: {hyper.default})",
            **_hyper_argument(hyper),
        )
    train.add_argument(
        "--k",
        type=_positive,
        default=None,
        help="sinusoid: support (= query) points per task (default 10)",
    )
    train.add_argument(
        "--sizes",
        type=_positive,
        nargs="+",
        default=None,
        help="sinusoid: MLP layer widths (default 1 40 40 1)",
    )
    train.add_argument(
        "--ways", type=_positive, default=None, help="glyphs: classes per task, N-way (default 5)"
    )
    train.add_argument(
        "--shots",
        type=_positive,
        default=None,
        help="glyphs: training images per class, K-shot (default 1)",
    )
    train.add_argument(
        "--channels",
        type=_positive,
        default=None,
        help="glyphs: conv channels (default 16; the paper 64)",
    )
    train.add_argument(
        "--seed", type=_seed, default=0, help="initialisation seed (tasks use seed + 1)"
    )
    train.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    train.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=None,
        help="meta-gradient backend (default auto: fused-compiled from 20,000 "
        "iterations, else fused; vmap for other models and methods)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_positive,
        default=None,
        help=f"iterations between checkpoints ({protocol})",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run checkpointed in --out"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run checkpointed in --out"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--dist-timeout",
        type=_positive,
        default=300,
        help="under torchrun: seconds to wait for every rank to start",
    )
    train.set_defaults(run=_train, command_parser=train)

    evaluate = commands.add_parser(
        "evaluate",
        formatter_class=_Formatter,
        help="fine-tune a trained model on fresh test tasks",
        description="Fine-tune a model written by `train` on fresh test tasks of its family "
        "(sinusoid: query MSE; glyphs: accuracy on meta-test characters) after 0 … --steps steps.",
    )
    evaluate.add_argument("checkpoint", help="folder (or checkpoint.pt) written by `train`")
    evaluate.add_argument(
        "--k",
        type=_positive,
        nargs="+",
        default=None,
        help="support points (sinusoid, default 5 10 20) or shots (glyphs, "
        "default 1 5) per test task",
    )
    evaluate.add_argument("--tasks", type=_positive, default=600, help="test tasks per setting")
    evaluate.add_argument("--steps", type=_nonnegative, default=10, help="fine-tuning steps")
    evaluate.add_argument(
        "--lr", type=_float, default=None, help="fine-tuning step size (default: the run's inner α)"
    )
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
    reproduce.add_argument(
        "--overwrite", action="store_true", help="replace the runs checkpointed in --out"
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
