"""Mask losses of Mask2Former: sigmoid BCE and dice on importance-sampled points.

Shared by the set criterion (panoptic masks) and the grounded caption head (SEG masks).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = ["dice_loss", "point_mask_losses", "sigmoid_ce_loss"]


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss summed over masks and divided by ``num_masks``.

    Args:
        inputs: [m, P] mask logits at P points.
        targets: [m, P] binary targets at the same points.
        num_masks: normaliser (number of target masks in the batch, over all processes).
    """
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary cross-entropy, averaged over points, summed over masks, divided by ``num_masks``.

    Args:
        inputs: [m, P] mask logits at P points.
        targets: [m, P] binary targets at the same points.
        num_masks: normaliser (number of target masks in the batch, over all processes).
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def point_mask_losses(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    num_masks: float,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid BCE and dice of masks on importance-sampled points (Mask2Former's mask loss).

    Args:
        mask_logits: [m, h, w] predicted mask logits.
        target_masks: [m, H, W] binary targets (any resolution: sampled at the same points).
        num_masks: normaliser of both losses.
        num_points, oversample_ratio, importance_sample_ratio: see
            :func:`~pix2cap.modeling.point_sampling.get_uncertain_point_coords_with_randomness`.

    Returns:
        (BCE, dice), scalars.
    """
    src = mask_logits.float()[:, None]  # [m, 1, h, w]
    with torch.no_grad():
        point_coords = get_uncertain_point_coords_with_randomness(
            src, calculate_uncertainty, num_points, oversample_ratio, importance_sample_ratio
        )  # [m, P, 2]
        target = target_masks.to(src.dtype)[:, None]  # [m, 1, H, W]
        point_labels = point_sample(target, point_coords).squeeze(1)  # [m, P]
    point_logits = point_sample(src, point_coords).squeeze(1)  # [m, P]
    return (
        sigmoid_ce_loss(point_logits, point_labels, num_masks),
        dice_loss(point_logits, point_labels, num_masks),
    )
