"""Datasets, dataset mappers, transforms and data loaders.

Importing ``pix2cap.data`` registers the built-in dataset mappers (and the dataset loaders
``pix2cap.data.datasets`` registers).
"""

from . import datasets  # noqa: F401  (registers built-in datasets, if any)
from .build import (
    MapDataset,
    build_test_loader,
    build_train_loader,
    get_detection_dataset_dicts,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from .catalog import DatasetCatalog, Metadata, MetadataCatalog
from .detection_utils import check_image_size, read_image, read_panoptic_png
from .errors import DatasetError
from .mappers import (
    DATASET_MAPPER_REGISTRY,
    PanopticDatasetMapper,
    PanopticLSJDatasetMapper,
    PanopticTestDatasetMapper,
    build_dataset_mapper,
)
from .samplers import InferenceSampler, TrainingSampler

__all__ = [
    "DatasetCatalog",
    "MetadataCatalog",
    "Metadata",
    "DatasetError",
    "get_detection_dataset_dicts",
    "build_train_loader",
    "build_test_loader",
    "MapDataset",
    "trivial_batch_collator",
    "worker_init_reset_seed",
    "TrainingSampler",
    "InferenceSampler",
    "DATASET_MAPPER_REGISTRY",
    "build_dataset_mapper",
    "PanopticDatasetMapper",
    "PanopticLSJDatasetMapper",
    "PanopticTestDatasetMapper",
    "read_image",
    "read_panoptic_png",
    "check_image_size",
]
