"""Grounded caption head: one detailed caption per image whose phrases point at segments.

The PGC task of COCONut-PanCap (PanCaper), in GLaMM / LISA's form. The head writes the image's
caption with each grounded phrase marked up as ``<p> phrase </p> [SEG]`` (``[SEG_STUFF]`` for a
stuff phrase), and the decoder state at each SEG token becomes the phrase's mask.

The decoder is the dense caption head's (same BERT-style blocks, KV-cached decoding), with its
own depth and maximum length. Its memory, per image, is a global token (the max-pooled
coarsest pixel-decoder level) and one *slot* per segment: the segment's query feature plus what
the query predicts, read off detached outputs (its class probabilities, the box of its mask in
the original image's normalised coordinates, the mask-pooled mask features: its look), plus a
learned slot position. In training the slots are the ground-truth segments in the order the
caption describes them (stuff as first named, then things in the order they open sentences),
each read through the query matched to it; at inference the kept segments, stuff top-down and
then things left to right. The order gives the decoder a monotone path through the image:
without it, on shapes, the head wrote the wrong stuff region for most images; with things in
order of first mention (relation targets interleaved) rather than of description, it skipped
and repeated objects.

A SEG state scores every slot (``seg_selection``: its query against the slot's state and,
with ``copy_captions``, an attention-pooled summary of the slot's caption words, so "the
green star" can be matched to the slot whose caption says "a small green dotted star"); its mask is the noisy-OR union of the slot
masks under those scores, so it is read from the same mask features as the panoptic masks,
and a phrase naming several segments ("two blue circles") selects several slots. At inference
the selected slots are the phrase's ``segment_ids``. A SEG that regresses a mask embedding of
its own (LISA's form) learned far slower at this scale: on shapes its masks were still at a
dice loss of 0.5 after 600 of 1,200 iterations, and 8 % of the ground-truth phrases were
recalled at the end.

With ``copy_captions`` the memory also holds each slot's caption (its dense caption: the
ground-truth description in training, the dense caption head's at inference) as word tokens,
and every next word is a pointer-generator mix: a learned gate between the vocabulary
distribution and a copy distribution, the decoder's attention over those words. The dense head
already states a segment's attributes right; copying them spares the grounded decoder learning
to read them from the slot's features, which a 2-layer decoder trained for 1,100 iterations on
shapes did not (its phrases named other objects than the segments their SEGs selected).

Training: cross-entropy of the markup (label-smoothed; with the copy mix its negative
log-likelihood), BCE of each SEG's slot selection, and point-sampled BCE + dice of its union
mask against the union of the ground-truth segments its phrase names.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config.config import configurable

from ..mask_losses import dice_loss, sigmoid_ce_loss
from ..point_sampling import point_sample
from .build import CAPTION_HEAD_REGISTRY
from .scene_memory import BOX_FEATURE_DIM, box_features, mask_boxes, mask_pool
from .text_decoder import DenseCaptionHead, MemoryProjection, _layout_embedding
from .tokenizer import PHRASE_OPEN, GroundedMarkupCodec, build_caption_tokenizer

__all__ = ["GroundedCaptionHead"]


@CAPTION_HEAD_REGISTRY.register()
class GroundedCaptionHead(DenseCaptionHead):
    """Writes one grounded caption per image and, for each of its SEG tokens, the segments
    (hence the mask) its phrase names.

    Use :meth:`image_memory` to build the memory from decoder outputs, :meth:`losses` in
    training and :meth:`generate_grounded` at inference. Token conventions as the dense head:
    ``[BOS] markup [EOS] [PAD]...``, markup ids from :class:`GroundedMarkupCodec`.
    """

    @configurable
    def __init__(
        self,
        *,
        query_dim: int,
        global_dim: int,
        mask_dim: int,
        num_classes: int,
        seg_token_ids: Sequence[int],
        hidden_size: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        max_length: int = 320,
        vocab_size: int = 30522,
        label_smoothing: float = 0.1,
        bottleneck_dim: int = 256,
        bottleneck_grad_scale: float = 1.0 / 3.0,
        bos_token_id: int = 101,
        eos_token_id: int = 102,
        pad_token_id: int = 0,
        layer_norm_eps: float = 1e-12,
        num_points: int = 12544,
        max_slots: int = 64,
        copy_captions: bool = False,
        max_slot_caption_length: int = 40,
        phrase_open_token_id: Optional[int] = None,
    ):
        """
        Args:
            query_dim: D of the transformer decoder's query features.
            global_dim: Dg of the global image feature.
            mask_dim: Cm of the mask features (a slot's look is pooled from them).
            num_classes: K; the class probabilities of a query have K + 1 entries.
            seg_token_ids: the ids of the SEG tokens (``GroundedMarkupCodec.seg_token_ids``).
            hidden_size, num_layers, num_heads, intermediate_size, dropout: decoder shape.
            max_length: longest caption in tokens, markup, [BOS] and [EOS] included.
            vocab_size: the caption vocabulary with the markup tokens.
            label_smoothing: of the caption cross-entropy.
            bottleneck_dim, bottleneck_grad_scale: of the memory projections.
            bos_token_id, eos_token_id, pad_token_id: [CLS], [SEP], [PAD].
            layer_norm_eps: of every LayerNorm.
            num_points: points per image (uniform) of the SEG mask loss.
            max_slots: most segments an image's memory holds.
            copy_captions: the memory also holds each slot's caption (the segments' dense
                captions), and every next word is a mix of the vocabulary distribution and a
                copy distribution over those captions' words (a pointer-generator).
            max_slot_caption_length: longest slot caption the memory holds, in tokens.
            phrase_open_token_id: the id of ``<p>``; with ``copy_captions``, a phrase copied
                from the start of a slot's caption is tied to that slot (see
                :meth:`generate_grounded`). None: SEG selection alone.
        """
        super().__init__(
            query_dim=query_dim,
            global_dim=global_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            dropout=dropout,
            max_length=max_length,
            vocab_size=vocab_size,
            label_smoothing=label_smoothing,
            bottleneck_dim=bottleneck_dim,
            bottleneck_grad_scale=bottleneck_grad_scale,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            layer_norm_eps=layer_norm_eps,
        )
        if not seg_token_ids:
            raise ValueError("the grounded caption head needs the ids of its SEG tokens")
        self.num_classes = num_classes
        self.num_points = num_points
        self.max_slots = max_slots
        self.copy_captions = copy_captions
        self.phrase_open_token_id = phrase_open_token_id
        self._copy_ids: Optional[torch.Tensor] = None  # set while generate_grounded decodes
        self.register_buffer(
            "seg_token_ids", torch.tensor(list(seg_token_ids), dtype=torch.long), persistent=False
        )
        # The same ids on the host, for planning the training losses without reading the device.
        self._host_seg_token_ids = frozenset(int(i) for i in seg_token_ids)

        new = nn.ModuleDict(
            {
                "look": MemoryProjection(
                    mask_dim, bottleneck_dim, hidden_size, bottleneck_grad_scale, layer_norm_eps
                ),
                "classes": nn.Linear(num_classes + 1, hidden_size),
                "box": _layout_embedding(BOX_FEATURE_DIM, hidden_size, layer_norm_eps),
                "types": nn.Embedding(2, hidden_size),  # segment token, global token
                # A segment's place in the memory's order (the order its caption is written in).
                "slots": nn.Embedding(max_slots, hidden_size),
                # SEG state x query state -> how much of the query's mask the phrase covers.
                "seg_query": nn.Linear(hidden_size, hidden_size),
                "seg_key": nn.Linear(hidden_size, hidden_size),
            }
        )
        if copy_captions:
            new.update(
                {
                    "types": nn.Embedding(3, hidden_size),  # segment, global, caption word
                    "caption_positions": nn.Embedding(max_slot_caption_length, hidden_size),
                    "caption_norm": nn.LayerNorm(hidden_size, eps=layer_norm_eps),
                    "copy_query": nn.Linear(hidden_size, hidden_size),
                    "copy_key": nn.Linear(hidden_size, hidden_size),
                    "copy_gate": nn.Linear(hidden_size, 1),
                    # Which of a slot's caption words sum it up for selection, and their key.
                    "caption_pool": nn.Linear(hidden_size, 1),
                    "seg_caption_key": nn.Linear(hidden_size, hidden_size),
                }
            )
        new.apply(self._init_weights)
        self.look_proj = new["look"]
        self.class_embed = new["classes"]
        self.box_embed = new["box"]
        self.memory_type_embeddings = new["types"]
        self.slot_embeddings = new["slots"]
        self.seg_query = new["seg_query"]
        self.seg_key = new["seg_key"]
        if copy_captions:
            self.caption_positions = new["caption_positions"]
            self.caption_norm = new["caption_norm"]
            self.copy_query = new["copy_query"]
            self.copy_key = new["copy_key"]
            self.copy_gate = new["copy_gate"]
            self.caption_pool = new["caption_pool"]
            self.seg_caption_key = new["seg_caption_key"]
        # Starts low: a SEG selects nothing until its phrase's masks teach it what to select.
        self.seg_bias = nn.Parameter(torch.tensor(-2.0))

    @classmethod
    def from_config(cls, cfg, codec: Optional[GroundedMarkupCodec] = None):
        """Keyword arguments from ``cfg.MODEL.GROUNDED_HEAD``; the vocabulary is
        ``MODEL.CAPTION_HEAD.VOCAB_FILE``'s with the markup tokens (``codec``)."""
        head = cfg.MODEL.GROUNDED_HEAD
        mf = cfg.MODEL.MASK_FORMER
        if codec is None:
            codec = GroundedMarkupCodec(build_caption_tokenizer(cfg.MODEL.CAPTION_HEAD.VOCAB_FILE))
        return {
            "query_dim": mf.HIDDEN_DIM,
            "global_dim": cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "seg_token_ids": codec.seg_token_ids,
            "hidden_size": head.HIDDEN_SIZE,
            "num_layers": head.NUM_LAYERS,
            "num_heads": head.NUM_HEADS,
            "intermediate_size": head.INTERMEDIATE_SIZE,
            "dropout": head.DROPOUT,
            "max_length": head.MAX_LENGTH,
            "label_smoothing": head.LABEL_SMOOTHING,
            "bottleneck_dim": cfg.MODEL.CAPTION_HEAD.BOTTLENECK_DIM,
            "bottleneck_grad_scale": cfg.MODEL.CAPTION_HEAD.BOTTLENECK_GRAD_SCALE,
            "num_points": mf.TRAIN_NUM_POINTS,
            "max_slots": max(64, cfg.TEST.DETECTIONS_PER_IMAGE),
            "copy_captions": head.COPY_CAPTIONS,
            "phrase_open_token_id": codec.markup_ids[PHRASE_OPEN],
            "max_slot_caption_length": cfg.MODEL.CAPTION_HEAD.MAX_LENGTH,
            **codec.vocab_kwargs(),
        }

    # -----------------------------------------------------------------------------------------
    def image_memory(
        self,
        query_feats: Sequence[torch.Tensor],
        class_logits: Sequence[torch.Tensor],
        slot_masks: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        global_feats: torch.Tensor,
        windows: Optional[torch.Tensor] = None,
        slot_captions: Optional[Sequence[torch.Tensor]] = None,
        slot_boxes: Optional[Sequence[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The memory of each image: the global token, one token per segment slot, then (with
        ``copy_captions``) the tokens of each slot's caption.

        Args:
            query_feats: per image [n_b, D], the query feature of each slot's segment.
            class_logits: per image [n_b, K+1], those queries' class logits.
            slot_masks: per image [n_b, h, w], the slots' masks as probabilities (or 0/1), on
                the padded grid (any resolution); read without gradient.
            mask_features: [B, Cm, h', w'] the pixel decoder's mask features.
            global_feats: [B, Dg].
            windows: Float[B, 4], where each padded grid lies in its original image
                (``Pix2Cap.grid_windows``); None: the grid is the image.
            slot_captions: with ``copy_captions``, per image Long[n_b, L_b] the token ids of
                each slot's caption (``[CLS] words [SEP] [PAD]...``).
            slot_boxes: per image [n_b, 6] the slots' boxes when already known, as
                ``mask_boxes(slot_masks[b], windows[b], largest_part=True)`` gives them
                (training measures the ground truth's on the host); None: measured here.

        Returns:
            memory [B, M, C], Bool[B, M] (False on padding) and, with ``copy_captions``, Long[B,
            M] the word each memory token can be copied as (-1: none); M = 1 + S (+ S * L),
            S = the most slots of an image, L the longest slot caption.
        """
        batch = len(query_feats)
        dtype = global_feats.dtype
        num_slots = max((int(q.shape[0]) for q in query_feats), default=0)
        if num_slots > self.max_slots:
            raise ValueError(f"{num_slots} segments exceed the head's max_slots={self.max_slots}")
        types = self.memory_type_embeddings.weight.to(dtype)
        length = 0
        if self.copy_captions:
            if slot_captions is None:
                raise ValueError("a head with copy_captions needs slot_captions")
            length = max((int(c.shape[1]) for c in slot_captions if c.shape[0]), default=0)
            if length > self.caption_positions.num_embeddings:
                raise ValueError(
                    f"slot captions of {length} tokens exceed "
                    f"{self.caption_positions.num_embeddings}"
                )
        size = 1 + num_slots + num_slots * length
        memory = global_feats.new_zeros((batch, size, types.shape[1]))
        valid = torch.zeros((batch, size), dtype=torch.bool, device=global_feats.device)
        copy_ids = None
        if self.copy_captions:
            copy_ids = torch.full((batch, size), -1, dtype=torch.long, device=memory.device)
        memory[:, 0] = self.global_proj(global_feats) + types[1]
        valid[:, 0] = True
        for b in range(batch):
            n = int(query_feats[b].shape[0])
            if n == 0:
                continue
            probs = slot_masks[b].detach().float()
            window = None if windows is None else windows[b]
            if slot_boxes is not None:
                boxes = slot_boxes[b].to(dtype)  # [n, 6]
            else:
                boxes = mask_boxes(probs, window, largest_part=True).to(dtype)  # [n, 6]
            look = mask_pool(probs, mask_features[b].float()).to(dtype)  # [n, Cm]
            classes = class_logits[b].detach().float().softmax(-1).to(dtype)
            memory[b, 1 : 1 + n] = (
                self.query_proj(query_feats[b])
                + self.look_proj(look)
                + self.class_embed(classes)
                + self.box_embed(box_features(boxes))
                + self.slot_embeddings.weight[:n].to(dtype)
                + types[0]
            )
            valid[b, 1 : 1 + n] = True
            if length and slot_captions[b].shape[1]:
                ids = slot_captions[b].to(memory.device)  # [n, L_b]
                l_b = ids.shape[1]
                words = (
                    self.embeddings.word_embeddings(ids)
                    + self.caption_positions.weight[:l_b][None]
                    + self.slot_embeddings.weight[:n, None]
                    + types[2]
                )
                # Slot k's caption takes positions 1 + S + k * L ... + L_b - 1.
                where = 1 + num_slots + torch.arange(n, device=memory.device)[:, None] * length
                where = (where + torch.arange(l_b, device=memory.device)[None]).flatten()
                memory[b, where] = self.caption_norm(words).flatten(0, 1).to(dtype)
                valid[b, where] = (ids != self.pad_token_id).flatten()
                copyable = (ids != self.pad_token_id) & (ids != self.bos_token_id)
                copyable &= ids != self.eos_token_id
                copy_ids[b, where] = torch.where(copyable, ids, -1).flatten()
        return memory, valid, copy_ids

    def copy_log_probs(
        self,
        hidden: torch.Tensor,
        memory: torch.Tensor,
        copy_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Log-probabilities of the next word: vocabulary and copy distributions mixed.

        Args:
            hidden: [N, t, C] decoder states; memory: [N, M, C]; copy_ids: Long[N, M] (-1:
                not copyable).

        Returns:
            [N, t, V]: ``log(g * softmax(lm_logits) + (1 - g) * copy)``, ``copy`` the
            attention over the copyable memory tokens summed per word id, ``g`` a learned
            gate (1 where nothing is copyable).
        """
        vocab = self.lm_logits(hidden).float().softmax(-1)
        scale = 1.0 / math.sqrt(hidden.shape[-1])
        scores = self.copy_query(hidden) @ self.copy_key(memory).transpose(1, 2) * scale
        copyable = (copy_ids >= 0)[:, None, :]  # [N, 1, M]
        scores = scores.float().masked_fill(~copyable, float("-inf"))
        attention = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # [N, t, M]
        index = copy_ids.clamp(min=0)[:, None, :].expand_as(attention)
        copy = torch.zeros_like(vocab).scatter_add_(-1, index, attention)
        gate = self.copy_gate(hidden).float().sigmoid()
        gate = torch.where(copyable.any(-1, keepdim=True), gate, torch.ones_like(gate))
        return torch.log(gate * vocab + (1.0 - gate) * copy + 1e-9)

    def next_token_logits(self, hidden, memory, memory_valid):
        """With ``copy_captions``: the copy mix's log-probabilities (see :meth:`copy_log_probs`)
        for the rows ``generate_grounded`` is decoding."""
        if self._copy_ids is None:
            return super().next_token_logits(hidden, memory, memory_valid)
        return self.copy_log_probs(hidden[:, None], memory, self._copy_ids)[:, 0]

    def seg_selection(
        self,
        seg_states: torch.Tensor,
        slot_states: torch.Tensor,
        slot_captions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Selection logits of each SEG over the slots: [S, C] x [n, C] -> [S, n].

        ``slot_captions`` ([n, C], :meth:`slot_caption_summaries`) add to the slots' keys.
        """
        scale = 1.0 / math.sqrt(seg_states.shape[-1])
        keys = self.seg_key(slot_states)
        if slot_captions is not None:
            keys = keys + self.seg_caption_key(slot_captions)
        logits = self.seg_query(seg_states) @ keys.transpose(0, 1) * scale
        return logits.float() + self.seg_bias.float()

    def slot_caption_summaries(
        self, memory: torch.Tensor, memory_valid: torch.Tensor, num_slots: int
    ) -> Optional[List[torch.Tensor]]:
        """Per image [S, C]: each slot's caption words (its memory tokens, as
        :meth:`image_memory` lays them out) pooled by a learned attention; None without
        ``copy_captions`` or captions. A slot without caption words sums up to zeros.

        Args:
            memory: [B, M, C]; memory_valid: Bool[B, M]; num_slots: S, the memory's slots.
        """
        if not self.copy_captions or num_slots == 0:
            return None
        length = (memory.shape[1] - 1 - num_slots) // num_slots
        if length <= 0:
            return None
        start = 1 + num_slots
        words = memory[:, start : start + num_slots * length].reshape(
            memory.shape[0], num_slots, length, -1
        )  # [B, S, L, C]
        valid = memory_valid[:, start : start + num_slots * length].reshape(
            memory.shape[0], num_slots, length
        )
        scores = self.caption_pool(words)[..., 0].float().masked_fill(~valid, float("-inf"))
        weights = torch.nan_to_num(scores.softmax(-1), nan=0.0).to(words.dtype)
        return list((weights[..., None] * words).sum(2))

    @staticmethod
    def union_probs(selection: torch.Tensor, slot_probs: torch.Tensor) -> torch.Tensor:
        """Noisy-OR of the slot masks under each SEG's selection.

        Args:
            selection: [S, n] in [0, 1]; slot_probs: [n, *] mask probabilities.

        Returns:
            [S, *]: ``1 - prod_k (1 - selection[s, k] * slot_probs[k])``.
        """
        flat = slot_probs.flatten(1)  # [n, P]
        miss = (1.0 - selection[:, :, None] * flat[None]).clamp(min=1e-6)  # [S, n, P]
        return (1.0 - miss.log().sum(1).exp()).view(selection.shape[0], *slot_probs.shape[1:])

    def _seg_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool[B, t]: where the input is a SEG token."""
        return torch.isin(input_ids, self.seg_token_ids)

    def losses(
        self,
        memory: torch.Tensor,
        memory_valid: torch.Tensor,
        tokens: torch.Tensor,
        slot_masks: Sequence[torch.Tensor],
        seg_slots: Sequence[torch.Tensor],
        seg_masks: Sequence[torch.Tensor],
        seg_valid: Sequence[torch.Tensor],
        copy_ids: Optional[torch.Tensor] = None,
        host_tokens: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Teacher-forced caption, SEG selection and SEG mask losses of a batch.

        Args:
            memory, memory_valid: from :meth:`image_memory`.
            tokens: Long[B, T] ``[BOS] markup [EOS] [PAD]...`` (an image without a grounded
                caption: a row of [PAD], it adds nothing).
            copy_ids: with ``copy_captions``, :meth:`image_memory`'s copy ids.
            slot_masks: per image [n_b, H, W] the slots' masks (0/1 or probabilities).
            seg_slots: per image Bool[S_b, n_b], the slots each SEG's phrase names (S_b = the
                SEG tokens of row b, in order).
            seg_masks: per image Bool[S_b, H, W], the union of each SEG's segments.
            seg_valid: per image Bool[S_b] on the host; False where every segment of the
                phrase was cropped away (its words are still learned, its mask is not).
            host_tokens: ``tokens`` on the host (where they were built), to find the SEGs
                and whether there is any target without reading the device; None: read from
                ``tokens`` (a device-to-host copy when they are on the device).

        Returns:
            ``loss_grounded_caption`` (cross-entropy over non-pad targets),
            ``loss_grounded_select`` (BCE of the SEGs' slot selection),
            ``loss_grounded_mask`` and ``loss_grounded_dice`` (BCE and dice of the selected
            union at ``num_points`` uniform points per image, mean over valid SEGs).
        """
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if host_tokens is None:
            host_tokens = tokens.cpu()
        host_targets = host_tokens[:, 1:].tolist()
        # Per row, the SEG positions of the inputs, in order (the host's copy of is_seg).
        seg_positions = [
            [t for t, token in enumerate(row[:-1]) if token in self._host_seg_token_ids]
            for row in host_tokens.tolist()
        ]
        memory_states, states = self._decode_text(memory, inputs, memory_valid, return_memory=True)
        if not any(token != self.pad_token_id for row in host_targets for token in row):
            loss_text = self.lm_logits(states).sum() * 0.0
        elif self.copy_captions:
            # The mix is a distribution already: its negative log-likelihood.
            log_probs = self.copy_log_probs(states, memory, copy_ids)
            loss_text = F.nll_loss(
                log_probs.reshape(-1, log_probs.shape[-1]),
                targets.reshape(-1),
                ignore_index=self.pad_token_id,
            )
        else:
            logits = self.lm_logits(states)
            loss_text = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=self.pad_token_id,
                label_smoothing=self.label_smoothing,
            )

        summaries = self.slot_caption_summaries(
            memory, memory_valid, max((int(m.shape[0]) for m in slot_masks), default=0)
        )
        valid_lists = [v.tolist() for v in seg_valid]
        num_masks = max(sum(sum(bool(x) for x in v) for v in valid_lists), 1)
        zero = states.sum() * 0.0
        loss_select, loss_mask, loss_dice = zero, zero.clone(), zero.clone()
        device = states.device
        for b in range(tokens.shape[0]):
            # The SEGs in order, the first ``count`` of them with a (valid) phrase.
            count = min(len(seg_positions[b]), len(valid_lists[b]))
            valid = [s for s in range(count) if valid_lists[b][s]]
            n = int(slot_masks[b].shape[0])
            if not valid or n == 0:
                continue
            rows = torch.as_tensor([seg_positions[b][s] for s in valid], dtype=torch.long)
            select_logits = self.seg_selection(
                states[b, rows.to(device, non_blocking=True)],
                memory_states[b, 1 : 1 + n],
                None if summaries is None else summaries[b][:n],
            )  # [S, n]
            chosen = torch.as_tensor(valid, dtype=torch.long)
            select_target = seg_slots[b][chosen.to(seg_slots[b].device, non_blocking=True)]
            select_target = select_target.to(device, non_blocking=True)
            loss_select = loss_select + F.binary_cross_entropy_with_logits(
                select_logits, select_target.to(select_logits).float(), reduction="none"
            ).mean(1).sum() / num_masks
            coords = torch.rand(1, self.num_points, 2, device=device)
            slot_probs = slot_masks[b][:, None].float().to(device, non_blocking=True)
            slot_probs = point_sample(slot_probs, coords.expand(n, -1, -1))[:, 0]
            target = seg_masks[b][chosen.to(seg_masks[b].device, non_blocking=True)]
            target = target.to(device, non_blocking=True)
            target = point_sample(target[:, None].float(), coords.expand(target.shape[0], -1, -1))
            probs = self.union_probs(select_logits.sigmoid(), slot_probs).clamp(1e-6, 1 - 1e-6)
            mask_logits = torch.logit(probs)  # [S, P]
            loss_mask = loss_mask + sigmoid_ce_loss(mask_logits, target[:, 0], num_masks)
            loss_dice = loss_dice + dice_loss(mask_logits, target[:, 0], num_masks)
        return {
            "loss_grounded_caption": loss_text,
            "loss_grounded_select": loss_select,
            "loss_grounded_mask": loss_mask,
            "loss_grounded_dice": loss_dice,
        }

    @torch.no_grad()
    def generate_grounded(
        self,
        memory: torch.Tensor,
        memory_valid: torch.Tensor,
        *,
        max_length: Optional[int] = None,
        num_beams: int = 1,
        copy_ids: Optional[torch.Tensor] = None,
        slot_counts: Optional[Sequence[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Write each image's markup and read its SEG tokens' slot selections (eval mode).

        Args:
            memory, memory_valid: from :meth:`image_memory`.
            max_length, num_beams: as :meth:`generate` (greedy only with ``copy_captions``).
            copy_ids: with ``copy_captions``, :meth:`image_memory`'s copy ids.
            slot_counts: the number of slots of each image (None: every valid memory token
                after the global one is a slot, as without ``copy_captions``).

        A phrase at least half of whose words were copied (copy share >= 0.5), word i from
        word i of the same slot's caption (the caption's subject), is that slot's own: its
        SEG's selection becomes that slot alone (with the mean copy share as probability). The words then name the
        segment they were read from; relation targets, copied from the middle of a caption,
        keep the SEG's selection.

        Returns:
            tokens Long[B, L], scores Float[B] (mean token log-probability), and per image, in
            the order the SEG tokens were written: the SEGs' selection probabilities [S_b, n_b]
            over its slots, the SEG token ids Long[S_b] (thing or stuff kind) and Bool[S_b],
            True where the selection is the slot the phrase was copied from.
        """
        if self.copy_captions:
            if num_beams != 1:
                raise ValueError("the copy head decodes greedily (num_beams=1)")
            self._copy_ids = copy_ids
        try:
            tokens, scores = self.generate_from_memory(
                memory, memory_valid, max_length=max_length, num_beams=num_beams, return_scores=True
            )
        finally:
            self._copy_ids = None
        # One teacher-forced pass over the written tokens gives the state at every SEG (the
        # state a SEG had when it was the newest token: attention is causal).
        memory_states, states = self._decode_text(memory, tokens, memory_valid, return_memory=True)
        is_seg = self._seg_positions(tokens)
        if slot_counts is None:
            slot_counts = [int(v.sum()) - 1 for v in memory_valid]
        provenance = None
        if self.copy_captions and copy_ids is not None and self.phrase_open_token_id is not None:
            provenance = self._copied_subjects(tokens, states, memory, copy_ids, slot_counts)
        summaries = self.slot_caption_summaries(
            memory, memory_valid, max((int(n) for n in slot_counts), default=0)
        )
        selections, kinds, copied = [], [], []
        for b in range(tokens.shape[0]):
            n = int(slot_counts[b])
            selection = self.seg_selection(
                states[b, is_seg[b]],
                memory_states[b, 1 : 1 + n],
                None if summaries is None else summaries[b][:n],
            ).sigmoid()
            from_copy = torch.zeros(selection.shape[0], dtype=torch.bool)
            if provenance is not None:
                for s, position in enumerate(is_seg[b].nonzero().flatten().tolist()):
                    slot, share = provenance[b].get(position, (None, 0.0))
                    if slot is not None and slot < n:
                        selection[s] = 0.0
                        selection[s, slot] = share
                        from_copy[s] = True
            selections.append(selection)
            kinds.append(tokens[b, is_seg[b]])
            copied.append(from_copy)
        return tokens, scores, selections, kinds, copied

    def _copied_subjects(
        self,
        tokens: torch.Tensor,
        states: torch.Tensor,
        memory: torch.Tensor,
        copy_ids: torch.Tensor,
        slot_counts: Sequence[int],
    ) -> List[Dict[int, Tuple[int, float]]]:
        """Per image, {SEG position: (slot, mean copy share)} for the phrases at least half of
        whose words were copied, word i from word i of the same slot's caption."""
        num_slots = max(slot_counts, default=0)
        if num_slots == 0:
            return [{} for _ in range(tokens.shape[0])]
        length = (memory.shape[1] - 1 - num_slots) // num_slots
        scale = 1.0 / math.sqrt(states.shape[-1])
        scores = self.copy_query(states) @ self.copy_key(memory).transpose(1, 2) * scale
        scores = scores.float().masked_fill(~(copy_ids >= 0)[:, None, :], float("-inf"))
        source = scores.argmax(-1)  # [B, t]: the memory token each step copies most from
        share = 1.0 - self.copy_gate(states).detach().float().sigmoid()[..., 0]  # [B, t]
        result: List[Dict[int, Tuple[int, float]]] = []
        for b in range(tokens.shape[0]):
            found: Dict[int, Tuple[int, float]] = {}
            row = tokens[b].tolist()
            open_at = None
            for position, token in enumerate(row):
                if token == self.phrase_open_token_id:
                    open_at = position
                elif token in self.seg_token_ids.tolist() and open_at is not None:
                    # Word i of the phrase (token open_at + 1 + i) is predicted by the state at
                    # open_at + i; it votes for slot k if copied from word i of k's caption.
                    num_words = max(position - open_at - 2, 0)  # minus <p> and </p>
                    votes: Dict[int, List[float]] = {}
                    for i in range(num_words):
                        j = int(source[b, open_at + i]) - 1 - num_slots
                        if length and j >= 0 and j % length == i + 1:
                            if float(share[b, open_at + i]) >= 0.5:
                                votes.setdefault(j // length, []).append(float(share[b, open_at + i]))
                    if votes:
                        slot, shares = max(votes.items(), key=lambda kv: len(kv[1]))
                        if 2 * len(shares) >= num_words:
                            found[position] = (slot, sum(shares) / len(shares))
                    open_at = None
            result.append(found)
        return result
