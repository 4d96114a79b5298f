"""Content extractors: caption (or structured prediction) -> :class:`PanopticContent`.

Registered in :data:`PANCAP_EXTRACTOR_REGISTRY`; build one with :func:`build_extractor`:

- ``llm``: the official route. A language-model judge (``hf_local`` or ``openai_http``) is
  prompted to write the ``ID | type -->> tuple`` lines, read by the protocol's parser
  (:func:`~.protocol.parse_lines`: the official parser by default).
- ``lines``: the text already *is* extraction lines (an official content file's
  ``all_content``, or lines written by any other extractor), read by the protocol's parser --
  how two scorers are compared on identical lines.
- ``structured``: no extraction at all. pix2cap's own predictions already know their
  entities, boxes, attributes, relations and global items and hand them over in the dict
  form of :meth:`PanopticContent.from_dict`.
- ``heuristic``: an APPROXIMATION for free text without a language model. Entities are the
  phrases before ``[[x1, y1, x2, y2]]`` boxes (:func:`parse_pancap_boxes`), named by the head
  noun (last word of the noun phrase); attributes are the adjectives from fixed word lists
  (colours, sizes, textures, materials, states) just before the head noun; a relation is the
  text between two boxed phrases of one sentence when it holds a spatial or action keyword
  ("is to the left of", "above", "on", "next to", ...); global items are the sentences
  without boxes after the last boxed one. Mentions with the same head noun and the same box
  are one entity. Good on templated captions (the shapes dataset), rough on real prose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

from pix2cap.data.caption_formats import parse_pancap_boxes
from pix2cap.data.text import (
    ARTICLES,
    COLOUR_WORDS,
    DEMONSTRATIVES,
    POSSESSIVE_DETERMINERS,
    QUANTIFIERS,
    WORD_RE,
)
from pix2cap.utils.registry import Registry

from .content import Attribute, Entity, GlobalItem, PanopticContent, Relation
from .protocol import DEFAULT_PROTOCOL, check_protocol, parse_lines

__all__ = [
    "PANCAP_EXTRACTOR_REGISTRY",
    "ContentExtractor",
    "LLMExtractor",
    "StructuredExtractor",
    "HeuristicExtractor",
    "LinesExtractor",
    "build_extractor",
    "extraction_prompt",
]

PANCAP_EXTRACTOR_REGISTRY = Registry("PANCAP_EXTRACTOR")
PANCAP_EXTRACTOR_REGISTRY.__doc__ = """
Content extractors of PancapScore: ``extract(text, structured=None, where="") ->
PanopticContent``.
"""


class ContentExtractor:
    """Base class; ``name`` appears in results, ``is_llm`` marks the official route."""

    name = "extractor"
    is_llm = False

    def extract(
        self, text: str, structured: Optional[Mapping] = None, where: str = "caption"
    ) -> PanopticContent:
        raise TypeError(f"{type(self).__name__} does not extract content")


def extraction_prompt(caption: str) -> str:
    """The prompt asking a language model for the extraction lines of ``caption``."""
    return (
        "Extract the semantic content of the image description below as a numbered list, "
        "one item per line, in the form 'ID | type -->> tuple'. Types:\n"
        "- entity: every entity instance, as (whole, <semantic tag>) or (part, <tag>);\n"
        "- location: the bounding box of an entity when the description gives one, as "
        "(entity <id>, [x1, y1, x2, y2]);\n"
        "- attribute: one property of one entity, as (entity <id>, \"<sentence>\");\n"
        "- relation: a relation between entities, as (entity <id>, entity <id>, "
        "\"<sentence>\");\n"
        "- global: a statement about the whole image, as (\"<sentence>\").\n"
        "Refer to entities only as 'entity <id>', where <id> is the ID of the entity's line. "
        "Example:\n"
        "1 | entity -->> (whole, motorcycle)\n"
        "2 | entity -->> (whole, road)\n"
        "3 | location -->> (entity 1, [0.50, 0.70, 0.83, 1.00])\n"
        "4 | attribute -->> (entity 1, \"entity 1 is blue\")\n"
        "5 | relation -->> (entity 1, entity 2, \"entity 1 is on entity 2\")\n"
        "6 | global -->> (\"the scene feels tranquil\")\n"
        "Write only these lines.\n\n"
        f"Description:\n{caption}\n"
    )


@PANCAP_EXTRACTOR_REGISTRY.register(aliases=("llm",))
class LLMExtractor(ContentExtractor):
    """Extraction by a language-model judge (the official route).

    Args:
        judge: a judge with ``complete(prompt) -> str`` (``hf_local``/``openai_http``).
        max_new_tokens: generation budget per caption.
        protocol: the parser of the written lines (``official`` or ``lenient``).
    """

    name = "llm"
    is_llm = True

    def __init__(self, judge, max_new_tokens: int = 2048, protocol: str = DEFAULT_PROTOCOL):
        if not getattr(judge, "is_llm", False):
            raise ValueError(
                f"the llm extractor needs a language-model judge (hf_local or openai_http), "
                f"got {getattr(judge, 'name', type(judge).__name__)!r}"
            )
        self.judge = judge
        self.max_new_tokens = int(max_new_tokens)
        self.protocol = check_protocol(protocol)

    def extract(self, text, structured=None, where="caption"):
        reply = self.judge.complete(extraction_prompt(text), max_new_tokens=self.max_new_tokens)
        return parse_lines(reply, self.protocol)


@PANCAP_EXTRACTOR_REGISTRY.register(aliases=("lines",))
class LinesExtractor(ContentExtractor):
    """The text is extraction lines already; read them by ``protocol``'s parser.

    Counts as language-model extraction (``is_llm``) only when told the lines came from one
    (``from_llm=True``, e.g. the official content files written by Qwen2.5-14B-Instruct).
    """

    name = "lines"

    def __init__(self, protocol: str = DEFAULT_PROTOCOL, from_llm: bool = False):
        self.protocol = check_protocol(protocol)
        self.is_llm = bool(from_llm)

    def extract(self, text, structured=None, where="caption"):
        return parse_lines(text, self.protocol)


@PANCAP_EXTRACTOR_REGISTRY.register(aliases=("structured",))
class StructuredExtractor(ContentExtractor):
    """Content handed over as a dict (:meth:`PanopticContent.from_dict`); ``text`` unused."""

    name = "structured"

    def extract(self, text, structured=None, where="caption"):
        if structured is None:
            raise ValueError(
                f"{where}: the structured extractor needs the prediction's 'structured' field"
            )
        content = PanopticContent.from_dict(structured, where=where)
        content.raw = text or ""
        return content


_COLOR_MODIFIERS = {"dark", "light", "pale", "bright", "deep", "vivid", "muted"}
_SIZES = "small large big tiny huge medium tall short long wide narrow thin thick giant".split()
_TEXTURES = (
    "striped dotted solid smooth rough fluffy shiny glossy matte furry grainy rippled grassy "
    "checkered patterned plaid wrinkled textured spotted"
).split()
_MATERIALS = (
    "wooden metal metallic glass plastic leather stone concrete brick fabric cotton woolen "
    "paper ceramic marble steel iron rubber denim"
).split()
_STATES = (
    "old new young open closed wet dry empty full clear cloudy sunny transparent round "
    "rectangular circular triangular vintage modern colorful colourful wavy"
).split()
_ADJECTIVES = COLOUR_WORDS | _COLOR_MODIFIERS | set(_SIZES) | set(_TEXTURES) | set(_MATERIALS)
_ADJECTIVES |= set(_STATES)
_DETERMINERS = ARTICLES | DEMONSTRATIVES | POSSESSIVE_DETERMINERS | QUANTIFIERS
_RELATION_KEYWORDS = (
    "left right above below behind front on under beneath over next beside near inside in "
    "between top atop holding holds wearing wears against across along around among within "
    "under underneath surrounding covering covers riding sitting standing"
).split()
_RELATION_RE = re.compile(r"\b(" + "|".join(sorted(set(_RELATION_KEYWORDS))) + r")\b", re.I)
_BRACKETS_RE = re.compile(r"\[\[[^\[\]]*\]\]")
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)|\n")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _noun_phrase(text: str, start: int, end: int) -> tuple[int, list[str]]:
    """(start offset of the noun phrase, its words) for the phrase ``text[start:end]``: the
    words after the last determiner, else the head noun and the adjectives before it."""
    words = list(WORD_RE.finditer(text, start, end))
    if not words:
        return end, []
    cut = None
    for k, w in enumerate(words):
        if w.group(0).lower() in _DETERMINERS and k < len(words) - 1:
            cut = k + 1
    if cut is None:
        cut = len(words) - 1
        while cut > 0 and words[cut - 1].group(0).lower() in _ADJECTIVES:
            cut -= 1
    kept = words[cut:]
    return kept[0].start(), [w.group(0) for w in kept]


def _adjectives(modifiers: list[str]) -> list[str]:
    """Attribute phrases from the words before a head noun: listed adjectives, with a colour
    modifier joined to the colour after it ("dark blue")."""
    out: list[str] = []
    k = 0
    lower = [w.lower() for w in modifiers]
    while k < len(lower):
        w = lower[k]
        if w in _COLOR_MODIFIERS and k + 1 < len(lower) and lower[k + 1] in COLOUR_WORDS:
            out.append(f"{w} {lower[k + 1]}")
            k += 2
            continue
        if w in _ADJECTIVES:
            out.append(w)
        k += 1
    return out


@PANCAP_EXTRACTOR_REGISTRY.register(aliases=("heuristic",))
class HeuristicExtractor(ContentExtractor):
    """Rule-based extraction from free text (an APPROXIMATION; see the module docstring)."""

    name = "heuristic"

    def extract(self, text, structured=None, where="caption"):
        content = PanopticContent(raw=text if isinstance(text, str) else "")
        if not isinstance(text, str):
            content.malformed += 1
            return content
        sentences = _sentence_spans(text)

        def sentence_of(offset: int) -> int:
            for k, (s, e) in enumerate(sentences):
                if s <= offset < e:
                    return k
            return len(sentences) - 1

        by_key: dict[tuple, Entity] = {}
        attributes: set[tuple[int, str]] = set()
        relations: set[tuple[int, int, str]] = set()
        previous: Optional[tuple[int, int, int]] = None  # (entity id, box end, sentence)
        boxed_sentences: set[int] = set()
        for item in parse_pancap_boxes(text):
            sentence = sentence_of(item["box_start"])
            boxed_sentences.add(sentence)
            np_start, words = _noun_phrase(text, item["start"], item["end"])
            if not words:
                content.malformed += 1
                previous = None
                continue
            head = words[-1].lower()
            box = [min(1.0, max(0.0, v)) for v in item["box"]]
            if box[0] > box[2] or box[1] > box[3]:
                content.malformed += 1
                previous = None
                continue
            key = (head, tuple(round(v, 3) for v in box))
            entity = by_key.get(key)
            if entity is None:
                entity = Entity(id=len(by_key) + 1, name=head, box=box)
                by_key[key] = entity
                content.entities.append(entity)
            for adjective in _adjectives(words[:-1]):
                if (entity.id, adjective) not in attributes:
                    attributes.add((entity.id, adjective))
                    content.attributes.append(
                        Attribute(entity_id=entity.id, text=f"entity {entity.id} is {adjective}")
                    )
            if previous is not None and previous[2] == sentence and previous[0] != entity.id:
                between = text[previous[1] : np_start]
                words_between = WORD_RE.findall(between)
                while words_between and words_between[-1].lower() in _DETERMINERS:
                    words_between.pop()
                phrase = " ".join(words_between)
                if "," not in between and phrase and _RELATION_RE.search(phrase):
                    key_rel = (previous[0], entity.id, phrase.lower())
                    if key_rel not in relations:
                        relations.add(key_rel)
                        content.relations.append(
                            Relation(
                                entity_ids=(previous[0], entity.id),
                                text=f"entity {previous[0]} {phrase} entity {entity.id}",
                            )
                        )
            previous = (entity.id, item["box_end"], sentence)

        last_boxed = max(boxed_sentences, default=-1)
        for k in range(last_boxed + 1, len(sentences)):
            s, e = sentences[k]
            # Broken box groups ("[[bad]]") are not part of a statement.
            sentence_text = _BRACKETS_RE.sub(" ", text[s:e])
            sentence_text = " ".join(sentence_text.split()).strip(" .!?\n-*")
            if WORD_RE.search(sentence_text):
                content.global_items.append(GlobalItem(text=sentence_text))
        return content


def build_extractor(
    name: str, judge=None, protocol: str = DEFAULT_PROTOCOL, **kwargs
) -> ContentExtractor:
    """An extractor by short name (``llm``, ``lines``, ``structured``, ``heuristic``) or class
    name; ``llm`` takes the judge that will write the extraction lines, and the line readers
    (``llm``, ``lines``) the ``protocol`` of their parser."""
    canonical = PANCAP_EXTRACTOR_REGISTRY.canonical_name(name)
    if canonical == "LLMExtractor":
        kwargs["judge"] = judge
    if canonical in ("LLMExtractor", "LinesExtractor"):
        kwargs["protocol"] = protocol
    return PANCAP_EXTRACTOR_REGISTRY.build(name, **kwargs)


class AutoExtractor(ContentExtractor):
    """Per caption: ``structured`` when it comes with its structured content (a pix2cap
    prediction), else ``fallback``."""

    def __init__(self, fallback: ContentExtractor):
        self.fallback = fallback
        self.structured = build_extractor("structured")
        self.name = f"auto(structured|{fallback.name})"
        self.is_llm = False
        if getattr(fallback, "protocol", None) is not None:
            self.protocol = fallback.protocol

    def extract(self, text, structured=None, where="caption"):
        if structured is not None:
            return self.structured.extract(text, structured, where=where)
        return self.fallback.extract(text, None, where=where)


def extractor_for(
    name: str, judge, for_gt: bool, protocol: str = DEFAULT_PROTOCOL
) -> ContentExtractor:
    """The extractor of one side of PancapScore by option name: ``auto`` (``llm`` with an LLM
    judge, else ``heuristic``; predictions read their structured content where they have it),
    ``llm``, ``lines`` (the texts are extraction lines), ``structured`` (predictions only) or
    ``heuristic``; line readers parse by ``protocol``.

    Raises:
        ValueError: ``structured`` for the ground truth (free text only).
    """
    fallback = "llm" if judge.is_llm else "heuristic"
    if name == "auto":
        base = build_extractor(fallback, judge=judge, protocol=protocol)
        return base if for_gt else AutoExtractor(base)
    if for_gt and name == "structured":
        raise ValueError("the ground-truth extractor cannot be 'structured': the ground truth is free text only")
    return build_extractor(name, judge=judge, protocol=protocol)
