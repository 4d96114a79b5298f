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

Datasets without panoptic masks (SA-Pancap: images and captions only) take their prompts
from a Pix2Cap model's decoded segments instead, given by its config and weights::

    python tools/train_bridge_lm.py --dataset sapancap_train --output output/sapancap_lm \
        --config-file CFG --weights model_final.pth [--device cuda] [KEY VALUE ...]

The model runs on every image of the dataset and the bridge turns its output into the prompt
as inference does (``pix2cap.bridge.decoded_pairs.make_decoded_training_pairs``); the target
is the ground-truth caption, each box whose best-IoU decoded entity box reaches
``--align-iou`` rewritten to that entity's box. The model's outputs are cached in
``--cache-dir`` (default: ``<output>_decoded_cache``, beside the output folder, which is
replaced whole when the LM is written), keyed on the weights' content, the config and the
image, so a second run with the same model and dataset does not run the model again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import pix2cap.data  # noqa: F401  (registers the built-in datasets)
from pix2cap.bridge.bridge import make_training_pairs
from pix2cap.bridge.decoded_pairs import (
    CachedDecoder,
    make_decoded_training_pairs,
    model_cache_key,
)
from pix2cap.bridge.lm_training import train_small_lm
from pix2cap.bridge.prompt import PromptFormat
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.errors import DatasetError
from pix2cap.engine.defaults import setup_cfg
from pix2cap.engine.predictor import DefaultPredictor, class_metadata, metadata_from_config
from pix2cap.modeling.caption_head.tokenizer import build_subset_vocab
from pix2cap.utils.cli import add_verbose_flag, main_guard
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
    decoded = parser.add_argument_group(
        "prompts from a model's decoded segments (datasets without masks, e.g. SA-Pancap)"
    )
    decoded.add_argument(
        "--config-file", default="", metavar="FILE",
        help="a Pix2Cap config: build the pairs from this model's outputs on the dataset's "
        "images instead of from ground-truth masks",
    )
    decoded.add_argument("--weights", default="", help="the model's weights (MODEL.WEIGHTS)")
    decoded.add_argument(
        "--device", default="", help="MODEL.DEVICE, e.g. cuda (default: the config's)"
    )
    decoded.add_argument("--min-segment-score", type=float, default=0.0)
    decoded.add_argument("--extra-instance-threshold", type=float, default=0.5)
    decoded.add_argument(
        "--align-iou", type=float, default=0.5,
        help="a caption box is rewritten to the decoded entity box it overlaps most when their "
        "IoU reaches this",
    )
    decoded.add_argument(
        "--cache-dir", default="",
        help="where the model's outputs are kept (default: <output>_decoded_cache)",
    )
    decoded.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. INPUT.MIN_SIZE_TEST 512",
    )
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    decoded_flags = [
        f for f, given in (("--weights", args.weights), ("--device", args.device),
                           ("--cache-dir", args.cache_dir), ("KEY VALUE overrides", args.opts))
        if given
    ]
    if not args.config_file and decoded_flags:
        parser.error(
            f"{', '.join(decoded_flags)}: only with --config-file (a model to decode with)"
        )
    setup_logger(name="pix2cap")

    # One prompt form for the pairs and for the saved LM, which its writer reads back.
    prompt_format = PromptFormat(ground_region_captions=args.ground_region_captions)
    decoding: dict = {}
    if args.config_file:
        pairs, decoding = _decoded_pairs(args, prompt_format)
    else:
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
        **decoding,
    }
    print(json.dumps(summary, indent=2))
    return summary


def _decoded_pairs(args, prompt_format: PromptFormat) -> tuple[list[dict], dict]:
    """Pairs from the model of ``--config-file`` / ``--weights`` (cached outputs), and what
    the run did: model runs, cache hits, caption boxes aligned and left as written."""
    args.opts = list(args.opts or [])
    # The flags come last so that they win over the same keys among the overrides.
    if args.weights:
        args.opts += ["MODEL.WEIGHTS", args.weights]
    if args.device:
        args.opts += ["MODEL.DEVICE", args.device]
    cfg = setup_cfg(args)
    cache_dir = args.cache_dir or os.path.normpath(args.output) + "_decoded_cache"
    decoder = CachedDecoder(
        lambda: DefaultPredictor(cfg),
        cache_dir,
        model_cache_key(cfg),
        describe={"config_file": os.path.abspath(args.config_file), "opts": args.opts,
                  "weights": os.path.abspath(cfg.MODEL.WEIGHTS)},
    )
    pairs = make_decoded_training_pairs(
        DatasetCatalog.get(args.dataset),
        decoder,
        metadata=class_metadata(cfg, metadata_from_config(cfg)),
        prompt_format=prompt_format,
        min_segment_score=args.min_segment_score,
        extra_instance_threshold=args.extra_instance_threshold,
        align_iou=args.align_iou,
    )
    if not pairs:
        raise DatasetError(f"{args.dataset}: no image has a panoptic_caption to train on")
    caption_boxes = sum(p["caption_boxes"] for p in pairs)
    aligned_boxes = sum(p["aligned_boxes"] for p in pairs)
    return pairs, {
        "decoded_by": {"config_file": args.config_file, "weights": cfg.MODEL.WEIGHTS},
        "cache_dir": decoder.folder,
        "model_runs": decoder.runs,
        "cache_hits": decoder.hits,
        "caption_boxes": caption_boxes,
        "aligned_boxes": aligned_boxes,
        "unaligned_boxes": caption_boxes - aligned_boxes,
    }


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
