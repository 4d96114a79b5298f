"""Set-prediction losses of Pix2Cap: classification, mask and caption losses on matched queries.

The structure follows Mask2Former's ``SetCriterion``: the matcher assigns queries to targets
for the final prediction and, separately, for each auxiliary (earlier decoder layer)
prediction; every loss in ``losses`` is looked up in a dispatch table and computed on those
matches; per-layer losses get the suffix ``_{i}`` (``i`` = index in ``aux_outputs``).
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .caption_head.scene_memory import SceneContext, mask_pool
from .mask_losses import dice_loss, point_mask_losses, sigmoid_ce_loss

__all__ = [
    "BatchTargets",
    "Matching",
    "SetCriterion",
    "dice_loss",
    "point_mask_losses",
    "sigmoid_ce_loss",
]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def _accepts(fn: Optional[Callable], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Matching(list):
    """A matcher's per-image ``(pred_idx, tgt_idx)`` pairs (host tensors), with their flat
    form on the device computed once and shared by every loss of the layer."""

    _flat: Optional[Tuple[torch.Tensor, ...]] = None


class BatchTargets:
    """The criterion's targets with what every layer's losses read, computed once per forward:
    the labels (and masks, caption tokens) of all images concatenated on the device, and on
    the host which targets have a caption to learn. Indexing and iteration give the per-image
    dicts."""

    def __init__(self, targets: List[Dict[str, torch.Tensor]], device, pad_token_id: int = 0):
        self.targets = targets
        self.device = device
        self.pad_token_id = pad_token_id
        self.sizes = [int(t["labels"].shape[0]) for t in targets]
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self._labels: Optional[torch.Tensor] = None
        self._masks: Optional[torch.Tensor] = None
        self._tokens: Optional[torch.Tensor] = None
        self._captioned: Optional[List[Optional[List[bool]]]] = None
        self._pixel_key: Optional[tuple] = None
        self._pixel_maps: List[Tuple[torch.Tensor, ...]] = []
        self._pooled: Dict[int, List[torch.Tensor]] = {}

    def __getitem__(self, index):
        return self.targets[index]

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self):
        return iter(self.targets)

    @property
    def labels(self) -> torch.Tensor:
        """Long[sum M], every image's labels in order."""
        if self._labels is None:
            self._labels = torch.cat(
                [t["labels"].to(self.device, non_blocking=True) for t in self.targets]
            )
        return self._labels

    @property
    def masks(self) -> torch.Tensor:
        """[sum M, H, W] every image's masks in order (their own dtype), zero-padded at the
        bottom/right to the largest when images carry masks of different sizes."""
        if self._masks is None:
            masks = [t["masks"].to(self.device, non_blocking=True) for t in self.targets]
            max_h = max(m.shape[-2] for m in masks)
            max_w = max(m.shape[-1] for m in masks)
            masks = [
                m
                if m.shape[-2:] == (max_h, max_w)
                else F.pad(m.float(), (0, max_w - m.shape[-1], 0, max_h - m.shape[-2]))
                for m in masks
            ]
            self._masks = torch.cat(masks)
        return self._masks

    @property
    def tokens(self) -> torch.Tensor:
        """Long[sum M, T] every image's caption tokens (images without: [PAD] rows), padded to
        the longest."""
        if self._tokens is None:
            width = max(
                (t["caption_tokens"].shape[1] for t in self.targets if "caption_tokens" in t),
                default=2,
            )
            rows = []
            for t, n in zip(self.targets, self.sizes):
                tokens = t.get("caption_tokens")
                if tokens is None:
                    tokens = torch.full((n, width), self.pad_token_id, dtype=torch.long)
                tokens = tokens.to(self.device, non_blocking=True)
                rows.append(F.pad(tokens, (0, width - tokens.shape[1]), value=self.pad_token_id))
            self._tokens = torch.cat(rows)
        return self._tokens

    def image_pixel_maps(
        self, pixel_features: Sequence[torch.Tensor]
    ) -> List[Tuple[torch.Tensor, ...]]:
        """``pixel_features`` (``[B, C_l, h_l, w_l]`` per level, the same tensors for every
        layer of one forward) split into images once: per level, B maps ``[C_l, h_l, w_l]``.
        The backward then adds the images' gradients into one buffer per level, instead of a
        zero-filled full-batch buffer per image and captioned layer."""
        key = tuple(id(level) for level in pixel_features)
        if self._pixel_key != key:
            self._pixel_key = key
            self._pixel_maps = [level.unbind(0) for level in pixel_features]
            self._pooled = {}
        return self._pixel_maps

    def pooled_pixel_features(
        self, index: int, pixel_features: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """Image ``index``'s target masks' mean pixel features, ``[M, C_l]`` per level of
        ``pixel_features`` (``mask_pool`` of its masks): pooled once per forward, not once per
        captioned layer."""
        maps = self.image_pixel_maps(pixel_features)
        if index not in self._pooled:
            masks = self.targets[index]["masks"].to(self.device, non_blocking=True).float()
            self._pooled[index] = [mask_pool(masks, level[index]) for level in maps]
        return self._pooled[index]

    def captioned(self) -> List[Optional[List[bool]]]:
        """Per image (None without ``caption_tokens``), on the host: whether each target has a
        caption to learn (more than [CLS] [SEP], and ``caption_valid``).

        Read from the targets' host-side ``captioned`` when given (``Pix2Cap.prepare_targets``
        computes it before the tokens go to the device); otherwise computed from the tokens,
        with one device-to-host copy for the batch when they are on the device.
        """
        if self._captioned is None:
            flags = []
            for t in self.targets:
                if "caption_tokens" not in t:
                    flags.append(None)
                elif "captioned" in t:
                    flags.append(torch.as_tensor(t["captioned"], dtype=torch.bool))
                else:
                    tokens = t["caption_tokens"]
                    # [CLS] [SEP] alone (an empty description) is no caption to learn.
                    valid = (tokens != self.pad_token_id).sum(1) > 2
                    if "caption_valid" in t:
                        valid &= t["caption_valid"].to(
                            device=valid.device, dtype=torch.bool, non_blocking=True
                        )
                    flags.append(valid)
            on_device = [f for f in flags if f is not None and f.device.type != "cpu"]
            if on_device:  # one copy for the batch
                host = iter(torch.cat(on_device).cpu().split([len(f) for f in on_device]))
            self._captioned = [
                None if f is None else (next(host) if f.device.type != "cpu" else f).tolist()
                for f in flags
            ]
        return self._captioned


TargetsLike = Union[List[Dict[str, torch.Tensor]], BatchTargets]


CaptionLossFn = Callable[..., torch.Tensor]
# (query_feats [n, D], mask_probs [n, h, w], pixel_maps [C_l, h_l, w_l] each,
#  captioned Long[m], window Float[4] or None) -> SceneContext of the m captioned objects
SceneFn = Callable[..., SceneContext]
# Outputs that are the same for every decoder layer; given once, shared by the aux layers.
_SHARED_OUTPUTS = ("global_features", "pixel_features", "grid_window")


class SetCriterion(nn.Module):
    """Hungarian-matched losses with deep supervision.

    ``forward`` returns the *unweighted* losses (as in Mask2Former); multiply by
    :meth:`loss_weight` (or call :meth:`weighted`) to get the training objective. Losses not
    named in ``weight_dict`` (not even by their un-suffixed name) get no weight there.

    Loss keys: ``loss_ce`` ("labels"), ``loss_mask`` and ``loss_dice`` ("masks"),
    ``loss_caption`` ("captions"); the same with ``_{i}`` for ``outputs["aux_outputs"][i]``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "masks", "captions"),
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        caption_loss_fn: Optional[CaptionLossFn] = None,
        num_caption_layers: Optional[int] = None,
        caption_pad_token_id: int = 0,
        caption_scene_fn: Optional[SceneFn] = None,
        caption_scene_masks: str = "target",
    ):
        """
        Args:
            num_classes: K, number of categories (without no-object).
            matcher: module computing the query/target assignment (``HungarianMatcher``).
            weight_dict: loss name -> weight, by full key (``loss_ce_3``) or base name
                (``loss_ce``), e.g. ``{"loss_ce": 2, "loss_mask": 5, "loss_dice": 5,
                "loss_caption": 0.1}``.
            eos_coef: classification weight of the no-object class.
            losses: names of the losses to compute, keys of the dispatch table.
            num_points: points per mask for the mask losses.
            oversample_ratio, importance_sample_ratio: importance sampling of those points.
            caption_loss_fn: ``(query_feats [m, D], global_feats [m, Dg] or None,
                tokens Long[m, T]) -> scalar``, usually ``DenseCaptionHead.loss``. A plain
                callable, not a submodule, so the head's parameters belong to the model once.
                One that takes ``has_targets=`` is told True (every row it gets has a
                caption).
            num_caption_layers: compute the caption loss on the last this many predictions
                only (the final one counts as one); None: on all of them.
            caption_pad_token_id: padding id of ``caption_tokens``, to tell empty captions.
            caption_scene_fn: for a scene-memory caption head, its ``scene_context`` (given
                ``boxes=`` too when it takes them and the targets carry ``scene_boxes``): the
                caption loss then also passes ``scene=`` (a ``SceneContext``) to
                ``caption_loss_fn``, built per image from the matched queries (the other
                objects of a captioned query are the other matched queries of its image),
                their masks and ``outputs["pixel_features"]``. None: the paper's two-token
                memory.
            caption_scene_masks: the masks the scene is built from in training: "target"
                (the matched ground-truth masks: boxes and pooling regions are right from the
                first step, as the caption tokens are, and the head learns what a place or a
                size means without the mask head's early noise) or "predicted" (the matched
                queries' masks, as at inference).
        """
        if caption_scene_masks not in ("target", "predicted"):
            raise ValueError(
                f"caption_scene_masks must be 'target' or 'predicted', got {caption_scene_masks!r}"
            )
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        unknown = [name for name in self.losses if name not in self._loss_map()]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from {sorted(self._loss_map())}")
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.caption_loss_fn = caption_loss_fn
        self.num_caption_layers = num_caption_layers
        self.caption_pad_token_id = caption_pad_token_id
        self.caption_scene_fn = caption_scene_fn
        self.caption_scene_masks = caption_scene_masks
        self._scene_takes_boxes = _accepts(caption_scene_fn, "boxes")
        self._scene_takes_pooled = _accepts(caption_scene_fn, "pooled")
        # Every row the caption loss gets has a caption, known on the host: a loss that can be
        # told so need not read its tokens back from the device.
        self._caption_loss_extra = (
            {"has_targets": True} if _accepts(caption_loss_fn, "has_targets") else {}
        )

        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Not persistent: a constant of the loss, it has no place in checkpoints.
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # -----------------------------------------------------------------------------------------
    # Individual losses: (outputs, targets, indices, num_masks) -> dict of scalar tensors
    # -----------------------------------------------------------------------------------------
    def loss_labels(self, outputs, targets: TargetsLike, indices: Indices, num_masks: float):
        """Cross-entropy over K+1 classes; unmatched queries are trained towards no-object."""
        src_logits = outputs["pred_logits"].float()  # [B, Q, K+1]
        batch = self._batch(targets, src_logits.device)
        batch_idx, src_idx, _, tgt_flat = self._flat_indices(indices, batch)
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        if batch_idx.numel() > 0:
            target_classes[batch_idx, src_idx] = batch.labels[tgt_flat]
        loss_ce = F.cross_entropy(
            src_logits.transpose(1, 2), target_classes, self.empty_weight.to(src_logits.dtype)
        )
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs, targets: TargetsLike, indices: Indices, num_masks: float):
        """Sigmoid BCE and dice on importance-sampled points of the matched masks."""
        pred_masks = outputs["pred_masks"]  # [B, Q, h, w]
        batch = self._batch(targets, pred_masks.device)
        batch_idx, src_idx, _, tgt_flat = self._flat_indices(indices, batch)
        if batch_idx.numel() == 0:
            # Keep the graph (and every key) alive for a batch without any segment.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src_masks = pred_masks[batch_idx, src_idx]  # [m, h, w]
        target_masks = batch.masks[tgt_flat].to(torch.float32)  # [m, H, W]
        loss_mask, loss_dice = point_mask_losses(
            src_masks,
            target_masks,
            num_masks,
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
        )
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def loss_captions(self, outputs, targets: TargetsLike, indices: Indices, num_masks: float):
        """Caption loss of the queries matched to segments that have a caption.

        Which matched targets have a caption is known on the host (``BatchTargets.captioned``)
        and the matching is on the host: the captioned rows are chosen there and gathered on
        the device with one index copy, without reading the device.
        """
        query_features = outputs["query_features"]  # [B, Q, D]
        global_features = outputs.get("global_features")  # [B, Dg] or None
        device = query_features.device
        batch = self._batch(targets, device)
        captioned = batch.captioned()
        # Per captioned row: image, query, target (flat), and its position among the image's
        # matched pairs (for the scene); per image the rows' range and the tokens' width.
        rows: List[List[int]] = [[], [], [], []]
        images, widths = [], []
        for b, (src, tgt) in enumerate(indices):
            if captioned[b] is None or src.numel() == 0:
                continue
            flags = captioned[b]
            tgt_list = tgt.tolist()
            keep = [k for k, j in enumerate(tgt_list) if flags[j]]
            if not keep:
                continue
            src_list = src.tolist()
            images.append((b, len(rows[0]), len(keep)))
            widths.append(int(batch[b]["caption_tokens"].shape[1]))
            rows[0] += [b] * len(keep)
            rows[1] += [src_list[k] for k in keep]
            rows[2] += [batch.offsets[b] + tgt_list[k] for k in keep]
            rows[3] += keep
        if not images:
            return {"loss_caption": query_features.sum() * 0.0}

        packed = torch.as_tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        image_idx, query_idx, tgt_flat, positions = packed
        feats = query_features[image_idx, query_idx]
        tokens = batch.tokens[tgt_flat][:, : max(widths)]
        globals_ = global_features[image_idx] if global_features is not None else None
        if self.caption_scene_fn is None:
            return {
                "loss_caption": self.caption_loss_fn(
                    feats, globals_, tokens, **self._caption_loss_extra
                )
            }
        _, flat_src, tgt_local, _ = self._flat_indices(indices, batch)
        starts = self._image_starts(indices)
        scenes = []
        for b, first, count in images:
            lo, hi = starts[b], starts[b + 1]
            scenes.append(
                self._scene(
                    outputs,
                    batch,
                    b,
                    flat_src[lo:hi],
                    tgt_local[lo:hi],
                    positions[first : first + count],
                )
            )
        scene = SceneContext.cat(scenes)
        loss = self.caption_loss_fn(feats, globals_, tokens, scene=scene, **self._caption_loss_extra)
        return {"loss_caption": loss}

    def _scene(
        self, outputs, batch: BatchTargets, b: int, src: torch.Tensor, tgt: torch.Tensor,
        captioned,
    ) -> SceneContext:
        """Scene facts of image ``b``'s matched queries ``src`` (segments ``tgt``; both on the
        device) at positions ``captioned``."""
        if "pixel_features" not in outputs:
            raise KeyError("a scene-memory caption loss needs outputs['pixel_features']")
        target = batch[b]
        extra = {}
        if self.caption_scene_masks == "target":
            mask_probs = target["masks"][tgt]  # [n, H, W], the padded image grid
            if "scene_boxes" in target and self._scene_takes_boxes:
                # Boxes measured on the host from the ground truth (Pix2Cap.prepare_targets):
                # the scene needs no connected components of device masks.
                extra["boxes"] = target["scene_boxes"][tgt]
            if self._scene_takes_pooled:
                pooled = batch.pooled_pixel_features(b, outputs["pixel_features"])
                extra["pooled"] = [level[tgt] for level in pooled]
        else:
            mask_probs = outputs["pred_masks"][b, src].detach().float().sigmoid()
        window = outputs["grid_window"][b] if "grid_window" in outputs else None
        return self.caption_scene_fn(
            outputs["query_features"][b, src],
            mask_probs,
            [level[b] for level in batch.image_pixel_maps(outputs["pixel_features"])],
            captioned,
            window=window,
            **extra,
        )

    def _loss_map(self):
        return {
            "labels": self.loss_labels,
            "masks": self.loss_masks,
            "captions": self.loss_captions,
        }

    def get_loss(self, loss: str, outputs, targets, indices: Indices, num_masks: float):
        return self._loss_map()[loss](outputs, targets, indices, num_masks)

    # -----------------------------------------------------------------------------------------
    def forward(
        self,
        outputs: Dict,
        targets: List[Dict[str, torch.Tensor]],
        final_indices: Optional[Indices] = None,
    ) -> Dict[str, torch.Tensor]:
        """Compute the losses of the final prediction and of every auxiliary prediction.

        Args:
            outputs: ``"pred_logits"`` [B, Q, K+1], ``"pred_masks"`` [B, Q, h, w],
                ``"query_features"`` [B, Q, D] (for captions), optionally
                ``"global_features"`` [B, Dg], ``"pixel_features"`` (pixel-decoder levels
                ``[B, C_l, h_l, w_l]``, for a scene-memory caption loss), ``"grid_window"``
                Float[B, 4] (where each padded grid lies in its original image) and
                ``"aux_outputs"``: a list of dicts with the same per-layer keys, earliest
                layer first.
            targets: B dicts: ``"labels"`` Long[M], ``"masks"`` [M, H, W], optionally
                ``"caption_tokens"`` Long[M, T] (row m captions segment m) and
                ``"caption_valid"`` Bool[M]; and, computed on the host so that no loss has
                to read the device: ``"captioned"`` host Bool[M] (the segment has a caption to
                learn: more than [CLS] [SEP], and ``caption_valid``) and ``"scene_boxes"``
                [M, 6] (the masks' scene boxes, ``scene_memory.mask_boxes(masks, window,
                largest_part=True)``, for a scene memory built from the target masks).
            final_indices: the final prediction's matching, when the caller has made it
                (``self.matcher`` of ``outputs`` without ``"aux_outputs"``, as this method
                would, so that other losses can share it); None: matched here.

        Host synchronisations: one per matcher call (its cost matrices), none in the losses.

        Returns:
            name -> scalar tensor, unweighted.
        """
        aux_outputs = outputs.get("aux_outputs") or []
        device = outputs["pred_logits"].device
        num_masks = self._num_masks(targets, device)
        first_caption_layer = self._first_caption_layer(len(aux_outputs))
        # Concatenated once, read by every layer's losses.
        batch = BatchTargets(targets, device, self.caption_pad_token_id)

        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses: Dict[str, torch.Tensor] = {}
        if final_indices is None:
            final_indices = self.matcher(final, targets)
        indices = Matching(final_indices)
        for loss in self._losses_for_layer(final, len(aux_outputs), first_caption_layer):
            losses.update(self.get_loss(loss, final, batch, indices, num_masks))

        for i, aux in enumerate(aux_outputs):
            # The global token and pixel features are the same for every layer; given once.
            shared = {k: outputs[k] for k in _SHARED_OUTPUTS if k in outputs and k not in aux}
            if shared:
                aux = {**aux, **shared}
            indices = Matching(self.matcher(aux, targets))
            for loss in self._losses_for_layer(aux, i, first_caption_layer):
                l_dict = self.get_loss(loss, aux, batch, indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses

    # -----------------------------------------------------------------------------------------
    # Weights
    # -----------------------------------------------------------------------------------------
    def loss_weight(self, key: str) -> Optional[float]:
        """Weight of a loss key: its own entry in ``weight_dict`` or that of its base name."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        return self.weight_dict.get(re.sub(r"_\d+$", "", key))

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The weighted losses; keys without a weight are dropped."""
        out = {}
        for key, value in losses.items():
            weight = self.loss_weight(key)
            if weight is not None:
                out[key] = value * weight
        return out

    # -----------------------------------------------------------------------------------------
    # Helpers
    # -----------------------------------------------------------------------------------------
    def _first_caption_layer(self, num_aux: int) -> int:
        """Index (in the numbering final = ``num_aux``) of the earliest captioned layer."""
        if self.num_caption_layers is None:
            return 0
        return num_aux + 1 - self.num_caption_layers

    def _losses_for_layer(self, layer_outputs, layer_index: int, first_caption_layer: int):
        for loss in self.losses:
            if loss == "captions" and (
                self.caption_loss_fn is None
                or "query_features" not in layer_outputs
                or layer_index < first_caption_layer
            ):
                continue
            yield loss

    @staticmethod
    def _num_masks(targets, device) -> Union[float, torch.Tensor]:
        """Average number of target masks per process (at least 1), the loss normaliser.

        A float (known on the host) in a single process; under ``torch.distributed`` the
        all-reduced 0-dim tensor on ``device``, so the normaliser never waits for the device.
        """
        num_masks = sum(len(t["labels"]) for t in targets)
        if not (dist.is_available() and dist.is_initialized()):
            # What clamp(float32(n) / 1, min=1) gives, without building a tensor.
            return max(float(num_masks), 1.0)
        num_masks = torch.as_tensor([num_masks], dtype=torch.float).to(device, non_blocking=True)
        dist.all_reduce(num_masks)
        return torch.clamp(num_masks / dist.get_world_size(), min=1)[0]

    def _batch(self, targets: TargetsLike, device) -> BatchTargets:
        if isinstance(targets, BatchTargets):
            return targets
        return BatchTargets(targets, device, self.caption_pad_token_id)

    @staticmethod
    def _image_starts(indices: Indices) -> List[int]:
        """Where each image's pairs start in the flat indices (and the total at the end)."""
        starts = [0]
        for src, _ in indices:
            starts.append(starts[-1] + int(src.shape[0]))
        return starts

    @staticmethod
    def _flat_indices(indices: Indices, batch: BatchTargets) -> Tuple[torch.Tensor, ...]:
        """``(batch_idx, src_idx, tgt_idx, tgt_flat)`` Long[m] on the device: every matched
        pair's image, query, target within its image and target among the concatenated ones.

        Built on the host from the matcher's host indices and copied to the device in one
        non-blocking copy; cached on a :class:`Matching`.
        """
        cached = getattr(indices, "_flat", None)
        if cached is not None:
            return cached
        pairs = [(src.cpu(), tgt.cpu()) for src, tgt in indices]
        if pairs:
            batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(pairs)])
            src_idx = torch.cat([src for src, _ in pairs])
            tgt_idx = torch.cat([tgt for _, tgt in pairs])
            tgt_flat = torch.cat([tgt + batch.offsets[i] for i, (_, tgt) in enumerate(pairs)])
            packed = torch.stack([batch_idx, src_idx, tgt_idx, tgt_flat]).long()
        else:
            packed = torch.zeros((4, 0), dtype=torch.long)
        flat = tuple(packed.to(batch.device, non_blocking=True))
        if isinstance(indices, Matching):
            indices._flat = flat
        return flat

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={list(self.losses)}, "
            f"weight_dict={self.weight_dict}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"num_caption_layers={self.num_caption_layers}"
        )
