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

Boxes are written on the model-side 0-1000 grid of :mod:`pix2cap.data.caption_formats`,
which also converts them to and from pixels and the SA-Pancap form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pix2cap.data.caption_formats import format_grid_box, parse_tagged_boxes

__all__ = [
    "STAGE1_PROMPT",
    "STAGE2_PROMPT",
    "STAGE3_PROMPT",
    "STAGE4_PROMPT",
    "StageItem",
    "PancapStages",
    "clean_tag",
    "stage1_text",
    "stage2_text",
    "merge_stage_items",
    "parse_stage_items",
    "build_stages",
]

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

