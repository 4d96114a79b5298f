"""Dense-caption mAP (the DenseCap protocol on masks) and caption metrics on matched segments.

Dense-caption mAP (``densecap_map``)
------------------------------------
Every predicted segment has a mask, a score, a caption and a class; every ground-truth (GT)
segment a mask, a caption, a class and an ``iscrowd`` flag. For each threshold pair
(t, s) in IoU thresholds x METEOR thresholds:

1. The predictions of all images are ranked by score, highest first (a stable sort: ties keep
   image order, then prediction order).
2. Going down that ranking, each prediction is compared with the GT segments of its own image
   that are *not yet matched at (t, s)*; the one with the highest mask IoU is its candidate
   (classes are ignored: the caption carries the semantics). The prediction is a true
   positive iff ``IoU >= t`` and ``METEOR(prediction caption, candidate caption) > s``; the
   candidate is then matched at (t, s) and cannot serve another prediction there
   (one-to-one matching, as COCO does per IoU threshold).
3. A prediction that is not a true positive is ignored (neither TP nor FP) when a crowd GT
   segment covers at least a fraction t of it (intersection / prediction area), as COCO does;
   otherwise it is a false positive.
4. ``npos`` = number of non-crowd GT segments. Precision/recall along the ranking give
   AP(t, s) = the 101-point max-interpolated area under the precision-recall curve: the mean
   over r in {0, 0.01, ..., 1} of the highest precision reached at a recall >= r (0 where
   recall never reaches r). This is the interpolation of DenseCap's ``eval_utils`` and of
   COCO, chosen over VOC's all-point area so that numbers are comparable with Pix2Cap's paper.
5. ``mAP`` = mean of AP over the 30 (t, s) pairs; ``AP_det`` = mean over t of the
   detection-only AP (the same procedure with the METEOR condition dropped).

All values are reported in percent (x100). METEOR is computed in one batched call for every
(prediction, GT) pair of an image whose IoU reaches the smallest IoU threshold: no other pair
can ever be a true positive.

Differences from DenseCap's Lua evaluator, on purpose: DenseCap assigns each prediction to its
best-IoU GT among *all* GTs once, independent of thresholds, and counts it as FP if that GT
was taken; here the best *unmatched* GT is used per threshold pair (the COCO rule, as
DESIGN 5.2 states). Crowd handling does not exist in DenseCap.

``compat=True``: the official Pix2Cap evaluator
-----------------------------------------------
Reproduces ``caption_distribute_map.py`` of the official Pix2Cap code, for comparison with the
paper's numbers only (the protocol is flawed; do not use it to compare models):

- IoU is PQ's: ``inter / (area_pred + area_gt - inter - |pred on VOID|)``, VOID being the GT's
  unlabeled pixels (the ``void`` mask of a GT entry; none if absent).
- One *record* per (GT, prediction) pair of an image that overlaps (intersection > 0), has the
  same category and a non-crowd GT: no one-to-one matching, so a prediction or a GT can appear
  in several records and a prediction overlapping nothing of its class is never counted.
- Records are taken image by image, GT segment by GT segment, prediction by prediction (the
  official code walks PNG ids in ascending order); they are **not** sorted by score.
- The METEOR of a record swaps the roles and splits the predicted caption into characters:
  candidate = the GT caption, references = the distinct non-space characters of the predicted
  caption (the official code passes the caption string where a list of references belongs;
  repeated references do not change METEOR's max over references). The official code used
  NLTK's METEOR; here ``meteor_fn`` (the METEOR 1.5 jar) scores the same strings, so values
  differ slightly from the paper's.
- A record is TP at (t, s) iff ``IoU >= t`` and ``METEOR > s``, else FP (an empty predicted
  caption is always FP). Detection-only AP: METEOR ignored.
- ``npos`` counts **all** GT segments, crowd ones included.
- AP is the same 101-point interpolation; mAP the mean over the 30 pairs.
- Matched pairs for caption metrics are PQ matches (same category, non-crowd, IoU > 0.5); FP are
  unmatched predictions except those more than half on VOID or same-category crowd; FN the
  unmatched non-crowd GTs.

Caption metrics (``caption_metrics``)
-------------------------------------
BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``pycocoevalcap`` after its PTB tokenizer, each matched
(prediction, GT) pair being one "image" with one reference, in percent. With ``total`` =
TP + FP + FN, the official Pix2Cap variant ``<metric>_pix2cap_scaled`` = metric * matched /
total is added (it folds detection quality into the caption score). SPICE runs only if the
Stanford CoreNLP jars are already in ``pycocoevalcap/spice/lib``; CAPTURE only when the
environment variable ``PIX2CAP_CAPTURE_MODELS`` names a local model folder; otherwise both are
listed under ``skipped`` with the reason, never reported as 0.

Caption truth (``caption_truth``)
---------------------------------
A nested dict next to mAP (definitions in :mod:`pix2cap.evaluation.caption_truth`): where the
GT segments carry ``attributes`` (and ``relation``), the accuracy of each attribute and whether
the relation object exists and the relation holds, on predicted things matched one-to-one to a
GT thing of the same class at mask IoU >= 0.5; for any dataset, ``memorised`` (share of
predicted captions copied verbatim from a training caption; needs the training dataset names)
and ``distinct_per_100``. What cannot be computed is listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util

from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.structures import PanopticResult
from pix2cap.utils import comm

from .build import EVALUATOR_REGISTRY
from .caption_truth import CaptionVocabulary, caption_novelty, caption_truth
from .evaluator import DatasetEvaluator
from .ground_truth import GroundTruthReader
from .meteor import JavaNotFoundError, MeteorScorer, find_java
from .results import print_results_table, write_results_json

__all__ = [
    "DenseCaptionEvaluator",
    "densecap_map",
    "caption_metrics",
    "average_precision_101",
    "masks_to_rles",
    "DEFAULT_IOU_THRESHOLDS",
    "DEFAULT_METEOR_THRESHOLDS",
]

logger = logging.getLogger(__name__)

DEFAULT_IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
# IoU at which matched pairs are collected for the caption metrics.
CAPTION_MATCH_IOU = 0.5
CAPTURE_ENV = "PIX2CAP_CAPTURE_MODELS"

MeteorFn = Callable[[list[tuple[str, list[str]]]], Sequence[float]]


# --------------------------------------------------------------------------------------- masks
def masks_to_rles(masks: Any, where: str) -> list[dict]:
    """Encode masks as COCO RLEs.

    Args:
        masks: Bool[N, H, W] (numpy or torch), or a list of RLE dicts (``size``, ``counts``).
        where: names the input in error messages.
    Returns:
        list of N RLE dicts.
    """
    if isinstance(masks, (list, tuple)):
        rles = []
        for i, rle in enumerate(masks):
            if not (isinstance(rle, dict) and "size" in rle and "counts" in rle):
                raise ValueError(f"{where}: mask {i} is neither an RLE dict nor part of an array")
            if isinstance(rle["counts"], list):  # uncompressed RLE -> compressed
                rle = mask_util.frPyObjects(rle, *rle["size"])
            rles.append(rle)
        return rles
    if hasattr(masks, "detach"):  # torch.Tensor without importing torch here
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{where}: masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants Fortran-ordered uint8 [H, W, N].
    stacked = np.asfortranarray(np.moveaxis(masks.astype(bool), 0, -1).astype(np.uint8))
    return list(mask_util.encode(stacked))


def _rle_size(rles: list[dict]) -> Optional[tuple[int, int]]:
    return tuple(int(v) for v in rles[0]["size"]) if rles else None


# ----------------------------------------------------------------------------------------- AP
def average_precision_101(tp: np.ndarray, fp: np.ndarray, npos: int) -> float:
    """101-point max-interpolated AP of a ranked list.

    Args:
        tp, fp: Float/Bool[N], 1 where the ranked prediction is a true / false positive
            (both 0 for an ignored prediction).
        npos: number of positives (GT segments that count).
    Returns:
        AP in [0, 1]; NaN when ``npos`` is 0 (recall is undefined).
    """
    if npos <= 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    recall = tp_cum / npos
    denom = tp_cum + fp_cum
    precision = np.divide(tp_cum, denom, out=np.zeros_like(tp_cum), where=denom > 0)
    # Highest precision at any later rank = max precision at recall >= r (recall only grows).
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    # Round the grid so 0.29999... does not miss a recall of exactly 0.3.
    grid = np.round(np.linspace(0.0, 1.0, 101), 10)
    idx = np.searchsorted(np.round(recall, 10), grid, side="left")
    values = np.where(idx < len(recall), envelope[np.minimum(idx, len(recall) - 1)], 0.0)
    return float(values.mean())


def _ap_key(t: float, s: float) -> str:
    return f"AP@iou{t:g}/meteor{s:g}"


def _det_key(t: float) -> str:
    return f"AP_det@iou{t:g}"


# --------------------------------------------------------------------------------- per image
class _Image:
    """One image's encoded predictions and GT, checked once."""

    def __init__(self, index: int, pred: dict, gt: dict):
        where = f"image {index}" + (f" (image_id={gt['image_id']})" if "image_id" in gt else "")
        self.where = where
        for key in ("masks", "scores", "captions"):
            if key not in pred:
                raise KeyError(f"{where}: prediction lacks key {key!r} (has {sorted(pred)})")
        for key in ("masks", "captions"):
            if key not in gt:
                raise KeyError(f"{where}: ground truth lacks key {key!r} (has {sorted(gt)})")
        self.pred_rles = masks_to_rles(pred["masks"], f"{where} predictions")
        self.gt_rles = masks_to_rles(gt["masks"], f"{where} ground truth")
        p, g = len(self.pred_rles), len(self.gt_rles)
        self.scores = np.asarray(_as_list(pred["scores"]), dtype=np.float64).reshape(-1)
        self.pred_captions = [str(c) for c in pred["captions"]]
        self.gt_captions = [str(c) for c in gt["captions"]]
        self.pred_classes = np.asarray(
            _as_list(pred.get("category_ids", [-1] * p)), dtype=np.int64
        ).reshape(-1)
        self.gt_classes = np.asarray(
            _as_list(gt.get("category_ids", [-1] * g)), dtype=np.int64
        ).reshape(-1)
        self.crowd = np.asarray(_as_list(gt.get("iscrowd", [0] * g)), dtype=bool).reshape(-1)
        for name, values, n in (
            ("prediction scores", self.scores, p),
            ("prediction captions", self.pred_captions, p),
            ("prediction category_ids", self.pred_classes, p),
            ("ground-truth captions", self.gt_captions, g),
            ("ground-truth category_ids", self.gt_classes, g),
            ("ground-truth iscrowd", self.crowd, g),
        ):
            if len(values) != n:
                raise ValueError(f"{where}: {len(values)} {name} for {n} masks")
        if not np.all(np.isfinite(self.scores)):
            raise ValueError(f"{where}: prediction scores must be finite, got {self.scores}")
        sizes = {s for s in (_rle_size(self.pred_rles), _rle_size(self.gt_rles)) if s}
        self.void_rle = None
        if gt.get("void") is not None:
            void = gt["void"]
            if isinstance(void, dict):
                self.void_rle = masks_to_rles([void], f"{where} void")[0]
            else:
                self.void_rle = masks_to_rles(np.asarray(void)[None], f"{where} void")[0]
            sizes.add(_rle_size([self.void_rle]))
        if len(sizes) > 1:
            raise ValueError(f"{where}: predicted and ground-truth masks differ in size {sizes}")
        self.pred_area = mask_util.area(self.pred_rles).astype(np.float64) if p else np.zeros(0)
        self.gt_area = mask_util.area(self.gt_rles).astype(np.float64) if g else np.zeros(0)
        # iou[i, j]: mask IoU for a non-crowd GT j; intersection / prediction area for a crowd
        # GT j (pycocotools' iscrowd rule).
        if p and g:
            self.iou = np.asarray(
                mask_util.iou(self.pred_rles, self.gt_rles, self.crowd.astype(np.uint8).tolist()),
                dtype=np.float64,
            ).reshape(p, g)
        else:
            self.iou = np.zeros((p, g))

    def intersections(self) -> np.ndarray:
        """Float[P, G] pixel counts of prediction-GT intersections (recovered from the IoUs)."""
        p_area = self.pred_area[:, None]
        g_area = self.gt_area[None, :]
        plain = self.iou * (p_area + g_area) / (1.0 + self.iou)
        crowd = self.iou * p_area
        return np.rint(np.where(self.crowd[None, :], crowd, plain))

    def void_intersections(self) -> np.ndarray:
        """Float[P]: predicted pixels lying on the GT's VOID."""
        if self.void_rle is None or not self.pred_rles:
            return np.zeros(len(self.pred_rles))
        covered = np.asarray(mask_util.iou(self.pred_rles, [self.void_rle], [1])).reshape(-1)
        return np.rint(covered * self.pred_area)


def _as_list(values) -> list:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return list(np.asarray(values).reshape(-1)) if not isinstance(values, list) else values


# ------------------------------------------------------------------------------ DenseCap mAP
def densecap_map(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    meteor_fn: MeteorFn,
    *,
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    meteor_thresholds: Sequence[float] = DEFAULT_METEOR_THRESHOLDS,
    compat: bool = False,
) -> dict:
    """Dense-caption mAP over a dataset (protocol in the module docstring).

    Args:
        predictions: one dict per image: ``masks`` Bool[N, H, W] or N RLE dicts, ``scores``
            Float[N], ``captions`` list[str] (N), ``category_ids`` Int[N] (needed by
            ``compat``).
        ground_truths: one dict per image, aligned with ``predictions``: ``masks`` Bool[M, H, W]
            or M RLEs, ``captions`` list[str] (M), ``category_ids`` Int[M], ``iscrowd`` Int[M]
            (default all 0), optional ``void`` Bool[H, W] or RLE (unlabeled pixels, used by
            ``compat``), optional ``image_id`` (for error messages).
        meteor_fn: ``meteor_fn([(candidate, [reference, ...]), ...]) -> [score, ...]``, e.g. a
            :class:`~pix2cap.evaluation.meteor.MeteorScorer`; called once.
        iou_thresholds, meteor_thresholds: the grid.
        compat: reproduce the official Pix2Cap evaluator instead (paper comparison only).
    Returns:
        dict with ``mAP``, ``AP_det`` (percent), ``AP@iou{t}/meteor{s}`` and ``AP_det@iou{t}``
        (percent) for each threshold, ``npos``, ``num_predictions``, ``protocol``, and, for the
        caption metrics, ``matched_pairs`` (list of ``(pred_caption, gt_caption)`` matched at
        IoU 0.5, METEOR ignored) and ``match_counts`` (``TP``, ``FP``, ``FN`` there).
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"densecap_map: {len(predictions)} prediction entries for {len(ground_truths)} "
            "ground-truth entries; they must be aligned per image"
        )
    iou_thresholds = [float(t) for t in iou_thresholds]
    meteor_thresholds = [float(s) for s in meteor_thresholds]
    if not iou_thresholds or not meteor_thresholds:
        raise ValueError("densecap_map: iou_thresholds and meteor_thresholds must be non-empty")
    images = [_Image(i, p, g) for i, (p, g) in enumerate(zip(predictions, ground_truths))]
    if compat:
        return _official_map(images, meteor_fn, iou_thresholds, meteor_thresholds)
    return _densecap_map(images, meteor_fn, iou_thresholds, meteor_thresholds)


def _densecap_map(images, meteor_fn, iou_thresholds, meteor_thresholds) -> dict:
    # Rows of the threshold grid: the (t, s) pairs, then detection-only rows (s = -inf), plus a
    # detection row at the caption-matching IoU if the grid lacks it.
    det_ious = list(iou_thresholds)
    if CAPTION_MATCH_IOU not in det_ious:
        det_ious.append(CAPTION_MATCH_IOU)
    row_t = [t for t in iou_thresholds for _ in meteor_thresholds] + det_ious
    row_s = [s for _ in iou_thresholds for s in meteor_thresholds] + [-math.inf] * len(det_ious)
    num_caption_rows = len(iou_thresholds) * len(meteor_thresholds)
    caption_row = num_caption_rows + det_ious.index(CAPTION_MATCH_IOU)
    row_t = np.asarray(row_t)
    row_s = np.asarray(row_s)
    min_iou = float(min(iou_thresholds))

    # One METEOR call for every pair that can reach the smallest IoU threshold.
    queries: list[tuple[str, list[str]]] = []
    locations: list[tuple[int, int, int]] = []
    for k, image in enumerate(images):
        plain_iou = np.where(image.crowd[None, :], -1.0, image.iou)
        for i, j in zip(*np.nonzero(plain_iou >= min_iou)):
            queries.append((image.pred_captions[i], [image.gt_captions[j]]))
            locations.append((k, int(i), int(j)))
    meteor_scores = list(meteor_fn(queries)) if queries else []
    if len(meteor_scores) != len(queries):
        raise RuntimeError(f"meteor_fn returned {len(meteor_scores)} scores for {len(queries)} pairs")
    meteor_maps = [np.full(image.iou.shape, -math.inf) for image in images]
    for (k, i, j), score in zip(locations, meteor_scores):
        meteor_maps[k][i, j] = float(score)

    all_scores, all_tp, all_fp = [], [], []
    matched_pairs: list[tuple[str, str]] = []
    npos = 0
    for image, meteor in zip(images, meteor_maps):
        num_pred = len(image.pred_rles)
        keep = ~image.crowd
        npos += int(keep.sum())
        iou = image.iou[:, keep]  # [P, Gn]
        meteor = meteor[:, keep]
        crowd_cover = (
            image.iou[:, image.crowd].max(axis=1) if image.crowd.any() else np.zeros(num_pred)
        )
        gt_index = np.nonzero(keep)[0]
        tp = np.zeros((len(row_t), num_pred))
        fp = np.zeros((len(row_t), num_pred))
        matched = np.zeros((len(row_t), iou.shape[1]), dtype=bool)
        rows = np.arange(len(row_t))
        # Within an image the global ranking is the image's own ranking.
        for i in np.argsort(-image.scores, kind="stable"):
            if iou.shape[1]:
                available = np.where(matched, -1.0, iou[i][None, :])  # [rows, Gn]
                best = available.argmax(axis=1)
                best_iou = available[rows, best]
                is_tp = (best_iou >= row_t) & (meteor[i][best] > row_s)
                matched[rows[is_tp], best[is_tp]] = True
                if is_tp[caption_row]:
                    j = gt_index[best[caption_row]]
                    matched_pairs.append((image.pred_captions[i], image.gt_captions[j]))
            else:
                is_tp = np.zeros(len(row_t), dtype=bool)
            ignored = ~is_tp & (crowd_cover[i] >= row_t)
            tp[:, i] = is_tp
            fp[:, i] = ~is_tp & ~ignored
        all_scores.append(image.scores)
        all_tp.append(tp)
        all_fp.append(fp)

    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp, axis=1) if all_tp else np.zeros((len(row_t), 0))
    fp = np.concatenate(all_fp, axis=1) if all_fp else np.zeros((len(row_t), 0))
    order = np.argsort(-scores, kind="stable")
    tp, fp = tp[:, order], fp[:, order]
    aps = [100.0 * average_precision_101(tp[r], fp[r], npos) for r in range(len(row_t))]

    results: dict = OrderedDict()
    results["mAP"] = float(np.mean(aps[:num_caption_rows]))
    results["AP_det"] = float(np.mean(aps[num_caption_rows : num_caption_rows + len(iou_thresholds)]))
    for r in range(num_caption_rows):
        results[_ap_key(row_t[r], row_s[r])] = aps[r]
    for r, t in enumerate(iou_thresholds):
        results[_det_key(t)] = aps[num_caption_rows + r]
    num_tp = int(tp[caption_row].sum())
    results["npos"] = npos
    results["num_predictions"] = int(len(scores))
    results["protocol"] = "densecap"
    results["matched_pairs"] = matched_pairs
    results["match_counts"] = {
        "TP": num_tp,
        "FP": int(fp[caption_row].sum()),
        "FN": npos - num_tp,
    }
    return results


def _official_map(images, meteor_fn, iou_thresholds, meteor_thresholds) -> dict:
    records = []  # (iou, gt caption, pred caption)
    matched_pairs: list[tuple[str, str]] = []
    counts = {"TP": 0, "FP": 0, "FN": 0}
    npos = 0
    for image in images:
        npos += len(image.gt_rles)  # the official count includes crowd segments
        inter = image.intersections()
        on_void = image.void_intersections()
        union = image.pred_area[:, None] + image.gt_area[None, :] - inter - on_void[:, None]
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        same_class = image.pred_classes[:, None] == image.gt_classes[None, :]
        valid = (inter > 0) & same_class & ~image.crowd[None, :]
        for j in range(len(image.gt_rles)):
            for i in range(len(image.pred_rles)):
                if valid[i, j]:
                    records.append((float(iou[i, j]), image.gt_captions[j], image.pred_captions[i]))
        # PQ-style matches for the caption metrics: IoU > 0.5 makes them unique.
        match = valid & (iou > CAPTION_MATCH_IOU)
        pred_hit = match.any(axis=1)
        gt_hit = match.any(axis=0)
        for i, j in zip(*np.nonzero(match)):
            matched_pairs.append((image.pred_captions[i], image.gt_captions[j]))
        counts["TP"] += int(match.sum())
        counts["FN"] += int((~gt_hit & ~image.crowd).sum())
        crowd_same = (same_class & image.crowd[None, :]) * inter
        ignored_area = on_void + crowd_same.sum(axis=1)
        frac = np.divide(
            ignored_area, image.pred_area, out=np.zeros_like(ignored_area), where=image.pred_area > 0
        )
        counts["FP"] += int((~pred_hit & (frac <= 0.5)).sum())

    queries = []
    query_of_record = []
    for iou, gt_caption, pred_caption in records:
        refs = sorted({c for c in pred_caption if not c.isspace()})
        if pred_caption and refs:
            query_of_record.append(len(queries))
            queries.append((gt_caption, refs))
        else:
            query_of_record.append(-1)
    meteor_scores = list(meteor_fn(queries)) if queries else []
    if len(meteor_scores) != len(queries):
        raise RuntimeError(f"meteor_fn returned {len(meteor_scores)} scores for {len(queries)} pairs")
    rec_iou = np.asarray([r[0] for r in records], dtype=np.float64)
    rec_meteor = np.asarray(
        [meteor_scores[q] if q >= 0 else math.nan for q in query_of_record], dtype=np.float64
    )
    has_caption = np.asarray([q >= 0 for q in query_of_record], dtype=bool)

    results: dict = OrderedDict()
    caption_aps, det_aps = [], []
    for t in iou_thresholds:
        for s in meteor_thresholds:
            tp = has_caption & (rec_iou >= t) & (np.nan_to_num(rec_meteor, nan=-math.inf) > s)
            ap = 100.0 * average_precision_101(tp.astype(float), (~tp).astype(float), npos)
            results[_ap_key(t, s)] = ap
            caption_aps.append(ap)
    for t in iou_thresholds:
        # The official detection rows use METEOR > -1, always true for a scored record.
        tp = has_caption & (rec_iou >= t)
        det_aps.append(100.0 * average_precision_101(tp.astype(float), (~tp).astype(float), npos))
    ordered: dict = OrderedDict()
    ordered["mAP"] = float(np.mean(caption_aps))
    ordered["AP_det"] = float(np.mean(det_aps))
    ordered.update(results)
    for t, ap in zip(iou_thresholds, det_aps):
        ordered[_det_key(t)] = ap
    ordered["npos"] = npos
    ordered["num_predictions"] = int(sum(len(im.pred_rles) for im in images))
    ordered["num_records"] = len(records)
    ordered["protocol"] = "pix2cap_official_compat"
    ordered["matched_pairs"] = matched_pairs
    ordered["match_counts"] = counts
    return ordered


# ---------------------------------------------------------------------------- caption metrics
def _spice_skip_reason() -> Optional[str]:
    """None if SPICE can run offline, else why not."""
    try:
        import pycocoevalcap
    except ImportError:
        return "pycocoevalcap is not installed"
    for root in pycocoevalcap.__path__:
        lib = os.path.join(root, "spice", "lib")
        jars = [os.path.join(lib, f"stanford-corenlp-3.6.0{x}.jar") for x in ("", "-models")]
        spice_jar = os.path.join(root, "spice", "spice-1.0.jar")
        if os.path.isfile(spice_jar) and all(os.path.isfile(j) for j in jars):
            return None
    return (
        "SPICE needs the Stanford CoreNLP 3.6.0 jars (stanford-corenlp-3.6.0.jar and "
        "-models.jar) in pycocoevalcap/spice/lib; they are not there and are never downloaded "
        "at evaluation time"
    )


def _capture_skip_reason() -> str:
    folder = os.environ.get(CAPTURE_ENV)
    if not folder:
        return (
            f"CAPTURE needs local copies of its models; set {CAPTURE_ENV} to their folder "
            "(it is never downloaded from a hub)"
        )
    if not os.path.isdir(folder):
        return f"{CAPTURE_ENV}={folder!r} is not a folder"
    return (
        "CAPTURE scores detailed image-level captions (COCONut-PanCap PGC); it is not defined "
        "for per-segment dense captions and is not computed by the dense-caption evaluator"
    )


def _no_meteor(queries: Sequence) -> list[float]:
    """A METEOR stand-in for detection AP alone: 0 for every pair (its rows are dropped)."""
    return [0.0] * len(queries)


def caption_metrics(
    pairs: Sequence[tuple[str, str]],
    *,
    total: Optional[int] = None,
    meteor: Optional[MeteorScorer] = None,
) -> dict:
    """COCO caption metrics of matched (prediction, GT) caption pairs, in percent.

    Each pair is scored as one image with one reference, after ``pycocoevalcap``'s PTB tokenizer
    (lower-casing, punctuation removed), as ``COCOEvalCap`` does; METEOR is the corpus-level
    score of the jar (summed statistics), like ``pycocoevalcap``'s ``Meteor``.

    Args:
        pairs: ``(predicted caption, ground-truth caption)``.
        total: TP + FP + FN of the matching; adds ``<metric>_pix2cap_scaled`` = metric *
            len(pairs) / total (the official Pix2Cap report).
        meteor: a running :class:`MeteorScorer` to reuse (saves a JVM start); one is started
            and closed otherwise.
    Returns:
        ``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr``, ``num_pairs``, optional
        scaled keys, and ``skipped``: ``{metric: reason}`` for metrics not computed (all of
        them, with the reason, when ``java`` is not on PATH).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    results: dict = OrderedDict()
    skipped: dict = OrderedDict()
    results["num_pairs"] = len(pairs)
    if total is not None and total < len(pairs):
        raise ValueError(f"caption_metrics: total={total} is below the {len(pairs)} matched pairs")
    if not pairs:
        for name in names:
            skipped[name] = "no matched pairs"
        if total:
            for name in names:
                results[f"{name}_pix2cap_scaled"] = 0.0
        skipped["SPICE"] = "no matched pairs"
        skipped["CAPTURE"] = _capture_skip_reason()
        results["skipped"] = skipped
        return results

    try:
        find_java()  # PTBTokenizer would fail with a bare FileNotFoundError
    except JavaNotFoundError as e:
        # Every metric here reads PTB-tokenized text: all are skipped, the evaluation goes on.
        for name in names + ["SPICE"]:
            skipped[name] = str(e)
        skipped["CAPTURE"] = _capture_skip_reason()
        results["skipped"] = skipped
        return results
    # One tokenizer run for both sides; keys keep predictions and references apart.
    raw = OrderedDict()
    for i, (pred, gt) in enumerate(pairs):
        raw[("pred", i)] = [{"caption": str(pred)}]
        raw[("gt", i)] = [{"caption": str(gt)}]
    with contextlib.redirect_stdout(io.StringIO()):
        tokenized = PTBTokenizer().tokenize(raw)
    res = {i: tokenized[("pred", i)] for i in range(len(pairs))}
    gts = {i: tokenized[("gt", i)] for i in range(len(pairs))}

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internal counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    own_meteor = meteor is None
    scorer = MeteorScorer() if own_meteor else meteor
    try:
        meteor_score, _ = scorer.score_corpus([(res[i][0], gts[i]) for i in range(len(pairs))])
    finally:
        if own_meteor:
            scorer.close()
    values = list(bleu) + [meteor_score, rouge, cider]
    for name, value in zip(names, values):
        results[name] = 100.0 * float(value)

    spice_reason = _spice_skip_reason()
    if spice_reason is None:
        from pycocoevalcap.spice.spice import Spice

        with contextlib.redirect_stdout(io.StringIO()):
            spice, _ = Spice().compute_score(gts, res)
        results["SPICE"] = 100.0 * float(spice)
        names.append("SPICE")
    else:
        skipped["SPICE"] = spice_reason
    skipped["CAPTURE"] = _capture_skip_reason()

    if total is not None:
        scale = len(pairs) / total if total > 0 else 0.0
        for name in names:
            results[f"{name}_pix2cap_scaled"] = results[name] * scale
    results["skipped"] = skipped
    return results


# --------------------------------------------------------------------------------- evaluator
@EVALUATOR_REGISTRY.register()
class DenseCaptionEvaluator(DatasetEvaluator):
    """Dense-caption mAP and caption metrics of panoptic predictions with captions.

    ``process`` keeps only RLE-encoded masks, scores, classes and captions per image (and the
    GT segments' structured fields for caption truth); ``evaluate`` gathers them on the main
    process, computes :func:`densecap_map`, :func:`caption_metrics` and the caption-truth
    metrics (``caption_truth``) and returns ``{"dense_caption": {...}}``.

    Args:
        dataset_name: for logging and the result file.
        output_dir: where ``dense_caption_results.json`` is written (atomically), if given.
        compat: the official Pix2Cap protocol (paper comparison only).
        iou_thresholds, meteor_thresholds: the mAP grid.
        meteor_fn: a METEOR function to use instead of a :class:`MeteorScorer` (tests).
        compute_caption_metrics: BLEU/METEOR/ROUGE/CIDEr on the matched pairs (needs java).
        train_dataset_names: registered training datasets; their segment descriptions are the
            training captions of ``memorised`` and their ``attributes`` add to the caption-truth
            vocabulary. Empty: ``memorised`` is skipped.
        ground_truth: a :class:`~pix2cap.evaluation.ground_truth.GroundTruthReader` shared with
            the other evaluators of the same images (``Pix2CapEvaluator`` shares one with its
            PQ evaluator, so each ground-truth PNG is decoded once for both); None: a serial
            reader of this evaluator's own.
    """

    def __init__(
        self,
        *,
        dataset_name: str,
        output_dir: Optional[str] = None,
        compat: bool = False,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        meteor_thresholds: Sequence[float] = DEFAULT_METEOR_THRESHOLDS,
        meteor_fn: Optional[MeteorFn] = None,
        compute_caption_metrics: bool = True,
        train_dataset_names: Sequence[str] = (),
        ground_truth: Optional[GroundTruthReader] = None,
    ):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._train_dataset_names = tuple(str(n) for n in train_dataset_names)
        self._training: Optional[tuple] = None  # (captions, segments, skip reason), loaded once
        self._output_dir = output_dir
        self._compat = bool(compat)
        self._iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._meteor_thresholds = tuple(float(s) for s in meteor_thresholds)
        self._meteor_fn = meteor_fn
        self._compute_caption_metrics = bool(compute_caption_metrics)
        self._owns_reader = ground_truth is None
        self._ground_truth = (
            GroundTruthReader(num_workers=0) if ground_truth is None else ground_truth
        )
        self._images: list[dict] = []

    def reset(self) -> None:
        self._images = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Args:
        inputs: test-mapper dicts with ``pan_seg_file_name`` and ``segments_info`` (each
            with ``id``, contiguous ``category_id``, ``iscrowd``, ``description``).
        outputs: dicts with ``"panoptic_seg": (Int[H, W] segment ids, segments_info)``, each
            predicted segment with ``id``, ``category_id``, ``score``, ``caption``.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            png = inp.get("pan_seg_file_name")
            if png is None or "segments_info" not in inp:
                raise KeyError(
                    f"DenseCaptionEvaluator needs 'pan_seg_file_name' and 'segments_info' in "
                    f"each input (image {inp.get('file_name', inp.get('image_id'))!r} has "
                    f"{sorted(inp)})"
                )
            if "panoptic_seg" not in out:
                raise KeyError(f"output for {png} lacks 'panoptic_seg' (has {sorted(out)})")
            gt_segments = inp["segments_info"]
            for seg in gt_segments:
                if "description" not in seg:
                    raise KeyError(f"{png}: GT segment {seg.get('id')} has no 'description'")
            for seg in out["panoptic_seg"][1]:
                # Every prediction is ranked by its score and judged by its caption.
                for key in ("id", "category_id", "score", "caption"):
                    if key not in seg:
                        raise KeyError(
                            f"{png}: predicted segment {seg.get('id')} lacks {key!r} "
                            f"(has {sorted(seg)})"
                        )
            # The prediction first: a shared reader's threads decode the PNG meanwhile.
            prediction = PanopticResult.from_model_output(out)
            segments = prediction.segments
            pred = {
                "masks": _encode_ids(prediction.panoptic_seg, [s.id for s in segments]),
                "scores": [s.score for s in segments],
                "captions": [s.caption for s in segments],
                "category_ids": [s.category_id for s in segments],
            }
            gt_ids = self._ground_truth.read(png)
            if prediction.image_size != gt_ids.shape:
                raise ValueError(
                    f"{png}: predicted panoptic map is {prediction.image_size} but the GT PNG "
                    f"is {tuple(gt_ids.shape)}; predictions must be at the original resolution"
                )
            gt = {
                "image_id": inp.get("image_id"),
                "masks": _encode_ids(gt_ids, [s["id"] for s in gt_segments]),
                "captions": [str(s["description"]) for s in gt_segments],
                "category_ids": [int(s["category_id"]) for s in gt_segments],
                "iscrowd": [int(s.get("iscrowd", 0)) for s in gt_segments],
                "void": _encode_ids(gt_ids, [0])[0],
            }
            truth = {
                "isthing": [bool(self._gt_is_thing(s)) for s in gt_segments],
                "attributes": [_dict_or_none(s.get("attributes")) for s in gt_segments],
                "has_relation": any(isinstance(s.get("relation"), dict) for s in gt_segments),
                "z_order": [_int_or_none(s.get("z_order")) for s in gt_segments],
                "full_area": [_int_or_none(s.get("full_area")) for s in gt_segments],
            }
            self._images.append({"pred": pred, "gt": gt, "truth": truth})

    def _gt_is_thing(self, segment: dict) -> bool:
        # The loaders write ``isthing``; older dicts without it fall back to the metadata.
        if "isthing" in segment:
            return bool(segment["isthing"])
        return self._metadata.is_thing(int(segment["category_id"]))

    def evaluate(self) -> Optional[dict]:
        if self._owns_reader:
            self._ground_truth.close()
        comm.synchronize()
        gathered = comm.gather(self._images, dst=0)
        if not comm.is_main_process():
            return None
        images = [im for part in gathered for im in part]
        if not images:
            logger.warning("DenseCaptionEvaluator on %s got no images", self._dataset_name)
            return {}
        # Started first: the JVM loads its paraphrase table while the IoUs are computed.
        scorer, no_meteor = None, None
        if self._meteor_fn is None:
            try:
                scorer = MeteorScorer()
            except (JavaNotFoundError, FileNotFoundError) as e:
                no_meteor = str(e)
                logger.warning(
                    "Dense-caption evaluation of %s without METEOR (detection AP, caption truth "
                    "and match counts only): %s", self._dataset_name, no_meteor,
                )
        try:
            meteor_fn = self._meteor_fn if scorer is None else scorer
            if no_meteor is not None:
                # Detection AP has no METEOR threshold: any score serves its rows.
                meteor_fn = _no_meteor
            mapped = densecap_map(
                [im["pred"] for im in images],
                [im["gt"] for im in images],
                meteor_fn,
                iou_thresholds=self._iou_thresholds,
                meteor_thresholds=self._meteor_thresholds,
                compat=self._compat,
            )
            skipped: dict = OrderedDict()
            if no_meteor is not None:
                captioned = [k for k in mapped if k == "mAP" or k.startswith("AP@")]
                for key in captioned:
                    mapped.pop(key)
                skipped["mAP"] = no_meteor
            pairs = mapped.pop("matched_pairs")
            counts = mapped.pop("match_counts")
            metrics: dict = OrderedDict(mapped)
            metrics.update({f"caption_match_{k}": v for k, v in counts.items()})
            truth, truth_skipped = self._caption_truth(images)
            metrics["caption_truth"] = truth
            if self._compute_caption_metrics:
                caps = caption_metrics(
                    pairs, total=counts["TP"] + counts["FP"] + counts["FN"], meteor=scorer
                )
                skipped.update(caps.pop("skipped"))
                caps.pop("num_pairs")
                metrics.update(caps)
            else:
                skipped["caption metrics"] = "compute_caption_metrics=False"
            skipped.update(truth_skipped)
            metrics["skipped"] = skipped
        finally:
            if scorer is not None:
                scorer.close()
        results = {"dense_caption": metrics}
        logger.info(
            "Dense-caption evaluation of %s:\n%s", self._dataset_name, print_results_table(results)
        )
        if self._output_dir:
            write_results_json(
                results, os.path.join(self._output_dir, "dense_caption_results.json")
            )
        return results

    # ------------------------------------------------------------------------- caption truth
    def _training_data(self) -> tuple[Optional[set[str]], CaptionVocabulary, Optional[str]]:
        """Training captions (None when unknown), the attribute words of the training ground
        truth, and why the captions are missing; loaded once per evaluator (a large training
        set takes a while to read)."""
        if self._training is not None:
            return self._training
        vocabulary = CaptionVocabulary()
        if not self._train_dataset_names:
            reason = "no training dataset names were given to the evaluator"
            self._training = (None, vocabulary, reason)
            return self._training
        missing = [n for n in self._train_dataset_names if n not in DatasetCatalog]
        if missing:
            self._training = (None, vocabulary, f"training datasets {missing} are not registered")
            return self._training
        captions: set[str] = set()
        try:
            for name in self._train_dataset_names:
                for record in DatasetCatalog.get(name):
                    segments = record.get("segments_info", [])
                    vocabulary.add_segments(segments)
                    captions.update(
                        s["description"] for s in segments if isinstance(s.get("description"), str)
                    )
        except (OSError, ValueError) as e:  # DatasetError is a ValueError
            reason = f"training datasets {list(self._train_dataset_names)} cannot be loaded ({e})"
            self._training = (None, CaptionVocabulary(), reason)
            return self._training
        reason = None
        if not captions:
            reason = f"training datasets {list(self._train_dataset_names)} have no descriptions"
        self._training = (captions or None, vocabulary, reason)
        return self._training

    def _caption_truth(self, images: list[dict]) -> tuple[dict, dict]:
        """The ``caption_truth`` metrics and ``{metric: reason}`` for those not computed."""
        skipped: dict = OrderedDict()
        training_captions, training_vocabulary, reason = self._training_data()
        if reason is not None:
            skipped["memorised"] = reason
        metrics: dict = OrderedDict()
        structured = any(a for im in images for a in im["truth"]["attributes"])
        if structured:
            # The training words count too: a word the model learnt there must be read as a
            # (wrong) attribute, not skipped, or a relation object stated with it looks vaguer.
            vocabulary = CaptionVocabulary()
            for im in images:
                vocabulary.add_segments({"attributes": a} for a in im["truth"]["attributes"])
            vocabulary.merge(training_vocabulary)
            num_classes = len(self._metadata.get("stuff_classes") or [])
            names = [self._metadata.class_name(c) for c in range(num_classes)]
            vocabulary.add_classes(
                names, [n for c, n in enumerate(names) if not self._metadata.is_thing(c)]
            )
            class_ids = {c for im in images for c in im["gt"]["category_ids"]}
            truth = caption_truth(
                [{"pred": im["pred"], "gt": {**im["gt"], **im["truth"]}} for im in images],
                vocabulary,
                {c: self._metadata.class_name(c) for c in class_ids},
            )
            if not any(im["truth"]["has_relation"] for im in images):
                for key in [k for k in truth if k.startswith(("relation_", "no_relation"))]:
                    truth.pop(key)
                skipped["caption_truth relations"] = "the ground truth has no 'relation'"
            metrics.update(truth)
        else:
            skipped["caption_truth attributes and relations"] = (
                "the ground-truth segments have no structured 'attributes'"
            )
        metrics.update(
            caption_novelty(
                [c for im in images for c in im["pred"]["captions"]], training_captions
            )
        )
        return metrics, skipped


def _dict_or_none(value: Any) -> Optional[dict]:
    return dict(value) if isinstance(value, dict) else None


def _int_or_none(value: Any) -> Optional[int]:
    return int(value) if value is not None else None


def _encode_ids(ids: np.ndarray, segment_ids: list[int]) -> list[dict]:
    """RLEs of ``ids == segment_id`` for each id; ids: Int[H, W]."""
    if not segment_ids:
        return []
    masks = np.stack([ids == int(s) for s in segment_ids])
    return masks_to_rles(masks, "panoptic map")
