"""Models. Importing this package imports every subpackage so their registries are filled."""

from . import backbone, caption_head, pixel_decoder, transformer_decoder
from .meta_arch import META_ARCH_REGISTRY, build_model
