"""Tests of the synthetic shapes generator: files, masks, captions, holdout and atomicity.

The relation checks below re-implement the definitions of the module docstring from the masks
decoded from the panoptic PNGs (scipy for neighbourhoods), independently of the generator code.
"""

import importlib.util
import json
import multiprocessing
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pix2cap.data.datasets import shapes
from pix2cap.data.datasets.shapes import (
    SHAPES_CATEGORIES,
    ensure_shapes,
    generate_shapes,
    parse_holdout_pairs,
    read_shapes_meta,
    render_scene,
    shapes_split_is_complete,
)
from pix2cap.data.text import number_word

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 96
NUM_IMAGES = 24
FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)
BOX_RE = re.compile(r"\[\[([0-9.]+), ([0-9.]+), ([0-9.]+), ([0-9.]+)\]\]")
TAG_RE = re.compile(r"<([0-9,]+):([^<>]+)>")
THING_NAMES = {c["id"]: c["name"] for c in SHAPES_CATEGORIES if c["isthing"]}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, "val", num_images=NUM_IMAGES, image_size=IMAGE_SIZE, seed=7)
    return root


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def decode_png(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def mask_stats(mask):
    ys, xs = np.nonzero(mask)
    return {
        "x0": xs.min(), "x1": xs.max(), "y0": ys.min(), "y1": ys.max(),
        "cx": xs.mean(), "cy": ys.mean(), "w": xs.max() - xs.min() + 1, "h": ys.max() - ys.min() + 1,
    }


def check_left_of(a, b):
    overlap = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) + 1
    return a["cx"] < b["cx"] and overlap <= 0.25 * min(a["w"], b["w"])


def check_above(a, b):
    overlap = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) + 1
    return a["cy"] < b["cy"] and overlap <= 0.25 * min(a["h"], b["h"])


def touches(mask_a, mask_b):
    return bool((ndimage.binary_dilation(mask_a, FOUR_NEIGHBOURS) & mask_b).any())


def ring_stuff_fractions(ids, mask, top_id, bottom_id):
    ring = ndimage.binary_dilation(mask, FOUR_NEIGHBOURS) & ~mask
    top, bottom = int((ids[ring] == top_id).sum()), int((ids[ring] == bottom_id).sum())
    return top, bottom


def normalised_box_text(bbox, size):
    x, y, w, h = bbox
    return "[[{:.3f}, {:.3f}, {:.3f}, {:.3f}]]".format(x / size, y / size, (x + w) / size, (y + h) / size)


def test_layout_and_json_files(shapes_root):
    root = shapes_root
    for sub in ("images/val", "panoptic/val"):
        assert sorted(os.listdir(root / sub)) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    panoptic = load_json(root / "annotations/panoptic_val.json")
    assert set(panoptic) == {"info", "images", "annotations", "categories"}
    assert panoptic["categories"] == SHAPES_CATEGORIES
    assert panoptic["images"][3] == {"id": 3, "file_name": "000003.png", "height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert set(panoptic["annotations"][0]["segments_info"][0]) == {"id", "category_id", "iscrowd", "area", "bbox"}
    data_list = load_json(root / "annotations/sapancap_val_data_list.json")
    assert data_list[:2] == ["images/val/000000.png", "images/val/000001.png"]
    gt = load_json(root / "annotations/sapancap_val_gtcaption.json")
    assert [g["image_path"] for g in gt] == data_list
    assert all((root / p).is_file() for p in data_list)
    meta = read_shapes_meta(root)
    split_meta = meta["splits"]["val"]
    assert (split_meta["split"], split_meta["num_images"], split_meta["image_size"], split_meta["seed"]) == (
        "val", NUM_IMAGES, IMAGE_SIZE, 7)
    assert split_meta["holdout_pairs"] == [] and shapes_split_is_complete(root, "val")
    image = np.asarray(Image.open(root / "images/val/000000.png"))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8


def test_masks_areas_boxes_and_ids(shapes_root):
    root = shapes_root
    pix2cap = load_json(root / "annotations/pix2cap_val.json")
    panoptic = load_json(root / "annotations/panoptic_val.json")
    coconut = load_json(root / "annotations/coconut_pancap_val.json")
    for ann, plain, grounded in zip(pix2cap["annotations"], panoptic["annotations"], coconut["annotations"]):
        ids = decode_png(root / "panoptic/val" / ann["file_name"])
        segments = ann["segments_info"]
        assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in segments)
        assert 0 not in ids
        for seg, seg_plain, seg_grounded in zip(segments, plain["segments_info"], grounded["segments_info"]):
            mask = ids == seg["id"]
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            assert seg["area"] == int(mask.sum()) and seg["bbox"] == bbox
            assert seg_plain == {k: seg[k] for k in ("id", "category_id", "iscrowd", "area", "bbox")}
            assert seg_grounded == seg_plain
            if "z_order" in seg:  # things keep at least 40% of their full area visible
                assert seg["area"] >= 0.4 * seg["full_area"]
                assert seg["area"] >= shapes.min_visible_pixels(IMAGE_SIZE)


def test_every_stated_relation_holds_in_the_png(shapes_root):
    root = shapes_root
    pix2cap = load_json(root / "annotations/pix2cap_val.json")
    seen_types = set()
    for ann in pix2cap["annotations"]:
        ids = decode_png(root / "panoptic/val" / ann["file_name"])
        segments = {s["id"]: s for s in ann["segments_info"]}
        stuff = {s["relation"]["where"]: s["id"] for s in segments.values() if s["relation"]["type"] == "covers"}
        things = {i: s for i, s in segments.items() if "z_order" in s}
        for seg_id, seg in segments.items():
            relation = seg["relation"]
            kind = relation["type"]
            seen_types.add(kind)
            mask = ids == seg_id
            if kind == "covers":
                first, last = mask[0].any(), mask[-1].any()
                assert (first and not last) if relation["where"] == "top" else (last and not first)
                continue
            if kind in ("on", "on_horizon"):
                top, bottom = ring_stuff_fractions(ids, mask, stuff["top"], stuff["bottom"])
                assert top + bottom >= 8
                if kind == "on":
                    target_count = top if relation["target_id"] == stuff["top"] else bottom
                    assert relation["target_id"] in stuff.values()
                    assert target_count >= 0.75 * (top + bottom)
                else:
                    assert relation["target_ids"] == [stuff["top"], stuff["bottom"]]
                    assert min(top, bottom) > 0.25 * (top + bottom)
                continue
            target_id = relation["target_id"]
            assert target_id in things and target_id != seg_id
            a, b = mask_stats(mask), mask_stats(ids == target_id)
            if kind == "left_of":
                assert check_left_of(a, b)
            elif kind == "right_of":
                assert check_left_of(b, a)
            elif kind == "above":
                assert check_above(a, b)
            elif kind == "below":
                assert check_above(b, a)
            elif kind in ("in_front_of", "behind"):
                front, back = (seg, things[target_id]) if kind == "in_front_of" else (things[target_id], seg)
                assert front["z_order"] > back["z_order"]
                assert touches(ids == front["id"], ids == back["id"])
                assert back["area"] < back["full_area"]
            else:
                pytest.fail(f"unknown relation type {kind}")
            # the target phrase names exactly one thing of the image: the target
            words = relation["target_phrase"].split()
            assert words[0] == "the"
            named = [t for t in things.values() if set(words[1:]) <= set(t["attributes"].values())]
            assert [t["id"] for t in named] == [target_id]
    # 24 images exercise most kinds of relation
    assert {"covers", "on", "left_of", "right_of"} <= seen_types and len(seen_types) >= 6


def test_captions_name_attributes_and_use_left_right_only_spatially(shapes_root):
    pix2cap = load_json(shapes_root / "annotations/pix2cap_val.json")
    coconut = load_json(shapes_root / "annotations/coconut_pancap_val.json")
    gt = load_json(shapes_root / "annotations/sapancap_val_gtcaption.json")
    texts = [g["gt_response"] for g in gt] + [a["caption"] for a in coconut["annotations"]]
    for ann in pix2cap["annotations"]:
        for seg in ann["segments_info"]:
            text = seg["description"]
            texts.append(text)
            attrs = seg["attributes"]
            if "z_order" in seg:
                assert THING_NAMES[seg["category_id"]] == attrs["shape"]
                expected = f"a {attrs['size']} {attrs['color']} {attrs['texture']} {attrs['shape']}"
                assert text.startswith(expected)
            else:
                name = next(c["name"] for c in SHAPES_CATEGORIES if c["id"] == seg["category_id"])
                assert text == f"{attrs['color']} {name} covering the {seg['relation']['where']} of the image"
            if "target_phrase" in seg["relation"]:
                assert text.endswith(seg["relation"]["target_phrase"])
    for text in texts:
        for match in re.finditer(r"\w*(left|right)\w*", text):
            assert match.group(0) in ("left", "right")
            assert text[: match.start()].endswith("to the ")


def test_grounded_caption_tags(shapes_root):
    root = shapes_root
    coconut = load_json(root / "annotations/coconut_pancap_val.json")
    pix2cap = load_json(root / "annotations/pix2cap_val.json")
    multi_id_images = 0
    for ann, full in zip(coconut["annotations"], pix2cap["annotations"]):
        png_ids = set(np.unique(decode_png(root / "panoptic/val" / ann["file_name"])).tolist())
        tags = [([int(i) for i in ids.split(",")], phrase) for ids, phrase in TAG_RE.findall(ann["caption"])]
        tagged = {i for ids, _ in tags for i in ids}
        assert tagged <= png_ids and tagged == png_ids  # every segment is grounded at least once
        things = [s for s in full["segments_info"] if "z_order" in s]
        pairs = [(t["attributes"]["color"], t["attributes"]["shape"]) for t in things]
        repeated = {p for p in pairs if pairs.count(p) >= 2}
        for color, shape in repeated:
            group = sorted(t["id"] for t in things if (t["attributes"]["color"], t["attributes"]["shape"]) == (color, shape))
            assert any(sorted(ids) == group and color in phrase and shape in phrase for ids, phrase in tags)
            multi_id_images += 1
        for thing in things:  # the subject phrase of each thing is tagged with its id
            subject = " ".join(thing["description"].split()[:5])
            assert ([thing["id"]], subject[:1].upper() + subject[1:]) in tags
    assert multi_id_images > 0


def test_sapancap_boxes_match_visible_masks(shapes_root):
    root = shapes_root
    gt = load_json(root / "annotations/sapancap_val_gtcaption.json")
    pix2cap = load_json(root / "annotations/pix2cap_val.json")
    for entry, ann in zip(gt, pix2cap["annotations"]):
        text = entry["gt_response"]
        ids = decode_png(root / "panoptic/val" / ann["file_name"])
        boxes = {}
        for seg_id in np.unique(ids):
            ys, xs = np.nonzero(ids == seg_id)
            boxes[int(seg_id)] = "[[{:.3f}, {:.3f}, {:.3f}, {:.3f}]]".format(
                xs.min() / IMAGE_SIZE, ys.min() / IMAGE_SIZE, (xs.max() + 1) / IMAGE_SIZE, (ys.max() + 1) / IMAGE_SIZE)
        written = {m.group(0) for m in BOX_RE.finditer(text)}
        assert written == set(boxes.values())
        for seg in ann["segments_info"]:
            assert normalised_box_text(seg["bbox"], IMAGE_SIZE) == boxes[seg["id"]]
            if "z_order" in seg:  # the subject phrase is followed right away by its box
                subject = " ".join(seg["description"].split()[:5])
                assert f"{subject[:1].upper()}{subject[1:]} {boxes[seg['id']]}" in text
        things = sum(1 for s in ann["segments_info"] if "z_order" in s)
        assert "flat vivid colours" in text and number_word(things) + " object" in text


def test_determinism_and_per_image_independence(tmp_path):
    def files_of(root):
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")
        }

    kwargs = dict(num_images=5, image_size=64, holdout_pairs=[("red", "circle")])
    generate_shapes(tmp_path / "a", "train", seed=3, **kwargs)
    generate_shapes(tmp_path / "b", "train", seed=3, **kwargs)
    generate_shapes(tmp_path / "c", "train", seed=4, **kwargs)
    files_a, files_b, files_c = files_of(tmp_path / "a"), files_of(tmp_path / "b"), files_of(tmp_path / "c")
    assert len(files_a) == 2 * 5 + 5 + 1 and files_a == files_b
    assert files_a["images/train/000000.png"] != files_c["images/train/000000.png"]
    # image k depends only on (seed, split, k), not on how many images are made
    generate_shapes(tmp_path / "d", "train", seed=3, **{**kwargs, "num_images": 2})
    files_d = files_of(tmp_path / "d")
    for k in range(2):
        for sub in ("images", "panoptic"):
            name = f"{sub}/train/{k:06d}.png"
            assert files_d[name] == files_a[name]
    # the same index in another split is another image
    scene_a = render_scene(shapes._image_rng(3, "train", 0), 64)
    scene_b = render_scene(shapes._image_rng(3, "val", 0), 64)
    assert not np.array_equal(scene_a.image, scene_b.image)


def test_holdout_splits(tmp_path):
    held = (("red", "circle"), ("blue", "star"))
    generate_shapes(tmp_path, "train", num_images=15, image_size=64, holdout_pairs=held)
    generate_shapes(tmp_path, "comp_test", num_images=12, image_size=64, holdout_pairs=held,
                    include_holdout_only=True)
    meta = read_shapes_meta(tmp_path)["splits"]
    assert meta["train"]["holdout_pairs"] == [["blue", "star"], ["red", "circle"]]
    assert meta["comp_test"]["include_holdout_only"] is True
    for split, want_holdout in (("train", False), ("comp_test", True)):
        anns = load_json(tmp_path / f"annotations/pix2cap_{split}.json")["annotations"]
        for ann in anns:
            pairs = {(s["attributes"]["color"], s["attributes"]["shape"]) for s in ann["segments_info"] if "z_order" in s}
            assert bool(pairs & set(held)) is want_holdout


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        parse_holdout_pairs("pink:circle")
    with pytest.raises(ValueError, match="colour:shape"):
        parse_holdout_pairs("red-circle")
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(tmp_path, "val", num_images=1, image_size=8)
    with pytest.raises(ValueError, match="holdout"):
        generate_shapes(tmp_path, "val", num_images=1, image_size=64, include_holdout_only=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text("{not json")
    with pytest.raises(shapes.DatasetError, match="meta.json: cannot be read as JSON"):
        ensure_shapes(tmp_path / "broken", "val", num_images=1, image_size=64)


def test_existing_split_is_kept_or_regenerated(tmp_path):
    generate_shapes(tmp_path, "val", num_images=3, image_size=64)
    before = (tmp_path / "images/val/000000.png").stat().st_mtime_ns
    assert ensure_shapes(tmp_path, "val", num_images=3, image_size=64) == os.fspath(tmp_path)
    assert (tmp_path / "images/val/000000.png").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other parameters"):
        generate_shapes(tmp_path, "val", num_images=4, image_size=64)
    ensure_shapes(tmp_path, "val", num_images=4, image_size=64)  # other parameters -> regenerated
    assert len(os.listdir(tmp_path / "images/val")) == 4
    assert read_shapes_meta(tmp_path)["splits"]["val"]["num_images"] == 4


def test_interrupted_generation_leaves_no_complete_split(tmp_path, monkeypatch):
    real_write = shapes._write_image
    calls = {"n": 0}

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shapes, "_write_image", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_shapes(tmp_path, "train", num_images=5, image_size=64)
    assert not shapes_split_is_complete(tmp_path, "train")
    assert not (tmp_path / "images/train").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    monkeypatch.setattr(shapes, "_write_image", real_write)

    # interrupted while moving into place: files there, meta.json not yet updated
    real_update = shapes._update_meta

    def failing_update(root, split, split_meta):
        if split_meta is not None:
            raise KeyboardInterrupt
        return real_update(root, split, split_meta)

    monkeypatch.setattr(shapes, "_update_meta", failing_update)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path, "train", num_images=5, image_size=64)
    assert (tmp_path / "images/train").is_dir() and not shapes_split_is_complete(tmp_path, "train")
    monkeypatch.setattr(shapes, "_update_meta", real_update)

    ensure_shapes(tmp_path, "train", num_images=5, image_size=64)
    assert shapes_split_is_complete(tmp_path, "train", {"num_images": 5})
    assert len(os.listdir(tmp_path / "panoptic/train")) == 5

    # a failed overwrite keeps the complete old split intact
    monkeypatch.setattr(shapes, "_write_image", failing_write)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        generate_shapes(tmp_path, "train", num_images=5, image_size=64, overwrite=True)
    assert shapes_split_is_complete(tmp_path, "train", {"num_images": 5})


def _ensure_in_child(root, out_path):
    returned = ensure_shapes(root, "val", num_images=6, image_size=64, seed=1)
    Path(out_path).write_text(returned)


def test_concurrent_ensure_from_two_processes(tmp_path):
    # fork: the children reuse the parent's imports, so the test stays fast on a busy CPU
    context = multiprocessing.get_context("fork")
    root = tmp_path / "shapes"
    procs = [
        context.Process(target=_ensure_in_child, args=(str(root), str(tmp_path / f"out{k}.txt")))
        for k in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert [(tmp_path / f"out{k}.txt").read_text() for k in range(2)] == [str(root)] * 2
    assert shapes_split_is_complete(root, "val", {"num_images": 6, "seed": 1})
    assert not [p for p in os.listdir(root) if p.startswith((".tmp", ".trash"))]


def test_prepare_shapes_cli(tmp_path, datasets_root):
    spec = importlib.util.spec_from_file_location("prepare_shapes", REPO_ROOT / "datasets/prepare_shapes.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.default_root() == os.path.join(str(datasets_root), "shapes")
    root = tmp_path / "cli"
    args = ["--root", str(root), "--num-train", "3", "--num-val", "2", "--image-size", "64",
            "--holdout", "red:circle"]
    assert cli.main(args) == 0
    meta = read_shapes_meta(root)["splits"]
    assert (meta["train"]["num_images"], meta["val"]["num_images"]) == (3, 2)
    assert meta["val"]["holdout_pairs"] == [["red", "circle"]]
    assert cli.main(args + ["--splits", "comp", "--holdout-only", "--force"]) == 0
    assert read_shapes_meta(root)["splits"]["comp"]["include_holdout_only"] is True
    assert cli.main(["--root", str(root), "--holdout", "pink:circle"]) == 2
