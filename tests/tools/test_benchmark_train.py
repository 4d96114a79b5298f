"""tools/benchmark.py --train (tools/benchmark_train.py) at toy size: it runs, reports the
pix2cap / Hugging Face step-time ratio and the captions' share, and stops (exit status 1, one
line naming the comparison) when the two segmentation models disagree or a loss is NaN."""

import json

import pytest
import torch

from pix2cap.utils.cli import main_guard

from .test_benchmark import REPO, TINY, _benchmark_module

pytest.importorskip("transformers")
pytest.importorskip("scipy")

CONFIG = str(REPO / "configs" / "shapes" / "pix2cap_effl0.yaml")
ONE_STEP = ["--batch-size", "2", "--warmup-steps", "1", "--steps", "1"]


def _argv(*extra):
    return ["--train", "--config-file", CONFIG, *ONE_STEP, *extra, *TINY]


def _train_module():
    return _benchmark_module().load_sibling("benchmark_train")


def test_train_benchmark_reports_the_ratios(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "train.json"
    results = _benchmark_module().main(_argv("--output", str(out)))
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    seg = results["segmentation_step_vs_huggingface"]
    assert seg["ratio_pix2cap_over_hf"] == pytest.approx(seg["pix2cap_ms"] / seg["huggingface_ms"])
    assert seg["trainable_parameters"]["pix2cap"] == seg["trainable_parameters"]["huggingface"]
    assert seg["step0_outputs_agreement"]["max_abs_diff"] < 1e-4
    assert seg["step0_loss_agreement"]["relative_diff"] < 1e-4
    # identical dimensions: only the design notes are listed as differences
    assert all(v["pix2cap"] == v["huggingface"] for v in seg["dimensions"].values())
    cap = results["caption_share_of_training_step"]
    assert {"full_ms", "without_captions_ms", "caption_share", "grounded_caption_share"} <= set(cap)
    assert cap["caption_share"] == pytest.approx(1 - cap["without_captions_ms"] / cap["full_ms"])
    assert cap["captions_added"] == pytest.approx(cap["full_ms"] / cap["without_captions_ms"] - 1)
    assert cap["dense_caption_added"] + cap["grounded_caption_added"] == pytest.approx(
        cap["captions_added"]
    )
    assert results["batch"]["images"] == 2 and results["batch"]["input_size"] == [64, 64]
    printed = capsys.readouterr().out
    assert "ratio pix2cap / HF" in printed and "captions' share of the step" in printed


def test_train_benchmark_stops_when_the_models_disagree(tiny_shapes, monkeypatch, capsys):
    """A perturbed weight after the weights are shared: the step-0 logits differ, the tool
    exits 1 with one line naming the comparison and by how much."""
    train = _train_module()
    original = train.share_weights

    def share_then_perturb(model, hf):
        reason = original(model, hf)
        with torch.no_grad():
            model.transformer_decoder.class_embed.bias.add_(0.5)
        return reason

    monkeypatch.setattr(train, "share_weights", share_then_perturb)
    with pytest.raises(SystemExit) as exit_info:
        main_guard(_benchmark_module().main, _argv())
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "BenchmarkDisagreement: segmentation training step (pix2cap vs Hugging Face " in err
    assert "step-0 outputs: prediction 0 class logits differ by up to 0.5" in err


def test_train_benchmark_nan_loss_counts_as_disagreement(tiny_shapes, monkeypatch):
    bm, train = _benchmark_module(), _train_module()
    original = train.HuggingFaceSegmentationStep.loss_of
    monkeypatch.setattr(
        train.HuggingFaceSegmentationStep, "loss_of",
        lambda self, out: original(self, out) * float("nan"),
    )
    with pytest.raises(bm.BenchmarkDisagreement, match=r"step-0 losses: non-finite losses "
                       r"\{'huggingface': nan\}"):
        bm.main(_argv())
