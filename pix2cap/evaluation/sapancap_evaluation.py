"""SA-Pancap evaluation from ``train_net``: panoptic captions through the bridge, PancapScore.

For every image the language-model bridge (:class:`~pix2cap.bridge.PanopticCaptionBridge`)
writes the panoptic caption from the model's decoded segments; :class:`PancapScorer` compares
it with the ground-truth caption and reports E / L / A / R / G and Overall, labelled with the
setup that produced them (judge, extractors, embedder, WordNet; an approximation unless every
part is the official one). The captions are written in the official prediction form, ``[{"image_path",
"model_response"}]``, to ``OUTPUT_DIR/.../pancap_predictions.json`` (with their structured
content in ``pancap_structured.json``), so ``tools/eval_pancapscore.py`` can score them again
with another judge.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Optional, Sequence

from pix2cap.bridge import PanopticCaptionBridge, build_caption_writer
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.utils import comm
from pix2cap.utils.file_io import atomic_write_json

from .build import EVALUATOR_REGISTRY
from .evaluator import DatasetEvaluator
from .pancapscore import (
    PancapScorer,
    SentenceTransformerEmbedder,
    build_judge,
    extractor_for,
    format_table,
    load_wordnet,
    summarize,
)
from .pancapscore.score import DIMENSION_KEYS
from .results import write_results_json

__all__ = ["SAPancapEvaluator", "build_pancap_bridge", "pancap_bridge_from_config"]

logger = logging.getLogger(__name__)

def build_pancap_bridge(
    writer: Any,
    writer_kwargs: Optional[dict] = None,
    class_names_dataset: Optional[str] = None,
    dataset_name: Optional[str] = None,
    min_segment_score: float = 0.0,
) -> PanopticCaptionBridge:
    """The bridge that writes an evaluated image's panoptic caption.

    Args:
        writer: a caption writer, or a name for ``build_caption_writer``.
        writer_kwargs: for a named writer (``model_path`` of an LM writer).
        class_names_dataset: the dataset whose metadata names the model's classes; None:
            ``dataset_name``'s.
        min_segment_score: segments below it are left out of the caption.
    """
    if isinstance(writer, str):
        writer = build_caption_writer(writer, **(writer_kwargs or {}))
    metadata = MetadataCatalog.get(class_names_dataset or dataset_name)
    return PanopticCaptionBridge(writer, metadata=metadata, min_segment_score=min_segment_score)


def _bridge_kwargs(cfg) -> dict:
    """``build_pancap_bridge``'s arguments from ``cfg.TEST.PANCAP`` and ``DATASETS.TRAIN[0]``
    (the class names: a test set such as SA-Pancap has none)."""
    pancap = cfg.TEST.PANCAP
    train = list(cfg.DATASETS.TRAIN)
    return {
        "writer": pancap.WRITER,
        "writer_kwargs": {"model_path": pancap.LM_PATH} if pancap.LM_PATH else {},
        "class_names_dataset": train[0] if train else None,
        "min_segment_score": pancap.MIN_SEGMENT_SCORE,
    }


def pancap_bridge_from_config(cfg, dataset_name: str) -> PanopticCaptionBridge:
    """The bridge ``cfg.TEST.PANCAP`` describes, for the images of ``dataset_name``."""
    return build_pancap_bridge(dataset_name=dataset_name, **_bridge_kwargs(cfg))


PREDICTIONS_FILE = "pancap_predictions.json"
STRUCTURED_FILE = "pancap_structured.json"


@EVALUATOR_REGISTRY.register(aliases=("sapancap",))
class SAPancapEvaluator(DatasetEvaluator):
    """PancapScore of the bridge's panoptic captions on an SA-Pancap-format dataset.

    Args:
        dataset_name: a registered dataset whose records carry ``panoptic_caption`` (images
            without one are captioned, not scored).
        output_dir: where predictions and ``pancapscore_results.json`` go (None: nowhere).
        writer: the bridge's caption writer, a name for ``build_caption_writer`` or an object.
        writer_kwargs: for a named writer (``model_path`` of an LM writer).
        class_names_dataset: the dataset whose metadata names the model's classes (SA-Pancap
            has no class vocabulary); None: ``dataset_name``'s.
        min_segment_score: segments below it are left out of the caption.
        judge: a :class:`PancapJudge` (default: the ``structured`` judge on ``embedder``).
        extractor, gt_extractor: option names of :func:`extractor_for`.
        embedder: an embedder of entity names; default the packaged all-MiniLM-L6-v2.
        synonyms: a WordNet synonym scorer; default :func:`load_wordnet` (None without nltk data).
        protocol: PancapScore's reading protocol, ``official`` (default) or ``lenient``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        writer: Any = "template",
        writer_kwargs: Optional[dict] = None,
        class_names_dataset: Optional[str] = None,
        min_segment_score: float = 0.0,
        judge: Any = None,
        extractor: str = "auto",
        gt_extractor: str = "auto",
        embedder: Any = "default",
        synonyms: Any = "default",
        similarity_threshold: float = 0.85,
        protocol: str = "official",
    ):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._bridge = build_pancap_bridge(
            writer, writer_kwargs, class_names_dataset, dataset_name, min_segment_score
        )
        if isinstance(embedder, str) and embedder == "default":
            embedder = SentenceTransformerEmbedder(None)
        if judge is None:
            judge = build_judge("structured", embedder=embedder, threshold=similarity_threshold)
        self._scorer = PancapScorer(
            judge=judge,
            gt_extractor=extractor_for(gt_extractor, judge, for_gt=True, protocol=protocol),
            pred_extractor=extractor_for(extractor, judge, for_gt=False, protocol=protocol),
            embedder=embedder,
            synonyms=load_wordnet() if isinstance(synonyms, str) and synonyms == "default" else synonyms,
            protocol=protocol,
        )
        self._judge = judge
        self.reset()

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Keyword arguments from ``cfg.TEST.PANCAP`` (writer, judge, extractors, embedder)
        and ``cfg.DATASETS.TRAIN[0]`` (the class names)."""
        pancap = cfg.TEST.PANCAP
        embedder: Any = "default"
        if pancap.EMBEDDER.lower() == "none":
            embedder = None
        elif pancap.EMBEDDER:
            embedder = SentenceTransformerEmbedder(pancap.EMBEDDER)
        judge = None
        if pancap.JUDGE == "hf_local":
            judge = build_judge("hf_local", model=pancap.JUDGE_MODEL)
        elif pancap.JUDGE == "openai_http":
            judge = build_judge("openai_http", base_url=pancap.BASE_URL, model=pancap.JUDGE_MODEL)
        elif pancap.JUDGE != "structured":
            raise ValueError(
                f"TEST.PANCAP.JUDGE={pancap.JUDGE!r}: use structured, hf_local or openai_http"
            )
        return {
            **_bridge_kwargs(cfg),
            "judge": judge,
            "extractor": pancap.EXTRACTOR,
            "gt_extractor": pancap.GT_EXTRACTOR,
            "embedder": embedder,
            "similarity_threshold": pancap.SIMILARITY_THRESHOLD,
            "protocol": pancap.PROTOCOL,
        }

    def reset(self) -> None:
        self._predictions: list[dict] = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Args: inputs with ``image_id`` (the image's relative path); outputs with
        ``panoptic_seg`` (segments with captions)."""
        for inp, out in zip(inputs, outputs):
            if "panoptic_seg" not in out:
                raise KeyError(
                    f"SA-Pancap evaluation needs 'panoptic_seg' in the output for {inp.get('image_id')!r}"
                )
            size = tuple(out["panoptic_seg"][0].shape[-2:])
            caption = self._bridge(out, size)
            self._predictions.append(
                {
                    "image_path": str(inp["image_id"]),
                    "model_response": caption["caption"],
                    "structured": caption["structured"],
                }
            )

    def evaluate(self) -> Optional[dict]:
        comm.synchronize()
        gathered = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        predictions = {p["image_path"]: p for part in gathered for p in part}
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            atomic_write_json(
                os.path.join(self._output_dir, PREDICTIONS_FILE),
                [{"image_path": k, "model_response": p["model_response"]} for k, p in predictions.items()],
                indent=2,
            )
            atomic_write_json(
                os.path.join(self._output_dir, STRUCTURED_FILE),
                [{"image_path": k, "structured": p["structured"]} for k, p in predictions.items()],
                indent=2,
            )
        per_image, without_gt = [], 0
        for record in DatasetCatalog.get(self._dataset_name):
            prediction = predictions.get(str(record["image_id"]))
            if prediction is None:
                continue
            gt = record.get("panoptic_caption")
            if not gt:
                without_gt += 1
                continue
            per_image.append(
                self._scorer.score_image(
                    gt,
                    prediction["model_response"],
                    prediction["structured"],
                    image_path=str(record["image_id"]),
                )
            )
        if not per_image:
            logger.warning(
                "No image of %s has both a prediction and a ground-truth caption: no PancapScore",
                self._dataset_name,
            )
            return {}
        mean = summarize(per_image)
        setup = self._scorer.setup.as_dict()
        results: OrderedDict = OrderedDict()
        for key in list(DIMENSION_KEYS) + ["Overall"]:
            results[key] = mean[key]
        results["num_images"] = mean["num_images"]
        # Images whose judge could not be reached (its retries spent) are not scored.
        results["skipped_images"] = mean["skipped_images"]
        results["images_without_gt_caption"] = without_gt
        results["protocol"] = setup["protocol"]
        if "official_code_crashes" in mean:
            results["official_code_crashes"] = mean["official_code_crashes"]
        results["official"] = setup["official"]
        results["judge"] = setup["judge"]
        results["extractor"] = f"{setup['extractor']['gt']} (gt), {setup['extractor']['pred']} (pred)"
        results["embedder"] = setup["embedder"]
        results["wordnet"] = setup["wordnet"]
        results["judge_stats"] = dict(self._judge.stats)
        logger.info(
            "PancapScore of %s (%s):\n%s", self._dataset_name,
            "official" if setup["official"] else setup["approximation_note"],
            format_table(mean),
        )
        out = {"pancapscore": results}
        if self._output_dir:
            write_results_json(
                {**out, "per_image": per_image, "setup": setup},
                os.path.join(self._output_dir, "pancapscore_results.json"),
            )
        return out
