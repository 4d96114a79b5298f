#!/usr/bin/env python
"""Panoptic captions: run a pix2cap model and the language-model bridge on images.

    python tools/pancap_infer.py --config-file CFG --input photo.jpg images_dir/ \\
        --writer template --output out/ MODEL.WEIGHTS model_final.pth
    python tools/pancap_infer.py --config-file CFG --dataset sapancap_val \\
        --writer small_lm --lm-path output/small_lm --output out/

Writes, atomically, into ``--output``:

* ``predictions.json`` -- the official SA-Pancap prediction form, ``[{"image_path",
  "model_response"}]``; for a dataset, ``image_path`` is the dataset's relative path
  (``image_id``, e.g. ``"sam/sa_000005/sa_62400.jpg"``) so it lines up with the ground truth;
  for ``--input`` files it is the path as given. Each entry also has ``grounded_caption``:
  ``{"text", "tagged", "phrases": [{"phrase", "start", "end", "segment_ids", "score"}]}``,
  the caption without its boxes with each entity mention tied to the panoptic segment its box
  came from (``<ids:phrase>`` in ``tagged``; ids of the model's ``panoptic_seg``).
* ``structured.json`` -- per image ``{"image_path", "height", "width", "structured"
  (PanopticContent.to_dict()), "structured_full", "stages" ({"1".."4"}), "stage3_extra"}``.

Class names come from the predictor's metadata, or from ``DATASETS.TRAIN[0]`` when the test
dataset has no class vocabulary (SA-Pancap has none).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import pix2cap.data  # noqa: F401  (registers the built-in datasets and their metadata)
from pix2cap.bridge import PanopticCaptionBridge, build_caption_writer
from pix2cap.data.catalog import DatasetCatalog
from pix2cap.data.detection_utils import read_image
from pix2cap.data.errors import DatasetError
from pix2cap.engine.defaults import collect_image_files, setup_cfg
from pix2cap.engine.predictor import DefaultPredictor, class_metadata
from pix2cap.utils.file_io import atomic_write_json
from pix2cap.utils.logger import setup_logger

logger = logging.getLogger("pix2cap.pancap_infer")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="pix2cap panoptic captions: model -> PancapChain stages -> caption writer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", help="image files, folders of images and/or quoted glob patterns"
    )
    source.add_argument("--dataset", help="a registered dataset name, e.g. sapancap_val")
    parser.add_argument(
        "--writer", default="template", choices=["template", "concat", "concat_boxes", "small_lm", "hf_causal_lm"]
    )
    parser.add_argument("--lm-path", default=None, help="model folder for small_lm / hf_causal_lm")
    parser.add_argument("--adapter-path", default=None, help="LoRA adapter folder (hf_causal_lm)")
    parser.add_argument("--output", required=True, help="folder for the JSON files")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy)")
    parser.add_argument(
        "--box-constraint", default="named", choices=["named", "listed", "free"],
        help="LM writers: a box must be that of the entity just named (named), of any listed "
        "entity (listed), or is decoded freely (free)",
    )
    parser.add_argument(
        "--region-captions", default=None, choices=["raw", "grounded"],
        help="LM writers: region captions as the caption head wrote them, or with relation "
        "clauses tied to the decoded entities (default: the prompt format saved with the LM; "
        "raw for an LM without one)",
    )
    parser.add_argument("--extra-instance-threshold", type=float, default=0.5)
    parser.add_argument("--min-segment-score", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="process at most N images (0 = all)")
    parser.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    return parser


def collect_inputs(args) -> list[tuple[str, str]]:
    """(image file, image_path written in the predictions) pairs."""
    if args.dataset:
        dicts = DatasetCatalog.get(args.dataset)
        # image_path: the path as the dataset's SA-Pancap files write it (the key of the
        # ground-truth captions); datasets without one fall back to the image id.
        return [
            (d["file_name"], str(d.get("image_path", d.get("image_id", d["file_name"]))))
            for d in dicts
        ]
    return [(path, path) for path in collect_image_files(args.input)]


def build_writer(args):
    if args.writer in ("template", "concat", "concat_boxes"):  # no language model
        return build_caption_writer(args.writer)
    if not args.lm_path:
        raise ValueError(f"--writer {args.writer} needs --lm-path (a saved model folder)")
    kwargs: dict[str, Any] = {
        "model_path": args.lm_path,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "constrain_boxes": args.box_constraint != "free",
        "boxes_follow_names": args.box_constraint == "named",
    }
    if args.region_captions is not None:
        kwargs["ground_region_captions"] = args.region_captions == "grounded"
    if args.adapter_path:
        kwargs["adapter_path"] = args.adapter_path
    return build_caption_writer(args.writer, **kwargs)


def main(args, predictor=None, cfg=None) -> tuple[list[dict], list[dict]]:
    """Run the tool; ``predictor`` (``predictor(image_rgb_uint8) -> outputs``, with a
    ``metadata`` attribute) replaces ``DefaultPredictor(cfg)`` when given.

    Returns:
        (predictions, structured records) as written.
    """
    setup_logger(name="pix2cap")
    if predictor is None:
        cfg = setup_cfg(args)
        predictor = DefaultPredictor(cfg)
    inputs = collect_inputs(args)
    if args.limit and args.limit > 0:
        inputs = inputs[: args.limit]
    os.makedirs(args.output, exist_ok=True)
    bridge = PanopticCaptionBridge(
        build_writer(args),
        metadata=class_metadata(cfg, getattr(predictor, "metadata", None)),
        extra_instance_threshold=args.extra_instance_threshold,
        min_segment_score=args.min_segment_score,
    )
    predictions, records, failed = [], [], []
    for file_name, image_path in inputs:
        try:
            image = read_image(file_name, format="RGB")
        except DatasetError as e:
            logger.error("%s", e)
            failed.append(str(e))
            continue
        height, width = image.shape[:2]
        out = bridge(predictor(image), (height, width))
        predictions.append(
            {
                "image_path": image_path,
                "model_response": out["caption"],
                "grounded_caption": out["grounded_caption"],
            }
        )
        records.append(
            {
                "image_path": image_path,
                "height": height,
                "width": width,
                "structured": out["structured"],
                "structured_full": out["structured_full"],
                "stages": {str(k): v for k, v in out["stages"].items()},
                "stage3_extra": out["stage3_extra"],
            }
        )
        logger.info("%s: %d entities", image_path, len(out["structured"]["entities"]))
    atomic_write_json(os.path.join(args.output, "predictions.json"), predictions, indent=2)
    atomic_write_json(os.path.join(args.output, "structured.json"), records, indent=2)
    if failed:
        raise DatasetError(
            f"{len(failed)} of {len(inputs)} image(s) could not be read: " + "; ".join(failed)
        )
    return predictions, records


if __name__ == "__main__":
    parsed = get_parser().parse_args()
    try:
        main(parsed)
    except (DatasetError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
