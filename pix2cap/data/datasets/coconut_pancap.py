"""COCONut-PanCap: COCO-style panoptic annotations plus one grounded caption per image.

A grounded caption is prose with inline tags linking a phrase to panoptic segments::

    ... the region represents <0:a serving of French fries>. The upper left side shows
    <1: a slice of onion>.

Tag forms accepted by :func:`parse_grounded_caption` (real files mix them):

* ``<ids:phrase>`` -- ``ids`` one or more integers separated by commas, spaces allowed anywhere
  around ids, commas and the colon (``<6,7,8:eight boys>``, ``< 2 , 3 :x>``); the phrase is
  stripped of surrounding spaces.
* ``<ids>phrase>`` -- no colon; in the real files this form always counts from 0 over
  ``segments_info`` (about 4% of the captions).
* Anything else that looks like a tag -- an unclosed ``<``, a stray ``>``, ``<3:>`` with no
  phrase, ``<a:b>`` with non-numeric ids -- is ordinary text and kept as written.

Which number a colon tag's id means is decided once per caption (the *convention*), given the
image's segment ids in ``segments_info`` order:

1. ``"segment_id"``: every id of every colon tag is a segment id of the PNG;
2. else ``"index0"``: every id is in ``[0, n)``, a 0-based position in ``segments_info``
   (an id 0 can never be a segment id, as 0 is VOID);
3. else ``"index1"``: every id is in ``[1, n]``, a 1-based position;
4. else, when no convention explains every id, the one resolving the most ids (ties in the
   order above); ids it cannot resolve are dropped and counted as unresolved.

``<ids>phrase>`` tags always use ``"index0"``. A caption's ``convention`` is the one all its
tags used, ``"mixed"`` if colon and no-colon tags used different ones, ``"none"`` without tags,
and ``"unresolved"`` when no segment ids were given (colon ids are then taken as segment ids
unchecked, no-colon tags stay ungrounded). A tag none of whose ids resolves keeps its phrase in
the text and in ``phrases``, with ``segment_ids == []``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pix2cap.data.datasets.coco_panoptic import _load_panoptic, read_json_file
from pix2cap.data.errors import DatasetError

__all__ = [
    "parse_grounded_caption",
    "load_coconut_pancap_json",
    "CAPTION_KEYS",
    "CONVENTIONS",
]

logger = logging.getLogger(__name__)

#: Annotation keys that may hold an image's grounded caption, in order of preference.
CAPTION_KEYS = ("grounded_caption", "caption", "pancap", "description")

#: Conventions for colon tags, in order of preference when several explain a caption.
CONVENTIONS = ("segment_id", "index0", "index1")

# ``<`` ids (``:`` | ``>``) phrase ``>``; the phrase has no angle brackets and is not blank.
_TAG_RE = re.compile(
    r"<\s*(?P<ids>\d+(?:\s*,\s*\d+)*)\s*(?P<sep>[:>])(?P<phrase>[^<>]*[^<>\s][^<>]*)>"
)


def _resolve(ids: Sequence[int], convention: str, segment_ids: Sequence[int]) -> list[int]:
    """The PNG segment ids ``ids`` denote under ``convention`` (unresolvable ids dropped)."""
    n = len(segment_ids)
    out: list[int] = []
    for i in ids:
        if convention == "segment_id":
            seg = i if i in segment_ids else None
        elif convention == "index0":
            seg = segment_ids[i] if 0 <= i < n else None
        else:  # index1
            seg = segment_ids[i - 1] if 1 <= i <= n else None
        if seg is not None and seg not in out:
            out.append(seg)
    return out


def _choose_convention(colon_ids: list[list[int]], segment_ids: Sequence[int]) -> str:
    """The convention for a caption's colon tags (see the module docstring for the rule)."""
    flat = [i for ids in colon_ids for i in ids]
    resolved_counts = {}
    for convention in CONVENTIONS:
        n_resolved = sum(len(_resolve([i], convention, segment_ids)) for i in flat)
        if n_resolved == len(flat):
            return convention
        resolved_counts[convention] = n_resolved
    # max() keeps the first of equal counts, i.e. the earlier convention in CONVENTIONS.
    return max(CONVENTIONS, key=lambda c: resolved_counts[c])


def parse_grounded_caption(raw: str, segment_ids: Sequence[int] | None = None) -> dict:
    """Parse a COCONut-PanCap caption with ``<ids:phrase>`` / ``<ids>phrase>`` tags.

    Args:
        raw: the caption as stored.
        segment_ids: the image's PNG segment ids in ``segments_info`` order; used to decide the
            id convention and to turn indices into segment ids. ``None``: ids are not checked.

    Returns:
        ``{"raw", "text", "phrases", "convention", "tag_stats"}``: ``text`` is ``raw`` with each
        tag replaced by its phrase; ``phrases`` lists ``{"phrase", "start", "end",
        "segment_ids", "tag_ids", "convention"}`` per tag in reading order, with
        ``text[start:end] == phrase``, ``segment_ids`` the PNG ids it grounds to and
        ``tag_ids`` the numbers as written; ``tag_stats`` counts tags per convention, plus
        ``"unresolved"`` (tags with no resolvable id) and ``"unresolved_ids"``.
    Never raises on odd tags; a non-string ``raw`` raises ``TypeError``.
    """
    if not isinstance(raw, str):
        raise TypeError(f"a grounded caption must be a string, got {type(raw).__name__}")
    matches = list(_TAG_RE.finditer(raw))
    tags = []
    for m in matches:
        ids: list[int] = []
        for token in m.group("ids").split(","):
            value = int(token.strip())
            if value not in ids:
                ids.append(value)
        tags.append((m, ids, m.group("sep") == ":"))

    if segment_ids is not None:
        segment_ids = [int(s) for s in segment_ids]
        colon_convention = _choose_convention([ids for _, ids, colon in tags if colon], segment_ids)

    pieces: list[str] = []
    phrases: list[dict] = []
    stats: Counter = Counter()
    cursor = 0
    length = 0
    for m, ids, colon in tags:
        before = raw[cursor : m.start()]
        pieces.append(before)
        length += len(before)
        phrase = m.group("phrase").strip()
        if segment_ids is None:
            convention = "segment_id" if colon else "index0"
            grounded = list(ids) if colon else []
        else:
            convention = colon_convention if colon else "index0"
            grounded = _resolve(ids, convention, segment_ids)
        stats["unresolved_ids"] += len(ids) - len(grounded)
        stats[convention if grounded else "unresolved"] += 1
        phrases.append(
            {
                "phrase": phrase,
                "start": length,
                "end": length + len(phrase),
                "segment_ids": grounded,
                "tag_ids": ids,
                "convention": convention,
            }
        )
        pieces.append(phrase)
        length += len(phrase)
        cursor = m.end()
    pieces.append(raw[cursor:])

    if not tags:
        caption_convention = "none"
    elif segment_ids is None:
        caption_convention = "unresolved"
    else:
        used = {p["convention"] for p in phrases}
        caption_convention = used.pop() if len(used) == 1 else "mixed"
    return {
        "raw": raw,
        "text": "".join(pieces),
        "phrases": phrases,
        "convention": caption_convention,
        "tag_stats": {k: stats.get(k, 0) for k in (*CONVENTIONS, "unresolved", "unresolved_ids")},
    }


def _read_caption_file(caption_file: str) -> tuple[dict[Any, str], dict[str, str]]:
    """(captions by image id, captions by image file name) from a separate caption file.

    Accepted: a JSON list of ``{"image_id" | "file_name", "caption"}`` (any key of
    :data:`CAPTION_KEYS` for the caption), or a JSON object mapping image id -> caption.
    """
    data = read_json_file(caption_file, "caption file")
    by_id: dict[Any, str] = {}
    by_name: dict[str, str] = {}
    if isinstance(data, Mapping):
        for key, caption in data.items():
            if not isinstance(caption, str):
                raise DatasetError(caption_file, f"the caption of image {key!r} is not a string")
            by_id[key] = caption
            # JSON object keys are strings; allow integer image ids to match too.
            if isinstance(key, str) and key.lstrip("-").isdigit():
                by_id[int(key)] = caption
        return by_id, by_name
    if not isinstance(data, list):
        raise DatasetError(caption_file, "a caption file must be a JSON list or object")
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise DatasetError(caption_file, f"entry [{i}] is not a JSON object")
        caption_key = next((k for k in CAPTION_KEYS if k in entry), None)
        if caption_key is None:
            raise DatasetError(caption_file, f"entry [{i}] has no key 'caption'")
        caption = entry[caption_key]
        if not isinstance(caption, str):
            raise DatasetError(caption_file, f"entry [{i}]: the caption is not a string")
        if "image_id" in entry:
            if entry["image_id"] in by_id:
                raise DatasetError(
                    caption_file,
                    f"entry [{i}]: a second caption for image_id {entry['image_id']!r}",
                )
            by_id[entry["image_id"]] = caption
        elif "file_name" in entry:
            by_name[os.path.basename(str(entry["file_name"]))] = caption
        else:
            raise DatasetError(caption_file, f"entry [{i}] has neither 'image_id' nor 'file_name'")
    return by_id, by_name


def load_coconut_pancap_json(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    panoptic_root: str | os.PathLike,
    meta: Mapping | Any | None = None,
    *,
    caption_file: str | os.PathLike | None = None,
    return_stats: bool = False,
) -> list[dict] | tuple[list[dict], dict]:
    """Load COCONut-PanCap: panoptic annotations (COCO panoptic format) + grounded captions.

    The caption of an image is read from its annotation (the first of :data:`CAPTION_KEYS`
    present) or, when ``caption_file`` is given, from that file (matched by ``image_id``, else
    by the image's file name). Each dict gets ``grounded_caption`` =
    :func:`parse_grounded_caption` of it, with the image's segment ids; images without a
    caption are kept without the key (they still serve panoptic training) and counted in the log.

    Args:
        json_file, image_root, panoptic_root, meta: as in
            :func:`~pix2cap.data.datasets.coco_panoptic.load_coco_panoptic_json`.
        caption_file: optional separate caption file (see :func:`_read_caption_file`).
        return_stats: also return the grounding-tag statistics.

    Returns:
        The dataset dicts, or ``(dataset_dicts, stats)`` if ``return_stats``; ``stats`` counts
        tags per convention (``segment_id``, ``index0``, ``index1``), ``unresolved`` tags and
        ids, captions per caption-level convention (``captions_<convention>``) and
        ``images_without_caption``.
    """
    json_file = os.fspath(json_file)
    dataset_dicts, raw_annotations = _load_panoptic(
        json_file,
        image_root,
        panoptic_root,
        meta,
        with_descriptions=False,
        drop_empty_descriptions=False,
    )
    captions_by_id: dict[Any, str] = {}
    captions_by_name: dict[str, str] = {}
    if caption_file is not None:
        caption_file = os.fspath(caption_file)
        captions_by_id, captions_by_name = _read_caption_file(caption_file)

    stats: Counter = Counter()
    for record, ann in zip(dataset_dicts, raw_annotations):
        if caption_file is not None:
            caption = captions_by_id.get(record["image_id"])
            if caption is None:
                caption = captions_by_name.get(os.path.basename(record["file_name"]))
        else:
            key = next((k for k in CAPTION_KEYS if k in ann), None)
            caption = ann[key] if key is not None else None
            if caption is not None and not isinstance(caption, str):
                raise DatasetError(
                    json_file,
                    f"the caption of image_id {record['image_id']!r} ({key!r}) is not a string",
                )
        if caption is None:
            stats["images_without_caption"] += 1
            continue
        segment_ids = [s["id"] for s in record["segments_info"]]
        parsed = parse_grounded_caption(caption, segment_ids)
        record["grounded_caption"] = parsed
        stats.update(parsed["tag_stats"])
        stats[f"captions_{parsed['convention']}"] += 1

    stats_dict = {k: int(v) for k, v in sorted(stats.items())}
    for k in (*CONVENTIONS, "unresolved", "unresolved_ids", "images_without_caption"):
        stats_dict.setdefault(k, 0)
    logger.info(
        "Grounding tags of %s: %d as segment ids, %d as 0-based indices, %d as 1-based indices, "
        "%d unresolved (%d ids); %d images without caption",
        caption_file or json_file,
        stats_dict["segment_id"],
        stats_dict["index0"],
        stats_dict["index1"],
        stats_dict["unresolved"],
        stats_dict["unresolved_ids"],
        stats_dict["images_without_caption"],
    )
    logger.info("Loaded %d images from %s", len(dataset_dicts), json_file)
    if return_stats:
        return dataset_dicts, stats_dict
    return dataset_dicts
