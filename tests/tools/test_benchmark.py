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


def test_segmentation_path_against_huggingface_or_skipped(monkeypatch):
    """The HF modules come out of the public Mask2FormerModel and compute our function; where
    the installed release's weights do not map onto ours, the comparison is skipped with the
    reason instead of failing the benchmark."""
    pytest.importorskip("transformers")
    from pix2cap.config import load_cfg
    from pix2cap.modeling import build_model

    benchmark = _benchmark_module()
    cfg = load_cfg(str(REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"), [])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 64, 64) * 255} for _ in range(2)]
    result = benchmark.bench_segmentation_path(model, cfg, inputs, torch.device("cpu"), 1)
    assert result["batch"] == 2 and result["max_abs_logit_diff"] < 1e-4

    def layout_changed(*args, **kwargs):
        raise KeyError("weight names differ: missing ['input_proj.0.bias']")

    import pix2cap.modeling.transformer_decoder.mask2former_decoder as decoder_module

    monkeypatch.setattr(decoder_module, "load_hf_mask2former_decoder_weights", layout_changed)
    result = benchmark.bench_segmentation_path(model, cfg, inputs, torch.device("cpu"), 1)
    assert set(result) == {"skipped"} and "input_proj.0.bias" in result["skipped"]
