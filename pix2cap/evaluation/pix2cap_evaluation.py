"""The evaluator of datasets whose segments carry captions (``evaluator_type: pix2cap``):
panoptic quality and dense-caption metrics from one inference pass."""

from __future__ import annotations

from typing import Optional, Sequence

from .build import EVALUATOR_REGISTRY
from .densecap_evaluation import DenseCaptionEvaluator
from .evaluator import DatasetEvaluators
from .panoptic_evaluation import COCOPanopticEvaluator

__all__ = ["Pix2CapEvaluator"]


@EVALUATOR_REGISTRY.register(aliases=("pix2cap",))
class Pix2CapEvaluator(DatasetEvaluators):
    """PQ (``"panoptic_seg"``) and dense-caption mAP + caption metrics (``"dense_caption"``).

    Args:
        dataset_name: a registered dataset whose dicts have ``pan_seg_file_name`` and
            ``segments_info`` with ``description``.
        output_dir: where both evaluators write their predictions and results.
        compat: score dense captions with the official Pix2Cap protocol (paper comparison).
        compute_caption_metrics: BLEU/METEOR/ROUGE-L/CIDEr on the matched pairs.
        train_dataset_names: the training datasets, for the dense-caption ``memorised`` metric.
    """

    def __init__(
        self,
        *,
        dataset_name: str,
        output_dir: Optional[str] = None,
        compat: bool = False,
        compute_caption_metrics: bool = True,
        train_dataset_names: Sequence[str] = (),
    ):
        super().__init__(
            [
                COCOPanopticEvaluator(dataset_name=dataset_name, output_dir=output_dir),
                DenseCaptionEvaluator(
                    dataset_name=dataset_name,
                    output_dir=output_dir,
                    compat=compat,
                    compute_caption_metrics=compute_caption_metrics,
                    train_dataset_names=train_dataset_names,
                ),
            ]
        )
