"""Signals while the command line starts: one line and the usual exit status, not a traceback.

``python -m mamlkit`` imports the package — and torch, a second or more — before the command
line can install its handlers. When the package is being imported to run the command line,
:func:`quiet_signals` (called from ``mamlkit/__init__.py`` before torch is imported) makes SIGINT
and SIGTERM print one line and exit with 130 or 143; the command line then keeps that behaviour
outside training, where a signal checkpoints first.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def running_the_cli() -> bool:
    """Whether this process is ``python -m mamlkit …`` or the ``mamlkit`` console script."""
    argv = getattr(sys, "orig_argv", sys.argv)
    as_module = any(a == "-m" and b == "mamlkit" for a, b in zip(argv, argv[1:]))
    return as_module or Path(sys.argv[0] if sys.argv else "").name == "mamlkit"


def quiet_signals() -> None:
    """SIGINT and SIGTERM: one line on stderr, exit 128 + the signal's number."""

    def handler(signum: int, frame: object) -> None:
        sys.stderr.write(f"mamlkit: interrupted by {signal.Signals(signum).name}\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)
