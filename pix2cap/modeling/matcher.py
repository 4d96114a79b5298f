"""Hungarian matching between predicted queries and ground-truth segments (Mask2Former)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .point_sampling import point_sample

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost"]

# Stand-in for NaN/inf costs: large enough never to be preferred, finite so scipy accepts it.
_INVALID_COST = 1e8


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss between every prediction and every target.

    Args:
        inputs: [Q, P] mask logits at P points.
        targets: [M, P] binary targets at the same points.

    Returns:
        [Q, M] dice loss ``1 - (2 |x t| + 1) / (|x| + |t| + 1)``.
    """
    inputs = inputs.sigmoid()
    numerator = 2 * inputs @ targets.T
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy between every prediction and every target.

    BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), so the [Q, M] matrix is two matmuls
    instead of a [Q, M, P] tensor.

    Args:
        inputs: [Q, P] mask logits at P points.
        targets: [M, P] binary targets at the same points.

    Returns:
        [Q, M] BCE averaged over the points.
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments, per image.

    Cost = ``cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice``; the mask
    terms are evaluated on ``num_points`` random points drawn once per image and shared by
    every predicted and target mask of that image.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        super().__init__()
        assert cost_class != 0 or cost_mask != 0 or cost_dice != 0, "all costs cannot be 0"
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def memory_efficient_forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        batch_size = pred_logits.shape[0]
        device = pred_logits.device

        indices = []
        # Costs in fp32 whatever the training precision: fp16 BCE/dice are too coarse to rank.
        with torch.autocast(device_type=device.type, enabled=False):
            for b in range(batch_size):
                tgt_ids = targets[b]["labels"].to(device)
                num_targets = tgt_ids.shape[0]
                if num_targets == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue

                prob = pred_logits[b].float().softmax(-1)  # [Q, K+1]
                # -p(class) approximates the NLL and keeps the cost on the mask costs' scale.
                cost_class = -prob[:, tgt_ids]  # [Q, M]

                out_mask = pred_masks[b].float()[:, None]  # [Q, 1, h, w]
                tgt_mask = targets[b]["masks"].to(device=device, dtype=torch.float32)[:, None]
                point_coords = torch.rand(1, self.num_points, 2, device=device)
                tgt_points = point_sample(
                    tgt_mask, point_coords.expand(tgt_mask.shape[0], -1, -1)
                ).squeeze(
                    1
                )  # [M, P]
                out_points = point_sample(
                    out_mask, point_coords.expand(out_mask.shape[0], -1, -1)
                ).squeeze(
                    1
                )  # [Q, P]

                cost_mask = batch_sigmoid_ce_cost(out_points, tgt_points)
                cost_dice = batch_dice_cost(out_points, tgt_points)
                cost = (
                    self.cost_mask * cost_mask
                    + self.cost_class * cost_class
                    + self.cost_dice * cost_dice
                )
                cost = torch.nan_to_num(
                    cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST
                )
                row, col = linear_sum_assignment(cost.cpu().numpy())
                indices.append(
                    (
                        torch.as_tensor(np.asarray(row), dtype=torch.int64),
                        torch.as_tensor(np.asarray(col), dtype=torch.int64),
                    )
                )
        return indices

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match the predictions of each image to its targets.

        Args:
            outputs: ``"pred_logits"`` [B, Q, K+1] class logits (last = no-object) and
                ``"pred_masks"`` [B, Q, h, w] mask logits.
            targets: B dicts with ``"labels"`` Long[M] and ``"masks"`` [M, H, W] binary masks
                (any H, W: points are sampled in normalised coordinates).

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of Long[m] CPU tensors, m = min(Q, M): query
            ``pred_idx[j]`` is assigned to target ``tgt_idx[j]``.
        """
        return self.memory_efficient_forward(outputs, targets)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )
