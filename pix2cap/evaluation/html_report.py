"""An HTML report of an evaluation: one page per image, prediction beside ground truth.

Run with the dataset's evaluator (``TEST.HTML_REPORT True``; :meth:`DefaultTrainer.test
<pix2cap.engine.defaults.DefaultTrainer.test>` adds it), it writes, for every image it sees,
a page of :class:`~pix2cap.viewer.HtmlReport`:

* **Prediction** -- the model's panoptic segments with their dense captions, its grounded
  caption (``"grounded_caption"`` of the output, when the model gives one) and the panoptic
  caption of the language-model bridge (``TEST.PANCAP.WRITER``);
* **Ground truth** -- the dataset's segments (when it has panoptic PNGs) with their
  descriptions, its grounded caption and its panoptic caption, whichever it has.

Each page's scores (PQ / SQ / RQ of the image, in percent, when the ground truth has masks;
the number of predicted and ground-truth segments) sort the index grid; :meth:`write_index`
adds the evaluators' metric tables once they are known. A page costs the image and its
masks at ``max_size`` (a 256 px shapes page is ~40 KB, a COCO page 100-200 KB).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

from pix2cap.bridge import PanopticCaptionBridge
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.detection_utils import read_image
from pix2cap.evaluation.evaluator import DatasetEvaluator
from pix2cap.evaluation.panoptic_evaluation import _contiguous_categories, pq_compute_single
from pix2cap.evaluation.sapancap_evaluation import pancap_bridge_from_config
from pix2cap.structures import PanopticResult
from pix2cap.utils import comm
from pix2cap.viewer import HtmlReport, ImageView, page_key

__all__ = ["HtmlReportWriter", "image_pq"]

logger = logging.getLogger(__name__)


def image_pq(
    ground_truth: PanopticResult, prediction: PanopticResult, categories: Mapping[int, Mapping]
) -> dict:
    """PQ, SQ and RQ (percent) of one image over the categories present in either side.

    Args:
        ground_truth, prediction: results of the same size, contiguous category ids.
        categories: ``{contiguous id: {"isthing": ...}}``.
    """
    stat = pq_compute_single(
        ground_truth.panoptic_seg,
        [{"id": s.id, "category_id": s.category_id, "iscrowd": int(s.iscrowd)}
         for s in ground_truth.segments],
        prediction.panoptic_seg,
        [{"id": s.id, "category_id": s.category_id} for s in prediction.segments if s.area > 0],
        categories,
    )
    average, _ = stat.pq_average(categories)
    return {name: 100.0 * average[name.lower()] for name in ("PQ", "SQ", "RQ")}


class HtmlReportWriter(DatasetEvaluator):
    """Writes an :class:`~pix2cap.viewer.HtmlReport` of the images it processes.

    Args:
        dataset_name: the evaluated dataset (its dicts give the ground truth by ``image_id``).
        output_dir: the report folder.
        bridge: a :class:`~pix2cap.bridge.PanopticCaptionBridge` for the prediction's panoptic
            caption, or None (no panoptic caption for the prediction).
        max_images: pages written at most (0: every image).
        max_size: longer side of the images shown, in pixels.
        class_names_dataset: the dataset whose metadata names the model's classes (a dataset
            without a class vocabulary, such as SA-Pancap, uses the training set's).
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str,
        *,
        bridge: Optional[PanopticCaptionBridge] = None,
        max_images: int = 0,
        max_size: int = 1024,
        class_names_dataset: Optional[str] = None,
    ):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._bridge = bridge
        self._max_images = int(max_images)
        self._max_size = int(max_size)
        self._metadata = MetadataCatalog.get(dataset_name)
        self._class_metadata = MetadataCatalog.get(class_names_dataset or dataset_name)
        if not self._class_metadata.get("stuff_classes"):
            self._class_metadata = self._metadata
        self._categories: Optional[dict] = None
        if self._metadata.get("stuff_dataset_id_to_contiguous_id"):
            self._categories = _contiguous_categories(self._metadata, dataset_name)
        self._records: Optional[dict] = None
        self.report: Optional[HtmlReport] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: str) -> "HtmlReportWriter":
        """The writer ``cfg.TEST.HTML_REPORT*`` describes, with the panoptic-caption bridge of
        ``cfg.TEST.PANCAP`` (the one SA-Pancap evaluation uses)."""
        train = list(cfg.DATASETS.TRAIN)
        return cls(
            dataset_name,
            output_dir,
            bridge=pancap_bridge_from_config(cfg, dataset_name) if cfg.TEST.PANCAP.WRITER else None,
            max_images=cfg.TEST.HTML_REPORT_MAX_IMAGES,
            class_names_dataset=train[0] if train else None,
        )

    def reset(self) -> None:
        self._keys: list[str] = []
        self._used: set[str] = set()
        self.report = None

    def _record(self, image_id: Any) -> Mapping:
        if self._records is None:
            self._records = {d["image_id"]: d for d in DatasetCatalog.get(self._dataset_name)}
        return self._records.get(image_id, {})

    def _key(self, file_name: str, image_id: Any) -> str:
        key = page_key(file_name)
        if key in self._used:
            key = page_key(f"{key}_{image_id}")
        self._used.add(key)
        return key

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Args: inputs with ``file_name`` and ``image_id``; outputs with ``panoptic_seg``
        and, optionally, ``grounded_caption``."""
        if self.report is None:
            self.report = HtmlReport(
                self._output_dir, title=f"pix2cap: {self._dataset_name}", max_size=self._max_size
            )
        for inp, out in zip(inputs, outputs):
            if self._max_images and len(self._keys) >= self._max_images:
                return
            self._add_page(inp, out)

    def _add_page(self, inp: Mapping, out: Mapping) -> None:
        record = {**self._record(inp.get("image_id")), **inp}
        file_name = record["file_name"]
        image = read_image(file_name, format="RGB")
        size = image.shape[:2]
        views = []
        scores: dict[str, Optional[float]] = {}
        prediction = None
        if "panoptic_seg" in out:
            prediction = PanopticResult.from_model_output(out, self._class_metadata)
            if prediction.image_size != size:
                raise ValueError(
                    f"{file_name}: panoptic_seg is {prediction.image_size}, the image {size}"
                )
            pancap = None if self._bridge is None else self._bridge(out, size)["caption"]
            views.append(
                ImageView(
                    "Prediction", prediction, out.get("grounded_caption"), pancap,
                    self._class_metadata,
                )
            )
        truth_view = ImageView.from_dataset_dict(record, self._metadata, size)
        truth = truth_view.result
        if truth is not None or truth_view.grounded_caption or truth_view.panoptic_caption:
            views.append(truth_view)
        if truth is not None and prediction is not None and self._categories is not None:
            scores.update(image_pq(truth, prediction, self._categories))
        if prediction is not None:
            scores["predicted segments"] = sum(1 for s in prediction.segments if s.area > 0)
        if truth is not None:
            scores["true segments"] = len(truth.segments)
        key = self._key(file_name, inp.get("image_id"))
        title = str(record.get("image_path") or os.path.basename(file_name))
        self.report.add_page(key, image, views, title=title, scores=scores, source=file_name)
        self._keys.append(key)

    def evaluate(self) -> None:
        """Gathers the pages' keys on the main process; the report's metrics are not the
        writer's to give, so it returns None (see :meth:`write_index`)."""
        comm.synchronize()
        gathered = comm.gather(self._keys, dst=0)
        if comm.is_main_process():
            self._keys = [k for part in gathered for k in part]
        return None

    def write_index(self, metrics: Optional[Mapping[str, Any]] = None) -> Optional[str]:
        """Write the index with ``metrics`` (the evaluators' results); main process only.
        Returns the index's path (None on other processes or when no page was written)."""
        if not comm.is_main_process() or not self._keys:
            return None
        if self.report is None:  # pages written by other processes only
            self.report = HtmlReport(
                self._output_dir, title=f"pix2cap: {self._dataset_name}", max_size=self._max_size
            )
        sort = "PQ" if self._categories is not None else None
        path = self.report.write_index(self._keys, metrics or {}, default_sort=sort)
        logger.info("HTML report of %d images: %s", len(self._keys), path)
        return path
