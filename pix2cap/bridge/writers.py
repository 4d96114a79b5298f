"""Caption writers without a language model, and the writer interface.

Every writer is called as ``writer(content, stages, image_size) -> str`` and returns prose
whose boxes are ``[[x1, y1, x2, y2]]`` normalised to the image (3 decimals).

* :class:`TemplateWriter` (``"template"``) -- a deterministic template over the structured
  content. A baseline and a fallback, not a language model.
* :class:`DenseCaptionConcatWriter` (``"concat"``) and :class:`BoxedDenseCaptionConcatWriter`
  (``"concat_boxes"``) -- the entities' dense captions joined, without / with their boxes.

The language-model writers (``"hf_causal_lm"``, ``"small_lm"``) are in
:mod:`pix2cap.bridge.lm_writers`.
"""

from __future__ import annotations

from pix2cap.bridge.build import CAPTION_WRITER_REGISTRY
from pix2cap.bridge.content import RELATION_PRIORITY, PanopticContent, Relation
from pix2cap.bridge.stages import PancapStages
from pix2cap.data.caption_formats import format_box
from pix2cap.data.text import capitalise

__all__ = [
    "CaptionWriter",
    "TemplateWriter",
    "DenseCaptionConcatWriter",
    "BoxedDenseCaptionConcatWriter",
]


class CaptionWriter:
    """Base class: ``__call__(content, stages, image_size) -> caption``.

    ``content`` is the image's :class:`~pix2cap.bridge.content.PanopticContent`, ``stages``
    its :class:`~pix2cap.bridge.stages.PancapStages`, ``image_size`` ``(height, width)``.
    """

    def __call__(
        self, content: PanopticContent, stages: PancapStages, image_size: tuple[int, int]
    ) -> str:
        raise TypeError(f"{type(self).__name__} does not define __call__")


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _noun_phrase(content: PanopticContent, entity_id: int, definite: bool) -> str:
    entity = content.entity(entity_id)
    words = " ".join(content.attributes_of(entity_id)[:1] + [entity.name]).strip()
    if definite or not entity.isthing:
        return f"the {words}"
    return f"{_article(words)} {words}"


def _boxed(content: PanopticContent, entity_id: int, definite: bool) -> str:
    entity = content.entity(entity_id)
    phrase = _noun_phrase(content, entity_id, definite)
    return f"{phrase} {format_box(entity.box)}" if entity.box is not None else phrase


@CAPTION_WRITER_REGISTRY.register(aliases=("template",))
class TemplateWriter(CaptionWriter):
    """Deterministic template prose from the structured content (no language model).

    One sentence per entity: its noun phrase (article, attribute words, tag) and box, then up
    to ``max_relations`` of its relations (support relations first, then caption-stated,
    contact, and directional ones), each naming the other entity with its box. A final
    sentence states the global items. Every entity with a box appears with that box.
    """

    def __init__(self, *, max_relations: int = 2):
        self.max_relations = int(max_relations)

    def __call__(self, content, stages, image_size) -> str:
        sentences: list[str] = []
        if not content.entities:
            sentences.append("The image shows no recognisable entities.")
        for entity in content.entities:
            subject = capitalise(_boxed(content, entity.id, definite=False))
            relations = sorted(
                content.relations_of(entity.id),
                key=lambda r: (RELATION_PRIORITY.get(r.type, 9), r.object),
            )[: self.max_relations]
            if relations:
                clauses = [self._clause(content, r) for r in relations]
                joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
                sentences.append(f"{subject} is {joined}.")
            else:
                sentences.append(f"The image also shows {_boxed(content, entity.id, definite=False)}.")
        if content.global_items:
            sentences.append(capitalise("; ".join(content.global_items)) + ".")
        return " ".join(sentences)

    @staticmethod
    def _clause(content: PanopticContent, relation: Relation) -> str:
        return f"{relation.text} {_boxed(content, relation.object, definite=True)}"


@CAPTION_WRITER_REGISTRY.register(aliases=("concat",))
class DenseCaptionConcatWriter(CaptionWriter):
    """The entities' dense captions joined into one text, in entity order: a baseline showing
    what the segment captions say on their own (no global sentence, no language model; boxes
    only with ``with_boxes``)."""

    def __init__(self, *, with_boxes: bool = False):
        self.with_boxes = bool(with_boxes)

    def __call__(self, content, stages, image_size) -> str:
        sentences = []
        for entity in content.entities:
            caption = entity.caption.strip().rstrip(".")
            if not caption:
                continue
            if self.with_boxes and entity.box is not None:
                caption = f"{caption} {format_box(entity.box)}"
            sentences.append(capitalise(caption) + ".")
        return " ".join(sentences)


@CAPTION_WRITER_REGISTRY.register(aliases=("concat_boxes",))
class BoxedDenseCaptionConcatWriter(DenseCaptionConcatWriter):
    """:class:`DenseCaptionConcatWriter` with each caption followed by its segment's box."""

    def __init__(self):
        super().__init__(with_boxes=True)
