from .build import PIXEL_DECODER_REGISTRY
from .msdeformattn import MSDeformAttnPixelDecoder
