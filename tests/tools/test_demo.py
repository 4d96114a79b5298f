"""tools/demo.py end to end with a tiny fake panoptic-captioning model and a saved checkpoint."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pix2cap.checkpoint import Checkpointer
from pix2cap.config import get_cfg
from pix2cap.data.errors import DatasetError
from pix2cap.modeling.meta_arch.build import META_ARCH_REGISTRY

REPO = Path(__file__).resolve().parents[2]
FAKE_ARCH = "_DemoTestFakePanopticCaptioner"
LOADED_SCORE = 0.75  # written into the checkpoint; a fresh model would report 0.0
RUN_FILES = ["a.json", "a.png", "b.json", "b.png", "log.txt", "results.jsonl", "summary.json"]


class _FakePanopticCaptioner(nn.Module):
    """Eval-mode stand-in for a panoptic captioner, at the requested output size:
    id 1 = a circle (left half), id 2 = grass (bottom right), id 3 = sky (top right) with a
    low score. The circle's score is a weight, so it shows whether the checkpoint was loaded.
    """

    seen_inputs: list = []
    grounded = None  # a grounded caption to return with every image, or None

    def __init__(self, cfg):
        super().__init__()
        self.score = nn.Parameter(torch.zeros(()))

    def forward(self, batched_inputs):
        assert not self.training and not torch.is_grad_enabled()
        results = []
        for x in batched_inputs:
            type(self).seen_inputs.append(
                (tuple(x["image"].shape), x["image"].dtype, x["height"], x["width"])
            )
            h, w = x["height"], x["width"]
            seg = torch.zeros((h, w), dtype=torch.int32)
            seg[:, : w // 2] = 1
            seg[h // 2 :, w // 2 :] = 2
            seg[: h // 2, w // 2 :] = 3
            segments = [
                {"id": 1, "category_id": 0, "isthing": True, "score": self.score.detach(),
                 "caption": "a red circle to the left of the grass"},
                {"id": 2, "category_id": 6, "isthing": False, "score": 0.9, "caption": ""},
                {"id": 3, "category_id": 4, "isthing": False, "score": 0.2,
                 "caption": "light blue sky"},
            ]
            results.append({"panoptic_seg": (seg, segments)})
            if type(self).grounded is not None:
                results[-1]["grounded_caption"] = type(self).grounded
        return results


if FAKE_ARCH not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY._do_register(FAKE_ARCH, _FakePanopticCaptioner)


def _load_demo():
    spec = importlib.util.spec_from_file_location("pix2cap_demo_tool", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(tmp_path):
    model = _FakePanopticCaptioner(get_cfg())
    with torch.no_grad():
        model.score.fill_(LOADED_SCORE)
    Checkpointer(model, save_dir=str(tmp_path / "ckpt")).save("fake")
    config = tmp_path / "fake.yaml"
    config.write_text(
        f'MODEL:\n  META_ARCHITECTURE: "{FAKE_ARCH}"\n  DEVICE: "cpu"\n'
        f'  WEIGHTS: "{tmp_path / "ckpt" / "fake.pth"}"\n'
        'DATASETS:\n  TEST: ("shapes_val",)\n'
        "INPUT:\n  MIN_SIZE_TEST: 32\n  MAX_SIZE_TEST: 64\n"
    )
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(images / "b.jpg")
    (images / "notes.txt").write_text("not an image")  # ignored: not .png/.jpg/.jpeg
    _FakePanopticCaptioner.seen_inputs.clear()
    _FakePanopticCaptioner.grounded = None
    yield _load_demo(), config, images, tmp_path / "out"
    _FakePanopticCaptioner.grounded = None


def _expected_segments(h, w):
    half = w // 2
    return [
        {"id": 1, "category_id": 0, "category_name": "circle", "isthing": True,
         "score": LOADED_SCORE, "bbox": [0, 0, half, h],
         "caption": "a red circle to the left of the grass", "area": half * h},
        {"id": 2, "category_id": 6, "category_name": "grass", "isthing": False, "score": 0.9,
         "bbox": [half, h // 2, w - half, h - h // 2], "caption": "",
         "area": (w - half) * (h - h // 2)},
    ]


def test_demo_writes_picture_and_json_per_image(setup):
    demo, config, images, out = setup
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", str(images), "--output", str(out),
         "--confidence", "0.5"]
    )
    records = demo.main(args)
    assert len(records) == 2
    # Per image a picture and a JSON; the run's log, its JSON lines and its summary.
    assert sorted(os.listdir(out)) == RUN_FILES
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records

    for name, (h, w) in (("a.png", (40, 48)), ("b.jpg", (48, 40))):
        stem = name[0]
        data = json.loads((out / f"{stem}.json").read_text())
        assert data["file_name"] == os.path.abspath(images / name)
        assert (data["height"], data["width"]) == (h, w)
        # Segment 3 scores 0.2 < --confidence: left out.
        assert data["segments"] == _expected_segments(h, w)
        picture = np.asarray(Image.open(out / f"{stem}.png"))
        assert picture.shape[1] > w and picture.shape[0] >= h and picture.shape[2] == 3

    # Test-time resize: shortest side 32, uint8 [3, H', W'], original size passed along.
    assert _FakePanopticCaptioner.seen_inputs == [
        ((3, 32, 38), torch.uint8, 40, 48),
        ((3, 38, 32), torch.uint8, 48, 40),
    ]


def test_demo_takes_several_paths_and_confidence(setup):
    demo, config, images, out = setup
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", str(images / "a.png"), str(images / "b.jpg"),
         "--output", str(out), "--confidence", "0.1"]
    )
    records = demo.main(args)
    assert [os.path.basename(r["file_name"]) for r in records] == ["a.png", "b.jpg"]
    assert [s["id"] for s in records[0]["segments"]] == [1, 2, 3]
    assert records[0]["segments"][2]["category_name"] == "sky"


def test_unreadable_image_is_named_and_others_still_written(setup):
    demo, config, images, out = setup
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", str(images), "--output", str(out)]
    )
    with pytest.raises(DatasetError, match="broken.jpg"):
        demo.main(args)
    assert sorted(os.listdir(out)) == RUN_FILES
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["images"], summary["done"], summary["failed"]) == (
        "incomplete", 3, 2, 1
    )
    assert summary["failures"][0]["image"] == str(images / "broken.jpg")


def test_bad_inputs_are_named(setup, tmp_path):
    demo, config, images, out = setup
    missing = tmp_path / "nowhere.png"
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", str(missing), "--output", str(out)]
    )
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        demo.main(args)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "a.jpg")
    with pytest.raises(ValueError, match="a.png.*a.jpg|a.jpg.*a.png"):
        demo.collect_images([str(images / "a.png"), str(other / "a.jpg")])


GROUNDED_TEXT = "A red circle is left of the grass under the sky."


def _run(demo, config, images, out, *flags):
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", str(images / "a.png"), "--output", str(out),
         *flags]
    )
    demo.main(args)
    return json.loads((out / "a.json").read_text()), np.asarray(Image.open(out / "a.png"))


def test_grounded_caption_goes_into_the_json_and_under_the_picture(setup):
    demo, config, images, out = setup
    plain_record, plain_picture = _run(demo, config, images, out)
    assert "grounded_caption" not in plain_record

    _FakePanopticCaptioner.grounded = {
        "text": GROUNDED_TEXT,
        "tagged": "<1:A red circle> is left of <2:the grass> under <3:the sky>.",
        "phrases": [
            {"phrase": "A red circle", "start": 0, "end": 12, "segment_ids": [1],
             "score": torch.tensor(0.75)},
            {"phrase": "the grass", "start": 24, "end": 33, "segment_ids": [2], "score": 0.9},
            # Segment 3 scores below --confidence: not drawn, the phrase is plain text.
            {"phrase": "the sky", "start": 40, "end": 47, "segment_ids": [3], "score": None},
        ],
    }
    record, picture = _run(demo, config, images, out)
    assert record["grounded_caption"] == {
        "text": GROUNDED_TEXT,
        "tagged": "<1:A red circle> is left of <2:the grass> under <3:the sky>.",
        "phrases": [
            {"phrase": "A red circle", "start": 0, "end": 12, "segment_ids": [1], "score": 0.75},
            {"phrase": "the grass", "start": 24, "end": 33, "segment_ids": [2], "score": 0.9},
            {"phrase": "the sky", "start": 40, "end": 47, "segment_ids": [3], "score": None},
        ],
    }
    assert record["segments"] == plain_record["segments"]
    # The caption band under the image makes the picture taller; the image and the caption
    # panel beside it are unchanged.
    assert picture.shape[0] > plain_picture.shape[0] and picture.shape[1] == plain_picture.shape[1]
    np.testing.assert_array_equal(picture[:40], plain_picture[:40])
    np.testing.assert_array_equal(picture[: plain_picture.shape[0], 48:], plain_picture[:, 48:])


@pytest.mark.parametrize("head_output", [False, True])
def test_grounded_baseline_is_composed_from_the_decoded_segments(setup, head_output):
    demo, config, images, out = setup
    if head_output:  # the baseline replaces what the model's head wrote
        _FakePanopticCaptioner.grounded = {"text": "noise", "tagged": "noise", "phrases": []}
    record, _ = _run(demo, config, images, out, "--grounded-writer", "baseline")
    # The grass has no caption and the sky scores below --confidence: one sentence.
    assert record["grounded_caption"]["tagged"] == "<1:A red circle> to the left of <2:the grass>."
    assert record["grounded_caption"]["phrases"][0]["score"] == pytest.approx(LOADED_SCORE)
