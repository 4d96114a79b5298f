"""Dataset mappers: one dataset dict (``pix2cap.data.datasets``) -> one model input dict.

``panoptic_lsj`` (training) reads the image and its panoptic PNG, applies large-scale jitter
(flip, random rescale, fixed-size crop) to both, and builds per-segment targets from the
transformed id map, so masks, boxes, classes and captions always describe the same pixels.
A horizontal flip also rewrites every caption (left <-> right, mirrored inline boxes).

``panoptic_test`` resizes the image only; the ground truth stays at the original size on disk
(``pan_seg_file_name`` + ``segments_info``) for the evaluators, and predictions are resized
back to ``height`` x ``width``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch

from pix2cap.config.config import configurable
from pix2cap.structures import Instances, masks_to_boxes_xyxy

from ..caption_formats import parse_pancap_boxes
from ..detection_utils import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_image_size,
    read_image,
    read_panoptic_png,
)
from ..errors import DatasetError
from ..text import flip_grounded_caption, flip_panoptic_caption, swap_left_right
from ..transforms import (
    Augmentation,
    FixedSizeCrop,
    RandomFlip,
    ResizeScale,
    ResizeShortestEdge,
    TransformList,
    apply_augmentations,
    global_rng,
    image_frame,
)
from .build import DATASET_MAPPER_REGISTRY

__all__ = [
    "PanopticDatasetMapper",
    "PanopticLSJDatasetMapper",
    "PanopticTestDatasetMapper",
    "build_lsj_augmentations",
    "build_test_augmentations",
]

logger = logging.getLogger(__name__)

# Mask2Former pads LSJ crops with mid-grey so padding is close to the pixel mean after
# normalisation instead of a strong negative value.
LSJ_IMAGE_PAD_VALUE = 128


def build_lsj_augmentations(
    image_size: int, min_scale: float, max_scale: float, random_flip: str = "horizontal"
) -> list[Augmentation]:
    """Large-scale jitter: optional flip, ``ResizeScale`` to ``[min_scale, max_scale] x
    image_size``, then a random ``image_size`` square crop padded up to full size.

    ``random_flip`` is "horizontal", "vertical" or "none".
    """
    if random_flip not in ("horizontal", "vertical", "none"):
        raise ValueError(
            f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {random_flip!r}"
        )
    augmentations: list[Augmentation] = []
    if random_flip != "none":
        augmentations.append(RandomFlip(horizontal=random_flip == "horizontal", prob=0.5))
    augmentations.append(ResizeScale(min_scale, max_scale, image_size, image_size))
    # Padded segment ids are 0 (VOID), so padding becomes the ignore value in sem_seg.
    augmentations.append(FixedSizeCrop(image_size, pad_value=LSJ_IMAGE_PAD_VALUE, seg_pad_value=0))
    return augmentations


def build_test_augmentations(min_size: int, max_size: int) -> list[Augmentation]:
    """Test-time resize: shortest side to ``min_size``, longest side at most ``max_size``."""
    return [ResizeShortestEdge(min_size, max_size)]


class PanopticDatasetMapper:
    """Map a dataset dict to model inputs (see the module docstring for the two modes).

    Output keys:
        ``image``: uint8 Tensor[3, H, W] in ``image_format`` channel order (after transforms).
        ``height``, ``width``: the ORIGINAL image size (to resize predictions back).
        ``image_frame``: ``(x0, y0, x1, y1)``, where the transformed image lies in the
            original one, in the original's normalised coordinates
            (:func:`~pix2cap.data.transforms.image_frame`); ``(0, 0, 1, 1)`` after a resize.
        ``file_name``, ``image_id`` and the other keys of the dataset dict, deep-copied.
        Training with a panoptic PNG also gives:
        ``instances``: ``Instances`` of the transformed image with ``gt_classes`` Long[N],
            ``gt_masks`` Bool[N, H, W], ``gt_boxes`` Float[N, 4] (XYXY absolute, from the
            masks), ``gt_captions`` list[str] ("" where a segment has no description),
            ``gt_segment_ids`` Long[N], ``gt_iscrowd`` Bool[N]. Segments cropped away are
            dropped with their captions.
        ``sem_seg``: Long[H, W] class per pixel, ``ignore_value`` on VOID, crowd and padding.
        ``pan_seg``: Long[H, W] segment id per pixel, 0 on VOID and padding.
        (``segments_info`` is removed: ``instances`` replaces it for the cropped image.)
        ``grounded_caption`` / ``panoptic_caption`` (+ ``panoptic_caption_boxes``) pass
        through, rewritten when the image was flipped horizontally.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[Augmentation],
        image_format: str = "RGB",
        ignore_value: int = 255,
        rng: Optional[np.random.Generator] = None,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        """
        Args:
            is_train: build training targets from the PNG (True) or keep ground truth at the
                original size for evaluation (False).
            augmentations: applied in order to the image (and, in training, to the id map).
            image_format: "RGB" or "BGR".
            ignore_value: ``sem_seg`` label of pixels that carry no class.
            rng: random generator for the augmentations; by default the process's
                ``global_rng()``, which training loaders reseed per sample (so augmentations
                repeat exactly on a resume). An explicit generator is copied into every
                worker as is and runs on across samples, so use it single-process only.
            max_image_pixels: images with more pixels are refused (``DatasetError``) before
                decoding; None or 0: only PIL's limit (``read_image``).
        """
        self.is_train = bool(is_train)
        self.augmentations = list(augmentations)
        self.image_format = image_format
        self.ignore_value = int(ignore_value)
        self.rng = rng
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        if is_train:
            augmentations = build_lsj_augmentations(
                cfg.INPUT.IMAGE_SIZE,
                cfg.INPUT.MIN_SCALE,
                cfg.INPUT.MAX_SCALE,
                cfg.INPUT.RANDOM_FLIP,
            )
        else:
            augmentations = build_test_augmentations(
                cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
            )
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "max_image_pixels": cfg.INPUT.MAX_IMAGE_PIXELS,
        }

    def __repr__(self) -> str:
        augs = ", ".join(repr(a) for a in self.augmentations)
        return f"{type(self).__name__}(is_train={self.is_train}, augmentations=[{augs}])"

    # -----------------------------------------------------------------------------------------
    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        """Map one dataset dict (left unmodified) to a new model input dict."""
        file_name = dataset_dict.get("file_name", "<dataset dict without file_name>")
        try:
            dataset_dict = copy.deepcopy(dataset_dict)
            if "file_name" not in dataset_dict:
                raise KeyError("dataset dict has no 'file_name'")
            return self._map(dataset_dict)
        except DatasetError:
            raise  # already names the offending file
        except Exception as e:
            raise DatasetError(
                file_name, f"cannot map this image: {type(e).__name__}: {e}"
            ) from e

    def _map(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        image = read_image(
            dataset_dict["file_name"], format=self.image_format, max_pixels=self.max_image_pixels
        )
        check_image_size(dataset_dict, image)  # fills height/width when absent

        pan_seg = None
        if self.is_train and dataset_dict.get("pan_seg_file_name"):
            pan_seg = self._read_segment_ids(dataset_dict, image.shape[:2])

        rng = self.rng if self.rng is not None else global_rng()
        original_hw = image.shape[:2]
        image, transforms = apply_augmentations(self.augmentations, image, rng)
        dataset_dict["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["image_frame"] = image_frame(transforms, original_hw, image.shape[:2])

        if not self.is_train:
            return dataset_dict

        if pan_seg is not None:
            pan_seg = transforms.apply_segmentation(pan_seg)
            dataset_dict.update(
                self._panoptic_targets(pan_seg, dataset_dict["segments_info"], transforms)
            )
        dataset_dict.pop("segments_info", None)
        if transforms.flips_horizontally:
            self._flip_image_captions(dataset_dict)
        return dataset_dict

    def _read_segment_ids(
        self, dataset_dict: dict[str, Any], image_hw: tuple[int, int]
    ) -> np.ndarray:
        """The PNG's id map [H, W] int64, checked against the image and ``segments_info``;
        ids the PNG has but ``segments_info`` lacks become 0 (VOID)."""
        png_path = dataset_dict["pan_seg_file_name"]
        ids = read_panoptic_png(png_path)
        if ids.shape != tuple(image_hw):
            raise DatasetError(
                png_path,
                f"panoptic PNG is {ids.shape[0]}x{ids.shape[1]} (HxW) but its image "
                f"{dataset_dict['file_name']} is {image_hw[0]}x{image_hw[1]}",
            )
        segments_info = dataset_dict.get("segments_info")
        if segments_info is None:
            raise DatasetError(
                png_path,
                f"dataset dict of {dataset_dict['file_name']} has a panoptic PNG but no "
                "segments_info",
            )
        present = np.unique(ids)
        listed = np.array([int(s["id"]) for s in segments_info], dtype=np.int64)
        missing = listed[~np.isin(listed, present)]
        if missing.size:
            raise DatasetError(
                png_path,
                f"segment id(s) {sorted(missing.tolist())} listed in segments_info of "
                f"{dataset_dict['file_name']} do not occur in the PNG (ids in the PNG: "
                f"{present[present != 0].tolist()[:20]})",
            )
        unlisted = present[(present != 0) & ~np.isin(present, listed)]
        if unlisted.size:
            logger.warning(
                "%s: segment id(s) %s occur in the PNG but not in segments_info; treated as VOID",
                png_path,
                unlisted.tolist()[:20],
            )
            ids = np.where(np.isin(ids, unlisted), 0, ids)
        return ids

    def _panoptic_targets(
        self, pan_seg: np.ndarray, segments_info: list[dict], transforms: TransformList
    ) -> dict[str, Any]:
        height, width = pan_seg.shape
        sem_seg = np.full((height, width), self.ignore_value, dtype=np.int64)
        # Masks are written in place into one buffer: stacking per-segment arrays afterwards
        # would copy every mask again (tens of MB at LSJ's 1024 x 1024).
        masks = np.empty((len(segments_info), height, width), dtype=bool)
        classes, captions, segment_ids, crowd = [], [], [], []
        flipped = transforms.flips_horizontally
        for segment in segments_info:
            mask = masks[len(classes)]
            np.equal(pan_seg, int(segment["id"]), out=mask)
            if not mask.any():
                continue  # cropped away: drop the segment and its caption
            iscrowd = bool(segment.get("iscrowd", 0))
            if not iscrowd:
                # Crowd regions stay ignored in sem_seg, as in panopticapi's PQ.
                np.copyto(sem_seg, int(segment["category_id"]), where=mask)
            caption = segment.get("description") or ""
            classes.append(int(segment["category_id"]))
            captions.append(swap_left_right(caption) if flipped else caption)
            segment_ids.append(int(segment["id"]))
            crowd.append(iscrowd)

        instances = Instances((height, width))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        gt_masks = torch.from_numpy(masks[: len(classes)])
        instances.gt_masks = gt_masks
        instances.gt_boxes = masks_to_boxes_xyxy(gt_masks)
        instances.gt_captions = captions
        instances.gt_segment_ids = torch.tensor(segment_ids, dtype=torch.int64)
        instances.gt_iscrowd = torch.tensor(crowd, dtype=torch.bool)
        return {
            "instances": instances,
            "sem_seg": torch.from_numpy(sem_seg),
            "pan_seg": torch.from_numpy(np.ascontiguousarray(pan_seg, dtype=np.int64)),
        }

    @staticmethod
    def _flip_image_captions(dataset_dict: dict[str, Any]) -> None:
        """Rewrite the image-level captions for a left-right mirrored image, in place."""
        if dataset_dict.get("grounded_caption"):
            dataset_dict["grounded_caption"] = flip_grounded_caption(
                dataset_dict["grounded_caption"]
            )
        if dataset_dict.get("panoptic_caption"):
            flipped = flip_panoptic_caption(dataset_dict["panoptic_caption"])
            dataset_dict["panoptic_caption"] = flipped
            if "panoptic_caption_boxes" in dataset_dict:
                dataset_dict["panoptic_caption_boxes"] = parse_pancap_boxes(flipped)


class PanopticLSJDatasetMapper(PanopticDatasetMapper):
    """Training mapper with large-scale jitter; registered as ``panoptic_lsj``.

    From a config, ``is_train=False`` gives the test-time resize instead (same class, so one
    mapper name can serve a whole experiment)."""


class PanopticTestDatasetMapper(PanopticDatasetMapper):
    """Test mapper: resize the image only, keep ground truth on disk at the original size;
    registered as ``panoptic_test``."""

    @configurable
    def __init__(
        self,
        *,
        augmentations: Sequence[Augmentation],
        image_format: str = "RGB",
        ignore_value: int = 255,
        rng: Optional[np.random.Generator] = None,
        is_train: bool = False,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if is_train:
            raise ValueError(
                "panoptic_test builds no training targets; use panoptic_lsj for training"
            )
        super().__init__(
            is_train=False,
            augmentations=augmentations,
            image_format=image_format,
            ignore_value=ignore_value,
            rng=rng,
            max_image_pixels=max_image_pixels,
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = False) -> dict[str, Any]:
        return super().from_config(cfg, is_train=False) | {"is_train": is_train}


# The registry keys are the names configs use (INPUT.DATASET_MAPPER_NAME and
# INPUT.TEST_DATASET_MAPPER_NAME), not the class names.
DATASET_MAPPER_REGISTRY.register(PanopticLSJDatasetMapper, aliases=("panoptic_lsj",))
DATASET_MAPPER_REGISTRY.register(PanopticTestDatasetMapper, aliases=("panoptic_test",))
