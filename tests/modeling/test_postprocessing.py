import pytest
import torch

from pix2cap.modeling.postprocessing import (
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)

# 3 classes: 0 = thing, 1 and 2 = stuff; index 3 = no object.
K = 3
THINGS = {0}
H, W = 8, 10
BIG = 20.0  # a logit (or mask logit) that saturates softmax / sigmoid


def class_logits(*labels_and_scores):
    """One row per query: the label gets probability ``score`` (rest spread evenly)."""
    rows = []
    for label, score in labels_and_scores:
        probs = torch.full((K + 1,), (1.0 - score) / K)
        probs[label] = score
        rows.append(probs.log())
    return torch.stack(rows)


def box_mask(y0, y1, x0, x1):
    """Mask logits: +BIG inside rows y0:y1, cols x0:x1, -BIG elsewhere."""
    m = torch.full((H, W), -BIG)
    m[y0:y1, x0:x1] = BIG
    return m


def test_threshold_and_no_object_and_void():
    mask_cls = class_logits((0, 0.95), (0, 0.5), (K, 0.99))
    mask_pred = torch.stack([box_mask(0, 4, 0, 4), box_mask(4, 8, 4, 8), box_mask(0, 8, 0, 10)])
    pred = panoptic_inference(
        mask_cls, mask_pred, thing_ids=THINGS, object_mask_threshold=0.8, overlap_threshold=0.8
    )
    # Only query 0 is kept: query 1 is below the threshold, query 2 predicts no-object.
    assert len(pred.segments_info) == 1
    info = pred.segments_info[0]
    assert info["id"] == 1 and info["category_id"] == 0 and info["isthing"] is True
    assert info["score"] == pytest.approx(0.95, abs=1e-4)
    assert info["bbox"] == [0, 0, 4, 4]
    assert pred.query_indices.tolist() == [0]
    expected = torch.zeros(H, W, dtype=torch.int32)
    expected[0:4, 0:4] = 1
    assert pred.panoptic_seg.dtype == torch.int32
    assert torch.equal(pred.panoptic_seg, expected)  # everything else is VOID


def test_overlap_drops_a_mostly_hidden_query():
    # Query 1 (lower score) overlaps query 0 on 12 of its 16 pixels: it keeps 25% < 80%.
    mask_cls = class_logits((0, 0.99), (0, 0.9))
    mask_pred = torch.stack([box_mask(0, 4, 0, 6), box_mask(0, 4, 3, 7)])
    pred = panoptic_inference(mask_cls, mask_pred, thing_ids=THINGS, overlap_threshold=0.8)
    assert [s["id"] for s in pred.segments_info] == [1]
    assert pred.query_indices.tolist() == [0]
    assert int((pred.panoptic_seg == 1).sum()) == 24
    assert int((pred.panoptic_seg != 0).sum()) == 24  # the hidden query's pixels are VOID

    # With a permissive threshold the same query survives on the pixels it wins.
    pred = panoptic_inference(mask_cls, mask_pred, thing_ids=THINGS, overlap_threshold=0.2)
    assert len(pred.segments_info) == 2
    assert int((pred.panoptic_seg == 2).sum()) == 4
    assert pred.segments_info[1]["bbox"] == [6, 0, 1, 4]


def test_stuff_of_one_class_is_merged():
    # Two stuff queries of class 1 and two thing queries of class 0, all disjoint.
    mask_cls = class_logits((1, 0.85), (0, 0.9), (1, 0.97), (0, 0.92))
    mask_pred = torch.stack(
        [box_mask(0, 2, 0, 10), box_mask(2, 4, 0, 3), box_mask(6, 8, 0, 10), box_mask(2, 4, 5, 8)]
    )
    pred = panoptic_inference(mask_cls, mask_pred, thing_ids=THINGS)
    infos = pred.segments_info
    # One stuff segment for class 1 and one segment per thing.
    assert [(s["category_id"], s["isthing"]) for s in infos] == [(1, False), (0, True), (0, True)]
    stuff = infos[0]
    assert stuff["score"] == pytest.approx(0.97, abs=1e-4)  # the best of the merged queries
    assert pred.query_indices.tolist() == [2, 1, 3]  # the stuff caption comes from query 2
    assert int((pred.panoptic_seg == stuff["id"]).sum()) == 40
    assert stuff["bbox"] == [0, 0, 10, 8]  # spans both parts
    ids = set(pred.panoptic_seg.unique().tolist()) - {0}
    assert ids == {s["id"] for s in infos} == {1, 2, 3}


def test_nothing_kept_gives_all_void():
    mask_cls = class_logits((K, 0.99), (0, 0.3))
    mask_pred = torch.stack([box_mask(0, 8, 0, 10), box_mask(0, 8, 0, 10)])
    pred = panoptic_inference(mask_cls, mask_pred, thing_ids=THINGS)
    assert pred.segments_info == []
    assert pred.query_indices.numel() == 0
    assert int(pred.panoptic_seg.abs().sum()) == 0 and pred.panoptic_seg.shape == (H, W)


def test_max_segments_keeps_the_best_queries():
    mask_cls = class_logits((0, 0.85), (0, 0.99), (0, 0.9))
    mask_pred = torch.stack([box_mask(0, 2, 0, 2), box_mask(3, 5, 3, 5), box_mask(6, 8, 6, 8)])
    pred = panoptic_inference(mask_cls, mask_pred, thing_ids=THINGS, max_segments=2)
    assert sorted(pred.query_indices.tolist()) == [1, 2]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="same Q"):
        panoptic_inference(torch.zeros(3, K + 1), torch.zeros(2, H, W), thing_ids=THINGS)


def test_semantic_inference():
    mask_cls = class_logits((0, 0.9), (2, 0.6))
    mask_pred = torch.stack([box_mask(0, 4, 0, 10), box_mask(4, 8, 0, 10)])
    sem = semantic_inference(mask_cls, mask_pred)
    assert sem.shape == (K, H, W)
    assert sem[0, 0, 0] == pytest.approx(0.9, abs=1e-4)
    assert sem[2, 7, 0] == pytest.approx(0.6, abs=1e-4)
    assert sem.argmax(0)[:4].eq(0).all() and sem.argmax(0)[4:].eq(2).all()


def test_instance_inference_returns_things_only_sorted():
    # Query 0: a confident stuff query (never an instance); queries 1, 2: things.
    mask_cls = class_logits((1, 0.99), (0, 0.7), (0, 0.95))
    mask_pred = torch.stack([box_mask(0, 8, 0, 10), box_mask(0, 2, 0, 3), box_mask(4, 8, 2, 9)])
    inst = instance_inference(mask_cls, mask_pred, thing_ids=THINGS, max_detections=2)
    assert len(inst) == 2 and inst.image_size == (H, W)
    assert inst.pred_classes.tolist() == [0, 0]
    assert inst.query_indices.tolist() == [2, 1]
    assert inst.scores[0] >= inst.scores[1]
    assert inst.scores[0] == pytest.approx(0.95, abs=1e-3)
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape == (2, H, W)
    assert inst.pred_boxes.tolist() == [[2.0, 4.0, 9.0, 8.0], [0.0, 0.0, 3.0, 2.0]]

    none = instance_inference(mask_cls, mask_pred, thing_ids=set(), max_detections=5)
    assert len(none) == 0 and none.pred_masks.shape == (0, H, W)


def test_resize_mask_logits_crops_padding_then_resizes():
    # A 2x3 grid of a padded 8x12 batch; the image is the top-left 8x8, original 16x16.
    logits = torch.tensor([[[1.0, 1.0, -50.0], [1.0, 1.0, -50.0]]])
    out = resize_mask_logits(logits, (8, 12), (8, 8), (16, 16))
    assert out.shape == (1, 16, 16)
    # The padding column's very negative logits do not reach the left half.
    assert (out[0, :, :8] > 0).all()
    same = resize_mask_logits(logits, (8, 12), (8, 8), (8, 8))
    assert same.shape == (1, 8, 8)
