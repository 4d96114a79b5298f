import json
import logging
import os

import pytest

from pix2cap.data.datasets.coconut_pancap import load_coconut_pancap_json
from pix2cap.data.errors import DatasetError
from tests.data.test_caption_formats import spans_are_exact
from tests.data.test_coco_panoptic import make_panoptic_fixture, rewrite_json


@pytest.mark.parametrize("key", ["caption", "grounded_caption", "pancap", "description"])
def test_loader_reads_caption_from_annotation(tmp_path, caplog, key):
    captions = {
        7: {key: "A <300:man> stands on <11:grass> under <5:the sky>."},
        9: {key: "A <0>dog> on <1>grass>."},
    }
    json_file, image_root, panoptic_root = make_panoptic_fixture(
        tmp_path, extra_annotation_keys=captions
    )
    with caplog.at_level(logging.INFO):
        dicts, stats = load_coconut_pancap_json(
            json_file, image_root, panoptic_root, return_stats=True
        )
    assert f"Loaded 2 images from {json_file}" in caplog.text
    assert (
        "3 as segment ids, 2 as 0-based indices, 0 as 1-based indices, 0 unresolved" in caplog.text
    )
    first, second = dicts
    assert first["grounded_caption"]["text"] == "A man stands on grass under the sky."
    assert [p["segment_ids"] for p in first["grounded_caption"]["phrases"]] == [[300], [11], [5]]
    assert second["grounded_caption"]["convention"] == "index0"
    assert [p["segment_ids"] for p in second["grounded_caption"]["phrases"]] == [[2], [4]]
    assert stats["segment_id"] == 3 and stats["index0"] == 2 and stats["unresolved"] == 0
    assert stats["captions_segment_id"] == 1 and stats["captions_index0"] == 1
    # The panoptic part is the COCO panoptic loader's.
    assert [s["category_id"] for s in first["segments_info"]] == [0, 125, 119]


def test_loader_keeps_images_without_caption(tmp_path):
    json_file, image_root, panoptic_root = make_panoptic_fixture(
        tmp_path, extra_annotation_keys={9: {"caption": "<2:dog>"}}
    )
    dicts, stats = load_coconut_pancap_json(json_file, image_root, panoptic_root, return_stats=True)
    assert "grounded_caption" not in dicts[0]
    assert dicts[1]["grounded_caption"]["phrases"][0]["segment_ids"] == [2]
    assert stats["images_without_caption"] == 1
    assert load_coconut_pancap_json(json_file, image_root, panoptic_root)[1]["grounded_caption"]


def test_loader_reads_separate_caption_file(tmp_path):
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path)
    as_list = tmp_path / "captions_list.json"
    as_list.write_text(
        json.dumps(
            [
                {"image_id": 7, "caption": "<300:a man>"},
                {"file_name": "000000000009.jpg", "caption": "<2:a dog>"},
            ]
        )
    )
    dicts = load_coconut_pancap_json(json_file, image_root, panoptic_root, caption_file=as_list)
    assert [d["grounded_caption"]["text"] for d in dicts] == ["a man", "a dog"]
    as_dict = tmp_path / "captions_dict.json"
    as_dict.write_text(json.dumps({"7": "<1>grass>", "9": "<4:grass>"}))
    dicts = load_coconut_pancap_json(json_file, image_root, panoptic_root, caption_file=as_dict)
    assert [d["grounded_caption"]["phrases"][0]["segment_ids"] for d in dicts] == [[11], [4]]


def test_loader_errors_name_the_file(tmp_path):
    json_file, image_root, panoptic_root = make_panoptic_fixture(
        tmp_path, extra_annotation_keys={7: {"caption": ["not", "text"]}}
    )
    with pytest.raises(DatasetError) as info:
        load_coconut_pancap_json(json_file, image_root, panoptic_root)
    assert str(info.value).startswith(json_file + ": ")
    assert "caption of image_id 7 ('caption') is not a string" in str(info.value)

    rewrite_json(json_file, lambda d: d["annotations"][0].pop("caption"))
    bad = tmp_path / "bad_captions.json"
    bad.write_text(json.dumps([{"image_id": 7}]))
    with pytest.raises(DatasetError, match=r"bad_captions\.json: entry \[0\] has no key 'caption'"):
        load_coconut_pancap_json(json_file, image_root, panoptic_root, caption_file=bad)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DatasetError, match=r"broken\.json: caption file is not valid JSON"):
        load_coconut_pancap_json(json_file, image_root, panoptic_root, caption_file=broken)
    rewrite_json(json_file, lambda d: d["annotations"][1]["segments_info"][1].update(id=2))
    with pytest.raises(DatasetError, match="duplicate segment id 2"):
        load_coconut_pancap_json(json_file, image_root, panoptic_root)


def test_generator_output_loads(tmp_path):
    from pix2cap.data.datasets.shapes import generate_shapes

    root = str(tmp_path / "shapes")
    generate_shapes(root, "train", num_images=5, image_size=64, seed=1)
    dicts, stats = load_coconut_pancap_json(
        os.path.join(root, "annotations", "coconut_pancap_train.json"),
        os.path.join(root, "images", "train"),
        os.path.join(root, "panoptic", "train"),
        return_stats=True,
    )
    assert len(dicts) == 5
    assert stats["unresolved"] == 0 and stats["segment_id"] > 0
    assert stats["captions_segment_id"] == 5
    for record in dicts:
        caption = record["grounded_caption"]
        assert caption["convention"] == "segment_id"
        assert "<" not in caption["text"] and caption["phrases"]
        assert spans_are_exact(caption)
        segment_ids = {s["id"] for s in record["segments_info"]}
        for phrase in caption["phrases"]:
            assert phrase["segment_ids"] and set(phrase["segment_ids"]) <= segment_ids


def test_a_caption_mixing_id_conventions_is_read_per_tag_and_named(tmp_path, caplog):
    # Image 9 has segments 2 (the dog) and 4 (the grass). "2" is the dog's segment id; "1" is
    # no segment id, only a position. Decided per caption, the 1-based reading (the only one
    # that resolves both ids) swapped them: the dog on segment 4, the grass on segment 2.
    captions = {
        7: {"caption": "A <300:man> stands on <11:grass> under <5:Light blue sky>."},
        9: {"caption": "A <2:brown dog> sits on <1:green grass>."},
    }
    json_file, image_root, panoptic_root = make_panoptic_fixture(
        tmp_path, extra_annotation_keys=captions
    )
    with caplog.at_level(logging.INFO, logger="pix2cap.data.datasets.coconut_pancap"):
        dicts, stats = load_coconut_pancap_json(
            json_file, image_root, panoptic_root, return_stats=True
        )
    assert [p["segment_ids"] for p in dicts[0]["grounded_caption"]["phrases"]] == [
        [300],
        [11],
        [5],
    ]
    phrases = dicts[1]["grounded_caption"]["phrases"]
    assert [(p["phrase"], p["segment_ids"]) for p in phrases] == [
        ("brown dog", [2]),
        ("green grass", [4]),
    ]
    assert stats["captions_mixed_id_conventions"] == 1 and stats["captions_mixed"] == 1
    assert stats["segment_id"] == 4 and stats["index0"] == 1 and stats["index1"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{json_file}: image_id 9 (000000000009.jpg): its grounding tags mix id conventions, "
        "each tag was read on its own: 'brown dog' (2 as segment id), 'green grass' (1 as "
        "0-based index)"
    ]
    assert "1 captions mix id conventions" in caplog.text
