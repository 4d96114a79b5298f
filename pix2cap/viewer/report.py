"""A self-contained HTML report: an index page and one interactive page per image.

The folder opens from ``file://`` with no server and no network (nothing is fetched from
outside it; a Content-Security-Policy on every page forbids it)::

    report/
      index.html              metrics tables + thumbnail grid, sortable by per-image scores
      report.js               the page order, for keyboard navigation between image pages
      assets/                 viewer.js, index.js, viewer.css (copied from pix2cap.viewer)
      pages/<key>.html        one image: masks over the image, segments, captions
      pages/<key>.entry.json  what the index lists of it (title, scores, files)
      media/<key>.jpg         the image at display size (longer side <= ``max_size``)
      media/<key>.thumb.jpg   a thumbnail with the first view's masks blended in

Pages are written as images come (:meth:`HtmlReport.add_page`, each file atomically), the
index and page order at the end (:meth:`HtmlReport.write_index`); a page written by an
earlier run of a resumed tool is listed from its ``.entry.json``. Masks travel inside each
page as one PNG of segment indices, so a report of 100 COCO-sized images stays within a few
tens of MB.

Usage::

    report = HtmlReport("out/report", title="shapes_val")
    report.add_page("000001", image_rgb, [ImageView("Prediction", result, grounded, caption)],
                    scores={"PQ": 87.5})
    report.write_index(metrics={"panoptic_seg": {"PQ": 88.9}})
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from pix2cap.utils.file_io import atomic_write_bytes, atomic_write_text
from pix2cap.utils.visualizer import segment_colors
from pix2cap.viewer.page import ImageView, display_size, view_payload

__all__ = ["HtmlReport", "page_key", "page_keys", "json_for_html"]

ASSETS = ("viewer.js", "viewer.css", "index.js")
# Only files of the report folder and inline data: URIs; no connection of any kind.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'none'; form-action 'none'; base-uri 'none'"
)
# Keys hold no dot, so that a key is its own page_key (a stem "frame.0001" is no extension).
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY = re.compile(r"[A-Za-z0-9_-]{1,120}")


def page_key(name: str) -> str:
    """A file-name-safe key for an image: its stem, other characters than letters, digits,
    ``_`` and ``-`` as ``_``, at most 120 characters."""
    stem = os.path.splitext(os.path.basename(str(name)))[0]
    return _KEY_UNSAFE.sub("_", stem)[:120].strip("_") or "image"


def page_keys(names: Sequence[str]) -> list[str]:
    """:func:`page_key` of each name, made unique with ``_2``, ``_3``... in order (two files
    may share a stem, or differ only in characters a key cannot hold)."""
    keys: list[str] = []
    used: set[str] = set()
    for name in names:
        key = base = page_key(name)
        number = 1
        while key in used:
            number += 1
            key = f"{base}_{number}"
        used.add(key)
        keys.append(key)
    return keys


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinite floats as None (the browser's JSON.parse rejects them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _score(value: Any) -> Optional[float]:
    """A per-image score as a plain finite number (numpy scalars included), else None."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def json_for_html(obj: Any) -> str:
    """JSON that is safe inside a ``<script type="application/json">`` block: ``<``, ``>``
    and ``&`` are written as ``\\u`` escapes, so no text in it can close the block."""
    text = json.dumps(
        _finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.getvalue()


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def _thumbnail(image: np.ndarray, view: Optional[ImageView], size: tuple[int, int]) -> np.ndarray:
    """The image at ``size`` with ``view``'s segments blended in their colours (alpha 0.45)."""
    thumb = _resize(image, size).astype(np.float32)
    if view is None or view.result is None:
        return thumb.astype(np.uint8)
    result = view.result.filter(view.min_score) if view.min_score > 0 else view.result
    colors = segment_colors(result.segments, view.metadata)  # the pages' palette
    ids = cv2.resize(
        result.panoptic_seg.astype(np.int32), (size[1], size[0]),
        interpolation=cv2.INTER_NEAREST,
    )
    for segment_id, color in colors.items():
        mask = ids == segment_id
        if mask.any():
            thumb[mask] = 0.55 * thumb[mask] + 0.45 * np.asarray(color, dtype=np.float32)
    return thumb.clip(0, 255).astype(np.uint8)


def _format_score(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "score"


class HtmlReport:
    """Writes a report folder (module docstring).

    Args:
        output_dir: the report folder (created; pages of an earlier run in it are kept and
            listed again when their key is given to :meth:`write_index`).
        title: the index page's title.
        max_size: longer side, in pixels, of the images and masks shown (0: full size).
        thumb_size: longer side of the index thumbnails.
        jpeg_quality: quality of the image and thumbnail JPEGs.
    """

    def __init__(
        self,
        output_dir: str,
        title: str = "pix2cap report",
        *,
        max_size: int = 1024,
        thumb_size: int = 224,
        jpeg_quality: int = 88,
    ):
        self.output_dir = os.fspath(output_dir)
        self.title = str(title)
        self.max_size = int(max_size)
        self.thumb_size = int(thumb_size)
        self.jpeg_quality = int(jpeg_quality)
        self._entries: dict[str, dict] = {}
        for folder in ("assets", "pages", "media"):
            os.makedirs(os.path.join(self.output_dir, folder), exist_ok=True)
        for name in ASSETS:
            data = resources.files("pix2cap.viewer").joinpath("assets", name).read_bytes()
            atomic_write_bytes(os.path.join(self.output_dir, "assets", name), data)

    # -- pages ----------------------------------------------------------------------------
    def has_page(self, key: str) -> bool:
        """Whether a complete page for ``key`` is in the folder (its entry is written last)."""
        return os.path.isfile(self._path("pages", f"{key}.entry.json"))

    def add_page(
        self,
        key: str,
        image: np.ndarray,
        views: Sequence[ImageView],
        *,
        title: Optional[str] = None,
        scores: Optional[Mapping[str, Optional[float]]] = None,
        source: Optional[str] = None,
    ) -> dict:
        """Write the page of one image.

        Args:
            key: a file-name-safe key (:func:`page_key`), unique in the report.
            image: RGB uint8 [H, W, 3], the original image (the views' coordinates).
            views: the panels shown side by side (prediction, ground truth, ...).
            title: shown on the page and in the index (default: ``key``).
            scores: per-image numbers the index shows and sorts by (None: not available).
            source: the image's file or dataset path, shown on the page.
        Returns:
            the index entry: ``{"key", "title", "page", "thumb", "scores", "segments"}``.
        """
        if not _KEY.fullmatch(str(key)):
            raise ValueError(f"page key {key!r} is not file-name safe; use page_key()")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{source or key}: expected an RGB uint8 [H, W, 3] image")
        height, width = image.shape[:2]
        size = display_size(height, width, self.max_size)
        title = str(title if title is not None else key)
        payload = {
            "key": key,
            "title": title,
            "source": None if source is None else str(source),
            "height": height,
            "width": width,
            "display": list(size),
            "image": f"../media/{key}.jpg",
            "views": [view_payload(v, (height, width), size) for v in views],
            "scores": {str(k): _score(v) for k, v in (scores or {}).items()},
        }
        thumb_view = next((v for v in views if v.result is not None), None)
        thumb = _thumbnail(image, thumb_view, display_size(height, width, self.thumb_size))
        shown = _jpeg(_resize(image, size), self.jpeg_quality)
        atomic_write_bytes(self._path("media", f"{key}.jpg"), shown)
        atomic_write_bytes(self._path("media", f"{key}.thumb.jpg"), _jpeg(thumb, self.jpeg_quality))
        atomic_write_text(self._path("pages", f"{key}.html"), self._page_html(payload))
        entry = {
            "key": key,
            "title": title,
            "page": f"pages/{key}.html",
            "thumb": f"media/{key}.thumb.jpg",
            "scores": payload["scores"],
            "segments": {v["name"]: len(v["segments"]) for v in payload["views"]},
        }
        atomic_write_text(self._path("pages", f"{key}.entry.json"), json.dumps(_finite(entry)))
        self._entries[key] = entry
        return entry

    def entry(self, key: str) -> Optional[dict]:
        """The index entry of ``key``: written by this object, else read from the folder."""
        if key in self._entries:
            return self._entries[key]
        path = self._path("pages", f"{key}.entry.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
        self._entries[key] = entry
        return entry

    # -- index ----------------------------------------------------------------------------
    def write_index(
        self,
        keys: Optional[Sequence[str]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        *,
        default_sort: Optional[str] = None,
    ) -> str:
        """Write ``index.html`` and the page order; returns the index's path.

        Args:
            keys: the pages listed, in order (default: those added to this object, in order).
                A key without a page is skipped.
            metrics: ``{task: {metric: value}}`` (an evaluator's results) shown as tables.
            default_sort: the score the grid is first sorted by (ascending: worst first);
                default: the dataset's order.
        """
        keys = list(self._entries) if keys is None else list(dict.fromkeys(keys))
        entries = [e for e in (self.entry(k) for k in keys) if e is not None]
        order = {"pages": [{"key": e["key"], "page": e["page"]} for e in entries]}
        atomic_write_text(
            self._path("report.js"), "window.PIX2CAP_REPORT = " + json_for_html(order) + ";\n"
        )
        path = self._path("index.html")
        atomic_write_text(path, self._index_html(entries, metrics or {}, default_sort))
        return path

    # -- HTML -----------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    @staticmethod
    def _head(title: str, prefix: str) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n"
            f"<link rel=\"stylesheet\" href=\"{prefix}assets/viewer.css\">\n</head>\n"
        )

    def _page_html(self, payload: dict) -> str:
        title = payload["title"]
        source = payload["source"]
        scores = " · ".join(
            f"{name} {_format_score(value)}" for name, value in payload["scores"].items()
            if value is not None
        )
        return (
            self._head(f"{title} - {self.title}", "../")
            + "<body class=\"image-page\">\n<header>\n"
            "<a id=\"nav-index\" href=\"../index.html\" title=\"index (i)\">Index</a>\n"
            "<a id=\"nav-prev\" title=\"previous image (left arrow)\">&larr; prev</a>\n"
            "<span id=\"nav-position\"></span>\n"
            "<a id=\"nav-next\" title=\"next image (right arrow)\">next &rarr;</a>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            + (f"<span class=\"hint\">{html.escape(source)}</span>\n" if source else "")
            + (f"<span class=\"hint\" id=\"scores\">{html.escape(scores)}</span>\n"
               if scores else "")
            + "<span class=\"controls\">\n"
            "<label><input type=\"checkbox\" id=\"masks-toggle\" checked> masks (m)</label>\n"
            "<button type=\"button\" id=\"masks-all\">all</button>\n"
            "<button type=\"button\" id=\"masks-none\">none</button>\n"
            "<label>opacity <input type=\"range\" id=\"masks-opacity\" min=\"0\" max=\"100\" "
            "value=\"45\"></label>\n"
            "<span class=\"hint\">&larr; &rarr; images · i index · Esc clear</span>\n"
            "</span>\n</header>\n<main id=\"views\"></main>\n"
            "<script type=\"application/json\" id=\"page-data\">"
            + json_for_html(payload)
            + "</script>\n<script src=\"../report.js\"></script>\n"
            "<script src=\"../assets/viewer.js\"></script>\n</body>\n</html>\n"
        )

    @staticmethod
    def _metrics_tables(metrics: Mapping[str, Any]) -> str:
        """One scrolling table per task; nested groups (e.g. ``caption_truth``) become rows
        named ``group/metric``, values that are neither numbers nor text are left out."""

        def rows(values: Mapping[str, Any], prefix: str = "") -> list[str]:
            out = []
            for name, value in values.items():
                label = f"{prefix}{name}"
                if isinstance(value, Mapping):
                    out.extend(rows(value, f"{label}/"))
                elif isinstance(value, (int, float, str)) or value is None:
                    out.append(
                        f"<tr><th>{html.escape(str(label))}</th>"
                        f"<td>{html.escape(_format_score(value))}</td></tr>"
                    )
            return out

        parts = []
        for task, values in metrics.items():
            body = "".join(rows(values if isinstance(values, Mapping) else {"value": values}))
            parts.append(
                f"<div class=\"metrics-box\"><table class=\"metrics\"><caption>"
                f"{html.escape(str(task))}</caption>{body}</table></div>\n"
            )
        return "<div class=\"metrics-row\">" + "".join(parts) + "</div>\n" if parts else ""

    def _index_html(
        self, entries: Sequence[dict], metrics: Mapping[str, Any], default_sort: Optional[str]
    ) -> str:
        score_names: list[str] = []
        for entry in entries:
            for name in entry.get("scores") or {}:
                if name not in score_names:
                    score_names.append(name)
        options = ["<option value=\"order\">dataset order</option>"] + [
            f"<option value=\"{_slug(n)}\"{' selected' if n == default_sort else ''}>"
            f"{html.escape(n)}</option>"
            for n in score_names
        ]
        cards = []
        for order, entry in enumerate(entries):
            scores = entry.get("scores") or {}
            attributes = "".join(
                f" data-score-{_slug(n)}=\"{html.escape(_format_score(scores.get(n)))}\""
                for n in score_names
            )
            text = " · ".join(
                f"{n} {_format_score(v)}" for n, v in scores.items() if v is not None
            )
            cards.append(
                f"<a class=\"card\" href=\"{html.escape(entry['page'])}\" data-key=\""
                f"{html.escape(entry['key'])}\" data-order=\"{order}\"{attributes}>"
                f"<img src=\"{html.escape(entry['thumb'])}\" alt=\"\" loading=\"lazy\">"
                f"<span class=\"title\">{html.escape(entry['title'])}</span>"
                f"<span class=\"scores\">{html.escape(text)}</span></a>\n"
            )
        ascending = " selected" if default_sort else ""
        return (
            self._head(self.title, "")
            + "<body class=\"index-page\">\n<header>\n"
            f"<h1>{html.escape(self.title)}</h1>\n"
            f"<span class=\"hint\">{len(entries)} images</span>\n</header>\n<main>\n"
            + self._metrics_tables(metrics)
            + "<div class=\"sortbar\"><label>sort by <select id=\"sort-key\">"
            + "".join(options)
            + "</select></label><select id=\"sort-direction\">"
            f"<option value=\"asc\"{ascending}>ascending</option>"
            "<option value=\"desc\">descending</option></select>"
            "<span class=\"hint\">&larr; &rarr; move between images, Enter opens one</span>"
            "</div>\n<div class=\"grid\" id=\"grid\">\n"
            + "".join(cards)
            + "</div>\n</main>\n<script src=\"assets/index.js\"></script>\n</body>\n</html>\n"
        )
