"""The caption head's decoding as it was before the static key/value cache (a frozen copy).

``reference_generate_from_memory`` is ``DenseCaptionHead.generate_from_memory`` with its
growing (``torch.cat``) key/value cache, copied with the layers' attention math so that later
changes to the head's decoding code cannot change the reference. It reads only the head's
weights and its ``next_token_logits`` / ``lm_logits`` / ``embeddings`` modules.
Used by ``test_caption_decoding.py`` (exact-equality tests) and by timing scripts.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]


def _attention(attn, x, attn_mask=None, past_kv=None):
    n, length, c = x.shape
    q, k, v = attn.qkv(x).split(c, dim=2)
    q = q.view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    v = v.view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    if past_kv is not None:
        k = torch.cat([past_kv[0], k], dim=2)
        v = torch.cat([past_kv[1], v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    y = y.transpose(1, 2).reshape(n, length, c)
    return attn.proj(y), (k, v)


def _layer(layer, x, attn_mask=None, past_kv=None):
    attn_out, kv = _attention(layer.attn, x, attn_mask=attn_mask, past_kv=past_kv)
    x = layer.norm1(x + layer.dropout(attn_out))
    x = layer.norm2(x + layer.dropout(layer.fc2(F.gelu(layer.fc1(x)))))
    return x, kv


def _key_padding(memory_valid, num_text):
    text = memory_valid.new_ones((memory_valid.shape[0], num_text))
    return torch.cat([memory_valid, text], dim=1)[:, None, None, :]


def _attention_mask(num_memory, num_text, device=None):
    length = num_memory + num_text
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask[:, :num_memory] = True
    return mask


def _decode_text(head, memory, input_ids, memory_valid=None):
    num_memory = memory.shape[1]
    x = torch.cat([memory, head.embeddings(input_ids)], dim=1)
    mask = _attention_mask(num_memory, input_ids.shape[1], device=x.device)
    if memory_valid is not None:
        mask = mask[None, None] & _key_padding(memory_valid, input_ids.shape[1])
    for layer in head.layers:
        x, _ = _layer(layer, x, attn_mask=mask)
    return x[:, num_memory:]


def _memory_cache(head, memory, memory_valid=None) -> KVCache:
    mask = None if memory_valid is None else _key_padding(memory_valid, 0)
    cache = []
    x = memory
    for layer in head.layers:
        x, kv = _layer(layer, x, attn_mask=mask)
        cache.append(kv)
    return cache


def _cached_step(head, input_ids, position, cache, memory_valid=None):
    x = head.embeddings(input_ids, start_position=position)
    mask = None
    if memory_valid is not None:
        mask = _key_padding(memory_valid, position + 1)
    new_cache = []
    for layer, past_kv in zip(head.layers, cache):
        x, kv = _layer(layer, x, attn_mask=mask, past_kv=past_kv)
        new_cache.append(kv)
    return x[:, -1], new_cache


def _mask_logits(head, logits, prev_tokens, suppress_repeat):
    logits[:, head.bos_token_id] = float("-inf")
    logits[:, head.pad_token_id] = float("-inf")
    if suppress_repeat:
        logits.scatter_(1, prev_tokens[:, None], float("-inf"))
    return logits


@torch.no_grad()
def reference_generate_from_memory(
    head,
    memory: torch.Tensor,
    memory_valid: Optional[torch.Tensor] = None,
    *,
    max_length: Optional[int] = None,
    num_beams: int = 1,
    use_cache: bool = True,
    suppress_repeat: bool = True,
):
    """The pre-static-cache ``generate_from_memory``: (tokens Long[N, L], mean scores [N])."""
    max_length = head.max_length if max_length is None else max_length
    num_objects = memory.shape[0]
    beams = num_beams
    device = memory.device
    if beams > 1:
        memory = memory.repeat_interleave(beams, dim=0)
        if memory_valid is not None:
            memory_valid = memory_valid.repeat_interleave(beams, dim=0)
    rows = memory.shape[0]
    cache = _memory_cache(head, memory, memory_valid) if use_cache else None

    tokens = torch.full((rows, 1), head.bos_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    scores = torch.zeros(rows, device=device)
    if beams > 1:
        scores.view(num_objects, beams)[:, 1:] = float("-inf")

    for step in range(max_length - 1):
        if use_cache:
            hidden, cache = _cached_step(head, tokens[:, -1:], step, cache, memory_valid)
        else:
            hidden = _decode_text(head, memory, tokens, memory_valid)[:, -1]
        logits = head.next_token_logits(hidden, memory, memory_valid)
        logits = _mask_logits(head, logits.float(), tokens[:, -1], suppress_repeat)
        log_probs = F.log_softmax(logits, dim=-1)

        if beams == 1:
            next_tokens = logits.argmax(dim=-1)
            token_scores = log_probs.gather(1, next_tokens[:, None]).squeeze(1)
            next_tokens = torch.where(finished, head.pad_token_id, next_tokens)
            scores = scores + torch.where(finished, 0.0, token_scores)
        else:
            log_probs[finished] = float("-inf")
            log_probs[finished, head.pad_token_id] = 0.0
            vocab = log_probs.shape[1]
            candidates = (scores[:, None] + log_probs).view(num_objects, beams * vocab)
            top_scores, top_index = candidates.topk(beams, dim=1)
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
        finished = finished | (next_tokens == head.eos_token_id)
        if bool(finished.all()):
            break

    num_generated = (tokens[:, 1:] != head.pad_token_id).sum(1).clamp(min=1)
    mean_scores = scores / num_generated
    if beams > 1:
        best = mean_scores.view(num_objects, beams).argmax(dim=1)
        pick = torch.arange(num_objects, device=device) * beams + best
        tokens, mean_scores = tokens[pick], mean_scores[pick]
    length = int((tokens != head.pad_token_id).sum(1).max()) if tokens.shape[0] else 1
    return tokens[:, :length], mean_scores
