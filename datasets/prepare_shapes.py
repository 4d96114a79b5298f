#!/usr/bin/env python
"""Generate the built-in synthetic "shapes" dataset.

Examples::

    python datasets/prepare_shapes.py                      # train (1000) + val (100) at 256 px
    python datasets/prepare_shapes.py --root /tmp/shapes --num-train 50 --num-val 10 --image-size 128
    # compositional split: train without red circles / blue stars, a test split made of them
    python datasets/prepare_shapes.py --splits train val --holdout red:circle,blue:star
    python datasets/prepare_shapes.py --splits comp_test --holdout red:circle,blue:star --holdout-only

The default root is ``$PIX2CAP_DATASETS/shapes`` (``$PIX2CAP_DATASETS`` defaults to ``./datasets``).
A split that already exists with the same parameters is kept unless ``--force`` is given.
"""

import argparse
import os
import sys
import time

from pix2cap.data.datasets.shapes import (
    DEFAULT_NUM_IMAGES,
    ensure_shapes,
    generate_shapes,
    parse_holdout_pairs,
    read_shapes_meta,
)


def default_root() -> str:
    return os.path.join(os.environ.get("PIX2CAP_DATASETS", "./datasets"), "shapes")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_root(), help="output folder (default: %(default)s)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split names to generate")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_IMAGES["train"], help="images in 'train'")
    parser.add_argument(
        "--num-val", type=int, default=DEFAULT_NUM_IMAGES["val"], help="images in every split other than 'train'"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    parser.add_argument(
        "--holdout", default="", help="colour:shape pairs kept out of the splits, e.g. red:circle,blue:star"
    )
    parser.add_argument(
        "--holdout-only",
        action="store_true",
        help="make every image contain a held-out pair (the compositional test split)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate splits that already exist")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        holdout = parse_holdout_pairs(args.holdout)
    except ValueError as e:
        print(f"error: --holdout: {e}", file=sys.stderr)
        return 2
    if args.holdout_only and not holdout:
        print("error: --holdout-only needs --holdout", file=sys.stderr)
        return 2
    for split in args.splits:
        options = dict(
            num_images=args.num_train if split == "train" else args.num_val,
            image_size=args.image_size,
            seed=args.seed,
            holdout_pairs=holdout,
            include_holdout_only=args.holdout_only,
        )
        start = time.perf_counter()
        if args.force:
            generate_shapes(args.root, split, overwrite=True, **options)
        else:
            ensure_shapes(args.root, split, **options)
        meta = read_shapes_meta(args.root)["splits"][split]
        print(
            f"shapes/{split}: {meta['num_images']} images of {meta['image_size']} px, "
            f"{meta['num_things']} things, in {args.root} ({time.perf_counter() - start:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
