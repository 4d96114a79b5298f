"""What the scene memory of the caption head is built from: per-object pixel and layout facts.

The paper's memory describes an object by its query feature and one global image feature.
The scene memory (``MODEL.CAPTION_HEAD.MEMORY: scene``) adds, per object,

* its mask-pooled pixel-decoder features, one vector per feature level (what the object
  looks like: size, texture and colour live in its own pixels);
* its box, normalised to the image (where it is);
* the query features and boxes of the other objects of the same image (what a relation can
  name, and on which side it is).

This module turns decoder outputs into those tensors (:class:`SceneContext`); the caption head
projects them into memory tokens. Nothing here is learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["SceneContext", "mask_boxes", "mask_pool", "scene_context"]

BOX_DIM = 6  # x0, y0, x1, y1, cx, cy


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


def mask_boxes(
    mask_probs: torch.Tensor, extent: Optional[Tuple[float, float]] = None
) -> torch.Tensor:
    """Boxes of soft masks, normalised to the image.

    Args:
        mask_probs: ``[n, h, w]`` mask probabilities.
        extent: ``(height, width)`` of the image (without batch padding) in mask pixels;
            None: the whole grid.

    Returns:
        ``[n, 6]``: ``x0, y0, x1, y1, cx, cy`` in [0, 1]. A mask with no pixel above 0.5
        gets the box of its most probable pixel, so every object has a place.
    """
    n, h, w = mask_probs.shape
    ext_h, ext_w = extent if extent is not None else (h, w)
    if n == 0:
        return mask_probs.new_zeros((0, BOX_DIM))
    binary = mask_probs > 0.5
    empty = ~binary.flatten(1).any(dim=1)
    if bool(empty.any()):
        peak = mask_probs[empty].flatten(1).argmax(dim=1)
        fallback = torch.zeros_like(binary[empty]).flatten(1)
        fallback[torch.arange(peak.numel(), device=peak.device), peak] = True
        binary = binary.clone()
        binary[empty] = fallback.view(-1, h, w)
    rows = binary.any(dim=2)  # [n, h]
    cols = binary.any(dim=1)  # [n, w]
    ys = torch.arange(h, device=mask_probs.device, dtype=mask_probs.dtype)
    xs = torch.arange(w, device=mask_probs.device, dtype=mask_probs.dtype)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1.0).amax(dim=1) + 1
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1.0).amax(dim=1) + 1
    box = torch.stack([x0 / ext_w, y0 / ext_h, x1 / ext_w, y1 / ext_h], dim=1).clamp(0, 1)
    centre = torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], dim=1)
    return torch.cat([box, centre], dim=1)


def mask_pool(mask_probs: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """Average of ``feature_map`` under each soft mask.

    Args:
        mask_probs: ``[n, h, w]`` mask probabilities (any resolution; resized to the map's).
        feature_map: ``[C, h_l, w_l]``.

    Returns:
        ``[n, C]``.
    """
    size = feature_map.shape[-2:]
    if mask_probs.shape[-2:] != size:
        mask_probs = F.interpolate(
            mask_probs[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0]
    weights = mask_probs.to(feature_map.dtype)
    pooled = torch.einsum("nhw,chw->nc", weights, feature_map)
    return pooled / weights.flatten(1).sum(dim=1, keepdim=True).clamp(min=1e-6)


def scene_context(
    query_feats: torch.Tensor,
    mask_logits: torch.Tensor,
    pixel_maps: Sequence[torch.Tensor],
    captioned: Optional[torch.Tensor] = None,
    *,
    max_objects: int = 16,
    extent: Optional[Tuple[float, float]] = None,
) -> SceneContext:
    """The scene facts of the objects of one image.

    Args:
        query_feats: ``[n, Dq]`` query features of the image's objects (training: the matched
            queries; inference: the queries of the kept segments).
        mask_logits: ``[n, h, w]`` their mask logits; detached here, so the caption loss does
            not reshape the masks through pooling.
        pixel_maps: the image's pixel-decoder levels, ``[C_l, h_l, w_l]`` each.
        captioned: Long[m] positions (into ``n``) of the objects to caption; None: all.
        max_objects: at most this many other objects per object (the first ones in order).
        extent: ``(height, width)`` of the image without batch padding, in mask pixels.

    Returns:
        a :class:`SceneContext` of the ``m`` captioned objects, ``S = min(n - 1, max_objects)``.
    """
    n = query_feats.shape[0]
    device = query_feats.device
    if captioned is None:
        captioned = torch.arange(n, device=device)
    probs = mask_logits.detach().float().sigmoid()
    boxes = mask_boxes(probs, extent).to(query_feats.dtype)  # [n, 6]
    sel_probs = probs[captioned]
    pixel_feats = [mask_pool(sel_probs, level) for level in pixel_maps]
    if not pixel_maps:
        raise ValueError("scene_context needs at least one pixel-decoder level")
    # Every object's look at the finest level, for when it is another object's neighbour.
    finest = mask_pool(probs, pixel_maps[-1])

    # Other objects of captioned object i: every j != i, the first max_objects of them.
    slots = max(0, min(n - 1, max_objects))
    positions = torch.arange(n, device=device)
    others = positions[None, :].expand(captioned.numel(), n)
    keep = others != captioned[:, None]  # [m, n], exactly n - 1 True per row
    other_index = others[keep].view(captioned.numel(), max(n - 1, 0))[:, :slots]  # [m, S]
    return SceneContext(
        pixel_feats=pixel_feats,
        boxes=boxes[captioned],
        other_feats=query_feats[other_index],
        other_boxes=boxes[other_index],
        other_valid=torch.ones(other_index.shape, dtype=torch.bool, device=device),
        other_pixel_feats=finest[other_index],
    )
