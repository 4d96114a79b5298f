"""What the scene memory of the caption head is built from: per-object pixel and layout facts.

The paper's memory describes an object by its query feature and one global image feature.
The scene memory (``MODEL.CAPTION_HEAD.MEMORY: scene``) adds, per object,

* its mask-pooled pixel-decoder features, one vector per feature level (what the object
  looks like: size, texture and colour live in its own pixels);
* its box, in the original image's normalised coordinates (where it is, and how large);
* the query features and boxes of the other objects of the same image (what a relation can
  name, and on which side it is).

This module turns decoder outputs into those tensors (:class:`SceneContext`); the caption head
projects them into memory tokens. Nothing here is learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SceneContext",
    "box_features",
    "largest_parts",
    "mask_boxes",
    "mask_pool",
    "pair_box_features",
    "scene_context",
]

BOX_DIM = 6  # x0, y0, x1, y1, cx, cy
BOX_FEATURE_DIM = BOX_DIM + 2  # ... and width, height
PAIR_FEATURE_DIM = 2 * BOX_FEATURE_DIM + 7
_EPS = 1e-3  # smallest width or height a ratio divides by (a box is at least a pixel)


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` boxes ``x0, y0, x1, y1, cx, cy`` -> ``[..., 8]`` with width and height."""
    size = boxes[..., 2:4] - boxes[..., 0:2]
    return torch.cat([boxes, size], dim=-1)


def pair_box_features(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Where another object is relative to the captioned one.

    Relation words ("to the left of", "above", "in front of", "next to") are statements about
    a pair of boxes: the side one centre lies on, and whether their extents overlap along that
    axis. Given as ratios, these are one linear read-out away for the decoder instead of
    comparisons it must learn across two tokens (the box-pair features of visual relation
    detection).

    Args:
        own: ``[N, 6]`` the captioned objects' boxes; other: ``[N, S, 6]`` their neighbours'.

    Returns:
        ``[N, S, 23]``: the neighbour's box features (8), their difference from the
        captioned object's (8), the centre offset in units of the captioned object's width and
        height (2), log width and height ratios (2), the overlap of the two extents along x
        and along y as a share of the narrower extent (negative: the gap between them) (2)
        and the boxes' IoU (1).
    """
    a = box_features(own)[:, None]  # [N, 1, 8]
    b = box_features(other)  # [N, S, 8]
    a_size = a[..., 6:8].clamp(min=_EPS)
    b_size = b[..., 6:8].clamp(min=_EPS)
    offset = ((b[..., 4:6] - a[..., 4:6]) / a_size).clamp(-20.0, 20.0)
    log_ratio = torch.log(b_size / a_size)
    overlap = torch.minimum(a[..., 2:4], b[..., 2:4]) - torch.maximum(a[..., 0:2], b[..., 0:2])
    overlap_share = (overlap / torch.minimum(a_size, b_size)).clamp(-20.0, 1.0)
    inter = overlap.clamp(min=0).prod(dim=-1, keepdim=True)
    union = a_size.prod(-1, keepdim=True) + b_size.prod(-1, keepdim=True) - inter
    iou = inter / union.clamp(min=_EPS * _EPS)
    return torch.cat([b, b - a, offset, log_ratio, overlap_share, iou], dim=-1)


@dataclass
class SceneContext:
    """Scene facts of N objects (the ones to caption).

    Attributes:
        pixel_feats: per feature level ``[N, C_l]``, the object's mask-pooled features.
        boxes: ``[N, 6]`` the object's box ``x0, y0, x1, y1, cx, cy`` in [0, 1].
        other_feats: ``[N, S, Dq]`` query features of the other objects of its image.
        other_boxes: ``[N, S, 6]`` their boxes.
        other_valid: Bool[N, S], False on padding (images have different object counts).
            ``S`` may be 0 (every image has one object).
        other_pixel_feats: ``[N, S, C]`` the other objects' features pooled under their masks
            from the finest level (what they look like, so that a relation names them by
            the right colour).
    """

    pixel_feats: List[torch.Tensor]
    boxes: torch.Tensor
    other_feats: torch.Tensor
    other_boxes: torch.Tensor
    other_valid: torch.Tensor
    other_pixel_feats: torch.Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @classmethod
    def cat(cls, contexts: Sequence["SceneContext"]) -> "SceneContext":
        """Concatenate along N, padding the other-object axis to the longest."""
        if not contexts:
            raise ValueError("SceneContext.cat needs at least one context")
        slots = max(c.other_valid.shape[1] for c in contexts)

        def pad(x: torch.Tensor, value) -> torch.Tensor:
            extra = slots - x.shape[1]
            if extra == 0:
                return x
            shape = (x.shape[0], extra) + tuple(x.shape[2:])
            return torch.cat([x, x.new_full(shape, value)], dim=1)

        return cls(
            pixel_feats=[
                torch.cat(level) for level in zip(*(c.pixel_feats for c in contexts))
            ],
            boxes=torch.cat([c.boxes for c in contexts]),
            other_feats=torch.cat([pad(c.other_feats, 0.0) for c in contexts]),
            other_boxes=torch.cat([pad(c.other_boxes, 0.0) for c in contexts]),
            other_valid=torch.cat([pad(c.other_valid, False) for c in contexts]),
            other_pixel_feats=torch.cat([pad(c.other_pixel_feats, 0.0) for c in contexts]),
        )

    def to(self, dtype: torch.dtype) -> "SceneContext":
        """The same facts with floating tensors cast to ``dtype``."""
        return SceneContext(
            pixel_feats=[f.to(dtype) for f in self.pixel_feats],
            boxes=self.boxes.to(dtype),
            other_feats=self.other_feats.to(dtype),
            other_boxes=self.other_boxes.to(dtype),
            other_valid=self.other_valid,
            other_pixel_feats=self.other_pixel_feats.to(dtype),
        )

    def index_select(self, index: torch.Tensor) -> "SceneContext":
        """The rows ``index`` (Long[n]), e.g. to repeat each object for its beams."""
        return SceneContext(
            pixel_feats=[f[index] for f in self.pixel_feats],
            boxes=self.boxes[index],
            other_feats=self.other_feats[index],
            other_boxes=self.other_boxes[index],
            other_valid=self.other_valid[index],
            other_pixel_feats=self.other_pixel_feats[index],
        )


def largest_parts(masks: torch.Tensor) -> torch.Tensor:
    """Bool[n, h, w] -> each mask's largest 8-connected part (an empty mask stays empty).

    A predicted segment often carries a thin spur or a few stray pixels far from the object;
    its bounding box then spans half the image and the object reads as "large". Torch has no
    connected-components op: OpenCV labels the few masks of an image on the host.
    """
    if masks.shape[0] == 0:
        return masks
    host = masks.detach().to("cpu", torch.uint8).numpy()
    kept = np.zeros_like(host)
    for i, mask in enumerate(host):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count <= 2:  # background and at most one part
            kept[i] = mask
        else:
            kept[i] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return torch.from_numpy(kept).to(masks.device).bool()


def mask_boxes(
    mask_probs: torch.Tensor, window: Optional[torch.Tensor] = None, largest_part: bool = False
) -> torch.Tensor:
    """Boxes of soft masks, in the original image's normalised coordinates.

    Args:
        mask_probs: ``[n, h, w]`` mask probabilities (or 0/1 ground-truth masks).
        window: Float[4] ``(x0, y0, x1, y1)``, where the ``h x w`` grid lies in the original
            image (``Pix2Cap.grid_windows``); None: the grid is the image.
        largest_part: box only each mask's largest connected part (:func:`largest_parts`).

    Returns:
        ``[n, 6]``: ``x0, y0, x1, y1, cx, cy``, 0-1 inside the original image (a crop's
        objects keep the place and size they have there). A mask with no pixel above 0.5 gets
        the box of its most probable pixel, so every object has a place.
    """
    n, h, w = mask_probs.shape
    if n == 0:
        return mask_probs.new_zeros((0, BOX_DIM))
    binary = mask_probs > 0.5
    empty = ~binary.flatten(1).any(dim=1)
    # Every mask's most probable pixel, used where a mask is empty: computed for all masks,
    # so that nothing here waits for the device to say whether any mask is empty.
    scores = mask_probs if mask_probs.is_floating_point() else mask_probs.float()
    peak = scores.flatten(1).argmax(dim=1)
    fallback = torch.zeros_like(binary).flatten(1)
    fallback[torch.arange(n, device=peak.device), peak] = True
    binary = torch.where(empty[:, None, None], fallback.view(n, h, w), binary)
    if largest_part:
        binary = largest_parts(binary)
    rows = binary.any(dim=2)  # [n, h]
    cols = binary.any(dim=1)  # [n, w]
    dtype = mask_probs.dtype if mask_probs.is_floating_point() else torch.float32
    ys = torch.arange(h, device=mask_probs.device, dtype=dtype)
    xs = torch.arange(w, device=mask_probs.device, dtype=dtype)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1.0).amax(dim=1) + 1
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1.0).amax(dim=1) + 1
    box = torch.stack([x0 / w, y0 / h, x1 / w, y1 / h], dim=1)  # in the grid, 0-1
    if window is not None:
        window = window.to(device=box.device, dtype=box.dtype)
        low, span = window[:2].repeat(2), (window[2:] - window[:2]).repeat(2)
        box = low + box * span
    centre = torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], dim=1)
    return torch.cat([box, centre], dim=1)


def mask_pool(mask_probs: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """Average of ``feature_map`` under each soft mask.

    Args:
        mask_probs: ``[n, h, w]`` mask probabilities (any resolution; resized to the map's,
            by area averaging when shrinking so that a small object is not missed between
            sample points).
        feature_map: ``[C, h_l, w_l]``.

    Returns:
        ``[n, C]``.
    """
    size = tuple(feature_map.shape[-2:])
    weights = mask_probs.to(feature_map.dtype)
    if tuple(weights.shape[-2:]) != size:
        if weights.shape[-2] >= size[0] and weights.shape[-1] >= size[1]:
            weights = F.interpolate(weights[:, None], size=size, mode="area")[:, 0]
        else:
            weights = F.interpolate(
                weights[:, None], size=size, mode="bilinear", align_corners=False
            )[:, 0]
    pooled = torch.einsum("nhw,chw->nc", weights, feature_map)
    return pooled / weights.flatten(1).sum(dim=1, keepdim=True).clamp(min=1e-6)


def scene_context(
    query_feats: torch.Tensor,
    mask_probs: torch.Tensor,
    pixel_maps: Sequence[torch.Tensor],
    captioned: Optional[torch.Tensor] = None,
    *,
    max_objects: int = 16,
    window: Optional[torch.Tensor] = None,
    boxes: Optional[torch.Tensor] = None,
    pooled: Optional[Sequence[torch.Tensor]] = None,
) -> SceneContext:
    """The scene facts of the objects of one image.

    Args:
        query_feats: ``[n, Dq]`` query features of the image's objects (training: the matched
            queries; inference: the queries of the kept segments).
        mask_probs: ``[n, h, w]`` their masks as probabilities (or 0/1, any dtype), without
            gradient (the caption loss must not reshape the masks through pooling): predicted
            at inference, the matched ground-truth masks in training.
        pixel_maps: the image's pixel-decoder levels, ``[C_l, h_l, w_l]`` each.
        captioned: Long[m] positions (into ``n``) of the objects to caption; None: all.
        max_objects: at most this many other objects per object (the first ones in order).
        window: Float[4], where the mask grid lies in the original image (see
            :func:`mask_boxes`).
        boxes: ``[n, 6]`` the objects' boxes when already known, as
            ``mask_boxes(mask_probs, window, largest_part=True)`` gives them (training measures
            the ground truth's on the host, where its connected components are); None:
            measured here.
        pooled: per pixel level, ``[n, C_l]`` the objects' features pooled under their masks
            when already known, as ``mask_pool(mask_probs, level)`` gives them (training pools
            every target of an image once for all its captioned layers); None: pooled here.

    Returns:
        a :class:`SceneContext` of the ``m`` captioned objects, ``S = min(n - 1, max_objects)``.
    """
    if not pixel_maps:
        raise ValueError("scene_context needs at least one pixel-decoder level")
    n = query_feats.shape[0]
    device = query_feats.device
    if captioned is None:
        captioned = torch.arange(n, device=device)
    # The masks are read only for what was not given.
    probs = mask_probs.detach().float() if boxes is None or pooled is None else None
    # The same rule for ground-truth masks in training and predicted ones at inference.
    if boxes is None:
        boxes = mask_boxes(probs, window, largest_part=True)
    boxes = boxes.to(query_feats.dtype)  # [n, 6]
    if pooled is None:
        pooled = [mask_pool(probs, level) for level in pixel_maps]
    elif len(pooled) != len(pixel_maps):
        raise ValueError(f"{len(pooled)} pooled levels for {len(pixel_maps)} pixel levels")
    pixel_feats = [level[captioned] for level in pooled]
    # Every object's look at the finest level, for when it is another object's neighbour.
    finest = pooled[-1]

    # Other objects of captioned object i: every j != i, the first max_objects of them.
    slots = max(0, min(n - 1, max_objects))
    # Row i: 0 .. n-1 without captioned[i], in order (no data-dependent shape).
    positions = torch.arange(slots, device=device)[None, :]
    other_index = positions + (positions >= captioned[:, None]).long()  # [m, S]
    return SceneContext(
        pixel_feats=pixel_feats,
        boxes=boxes[captioned],
        other_feats=query_feats[other_index],
        other_boxes=boxes[other_index],
        other_valid=torch.ones(other_index.shape, dtype=torch.bool, device=device),
        other_pixel_feats=finest[other_index],
    )
