"""The evaluators of datasets with captions, each reporting several tasks from one inference
pass: ``evaluator_type: pix2cap`` (segments carry captions) and ``coconut_pancap`` (images
carry grounded captions).

``Pix2CapEvaluator`` hands one :class:`~pix2cap.evaluation.ground_truth.GroundTruthReader` to
its PQ and dense-caption evaluators: each batch's ground-truth PNGs are decoded once, in the
reader's threads, and pinned while the evaluators process the batch."""

from __future__ import annotations

from typing import Optional, Sequence

from .build import EVALUATOR_REGISTRY
from .densecap_evaluation import DenseCaptionEvaluator, MeteorFn
from .evaluator import DatasetEvaluators
from .ground_truth import GroundTruthReader
from .grounded_caption_evaluation import GroundedCaptionEvaluator
from .panoptic_evaluation import COCOPanopticEvaluator

__all__ = ["Pix2CapEvaluator", "PanCapEvaluator"]


def _panoptic_and_grounded(
    dataset_name: str,
    output_dir: Optional[str],
    phrase_embedder: Optional[str],
    compute_caption_metrics: bool,
    ground_truth: Optional[GroundTruthReader] = None,
) -> tuple[COCOPanopticEvaluator, GroundedCaptionEvaluator]:
    """The PQ evaluator and the grounded-caption evaluator of one dataset."""
    return (
        COCOPanopticEvaluator(
            dataset_name=dataset_name, output_dir=output_dir, ground_truth=ground_truth
        ),
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
        num_workers: threads decoding the ground truth and counting PQ (None: the cores, at
            most 4; 0: everything serially in the caller's thread).
        meteor_fn: passed to the dense-caption evaluator (tests; None: the METEOR jar).

    Each ground-truth PNG is decoded once for the PQ and dense-caption evaluators (module
    docstring); the grounded-caption evaluator reads the PNGs of the images it grounds
    itself.
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
        num_workers: Optional[int] = None,
        meteor_fn: Optional[MeteorFn] = None,
    ):
        self._ground_truth = GroundTruthReader(num_workers=num_workers)
        panoptic, grounded = _panoptic_and_grounded(
            dataset_name, output_dir, phrase_embedder, compute_caption_metrics, self._ground_truth
        )
        dense = DenseCaptionEvaluator(
            dataset_name=dataset_name,
            output_dir=output_dir,
            compat=compat,
            compute_caption_metrics=compute_caption_metrics,
            train_dataset_names=train_dataset_names,
            meteor_fn=meteor_fn,
            ground_truth=self._ground_truth,
        )
        super().__init__([panoptic, dense, grounded])

    @property
    def ground_truth(self) -> GroundTruthReader:
        """The reader shared by the PQ and dense-caption evaluators."""
        return self._ground_truth

    def reset(self) -> None:
        super().reset()
        self._ground_truth.clear()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        # Decoding starts in the reader's threads; the PQ evaluator queues its images and the
        # dense-caption evaluator waits for (or does) each decode; the pins keep the batch's
        # maps cached until both have them, whatever the batch size.
        paths = [inp["pan_seg_file_name"] for inp in inputs if inp.get("pan_seg_file_name")]
        with self._ground_truth.pinned(paths):
            super().process(inputs, outputs)

    def evaluate(self) -> dict:
        try:
            return super().evaluate()
        finally:
            self._ground_truth.close()


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
