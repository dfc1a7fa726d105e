r"""Meta-batches sharded over ``torch.distributed`` ranks, with the exact task mean.

Every rank holds the same whole meta-batch of T tasks (drawn from one seeded generator) and
computes, with any backend, the *sum* of the per-task meta-gradients of its contiguous slice —
rank r of W takes tasks ``⌊rT/W⌋ … ⌊(r+1)T/W⌋ − 1`` — then one ``all_reduce`` (SUM) of a flat
buffer holding those sums, every task's query loss (zero outside the slice) and a stop flag, and
a division by T:

.. math:: g = \frac1T \sum_{r=0}^{W-1} \sum_{i \in S_r} g_i .

So uneven shards are exact (13 and 12 tasks of the paper's 25 give the meta-batch mean, where the
mean of the two per-rank means is off by ``(1/2)(1/13 − 1/12)·(…)``), the result does not depend
on W, and second order is untouched: each rank's meta-gradient is complete before the reduce.
One message of P + T + 1 numbers per iteration.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._params import Batch, Params

WORLD = "world"
"""``group="world"``: the default process group, once ``torch.distributed`` is initialised."""


class Sharding(NamedTuple):
    """Where this process stands: its group, its rank in it and the group's size."""

    group: Any
    rank: int
    world: int

    def slice(self, tasks: int) -> slice:
        """This rank's contiguous share of ``tasks`` tasks (possibly empty)."""
        return slice(self.rank * tasks // self.world, (self.rank + 1) * tasks // self.world)


def resolve(group: object) -> Sharding | None:
    """``None`` for one process; else the :class:`Sharding` of ``group`` (``"world"`` or a
    ``ProcessGroup``), or a ``ValueError`` that says what is missing."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group needs an initialised torch.distributed process group (start the script with "
            "torchrun, or call torch.distributed.init_process_group first)"
        )
    if group == WORLD:
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be None, 'world' or a torch.distributed ProcessGroup, got {group!r}"
        )
    return Sharding(group, dist.get_rank(group), dist.get_world_size(group))


def task_slice(pair: Batch, part: slice) -> Batch:
    """The tasks ``part`` of a meta-batch ``(x, y)``."""
    return pair[0][part], pair[1][part]


def reduce_sums(
    sharding: Sharding,
    grads: Params | None,
    losses: Tensor | None,
    part: slice,
    tasks: int,
    like: Params,
    stop: bool = False,
) -> tuple[Params, Tensor, bool]:
    """All-reduce this rank's gradient *sums* and its slice's query losses; return the task
    means, every task's loss, and whether any rank asked to stop. ``grads``/``losses`` are
    ``None`` for an empty slice."""
    ref = next(iter(like.values()))
    sizes = [v.numel() for v in like.values()]
    flat = torch.zeros(sum(sizes) + tasks + 1, dtype=ref.dtype, device=ref.device)
    if grads is not None:
        torch.cat([grads[k].reshape(-1) for k in like], out=flat[: sum(sizes)])
        flat[sum(sizes) + part.start : sum(sizes) + part.stop] = losses
    flat[-1] = float(stop)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=sharding.group)
    pieces = flat[: sum(sizes)].div_(tasks).split(sizes)
    means = {k: piece.reshape(v.shape) for (k, v), piece in zip(like.items(), pieces)}
    return means, flat[sum(sizes) : sum(sizes) + tasks].clone(), bool(flat[-1] > 0)


def sharded(
    run: Callable[[Params, Batch, Batch], tuple[Params, Tensor]],
    sharding: Sharding,
    params: Params,
    support: Batch,
    query: Batch,
    stop: bool = False,
) -> tuple[Params, Tensor, bool]:
    """The whole meta-batch's mean gradient and losses from this rank's slice: ``run`` is the
    inner backend's runner on the slice (its task mean times the slice's size is the sum)."""
    tasks = support[0].shape[0]
    part = sharding.slice(tasks)
    count = part.stop - part.start
    grads = losses = None
    if count:
        mean, losses = run(params, task_slice(support, part), task_slice(query, part))
        grads = {k: v * count for k, v in mean.items()}
    return reduce_sums(sharding, grads, losses, part, tasks, dict(params), stop)


def broadcast(sharding: Sharding, value: Any) -> Any:
    """``value`` from rank 0 on every rank (tensors land on the device they had on rank 0)."""
    box = [value if sharding.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=sharding.group)
    return box[0]


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` job (its environment says so)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_from_environment(device: str, timeout_s: float = 120.0) -> None:
    """``init_process_group`` for a ``torchrun`` rank: gloo on the CPU, NCCL on CUDA (one GPU per
    rank, ``LOCAL_RANK``); a start-up that does not complete within ``timeout_s`` is a one-line
    ``RuntimeError``."""
    if dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise RuntimeError(f"torch.distributed did not start ({reason})") from error


def leave_process_group() -> None:
    """Wait for every rank, then destroy the default process group (a rank whose gloo threads
    outlive the interpreter aborts at exit). After a failure, when the others may be gone, the
    group is destroyed without waiting."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except Exception:  # a peer that died or left: nothing to wait for
        pass
    dist.destroy_process_group()


__all__ = [
    "WORLD",
    "Sharding",
    "broadcast",
    "init_from_environment",
    "launched_by_torchrun",
    "leave_process_group",
    "reduce_sums",
    "resolve",
    "sharded",
    "task_slice",
]
