import os

import pytest
import torch
import torch.nn.functional as F

from pix2cap.modeling.postprocessing import (
    PanopticPrediction,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    resize_panoptic,
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


# -- results at the original size from the merge at the inference resolution ------------------


def _random_boxes(num, height, width, generator, big=BIG):
    """``num`` box masks on an ``height x width`` grid (+-``big`` logits), each at most a
    third of the grid a side; three in four queries say "thing" (class 0)."""
    masks = torch.full((num, height, width), -big)
    for q in range(num):
        y0, x0 = (int(torch.randint(0, s - 1, (), generator=generator)) for s in (height, width))
        y1 = min(height, y0 + int(torch.randint(1, max(2, height // 3), (), generator=generator)))
        x1 = min(width, x0 + int(torch.randint(1, max(2, width // 3), (), generator=generator)))
        masks[q, y0:y1, x0:x1] = big
    labels = torch.randint(0, 4, (num,), generator=generator).clamp(max=K - 1)
    labels = torch.where(labels >= 2, labels - 1, torch.zeros_like(labels))
    scores = 0.85 + 0.14 * torch.rand(num, generator=generator)
    return class_logits(*zip(labels.tolist(), scores.tolist())), masks


def _random_stripes(num, height, width, generator, big):
    """Like :func:`_random_boxes`, but each mask is a band of whole rows or of whole columns:
    a mask that varies along one axis only, whose upsampled logits change sign exactly where
    the nearest inference pixel changes (at a box's corner bilinear logits round it off)."""
    cls, masks = _random_boxes(num, height, width, generator, big)
    for q in range(num):
        rows = (masks[q] > 0).any(1)
        cols = (masks[q] > 0).any(0)
        masks[q] = -big
        if q % 2:
            masks[q, rows] = big
        else:
            masks[q, :, cols] = big
    return cls, masks


def _merge_at_full_size(mask_cls, mask_pred, size, **kwargs):
    """The merge as it was: every query's logits upsampled to ``size`` first."""
    full = F.interpolate(mask_pred[None], size=size, mode="bilinear", align_corners=False)[0]
    return panoptic_inference(mask_cls, full, thing_ids=THINGS, **kwargs)


@pytest.mark.parametrize("size", [(45, 63), (100, 77), (13, 29)])
def test_resize_panoptic_equals_the_merge_at_full_size(size):
    # Where the two ways differ: the old one draws boundaries from upsampled soft logits, so
    # (a) box corners come out rounded and (b) within a band around the middle between two
    # inference pixels a query's probability is soft and a lower-scoring one can win. Masks
    # of whole rows or columns have no corners; logits of +-1000 make the band 1/1000 of a
    # pixel wide; odd inference sizes put no output pixel centre on the middle itself. There
    # the two ways agree exactly. (100, 77) stretches rows and columns by different factors;
    # (13, 29) shrinks the rows (where, in general, a query's kept share of its mask, measured
    # at the inference resolution now, may differ enough to change the overlap test).
    g = torch.Generator().manual_seed(3)
    mask_cls, mask_pred = _random_stripes(8, 15, 21, g, big=1000.0)
    kwargs = dict(object_mask_threshold=0.8, overlap_threshold=0.3)
    small = panoptic_inference(mask_cls, mask_pred, thing_ids=THINGS, **kwargs)
    assert len(small.segments_info) >= 4
    resized = resize_panoptic(small, size)
    reference = _merge_at_full_size(mask_cls, mask_pred, size, **kwargs)
    assert resized.panoptic_seg.shape == size and resized.panoptic_seg.dtype == torch.int32
    assert torch.equal(resized.panoptic_seg, reference.panoptic_seg)
    assert resized.segments_info == reference.segments_info  # ids, classes, scores, boxes
    assert resized.query_indices.tolist() == reference.query_indices.tolist()
    # The inference-resolution prediction is left as it was.
    assert small.panoptic_seg.shape == (15, 21)


def test_resize_panoptic_boxes_and_vanished_segments():
    seg = torch.zeros(4, 6, dtype=torch.int32)
    seg[0, 1] = 1  # one pixel: row 0 and column 1 are not sampled when shrinking to 2 x 3
    seg[1:, 3:] = 2
    seg[:, :3] = 3
    seg[0, 1] = 1
    infos = [
        {"id": i, "category_id": 0, "isthing": True, "score": 0.9, "bbox": [0, 0, 0, 0]}
        for i in (1, 2, 3)
    ]
    prediction = PanopticPrediction(seg, infos, torch.tensor([5, 6, 7]))
    assert resize_panoptic(prediction, (4, 6)) is prediction  # nothing to do
    # Shrinking: output pixel (y, x) samples (2y + 1, 2x + 1); segment 1 has no pixel left.
    small = resize_panoptic(prediction, (2, 3))
    assert small.panoptic_seg.tolist() == [[3, 2, 2], [3, 2, 2]]
    assert [s["id"] for s in small.segments_info] == [2, 3]
    assert small.query_indices.tolist() == [6, 7]
    assert [s["bbox"] for s in small.segments_info] == [[1, 0, 2, 2], [0, 0, 1, 2]]
    assert infos[0]["bbox"] == [0, 0, 0, 0]  # new dicts: the input's are not changed
    # Stretching by 2.5 x 1.5: boxes are those of the pixels in the stretched map.
    big = resize_panoptic(prediction, (10, 9))
    for info in big.segments_info:
        ys, xs = (big.panoptic_seg == info["id"]).nonzero(as_tuple=True)
        x0, y0 = int(xs.min()), int(ys.min())
        assert info["bbox"] == [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
    assert len(big.segments_info) == 3
    # torch's nearest-exact picks the same pixels.
    expected = F.interpolate(seg[None, None].float(), size=(10, 9), mode="nearest-exact")
    assert torch.equal(big.panoptic_seg, expected[0, 0].int())


def _peak_rss_tracker():
    """``(reset, peak_mib)`` over /proc/self (Linux), or None where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current size
    except OSError:
        return None

    def peak_mib():
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024

    def current_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    return current_mib, peak_mib


def test_merge_for_a_huge_original_allocates_only_the_id_map():
    # 200 queries and a 6000 x 6000 original: upsampling every query's logits first would be
    # 200 * 36e6 * 4 bytes = 28.8 GB; the map at that size is Int32, 144 MB.
    g = torch.Generator().manual_seed(1)
    mask_cls, mask_pred = _random_boxes(200, 75, 75, g)
    small = panoptic_inference(
        mask_cls, mask_pred, thing_ids=THINGS, object_mask_threshold=0.8, overlap_threshold=0.3
    )
    assert len(small.segments_info) >= 10
    tracker = _peak_rss_tracker()
    before = tracker[0]() if tracker else None
    big = resize_panoptic(small, (6000, 6000))
    if tracker:
        # The map, a [6000, 75] intermediate and a [S, 75, 75] stack for the boxes.
        assert tracker[1]() - before < 400, "more than the id map was allocated"
    assert big.panoptic_seg.shape == (6000, 6000) and big.panoptic_seg.dtype == torch.int32
    # 80 x 80 output pixels per inference pixel: every block holds its pixel's id.
    blocks = big.panoptic_seg.view(75, 80, 75, 80)
    assert torch.equal(blocks[:, 0, :, 0], small.panoptic_seg)
    assert bool((blocks == small.panoptic_seg[:, None, :, None]).all())
    assert [s["id"] for s in big.segments_info] == [s["id"] for s in small.segments_info]
    for info, small_info in zip(big.segments_info, small.segments_info):
        x, y, w, h = small_info["bbox"]
        assert info["bbox"] == [80 * x, 80 * y, 80 * w, 80 * h]


def test_instance_inference_at_output_size_equals_upsampling_every_query():
    g = torch.Generator().manual_seed(2)
    mask_cls, mask_pred = _random_boxes(6, 15, 21, g)
    size = (52, 70)
    full = F.interpolate(mask_pred[None], size=size, mode="bilinear", align_corners=False)[0]
    reference = instance_inference(mask_cls, full, thing_ids=THINGS, max_detections=8)
    inst = instance_inference(
        mask_cls, mask_pred, thing_ids=THINGS, max_detections=8, output_size=size
    )
    assert inst.image_size == size and len(inst) == len(reference) == 6  # one thing class
    assert torch.equal(inst.pred_masks, reference.pred_masks)
    assert torch.equal(inst.pred_boxes, reference.pred_boxes)
    assert torch.equal(inst.query_indices, reference.query_indices)
    assert torch.allclose(inst.scores, reference.scores, atol=1e-6)
    # A query kept for two classes has the same mask under both.
    things = {0, 1}
    two = instance_inference(
        mask_cls, mask_pred, thing_ids=things, max_detections=12, output_size=size
    )
    for q in two.query_indices.unique().tolist():
        rows = (two.query_indices == q).nonzero().flatten().tolist()
        assert all(torch.equal(two.pred_masks[r], two.pred_masks[rows[0]]) for r in rows)


def test_semantic_inference_resizes_class_scores():
    g = torch.Generator().manual_seed(3)
    mask_cls, mask_pred = _random_boxes(5, 15, 21, g)
    small = semantic_inference(mask_cls, mask_pred)
    assert torch.equal(semantic_inference(mask_cls, mask_pred, (15, 21)), small)
    big = semantic_inference(mask_cls, mask_pred, (45, 63))
    assert big.shape == (K, 45, 63)
    # Integer stretch, pixel centres aligned: each 3 x 3 block's centre is the small pixel.
    assert torch.allclose(big[:, 1::3, 1::3], small, atol=1e-6)
