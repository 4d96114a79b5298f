"""Judges: what answers PancapScore's yes/no questions (and, for language models, extracts
content from captions).

Registered in :data:`PANCAP_JUDGE_REGISTRY`; build one with :func:`build_judge`:

- ``hf_local``: a Hugging Face causal language model from a local folder (never the hub),
  its chat template when it has one, greedy decoding.
- ``openai_http``: any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, llama.cpp,
  a hosted API), through the standard library's ``urllib``, with timeouts and retries.
- ``structured``: no language model; answers by comparing the question's item with the
  candidate content's items directly. An approximation of the official language-model judge.

Every judge tolerates bad output: unreadable answers count in ``stats["malformed_answers"]``
and score as wrong; failed requests count in ``stats["failed_requests"]``. Nothing raises
on a judge's reply.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Optional

import numpy as np
from pix2cap.data.text import ARTICLES, BASIC_COLOUR_WORDS, LOWERCASE_LETTERS_RE
from pix2cap.modeling.language_model import LocalCausalLM
from pix2cap.utils.registry import Registry

from .content import ENTITY_REF_RE, PanopticContent
from .matching import Embedder, cosine_matrix
from .qa import QAQuestion, parse_yes_no_answers

__all__ = [
    "PANCAP_JUDGE_REGISTRY",
    "PancapJudge",
    "LLMJudge",
    "HFLocalJudge",
    "OpenAIHTTPJudge",
    "StructuredJudge",
    "build_judge",
    "qa_prompt",
]

logger = logging.getLogger(__name__)

PANCAP_JUDGE_REGISTRY = Registry("PANCAP_JUDGE")
PANCAP_JUDGE_REGISTRY.__doc__ = """
Judges of PancapScore: ``cls(**kwargs)`` with ``answer(questions, candidate)``; language
model judges also have ``complete(prompt) -> str``.
"""


class PancapJudge:
    """Base class. ``name`` names the judge in results; ``is_llm`` says whether it can also
    extract content (``complete``)."""

    name = "judge"
    is_llm = False

    def __init__(self):
        self.stats = {"calls": 0, "malformed_answers": 0, "failed_requests": 0}

    def answer(
        self, questions: Sequence[QAQuestion], candidate: PanopticContent
    ) -> tuple[list[Optional[bool]], int]:
        """Answers to ``questions`` about ``candidate``: ``(answers, malformed)``, one
        True/False/None per question, None for an unreadable answer."""
        raise TypeError(f"{type(self).__name__} does not answer questions")

    def describe(self) -> str:
        return self.name


def qa_prompt(questions: Sequence[QAQuestion], candidate: PanopticContent) -> str:
    """The question prompt of the language-model judges: the candidate content in the
    extraction line format, then the numbered questions."""
    listing = "\n".join(f"{k + 1}. {q.text}" for k, q in enumerate(questions))
    content = candidate.to_lines() or "(no content)"
    return (
        "Below is the content of an image description, one item per line: entities with "
        "their ids, their locations as [x1, y1, x2, y2] boxes, their attributes, relations "
        "between entities, and the global state of the image.\n\n"
        f"Content:\n{content}\n\n"
        "Answer each question with yes or no, using only this content. Answer yes only if "
        "the content states or clearly implies it. Reply with exactly one line per question, "
        "in the form '<number>. yes' or '<number>. no', and nothing else.\n\n"
        f"Questions:\n{listing}\n"
    )


class LLMJudge(PancapJudge):
    """A judge backed by a text-completion function; subclasses provide :meth:`_complete`.

    Args:
        batch_size: questions per prompt (several per call keeps long evaluations cheap).
        max_new_tokens: generation budget per call; grows with the batch for QA.
    """

    is_llm = True

    def __init__(self, batch_size: int = 16, max_new_tokens: int = 1024):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _complete(self, prompt: str, max_new_tokens: int) -> str:
        raise TypeError(f"{type(self).__name__} has no completion backend")

    def complete(self, prompt: str, max_new_tokens: Optional[int] = None) -> str:
        """The model's reply to one user prompt; ``""`` when the call failed (counted)."""
        self.stats["calls"] += 1
        try:
            reply = self._complete(prompt, max_new_tokens or self.max_new_tokens)
        except Exception as e:  # a judge failure must not end a long evaluation
            self.stats["failed_requests"] += 1
            logger.warning("%s: the call failed (%s: %s)", self.name, type(e).__name__, e)
            return ""
        if not isinstance(reply, str):
            self.stats["failed_requests"] += 1
            return ""
        return reply

    def answer(self, questions, candidate):
        answers: list[Optional[bool]] = []
        malformed = 0
        for start in range(0, len(questions), self.batch_size):
            batch = questions[start : start + self.batch_size]
            reply = self.complete(qa_prompt(batch, candidate), max_new_tokens=8 * len(batch) + 16)
            got, bad = parse_yes_no_answers(reply, len(batch))
            answers.extend(got)
            malformed += bad
        self.stats["malformed_answers"] += malformed
        return answers, malformed


@PANCAP_JUDGE_REGISTRY.register(aliases=("hf_local",))
class HFLocalJudge(LLMJudge):
    """A local Hugging Face causal LM as judge, greedy, run by
    :class:`pix2cap.modeling.language_model.LocalCausalLM` (the helper the bridge's LM
    writers use: the same loading, prompt layout and truncation).

    Args:
        model: folder with the model and tokenizer (``local_files_only=True``: the hub is
            never contacted).
        device: torch device string; None: CUDA when available, else CPU.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``
            or ``"float16"``.
        batch_size, max_new_tokens: see :class:`LLMJudge`.
    """

    name = "hf_local"

    def __init__(
        self,
        model: str,
        device: Optional[str] = None,
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 1024,
    ):
        super().__init__(batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.lm = LocalCausalLM(str(model), device=device, dtype=dtype, what="the hf_local judge's model")
        self.model_path = self.lm.path
        self.device = self.lm.device
        self.tokenizer = self.lm.tokenizer
        self.model = self.lm.model
        # Context the model can see (prompt + reply), when its config does not say.
        self.max_positions = self.lm.max_positions or 4096

    def describe(self) -> str:
        return f"hf_local:{self.model_path}"

    def _encode(self, prompt: str) -> list[int]:
        return self.lm.layout.prompt_ids(prompt)

    def _complete(self, prompt: str, max_new_tokens: int) -> str:
        new_tokens = max(1, min(max_new_tokens, self.max_positions - 1))
        ids = self.lm.layout.prompt_ids(prompt, max_tokens=self.max_positions - new_tokens)
        return self.lm.generate(ids, max_new_tokens=new_tokens)


@PANCAP_JUDGE_REGISTRY.register(aliases=("openai_http",))
class OpenAIHTTPJudge(LLMJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended; a
            URL without ``/v1`` gets it).
        model: the model name the server expects.
        api_key_env: name of the environment variable holding the API key; unset or empty
            sends no ``Authorization`` header (local servers need none).
        timeout: seconds per request.
        retries: extra attempts after a failed request (timeouts, connection errors, HTTP
            429 and 5xx); other HTTP errors are not retried.
        backoff: seconds before the first retry, doubled each time.
        batch_size, max_new_tokens: see :class:`LLMJudge`.
    """

    name = "openai_http"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 16,
        max_new_tokens: int = 1024,
    ):
        super().__init__(batch_size=batch_size, max_new_tokens=max_new_tokens)
        if not base_url:
            raise ValueError("the openai_http judge needs a base URL (e.g. http://host:8000/v1)")
        if not model:
            raise ValueError("the openai_http judge needs a model name")
        url = base_url.rstrip("/")
        if not url.endswith("/chat/completions"):
            if not re.search(r"/v\d+$", url):
                url += "/v1"
            url += "/chat/completions"
        self.url = url
        self.model = model
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.stats["malformed_responses"] = 0

    def describe(self) -> str:
        return f"openai_http:{self.model}@{self.url}"

    def _request(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def _complete(self, prompt: str, max_new_tokens: int) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": int(max_new_tokens),
            }
        ).encode("utf-8")
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                raw = self._request(body)
                break
            except urllib.error.HTTPError as e:
                retriable = e.code == 429 or e.code >= 500
                if not retriable or attempt == self.retries:
                    raise RuntimeError(f"{self.url}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"{self.url}: {e}") from e
            time.sleep(delay)
            delay *= 2
        try:
            data = json.loads(raw.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            self.stats["malformed_responses"] += 1
            return ""
        return content if isinstance(content, str) else ""


# Attribute words of one kind contradict each other: "entity 1 is red" vs "entity 1 is blue".
_EXCLUSIVE_WORDS = {
    "color": BASIC_COLOUR_WORDS,
    "size": {"small", "medium", "large", "tiny", "huge", "big", "little"},
    "texture": {"solid", "striped", "dotted", "smooth", "rough", "checkered", "plain"},
    "material": {"wooden", "metal", "metallic", "glass", "plastic", "leather", "stone",
                 "concrete", "brick", "ceramic", "marble", "steel", "rubber", "paper"},
}
# Relation keywords and their opposites: "a left of b" == "b right of a".
_OPPOSITES = {
    "left": "right", "right": "left", "above": "below", "below": "above",
    "front": "behind", "behind": "front", "over": "under", "under": "over",
}


def _words(text: str) -> list[str]:
    return LOWERCASE_LETTERS_RE.findall(text.lower())


def _normalized(text: str) -> str:
    return " ".join(w for w in _words(text) if w not in ARTICLES)


def _relation_keyword(text: str) -> Optional[str]:
    for w in _words(text):
        if w in _OPPOSITES:
            return w
    return None


@PANCAP_JUDGE_REGISTRY.register(aliases=("structured",))
class StructuredJudge(PancapJudge):
    """Answers without a language model, from the candidate's items (an approximation).

    A statement is *supported* when an item of the candidate about the same entities says
    the same thing: the same normalised text (articles and punctuation ignored; entity
    references compared through the entities' names), or -- with an embedder -- cosine
    similarity >= ``threshold``; a relation also counts when the candidate states the
    reverse with the opposite keyword ("a left of b" for "b right of a"). It is
    *contradicted* when the candidate gives the same entity a different word of an exclusive
    kind (colour, size, texture, material) and not the asked one, or the same pair the opposite
    relation keyword. The yes-question is answered "supported", the no-question (the
    negation) "contradicted".

    Args:
        embedder: ``list[str] -> Float[N, D]``, or None for text identity only.
        threshold: cosine similarity for a paraphrase to count as the same statement.
    """

    name = "structured"

    def __init__(self, embedder: Optional[Embedder] = None, threshold: float = 0.85):
        super().__init__()
        self.embedder = embedder
        self.threshold = float(threshold)

    def answer(self, questions, candidate):
        self.stats["calls"] += 1
        names = {e.id: e.name for e in candidate.entities}
        answers: list[Optional[bool]] = []
        for q in questions:
            pool = self._pool(q, candidate)
            if q.positive:
                answers.append(self._supported(q, pool, names))
            else:
                answers.append(self._contradicted(q, pool))
        return answers, 0

    @staticmethod
    def _pool(q: QAQuestion, candidate: PanopticContent) -> list[tuple[tuple[int, ...], str]]:
        """The candidate items a question can be checked against: ``[(entity ids, text)]``."""
        if q.dimension == "attribute":
            return [((a.entity_id,), a.text) for a in candidate.attributes
                    if a.entity_id in q.entity_ids]
        if q.dimension == "relation":
            wanted = set(q.entity_ids)
            return [(tuple(r.entity_ids), r.text) for r in candidate.relations
                    if set(r.entity_ids) == wanted]
        return [((), g.text) for g in candidate.global_items]

    @staticmethod
    def _named(text: str, names: dict[int, str]) -> str:
        # Entity ids differ between captions; names make paraphrases comparable.
        return ENTITY_REF_RE.sub(
            lambda m: f"the {names.get(int(m.group(1)), 'entity ' + m.group(1))}", text
        )

    def _supported(self, q: QAQuestion, pool, names) -> bool:
        if not pool or self._contradicted(q, pool):
            return False
        if q.dimension == "relation" and len(q.entity_ids) == 2:
            keyword = _relation_keyword(q.statement)
            for ids, text in pool:
                if keyword and tuple(ids) == tuple(reversed(q.entity_ids)):
                    if _relation_keyword(text) == _OPPOSITES[keyword]:
                        return True
            pool = [(ids, text) for ids, text in pool if tuple(ids) == tuple(q.entity_ids)]
            if not pool:
                return False
        asked = _normalized(self._named(q.statement, names))
        texts = [_normalized(self._named(text, names)) for _, text in pool]
        if asked in texts:
            return True
        if self.embedder is None:
            return False
        sim = cosine_matrix(self.embedder, [asked], texts)
        return bool(np.max(sim) >= self.threshold)

    @staticmethod
    def _contradicted(q: QAQuestion, pool) -> bool:
        if q.dimension == "attribute":
            asked = set(_words(q.statement))
            for words in _EXCLUSIVE_WORDS.values():
                kind_asked = asked & words
                if not kind_asked:
                    continue
                said: set[str] = set()
                for _, text in pool:
                    said |= set(_words(text)) & words
                if said and not (said & kind_asked):
                    return True
            return False
        if q.dimension == "relation" and len(q.entity_ids) == 2:
            keyword = _relation_keyword(q.statement)
            if keyword is None:
                return False
            for ids, text in pool:
                other = _relation_keyword(text)
                same_order = tuple(ids) == tuple(q.entity_ids)
                if same_order and other == _OPPOSITES[keyword]:
                    return True
                if not same_order and other == keyword:
                    return True
            return False
        return False


def build_judge(name: str, **kwargs) -> PancapJudge:
    """A judge from :data:`PANCAP_JUDGE_REGISTRY` by short name (``hf_local``,
    ``openai_http``, ``structured``) or class name."""
    return PANCAP_JUDGE_REGISTRY.build(name, **kwargs)
