"""Dense caption head: a small BERT-style decoder that writes one caption per object query.

Each object is described by a *memory* of tokens, each feature projected through a 256-d
bottleneck to the decoder width. ``memory="query_global"`` (the paper's) is two tokens: the
object's query feature from the transformer decoder and a global image feature.
``memory="scene"`` adds what those two cannot tell (``scene_memory.SceneContext``): the
object's mask-pooled pixel features (one token per pixel-decoder level), its box as a position
embedding added to its query token, and one token per other object of the image (its query
feature plus its box embedding). The number of other objects differs between objects, so the
scene memory is padded and a key padding mask keeps every token from attending to padding.

Memory and caption tokens form one sequence ``[memory; text]`` processed by post-norm BERT
layers under an attention mask:

* memory tokens attend to memory only, so their states never depend on the text and can be
  computed once per object;
* text tokens attend to the whole memory and to earlier text (causal).

Decoding reuses that property: the memory's keys/values of every layer are computed once, and
each step adds the key/value of one new token (a KV cache), instead of re-running the whole
sequence at every step. The cache is static (:mod:`.kv_cache`): preallocated to the longest
caption and written in place, so that on a GPU a step has fixed shapes, reads nothing on the
host and is captured once as a CUDA graph, then replayed per token. On a CPU the same step
runs eagerly, attending over the tokens written so far; there a step is bound by reading the
weights, and large weights (BERT's 30,522-word output layer, the paper-size head's FFN and
attention input projections) multiply through oneDNN, which reads them 1.3-2.2x as fast as
the default BLAS does for a few rows.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config.config import configurable

from .build import CAPTION_HEAD_REGISTRY
from .kv_cache import DecodeState, StaticKVCache
from .scene_memory import (
    BOX_FEATURE_DIM,
    PAIR_FEATURE_DIM,
    SceneContext,
    box_features,
    pair_box_features,
    scene_context,
)
from .tokenizer import build_caption_tokenizer, caption_vocab_kwargs

__all__ = ["DenseCaptionHead", "MEMORY_KINDS", "scale_grad"]

logger = logging.getLogger(__name__)

MEMORY_KINDS = ("query_global", "scene")

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V as [N, heads, L, head_dim]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale``."""
    if scale == 1.0:
        return x
    return _ScaleGrad.apply(x, scale)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of CPU tensor ``x`` (training), its mask drawn about 4x faster than PyTorch's.

    PyTorch's CPU dropout draws one Bernoulli sample per element (6-7 ns each here); this one
    draws 64 random bits per 4 elements and compares each 16-bit part with ``p``, so ``p`` is
    rounded to a multiple of 2^-16 (0.1 -> 0.1000061); kept elements are scaled by the inverse
    of that rounded keep probability, so it stays unbiased. The torch generator draws the bits
    (``manual_seed`` reproduces them). Written here because no library offers a faster CPU
    dropout.
    """
    dropped = round(p * 65536)  # out of 65536
    if dropped <= 0:
        return x
    if dropped >= 65536:
        return x * 0.0
    numel = x.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None)
    keep = words.view(torch.int16)[:numel].view(x.shape) >= dropped - 32768
    return x * (keep * (65536 / (65536 - dropped))).to(x.dtype)


class CaptionDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`cpu_dropout`'s faster mask on the CPU (elsewhere, and in
    eval mode, exactly ``nn.Dropout``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return cpu_dropout(x, self.p)


def _onednn_linear(x: torch.Tensor, prepared: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``F.linear`` of ``x`` [..., C] with a (weight, bias) copied to oneDNN's layout."""
    flat = x.reshape(-1, x.shape[-1]).to_mkldnn()
    out = F.linear(flat, *prepared).to_dense()
    return out.view(*x.shape[:-1], out.shape[-1])


def _onednn_ready(x: torch.Tensor, prepared) -> bool:
    return prepared is not None and x.dtype == torch.float32 and not x.requires_grad


class CaptionLinear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint keys) that multiplies through oneDNN
    while a CPU decoding has given it a copy of its weights in oneDNN's layout
    (:meth:`DenseCaptionHead._onednn_weights`); otherwise exactly ``nn.Linear``."""

    onednn_weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_ready(x, self.onednn_weights):
            return _onednn_linear(x, self.onednn_weights)
        return super().forward(x)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout: float,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of q [N, heads, L, d], k, v [N, heads, S, d] under a
    Bool ``attn_mask`` (True = may attend), with dropout ``dropout`` on the probabilities.

    With dropout on the CPU it is computed here: PyTorch's fused CPU attention takes no
    dropout, and its unfused path draws the mask one Bernoulli sample at a time (the grounded
    head's 8 x 4 x 276 x 276 probabilities: 16 ms for the mask, 38 ms forward and backward in
    all; here 20). Every query must be allowed at least one key (the heads' masks always allow
    the first memory token), or its row would be NaN.
    """
    if dropout == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    scores = q @ k.transpose(-1, -2)
    scores.mul_(q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))
    return cpu_dropout(scores.softmax(-1), dropout) @ v


class MemoryProjection(nn.Module):
    """Feature -> bottleneck -> decoder width -> LayerNorm, for one memory token.

    The gradient flowing back into the input feature is scaled by ``grad_scale``: the caption
    loss then shapes the segmentation queries less than the segmentation losses do.
    """

    def __init__(
        self, in_dim: int, bottleneck_dim: int, hidden_size: int, grad_scale: float, eps: float
    ):
        super().__init__()
        self.grad_scale = grad_scale
        self.down = nn.Linear(in_dim, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N, hidden_size]."""
        x = scale_grad(x, self.grad_scale)
        return self.norm(self.up(self.down(x)))


class CaptionEmbeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm and dropout (BERT)."""

    def __init__(
        self, vocab_size: int, hidden_size: int, max_positions: int, dropout: float, eps: float
    ):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = CaptionDropout(dropout)

    def forward(self, input_ids: torch.Tensor, start_position: int = 0) -> torch.Tensor:
        """input_ids Long[N, t] at positions ``start_position ...`` -> [N, t, hidden]."""
        t = input_ids.shape[1]
        positions = torch.arange(start_position, start_position + t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.norm(x))

    def forward_at(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids Long[N, t] at the positions ``positions`` (Long[t], a device tensor: no
        host synchronisation) -> [N, t, hidden]; the same values as :meth:`forward`."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.norm(x))


class CaptionSelfAttention(nn.Module):
    """Multi-head self-attention that can extend a key/value cache."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        assert hidden_size % num_heads == 0, (hidden_size, num_heads)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = CaptionLinear(hidden_size, 3 * hidden_size)
        self.proj = CaptionLinear(hidden_size, hidden_size)
        self.attn_dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        query_start: int = 0,
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            x: [N, L, C] the new tokens.
            attn_mask: Bool[L, L_total] or Bool[N, 1, L, L_total] (per row, for memories with
                padding), True where attending is allowed (None: everywhere).
            past_kv: cached K, V [N, heads, L_past, head_dim] of earlier tokens.
            query_start: only the tokens from this one on attend (and get an output); the
                earlier ones give keys and values only.

        Returns:
            [N, L - query_start, C] output and the K, V of all tokens so far
            [N, heads, L_past + L, head_dim].
        """
        n, length, c = x.shape
        if query_start:
            # Keys and values of every token, queries of the attending ones only.
            weight, bias = self.qkv.weight, self.qkv.bias
            k, v = F.linear(x, weight[c:], bias[c:]).split(c, dim=2)
            q = F.linear(x[:, query_start:], weight[:c], bias[:c])
            if attn_mask is not None:
                attn_mask = attn_mask[..., query_start:, :]
        else:
            q, k, v = self.qkv(x).split(c, dim=2)
        queries = length - query_start
        q = q.view(n, queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        y = attention(q, k, v, attn_mask, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(n, queries, c)
        return self.proj(y), (k, v)

    def forward_cached(
        self,
        x: torch.Tensor,
        cache: StaticKVCache,
        layer: int,
        write_index: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        num_keys: Optional[int] = None,
    ) -> torch.Tensor:
        """Attention of new tokens over a static cache, their keys/values written into it.

        Args:
            x: [N, t, C] the new tokens.
            cache: the static cache; ``layer``: this layer's index in it.
            write_index: Long[t], the new tokens' absolute positions in the cache.
            attn_mask: Bool, broadcastable to [N, heads, t, keys], True where attending is
                allowed (None: every key attended).
            num_keys: attend over the first so many positions (eager decoding, the tokens
                written so far, the new ones last: ``write_index`` is then
                ``num_keys - t ... num_keys - 1``); None: over all of them, under
                ``attn_mask`` (fixed shapes).

        Returns:
            [N, t, C].
        """
        n, length, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        if num_keys is None:
            cache.write(layer, write_index, k, v)
        else:  # the host knows the new tokens are the last of the first num_keys positions
            cache.write(layer, write_index, k, v, start=num_keys - length)
        keys, values = cache.layer(layer)
        if num_keys is not None:
            keys, values = keys[:, :, :num_keys], values[:, :, :num_keys]
        y = attention(q, keys, values, attn_mask, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(n, length, c)
        return self.proj(y)


class CaptionDecoderLayer(nn.Module):
    """BERT layer, post-norm: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``."""

    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, eps: float
    ):
        super().__init__()
        self.attn = CaptionSelfAttention(hidden_size, num_heads, dropout)
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.fc1 = CaptionLinear(hidden_size, intermediate_size)
        self.fc2 = CaptionLinear(intermediate_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = CaptionDropout(dropout)

    def forward(self, x, attn_mask=None, past_kv=None, query_start: int = 0):
        """x [N, L, C] -> ([N, L - query_start, C], K/V of all tokens so far): the states of
        the tokens from ``query_start`` on (the earlier ones are keys and values only)."""
        attn_out, kv = self.attn(x, attn_mask=attn_mask, past_kv=past_kv, query_start=query_start)
        if query_start:
            x = x[:, query_start:]
        x = self.norm1(x + self.dropout(attn_out))
        x = self.norm2(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))
        return x, kv

    def forward_cached(self, x, cache, layer, write_index, attn_mask, num_keys=None):
        """:meth:`forward` of new tokens over a static cache (see
        :meth:`CaptionSelfAttention.forward_cached`); inference only."""
        attn_out = self.attn.forward_cached(x, cache, layer, write_index, attn_mask, num_keys)
        x = self.norm1(x + self.dropout(attn_out))
        x = self.norm2(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))
        return x


def _layout_embedding(in_dim: int, hidden_size: int, eps: float) -> nn.Sequential:
    """Box features -> a decoder-width embedding, layer-normalised like the memory tokens it
    is added to. Without the norm, BERT's N(0, 0.02) initialisation makes a two-layer MLP's
    output about a hundred times smaller than a normalised token; the decoder then learns to
    name objects long before it learns where they are (on shapes_val, relation truth 51 %
    without the norm and 77 % with it, same head trained 600 steps on the same features)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_size),
        nn.GELU(),
        nn.Linear(hidden_size, hidden_size),
        nn.LayerNorm(hidden_size, eps=eps),
    )


@CAPTION_HEAD_REGISTRY.register()
class DenseCaptionHead(nn.Module):
    """Captions object queries with a BERT-style decoder over a per-object memory.

    The memory is two tokens (query, global) with ``memory="query_global"``; with
    ``memory="scene"`` it also holds the object's pixel features, box and the other objects
    of its image, and every call takes a ``scene`` (:class:`SceneContext`) for its objects.

    Use :meth:`loss` in training (teacher forcing) and :meth:`generate` at inference (greedy or
    beam search with a key/value cache). Token conventions: ``[BOS] words [EOS] [PAD]...``.
    """

    @configurable
    def __init__(
        self,
        *,
        query_dim: int = 512,
        global_dim: int = 512,
        hidden_size: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        max_length: int = 40,
        vocab_size: int = 30522,
        label_smoothing: float = 0.1,
        bottleneck_dim: int = 256,
        bottleneck_grad_scale: float = 1.0 / 3.0,
        bos_token_id: int = 101,
        eos_token_id: int = 102,
        pad_token_id: int = 0,
        layer_norm_eps: float = 1e-12,
        memory: str = "query_global",
        pixel_dims: Sequence[int] = (),
        max_scene_objects: int = 16,
    ):
        """
        Args:
            query_dim: D of the object query features.
            global_dim: Dg of the global image feature.
            hidden_size, num_layers, num_heads, intermediate_size, dropout: decoder shape.
            max_length: longest caption in tokens, [BOS] and [EOS] included.
            vocab_size: size of the WordPiece vocabulary (30,522 for BERT uncased).
            label_smoothing: of the caption cross-entropy.
            bottleneck_dim: width between each memory feature and the decoder.
            bottleneck_grad_scale: gradient multiplier into the memory features.
            bos_token_id, eos_token_id, pad_token_id: [CLS], [SEP], [PAD] of the tokenizer.
            layer_norm_eps: epsilon of every LayerNorm (BERT's 1e-12).
            memory: ``"query_global"`` (the paper's two tokens) or ``"scene"``.
            pixel_dims: with the scene memory, the channels of each pixel-decoder level that
                is mask-pooled (one memory token each).
            max_scene_objects: with the scene memory, at most this many other objects per
                object (see :meth:`scene_context`).
        """
        super().__init__()
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        if memory == "scene" and not pixel_dims:
            raise ValueError("the scene memory needs pixel_dims (channels of the pooled levels)")
        self.memory = memory
        self.max_scene_objects = max_scene_objects
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.label_smoothing = label_smoothing
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

        self.query_proj = MemoryProjection(
            query_dim, bottleneck_dim, hidden_size, bottleneck_grad_scale, layer_norm_eps
        )
        self.global_proj = MemoryProjection(
            global_dim, bottleneck_dim, hidden_size, bottleneck_grad_scale, layer_norm_eps
        )
        if memory == "scene":
            # Created only for the scene memory, so the paper's checkpoints keep their keys.
            self.pixel_projs = nn.ModuleList(
                MemoryProjection(
                    dim, bottleneck_dim, hidden_size, bottleneck_grad_scale, layer_norm_eps
                )
                for dim in pixel_dims
            )
            # Another object's look (its finest-level pooled features), added to its token.
            self.other_pixel_proj = MemoryProjection(
                pixel_dims[-1], bottleneck_dim, hidden_size, bottleneck_grad_scale, layer_norm_eps
            )
            # Box (with its width and height: the size words) -> position embedding, added to
            # the object's query token.
            self.box_embed = _layout_embedding(BOX_FEATURE_DIM, hidden_size, layer_norm_eps)
            # Another object's box and how it lies relative to the captioned object's
            # (pair_box_features): the side a relation states is read off directly instead
            # of compared across tokens.
            self.other_box_embed = _layout_embedding(PAIR_FEATURE_DIM, hidden_size, layer_norm_eps)
            # The object's own query token and another object's are made by the same
            # projection; a learned type per role (self, global, pixel, other) tells them apart.
            self.memory_type_embeddings = nn.Embedding(4, hidden_size)
        self.embeddings = CaptionEmbeddings(
            vocab_size, hidden_size, max_length, dropout, layer_norm_eps
        )
        self.layers = nn.ModuleList(
            CaptionDecoderLayer(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        # BERT's LM head: a transform, then a projection tied to the word embeddings (+ bias).
        self.lm_transform = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size, eps=layer_norm_eps),
        )
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        # (weight, bias) of the output layer in oneDNN's layout while a CPU decoding runs.
        self._decoding_output_layer: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, cfg, tokenizer=None):
        """Keyword arguments from ``cfg``; the vocabulary facts come from the tokenizer.

        Args:
            tokenizer: the caption tokenizer; None: built from ``MODEL.CAPTION_HEAD.VOCAB_FILE``
                (the packaged vocabulary when empty).
        """
        head = cfg.MODEL.CAPTION_HEAD
        if tokenizer is None:
            tokenizer = build_caption_tokenizer(head.VOCAB_FILE)
        # A partial config without MEMORY (built by hand, not by get_cfg) means the paper's.
        memory = head.get("MEMORY", "query_global")
        kwargs = {
            # The memory is the decoder's query and the max-pooled coarsest pixel-decoder
            # level, so the widths are those of the modules that produce them.
            "query_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            "global_dim": cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            "hidden_size": head.HIDDEN_SIZE,
            "num_layers": head.NUM_LAYERS,
            "num_heads": head.NUM_HEADS,
            "intermediate_size": head.INTERMEDIATE_SIZE,
            "dropout": head.DROPOUT,
            "max_length": head.MAX_LENGTH,
            "label_smoothing": head.LABEL_SMOOTHING,
            "bottleneck_dim": head.BOTTLENECK_DIM,
            "bottleneck_grad_scale": head.BOTTLENECK_GRAD_SCALE,
            "memory": memory,
            **caption_vocab_kwargs(tokenizer),
        }
        if memory == "scene":
            # Pooled levels: the pixel decoder's multi-scale levels (the ones the transformer
            # decoder reads, CONVS_DIM wide), then its 1/4 mask features (MASK_DIM wide).
            seg_head = cfg.MODEL.SEM_SEG_HEAD
            kwargs["pixel_dims"] = (seg_head.CONVS_DIM,) * 3 + (seg_head.MASK_DIM,)
            kwargs["max_scene_objects"] = head.SCENE_MAX_OBJECTS
        return kwargs

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -----------------------------------------------------------------------------------------
    # Building blocks
    # -----------------------------------------------------------------------------------------
    def encode_memory(
        self,
        query_feats: torch.Tensor,
        global_feats: Optional[torch.Tensor] = None,
        scene: Optional[SceneContext] = None,
    ) -> torch.Tensor:
        """Memory tokens of each object.

        Args:
            query_feats: [N, Dq]; global_feats: [N, Dg] or None.
            scene: the objects' scene facts; required by (and only by) the scene memory.

        Returns:
            [N, M, C]: M = 2 (query, global), or 1 without a global feature; the scene memory
            adds one token per pixel level and S other-object slots, some of them padding
            (see :meth:`encode_scene_memory` for which).
        """
        return self.encode_scene_memory(query_feats, global_feats, scene)[0]

    def encode_scene_memory(
        self,
        query_feats: torch.Tensor,
        global_feats: Optional[torch.Tensor] = None,
        scene: Optional[SceneContext] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Memory tokens and which of them are real.

        Returns:
            memory [N, M, C] and Bool[N, M] (False on padding), or None for the paper's memory
            (no padding). Scene memory order: self query (+ box), global, pixel levels,
            other objects (query + box + finest pooled features each).
        """
        self._check_scene(scene)
        if scene is None:
            tokens = [self.query_proj(query_feats)]
            if global_feats is not None:
                tokens.append(self.global_proj(global_feats.to(query_feats.dtype)))
            return torch.stack(tokens, dim=1), None

        dtype = query_feats.dtype
        types = self.memory_type_embeddings.weight.to(dtype)  # [4, C]
        own_box = box_features(scene.boxes.to(dtype))  # [N, 8]
        own = self.query_proj(query_feats) + self.box_embed(own_box) + types[0]
        tokens = [own]
        if global_feats is not None:
            tokens.append(self.global_proj(global_feats.to(dtype)) + types[1])
        if len(scene.pixel_feats) != len(self.pixel_projs):
            raise ValueError(
                f"the scene has {len(scene.pixel_feats)} pixel levels, the head "
                f"{len(self.pixel_projs)}"
            )
        for proj, feats in zip(self.pixel_projs, scene.pixel_feats):
            tokens.append(proj(feats.to(dtype)) + types[2])
        memory = torch.stack(tokens, dim=1)  # [N, M0, C]
        valid = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        if scene.other_valid.shape[1] > 0:
            others = self.query_proj(scene.other_feats.to(dtype))
            pair = pair_box_features(scene.boxes.to(dtype), scene.other_boxes.to(dtype))
            others = others + self.other_box_embed(pair) + types[3]
            others = others + self.other_pixel_proj(scene.other_pixel_feats.to(dtype))
            memory = torch.cat([memory, others], dim=1)
            valid = torch.cat([valid, scene.other_valid.to(memory.device).bool()], dim=1)
        return memory, valid

    def _check_scene(self, scene: Optional[SceneContext]) -> None:
        if self.memory == "scene" and scene is None:
            raise ValueError("the scene memory needs a SceneContext (scene=...) for its objects")
        if self.memory != "scene" and scene is not None:
            raise ValueError(f"a scene was given but the head's memory is {self.memory!r}")

    def scene_context(
        self,
        query_feats: torch.Tensor,
        mask_probs: torch.Tensor,
        pixel_maps: Sequence[torch.Tensor],
        captioned: Optional[torch.Tensor] = None,
        window: Optional[torch.Tensor] = None,
        *,
        boxes: Optional[torch.Tensor] = None,
        pooled: Optional[Sequence[torch.Tensor]] = None,
    ) -> SceneContext:
        """Scene facts of the objects of one image, at most ``max_scene_objects`` others each.

        See :func:`scene_memory.scene_context` for the arguments.
        """
        return scene_context(
            query_feats,
            mask_probs,
            pixel_maps,
            captioned,
            max_objects=self.max_scene_objects,
            window=window,
            boxes=boxes,
            pooled=pooled,
        )

    @staticmethod
    def attention_mask(num_memory: int, num_text: int, device=None) -> torch.Tensor:
        """Bool[M+T, M+T], True = may attend: memory -> memory; text -> memory + earlier text."""
        length = num_memory + num_text
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask[:, :num_memory] = True
        return mask

    @staticmethod
    def _key_padding(memory_valid: torch.Tensor, num_text: int) -> torch.Tensor:
        """Bool[N, 1, 1, M + t]: which keys exist (memory_valid, then t text tokens)."""
        text = memory_valid.new_ones((memory_valid.shape[0], num_text))
        return torch.cat([memory_valid, text], dim=1)[:, None, None, :]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., C] decoder states -> [..., V] next-token logits."""
        states = self.lm_transform(hidden)
        if _onednn_ready(states, self._decoding_output_layer):
            return _onednn_linear(states, self._decoding_output_layer)
        return F.linear(states, self.embeddings.word_embeddings.weight, self.lm_bias)

    @contextmanager
    def _onednn_weights(self, device: torch.device):
        """Inside, the output layer (:meth:`lm_logits`) and the decoder layers' projections
        with at least ``_ONEDNN_MIN_WEIGHTS`` fp32 weights multiply through oneDNN, from
        copies of their weights in its layout made here and dropped at the end, when decoding
        on the CPU. For the few rows of a decoding step oneDNN reads a weight faster than the
        default BLAS (16 rows, 2 threads: the 30,522 x 768 output layer 7 against 16 ms, the
        768 x 3,072 FFN projection 0.55 against 0.90 ms; never slower for more rows), with
        results a few ulps apart. Elsewhere nothing changes."""
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            yield
            return

        def large(weight: torch.Tensor) -> bool:
            return weight.dtype == torch.float32 and weight.numel() >= _ONEDNN_MIN_WEIGHTS

        def copy(weight: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return weight.detach().to_mkldnn(), bias.detach().to_mkldnn()

        projections = [
            m for m in self.layers.modules()
            if isinstance(m, CaptionLinear) and m.bias is not None and large(m.weight)
        ]
        try:
            for m in projections:
                m.onednn_weights = copy(m.weight, m.bias)
            weight = self.embeddings.word_embeddings.weight
            if large(weight):
                self._decoding_output_layer = copy(weight, self.lm_bias)
            yield
        finally:
            self._decoding_output_layer = None
            for m in projections:
                m.onednn_weights = None

    def _decode_text(
        self,
        memory: torch.Tensor,
        input_ids: torch.Tensor,
        memory_valid: Optional[torch.Tensor] = None,
        return_memory: bool = False,
        memory_states_last: bool = True,
    ):
        """Full (uncached) pass -> text states [N, t, C].

        Args:
            memory: [N, M, C]; input_ids: Long[N, t].
            memory_valid: Bool[N, M], False on memory padding (None: no padding).
            return_memory: also return the memory's last-layer states [N, M, C] (first).
            memory_states_last: compute the memory's states in the last layer too; False
                (without ``return_memory``): there the memory gives keys and values only, as
                no later layer reads its states (the text states are the same up to rounding,
                for about a fifth less work with the shapes model's 13 memory tokens).
        """
        num_memory = memory.shape[1]
        x = torch.cat([memory, self.embeddings(input_ids)], dim=1)
        mask = self.attention_mask(num_memory, input_ids.shape[1], device=x.device)
        if memory_valid is not None:
            # [N, 1, M+t, M+t]: no query, memory or text, attends to a padded slot.
            mask = mask[None, None] & self._key_padding(memory_valid, input_ids.shape[1])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last and not (memory_states_last or return_memory):
                return layer(x, attn_mask=mask, query_start=num_memory)[0]
            x, _ = layer(x, attn_mask=mask)
        if return_memory:
            return x[:, :num_memory], x[:, num_memory:]
        return x[:, num_memory:]

    def forward(
        self,
        query_feats: torch.Tensor,
        global_feats: Optional[torch.Tensor],
        input_ids: torch.Tensor,
        scene: Optional[SceneContext] = None,
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            query_feats: [N, Dq]; global_feats: [N, Dg] or None.
            input_ids: Long[N, t], t <= max_length.
            scene: the objects' scene facts (scene memory only).

        Returns:
            [N, t, V] logits; position i predicts token i + 1.
        """
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"captions of {input_ids.shape[1]} tokens exceed max_length={self.max_length}"
            )
        memory, memory_valid = self.encode_scene_memory(query_feats, global_feats, scene)
        states = self._decode_text(memory, input_ids, memory_valid, memory_states_last=False)
        return self.lm_logits(states)

    def loss(
        self,
        query_feats: torch.Tensor,
        global_feats: Optional[torch.Tensor],
        tokens: torch.Tensor,
        scene: Optional[SceneContext] = None,
        has_targets: Optional[bool] = None,
    ) -> torch.Tensor:
        """Label-smoothed cross-entropy of every non-pad next token.

        Args:
            query_feats: [N, Dq]; global_feats: [N, Dg] or None.
            tokens: Long[N, T] ``[BOS] words [EOS] [PAD]...``.
            scene: the objects' scene facts (scene memory only).
            has_targets: whether some target token is not [PAD], when the caller knows it
                (the criterion passes only rows with a caption); None: read from ``tokens``
                (a device-to-host copy when they are on an accelerator).

        Returns:
            scalar, the mean over the non-pad target tokens (0, with a graph, if there are none).
        """
        targets = tokens[:, 1:]
        logits = self(query_feats, global_feats, tokens[:, :-1], scene=scene)
        if has_targets is None:
            has_targets = bool((targets != self.pad_token_id).any())
        if not has_targets:
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=self.pad_token_id,
            label_smoothing=self.label_smoothing,
        )

    # -----------------------------------------------------------------------------------------
    # Decoding
    # -----------------------------------------------------------------------------------------
    def _memory_cache(
        self, memory: torch.Tensor, memory_valid: Optional[torch.Tensor] = None
    ) -> KVCache:
        """K/V of the memory in every layer; memory attends to memory only, so no text needed.

        memory [N, M, C]; memory_valid: Bool[N, M], False on padding (None: no padding).
        """
        mask = None if memory_valid is None else self._key_padding(memory_valid, 0)
        cache = []
        x = memory
        for layer in self.layers:
            x, kv = layer(x, attn_mask=mask)
            cache.append(kv)
        return cache

    def next_token_logits(
        self, hidden: torch.Tensor, memory: torch.Tensor, memory_valid: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """[N, C] decoder states of the newest tokens -> [N, V] next-token logits (or log-
        probabilities). A head that reads words from its memory overrides this (and, if the
        override reads nothing but its arguments and parameters, may declare it capturable:
        see :meth:`_decode_step_capturable`)."""
        return self.lm_logits(hidden)

    def _decode_step_capturable(self) -> bool:
        """Whether a decoding step may be captured as a CUDA graph: everything it reads must
        be the step's own buffers or the head's parameters. True unless a subclass overrides
        :meth:`next_token_logits` (its override may read tensors set per call, which a graph
        would keep reading at their first address); such a subclass can override this."""
        return type(self).next_token_logits is DenseCaptionHead.next_token_logits

    def _mask_logits(self, logits: torch.Tensor, prev_tokens: torch.Tensor, suppress_repeat: bool):
        """Forbid [BOS], [PAD] and (optionally) the previous token. logits [N, V] float."""
        logits[:, self.bos_token_id] = float("-inf")
        logits[:, self.pad_token_id] = float("-inf")
        if suppress_repeat:
            logits.scatter_(1, prev_tokens[:, None], float("-inf"))
        return logits

    @torch.no_grad()
    def generate(
        self,
        query_feats: torch.Tensor,
        global_feats: Optional[torch.Tensor] = None,
        *,
        max_length: Optional[int] = None,
        num_beams: int = 1,
        use_cache: bool = True,
        suppress_repeat: bool = True,
        return_scores: bool = False,
        scene: Optional[SceneContext] = None,
        fixed_shapes: Optional[bool] = None,
        use_cuda_graph: Optional[bool] = None,
        stop_check_interval: Optional[int] = None,
    ):
        """Caption N objects at once (call in eval mode).

        Args:
            query_feats: [N, Dq]; global_feats: [N, Dg] or None.
            scene: the objects' scene facts (scene memory only); their memories may differ in
                length, padding is masked.
            max_length: tokens per caption, [BOS] and [EOS] included (default: the head's).
            num_beams: 1 = greedy; more = beam search, the best beam chosen by the mean
                log-probability per generated token.
            use_cache: reuse keys/values of earlier tokens (a static cache, see
                :mod:`.kv_cache`); False re-runs the whole sequence every step (same result,
                for tests and benchmarks).
            suppress_repeat: forbid emitting the previous token again.
            return_scores: also return each caption's mean token log-probability.
            fixed_shapes: every step attends over the whole preallocated cache under a mask
                and reads nothing on the host (the step a CUDA graph captures); False: each
                step attends over the tokens written so far. None: True on a CUDA device.
            use_cuda_graph: capture the fixed-shape step once as a CUDA graph and replay it
                for every token (CUDA only; graphs are kept per batch shape, the number of
                objects rounded up to a multiple of 8). None: on a CUDA device in eval mode.
            stop_check_interval: with fixed shapes, test whether every caption has ended only
                every so many steps (a host synchronisation; the steps in between change
                nothing once all have ended). None: 8 with fixed shapes, else every step.

        Returns:
            Long[N, L] (L <= max_length) rows ``[BOS] words [EOS] [PAD]...`` (no [EOS] where
            the length ran out); with ``return_scores`` also Float[N].
        """
        # [N, M, C], Bool[N, M] or None
        memory, memory_valid = self.encode_scene_memory(query_feats, global_feats, scene)
        return self.generate_from_memory(
            memory,
            memory_valid,
            max_length=max_length,
            num_beams=num_beams,
            use_cache=use_cache,
            suppress_repeat=suppress_repeat,
            return_scores=return_scores,
            fixed_shapes=fixed_shapes,
            use_cuda_graph=use_cuda_graph,
            stop_check_interval=stop_check_interval,
        )

    @torch.no_grad()
    def generate_from_memory(
        self,
        memory: torch.Tensor,
        memory_valid: Optional[torch.Tensor] = None,
        *,
        max_length: Optional[int] = None,
        num_beams: int = 1,
        use_cache: bool = True,
        suppress_repeat: bool = True,
        return_scores: bool = False,
        fixed_shapes: Optional[bool] = None,
        use_cuda_graph: Optional[bool] = None,
        stop_check_interval: Optional[int] = None,
    ):
        """:meth:`generate` from encoded memory tokens: ``memory`` [N, M, C] and
        ``memory_valid`` Bool[N, M] (False on padding; None: no padding). Same arguments and
        results as :meth:`generate`."""
        max_length = self.max_length if max_length is None else max_length
        if not 2 <= max_length <= self.max_length:
            raise ValueError(f"max_length must be in [2, {self.max_length}], got {max_length}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        on_cuda = _graph_device(memory.device)
        if use_cuda_graph and not on_cuda:
            raise ValueError("use_cuda_graph needs the memory on a CUDA device")
        if fixed_shapes is None:
            fixed_shapes = use_cache and (on_cuda or bool(use_cuda_graph))
        if fixed_shapes and not use_cache:
            raise ValueError("fixed_shapes decodes with the key/value cache (use_cache=True)")
        if use_cuda_graph and not fixed_shapes:
            raise ValueError("use_cuda_graph captures the fixed-shape step (fixed_shapes=True)")
        if use_cuda_graph is None:
            use_cuda_graph = fixed_shapes and on_cuda and not self.training
            use_cuda_graph = use_cuda_graph and self._decode_step_capturable()
        if stop_check_interval is None:
            stop_check_interval = 8 if fixed_shapes else 1
        if stop_check_interval < 1:
            raise ValueError(f"stop_check_interval must be at least 1, got {stop_check_interval}")

        num_objects, beams = memory.shape[0], num_beams
        if num_objects == 0:
            tokens = torch.full((0, 1), self.bos_token_id, dtype=torch.long, device=memory.device)
            scores = memory.new_zeros(0, dtype=torch.float32)
            return (tokens, scores) if return_scores else tokens
        steps = max_length - 1
        if use_cuda_graph:
            entry = _decode_graph(self, memory, memory_valid, max_length, beams, suppress_repeat)
            state = entry.state
            self._run_graph_decode(entry, steps, stop_check_interval, suppress_repeat)
        else:
            with self._onednn_weights(memory.device):
                state = self._decode_state(
                    memory, memory_valid, max_length, beams, use_cache, num_objects, fixed_shapes
                )
                for step in range(steps):
                    self._decode_step(state, None if fixed_shapes else step, suppress_repeat)
                    if (step + 1) % stop_check_interval == 0 and bool(state.finished.all()):
                        break

        rows = num_objects * beams
        tokens, scores = state.tokens[:rows], state.scores[:rows]
        if use_cuda_graph:  # the graph's buffers are reused by the next call
            tokens, scores = tokens.clone(), scores.clone()
        num_generated = (tokens[:, 1:] != self.pad_token_id).sum(1).clamp(min=1)
        mean_scores = scores / num_generated
        if beams > 1:
            best = mean_scores.view(num_objects, beams).argmax(dim=1)
            pick = torch.arange(num_objects, device=memory.device) * beams + best
            tokens, mean_scores = tokens[pick], mean_scores[pick]
        # Drop trailing all-[PAD] columns (every caption ended before them).
        length = int((tokens != self.pad_token_id).sum(1).max())
        tokens = tokens[:, :length]
        if return_scores:
            return tokens, mean_scores
        return tokens

    # -----------------------------------------------------------------------------------------
    # Decoding steps (one token per row, on a DecodeState, in place)
    # -----------------------------------------------------------------------------------------
    def _decode_state(
        self,
        memory: torch.Tensor,
        memory_valid: Optional[torch.Tensor],
        max_length: int,
        beams: int,
        use_cache: bool,
        num_real: int,
        fixed_shapes: bool = True,
        state: Optional[DecodeState] = None,
    ) -> DecodeState:
        """A decoding's state at its start: ``[BOS]`` in every row, the memory's keys/values
        in the cache (``use_cache``).

        Args:
            memory: [N, M, C], memory_valid: Bool[N, M] or None: N objects, the first
                ``num_real`` of them real; the others pad a batch to a fixed shape and are
                finished from the start.
            fixed_shapes: the steps will attend over the whole cache (it starts at zeros).
            state: a state of the same shapes to refill in place (its buffers keep their
                addresses, as a captured graph needs); None: a new one.
        """
        device = memory.device
        num_objects = memory.shape[0]
        num_memory = memory.shape[1]
        if beams > 1:
            # [N*B, M, C]: the beams of one object are adjacent rows.
            memory = memory.repeat_interleave(beams, dim=0)
            if memory_valid is not None:
                memory_valid = memory_valid.repeat_interleave(beams, dim=0)
        rows = memory.shape[0]
        max_text = max_length - 1  # [BOS] and every generated token but the last are fed
        memory_kv = self._memory_cache(memory, memory_valid) if use_cache else None
        key_valid = None
        if memory_valid is not None:
            text = memory_valid.new_ones((rows, max_text))
            key_valid = torch.cat([memory_valid, text], dim=1)[:, None, None, :]
        elif use_cache:
            key_valid = torch.ones(
                (1, 1, 1, num_memory + max_text), dtype=torch.bool, device=device
            )

        if state is None:
            cache = None
            if use_cache:
                k0 = memory_kv[0][0]
                cache = StaticKVCache(
                    len(self.layers),
                    rows,
                    k0.shape[1],
                    num_memory,
                    max_text,
                    k0.shape[3],
                    dtype=k0.dtype,
                    device=device,
                    zeros=fixed_shapes,
                )
            state = DecodeState(
                memory=memory,
                memory_valid=memory_valid,
                cache=cache,
                key_valid=key_valid,
                key_index=torch.arange(num_memory + max_text, device=device),
                tokens=torch.full(
                    (rows, max_length), self.pad_token_id, dtype=torch.long, device=device
                ),
                position=torch.zeros(1, dtype=torch.long, device=device),
                finished=torch.zeros(rows, dtype=torch.bool, device=device),
                scores=torch.zeros(rows, device=device),  # summed log-probabilities
                num_objects=num_objects,
                beams=beams,
                object_offsets=torch.arange(num_objects, device=device) * beams,
                row_index=torch.arange(rows, device=device),
            )
        else:
            state.memory.copy_(memory)
            if memory_valid is not None:
                state.memory_valid.copy_(memory_valid)
            if key_valid is not None:
                state.key_valid.copy_(key_valid)
            if use_cache:
                state.cache.clear_text()
            state.tokens.fill_(self.pad_token_id)
            state.position.zero_()
            state.finished.zero_()
            state.scores.zero_()
        if use_cache:
            state.cache.fill_memory(memory_kv)
        state.tokens[:, 0] = self.bos_token_id
        if num_real < num_objects:
            state.finished[num_real * beams :] = True
        if beams > 1:
            # All beams start identical: keep only the first alive at step 0 to avoid duplicates.
            state.scores.view(num_objects, beams)[:, 1:] = float("-inf")
        return state

    def _decode_step(
        self, state: DecodeState, position: Optional[int], suppress_repeat: bool
    ) -> None:
        """Feed every row's newest token and write the next one, in place.

        ``position``: the step's text position when the host knows it (eager decoding: the
        step attends over the tokens written so far and, in beam search, gathers the cache
        into a second buffer); None: fixed shapes, the position is read from
        ``state.position`` on the device and the step reads no value on the host (it can be
        captured as a CUDA graph).
        Rows that have finished write [PAD] at no cost; once every row has, a step changes
        nothing, so the host may test for the end only every few steps.
        """
        pos = state.position
        last = state.tokens.index_select(1, pos)  # [rows, 1], the newest tokens
        if state.cache is None:
            if position is None:
                raise ValueError("recomputation (no cache) needs the host's position")
            inputs = state.tokens[:, : position + 1]
            hidden = self._decode_text(state.memory, inputs, state.memory_valid)[:, -1]
        else:
            hidden = self._cached_hidden(state, last, position)
        logits = self.next_token_logits(hidden, state.memory, state.memory_valid)
        logits = self._mask_logits(logits.float(), last[:, 0], suppress_repeat)
        log_probs = F.log_softmax(logits, dim=-1)  # [rows, V]

        finished = state.finished
        if state.beams == 1:
            next_tokens = logits.argmax(dim=-1)
            token_scores = log_probs.gather(1, next_tokens[:, None]).squeeze(1)
            next_tokens = torch.where(finished, self.pad_token_id, next_tokens)
            state.scores.add_(torch.where(finished, 0.0, token_scores))
        else:
            next_tokens = self._beam_step(state, log_probs, position)
        state.tokens.index_copy_(1, pos + 1, next_tokens[:, None])
        state.finished.logical_or_(next_tokens == self.eos_token_id)
        pos.add_(1)

    def _cached_hidden(
        self, state: DecodeState, last: torch.Tensor, position: Optional[int]
    ) -> torch.Tensor:
        """Last-layer states [rows, C] of the newest tokens ``last`` (Long[rows, 1]), their
        keys/values written into the cache."""
        num_memory = state.num_memory
        write_index = state.position + num_memory  # Long[1]
        x = self.embeddings.forward_at(last, state.position)
        if position is None:
            # Fixed shapes: every cached position, those not written yet masked.
            num_keys = None
            mask = state.key_valid & (state.key_index <= write_index)
        else:
            num_keys = num_memory + position + 1
            mask = None if state.memory_valid is None else state.key_valid[..., :num_keys]
        for i, layer in enumerate(self.layers):
            x = layer.forward_cached(x, state.cache, i, write_index, mask, num_keys)
        return x[:, -1]

    def _beam_step(
        self, state: DecodeState, log_probs: torch.Tensor, position: Optional[int]
    ) -> torch.Tensor:
        """Keep the best ``beams`` extensions of each object's beams: reorders the rows of the
        state (tokens, finished, scores, cache) in place; returns the next tokens Long[rows]."""
        finished = state.finished
        # A finished beam can only be extended by [PAD], at no cost.
        log_probs.masked_fill_(finished[:, None], float("-inf"))
        log_probs[:, self.pad_token_id].masked_fill_(finished, 0.0)
        vocab = log_probs.shape[1]
        candidates = (state.scores[:, None] + log_probs).view(
            state.num_objects, state.beams * vocab
        )
        top_scores, top_index = candidates.topk(state.beams, dim=1)  # [N, B]
        origin = (top_index // vocab + state.object_offsets[:, None]).view(-1)
        next_tokens = (top_index % vocab).view(-1)
        top_scores = top_scores.view(-1)
        if position is None:
            # The host may run steps after every row finished: they must change nothing (in
            # eager decoding the loop has stopped by then). Ties could otherwise swap beams.
            done = finished.all()
            origin = torch.where(done, state.row_index, origin)
            next_tokens = torch.where(done, self.pad_token_id, next_tokens)
            top_scores = torch.where(done, state.scores, top_scores)
        state.scores.copy_(top_scores)
        state.tokens.copy_(state.tokens.index_select(0, origin))
        state.finished.copy_(finished.index_select(0, origin))
        if state.cache is not None:
            state.cache.reorder_(origin, in_place=position is None)
        return next_tokens

    def _run_graph_decode(
        self, entry: "_DecodeGraph", steps: int, stop_check_interval: int, suppress_repeat: bool
    ) -> None:
        """Decode ``steps`` tokens on ``entry.state`` by replaying its captured step (captured
        at its first use, after warm-up steps that are this decoding's first steps)."""
        state, step = entry.state, 0

        def decode_step() -> None:
            self._decode_step(state, None, suppress_repeat)

        if entry.graph is None and entry.capturable and steps > _WARMUP_STEPS:
            device = state.tokens.device
            _warm_up(decode_step, device, _WARMUP_STEPS)
            step = _WARMUP_STEPS
            try:
                entry.graph = _capture(decode_step, device)
            except Exception as e:  # an op that cannot be captured: decode eagerly
                entry.capturable = False
                logger.warning("caption decoding: CUDA graph capture failed, eager steps (%s)", e)
        while step < steps:
            if entry.graph is not None:
                entry.graph.replay()
            else:
                decode_step()
            step += 1
            if step % stop_check_interval == 0 and bool(state.finished.all()):
                break


# Weights of at least this many elements (4 MB in fp32) multiply through oneDNN while decoding
# on the CPU; below, the default BLAS is as fast (768 x 768, 2,000 x 256: even for 16 rows).
_ONEDNN_MIN_WEIGHTS = 1 << 20

_WARMUP_STEPS = 2  # eager steps before a step is captured (lazy initialisations run in them)


def _graph_device(device: torch.device) -> bool:
    """Whether decoding on ``device`` can capture CUDA graphs."""
    return device.type == "cuda"


def _warm_up(step: Callable[[], None], device: torch.device, count: int) -> None:
    """Run ``step`` ``count`` times on a side stream, as CUDA graph capture requires before
    capturing (cuBLAS handles, workspaces and the like are created outside the capture)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(count):
            step()
    torch.cuda.current_stream(device).wait_stream(side)


def _capture(step: Callable[[], None], device: torch.device):
    """A CUDA graph of one call of ``step`` (recorded, not run); ``replay()`` runs it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph):
        step()
    return graph


class _DecodeGraph:
    """A captured decoding step and the state buffers it reads and writes."""

    def __init__(self, state: DecodeState):
        self.state = state
        self.graph = None  # torch.cuda.CUDAGraph once captured
        self.capturable = True


# Per head: {shape key: _DecodeGraph}, most recently used last. Kept off the module so that
# copying or pickling a head never meets a CUDA graph.
_DECODE_GRAPHS: "weakref.WeakKeyDictionary[DenseCaptionHead, OrderedDict]" = (
    weakref.WeakKeyDictionary()
)
_MAX_DECODE_GRAPHS = 4  # per head


def _graph_objects(n: int) -> int:
    """Objects of a graph's batch: ``n`` rounded up to a multiple of 8, so that images with
    different numbers of segments share graphs."""
    return -(-n // 8) * 8


def _decode_graph(
    head: DenseCaptionHead,
    memory: torch.Tensor,
    memory_valid: Optional[torch.Tensor],
    max_length: int,
    beams: int,
    suppress_repeat: bool,
) -> _DecodeGraph:
    """The graph (state and, once captured, CUDA graph) for this batch's shapes, its state
    filled with ``memory``: padded with copies of its last object (finished from the start)
    and, where the memory has padding already (``memory_valid``), with masked memory tokens,
    so that batches of about the same size share a graph."""
    num_real = memory.shape[0]
    num_objects = _graph_objects(num_real)
    if num_objects > num_real:
        pad = num_objects - num_real
        memory = torch.cat([memory, memory[-1:].expand(pad, -1, -1)])
        if memory_valid is not None:
            memory_valid = torch.cat([memory_valid, memory_valid[-1:].expand(pad, -1)])
    if memory_valid is not None and memory.shape[1] % 8:
        pad = 8 - memory.shape[1] % 8
        memory = F.pad(memory, (0, 0, 0, pad))
        memory_valid = F.pad(memory_valid, (0, pad), value=False)
    key = (
        num_objects,
        beams,
        tuple(memory.shape[1:]),
        memory.dtype,
        memory.device,
        memory_valid is not None,
        max_length,
        suppress_repeat,
        (head.bos_token_id, head.eos_token_id, head.pad_token_id),
        torch.is_inference_mode_enabled(),
        # A step captured under autocast has its casts baked in.
        torch.is_autocast_enabled(memory.device.type),
        torch.get_autocast_dtype(memory.device.type),
        # Parameters moved or replaced (``.to()``, a new dtype) invalidate the graphs.
        tuple(p.data_ptr() for p in head.parameters()),
    )
    graphs = _DECODE_GRAPHS.setdefault(head, OrderedDict())
    entry = graphs.pop(key, None)
    if entry is None:
        # Buffers of the graph's own: later calls refill them in place.
        memory = memory.clone()
        memory_valid = None if memory_valid is None else memory_valid.clone()
        state = head._decode_state(memory, memory_valid, max_length, beams, True, num_real)
        entry = _DecodeGraph(state)
    else:
        head._decode_state(
            memory, memory_valid, max_length, beams, True, num_real, True, entry.state
        )
    graphs[key] = entry
    while len(graphs) > _MAX_DECODE_GRAPHS:
        graphs.popitem(last=False)
    return entry
