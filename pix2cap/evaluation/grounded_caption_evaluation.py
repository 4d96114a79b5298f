"""Grounded-caption evaluation: COCONut-PanCap's PGC task (GLaMM's GCG task).

A model that writes one caption per image and grounds some of its phrases in the panoptic
segmentation returns, per image, ``"grounded_caption"``::

    {"text": plain caption, "tagged": the same text in <ids:phrase> form,
     "phrases": [{"phrase", "start", "end", "segment_ids", "score"}, ...]}

with ``segment_ids`` ids of its own ``"panoptic_seg"``, and optionally
``"grounded_phrase_masks"`` (Bool[P, H, W], the model's own mask of each phrase, in order).
A predicted phrase's mask is that mask when given, else the union of the ``panoptic_seg``
pixels whose id is among its ``segment_ids`` (empty when it has none). Every predicted phrase
is a prediction, grounded or not.

The ground truth is the dataset dict's ``grounded_caption`` (read from the ``DatasetCatalog``
by ``image_id``): its ``text`` is the reference caption, and each phrase with segment ids is a
grounding target whose mask is the union of those segments of the panoptic PNG. Phrases
without segment ids are not grounding targets. Images without a ground-truth grounded caption
are left out of the metrics and counted.

Metrics, under the task ``"grounded_caption"``:

* caption metrics of the plain text against the one reference per image
  (:func:`~pix2cap.evaluation.densecap_evaluation.caption_metrics`: ``BLEU-1`` .. ``BLEU-4``,
  ``METEOR``, ``ROUGE-L``, ``CIDEr`` in percent, as the dense-caption evaluator reports them);
* grounding by GLaMM's protocol (:func:`~pix2cap.evaluation.grounding.grounding_metrics`:
  ``mIoU``, ``recall``, ``AP50`` in 0-1 as GLaMM prints them, ``recalled_phrases``,
  ``gt_phrases`` (the grounding targets), ``phrase_embedder``);
* counts: ``num_images`` (evaluated), ``images_without_gt_caption`` (skipped),
  ``images_without_prediction`` (evaluated as an empty caption), ``pred_phrases_per_image``,
  ``gt_phrases_per_image`` (all phrases of the ground-truth captions), and
  ``pred_phrases_with_segments`` (share of predicted phrases naming at least one segment).

Metrics that were not computed are listed under ``skipped`` with the reason (among them
CAPTURE, the caption metric COCONut-PanCap reports for PGC, which pix2cap does not implement).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np

from pix2cap.data.catalog import DatasetCatalog
from pix2cap.data.detection_utils import read_panoptic_png
from pix2cap.utils import comm
from pix2cap.utils.file_io import atomic_write_json

from .build import EVALUATOR_REGISTRY
from .densecap_evaluation import caption_metrics, masks_to_rles
from .evaluator import DatasetEvaluator
from .grounding import grounding_metrics
from .pancapscore.matching import Embedder, SentenceTransformerEmbedder

__all__ = ["GroundedCaptionEvaluator", "GROUNDED_CAPTION_TASK", "PREDICTIONS_FILE"]

logger = logging.getLogger(__name__)

GROUNDED_CAPTION_TASK = "grounded_caption"
PREDICTIONS_FILE = "grounded_caption_predictions.json"
CAPTURE_SKIP_REASON = (
    "CAPTURE, COCONut-PanCap's caption metric of this task, is not implemented; the COCO "
    "caption metrics are reported instead"
)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, on any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _union_rles(ids: np.ndarray, groups: Sequence[Sequence[int]], where: str) -> list[dict]:
    """One RLE per group: the pixels of ``ids`` (Int[H, W]) whose id is in the group (an
    empty group gives an empty mask)."""
    if not groups:
        return []
    masks = np.stack([np.isin(ids, np.asarray(list(g), dtype=np.int64)) for g in groups])
    return masks_to_rles(masks, where)


def _phrase_record(phrase: Any, where: str) -> dict:
    """A predicted phrase as plain JSON values (``phrase``, ``start``, ``end``,
    ``segment_ids``, ``score``)."""
    if not isinstance(phrase, Mapping) or "phrase" not in phrase:
        raise ValueError(f"{where}: every phrase must be a dict with 'phrase', got {phrase!r}")
    score = phrase.get("score")
    return {
        "phrase": str(phrase["phrase"]),
        "start": int(phrase["start"]) if phrase.get("start") is not None else None,
        "end": int(phrase["end"]) if phrase.get("end") is not None else None,
        "segment_ids": [int(s) for s in (phrase.get("segment_ids") or [])],
        "score": float(score) if score is not None else None,
    }


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


@EVALUATOR_REGISTRY.register()
class GroundedCaptionEvaluator(DatasetEvaluator):
    """Caption and grounding metrics of grounded image captions (module docstring).

    ``process`` keeps, per image, the texts, the phrases and their masks as RLEs; ``evaluate``
    gathers them on the main process and returns ``{"grounded_caption": {...}}``, or ``None``
    when no output had a ``"grounded_caption"`` (a model that writes none: nothing to report,
    and the dataset is never read). With ``output_dir``, the predictions (``image_id``,
    ``text``, ``tagged``, ``phrases``) are written to ``grounded_caption_predictions.json``.

    Args:
        dataset_name: a registered dataset whose dicts have ``image_id``,
            ``pan_seg_file_name`` and, where an image has one, ``grounded_caption``.
        output_dir: where the predictions are written (atomically), if given.
        phrase_embedder: a local sentence-transformers folder for the phrase similarity of
            recall; None: the packaged all-MiniLM-L6-v2. Loaded on the first ``evaluate``.
        embedder: an :data:`~pix2cap.evaluation.pancapscore.matching.Embedder` to use instead
            (texts -> Float[N, D] unit vectors; its ``name`` attribute names it in the results).
        compute_caption_metrics: BLEU/METEOR/ROUGE-L/CIDEr (need java).
        meteor_scorer: a running :class:`~pix2cap.evaluation.meteor.MeteorScorer` (or any
            object with its ``score_corpus``) to use instead of starting one per evaluation.
    """

    def __init__(
        self,
        *,
        dataset_name: str,
        output_dir: Optional[str] = None,
        phrase_embedder: Optional[str] = None,
        embedder: Optional[Embedder] = None,
        compute_caption_metrics: bool = True,
        meteor_scorer: Any = None,
    ):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._phrase_embedder = phrase_embedder
        self._embedder = embedder
        self._compute_caption_metrics = bool(compute_caption_metrics)
        self._meteor_scorer = meteor_scorer
        # {image_id: (pan_seg_file_name, grounded_caption or None)}, read once when needed.
        self._gt_index: Optional[dict[Hashable, tuple[Optional[str], Optional[dict]]]] = None
        self.reset()

    def reset(self) -> None:
        self._images: list[dict] = []  # evaluated images
        self._predictions: list[dict] = []  # every grounded caption seen, for the JSON
        self._without_prediction: list[Hashable] = []  # image ids whose output had none
        self._without_gt = 0

    # --------------------------------------------------------------------------- ground truth
    def _ground_truth_index(self) -> dict:
        if self._gt_index is None:
            self._gt_index = {
                record["image_id"]: (
                    record.get("pan_seg_file_name"),
                    record.get("grounded_caption"),
                )
                for record in DatasetCatalog.get(self._dataset_name)
            }
        return self._gt_index

    def _ground_truth(self, image_id: Hashable) -> Optional[tuple[np.ndarray, dict]]:
        """``(GT id map, {"text", "phrases", "masks", "num_phrases"})`` of one image, or None
        when the image has no ground-truth grounded caption."""
        index = self._ground_truth_index()
        if image_id not in index:
            raise KeyError(f"image_id {image_id!r} is not in dataset {self._dataset_name!r}")
        png, caption = index[image_id]
        if not caption:
            return None
        if png is None:
            raise KeyError(
                f"image {image_id!r} of {self._dataset_name!r} has a grounded caption but no "
                "'pan_seg_file_name' to ground it in"
            )
        gt_ids = read_panoptic_png(png)
        targets = [p for p in caption.get("phrases", []) if p.get("segment_ids")]
        gt = {
            "text": str(caption.get("text", "")),
            "phrases": [str(p["phrase"]) for p in targets],
            "masks": _union_rles(gt_ids, [p["segment_ids"] for p in targets], f"{png} phrases"),
            "num_phrases": len(caption.get("phrases", [])),
        }
        return gt_ids, gt

    @staticmethod
    def _evaluated_image(image_id, gt: dict, text: str, phrases, pred_masks) -> dict:
        return {
            "image_id": image_id,
            "pred_text": text,
            "gt_text": gt["text"],
            "pred_phrases": [p["phrase"] for p in phrases],
            "pred_masks": pred_masks,
            "gt_phrases": gt["phrases"],
            "gt_masks": gt["masks"],
            "num_gt_phrases": gt["num_phrases"],
            "num_pred_with_segments": sum(1 for p in phrases if p["segment_ids"]),
        }

    # -------------------------------------------------------------------------------- process
    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Args:
        inputs: dicts with ``image_id`` (the ground truth is looked up by it).
        outputs: dicts with ``"grounded_caption"`` (else the image counts as without
            prediction), ``"panoptic_seg"`` (Int[H, W] ids, segments_info) and optionally
            ``"grounded_phrase_masks"`` (Bool[P, H, W]), at the original resolution.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "image_id" not in inp:
                raise KeyError(
                    f"GroundedCaptionEvaluator needs 'image_id' in each input (has {sorted(inp)})"
                )
            image_id = inp["image_id"]
            if out.get(GROUNDED_CAPTION_TASK) is None:
                self._without_prediction.append(image_id)
                continue
            where = f"the output for image {image_id!r}"
            caption = out[GROUNDED_CAPTION_TASK]
            phrases = [_phrase_record(p, where) for p in caption.get("phrases", [])]
            text = str(caption.get("text", ""))
            self._predictions.append(
                {
                    "image_id": image_id,
                    "text": text,
                    "tagged": str(caption.get("tagged", "")),
                    "phrases": phrases,
                }
            )
            truth = self._ground_truth(image_id)
            if truth is None:
                self._without_gt += 1
                continue
            gt_ids, gt = truth
            pred_masks = self._predicted_masks(out, phrases, gt_ids.shape, where)
            self._images.append(self._evaluated_image(image_id, gt, text, phrases, pred_masks))

    @staticmethod
    def _predicted_masks(out: dict, phrases: list[dict], size: tuple, where: str) -> list[dict]:
        """RLEs of the predicted phrases: ``grounded_phrase_masks`` when given, else the unions
        of their segments in ``panoptic_seg``."""
        masks = out.get("grounded_phrase_masks")
        if masks is not None:
            masks = _to_numpy(masks)
            if masks.ndim != 3 or masks.shape[0] != len(phrases):
                raise ValueError(
                    f"{where}: grounded_phrase_masks must be [{len(phrases)}, H, W] (one mask per "
                    f"phrase), got shape {tuple(masks.shape)}"
                )
            if tuple(masks.shape[1:]) != tuple(size):
                raise ValueError(
                    f"{where}: grounded_phrase_masks are {tuple(masks.shape[1:])} but the GT PNG "
                    f"is {tuple(size)}; predictions must be at the original resolution"
                )
            return masks_to_rles(masks.astype(bool), f"{where} grounded_phrase_masks")
        if "panoptic_seg" not in out:
            raise KeyError(
                f"{where} has a grounded caption but neither 'grounded_phrase_masks' nor "
                "'panoptic_seg' to take its phrase masks from"
            )
        ids = _to_numpy(out["panoptic_seg"][0])
        if tuple(ids.shape) != tuple(size):
            raise ValueError(
                f"{where}: predicted panoptic map is {tuple(ids.shape)} but the GT PNG is "
                f"{tuple(size)}; predictions must be at the original resolution"
            )
        return _union_rles(ids.astype(np.int64), [p["segment_ids"] for p in phrases], where)

    # ------------------------------------------------------------------------------- evaluate
    def _embedder_or_load(self) -> Embedder:
        if self._embedder is None:
            self._embedder = SentenceTransformerEmbedder(self._phrase_embedder)
        return self._embedder

    def evaluate(self) -> Optional[dict]:
        comm.synchronize()
        gathered = comm.gather(
            (self._images, self._predictions, self._without_prediction, self._without_gt), dst=0
        )
        if not comm.is_main_process():
            return None
        images = [im for part in gathered for im in part[0]]
        predictions = [p for part in gathered for p in part[1]]
        without_prediction = [i for part in gathered for i in part[2]]
        without_gt = sum(part[3] for part in gathered)
        if not predictions:
            logger.info(
                "No output on %s had a grounded caption; no grounded-caption metrics",
                self._dataset_name,
            )
            return None
        if self._output_dir:
            path = os.path.join(self._output_dir, PREDICTIONS_FILE)
            atomic_write_json(path, predictions)
            logger.info("Wrote %d grounded captions to %s", len(predictions), path)
        # An image the model wrote no caption for counts as an empty caption, as in GLaMM.
        for image_id in without_prediction:
            truth = self._ground_truth(image_id)
            if truth is None:
                without_gt += 1
            else:
                images.append(self._evaluated_image(image_id, truth[1], "", [], []))
        if without_gt:
            logger.info(
                "%d images of %s have no ground-truth grounded caption; they are not evaluated",
                without_gt,
                self._dataset_name,
            )
        if without_prediction:
            logger.warning(
                "%d images of %s had no grounded caption in the model's output; they count as "
                "empty captions",
                len(without_prediction),
                self._dataset_name,
            )
        results = self._metrics(images, without_gt, len(without_prediction))
        return {GROUNDED_CAPTION_TASK: results}

    def _metrics(self, images: list[dict], without_gt: int, without_prediction: int) -> OrderedDict:
        metrics: OrderedDict = OrderedDict()
        skipped: OrderedDict = OrderedDict()
        grounding: dict = {}
        if images:
            grounding = dict(grounding_metrics(images, self._embedder_or_load()))
            for key in ("mIoU", "recall", "AP50"):
                metrics[key] = grounding.pop(key)
            if self._compute_caption_metrics:
                captions = caption_metrics(
                    [(im["pred_text"], im["gt_text"]) for im in images],
                    meteor=self._meteor_scorer,
                )
                captions.pop("num_pairs")
                skipped.update(captions.pop("skipped"))
                skipped["CAPTURE"] = CAPTURE_SKIP_REASON
                metrics.update(captions)
            else:
                skipped["caption metrics"] = "compute_caption_metrics=False"
        else:
            skipped["grounding and caption metrics"] = (
                "no image with a grounded caption in the output has a ground-truth one"
            )
        embedder_name = grounding.pop("phrase_embedder", None)
        metrics.update(grounding)  # recalled_phrases, gt_phrases, num_images
        metrics["num_images"] = len(images)
        metrics["images_without_gt_caption"] = without_gt
        metrics["images_without_prediction"] = without_prediction
        num_pred = sum(len(im["pred_phrases"]) for im in images)
        metrics["pred_phrases_per_image"] = _mean(num_pred, len(images))
        metrics["gt_phrases_per_image"] = _mean(
            sum(im["num_gt_phrases"] for im in images), len(images)
        )
        metrics["pred_phrases_with_segments"] = _mean(
            sum(im["num_pred_with_segments"] for im in images), num_pred
        )
        if embedder_name is not None:
            metrics["phrase_embedder"] = embedder_name
        metrics["skipped"] = skipped
        return metrics
