"""SA-Pancap (Panoptic Captioning): SA-1B images with one hyper-detailed caption each.

Files: a data list (JSON list of image paths relative to the data root, e.g.
``"sam/sa_000005/sa_62400.jpg"``) and, for val/test, a ground-truth file (JSON list of
``{"image_path", "gt_response"}``). Captions are free prose, sometimes markdown bullets, with
boxes written inline as ``[[x1, y1, x2, y2]]`` normalised to [0, 1] of the image width and
height; :func:`pix2cap.data.caption_formats.parse_pancap_boxes` extracts each box with the
phrase it follows.

Boxes are validated as the captions load (:func:`~pix2cap.data.caption_formats.check_pancap_boxes`):
a box must be four finite numbers, inside [0, 1] up to ``BOX_TOLERANCE`` (1e-3; coordinates
within it are clamped) and ordered (``x1 <= x2``, ``y1 <= y2``). A rejected box is removed from
the caption text as well as from ``panoptic_caption_boxes``: everything downstream (mirroring
for a flip, the language model's grid targets, PancapScore's ground truth) re-reads the boxes
from the text, so a box kept there would come back. Its phrase stays in the text (the next
box's phrase may then reach back over it). Every rejected box is counted per reason in one
warning that names the file (with the first few as examples); each one is logged at debug
level with its image.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping

from pix2cap.data.caption_formats import (
    BOX_PROBLEMS,
    BOX_TOLERANCE,
    check_pancap_boxes,
    parse_pancap_boxes,
)
from pix2cap.data.datasets.coco_panoptic import read_json_file
from pix2cap.data.errors import DatasetError

__all__ = ["load_sapancap"]

logger = logging.getLogger(__name__)

# Rejected boxes quoted as examples in the summary warning.
_EXAMPLES = 3


def _normalize_relpath(path: str) -> str:
    return os.path.normpath(path.replace("\\", "/"))


def load_sapancap(
    data_list_file: str | os.PathLike,
    image_root: str | os.PathLike,
    gt_caption_file: str | os.PathLike | None = None,
    *,
    return_stats: bool = False,
) -> list[dict] | tuple[list[dict], dict]:
    """Load an SA-Pancap split.

    Args:
        data_list_file: JSON list of image paths relative to ``image_root``.
        image_root: the data root (holding ``sam/sa_0000xx/...``).
        gt_caption_file: optional JSON list of ``{"image_path", "gt_response"}``, matched to
            the data list by ``image_path``.
        return_stats: also return the box counts.

    Returns:
        One dict per listed image: ``file_name``, ``image_id`` (the relative path), and with a
        ground truth ``panoptic_caption`` (str, without rejected boxes; see the module doc)
        and ``panoptic_caption_boxes`` (:func:`parse_pancap_boxes` of it). No
        ``height``/``width``: the files do not record them. With ``return_stats``,
        ``(dicts, stats)``: ``boxes`` kept, ``clamped`` among them, ``rejected`` and
        ``rejected_<reason>`` per reason of :data:`~pix2cap.data.caption_formats.BOX_PROBLEMS`,
        ``captions_with_rejected_boxes``.

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

    box_stats: Counter = Counter()
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
        examples: list[str] = []
        for record in dataset_dicts:
            caption = captions.pop(_normalize_relpath(record["image_id"]), None)
            if caption is None:
                num_without += 1
                continue
            caption, issues = check_pancap_boxes(caption)
            record["panoptic_caption"] = caption
            record["panoptic_caption_boxes"] = parse_pancap_boxes(caption)
            box_stats["boxes"] += len(record["panoptic_caption_boxes"])
            rejected = [issue for issue in issues if issue["reason"] != "clamped"]
            box_stats["clamped"] += len(issues) - len(rejected)
            box_stats["captions_with_rejected_boxes"] += bool(rejected)
            for issue in rejected:
                box_stats["rejected"] += 1
                box_stats[f"rejected_{issue['reason']}"] += 1
                detail = f"{record['image_id']}: {issue['literal']} ({issue['reason']})"
                if len(examples) < _EXAMPLES:
                    examples.append(detail)
                logger.debug("%s: box rejected and removed, %s", gt_caption_file, detail)
        _log_box_stats(gt_caption_file, box_stats, examples)
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
    if return_stats:
        stats = {"boxes": 0, "clamped": 0, "rejected": 0, "captions_with_rejected_boxes": 0}
        stats.update({f"rejected_{reason}": 0 for reason in BOX_PROBLEMS})
        stats.update(box_stats)
        return dataset_dicts, stats
    return dataset_dicts


def _log_box_stats(gt_caption_file: str, stats: Counter, examples: list[str]) -> None:
    """One warning with the rejected boxes per reason (and the first few), one info line for
    the clamped ones."""
    if stats["rejected"]:
        reasons = ", ".join(
            f"{stats[f'rejected_{reason}']} {reason} ({meaning})"
            for reason, meaning in BOX_PROBLEMS.items()
            if stats[f"rejected_{reason}"]
        )
        logger.warning(
            "%s: rejected %d of %d boxes in %d captions: %s; they are removed from "
            "panoptic_caption and panoptic_caption_boxes. First: %s",
            gt_caption_file,
            stats["rejected"],
            stats["rejected"] + stats["boxes"],
            stats["captions_with_rejected_boxes"],
            reasons,
            "; ".join(examples),
        )
    if stats["clamped"]:
        logger.info(
            "%s: clamped %d boxes to [0, 1] (coordinates at most %g outside)",
            gt_caption_file,
            stats["clamped"],
            BOX_TOLERANCE,
        )
