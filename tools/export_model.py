#!/usr/bin/env python
"""Export the model weights of a training checkpoint as .safetensors (for the model zoo).

    python tools/export_model.py output/shapes_pix2cap_effl0/model_final.pth \\
        model_zoo/shapes/pix2cap_effl0.safetensors
"""

import argparse
import sys

from pix2cap.checkpoint import export_model_weights
from pix2cap.utils.cli import add_verbose_flag, main_guard


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="training checkpoint -> model .safetensors")
    parser.add_argument("checkpoint", help="a .pth written by tools/train_net.py")
    parser.add_argument("output", help="the .safetensors file to write")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    info = export_model_weights(args.checkpoint, args.output)
    print(f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB -> {args.output}")
    return info


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
