"""Grounding metrics of grounded captions: GLaMM's GCG protocol (mIoU, recall, mask AP50).

A grounded caption (COCONut-PanCap's PGC task, GLaMM's GCG task) comes with one mask per
grounded phrase. The protocol here follows GLaMM's ``eval/gcg/evaluate.py``
(mbzuai-oryx/groundingLMM), rule for rule:

* **mIoU** (:func:`gcg_miou`), per image: the IoU matrix of predicted x ground-truth phrase
  masks; repeatedly take the global maximum, record it as a pair and remove its row and column,
  while the maximum is above 0; the image's value is the mean of the paired IoUs, 0 when
  nothing pairs (no prediction, no overlap). The dataset's value is the mean over images.
* **recall** (:func:`gcg_recall_matches`), per image: the IoU matrix of ground-truth x
  predicted masks and the phrase-text similarity matrix; repeatedly take the global maximum
  IoU; if that pair's IoU is below 0.5 *or* its text similarity below 0.5, stop (the protocol
  stops at the first inadmissible maximum, even when a lower pair would pass); otherwise count
  it and zero its row and column in both matrices. Recall = counted pairs over all
  ground-truth phrases of the dataset.
* **AP50** (:func:`gcg_ap50`): COCO mask AP at IoU 0.5 by ``pycocotools``, every phrase mask
  one category, every prediction score 1.

Ties in a maximum go to the first index in row-major order, as ``numpy.argmax``. GLaMM
compares phrases with bert-base-uncased mean-pooled embeddings; offline, pix2cap uses any
local sentence-transformers folder, by default the installed all-MiniLM-L6-v2, and the result
names the embedder (``phrase_embedder``).

Masks are COCO RLE dicts (``pycocotools.mask.encode``) of one image size.
"""

from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util

from .pancapscore.matching import Embedder, cosine_matrix

__all__ = [
    "GroundedImage",
    "gcg_ap50",
    "gcg_miou",
    "gcg_recall_matches",
    "greedy_paired_iou",
    "grounding_metrics",
    "mask_iou_matrix",
]

IOU_THRESHOLD = 0.5
TEXT_SIMILARITY_THRESHOLD = 0.5

# One image: {"gt_masks": [RLE], "gt_phrases": [str], "pred_masks": [RLE],
# "pred_phrases": [str]}; phrase k goes with mask k on each side.
GroundedImage = Mapping[str, Sequence]


def mask_iou_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """Float[len(a), len(b)] IoU of every pair of RLE masks (0 where a union is empty)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    iou = mask_util.iou(list(a), list(b), [0] * len(b))
    return np.nan_to_num(np.asarray(iou, dtype=np.float64).reshape(len(a), len(b)))


def gcg_miou(pred_masks: Sequence[dict], gt_masks: Sequence[dict]) -> float:
    """One image's mIoU: mean IoU of greedily paired masks (module docstring), 0 if none."""
    return greedy_paired_iou(mask_iou_matrix(pred_masks, gt_masks))


def greedy_paired_iou(iou: np.ndarray) -> float:
    """Mean of the IoUs paired by repeatedly taking the global maximum (while above 0) and
    removing its row and column; 0 when nothing pairs. ``iou``: Float[P, G]."""
    iou = np.array(iou, dtype=np.float64)
    paired: list[float] = []
    while iou.size and iou.max() > 0:
        row, col = np.unravel_index(np.argmax(iou), iou.shape)
        paired.append(float(iou[row, col]))
        iou = np.delete(np.delete(iou, row, axis=0), col, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def gcg_recall_matches(
    iou: np.ndarray,
    text_similarity: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
    text_threshold: float = TEXT_SIMILARITY_THRESHOLD,
) -> list[tuple[int, int]]:
    """One image's counted ``(gt, pred)`` pairs for recall (module docstring).

    Args:
        iou, text_similarity: Float[G, P], ground truth by prediction.
    """
    if iou.shape != text_similarity.shape:
        raise ValueError(f"IoU {iou.shape} and text similarity {text_similarity.shape} differ")
    iou = np.array(iou, dtype=np.float64)
    sim = np.array(text_similarity, dtype=np.float64)
    matches: list[tuple[int, int]] = []
    while iou.size:
        row, col = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[row, col] < iou_threshold or sim[row, col] < text_threshold:
            break  # the protocol stops at the first maximum that is not admissible
        matches.append((int(row), int(col)))
        iou[row, :] = 0.0
        iou[:, col] = 0.0
        sim[row, :] = 0.0
        sim[:, col] = 0.0
    return matches


def gcg_ap50(images: Sequence[GroundedImage]) -> float:
    """COCO mask AP at IoU 0.5 over all images' phrase masks (one category, scores 1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "phrase"}]}
    predictions = []
    for image_id, image in enumerate(images, start=1):
        masks = list(image["gt_masks"]) + list(image["pred_masks"])
        if not masks:
            gt["images"].append({"id": image_id, "height": 1, "width": 1})
            continue
        height, width = (int(v) for v in masks[0]["size"])
        gt["images"].append({"id": image_id, "height": height, "width": width})
        for rle in image["gt_masks"]:
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
        for rle in image["pred_masks"]:
            predictions.append(
                {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": 1.0}
            )
    if not gt["annotations"] or not predictions:
        return 0.0
    # pycocotools prints its progress; the evaluator reports the number itself.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(predictions)
        evaluation = COCOeval(coco_gt, coco_dt, "segm")
        evaluation.params.catIds = [1]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(max(evaluation.stats[1], 0.0))  # -1 means "no ground truth"


def grounding_metrics(
    images: Sequence[GroundedImage],
    embedder: Embedder,
    embedder_name: Optional[str] = None,
) -> "OrderedDict[str, object]":
    """GCG mIoU, recall and AP50 of a dataset's grounded captions.

    Args:
        images: one :data:`GroundedImage` per image, every image of the dataset (an image
            without predictions counts with mIoU 0 and its phrases unrecalled).
        embedder: texts -> Float[N, D] unit vectors (e.g.
            ``pancapscore.matching.SentenceTransformerEmbedder``), for phrase similarity.
        embedder_name: recorded as ``phrase_embedder``.

    Returns:
        ``mIoU``, ``recall``, ``AP50`` (0-1, as GLaMM prints them), ``recalled_phrases``,
        ``gt_phrases``, ``num_images``, ``phrase_embedder``.
    """
    mious, recalled, total = [], 0, 0
    for image in images:
        gt_masks, pred_masks = list(image["gt_masks"]), list(image["pred_masks"])
        gt_phrases, pred_phrases = list(image["gt_phrases"]), list(image["pred_phrases"])
        if len(gt_masks) != len(gt_phrases) or len(pred_masks) != len(pred_phrases):
            raise ValueError(
                "every grounded phrase needs exactly one mask: ground truth has "
                f"{len(gt_phrases)} phrases and {len(gt_masks)} masks, the prediction "
                f"{len(pred_phrases)} phrases and {len(pred_masks)} masks"
            )
        iou = mask_iou_matrix(pred_masks, gt_masks)  # [P, G], for both metrics
        mious.append(greedy_paired_iou(iou))
        total += len(gt_phrases)
        similarity = cosine_matrix(embedder, gt_phrases, pred_phrases)
        recalled += len(gcg_recall_matches(iou.T, similarity))
    results: "OrderedDict[str, object]" = OrderedDict()
    results["mIoU"] = float(np.mean(mious)) if mious else 0.0
    results["recall"] = recalled / total if total else 0.0
    results["AP50"] = gcg_ap50(images)
    results["recalled_phrases"] = recalled
    results["gt_phrases"] = total
    results["num_images"] = len(mious)
    results["phrase_embedder"] = embedder_name or getattr(embedder, "name", type(embedder).__name__)
    return results
