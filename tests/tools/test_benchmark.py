"""tools/benchmark.py's caption-decoding benchmark runs for both caption memories."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pix2cap.modeling.caption_head import DenseCaptionHead

REPO = Path(__file__).resolve().parents[2]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("pix2cap_benchmark", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("memory", ["query_global", "scene"])
def test_caption_decoding_benchmark(memory):
    torch.manual_seed(0)
    extra = dict(pixel_dims=(8, 6), max_scene_objects=4) if memory == "scene" else {}
    head = DenseCaptionHead(
        query_dim=16, global_dim=12, hidden_size=32, num_layers=1, num_heads=4,
        intermediate_size=64, max_length=8, vocab_size=40, bottleneck_dim=8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, memory=memory, **extra,
    )
    result = _benchmark_module().bench_caption_decoding(head, 5, torch.device("cpu"), 1)
    assert result["memory"] == memory and result["objects"] == 5
    assert result["tokens"] == 8 and result["same_tokens"]
    assert head.eos_token_id == 2  # restored after the run
