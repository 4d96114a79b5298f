"""Language-model caption writers: a causal LM continues the prompt into the caption.

* :class:`HFCausalLMWriter` (``"hf_causal_lm"``) -- any local Hugging Face causal LM folder
  (``local_files_only``), chat template when the tokenizer has one, greedy, beam or sampled
  decoding, optional LoRA adapter (:func:`pix2cap.bridge.lm_training.finetune_lora`).
* :class:`SmallLMWriter` (``"small_lm"``) -- the small decoder of
  :func:`pix2cap.bridge.lm_training.train_small_lm` (BERT WordPiece vocabulary, by default a
  GPT-2 with the pointer head of :class:`pix2cap.bridge.copy_lm.CopyGPT2LMHeadModel`).

The prompt is :meth:`pix2cap.bridge.prompt.PromptFormat.build`, in the form the LM was trained
on: a writer reads the :class:`~pix2cap.bridge.prompt.PromptFormat` saved beside its LM (or its
adapter) and refuses a format it does not know. The LM writes model-side
``<box>[[...]]</box>`` grid boxes, converted to SA-Pancap form
(:func:`pix2cap.data.caption_formats.grid_text_to_pancap`). Boxes are decoded under
:class:`GridBoxLogitsProcessor`: a box the LM opens can only be completed as the box of a
listed entity. Loading, prompt layout and generation are
:class:`pix2cap.modeling.language_model.LocalCausalLM`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import torch

from pix2cap.bridge.build import CAPTION_WRITER_REGISTRY
from pix2cap.bridge.prompt import PROMPT_FORMAT_FILE, PromptFormat
from pix2cap.bridge.writers import CaptionWriter
from pix2cap.data.caption_formats import GRID, format_grid_box, grid_text_to_pancap
from pix2cap.modeling.language_model import LocalCausalLM, require_model_dir

__all__ = ["GridBoxLogitsProcessor", "HFCausalLMWriter", "SmallLMWriter", "load_causal_lm"]

SMALL_LM_INFO_FILE = "pix2cap_small_lm.json"


def load_causal_lm(path: str, **kwargs) -> LocalCausalLM:
    """:class:`~pix2cap.modeling.language_model.LocalCausalLM` that also knows the small LM's
    pointer-head model (``kwargs`` go to it)."""
    # Registers the pointer-head model with transformers' Auto classes; imported on use
    # because it imports transformers.
    import pix2cap.bridge.copy_lm  # noqa: F401

    return LocalCausalLM(path, **kwargs)


class GridBoxLogitsProcessor:
    """Constrained box decoding: once the LM opens a box (``<box>``), only the grid boxes of
    the listed entities may follow, token by token, until one is closed.

    The LM still chooses which entity a box belongs to (by its scores over the allowed
    tokens), but every box it writes is the box of a decoded entity, never an invented or a
    malformed one. With ``tags``, the box must also belong to what the text just named: when
    the tokens right before ``<box>`` end with the tag of one or more entities, only their
    boxes are allowed, and among several such entities those whose ``attributes`` words occur
    most often in the ``phrase_tokens`` tokens before the tag ("the purple square" picks the
    purple one of two squares). A phrase that ends in no listed tag keeps all boxes.
    A ``transformers`` logits processor (``generate(logits_processor=[...])``).

    Works on token ids: ``"<box>"``, each ``"<box>[[x1, y1, x2, y2]]</box>"``, each tag and
    each attribute word are tokenized on their own, which matches their tokens inside a text
    for tokenizers that split at spaces and punctuation (WordPiece). A byte-level BPE that
    merges across ``>[[`` or marks word-initial spaces may tokenize them differently in
    context; boxes are then left unconstrained or constrained to all listed boxes, not
    corrupted.

    Args:
        tokenizer: the LM's tokenizer.
        boxes: the allowed grid boxes ``[x1, y1, x2, y2]``.
        tags: optional tag of each box's entity (same order as ``boxes``).
        attributes: optional attribute words of each box's entity (same order).
        phrase_tokens: how many tokens before the tag are searched for attribute words.
    """

    def __init__(
        self,
        tokenizer,
        boxes: Sequence[Sequence[int]],
        tags: Sequence[str] | None = None,
        attributes: Sequence[str] | None = None,
        phrase_tokens: int = 8,
    ):
        if tags is not None and len(tags) != len(boxes):
            raise ValueError(f"{len(tags)} tags for {len(boxes)} boxes")
        if attributes is not None and len(attributes) != len(boxes):
            raise ValueError(f"{len(attributes)} attribute texts for {len(boxes)} boxes")

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        self.open_ids = encode("<box>")
        # One entry per entity with a well-formed box: (rest of its box tokens after
        # "<box>", tag tokens, attribute word tokens).
        self.entities: list[tuple[tuple[int, ...], tuple[int, ...], set[int]]] = []
        for k, box in enumerate(boxes):
            ids = encode(format_grid_box(box))
            if ids[: len(self.open_ids)] != self.open_ids:
                continue
            tag = encode(tags[k]) if tags is not None and tags[k].strip() else ()
            words = set(encode(attributes[k])) if attributes and attributes[k] else set()
            self.entities.append((ids[len(self.open_ids) :], tag, words))
        self.rests = sorted({rest for rest, _, _ in self.entities})
        self.phrase_tokens = int(phrase_tokens)
        longest_tag = max((len(t) for _, t, _ in self.entities), default=0)
        self.context = longest_tag + self.phrase_tokens if tags is not None else 0
        self.window = len(self.open_ids) + max((len(r) for r in self.rests), default=0)

    def _named(self, before: Sequence[int]) -> list[tuple[int, ...]]:
        """Box rests of the entities the tokens ``before`` "<box>" name (all if none)."""
        before = tuple(before)
        named = [
            (rest, len(tag), words)
            for rest, tag, words in self.entities
            if tag and before[-len(tag) :] == tag
        ]
        if not named:
            return self.rests
        scores = []
        for rest, tag_len, words in named:
            phrase = before[-(tag_len + self.phrase_tokens) : -tag_len]
            scores.append(sum(1 for t in phrase if t in words))
        best = max(scores)
        return sorted({rest for (rest, _, _), score in zip(named, scores) if score == best})

    def allowed(self, ids: Sequence[int]) -> list[int] | None:
        """Token ids that may follow ``ids`` (a sequence so far), or None when no box is open."""
        if not self.rests or not self.open_ids:
            return None
        tail = tuple(ids[-(self.window + self.context) :])
        n = len(self.open_ids)
        lowest = max(0, len(tail) - self.window)
        for start in range(len(tail) - n, lowest - 1, -1):
            if tail[start : start + n] == self.open_ids:
                done = tail[start + n :]
                rests = self._named(tail[:start]) if self.context else self.rests
                for candidates in (rests, self.rests):
                    following = {
                        r[len(done)]
                        for r in candidates
                        if len(r) > len(done) and r[: len(done)] == done
                    }
                    if following:
                        return sorted(following)
                return None
        return None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids: Long[B, L] (the sequences so far); scores: Float[B, V] next-token scores."""
        out = scores
        for row in range(input_ids.shape[0]):
            allowed = self.allowed(input_ids[row, -(self.window + self.context) :].tolist())
            if allowed is None:
                continue
            if out is scores:
                out = scores.clone()
            keep = out[row, allowed]
            out[row] = float("-inf")
            out[row, allowed] = keep
        return out


@CAPTION_WRITER_REGISTRY.register(aliases=("hf_causal_lm",))
class HFCausalLMWriter(CaptionWriter):
    """A local Hugging Face causal LM writes the caption from the prompt of its
    :class:`~pix2cap.bridge.prompt.PromptFormat`.

    Args:
        model_path: a saved model folder (``config.json``, weights, tokenizer files); loaded
            with ``local_files_only=True``.
        adapter_path: optional LoRA adapter folder from
            :func:`~pix2cap.bridge.lm_training.finetune_lora` (needs ``peft``).
        max_new_tokens, temperature, top_p: decoding (``temperature <= 0``: greedy).
        num_beams: beam search width for non-sampled decoding (1: greedy).
        prompt_format: the prompt form; None: the one saved in the adapter folder, else in
            the model folder, else the default :class:`~pix2cap.bridge.prompt.PromptFormat`
            (for an LM never trained on the bridge's prompt).
        ground_region_captions: overrides the format's ``ground_region_captions`` (region
            captions with their relation clause tied to the decoded entities, or as written);
            None keeps it.
        constrain_boxes: decode boxes with :class:`GridBoxLogitsProcessor`, so every box the
            caption states is the box of a listed entity.
        boxes_follow_names: with ``constrain_boxes``, a box written right after an entity's
            tag (and attribute words) must be that entity's box.
        use_chat_template: None = when the tokenizer has one.
        device, dtype: where / how to run (:class:`~pix2cap.modeling.language_model.LocalCausalLM`:
            device None is CUDA when available, else the CPU; dtype ``"auto"`` is bfloat16 on
            CUDA, float32 on the CPU).
        grid: the model-side box grid.
        max_prompt_tokens: prompts longer than this are cut (their end is dropped) so the
            prompt plus ``max_new_tokens`` fits the model; None: the model's positions minus
            ``max_new_tokens``.
        seed: seed for sampled decoding.
    """

    def __init__(
        self,
        model_path: str,
        *,
        adapter_path: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float | None = None,
        num_beams: int = 1,
        prompt_format: PromptFormat | None = None,
        ground_region_captions: bool | None = None,
        constrain_boxes: bool = True,
        boxes_follow_names: bool = True,
        use_chat_template: bool | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        grid: int = GRID,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
    ):
        if int(num_beams) < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        self.lm = load_causal_lm(
            model_path, device=device, dtype=dtype, use_chat_template=use_chat_template
        )
        self.model_path = self.lm.path
        format_dir = self.model_path
        if adapter_path is not None:
            adapter_path = os.path.expanduser(adapter_path)
            if not os.path.isdir(adapter_path):
                raise FileNotFoundError(f"{adapter_path}: LoRA adapter folder not found")
            from peft import PeftModel

            self.lm.model = PeftModel.from_pretrained(self.lm.model, adapter_path, is_trainable=False)
            self.lm.model.eval()
            format_dir = adapter_path
        if prompt_format is None:
            saved = os.path.isfile(os.path.join(format_dir, PROMPT_FORMAT_FILE))
            prompt_format = PromptFormat.load(format_dir) if saved else PromptFormat()
        if ground_region_captions is not None:
            prompt_format = dataclasses.replace(
                prompt_format, ground_region_captions=bool(ground_region_captions)
            )
        self.prompt_format = prompt_format
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.num_beams = int(num_beams)
        self.constrain_boxes = bool(constrain_boxes)
        self.boxes_follow_names = bool(boxes_follow_names)
        self.grid = int(grid)
        limit = self.lm.max_positions
        if max_prompt_tokens is None and limit:
            max_prompt_tokens = max(1, limit - self.max_new_tokens)
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = int(seed)

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def model(self):
        return self.lm.model

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, cut to ``max_prompt_tokens``."""
        return self.lm.layout.prompt_ids(prompt, self.max_prompt_tokens)

    def generate(
        self,
        prompt: str,
        boxes: Sequence[Sequence[int]] | None = None,
        tags: Sequence[str] | None = None,
        attributes: Sequence[str] | None = None,
    ) -> str:
        """Raw continuation of ``prompt`` (special tokens removed); with ``boxes`` (grid boxes),
        every box it writes is one of them, and with their entities' ``tags`` (and
        ``attributes``) the one the text just named (:class:`GridBoxLogitsProcessor`)."""
        processors = (
            [GridBoxLogitsProcessor(self.tokenizer, boxes, tags, attributes)] if boxes else None
        )
        return self.lm.generate(
            self.prompt_ids(prompt),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            num_beams=self.num_beams,
            seed=self.seed,
            logits_processor=processors,
        )

    def __call__(self, content, stages, image_size) -> str:
        height, width = int(image_size[0]), int(image_size[1])
        boxes = tags = attributes = None
        if self.constrain_boxes:
            listed = [e for e in content.entities if e.grid_box is not None]
            boxes = [e.grid_box for e in listed]
            if self.boxes_follow_names:
                tags = [e.name for e in listed]
                attributes = [" ".join(content.attributes_of(e.id)) for e in listed]
        text = self.generate(self.prompt_format.build(stages, content), boxes, tags, attributes)
        return _tidy(grid_text_to_pancap(text, width, height, self.grid))


def _tidy(text: str) -> str:
    """Undo the spacing a WordPiece decode leaves around brackets and punctuation."""
    text = re.sub(r"\[\s*\[", "[[", text)
    text = re.sub(r"\]\s*\]", "]]", text)
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


@CAPTION_WRITER_REGISTRY.register(aliases=("small_lm",))
class SmallLMWriter(HFCausalLMWriter):
    """The small LM of :func:`~pix2cap.bridge.lm_training.train_small_lm` (same decoding as
    :class:`HFCausalLMWriter`; no chat template: ``[CLS] prompt [SEP]`` then the caption up
    to ``[SEP]``). Its folder must hold the prompt format it was trained with
    (``pix2cap_prompt_format.json``) and its training settings (``pix2cap_small_lm.json``,
    whose caption budget is the default ``max_new_tokens``)."""

    def __init__(self, model_path: str, **kwargs):
        path = require_model_dir(model_path, "small LM")
        info_file = os.path.join(path, SMALL_LM_INFO_FILE)
        if not os.path.isfile(info_file):
            raise FileNotFoundError(
                f"{path}: no {SMALL_LM_INFO_FILE}; train the small LM with train_small_lm()"
            )
        with open(info_file, encoding="utf-8") as f:
            info = json.load(f)
        kwargs.setdefault("use_chat_template", False)
        kwargs.setdefault("prompt_format", PromptFormat.load(path))
        kwargs.setdefault("max_new_tokens", int(info.get("max_target_tokens", 512)))
        super().__init__(path, **kwargs)
