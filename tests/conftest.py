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
