"""tools/pancap_infer.py with a fake predictor injected (no model, no checkpoint)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.data.catalog import DatasetCatalog, Metadata
from pix2cap.data.caption_formats import parse_pancap_boxes
from pix2cap.structures import Instances

REPO = Path(__file__).resolve().parents[2]
H, W = 30, 40


def _load_tool():
    spec = importlib.util.spec_from_file_location("pancap_infer", REPO / "tools" / "pancap_infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakePredictor:
    """id 1 = a circle on the grass, id 2 = grass (bottom), id 3 = sky (top); instances: the
    circle again (a duplicate) and a low-score square (an extra entity)."""

    def __init__(self):
        self.metadata = Metadata(
            name="_fake", stuff_classes=["circle", "square", "grass", "sky-other-merged"],
            thing_classes=["circle", "square"],
        )
        self.calls = 0

    def __call__(self, image):
        assert image.dtype == np.uint8 and image.shape == (H, W, 3)
        self.calls += 1
        seg = torch.full((H, W), 3, dtype=torch.int32)
        seg[20:] = 2
        seg[10:20, 5:15] = 1
        info = [
            {"id": 1, "category_id": 0, "isthing": True, "score": 0.95, "bbox": [5, 10, 10, 10],
             "caption": "a red circle on the grass"},
            {"id": 2, "category_id": 2, "isthing": False, "score": 0.9, "bbox": [0, 20, 40, 10],
             "caption": "green grass"},
            {"id": 3, "category_id": 3, "isthing": False, "score": 0.9, "bbox": [0, 0, 40, 20],
             "caption": "blue sky"},
        ]
        masks = torch.zeros((2, H, W), dtype=torch.bool)
        masks[0, 10:20, 5:15] = True
        masks[1, 5:12, 25:35] = True
        inst = Instances(
            (H, W), pred_masks=masks, scores=torch.tensor([0.95, 0.6]),
            pred_classes=torch.tensor([0, 1]), pred_boxes=torch.zeros(2, 4),
        )
        return {"panoptic_seg": (seg, info), "instances": inst}


def _write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        p = folder / f"img{k}.png"
        Image.fromarray(np.full((H, W, 3), 40 * k, dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_folder_input_template_writer(tmp_path):
    tool = _load_tool()
    _write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    args = tool.get_parser().parse_args(
        ["--input", str(tmp_path / "images"), "--output", str(out), "--writer", "template"]
    )
    predictor = FakePredictor()
    preds, records = tool.main(args, predictor=predictor)
    assert predictor.calls == 2
    written = json.loads((out / "predictions.json").read_text())
    assert written == preds
    assert [set(p) for p in written] == [{"image_path", "model_response", "grounded_caption"}] * 2
    assert written[0]["image_path"].endswith("img0.png")
    caption = written[0]["model_response"]
    # The caption without its boxes, each mention tied to the segment id its box came from.
    grounded = written[0]["grounded_caption"]
    assert "[[" not in grounded["text"] and len(grounded["text"]) < len(caption)
    assert grounded["tagged"].startswith("<3:The blue sky> is overlapping the square and above")
    assert "<1:A red circle> is on <2:the green grass>" in grounded["tagged"]
    assert {p["segment_ids"][0] for p in grounded["phrases"]} == {1, 2, 3}  # not the extra
    for phrase in grounded["phrases"]:
        assert grounded["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]
    boxes = [tuple(b["box"]) for b in parse_pancap_boxes(caption)]
    assert (0.125, 0.333, 0.375, 0.667) in boxes  # the circle
    assert "sky" in caption and "square" in caption  # class name cleaned; the extra entity
    structured = json.loads((out / "structured.json").read_text())
    assert structured == records
    stages = structured[0]["stages"]
    assert set(stages) == {"1", "2", "3", "4"}
    assert stages["2"].startswith("sky <box>[[0, 125, 999, 625]]</box>, ")
    # The duplicate circle is dropped, the square enters stage 3.
    assert structured[0]["stage3_extra"] == "square <box>[[625, 250, 875, 425]]</box>"
    assert stages["3"] == stages["2"] + ", " + structured[0]["stage3_extra"]
    names = [e["name"] for e in structured[0]["structured"]["entities"]]
    assert names == ["sky", "grass", "circle", "square"]  # stuff, then things; reading order
    assert {"entities": [3, 2], "text": "on"} in structured[0]["structured"]["relations"]


def test_dataset_input_uses_image_id(tmp_path):
    tool = _load_tool()
    paths = _write_images(tmp_path / "sam" / "sa_000001", 1)
    name = "_pancap_infer_test_dataset"
    DatasetCatalog.register(
        name, lambda: [{"file_name": str(paths[0]), "image_id": "sam/sa_000001/img0.png"}]
    )
    try:
        args = tool.get_parser().parse_args(["--dataset", name, "--output", str(tmp_path / "o")])
        preds, _ = tool.main(args, predictor=FakePredictor())
    finally:
        DatasetCatalog.remove(name)
    assert preds[0]["image_path"] == "sam/sa_000001/img0.png"


def test_lm_writer_needs_a_path_and_unreadable_image_is_reported(tmp_path):
    tool = _load_tool()
    _write_images(tmp_path / "images", 1)
    args = tool.get_parser().parse_args(
        ["--input", str(tmp_path / "images"), "--output", str(tmp_path / "o"), "--writer", "small_lm"]
    )
    with pytest.raises(ValueError, match="--lm-path"):
        tool.main(args, predictor=FakePredictor())
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"not a png")
    args = tool.get_parser().parse_args(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="broken.png"):
        tool.main(args, predictor=FakePredictor())
    # The readable image was still written.
    assert len(json.loads((tmp_path / "o" / "predictions.json").read_text())) == 1


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], {"constrain_boxes": True, "boxes_follow_names": True, "ground_region_captions": True}),
        (
            ["--box-constraint", "listed", "--region-captions", "raw", "--num-beams", "2"],
            {"constrain_boxes": True, "boxes_follow_names": False, "ground_region_captions": False,
             "num_beams": 2},
        ),
        (["--box-constraint", "free"], {"constrain_boxes": False}),
    ],
)
def test_lm_decoding_flags_reach_the_writer(tmp_path, flags, expected):
    tool = _load_tool()
    lm = REPO / "model_zoo" / "shapes" / "bridge_small_lm"
    args = tool.get_parser().parse_args(
        ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--writer", "small_lm",
         "--lm-path", str(lm)] + flags
    )
    writer = tool.build_writer(args)
    for name, value in expected.items():
        # The region-caption form is part of the writer's prompt format.
        owner = writer.prompt_format if name == "ground_region_captions" else writer
        assert getattr(owner, name) == value, name
