"""Instance-aware question answering of PancapScore.

Every attribute, relation and global item of a *reference* content becomes a pair of
yes/no questions about a *candidate* content:

- the yes-question asks whether the item holds, with its entity ids rewritten to the ids of
  the candidate entities they were matched to (``"entity 3 is blue"`` becomes ``"entity 7 is
  blue"`` when ground-truth entity 3 matched predicted entity 7); the right answer is yes;
- the no-question asks whether the *negated* item holds (``"entity 7 is not blue"``); the
  right answer is no.

A judge answers both from the candidate content; each right answer is worth 0.5, so an item
scores 0, 0.5 or 1, and a judge that always says "yes" (or always "no") earns 0.5 per item
rather than full marks. An item that mentions an entity left unmatched is not asked and
scores 0. Item scores summed over the reference items and divided by their number give the
*recall* of that dimension when the reference is the ground truth and the candidate the
prediction; swapping the roles (predicted items asked of the ground-truth content, ids
mapped back through the same matching) gives the *precision*. The published description
states the recall side; the precision side mirrors it so that A/R/G report F1 as E and L do.

The negation is built by a small rule (:func:`negate_statement`): "not" after the first
copula or auxiliary, else "it is not the case that ...". The official metric has a language
model write both questions; this rule is what keeps the pair well defined without one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from .content import PanopticContent, entity_refs, rewrite_entity_refs

__all__ = [
    "QAQuestion",
    "QAResult",
    "negate_statement",
    "build_questions",
    "parse_yes_no_answers",
    "score_answers",
    "DIMENSIONS",
]

DIMENSIONS = ("attribute", "relation", "global")

_AUX_RE = re.compile(
    r"\b(is|are|was|were|can|could|will|would|should|may|might|must|does|do|did|has been|"
    r"have been)\b",
    re.IGNORECASE,
)
_HAS_RE = re.compile(r"\b(has|have)\b", re.IGNORECASE)
_NEGATED_RE = re.compile(r"\b(not|no|never|n't)\b", re.IGNORECASE)


def negate_statement(statement: str) -> str:
    """The negation of a short declarative statement, by rule.

    ``"entity 1 is blue"`` -> ``"entity 1 is not blue"``; ``"entity 2 has a handle"`` ->
    ``"entity 2 does not have a handle"``; anything else -> ``"it is not the case that ..."``.
    A statement already negated near its verb gets the last form too, so the result always
    means the opposite.
    """
    text = statement.strip().rstrip(".")
    aux = _AUX_RE.search(text)
    has = _HAS_RE.search(text)
    if aux is not None and (has is None or aux.start() <= has.start()):
        after = text[aux.end() :]
        if not _NEGATED_RE.match(after.strip()):
            return text[: aux.end()] + " not" + after
    elif has is not None and not _NEGATED_RE.search(text[: has.start()]):
        verb = "does not have" if has.group(1).lower() == "has" else "do not have"
        return text[: has.start()] + verb + text[has.end() :]
    return f"it is not the case that {text}"


@dataclass
class QAQuestion:
    """One yes/no question about a candidate content.

    Attributes:
        dimension: ``"attribute"``, ``"relation"`` or ``"global"``.
        item_index: index of the reference item in its list.
        statement: the reference item's text with ids rewritten to candidate ids.
        positive: True for the yes-question (asks ``statement``), False for the no-question
            (asks its negation).
        entity_ids: candidate entity ids the item is about (empty for global items).
        text: the question as put to a language model.
    """

    dimension: str
    item_index: int
    statement: str
    positive: bool
    entity_ids: tuple[int, ...] = ()
    text: str = ""

    @property
    def expected(self) -> bool:
        return self.positive


@dataclass
class QAResult:
    """Per-dimension QA outcome for one direction (reference -> candidate).

    Attributes:
        scores: ``{dimension: [score per reference item]}`` each in {0, 0.5, 1}.
        unanswerable: ``{dimension: items not asked because an entity was unmatched}``.
        malformed_answers: judge answers that could not be read (scored as wrong).
    """

    scores: dict[str, list[float]] = field(default_factory=lambda: {d: [] for d in DIMENSIONS})
    unanswerable: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DIMENSIONS})
    malformed_answers: int = 0

    def ratio(self, dimension: str) -> Optional[float]:
        """Mean item score, or None when the reference has no item of this dimension."""
        values = self.scores[dimension]
        return sum(values) / len(values) if values else None


def build_questions(
    reference: PanopticContent, id_map: Mapping[int, int]
) -> tuple[list[QAQuestion], dict[str, list[Optional[int]]]]:
    """The question pairs for every reference item.

    Args:
        reference: the content whose items are checked.
        id_map: reference entity id -> candidate entity id (the matching).

    Returns:
        ``questions`` (two per askable item, yes-question first) and ``slots``:
        ``{dimension: [index of the item's yes-question in questions, or None if the item
        mentions an unmatched entity]}`` in item order.
    """
    questions: list[QAQuestion] = []
    slots: dict[str, list[Optional[int]]] = {d: [] for d in DIMENSIONS}
    items: list[tuple[str, Sequence[int], str]] = []
    for a in reference.attributes:
        items.append(("attribute", (a.entity_id,), a.text))
    for r in reference.relations:
        items.append(("relation", tuple(r.entity_ids), r.text))
    for g in reference.global_items:
        items.append(("global", (), g.text))
    counters = {d: 0 for d in DIMENSIONS}
    for dimension, ids, text in items:
        index = counters[dimension]
        counters[dimension] += 1
        mentioned = set(ids) | set(entity_refs(text))
        if any(i not in id_map for i in mentioned):
            slots[dimension].append(None)
            continue
        statement = rewrite_entity_refs(text, id_map).strip().rstrip(".")
        mapped = tuple(id_map[i] for i in ids)
        slots[dimension].append(len(questions))
        for positive in (True, False):
            asked = statement if positive else negate_statement(statement)
            questions.append(
                QAQuestion(
                    dimension=dimension,
                    item_index=index,
                    statement=statement,
                    positive=positive,
                    entity_ids=mapped,
                    text=f"Is it true that {asked}?",
                )
            )
    return questions, slots


def score_answers(
    questions: Sequence[QAQuestion],
    slots: Mapping[str, Sequence[Optional[int]]],
    answers: Sequence[Optional[bool]],
    malformed: int = 0,
) -> QAResult:
    """Item scores from the judge's answers (``None`` = unreadable, scored as wrong)."""
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    result = QAResult(malformed_answers=malformed)
    for dimension in DIMENSIONS:
        for slot in slots.get(dimension, []):
            if slot is None:
                result.scores[dimension].append(0.0)
                result.unanswerable[dimension] += 1
                continue
            score = 0.0
            for k in (slot, slot + 1):
                if answers[k] is not None and answers[k] == questions[k].expected:
                    score += 0.5
            result.scores[dimension].append(score)
    return result


_ANSWER_WORD = r"(yes|no|true|false|y|n)"
_NUMBERED_RE = re.compile(
    r"^\s*(?:[-*\u2022]\s*)?[*_]*\s*(?:q(?:uestion)?\s*)?(\d+)[\s.):\-*_]*"
    r"(?:answer\s*[:\-]?\s*)?[*_]*\s*" + _ANSWER_WORD + r"\b",
    re.IGNORECASE,
)
_BARE_RE = re.compile(r"\b" + _ANSWER_WORD + r"\b", re.IGNORECASE)


def _as_bool(word: str) -> bool:
    return word.lower() in ("yes", "true", "y")


def parse_yes_no_answers(text: str, num_questions: int) -> tuple[list[Optional[bool]], int]:
    """Read ``num_questions`` yes/no answers from a judge's reply.

    Accepted: numbered lines (``"1. yes"``, ``"Q2: No"``, ``"3) answer: yes"``, markdown
    bullets and bold around them); without any numbering, and only then, the yes/no words
    in order when there are exactly ``num_questions`` of them. Anything else is unreadable.

    Returns:
        ``(answers, malformed)``: one ``True``/``False``/``None`` per question (None when
        missing or unreadable, or answered twice inconsistently) and the number of Nones.
    """
    answers: list[Optional[bool]] = [None] * num_questions
    if not isinstance(text, str) or num_questions <= 0:
        return answers, num_questions if num_questions > 0 else 0
    conflicting: set[int] = set()
    numbered_any = False
    for line in text.splitlines():
        m = _NUMBERED_RE.match(line)
        if m is None:
            continue
        numbered_any = True
        k = int(m.group(1)) - 1
        if not 0 <= k < num_questions:
            continue
        value = _as_bool(m.group(2))
        if answers[k] is not None and answers[k] != value:
            conflicting.add(k)
        answers[k] = value
    for k in conflicting:
        answers[k] = None
    if not numbered_any:
        words = _BARE_RE.findall(text)
        if len(words) == num_questions:
            answers = [_as_bool(w) for w in words]
    malformed = sum(a is None for a in answers)
    return answers, malformed
