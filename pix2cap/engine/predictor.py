"""Single-image inference from a config: build the model, load its weights, run one image.

    predictor = DefaultPredictor(cfg)
    outputs = predictor(read_image("photo.jpg"))        # RGB uint8 [H, W, 3]
    panoptic_seg, segments_info = outputs["panoptic_seg"]

The image goes through the same test-time resize as evaluation (``INPUT.MIN_SIZE_TEST``
shortest side, ``INPUT.MAX_SIZE_TEST`` longest side), and the model is asked for outputs at
the original size (``"height"``/``"width"``), so what comes back lines up with the input
pixels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pix2cap.checkpoint import Checkpointer
from pix2cap.data.catalog import Metadata, MetadataCatalog
from pix2cap.data.transforms import ResizeShortestEdge
from pix2cap.modeling.meta_arch.build import build_model

__all__ = ["DefaultPredictor", "class_metadata", "metadata_from_config"]

logger = logging.getLogger(__name__)


def metadata_from_config(cfg) -> Metadata:
    """Metadata of ``cfg.DATASETS.TEST[0]``, else ``cfg.DATASETS.TRAIN[0]``, else an empty
    ``Metadata`` (classes are then shown by number)."""
    for names in (cfg.DATASETS.TEST, cfg.DATASETS.TRAIN):
        if len(names):
            return MetadataCatalog.get(names[0])
    return Metadata(name="__no_dataset__")


def class_metadata(cfg, metadata: Metadata | None) -> Metadata | None:
    """Metadata that names the model's classes: ``metadata`` when it has ``stuff_classes``,
    else the first of ``cfg.DATASETS.TRAIN`` (``cfg`` may be None) whose metadata has them
    (a test set such as SA-Pancap has no class vocabulary), else ``metadata`` with a warning
    (classes are then tagged by number)."""
    if metadata is not None and metadata.get("stuff_classes"):
        return metadata
    if cfg is not None:
        for name in cfg.DATASETS.TRAIN:
            candidate = MetadataCatalog.get(name)
            if candidate.get("stuff_classes"):
                return candidate
    logger.warning("No class names in the metadata: entities are tagged 'class <id>'")
    return metadata


class DefaultPredictor:
    """Runs the model of ``cfg`` on one image at a time (eval mode, no gradients).

    Args:
        cfg: a config; ``MODEL.META_ARCHITECTURE`` is built on ``MODEL.DEVICE`` and
            ``MODEL.WEIGHTS`` is loaded (an empty ``MODEL.WEIGHTS`` keeps the initial weights,
            with a warning).

    Attributes:
        model: the model, in eval mode.
        metadata: see :func:`metadata_from_config`.
        aug: the test-time ``ResizeShortestEdge``.
        input_format: ``INPUT.FORMAT``, the channel order the model expects.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        self.metadata = metadata_from_config(self.cfg)
        weights = self.cfg.MODEL.WEIGHTS
        if weights:
            Checkpointer(self.model, partial=self.cfg.MODEL.WEIGHTS_PARTIAL).load(weights)
        else:
            logger.warning(
                "MODEL.WEIGHTS is empty: %s runs with its initial (untrained) weights",
                self.cfg.MODEL.META_ARCHITECTURE,
            )
        self.aug = ResizeShortestEdge(self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")

    def __call__(self, original_image: np.ndarray) -> dict[str, Any]:
        """
        Args:
            original_image: RGB uint8 ndarray [H, W, 3].
        Returns:
            the model's output dict for this image (for Pix2Cap: ``{"panoptic_seg":
            (Int Tensor[H, W], segments_info)}``), at the original size H x W.
        """
        image = np.asarray(original_image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"DefaultPredictor needs an RGB image [H, W, 3], got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"DefaultPredictor needs a uint8 image, got dtype {image.dtype}")
        height, width = image.shape[:2]
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        resized = self.aug.get_transform(image).apply_image(image)
        # The same input form the test mapper produces: uint8 [3, H', W'] plus original size.
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs = {"image": tensor, "height": height, "width": width}
        with torch.no_grad():
            outputs = self.model([inputs])
        if not isinstance(outputs, (list, tuple)) or len(outputs) != 1:
            raise TypeError(
                f"{type(self.model).__name__} returned {type(outputs).__name__} in eval mode; "
                "expected a list with one output dict per input image"
            )
        return outputs[0]
