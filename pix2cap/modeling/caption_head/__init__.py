from .build import CAPTION_HEAD_REGISTRY
