#!/usr/bin/env python
"""Size and writing time of an HTML report of photo-sized images (:mod:`pix2cap.viewer`).

    python tools/benchmark_html_report.py --output /tmp/report_bench --images 100

Builds ``--images`` pages from a real photograph (``skimage.data``'s coffee, astronaut and
chelsea, resized to ``--size``, the longer side) cut into ``--segments`` SLIC superpixels, each
with a dense caption, plus a grounded caption naming every segment and a panoptic caption with
a box per segment -- as many segments and as much text as a busy COCO image -- with a
prediction and a ground-truth view per page. Prints the report's size (total and per page) and
the seconds per page; the report can be opened to look at the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import cv2
import numpy as np

from pix2cap.data.caption_formats import format_box
from pix2cap.structures import PanopticResult, Segment
from pix2cap.viewer import HtmlReport, ImageView


def _photos(size: int) -> list[np.ndarray]:
    from skimage import data  # a test dependency; only this benchmark needs it

    photos = []
    for image in (data.coffee(), data.astronaut(), data.chelsea()):
        h, w = image.shape[:2]
        scale = size / max(h, w)
        photos.append(cv2.resize(image, (round(w * scale), round(h * scale))))
    return photos


def _segments(image: np.ndarray, count: int) -> PanopticResult:
    from skimage.segmentation import slic  # see _photos

    labels = slic(image, n_segments=count, start_label=1, compactness=10)
    segments = []
    for k, segment_id in enumerate(np.unique(labels)):
        mask = labels == segment_id
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        segments.append(
            Segment(
                int(segment_id), k % 80, f"class {k % 80}", k % 3 != 0, 0.5 + 0.5 * (k % 7) / 7,
                box=box, area=int(mask.sum()),
                caption=f"a brown wooden object number {k} resting on the table near the window",
            )
        )
    return PanopticResult(labels.astype(np.int64), segments)


def _captions(result: PanopticResult, height: int, width: int) -> tuple[dict, str]:
    text, phrases, pancap = [], [], []
    cursor = 0
    for segment in result.segments:
        phrase = f"the {segment.name} number {segment.id}"
        sentence = f"{phrase.capitalize()} lies next to the others. "
        phrases.append(
            {"phrase": phrase, "start": cursor, "end": cursor + len(phrase),
             "segment_ids": [segment.id]}
        )
        text.append(sentence)
        cursor += len(sentence)
        x0, y0, x1, y1 = segment.box
        box = format_box([x0 / width, y0 / height, x1 / width, y1 / height])
        pancap.append(f"The {segment.name} {box} is brown and wooden.")
    return {"text": "".join(text), "phrases": phrases}, " ".join(pancap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the report folder (replaced)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=640, help="longer side of the photos")
    parser.add_argument("--segments", type=int, default=40, help="SLIC superpixels per photo")
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    photos = _photos(args.size)
    prepared = []
    for image in photos:
        result = _segments(image, args.segments)
        grounded, pancap = _captions(result, *image.shape[:2])
        prepared.append((image, result, grounded, pancap))
    report = HtmlReport(args.output, title="HTML report benchmark")
    start = time.perf_counter()
    for k in range(args.images):
        image, result, grounded, pancap = prepared[k % len(prepared)]
        views = [
            ImageView("Prediction", result, grounded, pancap),
            ImageView("Ground truth", result, grounded, pancap),
        ]
        report.add_page(f"image_{k:04d}", image, views, scores={"PQ": float(k % 100)})
    report.write_index()
    seconds = time.perf_counter() - start
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(args.output) for name in names
    )
    segments = np.mean([len(p[1].segments) for p in prepared])
    print(
        f"{args.images} pages ({args.size} px photos, {segments:.0f} segments, 2 views each): "
        f"{size / 2**20:.1f} MiB ({size / 2**10 / args.images:.0f} KiB a page), "
        f"{seconds:.1f} s ({1000 * seconds / args.images:.0f} ms a page)"
    )


if __name__ == "__main__":
    main()
