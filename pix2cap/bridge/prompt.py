"""The language-model prompt: the stage-4 prompt plus the entities' region captions.

A trained LM only understands the prompt form it was trained on, so the form is one frozen
object, :class:`PromptFormat`, that builds the prompt for training pairs and for inference
alike, and is saved beside a trained LM (``pix2cap_prompt_format.json``) for its writer to
read back::

    fmt = PromptFormat(ground_region_captions=True)
    prompt = fmt.build(stages, content)
    fmt.save(model_dir)                      # {"kind": "pix2cap_prompt_format", "version": 1, ...}
    PromptFormat.load(model_dir) == fmt

The prompt is ``stages.prompts[4]`` (the PancapChain stage-4 prompt with the merged entity
list), then, if ``include_dense_captions`` and any entity has a dense caption, a line
``"Region captions: 1. <tag> <box>[[...]]</box>: <caption>; 2. ..."`` with the entity ids of
the content. ``region_boxes`` repeats each entity's grid box beside its caption, so that the
words and the box an LM writes about one entity sit next to each other in the prompt
(without it the line is ``"1. <tag>: <caption>"``). ``ground_region_captions`` gives each
thing's caption with its relation clause tied to the decoded entities
(:func:`pix2cap.bridge.grounding.grounded_caption`) instead of as the caption head wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from pix2cap.bridge.content import PanopticContent
from pix2cap.bridge.grounding import grounded_caption
from pix2cap.bridge.stages import PancapStages
from pix2cap.data.caption_formats import format_grid_box
from pix2cap.utils.file_io import atomic_write_json

__all__ = ["PromptFormat", "PROMPT_FORMAT_FILE"]

PROMPT_FORMAT_FILE = "pix2cap_prompt_format.json"
_KIND = "pix2cap_prompt_format"
_VERSION = 1


@dataclass(frozen=True)
class PromptFormat:
    """The prompt form of an LM writer (module docstring).

    Attributes:
        include_dense_captions: add the "Region captions:" line.
        region_boxes: repeat each entity's grid box beside its region caption.
        ground_region_captions: give things' region captions with their relation clause tied
            to the decoded entities.
    """

    include_dense_captions: bool = True
    region_boxes: bool = True
    ground_region_captions: bool = False

    def build(self, stages: PancapStages, content: PanopticContent | None = None) -> str:
        """The prompt text of one image."""
        prompt = stages.prompts[4]
        if not self.include_dense_captions or content is None:
            return prompt
        parts = []
        for e in content.entities:
            caption = (
                grounded_caption(content, e.id) if self.ground_region_captions else e.caption.strip()
            )
            if not caption:
                continue
            name = e.name
            if self.region_boxes and e.grid_box is not None:
                name = f"{name} {format_grid_box(e.grid_box)}"
            parts.append(f"{e.id}. {name}: {caption}")
        if parts:
            prompt += "\nRegion captions: " + "; ".join(parts)
        return prompt

    # -- saved form -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """``{"kind", "version", <fields>}``, JSON-serialisable."""
        return {"kind": _KIND, "version": _VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "prompt format") -> "PromptFormat":
        """Read :meth:`to_dict`'s form; anything else (another kind or version, an unknown
        or a missing key) is a ValueError naming ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a prompt format must be a JSON object, got {type(data).__name__}")
        if data.get("kind") != _KIND or data.get("version") != _VERSION:
            raise ValueError(
                f"{source}: unknown prompt format kind={data.get('kind')!r} "
                f"version={data.get('version')!r}; this code reads kind={_KIND!r} "
                f"version={_VERSION}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k not in ("kind", "version")}
        unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
        if unknown or missing:
            raise ValueError(
                f"{source}: prompt format with unknown keys {unknown} / missing keys {missing}; "
                f"this code knows {sorted(fields)}"
            )
        for key, value in values.items():
            if not isinstance(value, bool):
                raise ValueError(f"{source}: prompt format {key!r} must be true or false, got {value!r}")
        return cls(**values)

    def save(self, folder: str) -> str:
        """Write ``folder/pix2cap_prompt_format.json`` (atomically); returns its path."""
        path = os.path.join(folder, PROMPT_FORMAT_FILE)
        atomic_write_json(path, self.to_dict(), indent=2)
        return path

    @classmethod
    def load(cls, folder: str) -> "PromptFormat":
        """The format saved in ``folder``. FileNotFoundError when it has none, ValueError
        when the file holds a format this code does not know."""
        path = os.path.join(folder, PROMPT_FORMAT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no {PROMPT_FORMAT_FILE}; the LM's prompt format is unknown")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, path)
