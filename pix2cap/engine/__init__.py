"""Training engine: the loop and its hooks, the default trainer, and the process launcher."""

from . import hooks
from .defaults import (
    IMAGE_EXTENSIONS,
    DefaultTrainer,
    collect_image_files,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    setup_cfg,
)
from .launch import launch
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
