"""Checkpoint saving and loading."""

from .checkpointer import (
    Checkpointer,
    CheckpointError,
    PeriodicCheckpointer,
    atomic_torch_save,
    export_model_weights,
)
