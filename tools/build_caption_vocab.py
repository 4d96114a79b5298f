#!/usr/bin/env python
"""Write the WordPiece subset vocabulary that a dataset's captions use.

    python tools/build_caption_vocab.py --dataset shapes_train --output configs/shapes/shapes_vocab.txt

The result keeps BERT uncased WordPiece tokenization of those captions (see
``pix2cap.modeling.caption_head.tokenizer.build_subset_vocab``); set
``MODEL.CAPTION_HEAD.VOCAB_FILE`` to it. The caption head takes its vocabulary size (the line
count) and the ``[PAD]`` / ``[CLS]`` / ``[SEP]`` ids (0, 2, 3) from that file's tokenizer.
"""

from __future__ import annotations

import argparse
import sys

import pix2cap.data  # noqa: F401  (registers the built-in datasets)
from pix2cap.data.catalog import DatasetCatalog
from pix2cap.modeling.caption_head.tokenizer import build_subset_vocab
from pix2cap.utils.cli import add_verbose_flag, main_guard
from pix2cap.utils.file_io import atomic_write_text


def dataset_captions(names: list[str]) -> list[str]:
    """Every segment description, grounded caption and panoptic caption of the datasets."""
    captions = []
    for name in names:
        for record in DatasetCatalog.get(name):
            captions += [s["description"] for s in record.get("segments_info", []) if s.get("description")]
            if record.get("grounded_caption"):
                captions.append(record["grounded_caption"]["text"])
            if record.get("panoptic_caption"):
                captions.append(record["panoptic_caption"])
    return captions


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--dataset", nargs="+", required=True, help="registered dataset names")
    parser.add_argument("--output", required=True, help="vocab.txt to write")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    captions = dataset_captions(args.dataset)
    if not captions:
        raise SystemExit(f"datasets {args.dataset} have no captions")
    vocab = build_subset_vocab(captions)
    atomic_write_text(args.output, "\n".join(vocab) + "\n")
    print(f"{len(vocab)} tokens from {len(captions)} captions -> {args.output}")
    return args.output


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
