"""Caption text helpers: the colour vocabulary, and rewriting that keeps text true to a
horizontally flipped image.

After a left-right flip, "the dog on the left" describes the wrong dog. These helpers swap the
words *left* and *right* (and their compounds) and mirror inline boxes, and keep grounded
phrase offsets pointing at their phrases although "left" (4 letters) and "right" (5) differ in
length.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pix2cap.data.caption_formats import format_box, parse_pancap_boxes

__all__ = [
    "BASIC_COLOUR_WORDS",
    "COLOUR_WORDS",
    "NUMBER_WORDS",
    "ARTICLES",
    "DEMONSTRATIVES",
    "POSSESSIVE_DETERMINERS",
    "QUANTIFIERS",
    "DETERMINERS",
    "PHRASE_END",
    "caption_words",
    "noun_forms",
    "WORD_RE",
    "LOWERCASE_LETTERS_RE",
    "number_word",
    "plural",
    "capitalise",
    "swap_left_right",
    "flip_grounded_caption",
    "flip_panoptic_caption",
]

# Basic colour terms, both spellings of grey.
BASIC_COLOUR_WORDS = frozenset(
    "red green blue yellow purple orange white black grey gray brown pink beige violet cyan "
    "magenta gold silver".split()
)
# Colour terms that captions use as attribute words: the basic ones and common finer shades.
COLOUR_WORDS = BASIC_COLOUR_WORDS | frozenset(
    "golden tan navy teal turquoise maroon cream ivory crimson khaki olive lavender".split()
)

# Cardinal numbers as words, by value ("zero" .. "twenty").
NUMBER_WORDS = tuple(
    (
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty"
    ).split()
)

ARTICLES = frozenset({"a", "an", "the"})
DEMONSTRATIVES = frozenset({"this", "that", "these", "those"})
POSSESSIVE_DETERMINERS = frozenset({"its", "their", "his", "her", "our"})
# Determiners that pick some or each of a kind.
QUANTIFIERS = frozenset({"some", "another", "each", "every"})

# Words that open a noun phrase: articles, demonstratives, quantifiers, possessives and the
# numbers one to ten.
DETERMINERS = (
    ARTICLES
    | set(NUMBER_WORDS[1:11])
    | {"this", "that", "these", "those", "some", "several", "many", "another", "each", "every"}
    | {"its", "his", "her", "their"}
)
# Words that end a noun phrase: prepositions, verbs and conjunctions typical of region captions.
PHRASE_END = {
    "on", "in", "at", "to", "of", "with", "by", "near", "next", "beside", "behind", "under",
    "over", "above", "below", "between", "inside", "outside", "covering", "holding", "sitting",
    "standing", "lying", "is", "are", "was", "were", "and", "or", "that", "which", "who",
    "while", "from", "into", "onto", "against", "along", "across", "around", "for", "wearing",
    "carrying", "riding", "looking", "has", "have", "being", "there", "where",
}
_CAPTION_WORD_RE = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def caption_words(text: str) -> list[str]:
    """The lower-case words of ``text``."""
    return _CAPTION_WORD_RE.findall(text.lower())


def noun_forms(tag: str) -> set[str]:
    """The forms a tag's noun (its last word) takes in captions: itself and its plurals."""
    last = tag.lower().split()[-1] if tag.strip() else ""
    if not last:
        return set()
    forms = {last, last + "s", last + "es"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    return forms


# A word: an ASCII letter, then letters, apostrophes or hyphens ("don't", "left-hand").
WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\-]*")
# A run of lower-case ASCII letters; on lower-cased text, the words split at any other
# character ("left-hand" -> "left", "hand").
LOWERCASE_LETTERS_RE = re.compile(r"[a-z]+")


def number_word(n: int) -> str:
    """``n`` as a word up to twenty ("three"), as digits beyond."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
    """English plural of a regular noun ("circle" -> "circles", "box" -> "boxes",
    "strawberry" -> "strawberries")."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def capitalise(text: str) -> str:
    """``text`` with its first character upper-cased (the rest untouched)."""
    return text[:1].upper() + text[1:]

# "left"/"right" as a whole word, optionally fused with a suffix that keeps the direction
# meaning (leftmost, left-hand(ed), lefthand(ed), leftward(s)). Word boundaries on both sides
# keep "bright", "copyright", "leftover" and "lefty" untouched; "left-handed" also matches
# through the "-hand" alternative or, failing that, "left" followed by "-".
_DIRECTION_WORD = re.compile(
    r"\b(?P<core>left|right)(?P<suffix>most|-hand(?:ed)?|hand(?:ed)?|wards?)?\b",
    re.IGNORECASE,
)
_OPPOSITE = {"left": "right", "right": "left"}


def _swapped_core(core: str) -> str:
    opposite = _OPPOSITE[core.lower()]
    if core.isupper():
        return opposite.upper()
    if core[0].isupper():
        return opposite.capitalize()
    return opposite


def _replacement(match: re.Match) -> str:
    return _swapped_core(match.group("core")) + (match.group("suffix") or "")


def swap_left_right(text: str) -> str:
    """Swap left <-> right as whole words, keeping case ("Left" -> "Right", "LEFT" ->
    "RIGHT") and compounds ("leftmost" -> "rightmost", "left-hand" -> "right-hand",
    "leftwards" -> "rightwards"). Other words containing the letters are left alone."""
    return _DIRECTION_WORD.sub(_replacement, text)


def _swap_with_offset_map(text: str) -> tuple[str, list[tuple[int, int, int, int]]]:
    """Swap words and list the edits as ``(old_start, old_end, new_start, new_end)``."""
    pieces: list[str] = []
    edits: list[tuple[int, int, int, int]] = []
    cursor = 0
    new_len = 0
    for match in _DIRECTION_WORD.finditer(text):
        before = text[cursor : match.start()]
        pieces.append(before)
        new_len += len(before)
        replacement = _replacement(match)
        edits.append((match.start(), match.end(), new_len, new_len + len(replacement)))
        pieces.append(replacement)
        new_len += len(replacement)
        cursor = match.end()
    pieces.append(text[cursor:])
    return "".join(pieces), edits


def _map_offset(offset: int, edits: list[tuple[int, int, int, int]]) -> int:
    """Where character offset ``offset`` of the old text lands in the new text."""
    shift = 0
    for old_start, old_end, new_start, new_end in edits:
        if offset >= old_end:
            shift = new_end - old_end
        elif offset > old_start:
            # Inside a replaced word (phrases do not normally cut words): keep the relative
            # position, capped at the new word's end.
            return min(new_start + (offset - old_start), new_end)
        else:
            break
    return offset + shift


def flip_grounded_caption(grounded_caption: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a COCONut-PanCap grounded caption for the mirrored image.

    Args:
        grounded_caption: ``{"raw", "text", "phrases": [{"phrase", "start", "end",
            "segment_ids"}, ...], ...}`` with ``text[start:end] == phrase``.
    Returns:
        A new dict (the input is not modified): ``raw`` and ``text`` with left/right swapped,
        every phrase's ``start``/``end`` moved to its place in the new text and its
        ``phrase`` re-read from there; other keys copied unchanged.
    """
    flipped = copy.deepcopy(grounded_caption)
    if "raw" in flipped and isinstance(flipped["raw"], str):
        flipped["raw"] = swap_left_right(flipped["raw"])
    text = flipped.get("text")
    if not isinstance(text, str):
        return flipped
    new_text, edits = _swap_with_offset_map(text)
    flipped["text"] = new_text
    for phrase in flipped.get("phrases", []):
        start = _map_offset(int(phrase["start"]), edits)
        end = _map_offset(int(phrase["end"]), edits)
        phrase["start"], phrase["end"] = start, end
        phrase["phrase"] = new_text[start:end]
    return flipped


def flip_panoptic_caption(text: str) -> str:
    """Rewrite an SA-Pancap panoptic caption for the mirrored image: swap left/right and
    mirror every inline ``[[x1, y1, x2, y2]]`` box (normalised coordinates), so that
    ``x1' = 1 - x2`` and ``x2' = 1 - x1``. Boxes are rewritten in the dataset's 3-decimal form.
    """
    pieces: list[str] = []
    cursor = 0
    for entry in sorted(parse_pancap_boxes(text), key=lambda e: e["box_start"]):
        box_start, box_end = int(entry["box_start"]), int(entry["box_end"])
        if box_start < cursor:  # overlapping matches would duplicate text; keep the first
            continue
        pieces.append(swap_left_right(text[cursor:box_start]))
        x1, y1, x2, y2 = (float(v) for v in entry["box"])
        pieces.append(format_box([1.0 - x2, y1, 1.0 - x1, y2]))
        cursor = box_end
    pieces.append(swap_left_right(text[cursor:]))
    return "".join(pieces)
