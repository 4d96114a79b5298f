"""The shape of one feature map, as a backbone or pixel decoder advertises it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

__all__ = ["ShapeSpec"]


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and output stride of a feature map (detectron2's ``ShapeSpec``).

    ``height``/``width`` stay ``None`` for fully convolutional backbones, whose spatial size
    follows the input. Fields read as attributes (``spec.channels``) or, for code written
    against plain dicts, as keys (``spec["channels"]``).
    """

    channels: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None

    def __getitem__(self, key: str) -> Optional[int]:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)
