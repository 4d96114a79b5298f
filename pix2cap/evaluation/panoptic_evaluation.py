"""Panoptic quality (PQ) with panopticapi's rules, computed from id maps in memory, and the
evaluator that reports it and exports predictions in COCO panoptic format.

Rules (those of ``panopticapi.evaluation.pq_compute``, kept exactly):

* a predicted and a ground-truth segment match iff they have the same category and
  ``IoU > 0.5``, where ``union = pred_area + gt_area - intersection - pred_on_void`` (the
  prediction's pixels on VOID do not count against it);
* crowd ground-truth segments never match and are not false negatives;
* an unmatched prediction is not a false positive when more than half of it lies on VOID plus
  the crowd region of its own category (panopticapi keeps ONE crowd segment per category and
  image, the last one listed; COCO never has more);
* a category enters the averages only if ``tp + fp + fn > 0``;
  ``PQ = sum(IoU of matches) / (tp + fp / 2 + fn / 2)``, ``SQ = sum(IoU) / tp``,
  ``RQ = tp / (tp + fp / 2 + fn / 2)``.

One deliberate difference of input, not of rule: the ground-truth area of a segment is its pixel
count in the id map, where panopticapi reads the ``area`` field of the JSON. The two are equal in
COCO and in any file written from its PNG.

All intersections of an image come from one 2-D histogram of the pairs
``(gt_index, pred_index)`` (segment ids are first mapped to their position in the segment
lists; OpenCV's ``calcHist`` when both fit 8 bits, else ``np.bincount`` over
``gt_index * (num_pred + 1) + pred_index``); only the small ``[num_gt, num_pred]`` matrix is
looked at afterwards. The evaluator decodes the ground-truth PNGs through a
:class:`~pix2cap.evaluation.ground_truth.GroundTruthReader` (threads, each file once).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict, defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np
import torch

from pix2cap.data.catalog import Metadata, MetadataCatalog
from pix2cap.data.detection_utils import encode_panoptic_png
from pix2cap.structures import PanopticResult
from pix2cap.utils import comm
from pix2cap.utils.file_io import atomic_write_bytes

from .build import EVALUATOR_REGISTRY
from .evaluator import DatasetEvaluator
from .ground_truth import GroundTruthEntry, GroundTruthReader

__all__ = [
    "OFFSET",
    "VOID",
    "PQStatCat",
    "PQStat",
    "pq_compute_single",
    "COCOPanopticEvaluator",
]

logger = logging.getLogger(__name__)

#: Ids of the COCO panoptic PNG encoding (``R + 256 G + 256^2 B``) are below this.
OFFSET = 256 * 256 * 256
#: The id of unlabelled pixels.
VOID = 0

# Below this largest id, a direct lookup table maps ids to segment positions; above it (COCO's
# colour-derived ids reach 2^24) a binary search over the few segment ids is cheaper than
# allocating the table.
_LUT_MAX_ID = 1 << 16


@dataclass
class PQStatCat:
    """Counts of one category: sum of matched IoUs, true/false positives, false negatives."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:
    """Per-category PQ counts, accumulated over images (``stat += other``) and averaged by
    :meth:`pq_average`. Keys are whatever category ids the caller uses (pix2cap's evaluator
    uses contiguous ids). Picklable, so it can be gathered across processes."""

    def __init__(self) -> None:
        self.pq_per_cat: defaultdict[Any, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for category_id, stat in other.pq_per_cat.items():
            self.pq_per_cat[category_id] += stat
        return self

    def __repr__(self) -> str:
        counted = {k: v for k, v in self.pq_per_cat.items() if v.tp + v.fp + v.fn > 0}
        return f"PQStat({counted})"

    def pq_average(
        self, categories: Mapping[Any, Mapping], isthing: Optional[bool] = None
    ) -> tuple[dict, dict]:
        """Average PQ / SQ / RQ over the categories with ``tp + fp + fn > 0``.

        Args:
            categories: ``{category_id: {"isthing": 0/1 or bool, ...}}``, the categories to
                consider (ids not in it are ignored).
            isthing: ``True`` things only, ``False`` stuff only, ``None`` all.
        Returns:
            ``({"pq", "sq", "rq", "n"}, {category_id: {"pq", "sq", "rq"}})`` as fractions in
            [0, 1]; ``n`` is the number of categories averaged. A category without any
            segment gets 0.0 in the per-class dict (as in panopticapi) and is not averaged.
            With ``n == 0`` the averages are 0.0 (panopticapi would divide by zero).
        """
        pq = sq = rq = 0.0
        n = 0
        per_class: dict = {}
        for category_id, info in categories.items():
            if isthing is not None and (int(info["isthing"]) == 1) != isthing:
                continue
            stat = self.pq_per_cat.get(category_id, PQStatCat())
            tp, fp, fn, iou = stat.tp, stat.fp, stat.fn, stat.iou
            if tp + fp + fn == 0:
                per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denominator = tp + 0.5 * fp + 0.5 * fn
            pq_class = iou / denominator
            sq_class = iou / tp if tp != 0 else 0.0
            rq_class = tp / denominator
            per_class[category_id] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _image_name(image_id) -> str:
    return "the image" if image_id is None else f"the image with id {image_id!r}"


def _as_id_map(ids, what: str, image_id) -> np.ndarray:
    """A 2-D integer ndarray of ids from an ndarray or tensor (any device)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().to("cpu").numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(
            f"{what} of {_image_name(image_id)} must be 2-D [H, W], got shape {ids.shape}"
        )
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} of {_image_name(image_id)} must hold integers, got {ids.dtype}")
    if ids.dtype.kind == "i" and ids.size and int(ids.min()) < 0:
        raise ValueError(f"{what} of {_image_name(image_id)} has negative ids")
    return ids


def _segment_ids(segments: Sequence[Mapping], what: str, void_id: int, image_id) -> np.ndarray:
    """The ``id`` of every segment, checked for duplicates and for the VOID id."""
    try:
        ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    except KeyError as e:
        raise KeyError(f"a segment of {what} of {_image_name(image_id)} has no key {e}") from None
    if len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise ValueError(
            f"{what} of {_image_name(image_id)} lists segment id(s) "
            f"{values[counts > 1].tolist()} more than once"
        )
    if np.any(ids == void_id):
        raise ValueError(
            f"{what} of {_image_name(image_id)} lists a segment with the VOID id {void_id}"
        )
    return ids


def _small_dtype(num_values: int) -> np.dtype:
    """The narrowest unsigned dtype holding ``[0, num_values)`` (narrow maps gather faster)."""
    if num_values <= 1 << 8:
        return np.dtype(np.uint8)
    if num_values <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.intp)


def _index_map(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each pixel's id in ``keys``; ``len(keys)`` for an id not in ``keys``.

    Args:
        ids: Int[H, W] non-negative ids.
        keys: Int64[K] distinct non-negative ids.
    Returns:
        UInt[H, W] (the narrowest dtype for ``K + 1`` values) in ``[0, K]``.
    """
    # Gathers use np.take: several times faster than fancy indexing with narrow index dtypes.
    num_keys = len(keys)
    dtype = _small_dtype(num_keys + 1)
    max_id = int(ids.max()) if ids.size else 0
    if max_id <= _LUT_MAX_ID:
        # Small ids (a model's 1..N): one lookup table indexed by the id itself.
        if max_id < 256 and dtype == np.uint8 and ids.ndim == 2 and ids.size:
            # Both 8-bit: OpenCV's table lookup, several times faster than np.take (which
            # copies the ids to intp first); the narrowing copy is exact below 256.
            lut = np.full(256, num_keys, dtype=np.uint8)
            present = keys <= max_id
            lut[keys[present]] = np.nonzero(present)[0]
            return cv2.LUT(ids.astype(np.uint8, copy=False), lut)
        lut = np.full(max_id + 1, num_keys, dtype=dtype)
        present = keys <= max_id
        lut[keys[present]] = np.nonzero(present)[0]
        return np.take(lut, ids)
    # Large ids (COCO's colour ids reach 2^24). Keys that the id dtype cannot hold cannot occur.
    info = np.iinfo(ids.dtype)
    representable = np.nonzero((keys >= info.min) & (keys <= info.max))[0]
    if representable.size == 0:
        return np.full(ids.shape, num_keys, dtype=dtype)
    typed_keys = keys[representable].astype(ids.dtype)
    low = typed_keys & 0xFFFF
    if len(np.unique(low)) == len(low):
        # The low 16 bits of the keys are distinct (they almost always are): a 2^16 table on
        # them finds the candidate key, and one comparison rejects ids that only share those
        # bits with it. Cheaper than a binary search per pixel.
        lut = np.full(1 << 16, num_keys, dtype=dtype)
        lut[low] = representable
        position = np.take(lut, ids & ids.dtype.type(0xFFFF))
        # Entry num_keys holds a key: pixels sent there have low bits of no key, so they can
        # never equal it and stay at num_keys.
        key_of_position = np.zeros(num_keys + 1, dtype=ids.dtype)
        key_of_position[representable] = typed_keys
        key_of_position[num_keys] = typed_keys[0]
        mismatch = np.take(key_of_position, position) != ids
        if mismatch.any():  # rare: ids missing from segments_info
            position[mismatch] = num_keys
        return position
    order = np.argsort(typed_keys, kind="stable")
    sorted_keys = typed_keys[order]
    where = np.searchsorted(sorted_keys, ids)
    np.minimum(where, len(sorted_keys) - 1, out=where)
    found = sorted_keys[where] == ids
    position = np.take(representable[order].astype(dtype), where)
    position[~found] = num_keys
    return position


def _confusion(
    gt_index: np.ndarray, pred_index: np.ndarray, num_rows: int, num_cols: int
) -> np.ndarray:
    """Int64[num_rows, num_cols]: the number of pixels of each (row, column) pair.

    Args:
        gt_index, pred_index: UInt[H, W] in ``[0, num_rows)`` and ``[0, num_cols)``.
    """
    if (
        gt_index.dtype == np.uint8
        and pred_index.dtype == np.uint8
        and 0 < gt_index.size < 1 << 24
    ):
        # OpenCV's 8-bit 2-D histogram (unit bins over [0, n): one bin per value) counts in
        # int32 and returns float32, exact below 2^24 pixels; about twice as fast as
        # np.bincount, which first copies the pair indices to intp.
        hist = cv2.calcHist(
            [gt_index, pred_index], [0, 1], None, [num_rows, num_cols],
            [0, num_rows, 0, num_cols],
        )
        return hist.astype(np.int64)
    num_pairs = num_rows * num_cols
    pair = gt_index.astype(_small_dtype(num_pairs))
    pair *= num_cols
    pair += pred_index
    return np.bincount(pair.ravel(), minlength=num_pairs).reshape(num_rows, num_cols)


def _evaluate_image(
    gt_ids,
    gt_segments: Sequence[Mapping],
    pred_ids,
    pred_segments: Sequence[Mapping],
    categories: Mapping[Any, Mapping],
    void_id: int = VOID,
    image_id=None,
) -> PQStat:
    gt = _as_id_map(gt_ids, "the ground-truth id map", image_id)
    pred = _as_id_map(pred_ids, "the predicted id map", image_id)
    if gt.shape != pred.shape:
        raise ValueError(
            f"{_image_name(image_id)}: the prediction is {tuple(pred.shape)} but the ground "
            f"truth is {tuple(gt.shape)} (predictions must be at the original image size)"
        )
    gt_seg_ids = _segment_ids(gt_segments, "the ground-truth segments_info", void_id, image_id)
    pred_seg_ids = _segment_ids(pred_segments, "the predicted segments_info", void_id, image_id)
    for segments, what in ((gt_segments, "ground-truth"), (pred_segments, "predicted")):
        for s in segments:
            if s["category_id"] not in categories:
                raise KeyError(
                    f"In {_image_name(image_id)} the {what} segment with id {s['id']} has "
                    f"unknown category_id {s['category_id']!r}"
                )
    num_gt, num_pred = len(gt_seg_ids), len(pred_seg_ids)

    # Rows: the gt segments, then VOID (row num_gt), then ids missing from segments_info
    # (row num_gt + 1: panopticapi ignores those pixels, they are neither a segment nor VOID).
    gt_index = _index_map(gt, np.append(gt_seg_ids, void_id))
    # Columns: the predicted segments, then VOID (column num_pred); an unlisted id is an error.
    pred_index = _index_map(pred, np.append(pred_seg_ids, void_id))
    num_cols = num_pred + 1
    if pred_index.size and int(pred_index.max()) > num_pred:
        unknown = np.unique(pred[pred_index > num_pred])
        raise KeyError(
            f"In {_image_name(image_id)} segment id(s) {unknown[:10].tolist()} are present in "
            f"the predicted id map and not in its segments_info"
        )
    confusion = _confusion(gt_index, pred_index, num_gt + 2, num_cols)

    gt_area = confusion[:num_gt].sum(axis=1)
    pred_area = confusion[:, :num_pred].sum(axis=0)
    absent = np.nonzero(pred_area == 0)[0]
    if absent.size:
        raise KeyError(
            f"In {_image_name(image_id)} the predicted segment id(s) "
            f"{pred_seg_ids[absent].tolist()} are listed in segments_info and not present in "
            f"the predicted id map"
        )
    pred_on_void = confusion[num_gt, :num_pred]

    gt_cat = [s["category_id"] for s in gt_segments]
    pred_cat = [s["category_id"] for s in pred_segments]
    gt_crowd = np.array([int(s.get("iscrowd", 0)) == 1 for s in gt_segments], dtype=bool)

    stat = PQStat()
    gt_matched = np.zeros(num_gt, dtype=bool)
    pred_matched = np.zeros(num_pred, dtype=bool)
    # Candidate pairs: overlapping, gt not crowd, same category. The loop runs over the few
    # overlapping pairs only; their order cannot change the result, because segments do not
    # overlap and so a segment has at most one partner with IoU > 0.5.
    overlap = confusion[:num_gt, :num_pred]
    for g, p in zip(*np.nonzero(overlap)):
        if gt_crowd[g] or gt_cat[g] != pred_cat[p]:
            continue
        intersection = overlap[g, p]
        union = pred_area[p] + gt_area[g] - intersection - pred_on_void[p]
        iou = intersection / union
        if iou > 0.5:
            cat = stat[gt_cat[g]]
            cat.tp += 1
            cat.iou += float(iou)
            gt_matched[g] = True
            pred_matched[p] = True

    crowd_of_category: dict = {}
    for g in range(num_gt):
        if gt_matched[g]:
            continue
        if gt_crowd[g]:
            # One crowd region per category, the last listed, exactly as panopticapi does.
            crowd_of_category[gt_cat[g]] = g
            continue
        stat[gt_cat[g]].fn += 1

    for p in range(num_pred):
        if pred_matched[p]:
            continue
        ignored = pred_on_void[p]
        crowd = crowd_of_category.get(pred_cat[p])
        if crowd is not None:
            ignored = ignored + overlap[crowd, p]
        if ignored / pred_area[p] > 0.5:
            continue
        stat[pred_cat[p]].fp += 1
    return stat


def pq_compute_single(
    gt_ids,
    gt_segments: Sequence[Mapping],
    pred_ids,
    pred_segments: Sequence[Mapping],
    categories: Mapping[Any, Mapping],
    void_id: int = VOID,
    *,
    image_id=None,
) -> PQStat:
    """PQ counts of one image.

    Args:
        gt_ids: Int[H, W] ndarray or tensor, ground-truth segment id per pixel.
        gt_segments: one dict per ground-truth segment: ``id``, ``category_id``, ``iscrowd``
            (0 when absent). Pixels whose id is neither listed nor ``void_id`` are ignored.
        pred_ids: Int[H, W] ndarray or tensor (any device), predicted segment id per pixel.
        pred_segments: one dict per predicted segment: ``id``, ``category_id``.
        categories: ``{category_id: {"isthing": ...}}`` in the same id space as the segments.
        void_id: the id of unlabelled pixels in both maps.
        image_id: named in error messages.
    Returns:
        a :class:`PQStat` with this image's counts; ``+=`` them over a dataset.
    Raises:
        KeyError: the prediction uses an id that ``pred_segments`` does not list, lists a
            segment with no pixel, or a segment has a category not in ``categories``
            (panopticapi's checks, naming the image).
        ValueError: shapes differ, ids are negative, a segment id repeats or equals VOID.
    """
    return _evaluate_image(
        gt_ids, gt_segments, pred_ids, pred_segments, categories, void_id, image_id
    )


def _contiguous_categories(metadata, dataset_name: str) -> dict[int, dict]:
    """``{contiguous id: {"id" (dataset id), "name", "isthing", ...}}`` from dataset metadata
    (``categories`` ordered by contiguous id, or the detectron2-style id maps)."""
    ordered = metadata.get("categories")
    if ordered:
        return {i: dict(c) for i, c in enumerate(ordered)}
    stuff_map = metadata.get("stuff_dataset_id_to_contiguous_id")
    if not stuff_map:
        raise KeyError(
            f"the metadata of dataset {dataset_name!r} has neither 'categories' nor "
            "'stuff_dataset_id_to_contiguous_id'; PQ needs the class list"
        )
    thing_map = metadata.get("thing_dataset_id_to_contiguous_id") or {}
    names = list(metadata.get("stuff_classes") or [])
    all_map = {int(k): int(v) for k, v in stuff_map.items()}
    all_map.update({int(k): int(v) for k, v in thing_map.items()})
    thing_ids = {int(k) for k in thing_map}
    return {
        contiguous: {
            "id": dataset_id,
            "name": names[contiguous] if contiguous < len(names) else str(dataset_id),
            "isthing": int(dataset_id in thing_ids),
        }
        for dataset_id, contiguous in sorted(all_map.items(), key=lambda kv: kv[1])
    }


def _format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    from tabulate import tabulate  # a dependency of fvcore

    return tabulate(rows, headers=header, tablefmt="pipe", floatfmt=".3f", numalign="right")


class COCOPanopticEvaluator(DatasetEvaluator):
    """PQ / SQ / RQ of panoptic predictions (panopticapi's rules), per image as it goes.

    ``process`` copies each prediction to the host and queues the image while the threads of
    its :class:`~pix2cap.evaluation.ground_truth.GroundTruthReader` decode the image's
    ground-truth PNG (once, even for several evaluators sharing the reader); an image is
    counted, in the calling thread and in image order, once ``2 * num_workers`` newer ones
    wait behind it (or by ``evaluate``), so PNG decoding overlaps the counting and the model's
    next batches even at one image per batch, and the numbers do not depend on the threads.
    The queue holds one prediction and one ground-truth map per waiting image. ``evaluate``
    needs no second pass over files; with ``output_dir`` it also keeps each prediction (PNG
    bytes + segments) and writes them in COCO panoptic format:
    ``output_dir/panoptic_predictions/<image>.png`` and ``output_dir/panoptic_predictions.json``
    (``annotations`` with dataset category ids, and the dataset's ``categories``), a layout
    that ``panopticapi.evaluation.pq_compute`` reads.

    Errors: a malformed output dict or input dict raises in ``process`` itself; an error that
    needs the ground truth (sizes differ, unknown ids, unreadable PNG) raises, naming the
    image, from a later ``process`` call or from ``evaluate`` (with ``num_workers=0``, from
    the ``process`` call of the image, everything running in the caller's thread).

    Expects the test mapper's dicts (``pan_seg_file_name``, ``segments_info`` with contiguous
    ``category_id``, ``image_id``, ``file_name``) and outputs
    ``{"panoptic_seg": (Int[H, W] tensor, segments_info)}``, ``segments_info`` dicts holding
    ``id`` and contiguous ``category_id``; for the export they are read as a
    :class:`PanopticResult` (``score`` and a non-empty ``caption`` are exported when present).
    """

    #: Images waiting per decoding thread: enough that the threads decode ahead while the
    #: caller counts, few enough that the queue stays a few maps.
    _QUEUE_PER_WORKER = 2

    def __init__(
        self,
        *,
        dataset_name: str,
        output_dir: Optional[str] = None,
        metadata: Optional[Metadata | Mapping] = None,
        png_compression: int = 1,
        ground_truth: Optional[GroundTruthReader] = None,
        num_workers: Optional[int] = None,
    ):
        """
        Args:
            dataset_name: its ``MetadataCatalog`` entry gives the classes.
            output_dir: where to export the predictions; ``None`` keeps none in memory.
            metadata: overrides the catalog's metadata (a ``Metadata``; a mapping is wrapped
                in one).
            png_compression: zlib level 0-9 of the exported PNGs (1: fast, larger files).
            ground_truth: a reader shared with other evaluators of the same images (each PNG
                is then decoded once for all of them); None: a reader of this evaluator's own,
                closed by ``evaluate``.
            num_workers: threads of the own reader (None: the cores, at most 4; 0: serial, in
                the caller's thread). Give a shared reader its threads instead.
        """
        if metadata is None:
            metadata = MetadataCatalog.get(dataset_name)
        elif not isinstance(metadata, Metadata):
            # Class names and thing/stuff then follow Metadata's rules, as everywhere else.
            metadata = Metadata(**{"name": dataset_name, **metadata})
        if ground_truth is not None and num_workers is not None:
            raise ValueError("num_workers is that of the reader: set it on the shared reader")
        self._dataset_name = dataset_name
        self._metadata = metadata
        self._output_dir = output_dir
        self._png_compression = int(png_compression)
        self._categories = _contiguous_categories(metadata, dataset_name)
        self._owns_reader = ground_truth is None
        self._ground_truth = (
            GroundTruthReader(num_workers=num_workers) if ground_truth is None else ground_truth
        )
        self._pending: deque[tuple] = deque()
        self.reset()

    @property
    def categories(self) -> dict[int, dict]:
        """``{contiguous id: {"id" (dataset id), "name", "isthing", ...}}``."""
        return self._categories

    @property
    def ground_truth(self) -> GroundTruthReader:
        """The reader of the ground-truth PNGs."""
        return self._ground_truth

    @property
    def pq_stat(self) -> PQStat:
        """The counts accumulated by this process since the last ``reset`` (waits for the
        queued images)."""
        self._drain(0)
        return self._pq_stat

    def reset(self) -> None:
        self._pending = deque()
        self._pq_stat = PQStat()
        self._num_images = 0
        self._predictions: list[dict] = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            image_id = inp.get("image_id")
            pred_ids, pred_segments = self._read_prediction(out, image_id)
            for key in ("pan_seg_file_name", "segments_info"):
                if key not in inp:
                    raise KeyError(
                        f"the input dict of image {image_id!r} has no {key!r}; use the "
                        "test mapper, which keeps the ground truth for evaluators"
                    )
            # Decoding starts in the reader's threads while the image waits in the queue.
            (entry,) = self._ground_truth.prefetch([inp["pan_seg_file_name"]])
            # What the queued work reads of the input (the export names files after it).
            image = {k: inp[k] for k in ("image_id", "file_name", "segments_info") if k in inp}
            self._pending.append((image, entry, pred_ids, pred_segments))
            self._drain(self._QUEUE_PER_WORKER * self._ground_truth.num_workers)

    def _drain(self, limit: int) -> None:
        """Count the oldest queued images until at most ``limit`` wait (in image order)."""
        while len(self._pending) > limit:
            stat, encoded = self._evaluate_one(*self._pending.popleft())
            self._pq_stat += stat
            self._num_images += 1
            if encoded is not None:
                self._predictions.append(encoded)

    def _read_prediction(self, out: Mapping, image_id) -> tuple[np.ndarray, list[dict]]:
        """The model output of one image: its id map copied to the host (the caller may
        reuse its tensors once ``process`` returns) and its segment dicts (shallow copies),
        checked for what the queued work needs; errors name the image."""
        if "panoptic_seg" not in out:
            raise KeyError(f"the output for image {image_id!r} has no 'panoptic_seg'")
        ids, segments_info = out["panoptic_seg"]
        if segments_info is None:
            raise ValueError(
                f"the output for image {image_id!r} has segments_info=None; this "
                "evaluator needs the list of segments (id, category_id)"
            )
        segments = []
        for k, info in enumerate(segments_info):
            for key in ("id", "category_id"):
                if key not in info:
                    raise KeyError(
                        f"the output for image {image_id!r}: segments_info[{k}] has no "
                        f"{key!r} (keys: {sorted(info)})"
                    )
            segments.append(dict(info))
        if isinstance(ids, torch.Tensor):
            # A device tensor's copy to the host is already a new array.
            copied = ids.device.type != "cpu"
            ids = ids.detach().cpu().numpy()
        else:
            ids = np.asarray(ids)
            copied = False
        if ids.size and ids.dtype.kind in "iu" and ids.itemsize > 1:
            # A model's ids are 1..N: an 8-bit copy is a fraction of the bytes, and the
            # counting's 8-bit lookup reads it as it is. (numpy, not torch: torch's
            # reductions would start its thread pool against the decoding threads.)
            if int(ids.min()) >= 0 and int(ids.max()) < 256:
                return ids.astype(np.uint8), segments
        if not copied:
            ids = ids.copy()
        return ids, segments

    def _evaluate_one(
        self, image: dict, entry: GroundTruthEntry, pred_ids: np.ndarray, pred_segments: list
    ) -> tuple[PQStat, Optional[dict]]:
        """One queued image: its PQ counts, and its export."""
        image_id = image.get("image_id")
        prediction = None
        if self._output_dir is not None:
            try:
                prediction = PanopticResult.from_panoptic(pred_ids, pred_segments, self._metadata)
            except (KeyError, ValueError, TypeError) as e:
                raise type(e)(f"the output for image {image_id!r}: {e.args[0]}") from None
        segments = [
            {"id": int(s["id"]), "category_id": int(s["category_id"])} for s in pred_segments
        ]
        stat = _evaluate_image(
            entry.result(),
            image["segments_info"],
            pred_ids,
            segments,
            self._categories,
            VOID,
            image_id,
        )
        encoded = None if prediction is None else self._encode_prediction(image, prediction)
        return stat, encoded

    def _encode_prediction(self, inp: dict, prediction: PanopticResult) -> dict:
        """PNG bytes and COCO ``segments_info`` of one prediction (dataset category ids)."""
        pred = prediction.panoptic_seg
        if pred.size and int(pred.max()) >= OFFSET:
            raise ValueError(
                f"image {inp.get('image_id')!r}: predicted segment ids must be below 2^24 to "
                "be written as a COCO panoptic PNG"
            )
        png = encode_panoptic_png(pred, self._png_compression)
        segments = []
        for s in prediction.segments:
            segment = {
                "id": s.id,
                "category_id": int(self._categories[s.category_id]["id"]),
                "iscrowd": 0,
                "area": s.area,
                "bbox": s.bbox_xywh,
            }
            if s.score is not None:
                segment["score"] = s.score
            if s.caption:
                segment["caption"] = s.caption
            segments.append(segment)
        stem = os.path.splitext(os.path.basename(str(inp.get("file_name", inp.get("image_id")))))[0]
        return {
            "image_id": inp.get("image_id"),
            "stem": stem,
            "png": png,
            "segments_info": segments,
        }

    def evaluate(self) -> Optional[dict]:
        try:
            self._drain(0)
        finally:
            if self._owns_reader:
                self._ground_truth.close()
        if comm.get_world_size() > 1:
            comm.synchronize()
            stats = comm.gather(self._pq_stat)
            counts = comm.gather(self._num_images)
            predictions = comm.gather(self._predictions)
            if not comm.is_main_process():
                return None
            pq_stat = PQStat()
            for s in stats:
                pq_stat += s
            num_images = sum(counts)
            predictions = [p for part in predictions for p in part]
        else:
            pq_stat, num_images, predictions = self._pq_stat, self._num_images, self._predictions

        if num_images == 0:
            logger.warning("%s: no image was processed; no PQ to report", self._dataset_name)
            return {}
        if self._output_dir is not None:
            self._export(predictions)
        return {"panoptic_seg": self._summarize(pq_stat, num_images)}

    def _summarize(self, pq_stat: PQStat, num_images: int) -> OrderedDict:
        res: OrderedDict = OrderedDict()
        groups = [("All", None, ""), ("Things", True, "_th"), ("Stuff", False, "_st")]
        table = []
        per_class: dict = {}
        for label, isthing, suffix in groups:
            avg, classes = pq_stat.pq_average(self._categories, isthing=isthing)
            if isthing is None:
                per_class = classes
            if avg["n"] == 0:
                # No category of this group occurs: there is nothing to average.
                values = {"PQ": float("nan"), "SQ": float("nan"), "RQ": float("nan")}
            else:
                values = {"PQ": 100 * avg["pq"], "SQ": 100 * avg["sq"], "RQ": 100 * avg["rq"]}
            for metric, value in values.items():
                res[metric + suffix] = value
            table.append([label, values["PQ"], values["SQ"], values["RQ"], avg["n"]])
        class_rows = []
        for category_id, info in self._categories.items():
            stat = pq_stat.pq_per_cat.get(category_id)
            if stat is None or stat.tp + stat.fp + stat.fn == 0:
                continue  # not evaluated: absent from both ground truth and predictions
            name = info.get("name", str(info.get("id", category_id)))
            values = per_class[category_id]
            res[f"PQ-{name}"] = 100 * values["pq"]
            class_rows.append(
                [name, 100 * values["pq"], 100 * values["sq"], 100 * values["rq"],
                 stat.tp, stat.fp, stat.fn]
            )
        logger.info(
            "Panoptic evaluation of %s (%d images):\n%s",
            self._dataset_name,
            num_images,
            _format_table(["", "PQ", "SQ", "RQ", "#categories"], table),
        )
        if class_rows:
            logger.info(
                "Per-category panoptic results:\n%s",
                _format_table(["category", "PQ", "SQ", "RQ", "TP", "FP", "FN"], class_rows),
            )
        return res

    def _export(self, predictions: list[dict]) -> None:
        """Write PNGs (each atomically) and then the JSON (atomically), so a JSON on disk
        always refers to complete PNGs."""
        png_dir = os.path.join(self._output_dir, "panoptic_predictions")
        os.makedirs(png_dir, exist_ok=True)
        stem_count: dict[str, int] = defaultdict(int)
        for p in predictions:
            stem_count[p["stem"]] += 1
        annotations = []
        for p in predictions:
            stem = p["stem"]
            if stem_count[stem] > 1:
                # Two images with one file stem (different folders): keep both by their id.
                stem = f"{p['image_id']}_{stem}"
            file_name = f"{stem}.png"
            atomic_write_bytes(os.path.join(png_dir, file_name), p["png"])
            annotations.append(
                {
                    "image_id": p["image_id"],
                    "file_name": file_name,
                    "segments_info": p["segments_info"],
                }
            )
        categories = [
            {
                "id": int(c["id"]),
                "name": c.get("name", str(c["id"])),
                "isthing": int(c["isthing"]),
                **({"color": list(c["color"])} if "color" in c else {}),
            }
            for c in self._categories.values()
        ]
        json_path = os.path.join(self._output_dir, "panoptic_predictions.json")
        data = json.dumps({"annotations": annotations, "categories": categories})
        atomic_write_bytes(json_path, data.encode("utf-8"))
        logger.info("Wrote %d panoptic predictions to %s", len(annotations), json_path)


# COCO panoptic datasets report PQ; "pix2cap" datasets combine it with dense-caption metrics
# (see pix2cap_evaluation.py).
EVALUATOR_REGISTRY.register(COCOPanopticEvaluator, aliases=("coco_panoptic_seg",))
