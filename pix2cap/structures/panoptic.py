"""One image's panoptic result as a typed view: an id map and its segments.

The model returns detectron2's form, ``{"panoptic_seg": (Int[H, W] ids, segments_info)}``, so
detectron2-style evaluators keep working. Everything that *reads* a result (the bridge, the
visualizer, the demo, the evaluators) goes through :class:`PanopticResult` instead of unpacking
that tuple itself::

    result = PanopticResult.from_model_output(outputs[0], metadata)
    for segment in result.segments:
        segment.name, segment.isthing, segment.box, segment.caption
    mask = result.mask(segment.id)                         # Bool [H, W]
    ids_rgb, segments_info = result.to_coco_panoptic(metadata)   # COCO panoptic form

Class names and thing/stuff come from ``metadata`` (:class:`pix2cap.data.Metadata`, whose
``class_name`` / ``is_thing`` answer them for a contiguous id); a segment's own ``isthing`` wins
when the producer set it. Without metadata a class is named ``"class <id>"`` and is a thing
only if the segment says so.

The COCO panoptic PNG encoding lives here too (:func:`id2rgb`, :func:`rgb2id`): one segment
id per pixel as ``R + 256 * G + 256^2 * B``, 0 = VOID.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Segment", "PanopticResult", "id2rgb", "rgb2id"]


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (RGB) -> int64 [H, W] segment ids, ``R + 256 * G + 256^2 * B``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb2id: expected an [H, W, 3] array, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    if rgb.dtype == np.uint8 and rgb.size:
        # Every panoptic PNG read goes through here, so avoid three int64 planes: 4 bytes read
        # little-endian from a pixel's R give R + 256 G + 256^2 B plus 2^24 times the next
        # pixel's R, which the mask drops (one padding byte keeps the last read in bounds).
        data = np.empty(rgb.size + 1, dtype=np.uint8)
        data[:-1] = rgb.reshape(-1)
        data[-1] = 0
        words = np.ndarray((height, width), dtype="<u4", buffer=data, strides=(3 * width, 3))
        ids = words.astype(np.int64)
        ids &= 0xFFFFFF
        return ids
    rgb = rgb.astype(np.int64, copy=False)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """int [H, W] segment ids -> uint8 [H, W, 3] (RGB), the inverse of :func:`rgb2id`."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"id2rgb: expected an [H, W] array, got shape {ids.shape}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 256**3):
        raise ValueError("id2rgb: segment ids must lie in [0, 256^3)")
    ids = ids.astype(np.int64, copy=False)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.generic)):
        return value.item()
    return value


def _class_name(metadata: Any, category_id: int) -> str:
    if metadata is not None and hasattr(metadata, "class_name"):
        return metadata.class_name(category_id)
    return f"class {category_id}"


def _is_thing(metadata: Any, category_id: int) -> bool:
    if metadata is not None and hasattr(metadata, "is_thing"):
        return metadata.is_thing(category_id)
    return False


@dataclass(frozen=True)
class Segment:
    """One segment of a panoptic result.

    Attributes:
        id: its value in the id map (> 0).
        category_id: contiguous class id.
        name: class name.
        isthing: a countable thing (True) or a stuff region.
        score: the model's confidence, or None (ground truth).
        box: tight box ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive; None when the
            segment has no pixel in the map.
        area: its pixel count in the map.
        caption: dense caption ("" if none).
        query_index: the decoder query it came from (its caption's source), or None.
        iscrowd: a crowd region (ground truth only).
    """

    id: int
    category_id: int
    name: str
    isthing: bool
    score: float | None = None
    box: tuple[int, int, int, int] | None = None
    area: int = 0
    caption: str = ""
    query_index: int | None = None
    iscrowd: bool = False

    @property
    def bbox_xywh(self) -> list[int]:
        """COCO ``[x, y, w, h]`` (zeros when the segment is empty)."""
        if self.box is None:
            return [0, 0, 0, 0]
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]


def _check_id_map(ids: np.ndarray) -> np.ndarray:
    """A 2-D, non-negative integer id map as int64 (no copy when it already is)."""
    if ids.ndim != 2:
        raise ValueError(f"panoptic_seg must be [H, W], got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"panoptic_seg must hold integer ids, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and int(ids.min()) < 0:
        raise ValueError("panoptic_seg holds negative ids")
    return ids


def _check_segment_ids(segment_ids: Sequence[int]) -> None:
    """Segment ids must be distinct and not VOID (0)."""
    if len(set(segment_ids)) != len(segment_ids):
        repeated = sorted({i for i in segment_ids if list(segment_ids).count(i) > 1})
        raise ValueError(f"segment id(s) {repeated} are listed more than once")
    if 0 in segment_ids:
        raise ValueError("a segment has id 0, the VOID id of the map")


def _boxes_and_areas(ids: np.ndarray, segment_ids: Sequence[int]) -> dict[int, tuple]:
    """``{segment id: (box or None, area)}`` of distinct ids on an int64 [H, W] map, from
    three ``np.bincount`` calls over the pixels (linear time, whatever the number of
    segments)."""
    out: dict[int, tuple] = {int(s): (None, 0) for s in segment_ids}
    if not out or ids.size == 0:
        return out
    keys = np.fromiter(out, dtype=np.int64, count=len(out))
    num = len(keys)
    max_id = int(ids.max())
    if max_id <= 1 << 16:
        # Small ids (a model's 1..N): a lookup table indexed by the id itself.
        lut = np.full(max_id + 1, num, dtype=np.int64)
        inside = keys <= max_id
        lut[keys[inside]] = np.nonzero(inside)[0]
        position = lut[ids]
    else:
        # COCO's colour ids reach 2^24: a binary search over the few segment ids.
        order = np.argsort(keys)
        where = np.minimum(np.searchsorted(keys[order], ids), num - 1)
        position = np.where(keys[order][where] == ids, order[where], num)
    height, width = ids.shape
    bins = num + 1
    areas = np.bincount(position.ravel(), minlength=bins)[:num]
    rows = np.bincount(
        (np.arange(height)[:, None] * bins + position).ravel(), minlength=height * bins
    ).reshape(height, bins)[:, :num] > 0
    cols = np.bincount(
        (np.arange(width)[None, :] * bins + position).ravel(), minlength=width * bins
    ).reshape(width, bins)[:, :num] > 0
    y0, x0 = rows.argmax(axis=0), cols.argmax(axis=0)
    y1, x1 = height - rows[::-1].argmax(axis=0), width - cols[::-1].argmax(axis=0)
    for k, seg_id in enumerate(keys.tolist()):
        if areas[k]:
            out[seg_id] = ((int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])), int(areas[k]))
    return out


@dataclass(eq=False)
class PanopticResult:
    """One image's panoptic result (module docstring).

    Attributes:
        panoptic_seg: int64 ndarray [H, W], segment id per pixel, 0 = VOID.
        segments: one :class:`Segment` per entry of the producer's ``segments_info``, in its
            order (a segment listed but absent from the map has ``area`` 0 and no box).

    Raises (on construction): ValueError for a map that is not 2-D or holds negative ids, and
    for segment ids that repeat or are 0 (VOID); TypeError for a non-integer map.
    """

    panoptic_seg: np.ndarray
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.panoptic_seg = _check_id_map(np.asarray(self.panoptic_seg))
        self.segments = list(self.segments)
        _check_segment_ids([s.id for s in self.segments])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PanopticResult):
            return NotImplemented
        return self.segments == other.segments and np.array_equal(
            self.panoptic_seg, other.panoptic_seg
        )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_panoptic(
        cls,
        panoptic_seg: Any,
        segments_info: Sequence[Mapping],
        metadata: Any = None,
        *,
        caption_key: str = "caption",
    ) -> "PanopticResult":
        """From detectron2's ``(panoptic_seg, segments_info)`` (tensors on any device, or
        numpy). Each dict needs ``id`` and ``category_id`` (contiguous); ``isthing``,
        ``score``, ``iscrowd``, ``query_index`` and the caption (``caption_key``: ``caption``
        for predictions, ``description`` for Pix2Cap-COCO ground truth) are read when present.
        Boxes and areas are measured on the map.

        Raises:
            KeyError: a segment dict lacks ``id`` or ``category_id``.
            ValueError / TypeError: as the constructor, or ``segments_info`` is None.
        """
        if segments_info is None:
            raise ValueError("segments_info is None; a panoptic result needs the segment list")
        seg = _check_id_map(_to_numpy(panoptic_seg))
        for k, info in enumerate(segments_info):
            for key in ("id", "category_id"):
                if key not in info:
                    raise KeyError(f"segments_info[{k}] has no {key!r} (keys: {sorted(info)})")
        segment_ids = [int(_scalar(s["id"])) for s in segments_info]
        _check_segment_ids(segment_ids)
        geometry = _boxes_and_areas(seg, segment_ids)
        segments = []
        for info in segments_info:
            seg_id = int(_scalar(info["id"]))
            category_id = int(_scalar(info["category_id"]))
            isthing = info.get("isthing")
            score = info.get("score")
            query = info.get("query_index")
            box, area = geometry[seg_id]
            segments.append(
                Segment(
                    id=seg_id,
                    category_id=category_id,
                    name=_class_name(metadata, category_id),
                    isthing=_is_thing(metadata, category_id)
                    if isthing is None
                    else bool(_scalar(isthing)),
                    score=None if score is None else float(_scalar(score)),
                    box=box,
                    area=area,
                    caption=str(info.get(caption_key) or ""),
                    query_index=None if query is None else int(_scalar(query)),
                    iscrowd=bool(_scalar(info.get("iscrowd", 0))),
                )
            )
        return cls(seg, segments)

    @classmethod
    def from_model_output(cls, output: Mapping, metadata: Any = None) -> "PanopticResult":
        """From one image's model output ``{"panoptic_seg": (ids, segments_info), ...}``."""
        if "panoptic_seg" not in output:
            raise KeyError(
                f"the model output has no 'panoptic_seg' (keys: {sorted(output)}); "
                "a panoptic result needs a panoptic model (MODEL.MASK_FORMER.TEST.PANOPTIC_ON)"
            )
        panoptic_seg, segments_info = output["panoptic_seg"]
        return cls.from_panoptic(panoptic_seg, segments_info, metadata)

    @classmethod
    def from_coco_panoptic(
        cls,
        panoptic: np.ndarray,
        segments_info: Sequence[Mapping],
        metadata: Any,
        *,
        caption_key: str = "caption",
    ) -> "PanopticResult":
        """From COCO panoptic form: the PNG's pixels (uint8 [H, W, 3] RGB, or the decoded
        int [H, W] ids) and an annotation's ``segments_info`` whose ``category_id`` is the
        *dataset* id, mapped to contiguous ids by ``metadata``'s
        ``stuff_dataset_id_to_contiguous_id`` (every class) or
        ``thing_dataset_id_to_contiguous_id``."""
        ids = rgb2id(panoptic) if np.asarray(panoptic).ndim == 3 else np.asarray(panoptic)
        to_contiguous = _dataset_to_contiguous(metadata)
        infos = []
        for info in segments_info:
            dataset_id = int(info["category_id"])
            if dataset_id not in to_contiguous:
                raise KeyError(
                    f"category id {dataset_id} of segment {info.get('id')} is not in the "
                    f"metadata of {getattr(metadata, 'name', 'the dataset')}"
                )
            infos.append({**info, "category_id": to_contiguous[dataset_id]})
        return cls.from_panoptic(ids, infos, metadata, caption_key=caption_key)

    # -- access --------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the map."""
        return int(self.panoptic_seg.shape[0]), int(self.panoptic_seg.shape[1])

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self):
        return iter(self.segments)

    def segment(self, segment_id: int) -> Segment:
        """The segment with id ``segment_id``."""
        for s in self.segments:
            if s.id == int(segment_id):
                return s
        raise KeyError(f"no segment with id {segment_id} (ids: {[s.id for s in self.segments]})")

    def mask(self, segment_id: int) -> np.ndarray:
        """Bool [H, W]: the pixels of segment ``segment_id``."""
        return self.panoptic_seg == int(segment_id)

    def filter(self, min_score: float) -> "PanopticResult":
        """The result without the segments scoring below ``min_score`` (their pixels become
        VOID); segments without a score are kept."""
        dropped = [s.id for s in self.segments if s.score is not None and s.score < min_score]
        if not dropped:
            return self
        seg = self.panoptic_seg.copy()
        seg[np.isin(seg, dropped)] = 0
        dropped_ids = set(dropped)
        return PanopticResult(seg, [s for s in self.segments if s.id not in dropped_ids])

    def segments_info(self) -> list[dict]:
        """detectron2's ``segments_info`` (contiguous ``category_id``) with every field."""
        return [
            {
                "id": s.id,
                "category_id": s.category_id,
                "category_name": s.name,
                "isthing": s.isthing,
                "score": s.score,
                "bbox": s.bbox_xywh,
                "area": s.area,
                "caption": s.caption,
                "query_index": s.query_index,
                "iscrowd": int(s.iscrowd),
            }
            for s in self.segments
        ]

    def to_coco_panoptic(self, metadata: Any) -> tuple[np.ndarray, list[dict]]:
        """COCO panoptic form: the PNG's pixels (uint8 [H, W, 3], :func:`id2rgb`) and
        ``segments_info`` with *dataset* category ids (``metadata``'s
        ``stuff_dataset_id_to_contiguous_id`` / ``thing_dataset_id_to_contiguous_id``
        inverted), ``bbox`` ``[x, y, w, h]``, ``area``, ``iscrowd``, ``isthing``, and
        ``caption`` / ``score`` / ``query_index`` where known. :meth:`from_coco_panoptic`
        reads it back into an equal result."""
        to_dataset = {v: k for k, v in _dataset_to_contiguous(metadata).items()}
        infos = []
        for s in self.segments:
            if s.category_id not in to_dataset:
                raise KeyError(
                    f"contiguous class {s.category_id} of segment {s.id} has no dataset id in "
                    f"the metadata of {getattr(metadata, 'name', 'the dataset')}"
                )
            info = {
                "id": s.id,
                "category_id": to_dataset[s.category_id],
                "iscrowd": int(s.iscrowd),
                "bbox": s.bbox_xywh,
                "area": s.area,
                "isthing": s.isthing,
            }
            if s.caption:
                info["caption"] = s.caption
            if s.score is not None:
                info["score"] = s.score
            if s.query_index is not None:
                info["query_index"] = s.query_index
            infos.append(info)
        return id2rgb(self.panoptic_seg), infos


def _dataset_to_contiguous(metadata: Any) -> dict[int, int]:
    """Dataset category id -> contiguous id, from detectron2's two metadata maps."""
    get = getattr(metadata, "get", None)
    if get is None:
        raise TypeError("COCO panoptic conversion needs dataset metadata (pix2cap.data.Metadata)")
    mapping = {int(k): int(v) for k, v in (get("stuff_dataset_id_to_contiguous_id") or {}).items()}
    mapping.update(
        {int(k): int(v) for k, v in (get("thing_dataset_id_to_contiguous_id") or {}).items()}
    )
    if not mapping:
        raise KeyError(
            f"the metadata of {getattr(metadata, 'name', 'the dataset')} maps no dataset "
            "category ids (stuff_dataset_id_to_contiguous_id / thing_dataset_id_to_contiguous_id)"
        )
    return mapping
