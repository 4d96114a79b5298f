"""A per-pixel classifier used to exercise the data, training and evaluation pipeline.

This is a pipeline baseline, not the Pix2Cap model: it has no backbone, no queries, no masks
and no captions. It exists so the engine, loaders, checkpointing and evaluators can be run
end to end (on the CPU, on the built-in shapes dataset) before and independently of the real
model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config import configurable
from pix2cap.structures import ImageList

from .build import META_ARCH_REGISTRY

__all__ = ["PixelBaseline"]


@META_ARCH_REGISTRY.register()
class PixelBaseline(nn.Module):
    """Semantic segmentation with a small conv stack (a pipeline baseline, not Pix2Cap).

    ``num_layers`` 3x3 conv + ReLU layers of ``hidden_dim`` channels, the first
    ``log2(stride)`` of them with stride 2, then a 1x1 classifier; logits at ``1/stride`` are
    upsampled bilinearly to the input size.

    Inputs (``forward``): ``list[dict]``, each with ``"image"`` uint8/float Tensor[3, Hi, Wi]
    (RGB, 0-255) and, in training, ``"sem_seg"`` Long Tensor[Hi, Wi] (``ignore_value`` = not
    annotated); in eval, optional ``"height"``/``"width"`` (original size to resize to).

    Outputs: training ``{"loss_sem_seg": 0-dim Tensor}`` (pixel-averaged cross-entropy);
    eval ``list[{"sem_seg": Float Tensor[num_classes, height, width]}]`` of per-class
    probabilities (softmax over classes) at the original image size.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        hidden_dim: int = 16,
        num_layers: int = 3,
        stride: int = 4,
        ignore_value: int = 255,
    ):
        super().__init__()
        if stride < 1 or stride & (stride - 1):
            raise ValueError(f"stride must be a power of two, got {stride}")
        num_down = int(math.log2(stride))
        if num_layers < max(num_down, 1):
            raise ValueError(
                f"num_layers={num_layers} cannot reach stride {stride} ({num_down} stride-2 layers)"
            )
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("pixel_mean and pixel_std need one value per RGB channel")
        layers: list[nn.Module] = []
        in_channels = 3
        for i in range(num_layers):
            layers.append(
                nn.Conv2d(in_channels, hidden_dim, 3, stride=2 if i < num_down else 1, padding=1)
            )
            layers.append(nn.ReLU(inplace=True))
            in_channels = hidden_dim
        self.features = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(hidden_dim, num_classes, 1)
        self.num_classes = num_classes
        self.stride = stride
        self.ignore_value = ignore_value
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "hidden_dim": cfg.MODEL.PIXEL_BASELINE.HIDDEN_DIM,
            "num_layers": cfg.MODEL.PIXEL_BASELINE.NUM_LAYERS,
            "stride": cfg.MODEL.PIXEL_BASELINE.STRIDE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: list[dict]):
        images = [
            (x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        # Padding to a multiple of the stride keeps logits and pixels aligned after upsampling.
        image_list = ImageList.from_tensors(images, size_divisibility=self.stride)
        logits = self.predictor(self.features(image_list.tensor))
        logits = F.interpolate(
            logits, size=image_list.tensor.shape[-2:], mode="bilinear", align_corners=False
        )  # [B, num_classes, H, W]

        if self.training:
            if any("sem_seg" not in x for x in batched_inputs):
                raise KeyError("PixelBaseline needs 'sem_seg' in every training input")
            targets = ImageList.from_tensors(
                [x["sem_seg"].to(self.device).long()[None] for x in batched_inputs],
                size_divisibility=self.stride,
                pad_value=self.ignore_value,
            ).tensor[:, 0]  # [B, H, W]
            loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value)
            if not torch.isfinite(loss) and bool((targets == self.ignore_value).all()):
                # A batch with no labelled pixel carries no signal; keep the graph, add zero.
                loss = logits.sum() * 0.0
            return {"loss_sem_seg": loss}

        results = []
        for i, (logit, (h, w)) in enumerate(zip(logits, image_list.image_sizes)):
            height = int(batched_inputs[i].get("height", h))
            width = int(batched_inputs[i].get("width", w))
            logit = logit[:, :h, :w]
            if (height, width) != (h, w):
                logit = F.interpolate(
                    logit[None], size=(height, width), mode="bilinear", align_corners=False
                )[0]
            results.append({"sem_seg": logit.softmax(dim=0)})
        return results
