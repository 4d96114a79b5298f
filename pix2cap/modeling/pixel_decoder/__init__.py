from .build import PIXEL_DECODER_REGISTRY
