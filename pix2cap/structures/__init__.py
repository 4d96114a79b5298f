"""Per-image containers passed between the data pipeline and the model."""

from .image_list import ImageList
from .instances import Instances
from .masks import masks_to_boxes_xyxy

__all__ = ["ImageList", "Instances", "masks_to_boxes_xyxy"]
