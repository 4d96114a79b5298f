"""A written panoptic caption with each entity mention tied to the decoded segment it names.

A caption writer (the template, the concatenations, a language model) puts a box
``[[x1, y1, x2, y2]]`` after each entity it mentions, copied from the entity list it was given.
:func:`ground_mentions` turns the caption into the grounded-caption form that COCONut-PanCap's
``<ids:phrase>`` tags express (the form of :func:`~pix2cap.bridge.grounded_writer.
compose_grounded_caption`): the text without its boxes, and each mention tagged with the
panoptic segment id of the decoded entity its box came from.

* **mention** -- the phrase a box follows (:func:`~pix2cap.data.caption_formats.
  parse_pancap_boxes`: from the previous delimiter or box), cut to its noun phrase
  (:func:`mention_span`): ``"is to the left of the sky [[...]]"`` -> ``"the sky"``.
* **entity** -- the decoded entity whose box has the highest IoU with the written box (a
  copied box has IoU 1; an LM's box rounded on its grid slightly less), when that IoU is at
  least ``min_iou``. Among entities within ``tie_iou`` of the best, one whose tag noun the
  mention names is preferred (two regions can share a box, e.g. stuff spanning the image).
* A mention whose box matches no entity, or matches an entity without a panoptic segment (an
  extra instance), stays untagged and is not listed among the phrases.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pix2cap.data.caption_formats import format_grounding_tag, parse_pancap_boxes
from pix2cap.data.text import WORD_RE

from .content import Entity, PanopticContent
from .phrases import DETERMINERS, PHRASE_END, caption_words, names_tag

__all__ = ["box_ious", "ground_mentions", "match_box", "mention_span"]

# Words a mention never reaches back over: the predicate and conjunction words that end a
# region caption's noun phrase, and the verbs a panoptic caption introduces entities with.
MENTION_BOUNDARY = PHRASE_END | {
    "shows", "show", "showing", "depicts", "depicting", "features", "featuring", "contains",
    "containing", "includes", "including", "see", "seen", "visible",
}


def mention_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The noun phrase ending ``text[start:end]``: from its last determiner (``"is left of
    the sky"`` -> ``"the sky"``), else from the word after its last boundary word
    (:data:`MENTION_BOUNDARY`: ``"and blue squares"`` -> ``"blue squares"``), else the whole
    span. The end is kept."""
    words = list(WORD_RE.finditer(text, start, end))
    for k in range(len(words) - 1, -1, -1):
        word = words[k].group(0).lower()
        if word in DETERMINERS:
            return words[k].start(), end
        if word in MENTION_BOUNDARY:
            return (words[k + 1].start() if k + 1 < len(words) else start), end
    return start, end


def box_ious(box: list[float], boxes: np.ndarray) -> np.ndarray:
    """Float[N]: IoU of ``box`` with each row of ``boxes`` [N, 4] (NaN rows: 0); a box equal
    to a row counts 1 even when both are empty."""
    if len(boxes) == 0:
        return np.zeros(0)
    b = np.asarray(box, dtype=np.float64)
    lo = np.maximum(boxes[:, :2], b[:2])
    hi = np.minimum(boxes[:, 2:], b[2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None), axis=1)
    union = areas + np.prod(np.clip(b[2:] - b[:2], 0.0, None)) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    iou[np.all(boxes == b, axis=1)] = 1.0
    return np.nan_to_num(iou)


def match_box(
    box: list[float],
    mention: str,
    entities: list[Entity],
    *,
    min_iou: float = 0.5,
    tie_iou: float = 0.01,
) -> Entity | None:
    """The entity a written ``box`` came from, or None (module docstring).

    Args:
        box: ``[x1, y1, x2, y2]`` normalised, as written.
        mention: the words the box follows (a tie goes to an entity whose tag they name).
        entities: the caption's entities (``box`` normalised like the written one).
        min_iou: the lowest IoU that still counts as a copy of an entity's box.
        tie_iou: entities this close to the best IoU are ties.
    """
    rows = [e.box if e.box is not None else [np.nan] * 4 for e in entities]
    ious = box_ious(box, np.asarray(rows, dtype=np.float64).reshape(-1, 4))
    if len(ious) == 0 or ious.max() < min_iou:
        return None
    words = caption_words(mention)
    tied = [k for k in range(len(entities)) if ious[k] >= max(min_iou, ious.max() - tie_iou)]
    best = max(tied, key=lambda k: (names_tag(words, entities[k].name), ious[k], -k))
    return entities[best]


def ground_mentions(
    caption: str, content: PanopticContent, *, min_iou: float = 0.5, tie_iou: float = 0.01
) -> dict[str, Any]:
    """The grounded caption of a written panoptic caption (module docstring).

    Args:
        caption: SA-Pancap-form text, boxes ``[[x1, y1, x2, y2]]`` normalised to the image.
        content: the content it was written from (its entities' boxes and segment ids).
        min_iou, tie_iou: as :func:`match_box`.

    Returns:
        ``{"text": the caption without its boxes (and the spaces before them; a malformed
        bracket group is not a box and stays), "tagged": the same with every tied mention as
        ``<ids:phrase>``, "phrases": [{"phrase", "start", "end", "segment_ids", "score"}]}``
        in text order, ``text[start:end] == phrase``, ``score`` the tied entity's score (None
        when unknown).
    """
    plain: list[str] = []
    tagged: list[str] = []
    phrases: list[dict[str, Any]] = []
    length = 0  # characters of plain text so far
    cursor = 0  # position in ``caption``

    def keep(piece: str, tagged_piece: str | None = None) -> None:
        nonlocal length
        plain.append(piece)
        tagged.append(piece if tagged_piece is None else tagged_piece)
        length += len(piece)

    for written in parse_pancap_boxes(caption):
        start, end = mention_span(caption, written["start"], written["end"])
        # The box goes with the spaces before it ("the sky [[...]]." -> "the sky.").
        cut = written["box_start"]
        while cut > max(cursor, end) and caption[cut - 1].isspace():
            cut -= 1
        mention = caption[start:end]
        entity = match_box(
            written["box"], mention, content.entities, min_iou=min_iou, tie_iou=tie_iou
        )
        keep(caption[cursor:start])
        if entity is None or entity.segment_id is None or not _taggable(mention):
            keep(mention)
        else:
            ids = [int(entity.segment_id)]
            phrases.append(
                {"phrase": mention, "start": length, "end": length + len(mention),
                 "segment_ids": ids, "score": entity.score}
            )
            keep(mention, format_grounding_tag(ids, mention))
        keep(caption[end:cut])
        cursor = written["box_end"]
    keep(caption[cursor:])

    text = "".join(plain)
    lead = len(text) - len(text.lstrip())
    for phrase in phrases:
        phrase["start"] -= lead
        phrase["end"] -= lead
    return {"text": text.strip(), "tagged": "".join(tagged).strip(), "phrases": phrases}


def _taggable(phrase: str) -> bool:
    """Whether ``phrase`` can be written as one ``<ids:phrase>`` tag."""
    return bool(phrase.strip()) and "<" not in phrase and ">" not in phrase
