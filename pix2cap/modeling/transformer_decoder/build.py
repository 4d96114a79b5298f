from pix2cap.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for mask-transformer decoders: queries attend to multi-scale features and predict a
class and a mask per query after every layer.
"""
