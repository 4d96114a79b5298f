#!/usr/bin/env python
"""Inference benchmark of a Pix2Cap model (a script, not a test: timings are noisy).

    python tools/benchmark.py --config-file configs/shapes/pix2cap_effl0.yaml \\
        MODEL.WEIGHTS model_zoo/shapes/pix2cap_effl0.safetensors
    python tools/benchmark.py --train --config-file configs/shapes/pix2cap_effl0.yaml

Reports, on the config's device (``--device`` or ``MODEL.DEVICE``), in one process:
  1. inference images/s (batch 1, test-time size, captions included) and peak memory;
  2. the segmentation path (pixel decoder + transformer decoder) against Hugging Face's
     Mask2Former modules of identical dimensions with the same weights, on the same backbone
     features: time of each and their ratio;
  3. the caption stage's share of inference time;
  4. key/value-cached against full-recompute caption decoding (same tokens, speed ratio), on the
     model's own caption head and on a paper-size head (768 wide, 6 layers, 30,522 tokens).

``--train`` runs the training-step benchmark instead (``tools/benchmark_train.py``: pix2cap's
segmentation training step against Hugging Face's ``Mask2FormerForUniversalSegmentation``, and
the caption heads' share of pix2cap's training step).

Every comparison is a check, made before anything is timed: outputs that disagree beyond the
stated tolerance, or that hold a NaN/inf, stop the benchmark with ``BenchmarkDisagreement``
(exit status 1, one line naming the comparison, the output and by how much):
  * segmentation path: class and mask logits, ``|ours - HF| <= atol + rtol * max|HF|`` per
    output (``--seg-atol`` 1e-3, ``--seg-rtol`` 1e-4), computed in full fp32 (TF32 off);
  * caption decoding: at most ``--max-token-mismatch`` (0) differing tokens, and the captions'
    mean log-probabilities within ``--score-atol`` (1e-4) where the tokens agree;
  * ``--train``: step-0 logits of every prediction (as above), step-0 losses (``--loss-rtol``
    1e-3) and every training loss finite (see ``tools/benchmark_train.py``).

The comparison with Hugging Face runs on copies of the model's pixel decoder and transformer
decoder that take HF's randomly initialised weights; the model keeps its own.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

import pix2cap.data  # noqa: F401  (registers the built-in datasets)
from pix2cap.checkpoint import Checkpointer
from pix2cap.config import load_cfg
from pix2cap.data import DatasetCatalog
from pix2cap.data.detection_utils import read_image
from pix2cap.data.transforms import ResizeShortestEdge, apply_augmentations
from pix2cap.modeling import build_model
from pix2cap.modeling.caption_head import DenseCaptionHead
from pix2cap.utils.cli import add_verbose_flag, main_guard
from pix2cap.utils.file_io import atomic_write_text

# tools/ is no package: the training benchmark finds this module (its shared checks) under
# this name, whether it was run as a script, imported by a test or loaded by the other.
MODULE_NAME = "pix2cap_tools_benchmark"
if sys.modules.get(__name__) is not None:
    sys.modules.setdefault(MODULE_NAME, sys.modules[__name__])

SEG_ATOL = 1e-3
SEG_RTOL = 1e-4
SCORE_ATOL = 1e-4


class BenchmarkDisagreement(RuntimeError):
    """Two computations the benchmark compares disagree beyond its tolerance, or give NaN/inf."""


# ---------------------------------------------------------------------------------------------
# Checks shared by the inference and the training benchmark
# ---------------------------------------------------------------------------------------------
def tensor_difference(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """``max |ours - theirs|`` where both are finite, the scale ``max |theirs|`` and how many
    elements of each are NaN/inf (a plain ``(a - b).abs().max()`` turns a NaN into the answer,
    and Python's ``max(x, nan)`` drops it again: neither says which side it came from)."""
    if tuple(ours.shape) != tuple(theirs.shape):
        raise BenchmarkDisagreement(
            f"shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
        )
    a = ours.detach().float()
    b = theirs.detach().to(a.device).float()
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    both = finite_a & finite_b
    diff = torch.where(both, (a - b).abs(), torch.zeros_like(a))
    scale = torch.where(finite_b, b.abs(), torch.zeros_like(b))
    return {
        "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
        "max_abs_reference": float(scale.max()) if scale.numel() else 0.0,
        "nonfinite_ours": int((~finite_a).sum()),
        "nonfinite_theirs": int((~finite_b).sum()),
        "numel": int(a.numel()),
    }


def check_close(
    comparison: str,
    pairs: Mapping[str, tuple],
    atol: float,
    rtol: float,
    names: tuple[str, str] = ("pix2cap", "huggingface"),
) -> dict:
    """Check that each ``name: (ours, theirs)`` pair agrees: finite everywhere and
    ``max |ours - theirs| <= atol + rtol * max |theirs|``.

    Returns ``{name: {"max_abs_diff", "tolerance", ...}}``; raises
    :class:`BenchmarkDisagreement` naming ``comparison``, every output that disagrees and by
    how much, those with NaN/inf first (a NaN upstream often leaves later outputs finite but
    wrong: a NaN mask logit, for one, opens that query's masked attention everywhere).
    """
    report, nonfinite, beyond = {}, [], []
    for name, (ours, theirs) in pairs.items():
        try:
            stats = tensor_difference(ours, theirs)
        except BenchmarkDisagreement as e:
            raise BenchmarkDisagreement(f"{comparison}: {name}: {e}") from None
        tolerance = atol + rtol * stats["max_abs_reference"]
        stats["tolerance"] = tolerance
        report[name] = stats
        bad = []
        if stats["nonfinite_ours"]:
            bad.append(f"{stats['nonfinite_ours']} NaN/inf values from {names[0]}")
        if stats["nonfinite_theirs"]:
            bad.append(f"{stats['nonfinite_theirs']} NaN/inf values from {names[1]}")
        if bad:
            nonfinite.append(
                f"{name}: {' and '.join(bad)} (of {stats['numel']}; NaN counts as "
                f"disagreement; finite elements differ by up to {stats['max_abs_diff']:.3g})"
            )
        elif not stats["max_abs_diff"] <= tolerance:
            beyond.append(
                f"{name} differ by up to {stats['max_abs_diff']:.3g}, beyond the tolerance "
                f"{tolerance:.3g} (atol {atol:g} + rtol {rtol:g} x max |{names[1]}| "
                f"{stats['max_abs_reference']:.3g})"
            )
    problems = nonfinite + beyond
    if problems:
        more = f"; and {len(problems) - 3} more outputs" if len(problems) > 3 else ""
        raise BenchmarkDisagreement(f"{comparison}: " + "; ".join(problems[:3]) + more)
    return report


def check_finite(what: str, values: Mapping[str, torch.Tensor]) -> dict:
    """``{name: float}`` of scalar losses; raises :class:`BenchmarkDisagreement` naming
    ``what`` and the losses that are NaN/inf."""
    out = {name: float(v.detach().float().sum()) for name, v in values.items()}
    bad = {name: v for name, v in out.items() if not np.isfinite(v)}
    if bad:
        raise BenchmarkDisagreement(f"{what}: non-finite losses {bad}")
    return out


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_alternating(fns: Mapping[str, object], device, repeats: int) -> dict:
    """``{name: median seconds}`` of each ``fns[name]()`` over ``repeats`` (>= 1) rounds that
    run every function once in turn (no warm-up: the agreement check before ran each once), so
    that load from other processes on a shared machine falls on all of them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


@contextmanager
def full_fp32(device: torch.device):
    """No TF32 matmuls/convolutions (CUDA's default for convolutions) inside: checks compare
    the fp32 results of both implementations, not the rounding of their kernels."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextmanager
def _time_calls(module, method: str, totals: dict):
    """Add the wall time of every ``module.<method>`` call to ``totals[method]``."""
    original = getattr(module, method)
    device = next(module.parameters()).device

    def wrapped(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        totals[method] = totals.get(method, 0.0) + time.perf_counter() - start
        return out

    setattr(module, method, wrapped)
    try:
        yield
    finally:
        setattr(module, method, original)


@contextmanager
def quiet_transformers():
    """Silence transformers' "resnet is not a supported backbone" notes: its backbone never
    runs here (public ``transformers.logging`` API)."""
    try:
        from transformers import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def register_plain_module_lists(hf_model: torch.nn.Module) -> list[str]:
    """Some transformers releases (5.17) keep ``Mask2FormerTransformerModule.input_projections``
    in a plain Python list: those 1x1 convolutions are then no parameters of the model (no
    ``state_dict`` entry, not moved by ``.to(device)``, not seen by an optimizer). Register
    them as an ``nn.ModuleList``; returns the names fixed."""
    fixed = []
    for name, module in hf_model.named_modules():
        value = getattr(module, "input_projections", None)
        if isinstance(value, list) and all(isinstance(m, torch.nn.Module) for m in value):
            setattr(module, "input_projections", torch.nn.ModuleList(value))
            fixed.append(f"{name}.input_projections" if name else "input_projections")
    return fixed


def pixel_decoder_inputs(model, cfg) -> list[str]:
    """The backbone outputs the pixel decoder reads, fine to coarse: what Hugging Face's
    pixel decoder gets, in this order, as its ``feature_maps``."""
    shapes = model.backbone.output_shape()
    names = [n for n in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES if n in shapes]
    return sorted(names, key=lambda n: shapes[n].stride)


def hf_mask2former_config(model, cfg, **overrides):
    """A public ``Mask2FormerConfig`` with ``model``'s segmentation dimensions (read from
    ``cfg``). Its backbone config is a tiny ResNet that only tells the pixel decoder the
    feature channels of ``model``'s backbone: the benchmarks never run it."""
    from transformers import Mask2FormerConfig, ResNetConfig

    shapes = model.backbone.output_shape()
    names = pixel_decoder_inputs(model, cfg)
    channels = [shapes[n].channels for n in names]
    seg, mf = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=channels,
        depths=[1] * len(channels),
        out_features=[f"stage{i + 1}" for i in range(len(channels))],
    )
    kwargs = dict(
        backbone_config=backbone,
        feature_size=seg.CONVS_DIM,
        mask_feature_size=seg.MASK_DIM,
        hidden_dim=mf.HIDDEN_DIM,
        num_queries=mf.NUM_OBJECT_QUERIES,
        num_attention_heads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD,
        decoder_layers=mf.DEC_LAYERS,  # HF counts predictions, as DEC_LAYERS does
        encoder_layers=seg.TRANSFORMER_ENC_LAYERS,
        encoder_feedforward_dim=seg.TRANSFORMER_ENC_DIM_FEEDFORWARD,
        num_labels=seg.NUM_CLASSES,
        pre_norm=mf.PRE_NORM,
        enforce_input_projection=mf.ENFORCE_INPUT_PROJ,
        common_stride=seg.COMMON_STRIDE,
        feature_strides=[shapes[n].stride for n in names],
        dropout=mf.DROPOUT,
    )
    kwargs.update(overrides)
    with quiet_transformers():
        return Mask2FormerConfig(**kwargs)


def load_inputs(cfg, num_images: int) -> list[dict]:
    """Test-time inputs from the first test dataset: the resized image and its original size."""
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num_images]
    resize = [ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    inputs = []
    for d in dicts:
        image = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        height, width = image.shape[:2]
        resized, _ = apply_augmentations(resize, image, np.random.default_rng(0))
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs.append({"image": tensor, "height": height, "width": width})
    return inputs


def bench_inference(model, inputs, device) -> dict:
    """Images/s with captions, peak memory, and the caption stage's share of the time."""
    totals: dict = {}
    with torch.no_grad():
        model([inputs[0]])  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _time_calls(model.caption_head, "generate", totals):
            _sync(device)
            start = time.perf_counter()
            segments = 0
            for x in inputs:
                segments += len(model([x])[0]["panoptic_seg"][1])
            _sync(device)
            elapsed = time.perf_counter() - start
    return {
        "images": len(inputs),
        "images_per_s": len(inputs) / elapsed,
        "ms_per_image": 1000 * elapsed / len(inputs),
        "segments_per_image": segments / len(inputs),
        "caption_share": totals.get("generate", 0.0) / elapsed,
        "peak_memory_mib": _peak_memory_mib(device),
        "peak_memory_kind": "CUDA max allocated" if device.type == "cuda" else "process max RSS",
    }


def _hf_segmentation_modules(model, cfg):
    """Hugging Face Mask2Former pixel decoder + transformer module + class predictor with the
    dimensions of ``model``, and COPIES of ``model``'s pixel decoder and transformer decoder
    loaded with their weights (``model`` itself keeps its own weights).

    Both come out of the public ``Mask2FormerModel``, so the installed release wires them as it
    does for its own checkpoints (constructor arguments and projections differ between
    releases). Its backbone is never run (see :func:`hf_mask2former_config`).

    Returns ``(ours_pixel, ours_decoder, hf_pixel, hf_transformer, hf_classes, fixes)``.
    """
    from transformers import Mask2FormerModel

    from pix2cap.modeling.pixel_decoder.msdeformattn import (
        load_hf_mask2former_pixel_decoder_weights,
    )
    from pix2cap.modeling.transformer_decoder.mask2former_decoder import (
        load_hf_mask2former_decoder_weights,
    )

    config = hf_mask2former_config(model, cfg, dropout=0.0)
    with quiet_transformers():
        hf_model = Mask2FormerModel(config)
    fixes = register_plain_module_lists(hf_model)
    hf_pixel = hf_model.pixel_level_module.decoder
    hf_transformer = hf_model.transformer_module
    hf_classes = torch.nn.Linear(config.hidden_dim, config.num_labels + 1)
    pixel_decoder = copy.deepcopy(model.pixel_decoder)
    decoder = copy.deepcopy(model.transformer_decoder)
    # Ours take HF's weights, so both compute the same function.
    load_hf_mask2former_pixel_decoder_weights(pixel_decoder, hf_model)
    load_hf_mask2former_decoder_weights(decoder, hf_model, class_predictor=hf_classes)
    device = next(model.parameters()).device
    return (
        pixel_decoder.to(device).eval(),
        decoder.to(device).eval(),
        hf_pixel.to(device).eval(),
        hf_transformer.to(device).eval(),
        hf_classes.to(device).eval(),
        fixes,
    )


def _same_size_batch(inputs: list[dict], at_most: int) -> list[dict]:
    """Up to ``at_most`` inputs of the first one's size: the two paths get the features of
    one unpadded batch (HF's decoder takes no padding mask)."""
    size = tuple(inputs[0]["image"].shape)
    return [x for x in inputs if tuple(x["image"].shape) == size][:at_most]


def bench_segmentation_path(
    model, cfg, inputs, device, repeats: int, atol: float = SEG_ATOL, rtol: float = SEG_RTOL
) -> dict:
    """Ours against Hugging Face's modules; ``{"skipped": reason}`` where the installed
    transformers cannot build them or its weights do not map onto ours. Raises
    :class:`BenchmarkDisagreement` when their class or mask logits disagree (or hold NaN)."""
    try:
        ours_pixel, ours_decoder, hf_pixel, hf_transformer, hf_classes, fixes = (
            _hf_segmentation_modules(model, cfg)
        )
    except (ImportError, AttributeError, TypeError, KeyError, RuntimeError, ValueError) as e:
        version = getattr(sys.modules.get("transformers"), "__version__", "(not importable)")
        return {
            "skipped": f"transformers {version}: its Mask2Former modules do not match "
            f"pix2cap's ({type(e).__name__}: {e})"
        }
    batch = _same_size_batch(inputs, 4)
    images = torch.stack([model._normalize(x["image"]) for x in batch]).to(device)
    with torch.no_grad():
        features = model.backbone(images)

        def ours():
            mask_features, multi_scale = ours_pixel.forward_features(features)
            out = ours_decoder(multi_scale, mask_features)
            return out["pred_logits"], out["pred_masks"]

        hf_features = [features[name] for name in pixel_decoder_inputs(model, cfg)]

        def theirs():
            pixel = hf_pixel(hf_features)
            out = hf_transformer(
                multi_scale_features=pixel.multi_scale_features,
                mask_features=pixel.mask_features,
                output_hidden_states=True,
            )
            classes = hf_classes(out.intermediate_hidden_states[-1].transpose(0, 1))
            return classes, out.masks_queries_logits[-1]

        # The check comes first, in full fp32; the timing then runs with the default kernels.
        with full_fp32(device):
            (our_logits, our_masks), (hf_logits, hf_masks) = ours(), theirs()
        agreement = check_close(
            "segmentation path (pix2cap vs Hugging Face Mask2Former)",
            {"class logits": (our_logits, hf_logits), "mask logits": (our_masks, hf_masks)},
            atol,
            rtol,
        )
        seconds = _timed_alternating({"ours": ours, "theirs": theirs}, device, repeats)
        t_ours, t_hf = seconds["ours"], seconds["theirs"]
    result = {
        "batch": images.shape[0],
        "input_size": list(images.shape[-2:]),
        "pix2cap_ms": 1000 * t_ours,
        "huggingface_ms": 1000 * t_hf,
        "ratio_hf_over_pix2cap": t_hf / t_ours,
        "max_abs_logit_diff": max(s["max_abs_diff"] for s in agreement.values()),
        "max_abs_diff": {name: s["max_abs_diff"] for name, s in agreement.items()},
        "tolerance": {name: s["tolerance"] for name, s in agreement.items()},
        "tolerance_rule": f"|ours - HF| <= {atol:g} + {rtol:g} * max|HF| per output (fp32)",
    }
    if fixes:
        result["transformers_fixups"] = [f"registered plain-list {name}" for name in fixes]
    return result


def _random_scene(head: DenseCaptionHead, query: torch.Tensor, generator) -> dict:
    """``{"scene": SceneContext}`` of one image holding all the objects (each sees the others,
    up to the head's limit) for a scene-memory head, else ``{}``: random features, one 4 x 4
    block mask per object on a 16 x 16 grid."""
    if head.memory != "scene":
        return {}
    n, grid = query.shape[0], 16
    masks = torch.zeros(n, grid, grid)
    corners = torch.randint(0, grid - 4, (n, 2), generator=generator)
    for mask, (y, x) in zip(masks, corners.tolist()):
        mask[y : y + 4, x : x + 4] = 1.0
    levels = [
        torch.randn(proj.down.in_features, grid, grid, generator=generator)
        for proj in head.pixel_projs
    ]
    device = query.device
    scene = head.scene_context(query, masks.to(device), [level.to(device) for level in levels])
    return {"scene": scene}


def check_same_tokens(
    comparison: str,
    cached: tuple[torch.Tensor, torch.Tensor],
    full: tuple[torch.Tensor, torch.Tensor],
    max_token_mismatch: int = 0,
    score_atol: float = SCORE_ATOL,
) -> dict:
    """Check cached against recomputed decoding: ``(tokens Long[N, L], mean log-prob Float[N])``
    each. At most ``max_token_mismatch`` token positions may differ (a shorter output counts
    its missing positions), and where a caption's tokens agree its scores must agree within
    ``score_atol`` (a NaN score counts as disagreement). Raises :class:`BenchmarkDisagreement`."""
    (tok_c, score_c), (tok_f, score_f) = cached, full
    length = max(tok_c.shape[1], tok_f.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=-1)  # noqa: E731
    tok_c, tok_f = pad(tok_c), pad(tok_f.to(tok_c.device))
    differ = tok_c != tok_f
    mismatched = int(differ.sum())
    rows = differ.any(1)
    if mismatched > max_token_mismatch:
        first = int(rows.nonzero()[0, 0])
        raise BenchmarkDisagreement(
            f"{comparison}: {mismatched} of {tok_c.numel()} tokens differ in {int(rows.sum())} of "
            f"{tok_c.shape[0]} captions (tolerance: {max_token_mismatch}); first at caption "
            f"{first}: cached {tok_c[first].tolist()} vs recomputed {tok_f[first].tolist()}"
        )
    same = ~rows
    score_c, score_f = score_c.float(), score_f.float().to(score_c.device)
    nonfinite = int((~torch.isfinite(score_c) | ~torch.isfinite(score_f)).sum())
    if nonfinite:
        raise BenchmarkDisagreement(
            f"{comparison}: {nonfinite} caption scores are NaN/inf; NaN counts as disagreement"
        )
    score_diff = float((score_c - score_f).abs()[same].max()) if bool(same.any()) else 0.0
    if not score_diff <= score_atol:
        raise BenchmarkDisagreement(
            f"{comparison}: same tokens but mean log-probabilities differ by up to "
            f"{score_diff:.3g}, beyond the tolerance {score_atol:g}"
        )
    return {
        "mismatched_tokens": mismatched,
        "max_abs_score_diff": score_diff,
        "tolerance": f"<= {max_token_mismatch} differing tokens; scores within {score_atol:g}",
    }


def bench_caption_decoding(
    head: DenseCaptionHead,
    num_objects: int,
    device,
    repeats: int,
    max_token_mismatch: int = 0,
    score_atol: float = SCORE_ATOL,
    name: str = "caption head",
) -> dict:
    """Greedy decoding of ``num_objects`` captions to full length, cached vs recomputed; raises
    :class:`BenchmarkDisagreement` when they decode different captions (see
    :func:`check_same_tokens`)."""
    head = head.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(num_objects, head.query_proj.down.in_features, generator=generator)
    glob = torch.randn(num_objects, head.global_proj.down.in_features, generator=generator)
    query, glob = query.to(device), glob.to(device)
    with torch.no_grad():
        scene = _random_scene(head, query, generator)
        # Forbid [SEP] so every row runs to max_length: the comparison then covers full captions.
        eos, head.eos_token_id = head.eos_token_id, -1
        try:

            def decode(use_cache):
                return head.generate(
                    query, glob, use_cache=use_cache, return_scores=True, **scene
                )

            comparison = f"KV-cached vs recompute caption decoding ({name})"
            with full_fp32(device):
                agreement = check_same_tokens(
                    comparison, decode(True), decode(False), max_token_mismatch, score_atol
                )
            outputs: dict = {}

            def run(use_cache):
                outputs[use_cache] = decode(use_cache)

            seconds = _timed_alternating(
                {"cached": lambda: run(True), "recompute": lambda: run(False)}, device, repeats
            )
            # The timed runs (default kernels) must decode the same captions too.
            check_same_tokens(
                f"{comparison}, timed runs", outputs[True], outputs[False],
                max_token_mismatch, score_atol,
            )
        finally:
            head.eos_token_id = eos
    cached, full = outputs[True][0], outputs[False][0]
    return {
        "objects": num_objects,
        "memory": head.memory,
        "tokens": int(cached.shape[1]),
        "cached_ms": 1000 * seconds["cached"],
        # The first token is [CLS], given: every later one is a decode step of all objects.
        "cached_ms_per_token_step": 1000 * seconds["cached"] / max(int(cached.shape[1]) - 1, 1),
        "recompute_ms": 1000 * seconds["recompute"],
        "speedup": seconds["recompute"] / seconds["cached"],
        "same_tokens": bool(torch.equal(cached, full)),
        **agreement,
    }


def load_sibling(name: str):
    """``tools/<name>.py`` as a module (``tools/`` is no package), loaded once per process."""
    key = f"pix2cap_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def device_overrides(device: Optional[str]) -> list[str]:
    """``["MODEL.DEVICE", device]`` for ``--device`` (checked), else ``[]``."""
    if not device:
        return []
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch.cuda.is_available() is False here")
    return ["MODEL.DEVICE", device]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--device", help="run every section here (e.g. cuda, cuda:1); default MODEL.DEVICE"
    )
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the results as JSON here")
    checks = parser.add_argument_group("agreement checks (a failure exits 1)")
    checks.add_argument(
        "--seg-atol", type=float, default=SEG_ATOL,
        help="pix2cap vs HF logits: |ours - HF| <= seg-atol + seg-rtol * max|HF| per output",
    )
    checks.add_argument("--seg-rtol", type=float, default=SEG_RTOL)
    checks.add_argument(
        "--max-token-mismatch", type=int, default=0,
        help="cached vs recomputed decoding: differing tokens allowed",
    )
    checks.add_argument(
        "--score-atol", type=float, default=SCORE_ATOL,
        help="cached vs recomputed decoding: mean log-probability difference allowed",
    )
    train = parser.add_argument_group("training benchmark (--train)")
    train.add_argument(
        "--train",
        action="store_true",
        help="time training steps instead (tools/benchmark_train.py): pix2cap's segmentation "
        "step vs Hugging Face Mask2Former's, and the caption heads' share",
    )
    train.add_argument("--batch-size", type=int, help="default SOLVER.IMS_PER_BATCH")
    train.add_argument(
        "--warmup-steps", type=int, default=2,
        help="untimed steps of each model first (at least 1: the checked first step)",
    )
    train.add_argument("--steps", type=int, default=5, help="timed steps of each model")
    train.add_argument(
        "--loss-rtol", type=float, default=1e-3,
        help="step-0 losses of the two segmentation models (same random stream) must agree "
        "to this relative difference",
    )
    add_verbose_flag(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    return parser


def write_results(results: dict, output: Optional[str]) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if output:
        atomic_write_text(output, text + "\n")


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    for flag in ("num_images", "repeats", "steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.train:
        return load_sibling("benchmark_train").main_from_args(args)

    cfg = load_cfg(args.config_file, list(args.opts) + device_overrides(args.device))
    device = torch.device(cfg.MODEL.DEVICE)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        Checkpointer(model, partial=cfg.MODEL.WEIGHTS_PARTIAL).load(cfg.MODEL.WEIGHTS)
    inputs = load_inputs(cfg, args.num_images)
    if not inputs:
        raise ValueError(f"dataset {cfg.DATASETS.TEST[0]!r} gave no images")
    decoding = dict(max_token_mismatch=args.max_token_mismatch, score_atol=args.score_atol)

    results = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "inference": bench_inference(model, inputs, device),
        "segmentation_path_vs_huggingface": bench_segmentation_path(
            model, cfg, inputs, device, args.repeats, args.seg_atol, args.seg_rtol
        ),
        "caption_decoding_model_head": bench_caption_decoding(
            model.caption_head, 16, device, args.repeats, name="the model's head", **decoding
        ),
        "caption_decoding_paper_size_head": bench_caption_decoding(
            DenseCaptionHead(query_dim=512, global_dim=512, max_length=40),
            16, device, 2, name="paper-size head", **decoding,
        ),
    }
    # Imported by the segmentation section (None: not importable).
    results["transformers"] = getattr(sys.modules.get("transformers"), "__version__", None)
    write_results(results, args.output)
    return results


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
