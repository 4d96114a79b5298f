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
        inputs: [..., Q, P] mask logits at P points.
        targets: [..., M, P] binary targets at the same points (same leading batch dims).

    Returns:
        [..., Q, M] dice loss ``1 - (2 |x t| + 1) / (|x| + |t| + 1)``.
    """
    inputs = inputs.sigmoid()
    numerator = 2 * inputs @ targets.transpose(-2, -1)
    denominator = inputs.sum(-1).unsqueeze(-1) + targets.sum(-1).unsqueeze(-2)
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy between every prediction and every target.

    BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), so the [Q, M] matrix is two matmuls
    instead of a [Q, M, P] tensor.

    Args:
        inputs: [..., Q, P] mask logits at P points.
        targets: [..., M, P] binary targets at the same points (same leading batch dims).

    Returns:
        [..., Q, M] BCE averaged over the points.
    """
    num_points = inputs.shape[-1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    targets_t = targets.transpose(-2, -1)
    return (pos @ targets_t + neg @ (1 - targets_t)) / num_points


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments, per image.

    Cost = ``cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice``; the mask
    terms are evaluated on ``num_points`` random points drawn once per image and shared by
    every predicted and target mask of that image.

    The costs of the whole batch are one batched computation on the predictions' device
    (targets padded to the image with the most segments) and reach the host in one copy per
    call, for ``scipy.optimize.linear_sum_assignment``: the only host synchronisation of a
    call, whatever the batch size and the number of queries.
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
    def batch_costs(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> Tuple[torch.Tensor, List[int], List[int]]:
        """The cost matrices of the images that have targets, on the device.

        Returns:
            ``(cost, images, sizes)``: cost [B', Q, M_max] (fp32, NaN/inf replaced), the
            batch index of each of its rows (the images with at least one target, in order)
            and their target counts; ``cost[i, :, :sizes[i]]`` is image ``images[i]``'s.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        device = pred_logits.device
        counts = [int(t["labels"].shape[0]) for t in targets]
        images = [b for b, n in enumerate(counts) if n > 0]
        sizes = [counts[b] for b in images]
        if not images:
            return pred_logits.new_zeros((0, pred_logits.shape[1], 0)), images, sizes
        # Costs in fp32 whatever the training precision: fp16 BCE/dice are too coarse to rank.
        with torch.autocast(device_type=device.type, enabled=False):
            # One draw per image, in image order: the random stream of the per-image matcher.
            point_coords = torch.cat(
                [torch.rand(1, self.num_points, 2, device=device) for _ in images]
            )  # [B', P, 2]
            select = (
                torch.as_tensor(images).to(device, non_blocking=True)
                if len(images) < len(targets)
                else None
            )
            logits = pred_logits if select is None else pred_logits[select]
            masks = pred_masks if select is None else pred_masks[select]

            labels = [targets[b]["labels"] for b in images]
            tgt_ids = nn.utils.rnn.pad_sequence(
                [t.to(device, non_blocking=True) for t in labels], batch_first=True
            )  # [B', M_max], 0 where padded
            prob = logits.float().softmax(-1)  # [B', Q, K+1]
            # -p(class) approximates the NLL and keeps the cost on the mask costs' scale.
            cost_class = -torch.gather(
                prob, 2, tgt_ids[:, None, :].expand(-1, prob.shape[1], -1)
            )  # [B', Q, M_max]

            out_points = point_sample(masks.float(), point_coords)  # [B', Q, P]
            tgt_points = self._target_points(targets, images, sizes, point_coords)

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
        return cost, images, sizes

    @staticmethod
    def _target_points(targets, images, sizes, point_coords) -> torch.Tensor:
        """[B', M_max, P] the target masks of ``images`` at their image's points (0 on
        padding rows)."""
        device = point_coords.device
        masks = [targets[b]["masks"] for b in images]
        if len({tuple(m.shape[-2:]) for m in masks}) == 1:
            # One grid_sample for all the masks of the batch, each at its image's points.
            flat = torch.cat(
                [m.to(device=device, dtype=torch.float32, non_blocking=True) for m in masks]
            )
            owner = torch.as_tensor(
                [i for i, n in enumerate(sizes) for _ in range(n)], dtype=torch.long
            ).to(device, non_blocking=True)
            points = point_sample(flat[:, None], point_coords[owner]).squeeze(1)  # [sum M, P]
            per_image = points.split(sizes)
        else:
            per_image = [
                point_sample(
                    m.to(device=device, dtype=torch.float32, non_blocking=True)[:, None],
                    point_coords[i : i + 1].expand(m.shape[0], -1, -1),
                ).squeeze(1)
                for i, m in enumerate(masks)
            ]
        return nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)

    @torch.no_grad()
    def memory_efficient_forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        cost, images, sizes = self.batch_costs(outputs, targets)
        empty = torch.empty(0, dtype=torch.int64)
        indices = [(empty, empty.clone()) for _ in targets]
        if not images:
            return indices
        host = cost.cpu().numpy()  # the one device-to-host copy of the call
        for i, (b, n) in enumerate(zip(images, sizes)):
            row, col = linear_sum_assignment(host[i, :, :n])
            indices[b] = (
                torch.as_tensor(np.asarray(row), dtype=torch.int64),
                torch.as_tensor(np.asarray(col), dtype=torch.int64),
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
