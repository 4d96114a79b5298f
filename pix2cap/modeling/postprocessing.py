"""Turning per-query class and mask predictions into panoptic, semantic and instance results.

The rules are Mask2Former's. For one image the decoder gives ``Q`` queries, each with class
logits ``[K + 1]`` (the last is "no object") and mask logits ``[h, w]``:

* :func:`panoptic_inference` keeps confident queries, lets every pixel pick the kept query
  with the largest ``score * mask probability``, drops queries that keep too little of their
  own mask, and merges all stuff queries of one class into one segment. It also says which
  query each segment came from, so only the segments that survive need a caption.
* :func:`semantic_inference` sums class probabilities weighted by mask probabilities.
* :func:`instance_inference` ranks (query, thing class) pairs and keeps the top ones.

Memory is bounded by the model's input, not by the original image. All three run at the
inference resolution ``(h, w)`` (the resized input the model saw, without its batch padding),
where ``Q`` float masks cost ``Q * h * w * 4`` bytes; upsampling every query's mask to a
12000 x 9000 photo first would take 8.6 GB for 20 queries. Only results are brought to the
original size ``(H, W)``: the panoptic id map by nearest pixel centre (:func:`resize_panoptic`),
the ``[K, h, w]`` semantic scores bilinearly, and the masks of the kept instances one query at
a time.
"""

from __future__ import annotations

from typing import Collection, NamedTuple, Optional

import torch
import torch.nn.functional as F

from pix2cap.structures import Instances, masks_to_boxes_xyxy

__all__ = [
    "PanopticPrediction",
    "instance_inference",
    "panoptic_inference",
    "resize_mask_logits",
    "resize_panoptic",
    "semantic_inference",
]


class PanopticPrediction(NamedTuple):
    """Output of :func:`panoptic_inference` for one image.

    Attributes:
        panoptic_seg: Int32[H, W] segment id per pixel; 0 = VOID (no segment).
        segments_info: one dict per segment, in id order: ``id`` (1, 2, ... as in
            ``panoptic_seg``), ``category_id`` (contiguous class index), ``isthing`` (bool),
            ``score`` (float: the highest class score among the queries merged into it) and
            ``bbox`` (``[x, y, w, h]`` ints, the tight box of the segment's pixels).
        query_indices: Long[S], for segment ``i`` the index of its highest-scoring query
            (where its caption comes from).
    """

    panoptic_seg: torch.Tensor
    segments_info: list
    query_indices: torch.Tensor


def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Bring the mask logits of one image from the decoder's 1/4 grid to an image size.

    Args:
        mask_logits: ``[Q, h, w]`` logits on the grid of the padded batch.
        padded_size: ``(H_pad, W_pad)`` of the padded batch tensor.
        image_size: ``(h_img, w_img)`` of this image inside the batch (before padding).
        output_size: ``(height, width)`` to resize to; None: ``image_size`` (the inference
            resolution, where inference merges; see the module docstring).

    Returns:
        ``[Q, height, width]`` float logits.
    """
    logits = mask_logits.float()[None]
    # Upsample the whole padded grid first: cropping on the 1/4 grid would cut through
    # cells that straddle the image border.
    logits = F.interpolate(logits, size=tuple(padded_size), mode="bilinear", align_corners=False)
    logits = logits[..., : image_size[0], : image_size[1]]
    if output_size is not None and tuple(output_size) != tuple(image_size):
        logits = F.interpolate(
            logits, size=tuple(output_size), mode="bilinear", align_corners=False
        )
    return logits[0]


def _nearest_sources(in_len: int, out_len: int, device: torch.device) -> torch.Tensor:
    """Long[out_len]: the input index each output index takes, by nearest pixel centre
    (torch's ``nearest-exact``, the centre alignment of ``align_corners=False`` bilinear).
    Non-decreasing, so each input index covers one run of output indices."""
    # floor((i + 0.5) * in / out) in integers: exact where the centre falls on a pixel edge.
    index = torch.arange(out_len, dtype=torch.long, device=device)
    return ((2 * index + 1) * in_len).div_(2 * out_len, rounding_mode="floor")


def _class_scores(mask_cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Q, K+1]`` logits -> (best score, best label) per query, no-object included."""
    return F.softmax(mask_cls.float(), dim=-1).max(dim=-1)


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    thing_ids: Collection[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    max_segments: int | None = None,
) -> PanopticPrediction:
    """Mask2Former's panoptic merge for one image.

    Args:
        mask_cls: ``[Q, K+1]`` class logits; index ``K`` is "no object".
        mask_pred: ``[Q, H, W]`` mask logits at the resolution to merge at: the inference
            resolution, whose result :func:`resize_panoptic` brings to the original size.
        thing_ids: contiguous ids of the thing classes (the others are stuff).
        object_mask_threshold: a query is kept when its best class is not no-object and its
            probability is above this.
        overlap_threshold: a kept query becomes (part of) a segment only when the pixels it
            wins cover at least this fraction of its own mask (probability >= 0.5).
        max_segments: keep at most this many queries (the highest-scoring); None: no cap.

    Returns:
        A :class:`PanopticPrediction`. Pixels no kept query wins stay 0 (VOID).
    """
    if mask_cls.dim() != 2 or mask_pred.dim() != 3 or mask_cls.shape[0] != mask_pred.shape[0]:
        raise ValueError(
            f"expected mask_cls [Q, K+1] and mask_pred [Q, H, W] with the same Q, got "
            f"{tuple(mask_cls.shape)} and {tuple(mask_pred.shape)}"
        )
    num_classes = mask_cls.shape[1] - 1
    height, width = mask_pred.shape[-2:]
    device = mask_pred.device
    thing_ids = {int(i) for i in thing_ids}

    scores, labels = _class_scores(mask_cls)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept_queries = keep.nonzero().flatten()
    if max_segments is not None and kept_queries.numel() > max_segments:
        top = scores[kept_queries].topk(max_segments).indices
        kept_queries = kept_queries[top.sort().values]

    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=device)
    segments_info: list[dict] = []
    segment_queries: list[int] = []
    if kept_queries.numel() == 0:
        return PanopticPrediction(panoptic_seg, segments_info, torch.zeros(0, dtype=torch.long))

    cur_scores = scores[kept_queries]
    cur_classes = labels[kept_queries]
    cur_masks = mask_pred[kept_queries].float().sigmoid()  # [N, H, W]
    # Each pixel goes to the kept query most confident about it, class score included.
    cur_mask_ids = (cur_scores[:, None, None] * cur_masks).argmax(dim=0)  # [H, W]

    stuff_segment_of_class: dict[int, int] = {}  # class -> index into segments_info
    for k in range(kept_queries.numel()):
        pred_class = int(cur_classes[k])
        score = float(cur_scores[k])
        isthing = pred_class in thing_ids
        own_mask = cur_masks[k] >= 0.5
        mask = (cur_mask_ids == k) & own_mask
        mask_area = int((cur_mask_ids == k).sum())
        original_area = int(own_mask.sum())
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue  # mostly hidden behind other queries: a duplicate or a poor mask
        if not isthing and pred_class in stuff_segment_of_class:
            index = stuff_segment_of_class[pred_class]
            panoptic_seg[mask] = segments_info[index]["id"]
            if score > segments_info[index]["score"]:
                segments_info[index]["score"] = score
                segment_queries[index] = int(kept_queries[k])
            continue
        segment_id = len(segments_info) + 1
        panoptic_seg[mask] = segment_id
        if not isthing:
            stuff_segment_of_class[pred_class] = len(segments_info)
        segments_info.append(
            {"id": segment_id, "category_id": pred_class, "isthing": isthing, "score": score}
        )
        segment_queries.append(int(kept_queries[k]))

    # Boxes come from the final map: a merged stuff segment grows as its queries join it.
    if segments_info:
        ids = torch.tensor([s["id"] for s in segments_info], device=device, dtype=torch.int32)
        boxes = masks_to_boxes_xyxy(panoptic_seg[None] == ids[:, None, None]).tolist()
        for info, (x1, y1, x2, y2) in zip(segments_info, boxes):
            info["bbox"] = [int(x1), int(y1), int(x2 - x1), int(y2 - y1)]
    return PanopticPrediction(
        panoptic_seg, segments_info, torch.tensor(segment_queries, dtype=torch.long)
    )


def resize_panoptic(
    prediction: PanopticPrediction, output_size: tuple[int, int]
) -> PanopticPrediction:
    """A panoptic prediction brought to another size, e.g. from the inference resolution to
    the original image.

    The id map is resized by nearest pixel centre: pixel ``(y, x)`` takes the small map's
    ``((y + 0.5) * h / H, (x + 0.5) * w / W)`` (rounded down), so segments keep their ids and
    no mixed labels appear on their borders. Only the result and an Int32[H, w] intermediate
    are allocated at the large size. Each segment's ``bbox`` is
    measured on the resized map: from the small map and the run of output pixels each of its
    rows and columns covers, which gives exactly the box of the segment's pixels in the resized
    map without a Bool[S, H, W] stack of full-size masks.

    Args:
        prediction: a :class:`PanopticPrediction` at ``(h, w)``.
        output_size: ``(H, W)``.

    Returns:
        ``prediction`` itself when it is already ``(H, W)``. Else a new prediction:
        ``panoptic_seg`` Int32[H, W]; ``segments_info`` new dicts (the same keys, ``bbox`` in
        the ``(H, W)`` frame) in the same order; ``query_indices`` to match. A segment with no
        pixel left at ``(H, W)`` (only when shrinking, for a part thinner than an output pixel)
        is left out of both, as the merge leaves out segments without pixels.
    """
    seg = prediction.panoptic_seg
    height, width = (int(v) for v in output_size)
    if (height, width) == tuple(seg.shape):
        return prediction
    device = seg.device
    rows = _nearest_sources(seg.shape[0], height, device)
    cols = _nearest_sources(seg.shape[1], width, device)
    resized = seg.index_select(0, rows).index_select(1, cols)
    if not prediction.segments_info:
        return PanopticPrediction(resized, [], prediction.query_indices)

    # The small map's rows and columns that the output samples ("used"), and the run of
    # output rows / columns each one fills: the resized map is the sampled grid with row i
    # repeated row_counts[i] times and column j col_counts[j] times.
    used_rows, row_counts = torch.unique_consecutive(rows, return_counts=True)
    used_cols, col_counts = torch.unique_consecutive(cols, return_counts=True)
    row_ends = torch.cumsum(row_counts, 0)
    col_ends = torch.cumsum(col_counts, 0)
    sampled = seg.index_select(0, used_rows).index_select(1, used_cols)  # [h', w'] <= [h, w]
    ids = torch.tensor(
        [int(info["id"]) for info in prediction.segments_info], dtype=seg.dtype, device=device
    )
    boxes = masks_to_boxes_xyxy(sampled[None] == ids[:, None, None]).long()  # sampled grid
    present = (boxes[:, 2] > boxes[:, 0]).tolist()
    # Exclusive ends: a box's last sampled row ends where that row's run ends.
    x1 = (col_ends - col_counts)[boxes[:, 0]].tolist()
    y1 = (row_ends - row_counts)[boxes[:, 1]].tolist()
    x2 = col_ends[(boxes[:, 2] - 1).clamp(min=0)].tolist()
    y2 = row_ends[(boxes[:, 3] - 1).clamp(min=0)].tolist()
    segments_info, queries = [], []
    for k, info in enumerate(prediction.segments_info):
        if not present[k]:
            continue
        segments_info.append(dict(info, bbox=[x1[k], y1[k], x2[k] - x1[k], y2[k] - y1[k]]))
        queries.append(int(prediction.query_indices[k]))
    return PanopticPrediction(resized, segments_info, torch.tensor(queries, dtype=torch.long))


def semantic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    output_size: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Per-class scores of every pixel.

    Args:
        mask_cls: ``[Q, K+1]`` class logits; mask_pred: ``[Q, h, w]`` mask logits.
        output_size: ``(H, W)``: the scores, computed at ``(h, w)``, are resized there
            (bilinear), so no per-query mask is made at ``(H, W)``; None: ``(h, w)``.

    Returns:
        ``[K, H, W]``: ``sum_q p_q(class) * sigmoid(mask_q)`` (no-object dropped).
    """
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    scores = torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())
    if output_size is not None and tuple(output_size) != tuple(scores.shape[-2:]):
        scores = F.interpolate(
            scores[None], size=tuple(output_size), mode="bilinear", align_corners=False
        )[0]
    return scores


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    thing_ids: Collection[int],
    max_detections: int = 100,
    output_size: Optional[tuple[int, int]] = None,
) -> Instances:
    """Top-scoring (query, thing class) pairs as instances.

    A query may appear once per thing class. The score of a pair is the class probability
    times the mean mask probability inside the binarised mask, both measured at the output
    size.

    Args:
        mask_cls: ``[Q, K+1]`` class logits; mask_pred: ``[Q, h, w]`` mask logits (at the
            inference resolution).
        thing_ids: contiguous ids of the thing classes (stuff classes are never returned).
        max_detections: at most this many instances.
        output_size: ``(H, W)`` of the returned masks; None: ``(h, w)``. Only the queries of
            the kept pairs are upsampled (bilinear logits, as :func:`resize_mask_logits`), one
            at a time: at ``(H, W)`` this allocates the returned Bool[N, H, W], one Bool mask
            per distinct kept query and one Float[H, W].

    Returns:
        ``Instances`` of image size ``(H, W)`` with ``pred_masks`` Bool[N, H, W],
        ``pred_boxes`` Float[N, 4] (XYXY, absolute), ``scores`` Float[N], ``pred_classes``
        Long[N] (contiguous ids) and ``query_indices`` Long[N]; sorted by score.
    """
    height, width = output_size if output_size is not None else mask_pred.shape[-2:]
    height, width = int(height), int(width)
    device = mask_pred.device
    thing_classes = torch.tensor(sorted(int(i) for i in thing_ids), dtype=torch.long, device=device)
    result = Instances((height, width))
    probs = F.softmax(mask_cls.float(), dim=-1)[:, thing_classes]  # [Q, T]
    num_pairs = probs.numel()
    k = min(max_detections, num_pairs)
    if k == 0:
        result.pred_masks = torch.zeros((0, height, width), dtype=torch.bool, device=device)
        result.pred_boxes = torch.zeros((0, 4), device=device)
        result.scores = torch.zeros(0, device=device)
        result.pred_classes = torch.zeros(0, dtype=torch.long, device=device)
        result.query_indices = torch.zeros(0, dtype=torch.long, device=device)
        return result
    class_scores, flat_index = probs.flatten().topk(k)
    query_index = flat_index // thing_classes.numel()
    classes = thing_classes[flat_index % thing_classes.numel()]
    # A query kept for several classes has one mask: compute it once per distinct query.
    queries, pair_query = torch.unique(query_index, return_inverse=True)
    masks = torch.empty((queries.numel(), height, width), dtype=torch.bool, device=device)
    mask_scores = torch.empty(queries.numel(), device=device)
    boxes = torch.empty((queries.numel(), 4), device=device)
    for i, q in enumerate(queries.tolist()):
        logits = mask_pred[q].float()
        if tuple(logits.shape) != (height, width):
            logits = F.interpolate(
                logits[None, None], size=(height, width), mode="bilinear", align_corners=False
            )[0, 0]
        mask_prob = logits.sigmoid_()
        masks[i] = mask_prob > 0.5
        mask_scores[i] = (mask_prob * masks[i]).sum() / (masks[i].sum() + 1e-6)
        boxes[i] = masks_to_boxes_xyxy(masks[i][None])[0]
    scores = class_scores * mask_scores[pair_query]
    order = scores.argsort(descending=True)
    pick = pair_query[order]
    result.pred_masks = masks[pick]
    result.pred_boxes = boxes[pick]
    result.scores = scores[order]
    result.pred_classes = classes[order]
    result.query_indices = query_index[order]
    return result
