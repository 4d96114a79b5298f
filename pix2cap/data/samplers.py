"""Index samplers that shard a dataset across the processes of a distributed job."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler

from pix2cap.utils import comm

__all__ = ["TrainingSampler", "InferenceSampler"]


class TrainingSampler(Sampler[int]):
    """Infinite stream of indices for training.

    Every process draws the same sequence of permutations of ``range(size)`` (one seed shared
    by all ranks) and keeps every ``world_size``-th index starting at its rank, so within each
    pass over the data the ranks see disjoint indices that together cover the dataset.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        *,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        """
        Args:
            size: number of dataset items.
            shuffle: draw a new permutation per pass (else ``0, 1, ..., size-1`` repeated).
            seed: the shared shuffling seed; ``None`` draws one on rank 0 and shares it, which
                is a collective call when distributed.
            rank, world_size: this process's shard; default: from ``torch.distributed``.
        """
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"TrainingSampler needs a positive dataset size, got {size!r}")
        self._size = size
        self._shuffle = bool(shuffle)
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank() if rank is None else int(rank)
        self._world_size = comm.get_world_size() if world_size is None else int(world_size)
        if not 0 <= self._rank < self._world_size:
            raise ValueError(f"rank {self._rank} is outside world size {self._world_size}")

    @property
    def seed(self) -> int:
        return self._seed

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=generator).tolist()
            else:
                yield from range(self._size)


class InferenceSampler(Sampler[int]):
    """Each index exactly once over all processes: rank ``r`` gets one contiguous block,
    the first ``size % world_size`` ranks one index more than the others. Keeping the blocks
    contiguous lets gathered results be concatenated back in dataset order."""

    def __init__(self, size: int, *, rank: Optional[int] = None, world_size: Optional[int] = None):
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"InferenceSampler needs a dataset size >= 0, got {size!r}")
        self._size = size
        rank = comm.get_rank() if rank is None else int(rank)
        world_size = comm.get_world_size() if world_size is None else int(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        shard_len, remainder = divmod(size, world_size)
        start = rank * shard_len + min(rank, remainder)
        end = start + shard_len + (1 if rank < remainder else 0)
        self._local_indices = range(start, end)

    def __iter__(self) -> Iterator[int]:
        return iter(self._local_indices)

    def __len__(self) -> int:
        return len(self._local_indices)
