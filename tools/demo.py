#!/usr/bin/env python
"""Run a pix2cap model on images and save, per image, a picture and a JSON of its segments.

    python tools/demo.py --config-file CFG --input photo.jpg --output out/ \\
        MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file CFG --input images_dir/ a.png b.jpg --output out/

For an input ``<stem>.<ext>`` it writes ``out/<stem>.png`` (the image with numbered,
coloured segments and a caption panel) and ``out/<stem>.json``::

    {"file_name", "height", "width",
     "segments": [{"id", "category_id", "category_name", "isthing", "score", "bbox",
                   "caption", "area"}, ...]}

``bbox`` is ``[x, y, w, h]`` in pixels of the original image (COCO's form) around the
segment's pixels, ``area`` its pixel count. Segments scoring below ``--confidence`` are left
out of both files (their pixels are drawn as void). A folder input takes its ``.png``,
``.jpg`` and ``.jpeg`` files (not recursive). An image that cannot be read is reported by name;
the others are still processed, then the run fails listing every unreadable file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np
import torch

import pix2cap.data  # noqa: F401  (registers the built-in datasets and their metadata)
import pix2cap.modeling  # noqa: F401  (registers the models)
from pix2cap.data.detection_utils import read_image
from pix2cap.data.errors import DatasetError
from pix2cap.engine.predictor import DefaultPredictor
from pix2cap.utils.logger import setup_logger
from pix2cap.utils.visualizer import Visualizer, save_rgb_png
from pix2cap.utils.file_io import atomic_write_text

logger = logging.getLogger("pix2cap.demo")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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
        help="image files and/or folders (their .png/.jpg/.jpeg files)",
    )
    parser.add_argument("--output", required=True, help="folder for <stem>.png and <stem>.json")
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.5,
        help="keep segments whose score is at least this (segments without a score are kept)",
    )
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


def setup_cfg(args):
    from pix2cap.config import load_cfg

    return load_cfg(args.config_file, args.opts)


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Expand files and folders into a list of image paths (folders: sorted, non-recursive).

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no image.
        ValueError: two images would write the same ``<stem>.png`` / ``<stem>.json``.
    """
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(item, name))
            )
            if not found:
                raise FileNotFoundError(
                    f"{item}: folder holds no {'/'.join(IMAGE_EXTENSIONS)} image"
                )
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
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
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    return unique


def _as_numpy_seg(panoptic_seg: Any, height: int, width: int, file_name: str) -> np.ndarray:
    if isinstance(panoptic_seg, torch.Tensor):
        panoptic_seg = panoptic_seg.detach().cpu().numpy()
    seg = np.asarray(panoptic_seg).astype(np.int64, copy=False)
    if seg.shape != (height, width):
        raise ValueError(
            f"{file_name}: the model returned panoptic_seg of shape {seg.shape}, "
            f"expected the image size {(height, width)}"
        )
    return seg


def _to_builtin(value: Any) -> Any:
    """Tensors / numpy scalars -> plain Python numbers for JSON."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def segments_to_records(
    seg: np.ndarray, segments_info: Sequence[dict], metadata: Any, confidence: float
) -> tuple[np.ndarray, list[dict]]:
    """Filter segments by score and describe each kept one for the JSON.

    Args:
        seg: Int [H, W] segment ids, 0 = void.
        segments_info: the model's per-segment dicts (``id``, ``category_id``, and
            optionally ``isthing``, ``score``, ``caption``).
        metadata: class names (``stuff_classes`` by contiguous id).
        confidence: minimum score; segments without a score are kept.
    Returns:
        the id map with dropped segments set to 0, and one record per kept segment:
        ``id``, ``category_id``, ``category_name``, ``isthing``, ``score``, ``bbox``
        (``[x, y, w, h]`` ints), ``caption``, ``area``.
    """
    names = metadata.get("stuff_classes") or []
    thing_names = metadata.get("thing_classes") or []
    kept_seg = seg.copy()
    records = []
    for segment in segments_info:
        seg_id = int(_to_builtin(segment["id"]))
        score = segment.get("score")
        score = None if score is None else float(_to_builtin(score))
        if score is not None and score < confidence:
            kept_seg[kept_seg == seg_id] = 0
            continue
        category_id = int(_to_builtin(segment["category_id"]))
        isthing = segment.get("isthing")
        isthing = category_id < len(thing_names) if isthing is None else bool(_to_builtin(isthing))
        ys, xs = np.nonzero(seg == seg_id)
        if xs.size:
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        else:
            bbox = [0, 0, 0, 0]
        if 0 <= category_id < len(names):
            category_name = str(names[category_id])
        else:
            category_name = f"class {category_id}"
        records.append(
            {
                "id": seg_id,
                "category_id": category_id,
                "category_name": category_name,
                "isthing": isthing,
                "score": score,
                "bbox": bbox,
                "caption": str(segment.get("caption") or ""),
                "area": int(xs.size),
            }
        )
    return kept_seg, records


def _atomic_write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)


def run_on_image(predictor: DefaultPredictor, path: str, output_dir: str, confidence: float):
    """Predict, draw and save one image; returns the JSON record written."""
    image = read_image(path, format="RGB")  # DatasetError names the file if unreadable
    height, width = image.shape[:2]
    outputs = predictor(image)
    if "panoptic_seg" not in outputs:
        raise KeyError(
            f"{path}: the model output has no 'panoptic_seg' (keys: {sorted(outputs)}); "
            "the demo needs a panoptic model"
        )
    panoptic_seg, segments_info = outputs["panoptic_seg"]
    seg = _as_numpy_seg(panoptic_seg, height, width, path)
    kept_seg, segments = segments_to_records(seg, segments_info, predictor.metadata, confidence)
    drawn = Visualizer(image, predictor.metadata).draw_panoptic_seg(kept_seg, segments)

    stem = os.path.splitext(os.path.basename(path))[0]
    record = {"file_name": path, "height": height, "width": width, "segments": segments}
    save_rgb_png(drawn, os.path.join(output_dir, f"{stem}.png"))
    _atomic_write_text(os.path.join(output_dir, f"{stem}.json"), json.dumps(record, indent=2))
    return record


def main(args) -> list[dict]:
    """Run the demo; returns the JSON records of the images written."""
    setup_logger(name="pix2cap")
    cfg = setup_cfg(args)
    paths = collect_images(args.input)
    os.makedirs(args.output, exist_ok=True)
    predictor = DefaultPredictor(cfg)
    records, failed = [], []
    for path in paths:
        try:
            record = run_on_image(predictor, path, args.output, args.confidence)
        except DatasetError as e:
            # An unreadable image must not cost the results of the others.
            logger.error("%s", e)
            failed.append(str(e))
            continue
        records.append(record)
        logger.info("%s: %d segments", path, len(record["segments"]))
    if failed:
        # Each message starts with the unreadable file's path.
        raise DatasetError(
            f"{len(failed)} of {len(paths)} image(s) could not be read: " + "; ".join(failed)
        )
    return records


if __name__ == "__main__":
    parsed = get_parser().parse_args()
    try:
        main(parsed)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
