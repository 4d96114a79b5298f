"""GLaMM GCG grounding metrics (pix2cap.evaluation.grounding) on hand-computed cases."""

import numpy as np
import pytest
from pycocotools import mask as mask_util

from pix2cap.evaluation.grounding import (
    gcg_ap50,
    gcg_miou,
    gcg_recall_matches,
    greedy_paired_iou,
    grounding_metrics,
    mask_iou_matrix,
)


def rle(*boxes, size=(8, 8)):
    """An RLE of the union of ``(x0, y0, x1, y1)`` pixel boxes (end exclusive)."""
    mask = np.zeros(size, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask_util.encode(np.asfortranarray(mask))


class WordEmbedder:
    """Unit vectors by phrase; phrases sharing their last word are identical, others
    orthogonal (similarity 1 or 0)."""

    name = "last-word"

    def __call__(self, texts):
        words = sorted({t.split()[-1] for t in texts})
        out = np.zeros((len(texts), max(len(words), 1)), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, words.index(t.split()[-1])] = 1.0
        return out


def test_mask_iou_matrix():
    gt = [rle((0, 0, 4, 8)), rle((4, 0, 8, 2))]  # left half (32 px), top-right strip (8 px)
    pred = [rle((0, 0, 4, 8)), rle((6, 0, 8, 4))]  # left half, a 2 x 4 block (8 px)
    iou = mask_iou_matrix(pred, gt)
    # pred 1 and gt 1 share 2 x 2 = 4 pixels of a 12-pixel union.
    np.testing.assert_allclose(iou, [[1.0, 0.0], [0.0, 4 / 12]])
    assert mask_iou_matrix([], gt).shape == (0, 2)
    # mIoU pairs (pred 0, gt 0) = 1, then (pred 1, gt 1) = 1/3.
    assert gcg_miou(pred, gt) == pytest.approx((1.0 + 1 / 3) / 2)


def test_miou_pairs_greedily_not_optimally():
    # Greedy takes 0.6 first; pred 1 is then left with gt 1 at IoU 0, which does not pair.
    # (A Hungarian assignment would pair 0.5 and 0.55.)
    iou = np.array([[0.6, 0.5], [0.55, 0.0]])
    assert greedy_paired_iou(iou) == pytest.approx(0.6)
    # Unpaired masks do not lower the mean; nothing above 0 gives 0.
    assert greedy_paired_iou(np.array([[0.8, 0.0, 0.0]])) == pytest.approx(0.8)
    assert greedy_paired_iou(np.zeros((2, 2))) == 0.0
    assert greedy_paired_iou(np.zeros((0, 3))) == 0.0


def test_recall_counts_admissible_maxima_and_stops_at_the_first_that_is_not():
    iou = np.array([[0.9, 0.6], [0.7, 0.8]])
    sim = np.ones_like(iou)
    assert gcg_recall_matches(iou, sim) == [(0, 0), (1, 1)]
    # The global maximum's phrases differ: the protocol stops there, although (1, 1) would
    # pass both thresholds.
    sim = np.array([[0.3, 1.0], [1.0, 1.0]])
    assert gcg_recall_matches(iou, sim) == []
    # An IoU below 0.5 stops it as well.
    iou = np.array([[0.9, 0.0], [0.0, 0.45]])
    assert gcg_recall_matches(iou, np.ones_like(iou)) == [(0, 0)]
    assert gcg_recall_matches(np.zeros((2, 0)), np.zeros((2, 0))) == []
    with pytest.raises(ValueError, match="differ"):
        gcg_recall_matches(np.zeros((2, 2)), np.zeros((2, 3)))


def test_ap50():
    gt = [rle((0, 0, 4, 8)), rle((4, 0, 8, 2))]
    perfect = [{"gt_masks": gt, "pred_masks": gt, "gt_phrases": ["a", "b"], "pred_phrases": []}]
    assert gcg_ap50(perfect) == pytest.approx(1.0)
    # One of the two ground-truth masks found, no false positive: recall reaches 0.5 at
    # precision 1, so COCO's 101-point AP is 51 / 101.
    half = [{"gt_masks": gt, "pred_masks": gt[:1]}]
    assert gcg_ap50(half) == pytest.approx(51 / 101)
    assert gcg_ap50([{"gt_masks": gt, "pred_masks": []}]) == 0.0
    assert gcg_ap50([{"gt_masks": [], "pred_masks": []}]) == 0.0


def test_grounding_metrics_over_images():
    gt = [rle((0, 0, 4, 8)), rle((4, 0, 8, 2))]
    images = [
        {  # both phrases found and named alike: recalled 2 of 2
            "gt_masks": gt,
            "gt_phrases": ["a brown dog", "the blue sky"],
            "pred_masks": [gt[0], rle((4, 0, 8, 3))],  # IoU 1 and 8 / 12
            "pred_phrases": ["the dog", "sky"],
        },
        {  # the right mask under a wrong phrase: paired for mIoU, not recalled
            "gt_masks": gt[:1],
            "gt_phrases": ["a cat"],
            "pred_masks": gt[:1],
            "pred_phrases": ["a dog"],
        },
        {  # no prediction at all: mIoU 0, its phrase unrecalled
            "gt_masks": gt[1:],
            "gt_phrases": ["grass"],
            "pred_masks": [],
            "pred_phrases": [],
        },
    ]
    result = grounding_metrics(images, WordEmbedder())
    assert result["mIoU"] == pytest.approx(((1.0 + 8 / 12) / 2 + 1.0 + 0.0) / 3)
    assert (result["recalled_phrases"], result["gt_phrases"]) == (2, 4)
    assert result["recall"] == pytest.approx(0.5)
    assert result["num_images"] == 3 and result["phrase_embedder"] == "last-word"
    # 3 of the 4 ground-truth masks found at IoU >= 0.5, no false positive: precision 1 up to
    # recall 0.75, i.e. 76 of COCO's 101 recall points.
    assert result["AP50"] == pytest.approx(76 / 101)
    with pytest.raises(ValueError, match="exactly one mask"):
        grounding_metrics([{**images[0], "pred_phrases": ["dog"]}], WordEmbedder())
