"""PancapChain's own prediction folders, read as the authors aggregate them for PancapScore.

PancapChain writes one JSON per image, ``{"image": <path relative to the data root>, "text":
<caption>}``, its boxes ``<box>[[x1, y1, x2, y2]]</box>`` with integers on a 1000 x 1000 grid of
the image padded to a square (ASMv2's form). The authors' ``scripts_llmjudge/
agg_jsons_asv2togt.py`` turns a folder into the official prediction list ``[{"image_path",
"model_response"}]``, rewriting each box into SA-Pancap's ``[[0.123, ...]]`` (3 decimals, the
unpadded image's [0, 1]). :func:`read_pancapchain_folder` does the same, rule for rule, so
PancapChain's numbers and pix2cap's come from one scorer:

* files in name order; a box is rewritten only in exactly the form ``<box>[[a, b, c, d]]</box>``
  (non-negative integers, one space after each comma), anything else is left as written;
* grid -> pixels of the padded square: times ``max(width, height) / 1000``; the padding is
  ``(long - short) // 2`` (an integer) on the short axis, subtracted from both of its
  coordinates; then divided by the width and height and clamped to [0, 1].

(:func:`pix2cap.data.caption_formats.grid_text_to_pancap`, pix2cap's own reader of model-side
boxes, accepts any spacing and pads by the exact half; it differs from these rules by at most
half a pixel.)
"""

from __future__ import annotations

import json
import os
import re

from PIL import Image

from pix2cap.data.errors import DatasetError

__all__ = ["pancapchain_box_to_normalized", "pancapchain_text_to_pancap", "read_pancapchain_folder"]

GRID = 1000
_BOX_RE = re.compile(r"<box>\[\[(\d+), (\d+), (\d+), (\d+)\]\]</box>")


def pancapchain_box_to_normalized(box, width: int, height: int) -> list[float]:
    """A grid box of PancapChain's output -> ``[x1, y1, x2, y2]`` in [0, 1] of the image,
    by the aggregation script's rules (module docstring)."""
    box = [float(v) * max(width, height) / GRID for v in box]
    if width > height:
        pad = (width - height) // 2
        box[1] -= pad
        box[3] -= pad
    else:
        pad = (height - width) // 2
        box[0] -= pad
        box[2] -= pad
    normalized = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    return [min(1.0, max(0.0, v)) for v in normalized]


def pancapchain_text_to_pancap(text: str, width: int, height: int) -> str:
    """``text`` with every ``<box>[[a, b, c, d]]</box>`` rewritten into ``[[x1, y1, x2, y2]]``
    (3 decimals) for an image of ``width`` x ``height``."""

    def convert(match: re.Match) -> str:
        box = pancapchain_box_to_normalized([int(v) for v in match.groups()], width, height)
        return "[[" + ", ".join(f"{v:.3f}" for v in box) + "]]"

    return _BOX_RE.sub(convert, text)


def read_pancapchain_folder(folder: str, image_root: str) -> list[dict]:
    """Every ``*.json`` of ``folder`` (name order) as ``{"image_path", "model_response"}``, its
    boxes in SA-Pancap form; each image is opened under ``image_root`` for its size.

    Raises:
        DatasetError: a file that is not a JSON object with string ``image`` and ``text``, or
            whose image cannot be opened.
    """
    if not os.path.isdir(folder):
        raise DatasetError(folder, "not a folder of PancapChain prediction files")
    entries = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, "r", encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise DatasetError(path, f"cannot read a PancapChain prediction ({e})") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("image", "text")
        ):
            raise DatasetError(path, "a PancapChain prediction needs string 'image' and 'text'")
        image_path = os.path.join(image_root, record["image"])
        try:
            with Image.open(image_path) as image:
                width, height = image.size
        except OSError as e:
            raise DatasetError(path, f"its image {image_path} cannot be opened ({e})") from None
        entries.append(
            {
                "image_path": record["image"],
                "model_response": pancapchain_text_to_pancap(record["text"], width, height),
            }
        )
    return entries
