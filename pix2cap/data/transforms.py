"""Geometric augmentations that move an image, its segment-id map, masks and boxes together.

Two layers, as in detectron2:

* an *augmentation* (``ResizeScale``, ``FixedSizeCrop``, ``RandomFlip``,
  ``ResizeShortestEdge``) looks at an image and a random generator and returns
* a concrete, deterministic *transform* (``ResizeTransform``, ``CropTransform``,
  ``PadTransform``, ``HFlipTransform``, ...) that applies the same geometry to every
  annotation of that image.

Conventions: images are ndarray [H, W, C] (uint8 or float); segmentations are integer/bool
ndarray [H, W] (segment ids, class ids); masks are ndarray [N, H, W]; boxes are float ndarray
[N, 4] XYXY in absolute pixels with ``x2``/``y2`` exclusive (a pixel column ``c`` spans
``[c, c + 1)``), so a horizontal flip maps ``x`` to ``width - x``.

Segmentations and masks are resized by nearest neighbour with the same pixel-centre sampling
as the bilinear image resize, so labels stay on the pixels they describe. Large-scale jitter
(LSJ) is ``[RandomFlip, ResizeScale, FixedSizeCrop]``.
"""

from __future__ import annotations

import abc
import os
import threading
from typing import Optional, Sequence, Union

import cv2
import numpy as np

__all__ = [
    "Transform",
    "NoOpTransform",
    "ResizeTransform",
    "CropTransform",
    "PadTransform",
    "HFlipTransform",
    "VFlipTransform",
    "TransformList",
    "Augmentation",
    "ResizeScale",
    "FixedSizeCrop",
    "RandomFlip",
    "ResizeShortestEdge",
    "apply_augmentations",
    "global_rng",
    "image_frame",
    "seed_global_rng",
]


# ---------------------------------------------------------------------------------------------
# Random generator shared by the augmentations of one process
# ---------------------------------------------------------------------------------------------
_rng_state = threading.local()


def global_rng() -> np.random.Generator:
    """This process's augmentation generator.

    Created on first use from ``torch.initial_seed()``, which torch sets differently in every
    DataLoader worker (base seed + worker id). ``seed_global_rng`` replaces it explicitly;
    training loaders do so before every sample (``MapDataset``), so a sample's augmentations
    depend on the run seed and its position in the stream, not on the worker or on a resume.
    """
    rng = getattr(_rng_state, "rng", None)
    if rng is None or getattr(_rng_state, "pid", None) != os.getpid():
        import torch

        rng = np.random.default_rng(torch.initial_seed())
        _rng_state.rng, _rng_state.pid = rng, os.getpid()
    return rng


def seed_global_rng(seed: int) -> None:
    """Reseed this process's augmentation generator (by DataLoader worker init, and per
    sample by training loaders)."""
    _rng_state.rng, _rng_state.pid = np.random.default_rng(seed), os.getpid()


# ---------------------------------------------------------------------------------------------
# Deterministic transforms
# ---------------------------------------------------------------------------------------------
class Transform(abc.ABC):
    """A fixed geometric change of one image and everything annotated on it."""

    #: True when the transform mirrors the image left-right (captions must swap left/right).
    flips_horizontally: bool = False

    @abc.abstractmethod
    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """image [H, W, C] or [H, W] -> transformed image, same dtype."""

    @abc.abstractmethod
    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """Integer or bool [H, W] label map -> transformed map (nearest, same dtype)."""

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        """Bool [N, H, W] -> transformed masks [N, H', W']; defaults to one map at a time."""
        if masks.shape[0] == 0:
            h, w = self.output_size(masks.shape[1], masks.shape[2])
            return np.zeros((0, h, w), dtype=masks.dtype)
        return np.stack([self.apply_segmentation(m) for m in masks], axis=0)

    @abc.abstractmethod
    def apply_box(self, boxes: np.ndarray) -> np.ndarray:
        """Float [N, 4] XYXY absolute -> transformed boxes [N, 4]."""

    @abc.abstractmethod
    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Float [N, 2] ``(x, y)`` points -> where they land, not clipped to the output (a
        point may leave the image). Every transform here is axis-aligned and affine."""

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(h, w)`` of the output for an input of ``(height, width)``."""
        return height, width

    def inverse(self) -> "Transform":
        raise TypeError(f"{type(self).__name__} has no inverse")


class NoOpTransform(Transform):
    """Leaves everything as it is."""

    def apply_image(self, image):
        return image

    def apply_segmentation(self, segmentation):
        return segmentation

    def apply_masks(self, masks):
        return masks

    def apply_coords(self, coords):
        return np.asarray(coords, dtype=np.float64).reshape(-1, 2)

    def apply_box(self, boxes):
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    def inverse(self):
        return self


def _nearest_indices(in_len: int, out_len: int) -> np.ndarray:
    """Source index of each output pixel, sampling at pixel centres (as cv2's bilinear does)."""
    centres = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    return np.clip(np.round(centres), 0, in_len - 1).astype(np.int64)


class ResizeTransform(Transform):
    """Resize from (h, w) to (new_h, new_w): bilinear for images, nearest for labels."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        if min(h, w, new_h, new_w) <= 0:
            raise ValueError(
                f"ResizeTransform sizes must be positive: {(h, w)} -> {(new_h, new_w)}"
            )
        self.h, self.w, self.new_h, self.new_w = int(h), int(w), int(new_h), int(new_w)

    def _check(self, height: int, width: int) -> None:
        if (height, width) != (self.h, self.w):
            raise ValueError(
                f"ResizeTransform built for {self.h}x{self.w} applied to {height}x{width}"
            )

    def apply_image(self, image):
        self._check(*image.shape[:2])
        if (self.new_h, self.new_w) == (self.h, self.w):
            return image
        channels = image.shape[2] if image.ndim == 3 else 0
        if channels > 4:  # cv2 resizes at most 4 channels at once
            return np.stack(
                [self.apply_image(image[:, :, c]) for c in range(channels)], axis=2
            )
        resized = cv2.resize(image, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        if image.ndim == 3 and resized.ndim == 2:  # cv2 drops a single channel axis
            resized = resized[:, :, None]
        return resized

    def apply_segmentation(self, segmentation):
        self._check(*segmentation.shape[:2])
        rows = _nearest_indices(self.h, self.new_h)
        cols = _nearest_indices(self.w, self.new_w)
        return segmentation[rows[:, None], cols[None, :]]

    def apply_masks(self, masks):
        self._check(*masks.shape[1:3])
        rows = _nearest_indices(self.h, self.new_h)
        cols = _nearest_indices(self.w, self.new_w)
        return masks[:, rows[:, None], cols[None, :]]

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2).copy()
        coords[:, 0] *= self.new_w / self.w
        coords[:, 1] *= self.new_h / self.h
        return coords

    def apply_box(self, boxes):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, 0::2] *= self.new_w / self.w
        boxes[:, 1::2] *= self.new_h / self.h
        return boxes

    def output_size(self, height, width):
        return self.new_h, self.new_w

    def inverse(self):
        return ResizeTransform(self.new_h, self.new_w, self.h, self.w)


class CropTransform(Transform):
    """Keep the window ``[y0, y0 + h) x [x0, x0 + w)`` (clipped to the image)."""

    def __init__(self, x0: int, y0: int, w: int, h: int):
        self.x0, self.y0, self.w, self.h = int(x0), int(y0), int(w), int(h)

    def apply_image(self, image):
        return image[self.y0 : self.y0 + self.h, self.x0 : self.x0 + self.w]

    def apply_segmentation(self, segmentation):
        return segmentation[self.y0 : self.y0 + self.h, self.x0 : self.x0 + self.w]

    def apply_masks(self, masks):
        return masks[:, self.y0 : self.y0 + self.h, self.x0 : self.x0 + self.w]

    def apply_coords(self, coords):
        return np.asarray(coords, dtype=np.float64).reshape(-1, 2) - (self.x0, self.y0)

    def apply_box(self, boxes):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, 0::2] = np.clip(boxes[:, 0::2] - self.x0, 0, self.w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2] - self.y0, 0, self.h)
        return boxes

    def output_size(self, height, width):
        return (
            max(0, min(self.h, height - self.y0)),
            max(0, min(self.w, width - self.x0)),
        )


class PadTransform(Transform):
    """Pad ``pad_bottom`` rows and ``pad_right`` columns; images get ``pad_value``,
    segmentations ``seg_pad_value`` (0 = VOID for segment-id maps), masks ``False``."""

    def __init__(
        self, pad_bottom: int, pad_right: int, pad_value: float = 0, seg_pad_value: int = 0
    ):
        if pad_bottom < 0 or pad_right < 0:
            raise ValueError(f"padding must be >= 0, got bottom={pad_bottom}, right={pad_right}")
        self.pad_bottom, self.pad_right = int(pad_bottom), int(pad_right)
        self.pad_value, self.seg_pad_value = pad_value, seg_pad_value

    def _pad(self, array: np.ndarray, value, spatial_axis: int) -> np.ndarray:
        if self.pad_bottom == 0 and self.pad_right == 0:
            return array
        widths = [(0, 0)] * array.ndim
        widths[spatial_axis] = (0, self.pad_bottom)
        widths[spatial_axis + 1] = (0, self.pad_right)
        return np.pad(array, widths, mode="constant", constant_values=value)

    def apply_image(self, image):
        return self._pad(image, self.pad_value, 0)

    def apply_segmentation(self, segmentation):
        return self._pad(segmentation, self.seg_pad_value, 0)

    def apply_masks(self, masks):
        return self._pad(masks, False, 1)

    def apply_coords(self, coords):
        return np.asarray(coords, dtype=np.float64).reshape(-1, 2).copy()

    def apply_box(self, boxes):
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()

    def output_size(self, height, width):
        return height + self.pad_bottom, width + self.pad_right


class HFlipTransform(Transform):
    """Mirror left-right an image of the given width."""

    flips_horizontally = True

    def __init__(self, width: int):
        self.width = int(width)

    def apply_image(self, image):
        return np.ascontiguousarray(image[:, ::-1])

    def apply_segmentation(self, segmentation):
        return np.ascontiguousarray(segmentation[:, ::-1])

    def apply_masks(self, masks):
        return np.ascontiguousarray(masks[:, :, ::-1])

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2).copy()
        coords[:, 0] = self.width - coords[:, 0]
        return coords

    def apply_box(self, boxes):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        flipped = boxes.copy()
        flipped[:, 0] = self.width - boxes[:, 2]
        flipped[:, 2] = self.width - boxes[:, 0]
        return flipped

    def inverse(self):
        return self


class VFlipTransform(Transform):
    """Mirror top-bottom an image of the given height."""

    def __init__(self, height: int):
        self.height = int(height)

    def apply_image(self, image):
        return np.ascontiguousarray(image[::-1])

    def apply_segmentation(self, segmentation):
        return np.ascontiguousarray(segmentation[::-1])

    def apply_masks(self, masks):
        return np.ascontiguousarray(masks[:, ::-1])

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2).copy()
        coords[:, 1] = self.height - coords[:, 1]
        return coords

    def apply_box(self, boxes):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        flipped = boxes.copy()
        flipped[:, 1] = self.height - boxes[:, 3]
        flipped[:, 3] = self.height - boxes[:, 1]
        return flipped

    def inverse(self):
        return self


class TransformList(Transform):
    """Transforms applied one after another."""

    def __init__(self, transforms: Sequence[Transform]):
        flat: list[Transform] = []
        for t in transforms:
            flat.extend(t.transforms if isinstance(t, TransformList) else [t])
        self.transforms = [t for t in flat if not isinstance(t, NoOpTransform)]

    @property
    def flips_horizontally(self) -> bool:  # type: ignore[override]
        # Two horizontal flips cancel out.
        return sum(t.flips_horizontally for t in self.transforms) % 2 == 1

    def apply_image(self, image):
        for t in self.transforms:
            image = t.apply_image(image)
        return image

    def apply_segmentation(self, segmentation):
        for t in self.transforms:
            segmentation = t.apply_segmentation(segmentation)
        return segmentation

    def apply_masks(self, masks):
        for t in self.transforms:
            masks = t.apply_masks(masks)
        return masks

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        for t in self.transforms:
            coords = t.apply_coords(coords)
        return coords

    def apply_box(self, boxes):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        for t in self.transforms:
            boxes = t.apply_box(boxes)
        return boxes

    def output_size(self, height, width):
        for t in self.transforms:
            height, width = t.output_size(height, width)
        return height, width

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"TransformList({[type(t).__name__ for t in self.transforms]})"


# ---------------------------------------------------------------------------------------------
# Augmentations: draw a transform for one image
# ---------------------------------------------------------------------------------------------
class Augmentation(abc.ABC):
    """Chooses a concrete :class:`Transform` for one image."""

    @abc.abstractmethod
    def get_transform(
        self, image: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> Transform:
        """Draw the transform for ``image`` [H, W, C] using ``rng`` (default: global_rng())."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _rng_or_global(rng: Optional[np.random.Generator]) -> np.random.Generator:
    return global_rng() if rng is None else rng


class ResizeScale(Augmentation):
    """Resize so the image fits ``scale * (target_height, target_width)``, with ``scale``
    drawn uniformly from ``[min_scale, max_scale]``, keeping the aspect ratio (the resize
    half of large-scale jitter)."""

    def __init__(self, min_scale: float, max_scale: float, target_height: int, target_width: int):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.target_height, self.target_width = int(target_height), int(target_width)

    def get_transform(self, image, rng=None):
        rng = _rng_or_global(rng)
        h, w = image.shape[:2]
        scale = rng.uniform(self.min_scale, self.max_scale)
        output_scale = min(scale * self.target_height / h, scale * self.target_width / w)
        new_h = max(1, int(round(h * output_scale)))
        new_w = max(1, int(round(w * output_scale)))
        return ResizeTransform(h, w, new_h, new_w)


class FixedSizeCrop(Augmentation):
    """Randomly crop to at most ``crop_size`` then pad bottom/right up to exactly
    ``crop_size`` (the crop half of large-scale jitter)."""

    def __init__(
        self, crop_size: Union[int, Sequence[int]], pad_value: float = 0, seg_pad_value: int = 0
    ):
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.pad_value, self.seg_pad_value = pad_value, seg_pad_value

    def get_transform(self, image, rng=None):
        rng = _rng_or_global(rng)
        h, w = image.shape[:2]
        crop_h, crop_w = self.crop_size
        max_y0, max_x0 = max(h - crop_h, 0), max(w - crop_w, 0)
        y0 = int(rng.integers(0, max_y0 + 1))
        x0 = int(rng.integers(0, max_x0 + 1))
        kept_h, kept_w = min(h, crop_h), min(w, crop_w)
        return TransformList(
            [
                CropTransform(x0, y0, kept_w, kept_h)
                if (kept_h, kept_w) != (h, w)
                else NoOpTransform(),
                PadTransform(crop_h - kept_h, crop_w - kept_w, self.pad_value, self.seg_pad_value)
                if (kept_h, kept_w) != (crop_h, crop_w)
                else NoOpTransform(),
            ]
        )


class RandomFlip(Augmentation):
    """Flip with probability ``prob``: left-right if ``horizontal`` else top-bottom."""

    def __init__(self, horizontal: bool = True, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {prob}")
        self.horizontal, self.prob = bool(horizontal), float(prob)

    def get_transform(self, image, rng=None):
        rng = _rng_or_global(rng)
        h, w = image.shape[:2]
        # Always draw, so the random stream does not depend on prob being 0 or 1.
        do_flip = rng.uniform() < self.prob
        if not do_flip:
            return NoOpTransform()
        return HFlipTransform(w) if self.horizontal else VFlipTransform(h)


class ResizeShortestEdge(Augmentation):
    """Resize the shorter side to ``short_edge_length`` (one drawn at random when a sequence
    is given) unless that makes the longer side exceed ``max_size``; aspect ratio kept."""

    def __init__(self, short_edge_length: Union[int, Sequence[int]], max_size: int = 1_000_000):
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length,)
        self.short_edge_length = tuple(int(s) for s in short_edge_length)
        self.max_size = int(max_size)

    @staticmethod
    def get_output_shape(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
        scale = short_edge / min(h, w)
        new_h, new_w = h * scale, w * scale
        if max(new_h, new_w) > max_size:
            shrink = max_size / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))

    def get_transform(self, image, rng=None):
        h, w = image.shape[:2]
        if len(self.short_edge_length) == 1:
            short_edge = self.short_edge_length[0]
        else:
            choice = int(_rng_or_global(rng).integers(len(self.short_edge_length)))
            short_edge = self.short_edge_length[choice]
        if short_edge <= 0:
            return NoOpTransform()
        new_h, new_w = self.get_output_shape(h, w, short_edge, self.max_size)
        if (new_h, new_w) == (h, w):
            return NoOpTransform()
        return ResizeTransform(h, w, new_h, new_w)


def apply_augmentations(
    augmentations: Sequence[Augmentation],
    image: np.ndarray,
    rng: Optional[np.random.Generator] = None,
) -> tuple[np.ndarray, TransformList]:
    """Draw and apply each augmentation in turn (each sees the previous one's output).

    Returns:
        the transformed image and the ``TransformList`` to apply to its annotations.
    """
    transforms = []
    for aug in augmentations:
        t = aug.get_transform(image, rng)
        image = t.apply_image(image)
        transforms.append(t)
    return image, TransformList(transforms)


def image_frame(
    transforms: Transform, original_hw: tuple[int, int], output_hw: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Where the transformed image lies in the original image, in the original's normalised
    coordinates: ``(x0, y0, x1, y1)`` of the output's corners, with the original spanning
    ``[0, 1]`` (a crop gives a window inside it; a shrunk and padded image reaches beyond 1).

    A flip is not undone: the flipped image is the one its (swapped) captions describe, so the
    frame keeps the output's orientation. Words about size or place ("large", "at the top")
    refer to the original image; a caption head that reads boxes in this frame sees the same
    box for an object however the augmentation rescaled or cropped it.

    Args:
        transforms: the transforms from the original to the output.
        original_hw, output_hw: ``(height, width)`` before and after.
    """
    height, width = original_hw
    corners = transforms.apply_coords(np.array([[0.0, 0.0], [width, height]]))
    low, high = corners.min(axis=0), corners.max(axis=0)
    span = np.maximum(high - low, 1e-6)  # pixels of the output per original image side
    out_h, out_w = output_hw
    x0, y0 = -low / span
    x1, y1 = (np.array([out_w, out_h], dtype=np.float64) - low) / span
    # + 0.0 turns -0.0 into 0.0.
    return float(x0) + 0.0, float(y0) + 0.0, float(x1) + 0.0, float(y1) + 0.0
