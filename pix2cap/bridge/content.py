"""Structured content of a panoptic caption, built from decoded segments and nothing else.

A panoptic caption has five kinds of content (Panoptic Captioning, DESIGN 5.5): entities
(tag), their locations (box), attributes, relations, and the global state of the image.
:func:`build_content` derives each one from what the segmentation model decoded:

* **entities** -- one per decoded segment (and per accepted extra instance): the tag is the
  class name (:func:`pix2cap.bridge.stages.clean_tag`), the box the tight box of the mask in
  SA-Pancap form (normalised, 3 decimals), plus score and dense caption.
* **attributes** -- from the entity's dense caption: the modifier words of its first noun
  phrase (``"a large red striped circle to the left of ..."`` -> ``"large red striped"``;
  :func:`pix2cap.bridge.phrases.caption_attributes`).
* **relations** -- from mask geometry (:mod:`pix2cap.bridge.geometry`), and from the dense
  captions when a caption names a relation to another entity that can be identified uniquely
  (:func:`pix2cap.bridge.phrases.caption_relation`). Nothing is added that neither source
  supports, and a caption's directional relation (left of / right of / above / below) is
  dropped when the two masks' centroids say the opposite.
* **global** -- the number of things ("the image shows three objects"), counts per thing
  class when a class appears more than once, and the dominant stuff region (the stuff entity
  with the largest area, if it covers at least 25% of the image).

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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pix2cap.bridge.geometry import DIRECTIONS, centroids_contradict, geometric_relations
from pix2cap.bridge.phrases import caption_attributes, caption_relation
from pix2cap.data.caption_formats import GRID, pixel_box_to_grid
from pix2cap.data.text import number_word, plural
from pix2cap.structures.masks import mask_stats

__all__ = [
    "DecodedEntity",
    "Entity",
    "Attribute",
    "Relation",
    "PanopticContent",
    "build_content",
    "RELATION_TEXT",
    "RELATION_PRIORITY",
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
_DIRECTION_OF_TEXT = {RELATION_TEXT[k]: k for k in DIRECTIONS}
# Which relation describes an entity best: support and containment first, then what its own
# caption says, then contact, then direction.
RELATION_PRIORITY = {
    "on": 0, "inside": 1, "caption": 2, "overlapping": 3, "next_to": 4,
    "left_of": 5, "right_of": 5, "above": 6, "below": 6,
}

DOMINANT_STUFF_FRACTION = 0.25


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

    @cached_property
    def stats(self) -> dict | None:
        """:func:`~pix2cap.structures.masks.mask_stats` of the mask (extent, centroid, area),
        measured on first use and kept: ordering, stage boxes and relations all read it."""
        return mask_stats(np.asarray(self.mask, dtype=bool))

    @property
    def pixel_box(self) -> list[int] | None:
        """Tight box ``[x0, y0, x1, y1]`` in pixels (``x1``/``y1`` exclusive); None if empty."""
        s = self.stats
        return None if s is None else [s["x0"], s["y0"], s["x1"] + 1, s["y1"] + 1]


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


def build_content(
    decoded: Sequence[DecodedEntity],
    image_size: tuple[int, int],
    grid: int = GRID,
    grid_boxes: Sequence[Sequence[int]] | None = None,
) -> PanopticContent:
    """Structured content of one image from its decoded regions.

    Args:
        decoded: the regions, in caption order; entity ``id`` = position + 1. Regions with an
            empty mask are skipped.
        image_size: ``(height, width)`` of the masks.
        grid: the model-side box grid (for ``grid_box``).
        grid_boxes: each region's grid box when the caller already has it (same order as
            ``decoded``); None: computed from the mask's box.

    Returns:
        :class:`PanopticContent`.
    """
    height, width = int(image_size[0]), int(image_size[1])
    content = PanopticContent(image_size=(height, width))
    kept: list[DecodedEntity] = []
    for k, region in enumerate(decoded):
        shape = np.shape(region.mask)
        if shape != (height, width):
            raise ValueError(
                f"entity {region.tag!r}: mask shape {shape} differs from the image size "
                f"{(height, width)}"
            )
        stats = region.stats
        if stats is None:
            continue
        kept.append(region)
        pixel_box = region.pixel_box
        box = [
            round(min(1.0, max(0.0, pixel_box[0] / width)), 3),
            round(min(1.0, max(0.0, pixel_box[1] / height)), 3),
            round(min(1.0, max(0.0, pixel_box[2] / width)), 3),
            round(min(1.0, max(0.0, pixel_box[3] / height)), 3),
        ]
        grid_box = (
            pixel_box_to_grid(pixel_box, width, height, grid)
            if grid_boxes is None
            else [int(v) for v in grid_boxes[k]]
        )
        content.entities.append(
            Entity(
                id=len(content.entities) + 1,
                name=region.tag,
                box=box,
                grid_box=grid_box,
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

    relations = geometric_relations(
        [r.mask for r in kept], [r.isthing for r in kept], [r.stats for r in kept]
    )
    for i, j, rel in relations:
        content.relations.append(
            Relation(i + 1, j + 1, rel, RELATION_TEXT[rel], "geometry")
        )
    for k in range(len(content.entities)):
        found = caption_relation(k, content.entities, attribute_text)
        if found is None:
            continue
        j, predicate = found
        if centroids_contradict(_DIRECTION_OF_TEXT.get(predicate), kept[k].stats, kept[j].stats):
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
    content.global_items.append(f"the image shows {number_word(count)} {noun}")
    per_class = Counter(e.name for e in things)
    for name, n in sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0])):
        if n > 1:
            content.global_items.append(f"there are {number_word(n)} {plural(name)}")
    stuff = [e for e in content.entities if not e.isthing]
    if stuff:
        dominant = max(stuff, key=lambda e: e.area)
        if dominant.area >= DOMINANT_STUFF_FRACTION * height * width:
            content.global_items.append(f"the {dominant.name} is the dominant region of the image")
    return content
