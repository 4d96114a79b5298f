"""COCONut-PanCap: COCO-style panoptic annotations plus one grounded caption per image.

Each image's caption is prose with inline ``<ids:phrase>`` tags linking a phrase to panoptic
segments; :func:`pix2cap.data.caption_formats.parse_grounded_caption` reads them and explains
the tag forms and how a tag's ids are resolved to segment ids (per tag). A caption whose tags
had to be read under different id conventions is a guess: each such image is named in a
warning (the first few; the rest at debug level) and counted in the log.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pix2cap.data.caption_formats import CONVENTIONS, parse_grounded_caption
from pix2cap.data.datasets.coco_panoptic import load_panoptic_annotations, read_json_file
from pix2cap.data.errors import DatasetError

__all__ = ["load_coconut_pancap_json", "CAPTION_KEYS"]

logger = logging.getLogger(__name__)

#: Annotation keys that may hold an image's grounded caption, in order of preference.
CAPTION_KEYS = ("grounded_caption", "caption", "pancap", "description")
# Images with mixed-convention captions named at warning level; the rest go to debug.
_MIXED_WARNINGS = 5
# Tags listed per image in that message.
_TAGS_SHOWN = 8


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
        ids, captions per caption-level convention (``captions_<convention>``),
        ``captions_mixed_id_conventions`` (captions whose colon tags were read under
        different conventions) and ``images_without_caption``.
    """
    json_file = os.fspath(json_file)
    dataset_dicts, raw_annotations = load_panoptic_annotations(
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
        if parsed["mixed_id_conventions"]:
            stats["captions_mixed_id_conventions"] += 1
            _log_mixed(caption_file or json_file, record, parsed, stats)

    stats_dict = {k: int(v) for k, v in sorted(stats.items())}
    for k in (
        *CONVENTIONS,
        "unresolved",
        "unresolved_ids",
        "captions_mixed_id_conventions",
        "images_without_caption",
    ):
        stats_dict.setdefault(k, 0)
    logger.info(
        "Grounding tags of %s: %d as segment ids, %d as 0-based indices, %d as 1-based indices, "
        "%d unresolved (%d ids); %d captions mix id conventions; %d images without caption",
        caption_file or json_file,
        stats_dict["segment_id"],
        stats_dict["index0"],
        stats_dict["index1"],
        stats_dict["unresolved"],
        stats_dict["unresolved_ids"],
        stats_dict["captions_mixed_id_conventions"],
        stats_dict["images_without_caption"],
    )
    if stats_dict["captions_mixed_id_conventions"] > _MIXED_WARNINGS:
        logger.warning(
            "%s: %d captions mix grounding-tag id conventions (%d named above, all at debug "
            "level); check their groundings",
            caption_file or json_file,
            stats_dict["captions_mixed_id_conventions"],
            _MIXED_WARNINGS,
        )
    logger.info("Loaded %d images from %s", len(dataset_dicts), json_file)
    if return_stats:
        return dataset_dicts, stats_dict
    return dataset_dicts


def _log_mixed(path: str, record: dict, parsed: dict, stats: Counter) -> None:
    """Name an image whose caption's colon tags were read under different id conventions."""
    readings = {"segment_id": "segment id", "index0": "0-based index", "index1": "1-based index"}
    resolved = [p for p in parsed["phrases"] if p["segment_ids"]]
    tags = ", ".join(
        f"{p['phrase']!r} ({','.join(map(str, p['tag_ids']))} as {readings[p['convention']]})"
        for p in resolved[:_TAGS_SHOWN]
    ) + (f", ... ({len(resolved) - _TAGS_SHOWN} more)" if len(resolved) > _TAGS_SHOWN else "")
    level = (
        logging.WARNING
        if stats["captions_mixed_id_conventions"] <= _MIXED_WARNINGS
        else logging.DEBUG
    )
    logger.log(
        level,
        "%s: image_id %r (%s): its grounding tags mix id conventions, each tag was read on its "
        "own: %s",
        path,
        record["image_id"],
        os.path.basename(record["file_name"]),
        tags,
    )
