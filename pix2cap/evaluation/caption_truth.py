"""Caption truth: whether dense captions state what the ground truth says.

Dense-caption mAP passes a caption whose METEOR against the reference exceeds at most 0.25, so
a caption that names the class and colour and invents the rest still counts. Where the ground
truth is structured, this module checks the statements themselves; for any dataset it measures
copying from the training captions and collapse onto a few captions.

Structured ground truth (:func:`caption_truth`)
-----------------------------------------------
A dataset is structured when its GT segments carry ``attributes`` (``{attribute: word}``, e.g.
the shapes dataset's ``color``, ``size``, ``texture``, ``shape``) and ``relation``
(``{"type", "target_id"}`` or ``{"type", "target_ids"}``), as the shapes generator writes them
(``pix2cap/data/datasets/shapes.py`` defines the caption grammar and the geometry of every
relation type).

*Matching.* Per image, predictions are taken by score, highest first (a stable sort); each
takes the not yet matched, non-crowd GT **thing** of the **same class** with the highest mask
IoU, if that IoU is >= 0.5 (one-to-one, the dense-caption evaluator's COCO rule with the class
added). Only matched predictions are judged; each counts once.

*Vocabulary.* The words of each attribute are the values that occur in the ground truth
(``attributes`` of every GT segment of the evaluated dataset, plus the training datasets when
known), so the same code serves any dataset with ``attributes``; no word list is built in. The
nouns are the dataset's class names. Captions are lower-cased and split into letter runs
(``pix2cap.data.text.LOWERCASE_LETTERS_RE``); multi-word values ("light blue") match as a
whole, the longest first.

*Parsing a caption.* The first relation phrase (:data:`RELATION_PHRASES`, the generator's
wording) splits the caption into the subject (before it) and the relation object (after it).
The subject's word for an attribute is the first value of that attribute in the subject. The
relation object is a noun phrase ending at its first noun (a class name): "the red star"
-> ``{color: red, shape: star}`` + noun ``star``; "on the horizon between the sky and the
grass" names two objects. "in front of", "in" and "on" followed by a stuff class are the
generator's ``on`` relation ("in front of the wall", "in the sky", "on the grass"); "in front
of" a thing is ``in_front_of``. A caption names no relation object when it has no relation
phrase or no noun follows it.

*Metrics* (percent of matched predictions, with counts):

- ``attribute_<name>``: the subject's word for ``<name>`` equals the matched GT segment's value;
  a caption without a word for it is wrong. Out of the matched GT segments that have ``<name>``
  (``attribute_<name>_total``).
- ``relation_object_exists``: every object the relation names is in the image's ground truth:
  a non-crowd GT segment other than the matched one whose class name is the noun and whose
  attributes agree with every attribute word stated for the object (a stated attribute the
  segment lacks disagrees). A caption naming no relation object counts as not existing.
- ``relation_holds``: the objects exist and the stated relation holds between the matched GT
  mask and an object's GT mask by the generator's geometry (:func:`relation_holds`); when
  several GT segments fit the description, holding for any one suffices.
- ``no_relation``: captions that name no relation object.

Any dataset (:func:`caption_novelty`)
-------------------------------------
Over every predicted segment's caption, compared after lower-casing and collapsing white space:

- ``memorised``: percent of predicted captions equal to a training caption (the training
  datasets' ``segments_info[*]["description"]``).
- ``distinct_per_100``: distinct predicted captions per 100 predicted segments (100 = every
  caption different; low values mean the captioner collapsed onto a few sentences).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util

from pix2cap.data.text import LOWERCASE_LETTERS_RE
from pix2cap.structures.masks import above, left_of, mask_stats, ring

__all__ = [
    "RELATION_PHRASES",
    "CaptionVocabulary",
    "ObjectPhrase",
    "ParsedCaption",
    "parse_caption",
    "relation_holds",
    "match_things",
    "caption_truth",
    "caption_novelty",
    "normalise_caption",
]

# The generator's relation wording -> relation type, longest phrase first so that "partly
# hidden behind" wins over "behind". "in front of", "in" and "on" are resolved by the class of
# the object that follows (see _resolve_relation).
RELATION_PHRASES: tuple[tuple[str, str], ...] = (
    ("on the horizon between", "on_horizon"),
    ("to the left of", "left_of"),
    ("to the right of", "right_of"),
    ("partly hidden behind", "behind"),
    ("in front of", "in_front_of"),
    ("behind", "behind"),
    ("above", "above"),
    ("below", "below"),
    ("in", "on"),
    ("on", "on"),
)
# How many objects a relation names: one, except the horizon between two regions.
_OBJECT_COUNT = {"on_horizon": 2}
# The generator's geometric constants (shapes.py): an "on" thing has at least this many stuff
# pixels around it, at least this share of them in the named region; an occluded thing hides
# at least max(_MIN_OCCLUSION_PIXELS, _MIN_OCCLUSION_FRACTION * its full area).
_MIN_RING_STUFF_PIXELS = 8
_ON_STUFF_FRACTION = 0.75
_MIN_OCCLUSION_PIXELS = 4
_MIN_OCCLUSION_FRACTION = 0.05
MATCH_IOU = 0.5


def _words(text: str) -> tuple[str, ...]:
    return tuple(LOWERCASE_LETTERS_RE.findall(str(text).lower()))


def normalise_caption(caption: str) -> str:
    """Lower-cased, white space collapsed: case and spacing do not make a caption new."""
    return " ".join(str(caption).lower().split())


# ------------------------------------------------------------------------------- vocabulary
@dataclass
class CaptionVocabulary:
    """The words caption truth recognises.

    Attributes:
        attributes: ``{attribute name: set of values}`` seen in the ground truth.
        nouns: class names (a relation object ends at one).
        stuff_nouns: the class names of stuff classes ("in front of the wall" is ``on``).
    """

    attributes: dict[str, set[str]] = field(default_factory=dict)
    nouns: set[str] = field(default_factory=set)
    stuff_nouns: set[str] = field(default_factory=set)

    def add_segments(self, segments: Iterable[Mapping]) -> None:
        """Add the ``attributes`` values of GT segment dicts."""
        for seg in segments:
            attributes = seg.get("attributes")
            if not isinstance(attributes, Mapping):
                continue
            for name, value in attributes.items():
                if isinstance(value, str) and value.strip():
                    self.attributes.setdefault(str(name), set()).add(value.strip().lower())

    def merge(self, other: "CaptionVocabulary") -> None:
        """Add every word of ``other``."""
        for name, values in other.attributes.items():
            self.attributes.setdefault(name, set()).update(values)
        self.nouns.update(other.nouns)
        self.stuff_nouns.update(other.stuff_nouns)

    def add_classes(self, names: Iterable[str], stuff: Iterable[str] = ()) -> None:
        """Add class names as nouns; ``stuff`` are the stuff classes among them (or extra)."""
        self.nouns.update(n.lower() for n in names)
        self.stuff_nouns.update(n.lower() for n in stuff)
        self.nouns.update(self.stuff_nouns)

    def lexicon(self) -> dict[tuple[str, ...], list[tuple[str, str]]]:
        """Token tuple -> ``[(kind, name)]`` with kind ``"attribute"`` (name = attribute) or
        ``"noun"`` (name = the noun); a word may be both (a shape is also a class name)."""
        entries: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for name in sorted(self.attributes):
            for value in sorted(self.attributes[name]):
                entries.setdefault(_words(value), []).append(("attribute", name))
        for noun in sorted(self.nouns):
            entries.setdefault(_words(noun), []).append(("noun", noun))
        entries.pop((), None)
        return entries


# ---------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ObjectPhrase:
    """A named relation object: its noun (a class name) and the attribute words stated."""

    noun: str
    attributes: Mapping[str, str]


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption states about its subject and its relation.

    Attributes:
        attributes: ``{attribute: word}``, the first word of each attribute in the subject.
        relation: the relation type (``left_of``, ``on``, ...) or None without a relation phrase.
        objects: the named relation objects (two for ``on_horizon``); empty when none is named.
    """

    attributes: Mapping[str, str]
    relation: Optional[str]
    objects: tuple[ObjectPhrase, ...]

    @property
    def names_object(self) -> bool:
        return self.relation is not None and len(self.objects) > 0


def _scan(tokens: Sequence[str], lexicon, max_len: int):
    """Longest-first lexicon matches: ``(start, end, [(kind, name)], value)`` in order."""
    i = 0
    while i < len(tokens):
        for n in range(min(max_len, len(tokens) - i), 0, -1):
            key = tuple(tokens[i : i + n])
            if key in lexicon:
                yield i, i + n, lexicon[key], " ".join(key)
                i += n
                break
        else:
            i += 1


def _find_relation(tokens: Sequence[str]) -> tuple[Optional[str], int, int]:
    phrases = [(_words(p), t) for p, t in RELATION_PHRASES]
    for i in range(len(tokens)):
        for words, rel_type in phrases:
            if tuple(tokens[i : i + len(words)]) == words:
                return rel_type, i, i + len(words)
    return None, len(tokens), len(tokens)


def parse_caption(caption: str, vocabulary: CaptionVocabulary) -> ParsedCaption:
    """Split a caption into subject attributes, relation type and relation objects (rules in
    the module docstring)."""
    tokens = _words(caption)
    lexicon = vocabulary.lexicon()
    max_len = max((len(k) for k in lexicon), default=1)
    relation, rel_start, rel_end = _find_relation(tokens)

    subject: dict[str, str] = {}
    for _, _, entries, value in _scan(tokens[:rel_start], lexicon, max_len):
        for kind, name in entries:
            if kind == "attribute":
                subject.setdefault(name, value)

    objects: list[ObjectPhrase] = []
    if relation is not None:
        wanted = _OBJECT_COUNT.get(relation, 1)
        stated: dict[str, str] = {}
        for _, _, entries, value in _scan(tokens[rel_end:], lexicon, max_len):
            nouns = [name for kind, name in entries if kind == "noun"]
            for kind, name in entries:
                if kind == "attribute":
                    stated.setdefault(name, value)
            if nouns:
                objects.append(ObjectPhrase(noun=nouns[0], attributes=dict(stated)))
                stated = {}
                if len(objects) == wanted:
                    break
        relation = _resolve_relation(relation, objects, vocabulary)
    return ParsedCaption(attributes=subject, relation=relation, objects=tuple(objects))


def _resolve_relation(relation: str, objects: list[ObjectPhrase], vocabulary) -> str:
    # The generator words a thing in front of a stuff region as "in front of the wall" (its
    # ``on`` relation); in front of a thing it is occlusion.
    if relation == "in_front_of" and objects and objects[0].noun in vocabulary.stuff_nouns:
        return "on"
    return relation


# --------------------------------------------------------------------------------- geometry
@dataclass
class _Region:
    """One GT segment of an image, as the geometry needs it."""

    mask: np.ndarray  # Bool[H, W], the visible mask
    isthing: bool
    z_order: Optional[int] = None
    full_area: Optional[int] = None
    _stats: Optional[dict] = None

    @property
    def stats(self) -> Optional[dict]:
        if self._stats is None:
            self._stats = mask_stats(self.mask)
        return self._stats


def _occludes(front: _Region, back: _Region) -> bool:
    """The generator's ``in_front_of(front, back)``, from what the annotation keeps.

    The generator asks that the unoccluded shapes overlap by ``max(4, 5%)`` of ``back``'s full
    shape; the annotation keeps only the visible masks, ``z_order`` and ``full_area``. The
    overlap hides that much of ``back``, so ``full_area - visible area`` must reach the bound;
    with several occluders this bound is necessary, not sufficient.
    """
    if None in (front.z_order, back.z_order, back.full_area) or front.stats is None:
        return False
    if back.stats is None or int(front.z_order) <= int(back.z_order):
        return False
    if not (ring(front.mask) & back.mask).any():  # the two must touch
        return False
    hidden = int(back.full_area) - back.stats["area"]
    return hidden >= max(_MIN_OCCLUSION_PIXELS, _MIN_OCCLUSION_FRACTION * int(back.full_area))


def _ring_stuff_counts(subject: _Region, targets: Sequence[_Region], stuff: Sequence[_Region]):
    """Stuff pixels in ``ring(subject)`` in total and in each target region."""
    around = ring(subject.mask)
    total = sum(int((around & s.mask).sum()) for s in stuff)
    return total, [int((around & t.mask).sum()) if not t.isthing else 0 for t in targets]


def relation_holds(
    relation: str, subject: _Region, targets: Sequence[_Region], stuff: Sequence[_Region]
) -> bool:
    """Whether ``relation`` holds between ``subject`` and ``targets`` (one region, two for
    ``on_horizon``) by the shapes generator's definitions; ``stuff`` are the image's stuff
    regions (for ``on`` and ``on_horizon``)."""
    if subject.stats is None or not targets or any(t.stats is None for t in targets):
        return False
    a, b = subject.stats, targets[0].stats
    if relation == "left_of":
        return left_of(a, b)
    if relation == "right_of":
        return left_of(b, a)
    if relation == "above":
        return above(a, b)
    if relation == "below":
        return above(b, a)
    if relation == "in_front_of":
        return _occludes(subject, targets[0])
    if relation == "behind":
        return _occludes(targets[0], subject)
    if relation == "on":
        # Defined for a thing on a stuff region only.
        if targets[0].isthing:
            return False
        total, (inside,) = _ring_stuff_counts(subject, targets[:1], stuff)
        return total >= _MIN_RING_STUFF_PIXELS and inside >= _ON_STUFF_FRACTION * total
    if relation == "on_horizon":
        if len(targets) != 2 or any(t.isthing for t in targets):
            return False
        total, counts = _ring_stuff_counts(subject, targets, stuff)
        limit = (1.0 - _ON_STUFF_FRACTION) * total
        return total >= _MIN_RING_STUFF_PIXELS and all(c > limit for c in counts)
    return False


# --------------------------------------------------------------------------------- matching
def match_things(
    iou: np.ndarray,
    scores: Sequence[float],
    pred_classes: Sequence[int],
    gt_classes: Sequence[int],
    gt_eligible: Sequence[bool],
    threshold: float = MATCH_IOU,
) -> list[tuple[int, int]]:
    """One-to-one matches ``(prediction, gt)`` at ``IoU >= threshold``, same class.

    Args:
        iou: Float[P, G] mask IoUs.
        scores: Float[P]; predictions pick by score, highest first (stable).
        pred_classes, gt_classes: contiguous class ids.
        gt_eligible: Bool[G], the GT segments that may be matched (non-crowd things).
    """
    iou = np.asarray(iou, dtype=np.float64).reshape(len(scores), len(gt_classes))
    allowed = (
        (np.asarray(pred_classes)[:, None] == np.asarray(gt_classes)[None, :])
        & np.asarray(gt_eligible, dtype=bool)[None, :]
    ) if len(scores) and len(gt_classes) else np.zeros(iou.shape, dtype=bool)
    taken = np.zeros(iou.shape[1], dtype=bool)
    matches = []
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        candidates = np.where(allowed[i] & ~taken, iou[i], -1.0)
        if candidates.size == 0:
            continue
        j = int(candidates.argmax())
        if candidates[j] >= threshold:
            taken[j] = True
            matches.append((int(i), j))
    return matches


# ---------------------------------------------------------------------------------- metrics
def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else float("nan")


def _decode(rles: list[dict]) -> np.ndarray:
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    return np.moveaxis(mask_util.decode(rles), -1, 0).astype(bool)


def _object_agrees(obj: ObjectPhrase, noun: str, attributes: Mapping[str, str]) -> bool:
    if noun.lower() != obj.noun:
        return False
    return all(str(attributes.get(k, "")).lower() == v for k, v in obj.attributes.items())


def caption_truth(
    images: Sequence[Mapping[str, Any]],
    vocabulary: CaptionVocabulary,
    class_names: Mapping[int, str] | Sequence[str],
) -> dict:
    """Attribute accuracy and relation truth of matched things (rules in the module docstring).

    Args:
        images: one dict per image:
            ``pred``: ``masks`` (list of RLEs), ``scores``, ``captions``, ``category_ids``;
            ``gt``: ``masks`` (list of RLEs), ``category_ids``, ``isthing``, ``iscrowd``,
            ``attributes`` (dict or None per segment), ``z_order`` and ``full_area`` (int or
            None per segment).
        vocabulary: the attribute words and class names to recognise.
        class_names: contiguous class id -> name.
    Returns:
        ``matched_things``, ``attribute_<name>`` (percent), ``attribute_<name>_count`` and
        ``attribute_<name>_total`` per attribute, ``relation_object_exists``,
        ``relation_holds``, ``no_relation`` (percent) and their ``_count``.
    """
    attribute_names: list[str] = []
    correct: dict[str, int] = {}
    totals: dict[str, int] = {}
    matched = exists = holds = no_relation = 0
    for image in images:
        pred, gt = image["pred"], image["gt"]
        if not pred["masks"] or not gt["masks"]:
            continue
        crowd = np.asarray(gt["iscrowd"], dtype=bool)
        iou = np.asarray(
            mask_util.iou(pred["masks"], gt["masks"], [0] * len(gt["masks"])), dtype=np.float64
        )
        eligible = np.asarray(gt["isthing"], dtype=bool) & ~crowd
        matches = match_things(
            iou, pred["scores"], pred["category_ids"], gt["category_ids"], eligible
        )
        if not matches:
            continue
        masks = _decode(gt["masks"])
        regions = [
            _Region(
                mask=masks[j],
                isthing=bool(gt["isthing"][j]),
                z_order=gt["z_order"][j],
                full_area=gt["full_area"][j],
            )
            for j in range(len(masks))
        ]
        stuff = [r for r, c in zip(regions, crowd) if not r.isthing and not c]
        names = [str(class_names[int(c)]) for c in gt["category_ids"]]
        for i, j in matches:
            matched += 1
            parsed = parse_caption(pred["captions"][i], vocabulary)
            truth = gt["attributes"][j] or {}
            for name, value in truth.items():
                if name not in totals:
                    attribute_names.append(name)
                    totals[name], correct[name] = 0, 0
                totals[name] += 1
                correct[name] += int(parsed.attributes.get(name) == str(value).lower())
            if not parsed.names_object:
                no_relation += 1
                continue
            # GT segments fitting each named object; the subject cannot be its own object.
            fitting = [
                [
                    k
                    for k in range(len(regions))
                    if k != j
                    and not crowd[k]
                    and _object_agrees(obj, names[k], gt["attributes"][k] or {})
                ]
                for obj in parsed.objects
            ]
            wanted = _OBJECT_COUNT.get(parsed.relation, 1)
            if len(fitting) < wanted or not all(fitting):
                continue
            exists += 1
            combos: list[tuple[int, ...]] = [(k,) for k in fitting[0]]
            if wanted == 2:
                combos = [(k, m) for k in fitting[0] for m in fitting[1] if k != m]
            if any(
                relation_holds(parsed.relation, regions[j], [regions[k] for k in combo], stuff)
                for combo in combos
            ):
                holds += 1

    results: dict = OrderedDict()
    results["matched_things"] = matched
    for name in attribute_names:
        results[f"attribute_{name}"] = _percent(correct[name], totals[name])
        results[f"attribute_{name}_count"] = correct[name]
        results[f"attribute_{name}_total"] = totals[name]
    results["relation_object_exists"] = _percent(exists, matched)
    results["relation_object_exists_count"] = exists
    results["relation_holds"] = _percent(holds, matched)
    results["relation_holds_count"] = holds
    results["no_relation"] = _percent(no_relation, matched)
    results["no_relation_count"] = no_relation
    return results


def caption_novelty(captions: Sequence[str], training_captions: Optional[Iterable[str]]) -> dict:
    """Copying and collapse of predicted captions (rules in the module docstring).

    Args:
        captions: every predicted segment's caption.
        training_captions: the training captions, or None when unknown (``memorised`` is then
            left out).
    Returns:
        ``num_captions``, ``distinct_captions``, ``distinct_per_100`` and, with training
        captions, ``memorised`` (percent) and ``memorised_count``.
    """
    normalised = [normalise_caption(c) for c in captions]
    results: dict = OrderedDict()
    results["num_captions"] = len(normalised)
    if training_captions is not None:
        seen = {normalise_caption(c) for c in training_captions}
        copied = sum(1 for c in normalised if c in seen)
        results["memorised"] = _percent(copied, len(normalised))
        results["memorised_count"] = copied
    distinct = len(set(normalised))
    results["distinct_captions"] = distinct
    results["distinct_per_100"] = _percent(distinct, len(normalised))
    return results
