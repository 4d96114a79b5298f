"""Mask2Former's multi-scale deformable-attention pixel decoder, in pure PyTorch.

Backbone features res2..res5 (strides 4, 8, 16, 32) go in; out come

* ``mask_features`` ``[B, mask_dim, H/4, W/4]``: per-pixel embeddings that the transformer
  decoder's mask embeddings are dotted with, and
* ``multi_scale_features``: three ``[B, conv_dim, h, w]`` maps ordered 1/32, 1/16, 1/8, which
  the transformer decoder's masked cross-attention visits round-robin.

The coarse levels (res3..res5) are refined jointly by a Deformable-DETR encoder: every pixel of
every level attends to a few learned sampling points on all levels. Sampling uses
``torch.nn.functional.grid_sample``, so the module needs no compiled op and runs anywhere torch
runs. The finest level (res2) only gets an FPN lateral + output convolution.

Parameter names follow the original Mask2Former implementation (``input_proj``,
``transformer.encoder.layers``, ``adapter_1``, ``layer_1``, ``mask_features``), so its
checkpoints load with a plain prefix rename.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config.config import configurable

from ..position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY

__all__ = [
    "Conv2dNormAct",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
    "channels_and_stride",
    "get_norm",
    "load_hf_mask2former_pixel_decoder_weights",
    "ms_deform_attn_core_pytorch",
]


# ---------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------
def channels_and_stride(spec: Any) -> tuple[int, int]:
    """``(channels, stride)`` of one backbone output, described as a ShapeSpec-like object
    (attributes ``channels``/``stride``), a mapping with those keys, or a ``(channels, stride)``
    pair."""
    if hasattr(spec, "channels") and hasattr(spec, "stride"):
        return int(spec.channels), int(spec.stride)
    if isinstance(spec, Mapping):
        return int(spec["channels"]), int(spec["stride"])
    channels, stride = spec
    return int(channels), int(stride)


def get_norm(norm: str, channels: int) -> nn.Module:
    """``"GN"``: GroupNorm with 32 groups (fewer, dividing ``channels``, for tiny test widths);
    ``""``/``"none"``: identity."""
    if norm in ("", "none", None):
        return nn.Identity()
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected 'GN' or ''")


class Conv2dNormAct(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional norm and activation (detectron2's ``Conv2d``).

    Keeping the norm as a child of the convolution gives the parameter names ``weight`` and
    ``norm.weight`` used by detectron2-style checkpoints.
    """

    def __init__(
        self,
        *args,
        norm: Optional[nn.Module] = None,
        activation: Optional[nn.Module] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # Caffe2's XavierFill (= kaiming_uniform with a=1), the init Mask2Former uses for its convs.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# ---------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# ---------------------------------------------------------------------------------------------
def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values, over levels and points.

    Args:
        value: ``[B, S, n_heads, head_dim]``, the flattened levels concatenated along S
            (``S = sum(h * w)``).
        spatial_shapes: ``(h, w)`` of each level, in the order they are concatenated.
        sampling_locations: ``[B, Lq, n_heads, n_levels, n_points, 2]``, ``(x, y)`` in ``[0, 1]``
            relative to each level (0 and 1 are the outer edges of the border pixels).
        attention_weights: ``[B, Lq, n_heads, n_levels, n_points]``.

    Returns:
        ``[B, Lq, n_heads * head_dim]``. Samples outside a map read zeros.
    """
    batch, _, n_heads, head_dim = value.shape
    _, num_queries, _, n_levels, n_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    # grid_sample wants [-1, 1]; with align_corners=False, -1/1 are the outer pixel edges,
    # which is exactly what the [0, 1] locations mean.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [B, h*w, n_heads, head_dim] -> [B*n_heads, head_dim, h, w]
        value_l = value_per_level[level].permute(0, 2, 3, 1)
        value_l = value_l.reshape(batch * n_heads, head_dim, h, w)
        # [B, Lq, n_heads, n_points, 2] -> [B*n_heads, Lq, n_points, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # -> [B*n_heads, head_dim, Lq, n_points]
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # [B*n_heads, head_dim, Lq, n_levels * n_points]
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    # [B, Lq, n_heads, n_levels, n_points] -> [B*n_heads, 1, Lq, n_levels * n_points]
    weights = attention_weights.transpose(1, 2).reshape(
        batch * n_heads, 1, num_queries, n_levels * n_points
    )
    output = (sampled * weights).sum(-1).view(batch, n_heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

    Each query predicts, per head, ``n_points`` sampling offsets around its reference point on
    each of ``n_levels`` maps plus a softmax weight per sample; the output is the weighted sum of
    the (projected) values at those locations.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed star: head h looks along direction 2*pi*h/n_heads, point k at
        # distance k+1 pixels, on every level; attention starts uniform.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: ``[B, Lq, d_model]`` (position embedding already added).
            reference_points: ``[B or 1, Lq, n_levels, 2]``, ``(x, y)`` in ``[0, 1]``.
            input_flatten: ``[B, S, d_model]``, all levels flattened and concatenated.
            spatial_shapes: ``(h, w)`` per level, ``sum(h * w) == S``.
            input_padding_mask: optional bool ``[B, S]``, True on padding (reads as zero).

        Returns:
            ``[B, Lq, d_model]``.
        """
        batch, num_queries, _ = query.shape
        _, seq_len, _ = input_flatten.shape
        if sum(h * w for h, w in spatial_shapes) != seq_len:
            raise ValueError(
                f"spatial_shapes {list(spatial_shapes)} do not add up to {seq_len} positions"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, seq_len, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points
        )

        # Offsets are in pixels of each level: divide by (w, h) to get [0, 1] units.
        normalizer = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
        )
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        output = ms_deform_attn_core_pytorch(value, spatial_shapes, locations, weights)
        return self.output_proj(output)


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``src``, ``pos``: ``[B, S, d_model]`` -> ``[B, S, d_model]``."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    """Stack of deformable encoder layers over several feature levels, with level embeddings.

    Holds ``level_embed`` (added to each level's position embedding so that the attention can
    tell levels apart) and the ``encoder.layers``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 3,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        # A plain container so parameter names read ``transformer.encoder.layers.N``.
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            MSDeformAttnTransformerEncoderLayer(
                d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
            )
            for _ in range(num_encoder_layers)
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_reference_points(
        spatial_shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Pixel centres of every level, normalised to ``[0, 1]``: ``[1, S, n_levels, 2]``.

        Every map covers the whole (unpadded) image, so a point's normalised position is the
        same on all levels.
        """
        points = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device) / h,
                torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device) / w,
                indexing="ij",
            )
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        points = torch.cat(points, 0)
        return points[None, :, None, :].expand(1, -1, len(spatial_shapes), -1)

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        masks: Optional[Sequence[torch.Tensor]] = None,
    ) -> list[torch.Tensor]:
        """
        Args:
            srcs: ``num_feature_levels`` maps ``[B, d_model, h_l, w_l]``.
            pos_embeds: position embeddings of the same shapes.
            masks: optional bool ``[B, h_l, w_l]`` per level, True on padding.

        Returns:
            The refined maps, same shapes and order as ``srcs``.
        """
        spatial_shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        )
        mask_flat = None if masks is None else torch.cat([m.flatten(1) for m in masks], 1)
        reference_points = self.get_reference_points(
            spatial_shapes, src_flat.device, src_flat.dtype
        )

        out = src_flat
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, reference_points, spatial_shapes, mask_flat)

        batch = out.shape[0]
        maps = out.split([h * w for h, w in spatial_shapes], dim=1)
        return [
            m.transpose(1, 2).reshape(batch, -1, h, w) for m, (h, w) in zip(maps, spatial_shapes)
        ]


# ---------------------------------------------------------------------------------------------
# The pixel decoder
# ---------------------------------------------------------------------------------------------
@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder on the coarse levels + FPN step to 1/4 resolution.

    ``forward_features(features) -> (mask_features, multi_scale_features)``:

    * ``features``: ``{"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}``
    * ``mask_features``: ``[B, mask_dim, H/4, W/4]``
    * ``multi_scale_features``: ``[B, conv_dim, H/32, W/32]``, ``[.., H/16, W/16]``,
      ``[.., H/8, W/8]`` (coarse to fine; the transformer decoder visits them in this order).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: Mapping[str, Any],
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        transformer_dropout: float = 0.0,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_enc_layers: int = 6,
        transformer_enc_n_points: int = 4,
        common_stride: int = 4,
    ):
        """
        Args:
            input_shape: backbone outputs ``{name: spec}``, spec being ``(channels, stride)``, a
                ``{"channels", "stride"}`` mapping or a ShapeSpec-like object.
            conv_dim: width of the encoder and of the multi-scale outputs.
            mask_dim: channels of ``mask_features``.
            norm: ``"GN"`` or ``""`` for the convolutions.
            transformer_in_features: backbone outputs refined by the deformable encoder.
            transformer_dropout / transformer_nheads / transformer_dim_feedforward /
            transformer_enc_layers / transformer_enc_n_points: the deformable encoder.
            common_stride: stride of ``mask_features``; FPN levels are added down to it.
        """
        super().__init__()
        shapes = {k: channels_and_stride(v) for k, v in input_shape.items()}
        # Everything sorted fine-to-coarse (by stride).
        self.in_features = sorted(shapes, key=lambda k: shapes[k][1])
        self.feature_strides = [shapes[k][1] for k in self.in_features]
        self.feature_channels = [shapes[k][0] for k in self.in_features]

        missing = [f for f in transformer_in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"transformer_in_features {missing} not among the inputs {self.in_features}"
            )
        self.transformer_in_features = sorted(transformer_in_features, key=lambda k: shapes[k][1])
        transformer_in_channels = [shapes[k][0] for k in self.transformer_in_features]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim

        # 1x1 projections to conv_dim, indexed coarse-to-fine (level 0 = stride 32).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), get_norm(norm, conv_dim))
            for c in transformer_in_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnTransformerEncoder(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_enc_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)

        # FPN levels finer than the encoder's, down to common_stride (res2 for the usual setup).
        self.common_stride = common_stride
        min_stride = min(shapes[k][1] for k in self.transformer_in_features)
        self.num_fpn_levels = max(int(round(math.log2(min_stride) - math.log2(common_stride))), 0)
        self.fpn_features = self.in_features[: self.num_fpn_levels]
        use_bias = norm in ("", "none", None)
        lateral_convs, output_convs = [], []
        for idx, name in enumerate(self.fpn_features):
            lateral = Conv2dNormAct(
                shapes[name][0],
                conv_dim,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
            )
            output = Conv2dNormAct(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=nn.ReLU(),
            )
            _c2_xavier_fill(lateral)
            _c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # Plain lists (the modules are registered above), ordered coarse-to-fine like the loop.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        # Multi-scale outputs for the transformer decoder: at most 3, the coarsest ones.
        self.maskformer_num_feature_levels = 3

    @classmethod
    def from_config(cls, cfg, input_shape: Mapping[str, Any]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_in_features": tuple(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": head.TRANSFORMER_ENC_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_enc_n_points": head.TRANSFORMER_ENC_N_POINTS,
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(
        self, features: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            features: backbone maps by name, ``[B, C_name, H/stride, W/stride]``.

        Returns:
            ``mask_features`` ``[B, mask_dim, H/4, W/4]`` and ``multi_scale_features``, a list of
            up to 3 ``[B, conv_dim, h, w]`` maps ordered coarse to fine (1/32, 1/16, 1/8).
        """
        srcs, pos = [], []
        for level, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name]
            srcs.append(self.input_proj[level](x))
            pos.append(self.pe_layer(x))
        outs = self.transformer(srcs, pos)

        fpn = zip(self.fpn_features[::-1], self.lateral_convs, self.output_convs)
        for name, lateral, output in fpn:
            cur = lateral(features[name])
            # Bilinear (not nearest) upsampling of the coarser map, as in Mask2Former.
            up = F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            cur = cur + up
            outs.append(output(cur))

        multi_scale_features = outs[: self.maskformer_num_feature_levels]
        return self.mask_features(outs[-1]), multi_scale_features

    def forward(
        self, features: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)


def load_hf_mask2former_pixel_decoder_weights(
    pixel_decoder: MSDeformAttnPixelDecoder, hf_module: nn.Module
) -> None:
    """Copy the weights of a Hugging Face ``Mask2FormerPixelDecoder`` into ``pixel_decoder``.

    ``hf_module`` may be the HF pixel decoder itself, ``Mask2FormerModel`` or
    ``Mask2FormerForUniversalSegmentation``. Both modules must have the same sizes. Raises
    ``KeyError``/``RuntimeError`` if a parameter has no counterpart or a shape differs.
    """
    hf = _find_hf_submodule(
        hf_module, ("model.pixel_level_module.decoder", "pixel_level_module.decoder")
    )
    src = hf.state_dict()
    mapping: dict[str, str] = {"transformer.level_embed": "level_embed"}
    for i in range(len(pixel_decoder.input_proj)):
        for part in ("0.weight", "0.bias", "1.weight", "1.bias"):
            mapping[f"input_proj.{i}.{part}"] = f"input_projections.{i}.{part}"
    layer_names = {
        "self_attn.sampling_offsets": "self_attn.sampling_offsets",
        "self_attn.attention_weights": "self_attn.attention_weights",
        "self_attn.value_proj": "self_attn.value_proj",
        "self_attn.output_proj": "self_attn.output_proj",
        "norm1": "self_attn_layer_norm",
        "linear1": "fc1",
        "linear2": "fc2",
        "norm2": "final_layer_norm",
    }
    for i in range(len(pixel_decoder.transformer.encoder.layers)):
        for ours, theirs in layer_names.items():
            for p in ("weight", "bias"):
                mapping[f"transformer.encoder.layers.{i}.{ours}.{p}"] = (
                    f"encoder.layers.{i}.{theirs}.{p}"
                )
    for p in ("weight", "bias"):
        mapping[f"mask_features.{p}"] = f"mask_projection.{p}"
    for idx in range(1, pixel_decoder.num_fpn_levels + 1):
        # HF's lateral/output convs are Sequential(conv, norm[, relu]) without conv bias.
        mapping[f"adapter_{idx}.weight"] = f"adapter_{idx}.0.weight"
        mapping[f"layer_{idx}.weight"] = f"layer_{idx}.0.weight"
        for p in ("weight", "bias"):
            mapping[f"adapter_{idx}.norm.{p}"] = f"adapter_{idx}.1.{p}"
            mapping[f"layer_{idx}.norm.{p}"] = f"layer_{idx}.1.{p}"
    _copy_mapped(pixel_decoder, src, mapping)


def _find_hf_submodule(module: nn.Module, paths: Sequence[str]) -> nn.Module:
    """The first of ``paths`` (dotted attribute paths) present on ``module``, else ``module``."""
    for path in paths:
        obj: Union[nn.Module, None] = module
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return module


def _copy_mapped(
    target: nn.Module, source_state: Mapping[str, torch.Tensor], mapping: Mapping[str, str]
) -> None:
    """Copy ``source_state[mapping[k]]`` into ``target``'s parameter/buffer ``k``; every entry of
    ``target.state_dict()`` must be covered."""
    own = target.state_dict()
    uncovered = sorted(set(own) - set(mapping))
    if uncovered:
        raise KeyError(f"no source weight for {uncovered}")
    new_state = {}
    for ours, theirs in mapping.items():
        if theirs not in source_state:
            raise KeyError(f"source has no weight {theirs!r} (for {ours!r})")
        value = source_state[theirs]
        if value.shape != own[ours].shape:
            raise RuntimeError(
                f"shape mismatch for {ours}: {tuple(own[ours].shape)} "
                f"vs {theirs}: {tuple(value.shape)}"
            )
        new_state[ours] = value
    target.load_state_dict(new_state, strict=True)
