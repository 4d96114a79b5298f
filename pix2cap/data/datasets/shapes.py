"""The built-in synthetic dataset "shapes": a deterministic generator of tiny panoptic scenes.

Every image holds two stuff regions (sky or wall on top, grass, water or sand below a wavy
horizon) and 1-6 things (circle, square, triangle, star) with a colour, a size and a texture.
Each segment gets a caption naming its attributes and exactly one relation that is true of the
masks; each image also gets a grounded caption (COCONut-PanCap style) and a panoptic caption
with boxes (SA-Pancap style). Everything runs on a CPU in seconds.

On-disk layout under ``root`` (one root holds several splits)::

    images/{split}/{image_id:06d}.png        RGB image, uint8, image_size x image_size
    panoptic/{split}/{image_id:06d}.png      COCO panoptic PNG: id = R + 256 G + 256^2 B, 0 = VOID
    annotations/panoptic_{split}.json        COCO panoptic JSON
    annotations/pix2cap_{split}.json         same + per segment "description", "attributes",
                                             "relation" (and "z_order", "full_area" for things)
    annotations/coconut_pancap_{split}.json  same as panoptic + per annotation "caption"
    annotations/sapancap_{split}_data_list.json   ["images/{split}/000000.png", ...]
    annotations/sapancap_{split}_gtcaption.json   [{"image_path", "gt_response"}, ...]
    meta.json                                {"version", "splits": {split: meta of that split}}

A split counts as complete only when ``meta.json`` lists it (``meta.json`` is updated last).

Segment ids: things are ``1..n`` in drawing order (1 is drawn first, i.e. lowest), the top
stuff region is ``n + 1`` and the bottom one ``n + 2``.

Relations. All are computed from the *visible* masks (what the panoptic PNG stores) unless a
line says otherwise. For a segment ``S`` with visible mask ``M_S``: ``x0, x1`` (``y0, y1``) are
the smallest and largest column (row) of ``M_S``; ``w = x1 - x0 + 1``, ``h = y1 - y0 + 1``;
``(cx, cy)`` is the mean column and row of its pixels.
``overlap_x(A, B) = min(A.x1, B.x1) - max(A.x0, B.x0) + 1`` (<= 0 when the extents are apart);
``overlap_y`` likewise with rows.

* ``left_of(A, B)``: ``A.cx < B.cx`` and ``overlap_x(A, B) <= 0.25 * min(A.w, B.w)``.
* ``right_of(A, B)`` = ``left_of(B, A)``.
* ``above(A, B)``: ``A.cy < B.cy`` and ``overlap_y(A, B) <= 0.25 * min(A.h, B.h)``.
* ``below(A, B)`` = ``above(B, A)``.
* ``in_front_of(A, B)``: A is drawn after B (``A.z_order > B.z_order``), the full (unoccluded)
  shape of A covers at least ``max(4, 5%)`` of B's full shape, and ``M_A`` touches ``M_B``
  (a pixel of ``M_A`` is a 4-neighbour of a pixel of ``M_B``). In the PNG this shows as the
  contact and as B's visible area being smaller than its ``full_area``.
* ``behind(A, B)`` = ``in_front_of(B, A)``.
* ``on(T, R)`` (thing T, stuff R; worded "on the grass", "in the sky", "in front of the wall"):
  let ``ring(T)`` be the pixels outside ``M_T`` that are 4-neighbours of ``M_T``; at least 8
  of them are stuff, and at least 75% of those stuff pixels belong to R.
* ``on_horizon(T, top, bottom)``: at least 8 stuff pixels in ``ring(T)`` and each of the two
  stuff regions holds more than 25% of them (T straddles the horizon).
* ``covers(R, "top")``: ``M_R`` has a pixel in the first row and none in the last row;
  ``covers(R, "bottom")`` mirrors it.

A thing that refers to another thing names it with the fewest attribute words (colour+shape,
then size+colour+shape, colour+texture+shape, all four) that no other thing in the image
shares; a thing that cannot be named uniquely is never a target. The words "left" and "right"
occur only in "to the left of" / "to the right of", so a horizontal flip may swap them.

Visibility: a thing is kept only when at least 40% of its full area and at least
``min_visible_pixels(image_size)`` pixels (60 at 256 px, scaled with the image area, never
below 16) stay visible after all later things are drawn; a thing that cannot be placed so is
dropped.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import cv2
import numpy as np
import portalocker
from PIL import Image

from pix2cap.data.caption_formats import format_box, format_grounding_tag
from pix2cap.data.errors import DatasetError
from pix2cap.data.text import capitalise, number_word, plural
from pix2cap.structures import id2rgb
from pix2cap.structures.masks import above, left_of, mask_stats, ring
from pix2cap.utils.file_io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_COLORS",
    "SHAPES_SIZES",
    "SHAPES_TEXTURES",
    "SHAPES_VERSION",
    "DEFAULT_NUM_IMAGES",
    "Scene",
    "render_scene",
    "generate_shapes",
    "ensure_shapes",
    "shapes_split_is_complete",
    "read_shapes_meta",
    "parse_holdout_pairs",
    "min_visible_pixels",
]

SHAPES_VERSION = 1

SHAPES_CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 130, 200]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [255, 180, 0]},
    {"id": 4, "name": "star", "isthing": 1, "color": [145, 30, 180]},
    {"id": 5, "name": "sky", "isthing": 0, "color": [135, 195, 235]},
    {"id": 6, "name": "wall", "isthing": 0, "color": [150, 140, 130]},
    {"id": 7, "name": "grass", "isthing": 0, "color": [75, 135, 60]},
    {"id": 8, "name": "water", "isthing": 0, "color": [55, 100, 140]},
    {"id": 9, "name": "sand", "isthing": 0, "color": [205, 185, 140]},
]
_CATEGORY_ID = {c["name"]: c["id"] for c in SHAPES_CATEGORIES}
THING_SHAPES = ("circle", "square", "triangle", "star")
TOP_STUFF = ("sky", "wall")
BOTTOM_STUFF = ("grass", "water", "sand")

# Saturated thing colours, chosen far from the muted stuff colours below.
SHAPES_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (20, 235, 70),
    "blue": (30, 50, 250),
    "yellow": (250, 230, 20),
    "purple": (150, 40, 210),
    "orange": (255, 130, 0),
    "white": (250, 250, 250),
}
# Size class -> range of the shape's extent as a fraction of the image side; gaps between the
# ranges keep the classes visibly distinct.
SHAPES_SIZES: dict[str, tuple[float, float]] = {
    "small": (0.12, 0.17),
    "medium": (0.22, 0.29),
    "large": (0.34, 0.42),
}
SHAPES_TEXTURES = ("solid", "striped", "dotted")

# Stuff: base colour, colour word used in captions, texture word.
_STUFF_STYLE = {
    "sky": ((140, 195, 235), "light blue", "smooth"),
    "wall": ((150, 140, 130), "grey", "brick"),
    "grass": ((75, 135, 60), "green", "grassy"),
    "water": ((55, 100, 140), "dark blue", "rippled"),
    "sand": ((205, 185, 140), "beige", "grainy"),
}
# How a thing sits on a stuff region, as words.
_ON_STUFF_PHRASE = {
    "sky": "in the sky",
    "wall": "in front of the wall",
    "grass": "on the grass",
    "water": "on the water",
    "sand": "on the sand",
}

DEFAULT_NUM_IMAGES = {"train": 1000, "val": 100}
_MIN_THINGS, _MAX_THINGS = 1, 6
_MIN_IMAGE_SIZE = 32
_MIN_VISIBLE_FRACTION = 0.4
_PLACEMENT_TRIES = 25
_SCENE_TRIES = 50
_ON_STUFF_FRACTION = 0.75
_MIN_RING_STUFF_PIXELS = 8
_MIN_OCCLUSION_FRACTION = 0.05
_MIN_OCCLUSION_PIXELS = 4
# Attribute subsets tried, in order, to name a target thing uniquely.
_REFERENCE_ATTRIBUTES = (
    ("color", "shape"),
    ("size", "color", "shape"),
    ("color", "texture", "shape"),
    ("size", "color", "texture", "shape"),
)
_ATTRIBUTE_ORDER = ("size", "color", "texture", "shape")
_THING_RELATIONS = ("left_of", "right_of", "above", "below", "in_front_of", "behind")
_RELATION_PHRASE = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
    "in_front_of": "in front of",
    "behind": "partly hidden behind",
}


def min_visible_pixels(image_size: int) -> int:
    """Smallest visible area (pixels) a thing may keep: 60 at 256 px, scaled with the area."""
    return max(16, int(round(60 * (image_size / 256.0) ** 2)))


def parse_holdout_pairs(text: str | Iterable) -> tuple[tuple[str, str], ...]:
    """``"red:circle,blue:star"`` (or an iterable of pairs) -> ``(("red", "circle"), ...)``.

    The result is sorted and free of duplicates, so equal requests compare equal.

    Raises ValueError naming the bad pair when a colour or shape is unknown.
    """
    if isinstance(text, str):
        items = [p.strip() for p in text.split(",") if p.strip()]
        pairs = []
        for item in items:
            parts = [p.strip() for p in item.split(":")]
            if len(parts) != 2:
                raise ValueError(f"pair {item!r} must be written colour:shape, e.g. red:circle")
            pairs.append((parts[0], parts[1]))
    else:
        pairs = []
        for pair in text:
            pair = tuple(pair)
            if len(pair) != 2:
                raise ValueError(f"pair {pair!r} must be (colour, shape)")
            pairs.append((str(pair[0]), str(pair[1])))
    for color, shape in pairs:
        if color not in SHAPES_COLORS:
            raise ValueError(
                f"pair {color}:{shape}: unknown colour {color!r}; known: {', '.join(SHAPES_COLORS)}"
            )
        if shape not in THING_SHAPES:
            raise ValueError(
                f"pair {color}:{shape}: unknown shape {shape!r}; known: {', '.join(THING_SHAPES)}"
            )
    # Sorted and deduplicated so equal requests compare equal (and meta.json is canonical).
    return tuple(sorted(set(pairs)))


# ---------------------------------------------------------------------------------------------
# Rendering one scene
# ---------------------------------------------------------------------------------------------
@dataclass
class _Thing:
    color: str
    shape: str
    size: str
    texture: str
    extent: float  # shape's width in pixels
    center: tuple[float, float] = (0.0, 0.0)
    full_mask: np.ndarray | None = None  # (H, W) bool, the unoccluded shape

    @property
    def attributes(self) -> dict:
        return {"color": self.color, "size": self.size, "texture": self.texture, "shape": self.shape}


@dataclass
class Scene:
    """One rendered image with its panoptic annotation and captions, in memory.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        segment_ids: (H, W) int32 panoptic segment id per pixel (never 0: every pixel is a
            thing or a stuff region).
        segments_info: list of dicts, one per segment, in id order: ``id``, ``category_id``,
            ``iscrowd`` (0), ``area``, ``bbox`` ([x, y, w, h] of the visible mask),
            ``description``, ``attributes``, ``relation``; things also ``z_order`` and
            ``full_area``.
        grounded_caption: COCONut-PanCap style caption with ``<ids:phrase>`` tags.
        panoptic_caption: SA-Pancap style caption with ``[[x1, y1, x2, y2]]`` boxes in [0, 1].
    """

    image: np.ndarray
    segment_ids: np.ndarray
    segments_info: list[dict] = field(default_factory=list)
    grounded_caption: str = ""
    panoptic_caption: str = ""

    @property
    def image_size(self) -> int:
        return int(self.image.shape[0])


class _SceneRejected(Exception):
    """Raised inside rendering when a sampled scene breaks a rule; the scene is re-sampled."""


def _shape_mask(shape: str, center: tuple[float, float], extent: float, size: int) -> np.ndarray:
    """(size, size) bool mask of a shape of width ``extent`` centred at ``center`` (x, y)."""
    cx, cy = center
    half = extent / 2.0
    if shape == "circle":
        yy, xx = np.ogrid[:size, :size]
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half * half
    if shape == "square":
        yy, xx = np.ogrid[:size, :size]
        side = 0.85 * half  # a bit smaller than the circle so the two have similar areas
        return (np.abs(xx - cx) <= side) & (np.abs(yy - cy) <= side)
    if shape == "triangle":
        points = np.array([[cx, cy - half], [cx + half, cy + half], [cx - half, cy + half]])
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, half, 0.45 * half)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    canvas = np.zeros((size, size), dtype=np.uint8)
    # 4 fractional bits: sub-pixel vertices so small shapes keep their form.
    cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (size, size) int64 row and column index grids, shared between images."""
    yy, xx = np.mgrid[:size, :size]
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _texture_pattern(texture: str, extent: float, size: int) -> np.ndarray | None:
    """(size, size) bool: pixels painted with the secondary shade, or None for solid."""
    if texture == "solid":
        return None
    yy, xx = _pixel_grid(size)
    if texture == "striped":
        period = max(2, int(round(extent / 5)))
        return ((xx + yy) // period) % 2 == 1
    period = max(3, int(round(extent / 4)))
    dx = (xx % period) - (period - 1) / 2.0
    dy = (yy % period) - (period - 1) / 2.0
    return dx * dx + dy * dy <= (0.3 * period) ** 2


def _secondary_shade(color: str) -> np.ndarray:
    rgb = np.array(SHAPES_COLORS[color], dtype=np.float32)
    # White would vanish at 0.55; grey keeps it white-looking while showing the texture.
    return rgb * (0.7 if color == "white" else 0.55)


def _render_stuff(rng: np.random.Generator, size: int, top: str, bottom: str):
    """Background image (H, W, 3) float32 and (H, W) bool mask of the top region."""
    yy, xx = (g.astype(np.float32) for g in _pixel_grid(size))
    horizon_mid = rng.uniform(0.35, 0.6) * size
    amplitude = rng.uniform(0.02, 0.08) * size
    frequency = rng.uniform(0.5, 2.0)
    phase = rng.uniform(0, 2 * np.pi)
    horizon = horizon_mid + amplitude * np.sin(2 * np.pi * frequency * xx[0] / size + phase)
    top_mask = yy < horizon[None, :]

    image = np.empty((size, size, 3), dtype=np.float32)
    for name, mask in ((top, top_mask), (bottom, ~top_mask)):
        base = np.array(_STUFF_STYLE[name][0], dtype=np.float32)
        if name == "sky":  # lighter towards the horizon
            shade = 1.0 + 0.12 * (yy / size)
        elif name == "wall":  # darker mortar lines of a brick pattern
            brick = max(4, size // 12)
            row = (yy // brick).astype(np.int64)
            mortar = (yy % brick < 1) | (((xx + (row % 2) * brick) % (2 * brick)) < 1)
            shade = np.where(mortar, 0.85, 1.0)
        elif name == "water":  # horizontal ripples
            shade = 1.0 + 0.06 * np.sin(2 * np.pi * yy / max(4, size / 16) + 0.3 * np.sin(xx / 7))
        elif name == "grass":
            shade = 1.0 + 0.05 * np.sin(xx * 1.7) * np.sin(yy * 0.6)
        else:
            shade = np.ones_like(yy)
        image[mask] = (shade[..., None] * base)[mask]
    image += rng.normal(0.0, 4.0, size=(size, size, 1)).astype(np.float32)
    return image, top_mask


def _place_things(rng, size, specs: list[_Thing]) -> list[_Thing]:
    """Place things in order so that every placed one stays visible enough; drop the rest."""
    min_pixels = min_visible_pixels(size)
    owner = np.zeros((size, size), dtype=np.int32)  # 0 = no thing, k = placed[k - 1]
    placed: list[_Thing] = []
    full_areas: list[int] = []
    visible: list[int] = []
    for spec in specs:
        half = spec.extent / 2.0
        for _ in range(_PLACEMENT_TRIES):
            center = (float(rng.uniform(half, size - half)), float(rng.uniform(half, size - half)))
            mask = _shape_mask(spec.shape, center, spec.extent, size)
            area = int(mask.sum())
            if area < min_pixels:
                continue
            covered = np.bincount(owner[mask], minlength=len(placed) + 1)
            still_visible = [visible[k] - int(covered[k + 1]) for k in range(len(placed))]
            if all(
                v >= max(_MIN_VISIBLE_FRACTION * full_areas[k], min_pixels)
                for k, v in enumerate(still_visible)
            ):
                spec.center, spec.full_mask = center, mask
                placed.append(spec)
                full_areas.append(area)
                visible = still_visible + [area]
                owner[mask] = len(placed)
                break
    return placed


def _segment_stats(segment_ids: np.ndarray, ids: Sequence[int]) -> dict[int, dict]:
    stats = {}
    for seg_id in ids:
        seg = mask_stats(segment_ids == seg_id)
        if seg is None:
            raise _SceneRejected(f"segment {seg_id} has no visible pixel")
        seg["bbox"] = [seg["x0"], seg["y0"], seg["x1"] - seg["x0"] + 1, seg["y1"] - seg["y0"] + 1]
        stats[seg_id] = seg
    return stats


def _touching_pairs(segment_ids: np.ndarray) -> set[tuple[int, int]]:
    """Unordered pairs (a < b) of ids whose masks are 4-neighbours somewhere."""
    pairs = set()
    for a, b in (
        (segment_ids[:, :-1], segment_ids[:, 1:]),
        (segment_ids[:-1, :], segment_ids[1:, :]),
    ):
        differ = a != b
        lo = np.minimum(a[differ], b[differ]).astype(np.int64)
        hi = np.maximum(a[differ], b[differ]).astype(np.int64)
        for code in np.unique(lo * 65536 + hi):
            pairs.add((int(code // 65536), int(code % 65536)))
    return pairs


def _ring_counts(segment_ids: np.ndarray, seg_id: int) -> dict[int, int]:
    """Segment id -> number of pixels of ``ring(seg_id)`` it owns (see module docstring)."""
    ring_ids = segment_ids[ring(segment_ids == seg_id)]
    values, counts = np.unique(ring_ids, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _reference_phrase(things: list[_Thing], index: int) -> str | None:
    """'the <fewest attribute words>' naming things[index] uniquely, or None if impossible."""
    target = things[index]
    for subset in _REFERENCE_ATTRIBUTES:
        key = tuple(getattr(target, a) for a in subset)
        clashes = sum(1 for t in things if tuple(getattr(t, a) for a in subset) == key)
        if clashes == 1:
            return "the " + " ".join(getattr(target, a) for a in _ATTRIBUTE_ORDER if a in subset)
    return None


def _full_phrase(thing: _Thing) -> str:
    return f"a {thing.size} {thing.color} {thing.texture} {thing.shape}"


def _normalised_box(bbox: Sequence[int], size: int) -> str:
    """A COCO ``[x, y, w, h]`` box of a ``size`` x ``size`` image in SA-Pancap's written form."""
    x, y, w, h = bbox
    return format_box([x / size, y / size, (x + w) / size, (y + h) / size])


def _sample_specs(rng, size, allowed_pairs, required_pairs) -> list[_Thing]:
    num_things = int(rng.integers(_MIN_THINGS, _MAX_THINGS + 1))
    required_slot = int(rng.integers(num_things)) if required_pairs else -1
    specs = []
    for k in range(num_things):
        pool = required_pairs if k == required_slot else allowed_pairs
        color, shape = pool[int(rng.integers(len(pool)))]
        size_name = list(SHAPES_SIZES)[int(rng.integers(len(SHAPES_SIZES)))]
        lo, hi = SHAPES_SIZES[size_name]
        texture = SHAPES_TEXTURES[int(rng.integers(len(SHAPES_TEXTURES)))]
        specs.append(_Thing(color, shape, size_name, texture, float(rng.uniform(lo, hi) * size)))
    return specs


def _try_render(rng, size, allowed_pairs, required_pairs) -> Scene:
    top = TOP_STUFF[int(rng.integers(len(TOP_STUFF)))]
    bottom = BOTTOM_STUFF[int(rng.integers(len(BOTTOM_STUFF)))]
    background, top_mask = _render_stuff(rng, size, top, bottom)
    things = _place_things(rng, size, _sample_specs(rng, size, allowed_pairs, required_pairs))
    if not things:
        raise _SceneRejected("no thing could be placed")
    if required_pairs and not any((t.color, t.shape) in required_pairs for t in things):
        raise _SceneRejected("the required held-out thing was dropped")

    n = len(things)
    top_id, bottom_id = n + 1, n + 2
    segment_ids = np.where(top_mask, top_id, bottom_id).astype(np.int32)
    image = background
    for k, thing in enumerate(things):
        segment_ids[thing.full_mask] = k + 1
        fill = np.array(SHAPES_COLORS[thing.color], dtype=np.float32)
        pattern = _texture_pattern(thing.texture, thing.extent, size)
        image[thing.full_mask] = fill
        if pattern is not None:
            image[thing.full_mask & pattern] = _secondary_shade(thing.color)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    stats = _segment_stats(segment_ids, range(1, n + 3))
    min_pixels = min_visible_pixels(size)
    for k, thing in enumerate(things):
        full_area = int(thing.full_mask.sum())
        area = stats[k + 1]["area"]
        if area < max(_MIN_VISIBLE_FRACTION * full_area, min_pixels):
            raise _SceneRejected("a thing lost too much of its area")  # placement guarantees this
    for seg_id, where in ((top_id, "top"), (bottom_id, "bottom")):
        mask = segment_ids == seg_id
        first, last = (mask[0].any(), mask[-1].any())
        if where == "top" and not (first and not last) or where == "bottom" and not (last and not first):
            raise _SceneRejected(f"the {where} stuff region does not cover the {where}")

    touching = _touching_pairs(segment_ids)
    stuff_names = {top_id: top, bottom_id: bottom}

    def occludes(front: int, back: int) -> bool:
        if front <= back or (back, front) not in touching:
            return False
        a, b = things[front - 1].full_mask, things[back - 1].full_mask
        overlap = int((a & b).sum())
        return overlap >= max(_MIN_OCCLUSION_PIXELS, _MIN_OCCLUSION_FRACTION * int(b.sum()))

    references = [_reference_phrase(things, k) for k in range(n)]
    segments_info: list[dict] = []
    grounded_thing_sentences: list[str] = []
    sa_thing_sentences: list[str] = []
    for k, thing in enumerate(things):
        seg_id = k + 1
        candidates: list[tuple[str, int]] = []
        for other in range(1, n + 1):
            if other == seg_id or references[other - 1] is None:
                continue
            a, b = stats[seg_id], stats[other]
            holds = {
                "left_of": left_of(a, b),
                "right_of": left_of(b, a),
                "above": above(a, b),
                "below": above(b, a),
                "in_front_of": occludes(seg_id, other),
                "behind": occludes(other, seg_id),
            }
            candidates.extend((rel, other) for rel in _THING_RELATIONS if holds[rel])
        ring_counts = _ring_counts(segment_ids, seg_id)
        top_count, bottom_count = ring_counts.get(top_id, 0), ring_counts.get(bottom_id, 0)
        stuff_total = top_count + bottom_count
        if stuff_total >= _MIN_RING_STUFF_PIXELS:
            top_fraction = top_count / stuff_total
            if top_fraction >= _ON_STUFF_FRACTION:
                candidates.append(("on", top_id))
            elif top_fraction <= 1.0 - _ON_STUFF_FRACTION:
                candidates.append(("on", bottom_id))
            else:
                candidates.append(("on_horizon", 0))
        if not candidates:
            raise _SceneRejected(f"thing {seg_id} has no clear relation")
        rel_type, target = candidates[int(rng.integers(len(candidates)))]

        subject = _full_phrase(thing)
        subject_box = _normalised_box(stats[seg_id]["bbox"], size)
        if rel_type in _RELATION_PHRASE:
            target_phrase = references[target - 1]
            words = f"{_RELATION_PHRASE[rel_type]} {target_phrase}"
            relation = {"type": rel_type, "target_id": target, "target_phrase": target_phrase}
            target_tag = format_grounding_tag([target], target_phrase)
            grounded = f"{_RELATION_PHRASE[rel_type]} {target_tag}"
            sa = f"{_RELATION_PHRASE[rel_type]} {target_phrase} {_normalised_box(stats[target]['bbox'], size)}"
        elif rel_type == "on":
            name = stuff_names[target]
            words = _ON_STUFF_PHRASE[name]
            preposition, noun = words.rsplit(" the ", 1)
            relation = {"type": "on", "target_id": target, "target_phrase": f"the {noun}"}
            grounded = f"{preposition} {format_grounding_tag([target], f'the {noun}')}"
            sa = f"{preposition} the {noun} {_normalised_box(stats[target]['bbox'], size)}"
        else:
            words = f"on the horizon between the {top} and the {bottom}"
            relation = {"type": "on_horizon", "target_ids": [top_id, bottom_id]}
            grounded = (
                f"on the horizon between {format_grounding_tag([top_id], f'the {top}')} and "
                f"{format_grounding_tag([bottom_id], f'the {bottom}')}"
            )
            sa = (
                f"on the horizon between the {top} {_normalised_box(stats[top_id]['bbox'], size)} "
                f"and the {bottom} {_normalised_box(stats[bottom_id]['bbox'], size)}"
            )
        segments_info.append(
            {
                "id": seg_id,
                "category_id": _CATEGORY_ID[thing.shape],
                "iscrowd": 0,
                "area": stats[seg_id]["area"],
                "bbox": stats[seg_id]["bbox"],
                "description": f"{subject} {words}",
                "attributes": thing.attributes,
                "relation": relation,
                "z_order": k,
                "full_area": int(thing.full_mask.sum()),
            }
        )
        grounded_thing_sentences.append(
            f"{format_grounding_tag([seg_id], capitalise(subject))} is {grounded}."
        )
        sa_thing_sentences.append(f"{capitalise(subject)} {subject_box} is {sa}.")

    for seg_id, name, where in ((top_id, top, "top"), (bottom_id, bottom, "bottom")):
        color_word, texture_word = _STUFF_STYLE[name][1], _STUFF_STYLE[name][2]
        segments_info.append(
            {
                "id": seg_id,
                "category_id": _CATEGORY_ID[name],
                "iscrowd": 0,
                "area": stats[seg_id]["area"],
                "bbox": stats[seg_id]["bbox"],
                "description": f"{color_word} {name} covering the {where} of the image",
                "attributes": {"color": color_word, "texture": texture_word},
                "relation": {"type": "covers", "where": where},
            }
        )

    top_words = f"{_STUFF_STYLE[top][1]} {top}"
    bottom_words = f"{_STUFF_STYLE[bottom][1]} {bottom}"
    grounded_sentences = [
        f"{format_grounding_tag([top_id], capitalise(top_words))} covers the top of the image "
        f"above {format_grounding_tag([bottom_id], bottom_words)}."
    ]
    groups: dict[tuple[str, str], list[int]] = {}
    for k, thing in enumerate(things):
        groups.setdefault((thing.color, thing.shape), []).append(k + 1)
    for (color, shape), ids in groups.items():
        if len(ids) >= 2:
            phrase = f"{capitalise(number_word(len(ids)))} {color} {plural(shape)}"
            grounded_sentences.append(f"{format_grounding_tag(ids, phrase)} appear in the scene.")
    grounded_sentences += grounded_thing_sentences
    object_words = f"{number_word(n)} object" + ("s" if n > 1 else "")
    grounded_sentences.append(f"The scene contains {object_words} in total.")

    top_box = _normalised_box(stats[top_id]["bbox"], size)
    bottom_box = _normalised_box(stats[bottom_id]["bbox"], size)
    sa_sentences = [
        f"This image is a simple synthetic scene. {capitalise(top_words)} {top_box} covers the top of "
        f"the image, and {bottom_words} {bottom_box} covers the bottom, the two meeting along a wavy horizon."
    ]
    sa_sentences += sa_thing_sentences
    textures = sorted({t.texture for t in things})
    sa_sentences.append(
        f"Overall the picture shows {object_words} with {', '.join(textures)} surfaces, drawn in flat "
        f"vivid colours over a softly textured {top} and {bottom} background."
    )
    return Scene(
        image=image,
        segment_ids=segment_ids,
        segments_info=segments_info,
        grounded_caption=" ".join(grounded_sentences),
        panoptic_caption=" ".join(sa_sentences),
    )


def _all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in SHAPES_COLORS for s in THING_SHAPES]


def render_scene(
    rng: np.random.Generator,
    image_size: int,
    *,
    allowed_pairs: Iterable[tuple[str, str]] | None = None,
    required_pairs: Iterable[tuple[str, str]] | None = None,
) -> Scene:
    """Render one random scene in memory.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        image_size: side of the square image in pixels (>= 32).
        allowed_pairs: (colour, shape) pairs things may take; None = all 28.
        required_pairs: if given, the scene holds at least one thing of one of these pairs
            (used for the compositional test split); the other things follow ``allowed_pairs``.

    Returns:
        a :class:`Scene` (image (H, W, 3) uint8, segment_ids (H, W) int32, segments, captions).
    """
    image_size = int(image_size)
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    allowed = list(parse_holdout_pairs(allowed_pairs)) if allowed_pairs is not None else _all_pairs()
    required = list(parse_holdout_pairs(required_pairs)) if required_pairs else []
    if not allowed:
        raise ValueError("allowed_pairs is empty: no thing could be drawn")
    for _ in range(_SCENE_TRIES):
        try:
            return _try_render(rng, image_size, allowed, required)
        except _SceneRejected:
            continue
    raise RuntimeError(f"could not render a valid {image_size}px scene in {_SCENE_TRIES} tries")


# ---------------------------------------------------------------------------------------------
# Writing a split
# ---------------------------------------------------------------------------------------------
def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 is stable across processes (unlike hash()); image k depends only on (seed, split, k).
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def _split_files(split: str) -> dict[str, str]:
    """Relative paths of everything a split owns."""
    return {
        "images": f"images/{split}",
        "panoptic": f"panoptic/{split}",
        "panoptic_json": f"annotations/panoptic_{split}.json",
        "pix2cap_json": f"annotations/pix2cap_{split}.json",
        "coconut_pancap_json": f"annotations/coconut_pancap_{split}.json",
        "sapancap_data_list": f"annotations/sapancap_{split}_data_list.json",
        "sapancap_gtcaption": f"annotations/sapancap_{split}_gtcaption.json",
    }


def _dump_json(obj, path: str) -> None:
    atomic_write_json(path, obj)


def _save_png(array: np.ndarray, path: str) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_image(scene: Scene, tmp_root: str, split: str, image_id: int) -> None:
    name = f"{image_id:06d}.png"
    _save_png(scene.image, os.path.join(tmp_root, "images", split, name))
    # Pillow, not detection_utils.encode_panoptic_png (libpng): the two choose different row
    # filters, and generated PNGs keep the bytes of earlier versions.
    _save_png(id2rgb(scene.segment_ids), os.path.join(tmp_root, "panoptic", split, name))


def read_shapes_meta(root: str) -> dict:
    """Contents of ``root/meta.json`` (``{"version", "splits": {...}}``); empty if absent.

    Raises DatasetError when the file exists but is not a valid meta file.
    """
    path = os.path.join(root, "meta.json")
    if not os.path.exists(path):
        return {"version": SHAPES_VERSION, "splits": {}}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(path, f"cannot be read as JSON ({e}); delete it to regenerate the dataset") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise DatasetError(path, "is not a shapes meta file (no 'splits' mapping); delete it to regenerate")
    return meta


@contextlib.contextmanager
def _file_lock(path: str):
    # Generation of a split can take a minute; wait long rather than fail.
    with portalocker.Lock(path, mode="a", timeout=3600, check_interval=0.05):
        yield


def _update_meta(root: str, split: str, split_meta: dict | None) -> None:
    """Set (or with None remove) one split's entry of meta.json, atomically and under a lock."""
    with _file_lock(os.path.join(root, ".meta.lock")):
        meta = read_shapes_meta(root)
        splits = dict(meta["splits"])
        if split_meta is None:
            if split not in splits:
                return
            splits.pop(split)
        else:
            splits[split] = split_meta
        meta = {"version": SHAPES_VERSION, "splits": {k: splits[k] for k in sorted(splits)}}
        _dump_json(meta, os.path.join(root, "meta.json"))


def _requested_params(num_images, image_size, seed, holdout_pairs, include_holdout_only) -> dict:
    return {
        "version": SHAPES_VERSION,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "holdout_pairs": [list(p) for p in holdout_pairs],
        "include_holdout_only": bool(include_holdout_only),
    }


def shapes_split_is_complete(root: str, split: str, expected: dict | None = None) -> bool:
    """True when meta.json lists ``split`` and all its files are in place.

    ``expected``: optional dict of meta values (e.g. ``{"num_images": 20}``) that must match.
    """
    root = os.fspath(root)
    split_meta = read_shapes_meta(root)["splits"].get(split)
    if split_meta is None:
        return False
    if expected and any(split_meta.get(k) != v for k, v in expected.items()):
        return False
    files = _split_files(split)
    for key, rel in files.items():
        path = os.path.join(root, rel)
        if key in ("images", "panoptic"):
            if not os.path.isdir(path) or len(os.listdir(path)) != split_meta.get("num_images"):
                return False
        elif not os.path.isfile(path):
            return False
    return True


def _resolve_num_images(split: str, num_images) -> int:
    if num_images is None:
        # Unknown split names (e.g. a compositional test split) get the size of "val".
        num_images = DEFAULT_NUM_IMAGES.get(split, DEFAULT_NUM_IMAGES["val"])
    num_images = int(num_images)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return num_images


def _check_split_name(split: str) -> None:
    if not split or not all(c.isalnum() or c in "_-" for c in split):
        raise ValueError(f"split name {split!r} must be non-empty and use only letters, digits, '_' or '-'")


def _remove_stale_temporaries(root: str, split: str) -> None:
    # Left by a killed run of this split; safe to delete because the caller holds its lock.
    for path in glob.glob(os.path.join(root, f".tmp-shapes-{split}-*")) + glob.glob(
        os.path.join(root, f".trash-shapes-{split}-*")
    ):
        shutil.rmtree(path, ignore_errors=True)


def _generate_locked(root, split, num_images, image_size, seed, holdout_pairs, include_holdout_only) -> dict:
    """Generate one split into a temporary folder, then move it into place. Caller holds the lock."""
    _remove_stale_temporaries(root, split)
    files = _split_files(split)
    tmp_root = os.path.join(root, f".tmp-shapes-{split}-{uuid.uuid4().hex}")
    allowed = [p for p in _all_pairs() if p not in holdout_pairs]
    required = list(holdout_pairs) if include_holdout_only else None
    if not allowed:
        raise ValueError("every colour-shape pair is held out: nothing left to draw")
    if include_holdout_only and not holdout_pairs:
        raise ValueError("include_holdout_only=True needs at least one holdout pair")
    logger.info(
        "Generating shapes split %r: %d images of %d px into %s", split, num_images, image_size, root
    )
    try:
        for sub in ("images", "panoptic"):
            os.makedirs(os.path.join(tmp_root, sub, split))
        os.makedirs(os.path.join(tmp_root, "annotations"))

        images, annotations, coconut_annotations, data_list, gt_captions = [], [], [], [], []
        num_things = 0
        for image_id in range(num_images):
            scene = render_scene(
                _image_rng(seed, split, image_id), image_size, allowed_pairs=allowed, required_pairs=required
            )
            _write_image(scene, tmp_root, split, image_id)
            name = f"{image_id:06d}.png"
            images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
            annotations.append({"image_id": image_id, "file_name": name, "segments_info": scene.segments_info})
            plain = [
                {k: s[k] for k in ("id", "category_id", "iscrowd", "area", "bbox")} for s in scene.segments_info
            ]
            coconut_annotations.append(
                {"image_id": image_id, "file_name": name, "segments_info": plain, "caption": scene.grounded_caption}
            )
            rel_image = f"images/{split}/{name}"
            data_list.append(rel_image)
            gt_captions.append({"image_path": rel_image, "gt_response": scene.panoptic_caption})
            num_things += sum(1 for s in scene.segments_info if "z_order" in s)

        info = {"description": f"pix2cap synthetic shapes, split {split}", "version": str(SHAPES_VERSION)}
        categories = [dict(c) for c in SHAPES_CATEGORIES]

        def coco(anns):
            return {"info": info, "images": images, "annotations": anns, "categories": categories}

        panoptic_annotations = [
            {"image_id": a["image_id"], "file_name": a["file_name"], "segments_info": c["segments_info"]}
            for a, c in zip(annotations, coconut_annotations)
        ]
        for key, obj in (
            ("panoptic_json", coco(panoptic_annotations)),
            ("pix2cap_json", coco(annotations)),
            ("coconut_pancap_json", coco(coconut_annotations)),
            ("sapancap_data_list", data_list),
            ("sapancap_gtcaption", gt_captions),
        ):
            _dump_json(obj, os.path.join(tmp_root, files[key]))

        split_meta = {
            "split": split,
            **_requested_params(num_images, image_size, seed, holdout_pairs, include_holdout_only),
            "num_things": num_things,
            "colors": list(SHAPES_COLORS),
            "files": files,
        }
        _move_into_place(root, tmp_root, split, files)
        # Written last: the split counts as complete only from here on.
        _update_meta(root, split, split_meta)
        return split_meta
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _move_into_place(root: str, tmp_root: str, split: str, files: dict[str, str]) -> None:
    # Unlist the split first, so a crash while moving leaves it "incomplete", never mixed.
    _update_meta(root, split, None)
    trash = os.path.join(root, f".trash-shapes-{split}-{uuid.uuid4().hex}")
    try:
        for key, rel in files.items():
            src, dst = os.path.join(tmp_root, rel), os.path.join(root, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if key in ("images", "panoptic"):
                if os.path.exists(dst):
                    # rename() cannot replace a non-empty folder: move the old one aside first.
                    os.makedirs(trash, exist_ok=True)
                    os.replace(dst, os.path.join(trash, key))
            os.replace(src, dst)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def generate_shapes(
    root,
    split: str,
    *,
    num_images: int | None = None,
    image_size: int = 256,
    seed: int = 0,
    holdout_pairs: Iterable[tuple[str, str]] = (),
    include_holdout_only: bool = False,
    overwrite: bool = False,
) -> dict:
    """Generate one split of the shapes dataset under ``root`` and return its meta dict.

    Args:
        root: dataset folder (created if missing); several splits share it.
        split: split name, e.g. "train", "val" or "comp_test".
        num_images: images to make; None = ``DEFAULT_NUM_IMAGES[split]`` (100 for other names).
        image_size: side of the square images in pixels.
        seed: same seed -> byte-identical files; image k depends only on (seed, split, k).
        holdout_pairs: (colour, shape) pairs, e.g. ``(("red", "circle"),)``. With
            ``include_holdout_only=False`` no thing of these pairs appears; with True every image
            holds at least one.
        overwrite: regenerate even if a complete split with the same parameters exists. Without
            it, an existing complete split with the same parameters is kept (its meta returned),
            and one with different parameters raises FileExistsError.

    Returns:
        the split's meta: version, split, num_images, image_size, seed, holdout_pairs,
        include_holdout_only, num_things, colors, files.
    """
    root = os.fspath(root)
    _check_split_name(split)
    num_images = _resolve_num_images(split, num_images)
    pairs = parse_holdout_pairs(holdout_pairs)
    if int(image_size) < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    os.makedirs(root, exist_ok=True)
    expected = _requested_params(num_images, image_size, seed, pairs, include_holdout_only)
    with _file_lock(os.path.join(root, f".shapes-{split}.lock")):
        if not overwrite and shapes_split_is_complete(root, split):
            if shapes_split_is_complete(root, split, expected):
                return read_shapes_meta(root)["splits"][split]
            raise FileExistsError(
                f"{os.path.join(root, 'meta.json')}: split {split!r} exists with other parameters; "
                "pass overwrite=True (or --force) to regenerate it"
            )
        return _generate_locked(root, split, num_images, int(image_size), int(seed), pairs, include_holdout_only)


def ensure_shapes(root, split: str, **kwargs) -> str:
    """Make sure ``split`` exists under ``root`` with the given parameters; return ``root``.

    Generates the split when it is missing, incomplete (an interrupted run) or was made with
    other parameters (keyword arguments as in :func:`generate_shapes`, except ``overwrite``:
    use :func:`generate_shapes` to force a regeneration). Safe to call from
    several processes at once: a per-split file lock makes one generate and the others wait.
    """
    root = os.fspath(root)
    _check_split_name(split)
    num_images = _resolve_num_images(split, kwargs.pop("num_images", None))
    image_size = int(kwargs.pop("image_size", 256))
    seed = int(kwargs.pop("seed", 0))
    pairs = parse_holdout_pairs(kwargs.pop("holdout_pairs", ()))
    include_holdout_only = bool(kwargs.pop("include_holdout_only", False))
    if kwargs:
        raise TypeError(f"ensure_shapes() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    expected = _requested_params(num_images, image_size, seed, pairs, include_holdout_only)
    # Fast path without the lock: meta.json is only written once a split is fully in place.
    if os.path.isdir(root) and shapes_split_is_complete(root, split, expected):
        return root
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f".shapes-{split}.lock")):
        if not shapes_split_is_complete(root, split, expected):
            _generate_locked(root, split, num_images, image_size, seed, pairs, include_holdout_only)
    return root
