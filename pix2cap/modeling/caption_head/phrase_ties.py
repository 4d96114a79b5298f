"""Which segments a grounded phrase can name, read off the segments' own dense captions.

A SEG's slot selection is learned, and a small head trained briefly can select a segment its
phrase does not describe ("the green star" tied to a white circle). Each kept segment also has
its dense caption, whose *subject* (the words before the first preposition or verb, "a small
green dotted star") says what the segment is. A phrase *agrees* with a segment when its noun
(its last word) is the subject's head noun, singular or plural, and every other word of it,
determiners aside, comes before that noun in the subject: "the green star" and "two green stars" agree with "a
small green dotted star", "the sand" does not agree with "green grass covering the bottom".
The segment's class name is a second name for it (its words are then looked up anywhere in
the subject), and picks the head noun of a subject that runs past it ("a blue square partly
hidden behind ...": "square"); without class names the head noun is the subject's last word.

:func:`agreeing_slots` keeps the SEG's selection where it agrees, moves it to the most selected
agreeing segment where it does not, and leaves the phrase ungrounded where its noun names
segments but none of them fits its words (the phrase describes nothing the model decoded). A
phrase whose noun heads no caption's subject ("the person" among "a man ..." captions) cannot
be judged from the captions and keeps its selection.
"""

from __future__ import annotations

from typing import Optional, Sequence

import re

from pix2cap.data.caption_formats import (
    PHRASE_CLOSE,
    PHRASE_OPEN,
    SEG_TOKEN,
    STUFF_SEG_TOKEN,
    _MARKUP_RE,
)
from pix2cap.data.text import DETERMINERS, PHRASE_END, caption_words, noun_forms

__all__ = ["agreeing_slots", "caption_subject", "ground_unmarked_mentions", "phrase_agreement"]

_WORD = re.compile(r"[a-z][a-z'\-]*")


def caption_subject(caption: str) -> list[str]:
    """The lower-case words of a caption's subject: up to its first preposition or verb."""
    words = caption_words(caption)
    for k, word in enumerate(words):
        if k > 0 and word in PHRASE_END:
            return words[:k]
    return words


def phrase_agreement(
    phrase: str, captions: Sequence[str], class_names: Optional[Sequence[str]] = None
) -> Optional[list[bool]]:
    """Whether ``phrase`` can name the segment of each caption (module docstring).

    Args:
        phrase: the phrase's words.
        captions: each segment's dense caption.
        class_names: each segment's class name, a second name for it: the panoptic head and
            the caption head may disagree ("a white triangle" of class square), and a relation
            target may follow either. The phrase's other words are then looked up in the
            whole subject.

    Returns:
        one flag per caption, or None when the phrase's noun names no segment (or the phrase
        has no word besides determiners): the captions cannot judge it.
    """
    words = [w for w in caption_words(phrase) if w not in DETERMINERS]
    if not words:
        return None
    noun, modifiers = words[-1], set(words[:-1])
    names = list(class_names) if class_names is not None else [""] * len(captions)
    flags: list[bool] = []
    judged = False
    for caption, name in zip(captions, names):
        subject = caption_subject(caption)
        head = _subject_head(subject, name)
        if head is not None and noun in noun_forms(subject[head]):
            before = subject[:head]
        elif name and noun in noun_forms(name):
            before = subject  # named by its class: the words may be anywhere in the subject
        else:
            flags.append(False)
            continue
        judged = True
        flags.append(modifiers <= set(before))
    return flags if judged else None


def _subject_head(subject: list[str], name: str) -> Optional[int]:
    """Index of the subject's head noun: its last word naming the class (``name``) when it has
    one ("a blue square partly hidden" of class square: "square"), else its last word."""
    if not subject:
        return None
    forms = noun_forms(name) if name else set()
    for k in range(len(subject) - 1, -1, -1):
        if subject[k] in forms:
            return k
    return len(subject) - 1


def agreeing_slots(
    phrase: str,
    captions: Sequence[str],
    selected: Sequence[int],
    probs: Sequence[float],
    class_names: Optional[Sequence[str]] = None,
) -> list[int]:
    """The slots a SEG is tied to once its phrase is checked against the slots' captions.

    Args:
        phrase: the phrase's words.
        captions: each slot's dense caption.
        selected: the slots the SEG selected.
        probs: the SEG's selection probability of every slot.
        class_names: each slot's class name (see :func:`phrase_agreement`).

    Returns:
        ``selected`` when the captions cannot judge the phrase; every agreeing slot for a
        plural phrase ("two green stars"); else the selected slots that agree or, when none
        does, the most selected agreeing one; [] when no slot agrees.
    """
    agree = phrase_agreement(phrase, captions, class_names)
    if agree is None:
        return list(selected)
    candidates = [k for k, ok in enumerate(agree) if ok]
    if not candidates:
        return []
    if _is_plural(phrase, candidates, captions, class_names):
        return candidates
    kept = [k for k in selected if agree[k]]
    return kept or [max(candidates, key=lambda k: probs[k])]


def _is_plural(phrase, candidates, captions, class_names) -> bool:
    """Whether the phrase's noun is the plural of its agreeing slots' noun ("two green stars"):
    it is neither a word of their subjects nor their class name."""
    noun = [w for w in caption_words(phrase) if w not in DETERMINERS][-1]
    names = list(class_names) if class_names is not None else [""] * len(captions)
    return all(noun not in caption_subject(captions[k]) and noun != names[k] for k in candidates)


def ground_unmarked_mentions(
    markup: str,
    captions: Sequence[str],
    class_names: Optional[Sequence[str]] = None,
    max_words: int = 5,
) -> tuple[str, list[Optional[list[int]]]]:
    """Mark up the mentions the head wrote as plain words ("is in the sky.") that name decoded
    segments, as phrases tied to them.

    A mention is a run of words outside every phrase that starts with a determiner, holds no
    preposition or verb, has at most ``max_words`` words and agrees (:func:`phrase_agreement`)
    with exactly one slot, or, in the plural, with any; the longest such run wins.

    Args:
        markup: the head's markup.
        captions: each slot's dense caption; class_names: each slot's class name, or None.

    Returns:
        the markup with each mention written ``<p> words </p> [SEG]``, and one entry per SEG
        of it, in order: None for the head's own SEGs, the slots of an added one.
    """
    pieces = [p for p in _MARKUP_RE.split(markup) if p.strip()]
    out: list[str] = []
    sources: list[Optional[list[int]]] = []
    inside = False
    for piece in pieces:
        piece = piece.strip()
        if piece == PHRASE_OPEN:
            inside = True
        elif piece == PHRASE_CLOSE:
            inside = False
        elif piece in (SEG_TOKEN, STUFF_SEG_TOKEN):
            sources.append(None)
        elif not inside:
            piece = _mark_mentions(piece, captions, class_names, max_words, sources)
        out.append(piece)
    return " ".join(out), sources


def _mark_mentions(text, captions, class_names, max_words, sources) -> str:
    tokens = text.split()
    out: list[str] = []
    k = 0
    while k < len(tokens):
        found = None
        if tokens[k].lower() in DETERMINERS:
            for end in range(min(len(tokens), k + max_words), k + 1, -1):
                words = tokens[k:end]
                if not all(_WORD.fullmatch(w.lower()) for w in words):
                    continue
                if any(w.lower() in PHRASE_END or w.lower() in DETERMINERS for w in words[1:]):
                    continue
                slots = _named_slots(" ".join(words), captions, class_names)
                if slots:
                    found = (end, slots)
                    break
        if found is None:
            out.append(tokens[k])
            k += 1
            continue
        end, slots = found
        out.append(f"{PHRASE_OPEN} {' '.join(tokens[k:end])} {PHRASE_CLOSE} {SEG_TOKEN}")
        sources.append(slots)
        k = end
    return " ".join(out)


def _named_slots(phrase, captions, class_names) -> list[int]:
    """The slots a mention names: the one it agrees with, or every one for a plural; [] when
    it is ambiguous or names none."""
    agree = phrase_agreement(phrase, captions, class_names)
    candidates = [k for k, ok in enumerate(agree or []) if ok]
    if len(candidates) == 1 or (candidates and _is_plural(phrase, candidates, captions, class_names)):
        return candidates
    return []  # names nothing, or a singular agreeing with several slots: ambiguous
