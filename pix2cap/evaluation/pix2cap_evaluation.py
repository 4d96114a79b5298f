"""The evaluators of datasets with captions, each reporting several tasks from one inference
pass: ``evaluator_type: pix2cap`` (segments carry captions) and ``coconut_pancap`` (images
carry grounded captions)."""

from __future__ import annotations

from typing import Optional, Sequence

from .build import EVALUATOR_REGISTRY
from .densecap_evaluation import DenseCaptionEvaluator
from .evaluator import DatasetEvaluators
from .grounded_caption_evaluation import GroundedCaptionEvaluator
from .panoptic_evaluation import COCOPanopticEvaluator

__all__ = ["Pix2CapEvaluator", "PanCapEvaluator"]


def _panoptic_and_grounded(
    dataset_name: str,
    output_dir: Optional[str],
    phrase_embedder: Optional[str],
    compute_caption_metrics: bool,
) -> tuple[COCOPanopticEvaluator, GroundedCaptionEvaluator]:
    """The PQ evaluator and the grounded-caption evaluator of one dataset."""
    return (
        COCOPanopticEvaluator(dataset_name=dataset_name, output_dir=output_dir),
        GroundedCaptionEvaluator(
            dataset_name=dataset_name,
            output_dir=output_dir,
            phrase_embedder=phrase_embedder,
            compute_caption_metrics=compute_caption_metrics,
        ),
    )


@EVALUATOR_REGISTRY.register(aliases=("pix2cap",))
class Pix2CapEvaluator(DatasetEvaluators):
    """PQ (``"panoptic_seg"``), dense-caption mAP + caption metrics (``"dense_caption"``) and,
    when the model writes grounded captions, their metrics (``"grounded_caption"``; nothing
    when no output has one).

    Args:
        dataset_name: a registered dataset whose dicts have ``pan_seg_file_name`` and
            ``segments_info`` with ``description`` (and ``grounded_caption`` where grounded
            captions are evaluated).
        output_dir: where the evaluators write their predictions and results.
        compat: score dense captions with the official Pix2Cap protocol (paper comparison).
        compute_caption_metrics: BLEU/METEOR/ROUGE-L/CIDEr on the matched pairs and of the
            grounded captions.
        train_dataset_names: the training datasets, for the dense-caption ``memorised`` metric.
        phrase_embedder: the sentence-transformers folder of grounded-caption recall (None:
            the packaged all-MiniLM-L6-v2).
    """

    def __init__(
        self,
        *,
        dataset_name: str,
        output_dir: Optional[str] = None,
        compat: bool = False,
        compute_caption_metrics: bool = True,
        train_dataset_names: Sequence[str] = (),
        phrase_embedder: Optional[str] = None,
    ):
        panoptic, grounded = _panoptic_and_grounded(
            dataset_name, output_dir, phrase_embedder, compute_caption_metrics
        )
        dense = DenseCaptionEvaluator(
            dataset_name=dataset_name,
            output_dir=output_dir,
            compat=compat,
            compute_caption_metrics=compute_caption_metrics,
            train_dataset_names=train_dataset_names,
        )
        super().__init__([panoptic, dense, grounded])


@EVALUATOR_REGISTRY.register(aliases=("coconut_pancap",))
class PanCapEvaluator(DatasetEvaluators):
    """PQ (``"panoptic_seg"``) and grounded-caption metrics (``"grounded_caption"``): the
    panoptic segmentation and PGC tasks of COCONut-PanCap.

    Args:
        dataset_name: a registered dataset whose dicts have ``pan_seg_file_name``,
            ``segments_info`` and ``grounded_caption``.
        output_dir: where the evaluators write their predictions.
        phrase_embedder: the sentence-transformers folder of grounded-caption recall (None:
            the packaged all-MiniLM-L6-v2).
        compute_caption_metrics: BLEU/METEOR/ROUGE-L/CIDEr of the grounded captions.
    """

    def __init__(
        self,
        *,
        dataset_name: str,
        output_dir: Optional[str] = None,
        phrase_embedder: Optional[str] = None,
        compute_caption_metrics: bool = True,
    ):
        super().__init__(
            list(
                _panoptic_and_grounded(
                    dataset_name, output_dir, phrase_embedder, compute_caption_metrics
                )
            )
        )
