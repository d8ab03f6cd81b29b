"""Running one job on several processes: ``torchrun --nproc_per_node=N -m qcore run ...``.

torch.distributed is initialised from torchrun's environment (gloo on CPU, nccl on CUDA). Work items (RD
curve layers, for instance) are sharded by rank and gathered, so every process ends with the same data and
computes the same plan; only rank 0 evaluates, prints and writes outputs. Without torchrun every helper
here behaves as a single process.

``qcore run`` joins the process group only after every setting, the model and the data have been checked, so
a bad input fails on every rank alike before any rank waits on another; the CLI prints a user error on rank 0
only (the other ranks exit 2 silently), and errors that may be one rank's own on every rank, with its number.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["init_from_env", "world", "rank", "is_main", "shard", "all_gather_object"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def init_from_env(device: str) -> None:
    """Join the process group torchrun set up, if any (idempotent)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)


def world() -> int:
    """Number of processes in the job (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that evaluates and writes outputs (rank 0)."""
    return rank() == 0


def shard(items: list[T]) -> list[T]:
    """This process's share of ``items`` (round robin by rank)."""
    return items[rank()::world()]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (just ``[obj]`` in a single process)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out
