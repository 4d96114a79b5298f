"""Training pairs from decoded segments: IoU box alignment, the output cache, the pairs."""

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.bridge import (
    CachedDecoder,
    PromptFormat,
    align_to_mentions,
    make_decoded_training_pairs,
)
from pix2cap.bridge.decoded_pairs import model_cache_key
from pix2cap.config import get_cfg
from tests.tools.test_pancap_infer import H, W, FakePredictor


def _box(b):
    return f"<box>[[{b[0]}, {b[1]}, {b[2]}, {b[3]}]]</box>"


def test_align_to_mentions_by_iou_snaps_at_the_threshold_and_orders_by_mention():
    square, circle = [200, 200, 400, 400], [0, 0, 100, 100]
    target = (
        f"A circle {_box([10, 10, 100, 100])} is left of a square {_box([250, 250, 450, 450])}. "
        f"The square {_box([200, 200, 400, 300])} is red. A moon {_box([0, 0, 60, 60])} shines."
    )
    order, aligned = align_to_mentions([square, circle], target, min_iou=0.5)
    # IoU 0.81 with the circle: snapped; 0.39 with the square: kept; exactly 0.5 with the
    # square: snapped; 0.36 with the circle: kept. The circle opens the caption, so it is first.
    assert aligned == (
        f"A circle {_box(circle)} is left of a square {_box([250, 250, 450, 450])}. "
        f"The square {_box(square)} is red. A moon {_box([0, 0, 60, 60])} shines."
    )
    assert order == [1, 0]
    # The coordinate rule (the default) snaps none of these: no box is within 3 units.
    assert align_to_mentions([square, circle], target) == ([0, 1], target)
    with pytest.raises(ValueError, match="min_iou"):
        align_to_mentions([square], target, min_iou=0.0)


def _image(path):
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cached_decoder_runs_the_model_once_per_image_and_round_trips_outputs(tmp_path):
    image = _image(tmp_path / "a.png")
    predictor = FakePredictor()

    def numpy_scalars(image):
        # Model outputs may carry numpy and 0-d tensor scalars in segments_info.
        output = predictor(image)
        for info in output["panoptic_seg"][1]:
            info["score"], info["id"] = np.float64(info["score"]), torch.tensor(info["id"])
        return output

    decoder = CachedDecoder(
        lambda: numpy_scalars, tmp_path / "cache", "ab" * 32, describe={"weights": "w"}
    )
    fresh = decoder(image)
    assert (decoder.runs, decoder.hits, predictor.calls) == (1, 0, 1)
    assert (tmp_path / "cache" / ("ab" * 8) / "model.json").is_file()

    # A new decoder over the same cache builds no model and returns the same output.
    again = CachedDecoder(lambda: pytest.fail("the model was built"), tmp_path / "cache", "ab" * 32)
    cached = again(image)
    assert (again.runs, again.hits) == (0, 1)
    assert torch.equal(cached["panoptic_seg"][0], fresh["panoptic_seg"][0].to(torch.int32))
    assert cached["panoptic_seg"][1] == [
        {**info, "id": int(info["id"]), "score": float(info["score"])}
        for info in fresh["panoptic_seg"][1]
    ]
    assert torch.equal(cached["instances"].pred_masks, fresh["instances"].pred_masks)
    assert cached["instances"].scores.tolist() == pytest.approx([0.95, 0.6])
    assert cached["instances"].pred_classes.tolist() == [0, 1]

    # Another model key or a changed image file is another entry.
    other = CachedDecoder(lambda: predictor, tmp_path / "cache", "cd" * 32)
    other(image)
    assert other.runs == 1
    # (Noise compresses worse: a new size even where mtimes are coarse.)
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image)
    changed = CachedDecoder(lambda: predictor, tmp_path / "cache", "ab" * 32)
    changed(image)
    assert (changed.runs, changed.hits) == (1, 0)


def test_model_cache_key_follows_weights_content_not_path_or_device(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights one")
    copy = tmp_path / "copy.pth"
    copy.write_bytes(b"weights one")

    def cfg(path, device="cpu", threshold=0.5):
        c = get_cfg()
        c.MODEL.WEIGHTS = str(path)
        c.MODEL.DEVICE = device
        c.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = threshold
        return c

    key = model_cache_key(cfg(weights))
    assert model_cache_key(cfg(copy, device="cuda")) == key
    assert model_cache_key(cfg(weights, threshold=0.8)) != key
    copy.write_bytes(b"weights two")
    assert model_cache_key(cfg(copy)) != key
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        model_cache_key(cfg(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        model_cache_key(cfg(""))


def test_decoded_pairs_list_the_decoded_entities_and_align_caption_boxes(tmp_path, caplog):
    image = _image(tmp_path / "a.png")
    decoder = CachedDecoder(FakePredictor, tmp_path / "cache", "ef" * 32)
    metadata = FakePredictor().metadata
    caption = (
        "A circle [[0.1, 0.35, 0.4, 0.7]] is in the sky [[0.0, 0.0, 1.0, 0.667]]. "
        "Grass [[0.0, 0.6, 1.0, 1.0]] covers the bottom. A square [[0.6, 0.15, 0.9, 0.4]] "
        "floats. A bird [[0.8, 0.8, 0.9, 0.9]] flies."
    )
    records = [
        {"file_name": image, "image_id": "a", "panoptic_caption": caption},
        {"file_name": image, "image_id": "b"},  # no caption: skipped
    ]
    with caplog.at_level("INFO"):
        pairs = make_decoded_training_pairs(records, decoder, metadata=metadata)
    assert "1 images without a panoptic_caption skipped" in caplog.text
    assert "4 of 5 caption boxes aligned" in caplog.text
    (pair,) = pairs
    # Decoded grid boxes of the 40 x 30 image (padded to a 40 x 40 square): the segments and
    # the extra instance (the square; the circle's duplicate instance is dropped).
    circle, sky, grass, square = (
        [125, 375, 375, 625], [0, 125, 999, 625], [0, 625, 999, 875], [625, 250, 875, 425]
    )
    # IoUs 0.72 (circle), 1 (sky), 0.83 (grass), 0.78 (square): snapped; the bird overlaps
    # nothing: kept as written.
    assert pair["target"] == (
        f"A circle {_box(circle)} is in the sky {_box(sky)}. Grass {_box(grass)} covers the "
        f"bottom. A square {_box(square)} floats. A bird {_box([800, 725, 900, 800])} flies."
    )
    assert (pair["caption_boxes"], pair["aligned_boxes"], pair["image_id"]) == (5, 4, "a")
    prompt = pair["prompt"]
    # The decoded entities in the caption's order, each with its decoded grid box.
    listed = [f"circle {_box(circle)}", f"sky {_box(sky)}", f"grass {_box(grass)}",
              f"square {_box(square)}"]
    positions = [prompt.index(item) for item in listed]
    assert positions == sorted(positions)
    assert prompt.count("circle <box>") == 2  # once in the list, once beside its caption
    assert "Region captions: 1. circle" in prompt and "a red circle on the grass" in prompt
    # The record without a caption is not decoded.
    assert (decoder.runs, decoder.hits) == (1, 0)

    # The same pairs from the cache; a stricter threshold keeps the circle's box as written.
    strict = make_decoded_training_pairs(records[:1], decoder, metadata=metadata, align_iou=0.75)
    assert (decoder.runs, decoder.hits) == (1, 1)
    assert "<box>[[100, 388, 400, 650]]</box>" in strict[0]["target"]
    assert strict[0]["aligned_boxes"] == 3
    without_captions = PromptFormat(include_dense_captions=False)
    raw = make_decoded_training_pairs(
        records[:1], decoder, metadata=metadata, prompt_format=without_captions
    )
    assert "Region captions" not in raw[0]["prompt"] and raw[0]["target"] == pair["target"]
