"""SA-Pancap (Panoptic Captioning): SA-1B images with one hyper-detailed caption each.

Files: a data list (JSON list of image paths relative to the data root, e.g.
``"sam/sa_000005/sa_62400.jpg"``) and, for val/test, a ground-truth file (JSON list of
``{"image_path", "gt_response"}``). Captions are free prose, sometimes markdown bullets, with
boxes written inline as ``[[x1, y1, x2, y2]]`` normalised to [0, 1] of the image width and
height; :func:`parse_pancap_boxes` extracts each box with the phrase it follows.

Model-side text (ASMv2 / PancapChain) writes ``tag <box>[[x1, y1, x2, y2]]</box>`` with
integers on a 0-1000 grid of the image padded to a square: :func:`parse_tagged_boxes` reads
it and :func:`grid_box_to_normalized` converts such a box to the ground-truth form.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence

from pix2cap.data.datasets.coco_panoptic import read_json_file
from pix2cap.data.errors import DatasetError

__all__ = [
    "load_sapancap",
    "parse_pancap_boxes",
    "parse_tagged_boxes",
    "format_box",
    "rewrite_pancap_boxes",
    "grid_box_to_normalized",
]

logger = logging.getLogger(__name__)

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_VALID_BOX_RE = re.compile(
    r"\[\[\s*("
    + _NUMBER
    + r")\s*,\s*("
    + _NUMBER
    + r")\s*,\s*("
    + _NUMBER
    + r")\s*,\s*("
    + _NUMBER
    + r")\s*\]\]"
)
# Any double-bracket group, well-formed or not: malformed ones are skipped but still end the
# phrase before them, so a later box never swallows a broken one into its phrase.
_BRACKET_GROUP_RE = re.compile(r"\[\[[^\[\]]*\]\]")
# Where a phrase starts: after a sentence end (not a decimal point), a newline, a comma,
# semicolon or colon.
_PHRASE_DELIMITER_RE = re.compile(r"[.!?](?=\s|$)|[\n,;:]")
# Markdown list markers and emphasis at the start of a phrase: "- ", "* ", "1. ", "**".
_LEADING_MARKUP_RE = re.compile(r"(?:\s*(?:[-*+\u2022]|\d+[.)])\s+)?[\s*_\"'(\[]*")
_TRAILING_MARKUP_RE = re.compile(r"[\s*_\"'(\[]*$")


def _phrase_span(text: str, lo: int, hi: int) -> tuple[int, int]:
    """Span of the phrase that ends right before ``hi`` and starts after the last delimiter
    in ``text[lo:hi]``, with list markers, emphasis, quotes and spaces trimmed."""
    start = lo
    for m in _PHRASE_DELIMITER_RE.finditer(text, lo, hi):
        start = m.end()
    lead = _LEADING_MARKUP_RE.match(text, start, hi)
    start = lead.end() if lead else start
    trail = _TRAILING_MARKUP_RE.search(text[start:hi])
    end = start + trail.start() if trail else hi
    return start, max(start, end)


def parse_pancap_boxes(text: str) -> list[dict]:
    """Every ``[[x1, y1, x2, y2]]`` box of an SA-Pancap caption, with the phrase it follows.

    The phrase is the text between the previous delimiter -- a sentence end, a newline, a
    markdown bullet, a comma, semicolon or colon, or the previous box -- and the box, e.g.
    ``"The woman [[0.307, 0.213, 0.743, 0.886]] is ..."`` gives ``"The woman"``. Numbers may be
    ints or floats with any spacing; a malformed bracket group (wrong count, non-numbers) is
    skipped.

    Returns:
        ``[{"phrase", "box", "start", "end", "box_start", "box_end"}]`` in text order: ``box``
        four floats as written; ``text[start:end] == phrase`` (may be empty) and
        ``text[box_start:box_end]`` is the bracket group.
    """
    results: list[dict] = []
    previous_end = 0
    for group in _BRACKET_GROUP_RE.finditer(text):
        valid = _VALID_BOX_RE.fullmatch(group.group(0))
        if valid is not None:
            start, end = _phrase_span(text, previous_end, group.start())
            results.append(
                {
                    "phrase": text[start:end],
                    "box": [float(v) for v in valid.groups()],
                    "start": start,
                    "end": end,
                    "box_start": group.start(),
                    "box_end": group.end(),
                }
            )
        previous_end = group.end()
    return results


_TAGGED_BOX_RE = re.compile(r"<box>\s*(\[\[[^\[\]]*\]\])\s*</box>")
_TAG_DELIMITER_RE = re.compile(r"</box>|[\n,;]")


def _number(token: str) -> int | float:
    value = float(token)
    return int(value) if re.fullmatch(r"[-+]?\d+", token.strip()) else value


def parse_tagged_boxes(text: str) -> list[dict]:
    """Every ``tag <box>[[x1, y1, x2, y2]]</box>`` item of model-side (PancapChain) text.

    The tag is the text between the previous item (or a comma, semicolon, newline, or the
    start) and ``<box>``; it is ``""`` for stage-1 output (``<box>[[...]]</box>, ...``).
    Malformed boxes are skipped.

    Returns:
        ``[{"tag", "box", "start", "end"}]``: ``box`` the four numbers as written (ints on the
        0-1000 grid stay ints), ``text[start:end] == tag``.
    """
    results: list[dict] = []
    previous_end = 0
    for m in _TAGGED_BOX_RE.finditer(text):
        valid = _VALID_BOX_RE.fullmatch(m.group(1))
        if valid is not None:
            start = previous_end
            for d in _TAG_DELIMITER_RE.finditer(text, previous_end, m.start()):
                start = d.end()
            segment = text[start : m.start()]
            stripped = segment.strip()
            start += len(segment) - len(segment.lstrip())
            results.append(
                {
                    "tag": stripped,
                    "box": [_number(v) for v in valid.groups()],
                    "start": start,
                    "end": start + len(stripped),
                }
            )
        previous_end = m.end()
    return results


def format_box(box: Sequence[float]) -> str:
    """``[x1, y1, x2, y2]`` in SA-Pancap's written form: ``"[[0.102, 0.200, 0.398, 0.502]]"``."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers, got {len(box)}: {box!r}")
    return "[[" + ", ".join(f"{float(v):.3f}" for v in box) + "]]"


def rewrite_pancap_boxes(text: str, transform: Callable[[list[float]], Sequence[float]]) -> str:
    """``text`` with every valid ``[[x1, y1, x2, y2]]`` box replaced by
    ``format_box(transform(box))`` (e.g. mirrored for a horizontal flip); the rest unchanged."""
    pieces: list[str] = []
    cursor = 0
    for item in parse_pancap_boxes(text):
        pieces.append(text[cursor : item["box_start"]])
        pieces.append(format_box(transform(list(item["box"]))))
        cursor = item["box_end"]
    pieces.append(text[cursor:])
    return "".join(pieces)


def grid_box_to_normalized(
    box: Sequence[float], width: int, height: int, grid: int = 1000
) -> list[float]:
    """A model-side box on a ``grid`` x ``grid`` canvas of the image padded to a square ->
    ``[x1, y1, x2, y2]`` normalised to [0, 1] of the unpadded image, rounded to 3 decimals.

    The padding is split equally on both sides of the short axis (as ASMv2 pads).
    """
    side = max(width, height)
    scale = side / grid
    pad_x = (side - width) / 2
    pad_y = (side - height) / 2
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    out = [(x1 - pad_x) / width, (y1 - pad_y) / height, (x2 - pad_x) / width, (y2 - pad_y) / height]
    return [round(min(1.0, max(0.0, v)), 3) for v in out]


def _normalize_relpath(path: str) -> str:
    return os.path.normpath(path.replace("\\", "/"))


def load_sapancap(
    data_list_file: str | os.PathLike,
    image_root: str | os.PathLike,
    gt_caption_file: str | os.PathLike | None = None,
) -> list[dict]:
    """Load an SA-Pancap split.

    Args:
        data_list_file: JSON list of image paths relative to ``image_root``.
        image_root: the data root (holding ``sam/sa_0000xx/...``).
        gt_caption_file: optional JSON list of ``{"image_path", "gt_response"}``, matched to
            the data list by ``image_path``.

    Returns:
        One dict per listed image: ``file_name``, ``image_id`` (the relative path), and with a
        ground truth ``panoptic_caption`` (str) and ``panoptic_caption_boxes``
        (:func:`parse_pancap_boxes`). No ``height``/``width``: the files do not record them.

    Raises:
        DatasetError: unreadable/invalid JSON, a data list that is not a list of strings, a
            duplicate path, a ground-truth entry without ``image_path`` or ``gt_response`` or
            given twice, a listed image missing on disk.
    """
    data_list_file = os.fspath(data_list_file)
    image_root = os.path.abspath(os.fspath(image_root))
    paths = read_json_file(data_list_file, "data list")
    if not isinstance(paths, list):
        raise DatasetError(
            data_list_file, f"a data list must be a JSON list of paths, got {type(paths).__name__}"
        )
    seen: set[str] = set()
    dataset_dicts: list[dict] = []
    missing: list[str] = []
    for i, rel in enumerate(paths):
        if not isinstance(rel, str) or not rel.strip():
            raise DatasetError(
                data_list_file, f"entry [{i}] is not a non-empty path string: {rel!r}"
            )
        key = _normalize_relpath(rel)
        if key in seen:
            raise DatasetError(data_list_file, f"entry [{i}]: path {rel!r} is listed twice")
        seen.add(key)
        file_name = os.path.join(image_root, rel)
        if not os.path.isfile(file_name):
            missing.append(rel)
        dataset_dicts.append({"file_name": file_name, "image_id": rel, "image_path": rel})
    if missing:
        listed = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DatasetError(
            data_list_file,
            f"{len(missing)} image files named in it are missing under {image_root}: {listed}",
        )

    if gt_caption_file is not None:
        gt_caption_file = os.fspath(gt_caption_file)
        entries = read_json_file(gt_caption_file, "ground-truth caption file")
        if not isinstance(entries, list):
            raise DatasetError(gt_caption_file, "a ground-truth caption file must be a JSON list")
        captions: dict[str, str] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise DatasetError(gt_caption_file, f"entry [{i}] is not a JSON object")
            for k in ("image_path", "gt_response"):
                if k not in entry:
                    raise DatasetError(gt_caption_file, f"entry [{i}] has no key {k!r}")
            if not isinstance(entry["gt_response"], str):
                raise DatasetError(gt_caption_file, f"entry [{i}]: 'gt_response' is not a string")
            key = _normalize_relpath(str(entry["image_path"]))
            if key in captions:
                raise DatasetError(
                    gt_caption_file, f"entry [{i}]: a second caption for {entry['image_path']!r}"
                )
            captions[key] = entry["gt_response"]
        num_without = 0
        for record in dataset_dicts:
            caption = captions.pop(_normalize_relpath(record["image_id"]), None)
            if caption is None:
                num_without += 1
                continue
            record["panoptic_caption"] = caption
            record["panoptic_caption_boxes"] = parse_pancap_boxes(caption)
        if num_without:
            logger.warning(
                "%d images of %s have no ground-truth caption in %s",
                num_without,
                data_list_file,
                gt_caption_file,
            )
        if captions:
            logger.warning(
                "Ignored %d captions of %s whose image is not in %s",
                len(captions),
                gt_caption_file,
                data_list_file,
            )
    logger.info("Loaded %d images from %s", len(dataset_dicts), data_list_file)
    return dataset_dicts
