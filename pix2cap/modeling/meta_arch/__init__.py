from .build import META_ARCH_REGISTRY, build_model
from .pixel_baseline import PixelBaseline
