#!/usr/bin/env python
"""Render the ground truth of a registered dataset: segments, numbers and their captions.

    python tools/visualize_data.py --dataset shapes_train --output vis/ --num 8
    python tools/visualize_data.py --dataset pix2cap_coco_val --output vis/ --num 20 --scale 0.5

Writes ``<output>/<stem>.png`` for the first ``--num`` images of the dataset (in the order the
loader returns them): the ground truth read by
:func:`pix2cap.data.detection_utils.read_panoptic_result` (segment ``description`` as the
caption), drawn by :class:`pix2cap.utils.visualizer.Visualizer` with the dataset's class names
and colours. Only datasets with panoptic PNGs can be drawn.

With ``--html``, it writes an interactive report into ``<output>`` instead
(``<output>/index.html``, a page per image; :mod:`pix2cap.viewer`): the masks with their
descriptions, the grounded caption linked to them both ways and the panoptic caption with its
boxes, whichever the dataset has -- so a dataset of captions only (SA-Pancap) can be looked at
too::

    python tools/visualize_data.py --dataset shapes_val --output vis_html/ --num 20 --html
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

import pix2cap.data  # noqa: F401  (registers the built-in datasets)
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.detection_utils import read_image, read_panoptic_result
from pix2cap.utils.cli import add_verbose_flag, main_guard
from pix2cap.utils.logger import setup_logger
from pix2cap.utils.visualizer import Visualizer, save_rgb_png
from pix2cap.viewer import HtmlReport, ImageView, page_keys

logger = logging.getLogger("pix2cap.visualize_data")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw the ground truth of a registered dataset")
    parser.add_argument("--dataset", required=True, help="a name in DatasetCatalog")
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--num", type=int, default=10, help="how many images (<= 0: all)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="resize factor of the drawn images"
    )
    parser.add_argument(
        "--html",
        action="store_true",
        help="write an interactive HTML report into --output (index.html) instead of PNGs",
    )
    add_verbose_flag(parser)
    return parser


def draw_record(record: dict, metadata, **kwargs) -> np.ndarray:
    """The picture of one dataset dict's ground truth (RGB uint8); ``kwargs`` go to the
    :class:`Visualizer`.

    Raises:
        DatasetError: the image or the panoptic PNG cannot be read, or they differ in size.
    """
    image = read_image(record["file_name"], format="RGB")
    result = read_panoptic_result(record, metadata, image_size=image.shape[:2])
    return Visualizer(image, metadata, **kwargs).draw_panoptic_result(result)


def write_report(dicts: list[dict], metadata, args) -> str:
    """The HTML report of ``dicts`` in ``args.output``; returns the index's path."""
    report = HtmlReport(args.output, title=f"{args.dataset} (ground truth)")
    keys = page_keys([d["file_name"] for d in dicts])
    for key, record in zip(keys, dicts):
        image = read_image(record["file_name"], format="RGB")
        view = ImageView.from_dataset_dict(record, metadata, image.shape[:2])
        scores = {}
        if view.result is not None:
            scores["segments"] = len(view.result.segments)
        if view.grounded_caption is not None:
            scores["grounded phrases"] = len(view.grounded_caption.get("phrases") or ())
        title = str(record.get("image_path") or os.path.basename(record["file_name"]))
        report.add_page(
            key, image, [view], title=title, scores=scores, source=record["file_name"]
        )
    return report.write_index(keys)


def main(args) -> list[str]:
    """Render the pictures (or, with ``--html``, the report); returns the paths written (the
    index page for a report)."""
    setup_logger(name="pix2cap")
    dicts = DatasetCatalog.get(args.dataset)
    metadata = MetadataCatalog.get(args.dataset)
    if args.num > 0:
        dicts = dicts[: args.num]
    os.makedirs(args.output, exist_ok=True)
    if args.html:
        index = write_report(dicts, metadata, args)
        logger.info("Wrote the HTML report of %d images of %s: %s", len(dicts), args.dataset, index)
        return [index]
    written = []
    for record in dicts:
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(args.output, f"{stem}.png")
        if path in written:  # same file name in two sub-folders: tell them apart by id
            path = os.path.join(args.output, f"{stem}_{record.get('image_id', len(written))}.png")
        save_rgb_png(draw_record(record, metadata, scale=args.scale), path)
        written.append(path)
    logger.info("Wrote %d pictures of %s to %s", len(written), args.dataset, args.output)
    return written


if __name__ == "__main__":
    parsed = get_parser().parse_args()
    main_guard(main, parsed)
