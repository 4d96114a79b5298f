"""The two reading protocols of PancapScore: ``official`` (the default) and ``lenient``.

``official`` reproduces the authors' scorer (``pancapscore/eval_tag_and_loc.py`` and
``eval_alldims.py`` of the Panoptic Captioning release), so that the same extraction lines
give the same E and L:

- **parsing** (:func:`parse_official_lines`): a line is ``int(<text before the first "|">)``,
  then, after every ``_`` became a space, a type word that must be exactly one of ``entity``,
  ``location``, ``attribute``, ``relation``, ``global`` followed by `` -->> `` with one space
  on each side. The tuple is cut at commas after stripping ``(`` on the left and ``)`` and
  spaces on the right -- quotes do not protect commas. An entity's name is its *last* field
  (``(whole, brown, dog)`` names ``dog``; a line without parentheses reads the same; the name
  may be empty). A location takes any four comma-separated floats (no order check) for an
  entity declared *on an earlier line*, written ``entity <id>`` or bare ``<id>``. A second
  entity or location line with the same id replaces the first. Attribute and relation lines
  follow the official acceptance rules: an ``entity <id>`` attribute must name its entity in
  its sentence (a bare id need not; ``global``/``image`` make it a global item); a relation
  between two ``entity <id>`` references must name the first in its sentence, one with a bare
  id both. Everything else is dropped and counted in ``malformed``: a capitalised type word,
  another arrow spacing, bullets, ``Entity 1`` as the ID, a location before its entity.
- **names**: identical only as exact strings; else one name contained in the other scores 1
  as a synonym (the substring rule, applied with or without WordNet); else, with WordNet, the
  IoU of the noun lemma-name sets gathered word by word (``|A & B| / (|A | B| + 1e-6)``).
- **boxes**: IoU in float32, as ``torchvision.ops.box_iou`` on ``torch.tensor`` of the
  parsed floats computes it (so a pair at IoU 0.5 may round either way, as there).
- **averaging**: every image counts in every mean. A dimension whose ground truth or
  prediction has no item scores 0 for that image (the official location rule, and its
  attribute/relation/global rule). Where the official code would crash -- a side without
  entities divides by zero, both sides empty break its embedder -- entity F1 is 0 and the
  image is counted under ``official_code_crashes`` in the result.

``lenient`` is pix2cap's own reading for free-form extractors: tolerant parsing
(:func:`~pix2cap.evaluation.pancapscore.content.parse_extraction`), names identical after
case and punctuation normalisation, the substring and synonym rules only with WordNet,
float64 IoU, and a dimension left out of an image's mean (None) when neither side has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .content import Attribute, Entity, GlobalItem, PanopticContent, Relation, parse_extraction

__all__ = [
    "PROTOCOLS",
    "DEFAULT_PROTOCOL",
    "check_protocol",
    "parse_official_lines",
    "parse_lines",
    "official_box_iou",
    "official_synonym_score",
    "CRASH_REASONS",
]

PROTOCOLS = ("official", "lenient")
DEFAULT_PROTOCOL = "official"
_TYPES = ("entity", "location", "attribute", "relation", "global")
_ARROW = " -->> "

# Why the official code would stop on an image (per-image key -> explanation).
CRASH_REASONS = {
    "no_entities": "neither side has an entity (the official embedder fails on empty lists)",
    "no_gt_entities": "the ground truth has no entity (the official recall divides by zero)",
    "no_pred_entities": "the prediction has no entity (the official precision divides by zero)",
}


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a ValueError naming them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown PancapScore protocol {protocol!r}; expected one of {PROTOCOLS}")
    return protocol


def _official_box(text: str) -> Optional[list[float]]:
    """Four floats from ``[a, b, c, d]`` (any number of brackets), else None."""
    try:
        values = [float(v) for v in text.lstrip("[").rstrip("]").split(",")]
    except ValueError:
        return None
    return values if len(values) == 4 else None


def _fields(line: str) -> Optional[tuple[int, str, list[str]]]:
    """(id, type, raw tuple fields) of one line by the official cut, or None."""
    try:
        item_id = int(line.split("|")[0].rstrip(" "))
    except ValueError:
        return None
    line = line.replace("_", " ")
    parts = line.split("|")
    if len(parts) < 2:
        return None
    halves = parts[1].lstrip(" ").split(_ARROW)
    if halves[0] not in _TYPES or len(halves) < 2:
        return None
    return item_id, halves[0], halves[1].lstrip("(").rstrip(") ").split(",")


def _text(fields: list[str]) -> str:
    """The official reading of a quoted sentence spread over comma-cut fields."""
    return ",".join(fields).lstrip('" ').rstrip('"')


def parse_official_lines(text: str) -> PanopticContent:
    """Extraction lines read by the official parser's rules (module docstring).

    Entity ids come from the entity lines' IDs; every line that is not used -- unparsable,
    or rejected by an acceptance rule -- adds one to ``malformed`` (blank lines do not).
    """
    content = PanopticContent(raw=text if isinstance(text, str) else "")
    if not isinstance(text, str):
        content.malformed += 1
        return content
    entities: dict[str, Entity] = {}  # "entity <id>" -> entity, in first-declared order

    def declared(ref: str) -> Optional[str]:
        """The key of an ``entity <id>`` or bare ``<id>`` reference to a declared entity."""
        if ref in entities:
            return ref
        if not ref.startswith("entity") and f"entity {ref}" in entities:
            return f"entity {ref}"
        return None

    for line in text.split("\n"):
        if line.strip() == "":
            continue
        parsed = _fields(line)
        if parsed is None:
            content.malformed += 1
            continue
        item_id, kind, fields = parsed
        if kind == "entity":
            fields = [f.strip(" ") for f in fields]
            key = f"entity {item_id}"
            if key in entities:  # a repeated id renames the entity, keeping its place and box
                entities[key].name = fields[-1]
                entities[key].kind = fields[0] if len(fields) > 1 else "whole"
            else:
                entities[key] = Entity(
                    id=item_id, name=fields[-1], kind=fields[0] if len(fields) > 1 else "whole"
                )
        elif kind == "location":
            box = _official_box(_text(fields[1:]))
            key = declared(fields[0].strip(" "))
            if box is None or key is None:
                content.malformed += 1
            else:
                entities[key].box = box
        elif kind == "global":
            content.global_items.append(GlobalItem(text=_text(fields)))
        elif kind == "attribute":
            ref, statement = fields[0].strip(" "), _text(fields[1:])
            if ref.startswith("entity"):
                if ref in entities and ref in statement:
                    content.attributes.append(Attribute(entities[ref].id, statement))
                else:
                    content.malformed += 1
            elif ref in ("global", "image"):
                content.global_items.append(GlobalItem(text=statement))
            elif f"entity {ref}" in entities:
                content.attributes.append(Attribute(entities[f"entity {ref}"].id, statement))
            else:
                content.malformed += 1
        else:  # relation
            if len(fields) < 2:
                content.malformed += 1
                continue
            first, second = fields[0].strip(" "), fields[1].strip(" ")
            statement = _text(fields[2:])
            # Two "entity <id>" references need only the first in the sentence (the official
            # check tests the first twice); with a bare id both must be in it.
            both_named = first.startswith("entity") and second.startswith("entity")
            first = first if first.startswith("entity") else f"entity {first}"
            second = second if second.startswith("entity") else f"entity {second}"
            in_sentence = first in statement and (both_named or second in statement)
            if first in entities and second in entities and in_sentence:
                content.relations.append(
                    Relation((entities[first].id, entities[second].id), statement)
                )
            else:
                content.malformed += 1
    content.entities = list(entities.values())
    return content


def parse_lines(text: str, protocol: str = DEFAULT_PROTOCOL) -> PanopticContent:
    """Extraction lines read by ``protocol``'s parser."""
    if check_protocol(protocol) == "official":
        return parse_official_lines(text)
    return parse_extraction(text)


def official_box_iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes computed as the official code does: in float32
    by ``torchvision.ops.box_iou`` (no order check: a reversed box has a signed area there);
    0 when either box is missing."""
    if a is None or b is None:
        return 0.0
    # torch is imported here so that reading lines and the lenient protocol stay torch-free.
    import torch
    from torchvision.ops import box_iou

    return float(box_iou(torch.tensor([list(a)]), torch.tensor([list(b)]))[0, 0].item())


def official_synonym_score(a: str, b: str, wordnet=None) -> float:
    """The official synonym score of two entity names.

    1 when one name contains the other (exact substring, case included); else, with a
    WordNet corpus reader (``nltk.corpus.wordnet``), the IoU of the noun lemma names of the
    names' words (gathered word by word, as written, ``|A & B| / (|A | B| + 1e-6)``); else 0.
    """
    if a in b or b in a:
        return 1.0
    if wordnet is None:
        return 0.0
    first = _word_lemmas(a, wordnet)
    second = _word_lemmas(b, wordnet)
    return len(first & second) / (len(first | second) + 1e-6)


def _word_lemmas(name: str, wordnet) -> set[str]:
    lemmas: set[str] = set()
    for word in name.split():
        for synset in wordnet.synsets(word, wordnet.NOUN):
            lemmas.update(lemma.name() for lemma in synset.lemmas())
    return lemmas
