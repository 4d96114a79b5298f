"""The data of one image page of an HTML report: what the browser draws and links.

A page shows one image and one or more *views* of it side by side -- typically the model's
prediction and the ground truth. A view (:class:`ImageView`) has any of:

* panoptic segments (a :class:`~pix2cap.structures.PanopticResult`): their masks travel as one
  PNG of segment indices (``R + 256 G + 256^2 B``, 0 = void) at the page's display size, inlined
  as a ``data:`` URI so that the page reads its pixels without a server (a ``file://`` image
  would taint the canvas); each segment keeps its class, score, box, area and dense caption;
* a grounded caption (COCONut-PanCap's PGC form, ``{"text", "phrases": [{"start", "end",
  "segment_ids"}]}``), cut into pieces of plain text and phrases that name segments;
* a panoptic caption (SA-Pancap form, with ``[[x1, y1, x2, y2]]`` boxes), cut into pieces of
  text, phrases and their boxes, each box normalised to ``[0, 1]``.

:func:`page_payload` turns a page into plain JSON-able data; the page's HTML carries it as an
inert ``application/json`` block that ``viewer.js`` reads and renders with ``textContent``
only, so captions are always text, never markup.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from pix2cap.data.caption_formats import parse_pancap_boxes
from pix2cap.data.detection_utils import read_panoptic_result
from pix2cap.structures.panoptic import PanopticResult, id2rgb
from pix2cap.utils.visualizer import segment_colors

__all__ = [
    "ImageView",
    "display_size",
    "encode_segment_indices",
    "grounded_pieces",
    "panoptic_caption_pieces",
    "view_payload",
]

#: A box literal whose numbers are all at most this is read as normalised, else as pixels.
NORMALIZED_LIMIT = 1.5


@dataclass
class ImageView:
    """One panel of an image page.

    Attributes:
        name: its heading, e.g. ``"Prediction"`` or ``"Ground truth"``.
        result: the panoptic segments, or None (a view of captions only).
        grounded_caption: ``{"text", "phrases": [{"start", "end", "segment_ids", ...}]}`` with
            ids of ``result``'s segments, or None.
        panoptic_caption: a caption with ``[[x1, y1, x2, y2]]`` boxes, or None.
        metadata: the dataset's ``Metadata`` (class colours), or None.
        min_score: segments scoring below this are left out (their pixels shown as void).
    """

    name: str
    result: Optional[PanopticResult] = None
    grounded_caption: Optional[Mapping[str, Any]] = None
    panoptic_caption: Optional[str] = None
    metadata: Any = None
    min_score: float = 0.0
    notes: Sequence[str] = field(default_factory=tuple)

    @classmethod
    def from_dataset_dict(
        cls,
        record: Mapping[str, Any],
        metadata: Any = None,
        image_size: Optional[tuple[int, int]] = None,
        name: str = "Ground truth",
    ) -> "ImageView":
        """The ground truth of a dataset dict: its segments with their descriptions (when it
        has a panoptic PNG), its grounded caption and its panoptic caption, whichever it has.

        Raises:
            DatasetError: the panoptic PNG cannot be read or is not ``image_size``.
        """
        result = None
        if record.get("pan_seg_file_name") and "segments_info" in record:
            result = read_panoptic_result(dict(record), metadata, image_size=image_size)
        return cls(
            name, result, record.get("grounded_caption"), record.get("panoptic_caption"),
            metadata,
        )


def display_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """``(height, width)`` scaled so that the longer side is at most ``max_size`` (never up)."""
    if max_size <= 0 or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _png_data_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_segment_indices(
    panoptic_seg: np.ndarray, segment_ids: Sequence[int], size: tuple[int, int]
) -> str:
    """The masks of ``segment_ids`` as one PNG ``data:`` URI of ``size`` ``(height, width)``.

    Args:
        panoptic_seg: Int[H, W] segment id per pixel.
        segment_ids: the segments shown; pixel value ``i + 1`` marks ``segment_ids[i]``, 0 the
            rest (void and segments not shown).
        size: the display size; the map is resized with nearest neighbours (ids never blend).
    Returns:
        ``"data:image/png;base64,..."``, RGB with the index as ``R + 256 G + 256^2 B``.
    """
    ids = np.asarray(panoptic_seg)
    keys = np.asarray(list(segment_ids), dtype=np.int64)
    index = np.zeros(ids.shape, dtype=np.int32)
    if len(keys):
        order = np.argsort(keys)
        position = np.searchsorted(keys[order], ids).clip(0, len(keys) - 1)
        found = keys[order][position] == ids
        index[found] = order[position[found]] + 1
    height, width = size
    if index.shape != (height, width):
        index = cv2.resize(index, (width, height), interpolation=cv2.INTER_NEAREST)
    return _png_data_uri(id2rgb(index))


def grounded_pieces(
    text: str, phrases: Sequence[Mapping[str, Any]], known_ids: Sequence[int]
) -> list[dict]:
    """A grounded caption as consecutive pieces ``{"text", "segments"}``.

    ``segments`` lists the ids of ``known_ids`` the piece names (empty for plain text and for
    a phrase whose segments are not shown). Phrases out of the text's range or overlapping an
    earlier phrase are kept as plain text: every character appears exactly once, in order.
    """
    known = set(int(i) for i in known_ids)
    spans = []
    for phrase in phrases:
        try:
            start, end = int(phrase["start"]), int(phrase["end"])
            ids = [int(i) for i in phrase.get("segment_ids") or ()]
        except (KeyError, TypeError, ValueError):
            continue  # a malformed phrase stays plain text
        if 0 <= start < end <= len(text):
            spans.append((start, end, [i for i in ids if i in known]))
    pieces: list[dict] = []
    cursor = 0
    for start, end, ids in sorted(spans, key=lambda s: (s[0], -s[1])):
        if start < cursor:
            continue  # overlaps the previous phrase
        if start > cursor:
            pieces.append({"text": text[cursor:start], "segments": []})
        pieces.append({"text": text[start:end], "segments": ids, "phrase": True})
        cursor = end
    if cursor < len(text):
        pieces.append({"text": text[cursor:], "segments": []})
    return pieces


def _normalized_box(box: Sequence[float], height: int, width: int) -> list[float]:
    """A caption box in ``[0, 1]`` image coordinates, whether it was written normalised (all
    numbers at most :data:`NORMALIZED_LIMIT`) or in pixels; clamped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if max(abs(x1), abs(y1), abs(x2), abs(y2)) > NORMALIZED_LIMIT:
        x1, x2 = x1 / max(width, 1), x2 / max(width, 1)
        y1, y2 = y1 / max(height, 1), y2 / max(height, 1)
    x1, x2 = sorted((min(max(x1, 0.0), 1.0), min(max(x2, 0.0), 1.0)))
    y1, y2 = sorted((min(max(y1, 0.0), 1.0), min(max(y2, 0.0), 1.0)))
    return [round(x1, 5), round(y1, 5), round(x2, 5), round(y2, 5)]


def panoptic_caption_pieces(text: str, height: int, width: int) -> list[dict]:
    """A panoptic caption as consecutive pieces ``{"text", "box"}``: the phrase before each
    ``[[x1, y1, x2, y2]]`` and the box literal itself carry ``"box"`` (its index into the
    caption's boxes) and the normalised box in ``"xyxy"``; other text has ``box`` None."""
    pieces: list[dict] = []
    cursor = 0
    for index, item in enumerate(parse_pancap_boxes(text)):
        xyxy = _normalized_box(item["box"], height, width)
        start = max(item["start"], cursor)
        if start > cursor:
            pieces.append({"text": text[cursor:start], "box": None})
        if item["end"] > start:
            pieces.append({"text": text[start : item["end"]], "box": index, "xyxy": xyxy})
        if item["box_start"] > item["end"]:
            pieces.append({"text": text[item["end"] : item["box_start"]], "box": None})
        literal = text[item["box_start"] : item["box_end"]]
        pieces.append({"text": literal, "box": index, "xyxy": xyxy, "literal": True})
        cursor = item["box_end"]
    if cursor < len(text):
        pieces.append({"text": text[cursor:], "box": None})
    return pieces


def _number(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def view_payload(view: ImageView, image_size: tuple[int, int], size: tuple[int, int]) -> dict:
    """The JSON data of one view.

    Args:
        view: the view.
        image_size: ``(H, W)`` of the original image (the segments' boxes are in its pixels).
        size: ``(h, w)`` display size of the page's image and mask PNG.
    Returns:
        ``{"name", "notes", "masks" (PNG data URI or None), "segments": [{"index", "id",
        "category", "isthing", "score", "box" [x0, y0, x1, y1] pixels, "area", "caption",
        "color" [r, g, b]}], "grounded" (pieces or None), "panoptic" (pieces or None)}``.
    """
    height, width = image_size
    payload: dict[str, Any] = {
        "name": view.name,
        "notes": [str(n) for n in view.notes],
        "masks": None,
        "segments": [],
        "grounded": None,
        "panoptic": None,
    }
    shown_ids: list[int] = []
    if view.result is not None:
        result = view.result.filter(view.min_score) if view.min_score > 0 else view.result
        if result.image_size != (height, width):
            raise ValueError(
                f"view {view.name!r}: panoptic_seg is {result.image_size}, the image "
                f"{(height, width)}"
            )
        segments = [s for s in result.segments if s.area > 0]
        colors = segment_colors(segments, view.metadata)
        shown_ids = [s.id for s in segments]
        payload["masks"] = encode_segment_indices(result.panoptic_seg, shown_ids, size)
        payload["segments"] = [
            {
                "index": i + 1,
                "id": int(s.id),
                "category": s.name,
                "isthing": bool(s.isthing),
                "score": _number(s.score),
                "box": None if s.box is None else [int(v) for v in s.box],
                "area": int(s.area),
                "caption": s.caption or "",
                "color": list(colors[s.id]),
            }
            for i, s in enumerate(segments)
        ]
    if view.grounded_caption is not None:
        text = str(view.grounded_caption.get("text", ""))
        payload["grounded"] = grounded_pieces(
            text, view.grounded_caption.get("phrases") or (), shown_ids
        )
    if view.panoptic_caption is not None:
        payload["panoptic"] = panoptic_caption_pieces(str(view.panoptic_caption), height, width)
    return payload
