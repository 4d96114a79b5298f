from .build import BACKBONE_REGISTRY
from .shape_spec import ShapeSpec
from .timm_backbone import TimmBackbone
