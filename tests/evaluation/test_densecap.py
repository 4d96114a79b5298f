"""Dense-caption mAP with a fake METEOR (exact match -> 1, else 0): protocol checks by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from pix2cap.evaluation import EVALUATOR_REGISTRY
from pix2cap.evaluation.densecap_evaluation import (
    DenseCaptionEvaluator,
    average_precision_101,
    densecap_map,
    masks_to_rles,
)
from pix2cap.evaluation.results import (
    log_results_to_storage,
    print_results_table,
    write_results_json,
)
from pix2cap.utils.events import EventStorage

H = W = 8
CAPTIONS = ["a red circle", "a blue square", "green grass", "the sky"]


def exact_meteor(pairs):
    return [1.0 if cand == refs[0] else 0.0 for cand, refs in pairs]


def band(row0, row1):
    """Bool[H, W] mask of rows [row0, row1)."""
    m = np.zeros((H, W), dtype=bool)
    m[row0:row1] = True
    return m


BANDS = [band(0, 2), band(2, 4), band(4, 6), band(6, 7)]  # row 7 is unlabeled


def gt_entry(n=4, crowd=None):
    return {
        "masks": np.stack(BANDS[:n]),
        "captions": CAPTIONS[:n],
        "category_ids": list(range(n)),
        "iscrowd": crowd if crowd is not None else [0] * n,
        "void": band(7, 8),
    }


def pred_entry(masks, captions, scores, classes=None):
    return {
        "masks": np.stack(masks) if masks else np.zeros((0, H, W), bool),
        "captions": captions,
        "scores": scores,
        "category_ids": classes if classes is not None else list(range(len(masks))),
    }


def test_perfect_predictions_score_100():
    gts = [gt_entry(), gt_entry(3)]
    preds = [
        pred_entry(BANDS[:4], CAPTIONS[:4], [0.9, 0.8, 0.7, 0.6]),
        pred_entry(BANDS[:3], CAPTIONS[:3], [0.5, 0.95, 0.4]),
    ]
    r = densecap_map(preds, gts, exact_meteor)
    assert r["mAP"] == pytest.approx(100.0)
    assert r["AP_det"] == pytest.approx(100.0)
    assert len([k for k in r if k.startswith("AP@iou")]) == 30
    assert r["npos"] == 7 and r["num_predictions"] == 7
    assert r["match_counts"] == {"TP": 7, "FP": 0, "FN": 0}
    assert sorted(r["matched_pairs"]) == sorted([(c, c) for c in CAPTIONS + CAPTIONS[:3]])


def test_shuffled_captions_keep_detection_but_lose_caption_map():
    shuffled = CAPTIONS[1:] + CAPTIONS[:1]  # no caption lands on its own segment
    preds = [pred_entry(BANDS, shuffled, [0.9, 0.8, 0.7, 0.6])]
    r = densecap_map(preds, [gt_entry()], exact_meteor)
    assert r["AP_det"] == pytest.approx(100.0)
    assert r["mAP"] == pytest.approx(0.0)


def test_duplicate_is_penalised_by_one_to_one_matching():
    # A (0.9), A again (0.8), B (0.7) against GT {A, B}: TP, FP, TP.
    preds = [
        pred_entry([BANDS[0], BANDS[0], BANDS[1]], [CAPTIONS[0], CAPTIONS[0], CAPTIONS[1]],
                   [0.9, 0.8, 0.7], [0, 0, 1])
    ]
    r = densecap_map(preds, [gt_entry(2)], exact_meteor)
    # recall .5, .5, 1; precision 1, .5, 2/3 -> 51 grid points at 1.0, 50 at 2/3.
    expected = 100.0 * (51 * 1.0 + 50 * (2.0 / 3.0)) / 101
    assert r["mAP"] == pytest.approx(expected)
    assert r["AP_det"] == pytest.approx(expected)
    assert r["match_counts"] == {"TP": 2, "FP": 1, "FN": 0}

    # The official protocol has no one-to-one matching: the duplicate is a second TP.
    compat = densecap_map(preds, [gt_entry(2)], exact_meteor, compat=True)
    assert compat["AP_det"] == pytest.approx(100.0)
    assert compat["num_records"] == 3


def test_score_ordering_matters():
    wrong = band(7, 8)  # lies on unlabeled pixels only: overlaps no GT
    def run(wrong_score):
        preds = [pred_entry([BANDS[0], wrong, BANDS[1]], [CAPTIONS[0], "a dog", CAPTIONS[1]],
                            [0.9, wrong_score, 0.7])]
        return densecap_map(preds, [gt_entry(2)], exact_meteor)["mAP"]

    assert run(0.1) == pytest.approx(100.0)
    # ranked wrong, A, B: precision 0, 1/2, 2/3 -> interpolated 2/3 everywhere.
    assert run(0.95) == pytest.approx(100.0 * 2.0 / 3.0)


def test_crowd_not_in_npos_and_predictions_on_crowd_ignored():
    gts = [gt_entry(3, crowd=[0, 0, 1])]
    preds = [pred_entry([BANDS[2], BANDS[0], BANDS[1]], ["crowd region", CAPTIONS[0], CAPTIONS[1]],
                        [0.99, 0.9, 0.8], [2, 0, 1])]
    r = densecap_map(preds, gts, exact_meteor)
    assert r["npos"] == 2
    assert r["mAP"] == pytest.approx(100.0)  # the top-ranked crowd hit is neither TP nor FP
    assert r["match_counts"] == {"TP": 2, "FP": 0, "FN": 0}


def test_compat_mode_reproduces_official_quirks():
    gts = [gt_entry(3, crowd=[0, 0, 1])]
    seen = []

    def recording_meteor(pairs):
        seen.extend(pairs)
        return exact_meteor(pairs)

    # One prediction with the wrong class, one correct; no prediction for GT 1.
    preds = [pred_entry([BANDS[0], BANDS[1]], [CAPTIONS[0], CAPTIONS[1]], [0.9, 0.8], [0, 3])]
    r = densecap_map(preds, gts, recording_meteor, compat=True)
    # npos counts the crowd GT too; the wrong-class prediction makes no record (not even FP).
    assert r["npos"] == 3 and r["num_records"] == 1
    assert r["AP_det"] == pytest.approx(100.0 * 34 / 101)  # recall 1/3 reached at precision 1
    # METEOR gets the GT caption as candidate and the predicted caption's characters as references.
    assert seen == [(CAPTIONS[0], sorted(set(CAPTIONS[0].replace(" ", ""))))]
    assert r["mAP"] == pytest.approx(0.0)
    # PQ-style matching for the caption metrics: one TP, the wrong-class prediction is an FP.
    assert r["match_counts"] == {"TP": 1, "FP": 1, "FN": 1}

    standard = densecap_map(preds, gts, exact_meteor)
    assert standard["npos"] == 2
    assert standard["AP_det"] == pytest.approx(100.0)


def test_compat_iou_excludes_void_pixels():
    # Prediction = GT band rows 4-6 plus the unlabeled row 7: PQ's IoU ignores the void part.
    gt = gt_entry(3)
    pred = pred_entry([BANDS[2] | band(7, 8)], [CAPTIONS[2]], [0.9], [2])
    compat = densecap_map([pred], [gt], exact_meteor, compat=True, iou_thresholds=(0.7,))
    standard = densecap_map([pred], [gt], exact_meteor, iou_thresholds=(0.7,))
    assert compat["AP_det@iou0.7"] > 0  # IoU 1.0 once the void row is excluded
    assert standard["AP_det@iou0.7"] == pytest.approx(0.0)  # plain IoU 16/24 < 0.7


def test_no_predictions_and_bad_input():
    r = densecap_map([pred_entry([], [], [])], [gt_entry(2)], exact_meteor)
    assert r["mAP"] == 0.0 and r["match_counts"]["FN"] == 2
    with pytest.raises(ValueError, match="captions"):
        densecap_map([pred_entry(BANDS[:2], ["x"], [0.5, 0.4])], [gt_entry(2)], exact_meteor)
    with pytest.raises(KeyError, match="scores"):
        densecap_map([{"masks": np.stack(BANDS[:1]), "captions": ["x"]}], [gt_entry(1)],
                     exact_meteor)
    with pytest.raises(ValueError, match="aligned"):
        densecap_map([], [gt_entry(1)], exact_meteor)


def test_rle_inputs_equal_dense_masks():
    preds = [pred_entry(BANDS[:2], CAPTIONS[:2], [0.9, 0.3])]
    rle_preds = [dict(preds[0], masks=masks_to_rles(preds[0]["masks"], "test"))]
    a = densecap_map(preds, [gt_entry()], exact_meteor)
    b = densecap_map(rle_preds, [gt_entry()], exact_meteor)
    assert a["mAP"] == pytest.approx(b["mAP"]) and 0 < a["mAP"] < 100


def test_average_precision_101_by_hand():
    assert average_precision_101(np.array([1.0]), np.array([0.0]), 2) == pytest.approx(51 / 101)
    assert np.isnan(average_precision_101(np.zeros(0), np.zeros(0), 0))


def _write_png(path, ids):
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)


def test_evaluator_end_to_end(tmp_path):
    assert EVALUATOR_REGISTRY.get("DenseCaptionEvaluator") is DenseCaptionEvaluator
    ids = np.zeros((H, W), dtype=np.int64)
    for k, m in enumerate(BANDS[:3]):
        ids[m] = k + 1
    png = tmp_path / "gt.png"
    _write_png(png, ids)
    inputs = [{
        "pan_seg_file_name": str(png),
        "image_id": 7,
        "segments_info": [
            {"id": k + 1, "category_id": k, "iscrowd": 0, "description": CAPTIONS[k]}
            for k in range(3)
        ],
    }]
    import torch

    outputs = [{"panoptic_seg": (torch.from_numpy(ids), [
        {"id": k + 1, "category_id": k, "score": 0.9 - 0.1 * k, "caption": CAPTIONS[k]}
        for k in range(3)
    ])}]
    ev = DenseCaptionEvaluator(dataset_name="toy", output_dir=str(tmp_path), meteor_fn=exact_meteor,
                               compute_caption_metrics=False)
    ev.reset()
    ev.process(inputs, outputs)
    results = ev.evaluate()["dense_caption"]
    assert results["mAP"] == pytest.approx(100.0)
    assert results["caption_match_TP"] == 3
    on_disk = json.loads((tmp_path / "dense_caption_results.json").read_text())
    assert on_disk["dense_caption"]["mAP"] == pytest.approx(100.0)

    bad = [{"panoptic_seg": (torch.zeros(4, 4, dtype=torch.int64), [])}]
    with pytest.raises(ValueError, match="original resolution"):
        ev.process(inputs, bad)
    no_caption = [dict(inputs[0], segments_info=[{"id": 1, "category_id": 0}])]
    with pytest.raises(KeyError, match="description"):
        ev.process(no_caption, outputs)


def test_results_reporting(tmp_path):
    results = {"dense_caption": {"mAP": 12.5, "AP@iou0.3/meteor0": 20.0,
                                 "AP@iou0.3/meteor0.05": 10.0, "npos": 4,
                                 "AP_nan": float("nan"), "skipped": {"SPICE": "no jars"}}}
    text = print_results_table(results)
    assert "METEOR>0.05" in text and "IoU 0.3" in text and "no jars" in text and "12.500" in text
    path = tmp_path / "sub" / "r.json"
    write_results_json(results, str(path))
    loaded = json.loads(path.read_text())
    assert loaded["dense_caption"]["AP_nan"] is None
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind
    assert log_results_to_storage(results) == []  # no storage active
    with EventStorage() as storage:
        names = log_results_to_storage(results)
    assert "dense_caption/mAP" in names and "dense_caption/AP_nan" not in names
    assert storage.latest()["dense_caption/mAP"][0] == pytest.approx(12.5)
