import json
import logging
import os

import pytest

from pix2cap.data.datasets.coconut_pancap import load_coconut_pancap_json, parse_grounded_caption
from pix2cap.data.errors import DatasetError
from tests.data.test_coco_panoptic import make_panoptic_fixture, rewrite_json


def spans_are_exact(parsed):
    return all(parsed["text"][p["start"] : p["end"]] == p["phrase"] for p in parsed["phrases"])


def test_design_fragment_with_id_zero_is_a_zero_based_index():
    raw = (
        "In the center and right side of the plate, the region represents <0:a serving of French "
        "fries>. The upper left side shows <1: a slice of onion>."
    )
    parsed = parse_grounded_caption(raw, segment_ids=[3, 5, 9])
    assert parsed["raw"] == raw
    assert parsed["text"] == (
        "In the center and right side of the plate, the region represents a serving of "
        "French fries. The upper left side shows a slice of onion."
    )
    assert [p["phrase"] for p in parsed["phrases"]] == [
        "a serving of French fries",
        "a slice of onion",
    ]
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[3], [5]]
    assert [p["tag_ids"] for p in parsed["phrases"]] == [[0], [1]]
    assert parsed["convention"] == "index0"
    assert spans_are_exact(parsed)


def test_segment_ids_single_and_multiple():
    parsed = parse_grounded_caption("A <4:large zebu> beside <6,7,8:eight boys>.", [4, 6, 7, 8])
    assert parsed["text"] == "A large zebu beside eight boys."
    assert [(p["phrase"], p["start"], p["end"], p["segment_ids"]) for p in parsed["phrases"]] == [
        ("large zebu", 2, 12, [4]),
        ("eight boys", 20, 30, [6, 7, 8]),
    ]
    assert parsed["convention"] == "segment_id"
    assert parsed["tag_stats"]["segment_id"] == 2 and parsed["tag_stats"]["unresolved"] == 0


def test_spaces_around_ids_commas_and_colon():
    parsed = parse_grounded_caption("see < 2 , 3 :x> and <1: a slice of onion >!", [1, 2, 3])
    assert parsed["text"] == "see x and a slice of onion!"
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[2, 3], [1]]
    assert [p["phrase"] for p in parsed["phrases"]] == ["x", "a slice of onion"]
    assert parsed["convention"] == "segment_id"
    assert spans_are_exact(parsed)


def test_no_colon_form_is_a_zero_based_index():
    parsed = parse_grounded_caption("A <1>brown dog> sits on <0>green grass>.", [40, 12])
    assert parsed["text"] == "A brown dog sits on green grass."
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[12], [40]]
    assert [p["convention"] for p in parsed["phrases"]] == ["index0", "index0"]
    assert parsed["convention"] == "index0"
    assert parsed["tag_stats"]["index0"] == 2
    assert spans_are_exact(parsed)


def test_one_based_index_when_ids_run_from_1_to_n():
    # Ids 1..3 are not segment ids, and 3 is out of range for 0-based indices.
    parsed = parse_grounded_caption("<1:a> <2:b> <3:c>", [101, 102, 103])
    assert parsed["convention"] == "index1"
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[101], [102], [103]]


def test_ambiguous_indices_prefer_zero_based():
    # 1 and 2 fit both 0-based and 1-based indices over 4 segments: 0-based wins.
    parsed = parse_grounded_caption("<1:a> <2:b>", [50, 60, 70, 80])
    assert parsed["convention"] == "index0"
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[60], [70]]


def test_ids_not_in_the_image_are_unresolved_but_never_crash():
    parsed = parse_grounded_caption("A <2:cat> and a <99:ghost> and <2,77:both>.", [1, 2])
    assert parsed["convention"] == "segment_id"  # resolves 2 of the 4 ids, more than the others
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[2], [], [2]]
    assert parsed["phrases"][1]["phrase"] == "ghost"
    assert parsed["text"] == "A cat and a ghost and both."
    assert parsed["tag_stats"] == {
        "segment_id": 2,
        "index0": 0,
        "index1": 0,
        "unresolved": 1,
        "unresolved_ids": 2,
    }


def test_id_zero_with_too_few_segments_is_unresolved():
    parsed = parse_grounded_caption("<0:void thing>", [])
    assert parsed["phrases"][0]["segment_ids"] == []
    assert parsed["tag_stats"]["unresolved"] == 1
    assert parsed["text"] == "void thing"


def test_unclosed_and_stray_brackets_stay_text():
    raw = "a < b and c > d, <3 unclosed, 5 > 4, <x:word>, <7:> and <2:real one>"
    parsed = parse_grounded_caption(raw, [2])
    assert parsed["text"] == "a < b and c > d, <3 unclosed, 5 > 4, <x:word>, <7:> and real one"
    assert [p["phrase"] for p in parsed["phrases"]] == ["real one"]
    assert parsed["phrases"][0]["segment_ids"] == [2]
    assert spans_are_exact(parsed)


def test_mixed_forms_and_no_segment_ids():
    mixed = parse_grounded_caption("<5:sky> over <0>grass>", [5, 6])
    assert [p["convention"] for p in mixed["phrases"]] == ["segment_id", "index0"]
    assert mixed["convention"] == "mixed"
    assert [p["segment_ids"] for p in mixed["phrases"]] == [[5], [5]]
    unchecked = parse_grounded_caption("<5:sky> over <0>grass>")
    assert unchecked["convention"] == "unresolved"
    assert [p["segment_ids"] for p in unchecked["phrases"]] == [[5], []]
    none = parse_grounded_caption("no tags at all", [1])
    assert none == {
        "raw": "no tags at all",
        "text": "no tags at all",
        "phrases": [],
        "convention": "none",
        "tag_stats": {
            "segment_id": 0,
            "index0": 0,
            "index1": 0,
            "unresolved": 0,
            "unresolved_ids": 0,
        },
    }
    with pytest.raises(TypeError):
        parse_grounded_caption(None)


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
