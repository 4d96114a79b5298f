"""Caption text formats: how boxes and grounding are written inside caption text.

Three forms, each with its parser and writer:

SA-Pancap inline boxes. Ground-truth panoptic captions are free prose, sometimes markdown
bullets, with boxes written inline as ``[[x1, y1, x2, y2]]`` normalised to [0, 1] of the image
width and height (:func:`parse_pancap_boxes`, :func:`format_box`, :func:`rewrite_pancap_boxes`;
:func:`check_pancap_boxes` removes the boxes that are not valid).

Model-side grid boxes. ASMv2 / PancapChain text writes ``tag <box>[[x1, y1, x2, y2]]</box>``
with integers on a 0-1000 grid of the image padded to a square (:func:`parse_tagged_boxes`,
:func:`find_grid_boxes`, :func:`format_grid_box`; conversions :func:`pixel_box_to_grid`,
:func:`normalized_box_to_grid`, :func:`grid_box_to_pixel`, :func:`grid_box_to_normalized`,
and whole texts :func:`grid_text_to_pancap` / :func:`pancap_text_to_grid`).

Box grid. A model-side box is four integers on a ``grid`` x ``grid`` canvas (``grid`` = 1000)
that holds the image padded to a square. What the public code and text say:

* PancapChain's paper: boxes are "normalized to integer values within [0, 1000)", following
  ASMv2; its inference script feeds images through LLaVA's ``process_images`` with the
  ASMv2 checkpoint's ``image_aspect_ratio = "pad"``.
* ASMv2 / LLaVA ``"pad"``: ``expand2square`` pastes the image in the middle of a square of
  side ``max(W, H)``, i.e. the padding is split between both ends of the short axis (the
  paste offset is ``(side - short) // 2``); ASMv2's grounding evaluation maps a predicted box
  back by ``v / scale * max(W, H)`` and subtracting that offset from the short axis.

So pix2cap uses centred padding and the 0-1000 grid: with ``side = max(W, H)``,
``pad_x = (side - W) / 2``, ``pad_y = (side - H) / 2``, a pixel coordinate ``x`` maps to
``round((x + pad_x) / side * 1000)`` clamped to ``[0, 999]`` (the paper's half-open range), and
back with :func:`grid_box_to_normalized`. The offset is kept fractional (``/ 2``, not
``// 2``) so both directions are exact inverses up to the grid quantisation; the half pixel
that separates it from ``expand2square``'s integer paste offset is below one grid step for any
image side above 500 pixels. Grid -> normalised -> grid is exact for boxes inside the image;
normalised -> grid -> normalised is exact on the long axis (3 decimals) and within half a grid
step on the short axis, except that a coordinate of exactly 1.0 on the long axis comes back
as 0.999 (the grid stops at 999).

Grounded generation markup. A model that writes a grounded caption writes each grounded phrase
as ``<p> phrase </p> [SEG]`` (PanCaper, GLaMM); each SEG's hidden state becomes the phrase's
mask. :func:`grounded_to_markup` turns a parsed COCONut caption into that target (with the
segments of each SEG) and :func:`markup_to_grounded` reads generated markup back into plain
text, ``<ids:phrase>`` text and phrases; :func:`truncate_markup` cuts a long target at a
sentence boundary, never inside a phrase.

COCONut-PanCap grounding tags. A grounded caption is prose with inline tags linking a phrase
to panoptic segments::

    ... the region represents <0:a serving of French fries>. The upper left side shows
    <1: a slice of onion>.

Tag forms accepted by :func:`parse_grounded_caption` (real files mix them; pix2cap writes the
first, with :func:`format_grounding_tag`):

* ``<ids:phrase>`` -- ``ids`` one or more integers separated by commas, spaces allowed anywhere
  around ids, commas and the colon (``<6,7,8:eight boys>``, ``< 2 , 3 :x>``); the phrase is
  stripped of surrounding spaces.
* ``<ids>phrase>`` -- no colon; in the real files this form always counts from 0 over
  ``segments_info`` (about 4% of the captions).
* Anything else that looks like a tag -- an unclosed ``<``, a stray ``>``, ``<3:>`` with no
  phrase, ``<a:b>`` with non-numeric ids -- is ordinary text and kept as written.

Which number a colon tag's id means (its *convention*) is decided per tag, given the image's
segment ids in ``segments_info`` order, so that one stray id never moves the other tags of the
caption onto other segments:

1. ``"segment_id"`` when every id of the tag is a segment id of the PNG (an id 0 never is, as
   0 is VOID);
2. else a position in ``segments_info``: ``"index0"`` (every id in ``[0, n)``) or
   ``"index1"`` (every id in ``[1, n]``). Where both fit, the caption decides: the one that
   resolves more ids of the caption's tags that are not all segment ids (``index0`` on a tie);
3. else, when no convention explains every id of the tag, the one resolving the most of them
   (ties in the order above); the ids it cannot resolve are dropped and counted as unresolved.

A caption whose colon tags were resolved under different conventions is flagged
(``mixed_id_conventions``; the COCONut loader names each such image in a warning): the reading
is a guess there. In particular a caption written with 0-based indices whose ids are also
segment ids of the image (segment ids 1..n) cannot be told from a segment-id caption with one
stray index, and is read the second way.

``<ids>phrase>`` tags always use ``"index0"``. A caption's ``convention`` is the one all its
resolved tags used, ``"mixed"`` if they used different ones (colon and no-colon tags, or colon
tags among themselves), ``"none"`` without tags, and ``"unresolved"`` when no segment ids were
given (colon ids are then taken as segment ids unchecked, no-colon tags stay ungrounded). A
tag none of whose ids resolves keeps its phrase in the text and in ``phrases``, with
``segment_ids == []``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "GRID",
    "CONVENTIONS",
    "parse_pancap_boxes",
    "format_box",
    "rewrite_pancap_boxes",
    "BOX_TOLERANCE",
    "BOX_PROBLEMS",
    "check_pancap_boxes",
    "parse_tagged_boxes",
    "pixel_box_to_grid",
    "normalized_box_to_grid",
    "grid_box_to_pixel",
    "grid_box_to_normalized",
    "format_grid_box",
    "find_grid_boxes",
    "grid_text_to_pancap",
    "pancap_text_to_grid",
    "parse_grounded_caption",
    "format_grounding_tag",
    "PHRASE_OPEN",
    "PHRASE_CLOSE",
    "SEG_TOKEN",
    "STUFF_SEG_TOKEN",
    "grounded_to_markup",
    "markup_sentence_openers",
    "markup_to_grounded",
    "split_markup",
    "truncate_markup",
]

#: Side of the model-side box grid: coordinates are integers in ``[0, GRID)``.
GRID = 1000

# ---------------------------------------------------------------------------------------------
# SA-Pancap inline boxes
# ---------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_VALID_BOX_RE = re.compile(
    r"\[\[\s*("
    + _NUMBER
    + r")\s*,\s*("
    + _NUMBER
    + r")\s*,\s*("
    + _NUMBER
    + r")\s*,\s*("
    + _NUMBER
    + r")\s*\]\]"
)
# Any double-bracket group, well-formed or not: malformed ones are skipped but still end the
# phrase before them, so a later box never swallows a broken one into its phrase.
_BRACKET_GROUP_RE = re.compile(r"\[\[[^\[\]]*\]\]")
# Where a phrase starts: after a sentence end (not a decimal point), a newline, a comma,
# semicolon or colon.
_PHRASE_DELIMITER_RE = re.compile(r"[.!?](?=\s|$)|[\n,;:]")
# Markdown list markers and emphasis at the start of a phrase: "- ", "* ", "1. ", "**".
_LEADING_MARKUP_RE = re.compile(r"(?:\s*(?:[-*+\u2022]|\d+[.)])\s+)?[\s*_\"'(\[]*")
_TRAILING_MARKUP_RE = re.compile(r"[\s*_\"'(\[]*$")


def _phrase_span(text: str, lo: int, hi: int) -> tuple[int, int]:
    """Span of the phrase that ends right before ``hi`` and starts after the last delimiter
    in ``text[lo:hi]``, with list markers, emphasis, quotes and spaces trimmed."""
    start = lo
    for m in _PHRASE_DELIMITER_RE.finditer(text, lo, hi):
        start = m.end()
    lead = _LEADING_MARKUP_RE.match(text, start, hi)
    start = lead.end() if lead else start
    trail = _TRAILING_MARKUP_RE.search(text[start:hi])
    end = start + trail.start() if trail else hi
    return start, max(start, end)


def parse_pancap_boxes(text: str) -> list[dict]:
    """Every ``[[x1, y1, x2, y2]]`` box of an SA-Pancap caption, with the phrase it follows.

    The phrase is the text between the previous delimiter -- a sentence end, a newline, a
    markdown bullet, a comma, semicolon or colon, or the previous box -- and the box, e.g.
    ``"The woman [[0.307, 0.213, 0.743, 0.886]] is ..."`` gives ``"The woman"``. Numbers may be
    ints or floats with any spacing; a malformed bracket group (wrong count, non-numbers) is
    skipped.

    Returns:
        ``[{"phrase", "box", "start", "end", "box_start", "box_end"}]`` in text order: ``box``
        four floats as written; ``text[start:end] == phrase`` (may be empty) and
        ``text[box_start:box_end]`` is the bracket group.
    """
    results: list[dict] = []
    previous_end = 0
    for group in _BRACKET_GROUP_RE.finditer(text):
        valid = _VALID_BOX_RE.fullmatch(group.group(0))
        if valid is not None:
            start, end = _phrase_span(text, previous_end, group.start())
            results.append(
                {
                    "phrase": text[start:end],
                    "box": [float(v) for v in valid.groups()],
                    "start": start,
                    "end": end,
                    "box_start": group.start(),
                    "box_end": group.end(),
                }
            )
        previous_end = group.end()
    return results


def format_box(box: Sequence[float]) -> str:
    """``[x1, y1, x2, y2]`` in SA-Pancap's written form: ``"[[0.102, 0.200, 0.398, 0.502]]"``."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers, got {len(box)}: {box!r}")
    return "[[" + ", ".join(f"{float(v):.3f}" for v in box) + "]]"


def rewrite_pancap_boxes(text: str, transform: Callable[[list[float]], Sequence[float]]) -> str:
    """``text`` with every valid ``[[x1, y1, x2, y2]]`` box replaced by
    ``format_box(transform(box))`` (e.g. mirrored for a horizontal flip); the rest unchanged."""
    pieces: list[str] = []
    cursor = 0
    for item in parse_pancap_boxes(text):
        pieces.append(text[cursor : item["box_start"]])
        pieces.append(format_box(transform(list(item["box"]))))
        cursor = item["box_end"]
    pieces.append(text[cursor:])
    return "".join(pieces)


#: How far outside [0, 1] a normalised coordinate may be and still be kept (clamped): rounding
#: in the files puts some edges a hair past the image border.
BOX_TOLERANCE = 1e-3
#: Why :func:`check_pancap_boxes` rejects a ``[[...]]`` group, and what each reason means.
BOX_PROBLEMS = {
    "malformed": "not four numbers",
    "non_finite": "a coordinate is NaN or infinite",
    "out_of_range": "a coordinate is outside [0, 1]",
    "inverted": "x1 > x2 or y1 > y2",
}
_NON_FINITE_TOKEN_RE = re.compile(r"[-+]?(nan|inf|infinity)", re.IGNORECASE)
_NUMBER_RE = re.compile(_NUMBER)


def _box_values(literal: str) -> list[float] | None:
    """The four numbers of a ``[[...]]`` literal (NaN and infinity included), or None."""
    tokens = [t.strip() for t in literal[2:-2].split(",")]
    if len(tokens) != 4:
        return None
    if not all(_NUMBER_RE.fullmatch(t) or _NON_FINITE_TOKEN_RE.fullmatch(t) for t in tokens):
        return None
    return [float(t) for t in tokens]


def check_pancap_boxes(
    text: str, tolerance: float = BOX_TOLERANCE
) -> tuple[str, list[dict]]:
    """Validate every ``[[...]]`` group of an SA-Pancap caption; drop the bad ones.

    A box is kept when its four coordinates are finite, inside ``[0, 1]`` up to ``tolerance``
    (a coordinate within it is clamped to ``[0, 1]`` and the box rewritten with
    :func:`format_box`), and ordered (``x1 <= x2``, ``y1 <= y2``). Any other group is removed
    from the text together with the spaces before it, so the phrase it followed stays and the
    text never carries a box that :func:`parse_pancap_boxes` would return invalid (the text
    and its parsed boxes agree, and a box that is mirrored, rescaled or put on the 0-1000 grid
    downstream is a real one).

    Returns:
        ``(text, issues)``: the cleaned text, and one ``{"literal", "reason"}`` per group that
        was changed, in text order; ``reason`` is ``"clamped"`` for a box kept after clamping,
        else a key of :data:`BOX_PROBLEMS` (the group was removed).
    """
    pieces: list[str] = []
    issues: list[dict] = []
    cursor = 0
    for group in _BRACKET_GROUP_RE.finditer(text):
        literal = group.group(0)
        values = _box_values(literal)
        replacement = literal
        if values is None:
            reason = "malformed"
        elif not all(math.isfinite(v) for v in values):
            reason = "non_finite"
        elif any(v < -tolerance or v > 1.0 + tolerance for v in values):
            reason = "out_of_range"
        else:
            clamped = [min(1.0, max(0.0, v)) for v in values]
            x1, y1, x2, y2 = clamped
            if x1 > x2 or y1 > y2:
                reason = "inverted"
            elif clamped != values:
                reason = "clamped"
                replacement = format_box(clamped)
            else:
                continue
        issues.append({"literal": literal, "reason": reason})
        before = text[cursor : group.start()]
        if reason != "clamped":
            before = before.rstrip(" \t")  # the space that separated the box from its phrase
            replacement = ""
        pieces.append(before)
        pieces.append(replacement)
        cursor = group.end()
    pieces.append(text[cursor:])
    return "".join(pieces), issues


# ---------------------------------------------------------------------------------------------
# Model-side 0-1000 grid
# ---------------------------------------------------------------------------------------------

_TAGGED_BOX_RE = re.compile(r"<box>\s*(\[\[[^\[\]]*\]\])\s*</box>")
_TAG_DELIMITER_RE = re.compile(r"</box>|[\n,;]")


def _number(token: str) -> int | float:
    value = float(token)
    return int(value) if re.fullmatch(r"[-+]?\d+", token.strip()) else value


def parse_tagged_boxes(text: str) -> list[dict]:
    """Every ``tag <box>[[x1, y1, x2, y2]]</box>`` item of model-side (PancapChain) text.

    The tag is the text between the previous item (or a comma, semicolon, newline, or the
    start) and ``<box>``; it is ``""`` for stage-1 output (``<box>[[...]]</box>, ...``).
    Malformed boxes are skipped.

    Returns:
        ``[{"tag", "box", "start", "end"}]``: ``box`` the four numbers as written (ints on the
        0-1000 grid stay ints), ``text[start:end] == tag``.
    """
    results: list[dict] = []
    previous_end = 0
    for m in _TAGGED_BOX_RE.finditer(text):
        valid = _VALID_BOX_RE.fullmatch(m.group(1))
        if valid is not None:
            start = previous_end
            for d in _TAG_DELIMITER_RE.finditer(text, previous_end, m.start()):
                start = d.end()
            segment = text[start : m.start()]
            stripped = segment.strip()
            start += len(segment) - len(segment.lstrip())
            results.append(
                {
                    "tag": stripped,
                    "box": [_number(v) for v in valid.groups()],
                    "start": start,
                    "end": start + len(stripped),
                }
            )
        previous_end = m.end()
    return results


def _check_size(width: int, height: int) -> None:
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


def _check_box(box: Sequence[float]) -> list[float]:
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers (x1, y1, x2, y2), got {len(box)}: {box!r}")
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box has a non-finite coordinate: {box!r}")
    return values


def _round_half_up(value: float) -> int:
    # Python's round() goes to the even neighbour; the grid wants the plain nearest integer.
    return int(math.floor(value + 0.5))


def pixel_box_to_grid(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[int]:
    """``[x1, y1, x2, y2]`` in pixels of a ``width`` x ``height`` image -> integers on the
    ``grid`` of the image padded (centred) to a square, clamped to ``[0, grid - 1]``."""
    _check_size(width, height)
    x1, y1, x2, y2 = _check_box(box)
    side = max(width, height)
    pad_x = (side - width) / 2
    pad_y = (side - height) / 2
    out = [
        (x1 + pad_x) / side,
        (y1 + pad_y) / side,
        (x2 + pad_x) / side,
        (y2 + pad_y) / side,
    ]
    return [min(grid - 1, max(0, _round_half_up(v * grid))) for v in out]


def normalized_box_to_grid(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[int]:
    """SA-Pancap form (``[0, 1]`` of width and height) -> the model-side grid; the inverse of
    :func:`grid_box_to_normalized` up to the grid quantisation."""
    x1, y1, x2, y2 = _check_box(box)
    pixel_box = [x1 * width, y1 * height, x2 * width, y2 * height]
    return pixel_box_to_grid(pixel_box, width, height, grid)


def grid_box_to_pixel(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[float]:
    """Model-side grid box -> ``[x1, y1, x2, y2]`` in pixels, clamped to the image."""
    _check_size(width, height)
    side = max(width, height)
    pad_x = (side - width) / 2
    pad_y = (side - height) / 2
    x1, y1, x2, y2 = (v * side / grid for v in _check_box(box))
    return [
        min(float(width), max(0.0, x1 - pad_x)),
        min(float(height), max(0.0, y1 - pad_y)),
        min(float(width), max(0.0, x2 - pad_x)),
        min(float(height), max(0.0, y2 - pad_y)),
    ]


def format_grid_box(box: Sequence[int]) -> str:
    """``<box>[[x1, y1, x2, y2]]</box>`` with integer coordinates."""
    values = _check_box(box)
    return "<box>[[" + ", ".join(str(int(round(v))) for v in values) + "]]</box>"


def grid_box_to_normalized(
    box: Sequence[float], width: int, height: int, grid: int = GRID
) -> list[float]:
    """A model-side box on a ``grid`` x ``grid`` canvas of the image padded to a square ->
    ``[x1, y1, x2, y2]`` normalised to [0, 1] of the unpadded image, rounded to 3 decimals.

    The padding is split equally on both sides of the short axis (as ASMv2 pads).
    """
    side = max(width, height)
    scale = side / grid
    pad_x = (side - width) / 2
    pad_y = (side - height) / 2
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    out = [(x1 - pad_x) / width, (y1 - pad_y) / height, (x2 - pad_x) / width, (y2 - pad_y) / height]
    return [round(min(1.0, max(0.0, v)), 3) for v in out]


_INT = r"[-+]?\d+"
# ``[[x1, y1, x2, y2]]`` of four integers. Any spacing: a WordPiece decode puts spaces around
# punctuation ("< box > [ [ 1, 2 ...").
_INT_BOX = (
    r"\[\s*\[\s*(" + _INT + r")\s*,\s*(" + _INT + r")\s*,\s*(" + _INT + r")\s*,\s*(" + _INT + r")\s*\]\s*\]"
)
_GRID_BOX_RE = re.compile(r"<\s*box\s*>\s*" + _INT_BOX + r"\s*<\s*/\s*box\s*>", re.IGNORECASE)
_BARE_INT_BOX_RE = re.compile(_INT_BOX)


def find_grid_boxes(text: str) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Every model-side ``<box>[[x1, y1, x2, y2]]</box>`` of ``text`` (any spacing) as
    ``(start, end, box)`` character spans, in order."""
    return [
        (m.start(), m.end(), tuple(int(v) for v in m.groups())) for m in _GRID_BOX_RE.finditer(text)
    ]


def grid_text_to_pancap(text: str, width: int, height: int, grid: int = GRID) -> str:
    """Rewrite every model-side box of ``text`` into SA-Pancap form.

    ``<box>[[x1, y1, x2, y2]]</box>`` (integers, any spacing) becomes ``[[0.123, ...]]``
    normalised to the unpadded image; a bare ``[[a, b, c, d]]`` of integers with one of them
    above 1 is read as a grid box too. Boxes already in ``[0, 1]`` form are left unchanged.
    """
    _check_size(width, height)

    def convert(match: re.Match) -> str:
        box = [int(v) for v in match.groups()]
        return format_box(grid_box_to_normalized(box, width, height, grid))

    text = _GRID_BOX_RE.sub(convert, text)

    def convert_bare(match: re.Match) -> str:
        box = [int(v) for v in match.groups()]
        if max(box) <= 1:
            return match.group(0)
        return convert(match)

    return _BARE_INT_BOX_RE.sub(convert_bare, text)


def pancap_text_to_grid(text: str, width: int, height: int, grid: int = GRID) -> str:
    """Rewrite every SA-Pancap box ``[[0.1, 0.2, 0.3, 0.4]]`` of ``text`` into the model-side
    ``<box>[[x1, y1, x2, y2]]</box>`` form (as PancapChain trains its caption stage)."""
    _check_size(width, height)
    pieces: list[str] = []
    cursor = 0
    for item in parse_pancap_boxes(text):
        pieces.append(text[cursor : item["box_start"]])
        pieces.append(format_grid_box(normalized_box_to_grid(item["box"], width, height, grid)))
        cursor = item["box_end"]
    pieces.append(text[cursor:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# COCONut-PanCap grounding tags
# ---------------------------------------------------------------------------------------------

#: Conventions for colon tags, in order of preference when several explain a caption.
CONVENTIONS = ("segment_id", "index0", "index1")

# ``<`` ids (``:`` | ``>``) phrase ``>``; the phrase has no angle brackets and is not blank.
_TAG_RE = re.compile(
    r"<\s*(?P<ids>\d+(?:\s*,\s*\d+)*)\s*(?P<sep>[:>])(?P<phrase>[^<>]*[^<>\s][^<>]*)>"
)


def _resolve(ids: Sequence[int], convention: str, segment_ids: Sequence[int]) -> list[int]:
    """The PNG segment ids ``ids`` denote under ``convention`` (unresolvable ids dropped)."""
    n = len(segment_ids)
    out: list[int] = []
    for i in ids:
        if convention == "segment_id":
            seg = i if i in segment_ids else None
        elif convention == "index0":
            seg = segment_ids[i] if 0 <= i < n else None
        else:  # index1
            seg = segment_ids[i - 1] if 1 <= i <= n else None
        if seg is not None and seg not in out:
            out.append(seg)
    return out


def _count_resolved(ids: Sequence[int], convention: str, segment_ids: Sequence[int]) -> int:
    return sum(len(_resolve([i], convention, segment_ids)) for i in ids)


def _tag_conventions(colon_ids: list[list[int]], segment_ids: Sequence[int]) -> list[str]:
    """The convention of each colon tag (see the module docstring for the rule)."""
    segment_set = set(segment_ids)
    is_segment = [bool(ids) and all(i in segment_set for i in ids) for ids in colon_ids]
    # Between the two index readings, the caption's other tags decide (index0 on a tie).
    others = [i for ids, seg in zip(colon_ids, is_segment) if not seg for i in ids]
    counts = {c: _count_resolved(others, c, segment_ids) for c in ("index0", "index1")}
    preferred = "index1" if counts["index1"] > counts["index0"] else "index0"
    order = ("segment_id", preferred, "index1" if preferred == "index0" else "index0")
    conventions = []
    for ids, seg in zip(colon_ids, is_segment):
        if seg:
            conventions.append("segment_id")
            continue
        resolved = {c: _count_resolved(ids, c, segment_ids) for c in order}
        # max() keeps the first of equal counts, i.e. the earlier convention in ``order``.
        conventions.append(max(order, key=lambda c: resolved[c]))
    return conventions


def parse_grounded_caption(raw: str, segment_ids: Sequence[int] | None = None) -> dict:
    """Parse a COCONut-PanCap caption with ``<ids:phrase>`` / ``<ids>phrase>`` tags.

    Args:
        raw: the caption as stored.
        segment_ids: the image's PNG segment ids in ``segments_info`` order; used to decide the
            id convention and to turn indices into segment ids. ``None``: ids are not checked.

    Returns:
        ``{"raw", "text", "phrases", "convention", "mixed_id_conventions", "tag_stats"}``:
        ``text`` is ``raw`` with each
        tag replaced by its phrase; ``phrases`` lists ``{"phrase", "start", "end",
        "segment_ids", "tag_ids", "convention"}`` per tag in reading order, with
        ``text[start:end] == phrase``, ``segment_ids`` the PNG ids it grounds to and
        ``tag_ids`` the numbers as written; ``mixed_id_conventions`` is True when the resolved
        colon tags used different conventions; ``tag_stats`` counts tags per convention, plus
        ``"unresolved"`` (tags with no resolvable id) and ``"unresolved_ids"``.
    Never raises on odd tags; a non-string ``raw`` raises ``TypeError``.
    """
    if not isinstance(raw, str):
        raise TypeError(f"a grounded caption must be a string, got {type(raw).__name__}")
    matches = list(_TAG_RE.finditer(raw))
    tags = []
    for m in matches:
        ids: list[int] = []
        for token in m.group("ids").split(","):
            value = int(token.strip())
            if value not in ids:
                ids.append(value)
        tags.append((m, ids, m.group("sep") == ":"))

    colon_conventions: list[str] = []
    if segment_ids is not None:
        segment_ids = [int(s) for s in segment_ids]
        colon_conventions = _tag_conventions([ids for _, ids, colon in tags if colon], segment_ids)
    next_colon = iter(colon_conventions)
    colon_used: set[str] = set()

    pieces: list[str] = []
    phrases: list[dict] = []
    stats: Counter = Counter()
    cursor = 0
    length = 0
    for m, ids, colon in tags:
        before = raw[cursor : m.start()]
        pieces.append(before)
        length += len(before)
        phrase = m.group("phrase").strip()
        if segment_ids is None:
            convention = "segment_id" if colon else "index0"
            grounded = list(ids) if colon else []
        else:
            convention = next(next_colon) if colon else "index0"
            grounded = _resolve(ids, convention, segment_ids)
            if colon and grounded:
                colon_used.add(convention)
        stats["unresolved_ids"] += len(ids) - len(grounded)
        stats[convention if grounded else "unresolved"] += 1
        phrases.append(
            {
                "phrase": phrase,
                "start": length,
                "end": length + len(phrase),
                "segment_ids": grounded,
                "tag_ids": ids,
                "convention": convention,
            }
        )
        pieces.append(phrase)
        length += len(phrase)
        cursor = m.end()
    pieces.append(raw[cursor:])

    if not tags:
        caption_convention = "none"
    elif segment_ids is None:
        caption_convention = "unresolved"
    else:
        # Unresolved tags carry a convention too, but the caption's is what resolved tags used.
        used = {p["convention"] for p in phrases if p["segment_ids"]} or {
            p["convention"] for p in phrases
        }
        caption_convention = used.pop() if len(used) == 1 else "mixed"
    return {
        "raw": raw,
        "text": "".join(pieces),
        "phrases": phrases,
        "convention": caption_convention,
        "mixed_id_conventions": len(colon_used) > 1,
        "tag_stats": {k: stats.get(k, 0) for k in (*CONVENTIONS, "unresolved", "unresolved_ids")},
    }


def format_grounding_tag(ids: Sequence[int], phrase: str) -> str:
    """``<ids:phrase>``, e.g. ``format_grounding_tag([6, 7], "two boys") == "<6,7:two boys>"``:
    the colon form that :func:`parse_grounded_caption` reads back to ``phrase`` and ``ids``.

    Raises:
        ValueError: no ids, a negative id, or a phrase that is blank or holds ``<`` / ``>``
            (it would not read back as one tag).
    """
    ids = [int(i) for i in ids]
    if not ids or min(ids) < 0:
        raise ValueError(f"a grounding tag needs one or more non-negative ids, got {ids}")
    if not phrase.strip() or "<" in phrase or ">" in phrase:
        raise ValueError(f"a grounding tag's phrase must be non-blank without '<'/'>': {phrase!r}")
    return "<" + ",".join(str(i) for i in ids) + ":" + phrase + ">"


# ---------------------------------------------------------------------------------------------
# Grounded generation markup (PanCaper / GLaMM): <p> phrase </p> [SEG]
# ---------------------------------------------------------------------------------------------
#: Markup of a grounded phrase in a generation target: ``<p> phrase </p> [SEG]``; a head may
#: tell stuff phrases apart with their own SEG kind.
PHRASE_OPEN, PHRASE_CLOSE = "<p>", "</p>"
SEG_TOKEN, STUFF_SEG_TOKEN = "[SEG]", "[SEG_STUFF]"
_MARKUP_RE = re.compile(r"(<p>|</p>|\[SEG\]|\[SEG_STUFF\])")
_ATTACHED_PUNCTUATION = set(".,;:!?)")


def split_markup(markup: str) -> list[str]:
    """``markup`` as its markup tokens and the stripped, non-empty texts between them."""
    return [piece.strip() for piece in _MARKUP_RE.split(markup) if piece.strip()]


def grounded_to_markup(
    grounded: dict, seg_token: Callable[[list[int]], str] | None = None
) -> tuple[str, list[list[int]]]:
    """A grounded caption -> its generation target and the segments of each SEG.

    Args:
        grounded: :func:`parse_grounded_caption`'s dict (``text`` and ``phrases`` with
            ``start``, ``end``, ``segment_ids``).
        seg_token: the SEG token of a phrase's segment ids (e.g. :data:`STUFF_SEG_TOKEN` for
            stuff); None: :data:`SEG_TOKEN` for all.

    Returns:
        the text with each phrase that has segments written ``<p> phrase </p> [SEG]`` (a
        phrase without segments stays plain text: there is no mask to learn), and the segment
        ids of each SEG in order.
    """
    text = grounded["text"]
    pieces: list[str] = []
    targets: list[list[int]] = []
    cursor = 0
    for phrase in sorted(grounded.get("phrases", []), key=lambda p: p["start"]):
        ids = [int(i) for i in phrase.get("segment_ids", [])]
        start, end = int(phrase["start"]), int(phrase["end"])
        if not ids or start < cursor:
            continue  # ungrounded, or overlapping an earlier phrase
        token = seg_token(ids) if seg_token is not None else SEG_TOKEN
        pieces.append(text[cursor:start])
        pieces.append(f"{PHRASE_OPEN} {text[start:end]} {PHRASE_CLOSE} {token}")
        targets.append(ids)
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces), targets


def markup_to_grounded(
    markup: str, seg_segment_ids: Sequence[Sequence[int]] | None = None
) -> dict:
    """Generated markup -> plain text, ``<ids:phrase>`` text and phrases (GLaMM's reading).

    The plain text is the markup with every ``<p>``, ``</p>`` and SEG token removed and
    whitespace collapsed (no space before ``.,;:!?)``). The phrases are the ``<p>...</p>``
    spans in order; the i-th SEG token after a phrase gives it ``seg_segment_ids[i]`` (the
    segments the i-th SEG's mask was tied to). A phrase not followed by a SEG before the next
    ``<p>``, an unclosed ``<p>``, a stray ``</p>`` and an empty phrase carry no segments.

    Returns:
        ``{"text", "tagged", "phrases": [{"phrase", "start", "end", "segment_ids",
        "seg_index"}]}``; ``seg_index`` is the SEG's position (None without one). Phrases
        with segments are tagged ``<ids:phrase>``, the others written plainly.
    """
    seg_segment_ids = list(seg_segment_ids or [])
    plain: list[str] = []  # the words, each with its leading space
    length = 0
    phrases: list[dict] = []
    open_start: int | None = None  # set while a <p> is open: the phrase's start offset
    open_words: list[str] = []
    awaiting_seg: dict | None = None  # the last closed phrase, until a SEG or a new <p>
    seg_count = 0
    for piece in _MARKUP_RE.split(markup):
        if piece == PHRASE_OPEN:  # a <p> inside an open phrase drops the open one
            awaiting_seg, open_start, open_words = None, length + (1 if plain else 0), []
        elif piece == PHRASE_CLOSE:
            if open_start is not None and open_words:  # a stray or empty one is dropped
                awaiting_seg = {
                    "phrase": " ".join(open_words),
                    "start": open_start,
                    "end": length,
                    "segment_ids": [],
                    "seg_index": None,
                }
                phrases.append(awaiting_seg)
            open_start, open_words = None, []
        elif piece in (SEG_TOKEN, STUFF_SEG_TOKEN):
            if awaiting_seg is not None:
                awaiting_seg["seg_index"] = seg_count
                if seg_count < len(seg_segment_ids):
                    awaiting_seg["segment_ids"] = [int(i) for i in seg_segment_ids[seg_count]]
            seg_count += 1
            awaiting_seg = None
        else:
            for word in piece.split():
                # Outside a phrase, closing punctuation attaches to the word before it.
                attach = open_start is None and word[0] in _ATTACHED_PUNCTUATION
                if plain and not attach:
                    word = " " + word
                plain.append(word)
                length += len(word)
                if open_start is not None:
                    open_words.append(word.strip())
    text = "".join(plain)
    # The tagged form is the plain text with each grounded phrase's span written as a tag.
    tagged, cursor = [], 0
    for phrase in phrases:
        if phrase["segment_ids"]:
            tag = format_grounding_tag(phrase["segment_ids"], phrase["phrase"])
            tagged += [text[cursor : phrase["start"]], tag]
            cursor = phrase["end"]
    tagged.append(text[cursor:])
    return {"text": text, "tagged": "".join(tagged), "phrases": phrases}


def markup_sentence_openers(markup: str) -> list[bool]:
    """For each SEG token of ``markup``, in order: whether its phrase opens a sentence (no
    text before it, or the text before it ends in ``.``, ``!`` or ``?``)."""
    openers: list[bool] = []
    previous = ""  # the last piece of text or markup before the current one
    opener = False
    for piece in split_markup(markup):
        if piece == PHRASE_OPEN:
            opener = previous == "" or previous[-1] in ".!?"
        elif piece in (SEG_TOKEN, STUFF_SEG_TOKEN):
            openers.append(opener)
            opener = False
        previous = piece if piece not in (SEG_TOKEN, STUFF_SEG_TOKEN, PHRASE_CLOSE) else previous
    return openers


_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)")


def truncate_markup(
    markup: str,
    seg_segment_ids: Sequence[Sequence[int]],
    count_tokens: Callable[[str], int],
    max_tokens: int,
) -> tuple[str, list[list[int]]]:
    """Cut a generation target to at most ``max_tokens`` tokens, never inside a phrase.

    The cut falls after the last whole sentence that fits (a ``.``, ``!`` or ``?`` outside
    ``<p>...</p>`` followed by a space or the end); when not even the first sentence fits, after
    the last whole word or whole ``<p> ... </p> SEG`` unit of it that does.

    Args:
        markup, seg_segment_ids: a target and its SEGs' segments (:func:`grounded_to_markup`).
        count_tokens: the tokenizer's length of a text (special tokens it adds included).
        max_tokens: the budget.

    Returns:
        the kept markup and the segments of the SEGs it keeps.
    """
    if count_tokens(markup) <= max_tokens:
        return markup, [list(ids) for ids in seg_segment_ids]
    units = _markup_units(markup)  # (text, ends_sentence) pieces that must stay whole
    prefixes = list(itertools.accumulate(text for text, _ in units))
    # Token counts grow with the prefix: bisect for the most units that fit (log n calls of
    # the tokenizer, not one per unit).
    fit = bisect.bisect_right(
        range(len(prefixes)), max_tokens, key=lambda k: count_tokens(prefixes[k].strip())
    )
    ends = [k for k in range(fit) if units[k][1]]
    last = ends[-1] if ends else fit - 1
    cut = prefixes[last].strip() if last >= 0 else ""
    segs = len(re.findall(r"\[SEG\]|\[SEG_STUFF\]", cut))
    return cut, [list(ids) for ids in seg_segment_ids[:segs]]


def _markup_units(markup: str) -> list[tuple[str, bool]]:
    """The markup as whole words and whole phrase units (``<p> ... </p>`` with the SEG token
    after it), each with its leading space and whether a sentence ends with it."""
    units: list[tuple[str, bool]] = []
    pattern = re.compile(r"\s*(<p>.*?</p>\s*(?:\[SEG\]|\[SEG_STUFF\])?|\S+)", re.S)
    for match in pattern.finditer(markup):
        text = match.group(0)
        is_phrase = match.group(1).startswith(PHRASE_OPEN)
        ends = not is_phrase and bool(_SENTENCE_END_RE.search(match.group(1)[-1:]))
        units.append((text, ends))
    return units
