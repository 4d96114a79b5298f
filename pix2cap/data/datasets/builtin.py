"""Registration of pix2cap's built-in dataset names.

Every name is registered lazily: registration stores a function and the class metadata, and
no file is read (or generated) until ``DatasetCatalog.get(name)`` is called. The datasets root
is ``$PIX2CAP_DATASETS`` (default ``./datasets``), read when a dataset is loaded, so a changed
environment variable takes effect without re-registering; ``register_all_builtin(root)``
pins an explicit root instead. ``datasets/README.md`` shows the expected layout.

=============================  ==============================================================
name                           files under the root
=============================  ==============================================================
coco_2017_{train,val}_panoptic coco/{train,val}2017/, coco/panoptic_{train,val}2017/,
                               coco/annotations/panoptic_{train,val}2017.json
pix2cap_coco_{train,val}       same images and PNGs, coco/annotations/pix2cap_coco_{train,val}.json
coconut_pancap_{train,val}     coco/{train,val}2017/, coconut/panoptic_{train,val}2017/,
                               coconut/annotations/coconut_pancap_{train,val}.json
sapancap_{train,val,test}      sapancap/sam/sa_0000xx/*.jpg,
                               sapancap/sapancap_{split}_data_list.json,
                               sapancap/sapancap_{split}_gtcaption.json (optional for train)
shapes_{train,val}             shapes/ (generated on first use by ``shapes.ensure_shapes``)
shapes_{train,val}_compositional  shapes/ splits without / with the held-out colour-shape pairs
=============================  ==============================================================
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.datasets.coco_categories import COCO_PANOPTIC_CATEGORIES
from pix2cap.data.datasets.coco_panoptic import build_panoptic_metadata, load_coco_panoptic_json
from pix2cap.data.datasets.coconut_pancap import load_coconut_pancap_json
from pix2cap.data.datasets.sapancap import load_sapancap
from pix2cap.data.datasets.shapes import (
    SHAPES_CATEGORIES,
    ensure_shapes,
    read_shapes_meta,
    shapes_split_is_complete,
)
from pix2cap.data.errors import DatasetError

__all__ = [
    "register_all_builtin",
    "get_datasets_root",
    "load_shapes",
    "BUILTIN_DATASETS",
    "SHAPES_HOLDOUT_PAIRS",
]

logger = logging.getLogger(__name__)

#: Colour-shape pairs held out of ``shapes_train_compositional`` and present in every image of
#: ``shapes_val_compositional`` (compositional generalisation of the captioner).
SHAPES_HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "circle"), ("blue", "star"))

# name -> (image dir, panoptic dir, json) relative to the root.
_COCO_PANOPTIC = {
    "coco_2017_train_panoptic": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
    ),
    "coco_2017_val_panoptic": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
    ),
}
# name -> (image dir, panoptic dir, json, drop images with an empty description)
_PIX2CAP_COCO = {
    "pix2cap_coco_train": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/pix2cap_coco_train.json",
        True,
    ),
    "pix2cap_coco_val": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/pix2cap_coco_val.json",
        False,
    ),
}
_COCONUT_PANCAP = {
    "coconut_pancap_train": (
        "coco/train2017",
        "coconut/panoptic_train2017",
        "coconut/annotations/coconut_pancap_train.json",
    ),
    "coconut_pancap_val": (
        "coco/val2017",
        "coconut/panoptic_val2017",
        "coconut/annotations/coconut_pancap_val.json",
    ),
}
_SAPANCAP_SPLITS = ("train", "val", "test")
# name -> (split folder name under shapes/, ensure_shapes keyword arguments)
_SHAPES = {
    "shapes_train": ("train", {}),
    "shapes_val": ("val", {}),
    "shapes_train_compositional": (
        "train_compositional",
        {"num_images": 1000, "holdout_pairs": SHAPES_HOLDOUT_PAIRS, "include_holdout_only": False},
    ),
    "shapes_val_compositional": (
        "val_compositional",
        {"num_images": 100, "holdout_pairs": SHAPES_HOLDOUT_PAIRS, "include_holdout_only": True},
    ),
}


def get_datasets_root(root: str | os.PathLike | None = None) -> str:
    """``root`` if given, else ``$PIX2CAP_DATASETS``, else ``./datasets``; as an absolute path
    (``~`` expanded, a relative path taken from the current folder)."""
    if root is None:
        root = os.environ.get("PIX2CAP_DATASETS") or "datasets"
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def _refresh_metadata(name: str, **values: Any) -> None:
    """Set metadata that depends on the datasets root or on the loaded files (paths, tag
    statistics), replacing earlier values in place so every holder of the ``Metadata`` object
    agrees with the data actually loaded."""
    MetadataCatalog.get(name).replace(**values)


def _coco_class_metadata() -> dict[str, Any]:
    return build_panoptic_metadata(COCO_PANOPTIC_CATEGORIES)


@dataclass(frozen=True)
class _BuiltinDataset:
    """How one built-in name finds and loads its files.

    Attributes:
        paths: datasets root -> the files and folders of the dataset, as metadata
            (``{"image_root": ..., "panoptic_json": ...}``); they follow the root, so they are
            refreshed on every load.
        load: ``(name, paths)`` -> the dataset dicts; it may refresh more metadata of ``name``
            (statistics of the loaded files).
        metadata: the metadata fixed at registration (classes, ``evaluator_type``, ...); a
            function, so every name gets its own lists.
    """

    paths: Callable[[str], dict[str, str]]
    load: Callable[[str, dict[str, str]], list[dict]]
    metadata: Callable[[], dict[str, Any]]


def _register_builtin(name: str, dataset: _BuiltinDataset, root_fn: Callable[[], str]) -> None:
    """Register ``name`` (replacing an earlier registration) to load ``dataset`` from the root
    that ``root_fn`` gives at load time."""

    def load() -> list[dict]:
        paths = dataset.paths(root_fn())
        _refresh_metadata(name, **paths)
        return dataset.load(name, paths)

    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**dataset.metadata())
    _refresh_metadata(name, **dataset.paths(root_fn()))


def _panoptic_paths(root: str, image_dir: str, png_dir: str, json_rel: str) -> dict[str, str]:
    """Image folder, PNG folder and JSON of a COCO-panoptic-style dataset under ``root``."""
    return {
        "image_root": os.path.join(root, image_dir),
        "panoptic_root": os.path.join(root, png_dir),
        "panoptic_json": os.path.join(root, json_rel),
    }


def _load_coco_panoptic(name: str, paths: dict[str, str]) -> list[dict]:
    return load_coco_panoptic_json(
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        MetadataCatalog.get(name),
    )


def _load_pix2cap_coco(name: str, paths: dict[str, str], *, drop_empty: bool) -> list[dict]:
    return load_coco_panoptic_json(
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        MetadataCatalog.get(name),
        with_descriptions=True,
        drop_empty_descriptions=drop_empty,
    )


def _load_coconut_pancap(name: str, paths: dict[str, str]) -> list[dict]:
    dicts, stats = load_coconut_pancap_json(
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        MetadataCatalog.get(name),
        return_stats=True,
    )
    _refresh_metadata(name, grounding_tag_stats=stats)
    return dicts


def _sapancap_paths(root: str, split: str) -> dict[str, str]:
    root = os.path.join(root, "sapancap")
    return {
        "image_root": root,
        "data_list_file": os.path.join(root, f"sapancap_{split}_data_list.json"),
        "gt_caption_file": os.path.join(root, f"sapancap_{split}_gtcaption.json"),
    }


def _load_sapancap(name: str, paths: dict[str, str], *, split: str) -> list[dict]:
    gt = paths["gt_caption_file"]
    if split == "train" and not os.path.isfile(gt):
        # The released train split has no ground-truth file in some versions.
        gt = None
    return load_sapancap(paths["data_list_file"], paths["image_root"], gt)


def _shapes_categories() -> list[dict]:
    return [dict(c) for c in SHAPES_CATEGORIES]


def load_shapes(
    root: str | os.PathLike, split: str, *, return_stats: bool = False
) -> list[dict] | tuple[list[dict], dict]:
    """Load one split of the synthetic shapes dataset, merging its four annotation formats.

    ``root`` is the shapes folder (``images/``, ``panoptic/``, ``annotations/``). Each returned
    dict is the Pix2Cap-COCO record of the image (``segments_info`` with ``description`` and the
    generator's structured fields) plus ``grounded_caption`` from ``coconut_pancap_{split}.json``
    and ``panoptic_caption`` / ``panoptic_caption_boxes`` from the SA-Pancap files.

    Returns the dicts, or ``(dicts, grounding_tag_stats)`` if ``return_stats``.
    Raises ``DatasetError`` if the four files do not describe the same images.
    """
    root = os.fspath(root)
    ann_dir = os.path.join(root, "annotations")
    image_root = os.path.join(root, "images", split)
    panoptic_root = os.path.join(root, "panoptic", split)
    meta = build_panoptic_metadata(_shapes_categories())
    pix2cap_json = os.path.join(ann_dir, f"pix2cap_{split}.json")
    records = load_coco_panoptic_json(
        pix2cap_json, image_root, panoptic_root, meta, with_descriptions=True
    )
    coconut_json = os.path.join(ann_dir, f"coconut_pancap_{split}.json")
    grounded, stats = load_coconut_pancap_json(
        coconut_json, image_root, panoptic_root, meta, return_stats=True
    )
    data_list = os.path.join(ann_dir, f"sapancap_{split}_data_list.json")
    pancap = load_sapancap(
        data_list, root, os.path.join(ann_dir, f"sapancap_{split}_gtcaption.json")
    )

    grounded_by_id = {r["image_id"]: r for r in grounded}
    pancap_by_file = {os.path.normpath(r["file_name"]): r for r in pancap}
    for record in records:
        other = grounded_by_id.get(record["image_id"])
        if other is None:
            raise DatasetError(
                coconut_json, f"no annotation for image_id {record['image_id']!r} of {pix2cap_json}"
            )
        if "grounded_caption" in other:
            record["grounded_caption"] = other["grounded_caption"]
        sa = pancap_by_file.get(os.path.normpath(record["file_name"]))
        if sa is None:
            raise DatasetError(
                data_list, f"{record['file_name']} (in {pix2cap_json}) is not listed"
            )
        record["image_path"] = sa["image_path"]
        if "panoptic_caption" in sa:
            record["panoptic_caption"] = sa["panoptic_caption"]
            record["panoptic_caption_boxes"] = sa["panoptic_caption_boxes"]
    logger.info("Merged the annotations of %d shapes images (split %r)", len(records), split)
    if return_stats:
        return records, stats
    return records


def _shapes_split_ready(root: str, split: str, generate_kwargs: dict) -> bool:
    """Whether ``split`` is complete under ``root`` and usable as the registered name needs.

    A split prepared beforehand (e.g. by ``datasets/prepare_shapes.py`` with another size or
    count) is used as it is; only a compositional split's holdout setting must match.
    """
    if not shapes_split_is_complete(root, split):
        return False
    if "holdout_pairs" not in generate_kwargs:
        return True
    split_meta = read_shapes_meta(root)["splits"][split]
    wanted = {tuple(pair) for pair in generate_kwargs["holdout_pairs"]}
    stored = {tuple(pair) for pair in split_meta.get("holdout_pairs", [])}
    return wanted == stored and bool(split_meta.get("include_holdout_only")) == bool(
        generate_kwargs.get("include_holdout_only")
    )


def _shapes_paths(root: str, split: str) -> dict[str, str]:
    root = os.path.join(root, "shapes")
    return {
        "dataset_root": root,
        "image_root": os.path.join(root, "images", split),
        "panoptic_root": os.path.join(root, "panoptic", split),
        "panoptic_json": os.path.join(root, "annotations", f"panoptic_{split}.json"),
    }


def _load_shapes_split(
    name: str, paths: dict[str, str], *, split: str, generate_kwargs: dict
) -> list[dict]:
    shapes_root = paths["dataset_root"]
    if not _shapes_split_ready(shapes_root, split, generate_kwargs):
        shapes_root = ensure_shapes(shapes_root, split, **generate_kwargs)
    dicts, stats = load_shapes(shapes_root, split, return_stats=True)
    _refresh_metadata(name, grounding_tag_stats=stats)
    return dicts


def _shapes_metadata(generate_kwargs: dict) -> dict[str, Any]:
    metadata = {"evaluator_type": "pix2cap", **build_panoptic_metadata(_shapes_categories())}
    if generate_kwargs.get("holdout_pairs"):
        metadata["holdout_pairs"] = [list(pair) for pair in generate_kwargs["holdout_pairs"]]
    return metadata


def _builtin_datasets() -> dict[str, _BuiltinDataset]:
    """Every built-in name and how it loads, in registration order."""
    datasets: dict[str, _BuiltinDataset] = {}
    for name, (image_dir, png_dir, json_rel) in _COCO_PANOPTIC.items():
        datasets[name] = _BuiltinDataset(
            paths=functools.partial(
                _panoptic_paths, image_dir=image_dir, png_dir=png_dir, json_rel=json_rel
            ),
            load=_load_coco_panoptic,
            metadata=lambda: {"evaluator_type": "coco_panoptic_seg", **_coco_class_metadata()},
        )
    for name, (image_dir, png_dir, json_rel, drop_empty) in _PIX2CAP_COCO.items():
        datasets[name] = _BuiltinDataset(
            paths=functools.partial(
                _panoptic_paths, image_dir=image_dir, png_dir=png_dir, json_rel=json_rel
            ),
            load=functools.partial(_load_pix2cap_coco, drop_empty=drop_empty),
            metadata=lambda: {"evaluator_type": "pix2cap", **_coco_class_metadata()},
        )
    for name, (image_dir, png_dir, json_rel) in _COCONUT_PANCAP.items():
        datasets[name] = _BuiltinDataset(
            paths=functools.partial(
                _panoptic_paths, image_dir=image_dir, png_dir=png_dir, json_rel=json_rel
            ),
            load=_load_coconut_pancap,
            metadata=lambda: {"evaluator_type": "coconut_pancap", **_coco_class_metadata()},
        )
    for split in _SAPANCAP_SPLITS:
        datasets[f"sapancap_{split}"] = _BuiltinDataset(
            paths=functools.partial(_sapancap_paths, split=split),
            load=functools.partial(_load_sapancap, split=split),
            # SA-Pancap has no class vocabulary: its entities are free-form tags.
            metadata=lambda: {"evaluator_type": "sapancap", "ignore_label": 255},
        )
    for name, (split, generate_kwargs) in _SHAPES.items():
        datasets[name] = _BuiltinDataset(
            paths=functools.partial(_shapes_paths, split=split),
            load=functools.partial(
                _load_shapes_split, split=split, generate_kwargs=generate_kwargs
            ),
            metadata=functools.partial(_shapes_metadata, generate_kwargs),
        )
    return datasets


def register_all_builtin(root: str | os.PathLike | None = None) -> None:
    """Register every built-in dataset name (see the module docstring) lazily.

    Args:
        root: the datasets root for all names; ``None`` reads ``$PIX2CAP_DATASETS`` (default
            ``./datasets``) each time a dataset is loaded.

    Calling it again re-registers every name (e.g. with another ``root``); it never fails
    because a name already exists.
    """
    pinned = None if root is None else get_datasets_root(root)

    def root_fn() -> str:
        return pinned if pinned is not None else get_datasets_root()

    for name, dataset in _builtin_datasets().items():
        _register_builtin(name, dataset, root_fn)


#: Every name :func:`register_all_builtin` registers.
BUILTIN_DATASETS: tuple[str, ...] = tuple(_builtin_datasets())
