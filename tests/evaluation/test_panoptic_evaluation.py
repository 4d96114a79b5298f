"""Tests of the PQ computation and the COCO panoptic evaluator.

Hand-computed cases pin each rule; random cases and exported files are compared with
panopticapi (``pip install panopticapi-lite``, skipped where it is not installed).
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.data.catalog import MetadataCatalog
from pix2cap.data.datasets.builtin import load_shapes
from pix2cap.data.datasets.shapes import generate_shapes
from pix2cap.data.detection_utils import read_panoptic_png
from pix2cap.evaluation import EVALUATOR_REGISTRY, build_evaluator
from pix2cap.evaluation.panoptic_evaluation import (
    COCOPanopticEvaluator,
    PQStat,
    pq_compute_single,
)
from pix2cap.utils import comm

try:
    import panopticapi.evaluation as panopticapi_eval
except ImportError:  # the test extra installs it; without it the agreement tests skip
    panopticapi_eval = None

needs_panopticapi = pytest.mark.skipif(
    panopticapi_eval is None,
    reason="panopticapi is not importable (pip install --no-deps panopticapi-lite)",
)

# Dataset-style (non-contiguous) ids: 3 things, 3 stuff.
CATEGORIES = {
    3: {"id": 3, "name": "a", "isthing": 1},
    5: {"id": 5, "name": "b", "isthing": 1},
    8: {"id": 8, "name": "c", "isthing": 1},
    10: {"id": 10, "name": "d", "isthing": 0},
    11: {"id": 11, "name": "e", "isthing": 0},
    17: {"id": 17, "name": "f", "isthing": 0},
}


def seg(id_, category_id, iscrowd=0):
    return {"id": id_, "category_id": category_id, "iscrowd": iscrowd}


def counts(stat: PQStat, category_id):
    c = stat.pq_per_cat.get(category_id)
    return (0, 0, 0, 0.0) if c is None else (c.tp, c.fp, c.fn, c.iou)


# ---------------------------------------------------------------- hand-computed rules


def test_perfect_prediction():
    gt = np.zeros((4, 6), dtype=np.int64)
    gt[:, :3] = 7
    gt[:, 3:] = 9
    segments = [seg(7, 3), seg(9, 10)]
    stat = pq_compute_single(gt, segments, torch.from_numpy(gt).int(), segments, CATEGORIES)
    assert counts(stat, 3) == (1, 0, 0, 1.0)
    assert counts(stat, 10) == (1, 0, 0, 1.0)
    avg, per_class = stat.pq_average(CATEGORIES)
    assert avg == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert per_class[5] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # absent: reported, not averaged
    assert stat.pq_average(CATEGORIES, isthing=True)[0]["n"] == 1
    assert stat.pq_average(CATEGORIES, isthing=False)[0]["n"] == 1


def test_iou_exactly_half_is_no_match_and_above_half_is():
    gt = np.zeros((2, 4), dtype=np.int64)
    gt[0] = 1  # gt segment: 4 pixels of row 0; row 1 is another gt segment
    gt[1] = 2
    gt_segments = [seg(1, 3), seg(2, 10)]
    # Half: the prediction covers 2 of the 4 pixels -> IoU 2 / 4 = 0.5, not > 0.5.
    pred = np.zeros_like(gt)
    pred[0, :2] = 5
    stat = pq_compute_single(gt, gt_segments, pred, [seg(5, 3)], CATEGORIES)
    assert counts(stat, 3) == (0, 1, 1, 0.0)
    assert counts(stat, 10) == (0, 0, 1, 0.0)
    # Three of four -> IoU 0.75: one match; PQ = SQ = 0.75, RQ = 1 for the class.
    pred[0, :3] = 5
    stat = pq_compute_single(gt, gt_segments, pred, [seg(5, 3)], CATEGORIES)
    assert counts(stat, 3) == (1, 0, 0, 0.75)
    _, per_class = stat.pq_average(CATEGORIES)
    assert per_class[3] == {"pq": 0.75, "sq": 0.75, "rq": 1.0}
    # Prediction larger than the gt: 4 gt pixels + 3 of the other segment -> IoU 4 / 7.
    pred[0, :] = 5
    pred[1, :3] = 5
    stat = pq_compute_single(gt, gt_segments, pred, [seg(5, 3)], CATEGORIES)
    assert counts(stat, 3) == (1, 0, 0, pytest.approx(4 / 7))


def test_void_pixels_do_not_count_against_a_prediction():
    gt = np.zeros((2, 4), dtype=np.int64)
    gt[0] = 1  # row 1 is VOID
    pred = np.full_like(gt, 4)  # covers the 4 gt pixels and the 4 VOID pixels
    stat = pq_compute_single(gt, [seg(1, 3)], pred, [seg(4, 3)], CATEGORIES)
    # union = 8 + 4 - 4 - 4 (on VOID) = 4 -> IoU 1.
    assert counts(stat, 3) == (1, 0, 0, 1.0)


def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive():
    gt = np.zeros((2, 4), dtype=np.int64)
    gt[0] = 1
    gt_segments = [seg(1, 10)]
    pred = np.zeros_like(gt)
    pred[1, :3] = 6  # 3 pixels on VOID
    pred[0, 0] = 6  # 1 pixel on the stuff segment
    stat = pq_compute_single(gt, gt_segments, pred, [seg(6, 5)], CATEGORIES)
    assert counts(stat, 5) == (0, 0, 0, 0.0)  # 3/4 on VOID: ignored
    assert counts(stat, 10) == (0, 0, 1, 0.0)
    pred[1, 2] = 0
    pred[0, 1] = 6  # now exactly half on VOID: a false positive
    stat = pq_compute_single(gt, gt_segments, pred, [seg(6, 5)], CATEGORIES)
    assert counts(stat, 5) == (0, 1, 0, 0.0)


def test_crowd_regions():
    gt = np.zeros((2, 4), dtype=np.int64)
    gt[:, :2] = 1  # crowd of class 3
    gt[:, 2:] = 2  # normal segment of class 10
    gt_segments = [seg(1, 3, iscrowd=1), seg(2, 10)]
    pred = np.zeros_like(gt)
    pred[:, :2] = 7
    # A same-class prediction on the crowd: never matched, not a false positive, no FN either.
    stat = pq_compute_single(gt, gt_segments, pred, [seg(7, 3)], CATEGORIES)
    assert counts(stat, 3) == (0, 0, 0, 0.0)
    assert counts(stat, 10) == (0, 0, 1, 0.0)
    # Another class on the crowd is a false positive.
    stat = pq_compute_single(gt, gt_segments, pred, [seg(7, 5)], CATEGORIES)
    assert counts(stat, 5) == (0, 1, 0, 0.0)
    # Crowd + VOID together make "more than half": 2 px crowd + 1 px VOID out of 4.
    gt2 = gt.copy()
    gt2[0, 2] = 0
    pred2 = np.zeros_like(gt)
    pred2[:, 1] = 7
    pred2[0, 2] = 7
    pred2[1, 2] = 7
    stat = pq_compute_single(gt2, gt_segments, pred2, [seg(7, 3)], CATEGORIES)
    assert counts(stat, 3) == (0, 0, 0, 0.0)


def test_category_on_one_side_only():
    gt = np.full((3, 3), 2, dtype=np.int64)
    pred = np.full((3, 3), 9, dtype=np.int64)
    stat = pq_compute_single(gt, [seg(2, 3)], pred, [seg(9, 10)], CATEGORIES)
    assert counts(stat, 3) == (0, 0, 1, 0.0)
    assert counts(stat, 10) == (0, 1, 0, 0.0)
    assert stat.pq_average(CATEGORIES)[0] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_empty_prediction_and_empty_ground_truth():
    gt = np.zeros((3, 5), dtype=np.int64)
    gt[:, :2] = 1
    gt[:, 2:] = 2
    gt_segments = [seg(1, 3), seg(2, 11)]
    stat = pq_compute_single(gt, gt_segments, np.zeros_like(gt), [], CATEGORIES)
    assert counts(stat, 3) == (0, 0, 1, 0.0) and counts(stat, 11) == (0, 0, 1, 0.0)
    # Empty ground truth: all VOID, so every prediction lies on VOID and is ignored.
    stat = pq_compute_single(np.zeros_like(gt), [], gt, gt_segments, CATEGORIES)
    assert stat.pq_average(CATEGORIES)[0] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    stat = pq_compute_single(np.zeros_like(gt), [], np.zeros_like(gt), [], CATEGORIES)
    assert stat.pq_average(CATEGORIES)[0]["n"] == 0


def test_accumulation_over_images():
    gt = np.ones((2, 2), dtype=np.int64)
    total = PQStat()
    total += pq_compute_single(gt, [seg(1, 3)], gt, [seg(1, 3)], CATEGORIES)
    total += pq_compute_single(gt, [seg(1, 3)], gt * 2, [seg(2, 5)], CATEGORIES)
    assert counts(total, 3) == (1, 0, 1, 1.0)
    assert counts(total, 5) == (0, 1, 0, 0.0)
    _, per_class = total.pq_average(CATEGORIES)
    assert per_class[3]["pq"] == pytest.approx(1 / 1.5)


def test_bad_predictions_name_the_image():
    gt = np.ones((2, 3), dtype=np.int64)
    pred = np.array([[1, 1, 4], [1, 1, 1]])
    with pytest.raises(KeyError, match=r"image with id 'img7'.*\[4\].*not in its segments_info"):
        pq_compute_single(gt, [seg(1, 3)], pred, [seg(1, 3)], CATEGORIES, image_id="img7")
    with pytest.raises(KeyError, match=r"image with id 12.*\[8\].*not present"):
        pq_compute_single(gt, [seg(1, 3)], gt, [seg(1, 3), seg(8, 3)], CATEGORIES, image_id=12)
    with pytest.raises(KeyError, match="unknown category_id 99"):
        pq_compute_single(gt, [seg(1, 3)], gt, [seg(1, 99)], CATEGORIES)
    with pytest.raises(ValueError, match="original image size"):
        pq_compute_single(gt, [seg(1, 3)], gt[:1], [seg(1, 3)], CATEGORIES)
    with pytest.raises(ValueError, match="more than once"):
        pq_compute_single(gt, [seg(1, 3)], gt, [seg(1, 3), seg(1, 5)], CATEGORIES)


@pytest.mark.parametrize(
    "big",
    [
        {1: 0xABCDEF, 2: 0x123456, 3: 0x7F0001},  # distinct low 16 bits: table + check
        {1: 0x010005, 2: 0x020005, 3: 0x030005},  # same low 16 bits: binary search
    ],
)
def test_large_ids_give_the_same_counts(big):
    # Ids above the direct lookup-table limit (COCO's colour ids) take other index paths; an
    # unlisted id (3, sharing its low bits with listed ones in the second case) stays ignored.
    gt = np.zeros((4, 4), dtype=np.uint32)
    gt[:2] = 1
    gt[2:] = 2
    gt[3, 3] = 3
    pred = gt.copy()
    pred[0, 0] = 0
    pred[3, 3] = 2
    gt_big = np.vectorize(lambda v: big.get(int(v), 0), otypes=[np.uint32])(gt)
    pred_segments = [seg(1, 3), seg(2, 10)]
    small = pq_compute_single(gt, [seg(1, 3), seg(2, 10)], pred, pred_segments, CATEGORIES)
    large = pq_compute_single(
        gt_big, [seg(big[1], 3), seg(big[2], 10)], pred, pred_segments, CATEGORIES
    )
    assert counts(small, 3) == counts(large, 3) == (1, 0, 0, pytest.approx(7 / 8))
    # Stuff: gt area 7 (one pixel is the unlisted id), prediction 8 -> IoU 7 / 8.
    assert counts(small, 10) == counts(large, 10) == (1, 0, 0, pytest.approx(7 / 8))
    for dtype in (np.int64, np.uint64, np.int32):
        again = pq_compute_single(
            gt_big.astype(dtype), [seg(big[1], 3), seg(big[2], 10)], pred, pred_segments, CATEGORIES
        )
        assert counts(again, 10) == counts(large, 10)


# ---------------------------------------------------------------- agreement with panopticapi


def _ids_to_png(ids: np.ndarray, path) -> None:
    ids = ids.astype(np.uint32)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _random_labels(rng, height, width, num_labels):
    """A blocky label map in [0, num_labels): a coarse grid overpainted by rectangles."""
    cell = int(rng.integers(4, 12))
    coarse = rng.integers(0, num_labels, (height // cell + 1, width // cell + 1))
    labels = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:height, :width].copy()
    for _ in range(int(rng.integers(0, 6))):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = int(rng.integers(1, height // 2 + 1)), int(rng.integers(1, width // 2 + 1))
        labels[y : y + h, x : x + w] = rng.integers(0, num_labels)
    return labels


def _random_ids(rng, n):
    """``n`` distinct ids: small (direct table), COCO-like large (low-bits table), or large
    with equal low 16 bits (binary search)."""
    mode = rng.random()
    if mode < 0.4:
        return rng.choice(np.arange(1, 300), size=n, replace=False)
    if mode < 0.8:
        return rng.choice(np.arange(1, 1 << 24), size=n, replace=False)
    high = rng.choice(np.arange(1, 256), size=n, replace=False)
    return (high << 16) | int(rng.integers(0, 1 << 16))


def _random_case(rng, index, height=32, width=48):
    """(gt_ids, gt_segments, pred_ids, pred_segments) with VOID, crowd, unlisted gt ids,
    absent gt segments, empty sides and categories present on one side only."""
    cat_ids = list(CATEGORIES)
    num_gt = 0 if index % 10 == 1 else int(rng.integers(1, 8))
    gt_labels = _random_labels(rng, height, width, num_gt + 1)  # 0 = VOID
    if rng.random() < 0.3:
        gt_labels[rng.random((height, width)) < 0.1] = 0
    gt_label_ids = np.concatenate([[0], _random_ids(rng, num_gt)])
    gt_ids = gt_label_ids[gt_labels]
    gt_segments = []
    for k in range(1, num_gt + 1):
        if rng.random() < 0.08:
            continue  # an id of the PNG that segments_info does not list
        gt_segments.append(
            {
                "id": int(gt_label_ids[k]),
                "category_id": int(rng.choice(cat_ids[:4] if rng.random() < 0.5 else cat_ids)),
                "iscrowd": int(rng.random() < 0.2),
            }
        )
    if rng.random() < 0.15:  # listed but without pixels
        gt_segments.append({"id": (1 << 24) - 2, "category_id": 17, "iscrowd": 0})

    if index % 10 == 0:
        return gt_ids, gt_segments, np.zeros_like(gt_ids), []
    if rng.random() < 0.7 and num_gt > 0:  # a perturbed copy of the ground truth
        shift = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
        pred_labels = np.roll(gt_labels, shift, (0, 1))
        num_pred = num_gt + 2
        for _ in range(int(rng.integers(0, 4))):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            pred_labels[y : y + int(rng.integers(1, 12)), x : x + int(rng.integers(1, 16))] = (
                rng.integers(0, num_pred + 1)
            )
    else:
        num_pred = int(rng.integers(1, 8))
        pred_labels = _random_labels(rng, height, width, num_pred + 1)
    pred_label_ids = np.concatenate([[0], _random_ids(rng, num_pred + 1)])
    pred_ids = pred_label_ids[pred_labels]
    gt_category = {s["id"]: s["category_id"] for s in gt_segments}
    pred_segments = []
    for k in np.unique(pred_labels):
        if k == 0:
            continue
        # Mostly the category of the gt segment under it, so that matches occur.
        under = np.bincount(gt_labels[pred_labels == k], minlength=num_gt + 1)
        cat = gt_category.get(int(gt_label_ids[int(under.argmax())]))
        if cat is None or rng.random() < 0.25:
            cat = int(rng.choice(cat_ids))
        pred_segments.append({"id": int(pred_label_ids[k]), "category_id": int(cat)})
    return gt_ids, gt_segments, pred_ids, pred_segments


def _panopticapi_single(tmp_path, name, gt_ids, gt_segments, pred_ids, pred_segments):
    """panopticapi's counts for one image, through its own file-reading core."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(exist_ok=True)
    pred_dir.mkdir(exist_ok=True)
    _ids_to_png(gt_ids, gt_dir / f"{name}.png")
    _ids_to_png(pred_ids, pred_dir / f"{name}.png")
    gt_ann = {
        "image_id": name,
        "file_name": f"{name}.png",
        "segments_info": [dict(s, area=int((gt_ids == s["id"]).sum())) for s in gt_segments],
    }
    pred_ann = {
        "image_id": name,
        "file_name": f"{name}.png",
        "segments_info": [dict(s) for s in pred_segments],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        return panopticapi_eval.pq_compute_single_core(
            0, [(gt_ann, pred_ann)], str(gt_dir), str(pred_dir), CATEGORIES
        )


@needs_panopticapi
def test_random_cases_agree_with_panopticapi(tmp_path):
    rng = np.random.default_rng(2024)
    ours_total, theirs_total = PQStat(), PQStat()
    num_cases = 64
    for index in range(num_cases):
        case = _random_case(rng, index)
        ours = pq_compute_single(*case, CATEGORIES, image_id=index)
        theirs = _panopticapi_single(tmp_path, f"{index:03d}", *case)
        for category_id in CATEGORIES:
            a, b = ours[category_id], theirs[category_id]
            assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn), (index, category_id)
            assert a.iou == pytest.approx(b.iou, abs=1e-12), (index, category_id)
        ours_total += ours
        theirs_total += theirs
    for isthing in (None, True, False):
        ours_avg, ours_cls = ours_total.pq_average(CATEGORIES, isthing)
        theirs_avg, theirs_cls = theirs_total.pq_average(CATEGORIES, isthing)
        assert ours_avg["n"] == theirs_avg["n"] > 0
        for key in ("pq", "sq", "rq"):
            assert abs(ours_avg[key] - theirs_avg[key]) <= 1e-9
        for category_id, values in theirs_cls.items():
            for key in ("pq", "sq", "rq"):
                assert abs(ours_cls[category_id][key] - values[key]) <= 1e-9
    # The cases must exercise every rule, or the agreement would prove little.
    totals = [ours_total[c] for c in CATEGORIES]
    assert sum(t.tp for t in totals) > 20 and sum(t.fp for t in totals) > 20
    assert sum(t.fn for t in totals) > 20
    assert 0 < ours_total.pq_average(CATEGORIES)[0]["pq"] < 1


@needs_panopticapi
def test_unlisted_prediction_id_is_an_error_in_both(tmp_path):
    gt = np.ones((4, 4), dtype=np.int64)
    pred = gt.copy()
    pred[0, 0] = 3
    with pytest.raises(KeyError, match="not in its segments_info"):
        pq_compute_single(gt, [seg(1, 3)], pred, [seg(1, 3)], CATEGORIES, image_id="x")
    with pytest.raises(KeyError, match="presented in PNG and not presented in JSON"):
        _panopticapi_single(tmp_path, "x", gt, [seg(1, 3)], pred, [seg(1, 3)])


# ---------------------------------------------------------------- the evaluator


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, "val", num_images=4, image_size=64)
    return root, load_shapes(root, "val")


def _gt_as_prediction(record, caption=True):
    ids = torch.from_numpy(read_panoptic_png(record["pan_seg_file_name"])).to(torch.int32)
    segments = [
        {
            "id": s["id"],
            "category_id": s["category_id"],
            "isthing": s["isthing"],
            "score": 0.9,
            **({"caption": s.get("description", "")} if caption else {}),
        }
        for s in record["segments_info"]
    ]
    return {"panoptic_seg": (ids, segments)}


def _corrupt(output, rng):
    """Shift every mask, drop one segment to VOID and relabel another."""
    ids, segments = output["panoptic_seg"]
    ids = torch.roll(ids, shifts=(int(rng.integers(2, 9)), int(rng.integers(-6, 6))), dims=(0, 1))
    segments = [dict(s) for s in segments]
    dropped = segments.pop(0)
    ids[ids == dropped["id"]] = 0
    segments[-1]["category_id"] = (segments[-1]["category_id"] + 1) % 9
    return {"panoptic_seg": (ids, segments)}


def test_evaluators_are_registered_by_dataset_type():
    from pix2cap.evaluation import (
        DenseCaptionEvaluator,
        GroundedCaptionEvaluator,
        Pix2CapEvaluator,
    )

    assert EVALUATOR_REGISTRY.get("coco_panoptic_seg") is COCOPanopticEvaluator
    assert EVALUATOR_REGISTRY.get("pix2cap") is Pix2CapEvaluator
    evaluator = build_evaluator(None, "shapes_val", None)  # shapes: evaluator_type "pix2cap"
    kinds = [type(e) for e in evaluator._evaluators]
    assert kinds == [COCOPanopticEvaluator, DenseCaptionEvaluator, GroundedCaptionEvaluator]


def test_gt_as_prediction_gives_pq_100(shapes_val):
    _, records = shapes_val
    evaluator = COCOPanopticEvaluator(dataset_name="shapes_val")
    evaluator.reset()
    evaluator.process(records[:2], [_gt_as_prediction(r) for r in records[:2]])
    evaluator.process(records[2:], [_gt_as_prediction(r) for r in records[2:]])
    res = evaluator.evaluate()["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert res[key] == pytest.approx(100.0), key
    names = MetadataCatalog.get("shapes_val").stuff_classes
    per_class = [k for k in res if k.startswith("PQ-")]
    assert per_class and all(k[3:] in names for k in per_class)


def _renumbered(output, first_id, as_numpy=False, dtype=torch.int64):
    """The prediction with its segments numbered first_id, first_id + 1, ... (VOID stays 0)."""
    ids, segments = output["panoptic_seg"]
    new_ids = torch.zeros_like(ids, dtype=dtype)
    renumbered = []
    for k, s in enumerate(segments):
        new_ids[ids == s["id"]] = first_id + k
        renumbered.append(dict(s, id=first_id + k))
    return {"panoptic_seg": (new_ids.numpy() if as_numpy else new_ids, renumbered)}


def test_any_id_range_and_type_give_the_same_counts(shapes_val):
    # Ids 1..N of a tensor are counted from an 8-bit copy; other ranges and types are not.
    _, records = shapes_val
    rng = np.random.default_rng(3)
    outputs = [_corrupt(_gt_as_prediction(r, caption=False), rng) for r in records]
    variants = {
        "colour ids, int32 tensor": outputs,
        "1..N, int64 tensor": [_renumbered(o, 1) for o in outputs],
        "1..N, int16 tensor": [_renumbered(o, 1, dtype=torch.int16) for o in outputs],
        "1..N, int64 ndarray": [_renumbered(o, 1, as_numpy=True) for o in outputs],
        "300.., int64 tensor": [_renumbered(o, 300) for o in outputs],
    }
    stats = {}
    for name, preds in variants.items():
        evaluator = COCOPanopticEvaluator(dataset_name="shapes_val", num_workers=0)
        evaluator.reset()
        evaluator.process(records, preds)
        stats[name] = {
            c: (round(v.iou, 9), v.tp, v.fp, v.fn) for c, v in evaluator.pq_stat.pq_per_cat.items()
        }
    # What the queue keeps: 8 bits where the ids fit them, a copy of the caller's ids otherwise.
    evaluator = COCOPanopticEvaluator(dataset_name="shapes_val", num_workers=0)
    expected = {"1..N, int64 tensor": np.uint8, "1..N, int16 tensor": np.uint8,
                "1..N, int64 ndarray": np.uint8, "300.., int64 tensor": np.int64}
    for name, dtype in expected.items():
        given = variants[name][0]["panoptic_seg"][0]
        kept, _ = evaluator._read_prediction(variants[name][0], 0)
        assert kept.dtype == dtype, name
        np.testing.assert_array_equal(kept, np.asarray(given))
        assert not np.shares_memory(kept, np.asarray(given)), name
    reference = stats.pop("colour ids, int32 tensor")
    assert sum(tp for _, tp, _, _ in reference.values()) > 0
    assert sum(fp + fn for _, _, fp, fn in reference.values()) > 0  # the corruption counts
    for name, stat in stats.items():
        assert stat == reference, name


def test_corrupted_prediction_export_and_panopticapi(shapes_val, tmp_path, monkeypatch):
    root, records = shapes_val
    rng = np.random.default_rng(0)
    outputs = [_corrupt(_gt_as_prediction(r), rng) for r in records]
    out_dir = tmp_path / "eval"
    evaluator = COCOPanopticEvaluator(dataset_name="shapes_val", output_dir=str(out_dir))
    evaluator.process(records, outputs)
    res = evaluator.evaluate()["panoptic_seg"]
    assert 0 < res["PQ"] < 90

    # Same numbers from the in-memory function with the dataset's contiguous categories.
    meta = MetadataCatalog.get("shapes_val")
    categories = {i: c for i, c in enumerate(meta.categories)}
    total = PQStat()
    for r, o in zip(records, outputs):
        total += pq_compute_single(
            read_panoptic_png(r["pan_seg_file_name"]),
            r["segments_info"],
            *o["panoptic_seg"],
            categories,
        )
    assert res["PQ"] == pytest.approx(100 * total.pq_average(categories)[0]["pq"], abs=1e-9)

    # The export: dataset category ids, areas, boxes and captions, ids decodable from the PNG.
    data = json.loads((out_dir / "panoptic_predictions.json").read_text())
    assert [c["id"] for c in data["categories"]] == [c["id"] for c in meta.categories]
    assert len(data["annotations"]) == len(records)
    contiguous_to_dataset = {i: c["id"] for i, c in enumerate(meta.categories)}
    for ann, r, o in zip(data["annotations"], records, outputs):
        assert ann["image_id"] == r["image_id"]
        ids, segments = o["panoptic_seg"]
        png = read_panoptic_png(out_dir / "panoptic_predictions" / ann["file_name"])
        np.testing.assert_array_equal(png, ids.numpy())
        assert [s["id"] for s in ann["segments_info"]] == [s["id"] for s in segments]
        for s_out, s_in in zip(ann["segments_info"], segments):
            assert s_out["category_id"] == contiguous_to_dataset[s_in["category_id"]]
            assert s_out["iscrowd"] == 0 and s_out["caption"] == s_in["caption"]
            ys, xs = np.nonzero(png == s_out["id"])
            assert s_out["area"] == len(ys)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            assert s_out["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    assert not [f for f in os.listdir(out_dir) if ".tmp-" in f]

    if panopticapi_eval is None:
        pytest.skip("panopticapi is not importable (pip install --no-deps panopticapi-lite)")
    # pq_compute forks one worker per CPU; two are plenty for four images.
    monkeypatch.setattr(panopticapi_eval.multiprocessing, "cpu_count", lambda: 2)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi_eval.pq_compute(
            str(root / "annotations" / "panoptic_val.json"),
            str(out_dir / "panoptic_predictions.json"),
            gt_folder=str(root / "panoptic" / "val"),
            pred_folder=str(out_dir / "panoptic_predictions"),
        )
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("PQ", "SQ", "RQ"):
            assert abs(res[metric + suffix] - 100 * theirs[group][metric.lower()]) <= 1e-9
    for dataset_id, values in theirs["per_class"].items():
        name = next(c["name"] for c in meta.categories if c["id"] == dataset_id)
        if f"PQ-{name}" in res:
            assert abs(res[f"PQ-{name}"] - 100 * values["pq"]) <= 1e-9


def test_gathers_counts_from_all_processes(shapes_val, monkeypatch):
    """Two ranks' counts (here: the same shard twice) add up; rates stay, counts double."""
    _, records = shapes_val
    rng = np.random.default_rng(1)
    outputs = [_corrupt(_gt_as_prediction(r), rng) for r in records]
    single = COCOPanopticEvaluator(dataset_name="shapes_val")
    single.process(records, outputs)
    expected = single.evaluate()["panoptic_seg"]

    doubled = COCOPanopticEvaluator(dataset_name="shapes_val")
    doubled.process(records, outputs)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0, group=None: [data, data])
    res = doubled.evaluate()["panoptic_seg"]
    assert res == pytest.approx(expected)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert doubled.evaluate() is None


def test_categories_from_detectron2_style_metadata():
    meta = {
        "thing_dataset_id_to_contiguous_id": {7: 0},
        "stuff_dataset_id_to_contiguous_id": {7: 0, 30: 1},
        "stuff_classes": ["cat", "grass"],
    }
    evaluator = COCOPanopticEvaluator(dataset_name="custom", metadata=meta)
    assert evaluator.categories == {
        0: {"id": 7, "name": "cat", "isthing": 1},
        1: {"id": 30, "name": "grass", "isthing": 0},
    }
    with pytest.raises(KeyError, match="dataset 'custom' has neither"):
        COCOPanopticEvaluator(dataset_name="custom", metadata={})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluator_input_errors(shapes_val, num_workers):
    _, records = shapes_val
    evaluator = COCOPanopticEvaluator(dataset_name="shapes_val", num_workers=num_workers)
    ids, segments = _gt_as_prediction(records[0])["panoptic_seg"]
    # Malformed dicts raise in process() itself, whatever the threads.
    with pytest.raises(ValueError, match="segments_info=None"):
        evaluator.process(records[:1], [{"panoptic_seg": (ids, None)}])
    with pytest.raises(KeyError, match=r"image 0.*segments_info\[0\] has no 'category_id'"):
        evaluator.process(records[:1], [{"panoptic_seg": (ids, [{"id": 1}])}])
    bad = dict(records[0])
    del bad["pan_seg_file_name"]
    with pytest.raises(KeyError, match="pan_seg_file_name"):
        evaluator.process([bad], [{"panoptic_seg": (ids, segments)}])
    # An error that needs the ground truth: serially from process(), with threads from a
    # later process() or from evaluate(); either way naming the image.
    with pytest.raises(ValueError, match="image with id 0.*original image size"):
        evaluator.process(records[:1], [{"panoptic_seg": (ids[:10], segments)}])
        evaluator.evaluate()
    assert COCOPanopticEvaluator(dataset_name="shapes_val").evaluate() == {}
