import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from pix2cap.data.caption_formats import format_box
from pix2cap.data.datasets.sapancap import load_sapancap
from pix2cap.data.errors import DatasetError
from tests.data.test_caption_formats import DESIGN_FRAGMENT, check_spans

def make_sapancap_fixture(root):
    root = str(root)
    paths = ["sam/sa_000005/sa_62400.jpg", "sam/sa_000005/sa_62401.jpg", "sam/sa_000063/sa_1.jpg"]
    for rel in paths:
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(os.path.join(root, rel))
    data_list = os.path.join(root, "sapancap_val_data_list.json")
    with open(data_list, "w") as f:
        json.dump(paths, f)
    gt = os.path.join(root, "sapancap_val_gtcaption.json")
    with open(gt, "w") as f:
        json.dump(
            [
                {"image_path": paths[1], "gt_response": "A dog [[0.1, 0.2, 0.3, 0.4]] runs."},
                {"image_path": paths[0], "gt_response": DESIGN_FRAGMENT},
            ],
            f,
        )
    return data_list, gt, paths


def test_load_hand_written_fixture(tmp_path, caplog):
    data_list, gt, paths = make_sapancap_fixture(tmp_path)
    with caplog.at_level(logging.INFO):
        dicts = load_sapancap(data_list, tmp_path, gt)
    assert f"Loaded 3 images from {data_list}" in caplog.text
    assert "1 images of" in caplog.text  # the third image has no ground truth
    assert [d["image_id"] for d in dicts] == paths
    assert dicts[0]["file_name"] == os.path.join(str(tmp_path), paths[0])
    assert dicts[0]["panoptic_caption"] == DESIGN_FRAGMENT
    assert dicts[0]["panoptic_caption_boxes"][0]["phrase"] == "The woman"
    assert dicts[1]["panoptic_caption_boxes"][0]["box"] == [0.1, 0.2, 0.3, 0.4]
    assert "panoptic_caption" not in dicts[2]
    no_gt = load_sapancap(data_list, tmp_path)
    assert len(no_gt) == 3 and all("panoptic_caption" not in d for d in no_gt)


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_loader_errors_name_the_file(tmp_path):
    data_list, gt, paths = make_sapancap_fixture(tmp_path)

    write(data_list, {"not": "a list"})
    with pytest.raises(
        DatasetError, match=r"sapancap_val_data_list\.json: a data list must be a JSON list"
    ):
        load_sapancap(data_list, tmp_path, gt)
    write(data_list, paths + [paths[0]])
    with pytest.raises(
        DatasetError, match=r"data_list\.json: entry \[3\]: path .* is listed twice"
    ):
        load_sapancap(data_list, tmp_path, gt)
    write(data_list, paths + ["sam/sa_000001/missing.jpg"])
    with pytest.raises(DatasetError) as info:
        load_sapancap(data_list, tmp_path, gt)
    assert str(info.value).startswith(data_list + ": 1 image files named in it are missing under")
    assert "sam/sa_000001/missing.jpg" in str(info.value)

    write(data_list, paths)
    write(gt, [{"image_path": paths[0]}])
    with pytest.raises(
        DatasetError, match=r"gtcaption\.json: entry \[0\] has no key 'gt_response'"
    ):
        load_sapancap(data_list, tmp_path, gt)
    write(
        gt,
        [
            {"image_path": paths[0], "gt_response": "a"},
            {"image_path": "./" + paths[0], "gt_response": "b"},
        ],
    )
    with pytest.raises(DatasetError, match=r"gtcaption\.json: entry \[1\]: a second caption"):
        load_sapancap(data_list, tmp_path, gt)
    with open(gt, "w") as f:
        f.write('[{"image_path": ')
    with pytest.raises(
        DatasetError, match=r"gtcaption\.json: ground-truth caption file is not valid JSON"
    ):
        load_sapancap(data_list, tmp_path, gt)


def test_generator_output_loads(tmp_path):
    from pix2cap.data.datasets.shapes import generate_shapes

    root = str(tmp_path / "shapes")
    generate_shapes(root, "val", num_images=4, image_size=64, seed=2)
    ann = os.path.join(root, "annotations")
    dicts = load_sapancap(
        os.path.join(ann, "sapancap_val_data_list.json"),
        root,
        os.path.join(ann, "sapancap_val_gtcaption.json"),
    )
    with open(os.path.join(ann, "panoptic_val.json")) as f:
        panoptic = json.load(f)
    assert [d["image_id"] for d in dicts] == [f"images/val/{i:06d}.png" for i in range(4)]
    for record, ann_record in zip(dicts, panoptic["annotations"]):
        assert os.path.isfile(record["file_name"])
        boxes = record["panoptic_caption_boxes"]
        assert len(boxes) >= len(ann_record["segments_info"])
        check_spans(record["panoptic_caption"], boxes)
        # Every segment's normalised visible-mask box appears among the caption's boxes.
        written = {format_box(b["box"]) for b in boxes}
        for seg in ann_record["segments_info"]:
            x, y, w, h = seg["bbox"]
            assert format_box([x / 64, y / 64, (x + w) / 64, (y + h) / 64]) in written
