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
canvas taller (the image is padded below) instead of being clipped.

Colours: a segment takes its class colour from the metadata (``thing_colors`` for things,
``stuff_colors`` for every class, both indexed by contiguous id), or a fixed palette colour
when the metadata has none. Things are jittered per instance (seeded by the segment id, so a
picture is reproducible) so that two touching instances of one class still look different.

Text uses PIL's built-in font (``ImageFont.load_default(size=...)``, scalable since Pillow
10.1); nothing is downloaded.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Visualizer",
    "SegmentStyle",
    "segment_colors",
    "draw_panoptic_seg",
    "draw_dataset_dict",
    "save_rgb_png",
]

PANEL_BACKGROUND = (250, 250, 250)
PANEL_TEXT = (20, 20, 20)
# Area below a short image when the caption panel is taller than the image.
IMAGE_PAD = (250, 250, 250)
# How far (0-255, per channel) a thing's colour may move from its class colour.
THING_JITTER = 48


def _meta_get(metadata: Any, key: str) -> Any:
    """``metadata[key]`` for a ``Metadata`` object, a plain dict or ``None`` (-> ``None``)."""
    if metadata is None:
        return None
    getter = getattr(metadata, "get", None)
    if getter is not None:
        return getter(key)
    return getattr(metadata, key, None)


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
        colors = _meta_get(metadata, key)
        if colors is not None and 0 <= category_id < len(colors):
            color = colors[category_id]
            return tuple(int(c) for c in color[:3])  # type: ignore[return-value]
    return _palette_color(category_id)


def _class_name(category_id: int, isthing: bool, metadata: Any) -> str:
    """Class name by contiguous id: ``stuff_classes`` holds every class (detectron2's
    panoptic convention); ``thing_classes`` is a fallback for things."""
    names = _meta_get(metadata, "stuff_classes")
    if names is not None and 0 <= category_id < len(names):
        return str(names[category_id])
    if isthing:
        names = _meta_get(metadata, "thing_classes")
        if names is not None and 0 <= category_id < len(names):
            return str(names[category_id])
    return f"class {category_id}"


def _is_thing(segment: Mapping[str, Any], metadata: Any) -> bool:
    if "isthing" in segment and segment["isthing"] is not None:
        return bool(segment["isthing"])
    things = _meta_get(metadata, "thing_classes")
    return things is not None and int(segment["category_id"]) < len(things)


def segment_colors(
    segments_info: Sequence[Mapping[str, Any]], metadata: Any = None
) -> dict[int, tuple[int, int, int]]:
    """The RGB colour of every segment, as the visualizer draws it.

    Args:
        segments_info: dicts with ``id``, ``category_id`` (contiguous) and optionally
            ``isthing``.
        metadata: dataset metadata (``Metadata``, dict or ``None``).
    Returns:
        ``{segment id: (r, g, b)}``; stuff keeps its class colour, a thing gets its class
        colour jittered by up to ``THING_JITTER`` per channel, seeded by its segment id.
    """
    colors: dict[int, tuple[int, int, int]] = {}
    for segment in segments_info:
        seg_id = int(segment["id"])
        category_id = int(segment["category_id"])
        isthing = _is_thing(segment, metadata)
        base = np.array(_class_color(category_id, isthing, metadata), dtype=np.int64)
        if isthing:
            rng = np.random.default_rng(seg_id)
            base = base + rng.integers(-THING_JITTER, THING_JITTER + 1, size=3)
        colors[seg_id] = tuple(int(c) for c in np.clip(base, 0, 255))  # type: ignore[assignment]
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


def wrap_text(text: str, font: ImageFont.ImageFont, max_width: float) -> list[str]:
    """Split ``text`` into lines no wider than ``max_width`` pixels in ``font``.

    Breaks at spaces; a word wider than a whole line (a URL, a run without spaces) is cut
    between characters so nothing runs off the panel. Existing newlines are kept.
    """
    max_width = max(float(max_width), 1.0)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if _text_width(font, candidate) <= max_width:
                current = candidate
                continue
            if current:
                lines.append(current)
                current = ""
            # The word alone may still be too wide: cut it into pieces that fit.
            while len(word) > 1 and _text_width(font, word) > max_width:
                # Longest prefix that fits (at least one character), by bisection.
                lo, hi = 1, len(word) - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if _text_width(font, word[:mid]) <= max_width:
                        lo = mid
                    else:
                        hi = mid - 1
                lines.append(word[:lo])
                word = word[lo:]
            current = word
        lines.append(current)
    return lines


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


class Visualizer:
    """Draws one image's panoptic segmentation with per-segment captions.

    Args:
        image: RGB uint8 ndarray [H, W, 3].
        metadata: dataset metadata (``Metadata`` or dict) with ``stuff_classes`` (every class
            name by contiguous id) and optionally ``thing_classes``, ``thing_colors``,
            ``stuff_colors``; ``None`` names classes ``class <id>``.
        scale: resize factor for the drawn image (nearest for segment ids), e.g. 2 or 4 to
            read the numbers on a tiny image.
        alpha: opacity of the segment tint (0 = image only, 1 = flat colour).
        font_size: text size in pixels; default grows with the image height.
        panel_width: caption panel width in pixels; default ``max(320, 0.6 * W)``.
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
        self.metadata = metadata
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

    # -----------------------------------------------------------------------------------------
    def draw_panoptic_seg(
        self, panoptic_seg: Any, segments_info: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """Draw segments and the caption panel.

        Args:
            panoptic_seg: Int [H, W] segment id per pixel (ndarray or Tensor), 0 = void; the
                size of the image given to the constructor.
            segments_info: one dict per segment: ``id``, ``category_id`` (contiguous),
                optional ``isthing``, ``score``, ``caption``, ``iscrowd``.
        Returns:
            RGB uint8 ndarray [max(H', panel height), W' + panel_width, 3], where
            ``(H', W')`` is the image size times ``scale``.
        """
        seg = self._prepare_seg(panoptic_seg)
        colors = segment_colors(segments_info, self.metadata)
        present = set(np.unique(seg).tolist())
        styles = [
            SegmentStyle(
                number=i + 1,
                segment_id=int(s["id"]),
                color=colors[int(s["id"])],
                text=self._entry_text(i + 1, s, visible=int(s["id"]) in present),
            )
            for i, s in enumerate(segments_info)
        ]
        canvas_image = self._draw_segments(seg, styles)
        return self._compose(canvas_image, styles)

    def draw_dataset_dict(self, dataset_dict: Mapping[str, Any]) -> np.ndarray:
        """Draw the ground truth of a dataset dict (see ``pix2cap.data.datasets``): the
        panoptic PNG ``pan_seg_file_name`` and ``segments_info``, whose ``description`` is the
        caption. Segment ids in ``segments_info`` missing from the PNG are listed but not
        drawn."""
        from pix2cap.data.detection_utils import read_panoptic_png
        from pix2cap.data.errors import DatasetError

        file_name = dataset_dict.get("file_name", "<dataset dict without file_name>")
        png = dataset_dict.get("pan_seg_file_name")
        if not png:
            raise DatasetError(file_name, "dataset dict has no 'pan_seg_file_name' to draw")
        if "segments_info" not in dataset_dict:
            raise DatasetError(file_name, "dataset dict has no 'segments_info' to draw")
        seg = read_panoptic_png(png)
        if seg.shape != self.input_hw:
            raise DatasetError(
                png,
                f"panoptic PNG is {seg.shape[0]}x{seg.shape[1]} (HxW) but the image "
                f"{file_name} is {self.input_hw[0]}x{self.input_hw[1]}",
            )
        segments = []
        for s in dataset_dict["segments_info"]:
            segment = {k: s[k] for k in ("id", "category_id", "isthing", "iscrowd") if k in s}
            segment["caption"] = s.get("description") or ""
            segments.append(segment)
        return self.draw_panoptic_seg(seg, segments)

    # -----------------------------------------------------------------------------------------
    def _prepare_seg(self, panoptic_seg: Any) -> np.ndarray:
        if hasattr(panoptic_seg, "detach"):  # a torch Tensor, possibly on a GPU
            panoptic_seg = panoptic_seg.detach().cpu().numpy()
        seg = np.asarray(panoptic_seg)
        if seg.shape != self.input_hw:
            raise ValueError(
                f"panoptic_seg has shape {seg.shape}, the image is {self.input_hw} (HxW)"
            )
        seg = seg.astype(np.int64, copy=False)
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

    def _entry_text(self, number: int, segment: Mapping[str, Any], visible: bool = True) -> str:
        category_id = int(segment["category_id"])
        name = _class_name(category_id, _is_thing(segment, self.metadata), self.metadata)
        text = f"{number}. {name}"
        if segment.get("iscrowd"):
            text += " [crowd]"
        if not visible:
            # Listed for completeness, but there is nothing on the image to point at.
            text += " [no pixels]"
        score = segment.get("score")
        if score is not None:
            text += f" ({float(score):.2f})"
        caption = str(segment.get("caption") or "").strip()
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
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)

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

    def _compose(self, image: Image.Image, styles: Sequence[SegmentStyle]) -> np.ndarray:
        """Place ``image`` left and the caption panel right; grow the height to fit both."""
        font = self.font
        margin = max(6, self.font_size // 2)
        swatch = self.font_size
        text_x = margin + swatch + margin // 2
        text_width = self.panel_width - text_x - margin
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (self.font_size, 0)
        line_height = int(ascent + descent + max(2, self.font_size // 5))
        entry_gap = max(3, self.font_size // 2)

        header = f"{len(styles)} segment" + ("" if len(styles) == 1 else "s")
        entries = [(style, wrap_text(style.text, font, text_width)) for style in styles]
        panel_height = margin + line_height + entry_gap
        for _, lines in entries:
            panel_height += len(lines) * line_height + entry_gap
        panel_height += margin

        img_w, img_h = image.size
        canvas = Image.new(
            "RGB", (img_w + self.panel_width, max(img_h, panel_height)), PANEL_BACKGROUND
        )
        if canvas.height > img_h:
            canvas.paste(IMAGE_PAD, (0, img_h, img_w, canvas.height))
        canvas.paste(image, (0, 0))
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


def draw_dataset_dict(
    image: Optional[np.ndarray], dataset_dict: Mapping[str, Any], metadata: Any = None, **kwargs
) -> np.ndarray:
    """Draw a dataset dict's ground truth; ``image`` ``None`` reads ``file_name`` (RGB)."""
    if image is None:
        from pix2cap.data.detection_utils import read_image

        image = read_image(dataset_dict["file_name"], format="RGB")
    return Visualizer(image, metadata, **kwargs).draw_dataset_dict(dataset_dict)


def save_rgb_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write an RGB uint8 [H, W, 3] array as a PNG, atomically (temporary file in the same
    folder, then ``os.replace``), so a reader never sees half a picture."""
    from pix2cap.utils.file_io import atomic_open

    with atomic_open(path, "wb") as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG")
