"""The caption-writer registry and its builder."""

from __future__ import annotations

from typing import Any

from pix2cap.utils.registry import Registry

__all__ = ["CAPTION_WRITER_REGISTRY", "build_caption_writer"]

CAPTION_WRITER_REGISTRY = Registry("CAPTION_WRITER")
CAPTION_WRITER_REGISTRY.__doc__ = """
Registry for caption writers: (structured content, PancapChain stages, image size) -> a
panoptic caption in SA-Pancap form. Registered classes take keyword arguments only; each has a
short name (``template``, ``concat``, ``concat_boxes``, ``hf_causal_lm``, ``small_lm``).
"""


def build_caption_writer(name: str, **kwargs: Any):
    """Build a writer by short name (``template``, ``small_lm``, ...) or registered class
    name, passing ``kwargs`` to it (``model_path=...`` for the LM writers). The writers are
    registered when :mod:`pix2cap.bridge` is imported, which importing this module does."""
    return CAPTION_WRITER_REGISTRY.build(name, **kwargs)
