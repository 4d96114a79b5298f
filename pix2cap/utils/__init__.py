"""Shared utilities: distributed helpers, event storage and metric writers, logging, seeding."""

from . import comm
from .env import derive_seed, seed_all_rng
from .events import (
    CommonMetricPrinter,
    EventStorage,
    EventWriter,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
)
from .logger import setup_logger
