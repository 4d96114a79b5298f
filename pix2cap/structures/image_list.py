"""``ImageList``: images of different sizes batched into one padded tensor."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ImageList"]


class ImageList:
    """A batch of images padded to a common size.

    Attributes:
        tensor: [B, C, H, W], each image at the top left, padded on the bottom and right.
        image_sizes: the ``(h, w)`` of each image before padding, in batch order.
    """

    def __init__(self, tensor: torch.Tensor, image_sizes: list[tuple[int, int]]):
        if tensor.dim() != 4 or tensor.shape[0] != len(image_sizes):
            raise ValueError(
                f"ImageList needs a [B, C, H, W] tensor with B = {len(image_sizes)} image sizes, "
                f"got shape {tuple(tensor.shape)}"
            )
        self.tensor = tensor
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` without its padding: [C, h, w]."""
        h, w = self.image_sizes[index]
        return self.tensor[index, ..., :h, :w]

    def to(self, *args: Any, **kwargs: Any) -> "ImageList":
        return ImageList(self.tensor.to(*args, **kwargs), self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @staticmethod
    def from_tensors(
        tensors: Sequence[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0
    ) -> "ImageList":
        """Pad images [C, Hi, Wi] (same C, dtype and device) into one [B, C, H, W] batch.

        ``H``/``W`` are the largest ``Hi``/``Wi``, rounded up to a multiple of
        ``size_divisibility`` when it is > 0 (backbones with stride 32 need it).
        """
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs at least one image")
        channels = tensors[0].shape[:-2]
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                raise TypeError(f"expected image tensors [C, H, W], got {type(t)}")
            if t.shape[:-2] != channels:
                raise ValueError(
                    f"images differ in leading dims: {tuple(channels)} vs {tuple(t.shape[:-2])}"
                )
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in image_sizes)
        max_w = max(w for _, w in image_sizes)
        if size_divisibility > 1:
            max_h = -(-max_h // size_divisibility) * size_divisibility
            max_w = -(-max_w // size_divisibility) * size_divisibility

        if len(tensors) == 1:
            # One image: F.pad avoids allocating and copying into a fresh batch tensor.
            h, w = image_sizes[0]
            padded = F.pad(tensors[0], (0, max_w - w, 0, max_h - h), value=pad_value)
            return ImageList(padded.unsqueeze(0).contiguous(), image_sizes)

        batch = tensors[0].new_full((len(tensors), *channels, max_h, max_w), pad_value)
        for i, t in enumerate(tensors):
            batch[i, ..., : t.shape[-2], : t.shape[-1]].copy_(t)
        return ImageList(batch, image_sizes)
