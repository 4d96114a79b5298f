"""A local Hugging Face causal language model: load it, lay out its prompts, generate.

One helper for every place that runs a text LM from a folder (the bridge's caption writers
and their training, the ``hf_local`` PancapScore judge), so that they load, encode, truncate
and decode the same way::

    lm = LocalCausalLM("path/to/model", device="cpu")
    ids = lm.layout.prompt_ids("Describe the image.", max_tokens=500)
    text = lm.generate(ids, max_new_tokens=64)

Loading never contacts the hub (``local_files_only=True``). The writers and the judge share
one default: ``device=None`` is CUDA when available, else the CPU, and ``dtype="auto"`` is
bfloat16 on CUDA, float32 on the CPU (weights saved in half precision are computed in float32
there); ``dtype=None`` is always float32 (LoRA training asks for it).

Prompt layout (:class:`PromptLayout`). With a chat template: the prompt is one user turn
plus the generation prompt. Without: ``[BOS] prompt [SEP]`` where the tokenizer has those
tokens (BOS, else CLS; a BERT vocabulary's SEP both ends the prompt and ends the answer). A
prompt longer than its budget loses the end of its text; the framing (BOS and closing SEP, or
the template's turn markers and generation prompt) is kept, because it tells the model where
its answer starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PromptLayout", "LocalCausalLM", "require_model_dir", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available else the CPU for None."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float32; ``"auto"``: bfloat16 on CUDA, float32 elsewhere; or a dtype / its name
    (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', {', '.join(map(repr, _DTYPES))} or a torch dtype, got {dtype!r}")
    return _DTYPES[dtype]


def require_model_dir(path: str, what: str = "language model") -> str:
    """``path`` (user-expanded) if it is a saved model folder, else FileNotFoundError."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path}: {what} folder not found; it must be a local model folder (config.json, "
            "weights, tokenizer files): hub names are not downloaded"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; {what} must be a saved model folder")
    return path


class PromptLayout:
    """How a prompt (and a training target) become token ids for one tokenizer (module
    docstring).

    Args:
        tokenizer: a Hugging Face tokenizer.
        use_chat_template: True / False, or None: whenever the tokenizer has a template
            (decided at each call, so a template set later is used).
    """

    def __init__(self, tokenizer, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        if use_chat_template and not self._has_template():
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = tokenizer.sep_token_id
        self.bos_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        )
        self.sep_id = tokenizer.sep_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template."""
        if self.use_chat_template is None:
            return self._has_template()
        return bool(self.use_chat_template)

    def _framed_ids(self, prompt: str) -> list[int]:
        """``prompt`` as a user turn of the chat template, or ``[BOS] prompt [SEP]``."""
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = ([self.bos_id] if self.bos_id is not None else []) + list(ids)
        if self.sep_id is not None:
            ids.append(self.sep_id)
        return ids

    def prompt_ids(self, prompt: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``prompt``, at most ``max_tokens`` of them.

        A longer prompt loses the end of its *text*; the framing (BOS and the closing SEP, or
        the chat template's turn markers and generation prompt) is always kept, because it
        tells the model where its answer starts.
        """
        ids = self._framed_ids(prompt)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        text_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        overhead = len(ids) - len(text_ids)
        if max_tokens <= overhead:
            raise ValueError(
                f"a prompt budget of {max_tokens} tokens leaves no room for text "
                f"({overhead} tokens of framing)"
            )
        keep = max_tokens - overhead
        if not self.chat:
            head = ids[: (1 if self.bos_id is not None else 0) + keep]
            return head + ([self.sep_id] if self.sep_id is not None else [])
        # The template's text is re-tokenized inside the turn, so a cut may still be a token
        # or two long at a word boundary: shorten until it fits.
        while True:
            ids = self._framed_ids(self.tokenizer.decode(text_ids[:keep]))
            if len(ids) <= max_tokens or keep == 0:
                return ids[:max_tokens]
            keep -= len(ids) - max_tokens

    def target_ids(self, target: str) -> list[int]:
        """Token ids of a training target, closed by the end token (EOS, else SEP)."""
        ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids


class LocalCausalLM:
    """A causal LM and its tokenizer from a local folder, with :class:`PromptLayout`.

    Args:
        path: the model folder (``config.json``, weights, tokenizer files).
        device, dtype: see the module docstring.
        use_chat_template: see :class:`PromptLayout`.
        what: how errors name the folder ("language model", "judge model", ...).

    Attributes:
        tokenizer, model (in eval mode, on ``device``), layout, device, path.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        use_chat_template: bool | None = None,
        what: str = "language model",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = require_model_dir(path, what)
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, local_files_only=True, dtype=resolve_dtype(dtype, self.device)
        )
        self.model.to(self.device)
        self.model.eval()
        self.layout = PromptLayout(self.tokenizer, use_chat_template)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (prompt + answer), when its config says."""
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(limit) if limit else None

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        num_beams: int = 1,
        seed: int = 0,
        logits_processor: Sequence[Any] | None = None,
    ) -> str:
        """The continuation of ``prompt_ids`` as text (special tokens removed, stripped).

        ``temperature <= 0``: greedy, or beam search with ``num_beams > 1``; otherwise
        sampling seeded with ``seed`` (and nucleus ``top_p``). ``logits_processor``:
        ``transformers`` logits processors applied at every step.
        """
        from transformers import LogitsProcessorList

        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": self.layout.pad_id}
        if logits_processor:
            kwargs["logits_processor"] = LogitsProcessorList(list(logits_processor))
        if self.layout.eos_id is not None:
            kwargs["eos_token_id"] = self.layout.eos_id
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=float(temperature))
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        else:
            kwargs["do_sample"] = False
            if num_beams > 1:
                kwargs["num_beams"] = int(num_beams)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
