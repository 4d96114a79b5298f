"""Draw a panoptic segmentation-captioning result (or ground truth) as one RGB picture.

The picture is the image with every segment filled with a translucent colour and outlined,
a small number on each segment, and a caption panel to the right of the image listing, per
number, ``N. <class> (score): <caption>`` next to the same colour swatch::

    +--------------------------+---------------------------------+
    |   image, segments tinted | 3 segments                      |
    |   and outlined, with     | [] 1. circle (0.97): a small    |
    |   numbers 1, 2, 3 on     |    red circle on the grass      |
    |   the segments           | [] 2. sky (0.91): light blue... |
    +--------------------------+---------------------------------+

The canvas is ``[max(H, panel height), W + panel_width, 3]``: a long caption list makes the
canvas taller (the image is padded below) instead of being clipped, up to a bound: a caption
longer than ``max_caption_chars`` (1000) is cut at a word with ``...``, and the panel (and the
grounded-caption band) stop at ``max_height`` (2000 px, or the image height if taller), the
panel with a ``+ N more segments not shown`` note. Wrapping measures each word once, so its
cost grows linearly with the text.

Given the image's grounded caption (``{"text", "phrases"}``, COCONut-PanCap's PGC form),
``draw_panoptic_result`` also draws its text in a band under the image, wrapped to the image
width, each grounded phrase in the colour of its segment (``draw_grounded_caption``); the
canvas is then ``[max(H + band height, panel height), W + panel_width, 3]``.

The drawing works on a :class:`pix2cap.structures.PanopticResult` (``draw_panoptic_result``),
so class names and thing/stuff come from the dataset's ``Metadata`` only;
``draw_panoptic_seg(panoptic_seg, segments_info)`` takes detectron2's form and builds one.
A dataset dict's ground truth is read by ``pix2cap.data.detection_utils.read_panoptic_result``.

Colours: a segment takes its class colour from the metadata (``thing_colors`` for things,
``stuff_colors`` for every class, both indexed by contiguous id), or a fixed palette colour
when the metadata has none. Things are jittered per instance (seeded by the segment id, so a
picture is reproducible) so that two touching instances of one class still look different.

Text uses PIL's built-in font (``ImageFont.load_default(size=...)``, scalable since Pillow
10.1); nothing is downloaded.
"""

from __future__ import annotations

import colorsys
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pix2cap.structures.panoptic import PanopticResult, Segment
from pix2cap.utils.file_io import atomic_open

__all__ = [
    "Visualizer",
    "truncate_text",
    "wrap_text",
    "SegmentStyle",
    "segment_colors",
    "draw_panoptic_seg",
    "draw_panoptic_result",
    "save_rgb_png",
]

PANEL_BACKGROUND = (250, 250, 250)
PANEL_TEXT = (20, 20, 20)
# Area below a short image when the caption panel is taller than the image.
IMAGE_PAD = (250, 250, 250)
# How far (0-255, per channel) a thing's colour may move from its class colour.
THING_JITTER = 48
#: Default bounds of what is drawn: characters of one caption, pixels of canvas height.
MAX_CAPTION_CHARS = 1000
MAX_HEIGHT = 2000
# Marks cut text; ASCII, as the built-in font may lack U+2026.
ELLIPSIS = "..."
# Line widths are summed word by word; kerning at the joins can move the true width by a
# fraction of a pixel per join, so a sum within this fraction of the limit is measured exactly.
_EXACT_BAND = 0.15


def _check_metadata(metadata: Any) -> Any:
    """``metadata`` must answer class names and thing/stuff itself (``pix2cap.data.Metadata``),
    so those rules live in one place; a plain dict is refused rather than half-read."""
    if metadata is not None and not (
        hasattr(metadata, "class_name") and hasattr(metadata, "is_thing")
    ):
        raise TypeError(
            f"metadata must be a pix2cap.data.Metadata (wrap a dict as Metadata(name, **d)) "
            f"or None, got {type(metadata).__name__}"
        )
    return metadata


def _palette_color(index: int) -> tuple[int, int, int]:
    """A saturated colour for class ``index`` when the metadata has none; golden-ratio hue
    steps keep consecutive classes far apart on the colour wheel."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _class_color(category_id: int, isthing: bool, metadata: Any) -> tuple[int, int, int]:
    """Class colour from ``thing_colors`` (things) or ``stuff_colors`` (all classes)."""
    tables = (["thing_colors"] if isthing else []) + ["stuff_colors"]
    for key in tables:
        colors = None if metadata is None else metadata.get(key)
        if colors is not None and 0 <= category_id < len(colors):
            color = colors[category_id]
            return tuple(int(c) for c in color[:3])  # type: ignore[return-value]
    return _palette_color(category_id)


def segment_colors(
    segments: Iterable[Segment], metadata: Any = None
) -> dict[int, tuple[int, int, int]]:
    """The RGB colour of every segment, as the visualizer draws it.

    Args:
        segments: :class:`~pix2cap.structures.Segment` s (or a ``PanopticResult``).
        metadata: dataset ``Metadata`` (``thing_colors`` / ``stuff_colors``) or ``None``.
    Returns:
        ``{segment id: (r, g, b)}``; stuff keeps its class colour, a thing gets its class
        colour jittered by up to ``THING_JITTER`` per channel, seeded by its segment id.
    """
    colors: dict[int, tuple[int, int, int]] = {}
    for segment in segments:
        base = np.array(
            _class_color(segment.category_id, segment.isthing, metadata), dtype=np.int64
        )
        if segment.isthing:
            rng = np.random.default_rng(segment.id)
            base = base + rng.integers(-THING_JITTER, THING_JITTER + 1, size=3)
        colors[segment.id] = tuple(int(c) for c in np.clip(base, 0, 255))  # type: ignore[assignment]
    return colors


@dataclass
class SegmentStyle:
    """How one segment is drawn and listed."""

    number: int  # the label drawn on the segment and in the panel (1-based)
    segment_id: int
    color: tuple[int, int, int]
    text: str  # "N. class (score): caption"


def _load_font(size: int) -> ImageFont.ImageFont:
    """PIL's built-in font at ``size`` px; the fixed-size bitmap font on old Pillow or when
    FreeType is missing (still legible, just not scalable)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont, text: str) -> float:
    return float(font.getlength(text))


def _fit_prefix(
    text: str, start: int, end: int, font: ImageFont.ImageFont, max_width: float
) -> int:
    """How many characters of ``text[start:end]`` fit in ``max_width`` (at least 1).

    Galloping (1, 2, 4, ... characters) and then bisection: the measured strings are never
    much longer than what fits, so the cost follows the line, not the rest of the text.
    """
    n = end - start
    fits, probe = 1, 2
    while probe <= n and _text_width(font, text[start : start + probe]) <= max_width:
        fits, probe = probe, probe * 2
    hi = n if probe > n else probe - 1
    while fits < hi:
        mid = (fits + hi + 1) // 2
        if _text_width(font, text[start : start + mid]) <= max_width:
            fits = mid
        else:
            hi = mid - 1
    return fits


def _wrap_spans(
    text: str, font: ImageFont.ImageFont, max_width: float, max_lines: Optional[int] = None
) -> list[list[tuple[int, int]]]:
    """:func:`wrap_text`'s lines as ``(start, end)`` character spans of ``text``: a line's
    words (or the pieces of a word cut to fit), shown joined by single spaces.

    Each word is measured once and a line's width kept as a running sum (the whole line is
    measured only when the sum comes near the limit), so the cost is linear in ``len(text)``.
    With ``max_lines``, wrapping stops after ``max_lines + 1`` lines (one more than asked, so
    the caller sees that the text goes on): the cost then follows what is drawn.
    """
    max_width = max(float(max_width), 1.0)
    band = max(2.0, _EXACT_BAND * max_width)
    space = _text_width(font, " ")
    lines: list[list[tuple[int, int]]] = []
    offset = 0
    for paragraph in text.split("\n"):
        current: list[tuple[int, int]] = []
        current_width = 0.0
        for word in re.finditer(r"\S+", paragraph):
            start, end = offset + word.start(), offset + word.end()
            # More characters than a quarter pixel each can never fit: do not measure a very
            # long run whole, only the pieces it is cut into.
            too_long = end - start > 4 * max_width
            word_width = math.inf if too_long else _text_width(font, text[start:end])
            if current:
                width = current_width + space + word_width
                if max_width - band < width <= max_width + band:
                    spans = current + [(start, end)]
                    width = _text_width(font, " ".join(text[a:b] for a, b in spans))
                if width <= max_width:
                    current.append((start, end))
                    current_width = width
                    continue
                lines.append(current)
                current = []
            # The word alone may still be too wide: cut it into pieces that fit.
            if word_width > max_width:
                while end - start > 1:
                    if max_lines is not None and len(lines) > max_lines:
                        return lines[: max_lines + 1]
                    cut = _fit_prefix(text, start, end, font, max_width)
                    if cut == end - start:
                        break
                    lines.append([(start, start + cut)])
                    start += cut
                word_width = _text_width(font, text[start:end])  # the last piece: one line
            current = [(start, end)]
            current_width = word_width
            if max_lines is not None and len(lines) > max_lines:
                return lines[: max_lines + 1]
        lines.append(current)
        if max_lines is not None and len(lines) > max_lines:
            return lines[: max_lines + 1]
        offset += len(paragraph) + 1
    return lines


def wrap_text(
    text: str, font: ImageFont.ImageFont, max_width: float, max_lines: Optional[int] = None
) -> list[str]:
    """Split ``text`` into lines no wider than ``max_width`` pixels in ``font``.

    Breaks at spaces; a word wider than a whole line (a URL, a run without spaces) is cut
    between characters so nothing runs off the panel. Existing newlines are kept; runs of
    other whitespace become one space. Linear in the length of ``text``; with ``max_lines``,
    at most ``max_lines + 1`` lines are made (the extra one says that more would follow).
    """
    return [
        " ".join(text[a:b] for a, b in line)
        for line in _wrap_spans(text, font, max_width, max_lines)
    ]


def truncate_text(text: str, max_chars: Optional[int]) -> str:
    """``text`` cut to at most ``max_chars`` characters, ``...`` included, at a space when
    one lies in the last fifth of what is kept; unchanged if short enough or ``max_chars`` is
    None."""
    return text[: _kept_length(text, max_chars)] + (
        ELLIPSIS if max_chars is not None and len(text) > max_chars else ""
    )


def _kept_length(text: str, max_chars: Optional[int]) -> int:
    """How many leading characters of ``text`` :func:`truncate_text` keeps before ``...``."""
    if max_chars is None or len(text) <= max_chars:
        return len(text)
    keep = max(0, int(max_chars) - len(ELLIPSIS))
    space = text.rfind(" ", keep * 4 // 5, keep + 1)
    if space > 0:
        keep = space
    return len(text[:keep].rstrip())


def _ellipsize(line: str, font: ImageFont.ImageFont, max_width: float) -> str:
    """``line`` with ``...`` appended, cut so that the whole still fits ``max_width``."""
    room = max_width - _text_width(font, ELLIPSIS)
    if line and _text_width(font, line) > room:
        line = line[: _fit_prefix(line, 0, len(line), font, max(room, 1.0))] if room > 0 else ""
    return line.rstrip() + ELLIPSIS


def _luminance(color: Sequence[int]) -> float:
    r, g, b = (float(c) for c in color[:3])
    return 0.299 * r + 0.587 * g + 0.114 * b


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of ``mask`` farthest from its border (distance-transform maximum), as
    ``(x, y)``: always on the segment, unlike a bbox centre for a ring or an L-shape."""
    # A zero frame makes the image border count as segment border too.
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def _phrase_color(
    phrase: Mapping[str, Any], colors: Mapping[int, Sequence[int]]
) -> Optional[tuple[int, int, int]]:
    """The colour of the first of the phrase's ``segment_ids`` that ``colors`` has, or None."""
    for segment_id in phrase.get("segment_ids") or ():
        color = colors.get(int(segment_id))
        if color is not None:
            return tuple(int(c) for c in color[:3])  # type: ignore[return-value]
    return None


def _line_characters(
    text: str, spans: Sequence[tuple[int, int]], char_color: Sequence[Any]
) -> tuple[str, list[Any]]:
    """One wrapped line as shown (its spans joined by single spaces) and each shown
    character's colour; a joining space inside one phrase takes the phrase's colour."""
    shown: list[str] = []
    colours: list[Any] = []
    for k, (start, end) in enumerate(spans):
        if k:
            before, after = char_color[spans[k - 1][1] - 1], char_color[start]
            shown.append(" ")
            colours.append(before if before == after else None)
        shown.append(text[start:end])
        colours.extend(char_color[start:end])
    return "".join(shown), colours


def _runs(values: Sequence[Any]) -> list[tuple[int, int, Any]]:
    """``(start, end, value)`` of each run of equal consecutive values."""
    runs: list[tuple[int, int, Any]] = []
    start = 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[start]:
            runs.append((start, k, values[start]))
            start = k
    return runs


class Visualizer:
    """Draws one image's panoptic segmentation with per-segment captions.

    Args:
        image: RGB uint8 ndarray [H, W, 3].
        metadata: the dataset's ``pix2cap.data.Metadata`` (class names and thing/stuff by
            contiguous id; optionally ``thing_colors``, ``stuff_colors``); ``None`` names
            classes ``class <id>``.
        scale: resize factor for the drawn image (nearest for segment ids), e.g. 2 or 4 to
            read the numbers on a tiny image.
        alpha: opacity of the segment tint (0 = image only, 1 = flat colour).
        font_size: text size in pixels; default grows with the image height.
        panel_width: caption panel width in pixels; default ``max(320, 0.6 * W)``.
        max_caption_chars: a segment's caption, or the grounded caption, longer than this is
            cut (at a word where one is near) and ends in ``...``; None draws it whole.
        max_height: the canvas is at most this many pixels tall, or the drawn image's height if
            that is more (None: no bound): panel entries past it are left out with a
            ``+ N more segments not shown`` note, the grounded-caption band is cut with
            ``...``. A caption of any length thus gives a picture of bounded size.
    """

    def __init__(
        self,
        image: np.ndarray,
        metadata: Any = None,
        *,
        scale: float = 1.0,
        alpha: float = 0.5,
        font_size: Optional[int] = None,
        panel_width: Optional[int] = None,
        max_caption_chars: Optional[int] = MAX_CAPTION_CHARS,
        max_height: Optional[int] = MAX_HEIGHT,
    ):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Visualizer needs an RGB image [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"Visualizer needs a uint8 image, got dtype {image.dtype}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.metadata = _check_metadata(metadata)
        self.scale = float(scale)
        self.alpha = float(alpha)
        self.input_hw = (int(image.shape[0]), int(image.shape[1]))
        height = max(1, int(round(image.shape[0] * self.scale)))
        width = max(1, int(round(image.shape[1] * self.scale)))
        if (height, width) != self.input_hw:
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        self.image = np.ascontiguousarray(image)
        if font_size is None:
            font_size = int(np.clip(round(height / 30), 12, 24))
        self.font_size = int(font_size)
        self.font = _load_font(self.font_size)
        if panel_width is None:
            panel_width = max(320, int(0.6 * width))
        self.panel_width = int(panel_width)
        if self.panel_width < 4 * self.font_size:
            raise ValueError(
                f"panel_width={self.panel_width} leaves no room for text at font size "
                f"{self.font_size}"
            )
        if max_caption_chars is not None and max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be >= 1 or None, got {max_caption_chars}")
        self.max_caption_chars = max_caption_chars
        # Never below the drawn image: the bound is for the text, the image is never cut.
        self.max_height = None if max_height is None else max(int(max_height), height)
        self.margin = max(6, self.font_size // 2)
        ascent, descent = (
            self.font.getmetrics() if hasattr(self.font, "getmetrics") else (self.font_size, 0)
        )
        self.line_height = int(ascent + descent + max(2, self.font_size // 5))

    # -----------------------------------------------------------------------------------------
    def draw_panoptic_seg(
        self, panoptic_seg: Any, segments_info: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """Draw detectron2's ``(panoptic_seg, segments_info)``.

        Args:
            panoptic_seg: Int [H, W] segment id per pixel (ndarray or Tensor), 0 = void; the
                size of the image given to the constructor.
            segments_info: one dict per segment: ``id``, ``category_id`` (contiguous),
                optional ``isthing``, ``score``, ``caption``, ``iscrowd``.
        Returns:
            as :meth:`draw_panoptic_result`.
        """
        if hasattr(panoptic_seg, "detach"):  # a torch Tensor, possibly on a GPU
            panoptic_seg = panoptic_seg.detach().cpu().numpy()
        self._check_size(np.asarray(panoptic_seg).shape)
        result = PanopticResult.from_panoptic(panoptic_seg, segments_info, self.metadata)
        return self.draw_panoptic_result(result)

    def draw_panoptic_result(
        self, result: PanopticResult, grounded_caption: Optional[Mapping[str, Any]] = None
    ) -> np.ndarray:
        """Draw segments and the caption panel, segments listed in ``result``'s order.

        Args:
            result: a panoptic result the size of the image given to the constructor (a
                prediction, or ground truth from ``read_panoptic_result``).
            grounded_caption: optionally the image's grounded caption, ``{"text",
                "phrases": [{"start", "end", "segment_ids", ...}]}`` (offsets into
                ``text``, ids of ``result``'s segments); drawn under the image by
                :meth:`draw_grounded_caption`, each phrase in its segment's colour.
        Returns:
            RGB uint8 ndarray [max(H' + caption band height, panel height), W' +
            panel_width, 3], where ``(H', W')`` is the image size times ``scale`` and the
            band height is 0 without a grounded caption; both heights stop at
            ``max_height`` (see the class doc).
        """
        self._check_size(result.image_size)
        seg = self._scaled_seg(result.panoptic_seg)
        colors = segment_colors(result.segments, self.metadata)
        # A segment may vanish when the map is scaled down: only what is drawn is "visible".
        present = set(np.unique(seg).tolist())
        styles = [
            SegmentStyle(
                number=i + 1,
                segment_id=s.id,
                color=colors[s.id],
                text=self._entry_text(i + 1, s, visible=s.id in present),
            )
            for i, s in enumerate(result.segments)
        ]
        canvas_image = self._draw_segments(seg, styles)
        band = None
        if grounded_caption is not None:
            band = self.draw_grounded_caption(
                str(grounded_caption.get("text") or ""),
                grounded_caption.get("phrases") or (),
                colors,
                max_height=(
                    None if self.max_height is None else self.max_height - canvas_image.height
                ),
            )
        return self._compose(canvas_image, styles, band)

    def draw_grounded_caption(
        self,
        text: str,
        phrases: Iterable[Mapping[str, Any]],
        colors: Mapping[int, Sequence[int]],
        width: Optional[int] = None,
        max_height: Optional[int] = None,
    ) -> np.ndarray:
        """A band with a grounded caption's text, wrapped to ``width``, each grounded phrase
        drawn (and underlined) in its segment's colour. The text is cut to
        ``max_caption_chars``; lines past ``max_height`` are left out, the last one shown
        ending in ``...``.

        Args:
            text: the caption's plain text.
            phrases: ``{"start", "end", "segment_ids"}`` each: the characters
                ``text[start:end]`` take the colour of the first of ``segment_ids`` that
                ``colors`` has; a phrase without one, and the text outside phrases, are
                drawn in the panel's text colour. A span outside ``text`` is clipped; where
                phrases overlap, the earlier one wins.
            colors: ``{segment id: (r, g, b)}``, as :func:`segment_colors` gives (the colours
                :meth:`draw_panoptic_result` fills the segments with).
            width: band width in pixels; default the drawn image's width.
            max_height: band height bound in pixels (at least two lines are kept); None:
                only the length of the text bounds it.
        Returns:
            RGB uint8 ndarray [band height, width, 3] on the panel background, a rule on top.
        """
        font = self.font
        width = int(self.image.shape[1] if width is None else width)
        margin, line_height = self.margin, self.line_height
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (self.font_size, 0)
        underline = max(1, self.font_size // 12)

        # Per character of ``text``: the colour of the phrase it belongs to, or None; the
        # "..." of a cut text takes none.
        kept = _kept_length(text, self.max_caption_chars)
        cut = kept < len(text)
        char_color: list[Optional[tuple[int, int, int]]] = [None] * kept
        for phrase in phrases:
            color = _phrase_color(phrase, colors)
            start = max(0, int(phrase.get("start", 0)))
            end = min(kept, int(phrase.get("end", 0)))
            for k in range(start, end):
                if char_color[k] is None:
                    char_color[k] = color
        text = text[:kept] + (ELLIPSIS if cut else "")
        char_color += [None] * (len(text) - kept)

        max_lines = None
        if max_height is not None:
            max_lines = max(2, (int(max_height) - 2 * margin) // line_height)
        lines = _wrap_spans(text, font, width - 2 * margin, max_lines)
        more = max_lines is not None and len(lines) > max_lines
        lines = lines[:max_lines]
        height = 2 * margin + len(lines) * line_height
        band = Image.new("RGB", (width, height), PANEL_BACKGROUND)
        draw = ImageDraw.Draw(band)
        draw.line((0, 0, width - 1, 0), fill=(180, 180, 180), width=1)
        y = margin
        for index, spans in enumerate(lines):
            shown, colours = _line_characters(text, spans, char_color)
            if more and index == len(lines) - 1:
                shown = _ellipsize(shown, font, width - 2 * margin)
                colours = colours[: len(shown) - len(ELLIPSIS)] + [None] * len(ELLIPSIS)
            for start, end, color in _runs(colours):
                x = margin + _text_width(font, shown[:start])
                draw.text((x, y), shown[start:end], fill=color or PANEL_TEXT, font=font)
                if color is not None:
                    x1 = margin + _text_width(font, shown[:end])
                    base = y + ascent + max(1, descent // 2)
                    draw.rectangle((x, base, x1 - 1, base + underline - 1), fill=color)
            y += line_height
        return np.asarray(band, dtype=np.uint8).copy()

    # -----------------------------------------------------------------------------------------
    def _check_size(self, shape: Sequence[int]) -> None:
        if tuple(shape) != self.input_hw:
            raise ValueError(
                f"panoptic_seg has shape {tuple(shape)}, the image is {self.input_hw} (HxW)"
            )

    def _scaled_seg(self, seg: np.ndarray) -> np.ndarray:
        """Int64 [H, W] ids -> the ids at the drawn size (nearest pixel centre)."""
        height, width = self.image.shape[:2]
        if (height, width) != self.input_hw:
            rows = np.clip(
                ((np.arange(height) + 0.5) * self.input_hw[0] / height).astype(np.int64),
                0,
                self.input_hw[0] - 1,
            )
            cols = np.clip(
                ((np.arange(width) + 0.5) * self.input_hw[1] / width).astype(np.int64),
                0,
                self.input_hw[1] - 1,
            )
            seg = seg[rows[:, None], cols[None, :]]
        return seg

    def _entry_text(self, number: int, segment: Segment, visible: bool = True) -> str:
        """``"N. <class> [crowd] [no pixels] (score): caption"``, parts present as known; the
        caption cut to ``max_caption_chars``."""
        text = f"{number}. {segment.name}"
        if segment.iscrowd:
            text += " [crowd]"
        if not visible:
            # Listed for completeness, but there is nothing on the image to point at.
            text += " [no pixels]"
        if segment.score is not None:
            text += f" ({segment.score:.2f})"
        caption = truncate_text(segment.caption.strip(), self.max_caption_chars)
        if caption:
            text += f": {caption}"
        return text

    def _draw_segments(self, seg: np.ndarray, styles: Sequence[SegmentStyle]) -> Image.Image:
        """Tint, outline and number every segment on a copy of the image."""
        out = self.image.astype(np.float32)
        masks = {}
        for style in styles:
            mask = seg == style.segment_id
            if not mask.any():
                continue
            masks[style.number] = mask
            color = np.array(style.color, dtype=np.float32)
            out[mask] = (1.0 - self.alpha) * out[mask] + self.alpha * color
        # In place: two more float copies of a 12-megapixel photo would be 288 MB.
        out = np.clip(np.round(out, out=out), 0, 255, out=out).astype(np.uint8)

        thickness = max(1, int(round(min(out.shape[:2]) / 300)))
        for style in styles:
            mask = masks.get(style.number)
            if mask is None:
                continue
            contours, _ = cv2.findContours(
                mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
            )
            # A darker shade of the fill keeps the outline visible on both the tint and the
            # neighbouring segment.
            edge = tuple(int(c * 0.55) for c in style.color)
            cv2.drawContours(out, contours, -1, edge, thickness)

        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        label_font = self.font
        for style in styles:
            mask = masks.get(style.number)
            if mask is None:
                continue
            x, y = _label_point(mask)
            self._draw_label(draw, label_font, str(style.number), (x, y), style.color, out.shape)
        return canvas

    @staticmethod
    def _draw_label(draw, font, text, center, color, shape) -> None:
        """A small filled box with ``text`` centred at ``center``, kept inside the image."""
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = 3
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        height, width = shape[:2]
        x0 = int(np.clip(center[0] - box_w / 2, 0, max(width - box_w, 0)))
        y0 = int(np.clip(center[1] - box_h / 2, 0, max(height - box_h, 0)))
        text_color = (0, 0, 0) if _luminance(color) > 140 else (255, 255, 255)
        draw.rectangle(
            (x0, y0, x0 + box_w - 1, y0 + box_h - 1), fill=tuple(color), outline=text_color
        )
        draw.text((x0 + pad - left, y0 + pad - top), text, fill=text_color, font=font)

    def _compose(
        self,
        image: Image.Image,
        styles: Sequence[SegmentStyle],
        band: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Place ``image`` left, ``band`` (if any) under it and the caption panel right; grow
        the height to fit all."""
        font = self.font
        margin, line_height = self.margin, self.line_height
        swatch = self.font_size
        text_x = margin + swatch + margin // 2
        text_width = self.panel_width - text_x - margin
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (self.font_size, 0)
        entry_gap = max(3, self.font_size // 2)

        header = f"{len(styles)} segment" + ("" if len(styles) == 1 else "s")
        # Entries as long as they fit under max_height; a cut entry ends in "...", and the
        # note line for the entries left out is part of the budget.
        limit = None if self.max_height is None else self.max_height - margin
        note_height = line_height + entry_gap
        panel_height = margin + line_height + entry_gap
        entries: list[tuple[SegmentStyle, list[str]]] = []
        for index, style in enumerate(styles):
            budget = None if limit is None else max(0, (limit - panel_height) // line_height)
            lines = wrap_text(style.text, font, text_width, budget)
            height = len(lines) * line_height + entry_gap
            if limit is None or panel_height + height + (
                note_height if index + 1 < len(styles) else 0
            ) <= limit:
                entries.append((style, lines))
                panel_height += height
                continue
            room = (limit - panel_height - note_height - entry_gap) // line_height
            if room >= 1:
                if len(lines) > room:
                    lines = lines[:room]
                    lines[-1] = _ellipsize(lines[-1], font, text_width)
                entries.append((style, lines))
                panel_height += len(lines) * line_height + entry_gap
            break
        omitted = len(styles) - len(entries)
        if omitted:
            panel_height += note_height
        panel_height += margin

        img_w, img_h = image.size
        left_h = img_h + (0 if band is None else band.shape[0])
        canvas = Image.new(
            "RGB", (img_w + self.panel_width, max(left_h, panel_height)), PANEL_BACKGROUND
        )
        if canvas.height > img_h:
            canvas.paste(IMAGE_PAD, (0, img_h, img_w, canvas.height))
        canvas.paste(image, (0, 0))
        if band is not None:
            canvas.paste(Image.fromarray(band), (0, img_h))
        draw = ImageDraw.Draw(canvas)
        # A thin rule separates the panel from the image.
        draw.line((img_w, 0, img_w, canvas.height - 1), fill=(180, 180, 180), width=1)

        x0 = img_w
        y = margin
        draw.text((x0 + margin, y), header, fill=PANEL_TEXT, font=font)
        y += line_height + entry_gap
        for style, lines in entries:
            # The swatch sits on the first line's text body.
            sy = y + max(0, (ascent - swatch) // 2 + 1)
            draw.rectangle(
                (x0 + margin, sy, x0 + margin + swatch - 1, sy + swatch - 1),
                fill=style.color,
                outline=(60, 60, 60),
            )
            for line in lines:
                draw.text((x0 + text_x, y), line, fill=PANEL_TEXT, font=font)
                y += line_height
            y += entry_gap
        if omitted:
            note = f"+ {omitted} more segment{'' if omitted == 1 else 's'} not shown"
            draw.text((x0 + margin, y), note, fill=PANEL_TEXT, font=font)
        return np.asarray(canvas, dtype=np.uint8).copy()


def draw_panoptic_seg(
    image: np.ndarray,
    panoptic_seg: Any,
    segments_info: Sequence[Mapping[str, Any]],
    metadata: Any = None,
    **kwargs: Any,
) -> np.ndarray:
    """``Visualizer(image, metadata, **kwargs).draw_panoptic_seg(panoptic_seg, segments_info)``."""
    return Visualizer(image, metadata, **kwargs).draw_panoptic_seg(panoptic_seg, segments_info)


def draw_panoptic_result(
    image: np.ndarray,
    result: PanopticResult,
    metadata: Any = None,
    grounded_caption: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> np.ndarray:
    """``Visualizer(image, metadata, **kwargs).draw_panoptic_result(result, grounded_caption)``."""
    return Visualizer(image, metadata, **kwargs).draw_panoptic_result(result, grounded_caption)


def save_rgb_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write an RGB uint8 [H, W, 3] array as a PNG, atomically (temporary file in the same
    folder, then ``os.replace``), so a reader never sees half a picture."""
    with atomic_open(path, "wb") as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG")
