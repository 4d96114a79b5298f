"""Dataset dicts -> data loaders yielding batches (lists) of model input dicts.

Batches are plain ``list[dict]``: images differ in size and targets are ragged, so the model
pads them itself (``ImageList.from_tensors``). Training loaders are infinite.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.utils.data as torchdata

from pix2cap.config.config import configurable
from pix2cap.utils import comm
from pix2cap.utils.env import derive_seed

from .catalog import DatasetCatalog
from .errors import DatasetError
from .mappers import build_dataset_mapper
from .samplers import InferenceSampler, TrainingSampler
from .transforms import seed_global_rng

__all__ = [
    "get_detection_dataset_dicts",
    "MapDataset",
    "build_train_loader",
    "build_test_loader",
    "trivial_batch_collator",
    "worker_init_reset_seed",
]

logger = logging.getLogger(__name__)


def _has_usable_segments(dataset_dict: dict[str, Any]) -> bool:
    """False for an image whose segments are all absent or crowd (nothing to learn from);
    dicts without ``segments_info`` (caption-only datasets) count as usable."""
    if "segments_info" not in dataset_dict:
        return True
    return any(not s.get("iscrowd", 0) for s in dataset_dict["segments_info"])


def get_detection_dataset_dicts(
    names: Union[str, Sequence[str]], filter_empty: bool = True
) -> list[dict[str, Any]]:
    """Load and concatenate registered datasets.

    Args:
        names: one dataset name or several, as registered in ``DatasetCatalog``.
        filter_empty: drop images whose ``segments_info`` has no non-crowd segment.
    Returns:
        The dataset dicts of all names, in order.
    Raises:
        ValueError: no names, or a dataset that loads as an empty list / not a list.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("no dataset names given (is DATASETS.TRAIN / DATASETS.TEST empty?)")
    all_dicts: list[dict[str, Any]] = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if not isinstance(dicts, list):
            raise ValueError(
                f"dataset {name!r}: loader returned {type(dicts).__name__}, not a list"
            )
        if not dicts:
            raise ValueError(f"dataset {name!r} is empty: its loader returned no images")
        logger.info("Dataset %r: %d images", name, len(dicts))
        all_dicts.extend(dicts)
    if filter_empty:
        before = len(all_dicts)
        all_dicts = [d for d in all_dicts if _has_usable_segments(d)]
        if before != len(all_dicts):
            logger.info(
                "Removed %d images without non-crowd segments; %d left",
                before - len(all_dicts),
                len(all_dicts),
            )
        if not all_dicts:
            raise ValueError(f"datasets {names}: no image has a non-crowd segment")
    if len(names) > 1:
        logger.info("Datasets %s: %d images in total", names, len(all_dicts))
    return all_dicts


class MapDataset(torchdata.Dataset):
    """Apply ``map_func`` to the items of a list lazily (in DataLoader workers).

    ``dataset[i]`` maps item ``i`` with the augmentation generator as it stands.
    ``dataset[(i, seed)]`` first reseeds this process's augmentation generator
    (:func:`~pix2cap.data.transforms.global_rng`) with ``seed``. Training loaders ask for
    every sample that way, with a seed derived from the run seed and the sample's position
    in the job's stream: its random crop and flip are then the same whichever worker maps it
    and whether or not the run was resumed.

    With ``max_retries > 0`` an item whose mapping raises :class:`DatasetError` is logged and
    replaced by another item, drawn by a generator seeded with the requested index and
    avoiding items already known to fail (at most ``max_retries`` times per request); by
    default the error propagates with the offending file's name.
    """

    def __init__(
        self, dataset: Sequence[Any], map_func: Callable[[Any], Any], max_retries: int = 0
    ):
        self._dataset = dataset
        self._map_func = map_func
        self._max_retries = int(max_retries)
        self._failed_indices: set[int] = set()  # per process; avoids re-picking known-bad items

    @property
    def map_func(self) -> Callable[[Any], Any]:
        return self._map_func

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            seed_global_rng(seed)
        else:
            index = key
        current = int(index)
        attempt = 0
        while True:
            try:
                return self._map_func(self._dataset[current])
            except DatasetError as e:
                if attempt >= self._max_retries:
                    raise
                attempt += 1
                self._failed_indices.add(current)
                replacement = self._pick_replacement(int(index), attempt)
                logger.warning(
                    "Skipping dataset item %d (%s); using item %d instead (retry %d of %d)",
                    current,
                    e,
                    replacement,
                    attempt,
                    self._max_retries,
                )
                current = replacement

    def _pick_replacement(self, index: int, attempt: int) -> int:
        # Seeded by the request so a rerun with the same sampler picks the same stand-in.
        chooser = random.Random(index * 1_000_003 + attempt)
        replacement = chooser.randrange(len(self._dataset))
        if len(self._failed_indices) < len(self._dataset):
            while replacement in self._failed_indices:
                replacement = chooser.randrange(len(self._dataset))
        return replacement


def trivial_batch_collator(batch: list[Any]) -> list[Any]:
    """Keep a batch as the list of mapped dicts (no tensor stacking)."""
    return batch


class _SeededSampler(torchdata.Sampler):
    """Pairs each index of ``sampler`` with the augmentation seed of its sample (see
    :class:`MapDataset`): a function of ``seed`` and the sample's position in the job's
    stream, where this process's ``k``-th index is at ``first_position + k * world_size``.

    The ``skip`` first indices of ``sampler`` are dropped (resuming a sampler that cannot
    start in the middle by itself)."""

    def __init__(
        self,
        sampler: Iterable[int],
        *,
        seed: int,
        first_position: int,
        world_size: int,
        skip: int = 0,
    ):
        self._sampler = sampler
        self._seed = int(seed)
        self._first_position = int(first_position)
        self._world_size = int(world_size)
        self._skip = int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = itertools.islice(self._sampler, self._skip, None)
        for k, index in enumerate(indices):
            position = self._first_position + k * self._world_size
            yield index, derive_seed(self._seed, "sample", position)


def worker_init_reset_seed(worker_id: int) -> None:
    """Seed one DataLoader worker's generators from ``torch.initial_seed()`` (base seed +
    worker id, set by torch), so workers differ and a seeded loader repeats them. (Training
    loaders reseed the augmentation generator per sample anyway, see :class:`MapDataset`.)"""
    seed = torch.initial_seed()
    seed_global_rng(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _per_process_batch_size(total_batch_size: int) -> int:
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size != 0:
        raise ValueError(
            f"total batch size {total_batch_size} (SOLVER.IMS_PER_BATCH) must be a positive "
            f"multiple of the number of processes ({world_size})"
        )
    return total_batch_size // world_size


def _train_loader_from_config(
    cfg, mapper=None, *, dataset=None, sampler=None, start_iter: int = 0
) -> dict[str, Any]:
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    if mapper is None:
        mapper = build_dataset_mapper(cfg, is_train=True)
    if sampler is None and cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is unknown; "
            "supported: 'TrainingSampler'"
        )
    return {
        "dataset": dataset,
        "mapper": mapper,
        "sampler": sampler,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "seed": cfg.SEED if cfg.SEED >= 0 else None,
        "max_retries": int(cfg.DATALOADER.get("MAX_RETRIES_ON_ERROR", 0)),
        "start_iter": start_iter,
    }


@configurable(from_config=_train_loader_from_config)
def build_train_loader(
    dataset: Union[str, Sequence[dict]],
    *,
    mapper: Callable[[dict], dict],
    sampler: Optional[torchdata.Sampler] = None,
    total_batch_size: int,
    num_workers: int = 0,
    seed: Optional[int] = None,
    max_retries: int = 0,
    start_iter: int = 0,
) -> torchdata.DataLoader:
    """An infinite training loader; each batch is a ``list`` of ``total_batch_size /
    world_size`` mapped dicts.

    Also callable as ``build_train_loader(cfg, mapper=None, dataset=None, start_iter=0)``.

    The loader is a pure function of ``seed``: which images each process gets (the sampler)
    and how each is augmented (its generator is reseeded per sample from ``seed`` and the
    sample's position in the job's stream) do not depend on ``num_workers``, so a loader built
    with ``start_iter=n`` yields exactly the batches ``n, n + 1, ...`` of one built with
    ``start_iter=0``.

    Args:
        dataset: dataset dicts, or a registered dataset name.
        mapper: dataset dict -> model input dict (e.g. ``PanopticLSJDatasetMapper``); its
            randomness must come from ``global_rng()`` to be reproducible.
        sampler: index sampler, iterated from its beginning (its first ``start_iter`` batches
            are skipped by drawing them); default ``TrainingSampler(len(dataset), seed=seed)``,
            which starts at ``start_iter`` directly.
        total_batch_size: images per iteration over all processes.
        num_workers: loader worker processes (0: map in the main process).
        seed: shuffling and augmentation seed shared by all ranks. ``None``: the given
            sampler's ``seed`` if it has one, else drawn at random (a collective call when
            distributed).
        max_retries: replace an image whose mapping fails with another, up to this many times.
        start_iter: batches the job already trained on (resuming at iteration ``start_iter``).
    """
    if isinstance(dataset, str):
        dataset = get_detection_dataset_dicts(dataset)
    if start_iter < 0:
        raise ValueError(f"start_iter must be >= 0, got {start_iter}")
    batch_size = _per_process_batch_size(total_batch_size)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    if seed is None:
        # A given TrainingSampler's seed, else one drawn for the job (a collective call).
        seed = getattr(sampler, "seed", None)
        seed = comm.shared_random_seed() if seed is None else seed
    seed = int(seed)
    consumed = start_iter * batch_size  # indices this process already drew
    skip = 0
    if sampler is None:
        sampler = TrainingSampler(len(dataset), seed=seed, start=consumed * world_size)
    else:
        skip = consumed
    keyed_sampler = _SeededSampler(
        sampler,
        seed=seed,
        first_position=consumed * world_size + rank,
        world_size=world_size,
        skip=skip,
    )
    # Hands the workers their base seeds without touching the global torch generator.
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return torchdata.DataLoader(
        MapDataset(dataset, mapper, max_retries=max_retries),
        sampler=keyed_sampler,
        batch_size=batch_size,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
        generator=generator,
    )


def _test_loader_from_config(cfg, dataset_name, mapper=None) -> dict[str, Any]:
    dataset = get_detection_dataset_dicts(dataset_name, filter_empty=False)
    if mapper is None:
        mapper = build_dataset_mapper(cfg, is_train=False)
    return {"dataset": dataset, "mapper": mapper, "num_workers": cfg.DATALOADER.NUM_WORKERS}


@configurable(from_config=_test_loader_from_config)
def build_test_loader(
    dataset: Union[str, Sequence[dict]],
    *,
    mapper: Callable[[dict], dict],
    sampler: Optional[torchdata.Sampler] = None,
    batch_size: int = 1,
    num_workers: int = 0,
) -> torchdata.DataLoader:
    """A finite evaluation loader over this process's contiguous shard of ``dataset``
    (``InferenceSampler``); batches are lists of ``batch_size`` mapped dicts (the last one may
    be shorter).

    Also callable as ``build_test_loader(cfg, dataset_name, mapper=None)``.
    """
    if isinstance(dataset, str):
        dataset = get_detection_dataset_dicts(dataset, filter_empty=False)
    if sampler is None:
        sampler = InferenceSampler(len(dataset))
    return torchdata.DataLoader(
        MapDataset(dataset, mapper),
        sampler=sampler,
        batch_size=batch_size,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )
