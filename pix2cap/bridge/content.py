"""Structured content of a panoptic caption, built from decoded segments and nothing else.

A panoptic caption has five kinds of content (Panoptic Captioning, DESIGN 5.5): entities
(tag), their locations (box), attributes, relations, and the global state of the image.
:func:`build_content` derives each one from what the segmentation model decoded:

* **entities** -- one per decoded segment (and per accepted extra instance): the tag is the
  class name (:func:`pix2cap.bridge.stages.clean_tag`), the box the tight box of the mask in
  SA-Pancap form (normalised, 3 decimals), plus score and dense caption.
* **attributes** -- from the entity's dense caption: the words between the leading
  determiner and the head noun of its first noun phrase (``"a large red striped circle to the
  left of ..."`` -> ``"large red striped"``). The head noun is the tag's last word (singular or
  plural) when the caption contains it; otherwise the last word before the first
  preposition/verb of the caption. No caption, or no words before the head: no attribute.
* **relations** -- from mask geometry (definitions below), and from the dense captions when a
  caption names a relation to another entity that can be identified uniquely (its tag occurs
  after the relation words, and only one other entity carries that tag, or the attribute
  words written before it single one out). Nothing is added that neither source supports,
  and a caption's directional relation (left of / right of / above / below) is dropped when
  the two masks' centroids say the opposite.
* **global** -- the number of things ("the image shows three objects"), counts per thing
  class when a class appears more than once, and the dominant stuff region (the stuff entity
  with the largest area, if it covers at least 25% of the image).

Geometry. For an entity ``A`` with Bool mask ``M_A`` [H, W] (non-empty): ``x0..x1`` /
``y0..y1`` the inclusive column / row extent, ``w = x1 - x0 + 1``, ``h = y1 - y0 + 1``,
``(cx, cy)`` the mean column / row of its pixels, ``area`` its pixel count.
``overlap_x(A, B) = min(A.x1, B.x1) - max(A.x0, B.x0) + 1`` (<= 0 when apart), ``overlap_y``
likewise. ``ring(A)`` = pixels outside ``M_A`` 4-adjacent to ``M_A`` (inside the image).
``below_edge(A)`` = for each column of ``M_A``, the pixel just under its lowest pixel of that
column (when inside the image). ``contact(A, B)`` = ``|ring(A) & M_B|``.

* ``left of (A, B)``: ``A.cx < B.cx`` and ``overlap_x(A, B) <= 0.25 * min(A.w, B.w)``;
  ``right of`` mirrors it. ``above (A, B)``: ``A.cy < B.cy`` and ``overlap_y(A, B) <= 0.25 *
  min(A.h, B.h)``; ``below`` mirrors it. (The same rules as the shapes dataset's captions.)
* ``on (T, R)`` -- T a thing, R a stuff region under it: at least ``max(3, 50%)`` of the
  ``below_edge(T)`` pixels lie in ``M_R`` and ``R.y0 > T.y0`` (R begins below the top of T,
  so T stands on R's top rather than lying within R).
* ``inside (A, B)`` -- at least 8 ring pixels and at least 90% of ``ring(A)`` in ``M_B``, and
  ``A.area < B.area`` (B surrounds A); not stated when ``on (A, B)`` holds.
* ``overlapping (A, B)`` -- the masks share at least 3 pixels (possible only when one of them
  is an extra instance, whose mask comes from its own query rather than the panoptic map).
* ``next to (A, B)`` -- both things, ``contact(A, B) >= 3`` (the masks touch) and none of the
  relations above holds for the pair.

Relations are listed once per unordered pair: for entity indices ``i < j``, the relation is
stated with ``i`` as subject (``right of`` rather than ``left of`` when that is what holds),
except ``on`` and ``inside``, whose subject is always the supported / enclosed entity.
Stuff-stuff pairs only get ``above``/``below``.

:meth:`PanopticContent.to_dict` gives the exchange form read by the PancapScore
``structured`` extractor (``pix2cap/evaluation/pancapscore``)::

    {"entities":   [{"id": 1, "name": "circle", "box": [0.1, 0.2, 0.3, 0.4]}, ...],
     "attributes": [{"entity": 1, "text": "large red striped"}, ...],
     "relations":  [{"entities": [1, 3], "text": "to the left of"}, ...],
     "global":     ["the image shows three objects", ...]}

``id`` counts from 1 in entity order; ``box`` is ``[x1, y1, x2, y2]`` normalised to [0, 1] of
the image width / height, rounded to 3 decimals (``None`` if unknown); an attribute's ``text``
is the modifier phrase of its entity; a relation's ``text`` is the predicate phrase read
``entities[0] <text> entities[1]``; ``global`` items are short sentences.
:meth:`PanopticContent.to_full_dict` adds scores, grid boxes, captions, relation types and
sources for inspection.

:func:`grounded_caption` restates a thing's dense caption so that its relation clause names a
decoded entity: the clause the caption states is kept when it survived the rules above (an
object named with attribute words it does not have is restated), otherwise it is replaced by
the entity's strongest geometric relation (the order of :data:`RELATION_PRIORITY`).
Language-model writers can be given these captions instead of the raw ones, so that a caption
head's invented relation targets never reach the prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pix2cap.bridge.stages import GRID, pixel_box_to_grid
from pix2cap.data.text import COLOUR_WORDS
from pix2cap.structures.masks import above, left_of, mask_stats

__all__ = [
    "DecodedEntity",
    "Entity",
    "Attribute",
    "Relation",
    "PanopticContent",
    "build_content",
    "geometric_relations",
    "caption_attributes",
    "mask_stats",
    "RELATION_TEXT",
    "RELATION_PRIORITY",
    "grounded_caption",
]

RELATION_TEXT = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
    "on": "on",
    "inside": "inside",
    "overlapping": "overlapping",
    "next_to": "next to",
}
_MIRROR = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
_DIRECTION_OF_TEXT = {RELATION_TEXT[k]: k for k in _MIRROR}
# Which relation describes an entity best: support and containment first, then what its own
# caption says, then contact, then direction.
RELATION_PRIORITY = {
    "on": 0, "inside": 1, "caption": 2, "overlapping": 3, "next_to": 4,
    "left_of": 5, "right_of": 5, "above": 6, "below": 6,
}

ON_FRACTION = 0.5
INSIDE_FRACTION = 0.9
MIN_CONTACT = 3
MIN_RING = 8
DOMINANT_STUFF_FRACTION = 0.25

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


@dataclass
class DecodedEntity:
    """One decoded region, as the bridge hands it over.

    Attributes:
        mask: Bool ndarray [H, W].
        tag: semantic tag (cleaned class name).
        isthing: thing (countable) or stuff.
        score: confidence, or None.
        caption: dense caption ("" if none).
        segment_id: panoptic segment id, or None for an extra instance.
        category_id: contiguous class id, or None.
        source: ``"segment"`` (panoptic map) or ``"extra"`` (a lower-score candidate).
    """

    mask: np.ndarray
    tag: str
    isthing: bool = True
    score: float | None = None
    caption: str = ""
    segment_id: int | None = None
    category_id: int | None = None
    source: str = "segment"


@dataclass
class Entity:
    id: int
    name: str
    box: list[float] | None
    grid_box: list[int] | None
    isthing: bool
    score: float | None
    caption: str
    area: int
    segment_id: int | None
    source: str


@dataclass
class Attribute:
    entity: int
    text: str
    source: str = "caption"


@dataclass
class Relation:
    subject: int
    object: int
    type: str
    text: str
    source: str  # "geometry" or "caption"


@dataclass
class PanopticContent:
    """Entities, attributes, relations and global items of one image (see module docstring)."""

    entities: list[Entity] = field(default_factory=list)
    attributes: list[Attribute] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    global_items: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    # entity id -> the relation its caption states (also when geometry lists the same one).
    caption_relations: dict[int, Relation] = field(default_factory=dict)
    # Relations captions state that the masks contradict (not in ``relations``).
    refuted_caption_relations: list[Relation] = field(default_factory=list)

    def entity(self, entity_id: int) -> Entity:
        return self.entities[entity_id - 1]

    def attributes_of(self, entity_id: int) -> list[str]:
        return [a.text for a in self.attributes if a.entity == entity_id]

    def relations_of(self, entity_id: int) -> list[Relation]:
        return [r for r in self.relations if r.subject == entity_id]

    def to_dict(self) -> dict:
        """The exchange form (module docstring), JSON-serialisable."""
        return {
            "entities": [{"id": e.id, "name": e.name, "box": e.box} for e in self.entities],
            "attributes": [{"entity": a.entity, "text": a.text} for a in self.attributes],
            "relations": [
                {"entities": [r.subject, r.object], "text": r.text} for r in self.relations
            ],
            "global": list(self.global_items),
        }

    def to_full_dict(self) -> dict:
        """:meth:`to_dict` plus per-entity score, grid box, caption, area, segment id and
        source, and per-relation type and source."""
        out = self.to_dict()
        for record, e in zip(out["entities"], self.entities):
            record.update(
                grid_box=e.grid_box,
                isthing=e.isthing,
                score=e.score,
                caption=e.caption,
                area=e.area,
                segment_id=e.segment_id,
                source=e.source,
            )
        for record, r in zip(out["relations"], self.relations):
            record.update(type=r.type, source=r.source)
        for record, a in zip(out["attributes"], self.attributes):
            record.update(source=a.source)
        out["image_size"] = list(self.image_size)
        return out


# ---------------------------------------------------------------------------------------------
# Geometry


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels outside ``mask`` that are 4-neighbours of it."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _below_edge(mask: np.ndarray) -> np.ndarray:
    """For each column of ``mask``, the pixel just under its lowest pixel (inside the image)."""
    height = mask.shape[0]
    out = np.zeros_like(mask)
    cols = np.nonzero(mask.any(axis=0))[0]
    if cols.size == 0:
        return out
    # Index of the last True row per column: flip rows, argmax finds the first True.
    last = height - 1 - np.argmax(mask[::-1, cols], axis=0)
    keep = last + 1 < height
    out[last[keep] + 1, cols[keep]] = True
    return out


def _on(thing: np.ndarray, thing_stats: dict, region: np.ndarray, region_stats: dict) -> bool:
    edge = _below_edge(thing)
    total = int(edge.sum())
    if total == 0:
        return False
    hits = int((edge & region).sum())
    return hits >= max(MIN_CONTACT, ON_FRACTION * total) and region_stats["y0"] > thing_stats["y0"]


def _inside(inner: np.ndarray, inner_stats: dict, outer: np.ndarray, outer_stats: dict) -> bool:
    ring = _ring(inner)
    total = int(ring.sum())
    if total < MIN_RING:
        return False
    return (
        int((ring & outer).sum()) >= INSIDE_FRACTION * total
        and inner_stats["area"] < outer_stats["area"]
    )


def geometric_relations(
    masks: Sequence[np.ndarray], isthing: Sequence[bool]
) -> list[tuple[int, int, str]]:
    """Relations that hold between the masks (definitions in the module docstring).

    Args:
        masks: N Bool [H, W] masks (same size).
        isthing: N flags.

    Returns:
        ``(subject, object, type)`` with 0-based indices; one entry per relation that holds,
        each unordered pair visited once.
    """
    stats = [mask_stats(np.asarray(m, dtype=bool)) for m in masks]
    masks = [np.asarray(m, dtype=bool) for m in masks]
    rings = [_ring(m) if s is not None else None for m, s in zip(masks, stats)]
    out: list[tuple[int, int, str]] = []
    n = len(masks)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = stats[i], stats[j]
            if a is None or b is None:
                continue
            found: list[tuple[int, int, str]] = []
            if isthing[i] != isthing[j]:
                t, r = (i, j) if isthing[i] else (j, i)
                if _on(masks[t], stats[t], masks[r], stats[r]):
                    found.append((t, r, "on"))
                elif _inside(masks[t], stats[t], masks[r], stats[r]):
                    found.append((t, r, "inside"))
            elif isthing[i] and isthing[j]:
                if _inside(masks[i], a, masks[j], b):
                    found.append((i, j, "inside"))
                elif _inside(masks[j], b, masks[i], a):
                    found.append((j, i, "inside"))
            if int((masks[i] & masks[j]).sum()) >= MIN_CONTACT:
                found.append((i, j, "overlapping"))
            support = any(rel in ("on", "inside") for _, _, rel in found)
            if not support:
                if left_of(a, b):
                    found.append((i, j, "left_of"))
                elif left_of(b, a):
                    found.append((i, j, "right_of"))
                if above(a, b):
                    found.append((i, j, "above"))
                elif above(b, a):
                    found.append((i, j, "below"))
            if not isthing[i] and not isthing[j]:
                found = [f for f in found if f[2] in ("above", "below")]
            if (
                not found
                and isthing[i]
                and isthing[j]
                and int((rings[i] & masks[j]).sum()) >= MIN_CONTACT
            ):
                found.append((i, j, "next_to"))
            out.extend(found)
    return out


# ---------------------------------------------------------------------------------------------
# Captions

_DETERMINERS = {
    "a", "an", "the", "this", "that", "these", "those", "some", "several", "many", "its",
    "his", "her", "their", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "another", "each", "every",
}
# Words that end a noun phrase: prepositions, verbs and conjunctions typical of region captions.
_PHRASE_END = {
    "on", "in", "at", "to", "of", "with", "by", "near", "next", "beside", "behind", "under",
    "over", "above", "below", "between", "inside", "outside", "covering", "holding", "sitting",
    "standing", "lying", "is", "are", "was", "were", "and", "or", "that", "which", "who",
    "while", "from", "into", "onto", "against", "along", "across", "around", "for", "wearing",
    "carrying", "riding", "looking", "has", "have", "being", "there", "where",
}
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _noun_forms(tag: str) -> set[str]:
    last = tag.lower().split()[-1] if tag.strip() else ""
    if not last:
        return set()
    forms = {last, last + "s", last + "es"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    return forms


def _head_index(words: list[str], tag: str) -> int | None:
    """Index of the head noun in ``words`` (see module docstring), or None."""
    forms = _noun_forms(tag)
    end = len(words)
    for k, word in enumerate(words):
        if k > 0 and word in _PHRASE_END:
            end = k
            break
    for k in range(end):
        if words[k] in forms:
            return k
    if end == 0:
        return None
    return end - 1


def caption_attributes(caption: str, tag: str) -> str | None:
    """The modifier words of the caption's first noun phrase, or None (module docstring)."""
    words = _words(caption)
    if not words:
        return None
    head = _head_index(words, tag)
    if head is None:
        return None
    start = 0
    while start < head and words[start] in _DETERMINERS:
        start += 1
    modifiers = [w for w in words[start:head] if w not in _DETERMINERS]
    return " ".join(modifiers) if modifiers else None


def _caption_relation(
    index: int, entities: Sequence[Entity], attributes: dict[int, str]
) -> tuple[int, str] | None:
    """(object index, predicate phrase) named by entity ``index``'s caption, or None.

    After the head noun, the first later word that is the tag noun of another entity marks
    the object; the words in between, minus the trailing determiners and attribute words,
    are the predicate. The object must be identified uniquely: one other entity with that
    tag, or exactly one whose attribute words all occur right before the noun.
    """
    entity = entities[index]
    words = _words(entity.caption)
    head = _head_index(words, entity.name)
    if head is None:
        return None
    mentions = _mentions(words, head, index, entities, attributes)
    if not mentions:
        return None
    start, _, obj = mentions[0]
    if obj is None:
        return None
    predicate = words[head + 1 : start]
    # "between" needs two objects; a half-stated relation would be false.
    if not predicate or predicate[-1] == "between":
        return None
    return obj, " ".join(predicate)


def _mentions(
    words: list[str], head: int, index: int, entities: Sequence[Entity], attributes: dict[int, str]
) -> list[tuple[int, int, int | None]]:
    """The other entities named after the head noun of entity ``index``'s caption words.

    Returns ``(start, noun, object)`` per mention: where its noun phrase starts (after the
    predicate words), the noun's word index, and the entity index it names, or None when
    several entities carry the tag and the attribute words before it do not single one out.
    """
    out: list[tuple[int, int, int | None]] = []
    for k in range(head + 1, len(words)):
        candidates = [
            j for j, other in enumerate(entities) if j != index and words[k] in _noun_forms(other.name)
        ]
        if not candidates:
            continue
        # Walk back over the object's modifiers and determiner to find where the predicate ends.
        start = k
        floor = out[-1][1] + 1 if out else head + 1
        while start > floor and words[start - 1] not in _PHRASE_END:
            start -= 1
        modifiers = set(words[start:k]) - _DETERMINERS
        if len(candidates) > 1:
            candidates = [
                j
                for j in candidates
                if modifiers and set((attributes.get(j) or "").split()) >= modifiers
            ]
        out.append((start, k, candidates[0] if len(candidates) == 1 else None))
    return out


def _centroids_contradict(predicate: str, subject: dict, obj: dict) -> bool:
    """A directional predicate whose subject centroid lies on the other side of the object's."""
    direction = _DIRECTION_OF_TEXT.get(predicate)
    if direction == "left_of":
        return subject["cx"] >= obj["cx"]
    if direction == "right_of":
        return subject["cx"] <= obj["cx"]
    if direction == "above":
        return subject["cy"] >= obj["cy"]
    if direction == "below":
        return subject["cy"] <= obj["cy"]
    return False


def _relations_as_subject(content: PanopticContent, entity_id: int) -> list[Relation]:
    """The entity's relations with it as subject, mirroring directional ones stated the other
    way round (``B left of A`` -> ``A right of B``)."""
    out = list(content.relations_of(entity_id))
    for r in content.relations:
        if r.object == entity_id and r.type in _MIRROR:
            mirror = _MIRROR[r.type]
            out.append(Relation(entity_id, r.subject, mirror, RELATION_TEXT[mirror], r.source))
    return out


def _reference(content: PanopticContent, entity_id: int) -> str:
    """How a caption names another entity: ``"the <colour> <tag>"`` when its attribute words
    hold colour words that no other entity of the tag shares (the way people point at an
    object), else ``"the <tag>"`` when the tag is the only one of its kind, else the tag with
    all attribute words. Stuff: ``"the <tag>"``."""
    entity = content.entity(entity_id)
    if not entity.isthing:
        return f"the {entity.name}"
    attributes = " ".join(content.attributes_of(entity_id)).split()
    others = [
        set(" ".join(content.attributes_of(e.id)).split())
        for e in content.entities
        if e.name == entity.name and e.id != entity_id
    ]
    colours = [w for w in attributes if w in COLOUR_WORDS]
    if colours and not any(set(colours) <= words for words in others):
        words = colours
    elif not others:
        words = []
    else:
        words = attributes
    return " ".join(["the"] + words + [entity.name])


def grounded_caption(content: PanopticContent, entity_id: int) -> str:
    """The entity's dense caption with its relation clause tied to the decoded entities.

    Stuff captions and captions without words after the head noun are returned unchanged.
    A caption whose stated relation survived :func:`build_content`, or whose words after the
    head noun name other entities, each one uniquely, without stating a refuted relation
    (``"on the horizon between the sky and the sand"``), keeps its words, except that an
    object named with attribute words its entity does not have (``"the red star"`` for the
    blue one) is restated with the entity's own: ``"the <colour> <tag>"`` when its colour
    words single it out among the entities of its tag, ``"the <tag>"`` when it is the only
    one, else the tag with all its attribute words. Otherwise (the caption names no decoded
    entity, or an ambiguous or a wrong one) the words after the head noun are replaced by the
    entity's strongest relation (lowest :data:`RELATION_PRIORITY`, then lowest object id) and
    a reference of the same form to its object, or dropped when the entity has no relation.
    """
    entity = content.entity(entity_id)
    caption = entity.caption.strip()
    if not caption or not entity.isthing:
        return caption
    words = _words(caption)
    head = _head_index(words, entity.name)
    if head is None or head == len(words) - 1:
        return caption
    attributes = {a.entity - 1: a.text for a in content.attributes}
    mentions = _mentions(words, head, entity_id - 1, content.entities, attributes)
    refuted = any(r.subject == entity_id for r in content.refuted_caption_relations)
    named = bool(mentions) and not refuted and all(obj is not None for _, _, obj in mentions)
    if entity_id in content.caption_relations or named:
        restated, cursor = [], 0
        for start, noun, obj in mentions:
            modifiers = set(words[start:noun]) - _DETERMINERS
            if obj is None or modifiers <= set((attributes.get(obj) or "").split()):
                continue
            restated += words[cursor:start] + [_reference(content, obj + 1)]
            cursor = noun + 1
        if not restated:
            return caption
        return " ".join(restated + words[cursor:])
    noun_phrase = " ".join(words[: head + 1])
    relations = sorted(
        _relations_as_subject(content, entity_id),
        key=lambda r: (RELATION_PRIORITY.get(r.type, 9), r.object),
    )
    if not relations:
        return noun_phrase
    best = relations[0]
    return f"{noun_phrase} {best.text} {_reference(content, best.object)}"


def _number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def build_content(
    decoded: Sequence[DecodedEntity], image_size: tuple[int, int], grid: int = GRID
) -> PanopticContent:
    """Structured content of one image from its decoded regions.

    Args:
        decoded: the regions, in caption order; entity ``id`` = position + 1. Regions with an
            empty mask are skipped.
        image_size: ``(height, width)`` of the masks.
        grid: the model-side box grid (for ``grid_box``).

    Returns:
        :class:`PanopticContent`.
    """
    height, width = int(image_size[0]), int(image_size[1])
    content = PanopticContent(image_size=(height, width))
    kept: list[DecodedEntity] = []
    kept_stats: list[dict] = []  # mask_stats of each kept region
    for region in decoded:
        mask = np.asarray(region.mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(
                f"entity {region.tag!r}: mask shape {mask.shape} differs from the image size "
                f"{(height, width)}"
            )
        stats = mask_stats(mask)
        if stats is None:
            continue
        kept.append(region)
        kept_stats.append(stats)
        pixel_box = [stats["x0"], stats["y0"], stats["x1"] + 1, stats["y1"] + 1]
        box = [
            round(min(1.0, max(0.0, pixel_box[0] / width)), 3),
            round(min(1.0, max(0.0, pixel_box[1] / height)), 3),
            round(min(1.0, max(0.0, pixel_box[2] / width)), 3),
            round(min(1.0, max(0.0, pixel_box[3] / height)), 3),
        ]
        content.entities.append(
            Entity(
                id=len(content.entities) + 1,
                name=region.tag,
                box=box,
                grid_box=pixel_box_to_grid(pixel_box, width, height, grid),
                isthing=bool(region.isthing),
                score=None if region.score is None else float(region.score),
                caption=str(region.caption or ""),
                area=stats["area"],
                segment_id=region.segment_id,
                source=region.source,
            )
        )

    attribute_text: dict[int, str] = {}
    for k, entity in enumerate(content.entities):
        text = caption_attributes(entity.caption, entity.name)
        if text:
            attribute_text[k] = text
            content.attributes.append(Attribute(entity.id, text))

    for i, j, rel in geometric_relations([r.mask for r in kept], [r.isthing for r in kept]):
        content.relations.append(
            Relation(i + 1, j + 1, rel, RELATION_TEXT[rel], "geometry")
        )
    for k in range(len(content.entities)):
        found = _caption_relation(k, content.entities, attribute_text)
        if found is None:
            continue
        j, predicate = found
        if _centroids_contradict(predicate, kept_stats[k], kept_stats[j]):
            content.refuted_caption_relations.append(
                Relation(k + 1, j + 1, "caption", predicate, "caption")
            )
            continue
        same = [
            r for r in content.relations
            if r.subject == k + 1 and r.object == j + 1 and r.text == predicate
        ]
        if same:
            content.caption_relations[k + 1] = same[0]
            continue
        relation = Relation(k + 1, j + 1, "caption", predicate, "caption")
        content.relations.append(relation)
        content.caption_relations[k + 1] = relation

    things = [e for e in content.entities if e.isthing]
    count = len(things)
    noun = "object" if count == 1 else "objects"
    content.global_items.append(f"the image shows {_number_word(count)} {noun}")
    per_class = Counter(e.name for e in things)
    for name, n in sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0])):
        if n > 1:
            content.global_items.append(f"there are {_number_word(n)} {_plural(name)}")
    stuff = [e for e in content.entities if not e.isthing]
    if stuff:
        dominant = max(stuff, key=lambda e: e.area)
        if dominant.area >= DOMINANT_STUFF_FRACTION * height * width:
            content.global_items.append(f"the {dominant.name} is the dominant region of the image")
    return content
