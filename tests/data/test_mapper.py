import copy
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.config import get_cfg
from pix2cap.data import detection_utils
from pix2cap.data.detection_utils import read_image, read_panoptic_png
from pix2cap.data.errors import DatasetError
from pix2cap.data.mappers import (
    DATASET_MAPPER_REGISTRY,
    PanopticLSJDatasetMapper,
    PanopticTestDatasetMapper,
    build_dataset_mapper,
)
from pix2cap.data.transforms import FixedSizeCrop, RandomFlip, ResizeScale, ResizeShortestEdge
from pix2cap.structures import Instances

H, W = 24, 32
# id -> (category, iscrowd, x1, y1, x2, y2, description)
SEGMENTS = {
    5: (0, 0, 2, 3, 12, 15, "the dog on the left"),
    300: (1, 0, 18, 2, 30, 10, "a bright red ball, right side"),
    70000: (2, 1, 20, 14, 28, 22, "a crowd"),
    9: (3, 0, 0, 18, 6, 24, None),
}


def _id_map():
    ids = np.zeros((H, W), dtype=np.int64)
    for seg_id, (_, _, x1, y1, x2, y2, _) in SEGMENTS.items():
        ids[y1:y2, x1:x2] = seg_id
    return ids


def _write_png_ids(path, ids):
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=2).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(path)


def _image_array():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _make_dict(tmp_path, **overrides):
    image_path = tmp_path / "img.png"
    png_path = tmp_path / "pan.png"
    Image.fromarray(_image_array()).save(image_path)
    _write_png_ids(png_path, _id_map())
    segments_info = []
    for seg_id, (cat, crowd, x1, y1, x2, y2, desc) in SEGMENTS.items():
        info = {"id": seg_id, "category_id": cat, "isthing": True, "iscrowd": crowd,
                "area": (x2 - x1) * (y2 - y1), "bbox": [x1, y1, x2 - x1, y2 - y1]}
        if desc is not None:
            info["description"] = desc
        segments_info.append(info)
    text = "the dog on the left chases a ball"
    d = {
        "file_name": str(image_path),
        "image_id": 17,
        "height": H,
        "width": W,
        "pan_seg_file_name": str(png_path),
        "segments_info": segments_info,
        "grounded_caption": {
            "raw": "<5:the dog on the left> chases <300:a ball>",
            "text": text,
            "phrases": [
                {"phrase": "the dog on the left", "start": 0, "end": 19, "segment_ids": [5]},
                {"phrase": "a ball", "start": 27, "end": 33, "segment_ids": [300]},
            ],
            "convention": "colon",
        },
        "panoptic_caption": "A dog [[0.062, 0.125, 0.375, 0.625]] stands on the left.",
    }
    d.update(overrides)
    return d


def _mapper(flip_prob=0.0, crop=32, scale=(1.0, 1.0), seed=0):
    # ResizeScale targets 32 (the image's width), so a smaller crop really cuts the image.
    augs = [RandomFlip(prob=flip_prob), ResizeScale(scale[0], scale[1], 32, 32),
            FixedSizeCrop(crop, pad_value=128)]
    return PanopticLSJDatasetMapper(is_train=True, augmentations=augs,
                                    rng=np.random.default_rng(seed))


def test_train_mapper_outputs(tmp_path):
    d = _make_dict(tmp_path)
    before = copy.deepcopy(d)
    out = _mapper()(d)
    assert d == before  # input dict untouched

    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image[:, :H, :], torch.from_numpy(_image_array()).permute(2, 0, 1))
    assert torch.all(image[:, H:, :] == 128)  # LSJ padding
    assert (out["height"], out["width"]) == (H, W)
    assert out["file_name"] == d["file_name"] and out["image_id"] == 17
    assert "segments_info" not in out

    inst = out["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (32, 32)
    assert inst.gt_segment_ids.tolist() == [5, 300, 70000, 9]
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_classes.tolist() == [0, 1, 2, 3]
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (4, 32, 32)
    assert inst.gt_boxes.dtype == torch.float32
    assert inst.gt_boxes.tolist() == [
        [2, 3, 12, 15], [18, 2, 30, 10], [20, 14, 28, 22], [0, 18, 6, 24]
    ]
    assert inst.gt_captions == [
        "the dog on the left", "a bright red ball, right side", "a crowd", ""
    ]
    assert inst.gt_iscrowd.tolist() == [False, False, True, False]

    sem, pan = out["sem_seg"], out["pan_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (32, 32)
    assert pan.dtype == torch.int64 and pan.shape == (32, 32)
    assert sem[5, 5] == 0 and sem[5, 20] == 1 and sem[20, 2] == 3
    assert sem[16, 22] == 255  # crowd
    assert sem[0, 31] == 255 and pan[0, 31] == 0  # VOID
    assert torch.all(sem[H:] == 255) and torch.all(pan[H:] == 0)  # padding
    assert pan[16, 22] == 70000
    assert out["grounded_caption"] == d["grounded_caption"]
    assert out["panoptic_caption"] == d["panoptic_caption"]


def test_flip_rewrites_every_caption(tmp_path):
    d = _make_dict(tmp_path)
    plain = _mapper(flip_prob=0.0)(d)
    out = _mapper(flip_prob=1.0)(d)
    # Image, masks and id map mirrored within the unpadded 32-wide image.
    assert torch.equal(out["image"], plain["image"].flip(-1))
    assert torch.equal(out["pan_seg"], plain["pan_seg"].flip(-1))
    inst = out["instances"]
    assert inst.gt_boxes[0].tolist() == [32 - 12, 3, 32 - 2, 15]
    assert torch.equal(inst.gt_masks, plain["instances"].gt_masks.flip(-1))
    assert inst.gt_captions == [
        "the dog on the right", "a bright red ball, left side", "a crowd", ""
    ]

    gc = out["grounded_caption"]
    assert gc["text"] == "the dog on the right chases a ball"
    assert gc["raw"] == "<5:the dog on the right> chases <300:a ball>"
    for phrase in gc["phrases"]:
        assert gc["text"][phrase["start"]:phrase["end"]] == phrase["phrase"]
    assert [p["phrase"] for p in gc["phrases"]] == ["the dog on the right", "a ball"]
    assert out["panoptic_caption"] == "A dog [[0.625, 0.125, 0.938, 0.625]] stands on the right."
    assert d["grounded_caption"]["text"] == "the dog on the left chases a ball"


def test_crop_drops_vanished_segments_with_their_captions(tmp_path):
    d = _make_dict(tmp_path)
    captions = {seg_id: (desc or "") for seg_id, (*_, desc) in SEGMENTS.items()}
    dropped_any = False
    for seed in range(8):
        out = _mapper(crop=12, seed=seed)(d)
        inst = out["instances"]
        present = set(torch.unique(out["pan_seg"]).tolist()) - {0}
        assert set(inst.gt_segment_ids.tolist()) == present
        assert inst.gt_captions == [captions[i] for i in inst.gt_segment_ids.tolist()]
        assert len(inst.gt_captions) == len(inst) == inst.gt_masks.shape[0]
        assert torch.all(inst.gt_masks.flatten(1).any(dim=1))
        dropped_any |= len(inst) < len(SEGMENTS)
    assert dropped_any


def test_test_mapper_resizes_image_only(tmp_path):
    d = _make_dict(tmp_path)
    mapper = PanopticTestDatasetMapper(augmentations=[ResizeShortestEdge(48, 1000)])
    out = mapper(d)
    assert out["image"].shape == (3, 48, 64) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (H, W)
    assert out["pan_seg_file_name"] == d["pan_seg_file_name"]
    assert out["segments_info"] == d["segments_info"]
    assert out["grounded_caption"] == d["grounded_caption"]
    assert "instances" not in out and "sem_seg" not in out
    with pytest.raises(ValueError, match="panoptic_lsj"):
        PanopticTestDatasetMapper(augmentations=[], is_train=True)


def test_mappers_from_config(tmp_path):
    cfg = get_cfg()
    cfg.INPUT.IMAGE_SIZE = 16
    cfg.INPUT.MIN_SIZE_TEST = 12
    assert DATASET_MAPPER_REGISTRY.get("panoptic_lsj") is PanopticLSJDatasetMapper
    assert DATASET_MAPPER_REGISTRY.get("panoptic_test") is PanopticTestDatasetMapper
    train = build_dataset_mapper(cfg, is_train=True)
    test = build_dataset_mapper(cfg, is_train=False)
    assert isinstance(train, PanopticLSJDatasetMapper) and train.is_train
    assert isinstance(test, PanopticTestDatasetMapper) and not test.is_train
    d = _make_dict(tmp_path)
    assert train(d)["image"].shape == (3, 16, 16)
    assert test(d)["image"].shape == (3, 12, 16)
    cfg.INPUT.RANDOM_FLIP = "none"
    assert not any(isinstance(a, RandomFlip) for a in PanopticLSJDatasetMapper(cfg).augmentations)


# ------------------------------------------------------------------------------------------
# Bad inputs: every error names the file and the problem
# ------------------------------------------------------------------------------------------
def test_missing_image(tmp_path):
    d = _make_dict(tmp_path, file_name=str(tmp_path / "nope.jpg"))
    with pytest.raises(DatasetError, match=r"nope\.jpg: file not found"):
        _mapper()(d)


def test_missing_png(tmp_path):
    d = _make_dict(tmp_path, pan_seg_file_name=str(tmp_path / "gone.png"))
    with pytest.raises(DatasetError, match=r"gone\.png: file not found"):
        _mapper()(d)


def test_corrupt_image(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    d = _make_dict(tmp_path, file_name=str(bad))
    with pytest.raises(DatasetError, match=r"corrupt\.jpg: .*corrupt"):
        _mapper()(d)


def test_truncated_image(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(_image_array()).save(full, quality=95)
    data = full.read_bytes()
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"truncated\.jpg: corrupt or truncated"):
        read_image(cut)
    d = _make_dict(tmp_path, file_name=str(cut))
    with pytest.raises(DatasetError, match=r"truncated\.jpg"):
        _mapper()(d)


def test_truncated_png(tmp_path):
    d = _make_dict(tmp_path)
    data = open(d["pan_seg_file_name"], "rb").read()
    cut = tmp_path / "cut_pan.png"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(DatasetError, match=r"cut_pan\.png: "):
        read_panoptic_png(cut)


def test_grayscale_image_converted_with_warning(tmp_path, caplog):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    path = tmp_path / "gray.jpg"
    Image.fromarray(gray, mode="L").save(path, quality=100)
    detection_utils.reset_converted_image_count()
    with caplog.at_level(logging.WARNING, logger="pix2cap.data.detection_utils"):
        out = _mapper()(_make_dict(tmp_path, file_name=str(path)))
    assert out["image"].shape == (3, 32, 32)
    img = out["image"][:, :H, :]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # gray replicated
    assert detection_utils.num_converted_images() == 1
    assert any("gray.jpg" in r.getMessage() and "mode L" in r.getMessage() for r in caplog.records)


def test_rgba_image_composited_over_black(tmp_path, caplog):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:, :4, 3] = 0  # fully transparent strip
    rgba[:, 4:8, 3] = 128
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    detection_utils.reset_converted_image_count()
    with caplog.at_level(logging.WARNING, logger="pix2cap.data.detection_utils"):
        image = read_image(path)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert np.all(image[:, :4] == 0)
    assert np.all(image[:, 4:8, 0] == 100)
    assert np.all(image[:, 8:, 0] == 200)
    assert detection_utils.num_converted_images() == 1
    assert any("rgba.png" in r.getMessage() for r in caplog.records)


def test_exif_orientation_applied(tmp_path):
    array = np.zeros((10, 20, 3), dtype=np.uint8)  # stored 10 high, 20 wide
    array[0, 0] = 255
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    out = read_image(path)
    assert out.shape == (20, 10, 3)
    assert out[0, -1].mean() > 200  # top-left pixel moved to the top-right corner
    assert read_image(path, format="BGR").shape == (20, 10, 3)


def test_size_mismatch(tmp_path):
    d = _make_dict(tmp_path, height=H + 1)
    with pytest.raises(DatasetError, match=r"img\.png: image is 24x32 .* annotation says 25x32"):
        _mapper()(d)


def test_png_size_differs_from_image(tmp_path):
    d = _make_dict(tmp_path)
    _write_png_ids(d["pan_seg_file_name"], np.zeros((H, W + 2), dtype=np.int64))
    with pytest.raises(DatasetError, match=r"pan\.png: panoptic PNG is 24x34"):
        _mapper()(d)


def test_segment_ids_absent_from_png(tmp_path):
    d = _make_dict(tmp_path)
    d["segments_info"].append({"id": 4242, "category_id": 0, "iscrowd": 0})
    with pytest.raises(DatasetError, match=r"pan\.png: segment id\(s\) \[4242\]"):
        _mapper()(d)


def test_panoptic_png_not_rgb(tmp_path):
    d = _make_dict(tmp_path)
    Image.fromarray(np.zeros((H, W), dtype=np.uint8), mode="L").save(d["pan_seg_file_name"])
    with pytest.raises(DatasetError, match=r"pan\.png: panoptic PNG must be 8-bit RGB.*mode L"):
        _mapper()(d)


def test_unexpected_errors_name_the_image(tmp_path):
    d = _make_dict(tmp_path)
    del d["segments_info"][0]["category_id"]
    with pytest.raises(DatasetError, match=r"img\.png: cannot map this image: KeyError") as info:
        _mapper()(d)
    assert isinstance(info.value.__cause__, KeyError)
