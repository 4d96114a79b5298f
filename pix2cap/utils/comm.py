"""Helpers for multi-process (torch.distributed) training.

Every function works without an initialised process group too, where it behaves as a
single-process job of world size 1, so the same code runs in tests, on one CPU and on many GPUs.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "get_world_size",
    "get_rank",
    "get_local_rank",
    "get_local_size",
    "is_main_process",
    "synchronize",
    "all_gather",
    "gather",
    "reduce_dict",
    "shared_random_seed",
]

# Set by ``pix2cap.engine.launch``: rank and size of this process within its machine.
_LOCAL_RANK: Optional[int] = None
_LOCAL_SIZE: Optional[int] = None


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if _is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def set_local_rank(local_rank: int, local_size: int) -> None:
    """Record this process's position within its machine (called by the launcher)."""
    global _LOCAL_RANK, _LOCAL_SIZE
    _LOCAL_RANK, _LOCAL_SIZE = int(local_rank), int(local_size)


def get_local_rank() -> int:
    """Rank of this process among the processes of its machine (its GPU index)."""
    if not _is_distributed():
        return 0
    if _LOCAL_RANK is not None:
        return _LOCAL_RANK
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_size() -> int:
    """Number of processes on this machine."""
    if not _is_distributed():
        return 1
    if _LOCAL_SIZE is not None:
        return _LOCAL_SIZE
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier over all processes; a no-op in a single-process job."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        # NCCL barriers need to know which GPU this process owns.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@functools.lru_cache()
def _object_group():
    """A gloo group for Python-object collectives: they would otherwise go through NCCL,
    which needs CUDA tensors and copies every object to the GPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(data: Any, group=None) -> list[Any]:
    """Gather a picklable object from every process.

    Returns:
        list with one entry per rank, ``[data_of_rank0, data_of_rank1, ...]``.
    """
    if get_world_size() == 1:
        return [data]
    group = _object_group() if group is None else group
    output: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(output, data, group=group)
    return output


def gather(data: Any, dst: int = 0, group=None) -> list[Any]:
    """Gather a picklable object from every process onto rank ``dst``.

    Returns:
        on ``dst``: a list with one entry per rank; on the other ranks: ``[]``.
    """
    if get_world_size() == 1:
        return [data]
    group = _object_group() if group is None else group
    if dist.get_rank() == dst:
        output: Optional[list[Any]] = [None] * dist.get_world_size(group)
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def reduce_dict(
    input_dict: dict[str, torch.Tensor], average: bool = True
) -> dict[str, torch.Tensor]:
    """Reduce a dict of scalar tensors over all processes; rank 0 gets the sum (or mean).

    Args:
        input_dict: name -> 0-dim tensor, the same names on every rank.
        average: divide the sum by the world size.
    Returns:
        A dict with the same keys; only rank 0's values are the reduced ones.
    """
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)
        values = torch.stack([input_dict[k] for k in names], dim=0)
        dist.reduce(values, dst=0)
        if dist.get_rank() == 0 and average:
            values /= world_size
        return dict(zip(names, values))


def shared_random_seed() -> int:
    """A random integer that is the same on every process (drawn on rank 0, then gathered).

    All processes must call it, since it is a collective operation.
    """
    seed = int(np.random.randint(2**31))
    return all_gather(seed)[0]
