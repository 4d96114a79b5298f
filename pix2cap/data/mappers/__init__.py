"""Dataset mappers (dataset dict -> model inputs), looked up by name in
``DATASET_MAPPER_REGISTRY``. Importing this package registers the built-in ones."""

from .build import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from .panoptic_mapper import (
    PanopticDatasetMapper,
    PanopticLSJDatasetMapper,
    PanopticTestDatasetMapper,
    build_lsj_augmentations,
    build_test_augmentations,
)

__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "build_dataset_mapper",
    "PanopticDatasetMapper",
    "PanopticLSJDatasetMapper",
    "PanopticTestDatasetMapper",
    "build_lsj_augmentations",
    "build_test_augmentations",
]
