import os

import pytest
import torch

# Tests run on small CPUs: one intra-op thread keeps them fast and repeatable.
torch.set_num_threads(1)


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    """A fresh $PIX2CAP_DATASETS for one test."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("PIX2CAP_DATASETS", str(root))
    return root


@pytest.fixture
def tiny_shapes(datasets_root):
    """Six 64 x 64 shapes images per split under a fresh $PIX2CAP_DATASETS; returns the
    environment for a subprocess (e.g. ``tools/train_net.py``) that trains on them."""
    # Imported on use: every test session loads this file, few tests generate datasets.
    from pix2cap.data.datasets.shapes import generate_shapes

    # A complete split on disk is used as it is, so the built-in names load these tiny ones.
    for split in ("train", "val"):
        generate_shapes(str(datasets_root / "shapes"), split, num_images=6, image_size=64, seed=1)
    env = dict(os.environ, PIX2CAP_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(autouse=True)
def _restore_framework_loggers():
    """``setup_logger`` (called by ``default_setup`` in some tests) adds handlers and turns off
    propagation, which would hide later tests' records from ``caplog``; undo it per test."""
    import logging

    loggers = [logging.getLogger(name) for name in ("pix2cap", "fvcore")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    yield
    for lg, (handlers, propagate, level) in zip(loggers, saved):
        for handler in lg.handlers[:]:
            if handler not in handlers:
                lg.removeHandler(handler)
                handler.close()
        lg.propagate, lg.level = propagate, level
