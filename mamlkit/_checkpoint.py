"""Checkpoints: one file per run, written atomically, holding everything a resume needs.

A checkpoint is a single ``torch.save`` file (``checkpoint.pt``) with the parameters, Adam's
state, the iteration, the task generator's state, the loss history, the run's config (as
JSON text) and a status. One file means parameters and config can never disagree. It is written
atomically (``mamlkit._files``), so a crash or a kill at any moment leaves either the old
checkpoint or the new one, never a torn file. Loading uses ``torch.load(weights_only=True)``
(no code runs while loading) and names the file in every error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._files import save_torch
from ._optim import AdamState, OptimizerState, state_record
from ._params import Params

FORMAT = "mamlkit-checkpoint"
VERSION = 2
READS = (1, 2)
"""Format 1 held Adam's state as ``adam_step``/``adam_m``/``adam_v``; format 2 holds any
optimizer's, as ``optimizer`` (see :func:`mamlkit._optim.state_record`)."""
FILENAME = "checkpoint.pt"
STATUSES = ("running", "interrupted", "diverged", "finished")


class Checkpoint(NamedTuple):
    """A training run's state.

    Attributes:
        params: θ after ``iteration`` meta-iterations.
        optimizer: the optimizer's state at that point: an :class:`AdamState` for the built-in
            Adam, else the record of :func:`mamlkit._optim.state_record` (a torch optimizer's
            ``state_dict``).
        iteration: how many meta-iterations are done.
        generator: the task generator's state (``torch.Generator.get_state()``).
        history: (iteration,) float64, the meta-loss of every finished iteration.
        config: the run's settings (JSON-ready).
        status: ``"running"``, ``"interrupted"``, ``"diverged"`` or ``"finished"``.
    """

    params: Params
    optimizer: OptimizerState | dict[str, Any]
    iteration: int
    generator: Tensor
    history: Tensor
    config: dict[str, Any]
    status: str


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not hold what it should."""


def checkpoint_path(location: str | Path) -> Path:
    """``location`` itself if it names a file, else ``location/checkpoint.pt``."""
    location = Path(location)
    return location if location.suffix == ".pt" else location / FILENAME


def save_checkpoint(checkpoint: Checkpoint, location: str | Path) -> Path:
    """Write ``checkpoint`` atomically to ``location`` (a folder, created if needed, or a
    ``.pt`` path); return the file's path."""
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"checkpoint must be a Checkpoint, got {type(checkpoint).__name__}")
    if checkpoint.status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {checkpoint.status!r}")
    path = checkpoint_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu() for k, v in checkpoint.params.items()}
    record = {
        "format": FORMAT,
        "version": VERSION,
        "params": cpu,
        "optimizer": checkpoint.optimizer
        if isinstance(checkpoint.optimizer, dict)
        else state_record(checkpoint.optimizer),
        "iteration": checkpoint.iteration,
        "generator": checkpoint.generator.cpu(),
        "history": checkpoint.history.detach().cpu().to(torch.float64),
        "config": json.dumps(checkpoint.config),
        "status": checkpoint.status,
    }
    return save_torch(path, record)


_KEYS = (
    "params",
    "optimizer",
    "iteration",
    "generator",
    "history",
    "config",
    "status",
)


def load_checkpoint(location: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (a folder or the ``.pt`` file).

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: the file is truncated, corrupt, refused by ``weights_only`` loading,
            or does not hold a consistent mamlkit checkpoint; the message names the file.
    """
    path = checkpoint_path(location)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        record = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many kinds for a torn or hostile file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {reason[:300]}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a mamlkit checkpoint")
    if record.get("version") not in READS:
        raise CheckpointError(
            f"{str(path)!r} has format version {record.get('version')!r}; "
            f"this mamlkit reads versions {READS}"
        )
    if record["version"] == 1 and all(k in record for k in ("adam_step", "adam_m", "adam_v")):
        record["optimizer"] = {
            "kind": "adam",
            "step": record["adam_step"],
            "m": record["adam_m"],
            "v": record["adam_v"],
        }
    missing = [k for k in _KEYS if k not in record]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    try:
        config = json.loads(record["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable config") from error
    params, optimizer = record["params"], record["optimizer"]
    history, iteration = record["history"], record["iteration"]
    adam = isinstance(optimizer, dict) and optimizer.get("kind") == "adam"
    consistent = (
        isinstance(params, dict)
        and params
        and isinstance(optimizer, dict)
        and optimizer.get("kind") in ("adam", "torch")
        and (not adam or set(optimizer["m"]) == set(params) == set(optimizer["v"]))
        and (
            not adam
            or all(
                isinstance(t, Tensor) and t.shape == params[k].shape
                for d in (optimizer["m"], optimizer["v"])
                for k, t in d.items()
            )
        )
        and isinstance(iteration, int)
        and isinstance(history, Tensor)
        and history.shape == (iteration,)
        and record["status"] in STATUSES
        and config.get("param_shapes", {k: list(p.shape) for k, p in params.items()})
        == {k: list(p.shape) for k, p in params.items()}
    )
    if not consistent:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is inconsistent (parameters, optimizer "
            "state, history and config do not agree)"
        )
    return Checkpoint(
        params,
        AdamState(optimizer["step"], optimizer["m"], optimizer["v"]) if adam else optimizer,
        iteration,
        record["generator"],
        history,
        config,
        record["status"],
    )
