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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_threads(args.threads)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
