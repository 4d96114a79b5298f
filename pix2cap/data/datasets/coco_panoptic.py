"""Loader for COCO panoptic JSON files, and for Pix2Cap-COCO (COCO panoptic + one caption per
segment in ``segments_info[i]["description"]``).

The JSON holds ``images`` (``id``, ``file_name``, ``height``, ``width``), ``annotations``
(``image_id``, ``file_name`` of the PNG, ``segments_info``) and ``categories`` (``id``, ``name``,
``isthing``, ``color``). The loader checks the file's structure and that every image and PNG it
names exists, and raises :class:`~pix2cap.data.errors.DatasetError` naming the file and the
problem otherwise. It does not open images or PNGs: reading pixels is the mapper's job.

Category ids are mapped to contiguous class indices ``[0, K)``: things first, then stuff, each
in the order of the ``categories`` list (for COCO this is the JSON order). The original id is
kept as ``segments_info[i]["dataset_category_id"]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pix2cap.data.errors import DatasetError

__all__ = [
    "load_coco_panoptic_json",
    "load_panoptic_annotations",
    "build_panoptic_metadata",
    "read_json_file",
    "MIN_DESCRIPTION_CHARS",
]

logger = logging.getLogger(__name__)

#: Pix2Cap-COCO treats a description shorter than this (after stripping spaces) as empty.
MIN_DESCRIPTION_CHARS = 3

# Segment keys the loader interprets itself; any other key of a segment (e.g. structured
# attributes written by the shapes generator) is copied through unchanged.
_SEGMENT_KEYS_HANDLED = {"id", "category_id", "iscrowd", "area", "bbox", "description", "isthing"}

# How many missing files an error message lists before saying "and N more".
_MAX_LISTED = 5


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse the JSON file ``path``; raise :class:`DatasetError` if it is missing or invalid.

    ``what`` names the file's role in the message (e.g. ``"panoptic annotation file"``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(path, f"{what} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            path, f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"{what} cannot be read ({e})") from e


def _require(record: Mapping, key: str, path: str, where: str) -> Any:
    """``record[key]``, or a :class:`DatasetError` saying which key is missing from which record."""
    if not isinstance(record, Mapping):
        raise DatasetError(path, f"{where} is not a JSON object (got {type(record).__name__})")
    if key not in record:
        raise DatasetError(path, f"{where} has no key {key!r}")
    return record[key]


def _missing_files_error(json_file: str, kind: str, root: str, missing: list[str]) -> DatasetError:
    listed = ", ".join(missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return DatasetError(
        json_file, f"{len(missing)} {kind} named in it are missing under {root}: {listed}{more}"
    )


def build_panoptic_metadata(categories: Sequence[Mapping]) -> dict[str, Any]:
    """Class metadata (detectron2 panoptic conventions) from COCO-style category dicts.

    Contiguous index: things first, then stuff, each in the given order. As in detectron2 /
    Mask2Former, ``stuff_classes`` lists ALL classes (index = contiguous id) and
    ``stuff_dataset_id_to_contiguous_id`` maps every dataset id, while ``thing_classes`` /
    ``thing_dataset_id_to_contiguous_id`` hold the things only (their contiguous ids are the
    first ``len(thing_classes)`` indices).

    Returns a dict with ``thing_classes``, ``stuff_classes``, ``thing_colors``,
    ``stuff_colors``, ``thing_dataset_id_to_contiguous_id``,
    ``stuff_dataset_id_to_contiguous_id``, ``categories`` (ordered by contiguous id, each a copy
    of the input dict), ``ignore_label`` (255) and ``label_divisor`` (1000).
    """
    things = [dict(c) for c in categories if int(c.get("isthing", 0)) == 1]
    stuff = [dict(c) for c in categories if int(c.get("isthing", 0)) != 1]
    ordered = things + stuff
    colors = [list(c.get("color", (0, 0, 0))) for c in ordered]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": colors[: len(things)],
        "stuff_classes": [c["name"] for c in ordered],
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(things)},
        "stuff_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(ordered)},
        "categories": ordered,
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def _category_maps(
    json_file: str, data: Mapping, meta: Mapping | Any | None
) -> tuple[dict[int, int], set[int], list[str]]:
    """(dataset id -> contiguous id, dataset ids of things, class names by contiguous id)."""
    stuff_map = meta.get("stuff_dataset_id_to_contiguous_id") if meta is not None else None
    if stuff_map:
        thing_map = meta.get("thing_dataset_id_to_contiguous_id") or {}
        all_map = {int(k): int(v) for k, v in stuff_map.items()}
        all_map.update({int(k): int(v) for k, v in thing_map.items()})
        names = list(meta.get("stuff_classes") or [])
        if len(names) <= max(all_map.values()):
            # Metadata without class names: number the classes so fallbacks stay readable.
            names = [str(i) for i in range(max(all_map.values()) + 1)]
        return all_map, {int(k) for k in thing_map}, names
    categories = _require(data, "categories", json_file, "the top-level object")
    if not isinstance(categories, list) or not categories:
        raise DatasetError(json_file, "'categories' must be a non-empty list")
    for i, cat in enumerate(categories):
        for key in ("id", "name"):
            _require(cat, key, json_file, f"categories[{i}]")
    ids = [int(c["id"]) for c in categories]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DatasetError(json_file, f"duplicate category ids in 'categories': {dup}")
    built = build_panoptic_metadata(categories)
    return (
        built["stuff_dataset_id_to_contiguous_id"],
        set(built["thing_dataset_id_to_contiguous_id"]),
        built["stuff_classes"],
    )


def load_panoptic_annotations(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    panoptic_root: str | os.PathLike,
    meta: Mapping | Any | None,
    *,
    with_descriptions: bool,
    drop_empty_descriptions: bool,
) -> tuple[list[dict], list[Mapping]]:
    """Load a COCO-panoptic-style JSON and keep each image's annotation object.

    The body of :func:`load_coco_panoptic_json`, for loaders of formats that add per-image keys
    to COCO panoptic annotations (COCONut-PanCap's captions). Arguments and checks are those of
    :func:`load_coco_panoptic_json`.

    Returns:
        ``(dataset_dicts, raw_annotations)``: the dataset dicts, and for each of them (same
        order) the ``annotations[i]`` object of the JSON it came from.
    """
    json_file = os.fspath(json_file)
    # The contract promises absolute paths: a relative root is taken from the current folder.
    image_root = os.path.abspath(os.fspath(image_root))
    panoptic_root = os.path.abspath(os.fspath(panoptic_root))
    data = read_json_file(json_file, "panoptic annotation file")
    if not isinstance(data, Mapping):
        raise DatasetError(
            json_file, f"the top-level value must be a JSON object, got {type(data).__name__}"
        )
    images = _require(data, "images", json_file, "the top-level object")
    annotations = _require(data, "annotations", json_file, "the top-level object")
    if not isinstance(images, list):
        raise DatasetError(json_file, "'images' must be a list")
    if not isinstance(annotations, list):
        raise DatasetError(json_file, "'annotations' must be a list")
    id_map, thing_ids, class_names = _category_maps(json_file, data, meta)

    image_by_id: dict[Any, Mapping] = {}
    for i, img in enumerate(images):
        for key in ("id", "file_name", "height", "width"):
            _require(img, key, json_file, f"images[{i}]")
        if img["id"] in image_by_id:
            raise DatasetError(
                json_file, f"images[{i}]: image id {img['id']!r} appears twice in 'images'"
            )
        image_by_id[img["id"]] = img

    dataset_dicts: list[dict] = []
    raw_annotations: list[Mapping] = []
    seen_images: set[Any] = set()
    missing_images: list[str] = []
    missing_pngs: list[str] = []
    num_dropped_empty = 0
    num_fallback_descriptions = 0
    for a, ann in enumerate(annotations):
        where = f"annotations[{a}]"
        image_id = _require(ann, "image_id", json_file, where)
        png_name = _require(ann, "file_name", json_file, where)
        segments = _require(ann, "segments_info", json_file, where)
        where = f"{where} (image_id {image_id!r})"
        if image_id not in image_by_id:
            raise DatasetError(json_file, f"{where} refers to an image that is not in 'images'")
        if image_id in seen_images:
            raise DatasetError(json_file, f"{where}: a second annotation for the same image")
        seen_images.add(image_id)
        if not isinstance(segments, list):
            raise DatasetError(json_file, f"{where}: 'segments_info' must be a list")

        segments_info: list[dict] = []
        segment_ids: set[int] = set()
        has_empty_description = False
        for s, seg in enumerate(segments):
            seg_where = f"{where} segments_info[{s}]"
            seg_id = int(_require(seg, "id", json_file, seg_where))
            dataset_cat = int(_require(seg, "category_id", json_file, seg_where))
            if seg_id in segment_ids:
                raise DatasetError(json_file, f"{where}: duplicate segment id {seg_id}")
            segment_ids.add(seg_id)
            if dataset_cat not in id_map:
                raise DatasetError(
                    json_file,
                    f"{seg_where}: unknown category id {dataset_cat} (not in the categories)",
                )
            contiguous = id_map[dataset_cat]
            out = {
                "id": seg_id,
                "category_id": contiguous,
                "dataset_category_id": dataset_cat,
                "isthing": dataset_cat in thing_ids,
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
            if "area" in seg:
                out["area"] = seg["area"]
            if "bbox" in seg:
                out["bbox"] = list(seg["bbox"])
            out.update((k, v) for k, v in seg.items() if k not in _SEGMENT_KEYS_HANDLED)
            if with_descriptions:
                description = _require(seg, "description", json_file, seg_where)
                if not isinstance(description, str):
                    raise DatasetError(json_file, f"{seg_where}: 'description' must be a string")
                description = description.strip()
                if len(description) < MIN_DESCRIPTION_CHARS:
                    has_empty_description = True
                    # The official rule: an empty description may be replaced by the class name.
                    description = class_names[contiguous]
                    out["description_is_class_name"] = True
                    num_fallback_descriptions += 1
                out["description"] = description
            segments_info.append(out)

        if with_descriptions and drop_empty_descriptions and has_empty_description:
            num_dropped_empty += 1
            continue

        img = image_by_id[image_id]
        file_name = os.path.join(image_root, img["file_name"])
        pan_seg_file_name = os.path.join(panoptic_root, png_name)
        if not os.path.isfile(file_name):
            missing_images.append(img["file_name"])
        if not os.path.isfile(pan_seg_file_name):
            missing_pngs.append(png_name)
        dataset_dicts.append(
            {
                "file_name": file_name,
                "image_id": image_id,
                "height": int(img["height"]),
                "width": int(img["width"]),
                "pan_seg_file_name": pan_seg_file_name,
                "segments_info": segments_info,
            }
        )
        raw_annotations.append(ann)

    if missing_images:
        raise _missing_files_error(json_file, "image files", image_root, missing_images)
    if missing_pngs:
        raise _missing_files_error(json_file, "panoptic PNG files", panoptic_root, missing_pngs)
    num_unannotated = len(image_by_id) - len(seen_images)
    if num_unannotated:
        logger.warning(
            "Skipped %d images of %s that have no annotation", num_unannotated, json_file
        )
    if num_dropped_empty:
        logger.info(
            "Skipped %d images of %s with an empty (<%d chars) segment description",
            num_dropped_empty,
            json_file,
            MIN_DESCRIPTION_CHARS,
        )
    elif num_fallback_descriptions:
        logger.info(
            "Replaced %d empty (<%d chars) segment descriptions of %s by the class name",
            num_fallback_descriptions,
            MIN_DESCRIPTION_CHARS,
            json_file,
        )
    return dataset_dicts, raw_annotations


def load_coco_panoptic_json(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    panoptic_root: str | os.PathLike,
    meta: Mapping | Any | None = None,
    *,
    with_descriptions: bool = False,
    drop_empty_descriptions: bool = False,
) -> list[dict]:
    """Load a COCO panoptic (or Pix2Cap-COCO) JSON file into pix2cap's dataset dicts.

    Args:
        json_file: the panoptic JSON (``panoptic_val2017.json``, ``pix2cap_coco_train.json``...).
        image_root: folder holding the RGB images named by ``images[i]["file_name"]``.
        panoptic_root: folder holding the PNGs named by ``annotations[i]["file_name"]``.
        meta: optional metadata (a dict or :class:`~pix2cap.data.catalog.Metadata`) with
            ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id`` (all
            classes); when absent, the mapping is built from the JSON's ``categories`` with
            :func:`build_panoptic_metadata`.
        with_descriptions: read ``segments_info[i]["description"]`` (Pix2Cap-COCO); every segment
            must then have one. A description shorter than 3 characters is replaced by the class
            name (``description_is_class_name: True`` marks it) ...
        drop_empty_descriptions: ... unless this is set, in which case the whole image is
            skipped, as the official Pix2Cap-COCO training loader does.

    Returns:
        One dict per annotated image, keys as documented in :mod:`pix2cap.data.datasets`
        (``file_name``, ``image_id``, ``height``, ``width``, ``pan_seg_file_name``,
        ``segments_info``), in the order of ``annotations``.

    Raises:
        DatasetError: unreadable or invalid JSON; a missing top-level, image, annotation or
            segment key; an annotation for an image absent from ``images``; an unknown category
            id; a duplicate segment id; a missing image or PNG file.
    """
    dataset_dicts, _ = load_panoptic_annotations(
        json_file,
        image_root,
        panoptic_root,
        meta,
        with_descriptions=with_descriptions,
        drop_empty_descriptions=drop_empty_descriptions,
    )
    logger.info("Loaded %d images from %s", len(dataset_dicts), os.fspath(json_file))
    return dataset_dicts
