"""tools/benchmark.py: the caption-decoding benchmark runs for both caption memories, the
segmentation path agrees with Hugging Face's modules, and every comparison of the benchmark
stops it (BenchmarkDisagreement, exit status 1) when its outputs disagree or hold a NaN."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from pix2cap.modeling.caption_head import DenseCaptionHead

REPO = Path(__file__).resolve().parents[2]
SHAPES_CONFIG = REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"
# The shapes model at toy size: built in about a second, random frozen backbone.
TINY = [
    "MODEL.BACKBONE.WEIGHTS", "",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NHEADS", "2",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "64",
    "MODEL.CAPTION_HEAD.HIDDEN_SIZE", "32", "MODEL.CAPTION_HEAD.NUM_LAYERS", "1",
    "MODEL.CAPTION_HEAD.NUM_HEADS", "2", "MODEL.CAPTION_HEAD.INTERMEDIATE_SIZE", "64",
    "MODEL.CAPTION_HEAD.BOTTLENECK_DIM", "16",
    "MODEL.GROUNDED_HEAD.HIDDEN_SIZE", "32", "MODEL.GROUNDED_HEAD.NUM_LAYERS", "1",
    "MODEL.GROUNDED_HEAD.NUM_HEADS", "2", "MODEL.GROUNDED_HEAD.INTERMEDIATE_SIZE", "64",
    "INPUT.IMAGE_SIZE", "64",
]


def _benchmark_module():
    """tools/benchmark.py, loaded once under the name tools/benchmark_train.py looks up, so
    both share one BenchmarkDisagreement."""
    name = "pix2cap_tools_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tiny_head(memory="query_global"):
    torch.manual_seed(0)
    extra = dict(pixel_dims=(8, 6), max_scene_objects=4) if memory == "scene" else {}
    return DenseCaptionHead(
        query_dim=16, global_dim=12, hidden_size=32, num_layers=1, num_heads=4,
        intermediate_size=64, max_length=8, vocab_size=40, bottleneck_dim=8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, memory=memory, **extra,
    )


@pytest.mark.parametrize("memory", ["query_global", "scene"])
def test_caption_decoding_benchmark(memory):
    head = _tiny_head(memory)
    result = _benchmark_module().bench_caption_decoding(head, 5, torch.device("cpu"), 1)
    assert result["memory"] == memory and result["objects"] == 5
    assert result["tokens"] == 8 and result["same_tokens"]
    assert result["mismatched_tokens"] == 0 and result["max_abs_score_diff"] <= 1e-4
    assert head.eos_token_id == 2  # restored after the run


def test_caption_decoding_disagreement_stops_the_benchmark(monkeypatch):
    """Cached decoding that gets one token of one caption wrong (or a NaN score) stops the
    benchmark, naming the comparison and by how much."""
    bm = _benchmark_module()
    head = _tiny_head()
    original = head.generate

    def wrong_cache(*args, use_cache=True, **kwargs):
        tokens, scores = original(*args, use_cache=use_cache, **kwargs)
        if use_cache:
            tokens = tokens.clone()
            tokens[3, 4] = (tokens[3, 4] + 1) % head.vocab_size
        return tokens, scores

    monkeypatch.setattr(head, "generate", wrong_cache)
    with pytest.raises(bm.BenchmarkDisagreement, match=r"KV-cached vs recompute caption "
                       r"decoding \(tiny\): 1 of 40 tokens differ in 1 of 5 captions"):
        bm.bench_caption_decoding(head, 5, torch.device("cpu"), 1, name="tiny")
    assert head.eos_token_id == 2

    def nan_scores(*args, use_cache=True, **kwargs):
        tokens, scores = original(*args, use_cache=use_cache, **kwargs)
        return tokens, scores * float("nan") if use_cache else scores

    monkeypatch.setattr(head, "generate", nan_scores)
    with pytest.raises(bm.BenchmarkDisagreement, match="5 caption scores are NaN/inf"):
        bm.bench_caption_decoding(head, 5, torch.device("cpu"), 1, name="tiny")


def test_token_check_tolerance_and_nan_scores():
    bm = _benchmark_module()
    tokens = torch.tensor([[1, 5, 6], [1, 7, 8]])
    other = torch.tensor([[1, 5, 6], [1, 7, 9]])
    scores = torch.tensor([-1.0, -2.0])
    same = bm.check_same_tokens("t", (tokens, scores), (tokens.clone(), scores + 1e-6))
    assert same["mismatched_tokens"] == 0
    with pytest.raises(bm.BenchmarkDisagreement, match="1 of 6 tokens differ in 1 of 2"):
        bm.check_same_tokens("t", (tokens, scores), (other, scores))
    # the stated tolerance lets one token through; the scores of the agreeing caption count
    assert bm.check_same_tokens("t", (tokens, scores), (other, scores), 1)["mismatched_tokens"] == 1
    with pytest.raises(bm.BenchmarkDisagreement, match="log-probabilities differ by up to 0.5"):
        bm.check_same_tokens("t", (tokens, scores), (tokens, scores + 0.5))
    with pytest.raises(bm.BenchmarkDisagreement, match="NaN counts as disagreement"):
        bm.check_same_tokens("t", (tokens, scores), (tokens, torch.tensor([-1.0, float("nan")])))


def test_check_close_counts_nan_as_disagreement():
    bm = _benchmark_module()
    ours, theirs = torch.zeros(2, 3), torch.zeros(2, 3)
    report = bm.check_close("cmp", {"x": (ours + 1e-5, theirs)}, atol=1e-4, rtol=0.0)
    assert report["x"]["max_abs_diff"] == pytest.approx(1e-5)
    with pytest.raises(bm.BenchmarkDisagreement, match=r"cmp: x differ by up to 0\.5, beyond"):
        bm.check_close("cmp", {"x": (ours + 0.5, theirs)}, atol=1e-4, rtol=0.0)
    nan = theirs.clone()
    nan[0, 1] = float("nan")
    with pytest.raises(bm.BenchmarkDisagreement, match="cmp: x: 1 NaN/inf values from huggingface"):
        bm.check_close("cmp", {"x": (ours, nan)}, atol=1.0, rtol=0.0)
    # NaN in both at the same place still disagrees (a plain max of |a - b| would say NaN,
    # and Python's max(other, nan) would hide it)
    with pytest.raises(bm.BenchmarkDisagreement, match="from pix2cap and 1 NaN/inf"):
        bm.check_close("cmp", {"ok": (ours, theirs), "x": (nan, nan)}, atol=1.0, rtol=0.0)
    with pytest.raises(bm.BenchmarkDisagreement, match=r"cmp: x: shapes differ"):
        bm.check_close("cmp", {"x": (ours, theirs[:1])}, atol=1.0, rtol=0.0)


@pytest.fixture(scope="module")
def tiny_model_and_cfg():
    pytest.importorskip("transformers")
    from pix2cap.config import load_cfg
    from pix2cap.modeling import build_model

    cfg = load_cfg(str(SHAPES_CONFIG), TINY)
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def _images(n=2, size=64):
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, size, size, generator=generator) * 255} for _ in range(n)]


def test_segmentation_path_against_huggingface_or_skipped(monkeypatch):
    """The HF modules come out of the public Mask2FormerModel and compute our function; where
    the installed release's weights do not map onto ours, the comparison is skipped with the
    reason instead of failing the benchmark."""
    pytest.importorskip("transformers")
    from pix2cap.config import load_cfg
    from pix2cap.modeling import build_model

    benchmark = _benchmark_module()
    cfg = load_cfg(str(SHAPES_CONFIG), [])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    before = {k: v.clone() for k, v in model.transformer_decoder.state_dict().items()}
    inputs = [{"image": torch.rand(3, 64, 64) * 255} for _ in range(2)]
    result = benchmark.bench_segmentation_path(model, cfg, inputs, torch.device("cpu"), 1)
    assert result["batch"] == 2 and result["max_abs_logit_diff"] < 1e-4
    assert set(result["max_abs_diff"]) == {"class logits", "mask logits"}
    # the comparison runs on copies: the model keeps its own weights
    after = model.transformer_decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    def layout_changed(*args, **kwargs):
        raise KeyError("weight names differ: missing ['input_proj.0.bias']")

    import pix2cap.modeling.transformer_decoder.mask2former_decoder as decoder_module

    monkeypatch.setattr(decoder_module, "load_hf_mask2former_decoder_weights", layout_changed)
    result = benchmark.bench_segmentation_path(model, cfg, inputs, torch.device("cpu"), 1)
    assert set(result) == {"skipped"} and "input_proj.0.bias" in result["skipped"]


def _perturbed_decoder_loader(monkeypatch, perturb):
    """Make the HF -> pix2cap decoder converter load the weights, then ``perturb(decoder)``."""
    import pix2cap.modeling.transformer_decoder.mask2former_decoder as decoder_module

    original = decoder_module.load_hf_mask2former_decoder_weights

    def load_then_perturb(decoder, *args, **kwargs):
        original(decoder, *args, **kwargs)
        with torch.no_grad():
            perturb(decoder)

    monkeypatch.setattr(decoder_module, "load_hf_mask2former_decoder_weights", load_then_perturb)


@pytest.mark.parametrize(
    "perturb, message",
    [
        (lambda d: d.class_embed.bias.add_(0.5), r"class logits differ by up to 0\.5"),
        (lambda d: d.mask_embed.layers[-1].weight[0, 0].fill_(float("nan")),
         r"mask logits: \d+ NaN/inf values from pix2cap"),
    ],
    ids=["perturbed", "nan"],
)
def test_segmentation_path_disagreement_stops_the_benchmark(
    tiny_model_and_cfg, monkeypatch, perturb, message
):
    bm = _benchmark_module()
    model, cfg = tiny_model_and_cfg
    inputs = _images()
    assert bm.bench_segmentation_path(model, cfg, inputs, torch.device("cpu"), 1)[
        "max_abs_logit_diff"
    ] < 1e-4
    _perturbed_decoder_loader(monkeypatch, perturb)
    with pytest.raises(bm.BenchmarkDisagreement, match=r"segmentation path \(pix2cap vs Hugging "
                       r"Face Mask2Former\): " + message):
        bm.bench_segmentation_path(model, cfg, inputs, torch.device("cpu"), 1)


def test_device_flag_overrides_the_config_device():
    bm = _benchmark_module()
    assert bm.device_overrides(None) == []
    assert bm.device_overrides("cpu") == ["MODEL.DEVICE", "cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch.cuda.is_available"):
            bm.device_overrides("cuda")
    args = bm.get_parser().parse_args(["--config-file", "x.yaml", "--device", "cpu", "A.B", "1"])
    assert args.device == "cpu" and args.opts == ["A.B", "1"]
