from .build import BACKBONE_REGISTRY
