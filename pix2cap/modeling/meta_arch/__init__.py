from .build import META_ARCH_REGISTRY, build_model
from .pix2cap import Pix2Cap
from .pixel_baseline import PixelBaseline
