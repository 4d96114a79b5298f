#!/usr/bin/env python
"""Time pix2cap's panoptic evaluator against panopticapi's ``pq_compute`` on the same data.

Generates COCO-like ground truth (Voronoi-style segments with COCO's colour-sized ids, thin VOID
borders, some crowd regions, the 133 COCO classes) and predictions that disagree with it
(moved boundaries, relabelled, dropped and spurious segments, ids 1..N like a model's), writes
both in COCO panoptic format to a temporary folder, and times

* ``evaluator``: :class:`COCOPanopticEvaluator` fed the predictions in memory one image per
  ``process`` call, as a model with the test loader's batch size 1 feeds it (it decodes each
  ground-truth PNG once, in its reader's ``--workers`` threads, overlapping images; no export);
* ``evaluator serial``: the same with ``num_workers=0`` (everything in the calling thread);
* ``file-to-file``: pix2cap reading both PNGs of every image serially, as panopticapi does;
* ``panopticapi``: ``pq_compute`` on the files (its own pool of ``cpu_count()`` processes);
* ``gt decode only``: decoding the ground-truth PNGs serially (``read_panoptic_ids``), the
  floor every evaluator pays (divided by the threads at best).

It then checks that PQ / SQ / RQ (All, Things, Stuff and every class) agree with panopticapi
to 1e-9 (it sums in another order) and that the threaded, serial and file-to-file counts are
identical, and fails (exit status 1) if not::

    python tools/benchmark_pq.py --num-images 200 --height 480 --width 640

Needs ``panopticapi`` (``pip install --no-deps panopticapi-lite``). Time it on a quiet machine:
the load average is printed before and after; ``--min-speedup`` makes a slower evaluator an
error too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from pix2cap.data.datasets.coco_categories import COCO_PANOPTIC_CATEGORIES
from pix2cap.data.datasets.coco_panoptic import build_panoptic_metadata
from pix2cap.data.detection_utils import read_panoptic_png
from pix2cap.evaluation.ground_truth import default_num_workers, read_panoptic_ids
from pix2cap.evaluation.panoptic_evaluation import (
    COCOPanopticEvaluator,
    PQStat,
    pq_compute_single,
)
from pix2cap.utils.cli import add_verbose_flag, main_guard


def _voronoi(seeds: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest seed per pixel, and the margin to the second nearest (for VOID borders).

    Args:
        seeds: Float[S, 2] (y, x), S >= 2.
    Returns:
        Int64[H, W] seed index, Float[H, W] distance margin in pixels.
    """
    from scipy.spatial import cKDTree

    # Computed on a 2x coarser grid and repeated: 4x faster, boundaries in 2-pixel steps.
    h, w = (height + 1) // 2, (width + 1) // 2
    yy, xx = np.mgrid[0:h, 0:w]
    dist, index = cKDTree(seeds / 2).query(np.stack([yy.ravel(), xx.ravel()], axis=1), k=2)
    index = index[:, 0].reshape(h, w).repeat(2, 0).repeat(2, 1)[:height, :width]
    margin = 2 * (dist[:, 1] - dist[:, 0]).reshape(h, w).repeat(2, 0).repeat(2, 1)[:height, :width]
    return index, margin


def _write_png(ids: np.ndarray, path: str) -> None:
    ids = ids.astype("<u4")
    rgb = ids[..., None].view(np.uint8)[..., :3]
    cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1]))


def make_dataset(root: str, num_images: int, height: int, width: int, seed: int):
    """Write ``root/{gt,pred}/*.png`` and ``root/{gt,pred}.json``.

    Returns:
        (test-mapper style dicts, model style outputs, contiguous-id metadata)
    """
    rng = np.random.default_rng(seed)
    meta = build_panoptic_metadata(COCO_PANOPTIC_CATEGORIES)
    to_contiguous = {int(k): int(v) for k, v in meta["stuff_dataset_id_to_contiguous_id"].items()}
    cats = meta["categories"]
    thing_ids = [c["id"] for c in cats if c["isthing"]]
    stuff_ids = [c["id"] for c in cats if not c["isthing"]]
    for sub in ("gt", "pred"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    gt_json = {"images": [], "annotations": [], "categories": cats}
    pred_json = {"annotations": [], "categories": cats}
    inputs, outputs = [], []
    for index in range(num_images):
        name = f"{index:06d}.png"
        num_seg = int(rng.integers(8, 30))
        seeds = rng.random((num_seg, 2)) * [height, width]
        labels, margin = _voronoi(seeds, height, width)
        gt_seg_ids = rng.choice(np.arange(1, 1 << 24), size=num_seg, replace=False)
        gt_ids = gt_seg_ids[labels]
        gt_ids[margin < 1.5] = 0  # VOID borders between segments
        gt_cat = [
            int(rng.choice(thing_ids if rng.random() < 0.6 else stuff_ids)) for _ in range(num_seg)
        ]
        crowd = [bool(gt_cat[k] in thing_ids and rng.random() < 0.05) for k in range(num_seg)]
        area = np.bincount(labels[gt_ids > 0], minlength=num_seg)
        gt_segments = [
            {"id": int(gt_seg_ids[k]), "category_id": gt_cat[k], "iscrowd": int(crowd[k]),
             "area": int(area[k]), "bbox": [0, 0, 0, 0]}
            for k in range(num_seg)
            if area[k] > 0
        ]
        _write_png(gt_ids, os.path.join(root, "gt", name))
        gt_json["images"].append({"id": index, "file_name": name, "height": height, "width": width})
        gt_json["annotations"].append(
            {"image_id": index, "file_name": name, "segments_info": gt_segments}
        )

        # Prediction: moved seeds (boundaries shift), a few spurious seeds, merged neighbours.
        moved = seeds + rng.normal(0, 0.04 * min(height, width), seeds.shape)
        extra = rng.random((int(rng.integers(0, 5)), 2)) * [height, width]
        pred_labels, _ = _voronoi(np.concatenate([moved, extra]), height, width)
        merge = rng.random(len(moved) + len(extra)) < 0.1
        pred_labels = np.where(merge[pred_labels], np.maximum(pred_labels - 1, 0), pred_labels)
        present = np.unique(pred_labels)
        pred_ids = np.zeros((height, width), dtype=np.int32)
        pred_segments = []
        for new_id, k in enumerate(present, start=1):
            if k < num_seg and rng.random() < 0.08:
                continue  # missed segment: left VOID
            pred_ids[pred_labels == k] = new_id
            if k < num_seg and rng.random() < 0.85:
                cat = gt_cat[k]
            else:
                cat = int(rng.choice(thing_ids + stuff_ids))
            pred_segments.append({"id": new_id, "category_id": cat, "iscrowd": 0})
        _write_png(pred_ids, os.path.join(root, "pred", name))
        pred_json["annotations"].append(
            {"image_id": index, "file_name": name, "segments_info": pred_segments}
        )

        inputs.append(
            {
                "image_id": index,
                "file_name": os.path.join(root, "images", name),
                "pan_seg_file_name": os.path.join(root, "gt", name),
                "segments_info": [
                    dict(s, category_id=to_contiguous[s["category_id"]]) for s in gt_segments
                ],
            }
        )
        outputs.append(
            {
                "panoptic_seg": (
                    torch.from_numpy(pred_ids),
                    [dict(s, category_id=to_contiguous[s["category_id"]]) for s in pred_segments],
                )
            }
        )
    with open(os.path.join(root, "gt.json"), "w") as f:
        json.dump(gt_json, f)
    with open(os.path.join(root, "pred.json"), "w") as f:
        json.dump(pred_json, f)
    return inputs, outputs, meta


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def _stat_key(stat: PQStat) -> dict:
    """The counts of every category that has any, for an exact comparison."""
    return {
        c: (v.tp, v.fp, v.fn, v.iou)
        for c, v in sorted(stat.pq_per_cat.items())
        if v.tp + v.fp + v.fn > 0
    }


def compare(ours: dict, stat: PQStat, others: dict[str, PQStat], theirs: dict,
            categories: dict) -> float:
    """The largest difference between pix2cap's numbers and panopticapi's (percent vs
    fraction handled); raises ``RuntimeError`` if it exceeds 1e-9 or if any of ``others``
    (pix2cap's other paths) differs from ``stat`` at all."""
    for name, other in others.items():
        if _stat_key(other) != _stat_key(stat):
            raise RuntimeError(f"the {name} counts differ from the evaluator's")
    worst = 0.0
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("PQ", "SQ", "RQ"):
            worst = max(worst, abs(ours[metric + suffix] - 100 * theirs[group][metric.lower()]))
    _, per_class = stat.pq_average(categories)
    for contiguous, cat in categories.items():
        for metric in ("pq", "sq", "rq"):
            worst = max(
                worst, abs(per_class[contiguous][metric] - theirs["per_class"][cat["id"]][metric])
            )
    if not worst <= 1e-9:
        raise RuntimeError(f"pix2cap and panopticapi disagree by {worst:.3g} (more than 1e-9)")
    return worst


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best counts")
    parser.add_argument(
        "--workers", type=int, default=None,
        help=f"the evaluator's threads (default: the cores, at most 4: {default_num_workers()})",
    )
    parser.add_argument(
        "--min-speedup", type=float, default=None,
        help="fail unless the evaluator is at least this many times faster than panopticapi",
    )
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    try:
        from panopticapi.evaluation import pq_compute
    except ImportError:
        print(
            "panopticapi is not importable: pip install --no-deps panopticapi-lite",
            file=sys.stderr,
        )
        return 2

    print(f"load average (1/5/15 min) before: {_load()}; cpu_count {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="pq_bench_") as root:
        start = time.perf_counter()
        inputs, outputs, meta = make_dataset(
            root, args.num_images, args.height, args.width, args.seed
        )
        print(f"generated {args.num_images} images of {args.height}x{args.width} in "
              f"{time.perf_counter() - start:.1f} s")
        categories = {i: c for i, c in enumerate(meta["categories"])}

        def run_evaluator(num_workers):
            evaluator = COCOPanopticEvaluator(
                dataset_name="pq_benchmark", metadata=meta, num_workers=num_workers
            )
            evaluator.reset()
            for inp, out in zip(inputs, outputs):
                evaluator.process([inp], [out])
            with contextlib.redirect_stdout(io.StringIO()):
                results = evaluator.evaluate()["panoptic_seg"]
            return evaluator.pq_stat, results

        def run_file_to_file():
            total = PQStat()
            for inp, out in zip(inputs, outputs):
                name = os.path.basename(inp["pan_seg_file_name"])
                pred = read_panoptic_png(os.path.join(root, "pred", name))
                total += pq_compute_single(
                    read_panoptic_png(inp["pan_seg_file_name"]), inp["segments_info"],
                    pred, out["panoptic_seg"][1], categories, image_id=inp["image_id"],
                )
            return total

        def run_panopticapi():
            with contextlib.redirect_stdout(io.StringIO()):
                return pq_compute(
                    os.path.join(root, "gt.json"), os.path.join(root, "pred.json"),
                    gt_folder=os.path.join(root, "gt"), pred_folder=os.path.join(root, "pred"),
                )

        def run_decode_only():
            for inp in inputs:
                read_panoptic_ids(inp["pan_seg_file_name"])

        workers = default_num_workers() if args.workers is None else args.workers
        runs = {
            "panopticapi": run_panopticapi,
            "evaluator": lambda: run_evaluator(workers),
            "evaluator serial": lambda: run_evaluator(0),
            "file-to-file": run_file_to_file,
            "gt decode only": run_decode_only,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        results: dict = {}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)

    theirs = results["panopticapi"]
    stat, ours = results["evaluator"]
    serial_stat, serial = results["evaluator serial"]
    if serial != ours:
        raise RuntimeError("the serial evaluator's results differ from the threaded one's")
    worst = compare(
        ours, stat,
        {"serial evaluator": serial_stat, "file-to-file": results["file-to-file"]},
        theirs, categories,
    )

    best = {name: min(t) for name, t in times.items()}
    print(f"PQ {ours['PQ']:.3f}  SQ {ours['SQ']:.3f}  RQ {ours['RQ']:.3f}  "
          f"(Things {ours['PQ_th']:.3f}, Stuff {ours['PQ_st']:.3f}); "
          f"largest difference to panopticapi: {worst:.2e}; serial, threaded and "
          "file-to-file counts identical")
    for name, t in times.items():
        per_image = 1000 * best[name] / args.num_images
        print(f"{name:>16s}: best {best[name]:.3f} s ({per_image:.2f} ms/image), "
              f"runs {', '.join(f'{x:.3f}' for x in t)}")
    speedup = best["panopticapi"] / best["evaluator"]
    print(f"speed-up vs panopticapi: evaluator {speedup:.1f}x ({workers} threads), "
          f"evaluator serial {best['panopticapi'] / best['evaluator serial']:.1f}x, "
          f"file-to-file {best['panopticapi'] / best['file-to-file']:.1f}x")
    print(f"load average after: {_load()}")
    if args.min_speedup is not None and speedup < args.min_speedup:
        raise RuntimeError(
            f"the evaluator is {speedup:.2f}x faster than panopticapi, less than "
            f"--min-speedup {args.min_speedup:g}"
        )
    return 0


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
