"""Relations between decoded regions read from their masks alone.

For an entity ``A`` with Bool mask ``M_A`` [H, W] (non-empty): ``x0..x1`` / ``y0..y1`` the
inclusive column / row extent, ``w = x1 - x0 + 1``, ``h = y1 - y0 + 1``, ``(cx, cy)`` the mean
column / row of its pixels, ``area`` its pixel count (:func:`pix2cap.structures.masks.mask_stats`).
``overlap_x(A, B) = min(A.x1, B.x1) - max(A.x0, B.x0) + 1`` (<= 0 when apart), ``overlap_y``
likewise. ``ring(A)`` = pixels outside ``M_A`` 4-adjacent to ``M_A`` (inside the image).
``below_edge(A)`` = for each column of ``M_A``, the pixel just under its lowest pixel of that
column (when inside the image). ``contact(A, B)`` = ``|ring(A) & M_B|``.

* ``left of (A, B)``: ``A.cx < B.cx`` and ``overlap_x(A, B) <= 0.25 * min(A.w, B.w)``;
  ``right of`` mirrors it. ``above (A, B)``: ``A.cy < B.cy`` and ``overlap_y(A, B) <= 0.25 *
  min(A.h, B.h)``; ``below`` mirrors it. (The same rules as the shapes dataset's captions.)
* ``on (T, R)`` -- T a thing, R a stuff region under it: at least ``max(3, 50%)`` of the
  ``below_edge(T)`` pixels lie in ``M_R`` and ``R.y0 > T.y0`` (R begins below the top of T,
  so T stands on R's top rather than lying within R).
* ``inside (A, B)`` -- at least 8 ring pixels and at least 90% of ``ring(A)`` in ``M_B``, and
  ``A.area < B.area`` (B surrounds A); not stated when ``on (A, B)`` holds.
* ``overlapping (A, B)`` -- the masks share at least 3 pixels (possible only when one of them
  is an extra instance, whose mask comes from its own query rather than the panoptic map).
* ``next to (A, B)`` -- both things, ``contact(A, B) >= 3`` (the masks touch) and none of the
  relations above holds for the pair.

Relations are listed once per unordered pair: for entity indices ``i < j``, the relation is
stated with ``i`` as subject (``right of`` rather than ``left of`` when that is what holds),
except ``on`` and ``inside``, whose subject is always the supported / enclosed entity.
Stuff-stuff pairs only get ``above``/``below``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pix2cap.structures.masks import above, left_of, mask_stats, ring

__all__ = ["geometric_relations", "centroids_contradict", "DIRECTIONS"]

ON_FRACTION = 0.5
INSIDE_FRACTION = 0.9
MIN_CONTACT = 3
MIN_RING = 8

# Each directional relation and its mirror image.
DIRECTIONS = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def _below_edge(mask: np.ndarray) -> np.ndarray:
    """For each column of ``mask``, the pixel just under its lowest pixel (inside the image)."""
    height = mask.shape[0]
    out = np.zeros_like(mask)
    cols = np.nonzero(mask.any(axis=0))[0]
    if cols.size == 0:
        return out
    # Index of the last True row per column: flip rows, argmax finds the first True.
    last = height - 1 - np.argmax(mask[::-1, cols], axis=0)
    keep = last + 1 < height
    out[last[keep] + 1, cols[keep]] = True
    return out


def _on(thing: np.ndarray, thing_stats: dict, region: np.ndarray, region_stats: dict) -> bool:
    edge = _below_edge(thing)
    total = int(edge.sum())
    if total == 0:
        return False
    hits = int((edge & region).sum())
    return hits >= max(MIN_CONTACT, ON_FRACTION * total) and region_stats["y0"] > thing_stats["y0"]


def _inside(inner_ring: np.ndarray, inner_stats: dict, outer: np.ndarray, outer_stats: dict) -> bool:
    total = int(inner_ring.sum())
    if total < MIN_RING:
        return False
    return (
        int((inner_ring & outer).sum()) >= INSIDE_FRACTION * total
        and inner_stats["area"] < outer_stats["area"]
    )


def geometric_relations(
    masks: Sequence[np.ndarray],
    isthing: Sequence[bool],
    stats: Sequence[dict | None] | None = None,
) -> list[tuple[int, int, str]]:
    """Relations that hold between the masks (definitions in the module docstring).

    Args:
        masks: N Bool [H, W] masks (same size).
        isthing: N flags.
        stats: the masks' :func:`~pix2cap.structures.masks.mask_stats` when already known
            (None: measured here).

    Returns:
        ``(subject, object, type)`` with 0-based indices; one entry per relation that holds,
        each unordered pair visited once.
    """
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if stats is None:
        stats = [mask_stats(m) for m in masks]
    rings = [ring(m) if s is not None else None for m, s in zip(masks, stats)]
    out: list[tuple[int, int, str]] = []
    n = len(masks)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = stats[i], stats[j]
            if a is None or b is None:
                continue
            found: list[tuple[int, int, str]] = []
            if isthing[i] != isthing[j]:
                t, r = (i, j) if isthing[i] else (j, i)
                if _on(masks[t], stats[t], masks[r], stats[r]):
                    found.append((t, r, "on"))
                elif _inside(rings[t], stats[t], masks[r], stats[r]):
                    found.append((t, r, "inside"))
            elif isthing[i] and isthing[j]:
                if _inside(rings[i], a, masks[j], b):
                    found.append((i, j, "inside"))
                elif _inside(rings[j], b, masks[i], a):
                    found.append((j, i, "inside"))
            if int((masks[i] & masks[j]).sum()) >= MIN_CONTACT:
                found.append((i, j, "overlapping"))
            support = any(rel in ("on", "inside") for _, _, rel in found)
            if not support:
                if left_of(a, b):
                    found.append((i, j, "left_of"))
                elif left_of(b, a):
                    found.append((i, j, "right_of"))
                if above(a, b):
                    found.append((i, j, "above"))
                elif above(b, a):
                    found.append((i, j, "below"))
            if not isthing[i] and not isthing[j]:
                found = [f for f in found if f[2] in ("above", "below")]
            if (
                not found
                and isthing[i]
                and isthing[j]
                and int((rings[i] & masks[j]).sum()) >= MIN_CONTACT
            ):
                found.append((i, j, "next_to"))
            out.extend(found)
    return out


def centroids_contradict(direction: str | None, subject: dict, obj: dict) -> bool:
    """Whether a directional relation (``"left_of"``, ...) of ``subject`` to ``obj``
    (:func:`~pix2cap.structures.masks.mask_stats` dicts) has the subject's centroid on the
    other side of the object's. Other relations (None included) never contradict."""
    if direction == "left_of":
        return subject["cx"] >= obj["cx"]
    if direction == "right_of":
        return subject["cx"] <= obj["cx"]
    if direction == "above":
        return subject["cy"] >= obj["cy"]
    if direction == "below":
        return subject["cy"] <= obj["cy"]
    return False
