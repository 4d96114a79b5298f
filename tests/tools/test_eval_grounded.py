"""tools/eval_grounded.py on a tiny shapes split: the model's grounded captions and the
baseline writer's, scored by the same evaluator."""

import importlib.util
import json
from pathlib import Path

import pytest

from pix2cap.data.datasets.shapes import generate_shapes

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"


def _tool():
    spec = importlib.util.spec_from_file_location("eval_grounded", REPO / "tools" / "eval_grounded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_val(datasets_root):
    generate_shapes(str(datasets_root / "shapes"), "val", num_images=4, image_size=64, seed=3)
    return datasets_root


@pytest.mark.parametrize("writer", ["head", "baseline"])
def test_eval_grounded_writes_metrics(tiny_val, tmp_path, writer):
    tool = _tool()
    out = tmp_path / writer
    args = tool.get_parser().parse_args(
        [
            "--config-file", str(CONFIG), "--dataset", "shapes_val", "--writer", writer,
            "--output", str(out),
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "MODEL.GROUNDED_HEAD.MAX_LENGTH", "24", "DATALOADER.NUM_WORKERS", "0",
        ]
    )
    results = tool.main(args)
    task = f"grounded_caption ({writer})"
    metrics = results[task]
    assert metrics["num_images"] == 4 and metrics["images_without_prediction"] == 0
    assert {"mIoU", "recall", "AP50", "CIDEr"} <= set(metrics)
    assert 0.0 <= metrics["recall"] <= 1.0
    written = json.loads((out / "grounded_results.json").read_text())
    assert written[task]["num_images"] == 4
    predictions = json.loads((out / "grounded_caption_predictions.json").read_text())
    assert len(predictions) == 4
    if writer == "baseline":
        # Every phrase the baseline writes is a decoded segment's, tagged with its id.
        for p in predictions:
            for phrase in p["phrases"]:
                assert phrase["segment_ids"] and p["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]


def test_head_writer_needs_a_grounded_head(tiny_val, tmp_path):
    tool = _tool()
    args = tool.get_parser().parse_args(
        [
            "--config-file", str(CONFIG), "--dataset", "shapes_val", "--writer", "head",
            "--output", str(tmp_path), "MODEL.GROUNDED_HEAD.ENABLED", "False",
        ]
    )
    with pytest.raises(ValueError, match="grounded caption head"):
        tool.main(args)
