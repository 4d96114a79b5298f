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


def test_bad_boxes_are_rejected_counted_and_removed(tmp_path, caplog):
    data_list, gt, paths = make_sapancap_fixture(tmp_path)
    write(
        gt,
        [
            {
                "image_path": paths[0],
                "gt_response": (
                    "A dog [[0.1, 0.2, 0.3, 0.4]] runs past a cat [[-0.2, 0.1, 0.5, 0.6]], a "
                    "tree [[0.5, 0.1, 0.4, 0.6]] and a kite [[0.2, 0.3, 1.5, 0.9]]."
                ),
            },
            {
                "image_path": paths[1],
                "gt_response": (
                    "The sky [[1e309, 0, 1, 0.4]]; a road [[NaN, 0.5, 1, 1]]; a wall "
                    "[[0.1, 0.7, 0.3, 0.2]]; grass [[-0.0004, 0.6, 1.0009, 1.0]]."
                ),
            },
            {"image_path": paths[2], "gt_response": "A lake [[0.0, 0.5, 1.0, 1.0]]."},
        ],
    )
    with caplog.at_level(logging.DEBUG, logger="pix2cap.data.datasets.sapancap"):
        dicts, stats = load_sapancap(data_list, tmp_path, gt, return_stats=True)
    assert stats == {
        "boxes": 3,
        "clamped": 1,
        "rejected": 6,
        "captions_with_rejected_boxes": 2,
        "rejected_malformed": 0,
        "rejected_non_finite": 2,
        "rejected_out_of_range": 2,
        "rejected_inverted": 2,
    }
    # Rejected boxes leave the text and the parsed boxes; their phrases stay.
    assert dicts[0]["panoptic_caption"] == (
        "A dog [[0.1, 0.2, 0.3, 0.4]] runs past a cat, a tree and a kite."
    )
    assert [b["box"] for b in dicts[0]["panoptic_caption_boxes"]] == [[0.1, 0.2, 0.3, 0.4]]
    # A coordinate within 1e-3 of the border is clamped, and rewritten in the text.
    assert dicts[1]["panoptic_caption"] == (
        "The sky; a road; a wall; grass [[0.000, 0.600, 1.000, 1.000]]."
    )
    assert dicts[1]["panoptic_caption_boxes"] == [
        {
            "phrase": "grass",
            "box": [0.0, 0.6, 1.0, 1.0],
            "start": 25,
            "end": 30,
            "box_start": 31,
            "box_end": 61,
        }
    ]
    assert [b["box"] for b in dicts[2]["panoptic_caption_boxes"]] == [[0.0, 0.5, 1.0, 1.0]]
    for record in dicts:
        check_spans(record["panoptic_caption"], record["panoptic_caption_boxes"])

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{gt}: rejected 6 of 9 boxes in 2 captions: 2 non_finite (a coordinate is NaN or "
        "infinite), 2 out_of_range (a coordinate is outside [0, 1]), 2 inverted (x1 > x2 or "
        "y1 > y2); they are removed from panoptic_caption and panoptic_caption_boxes. First: "
        f"{paths[0]}: [[-0.2, 0.1, 0.5, 0.6]] (out_of_range); "
        f"{paths[0]}: [[0.5, 0.1, 0.4, 0.6]] (inverted); "
        f"{paths[0]}: [[0.2, 0.3, 1.5, 0.9]] (out_of_range)"
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert f"{gt}: box rejected and removed, {paths[1]}: [[NaN, 0.5, 1, 1]] (non_finite)" in debug
    assert len([m for m in debug if "box rejected" in m]) == 6
    assert f"{gt}: clamped 1 boxes to [0, 1] (coordinates at most 0.001 outside)" in caplog.text


def test_clean_files_log_no_box_warning(tmp_path, caplog):
    data_list, gt, _ = make_sapancap_fixture(tmp_path)
    with caplog.at_level(logging.INFO):
        _, stats = load_sapancap(data_list, tmp_path, gt, return_stats=True)
    assert stats["rejected"] == 0 and stats["clamped"] == 0 and stats["boxes"] == 2
    assert "rejected" not in caplog.text and "clamped" not in caplog.text
