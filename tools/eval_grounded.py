#!/usr/bin/env python
"""Score grounded captions (PGC) on a dataset: the model's own, or the baseline writer's.

    python tools/eval_grounded.py --config-file configs/shapes/pix2cap_effl0.yaml \\
        --dataset shapes_val --writer head --output out/head \\
        MODEL.WEIGHTS model_zoo/shapes/pix2cap_effl0.safetensors
    python tools/eval_grounded.py ... --writer baseline --output out/baseline

``--writer head`` scores the ``grounded_caption`` the model's grounded caption head writes
(``MODEL.GROUNDED_HEAD.ENABLED``); ``--writer baseline`` replaces it, image by image, with the
deterministic caption :func:`~pix2cap.bridge.grounded_writer.compose_grounded_caption` composes
from the same decoded segments and their dense captions, every mention tagged with its
segment's id: the reference any grounded head has to beat. Both are scored by the same
:class:`~pix2cap.evaluation.GroundedCaptionEvaluator` (caption metrics and GLaMM's GCG mIoU,
recall and AP50), so the numbers compare directly.

Writes ``<output>/grounded_results.json`` and ``grounded_caption_predictions.json``, and prints
the metrics.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from torch import nn

import pix2cap.data  # noqa: F401  (registers the built-in datasets and their metadata)
from pix2cap.bridge.grounded_writer import baseline_grounded_caption
from pix2cap.checkpoint import Checkpointer
from pix2cap.data.build import build_test_loader
from pix2cap.data.catalog import MetadataCatalog
from pix2cap.engine.defaults import setup_cfg
from pix2cap.evaluation import GroundedCaptionEvaluator, inference_on_dataset
from pix2cap.evaluation.results import print_results_table, write_results_json
from pix2cap.modeling import build_model
from pix2cap.utils.cli import add_verbose_flag, main_guard
from pix2cap.utils.logger import setup_logger

logger = logging.getLogger("pix2cap.eval_grounded")

WRITERS = ("head", "baseline")


class BaselineGroundedWriter(nn.Module):
    """Wraps a model: each output's ``grounded_caption`` becomes the baseline writer's,
    composed from the output's own panoptic segments and dense captions."""

    def __init__(self, model: nn.Module, metadata):
        super().__init__()
        self.model = model
        self.metadata = metadata

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        outputs = self.model(batched_inputs)
        for output in outputs:
            size = tuple(output["panoptic_seg"][0].shape[-2:])
            output["grounded_caption"] = baseline_grounded_caption(output, self.metadata, size)
            output.pop("grounded_phrase_masks", None)
        return outputs


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grounded-caption (PGC) metrics of the model's head or the baseline writer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config")
    parser.add_argument("--dataset", required=True, help="a registered dataset, e.g. shapes_val")
    parser.add_argument("--writer", default="head", choices=WRITERS)
    parser.add_argument("--output", required=True, help="folder for the results")
    parser.add_argument(
        "--phrase-embedder", default=None,
        help="local sentence-transformers folder for phrase similarity (default: MiniLM)",
    )
    add_verbose_flag(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(args) -> dict:
    setup_logger(name="pix2cap")
    cfg = setup_cfg(args)
    if args.writer == "head" and not cfg.MODEL.GROUNDED_HEAD.ENABLED:
        raise ValueError(
            f"--writer head needs a grounded caption head; {args.config_file or 'the config'} "
            "has MODEL.GROUNDED_HEAD.ENABLED False (use --writer baseline)"
        )
    model = build_model(cfg)
    Checkpointer(model, partial=cfg.MODEL.WEIGHTS_PARTIAL).load(cfg.MODEL.WEIGHTS)
    if args.writer == "baseline":
        model = BaselineGroundedWriter(model, MetadataCatalog.get(args.dataset))
    os.makedirs(args.output, exist_ok=True)
    evaluator = GroundedCaptionEvaluator(
        dataset_name=args.dataset, output_dir=args.output, phrase_embedder=args.phrase_embedder
    )
    with torch.no_grad():
        results = inference_on_dataset(model, build_test_loader(cfg, args.dataset), evaluator)
    results = {f"{task} ({args.writer})": metrics for task, metrics in results.items()}
    print_results_table(results)
    write_results_json(results, os.path.join(args.output, "grounded_results.json"))
    return results


if __name__ == "__main__":
    parsed = get_parser().parse_args()
    main_guard(main, parsed)
