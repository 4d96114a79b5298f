"""pix2cap: joint panoptic segmentation and captioning."""

__version__ = "0.1.0"
