"""MultiScaleMaskedTransformerDecoder is Mask2Former's decoder: with weights copied from a
randomly initialised Hugging Face ``Mask2FormerForUniversalSegmentation``, the class and mask
logits of every layer agree to 1e-4. Plus shapes, gradients, padding and config checks."""

import os

import pytest
import torch

from pix2cap.config.config import CfgNode, get_cfg
from pix2cap.modeling.pixel_decoder.msdeformattn import (
    MSDeformAttnPixelDecoder,
    load_hf_mask2former_pixel_decoder_weights,
)
from pix2cap.modeling.transformer_decoder import TRANSFORMER_DECODER_REGISTRY
from pix2cap.modeling.transformer_decoder.mask2former_decoder import (
    MultiScaleMaskedTransformerDecoder,
    load_hf_mask2former_decoder_weights,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
NUM_LABELS = 5


def _hf_model(seed=0, **overrides):
    """A tiny random HF Mask2Former (Swin backbone), every weight perturbed away from HF's
    init so no parameter is trivially zero."""
    torch.manual_seed(seed)
    cfg = dict(
        backbone_config=transformers.SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        num_queries=8,
        decoder_layers=4,  # HF counts predictions: 3 layers + the one on the learnable queries
        encoder_layers=1,
        num_attention_heads=4,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        num_labels=NUM_LABELS,
    )
    cfg.update(overrides)
    config = transformers.Mask2FormerConfig(**cfg)
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "sampling_offsets" in name else 0.05))
    return model


def _our_decoder(hf_config, **overrides):
    args = dict(
        in_channels=hf_config.feature_size,
        num_classes=hf_config.num_labels,
        hidden_dim=hf_config.hidden_dim,
        num_queries=hf_config.num_queries,
        nheads=hf_config.num_attention_heads,
        dim_feedforward=hf_config.dim_feedforward,
        dec_layers=hf_config.decoder_layers - 1,
        pre_norm=hf_config.pre_norm,
        mask_dim=hf_config.mask_feature_size,
        enforce_input_project=hf_config.enforce_input_projection,
    )
    args.update(overrides)
    return MultiScaleMaskedTransformerDecoder(**args).eval()


def _hf_predictions(hf_out):
    """HF's ``(class logits, mask logits)`` of every prediction, first to last."""
    aux = hf_out.auxiliary_logits
    preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in aux]
    return preds + [(hf_out.class_queries_logits, hf_out.masks_queries_logits)]


def _assert_same_predictions(ours, hf_preds):
    """Final + every auxiliary prediction: class and mask logits within TOL (max abs diff)."""
    ours_all = ours["aux_outputs"] + [ours]
    assert len(ours_all) == len(hf_preds)
    for i, (a, (logits, masks)) in enumerate(zip(ours_all, hf_preds)):
        assert a["pred_logits"].shape == logits.shape, i
        assert a["pred_masks"].shape == masks.shape, i
        assert (a["pred_logits"] - logits).abs().max() < TOL, f"class logits, prediction {i}"
        assert (a["pred_masks"] - masks).abs().max() < TOL, f"mask logits, prediction {i}"


def test_full_model_matches_hugging_face_layer_by_layer():
    """pixels -> HF Swin features -> our pixel decoder + transformer decoder == HF end to end."""
    hf = _hf_model()
    pixel_decoder = MSDeformAttnPixelDecoder(
        input_shape={"res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32)},
        conv_dim=32, mask_dim=32, transformer_nheads=4, transformer_dim_feedforward=64,
        transformer_enc_layers=1,
    ).eval()
    decoder = _our_decoder(hf.config)
    load_hf_mask2former_pixel_decoder_weights(pixel_decoder, hf)
    load_hf_mask2former_decoder_weights(decoder, hf)

    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = hf(pixels, output_auxiliary_logits=True, output_hidden_states=True)
        backbone = hf.model.pixel_level_module.encoder(pixels).feature_maps
        features = dict(zip(["res2", "res3", "res4", "res5"], backbone))
        mask_features, multi_scale = pixel_decoder(features)
        ours = decoder(multi_scale, mask_features)

    assert ours["pred_logits"].shape == (2, 8, NUM_LABELS + 1)
    assert ours["pred_masks"].shape == (2, 8, 16, 24)
    assert len(ours["aux_outputs"]) == 3
    _assert_same_predictions(ours, _hf_predictions(hf_out))
    # query_features = decoder output after the final LayerNorm = HF's last intermediate state
    with torch.no_grad():
        hf_norm = hf.model.transformer_module.decoder.layernorm
        hf_queries = hf_norm(hf_out.transformer_decoder_last_hidden_state)
    assert (ours["query_features"] - hf_queries).abs().max() < TOL
    # Masked attention really was exercised: the previous masks cover part of the image.
    for aux in ours["aux_outputs"]:
        background = (aux["pred_masks"] < 0).float().mean().item()
        assert 0.05 < background < 0.95


def _decoder_only_case(hf, in_channels, seed=2, mask_features=None):
    """Random multi-scale features, and HF's transformer module + class predictor run on them."""
    g = torch.Generator().manual_seed(seed)
    multi_scale = [
        torch.randn(2, in_channels, h, w, generator=g) for h, w in ((2, 3), (4, 6), (8, 12))
    ]
    if mask_features is None:
        mask_features = torch.randn(2, hf.config.mask_feature_size, 16, 24, generator=g)
    with torch.no_grad():
        hf_dec = hf.model.transformer_module(multi_scale, mask_features, output_hidden_states=True)
        states = hf_dec.intermediate_hidden_states  # each [Q, B, D], after HF's final LayerNorm
        hf_logits = [hf.class_predictor(h.transpose(0, 1)) for h in states]
    return multi_scale, mask_features, list(zip(hf_logits, hf_dec.masks_queries_logits))


def test_pre_norm_and_input_projection_match_hugging_face():
    # feature_size != hidden_dim forces the 1x1 input projections; pre_norm switches layer order.
    hf = _hf_model(seed=3, feature_size=64, pre_norm=True, decoder_layers=5)
    decoder = _our_decoder(hf.config)
    assert all(isinstance(p, torch.nn.Conv2d) for p in decoder.input_proj)
    load_hf_mask2former_decoder_weights(decoder, hf)
    multi_scale, mask_features, hf_preds = _decoder_only_case(hf, in_channels=64)
    with torch.no_grad():
        ours = decoder(multi_scale, mask_features)
    assert len(ours["aux_outputs"]) == 4
    _assert_same_predictions(ours, hf_preds)


def test_enforce_input_projection_matches_hugging_face():
    hf = _hf_model(seed=4, enforce_input_projection=True)
    decoder = _our_decoder(hf.config)
    assert all(isinstance(p, torch.nn.Conv2d) for p in decoder.input_proj)
    load_hf_mask2former_decoder_weights(decoder, hf.model, class_predictor=hf.class_predictor)
    multi_scale, mask_features, hf_preds = _decoder_only_case(hf, in_channels=32)
    with torch.no_grad():
        ours = decoder(multi_scale, mask_features)
    _assert_same_predictions(ours, hf_preds)


def test_fully_masked_queries_attend_everywhere_like_hugging_face():
    """Every predicted mask empty -> every row of the attention mask is opened (no NaN)."""
    hf = _hf_model(seed=5)
    with torch.no_grad():
        last = hf.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[2].layers[0]
        last.weight.zero_()
        last.bias.fill_(-1.0)
    decoder = _our_decoder(hf.config)
    load_hf_mask2former_decoder_weights(decoder, hf)
    # mask logits = -32 everywhere: every query's previous mask is empty on every level
    ones = torch.ones(2, 32, 16, 24)
    multi_scale, mask_features, hf_preds = _decoder_only_case(hf, 32, mask_features=ones)
    with torch.no_grad():
        ours = decoder(multi_scale, mask_features)
    assert (ours["pred_masks"] < 0).all()
    assert torch.isfinite(ours["pred_logits"]).all()
    _assert_same_predictions(ours, hf_preds)


def test_cross_attention_mask_rules():
    decoder = _tiny(nheads=2)
    fg_mask = torch.tensor(
        [[[True, True, True, True], [False, True, True, False]],
         [[False, False, False, False], [True, True, True, True]]]
    )  # [B=2, Q=2, S=4], True = background (masked)
    out = decoder._cross_attention_mask(fg_mask, None)
    assert out.shape == (4, 2, 4)  # batch-major, heads repeated
    expected = torch.tensor(
        [[[False] * 4, [False, True, True, False]], [[False] * 4, [False] * 4]]
    )
    assert torch.equal(out, expected.repeat_interleave(2, dim=0))
    # with padding: padded keys stay masked even on an opened row
    pad = torch.tensor([[False, False, False, True], [False, False, True, True]])
    out = decoder._cross_attention_mask(fg_mask, pad)
    expected = torch.tensor(
        [[[False, False, False, True], [False, True, True, True]],
         [[False, False, True, True], [False, False, True, True]]]
    )
    assert torch.equal(out, expected.repeat_interleave(2, dim=0))


def test_weight_loader_checks_sizes():
    hf = _hf_model(seed=6)
    with pytest.raises(KeyError):
        load_hf_mask2former_decoder_weights(_our_decoder(hf.config, dec_layers=4), hf)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_hf_mask2former_decoder_weights(_our_decoder(hf.config, dim_feedforward=48), hf)
    with pytest.raises(KeyError, match="class_predictor"):
        load_hf_mask2former_decoder_weights(_our_decoder(hf.config), hf.model)


# ---------------------------------------------------------------------------------------------
# our decoder on its own
# ---------------------------------------------------------------------------------------------
def _tiny(**kw):
    args = dict(
        in_channels=16, num_classes=3, hidden_dim=16, num_queries=5, nheads=2,
        dim_feedforward=32, dec_layers=4, mask_dim=12,
    )
    args.update(kw)
    return MultiScaleMaskedTransformerDecoder(**args)


def _inputs(batch=2, channels=16, mask_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    multi_scale = [
        torch.randn(batch, channels, h, w, generator=g) for h, w in ((2, 3), (4, 6), (8, 12))
    ]
    return multi_scale, torch.randn(batch, mask_dim, 16, 24, generator=g)


def test_output_structure_and_gradients():
    torch.manual_seed(0)
    decoder = _tiny().train()
    multi_scale, mask_features = _inputs()
    multi_scale = [f.requires_grad_() for f in multi_scale]
    out = decoder(multi_scale, mask_features)
    assert set(out) == {"pred_logits", "pred_masks", "query_features", "aux_outputs"}
    assert out["pred_logits"].shape == (2, 5, 4)
    assert out["pred_masks"].shape == (2, 5, 16, 24)
    assert out["query_features"].shape == (2, 5, 16)
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks", "query_features"}
        assert aux["pred_masks"].shape == (2, 5, 16, 24)
    # query_features is LayerNorm output: zero mean, unit variance per query (LN at init).
    torch.testing.assert_close(out["query_features"].mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
    for aux in out["aux_outputs"]:
        loss = loss + aux["pred_masks"].sigmoid().mean() + aux["pred_logits"].mean()
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for f in multi_scale:
        assert f.grad is not None and f.grad.abs().sum() > 0


def test_wrong_number_of_levels_is_rejected():
    multi_scale, mask_features = _inputs()
    with pytest.raises(ValueError, match="feature levels"):
        _tiny()(multi_scale[:2], mask_features)


def test_padding_is_never_attended():
    torch.manual_seed(0)
    decoder = _tiny().eval()
    multi_scale, mask_features = _inputs()
    pad = torch.zeros(2, 64, 96, dtype=torch.bool)
    pad[:, :, 64:] = True  # right third of the padded image: columns >= 2/3 of every level
    changed = [f.clone() for f in multi_scale]
    for f in changed:
        f[..., (2 * f.shape[-1]) // 3 :] += 3.0
    with torch.no_grad():
        a = decoder(multi_scale, mask_features, mask=pad)
        b = decoder(changed, mask_features, mask=pad)
        c = decoder(changed, mask_features)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=0, atol=1e-5)
    # without the padding mask the padded content does leak in
    assert (a["pred_logits"] - c["pred_logits"]).abs().max() > 1e-3


def test_registry_and_from_config():
    registered = TRANSFORMER_DECODER_REGISTRY.get("MultiScaleMaskedTransformerDecoder")
    assert registered is MultiScaleMaskedTransformerDecoder
    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 12
    cfg.MODEL.MASK_FORMER = CfgNode()
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM, mf.NUM_OBJECT_QUERIES, mf.NHEADS, mf.DIM_FEEDFORWARD = 16, 6, 4, 24
    mf.DEC_LAYERS, mf.PRE_NORM, mf.ENFORCE_INPUT_PROJ, mf.DROPOUT = 4, False, True, 0.0
    decoder = MultiScaleMaskedTransformerDecoder(cfg, in_channels=16)
    assert decoder.num_layers == 3  # DEC_LAYERS counts predictions
    assert decoder.query_feat.weight.shape == (6, 16)
    assert decoder.class_embed.out_features == 8
    assert all(isinstance(p, torch.nn.Conv2d) for p in decoder.input_proj)
    out = decoder(*_inputs())
    assert out["pred_logits"].shape == (2, 6, 8) and len(out["aux_outputs"]) == 3
