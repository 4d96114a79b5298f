"""The language-model bridge: one image's decoded segments -> PancapChain stages -> caption.

    bridge = PanopticCaptionBridge(build_caption_writer("template"), metadata=metadata)
    out = bridge(model_output, (height, width))
    out["caption"]       # SA-Pancap-form panoptic caption
    out["structured"]    # PanopticContent.to_dict(): entities, attributes, relations, global
    out["stages"]        # {1: boxes, 2: tags + boxes, 3: merged list, 4: stage-4 prompt}
    out["grounded_caption"]  # the caption without boxes, mentions tagged <segment id:phrase>

Input (one image of the model's inference output): ``{"panoptic_seg": (Int[H, W] segment
ids, segments_info)}``, read through :class:`pix2cap.structures.PanopticResult` (each segment
dict has ``id``, ``category_id`` (contiguous), optionally ``isthing``, ``score``,
``caption``; boxes come from the masks); optionally ``"instances"`` (``Instances`` with
``pred_masks`` Bool[N, H, W], ``scores``, ``pred_classes``) whose lower-score candidates
become the stage-3 extra entities (without a dense caption).

Entity order: stuff segments, then thing segments, each in reading order of their boxes
(top, then left) -- the background a panoptic caption opens with, then the objects -- and
last the extra instances by descending score. An extra instance is kept when its score is
at least ``extra_instance_threshold``, its mask is not empty, and its mask IoU with every
segment or earlier extra of the same tag is below ``duplicate_iou`` (the same object found
twice).

:func:`make_training_pairs` builds the LM writers' training pairs from ground-truth segments
the same way; for captions without masks (SA-Pancap),
:func:`pix2cap.bridge.decoded_pairs.make_decoded_training_pairs` builds them from a model's
decoded segments.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pix2cap.bridge.content import DecodedEntity, PanopticContent, build_content
from pix2cap.bridge.mention_grounding import box_ious, ground_mentions
from pix2cap.bridge.prompt import PromptFormat
from pix2cap.bridge.stages import PancapStages, StageItem, build_stages, clean_tag
from pix2cap.data.caption_formats import (
    GRID,
    find_grid_boxes,
    format_grid_box,
    pancap_text_to_grid,
    pixel_box_to_grid,
)
from pix2cap.data.catalog import Metadata
from pix2cap.data.detection_utils import read_panoptic_png
from pix2cap.structures.panoptic import PanopticResult

__all__ = [
    "PanopticCaptionBridge",
    "make_training_pairs",
    "ground_truth_entities",
    "align_to_mentions",
    "captioned_records",
]

logger = logging.getLogger(__name__)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = int(np.logical_and(a, b).sum())
    if inter == 0:
        return 0.0
    return inter / float(np.logical_or(a, b).sum())


def _class_metadata(metadata: Any, class_names: Sequence[str] | None) -> Metadata:
    """The class facts the bridge reads (``class_name`` / ``is_thing`` of
    :class:`~pix2cap.data.catalog.Metadata`): ``metadata`` (a Metadata, a plain dict or
    None), with ``class_names`` in place of its ``stuff_classes``."""
    if isinstance(metadata, Metadata) and class_names is None:
        return metadata
    if isinstance(metadata, Metadata):
        fields = metadata.as_dict()
    elif isinstance(metadata, Mapping):
        fields = dict(metadata)
    elif metadata is None:
        fields = {}
    else:
        raise TypeError(f"metadata must be a Metadata, a dict or None, got {type(metadata).__name__}")
    name = fields.pop("name", "bridge")
    if class_names is not None:
        fields["stuff_classes"] = [str(n) for n in class_names]
    return Metadata(name=name, **fields)


def _entities(result: PanopticResult, tag_of, min_score: float | None = None) -> list[DecodedEntity]:
    """The non-empty, non-crowd segments of ``result`` scoring at least ``min_score``, as
    decoded entities (in the result's order)."""
    entities = []
    for s in result.segments:
        if s.iscrowd or s.area == 0:
            continue
        if min_score is not None and s.score is not None and s.score < min_score:
            continue
        entities.append(
            DecodedEntity(
                mask=result.mask(s.id),
                tag=tag_of(s.category_id),
                isthing=s.isthing,
                score=s.score,
                caption=s.caption,
                segment_id=s.id,
                category_id=s.category_id,
                source="segment",
            )
        )
    return entities


class PanopticCaptionBridge:
    """Decoded segments of one image -> PancapChain stage texts, structured content, caption.

    Args:
        writer: a caption writer (``writer(content, stages, image_size) -> str``).
        metadata: dataset metadata (:class:`~pix2cap.data.catalog.Metadata` or a dict): its
            ``class_name`` gives the tags and ``is_thing`` which ids are things when a
            segment has no ``isthing``.
        class_names: overrides ``metadata``'s ``stuff_classes`` (all class names by
            contiguous id).
        extra_instance_threshold: lowest score of a candidate instance to enter stage 3.
        max_extra_instances: at most this many extra entities.
        duplicate_iou: mask IoU at which a candidate repeats an entity of the same tag.
        min_segment_score: segments scoring below this are left out.
        grid: the model-side box grid (1000).
        mention_iou: the lowest IoU of a written box with a decoded entity's box that ties
            its mention to the entity's segment in ``grounded_caption``.
    """

    def __init__(
        self,
        writer,
        *,
        metadata: Any = None,
        class_names: Sequence[str] | None = None,
        extra_instance_threshold: float = 0.5,
        max_extra_instances: int = 10,
        duplicate_iou: float = 0.5,
        min_segment_score: float = 0.0,
        grid: int = GRID,
        mention_iou: float = 0.5,
    ):
        self.writer = writer
        self.metadata = _class_metadata(metadata, class_names)
        self.extra_instance_threshold = float(extra_instance_threshold)
        self.max_extra_instances = int(max_extra_instances)
        self.duplicate_iou = float(duplicate_iou)
        self.min_segment_score = float(min_segment_score)
        self.grid = int(grid)
        self.mention_iou = float(mention_iou)

    def tag_of(self, category_id: int) -> str:
        """Tag of a contiguous class id (``"class <id>"`` when no name is known)."""
        return clean_tag(self.metadata.class_name(category_id)) or f"class {category_id}"

    def grid_box(self, entity: DecodedEntity, width: int, height: int) -> tuple[int, ...]:
        """The entity's box on the model-side grid."""
        return tuple(pixel_box_to_grid(entity.pixel_box, width, height, self.grid))

    # -- decoding ---------------------------------------------------------------------------

    def decode(
        self, image_result: Mapping, image_size: tuple[int, int]
    ) -> tuple[list[DecodedEntity], list[DecodedEntity]]:
        """(segments, extra instances) of one image result, each in entity order."""
        height, width = int(image_size[0]), int(image_size[1])
        result = PanopticResult.from_model_output(image_result, self.metadata)
        if result.image_size != (height, width):
            raise ValueError(
                f"panoptic_seg has shape {result.image_size}, expected the image size {(height, width)}"
            )
        segments = self.layout_order(_entities(result, self.tag_of, self.min_segment_score))
        extras = self._extra_instances(image_result.get("instances"), segments, (height, width))
        return segments, extras

    @staticmethod
    def layout_order(entities: list[DecodedEntity]) -> list[DecodedEntity]:
        """Stuff before things, each top to bottom, then left to right (larger first)."""

        def key(e: DecodedEntity):
            s = e.stats
            return (e.isthing, s["y0"], s["x0"], -s["area"], e.segment_id or 0)

        return sorted(entities, key=key)

    def _extra_instances(
        self, instances: Any, segments: list[DecodedEntity], image_size: tuple[int, int]
    ) -> list[DecodedEntity]:
        if instances is None or len(instances) == 0 or self.max_extra_instances <= 0:
            return []
        for field in ("pred_masks", "scores", "pred_classes"):
            if not instances.has(field):
                raise KeyError(f"'instances' has no {field!r} field (has {sorted(instances.get_fields())})")
        masks = _to_numpy(instances.pred_masks).astype(bool)
        if masks.shape[1:] != tuple(image_size):
            raise ValueError(
                f"instances.pred_masks has shape {tuple(masks.shape)}, expected [N, {image_size[0]}, {image_size[1]}]"
            )
        scores = _to_numpy(instances.scores).astype(float)
        classes = _to_numpy(instances.pred_classes).astype(int)
        kept: list[DecodedEntity] = []
        for k in np.argsort(-scores, kind="stable"):
            if len(kept) >= self.max_extra_instances or scores[k] < self.extra_instance_threshold:
                break
            mask = masks[k]
            if not mask.any():
                continue
            tag = self.tag_of(int(classes[k]))
            if any(
                e.tag == tag and _mask_iou(e.mask, mask) >= self.duplicate_iou
                for e in segments + kept
            ):
                continue
            kept.append(
                DecodedEntity(
                    mask=mask,
                    tag=tag,
                    isthing=True,
                    score=float(scores[k]),
                    segment_id=None,
                    category_id=int(classes[k]),
                    source="extra",
                )
            )
        return kept

    # -- stages and content -----------------------------------------------------------------

    def prepare(
        self,
        segments: Sequence[DecodedEntity],
        extras: Sequence[DecodedEntity],
        image_size: tuple[int, int],
    ) -> tuple[PancapStages, PanopticContent]:
        """Stage texts and structured content of decoded entities (no writer involved)."""
        height, width = int(image_size[0]), int(image_size[1])
        boxes = [self.grid_box(e, width, height) for e in segments]
        items = [StageItem(e.tag, box) for e, box in zip(segments, boxes)]
        base = set(items)
        # An extra whose tag and grid box equal a listed item is the protocol's duplicate;
        # drop it here too so that content and stage 3 list the same entities.
        kept_extras, extra_items = [], []
        for e in extras:
            item = StageItem(e.tag, self.grid_box(e, width, height))
            if item not in base:
                kept_extras.append(e)
                extra_items.append(item)
        stages = build_stages(items, extra_items)
        content = build_content(
            list(segments) + kept_extras,
            (height, width),
            self.grid,
            grid_boxes=boxes + [item.box for item in extra_items],
        )
        return stages, content

    def __call__(self, image_result: Mapping, image_size: tuple[int, int]) -> dict:
        """Run the bridge on one image.

        Args:
            image_result: the model's output for the image (module docstring).
            image_size: ``(height, width)`` of ``panoptic_seg``.

        Returns:
            ``{"caption": str, "structured": dict (PanopticContent.to_dict()),
            "structured_full": dict (to_full_dict()), "stages": {1, 2, 3, 4},
            "stage3_extra": str, "prompts": {1, 2, 3, 4}, "grounded_caption": {"text",
            "tagged", "phrases"}}``; ``grounded_caption`` is the caption without its boxes,
            each mention tied to the segment its box came from
            (:func:`~pix2cap.bridge.mention_grounding.ground_mentions`).
        """
        segments, extras = self.decode(image_result, image_size)
        stages, content = self.prepare(segments, extras, image_size)
        caption = self.writer(content, stages, tuple(image_size))
        return {
            "caption": caption,
            "structured": content.to_dict(),
            "structured_full": content.to_full_dict(),
            "stages": stages.as_dict(),
            "stage3_extra": stages.stage3_extra,
            "prompts": dict(stages.prompts),
            "grounded_caption": ground_mentions(caption, content, min_iou=self.mention_iou),
        }


def ground_truth_entities(record: Mapping, bridge: PanopticCaptionBridge) -> list[DecodedEntity]:
    """A dataset dict's ground-truth segments as decoded entities, in the bridge's order.

    Uses ``pan_seg_file_name`` and ``segments_info`` (contiguous ``category_id``, ``isthing``,
    ``description`` as the dense caption); crowd segments are left out.
    """
    for key in ("pan_seg_file_name", "segments_info"):
        if key not in record:
            raise KeyError(f"dataset dict of {record.get('file_name', '?')} has no {key!r}")
    result = PanopticResult.from_panoptic(
        read_panoptic_png(record["pan_seg_file_name"]),
        record["segments_info"],
        bridge.metadata,
        caption_key="description",
    )
    return bridge.layout_order(_entities(result, bridge.tag_of))


def align_to_mentions(
    boxes: Sequence[Sequence[int]],
    target: str,
    tolerance: int = 3,
    *,
    min_iou: float | None = None,
) -> tuple[list[int], str]:
    """Line a ground-truth caption up with the entity list it is to be written from.

    Each ``<box>[[...]]</box>`` of ``target`` (grid form) is matched to the entity whose grid
    box is nearest (largest coordinate difference at most ``tolerance``) and rewritten to that
    box exactly: annotation boxes and boxes of the decoded masks may differ by a rounding unit,
    and an LM should learn to copy the listed box, not to guess the difference.

    With ``min_iou`` the match is by box IoU instead: a caption box goes to the entity whose
    box has the highest IoU with it (the first of equals), when that IoU is at least
    ``min_iou``. This is the rule for entities a model decoded, whose boxes differ from the
    annotation's by more than rounding. Either way a box left as written equals no listed box
    (an equal box has gap 0 and IoU 1), so the snapped boxes of the result are exactly its
    boxes found among ``boxes``.

    Args:
        boxes: the entities' grid boxes, in list order.
        target: the caption with grid boxes.
        tolerance: the largest per-coordinate difference that still counts as the same box.
        min_iou: in (0, 1]: match by IoU (``tolerance`` is then not used); None: by
            coordinate difference.

    Returns:
        ``(order, target)``: entity indices in the order the caption describes them, and the
        caption with snapped boxes. An entity is placed where it is first the subject of a
        sentence (the sentence's first box), else where it is first mentioned at all, so
        that ``"A star [[..]] is above the triangle [[..]]."`` places the triangle where its
        own sentence is; entities never mentioned follow in list order.
    """
    if min_iou is not None and not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    boxes = [tuple(int(v) for v in b) for b in boxes]
    rows = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sentence_starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", target)]
    first: dict[int, int] = {}
    as_subject: dict[int, int] = {}
    sentences_with_subject: set[int] = set()
    pieces: list[str] = []
    cursor = 0
    for start, end, box in find_grid_boxes(target):
        sentence = bisect.bisect_right(sentence_starts, start)
        is_subject = sentence not in sentences_with_subject
        sentences_with_subject.add(sentence)
        if min_iou is None:
            gaps = [max(abs(a - b) for a, b in zip(box, cand)) for cand in boxes]
            best = int(np.argmin(gaps)) if gaps else -1
            matched = best >= 0 and gaps[best] <= tolerance
        else:
            ious = box_ious(list(box), rows)
            best = int(np.argmax(ious)) if len(ious) else -1
            matched = best >= 0 and ious[best] >= min_iou
        pieces.append(target[cursor:start])
        cursor = end
        if not matched:
            pieces.append(target[start:end])
            continue
        pieces.append(format_grid_box(boxes[best]))
        first.setdefault(best, start)
        if is_subject:
            as_subject.setdefault(best, start)
    pieces.append(target[cursor:])
    place = {k: as_subject.get(k, first[k]) for k in first}
    order = sorted(place, key=place.get) + [k for k in range(len(boxes)) if k not in place]
    return order, "".join(pieces)


def captioned_records(dataset_dicts: Sequence[Mapping], user: str) -> Iterator[Mapping]:
    """The records that have a ``panoptic_caption``, in order; once they are all given, a
    warning says how many were skipped without one (``user`` names the caller)."""
    skipped = 0
    for record in dataset_dicts:
        if record.get("panoptic_caption"):
            yield record
        else:
            skipped += 1
    if skipped:
        logger.warning("%s: %d images without a panoptic_caption skipped", user, skipped)


def make_training_pairs(
    dataset_dicts: Sequence[Mapping],
    *,
    metadata: Any = None,
    class_names: Sequence[str] | None = None,
    prompt_format: PromptFormat = PromptFormat(),
    mention_order: bool = True,
    grid: int = GRID,
) -> list[dict]:
    """(prompt -> ground-truth panoptic caption) pairs for the LM writers.

    The prompt is ``prompt_format``'s, built from the ground-truth segments exactly as
    inference builds it from predicted ones (boxes from masks, tags from class names, dense
    captions = segment descriptions; no extra instances); the target is ``panoptic_caption``
    with its boxes rewritten on the model-side grid (PancapChain's training form). Images
    without a ``panoptic_caption`` are skipped with a warning. Train on them with the same
    ``prompt_format`` (:mod:`pix2cap.bridge.lm_training`), which saves it beside the LM.

    With ``mention_order`` the prompt lists the entities in the order the caption first
    mentions them, and the caption's boxes are snapped to the listed ones
    (:func:`align_to_mentions`). The list is a set to the protocol, so its order is free; in
    this order an LM learns to describe the entities as listed, which it then does for the
    bridge's layout order at inference, instead of having to plan an order of its own.

    Returns:
        ``[{"prompt", "target", "image_id"}]``.
    """
    bridge = PanopticCaptionBridge(None, metadata=metadata, class_names=class_names, grid=grid)
    pairs = []
    for record in captioned_records(dataset_dicts, "make_training_pairs"):
        height, width = int(record["height"]), int(record["width"])
        entities = ground_truth_entities(record, bridge)
        target = pancap_text_to_grid(record["panoptic_caption"], width, height, grid)
        if mention_order:
            boxes = [bridge.grid_box(e, width, height) for e in entities]
            order, target = align_to_mentions(boxes, target)
            entities = [entities[k] for k in order]
        stages, content = bridge.prepare(entities, [], (height, width))
        pairs.append(
            {
                "prompt": prompt_format.build(stages, content),
                "target": target,
                "image_id": record.get("image_id"),
            }
        )
    return pairs
