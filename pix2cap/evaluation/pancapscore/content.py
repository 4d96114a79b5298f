"""Semantic content of a panoptic caption, and the official extraction line format.

PancapScore compares two captions through the content extracted from each: entities (a
semantic tag and an optional box), attributes of one entity, relations among entities, and
items of global image state. The official extraction step writes one item per line::

    1 | entity -->> (whole, motorcycle)
    6 | location -->> (entity 1, [0.50, 0.70, 0.83, 1.00])
    9 | attribute -->> (entity 1, "entity 1 is blue")
    15 | relation -->> (entity 1, entity 4, "entity 1 is next to entity 4")
    21 | global -->> ("the scene feels tranquil")

An entity's id is the ID of its ``entity`` line; the other items refer to it as
``entity <id>``. Two parsers read this format and count every line they cannot use in
``PanopticContent.malformed``, never raising: the official parser
(:func:`~.protocol.parse_official_lines`, the default of scoring) and the *lenient* one here,
:func:`parse_extraction`, for free-form language-model output.

The same content can be handed over as a plain dict (:meth:`PanopticContent.from_dict`),
which is how pix2cap's own structured predictions skip the language-model extraction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "Entity",
    "Attribute",
    "Relation",
    "GlobalItem",
    "PanopticContent",
    "parse_extraction",
    "ENTITY_REF_RE",
    "rewrite_entity_refs",
    "entity_refs",
]

# "entity 12" inside item texts and tuples.
ENTITY_REF_RE = re.compile(r"\bentity\s+(\d+)\b", re.IGNORECASE)

_LINE_RE = re.compile(r"^\s*(\d+)\s*\|\s*([A-Za-z_]+)\s*-+>>\s*(.*?)\s*$")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(
    r"^\[\[?\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*("
    + _NUMBER + r")\s*\]?\]$"
)
_ENTITY_TOKEN_RE = re.compile(r"^entity\s+(\d+)$", re.IGNORECASE)
# Lines that carry no item but are not mistakes either: code fences and headings.
_IGNORABLE_RE = re.compile(r"^\s*(?:```.*|#+.*|-{3,}|)\s*$")


@dataclass
class Entity:
    """One entity instance.

    Attributes:
        id: its ID (the ID of its ``entity`` line).
        name: the semantic tag, e.g. ``"motorcycle"``.
        box: ``[x1, y1, x2, y2]`` normalised to [0, 1] of the image, or None.
        kind: the first field of the entity tuple (``"whole"`` or ``"part"`` in the official
            output); kept for round trips, unused by the score.
    """

    id: int
    name: str
    box: Optional[list[float]] = None
    kind: str = "whole"


@dataclass
class Attribute:
    """A property of one entity; ``text`` names it as ``entity <id>``: ``"entity 1 is blue"``."""

    entity_id: int
    text: str


@dataclass
class Relation:
    """A relation among entities (usually two), e.g. ``"entity 1 is next to entity 4"``."""

    entity_ids: tuple[int, ...]
    text: str


@dataclass
class GlobalItem:
    """A statement about the whole image, e.g. ``"the scene feels tranquil"``."""

    text: str


@dataclass
class PanopticContent:
    """Everything extracted from one caption.

    Attributes:
        entities: in ID order of appearance.
        attributes, relations, global_items: the other item kinds.
        malformed: lines (or dict items) that could not be used.
        raw: the extraction text or caption it came from (for debugging; may be "").
    """

    entities: list[Entity] = field(default_factory=list)
    attributes: list[Attribute] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    global_items: list[GlobalItem] = field(default_factory=list)
    malformed: int = 0
    raw: str = ""

    def entity_by_id(self) -> dict[int, Entity]:
        return {e.id: e for e in self.entities}

    def to_lines(self) -> str:
        """The content in the official ``ID | type -->> tuple`` form, IDs renumbered only for
        the non-entity lines (entity IDs are kept, since item texts refer to them)."""
        lines: list[str] = []
        next_id = max((e.id for e in self.entities), default=0) + 1
        for e in self.entities:
            lines.append(f"{e.id} | entity -->> ({e.kind}, {e.name})")
        for e in self.entities:
            if e.box is not None:
                box = ", ".join(f"{v:.3f}" for v in e.box)
                lines.append(f"{next_id} | location -->> (entity {e.id}, [{box}])")
                next_id += 1
        for a in self.attributes:
            lines.append(f'{next_id} | attribute -->> (entity {a.entity_id}, "{a.text}")')
            next_id += 1
        for r in self.relations:
            refs = ", ".join(f"entity {i}" for i in r.entity_ids)
            lines.append(f'{next_id} | relation -->> ({refs}, "{r.text}")')
            next_id += 1
        for g in self.global_items:
            lines.append(f'{next_id} | global -->> ("{g.text}")')
            next_id += 1
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The structured dict form read by :meth:`from_dict`."""
        return {
            "entities": [
                {"id": e.id, "name": e.name, "box": None if e.box is None else list(e.box)}
                for e in self.entities
            ],
            "attributes": [{"entity": a.entity_id, "text": a.text} for a in self.attributes],
            "relations": [{"entities": list(r.entity_ids), "text": r.text} for r in self.relations],
            "global": [g.text for g in self.global_items],
        }

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "structured") -> "PanopticContent":
        """Content from the structured dict form::

            {
              "entities":   [{"id": 1, "name": "dog", "box": [x1, y1, x2, y2] or null}, ...],
              "attributes": [{"entity": 1, "text": "entity 1 is brown"}, ...],
              "relations":  [{"entities": [1, 2], "text": "entity 1 is next to entity 2"}, ...],
              "global":     ["the scene is bright", ...]
            }

        Boxes are normalised to [0, 1] of the image. Only ``"entities"`` is required. An
        attribute text that never says ``entity <id>`` is read as a bare property and becomes
        ``"entity <id> is <text>"``; a relation text without entity references becomes
        ``"entity <a> <text> entity <b>"`` (two entities) -- so a producer may write just
        ``"brown"`` or ``"is next to"``.

        Raises:
            ValueError: naming ``where`` and the offending key, for a wrong type, a missing
                key, a duplicate id, a bad box or a reference to an unknown entity.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(data).__name__}")
        raw_entities = data.get("entities")
        if not isinstance(raw_entities, list):
            raise ValueError(f"{where}: 'entities' must be a list of dicts")
        content = cls()
        seen: set[int] = set()
        for i, item in enumerate(raw_entities):
            key = f"{where}.entities[{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{key}: expected a dict, got {type(item).__name__}")
            entity_id = _int_field(item, "id", key)
            if entity_id in seen:
                raise ValueError(f"{key}: entity id {entity_id} is used twice")
            seen.add(entity_id)
            name = item.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{key}.name: expected a non-empty string, got {name!r}")
            box = item.get("box")
            if box is not None:
                box = _checked_box(box)
                if box is None:
                    raise ValueError(
                        f"{key}.box: expected 4 finite numbers [x1, y1, x2, y2] with "
                        f"x1 <= x2 and y1 <= y2, got {item.get('box')!r}"
                    )
            kind = item.get("kind", "whole")
            content.entities.append(
                Entity(id=entity_id, name=name.strip(), box=box, kind=str(kind))
            )

        for i, item in enumerate(_list_field(data, "attributes", where)):
            key = f"{where}.attributes[{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{key}: expected a dict, got {type(item).__name__}")
            entity_id = _int_field(item, "entity", key)
            if entity_id not in seen:
                raise ValueError(f"{key}.entity: no entity with id {entity_id}")
            text = _text_field(item, key)
            if not entity_refs(text):
                text = f"entity {entity_id} is {text}"
            content.attributes.append(Attribute(entity_id=entity_id, text=text))

        for i, item in enumerate(_list_field(data, "relations", where)):
            key = f"{where}.relations[{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{key}: expected a dict, got {type(item).__name__}")
            ids = item.get("entities")
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"{key}.entities: expected a non-empty list of entity ids")
            ids = tuple(_as_int(v, f"{key}.entities") for v in ids)
            for v in ids:
                if v not in seen:
                    raise ValueError(f"{key}.entities: no entity with id {v}")
            text = _text_field(item, key)
            if not entity_refs(text):
                if len(ids) == 2:
                    text = f"entity {ids[0]} {text} entity {ids[1]}"
                else:
                    text = " ".join(f"entity {v}" for v in ids) + f" {text}"
            content.relations.append(Relation(entity_ids=ids, text=text))

        for i, item in enumerate(_list_field(data, "global", where)):
            key = f"{where}.global[{i}]"
            if isinstance(item, Mapping):
                item = _text_field(item, key)
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"{key}: expected a non-empty string, got {item!r}")
            content.global_items.append(GlobalItem(text=item.strip()))
        return content


def _list_field(data: Mapping, name: str, where: str) -> list:
    value = data.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}.{name}: expected a list, got {type(value).__name__}")
    return value


def _as_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{key}: expected an integer entity id, got {value!r}")
    return int(value)


def _int_field(item: Mapping, name: str, key: str) -> int:
    if name not in item:
        raise ValueError(f"{key}: missing key {name!r}")
    return _as_int(item[name], f"{key}.{name}")


def _text_field(item: Mapping, key: str) -> str:
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{key}.text: expected a non-empty string, got {text!r}")
    return text.strip()


def _checked_box(values) -> Optional[list[float]]:
    """Four finite numbers with x1 <= x2 and y1 <= y2, else None."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return None
    try:
        box = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in box) or box[0] > box[2] or box[1] > box[3]:
        return None
    return box


def entity_refs(text: str) -> list[int]:
    """The entity ids a text mentions as ``entity <id>``, in order."""
    return [int(m.group(1)) for m in ENTITY_REF_RE.finditer(text)]


def rewrite_entity_refs(text: str, mapping: Mapping[int, int]) -> str:
    """``text`` with every ``entity <a>`` replaced by ``entity <mapping[a]>`` in one pass (so
    ``{1: 2, 2: 1}`` swaps, not collapses); ids missing from ``mapping`` stay as written."""

    def substitute(m: re.Match) -> str:
        old = int(m.group(1))
        return f"entity {mapping[old]}" if old in mapping else m.group(0)

    return ENTITY_REF_RE.sub(substitute, text)


def _split_tuple(body: str) -> Optional[list[str]]:
    """Top-level comma-separated fields of ``(a, b, "c, d", [1, 2])``; quotes and brackets
    protect their commas. None when the parentheses or quotes do not balance."""
    body = body.strip()
    if body.endswith("."):
        body = body[:-1].rstrip()
    if not (body.startswith("(") and body.endswith(")")):
        return None
    body = body[1:-1]
    fields: list[str] = []
    depth = 0
    quote: Optional[str] = None
    current: list[str] = []
    for ch in body:
        if quote is not None:
            current.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'\u201c\u201d" and not (ch == "'" and current and current[-1].isalnum()):
            # An apostrophe inside a word ("man's") is not a quote.
            quote = "\u201d" if ch == "\u201c" else ch
            current.append(ch)
        elif ch == "[":
            depth += 1
            current.append(ch)
        elif ch == "]":
            depth -= 1
            if depth < 0:
                return None
            current.append(ch)
        elif ch == "," and depth == 0:
            fields.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if quote is not None or depth != 0:
        return None
    fields.append("".join(current).strip())
    return fields


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] in "\"'\u201c" and text[-1] in "\"'\u201d":
        text = text[1:-1]
    return text.strip()


def parse_extraction(text: str) -> PanopticContent:
    """Read extraction lines (``ID | type -->> tuple``) by the *lenient* protocol.

    Tolerant by design, and so not the official reading (see :mod:`.protocol` for the
    differences): the text usually comes from a language model. Blank lines, code
    fences and headings are skipped; every other line that is not a usable item -- no
    ``ID | type -->>`` prefix, an unknown type, a broken tuple, a bad box, an item about an
    entity that was never declared, a second entity with the same ID, a second location for
    one entity -- adds one to ``malformed`` and is dropped. Items may come in any order.
    Item texts are kept as written (quotes removed).
    """
    content = PanopticContent(raw=text if isinstance(text, str) else "")
    if not isinstance(text, str):
        content.malformed += 1
        return content
    pending: list[tuple[str, list[str]]] = []
    entities: dict[int, Entity] = {}
    for line in text.splitlines():
        if _IGNORABLE_RE.match(line):
            continue
        m = _LINE_RE.match(line.strip().lstrip("-*\u2022 ").strip())
        if m is None:
            content.malformed += 1
            continue
        item_id, kind, body = int(m.group(1)), m.group(2).lower(), m.group(3)
        fields = _split_tuple(body)
        if fields is None or not fields or any(f == "" for f in fields):
            content.malformed += 1
            continue
        if kind == "entity":
            if item_id in entities:
                content.malformed += 1
                continue
            if len(fields) == 1:
                entity_kind, name = "whole", _unquote(fields[0])
            elif len(fields) == 2:
                entity_kind, name = _unquote(fields[0]), _unquote(fields[1])
            else:
                content.malformed += 1
                continue
            if not name:
                content.malformed += 1
                continue
            entities[item_id] = Entity(id=item_id, name=name, kind=entity_kind or "whole")
        elif kind in ("location", "attribute", "relation", "global"):
            pending.append((kind, fields))
        else:
            content.malformed += 1

    content.entities = list(entities.values())
    for kind, fields in pending:
        if kind == "global":
            if len(fields) != 1 or not _unquote(fields[0]):
                content.malformed += 1
                continue
            content.global_items.append(GlobalItem(text=_unquote(fields[0])))
            continue
        refs: list[int] = []
        for f in fields:
            ref = _ENTITY_TOKEN_RE.match(f)
            if ref is None:
                break
            refs.append(int(ref.group(1)))
        rest = fields[len(refs) :]
        if not refs or any(r not in entities for r in refs) or len(rest) != 1:
            content.malformed += 1
            continue
        if kind == "location":
            box = _BOX_RE.match(rest[0].strip())
            values = _checked_box([float(v) for v in box.groups()]) if box else None
            if len(refs) != 1 or values is None or entities[refs[0]].box is not None:
                content.malformed += 1
                continue
            entities[refs[0]].box = values
            continue
        item_text = _unquote(rest[0])
        if not item_text:
            content.malformed += 1
            continue
        if kind == "attribute":
            if len(refs) != 1:
                content.malformed += 1
                continue
            content.attributes.append(Attribute(entity_id=refs[0], text=item_text))
        else:
            content.relations.append(Relation(entity_ids=tuple(refs), text=item_text))
    return content

