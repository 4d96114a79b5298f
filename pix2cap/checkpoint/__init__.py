"""Checkpoint saving and loading."""

from .checkpointer import (
    MIN_COVERAGE,
    Checkpointer,
    CheckpointError,
    CheckpointNotFoundError,
    PeriodicCheckpointer,
    atomic_torch_save,
    check_local_weights,
    export_model_weights,
    read_weights_file,
)
