"""Helpers on binary masks."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["masks_to_boxes_xyxy", "mask_stats", "ring", "left_of", "above", "EXTENT_OVERLAP"]

# left_of / above: how much the two extents may overlap, as a fraction of the narrower one.
EXTENT_OVERLAP = 0.25


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around binary masks.

    Args:
        masks: Bool (or 0/1) [N, H, W].
    Returns:
        Float[N, 4] as ``(x1, y1, x2, y2)`` in absolute pixels, with ``x2``/``y2`` exclusive
        (a mask covering only pixel (0, 0) gives ``(0, 0, 1, 1)``), so box area equals the
        covered pixel extent. Empty masks give all zeros; ``N = 0`` gives a [0, 4] tensor.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    # amax over uint8 is several times faster than Tensor.any over bool on the CPU.
    masks = masks.to(torch.uint8)
    rows_any = masks.amax(dim=2) > 0  # [N, H]
    cols_any = masks.amax(dim=1) > 0  # [N, W]
    non_empty = rows_any.any(dim=1)
    height, width = masks.shape[1:]
    row_idx = torch.arange(height, device=masks.device)
    col_idx = torch.arange(width, device=masks.device)
    # Min/max over the covered rows/cols; uncovered positions are pushed out of the way.
    y1 = torch.where(rows_any, row_idx, height).min(dim=1).values
    y2 = torch.where(rows_any, row_idx, -1).max(dim=1).values + 1
    x1 = torch.where(cols_any, col_idx, width).min(dim=1).values
    x2 = torch.where(cols_any, col_idx, -1).max(dim=1).values + 1
    stacked = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[non_empty] = stacked[non_empty]
    return boxes


def mask_stats(mask: np.ndarray) -> dict | None:
    """Extent (inclusive ``x0, x1, y0, y1``), centroid ``cx, cy`` and ``area`` of a Bool
    [H, W] mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return {
        "x0": int(xs.min()),
        "x1": int(xs.max()),
        "y0": int(ys.min()),
        "y1": int(ys.max()),
        "cx": float(xs.mean()),
        "cy": float(ys.mean()),
        "area": int(xs.size),
    }


def ring(mask: np.ndarray) -> np.ndarray:
    """Bool [H, W]: the pixels outside ``mask`` that are 4-neighbours of it (inside the
    image)."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def left_of(a: dict, b: dict) -> bool:
    """Region ``a`` is left of ``b`` (:func:`mask_stats` dicts): its centroid is further
    left and their horizontal extents overlap by at most ``EXTENT_OVERLAP`` of the narrower."""
    overlap = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) + 1
    narrower = min(a["x1"] - a["x0"] + 1, b["x1"] - b["x0"] + 1)
    return a["cx"] < b["cx"] and overlap <= EXTENT_OVERLAP * narrower


def above(a: dict, b: dict) -> bool:
    """Region ``a`` is above ``b``: :func:`left_of` on the vertical axis."""
    overlap = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) + 1
    narrower = min(a["y1"] - a["y0"] + 1, b["y1"] - b["y0"] + 1)
    return a["cy"] < b["cy"] and overlap <= EXTENT_OVERLAP * narrower
