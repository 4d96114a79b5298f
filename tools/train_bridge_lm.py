#!/usr/bin/env python
"""Train the bridge's small language model on a dataset's panoptic captions (CPU is enough).

    python tools/train_bridge_lm.py --dataset shapes_train --output model_zoo/shapes/bridge_small_lm

Pairs are built from the ground-truth segments exactly as inference builds the prompt from
decoded ones (``pix2cap.bridge.bridge.make_training_pairs``): the stage-4 prompt with boxes
and tags, plus the region captions (relation clauses tied to the listed entities, see
``pix2cap.bridge.grounding.grounded_caption``) -> the ground-truth panoptic caption. The
prompt form (``pix2cap.bridge.prompt.PromptFormat``) is saved with the model. The
vocabulary is the WordPiece subset those texts use, plus every grid number (0-1000), so
tokenization is BERT uncased WordPiece with a much smaller output layer (see
``build_subset_vocab``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import pix2cap.data  # noqa: F401  (registers the built-in datasets)
from pix2cap.bridge.bridge import make_training_pairs
from pix2cap.bridge.lm_training import train_small_lm
from pix2cap.bridge.prompt import PromptFormat
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.modeling.caption_head.tokenizer import build_subset_vocab
from pix2cap.utils.file_io import atomic_write_text
from pix2cap.utils.logger import setup_logger


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="train the bridge's small LM")
    parser.add_argument("--dataset", default="shapes_train")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument(
        "--max-target-tokens", type=int, default=480,
        help="caption budget; the prompt gets the rest of the 1024 positions",
    )
    parser.add_argument(
        "--raw-region-captions", dest="ground_region_captions", action="store_false",
        help="give region captions as written, without tying their relation clauses to the "
        "listed entities (pix2cap.bridge.grounding.grounded_caption)",
    )
    parser.add_argument(
        "--no-copy-head", dest="copy_head", action="store_false",
        help="a plain GPT-2 without the pointer head that copies words from the prompt",
    )
    args = parser.parse_args(argv)
    setup_logger(name="pix2cap")

    # One prompt form for the pairs and for the saved LM, which its writer reads back.
    prompt_format = PromptFormat(ground_region_captions=args.ground_region_captions)
    pairs = make_training_pairs(
        DatasetCatalog.get(args.dataset),
        metadata=MetadataCatalog.get(args.dataset),
        prompt_format=prompt_format,
    )
    texts = [p["prompt"] for p in pairs] + [p["target"] for p in pairs]
    texts.append(" ".join(str(i) for i in range(1001)))  # every grid coordinate
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.txt")
        atomic_write_text(vocab_file, "\n".join(build_subset_vocab(texts)) + "\n")
        result = train_small_lm(
            pairs,
            args.output,
            args.steps,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            max_target_tokens=args.max_target_tokens,
            batch_size=args.batch_size,
            prompt_format=prompt_format,
            copy_head=args.copy_head,
            lr=args.lr,
            vocab_file=vocab_file,
        )
    summary = {
        "dataset": args.dataset,
        "pairs": len(pairs),
        "steps": args.steps,
        "seconds": round(result["seconds"], 1),
        "copy_head": args.copy_head,
        "ground_region_captions": args.ground_region_captions,
        "num_parameters": result["num_parameters"],
        "bytes": result["bytes"],
        "first_loss": round(result["losses"][0], 4),
        "last_loss": round(sum(result["losses"][-20:]) / len(result["losses"][-20:]), 4),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
