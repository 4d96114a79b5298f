"""Set-prediction losses of Pix2Cap: classification, mask and caption losses on matched queries.

The structure follows Mask2Former's ``SetCriterion``: the matcher assigns queries to targets
for the final prediction and, separately, for each auxiliary (earlier decoder layer)
prediction; every loss in ``losses`` is looked up in a dispatch table and computed on those
matches; per-layer losses get the suffix ``_{i}`` (``i`` = index in ``aux_outputs``).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .caption_head.scene_memory import SceneContext
from .mask_losses import dice_loss, point_mask_losses, sigmoid_ce_loss

__all__ = ["SetCriterion", "dice_loss", "point_mask_losses", "sigmoid_ce_loss"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


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
            num_caption_layers: compute the caption loss on the last this many predictions
                only (the final one counts as one); None: on all of them.
            caption_pad_token_id: padding id of ``caption_tokens``, to tell empty captions.
            caption_scene_fn: for a scene-memory caption head, its ``scene_context``: the
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

        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Not persistent: a constant of the loss, it has no place in checkpoints.
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # -----------------------------------------------------------------------------------------
    # Individual losses: (outputs, targets, indices, num_masks) -> dict of scalar tensors
    # -----------------------------------------------------------------------------------------
    def loss_labels(self, outputs, targets, indices: Indices, num_masks: float):
        """Cross-entropy over K+1 classes; unmatched queries are trained towards no-object."""
        src_logits = outputs["pred_logits"].float()  # [B, Q, K+1]
        batch_idx, src_idx = self._get_src_permutation_idx(indices)
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        if batch_idx.numel() > 0:
            target_classes_o = torch.cat(
                [t["labels"].to(src_logits.device)[j] for t, (_, j) in zip(targets, indices)]
            )
            target_classes[batch_idx, src_idx] = target_classes_o
        loss_ce = F.cross_entropy(
            src_logits.transpose(1, 2), target_classes, self.empty_weight.to(src_logits.dtype)
        )
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs, targets, indices: Indices, num_masks: float):
        """Sigmoid BCE and dice on importance-sampled points of the matched masks."""
        pred_masks = outputs["pred_masks"]  # [B, Q, h, w]
        batch_idx, src_idx = self._get_src_permutation_idx(indices)
        if batch_idx.numel() == 0:
            # Keep the graph (and every key) alive for a batch without any segment.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src_masks = pred_masks[batch_idx, src_idx]  # [m, h, w]
        target_masks = self._gather_target_masks(targets, indices, src_masks.device)
        loss_mask, loss_dice = point_mask_losses(
            src_masks,
            target_masks,
            num_masks,
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
        )
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def loss_captions(self, outputs, targets, indices: Indices, num_masks: float):
        """Caption loss of the queries matched to segments that have a caption."""
        query_features = outputs["query_features"]  # [B, Q, D]
        global_features = outputs.get("global_features")  # [B, Dg] or None
        device = query_features.device
        feats, globals_, tokens, scenes = [], [], [], []
        for b, (src, tgt) in enumerate(indices):
            target = targets[b]
            if "caption_tokens" not in target or src.numel() == 0:
                continue
            src, tgt = src.to(device), tgt.to(device)
            caption_tokens = target["caption_tokens"].to(device)[tgt]  # [m_b, T_b]
            # [CLS] [SEP] alone (an empty description) is no caption to learn.
            valid = (caption_tokens != self.caption_pad_token_id).sum(1) > 2
            if "caption_valid" in target:
                valid &= target["caption_valid"].to(device=device, dtype=torch.bool)[tgt]
            if not bool(valid.any()):
                continue
            feats.append(query_features[b, src[valid]])
            tokens.append(caption_tokens[valid])
            if global_features is not None:
                globals_.append(global_features[b].unsqueeze(0).expand(int(valid.sum()), -1))
            if self.caption_scene_fn is not None:
                scenes.append(self._scene(outputs, target, b, src, tgt, valid.nonzero()[:, 0]))
        if not feats:
            return {"loss_caption": query_features.sum() * 0.0}

        max_len = max(t.shape[1] for t in tokens)
        tokens = torch.cat(
            [F.pad(t, (0, max_len - t.shape[1]), value=self.caption_pad_token_id) for t in tokens]
        )
        feats = torch.cat(feats)
        globals_ = torch.cat(globals_) if globals_ else None
        if self.caption_scene_fn is None:
            return {"loss_caption": self.caption_loss_fn(feats, globals_, tokens)}
        scene = SceneContext.cat(scenes)
        return {"loss_caption": self.caption_loss_fn(feats, globals_, tokens, scene=scene)}

    def _scene(
        self, outputs, target, b: int, src: torch.Tensor, tgt: torch.Tensor, captioned
    ) -> SceneContext:
        """Scene facts of image ``b``'s matched queries ``src`` (segments ``tgt``) at
        positions ``captioned``."""
        if "pixel_features" not in outputs:
            raise KeyError("a scene-memory caption loss needs outputs['pixel_features']")
        if self.caption_scene_masks == "target":
            mask_probs = target["masks"][tgt].float()  # [n, H, W], the padded image grid
        else:
            mask_probs = outputs["pred_masks"][b, src].detach().float().sigmoid()
        window = outputs["grid_window"][b] if "grid_window" in outputs else None
        return self.caption_scene_fn(
            outputs["query_features"][b, src],
            mask_probs,
            [level[b] for level in outputs["pixel_features"]],
            captioned,
            window=window,
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
        self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]
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
                ``"caption_valid"`` Bool[M].

        Returns:
            name -> scalar tensor, unweighted.
        """
        aux_outputs = outputs.get("aux_outputs") or []
        device = outputs["pred_logits"].device
        num_masks = self._num_masks(targets, device)
        first_caption_layer = self._first_caption_layer(len(aux_outputs))

        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses: Dict[str, torch.Tensor] = {}
        indices = self.matcher(final, targets)
        for loss in self._losses_for_layer(final, len(aux_outputs), first_caption_layer):
            losses.update(self.get_loss(loss, final, targets, indices, num_masks))

        for i, aux in enumerate(aux_outputs):
            # The global token and pixel features are the same for every layer; given once.
            shared = {k: outputs[k] for k in _SHARED_OUTPUTS if k in outputs and k not in aux}
            if shared:
                aux = {**aux, **shared}
            indices = self.matcher(aux, targets)
            for loss in self._losses_for_layer(aux, i, first_caption_layer):
                l_dict = self.get_loss(loss, aux, targets, indices, num_masks)
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
    def _num_masks(targets, device) -> float:
        """Average number of target masks per process (at least 1), the loss normaliser."""
        num_masks = sum(len(t["labels"]) for t in targets)
        num_masks = torch.as_tensor([num_masks], dtype=torch.float, device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            world_size = dist.get_world_size()
        return torch.clamp(num_masks / world_size, min=1).item()

    @staticmethod
    def _get_src_permutation_idx(indices: Indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    @staticmethod
    def _gather_target_masks(targets, indices: Indices, device) -> torch.Tensor:
        """Matched target masks, in the order of ``_get_src_permutation_idx``: [m, H, W].

        Images of a batch may carry masks of different sizes; they are zero-padded at the
        bottom/right to the largest, the way images are padded into a batch.
        """
        masks = [t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)]
        max_h = max(m.shape[-2] for m in masks)
        max_w = max(m.shape[-1] for m in masks)
        padded = []
        for m in masks:
            m = m.to(device=device, dtype=torch.float32)
            if m.shape[-2] != max_h or m.shape[-1] != max_w:
                m = F.pad(m, (0, max_w - m.shape[-1], 0, max_h - m.shape[-2]))
            padded.append(m)
        return torch.cat(padded)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={list(self.losses)}, "
            f"weight_dict={self.weight_dict}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"num_caption_layers={self.num_caption_layers}"
        )
