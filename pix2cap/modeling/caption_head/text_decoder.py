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
sequence at every step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config.config import configurable

from .build import CAPTION_HEAD_REGISTRY
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
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, start_position: int = 0) -> torch.Tensor:
        """input_ids Long[N, t] at positions ``start_position ...`` -> [N, t, hidden]."""
        t = input_ids.shape[1]
        positions = torch.arange(start_position, start_position + t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.norm(x))


class CaptionSelfAttention(nn.Module):
    """Multi-head self-attention that can extend a key/value cache."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        assert hidden_size % num_heads == 0, (hidden_size, num_heads)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            x: [N, L, C] the new tokens.
            attn_mask: Bool[L, L_total] or Bool[N, 1, L, L_total] (per row, for memories with
                padding), True where attending is allowed (None: everywhere).
            past_kv: cached K, V [N, heads, L_past, head_dim] of earlier tokens.

        Returns:
            [N, L, C] output and the K, V of all tokens so far [N, heads, L_past + L, head_dim].
        """
        n, length, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(n, length, c)
        return self.proj(y), (k, v)


class CaptionDecoderLayer(nn.Module):
    """BERT layer, post-norm: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``."""

    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, eps: float
    ):
        super().__init__()
        self.attn = CaptionSelfAttention(hidden_size, num_heads, dropout)
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None, past_kv=None):
        """x [N, L, C] -> ([N, L, C], K/V of all tokens so far)."""
        attn_out, kv = self.attn(x, attn_mask=attn_mask, past_kv=past_kv)
        x = self.norm1(x + self.dropout(attn_out))
        x = self.norm2(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))
        return x, kv


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
        return F.linear(
            self.lm_transform(hidden), self.embeddings.word_embeddings.weight, self.lm_bias
        )

    def _decode_text(
        self,
        memory: torch.Tensor,
        input_ids: torch.Tensor,
        memory_valid: Optional[torch.Tensor] = None,
        return_memory: bool = False,
    ):
        """Full (uncached) pass -> text states [N, t, C].

        Args:
            memory: [N, M, C]; input_ids: Long[N, t].
            memory_valid: Bool[N, M], False on memory padding (None: no padding).
            return_memory: also return the memory's last-layer states [N, M, C] (first).
        """
        num_memory = memory.shape[1]
        x = torch.cat([memory, self.embeddings(input_ids)], dim=1)
        mask = self.attention_mask(num_memory, input_ids.shape[1], device=x.device)
        if memory_valid is not None:
            # [N, 1, M+t, M+t]: no query, memory or text, attends to a padded slot.
            mask = mask[None, None] & self._key_padding(memory_valid, input_ids.shape[1])
        for layer in self.layers:
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
        return self.lm_logits(self._decode_text(memory, input_ids, memory_valid))

    def loss(
        self,
        query_feats: torch.Tensor,
        global_feats: Optional[torch.Tensor],
        tokens: torch.Tensor,
        scene: Optional[SceneContext] = None,
    ) -> torch.Tensor:
        """Label-smoothed cross-entropy of every non-pad next token.

        Args:
            query_feats: [N, Dq]; global_feats: [N, Dg] or None.
            tokens: Long[N, T] ``[BOS] words [EOS] [PAD]...``.
            scene: the objects' scene facts (scene memory only).

        Returns:
            scalar, the mean over the non-pad target tokens (0, with a graph, if there are none).
        """
        targets = tokens[:, 1:]
        logits = self(query_feats, global_feats, tokens[:, :-1], scene=scene)
        if not bool((targets != self.pad_token_id).any()):
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

    def _cached_step(
        self,
        input_ids: torch.Tensor,
        position: int,
        cache: KVCache,
        memory_valid: Optional[torch.Tensor] = None,
    ):
        """One new token per row: Long[N, 1] at ``position`` -> ([N, C] state, extended cache).

        memory_valid: Bool[N, M] of the cached memory, False on padding (None: no padding).
        """
        x = self.embeddings(input_ids, start_position=position)
        mask = None
        if memory_valid is not None:
            # The new token sees the real memory and every text token so far (itself included).
            mask = self._key_padding(memory_valid, position + 1)
        new_cache = []
        for layer, past_kv in zip(self.layers, cache):
            x, kv = layer(x, attn_mask=mask, past_kv=past_kv)
            new_cache.append(kv)
        return x[:, -1], new_cache

    def next_token_logits(
        self, hidden: torch.Tensor, memory: torch.Tensor, memory_valid: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """[N, C] decoder states of the newest tokens -> [N, V] next-token logits (or log-
        probabilities). A head that reads words from its memory overrides this."""
        return self.lm_logits(hidden)

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
    ):
        """Caption N objects at once (call in eval mode).

        Args:
            query_feats: [N, Dq]; global_feats: [N, Dg] or None.
            scene: the objects' scene facts (scene memory only); their memories may differ in
                length, padding is masked.
            max_length: tokens per caption, [BOS] and [EOS] included (default: the head's).
            num_beams: 1 = greedy; more = beam search, the best beam chosen by the mean
                log-probability per generated token.
            use_cache: reuse keys/values of earlier tokens; False re-runs the whole sequence
                every step (same result, for tests and benchmarks).
            suppress_repeat: forbid emitting the previous token again.
            return_scores: also return each caption's mean token log-probability.

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
    ):
        """:meth:`generate` from encoded memory tokens: ``memory`` [N, M, C] and
        ``memory_valid`` Bool[N, M] (False on padding; None: no padding). Same arguments and
        results as :meth:`generate`."""
        max_length = self.max_length if max_length is None else max_length
        if not 2 <= max_length <= self.max_length:
            raise ValueError(f"max_length must be in [2, {self.max_length}], got {max_length}")
        num_objects = memory.shape[0]
        beams = num_beams
        device = memory.device
        if beams > 1:
            # [N*B, M, C]: the beams of one object are adjacent rows.
            memory = memory.repeat_interleave(beams, dim=0)
            if memory_valid is not None:
                memory_valid = memory_valid.repeat_interleave(beams, dim=0)
        rows = memory.shape[0]
        cache = self._memory_cache(memory, memory_valid) if use_cache else None

        tokens = torch.full((rows, 1), self.bos_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        scores = torch.zeros(rows, device=device)  # summed log-probabilities
        if beams > 1:
            # All beams start identical: keep only the first alive at step 0 to avoid duplicates.
            scores.view(num_objects, beams)[:, 1:] = float("-inf")

        for step in range(max_length - 1):
            if use_cache:
                hidden, cache = self._cached_step(tokens[:, -1:], step, cache, memory_valid)
            else:
                hidden = self._decode_text(memory, tokens, memory_valid)[:, -1]
            logits = self.next_token_logits(hidden, memory, memory_valid)
            logits = self._mask_logits(logits.float(), tokens[:, -1], suppress_repeat)
            log_probs = F.log_softmax(logits, dim=-1)  # [rows, V]

            if beams == 1:
                next_tokens = logits.argmax(dim=-1)
                token_scores = log_probs.gather(1, next_tokens[:, None]).squeeze(1)
                next_tokens = torch.where(finished, self.pad_token_id, next_tokens)
                scores = scores + torch.where(finished, 0.0, token_scores)
            else:
                # A finished beam can only be extended by [PAD], at no cost.
                log_probs[finished] = float("-inf")
                log_probs[finished, self.pad_token_id] = 0.0
                vocab = log_probs.shape[1]
                candidates = (scores[:, None] + log_probs).view(num_objects, beams * vocab)
                top_scores, top_index = candidates.topk(beams, dim=1)  # [N, B]
                origin = (
                    top_index // vocab + torch.arange(num_objects, device=device)[:, None] * beams
                )
                origin = origin.view(-1)
                next_tokens = (top_index % vocab).view(-1)
                scores = top_scores.view(-1)
                tokens = tokens[origin]
                finished = finished[origin]
                if use_cache:
                    cache = [(k[origin], v[origin]) for k, v in cache]
                if memory_valid is not None:
                    memory, memory_valid = memory[origin], memory_valid[origin]

            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            finished = finished | (next_tokens == self.eos_token_id)
            if bool(finished.all()):
                break

        num_generated = (tokens[:, 1:] != self.pad_token_id).sum(1).clamp(min=1)
        mean_scores = scores / num_generated
        if beams > 1:
            best = mean_scores.view(num_objects, beams).argmax(dim=1)
            pick = torch.arange(num_objects, device=device) * beams + best
            tokens, mean_scores = tokens[pick], mean_scores[pick]
        # Drop trailing all-[PAD] columns (every caption ended before them).
        length = int((tokens != self.pad_token_id).sum(1).max()) if tokens.shape[0] else 1
        tokens = tokens[:, :length]
        if return_scores:
            return tokens, mean_scores
        return tokens
