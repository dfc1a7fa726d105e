"""Every file mamlkit writes goes through here: atomic writes, the cache folder, and the check
that an output folder can be written before any work starts.

An atomic write goes to a temporary file in the target's own folder (``.NAME.XXXX.tmp``), is
flushed and ``fsync``-ed, then moved over the target with ``os.replace`` and the folder is
``fsync``-ed: a crash or a kill at any moment leaves the old file or the new one, never a torn
one. Files get the permissions the user's umask gives a new file (``tempfile`` alone would give
0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once (``os.umask`` can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def cache_dir() -> Path:
    """Where mamlkit keeps what it can rebuild (compiled kernels, the glyph images):
    ``$MAMLKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mamlkit``, else ``~/.cache/mamlkit``."""
    if os.environ.get("MAMLKIT_CACHE_DIR"):
        return Path(os.environ["MAMLKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mamlkit"


def temporary_name(path: Path) -> str:
    """The prefix of the temporary files an atomic write of ``path`` leaves if killed."""
    return f".{path.name}."


def remove_temporaries(path: str | Path) -> int:
    """Delete the temporary files that atomic writes of ``path`` left when killed; return how
    many. Call it only where no other process writes ``path``."""
    path = Path(path)
    removed = 0
    for stale in path.parent.glob(f"{temporary_name(path)}*.tmp{path.suffix}"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it over ``path``.

    The folder is created if needed. Returns ``path``. An exception in ``write`` removes the
    temporary file and leaves ``path`` as it was.
    """

    def produce(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_produce(path, produce)


def atomic_produce(path: str | Path, produce: Callable[[str], Any]) -> Path:
    """Like :func:`atomic_write` for a writer that wants a file name: ``produce(tmp)`` fills the
    temporary file ``tmp``, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=temporary_name(path), suffix=".tmp" + path.suffix, dir=path.parent
    )
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        try:
            produce(tmp)
        except (OSError, RuntimeError) as error:  # a full disk: ENOSPC, or torch's zip writer
            if isinstance(error, RuntimeError) and "inline_container" not in str(error):
                raise
            reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0][:120]
            raise OSError(f"cannot write {path} ({reason}): is the disk full?") from error
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_folder(path.parent)
    return path


LOCK_NAME = ".mamlkit.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.mamlkit.lock``) for the
    block: a second process that asks for it gets a ``ValueError`` naming the folder and the
    holder at once. The kernel releases the lock when the holder exits, however it exits."""
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(
                f"{name} {str(folder)!r} is in use by another mamlkit run ({holder}); wait for it, "
                "or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def save_torch(path: str | Path, obj: object) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def check_writable_folder(folder: object, name: str) -> Path:
    """``folder`` exists or can be created, is a folder, and accepts a file — checked now, before
    any work, with a probe file that is removed again."""
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"{name} must be a path, got {type(folder).__name__}")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mamlkit-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"{name} {str(path)!r} is not writable: {reason}") from error
    return path


__all__ = [
    "atomic_produce",
    "atomic_write",
    "cache_dir",
    "check_writable_folder",
    "folder_lock",
    "remove_temporaries",
    "save_torch",
    "temporary_name",
    "write_text",
]
