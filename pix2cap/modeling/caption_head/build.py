from pix2cap.utils.registry import Registry

CAPTION_HEAD_REGISTRY = Registry("CAPTION_HEAD")
CAPTION_HEAD_REGISTRY.__doc__ = """
Registry for dense caption heads: per-query memory tokens -> one caption per query.
"""
