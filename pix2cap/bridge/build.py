"""The caption-writer registry and its builder."""

from __future__ import annotations

from typing import Any

from fvcore.common.registry import Registry

from pix2cap.utils.registry import build_by_name

__all__ = ["CAPTION_WRITER_REGISTRY", "WRITER_NAMES", "build_caption_writer"]

CAPTION_WRITER_REGISTRY = Registry("CAPTION_WRITER")
CAPTION_WRITER_REGISTRY.__doc__ = """
Registry for caption writers: (structured content, PancapChain stages, image size) -> a
panoptic caption in SA-Pancap form. Registered classes take keyword arguments only.
"""

# Short names used on command lines -> registered class names.
WRITER_NAMES = {
    "template": "TemplateWriter",
    "concat": "DenseCaptionConcatWriter",
    "concat_boxes": "BoxedDenseCaptionConcatWriter",
    "hf_causal_lm": "HFCausalLMWriter",
    "small_lm": "SmallLMWriter",
}


def build_caption_writer(name: str, **kwargs: Any):
    """Build a writer by short name (``template``, ``hf_causal_lm``, ``small_lm``) or by its
    registered class name, passing ``kwargs`` to it (``model_path=...`` for the LM writers)."""
    # Importing the module registers the writers.
    import pix2cap.bridge.writers  # noqa: F401

    return build_by_name(CAPTION_WRITER_REGISTRY, name, WRITER_NAMES, "caption writer", **kwargs)
