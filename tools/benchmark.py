#!/usr/bin/env python
"""Inference benchmark of a Pix2Cap model (a script, not a test: timings are noisy).

    python tools/benchmark.py --config-file configs/shapes/pix2cap_effl0.yaml \\
        MODEL.WEIGHTS model_zoo/shapes/pix2cap_effl0.safetensors

Reports, on the config's device, in one process:
  1. inference images/s (batch 1, test-time size, captions included) and peak memory;
  2. the segmentation path (pixel decoder + transformer decoder) against Hugging Face's
     Mask2Former modules of identical dimensions with the same weights, on the same backbone
     features: time of each and their ratio (the outputs are checked to agree first);
  3. the caption stage's share of inference time;
  4. key/value-cached against full-recompute caption decoding (same tokens, speed ratio), on the
     model's own caption head and on a paper-size head (768 wide, 6 layers, 30,522 tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from contextlib import contextmanager

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


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
    """Hugging Face Mask2Former pixel decoder + transformer module with the dimensions of
    ``model`` (read from its config), and ``model``'s own modules loaded with their weights.

    Both come out of the public ``Mask2FormerModel``, so the installed release wires them as it
    does for its own checkpoints (constructor arguments and projections differ between
    releases). Its backbone is never run: a tiny ResNet config only gives the pixel decoder
    ``model``'s feature channels.
    """
    from transformers import Mask2FormerConfig, Mask2FormerModel, ResNetConfig

    from pix2cap.modeling.pixel_decoder.msdeformattn import (
        load_hf_mask2former_pixel_decoder_weights,
    )
    from pix2cap.modeling.transformer_decoder.mask2former_decoder import (
        load_hf_mask2former_decoder_weights,
    )

    pixel_decoder, decoder = model.pixel_decoder, model.transformer_decoder
    channels = [s.channels for s in model.backbone.output_shape().values()]
    seg, mf = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
    num_classes = seg.NUM_CLASSES
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=channels,
        depths=[1] * len(channels),
        out_features=[f"stage{i + 1}" for i in range(len(channels))],
    )
    config = Mask2FormerConfig(
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
        num_labels=num_classes,
        pre_norm=mf.PRE_NORM,
        enforce_input_projection=mf.ENFORCE_INPUT_PROJ,
        dropout=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "resnet is not a supported backbone": it never runs
        hf_model = Mask2FormerModel(config)
    hf_pixel = hf_model.pixel_level_module.decoder
    hf_transformer = hf_model.transformer_module
    hf_classes = torch.nn.Linear(config.hidden_dim, num_classes + 1)
    # Ours take HF's weights, so both compute the same function.
    load_hf_mask2former_pixel_decoder_weights(pixel_decoder, hf_model)
    load_hf_mask2former_decoder_weights(decoder, hf_model, class_predictor=hf_classes)
    device = next(model.parameters()).device
    return hf_pixel.to(device).eval(), hf_transformer.to(device).eval(), hf_classes.to(device)


def bench_segmentation_path(model, cfg, inputs, device, repeats: int) -> dict:
    """Ours against Hugging Face's modules; ``{"skipped": reason}`` where the installed
    transformers cannot build them or its weights do not map onto ours."""
    try:
        hf_pixel, hf_transformer, hf_classes = _hf_segmentation_modules(model, cfg)
    except (ImportError, AttributeError, TypeError, KeyError, RuntimeError, ValueError) as e:
        version = getattr(sys.modules.get("transformers"), "__version__", "(not importable)")
        return {
            "skipped": f"transformers {version}: its Mask2Former modules do not match "
            f"pix2cap's ({type(e).__name__}: {e})"
        }
    images = torch.stack([model._normalize(x["image"]) for x in inputs[:4]]).to(device)
    with torch.no_grad():
        features = model.backbone(images)

        def ours():
            mask_features, multi_scale = model.pixel_decoder.forward_features(features)
            return model.transformer_decoder(multi_scale, mask_features)

        def theirs():
            pixel = hf_pixel(list(features.values()))
            out = hf_transformer(
                multi_scale_features=pixel.multi_scale_features,
                mask_features=pixel.mask_features,
                output_hidden_states=True,
            )
            classes = [hf_classes(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
            return classes[-1], out.masks_queries_logits[-1]

        t_ours, out_ours = _timed(ours, device, repeats)
        t_hf, (hf_logits, hf_masks) = _timed(theirs, device, repeats)
    max_diff = max(
        (out_ours["pred_logits"] - hf_logits).abs().max().item(),
        (out_ours["pred_masks"] - hf_masks).abs().max().item(),
    )
    return {
        "batch": images.shape[0],
        "input_size": list(images.shape[-2:]),
        "pix2cap_ms": 1000 * t_ours,
        "huggingface_ms": 1000 * t_hf,
        "ratio_hf_over_pix2cap": t_hf / t_ours,
        "max_abs_logit_diff": max_diff,
    }


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


def bench_caption_decoding(head: DenseCaptionHead, num_objects: int, device, repeats: int) -> dict:
    """Greedy decoding of ``num_objects`` captions to full length, cached vs recomputed."""
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
            t_cached, cached = _timed(
                lambda: head.generate(query, glob, use_cache=True, **scene), device, repeats
            )
            t_full, full = _timed(
                lambda: head.generate(query, glob, use_cache=False, **scene), device, repeats
            )
        finally:
            head.eos_token_id = eos
    return {
        "objects": num_objects,
        "memory": head.memory,
        "tokens": int(cached.shape[1]),
        "cached_ms": 1000 * t_cached,
        "recompute_ms": 1000 * t_full,
        "speedup": t_full / t_cached,
        "same_tokens": bool(torch.equal(cached, full)),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the results as JSON here")
    add_verbose_flag(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)

    cfg = load_cfg(args.config_file, args.opts)
    device = torch.device(cfg.MODEL.DEVICE)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        Checkpointer(model, partial=cfg.MODEL.WEIGHTS_PARTIAL).load(cfg.MODEL.WEIGHTS)
    inputs = load_inputs(cfg, args.num_images)

    results = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "inference": bench_inference(model, inputs, device),
        "segmentation_path_vs_huggingface": bench_segmentation_path(
            model, cfg, inputs, device, args.repeats
        ),
        "caption_decoding_model_head": bench_caption_decoding(
            model.caption_head, 16, device, args.repeats
        ),
        "caption_decoding_paper_size_head": bench_caption_decoding(
            DenseCaptionHead(query_dim=512, global_dim=512, max_length=40), 16, device, 2
        ),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return results


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
