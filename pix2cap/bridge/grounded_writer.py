"""A grounded image caption composed from decoded segments: the PGC baseline without a head.

COCONut-PanCap's grounded caption (PGC) is a detailed caption whose phrases are tied to
panoptic segments, written ``<ids:phrase>``. :func:`compose_grounded_caption` writes one from
what the segmentation-captioning model already decoded, deterministically: one sentence per
panoptic segment, from its dense caption (a thing's relation clause tied to decoded entities by
:func:`~pix2cap.bridge.grounding.grounded_caption`), with the segment's own noun phrase tagged
with its segment id and every other entity the sentence names tagged with that entity's id. It
is the reference any learned grounded-caption head has to beat.
"""

from __future__ import annotations

from typing import Any, Mapping

from pix2cap.data.caption_formats import format_grounding_tag

from .bridge import PanopticCaptionBridge
from .content import PanopticContent
from .grounding import grounded_caption
from .phrases import caption_words, head_index, mentions

__all__ = ["baseline_grounded_caption", "compose_grounded_caption"]


def compose_grounded_caption(content: PanopticContent) -> dict[str, Any]:
    """The grounded caption of one image's decoded entities.

    Entities come in ``content``'s order (the bridge's: stuff, then things, each top to
    bottom); extra instances (no panoptic segment id) and entities without a caption are left
    out. A sentence is the entity's caption words, the first capitalised, ending in ".". Its
    subject phrase (the words up to the caption's head noun) is tagged with the entity's
    segment id; each later mention that names one decoded entity (``phrases.mentions``) is
    tagged with that entity's segment id; an ambiguous mention stays untagged.

    Returns:
        ``{"text": plain caption, "tagged": the same in ``<ids:phrase>`` form, "phrases":
        [{"phrase", "start", "end", "segment_ids", "score"}]}`` with ``start``/``end``
        character offsets into ``text`` and ``score`` the tagged entity's score (None when
        unknown).
    """
    attributes = {a.entity - 1: a.text for a in content.attributes}
    entities = content.entities
    plain_parts: list[str] = []
    tagged_parts: list[str] = []
    phrases: list[dict[str, Any]] = []
    offset = 0
    for index, entity in enumerate(entities):
        if entity.segment_id is None:
            continue
        caption = grounded_caption(content, entity.id) if entity.isthing else entity.caption
        words = caption_words(caption or "")
        head = head_index(words, entity.name) if words else None
        if head is None:
            continue
        words[0] = words[0][:1].upper() + words[0][1:]
        spans = [(0, head, entity)]  # (first word, last word, entity named)
        for start, noun, other in mentions(words, head, index, entities, attributes):
            if other is not None and entities[other].segment_id is not None:
                spans.append((start, noun, entities[other]))
        plain, tagged = _sentence(words, spans, offset, phrases)
        plain_parts.append(plain)
        tagged_parts.append(tagged)
        offset += len(plain) + 1  # the space before the next sentence
    return {"text": " ".join(plain_parts), "tagged": " ".join(tagged_parts), "phrases": phrases}


def _sentence(words: list[str], spans, offset: int, phrases: list[dict]) -> tuple[str, str]:
    """One sentence as plain and tagged text; appends its phrases (offsets into the whole
    text, the sentence starting at ``offset``) to ``phrases``."""
    plain: list[str] = []
    tagged: list[str] = []
    position = offset
    starts = {start: (end, entity) for start, end, entity in spans}
    k = 0
    while k < len(words):
        if k in starts:
            end, entity = starts[k]
            phrase = " ".join(words[k : end + 1])
            phrases.append(
                {
                    "phrase": phrase,
                    "start": position,
                    "end": position + len(phrase),
                    "segment_ids": [int(entity.segment_id)],
                    "score": entity.score,
                }
            )
            plain.append(phrase)
            tagged.append(format_grounding_tag([int(entity.segment_id)], phrase))
            k = end + 1
        else:
            plain.append(words[k])
            tagged.append(words[k])
            k += 1
        position += len(plain[-1]) + 1
    return " ".join(plain) + ".", " ".join(tagged) + "."


def baseline_grounded_caption(
    output: Mapping,
    metadata: Any,
    image_size: tuple[int, int],
    min_segment_score: float = 0.0,
) -> dict[str, Any]:
    """:func:`compose_grounded_caption` of one model output's panoptic segments.

    Args:
        output: the model's per-image result (``panoptic_seg`` with captions).
        metadata: the dataset's metadata (class names).
        image_size: ``(height, width)`` of ``panoptic_seg``.
        min_segment_score: segments scoring below this are left out.
    """
    # The bridge decodes and orders the segments here; its caption writer is never called.
    bridge = PanopticCaptionBridge(None, metadata=metadata, min_segment_score=min_segment_score)
    segments, extras = bridge.decode(output, image_size)
    _, content = bridge.prepare(segments, extras, image_size)
    return compose_grounded_caption(content)
