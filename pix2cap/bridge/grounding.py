"""Region captions restated so that the objects they name are decoded entities.

:func:`grounded_caption` restates a thing's dense caption so that its relation clause names a
decoded entity: the clause the caption states is kept when it survived
:func:`pix2cap.bridge.content.build_content` (an object named with attribute words it does not
have is restated), otherwise it is replaced by the entity's strongest geometric relation (the
order of :data:`~pix2cap.bridge.content.RELATION_PRIORITY`). Language-model writers can be
given these captions instead of the raw ones, so that a caption head's invented relation
targets never reach the prompt.
"""

from __future__ import annotations

from pix2cap.bridge.content import RELATION_PRIORITY, RELATION_TEXT, PanopticContent, Relation
from pix2cap.bridge.geometry import DIRECTIONS
from pix2cap.bridge.phrases import DETERMINERS, caption_words, head_index, mentions
from pix2cap.data.text import COLOUR_WORDS

__all__ = ["grounded_caption"]


def _relations_as_subject(content: PanopticContent, entity_id: int) -> list[Relation]:
    """The entity's relations with it as subject, mirroring directional ones stated the other
    way round (``B left of A`` -> ``A right of B``)."""
    out = list(content.relations_of(entity_id))
    for r in content.relations:
        if r.object == entity_id and r.type in DIRECTIONS:
            mirror = DIRECTIONS[r.type]
            out.append(Relation(entity_id, r.subject, mirror, RELATION_TEXT[mirror], r.source))
    return out


def reference(content: PanopticContent, entity_id: int) -> str:
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
    A caption whose stated relation survived :func:`~pix2cap.bridge.content.build_content`,
    or whose words after the head noun name other entities, each one uniquely, without
    stating a refuted relation (``"on the horizon between the sky and the sand"``), keeps its
    words, except that an object named with attribute words its entity does not have
    (``"the red star"`` for the blue one) is restated with the entity's own
    (:func:`reference`). Otherwise (the caption names no decoded entity, or an ambiguous or a
    wrong one) the words after the head noun are replaced by the entity's strongest relation
    (lowest ``RELATION_PRIORITY``, then lowest object id) and a reference to its object, or
    dropped when the entity has no relation.
    """
    entity = content.entity(entity_id)
    caption = entity.caption.strip()
    if not caption or not entity.isthing:
        return caption
    words = caption_words(caption)
    head = head_index(words, entity.name)
    if head is None or head == len(words) - 1:
        return caption
    attributes = {a.entity - 1: a.text for a in content.attributes}
    named_objects = mentions(words, head, entity_id - 1, content.entities, attributes)
    refuted = any(r.subject == entity_id for r in content.refuted_caption_relations)
    named = bool(named_objects) and not refuted and all(obj is not None for _, _, obj in named_objects)
    if entity_id in content.caption_relations or named:
        restated, cursor = [], 0
        for start, noun, obj in named_objects:
            modifiers = set(words[start:noun]) - DETERMINERS
            if obj is None or modifiers <= set((attributes.get(obj) or "").split()):
                continue
            restated += words[cursor:start] + [reference(content, obj + 1)]
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
    return f"{noun_phrase} {best.text} {reference(content, best.object)}"
