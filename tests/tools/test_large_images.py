"""Images above INPUT.MAX_IMAGE_PIXELS or PIL's decompression-bomb limit in the tools: each is
reported by name and the run goes on with the next image."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from pix2cap.config import get_cfg
from pix2cap.data.errors import DatasetError

from .test_demo import setup  # noqa: F401  (the demo with its fake model and two images)
from .test_pancap_infer import FakePredictor, _load_tool, _write_images


def test_demo_names_an_oversize_image_and_writes_the_others(setup):  # noqa: F811
    demo, config, images, out = setup
    # a.png is 40 x 48 (1920 pixels), b.jpg 48 x 40; big.png has 3000 pixels.
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(images / "big.png")
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", str(images), "--output", str(out),
         "INPUT.MAX_IMAGE_PIXELS", "2500"]
    )
    with pytest.raises(DatasetError, match=r"big\.png: 60x50: 0\.003 megapixels is above the "
                       r"limit 0\.0025 \(INPUT\.MAX_IMAGE_PIXELS\)"):
        demo.main(args)
    assert {"a.json", "a.png", "b.json", "b.png"} <= set(os.listdir(out))
    assert not (out / "big.json").exists()
    assert json.loads((out / "a.json").read_text())["height"] == 40


class _PredictorWithConfig(FakePredictor):
    """The fake predictor with a config, as DefaultPredictor has: its limit applies."""

    def __init__(self, max_pixels):
        super().__init__()
        self.cfg = get_cfg()
        self.cfg.INPUT.MAX_IMAGE_PIXELS = max_pixels


def _run_pancap_infer(tmp_path, predictor):
    tool = _load_tool()
    _write_images(tmp_path / "images", 2)  # 30 x 40 each: 1200 pixels
    big = tmp_path / "images" / "big.png"
    Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8)).save(big)  # 4800 pixels
    out = tmp_path / "out"
    args = tool.get_parser().parse_args(["--input", str(tmp_path / "images"), "--output", str(out)])
    with pytest.raises(DatasetError) as raised:
        tool.main(args, predictor=predictor)
    # The two readable images were captioned; the big one was never given to the model.
    assert len(json.loads((out / "predictions.json").read_text())) == 2
    assert predictor.calls == 2
    return str(raised.value)


def test_pancap_infer_reports_pil_decompression_bombs_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL refuses above 4000 pixels
    message = _run_pancap_infer(tmp_path, FakePredictor())
    assert "big.png: refused as a possible decompression bomb" in message


def test_pancap_infer_applies_the_predictors_config_limit(tmp_path):
    message = _run_pancap_infer(tmp_path, _PredictorWithConfig(max_pixels=2000))
    assert "big.png: 80x60: 0.0048 megapixels is above the limit 0.002" in message
