#!/usr/bin/env python
"""Train or evaluate a pix2cap model from a YAML config.

    python tools/train_net.py --config-file configs/shapes/pix2cap_effl0.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume           # continue an interrupted run
    python tools/train_net.py --config-file CFG --num-gpus 2       # 2 GPUs, or 2 CPU processes
    torchrun --nproc-per-node 2 tools/train_net.py --config-file CFG

A failure prints one line, ``error: <file>: <problem>``, and exits 1; the traceback is in
``OUTPUT_DIR/log.txt`` once the run has set it up, and on the console with ``--verbose``
(before the ``KEY VALUE`` overrides).
"""

from __future__ import annotations

import logging

import pix2cap.data  # noqa: F401  (registers the built-in datasets)
import pix2cap.modeling  # noqa: F401  (registers the models)
from pix2cap.checkpoint import Checkpointer
from pix2cap.config import load_cfg
from pix2cap.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from pix2cap.utils import comm
from pix2cap.utils.cli import add_verbose_flag, check_output_dir, main_guard

logger = logging.getLogger("pix2cap.train_net")


def setup(args):
    """The frozen config: defaults, then the config file, then command-line overrides."""
    cfg = load_cfg(args.config_file, args.opts)
    if cfg.OUTPUT_DIR and comm.is_main_process():
        check_output_dir(cfg.OUTPUT_DIR)  # a file there, or a read-only folder: say so now
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = DefaultTrainer.build_model(cfg)
        # Evaluation loads only the weights: no optimizer, scheduler or iteration.
        Checkpointer(
            model, save_dir=cfg.OUTPUT_DIR, partial=cfg.MODEL.WEIGHTS_PARTIAL
        ).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = DefaultTrainer.test(cfg, model)
        if comm.is_main_process():
            logger.info("Evaluation results: %s", results)
        return results
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = add_verbose_flag(default_argument_parser()).parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    main_guard(invoke_main)
