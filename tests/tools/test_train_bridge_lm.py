"""tools/train_bridge_lm.py on an SA-Pancap-format dataset without masks: the prompts come
from the shipped shapes model's decoded segments (cached), the LM trains and loads."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from pix2cap.bridge import CachedDecoder, PanopticCaptionBridge, SmallLMWriter
from pix2cap.bridge.decoded_pairs import model_cache_key
from pix2cap.bridge.stages import StageItem
from pix2cap.config import load_cfg
from pix2cap.data.caption_formats import find_grid_boxes, pancap_text_to_grid
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.datasets.shapes import generate_shapes

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "model_zoo" / "shapes" / "pix2cap_effl0.safetensors"
CONFIG = REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "train_bridge_lm", REPO / "tools" / "train_bridge_lm.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sapancap_without_masks(datasets_root):
    """``sapancap_train``: 3 unseen shapes scenes in SA-Pancap's layout, images and captions
    only (the generator's panoptic PNGs and JSONs are deleted)."""
    root = datasets_root / "sapancap"
    generate_shapes(str(root), "train", num_images=3, image_size=256, seed=4242)
    for split_file in ("data_list", "gtcaption"):
        (root / "annotations" / f"sapancap_train_{split_file}.json").rename(
            root / f"sapancap_train_{split_file}.json"
        )
    shutil.rmtree(root / "annotations")
    shutil.rmtree(root / "panoptic")
    (root / "meta.json").unlink()
    return root


def _text_without_boxes(text):
    pieces, cursor = [], 0
    for start, end, _ in find_grid_boxes(text):
        pieces.append(text[cursor:start])
        cursor = end
    return "".join(pieces) + text[cursor:]


def _iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_train_bridge_lm_from_decoded_segments_without_masks(
    sapancap_without_masks, tmp_path, monkeypatch
):
    records = DatasetCatalog.get("sapancap_train")
    assert len(records) == 3 and all(r.get("panoptic_caption") for r in records)
    assert not any("pan_seg_file_name" in r or "segments_info" in r for r in records)
    assert sorted(p.name for p in sapancap_without_masks.rglob("*.json")) == [
        "sapancap_train_data_list.json", "sapancap_train_gtcaption.json"
    ]
    assert not list(sapancap_without_masks.rglob("panoptic*"))

    tool = _load_tool()
    built = []

    class CountingPredictor(tool.DefaultPredictor):
        def __init__(self, cfg):
            built.append(cfg.MODEL.WEIGHTS)
            super().__init__(cfg)

    captured = []

    def capture_pairs(*args, **kwargs):
        pairs = make_pairs(*args, **kwargs)
        captured.append(pairs)
        return pairs

    make_pairs = tool.make_decoded_training_pairs
    monkeypatch.setattr(tool, "DefaultPredictor", CountingPredictor)
    monkeypatch.setattr(tool, "make_decoded_training_pairs", capture_pairs)
    out = tmp_path / "lm"
    argv = [
        "--dataset", "sapancap_train", "--output", str(out), "--steps", "3", "--batch-size", "2",
        "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-target-tokens", "256",
        "--config-file", str(CONFIG), "--weights", str(WEIGHTS), "DATALOADER.NUM_WORKERS", "0",
    ]
    summary = tool.main(argv)
    assert built == [str(WEIGHTS)]
    assert (summary["pairs"], summary["model_runs"], summary["cache_hits"]) == (3, 3, 0)
    cache = Path(summary["cache_dir"])
    assert cache.parent == Path(f"{out}_decoded_cache")
    assert len(list(cache.glob("*.npz"))) == 3
    assert json.loads((cache / "model.json").read_text())["weights"] == str(WEIGHTS)

    # Check every pair against the cached outputs, read without a model.
    cfg = load_cfg(str(CONFIG), ["MODEL.WEIGHTS", str(WEIGHTS), "DATALOADER.NUM_WORKERS", "0"])
    decoder = CachedDecoder(
        lambda: pytest.fail("the cache is incomplete"), cache.parent, model_cache_key(cfg)
    )
    bridge = PanopticCaptionBridge(None, metadata=MetadataCatalog.get("shapes_val"))
    total = aligned = 0
    for record, pair in zip(records, captured[0]):
        output = decoder(record["file_name"])
        segments, extras = bridge.decode(output, (256, 256))
        boxes = [bridge.grid_box(e, 256, 256) for e in segments + extras]
        assert len(segments) >= 3
        # The prompt lists every decoded entity with its decoded grid box.
        for entity, box in zip(segments + extras, boxes):
            assert StageItem(entity.tag, box).text() in pair["prompt"]
        # The target is the ground-truth caption on the grid, each box replaced by its
        # best-IoU decoded box when that IoU is at least 0.5.
        written = pancap_text_to_grid(record["panoptic_caption"], 256, 256)
        gt_boxes = [box for _, _, box in find_grid_boxes(written)]
        target_boxes = [box for _, _, box in find_grid_boxes(pair["target"])]
        assert len(target_boxes) == len(gt_boxes) == pair["caption_boxes"]
        for gt_box, box in zip(gt_boxes, target_boxes):
            best = max(boxes, key=lambda b: _iou(gt_box, b))
            expected = best if _iou(gt_box, best) >= 0.5 else gt_box
            assert box == expected
            aligned += expected == best
        assert _text_without_boxes(pair["target"]) == _text_without_boxes(written)
        total += len(gt_boxes)
    assert (summary["caption_boxes"], summary["aligned_boxes"]) == (total, aligned)
    # The shipped model finds most scene elements: most boxes are aligned.
    assert aligned >= 0.7 * total

    # The trained LM loads with the bridge's writer and writes from a decoded prompt.
    writer = SmallLMWriter(str(out), max_new_tokens=8)
    assert writer.prompt_format == tool.PromptFormat(ground_region_captions=True)
    stages, content = bridge.prepare(segments, extras, (256, 256))
    assert isinstance(writer(content, stages, (256, 256)), str)

    # A second run reads every output from the cache: no model is built.
    again = tool.main(argv)
    assert built == [str(WEIGHTS)]
    assert (again["model_runs"], again["cache_hits"], again["pairs"]) == (0, 3, 3)
    assert [p["target"] for p in captured[1]] == [p["target"] for p in captured[0]]
    assert [p["prompt"] for p in captured[1]] == [p["prompt"] for p in captured[0]]


def test_decoding_flags_need_a_config_and_weights_must_exist(tmp_path):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.main(["--output", str(tmp_path / "lm"), "--weights", "w.pth"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors: weights file not found"):
        tool.main(
            ["--dataset", "shapes_train", "--output", str(tmp_path / "lm"),
             "--config-file", str(CONFIG), "--weights", str(tmp_path / "missing.safetensors")]
        )
