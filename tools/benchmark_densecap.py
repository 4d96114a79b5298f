#!/usr/bin/env python
"""Time the dense-caption mAP evaluation per image: IoU matching, METEOR, and the whole.

Generates shapes-like images (two stuff bands plus circles and squares, ~8 segments each) with
captions, and predictions that are jittered copies of the ground truth with paraphrased or
swapped captions, plus duplicates and spurious segments. Scores them with the real METEOR 1.5
jar (needs java).

    python tools/benchmark_densecap.py --num-images 50 --size 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pix2cap.evaluation.densecap_evaluation import caption_metrics, densecap_map, masks_to_rles
from pix2cap.evaluation.meteor import MeteorScorer
from pix2cap.utils.cli import add_verbose_flag, main_guard

COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]
STUFF = ["sky", "grass", "sand", "water", "wall"]
PLACES = ["on the left", "on the right", "near the top", "near the bottom", "in the center"]


def _place(x: float, y: float, size: int) -> str:
    if x < size / 3:
        return PLACES[0]
    if x > 2 * size / 3:
        return PLACES[1]
    return PLACES[2] if y < size / 3 else PLACES[3] if y > 2 * size / 3 else PLACES[4]


def make_image(rng: np.random.Generator, size: int, num_things: int):
    """GT dict (masks Bool[M, H, W], captions, category_ids, iscrowd) of one scene."""
    ids = np.zeros((size, size), dtype=np.int64)
    split = int(rng.integers(size // 3, 2 * size // 3))
    top, bottom = rng.choice(len(STUFF), 2, replace=False)
    ids[:split] = 1
    ids[split:] = 2
    captions = [f"{STUFF[top]} in the upper part", f"{STUFF[bottom]} in the lower part"]
    classes = [2 + int(top), 2 + int(bottom)]
    yy, xx = np.mgrid[:size, :size]
    for k in range(num_things):
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        r = rng.uniform(0.05, 0.12) * size
        shape = int(rng.integers(2))
        inside = (
            (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            if shape == 0
            else (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        )
        ids[inside] = 3 + k
        color = COLORS[int(rng.integers(len(COLORS)))]
        captions.append(f"a {color} {SHAPES[shape]} {_place(cx, cy, size)} of the image")
        classes.append(shape)
    present = [i for i in range(1, 3 + num_things) if (ids == i).any()]
    return {
        "masks": np.stack([ids == i for i in present]),
        "captions": [captions[i - 1] for i in present],
        "category_ids": [classes[i - 1] for i in present],
        "iscrowd": [0] * len(present),
    }


def make_predictions(rng: np.random.Generator, gt: dict):
    """Jittered GT masks, partly wrong captions, one duplicate, one spurious segment."""
    masks, captions, scores, classes = [], [], [], []
    n = len(gt["captions"])
    for j in range(n):
        shift = rng.integers(-4, 5, 2)
        masks.append(np.roll(gt["masks"][j], tuple(shift), axis=(0, 1)))
        caption = gt["captions"][j]
        u = rng.uniform()
        if u < 0.3:  # paraphrase
            caption = caption.replace("of the image", "").replace("a ", "one ", 1)
        elif u < 0.5:  # another segment's caption
            caption = gt["captions"][int(rng.integers(n))]
        captions.append(caption)
        scores.append(float(rng.uniform(0.5, 1.0)))
        classes.append(gt["category_ids"][j])
    j = int(rng.integers(n))
    masks.append(masks[j].copy())
    captions.append(captions[j])
    scores.append(scores[j] * 0.9)
    classes.append(classes[j])
    spurious = np.zeros_like(masks[0])
    y, x = rng.integers(0, spurious.shape[0] - 20, 2)
    spurious[y : y + 20, x : x + 20] = True
    masks.append(spurious)
    captions.append("a small gray triangle")
    scores.append(float(rng.uniform(0.3, 0.9)))
    classes.append(0)
    return {"masks": np.stack(masks), "captions": captions, "scores": scores, "category_ids": classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--things", type=int, default=6, help="things per image (+2 stuff)")
    parser.add_argument("--seed", type=int, default=0)
    add_verbose_flag(parser)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    gts = [make_image(rng, args.size, args.things) for _ in range(args.num_images)]
    preds = [make_predictions(rng, gt) for gt in gts]
    # Encode once, as the evaluator does in process().
    t0 = time.perf_counter()
    for entry in gts + preds:
        entry["masks"] = masks_to_rles(entry["masks"], "benchmark")
    t_encode = time.perf_counter() - t0
    n = args.num_images
    num_segments = sum(len(g["captions"]) for g in gts)
    print(f"{n} images, {num_segments} GT segments, {sum(len(p['captions']) for p in preds)} "
          f"predictions, {args.size}x{args.size}")

    calls: list[int] = []

    def no_meteor(pairs):
        calls.append(len(pairs))
        return [0.0] * len(pairs)

    t0 = time.perf_counter()
    densecap_map(preds, gts, no_meteor)
    t_match = time.perf_counter() - t0
    num_pairs = calls[0]

    t0 = time.perf_counter()
    scorer = MeteorScorer()
    scorer.score([("warm up", ["warm up"])])  # waits until the paraphrase table is loaded
    t_start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        results = densecap_map(preds, gts, scorer)
        t_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        caps = caption_metrics(
            results["matched_pairs"],
            total=sum(results["match_counts"].values()),
            meteor=scorer,
        )
        t_caps = time.perf_counter() - t0
    finally:
        scorer.close()
    t_meteor = t_total - t_match

    print(f"RLE encoding          {t_encode / n * 1e3:8.2f} ms/image")
    print(f"IoU + matching + AP   {t_match / n * 1e3:8.2f} ms/image")
    print(f"METEOR ({num_pairs} pairs)    {t_meteor / n * 1e3:8.2f} ms/image "
          f"({t_meteor / max(num_pairs, 1) * 1e3:.2f} ms/pair)")
    print(f"mAP total (warm JVM)  {t_total / n * 1e3:8.2f} ms/image")
    print(f"JVM start-up (once)   {t_start:8.2f} s")
    print(f"caption metrics       {t_caps / n * 1e3:8.2f} ms/image (PTB tokenizer + BLEU/METEOR/"
          f"ROUGE/CIDEr, {caps['num_pairs']} pairs)")
    print(f"mAP {results['mAP']:.2f}  AP_det {results['AP_det']:.2f}  "
          f"CIDEr {caps['CIDEr']:.2f}  METEOR {caps['METEOR']:.2f}")


if __name__ == "__main__":
    main_guard(main)
