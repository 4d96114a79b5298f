#!/usr/bin/env python
"""Run a pix2cap model on images and save, per image, a picture and a JSON of its segments.

    python tools/demo.py --config-file CFG --input photo.jpg --output out/ \\
        MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file CFG --input images_dir/ a.png b.jpg --output out/

For an input ``<stem>.<ext>`` it writes ``out/<stem>.png`` (the image with numbered,
coloured segments and a caption panel) and ``out/<stem>.json``::

    {"file_name", "height", "width",
     "segments": [{"id", "category_id", "category_name", "isthing", "score", "bbox",
                   "caption", "area"}, ...],
     "grounded_caption": {"text", "tagged",
                          "phrases": [{"phrase", "start", "end", "segment_ids", "score"}]}}

``grounded_caption`` is the model's (its ``"grounded_caption"`` output; none when the model
gives none) with ``--grounded-writer head``, the default; with ``--grounded-writer baseline``
it is composed from the decoded segments and their captions, whatever the model gives
(:func:`pix2cap.bridge.grounded_writer.compose_grounded_caption`, the PGC baseline). The
picture shows its text under the image, each grounded phrase in the colour of its segment.

It also keeps ``out/results.jsonl`` (one line per finished image, the record of its
``<stem>.json``, appended and flushed as the image is done), ``out/summary.json`` (``{"tool",
"status", "images", "done", "resumed", "failed", "failures": [{"image", "error"}],
"settings"}``) and ``out/log.txt``. Each run starts over by default (a demo is rerun to see
the effect of a change); ``--resume`` continues an interrupted run instead, skipping the images
whose line and files are there, provided the settings (config, weights file, ``--confidence``,
``--alpha``, ``--grounded-writer``) are the same.

``--html REPORT`` also writes an interactive report of the images (``REPORT/index.html``, one
page per image; :mod:`pix2cap.viewer`): the masks over the image, hovering a segment shows its
class, score, box and caption and lights up the grounded-caption phrases that name it, hovering
a phrase lights up its masks. The folder opens from ``file://``, offline.

``bbox`` is ``[x, y, w, h]`` in pixels of the original image (COCO's form) around the
segment's pixels, ``area`` its pixel count. Segments scoring below ``--confidence`` are left
out of both files (their pixels are drawn as void). A folder input takes its ``.png``,
``.jpg`` and ``.jpeg`` files (not recursive), a quoted glob pattern (``"photos/*.jpg"``) its
matching image files. An image that cannot be read or that fails in the model is reported by
name; the others are still processed, then the run fails naming the images that failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from typing import Sequence

import pix2cap.data  # noqa: F401  (registers the built-in datasets and their metadata)
import pix2cap.modeling  # noqa: F401  (registers the models)
from pix2cap.bridge.grounded_writer import baseline_grounded_caption
from pix2cap.data.detection_utils import read_image
from pix2cap.data.errors import DatasetError
from pix2cap.engine.defaults import collect_image_files, setup_cfg
from pix2cap.engine.predictor import DefaultPredictor
from pix2cap.structures import PanopticResult, Segment
from pix2cap.utils.cli import add_verbose_flag, check_output_dir, main_guard
from pix2cap.utils.file_io import atomic_write_text
from pix2cap.utils.logger import setup_logger
from pix2cap.utils.streaming import ResumableRun, file_identity
from pix2cap.utils.visualizer import Visualizer, save_rgb_png
from pix2cap.viewer import HtmlReport, ImageView, page_keys

logger = logging.getLogger("pix2cap.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="pix2cap demo: panoptic segmentation with a caption per segment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  tools/demo.py --config-file CFG --input img.jpg --output out/ "
        "MODEL.WEIGHTS model_final.pth",
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config")
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, folders (their .png/.jpg/.jpeg files) and/or quoted glob patterns",
    )
    parser.add_argument("--output", required=True, help="folder for <stem>.png and <stem>.json")
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.5,
        help="keep segments whose score is at least this (segments without a score are kept)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.25,
        help="opacity of the segment tint (0-1); low enough by default that the colours the "
        "captions name stay readable",
    )
    parser.add_argument(
        "--grounded-writer",
        choices=["head", "baseline"],
        default="head",
        help="the grounded caption drawn and written: the model's (head; none if it gives "
        "none) or one composed from the decoded segments and their captions (baseline)",
    )
    parser.add_argument(
        "--html",
        metavar="REPORT",
        default=None,
        help="also write an interactive HTML report (REPORT/index.html, a page per image)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output (skip the images it finished) instead "
        "of starting over",
    )
    add_verbose_flag(parser)
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


JSONL_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Expand files, folders and glob patterns into absolute image paths
    (:func:`pix2cap.engine.defaults.collect_image_files`).

    Raises:
        FileNotFoundError: a path does not exist, or a folder or pattern holds no image.
        ValueError: two images would write the same ``<stem>.png`` / ``<stem>.json``.
    """
    paths = collect_image_files(inputs)
    by_stem: dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in by_stem and os.path.abspath(by_stem[stem]) != os.path.abspath(path):
            raise ValueError(
                f"{by_stem[stem]} and {path} would both be written as {stem}.png/{stem}.json; "
                "rename one or run them separately"
            )
        by_stem[stem] = path
    # The same file named twice is processed once.
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def segment_record(segment: Segment) -> dict:
    """One segment of the JSON: ``id``, ``category_id``, ``category_name``, ``isthing``,
    ``score``, ``bbox`` (``[x, y, w, h]`` ints), ``caption``, ``area``."""
    return {
        "id": segment.id,
        "category_id": segment.category_id,
        "category_name": segment.name,
        "isthing": segment.isthing,
        "score": segment.score,
        "bbox": segment.bbox_xywh,
        "caption": segment.caption,
        "area": segment.area,
    }


def grounded_record(grounded: dict) -> dict:
    """The JSON form of a grounded caption: ``text``, ``tagged`` and ``phrases``
    (``phrase``, ``start``, ``end``, ``segment_ids``, ``score`` each; plain numbers)."""
    phrases = []
    for p in grounded.get("phrases") or ():
        score = p.get("score")
        phrases.append(
            {
                "phrase": str(p.get("phrase", "")),
                "start": int(p["start"]),
                "end": int(p["end"]),
                "segment_ids": [int(i) for i in p.get("segment_ids") or ()],
                "score": None if score is None else float(score),
            }
        )
    return {
        "text": str(grounded.get("text", "")),
        "tagged": str(grounded.get("tagged", "")),
        "phrases": phrases,
    }


def run_on_image(
    predictor: DefaultPredictor,
    path: str,
    output_dir: str,
    confidence: float,
    alpha: float = 0.25,
    grounded_writer: str = "head",
    report: HtmlReport | None = None,
    page_key: str | None = None,
):
    """Predict, draw and save one image; returns the JSON record written. With ``report``,
    also writes the image's page ``page_key`` there."""
    # DatasetError names the file if unreadable or above INPUT.MAX_IMAGE_PIXELS.
    image = read_image(path, format="RGB", max_pixels=predictor.cfg.INPUT.MAX_IMAGE_PIXELS)
    height, width = image.shape[:2]
    output = predictor(image)
    try:
        result = PanopticResult.from_model_output(output, predictor.metadata)
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from None
    if result.image_size != (height, width):
        raise ValueError(
            f"{path}: the model returned panoptic_seg of shape {result.image_size}, "
            f"expected the image size {(height, width)}"
        )
    kept = result.filter(confidence)
    if grounded_writer == "baseline":
        # The segments the picture shows: those scoring at least the confidence.
        grounded = baseline_grounded_caption(
            output, predictor.metadata, (height, width), confidence
        )
    else:
        grounded = output.get("grounded_caption")
    drawn = Visualizer(image, predictor.metadata, alpha=alpha).draw_panoptic_result(kept, grounded)

    stem = os.path.splitext(os.path.basename(path))[0]
    record = {
        "file_name": path,
        "height": height,
        "width": width,
        "segments": [segment_record(s) for s in kept.segments],
    }
    if grounded is not None:
        record["grounded_caption"] = grounded_record(grounded)
    save_rgb_png(drawn, os.path.join(output_dir, f"{stem}.png"))
    atomic_write_text(os.path.join(output_dir, f"{stem}.json"), json.dumps(record, indent=2))
    if report is not None:
        view = ImageView("Prediction", kept, grounded, None, predictor.metadata)
        scores = {"segments": len(kept.segments)}
        if grounded is not None:
            scores["grounded phrases"] = len(grounded.get("phrases") or ())
        report.add_page(
            page_key or stem, image, [view], title=os.path.basename(path), scores=scores,
            source=path,
        )
    return record


def run_settings(args, cfg) -> dict:
    """What determines a demo's files: the config (hashed), the weights file (path, size,
    time) and the drawing flags."""
    return {
        "config_sha256": hashlib.sha256(cfg.dump().encode("utf-8")).hexdigest(),
        "weights": file_identity(cfg.MODEL.WEIGHTS),
        "confidence": args.confidence,
        "alpha": args.alpha,
        "grounded_writer": args.grounded_writer,
    }


def main(args) -> list[dict]:
    """Run the demo; returns the JSON records of the images written (in input order).

    Raises:
        DatasetError: images could not be read (the others were written).
        ImagesFailedError: images failed in the model (the others were written).
        FileNotFoundError, ValueError: bad inputs; OutputPathError: a bad ``--output``.
    """
    check_output_dir(args.output)  # before any work: a bad --output costs nothing
    cfg = setup_cfg(args)
    paths = collect_images(args.input)
    summary_stem = os.path.splitext(SUMMARY_FILE)[0]
    for path in paths:
        if os.path.splitext(os.path.basename(path))[0] == summary_stem:
            raise ValueError(
                f"{path}: its {SUMMARY_FILE} would replace the run's {SUMMARY_FILE}; rename it"
            )
    run = ResumableRun(
        os.path.join(args.output, JSONL_FILE),
        os.path.join(args.output, SUMMARY_FILE),
        tool="demo",
        settings=run_settings(args, cfg),
        key=lambda record: record["file_name"],
        overwrite=not args.resume,
        restart_hint="run without --resume to start over",
    )
    setup_logger(args.output, name="pix2cap")  # console and output/log.txt (tracebacks)

    report = HtmlReport(args.html, title="pix2cap demo") if args.html else None
    keys = dict(zip(paths, page_keys(paths)))

    def finished(path: str) -> bool:
        # Done by an earlier run: its line is there and so are both of its files (and its
        # page, when a report is asked for).
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
        if report is not None and not report.has_page(keys[path]):
            return False
        return run.is_done(path) and all(os.path.isfile(stem + ext) for ext in (".png", ".json"))

    todo = [p for p in paths if not finished(p)]
    predictor = DefaultPredictor(cfg) if todo else None
    with run:
        for path in todo:
            with run.attempt(path):  # an unreadable image must not cost the results of the others
                record = run.append(
                    run_on_image(
                        predictor, path, args.output, args.confidence, args.alpha,
                        args.grounded_writer, report, keys[path],
                    )
                )
                logger.info("%s: %d segments", path, len(record["segments"]))
    if report is not None:
        index = report.write_index([keys[p] for p in paths if run.is_done(p)])
        logger.info("HTML report: %s", index)
    run.finish(total=len(paths), resumed=len(paths) - len(todo))
    run.raise_for_failures(len(paths), input_error=DatasetError)
    return [run.get(p) for p in paths if run.is_done(p)]


if __name__ == "__main__":
    parsed = get_parser().parse_args()
    main_guard(main, parsed)
