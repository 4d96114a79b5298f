"""Caption truth on hand-made masks: attribute accuracy, relation objects, relation geometry,
memorisation and distinct captions, counted by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.config import get_cfg
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.datasets.coco_panoptic import build_panoptic_metadata
from pix2cap.evaluation import build_evaluator
from pix2cap.evaluation.caption_truth import (
    CaptionVocabulary,
    _Region,
    caption_novelty,
    caption_truth,
    match_things,
    parse_caption,
    relation_holds,
)
from pix2cap.evaluation.densecap_evaluation import DenseCaptionEvaluator, masks_to_rles

H = W = 16
# Contiguous ids: the things first, then the stuff (detectron2's panoptic convention).
CLASSES = ["circle", "square", "triangle", "star", "sky", "grass"]
CIRCLE, SQUARE, TRIANGLE, STAR, SKY, GRASS = range(6)


def box(r0, r1, c0, c1):
    """Bool[H, W] of rows [r0, r1) x columns [c0, c1)."""
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# The scene: sky above row 8, grass below; a red star (left) and a blue circle (right) on the
# grass, a green square in the sky.
STAR_M, CIRCLE_M, SQUARE_M = box(10, 14, 1, 5), box(10, 14, 10, 14), box(2, 5, 6, 10)
SKY_M = box(0, 8, 0, W) & ~SQUARE_M
GRASS_M = box(8, H, 0, W) & ~STAR_M & ~CIRCLE_M
GT_SEGMENTS = [
    # (mask, class, attributes, z_order, full_area)
    (STAR_M, STAR, {"color": "red", "size": "small", "texture": "striped", "shape": "star"}, 0, 16),
    (CIRCLE_M, CIRCLE, {"color": "blue", "size": "large", "texture": "solid", "shape": "circle"}, 1, 16),
    (SQUARE_M, SQUARE, {"color": "green", "size": "medium", "texture": "dotted", "shape": "square"}, 2, 12),
    (SKY_M, SKY, {"color": "light blue", "texture": "smooth"}, None, None),
    (GRASS_M, GRASS, {"color": "green", "texture": "grassy"}, None, None),
]
GT_CAPTIONS = [
    "a small red striped star to the left of the blue circle",
    "a large blue solid circle to the right of the red star",
    "a medium green dotted square in the sky",
    "light blue sky covering the top of the image",
    "green grass covering the bottom of the image",
]

RIGHT = "a small red striped star to the left of the blue circle"
WRONG_COLOUR = "a large green solid circle to the right of the red star"
INVENTED_OBJECT = "a medium green dotted square above the purple triangle"
WRONG_SIDE = "a small red striped star to the right of the blue circle"
NO_RELATION = "a large blue solid circle"
NO_TEXTURE_ON_SKY = "a medium green square in the sky"


def vocabulary():
    vocab = CaptionVocabulary()
    vocab.add_segments({"attributes": attrs} for _, _, attrs, _, _ in GT_SEGMENTS)
    vocab.add_classes(CLASSES, ["sky", "grass"])
    return vocab


def gt_image():
    return {
        "masks": masks_to_rles(np.stack([s[0] for s in GT_SEGMENTS]), "gt"),
        "category_ids": [s[1] for s in GT_SEGMENTS],
        "isthing": [s[1] < SKY for s in GT_SEGMENTS],
        "iscrowd": [0] * len(GT_SEGMENTS),
        "attributes": [s[2] for s in GT_SEGMENTS],
        "z_order": [s[3] for s in GT_SEGMENTS],
        "full_area": [s[4] for s in GT_SEGMENTS],
    }


def pred_image(entries):
    """entries: (mask, class, caption, score)."""
    return {
        "masks": masks_to_rles(np.stack([e[0] for e in entries]), "pred"),
        "category_ids": [e[1] for e in entries],
        "captions": [e[2] for e in entries],
        "scores": [e[3] for e in entries],
    }


IMAGES = [
    {
        "pred": pred_image([
            (STAR_M, STAR, RIGHT, 0.9),
            (CIRCLE_M, CIRCLE, WRONG_COLOUR, 0.8),
            (SQUARE_M, SQUARE, INVENTED_OBJECT, 0.7),
        ]),
        "gt": gt_image(),
    },
    {
        "pred": pred_image([
            (STAR_M, STAR, WRONG_SIDE, 0.9),
            (CIRCLE_M, CIRCLE, NO_RELATION, 0.8),
            (SQUARE_M, SQUARE, NO_TEXTURE_ON_SKY, 0.7),
            # Overlaps the star by IoU 4/16 < 0.5: judged by no caption-truth metric.
            (box(10, 11, 1, 5), STAR, RIGHT, 0.95),
        ]),
        "gt": gt_image(),
    },
]


def test_parse_caption_reads_the_generator_grammar():
    vocab = vocabulary()
    parsed = parse_caption(RIGHT, vocab)
    assert dict(parsed.attributes) == {
        "size": "small", "color": "red", "texture": "striped", "shape": "star"
    }
    assert parsed.relation == "left_of"
    assert [(o.noun, dict(o.attributes)) for o in parsed.objects] == [
        ("circle", {"color": "blue", "shape": "circle"})
    ]
    # A multi-word colour wins over its last word; "in front of" a stuff region is "on".
    parsed = parse_caption("a light blue square in front of the grass", vocab)
    assert parsed.attributes["color"] == "light blue" and parsed.relation == "on"
    assert parse_caption("a red star in front of the blue circle", vocab).relation == "in_front_of"
    parsed = parse_caption("a red star on the horizon between the sky and the grass", vocab)
    assert parsed.relation == "on_horizon"
    assert [o.noun for o in parsed.objects] == ["sky", "grass"]
    parsed = parse_caption(NO_RELATION, vocab)
    assert parsed.relation is None and not parsed.names_object


def test_caption_truth_counts_by_hand():
    r = caption_truth(IMAGES, vocabulary(), CLASSES)
    assert r["matched_things"] == 6
    # Colour: WRONG_COLOUR says green for the blue circle.
    assert (r["attribute_color_count"], r["attribute_color_total"]) == (5, 6)
    assert r["attribute_color"] == pytest.approx(500 / 6)
    assert r["attribute_size_count"] == 6 and r["attribute_shape_count"] == 6
    # Texture: NO_TEXTURE_ON_SKY states none, which counts as wrong.
    assert r["attribute_texture_count"] == 5
    # Exists: RIGHT, WRONG_COLOUR, WRONG_SIDE, NO_TEXTURE_ON_SKY; the purple triangle is
    # invented and NO_RELATION names nothing.
    assert r["relation_object_exists_count"] == 4
    assert r["relation_object_exists"] == pytest.approx(400 / 6)
    # Holds: RIGHT, WRONG_COLOUR (its relation is true), NO_TEXTURE_ON_SKY ("in the sky");
    # not WRONG_SIDE.
    assert r["relation_holds_count"] == 3 and r["relation_holds"] == pytest.approx(50.0)
    assert r["no_relation_count"] == 1 and r["no_relation"] == pytest.approx(100 / 6)


def test_ground_truth_captions_are_all_true():
    image = {
        "pred": pred_image([(s[0], s[1], c, 1.0) for s, c in zip(GT_SEGMENTS, GT_CAPTIONS)]),
        "gt": gt_image(),
    }
    r = caption_truth([image], vocabulary(), CLASSES)
    assert r["matched_things"] == 3
    assert all(r[f"attribute_{a}"] == 100.0 for a in ("color", "size", "texture", "shape"))
    assert r["relation_object_exists"] == 100.0 and r["relation_holds"] == 100.0


def test_matching_is_one_to_one_same_class_by_score():
    iou = np.array([[0.9, 0.6], [0.95, 0.0], [0.7, 0.0]])
    # Prediction 1 (highest score) takes GT 0; prediction 0 falls back to GT 1; prediction 2
    # has the wrong class for GT 0.
    assert match_things(iou, [0.5, 0.9, 0.8], [0, 0, 1], [0, 0], [True, True]) == [(1, 0), (0, 1)]
    assert match_things(iou, [0.5, 0.9, 0.8], [0, 0, 1], [0, 0], [True, False]) == [(1, 0)]


def test_occlusion_and_horizon_geometry():
    # The front square hides 4 pixels of the back one (full area 16, 12 left visible).
    back = _Region(box(2, 6, 2, 6) & ~box(4, 7, 4, 7), True, z_order=0, full_area=16)
    front = _Region(box(4, 7, 4, 7), True, z_order=1, full_area=9)
    assert relation_holds("in_front_of", front, [back], [])
    assert relation_holds("behind", back, [front], [])
    assert not relation_holds("in_front_of", back, [front], [])
    # Rows 6-9 straddle the horizon at row 8: 8 sky and 8 grass pixels around it.
    straddling = _Region(box(6, 10, 6, 10), True)
    sky = _Region(box(0, 8, 0, W) & ~straddling.mask, False)
    grass = _Region(box(8, H, 0, W) & ~straddling.mask, False)
    assert relation_holds("on_horizon", straddling, [sky, grass], [sky, grass])
    assert not relation_holds("on", straddling, [sky], [sky, grass])


def test_memorised_and_distinct():
    captions = [c for im in IMAGES for c in im["pred"]["captions"]]
    assert len(captions) == 7  # RIGHT appears twice
    training = [RIGHT, "A Large blue  solid circle", "a small red star"]
    r = caption_novelty(captions, training)
    assert r["num_captions"] == 7
    assert r["memorised_count"] == 3  # RIGHT twice, NO_RELATION (case and spaces ignored)
    assert r["memorised"] == pytest.approx(300 / 7)
    assert r["distinct_captions"] == 6
    assert r["distinct_per_100"] == pytest.approx(600 / 7)
    assert "memorised" not in caption_novelty(captions, None)


def _write_png(path, ids):
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)


def exact_meteor(pairs):
    return [1.0 if cand == refs[0] else 0.0 for cand, refs in pairs]


@pytest.fixture
def toy_datasets():
    names = ("_caption_truth_val", "_caption_truth_train")
    for name in names:
        MetadataCatalog.get(name).set(evaluator_type="pix2cap", **build_panoptic_metadata(
            [{"id": k, "name": n, "isthing": int(k < SKY)} for k, n in enumerate(CLASSES)]
        ))
    train = [{"segments_info": [{"id": 1, "category_id": STAR, "description": RIGHT}]}]
    DatasetCatalog.register(names[1], lambda: train)
    yield names
    for name in names:
        MetadataCatalog.remove(name)
    DatasetCatalog.remove(names[1])


def test_evaluator_reports_caption_truth(tmp_path, toy_datasets):
    val_name, train_name = toy_datasets
    ids = np.zeros((H, W), dtype=np.int64)
    for k, (mask, *_rest) in enumerate(GT_SEGMENTS):
        ids[mask] = k + 1
    png = tmp_path / "gt.png"
    _write_png(png, ids)
    segments_info = [
        {"id": k + 1, "category_id": s[1], "isthing": s[1] < SKY, "iscrowd": 0,
         "description": GT_CAPTIONS[k], "attributes": s[2],
         "relation": {"type": "left_of", "target_id": 2}, "z_order": s[3], "full_area": s[4]}
        for k, s in enumerate(GT_SEGMENTS)
    ]
    inputs = [{"pan_seg_file_name": str(png), "image_id": 0, "segments_info": segments_info}]
    captions = [RIGHT, WRONG_COLOUR, INVENTED_OBJECT, GT_CAPTIONS[3], GT_CAPTIONS[4]]
    outputs = [{"panoptic_seg": (torch.from_numpy(ids), [
        {"id": k + 1, "category_id": s[1], "isthing": s[1] < SKY, "score": 0.9, "caption": c}
        for k, (s, c) in enumerate(zip(GT_SEGMENTS, captions))
    ])}]

    ev = DenseCaptionEvaluator(dataset_name=val_name, output_dir=str(tmp_path),
                               meteor_fn=exact_meteor, compute_caption_metrics=False,
                               train_dataset_names=[train_name])
    ev.reset()
    ev.process(inputs, outputs)
    results = ev.evaluate()["dense_caption"]
    truth = results["caption_truth"]
    assert truth["matched_things"] == 3
    assert truth["attribute_color_count"] == 2
    assert truth["relation_object_exists_count"] == 2 and truth["relation_holds_count"] == 2
    assert truth["memorised_count"] == 1 and truth["distinct_captions"] == 5
    assert "memorised" not in results["skipped"]
    on_disk = json.loads((tmp_path / "dense_caption_results.json").read_text())
    assert on_disk["dense_caption"]["caption_truth"]["relation_holds_count"] == 2

    # Without training datasets the copy check is skipped with its reason.
    ev = DenseCaptionEvaluator(dataset_name=val_name, meteor_fn=exact_meteor,
                               compute_caption_metrics=False)
    ev.process(inputs, outputs)
    results = ev.evaluate()["dense_caption"]
    assert "memorised" not in results["caption_truth"]
    assert "no training dataset" in results["skipped"]["memorised"]

    # Unstructured ground truth: only the any-dataset metrics.
    plain = [dict(inputs[0], segments_info=[
        {k: v for k, v in s.items() if k not in ("attributes", "relation")} for s in segments_info
    ])]
    ev.reset()
    ev.process(plain, outputs)
    results = ev.evaluate()["dense_caption"]
    assert "matched_things" not in results["caption_truth"]
    assert results["caption_truth"]["distinct_per_100"] == pytest.approx(100.0)
    assert "caption_truth attributes and relations" in results["skipped"]


def test_build_evaluator_passes_the_training_datasets(toy_datasets):
    val_name, train_name = toy_datasets
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (train_name,)
    evaluator = build_evaluator(cfg, val_name)
    dense = [e for e in evaluator._evaluators if isinstance(e, DenseCaptionEvaluator)]
    assert dense[0]._train_dataset_names == (train_name,)
    assert build_evaluator(None, val_name) is not None  # no config: nothing to pass
