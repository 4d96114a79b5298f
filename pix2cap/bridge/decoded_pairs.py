"""The LM writers' training pairs from a segmentation model's decoded segments.

A dataset such as SA-Pancap has panoptic captions but no panoptic masks, so the prompts cannot
be built from ground-truth segments (:func:`pix2cap.bridge.bridge.make_training_pairs`).
Here they are built from what a Pix2Cap model decodes on each image, exactly as inference
builds them (:meth:`PanopticCaptionBridge.decode` then :meth:`~PanopticCaptionBridge.prepare`),
so the LM trains on the prompts it will be given::

    decoder = CachedDecoder(lambda: DefaultPredictor(cfg), cache_dir, model_cache_key(cfg))
    pairs = make_decoded_training_pairs(DatasetCatalog.get("sapancap_train"), decoder,
                                        metadata=class_metadata(cfg, metadata_from_config(cfg)))

The target is the ground-truth ``panoptic_caption`` on the model-side grid, with each box
whose best-IoU decoded entity box reaches ``align_iou`` rewritten to that entity's grid box
(:func:`~pix2cap.bridge.bridge.align_to_mentions` with ``min_iou``), so that the LM learns
to copy listed boxes; the other boxes stay as written.

Cache. The model runs once per image: :class:`CachedDecoder` keeps each image's output in
``cache_dir/<model key>/<image key>.npz``. The model key (:func:`model_cache_key`) is the
SHA-256 of the weights file's content and of the config (without the weights path, device
and output folder); the image key hashes the image's absolute path, size and modification
time. An entry holds what the bridge reads: ``panoptic_seg`` (Int32 [H, W] segment ids),
``segments_info`` (JSON: id, category_id, isthing, score, caption, ...) and, when the model
returns ``instances``, their ``pred_masks`` (Bool [N, H, W]), ``scores`` (Float [N]) and
``pred_classes`` (Int [N]). ``model.json`` in each model folder names the config and weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pix2cap.bridge.bridge import PanopticCaptionBridge, align_to_mentions, captioned_records
from pix2cap.bridge.prompt import PromptFormat
from pix2cap.data.caption_formats import GRID, find_grid_boxes, pancap_text_to_grid
from pix2cap.data.detection_utils import read_image
from pix2cap.structures import Instances
from pix2cap.utils.file_io import atomic_write_bytes, atomic_write_json

__all__ = ["CachedDecoder", "model_cache_key", "make_decoded_training_pairs"]

logger = logging.getLogger(__name__)

# Part of the model key: a change of the entry layout makes old entries unreachable.
CACHE_FORMAT = 1


def _sha256_of_file(path: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_cache_key(cfg) -> str:
    """Hex key of the model ``cfg`` builds: the SHA-256 of ``MODEL.WEIGHTS``'s content and of
    the config without the settings that do not change the outputs' meaning (the weights'
    path, ``MODEL.DEVICE``, ``OUTPUT_DIR``).

    Raises:
        ValueError: ``MODEL.WEIGHTS`` is empty (an untrained model's outputs are not worth
            keeping, nor reproducible).
        FileNotFoundError: ``MODEL.WEIGHTS`` names no file.
    """
    weights = str(cfg.MODEL.WEIGHTS)
    if not weights:
        raise ValueError("MODEL.WEIGHTS is empty: decoded segments need a trained model's weights")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: weights file not found (MODEL.WEIGHTS)")
    neutral = cfg.clone()
    neutral.defrost()
    neutral.MODEL.WEIGHTS = ""
    neutral.MODEL.DEVICE = ""
    neutral.OUTPUT_DIR = ""
    text = f"format {CACHE_FORMAT}\nweights {_sha256_of_file(weights)}\n{neutral.dump()}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_scalar(value: Any) -> Any:
    # segments_info may hold numpy or 0-d torch scalars (scores, ids).
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a cache entry")


def _encode(file_name: str, output: Mapping) -> bytes:
    """One image's model output as the bytes of an ``.npz`` entry (module docstring)."""
    panoptic_seg, segments_info = output["panoptic_seg"]
    arrays = {
        "file_name": np.array(file_name),
        "panoptic_seg": torch.as_tensor(panoptic_seg).cpu().numpy().astype(np.int32),
        "segments_info": np.array(json.dumps(list(segments_info), default=_json_scalar)),
    }
    instances = output.get("instances")
    if instances is not None:
        fields = (("pred_masks", bool), ("scores", np.float32), ("pred_classes", np.int64))
        for field, dtype in fields:
            arrays[field] = torch.as_tensor(instances.get(field)).cpu().numpy().astype(dtype)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _decode(data: Mapping[str, np.ndarray]) -> dict:
    """The model-output dict of a loaded entry: ``{"panoptic_seg": (Int32 Tensor[H, W],
    segments_info)}`` plus ``"instances"`` when stored."""
    panoptic_seg = torch.from_numpy(data["panoptic_seg"])
    output: dict[str, Any] = {
        "panoptic_seg": (panoptic_seg, json.loads(str(data["segments_info"])))
    }
    if "pred_masks" in data:
        output["instances"] = Instances(
            tuple(panoptic_seg.shape),
            pred_masks=torch.from_numpy(data["pred_masks"]),
            scores=torch.from_numpy(data["scores"]),
            pred_classes=torch.from_numpy(data["pred_classes"]),
        )
    return output


class CachedDecoder:
    """A model's output for image files, run once per image and kept on disk.

    Args:
        build_predictor: makes the predictor (``predictor(rgb uint8 [H, W, 3]) -> output
            dict at the image's size``, e.g. ``lambda: DefaultPredictor(cfg)``); called on the
            first image missing from the cache, so a fully cached run builds no model.
        cache_dir: the cache's root folder.
        model_key: identifies the model (:func:`model_cache_key`); its outputs go to
            ``cache_dir/<model_key[:16]>/``.
        describe: written once as ``model.json`` into that folder (which config, which
            weights), for whoever looks at the cache.

    Attributes:
        runs: images the model ran on.
        hits: images read from the cache.
    """

    def __init__(
        self,
        build_predictor: Callable[[], Callable[[np.ndarray], Mapping]],
        cache_dir: str,
        model_key: str,
        describe: Mapping | None = None,
    ):
        self._build_predictor = build_predictor
        self._predictor = None
        self.folder = os.path.join(os.fspath(cache_dir), model_key[:16])
        self._describe = {"model_key": model_key, **dict(describe or {})}
        self.runs = 0
        self.hits = 0

    def entry_path(self, file_name: str) -> str:
        """The cache file of an image (keyed on its absolute path, size and mtime)."""
        stat = os.stat(file_name)
        key = f"{os.path.abspath(file_name)}\0{stat.st_size}\0{stat.st_mtime_ns}"
        return os.path.join(self.folder, hashlib.sha256(key.encode("utf-8")).hexdigest() + ".npz")

    def _load(self, path: str, file_name: str) -> dict | None:
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path) as data:
                if str(data["file_name"]) != file_name:
                    return None
                return _decode(data)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            logger.warning("%s: unreadable cache entry (%s); running the model again", path, e)
            return None

    def __call__(self, file_name: str) -> dict:
        """The model's output for the image file (detectron2's form, at the image's size).

        Raises:
            DatasetError: the image cannot be read (when the model has to run).
        """
        file_name = os.path.abspath(os.fspath(file_name))
        path = self.entry_path(file_name)
        output = self._load(path, file_name)
        if output is not None:
            self.hits += 1
            return output
        if self._predictor is None:
            self._predictor = self._build_predictor()
        output = self._predictor(read_image(file_name, format="RGB"))
        self.runs += 1
        if "panoptic_seg" not in output:
            raise KeyError(
                f"{file_name}: the model output has no 'panoptic_seg' (keys: {sorted(output)}); "
                "decoded segments need a panoptic model (MODEL.MASK_FORMER.TEST.PANOPTIC_ON)"
            )
        model_file = os.path.join(self.folder, "model.json")
        if not os.path.isfile(model_file):
            atomic_write_json(model_file, self._describe, indent=2)
        atomic_write_bytes(path, _encode(file_name, output))
        return output


def make_decoded_training_pairs(
    dataset_dicts: Sequence[Mapping],
    decoder: Callable[[str], Mapping],
    *,
    metadata: Any = None,
    class_names: Sequence[str] | None = None,
    prompt_format: PromptFormat = PromptFormat(),
    min_segment_score: float = 0.0,
    extra_instance_threshold: float = 0.5,
    align_iou: float = 0.5,
    mention_order: bool = True,
    grid: int = GRID,
) -> list[dict]:
    """(prompt from decoded segments -> ground-truth panoptic caption) pairs for the LM writers.

    Args:
        dataset_dicts: records with ``file_name`` and ``panoptic_caption`` (SA-Pancap form,
            boxes normalised to the image); no masks or image size needed. Records without
            a caption are skipped with a warning.
        decoder: ``decoder(file_name) -> model output`` at the image's size (e.g. a
            :class:`CachedDecoder`); the image size is read from its ``panoptic_seg``.
        metadata, class_names: the model's class names (:class:`PanopticCaptionBridge`).
        prompt_format: the prompt form; train with the same one.
        min_segment_score, extra_instance_threshold: the bridge's, as at inference.
        align_iou: the lowest box IoU (on the grid) at which a caption box is rewritten to
            its best-matching decoded entity's box.
        mention_order: list the entities in the order the caption first mentions them
            (segments and extra instances each keep their own list), as
            :func:`~pix2cap.bridge.bridge.make_training_pairs` does.
        grid: the model-side box grid.

    Returns:
        ``[{"prompt", "target", "image_id", "caption_boxes", "aligned_boxes"}]``: the last two
        count the target's boxes and those rewritten to (equal to) a decoded entity's box.
    """
    bridge = PanopticCaptionBridge(
        None,
        metadata=metadata,
        class_names=class_names,
        min_segment_score=min_segment_score,
        extra_instance_threshold=extra_instance_threshold,
        grid=grid,
    )
    pairs = []
    for record in captioned_records(dataset_dicts, "make_decoded_training_pairs"):
        output = decoder(record["file_name"])
        height, width = (int(v) for v in output["panoptic_seg"][0].shape[-2:])
        segments, extras = bridge.decode(output, (height, width))
        entities = segments + extras
        boxes = [bridge.grid_box(e, width, height) for e in entities]
        caption = pancap_text_to_grid(record["panoptic_caption"], width, height, grid)
        order, target = align_to_mentions(boxes, caption, min_iou=align_iou)
        if mention_order:
            num_segments = len(segments)
            segments = [entities[k] for k in order if k < num_segments]
            extras = [entities[k] for k in order if k >= num_segments]
        stages, content = bridge.prepare(segments, extras, (height, width))
        listed = set(boxes)
        written = [box for _, _, box in find_grid_boxes(target)]
        pairs.append(
            {
                "prompt": prompt_format.build(stages, content),
                "target": target,
                "image_id": record.get("image_id"),
                "caption_boxes": len(written),
                "aligned_boxes": sum(box in listed for box in written),
            }
        )
    total = sum(p["caption_boxes"] for p in pairs)
    aligned = sum(p["aligned_boxes"] for p in pairs)
    logger.info(
        "make_decoded_training_pairs: %d pairs; %d of %d caption boxes aligned to decoded "
        "entities (IoU >= %.2f), %d left as written",
        len(pairs), aligned, total, align_iou, total - aligned,
    )
    return pairs
