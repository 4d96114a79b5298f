import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from pix2cap.data.datasets.coco_categories import COCO_PANOPTIC_CATEGORIES, coco_panoptic_categories
from pix2cap.data.datasets.coco_panoptic import build_panoptic_metadata, load_coco_panoptic_json
from pix2cap.data.errors import DatasetError

# COCO panoptic ids used by the hand-written fixture and their contiguous class indices
# (80 things first, then the 53 stuff classes, in COCO panoptic order).
PERSON, DOG, SKY, GRASS = 1, 18, 187, 193
CONTIGUOUS = {PERSON: 0, DOG: 16, SKY: 119, GRASS: 125}


def write_panoptic_png(path, segment_map):
    """Write an int array of segment ids as a COCO panoptic PNG (id = R + 256 G + 256^2 B)."""
    ids = np.asarray(segment_map, dtype=np.uint32)
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path)


def make_panoptic_fixture(root, descriptions=None, extra_annotation_keys=None):
    """Two 6x8 images with COCO panoptic PNGs and a JSON in ``root``; returns the paths.

    Image 7: a person (segment 300) on grass (11) under sky (5). Image 9: a dog (2) on grass (4).
    ``descriptions``: optional {segment id: text} written as Pix2Cap-COCO descriptions.
    ``extra_annotation_keys``: optional {image id: {key: value}} added to the annotations.
    """
    root = str(root)
    image_root = os.path.join(root, "images")
    panoptic_root = os.path.join(root, "panoptic")
    os.makedirs(image_root, exist_ok=True)
    seg7 = np.full((6, 8), 11)
    seg7[:2] = 5
    seg7[2:5, 3:5] = 300
    seg9 = np.full((6, 8), 4)
    seg9[1:3, 1:4] = 2
    seg9[0, 7] = 0  # one VOID pixel
    segments = {
        7: [(300, PERSON, [3, 2, 2, 3]), (11, GRASS, [0, 2, 8, 4]), (5, SKY, [0, 0, 8, 2])],
        9: [(2, DOG, [1, 1, 3, 2]), (4, GRASS, [0, 0, 8, 6])],
    }
    images, annotations = [], []
    for image_id, seg_map in ((7, seg7), (9, seg9)):
        name = f"{image_id:012d}"
        Image.fromarray(np.full((6, 8, 3), 40 * (image_id % 5), dtype=np.uint8)).save(
            os.path.join(image_root, name + ".jpg")
        )
        write_panoptic_png(os.path.join(panoptic_root, name + ".png"), seg_map)
        images.append({"id": image_id, "file_name": name + ".jpg", "height": 6, "width": 8})
        infos = []
        for seg_id, cat, bbox in segments[image_id]:
            info = {
                "id": seg_id,
                "category_id": cat,
                "iscrowd": 0,
                "area": int((seg_map == seg_id).sum()),
                "bbox": bbox,
            }
            if descriptions is not None:
                info["description"] = descriptions.get(seg_id, f"segment {seg_id}")
            infos.append(info)
        ann = {"image_id": image_id, "file_name": name + ".png", "segments_info": infos}
        ann.update((extra_annotation_keys or {}).get(image_id, {}))
        annotations.append(ann)
    data = {"images": images, "annotations": annotations, "categories": coco_panoptic_categories()}
    json_file = os.path.join(root, "panoptic.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, image_root, panoptic_root


def rewrite_json(json_file, edit):
    with open(json_file) as f:
        data = json.load(f)
    edit(data)
    with open(json_file, "w") as f:
        json.dump(data, f)


def test_coco_categories_are_the_133_panoptic_classes():
    cats = COCO_PANOPTIC_CATEGORIES
    assert len(cats) == 133
    assert [c["isthing"] for c in cats] == [1] * 80 + [0] * 53
    assert len({c["id"] for c in cats}) == 133
    assert cats[0] == {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]}
    assert cats[79]["name"] == "toothbrush" and cats[79]["id"] == 90
    assert cats[119]["name"] == "sky-other-merged" and cats[119]["color"] == [70, 130, 180]
    assert cats[-1] == {"id": 200, "name": "rug-merged", "isthing": 0, "color": [250, 141, 255]}
    copy = coco_panoptic_categories()
    copy[0]["color"][0] = 0
    assert COCO_PANOPTIC_CATEGORIES[0]["color"][0] == 220


def test_build_panoptic_metadata_follows_detectron2_conventions():
    meta = build_panoptic_metadata(COCO_PANOPTIC_CATEGORIES)
    assert len(meta["thing_classes"]) == 80 and len(meta["stuff_classes"]) == 133
    assert meta["stuff_classes"][:80] == meta["thing_classes"]
    assert meta["thing_dataset_id_to_contiguous_id"][90] == 79
    assert 187 not in meta["thing_dataset_id_to_contiguous_id"]
    assert meta["stuff_dataset_id_to_contiguous_id"][187] == 119
    assert meta["stuff_dataset_id_to_contiguous_id"][1] == 0
    assert meta["stuff_colors"][119] == [70, 130, 180]
    assert meta["ignore_label"] == 255 and meta["label_divisor"] == 1000
    # Things come first even when the input interleaves them.
    mixed = build_panoptic_metadata(
        [{"id": 9, "name": "sky", "isthing": 0}, {"id": 3, "name": "cat", "isthing": 1}]
    )
    assert mixed["stuff_classes"] == ["cat", "sky"]
    assert mixed["stuff_dataset_id_to_contiguous_id"] == {3: 0, 9: 1}


def test_load_hand_written_fixture(tmp_path, caplog):
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path)
    with caplog.at_level(logging.INFO):
        dicts = load_coco_panoptic_json(json_file, image_root, panoptic_root)
    assert f"Loaded 2 images from {json_file}" in caplog.text
    assert [d["image_id"] for d in dicts] == [7, 9]
    first = dicts[0]
    assert first["file_name"] == os.path.join(image_root, "000000000007.jpg")
    assert first["pan_seg_file_name"] == os.path.join(panoptic_root, "000000000007.png")
    assert (first["height"], first["width"]) == (6, 8)
    assert [s["id"] for s in first["segments_info"]] == [300, 11, 5]
    assert [s["category_id"] for s in first["segments_info"]] == [0, 125, 119]
    assert [s["dataset_category_id"] for s in first["segments_info"]] == [PERSON, GRASS, SKY]
    assert [s["isthing"] for s in first["segments_info"]] == [True, False, False]
    assert first["segments_info"][0]["area"] == 6 and first["segments_info"][0]["bbox"] == [
        3,
        2,
        2,
        3,
    ]
    assert "description" not in first["segments_info"][0]
    # The PNG really holds the ids segments_info names.
    png = np.asarray(Image.open(first["pan_seg_file_name"]), dtype=np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    assert set(np.unique(ids)) == {5, 11, 300}


def test_meta_mapping_is_used_when_given(tmp_path):
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path)
    meta = {
        "thing_dataset_id_to_contiguous_id": {PERSON: 0, DOG: 1},
        "stuff_dataset_id_to_contiguous_id": {PERSON: 0, DOG: 1, SKY: 2, GRASS: 3},
        "stuff_classes": ["person", "dog", "sky", "grass"],
    }
    dicts = load_coco_panoptic_json(json_file, image_root, panoptic_root, meta)
    assert [s["category_id"] for s in dicts[1]["segments_info"]] == [1, 3]


def test_descriptions_and_empty_description_fallback(tmp_path, caplog):
    descriptions = {
        300: "  a man in a red coat ",
        11: "",
        5: "clear blue sky",
        2: "a brown dog",
        4: "ok",
    }
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path, descriptions)
    with caplog.at_level(logging.INFO):
        dicts = load_coco_panoptic_json(
            json_file, image_root, panoptic_root, with_descriptions=True
        )
    assert len(dicts) == 2
    seg = {s["id"]: s for d in dicts for s in d["segments_info"]}
    assert seg[300]["description"] == "a man in a red coat"
    assert seg[5]["description"] == "clear blue sky"
    # "" and "ok" are shorter than 3 characters: replaced by the class name.
    assert seg[11]["description"] == "grass-merged" and seg[11]["description_is_class_name"]
    assert seg[4]["description"] == "grass-merged"
    assert "description_is_class_name" not in seg[300]
    assert "Replaced 2 empty" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        kept = load_coco_panoptic_json(
            json_file,
            image_root,
            panoptic_root,
            with_descriptions=True,
            drop_empty_descriptions=True,
        )
    assert kept == []  # both images have a segment with an empty description
    assert "Skipped 2 images" in caplog.text


def test_drop_empty_descriptions_keeps_complete_images(tmp_path):
    descriptions = {300: "a man", 11: "green grass", 5: "blue sky", 2: "a dog", 4: " "}
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path, descriptions)
    dicts = load_coco_panoptic_json(
        json_file, image_root, panoptic_root, with_descriptions=True, drop_empty_descriptions=True
    )
    assert [d["image_id"] for d in dicts] == [7]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("annotations"), "the top-level object has no key 'annotations'"),
        (lambda d: d.pop("images"), "the top-level object has no key 'images'"),
        (lambda d: d.pop("categories"), "the top-level object has no key 'categories'"),
        (lambda d: d["images"][1].pop("file_name"), "images[1] has no key 'file_name'"),
        (
            lambda d: d["annotations"][0].pop("segments_info"),
            "annotations[0] has no key 'segments_info'",
        ),
        (
            lambda d: d["annotations"][1]["segments_info"][0].pop("category_id"),
            "annotations[1] (image_id 9) segments_info[0] has no key 'category_id'",
        ),
        (
            lambda d: d["annotations"][1].update(image_id=12345),
            "annotations[1] (image_id 12345) refers to an image that is not in 'images'",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][1].update(category_id=12),
            "unknown category id 12",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][2].update(id=300),
            "annotations[0] (image_id 7): duplicate segment id 300",
        ),
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            "a second annotation for the same image",
        ),
        (
            lambda d: d["images"][0].update(file_name="gone.jpg"),
            "1 image files named in it are missing under",
        ),
        (
            lambda d: d["annotations"][1].update(file_name="gone.png"),
            "1 panoptic PNG files named in it are missing under",
        ),
    ],
)
def test_errors_name_the_file_and_the_problem(tmp_path, edit, expected):
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path)
    rewrite_json(json_file, edit)
    with pytest.raises(DatasetError) as info:
        load_coco_panoptic_json(json_file, image_root, panoptic_root)
    message = str(info.value)
    assert message.startswith(json_file + ": ")
    assert expected in message
    if "missing under" in expected:
        assert "gone." in message


def test_invalid_or_missing_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [,]}')
    with pytest.raises(
        DatasetError, match=r"bad\.json: panoptic annotation file is not valid JSON"
    ):
        load_coco_panoptic_json(bad, tmp_path, tmp_path)
    with pytest.raises(
        DatasetError, match=r"nothing\.json: panoptic annotation file does not exist"
    ):
        load_coco_panoptic_json(tmp_path / "nothing.json", tmp_path, tmp_path)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(DatasetError, match="must be a JSON object"):
        load_coco_panoptic_json(listed, tmp_path, tmp_path)


def test_missing_description_is_an_error(tmp_path):
    json_file, image_root, panoptic_root = make_panoptic_fixture(tmp_path, descriptions={})
    rewrite_json(json_file, lambda d: d["annotations"][1]["segments_info"][1].pop("description"))
    with pytest.raises(DatasetError) as info:
        load_coco_panoptic_json(json_file, image_root, panoptic_root, with_descriptions=True)
    assert "annotations[1] (image_id 9) segments_info[1] has no key 'description'" in str(
        info.value
    )


def test_generator_output_loads(tmp_path):
    from pix2cap.data.datasets.shapes import SHAPES_CATEGORIES, generate_shapes

    root = str(tmp_path / "shapes")
    generate_shapes(root, "val", num_images=4, image_size=64, seed=3)
    image_root = os.path.join(root, "images", "val")
    panoptic_root = os.path.join(root, "panoptic", "val")
    plain = load_coco_panoptic_json(
        os.path.join(root, "annotations", "panoptic_val.json"), image_root, panoptic_root
    )
    described = load_coco_panoptic_json(
        os.path.join(root, "annotations", "pix2cap_val.json"),
        image_root,
        panoptic_root,
        with_descriptions=True,
        drop_empty_descriptions=True,
    )
    assert len(plain) == len(described) == 4
    names = build_panoptic_metadata(SHAPES_CATEGORIES)["stuff_classes"]
    for record in described:
        assert os.path.isfile(record["file_name"]) and os.path.isfile(record["pan_seg_file_name"])
        png = np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in record["segments_info"]}
        for seg in record["segments_info"]:
            assert 0 <= seg["category_id"] < 9
            assert seg["isthing"] == (seg["category_id"] < 4)
            # The caption names the segment's class (shape or stuff word).
            assert names[seg["category_id"]] in seg["description"].lower()
            assert seg["area"] == int((ids == seg["id"]).sum())
            # Structured fields written by the generator are carried through.
            assert "attributes" in seg and "relation" in seg
