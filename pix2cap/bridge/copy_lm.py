"""A GPT-2 decoder with a pointer (copy) head, for the bridge's small language model.

A panoptic caption restates what its prompt already holds: tags, boxes and the words of the
region captions (colours, sizes, relation objects). A small decoder trained from scratch on a
thousand captions learns the style of the captions long before it learns to copy from its
prompt, so it writes plausible but wrong attributes. A pointer head (See et al., 2017,
"Get To The Point") gives copying its own path: one attention over the earlier tokens whose
weights become a distribution over the tokens found there, mixed with the vocabulary
distribution by a learned gate:

    p(w) = g * softmax(lm_head(h_t))[w] + (1 - g) * sum_{s <= t, x_s = w} a_{t,s}

transformers has no decoder-only pointer-generator, so it is written here as a subclass of
``GPT2LMHeadModel``; registered with the Auto classes, it saves, loads and ``generate()``s
like any other causal LM. ``logits`` are ``log p`` (a normalised distribution), so the
library's cross-entropy loss, logits processors and greedy / sampled decoding apply as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

__all__ = ["CopyGPT2Config", "CopyGPT2LMHeadModel"]

# Floor of the mixed probability before the log: keeps log p finite for tokens that neither
# the vocabulary head nor the pointer gives any mass (float32 softmax can underflow to 0).
_MIN_PROB = 1e-12


class CopyGPT2Config(GPT2Config):
    """``GPT2Config`` plus ``copy_dim``, the width of the pointer's query and key."""

    model_type = "pix2cap_copy_gpt2"

    def __init__(self, copy_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.copy_dim = int(copy_dim) if copy_dim is not None else int(self.n_embd)


class CopyGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 whose next-token distribution mixes the vocabulary head with a pointer over the
    earlier tokens of the sequence (prompt and text generated so far).

    The pointer's keys and the token ids they point at are kept in one extra layer of the
    key/value cache (index ``n_layer``: keys ``[B, 1, S, copy_dim]``, ids as values
    ``[B, 1, S, 1]``), so cached generation costs one small attention per step.
    """

    config_class = CopyGPT2Config

    def __init__(self, config: CopyGPT2Config):
        super().__init__(config)
        self.copy_query = nn.Linear(config.n_embd, config.copy_dim, bias=False)
        self.copy_key = nn.Linear(config.n_embd, config.copy_dim, bias=False)
        self.copy_gate = nn.Linear(config.n_embd, 1)
        self.post_init()

    def _pointer_memory(
        self, cache: Cache | None, keys: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All pointer keys ``[B, S, C]`` and source ids ``[B, S]`` so far, the new ones
        (``keys [B, T, C]``, ``ids [B, T]``) appended to the cache's pointer layer."""
        if cache is None:
            return keys, ids
        layer_index = self.config.n_layer
        while len(cache.layers) <= layer_index:
            cache.layers.append(DynamicLayer())
        # Ids travel as float32 (exact up to 2**24); half precision would round large ids.
        all_keys, all_ids = cache.layers[layer_index].update(
            keys[:, None], ids[:, None, :, None].float()
        )
        return all_keys[:, 0], all_ids[:, 0, :, 0].round().long()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        """Args as ``GPT2LMHeadModel.forward``; ``input_ids`` are required (the pointer
        points at token ids). ``attention_mask`` ``[B, S]`` covers cached and new positions.

        Returns:
            ``logits``: ``log p`` ``[B, T_kept, V]``, a normalised log-distribution.
        """
        if input_ids is None:
            raise ValueError(
                "CopyGPT2LMHeadModel needs input_ids: its pointer head copies token ids "
                "(inputs_embeds alone cannot be pointed at)"
            )
        out = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state  # [B, T, D]
        batch, new = input_ids.shape
        keys, source_ids = self._pointer_memory(
            out.past_key_values if use_cache is not False else None,
            self.copy_key(hidden),
            input_ids,
        )
        total = keys.shape[1]

        if isinstance(logits_to_keep, int):
            kept = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            query_pos = torch.arange(total - new, total, device=hidden.device)[kept]
            hidden = hidden[:, kept]
        else:
            query_pos = (total - new) + logits_to_keep.to(hidden.device)
            hidden = hidden[:, logits_to_keep]

        # Pointer attention over every earlier position (causal), pads excluded.
        scores = self.copy_query(hidden) @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        visible = torch.arange(total, device=hidden.device)[None, :] <= query_pos[:, None]
        visible = visible[None].expand(batch, -1, -1)
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, -total:].bool()
        scores = scores.float().masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing visible
        copy_probs = torch.zeros(
            batch, hidden.shape[1], self.config.vocab_size, device=hidden.device
        ).scatter_add_(2, source_ids[:, None, :].expand(-1, hidden.shape[1], -1), weights)

        gate = self.copy_gate(hidden).float()  # [B, T_kept, 1]: log-odds of the vocabulary
        vocab_log_probs = F.log_softmax(self.lm_head(hidden).float(), dim=-1)
        log_probs = torch.logaddexp(
            F.logsigmoid(gate) + vocab_log_probs,
            F.logsigmoid(-gate) + copy_probs.clamp_min(_MIN_PROB).log(),
        )

        loss = None
        if labels is not None:
            vocab_size = self.config.vocab_size
            loss = self.loss_function(log_probs, labels, vocab_size=vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=log_probs,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


AutoConfig.register(CopyGPT2Config.model_type, CopyGPT2Config)
AutoModelForCausalLM.register(CopyGPT2Config, CopyGPT2LMHeadModel)
