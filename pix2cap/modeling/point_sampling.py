"""Point sampling on mask logits, as used by the matcher and the mask losses.

Mask losses and matching costs are evaluated on a set of points instead of the full mask
(PointRend / Mask2Former): it saves memory at high resolution and, with importance sampling,
puts the points where the prediction is uncertain.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "get_uncertain_point_coords_with_randomness", "calculate_uncertainty"]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalised point coordinates.

    Args:
        input: [N, C, H, W] feature or mask maps.
        point_coords: [N, P, 2] (or [N, Hg, Wg, 2]) (x, y) coordinates in [0, 1] x [0, 1], where
            (0, 0) is the top-left corner of the map and (1, 1) its bottom-right corner.
        kwargs: passed to ``F.grid_sample`` (``align_corners`` defaults to False).

    Returns:
        [N, C, P] (or [N, C, Hg, Wg]) sampled values.
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)  # [N, P, 1, 2]
    kwargs.setdefault("align_corners", False)
    # grid_sample wants coordinates in [-1, 1]; the grid must have the input's dtype.
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    output = F.grid_sample(input, grid, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: ``-|logit|`` (highest at the decision boundary).

    Args:
        logits: [N, 1, ...] class-agnostic mask logits.

    Returns:
        [N, 1, ...] uncertainty scores.
    """
    assert logits.shape[1] == 1, f"expected one channel, got shape {tuple(logits.shape)}"
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Pick ``num_points`` points per mask, a share of them where the prediction is uncertain.

    ``num_points * oversample_ratio`` candidate points are drawn uniformly; the
    ``importance_sample_ratio * num_points`` most uncertain of them are kept and the rest of
    the budget is filled with fresh uniform points (so every region keeps some coverage).

    Args:
        coarse_logits: [N, 1, H, W] mask logits.
        uncertainty_func: maps [N, 1, P] sampled logits to [N, 1, P] uncertainties.
        num_points: P, points to return per mask.
        oversample_ratio: >= 1, candidates drawn per returned point.
        importance_sample_ratio: in [0, 1], share of the points chosen by uncertainty.

    Returns:
        [N, P, 2] point coordinates in [0, 1] (x, y).
    """
    assert oversample_ratio >= 1, oversample_ratio
    assert 0 <= importance_sample_ratio <= 1, importance_sample_ratio
    num_masks = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_masks, num_sampled, 2, device=device)
    point_logits = point_sample(coarse_logits, point_coords)  # [N, 1, S]
    # Uncertainty is computed on the sampled logits, not on interpolated uncertainties: for
    # -|x| the two differ near the boundary, and the former is what we want to rank.
    point_uncertainties = uncertainty_func(point_logits)  # [N, 1, S]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    chosen = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1).indices  # [N, U]
    point_coords = torch.gather(point_coords, 1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        random_coords = torch.rand(num_masks, num_random, 2, device=device)
        point_coords = torch.cat([point_coords, random_coords], dim=1)
    return point_coords
