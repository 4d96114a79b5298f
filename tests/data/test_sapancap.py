import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from pix2cap.data.datasets.sapancap import (
    format_box,
    grid_box_to_normalized,
    load_sapancap,
    parse_pancap_boxes,
    parse_tagged_boxes,
    rewrite_pancap_boxes,
)
from pix2cap.data.errors import DatasetError

DESIGN_FRAGMENT = (
    "The woman [[0.307, 0.213, 0.743, 0.886]] is the central focus of the image. "
    "She is dressed in a black suit jacket, ..."
)


def check_spans(text, items):
    for item in items:
        assert text[item["start"] : item["end"]] == item["phrase"]
        assert text[item["box_start"] : item["box_end"]].startswith("[[")
        assert text[item["box_start"] : item["box_end"]].endswith("]]")


def test_design_fragment():
    boxes = parse_pancap_boxes(DESIGN_FRAGMENT)
    assert boxes == [
        {
            "phrase": "The woman",
            "box": [0.307, 0.213, 0.743, 0.886],
            "start": 0,
            "end": 9,
            "box_start": 10,
            "box_end": 40,
        }
    ]
    assert all(isinstance(v, float) for v in boxes[0]["box"])


def test_markdown_bullets_and_delimiters():
    text = (
        "The image shows:\n"
        "- **A red car** [[0.1,0.2, 0.3 ,0.4]] parked on the left.\n"
        "* a tree [[0.5, 0.1, 0.9, 0.8]]\n"
        "1. Sky [[0.0, 0.0, 1.0, 0.5]]; grass [[0.0,0.5,1,1]], and a dog [[0.5, 0.5, 0.6, 0.6]]\n"
        "  - the lamp post [[0.25, 0.125, 0.5, 0.75]] stands tall. A cat [[0.2, 0.3, 0.4, 0.5]]"
    )
    boxes = parse_pancap_boxes(text)
    assert [b["phrase"] for b in boxes] == [
        "A red car",
        "a tree",
        "Sky",
        "grass",
        "and a dog",
        "the lamp post",
        "A cat",
    ]
    assert boxes[0]["box"] == [0.1, 0.2, 0.3, 0.4]
    assert boxes[3]["box"] == [0.0, 0.5, 1.0, 1.0]
    check_spans(text, boxes)


def test_previous_box_ends_a_phrase():
    text = "A man [[0.1, 0.1, 0.2, 0.2]] holds a cup [[0.3, 0.3, 0.4, 0.4]]"
    boxes = parse_pancap_boxes(text)
    assert [b["phrase"] for b in boxes] == ["A man", "holds a cup"]
    check_spans(text, boxes)


def test_int_boxes_and_spacing():
    text = "a kite [[1, 2,3 ,   4]] and a bird [[ 0.5 , .25 , 1 , 1.0 ]]"
    boxes = parse_pancap_boxes(text)
    assert [b["box"] for b in boxes] == [[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 1.0, 1.0]]
    assert [b["phrase"] for b in boxes] == ["a kite", "and a bird"]


def test_malformed_boxes_are_skipped_but_end_phrases():
    text = (
        "A hat [[0.1, 0.2, 0.3]] then a bag [[0.1, x, 0.3, 0.4]] and a shoe [[0.1, 0.2, 0.3, 0.4]] "
        "and [[0.1, 0.2, 0.3, 0.4 a broken one and [0.1, 0.2, 0.3, 0.4] single, "
        "a sock [[0.5, 0.5, 0.6, 0.7]]"
    )
    boxes = parse_pancap_boxes(text)
    assert [b["phrase"] for b in boxes] == ["and a shoe", "a sock"]
    assert [b["box"] for b in boxes] == [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.7]]
    assert parse_pancap_boxes("") == []
    assert parse_pancap_boxes("no boxes [[ ]] here [[1,2,3,4,5]]") == []


def test_box_right_after_a_colon_has_an_empty_phrase():
    text = "Objects: [[0.1, 0.2, 0.3, 0.4]]"
    boxes = parse_pancap_boxes(text)
    assert boxes[0]["phrase"] == "" and boxes[0]["start"] == boxes[0]["end"]


def test_format_and_rewrite_boxes():
    assert format_box([0.1024, 0.2, 0.398, 0.502]) == "[[0.102, 0.200, 0.398, 0.502]]"
    assert format_box((0, 1, 1, 1)) == "[[0.000, 1.000, 1.000, 1.000]]"
    with pytest.raises(ValueError):
        format_box([0.1, 0.2])
    flipped = rewrite_pancap_boxes(DESIGN_FRAGMENT, lambda b: [1 - b[2], b[1], 1 - b[0], b[3]])
    assert flipped.startswith("The woman [[0.257, 0.213, 0.693, 0.886]] is the central focus")
    # Round trip: parse -> format reproduces 3-decimal boxes exactly.
    assert rewrite_pancap_boxes(DESIGN_FRAGMENT, lambda b: b) == DESIGN_FRAGMENT


def test_tagged_boxes():
    text = (
        "person <box>[[10, 20, 300, 400]]</box>, red car <box>[[1, 2, 3, 4]]</box>, "
        "<box>[[5,6,7,8]]</box>"
    )
    items = parse_tagged_boxes(text)
    assert [(i["tag"], i["box"]) for i in items] == [
        ("person", [10, 20, 300, 400]),
        ("red car", [1, 2, 3, 4]),
        ("", [5, 6, 7, 8]),
    ]
    assert all(text[i["start"] : i["end"]] == i["tag"] for i in items)
    assert [i["tag"] for i in parse_tagged_boxes("None, dog <box>[[1, 2, 3, 4]]</box>")] == ["dog"]
    assert parse_tagged_boxes("cat <box>[[1, 2, 3]]</box>") == []


def test_grid_box_to_normalized_removes_square_padding():
    # 200x100 image padded to 200x200: the image occupies rows 250..750 of the 1000 grid.
    assert grid_box_to_normalized([0, 250, 1000, 750], 200, 100) == [0.0, 0.0, 1.0, 1.0]
    assert grid_box_to_normalized([500, 500, 750, 600], 200, 100) == [0.5, 0.5, 0.75, 0.7]
    assert grid_box_to_normalized([0, 0, 1000, 1000], 100, 100) == [0.0, 0.0, 1.0, 1.0]


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
