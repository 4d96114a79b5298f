import builtins
import json
import os
import shutil

import pytest

import pix2cap.data.datasets  # noqa: F401  (registers the built-in names)
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.datasets import builtin
from pix2cap.data.datasets.builtin import BUILTIN_DATASETS, get_datasets_root, register_all_builtin
from pix2cap.data.errors import DatasetError
from tests.data.test_coco_panoptic import make_panoptic_fixture


def test_every_builtin_dataset_has_a_registered_evaluator():
    # An evaluator_type without an evaluator would make --eval-only run inference and report
    # nothing.
    from pix2cap.evaluation.build import EVALUATOR_REGISTRY

    for name in BUILTIN_DATASETS:
        evaluator_type = MetadataCatalog.get(name).get("evaluator_type")
        assert evaluator_type in EVALUATOR_REGISTRY, (name, evaluator_type)


@pytest.fixture
def restore_registration():
    """Re-register with the environment's root afterwards, so a pinned root does not leak."""
    yield
    register_all_builtin()


def test_every_builtin_name_is_registered_with_metadata():
    expected = {
        "coco_2017_train_panoptic",
        "coco_2017_val_panoptic",
        "pix2cap_coco_train",
        "pix2cap_coco_val",
        "coconut_pancap_train",
        "coconut_pancap_val",
        "sapancap_train",
        "sapancap_val",
        "sapancap_test",
        "shapes_train",
        "shapes_val",
        "shapes_train_compositional",
        "shapes_val_compositional",
    }
    assert expected == set(BUILTIN_DATASETS)
    assert expected <= set(DatasetCatalog.list())
    evaluator = {
        "coco_2017_val_panoptic": "coco_panoptic_seg",
        "pix2cap_coco_val": "pix2cap",
        "coconut_pancap_val": "coconut_pancap",
        "sapancap_test": "sapancap",
        "shapes_val": "pix2cap",
    }
    for name, kind in evaluator.items():
        assert MetadataCatalog.get(name).evaluator_type == kind
    coco = MetadataCatalog.get("pix2cap_coco_train")
    assert len(coco.thing_classes) == 80 and len(coco.stuff_classes) == 133
    assert coco.stuff_dataset_id_to_contiguous_id[200] == 132
    assert coco.ignore_label == 255 and coco.label_divisor == 1000
    shapes = MetadataCatalog.get("shapes_train")
    assert shapes.thing_classes == ["circle", "square", "triangle", "star"]
    assert shapes.stuff_classes[4:] == ["sky", "wall", "grass", "water", "sand"]
    assert MetadataCatalog.get("shapes_val_compositional").holdout_pairs == [
        ["red", "circle"],
        ["blue", "star"],
    ]


def test_registration_is_lazy_and_repeatable(tmp_path, monkeypatch, restore_registration):
    root = tmp_path / "not_there"

    def no_file_access(*args, **kwargs):
        raise AssertionError(f"registration opened a file: {args!r}")

    monkeypatch.setattr(builtins, "open", no_file_access)
    monkeypatch.setattr(os, "listdir", no_file_access)
    monkeypatch.setattr(os, "stat", no_file_access)  # also behind os.path.isfile / exists
    register_all_builtin(root)
    register_all_builtin(root)  # twice: no "already registered" error
    monkeypatch.undo()
    assert not root.exists()
    assert MetadataCatalog.get("coco_2017_val_panoptic").panoptic_json == os.path.join(
        str(root), "coco", "annotations", "panoptic_val2017.json"
    )
    # Loading (not registering) is what reads files, and it fails clearly here.
    with pytest.raises(DatasetError) as info:
        DatasetCatalog.get("pix2cap_coco_val")
    assert str(info.value) == (
        os.path.join(str(root), "coco", "annotations", "pix2cap_coco_val.json")
        + ": panoptic annotation file does not exist"
    )


def test_environment_root_is_read_at_load_time(datasets_root, restore_registration):
    assert get_datasets_root() == str(datasets_root)
    coco = datasets_root / "coco"
    tmp = datasets_root / "fixture"
    json_file, image_root, panoptic_root = make_panoptic_fixture(
        tmp, descriptions={300: "a man", 11: "x", 5: "sky", 2: "a dog", 4: "grass"}
    )
    (coco / "annotations").mkdir(parents=True)
    shutil.move(json_file, coco / "annotations" / "pix2cap_coco_train.json")
    shutil.move(image_root, coco / "train2017")
    shutil.move(panoptic_root, coco / "panoptic_train2017")
    shutil.rmtree(tmp)

    dicts = DatasetCatalog.get("pix2cap_coco_train")
    # Train drops images with an empty (<3 chars) description: image 7 has "x".
    assert [d["image_id"] for d in dicts] == [9]
    assert dicts[0]["file_name"] == str(coco / "train2017" / "000000000009.jpg")
    assert dicts[0]["segments_info"][0]["description"] == "a dog"
    meta = MetadataCatalog.get("pix2cap_coco_train")
    assert meta.image_root == str(coco / "train2017")
    assert meta.panoptic_root == str(coco / "panoptic_train2017")


def test_explicit_root_is_pinned(tmp_path, monkeypatch, restore_registration):
    monkeypatch.setenv("PIX2CAP_DATASETS", str(tmp_path / "elsewhere"))
    register_all_builtin(tmp_path / "pinned")
    with pytest.raises(DatasetError, match="pinned"):
        DatasetCatalog.get("coco_2017_val_panoptic")


def test_sapancap_builtin_layout(datasets_root):
    from tests.data.test_sapancap import make_sapancap_fixture

    sapancap = datasets_root / "sapancap"
    sapancap.mkdir()
    _, _, paths = make_sapancap_fixture(sapancap)
    dicts = DatasetCatalog.get("sapancap_val")
    assert [d["image_id"] for d in dicts] == paths
    assert dicts[0]["panoptic_caption_boxes"][0]["phrase"] == "The woman"
    # Train without a ground-truth file still loads.
    shutil.copy(
        sapancap / "sapancap_val_data_list.json", sapancap / "sapancap_train_data_list.json"
    )
    assert all("panoptic_caption" not in d for d in DatasetCatalog.get("sapancap_train"))
    assert MetadataCatalog.get("sapancap_train").image_root == str(sapancap)


def test_shapes_are_generated_on_first_use_and_merged(datasets_root):
    from pix2cap.data.datasets.shapes import generate_shapes

    # A split prepared beforehand (small, as datasets/prepare_shapes.py may make it) is used as is.
    generate_shapes(datasets_root / "shapes", "val", num_images=3, image_size=64)
    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == 3
    gt_file = datasets_root / "shapes" / "annotations" / "sapancap_val_gtcaption.json"
    gt_by_path = {e["image_path"]: e["gt_response"] for e in json.loads(gt_file.read_text())}
    for record in dicts:
        assert record["file_name"] == str(
            datasets_root / "shapes" / "images" / "val" / f"{record['image_id']:06d}.png"
        )
        assert all(s["description"] for s in record["segments_info"])
        assert record["grounded_caption"]["convention"] == "segment_id"
        assert record["panoptic_caption"] and record["panoptic_caption_boxes"]
        # image_path is the key of the SA-Pancap ground-truth captions
        assert record["image_path"] == f"images/val/{record['image_id']:06d}.png"
        assert gt_by_path[record["image_path"]] == record["panoptic_caption"]
    meta = MetadataCatalog.get("shapes_val")
    assert meta.panoptic_json == str(datasets_root / "shapes" / "annotations" / "panoptic_val.json")
    assert meta.grounding_tag_stats["unresolved"] == 0
    assert meta.grounding_tag_stats["segment_id"] > 0


def test_missing_shapes_split_is_generated(datasets_root, monkeypatch):
    calls = []
    real_ensure = builtin.ensure_shapes

    def small_ensure(root, split, **kwargs):
        calls.append((root, split, kwargs))
        kwargs.update(num_images=2, image_size=64)  # keep the test fast
        return real_ensure(root, split, **kwargs)

    monkeypatch.setattr(builtin, "ensure_shapes", small_ensure)
    assert not (datasets_root / "shapes").exists()
    dicts = DatasetCatalog.get("shapes_val_compositional")
    assert len(dicts) == 2
    assert calls[0][0] == str(datasets_root / "shapes") and calls[0][1] == "val_compositional"
    assert calls[0][2]["include_holdout_only"] is True
    # Every image holds a thing of a held-out colour-shape pair.
    for record in dicts:
        pairs = {
            (s["attributes"]["color"], s["attributes"]["shape"])
            for s in record["segments_info"]
            if s["isthing"]
        }
        assert pairs & {("red", "circle"), ("blue", "star")}
    # Loaded again: complete, so not regenerated.
    DatasetCatalog.get("shapes_val_compositional")
    assert len(calls) == 1
