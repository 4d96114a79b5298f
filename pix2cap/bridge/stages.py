"""PancapChain stage texts built from decoded segments, in the protocol's exact string form.

PancapChain (Panoptic Captioning, arXiv 2505.16334) queries one model four times:

1. ``STAGE1_PROMPT`` -> ``<box>[[x1, y1, x2, y2]]</box>, <box>[[...]]</box>, ...``
2. ``STAGE2_PROMPT.format(out1)`` -> ``tag <box>[[...]]</box>, tag <box>[[...]]</box>, ...``
3. ``STAGE3_PROMPT.format(out2)`` -> extra items in the stage-2 form, or text starting with
   ``None``; the extra items are appended to the stage-2 list, dropping any item whose tag and
   box both equal an earlier one.
4. ``STAGE4_PROMPT.format(out3)`` (``out3`` = the merged list) -> the panoptic caption.

Items are joined by ``", "``; stage 1 keeps the first of several identical boxes and stage 2
the first of several identical (tag, box) pairs. In pix2cap, stages 1-3 are not generated:
they are written from the model's decoded segments (boxes from masks, tags from class names,
extra instances from lower-score queries) and only stage 4 goes to a language model.

Box grid. A model-side box is four integers on a ``grid`` x ``grid`` canvas (``grid`` = 1000)
that holds the image padded to a square. What the public code and text say:

* PancapChain's paper: boxes are "normalized to integer values within [0, 1000)", following
  ASMv2; its inference script feeds images through LLaVA's ``process_images`` with the
  ASMv2 checkpoint's ``image_aspect_ratio = "pad"``.
* ASMv2 / LLaVA ``"pad"``: ``expand2square`` pastes the image in the middle of a square of
  side ``max(W, H)``, i.e. the padding is split between both ends of the short axis (the
  paste offset is ``(side - short) // 2``); ASMv2's grounding evaluation maps a predicted box
  back by ``v / scale * max(W, H)`` and subtracting that offset from the short axis.

So pix2cap uses centred padding and the 0-1000 grid: with ``side = max(W, H)``,
``pad_x = (side - W) / 2``, ``pad_y = (side - H) / 2``, a pixel coordinate ``x`` maps to
``round((x + pad_x) / side * 1000)`` clamped to ``[0, 999]`` (the paper's half-open range), and
back with :func:`pix2cap.data.datasets.sapancap.grid_box_to_normalized`. The offset is kept
fractional (``/ 2``, not ``// 2``) so both directions are exact inverses up to the grid
quantisation; the half pixel that separates it from ``expand2square``'s integer paste offset
is below one grid step for any image side above 500 pixels. Grid -> normalised -> grid is
exact for boxes inside the image; normalised -> grid -> normalised is exact on the long axis
(3 decimals) and within half a grid step on the short axis, except that a coordinate of
exactly 1.0 on the long axis comes back as 0.999 (the grid stops at 999).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pix2cap.data.datasets.sapancap import (
    format_box,
    grid_box_to_normalized,
    parse_pancap_boxes,
    parse_tagged_boxes,
)

__all__ = [
    "GRID",
    "STAGE1_PROMPT",
    "STAGE2_PROMPT",
    "STAGE3_PROMPT",
    "STAGE4_PROMPT",
    "StageItem",
    "PancapStages",
    "pixel_box_to_grid",
    "normalized_box_to_grid",
    "grid_box_to_pixel",
    "grid_box_to_normalized",
    "format_grid_box",
    "clean_tag",
    "stage1_text",
    "stage2_text",
    "merge_stage_items",
    "parse_stage_items",
    "build_stages",
    "grid_text_to_pancap",
    "pancap_text_to_grid",
    "find_grid_boxes",
]

GRID = 1000

# The four prompts, verbatim (DESIGN 4.4, the same strings as PancapChain's inference script).
STAGE1_PROMPT = "Please localize all entities in this image."
STAGE2_PROMPT = (
    "Please specify the semantic tags of all entities based on their bounding boxes: {}"
)
STAGE3_PROMPT = (
    "Please specify missing entities and their locations for this image based on these "
    "specified entities: {}"
)
STAGE4_PROMPT = (
    "Please provide a hyper-detailed description for this image, including all entities, "
    "their locations, attributes, and relationships, as well as the global image status, "
    "based on boxes and tags: {}"
)
NONE_TEXT = "None"


def _check_size(width: int, height: int) -> None:
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


def _check_box(box: Sequence[float]) -> list[float]:
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers (x1, y1, x2, y2), got {len(box)}: {box!r}")
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box has a non-finite coordinate: {box!r}")
    return values


def _round_half_up(value: float) -> int:
    # Python's round() goes to the even neighbour; the grid wants the plain nearest integer.
    return int(math.floor(value + 0.5))


def pixel_box_to_grid(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[int]:
    """``[x1, y1, x2, y2]`` in pixels of a ``width`` x ``height`` image -> integers on the
    ``grid`` of the image padded (centred) to a square, clamped to ``[0, grid - 1]``."""
    _check_size(width, height)
    x1, y1, x2, y2 = _check_box(box)
    side = max(width, height)
    pad_x = (side - width) / 2
    pad_y = (side - height) / 2
    out = [
        (x1 + pad_x) / side,
        (y1 + pad_y) / side,
        (x2 + pad_x) / side,
        (y2 + pad_y) / side,
    ]
    return [min(grid - 1, max(0, _round_half_up(v * grid))) for v in out]


def normalized_box_to_grid(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[int]:
    """SA-Pancap form (``[0, 1]`` of width and height) -> the model-side grid; the inverse of
    :func:`grid_box_to_normalized` up to the grid quantisation."""
    x1, y1, x2, y2 = _check_box(box)
    return pixel_box_to_grid([x1 * width, y1 * height, x2 * width, y2 * height], width, height, grid)


def grid_box_to_pixel(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[float]:
    """Model-side grid box -> ``[x1, y1, x2, y2]`` in pixels, clamped to the image."""
    _check_size(width, height)
    side = max(width, height)
    pad_x = (side - width) / 2
    pad_y = (side - height) / 2
    x1, y1, x2, y2 = (v * side / grid for v in _check_box(box))
    return [
        min(float(width), max(0.0, x1 - pad_x)),
        min(float(height), max(0.0, y1 - pad_y)),
        min(float(width), max(0.0, x2 - pad_x)),
        min(float(height), max(0.0, y2 - pad_y)),
    ]


def format_grid_box(box: Sequence[int]) -> str:
    """``<box>[[x1, y1, x2, y2]]</box>`` with integer coordinates."""
    values = _check_box(box)
    return "<box>[[" + ", ".join(str(int(round(v))) for v in values) + "]]</box>"


_TAG_SUFFIXES = ("-merged", "-other", "-stuff")


def clean_tag(name: str) -> str:
    """A class name as a semantic tag: COCO panoptic suffixes dropped (``"wall-other-merged"``
    -> ``"wall"``, ``"tree-merged"`` -> ``"tree"``), hyphens/underscores to spaces, and the
    characters that would break the protocol's ``", "``-separated list (commas, semicolons,
    newlines, angle brackets) replaced by spaces."""
    tag = str(name).strip()
    changed = True
    while changed:
        changed = False
        for suffix in _TAG_SUFFIXES:
            if tag.lower().endswith(suffix) and len(tag) > len(suffix):
                tag = tag[: -len(suffix)]
                changed = True
    tag = re.sub(r"[-_,;<>\n\r\t]+", " ", tag)
    return re.sub(r"\s+", " ", tag).strip()


@dataclass(frozen=True)
class StageItem:
    """One entity of the stage texts: ``tag`` ("" in stage 1) and ``box`` on the grid."""

    tag: str
    box: tuple[int, int, int, int]

    def text(self) -> str:
        box = format_grid_box(self.box)
        return f"{self.tag} {box}" if self.tag else box


def stage1_text(boxes: Iterable[Sequence[int]]) -> str:
    """Stage-1 output: ``<box>[[...]]</box>, ...`` with repeated boxes dropped (first kept)."""
    seen: set[tuple[int, ...]] = set()
    parts = []
    for box in boxes:
        key = tuple(int(v) for v in box)
        if key in seen:
            continue
        seen.add(key)
        parts.append(format_grid_box(key))
    return ", ".join(parts)


def _dedup(items: Iterable[StageItem]) -> list[StageItem]:
    seen: set[StageItem] = set()
    out = []
    for item in items:
        if item in seen:
            continue
        seen.add(item)
        out.append(item)
    return out


def stage2_text(items: Iterable[StageItem]) -> str:
    """Stage-2 output: ``tag <box>[[...]]</box>, ...`` with repeated (tag, box) pairs dropped."""
    return ", ".join(item.text() for item in _dedup(items))


def merge_stage_items(base: Sequence[StageItem], extra: Sequence[StageItem]) -> list[StageItem]:
    """The stage-3 merge: ``base`` then ``extra``, dropping items whose tag and box repeat an
    earlier one."""
    return _dedup(list(base) + list(extra))


def parse_stage_items(text: str) -> list[StageItem]:
    """Items of a stage-1/2/3 text (``tag`` is "" for stage 1); a text starting with ``None``
    (stage 3 with nothing to add) gives ``[]``. Malformed boxes are skipped."""
    if text.lstrip().startswith(NONE_TEXT):
        return []
    items = []
    for parsed in parse_tagged_boxes(text):
        box = parsed["box"]
        if all(isinstance(v, int) for v in box):
            items.append(StageItem(parsed["tag"], tuple(int(v) for v in box)))
    return items


@dataclass
class PancapStages:
    """The stage texts of one image.

    Attributes:
        items: the stage-2 items (decoded segments), in order.
        extra_items: the stage-3 extra items (low-score candidates not already listed).
        stage1: stage-1 text (boxes only).
        stage2: stage-2 text (tags and boxes).
        stage3_extra: stage-3 model-side answer: the extra items' text, or ``"None"``.
        stage3: the merged list (stage 2 + extras, duplicates removed) that stage 4 receives.
        prompts: ``{1: ..., 2: ..., 3: ..., 4: ...}`` the prompt of each stage.
    """

    items: list[StageItem]
    extra_items: list[StageItem]
    stage1: str
    stage2: str
    stage3_extra: str
    stage3: str
    prompts: dict[int, str] = field(default_factory=dict)

    @property
    def stage4_prompt(self) -> str:
        return self.prompts[4]

    def as_dict(self) -> dict:
        """``{1: stage-1 text, 2: stage-2 text, 3: merged stage-3 list, 4: stage-4 prompt}``."""
        return {1: self.stage1, 2: self.stage2, 3: self.stage3, 4: self.prompts[4]}


def build_stages(items: Sequence[StageItem], extra_items: Sequence[StageItem] = ()) -> PancapStages:
    """Stage texts and prompts from the decoded entities.

    Args:
        items: one :class:`StageItem` per decoded segment (tag + grid box), in caption order.
        extra_items: extra instances for stage 3 (may repeat items; repeats are dropped).

    Returns:
        :class:`PancapStages`.
    """
    items = list(items)
    text1 = stage1_text(item.box for item in items)
    base = _dedup(items)
    text2 = ", ".join(item.text() for item in base)
    merged = merge_stage_items(base, extra_items)
    new_extra = merged[len(base) :]
    text3_extra = ", ".join(item.text() for item in new_extra) if new_extra else NONE_TEXT
    text3 = ", ".join(item.text() for item in merged)
    prompts = {
        1: STAGE1_PROMPT,
        2: STAGE2_PROMPT.format(text1),
        3: STAGE3_PROMPT.format(text2),
        4: STAGE4_PROMPT.format(text3),
    }
    return PancapStages(
        items=base,
        extra_items=new_extra,
        stage1=text1,
        stage2=text2,
        stage3_extra=text3_extra,
        stage3=text3,
        prompts=prompts,
    )


_INT = r"[-+]?\d+"
# Tolerant of the spaces a WordPiece decode puts around punctuation ("< box > [ [ 1, 2 ...").
_GRID_BOX_RE = re.compile(
    r"<\s*box\s*>\s*\[\s*\[\s*("
    + _INT
    + r")\s*,\s*("
    + _INT
    + r")\s*,\s*("
    + _INT
    + r")\s*,\s*("
    + _INT
    + r")\s*\]\s*\]\s*<\s*/\s*box\s*>",
    re.IGNORECASE,
)
_BARE_INT_BOX_RE = re.compile(
    r"\[\s*\[\s*(" + _INT + r")\s*,\s*(" + _INT + r")\s*,\s*(" + _INT + r")\s*,\s*(" + _INT + r")\s*\]\s*\]"
)


def find_grid_boxes(text: str) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Every model-side ``<box>[[x1, y1, x2, y2]]</box>`` of ``text`` (any spacing) as
    ``(start, end, box)`` character spans, in order."""
    return [
        (m.start(), m.end(), tuple(int(v) for v in m.groups())) for m in _GRID_BOX_RE.finditer(text)
    ]


def grid_text_to_pancap(text: str, width: int, height: int, grid: int = GRID) -> str:
    """Rewrite every model-side box of ``text`` into SA-Pancap form.

    ``<box>[[x1, y1, x2, y2]]</box>`` (integers, any spacing) becomes ``[[0.123, ...]]``
    normalised to the unpadded image; a bare ``[[a, b, c, d]]`` of integers with one of them
    above 1 is read as a grid box too. Boxes already in ``[0, 1]`` form are left unchanged.
    """
    _check_size(width, height)

    def convert(match: re.Match) -> str:
        box = [int(v) for v in match.groups()]
        return format_box(grid_box_to_normalized(box, width, height, grid))

    text = _GRID_BOX_RE.sub(convert, text)

    def convert_bare(match: re.Match) -> str:
        box = [int(v) for v in match.groups()]
        if max(box) <= 1:
            return match.group(0)
        return convert(match)

    return _BARE_INT_BOX_RE.sub(convert_bare, text)


def pancap_text_to_grid(text: str, width: int, height: int, grid: int = GRID) -> str:
    """Rewrite every SA-Pancap box ``[[0.1, 0.2, 0.3, 0.4]]`` of ``text`` into the model-side
    ``<box>[[x1, y1, x2, y2]]</box>`` form (as PancapChain trains its caption stage)."""
    _check_size(width, height)
    pieces: list[str] = []
    cursor = 0
    for item in parse_pancap_boxes(text):
        pieces.append(text[cursor : item["box_start"]])
        pieces.append(format_grid_box(normalized_box_to_grid(item["box"], width, height, grid)))
        cursor = item["box_end"]
    pieces.append(text[cursor:])
    return "".join(pieces)
