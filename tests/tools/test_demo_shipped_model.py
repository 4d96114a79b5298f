"""tools/demo.py with the shipped shapes model on images it has never seen."""

import importlib.util
import json
from pathlib import Path

import pytest

from pix2cap.data.datasets.shapes import generate_shapes
from pix2cap.data.detection_utils import read_panoptic_png

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "model_zoo" / "shapes" / "pix2cap_effl0.safetensors"
CONFIG = REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"


def _demo_module():
    spec = importlib.util.spec_from_file_location("pix2cap_demo", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_on_shipped_model_segments_and_captions_unseen_images(tmp_path, datasets_root):
    # A split with a seed the training split never used: new scenes from the same generator.
    root = tmp_path / "fresh"
    generate_shapes(str(root), "val", num_images=8, image_size=256, seed=12345)
    gt = json.loads((root / "annotations" / "pix2cap_val.json").read_text())
    out = tmp_path / "out"
    demo = _demo_module()
    args = demo.get_parser().parse_args(
        ["--config-file", str(CONFIG), "--input", str(root / "images" / "val"),
         "--output", str(out), "--confidence", "0", "MODEL.WEIGHTS", str(WEIGHTS), "DATALOADER.NUM_WORKERS", "0"]
    )
    demo.main(args)

    names = {c["id"]: c["name"] for c in gt["categories"]}
    matched = total = captioned_right = 0
    for annotation in gt["annotations"]:
        stem = Path(annotation["file_name"]).stem
        assert (out / f"{stem}.png").stat().st_size > 0
        result = json.loads((out / f"{stem}.json").read_text())
        gt_ids = read_panoptic_png(str(root / "panoptic" / "val" / annotation["file_name"]))
        for segment in annotation["segments_info"]:
            total += 1
            mask = gt_ids == segment["id"]
            gx, gy, gw, gh = segment["bbox"]
            for pred in result["segments"]:
                px, py, pw, ph = pred["bbox"]
                # boxes overlapping by IoU > 0.5 and the same class name
                ix = max(0, min(gx + gw, px + pw) - max(gx, px))
                iy = max(0, min(gy + gh, py + ph) - max(gy, py))
                inter = ix * iy
                iou = inter / (gw * gh + pw * ph - inter)
                if iou > 0.5 and pred["category_name"] == names[segment["category_id"]]:
                    matched += 1
                    assert pred["caption"], "every kept segment is captioned"
                    # the caption names the segment's class (e.g. "... striped circle ...")
                    captioned_right += names[segment["category_id"]] in pred["caption"]
                    break
            assert mask.any()
    # The shipped model finds most segments of unseen images and names their class (measured:
    # 37 of 46 found by box IoU > 0.5 with the right class, all 37 captions name it; a random
    # model finds none).
    assert matched >= 0.7 * total, (matched, total)
    assert captioned_right >= 0.9 * matched, (captioned_right, matched)


@pytest.mark.skipif(not WEIGHTS.exists(), reason="no shipped shapes model")
def test_shipped_model_file_is_small():
    assert WEIGHTS.stat().st_size < 25 * 2**20
