"""Per-image containers passed between the data pipeline and the model."""

from .image_list import ImageList
from .instances import Instances
from .masks import masks_to_boxes_xyxy
from .panoptic import PanopticResult, Segment, id2rgb, rgb2id

__all__ = ["ImageList", "Instances", "masks_to_boxes_xyxy", "PanopticResult", "Segment", "id2rgb", "rgb2id"]
