"""Position encodings shared by the pixel decoders and the transformer decoder."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine position embedding ("Attention is all you need", extended to images).

    The first ``num_pos_feats`` channels encode the row (y), the next ``num_pos_feats`` the
    column (x); each half alternates sin/cos over geometrically spaced frequencies. With
    ``normalize=True`` coordinates are scaled to ``(0, scale]`` so the embedding does not depend
    on the feature map size.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
        temperature: base of the frequency progression.
        normalize: rescale the 1-based pixel coordinates by the (valid) extent of the map.
        scale: value of the largest normalised coordinate (default ``2 * pi``).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000.0,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used when normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: any tensor of shape ``[B, C, H, W]``; only its shape, device and dtype are used.
            mask: optional bool ``[B, H, W]``, True on padding pixels (not counted as positions).

        Returns:
            ``[B, 2 * num_pos_feats, H, W]`` in ``x.dtype``.
        """
        batch, _, height, width = x.shape
        # Build in float32: half-precision cumsums and powers of 10000 lose too much.
        if mask is None:
            not_mask = torch.ones(batch, height, width, device=x.device, dtype=torch.float32)
        else:
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = torch.div(dim_t, 2, rounding_mode="floor")
        dim_t = self.temperature ** (2 * dim_t / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even channels) and cos (odd channels).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return pos.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}"
        )
