"""Optimizers, gradient clipping and learning-rate schedules."""

from .build import build_gradient_clipper, build_optimizer, get_default_optimizer_params
from .lr_scheduler import LRMultiplier, WarmupParamScheduler, build_lr_scheduler
