"""Reading a region's dense caption: its attribute words and the entities it names.

* **attributes** -- the words between the leading determiner and the head noun of the
  caption's first noun phrase (``"a large red striped circle to the left of ..."`` ->
  ``"large red striped"``). The head noun is the tag's last word (singular or plural) when the
  caption contains it; otherwise the last word before the first preposition/verb of the
  caption. No caption, or no words before the head: no attribute.
* **mentions** -- after the head noun, each word that is the tag noun of another entity names
  that entity when it is identified uniquely: only one other entity carries the tag, or the
  attribute words written before the noun single one out.
* **caption relation** -- the words between the head noun and the first mention are the
  predicate the caption states (``"to the left of"``).

Captions are read as lower-case words (letters, digits, ``'`` and ``-``). Entities are read
through their ``name`` (tag) and ``caption`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

from pix2cap.data.text import DETERMINERS, PHRASE_END, caption_words, noun_forms

__all__ = [
    "caption_attributes",
    "caption_words",
    "head_index",
    "mentions",
    "caption_relation",
    "names_tag",
]

def names_tag(words: list[str], tag: str) -> bool:
    """Whether ``words`` hold the tag's noun (its last word, singular or plural)."""
    return not noun_forms(tag).isdisjoint(words)


def head_index(words: list[str], tag: str) -> int | None:
    """Index of the head noun in ``words`` (module docstring), or None."""
    forms = noun_forms(tag)
    end = len(words)
    for k, word in enumerate(words):
        if k > 0 and word in PHRASE_END:
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
    words = caption_words(caption)
    if not words:
        return None
    head = head_index(words, tag)
    if head is None:
        return None
    start = 0
    while start < head and words[start] in DETERMINERS:
        start += 1
    modifiers = [w for w in words[start:head] if w not in DETERMINERS]
    return " ".join(modifiers) if modifiers else None


def mentions(
    words: list[str], head: int, index: int, entities: Sequence, attributes: dict[int, str]
) -> list[tuple[int, int, int | None]]:
    """The other entities named after the head noun of entity ``index``'s caption words.

    Args:
        words, head: the caption's words and its head noun's index.
        index: the 0-based index of the caption's entity in ``entities``.
        entities: every entity (``name`` is read).
        attributes: 0-based entity index -> its attribute words.

    Returns:
        ``(start, noun, object)`` per mention: where its noun phrase starts (after the
        predicate words), the noun's word index, and the entity index it names, or None when
        several entities carry the tag and the attribute words before it do not single one out.
    """
    out: list[tuple[int, int, int | None]] = []
    for k in range(head + 1, len(words)):
        candidates = [
            j for j, other in enumerate(entities) if j != index and words[k] in noun_forms(other.name)
        ]
        if not candidates:
            continue
        # Walk back over the object's modifiers and determiner to find where the predicate ends.
        start = k
        floor = out[-1][1] + 1 if out else head + 1
        while start > floor and words[start - 1] not in PHRASE_END:
            start -= 1
        modifiers = set(words[start:k]) - DETERMINERS
        if len(candidates) > 1:
            candidates = [
                j
                for j in candidates
                if modifiers and set((attributes.get(j) or "").split()) >= modifiers
            ]
        out.append((start, k, candidates[0] if len(candidates) == 1 else None))
    return out


def caption_relation(
    index: int, entities: Sequence, attributes: dict[int, str]
) -> tuple[int, str] | None:
    """(object index, predicate phrase) named by entity ``index``'s caption, or None.

    The first mention (:func:`mentions`) is the object; the words between the head noun and
    it are the predicate. None when the caption names no entity uniquely first, or states no
    complete predicate.
    """
    entity = entities[index]
    words = caption_words(entity.caption)
    head = head_index(words, entity.name)
    if head is None:
        return None
    found = mentions(words, head, index, entities, attributes)
    if not found:
        return None
    start, _, obj = found[0]
    if obj is None:
        return None
    predicate = words[head + 1 : start]
    # "between" needs two objects; a half-stated relation would be false.
    if not predicate or predicate[-1] == "between":
        return None
    return obj, " ".join(predicate)
