#!/usr/bin/env python
"""Panoptic captions: run a pix2cap model and the language-model bridge on images.

    python tools/pancap_infer.py --config-file CFG --input photo.jpg images_dir/ \\
        --writer template --output out/ MODEL.WEIGHTS model_final.pth
    python tools/pancap_infer.py --config-file CFG --dataset sapancap_val \\
        --writer small_lm --lm-path output/small_lm --output out/

Writes into ``--output``, image by image:

* ``predictions.jsonl`` -- one line per finished image (its prediction and structured record),
  appended and flushed as the image is done. A rerun of the same command continues an
  interrupted run: images already in it are skipped, a line a kill cut short is dropped; the
  settings (config, weights file, writer and its flags) must be those of the first run, else
  the run stops before any work. ``--overwrite`` starts over.
* ``summary.json`` -- ``{"tool", "status" ("running", "complete", "incomplete", "interrupted"),
  "images", "done", "resumed", "failed", "failures": [{"image", "error"}], "settings"}``.
* ``log.txt`` -- the log, with the traceback of each image that failed.

An image that cannot be read or that fails in the model or the writer is logged, counted and
left out; the others go on, and the tool fails at the end naming the images that failed. At
the end, built from the lines in input order and written atomically (the same files whether
the run was interrupted or not):

* ``predictions.json`` -- the official SA-Pancap prediction form, ``[{"image_path",
  "model_response"}]``; for a dataset, ``image_path`` is the dataset's relative path
  (``image_id``, e.g. ``"sam/sa_000005/sa_62400.jpg"``) so it lines up with the ground truth;
  for ``--input`` files it is the path as given. Each entry also has ``grounded_caption``:
  ``{"text", "tagged", "phrases": [{"phrase", "start", "end", "segment_ids", "score"}]}``,
  the caption without its boxes with each entity mention tied to the panoptic segment its box
  came from (``<ids:phrase>`` in ``tagged``; ids of the model's ``panoptic_seg``).
* ``structured.json`` -- per image ``{"image_path", "height", "width", "structured"
  (PanopticContent.to_dict()), "structured_full", "stages" ({"1".."4"}), "stage3_extra"}``.

With ``--html``, ``report/`` in ``--output`` is an interactive HTML report (``report/index.html``,
a page per image; :mod:`pix2cap.viewer`): the decoded masks with their dense captions, the
grounded caption linked to them, and the panoptic caption whose ``[[x1, y1, x2, y2]]`` boxes
are drawn on the image as their text is hovered; for a dataset, the ground-truth caption beside.

Class names come from the predictor's metadata, or from ``DATASETS.TRAIN[0]`` when the test
dataset has no class vocabulary (SA-Pancap has none).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from typing import Any

import pix2cap.data  # noqa: F401  (registers the built-in datasets and their metadata)
from pix2cap.bridge import PanopticCaptionBridge, build_caption_writer
from pix2cap.data.catalog import DatasetCatalog
from pix2cap.data.detection_utils import DEFAULT_MAX_IMAGE_PIXELS, read_image
from pix2cap.data.errors import DatasetError
from pix2cap.engine.defaults import collect_image_files, setup_cfg
from pix2cap.engine.predictor import DefaultPredictor, class_metadata
from pix2cap.structures import PanopticResult
from pix2cap.utils.cli import add_verbose_flag, check_output_dir, main_guard
from pix2cap.utils.file_io import atomic_write_json
from pix2cap.utils.logger import setup_logger
from pix2cap.utils.streaming import ResumableRun, file_identity
from pix2cap.viewer import HtmlReport, ImageView, page_keys

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
        "--html", action="store_true",
        help="also write an interactive HTML report of the captions to OUTPUT/report/",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start over: discard predictions.jsonl of an earlier run instead of continuing it",
    )
    add_verbose_flag(parser)
    parser.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    return parser


LM_WRITERS = ("small_lm", "hf_causal_lm")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the flag combinations argparse cannot check: a bad one is a
    usage error (exit 2), as an unknown ``--writer`` is."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.writer in LM_WRITERS and not args.lm_path:
        parser.error(f"--writer {args.writer} needs --lm-path (a saved model folder)")
    if args.adapter_path and args.writer != "hf_causal_lm":
        parser.error("--adapter-path is for --writer hf_causal_lm only")
    if args.num_beams < 1 or args.max_new_tokens < 1:
        parser.error("--num-beams and --max-new-tokens must be at least 1")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


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


# The flags that change what is written for an image: a rerun that continues a run must have
# the same (the rest -- inputs, --limit, --output -- only change which images are done).
RESULT_FLAGS = (
    "writer", "lm_path", "adapter_path", "max_new_tokens", "temperature", "top_p", "num_beams",
    "box_constraint", "region_captions", "extra_instance_threshold", "min_segment_score",
)
JSONL_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.json"
STRUCTURED_FILE = "structured.json"
PREDICTION_KEYS = ("image_path", "model_response", "grounded_caption")
STRUCTURED_KEYS = (
    "image_path", "height", "width", "structured", "structured_full", "stages", "stage3_extra"
)


def run_settings(args, cfg) -> dict:
    """What determines the results: the flags of :data:`RESULT_FLAGS`, the config (hashed)
    and the weights file (path, size, time); ``cfg`` None (an injected predictor): no config."""
    settings = {name: getattr(args, name) for name in RESULT_FLAGS}
    settings["config_sha256"] = (
        None if cfg is None else hashlib.sha256(cfg.dump().encode("utf-8")).hexdigest()
    )
    settings["weights"] = None if cfg is None else file_identity(cfg.MODEL.WEIGHTS)
    return settings


REPORT_FOLDER = "report"


def report_views(bridge, output: dict, caption: dict, truth: dict | None) -> list[ImageView]:
    """The report panels of one image: the prediction (decoded segments, the caption's
    grounding, the panoptic caption) and, when the dataset has one, the true caption."""
    metadata = bridge.metadata
    views = [
        ImageView(
            "Prediction", PanopticResult.from_model_output(output, metadata),
            caption["grounded_caption"], caption["caption"], metadata,
        )
    ]
    if truth and truth.get("panoptic_caption"):
        views.append(ImageView("Ground truth", panoptic_caption=truth["panoptic_caption"]))
    return views


def caption_image(
    bridge, predictor, file_name: str, image_path: str, report=None, page_key: str = "",
    truth: dict | None = None,
) -> dict:
    """One image's line of ``predictions.jsonl``: its prediction and its structured record.
    With ``report``, also writes its page ``page_key``, beside ``truth`` (its dataset dict)."""
    cfg = getattr(predictor, "cfg", None)  # None for an injected predictor: the default limit
    limit = DEFAULT_MAX_IMAGE_PIXELS if cfg is None else cfg.INPUT.MAX_IMAGE_PIXELS
    image = read_image(file_name, format="RGB", max_pixels=limit)  # DatasetError names the file
    height, width = image.shape[:2]
    output = predictor(image)
    out = bridge(output, (height, width))
    if report is not None:
        report.add_page(
            page_key, image, report_views(bridge, output, out, truth), title=image_path,
            scores={"entities": len(out["structured"]["entities"])}, source=file_name,
        )
    return {
        "image_path": image_path,
        "model_response": out["caption"],
        "grounded_caption": out["grounded_caption"],
        "height": height,
        "width": width,
        "structured": out["structured"],
        "structured_full": out["structured_full"],
        "stages": {str(k): v for k, v in out["stages"].items()},
        "stage3_extra": out["stage3_extra"],
    }


def main(args, predictor=None, cfg=None) -> tuple[list[dict], list[dict]]:
    """Run the tool; ``predictor`` (``predictor(image_rgb_uint8) -> outputs``, with a
    ``metadata`` attribute) replaces ``DefaultPredictor(cfg)`` when given.

    Returns:
        (predictions, structured records) as written.

    Raises:
        DatasetError: images could not be read (the others were written), or the inputs
            are bad.
        ImagesFailedError: images failed in the model or the writer (the others were written).
        OutputPathError: ``--output`` cannot be written, or holds a run with other settings.
    """
    check_output_dir(args.output)  # before any work: a bad --output costs nothing
    if predictor is None:
        cfg = setup_cfg(args)
    inputs = collect_inputs(args)
    if args.limit and args.limit > 0:
        inputs = inputs[: args.limit]
    # The same image listed twice is captioned once (its key names it in predictions.json).
    inputs = list(dict.fromkeys(inputs))
    out_dir = args.output
    run = ResumableRun(
        os.path.join(out_dir, JSONL_FILE),
        os.path.join(out_dir, SUMMARY_FILE),
        tool="pancap_infer",
        settings=run_settings(args, cfg),
        key=lambda record: record["image_path"],
        overwrite=args.overwrite,
        outputs=tuple(os.path.join(out_dir, f) for f in (PREDICTIONS_FILE, STRUCTURED_FILE)),
    )
    setup_logger(out_dir, name="pix2cap")  # console and out_dir/log.txt (tracebacks)
    report = None
    if args.html:
        report = HtmlReport(os.path.join(out_dir, REPORT_FOLDER), title="pix2cap panoptic captions")
    keys = dict(zip((p for _, p in inputs), page_keys([p for _, p in inputs])))
    truths = {}
    if report is not None and args.dataset:
        truths = {
            str(d.get("image_path", d.get("image_id", d["file_name"]))): d
            for d in DatasetCatalog.get(args.dataset)
        }
    # An image is done when its line is there (and its page, when a report is asked for).
    todo = [
        (f, p) for f, p in inputs
        if not run.is_done(p) or (report is not None and not report.has_page(keys[p]))
    ]
    writer = build_writer(args)  # a missing --lm-path fails before the model is loaded
    if todo and predictor is None:
        predictor = DefaultPredictor(cfg)
    with run:
        if todo:
            bridge = PanopticCaptionBridge(
                writer,
                metadata=class_metadata(cfg, getattr(predictor, "metadata", None)),
                extra_instance_threshold=args.extra_instance_threshold,
                min_segment_score=args.min_segment_score,
            )
        else:
            logger.info("All %d image(s) are done already; writing the final files", len(inputs))
        for file_name, image_path in todo:
            with run.attempt(image_path):
                record = run.append(
                    caption_image(
                        bridge, predictor, file_name, image_path, report,
                        keys[image_path], truths.get(image_path),
                    )
                )
                logger.info("%s: %d entities", image_path, len(record["structured"]["entities"]))
    done = [run.get(p) for _, p in inputs if run.is_done(p)]
    predictions = [{k: r[k] for k in PREDICTION_KEYS} for r in done]
    records = [{k: r[k] for k in STRUCTURED_KEYS} for r in done]
    atomic_write_json(os.path.join(out_dir, PREDICTIONS_FILE), predictions, indent=2)
    atomic_write_json(os.path.join(out_dir, STRUCTURED_FILE), records, indent=2)
    if report is not None:
        index = report.write_index([keys[p] for _, p in inputs if run.is_done(p)])
        logger.info("HTML report: %s", index)
    run.finish(total=len(inputs), resumed=len(inputs) - len(todo))
    logger.info(
        "%d of %d image(s) written to %s (%d from an earlier run)",
        len(done), len(inputs), out_dir, len(inputs) - len(todo),
    )
    run.raise_for_failures(len(inputs), input_error=DatasetError)
    return predictions, records


if __name__ == "__main__":
    main_guard(main, parse_args())
