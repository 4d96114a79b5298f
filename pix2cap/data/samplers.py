"""Index samplers that shard a dataset across the processes of a distributed job."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler

from pix2cap.utils import comm
from pix2cap.utils.env import derive_seed

__all__ = ["TrainingSampler", "InferenceSampler"]


class TrainingSampler(Sampler[int]):
    """Infinite stream of indices for training, resumable at any position.

    The job's stream is the concatenation of one permutation of ``range(size)`` per epoch,
    each a pure function of ``(seed, epoch)``; process ``rank`` takes the stream positions
    ``rank, rank + world_size, rank + 2 * world_size, ...``, so within each pass over the data
    the ranks see disjoint indices that together cover the dataset. Because any epoch's
    permutation can be regenerated on its own, a sampler built with ``start=n`` yields exactly
    what an uninterrupted one yields after the job drew its first ``n`` indices, without
    replaying them (a resumed run sees the batches the interrupted one would have seen).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        *,
        start: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        """
        Args:
            size: number of dataset items.
            shuffle: draw a new permutation per pass (else ``0, 1, ..., size-1`` repeated).
            seed: the shared shuffling seed; ``None`` draws one on rank 0 and shares it, which
                is a collective call when distributed.
            start: indices the whole job (all ranks together) already drew, e.g.
                ``iteration * total_batch_size`` when resuming; a multiple of ``world_size``.
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
        if start < 0 or start % self._world_size:
            # Ranks take turns in the stream: any other start would give them unequal shares.
            raise ValueError(
                f"start {start} must be >= 0 and a multiple of the world size {self._world_size}"
            )
        self._start = int(start)

    @property
    def seed(self) -> int:
        return self._seed

    def epoch_indices(self, epoch: int) -> list[int]:
        """The job's order of ``range(size)`` in pass ``epoch`` (a function of seed and epoch)."""
        if not self._shuffle:
            return list(range(self._size))
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self._seed, "epoch", epoch))
        return torch.randperm(self._size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        position = self._start + self._rank
        cached_epoch, order = -1, []
        while True:
            epoch, offset = divmod(position, self._size)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.epoch_indices(epoch)
            yield order[offset]
            position += self._world_size


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
