"""A static key/value cache and the fixed-shape state of one caption decoding.

Decoding a caption writes one token per step. The memory's keys/values (every layer) are
computed once; each step adds the key/value of the newest token. :class:`StaticKVCache` holds
them in one buffer preallocated to the longest sequence, ``[2 (K, V), layers, rows, heads,
M + T, head_dim]`` (M memory tokens, T the most text tokens fed), and a step writes its token's
keys/values in place at a position held in a device tensor. A step can then attend over the
whole buffer under a mask of the positions written so far: its shapes never change and it
reads no value on the host, so it can be captured once as a CUDA graph and replayed per token.

:class:`DecodeState` is everything such a step reads and writes in place: the cache, the
tokens written so far, which rows have finished, their scores and the step's position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

__all__ = ["StaticKVCache", "DecodeState"]

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V as [N, heads, L, head_dim]


class StaticKVCache:
    """Keys and values of every layer, preallocated: ``kv`` [2, layers, rows, heads, M + T,
    head_dim]; positions ``0 .. M-1`` hold the memory, ``M + t`` the text token ``t``."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_heads: int,
        num_memory: int,
        max_text: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        zeros: bool = True,
    ):
        """``zeros``: start the buffer at zeros, as attention over every position (under a
        mask) needs: a masked position adds ``0 * value``, and must not hold a NaN. False:
        uninitialised, for decoding that only ever reads the positions written so far."""
        self.num_memory = num_memory
        self.max_text = max_text
        shape = (2, num_layers, rows, num_heads, num_memory + max_text, head_dim)
        make = torch.zeros if zeros else torch.empty
        self.kv = make(shape, dtype=dtype, device=device)
        self._spare: Optional[torch.Tensor] = None  # reorder_(in_place=False)'s other buffer

    @property
    def length(self) -> int:
        """M + T, the positions of the buffer."""
        return self.kv.shape[4]

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K, V of layer ``i``: views [rows, heads, M + T, head_dim] of the buffer."""
        return self.kv[0, i], self.kv[1, i]

    def fill_memory(self, memory_kv: KVCache) -> None:
        """Write the memory's keys/values (per layer [rows, heads, M, head_dim]) at 0 .. M-1.

        The text positions keep what they hold (zeros, or an earlier decoding's keys): they
        are masked until written, and finite values times a zero attention weight add 0."""
        for i, (k, v) in enumerate(memory_kv):
            self.kv[0, i, :, :, : self.num_memory].copy_(k)
            self.kv[1, i, :, :, : self.num_memory].copy_(v)

    def clear_text(self) -> None:
        """Zero the text positions (before a buffer is reused: nothing stale is ever read)."""
        self.kv[:, :, :, :, self.num_memory :].zero_()

    def write(
        self,
        i: int,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: Optional[int] = None,
    ) -> None:
        """Write layer ``i``'s keys/values of new tokens, [rows, heads, t, head_dim], at the
        absolute positions ``index`` (Long[t], on the device: no host synchronisation).
        ``start``: the first of those positions when the host knows it (``index`` is then
        ``start, start + 1, ...``): a plain copy, cheaper on a CPU than ``index_copy_``."""
        if start is None:
            self.kv[0, i].index_copy_(2, index, k)
            self.kv[1, i].index_copy_(2, index, v)
        else:
            self.kv[0, i].narrow(2, start, k.shape[2]).copy_(k)
            self.kv[1, i].narrow(2, start, v.shape[2]).copy_(v)

    def reorder_(self, origin: torch.Tensor, in_place: bool = True) -> None:
        """Rows take the keys/values of rows ``origin`` (Long[rows]; beam search).

        ``in_place``: the buffer keeps its address (a captured graph reads it), only the text
        part moves (a beam's memory is its object's, the same in every beam of it). False:
        the rows are gathered into a second buffer that then takes the first's place; one
        contiguous gather, several times faster on a CPU than gathering a strided part back.
        """
        if in_place:
            text = self.kv[:, :, :, :, self.num_memory :]
            text.copy_(text.index_select(2, origin))
            return
        if self._spare is None:
            self._spare = torch.empty_like(self.kv)
        torch.index_select(self.kv, 2, origin, out=self._spare)
        self.kv, self._spare = self._spare, self.kv


@dataclass
class DecodeState:
    """What one decoding step reads and updates in place (fixed shapes; rows = objects x
    beams, the beams of an object adjacent).

    Attributes:
        memory: [rows, M, C] the memory tokens (read by ``next_token_logits``).
        memory_valid: Bool[rows, M] (False on padding) or None.
        cache: the static key/value cache, or None to recompute the sequence every step.
        key_valid: Bool[rows or 1, 1, 1, M + T]: which cached positions may ever be attended
            (memory padding excluded, every text position included).
        key_index: Long[M + T], 0 .. M + T - 1.
        tokens: Long[rows, max_length]: [BOS], the tokens written so far, [PAD] after.
        position: Long[1], the text position of the newest token (the one the next step feeds).
        finished: Bool[rows], rows that wrote [EOS] (or are padding of the batch).
        scores: Float[rows], summed log-probabilities.
        num_objects, beams: rows = num_objects * beams.
        object_offsets: Long[num_objects], ``arange(num_objects) * beams``.
        row_index: Long[rows], ``arange(rows)``.
    """

    memory: torch.Tensor
    memory_valid: Optional[torch.Tensor]
    cache: Optional[StaticKVCache]
    key_valid: Optional[torch.Tensor]
    key_index: torch.Tensor
    tokens: torch.Tensor
    position: torch.Tensor
    finished: torch.Tensor
    scores: torch.Tensor
    num_objects: int
    beams: int
    object_offsets: torch.Tensor
    row_index: torch.Tensor

    @property
    def num_memory(self) -> int:
        return self.memory.shape[1]
