#!/usr/bin/env python
"""Training-step benchmark: pix2cap's segmentation model against Hugging Face's Mask2Former.

    python tools/benchmark.py --train --config-file configs/shapes/pix2cap_effl0.yaml \\
        [--batch-size 8] [--warmup-steps 2] [--steps 5] [--device cuda] [--output FILE]

(``tools/benchmark.py --train`` is the entry point; this module holds its code.) In one process,
on the config's device, on ONE training batch that both models see: the first ``--batch-size``
(default ``SOLVER.IMS_PER_BATCH``) images of the first training dataset through the config's
training mapper (augmentations drawn from a fixed seed), with their targets (class labels and
binary masks, crowd segments dropped, as pix2cap's ``prepare_targets`` makes them).

1. Segmentation training step, pix2cap vs Hugging Face. A step is forward + losses + backward +
   ``AdamW`` step (same lr and weight decay for both: ``SOLVER.BASE_LR``,
   ``SOLVER.WEIGHT_DECAY``; no gradient clipping, no AMP, for either).

   * pix2cap: the config's pixel decoder + masked-attention transformer decoder + its set
     criterion with the class and mask losses only (the caption loss left out), deep
     supervision as configured.
   * Hugging Face: ``Mask2FormerForUniversalSegmentation`` built from a public
     ``Mask2FormerConfig`` of the same dimensions (hidden dim, queries, decoder layers, heads,
     feed-forward dims, classes, pixel-decoder and mask-feature dims, encoder layers, train
     points, loss weights), trained through its public ``forward(pixel_values, mask_labels,
     class_labels)``: its own Hungarian matcher and ``Mask2FormerLoss``.

   Backbone (the choice): both models are timed FROM THE BACKBONE'S FEATURES ONWARD. The
   config's backbone (frozen in the shipped configs) runs once, outside the timed steps, and
   its features are the input of both: HF's backbone slot (``model.pixel_level_module.encoder``)
   is replaced by a module that hands these very tensors over. So neither time includes a
   backbone, both models see bit-identical inputs, and no HF backbone has to imitate ours (a
   frozen backbone does no backward or optimizer work; its forward would cost both the same).

   Weights: ours are loaded with HF's initial weights (the converters the inference benchmark
   uses), so at step 0 both compute the same function. Checks, before anything is timed (a
   failure raises ``BenchmarkDisagreement`` naming the comparison and by how much; NaN/inf
   always counts as a failure):

   * the class and mask logits of every decoder prediction agree:
     ``|ours - HF| <= atol + rtol * max|HF|`` per output (``--seg-atol`` 1e-3, ``--seg-rtol``
     1e-4; fp32, eval mode);
   * the weighted step-0 losses agree to ``--loss-rtol`` (1e-3, relative): each loss is computed
     on its model's own outputs with the same seed set just before it, so both matchers and both
     point samplers draw the same random points (the random stream of Mask2Former's criterion,
     which both follow); skipped, with the reason, where that cannot hold (an image without
     segments, deep supervision off: HF always adds its auxiliary losses);
   * each model's first training step gives a finite loss, and so does every timed step.

   Where the dimensions cannot be matched (e.g. ``TRANSFORMER_ENC_N_POINTS`` != 4: HF fixes 4
   points) the weights are not shared, the two agreement checks are skipped with the reason,
   and the mismatch is listed among the differences in the output.

2. Caption share of pix2cap's training step: the full step (``model(batch)`` in training mode:
   backbone, pixel decoder, transformer decoder, all losses, backward, AdamW over every trainable
   parameter) against the same step without the grounded caption head, and without any caption
   (dense caption loss and grounded head off).

Steps of the models compared are interleaved (one of each in turn) so that load on a shared
machine hits both alike; the reported times are medians over ``--steps`` timed steps after
``--warmup-steps`` warm-up steps.
"""

from __future__ import annotations

import copy
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn


def _benchmark():
    """``tools/benchmark.py`` (its checks and helpers), loaded once per process."""
    module = sys.modules.get("pix2cap_tools_benchmark")
    if module is None:
        import importlib.util

        path = Path(__file__).with_name("benchmark.py")
        spec = importlib.util.spec_from_file_location("pix2cap_tools_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["pix2cap_tools_benchmark"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["pix2cap_tools_benchmark"]
            raise
    return module


bm = _benchmark()
BenchmarkDisagreement = bm.BenchmarkDisagreement

LOGIT_ATOL = 1e-3
LOGIT_RTOL = 1e-4
LOSS_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------
def load_train_batch(cfg, batch_size: int, seed: int) -> list[dict]:
    """``batch_size`` mapped training inputs (images, instances with masks, classes, captions):
    the first images of ``cfg.DATASETS.TRAIN`` (repeated if it has fewer) through the config's
    training mapper, its augmentations drawn from ``seed``."""
    from pix2cap.data import build_dataset_mapper, get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    mapper = build_dataset_mapper(cfg, is_train=True)
    mapper.rng = np.random.default_rng(seed)
    return [mapper(dicts[i % len(dicts)]) for i in range(batch_size)]


class GivenFeatures(nn.Module):
    """Stands in for Hugging Face's backbone: ``forward(pixel_values)`` returns the features
    it was given (``.feature_maps``, fine to coarse) whatever the pixels. No parameters."""

    def __init__(self, features: list[torch.Tensor], channels: list[int]):
        super().__init__()
        self.features = list(features)
        self.channels = list(channels)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(feature_maps=tuple(self.features))


# ---------------------------------------------------------------------------------------------
# The two segmentation training steps
# ---------------------------------------------------------------------------------------------
@contextmanager
def captions_off(model, grounded: bool = True, dense: bool = True):
    """Inside: ``model``'s training forward computes no dense caption loss (``dense``) and
    runs no grounded caption head (``grounded``)."""
    criterion = model.criterion
    if dense and not hasattr(criterion, "losses"):
        raise AttributeError(
            f"{type(criterion).__name__} has no 'losses' attribute: cannot leave the caption "
            "loss out (pix2cap's SetCriterion lists its losses there)"
        )
    saved_losses = getattr(criterion, "losses", None)
    saved_grounded = getattr(model, "grounded_head", None)
    try:
        if dense:
            criterion.losses = tuple(name for name in saved_losses if name != "captions")
        if grounded and saved_grounded is not None:
            model.grounded_head = None
        yield
    finally:
        if dense:
            criterion.losses = saved_losses
        if grounded and saved_grounded is not None:
            model.grounded_head = saved_grounded


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class Pix2CapSegmentationStep:
    """pix2cap's pixel decoder + transformer decoder + class/mask losses on given features."""

    def __init__(self, model, features: dict, targets: list[dict], padding, lr, weight_decay):
        self.model = model
        self.features = features
        self.targets = targets
        self.padding = padding
        self.criterion = copy.copy(model.criterion)  # shares the matcher, not the loss list
        if not hasattr(self.criterion, "losses"):
            raise AttributeError(f"{type(self.criterion).__name__} has no 'losses' attribute")
        self.criterion.losses = tuple(n for n in model.criterion.losses if n != "captions")
        self.modules = (model.pixel_decoder, model.transformer_decoder)
        self.params = _trainable(*self.modules)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    def outputs(self, all_predictions: bool = False) -> dict:
        """The decoder's outputs; ``aux_outputs`` only with deep supervision (as the model's
        training forward) unless ``all_predictions``."""
        mask_features, multi_scale = self.model.pixel_decoder(self.features)
        if self.padding is not None and getattr(self.model, "_decoder_takes_mask", False):
            out = self.model.transformer_decoder(multi_scale, mask_features, mask=self.padding)
        else:
            out = self.model.transformer_decoder(multi_scale, mask_features)
        if not all_predictions and not getattr(self.model, "deep_supervision", True):
            out = {k: v for k, v in out.items() if k != "aux_outputs"}
        return out

    def losses(self, outputs: Optional[dict] = None) -> dict:
        """The weighted losses (of ``outputs``, by default of a new forward)."""
        outputs = self.outputs() if outputs is None else outputs
        return self.criterion.weighted(self.criterion(outputs, self.targets))

    def step(self) -> torch.Tensor:
        loss = sum(self.losses().values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train(self, mode: bool = True) -> None:
        for module in self.modules:
            module.train(mode)


class HuggingFaceSegmentationStep:
    """``Mask2FormerForUniversalSegmentation`` (public forward, its own matcher and loss) on
    the same features, through :class:`GivenFeatures` in its backbone slot."""

    def __init__(self, hf_model, pixel_values, targets: list[dict], lr, weight_decay):
        self.hf = hf_model
        self.pixel_values = pixel_values
        self.mask_labels = [t["masks"].float() for t in targets]
        self.class_labels = [t["labels"] for t in targets]
        self.params = _trainable(hf_model)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    def raw_outputs(self):
        return self.hf(pixel_values=self.pixel_values, output_auxiliary_logits=True)

    def loss_of(self, out) -> torch.Tensor:
        """HF's weighted loss of :meth:`raw_outputs` (its public ``get_loss_dict``)."""
        loss_dict = self.hf.get_loss_dict(
            masks_queries_logits=out.masks_queries_logits,
            class_queries_logits=out.class_queries_logits,
            mask_labels=self.mask_labels,
            class_labels=self.class_labels,
            auxiliary_predictions=out.auxiliary_logits,
        )
        return self.hf.get_loss(loss_dict)

    def outputs(self) -> dict:
        """pix2cap's output layout: ``pred_logits``, ``pred_masks``, ``aux_outputs``."""
        out = self.raw_outputs()
        aux = [
            {"pred_logits": a["class_queries_logits"], "pred_masks": a["masks_queries_logits"]}
            for a in (out.auxiliary_logits or [])
        ]
        return {
            "pred_logits": out.class_queries_logits,
            "pred_masks": out.masks_queries_logits,
            "aux_outputs": aux,
        }

    def loss(self) -> torch.Tensor:
        out = self.hf(
            pixel_values=self.pixel_values,
            mask_labels=self.mask_labels,
            class_labels=self.class_labels,
        )
        return out.loss

    def step(self) -> torch.Tensor:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train(self, mode: bool = True) -> None:
        self.hf.train(mode)


def build_hf_peer(model, cfg, features: dict, device):
    """The HF model of ``model``'s dimensions with :class:`GivenFeatures` as its backbone.
    Returns ``(hf_model, notes)``."""
    from transformers import Mask2FormerForUniversalSegmentation

    mf = cfg.MODEL.MASK_FORMER
    config = bm.hf_mask2former_config(
        model,
        cfg,
        train_num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        no_object_weight=mf.NO_OBJECT_WEIGHT,
        class_weight=mf.CLASS_WEIGHT,
        mask_weight=mf.MASK_WEIGHT,
        dice_weight=mf.DICE_WEIGHT,
        use_auxiliary_loss=mf.DEEP_SUPERVISION,
    )
    with bm.quiet_transformers():
        hf = Mask2FormerForUniversalSegmentation(config)
    notes = [f"registered plain-list {n}" for n in bm.register_plain_module_lists(hf)]
    level = hf.model.pixel_level_module
    channels = list(getattr(level.encoder, "channels", []))
    inputs = [features[name] for name in bm.pixel_decoder_inputs(model, cfg)]
    level.encoder = GivenFeatures(inputs, channels)
    return hf.to(device), notes


def share_weights(model, hf) -> Optional[str]:
    """Load HF's initial weights into ``model``'s pixel decoder and transformer decoder; the
    reason as a string where they do not fit (None on success)."""
    from pix2cap.modeling.pixel_decoder.msdeformattn import (
        load_hf_mask2former_pixel_decoder_weights,
    )
    from pix2cap.modeling.transformer_decoder.mask2former_decoder import (
        load_hf_mask2former_decoder_weights,
    )

    try:
        load_hf_mask2former_pixel_decoder_weights(model.pixel_decoder, hf)
        load_hf_mask2former_decoder_weights(model.transformer_decoder, hf)
    except (KeyError, RuntimeError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def dimensions(model, cfg, hf) -> dict:
    """``{name: {"pix2cap": value, "huggingface": value}}`` of what the peers should share."""
    dec, pix, crit, c = model.transformer_decoder, model.pixel_decoder, model.criterion, hf.config
    matcher = getattr(crit, "matcher", None)
    hf_pix = hf.model.pixel_level_module.decoder
    hf_attn = hf_pix.encoder.layers[0].self_attn if len(hf_pix.encoder.layers) else None
    enc_layers = pix.transformer.encoder.layers
    our_attn = enc_layers[0].self_attn if len(enc_layers) else None
    return {
        "hidden_dim": {"pix2cap": dec.hidden_dim, "huggingface": c.hidden_dim},
        "num_queries": {"pix2cap": dec.num_queries, "huggingface": c.num_queries},
        "predictions (decoder layers + 1)": {
            "pix2cap": dec.num_layers + 1,
            "huggingface": len(hf.model.transformer_module.decoder.layers) + 1,
        },
        "decoder_heads": {"pix2cap": dec.num_heads, "huggingface": c.num_attention_heads},
        "decoder_feedforward": {
            "pix2cap": dec.transformer_ffn_layers[0].linear1.out_features
            if dec.num_layers else None,
            "huggingface": c.dim_feedforward,
        },
        "num_classes": {"pix2cap": dec.num_classes, "huggingface": c.num_labels},
        "mask_dim": {"pix2cap": pix.mask_dim, "huggingface": c.mask_feature_size},
        "pixel_decoder_dim": {"pix2cap": pix.conv_dim, "huggingface": c.feature_size},
        "encoder_layers": {"pix2cap": len(enc_layers), "huggingface": c.encoder_layers},
        "encoder_feedforward": {
            "pix2cap": enc_layers[0].linear1.out_features if len(enc_layers) else None,
            "huggingface": c.encoder_feedforward_dim,
        },
        "encoder_heads": {
            "pix2cap": our_attn.n_heads if our_attn is not None else None,
            "huggingface": hf_attn.n_heads if hf_attn is not None else None,
        },
        "encoder_levels": {
            "pix2cap": pix.transformer_num_feature_levels,
            "huggingface": hf_pix.num_feature_levels,
        },
        "encoder_points": {
            "pix2cap": our_attn.n_points if our_attn is not None else None,
            "huggingface": hf_attn.n_points if hf_attn is not None else None,
        },
        "train_num_points (loss)": {
            "pix2cap": getattr(crit, "num_points", None),
            "huggingface": c.train_num_points,
        },
        "train_num_points (matcher)": {
            "pix2cap": getattr(matcher, "num_points", None),
            "huggingface": hf.criterion.matcher.num_points,
        },
        "oversample_ratio": {
            "pix2cap": getattr(crit, "oversample_ratio", None),
            "huggingface": c.oversample_ratio,
        },
        "importance_sample_ratio": {
            "pix2cap": getattr(crit, "importance_sample_ratio", None),
            "huggingface": c.importance_sample_ratio,
        },
        "no_object_weight": {
            "pix2cap": getattr(crit, "eos_coef", None),
            "huggingface": c.no_object_weight,
        },
        "loss weights (class, mask, dice)": {
            "pix2cap": [crit.loss_weight(k) for k in ("loss_ce", "loss_mask", "loss_dice")],
            "huggingface": [c.class_weight, c.mask_weight, c.dice_weight],
        },
        "matcher costs (class, mask, dice)": {
            "pix2cap": [
                getattr(matcher, k, None) for k in ("cost_class", "cost_mask", "cost_dice")
            ],
            "huggingface": [
                getattr(hf.criterion.matcher, k) for k in ("cost_class", "cost_mask", "cost_dice")
            ],
        },
        "deep_supervision": {
            "pix2cap": bool(getattr(model, "deep_supervision", True)),
            "huggingface": bool(c.use_auxiliary_loss),
        },
        "dropout": {"pix2cap": cfg.MODEL.MASK_FORMER.DROPOUT, "huggingface": c.dropout},
    }


def design_differences(dims: dict, padded: bool, deep_supervision: bool = True) -> list[str]:
    """What differs between the two peers: mismatched dimensions first, then the designs."""
    out = [
        f"{name}: pix2cap {v['pix2cap']} vs Hugging Face {v['huggingface']}"
        for name, v in dims.items()
        if v["pix2cap"] != v["huggingface"]
    ]
    out += [
        "decoder self-attention: torch nn.MultiheadAttention (fused q/k/v projection) vs HF's "
        "Mask2FormerAttention (separate q/k/v projections); same function",
        "Hungarian matcher and set loss: each model's own implementation (same costs, weights "
        "and point counts as listed; with the same seed they draw the same random points)",
        "HF's forward also builds a pixel mask and passes through its (here trivial) backbone "
        "slot; pix2cap's step calls its modules directly",
    ]
    if padded:
        out.append("the batch has padding: pix2cap's decoder masks it, HF's attends to it")
    if not deep_supervision:
        out.append("deep supervision is off: pix2cap drops the auxiliary losses, HF's forward "
                   "always adds them")
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _timed_step(step: Callable[[], torch.Tensor], device) -> tuple[float, torch.Tensor]:
    bm._sync(device)
    start = time.perf_counter()
    loss = step()
    bm._sync(device)
    return time.perf_counter() - start, loss


def time_interleaved(steps: dict, device, warmup: int, timed: int) -> dict:
    """``{name: step}`` -> ``{name: (median seconds, [timed losses])}``; one step of each in
    turn, ``warmup`` rounds untimed first."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            seconds, loss = _timed_step(step, device)
            times[name].append(seconds)
            losses[name].append(loss)
    return {name: (float(np.median(times[name])), losses[name]) for name in steps}


def _check_losses(comparison: str, losses: dict) -> None:
    """Every timed loss must be finite: ``{name: [scalar, ...]}``."""
    for name, values in losses.items():
        stacked = torch.stack([v.float() for v in values])
        bad = (~torch.isfinite(stacked)).nonzero().flatten().tolist()
        if bad:
            raise BenchmarkDisagreement(
                f"{comparison}: {name}'s loss became NaN/inf at timed step(s) {bad} "
                f"({stacked.tolist()})"
            )


def _first_loss(what: str, fn: Callable[[], torch.Tensor]) -> float:
    try:
        loss = fn()
    except Exception as e:
        raise RuntimeError(
            f"{what}: the first training step failed: {type(e).__name__}: {e}"
        ) from e
    return bm.check_finite(what, {"loss": loss})["loss"]


def compare_step0_losses(
    comparison: str, ours, theirs, targets, seed: int, device, loss_rtol: float,
    not_shared: Optional[str],
) -> dict:
    """Both weighted training losses before any step, on each model's own forward outputs,
    the losses drawn from the same random stream (``torch.manual_seed(seed)`` after the
    forward, which may draw numbers of its own: HF 5.17 draws a layer-drop number per layer):
    with shared weights both matchers and both point samplers then draw the same points (one
    draw per image for the matcher, then the loss's points, layer by layer), so the losses must
    agree to ``loss_rtol`` (relative). Skipped, with the reason, where that cannot hold."""
    if not_shared is not None:
        return {"skipped": "the weights are not shared"}
    if any(len(t["labels"]) == 0 for t in targets):
        return {"skipped": "an image of the batch has no segment: the two matchers then draw "
                "different numbers of random points"}
    if not getattr(ours.model, "deep_supervision", True):
        return {"skipped": "pix2cap's deep supervision is off; HF always adds its auxiliary "
                "losses"}
    for peer in (ours, theirs):
        peer.train(True)
    with torch.no_grad(), bm.full_fp32(device):
        ours_out = ours.outputs()
        torch.manual_seed(seed)
        ours_loss = sum(ours.losses(ours_out).values())
        hf_out = theirs.raw_outputs()
        torch.manual_seed(seed)
        hf_loss = theirs.loss_of(hf_out)
    values = bm.check_finite(
        f"{comparison}, step-0 losses", {"pix2cap": ours_loss, "huggingface": hf_loss}
    )
    a, b = values["pix2cap"], values["huggingface"]
    relative = abs(a - b) / max(abs(b), 1e-12)
    if not relative <= loss_rtol:
        raise BenchmarkDisagreement(
            f"{comparison}, step-0 losses (same random stream): pix2cap {a:.6g} vs Hugging "
            f"Face {b:.6g}, relative difference {relative:.3g} beyond the tolerance "
            f"{loss_rtol:g}"
        )
    return {
        "pix2cap": a,
        "huggingface": b,
        "relative_diff": relative,
        "tolerance_rule": f"|ours - HF| <= {loss_rtol:g} * |HF| (same seed before each loss)",
    }


def bench_segmentation_training(
    model, cfg, batch: list[dict], device, warmup: int, steps: int, seed: int,
    atol: float = LOGIT_ATOL, rtol: float = LOGIT_RTOL, loss_rtol: float = LOSS_RTOL,
) -> tuple[dict, dict]:
    """Section 1 of the module doc: ``(results, shared context for the other sections)``."""
    from pix2cap.structures import ImageList

    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    model.train()
    images = [model._normalize(x["image"]) for x in batch]
    image_list = ImageList.from_tensors(images, model.size_divisibility)
    targets = model.prepare_targets(batch, image_list)
    padding = model._padding_mask(image_list)
    with torch.no_grad():
        features = {k: v.detach() for k, v in model.backbone(image_list.tensor).items()}

    torch.manual_seed(seed)
    hf, notes = build_hf_peer(model, cfg, features, device)
    not_shared = share_weights(model, hf)
    ours = Pix2CapSegmentationStep(model, features, targets, padding, lr, wd)
    theirs = HuggingFaceSegmentationStep(hf, image_list.tensor, targets, lr, wd)
    dims = dimensions(model, cfg, hf)

    comparison = "segmentation training step (pix2cap vs Hugging Face Mask2Former)"
    if not_shared is None:
        for peer in (ours, theirs):
            peer.train(False)
        with torch.no_grad(), bm.full_fp32(device):
            a, b = ours.outputs(all_predictions=True), theirs.outputs()
        for peer in (ours, theirs):
            peer.train(True)
        if len(a.get("aux_outputs", [])) != len(b["aux_outputs"]):
            raise BenchmarkDisagreement(
                f"{comparison}: pix2cap makes {len(a.get('aux_outputs', [])) + 1} predictions, "
                f"Hugging Face {len(b['aux_outputs']) + 1}"
            )
        pairs = {}
        layers = [*zip(a.get("aux_outputs", []), b["aux_outputs"]), (a, b)]
        for i, (x, y) in enumerate(layers):
            label = "final" if i == len(layers) - 1 else f"prediction {i}"
            pairs[f"{label} class logits"] = (x["pred_logits"], y["pred_logits"])
            pairs[f"{label} mask logits"] = (x["pred_masks"], y["pred_masks"])
        report = bm.check_close(f"{comparison}, step-0 outputs", pairs, atol, rtol)
        agreement = {
            "max_abs_diff": max(s["max_abs_diff"] for s in report.values()),
            "outputs_compared": len(report),
            "tolerance_rule": f"|ours - HF| <= {atol:g} + {rtol:g} * max|HF| per output "
            "(fp32, eval mode)",
        }
    else:
        agreement = {"skipped": f"the weights do not map onto each other ({not_shared})"}
    loss_agreement = compare_step0_losses(
        comparison, ours, theirs, targets, seed, device, loss_rtol, not_shared
    )

    # Both must train before anything is timed.
    torch.manual_seed(seed)
    loss_ours = _first_loss(f"{comparison}: pix2cap", ours.step)
    torch.manual_seed(seed)
    loss_hf = _first_loss(f"{comparison}: Hugging Face", theirs.step)

    timed = time_interleaved(
        {"pix2cap": ours.step, "huggingface": theirs.step}, device, max(warmup - 1, 0), steps
    )
    _check_losses(comparison, {k: v[1] for k, v in timed.items()})
    t_ours, t_hf = timed["pix2cap"][0], timed["huggingface"][0]
    n_ours, n_hf = sum(p.numel() for p in ours.params), sum(p.numel() for p in theirs.params)
    results = {
        "pix2cap_ms": 1000 * t_ours,
        "huggingface_ms": 1000 * t_hf,
        "ratio_pix2cap_over_hf": t_ours / t_hf,
        "warmup_steps": max(warmup, 1),
        "timed_steps": steps,
        "trainable_parameters": {"pix2cap": n_ours, "huggingface": n_hf},
        "first_step_loss": {"pix2cap": loss_ours, "huggingface": loss_hf},
        "step0_outputs_agreement": agreement,
        "step0_loss_agreement": loss_agreement,
        "weights": "pix2cap loaded with HF's initial weights"
        if not_shared is None else f"not shared: {not_shared}",
        "dimensions": dims,
        "differences": design_differences(
            dims, padding is not None, bool(getattr(model, "deep_supervision", True))
        ),
    }
    if notes:
        results["transformers_fixups"] = notes
    context = {"image_list": image_list, "input_size": list(image_list.tensor.shape[-2:])}
    return results, context


def bench_caption_share(model, cfg, batch: list[dict], device, warmup: int, steps: int) -> dict:
    """Section 2 of the module doc."""
    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    model.train()
    optimizer = torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=wd)

    def make_step(grounded_off: bool, dense_off: bool):
        def step():
            with captions_off(model, grounded=grounded_off, dense=dense_off):
                losses = model(batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    variants = {"full": make_step(False, False)}
    has_grounded = getattr(model, "grounded_head", None) is not None
    if has_grounded:
        variants["without_grounded_caption"] = make_step(True, False)
    variants["without_captions"] = make_step(True, True)

    comparison = "pix2cap training step with and without captions"
    first = {name: _first_loss(f"{comparison}: {name}", step) for name, step in variants.items()}
    timed = time_interleaved(variants, device, max(warmup - 1, 0), steps)
    _check_losses(comparison, {k: v[1] for k, v in timed.items()})
    ms = {name: 1000 * value[0] for name, value in timed.items()}
    full, none = ms["full"], ms["without_captions"]
    result = {
        "full_ms": full,
        "without_captions_ms": none,
        "caption_share": (full - none) / full,
        "warmup_steps": max(warmup, 1),
        "timed_steps": steps,
        "step0_loss": first,
    }
    # What the captions add, as a fraction of the step without them.
    result["captions_added"] = (full - none) / none
    if has_grounded:
        no_grounded = ms["without_grounded_caption"]
        result["without_grounded_caption_ms"] = no_grounded
        result["grounded_caption_share"] = (full - no_grounded) / full
        result["dense_caption_share"] = (no_grounded - none) / full
        result["dense_caption_added"] = (no_grounded - none) / none
        result["grounded_caption_added"] = (full - no_grounded) / none
    result["what"] = (
        "full: model(batch) in training mode (backbone, pixel decoder, transformer decoder, all "
        "losses) + backward + AdamW over every trainable parameter; without_captions: the same "
        "with the dense caption loss and the grounded caption head off"
    )
    return result


def run(
    cfg,
    batch_size: Optional[int] = None,
    warmup: int = 2,
    steps: int = 5,
    atol: float = LOGIT_ATOL,
    rtol: float = LOGIT_RTOL,
    loss_rtol: float = LOSS_RTOL,
) -> dict:
    """Both sections on ``cfg`` (model built here, random weights but HF's where shared)."""
    from pix2cap.modeling import build_model

    device = torch.device(cfg.MODEL.DEVICE)
    seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else 0
    batch_size = int(batch_size or cfg.SOLVER.IMS_PER_BATCH)
    torch.manual_seed(seed)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from pix2cap.checkpoint import Checkpointer

        Checkpointer(model, partial=cfg.MODEL.WEIGHTS_PARTIAL).load(cfg.MODEL.WEIGHTS)
    batch = load_train_batch(cfg, batch_size, seed)
    frozen = not any(p.requires_grad for p in model.backbone.parameters())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    segmentation, context = bench_segmentation_training(
        model, cfg, batch, device, warmup, steps, seed, atol, rtol, loss_rtol
    )
    captions = bench_caption_share(model, cfg, batch, device, warmup, steps)
    return {
        "mode": "train",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "transformers": getattr(sys.modules.get("transformers"), "__version__", None),
        "batch": {
            "images": len(batch),
            "input_size": context["input_size"],
            "segments": sum(len(x["instances"]) for x in batch if "instances" in x),
            "source": f"{cfg.DATASETS.TRAIN[0]} through {cfg.INPUT.DATASET_MAPPER_NAME}, "
            f"seed {seed}",
        },
        "backbone": (
            f"{type(model.backbone).__name__} {'(frozen)' if frozen else '(NOT frozen)'} run once "
            "outside the timed steps; both segmentation steps start from its features"
            + ("" if frozen else "; its training is left out of both")
        ),
        "optimizer": f"AdamW lr={cfg.SOLVER.BASE_LR:g} weight_decay={cfg.SOLVER.WEIGHT_DECAY:g} "
        "for both; no gradient clipping, no AMP",
        "segmentation_step_vs_huggingface": segmentation,
        "caption_share_of_training_step": captions,
        "peak_memory_mib": bm._peak_memory_mib(device),
        "peak_memory_kind": "CUDA max allocated" if device.type == "cuda" else "process max RSS",
    }


def summary(results: dict) -> str:
    """A readable account of :func:`run`'s results."""
    seg = results["segmentation_step_vs_huggingface"]
    cap = results["caption_share_of_training_step"]
    batch = results["batch"]
    lines = [
        f"Training-step benchmark on {results['device']} ({results['torch_threads']} threads, "
        f"transformers {results['transformers']})",
        f"batch: {batch['images']} images {batch['input_size'][0]}x{batch['input_size'][1]}, "
        f"{batch['segments']} segments ({batch['source']})",
        f"backbone: {results['backbone']}",
        f"optimizer: {results['optimizer']}",
        "",
        "1. segmentation step (pixel decoder + transformer decoder + matcher/losses + backward "
        "+ AdamW), median of "
        f"{seg['timed_steps']} after {seg['warmup_steps']} warm-up:",
        f"   pix2cap       {seg['pix2cap_ms']:9.1f} ms",
        f"   Hugging Face  {seg['huggingface_ms']:9.1f} ms",
        f"   ratio pix2cap / HF = {seg['ratio_pix2cap_over_hf']:.3f}",
        f"   trainable parameters: pix2cap {seg['trainable_parameters']['pix2cap']:,}, "
        f"HF {seg['trainable_parameters']['huggingface']:,}",
        f"   weights: {seg['weights']}",
    ]
    agreement = seg["step0_outputs_agreement"]
    if "skipped" in agreement:
        lines.append(f"   step-0 logits check skipped: {agreement['skipped']}")
    else:
        lines.append(
            f"   step-0 logits agree: {agreement['outputs_compared']} outputs, max |diff| "
            f"{agreement['max_abs_diff']:.2e} ({agreement['tolerance_rule']})"
        )
    losses = seg["step0_loss_agreement"]
    if "skipped" in losses:
        lines.append(f"   step-0 loss check skipped: {losses['skipped']}")
    else:
        lines.append(
            f"   step-0 losses agree: pix2cap {losses['pix2cap']:.6g}, HF "
            f"{losses['huggingface']:.6g}, relative diff {losses['relative_diff']:.1e} "
            f"({losses['tolerance_rule']})"
        )
    lines.append("   what differs:")
    lines += [f"     - {d}" for d in seg["differences"]]
    lines += [
        "",
        "2. pix2cap's full training step (backbone + everything + backward + AdamW):",
        f"   full                 {cap['full_ms']:9.1f} ms",
    ]
    if "without_grounded_caption_ms" in cap:
        lines.append(f"   w/o grounded caption {cap['without_grounded_caption_ms']:9.1f} ms")
    lines += [
        f"   without captions     {cap['without_captions_ms']:9.1f} ms",
        f"   captions' share of the step: {100 * cap['caption_share']:.1f} %",
    ]
    if "grounded_caption_share" in cap:
        lines.append(
            f"   (grounded caption head {100 * cap['grounded_caption_share']:.1f} %, dense "
            f"caption loss {100 * cap['dense_caption_share']:.1f} %)"
        )
    if "captions_added" in cap:
        added = f"   added to the step without captions: {100 * cap['captions_added']:.1f} %"
        if "dense_caption_added" in cap:
            added += (
                f" (dense caption loss {100 * cap['dense_caption_added']:.1f} %, grounded "
                f"caption head {100 * cap['grounded_caption_added']:.1f} %)"
            )
        lines.append(added)
    return "\n".join(lines)


def main_from_args(args) -> dict:
    """``tools/benchmark.py --train`` with its parsed arguments."""
    from pix2cap.config import load_cfg

    import pix2cap.data  # noqa: F401  (registers the built-in datasets)

    cfg = load_cfg(args.config_file, list(args.opts) + bm.device_overrides(args.device))
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    results = run(
        cfg,
        batch_size=args.batch_size,
        warmup=args.warmup_steps,
        steps=args.steps,
        atol=args.seg_atol,
        rtol=args.seg_rtol,
        loss_rtol=args.loss_rtol,
    )
    print(summary(results))
    print()
    bm.write_results(results, args.output)
    return results


if __name__ == "__main__":
    from pix2cap.utils.cli import main_guard

    main_guard(bm.main, ["--train", *sys.argv[1:]])
