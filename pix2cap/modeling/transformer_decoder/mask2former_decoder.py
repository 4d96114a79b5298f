"""Mask2Former's multi-scale masked-attention transformer decoder.

Learnable object queries are refined by ``dec_layers`` layers of

    masked cross-attention (to one feature level) -> self-attention -> FFN

with the levels (1/32, 1/16, 1/8) visited round-robin. The cross-attention of a layer only sees
the pixels that the *previous* prediction of the same query called foreground (mask
probability >= 0.5), which is what makes Mask2Former converge fast. A class and a mask are
predicted from the learnable queries before the first layer and after every layer, so there
are ``dec_layers + 1`` predictions, all supervised.

Parameter names follow the original Mask2Former implementation (``query_feat``,
``transformer_cross_attention_layers``, ``decoder_norm``, ``class_embed``, ``mask_embed``, ...),
so its checkpoints load with a plain prefix rename; :func:`load_hf_mask2former_decoder_weights`
converts from Hugging Face ``transformers``' Mask2Former.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config.config import configurable

from ..position_encoding import PositionEmbeddingSine
from .build import TRANSFORMER_DECODER_REGISTRY

__all__ = [
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
    "load_hf_mask2former_decoder_weights",
]


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries; the query position embedding is added to q and k."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: torch.Tensor, query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tgt``, ``query_pos``: ``[B, Q, D]`` -> ``[B, Q, D]``."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x if query_pos is None else x + query_pos
        out = tgt + self.dropout(self.self_attn(q, k, value=x, need_weights=False)[0])
        return out if self.normalize_before else self.norm(out)


class CrossAttentionLayer(nn.Module):
    """Queries attend to one feature level, restricted by a boolean attention mask."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tgt: queries ``[B, Q, D]``; memory: pixels ``[B, HW, D]``.
            memory_mask: bool ``[B * nhead, Q, HW]``, True = may not attend.
            pos: pixel position embedding ``[B, HW, D]`` (added to keys only).
            query_pos: query position embedding ``[B, Q, D]``.

        Returns:
            ``[B, Q, D]``.
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        q = x if query_pos is None else x + query_pos
        k = memory if pos is None else memory + pos
        attn = self.multihead_attn(q, k, value=memory, attn_mask=memory_mask, need_weights=False)[0]
        out = tgt + self.dropout(attn)
        return out if self.normalize_before else self.norm(out)


class FFNLayer(nn.Module):
    """Position-wise feed-forward block with a residual connection."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        """``[B, Q, D]`` -> ``[B, Q, D]``."""
        x = self.norm(tgt) if self.normalize_before else tgt
        out = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return out if self.normalize_before else self.norm(out)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former transformer decoder.

    ``forward(multi_scale_features, mask_features, mask=None) -> dict``:

    * ``multi_scale_features``: 3 maps ``[B, in_channels, h_l, w_l]`` (coarse to fine)
    * ``mask_features``: ``[B, mask_dim, H/4, W/4]``
    * ``mask``: optional bool ``[B, H', W']``, True on image padding (any resolution; resized
      to each level), never attended to.

    Returns ``pred_logits`` ``[B, Q, num_classes + 1]`` (last class = no object),
    ``pred_masks`` ``[B, Q, H/4, W/4]`` (logits), ``query_features`` ``[B, Q, hidden_dim]``
    (final decoder output after ``decoder_norm``) and ``aux_outputs``: a list of
    ``dec_layers`` dicts with the same three keys for the earlier predictions, first to last.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        enforce_input_project: bool = False,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
    ):
        """
        Args:
            in_channels: channels of the multi-scale features.
            num_classes: number of categories (a no-object logit is added).
            hidden_dim: width of the queries.
            num_queries: number of object queries.
            nheads: attention heads.
            dim_feedforward: FFN width.
            dec_layers: number of decoder layers; the decoder makes ``dec_layers + 1``
                predictions (the config key ``DEC_LAYERS`` counts predictions, see
                :meth:`from_config`).
            pre_norm: pre-LayerNorm layers instead of Mask2Former's post-norm.
            mask_dim: channels of ``mask_features`` (output width of the mask MLP).
            enforce_input_project: add a 1x1 projection even when ``in_channels == hidden_dim``.
            dropout: dropout in attention and FFN (0 in Mask2Former).
            num_feature_levels: number of feature levels visited round-robin.
        """
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        # Learnable query features (the decoder's input) and query position embeddings.
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        # Tells the cross-attention which level its keys come from.
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)

        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)  # Caffe2 XavierFill
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> dict:
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # DEC_LAYERS counts supervised predictions, the one on the learnable queries
            # included, as in Mask2Former: DEC_LAYERS 10 -> 9 layers, 10 predictions.
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "dropout": mf.DROPOUT,
        }

    def forward(
        self,
        multi_scale_features: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> dict:
        """
        Args:
            multi_scale_features: ``num_feature_levels`` maps ``[B, in_channels, h_l, w_l]``,
                coarse to fine; layer ``i`` attends to level ``i % num_feature_levels``.
            mask_features: ``[B, mask_dim, H/4, W/4]``.
            mask: optional bool ``[B, H', W']``, True on padding.

        Returns:
            ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H/4, W/4],
            "query_features": [B, Q, D], "aux_outputs": [dict, ...]}`` (``dec_layers`` aux dicts).
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} feature levels, "
                f"got {len(multi_scale_features)}"
            )
        src, pos, size_list, pad = [], [], [], []
        for i, x in enumerate(multi_scale_features):
            size_list.append(tuple(x.shape[-2:]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # [B, HW, D]
            feat = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(feat.transpose(1, 2))  # [B, HW, D]
            if mask is not None:
                level_pad = F.interpolate(mask[:, None].float(), size=x.shape[-2:], mode="nearest")
                pad.append(level_pad.flatten(1).bool())  # [B, HW]

        batch = src[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        predictions = [self._prediction_heads(output, mask_features, size_list[0])]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = self._cross_attention_mask(predictions[-1][3], pad[level] if pad else None)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            # The mask for the next layer is made at the resolution of the level it will attend.
            last = i == self.num_layers - 1
            next_size = None if last else size_list[(i + 1) % self.num_feature_levels]
            predictions.append(self._prediction_heads(output, mask_features, next_size))

        outs = [
            {"pred_logits": logits, "pred_masks": masks, "query_features": feats}
            for logits, masks, feats, _ in predictions
        ]
        result = dict(outs[-1])
        result["aux_outputs"] = outs[:-1]
        return result

    def _prediction_heads(
        self,
        output: torch.Tensor,
        mask_features: torch.Tensor,
        attn_mask_size: Optional[tuple[int, int]],
    ):
        """Class logits, mask logits, normed queries and the next cross-attention mask.

        Args:
            output: decoder state ``[B, Q, D]``.
            mask_features: ``[B, mask_dim, H, W]``.
            attn_mask_size: ``(h, w)`` of the level the next layer attends to; None skips the mask.

        Returns:
            ``([B, Q, K+1], [B, Q, H, W], [B, Q, D], bool [B, Q, h*w] or None)``; in the mask,
            True = background (not attended).
        """
        decoder_output = self.decoder_norm(output)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = None
        if attn_mask_size is not None:
            resized = F.interpolate(
                outputs_mask, size=attn_mask_size, mode="bilinear", align_corners=False
            )
            # True = masked out: the query's previous mask says "background" there. The mask is
            # a routing decision, not something to back-propagate through.
            attn_mask = (resized.sigmoid().flatten(2) < 0.5).detach()  # [B, Q, hw]
        return outputs_class, outputs_mask, decoder_output, attn_mask

    def _cross_attention_mask(
        self, attn_mask: torch.Tensor, pad: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``[B, Q, S]`` foreground mask (+ ``[B, S]`` padding) -> ``[B * nheads, Q, S]``.

        A query whose predicted mask is empty on this level would attend to nothing (softmax
        of all -inf = NaN); such rows are opened to the whole (unpadded) map instead.
        """
        if pad is not None:
            attn_mask = attn_mask | pad[:, None, :]
            attn_mask = torch.where(attn_mask.all(-1, keepdim=True), pad[:, None, :], attn_mask)
        else:
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
        # nn.MultiheadAttention wants one mask per (batch, head), batch-major.
        return attn_mask.repeat_interleave(self.num_heads, dim=0)


@torch.no_grad()
def load_hf_mask2former_decoder_weights(
    decoder: MultiScaleMaskedTransformerDecoder,
    hf_module: nn.Module,
    class_predictor: Optional[nn.Linear] = None,
) -> None:
    """Copy a Hugging Face Mask2Former transformer decoder's weights into ``decoder``.

    Args:
        decoder: the pix2cap decoder, with the same sizes as the HF model.
        hf_module: ``Mask2FormerForUniversalSegmentation`` (its ``class_predictor`` is used), or
            ``Mask2FormerModel`` / ``Mask2FormerTransformerModule`` together with
            ``class_predictor``.
        class_predictor: HF's ``Linear(hidden_dim, num_labels + 1)`` when ``hf_module`` has none.

    HF keeps the self-attention's q/k/v projections separate; they are concatenated into
    ``nn.MultiheadAttention``'s ``in_proj``. Raises ``KeyError``/``RuntimeError`` on a missing
    weight or a size mismatch.
    """
    module = hf_module
    for attr in ("model", "transformer_module"):
        if hasattr(module, attr) and not hasattr(module, "decoder"):
            module = getattr(module, attr)
    if not hasattr(module, "queries_features"):
        raise KeyError(f"{type(hf_module).__name__} holds no Mask2Former transformer module")
    if class_predictor is None:
        class_predictor = getattr(hf_module, "class_predictor", None)
    if class_predictor is None:
        raise KeyError(
            "no class_predictor: pass Mask2FormerForUniversalSegmentation or class_predictor="
        )

    hf = module.state_dict()
    state: dict[str, torch.Tensor] = {
        "query_feat.weight": hf["queries_features.weight"],
        "query_embed.weight": hf["queries_embedder.weight"],
        "level_embed.weight": hf["level_embed.weight"],
        "decoder_norm.weight": hf["decoder.layernorm.weight"],
        "decoder_norm.bias": hf["decoder.layernorm.bias"],
        "class_embed.weight": class_predictor.weight,
        "class_embed.bias": class_predictor.bias,
    }
    for i in range(len(decoder.input_proj)):
        for p in ("weight", "bias"):
            if f"input_projections.{i}.{p}" in hf:
                state[f"input_proj.{i}.{p}"] = hf[f"input_projections.{i}.{p}"]
    for j in range(len(decoder.mask_embed.layers)):
        for p in ("weight", "bias"):
            # HF wraps each Linear in a block registered as "<j>", the Linear itself as "0".
            theirs = f"decoder.mask_predictor.mask_embedder.{j}.0.{p}"
            state[f"mask_embed.layers.{j}.{p}"] = hf[theirs]
    for i in range(decoder.num_layers):
        theirs = f"decoder.layers.{i}."
        cross = f"transformer_cross_attention_layers.{i}."
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            state[cross + "multihead_attn." + p] = hf[theirs + "cross_attn." + p]
        self_ = f"transformer_self_attention_layers.{i}."
        for p in ("weight", "bias"):
            state[self_ + f"self_attn.in_proj_{p}"] = torch.cat(
                [hf[theirs + f"self_attn.{n}_proj.{p}"] for n in ("q", "k", "v")], 0
            )
            state[self_ + f"self_attn.out_proj.{p}"] = hf[theirs + f"self_attn.out_proj.{p}"]
            state[cross + f"norm.{p}"] = hf[theirs + f"cross_attn_layer_norm.{p}"]
            state[self_ + f"norm.{p}"] = hf[theirs + f"self_attn_layer_norm.{p}"]
            ffn = f"transformer_ffn_layers.{i}."
            state[ffn + f"linear1.{p}"] = hf[theirs + f"fc1.{p}"]
            state[ffn + f"linear2.{p}"] = hf[theirs + f"fc2.{p}"]
            state[ffn + f"norm.{p}"] = hf[theirs + f"final_layer_norm.{p}"]

    own = decoder.state_dict()
    if set(own) != set(state):
        raise KeyError(
            f"weight names differ: missing {sorted(set(own) - set(state))}, "
            f"unexpected {sorted(set(state) - set(own))}"
        )
    for name, value in state.items():
        if value.shape != own[name].shape:
            raise RuntimeError(
                f"shape mismatch for {name}: {tuple(own[name].shape)} vs {tuple(value.shape)}"
            )
    decoder.load_state_dict(state, strict=True)
