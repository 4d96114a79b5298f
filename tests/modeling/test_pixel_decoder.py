"""MSDeformAttnPixelDecoder: shapes, gradients, the deformable-attention core against a naive
bilinear reference, and weight-for-weight equality with Hugging Face's Mask2Former pixel
decoder."""

import math
import os

import pytest
import torch

from pix2cap.config.config import CfgNode, get_cfg
from pix2cap.modeling.backbone import ShapeSpec
from pix2cap.modeling.pixel_decoder import PIXEL_DECODER_REGISTRY
from pix2cap.modeling.pixel_decoder.msdeformattn import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoder,
    load_hf_mask2former_pixel_decoder_weights,
    ms_deform_attn_core_pytorch,
)
from pix2cap.modeling.position_encoding import PositionEmbeddingSine

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHANNELS = {"res2": 8, "res3": 16, "res4": 24, "res5": 32}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _features(batch=2, height=64, width=96, channels=CHANNELS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, c, height // STRIDES[k], width // STRIDES[k], generator=g)
        for k, c in channels.items()
    }


def _tiny_decoder(input_shape=None, **kw):
    args = dict(
        input_shape=input_shape or {k: (CHANNELS[k], STRIDES[k]) for k in CHANNELS},
        conv_dim=16,
        mask_dim=12,
        transformer_nheads=2,
        transformer_dim_feedforward=32,
        transformer_enc_layers=2,
    )
    args.update(kw)
    return MSDeformAttnPixelDecoder(**args)


# ---------------------------------------------------------------------------------------------
# shapes, input-shape forms, registry, config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape_form",
    [
        lambda k: (CHANNELS[k], STRIDES[k]),
        lambda k: {"channels": CHANNELS[k], "stride": STRIDES[k]},
        lambda k: ShapeSpec(channels=CHANNELS[k], stride=STRIDES[k]),
    ],
    ids=["tuple", "dict", "shapespec"],
)
def test_output_shapes(shape_form):
    torch.manual_seed(0)
    decoder = _tiny_decoder({k: shape_form(k) for k in CHANNELS}).eval()
    mask_features, multi_scale = decoder.forward_features(_features())
    assert mask_features.shape == (2, 12, 16, 24)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 16, 2, 3), (2, 16, 4, 6), (2, 16, 8, 12)]
    assert torch.isfinite(mask_features).all()
    assert all(torch.isfinite(f).all() for f in multi_scale)
    # forward is forward_features
    again, _ = decoder(_features())
    torch.testing.assert_close(again, mask_features, rtol=0, atol=0)


def test_structure_and_group_norm_adapts_to_tiny_widths():
    decoder = _tiny_decoder(conv_dim=8, transformer_nheads=2)
    gn = decoder.input_proj[0][1]
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 8 and gn.num_channels == 8
    assert _tiny_decoder(conv_dim=48, transformer_nheads=2).input_proj[0][1].num_groups == 16
    assert _tiny_decoder(conv_dim=64, transformer_nheads=2).input_proj[0][1].num_groups == 32
    assert decoder.transformer_in_features == ["res3", "res4", "res5"]
    assert decoder.num_fpn_levels == 1 and decoder.fpn_features == ["res2"]
    assert len(decoder.transformer.encoder.layers) == 2
    # input_proj[0] projects the coarsest level
    assert decoder.input_proj[0][0].in_channels == CHANNELS["res5"]
    assert decoder.input_proj[2][0].in_channels == CHANNELS["res3"]
    # norm "" gives biased convs and no norm
    plain = _tiny_decoder(norm="")
    assert isinstance(plain.input_proj[0][1], torch.nn.Identity)
    assert plain.adapter_1.bias is not None and isinstance(plain.adapter_1.norm, torch.nn.Identity)


def test_unknown_transformer_feature_is_rejected():
    with pytest.raises(ValueError, match="res6"):
        _tiny_decoder(transformer_in_features=("res4", "res5", "res6"))


def test_registry_and_from_config():
    assert PIXEL_DECODER_REGISTRY.get("MSDeformAttnPixelDecoder") is MSDeformAttnPixelDecoder
    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 20
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 3
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD = 24
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_N_POINTS = 2
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.MASK_FORMER = CfgNode()
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    input_shape = {k: ShapeSpec(channels=CHANNELS[k], stride=STRIDES[k]) for k in CHANNELS}
    input_shape["stem"] = ShapeSpec(channels=4, stride=2)  # not in IN_FEATURES: dropped
    decoder = MSDeformAttnPixelDecoder(cfg, input_shape)
    assert decoder.in_features == ["res2", "res3", "res4", "res5"]
    assert len(decoder.transformer.encoder.layers) == 3
    attn = decoder.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points, attn.n_levels) == (4, 2, 3)
    assert decoder.transformer.encoder.layers[0].linear1.out_features == 24
    mask_features, multi_scale = decoder(_features())
    assert mask_features.shape == (2, 20, 16, 24) and multi_scale[0].shape == (2, 16, 2, 3)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter_and_input():
    torch.manual_seed(0)
    decoder = _tiny_decoder().train()
    # Deformable-DETR init zeroes the query -> (offsets, weights) maps, so at step 0 nothing
    # flows into the position/level embeddings; move off that point as training does.
    with torch.no_grad():
        for layer in decoder.transformer.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    features = {k: v.requires_grad_() for k, v in _features(batch=1).items()}
    mask_features, multi_scale = decoder(features)
    loss = mask_features.square().mean() + sum(f.sin().mean() for f in multi_scale)
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for name, f in features.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# deformable attention core
# ---------------------------------------------------------------------------------------------
def _naive_bilinear(image, x, y):
    """Sample ``image`` [C, H, W] at normalised (x, y) in [0, 1] (0/1 = outer pixel edges);
    pixels outside the map count as zero."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5  # continuous pixel-centre coordinates
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(image.shape[0], dtype=torch.float64)
    for yy, xx, w in (
        (y0, x0, (1 - fy) * (1 - fx)),
        (y0, x0 + 1, (1 - fy) * fx),
        (y0 + 1, x0, fy * (1 - fx)),
        (y0 + 1, x0 + 1, fy * fx),
    ):
        if 0 <= yy < height and 0 <= xx < width:
            out += w * image[:, yy, xx].double()
    return out


def _naive_ms_deform_attn(value, shapes, locations, weights):
    batch, _, n_heads, head_dim = value.shape
    _, n_query, _, n_levels, n_points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, n_query, n_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for m in range(n_heads):
            maps = [
                value[b, starts[lv] : starts[lv + 1], m].T.reshape(head_dim, h, w)
                for lv, (h, w) in enumerate(shapes)
            ]
            for q in range(n_query):
                for lv in range(n_levels):
                    for p in range(n_points):
                        x, y = locations[b, q, m, lv, p].tolist()
                        w = weights[b, q, m, lv, p].double()
                        out[b, q, m] += w * _naive_bilinear(maps[lv], x, y)
    return out.reshape(batch, n_query, n_heads * head_dim)


def test_ms_deform_attn_core_matches_naive_bilinear_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (4, 2), (1, 1)]
    batch, n_query, n_heads, head_dim, n_points = 2, 4, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), n_heads, head_dim, generator=g)
    # Locations spill past the borders (-0.3 .. 1.3) so zero padding is exercised too.
    locations = torch.rand(batch, n_query, n_heads, len(shapes), n_points, 2, generator=g)
    locations = locations * 1.6 - 0.3
    weights = torch.rand(batch, n_query, n_heads, len(shapes), n_points, generator=g)
    ours = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    ref = _naive_ms_deform_attn(value, shapes, locations, weights)
    assert ours.shape == (batch, n_query, n_heads * head_dim)
    assert (ours.double() - ref).abs().max() < 1e-5
    # Sanity of the reference itself: sampling exactly at a pixel centre returns that pixel.
    img = torch.arange(12.0).view(1, 3, 4)
    assert _naive_bilinear(img, (2 + 0.5) / 4, (1 + 0.5) / 3).item() == img[0, 1, 2].item()


def test_ms_deform_attn_module_init_and_shapes():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=4, n_points=2)
    # Initial offsets: head h points along angle 2*pi*h/4, point k at distance k+1 (L-inf).
    offsets = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    torch.testing.assert_close(offsets[0, 0, 1], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(offsets[1, 1, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    shapes = [(4, 4), (2, 2)]
    src = torch.randn(3, 20, 8)
    ref = MSDeformAttnTransformerEncoder.get_reference_points(shapes, src.device, src.dtype)
    assert ref.shape == (1, 20, 2, 2)
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.125, 0.125]))
    torch.testing.assert_close(ref[0, 19, 1], torch.tensor([0.75, 0.75]))
    out = attn(src, ref, src, shapes)
    assert out.shape == (3, 20, 8)
    # Padding positions read as zero: changing their content changes nothing.
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[:, 16:] = True
    src2 = src.clone()
    src2[:, 16:] += 5.0
    torch.testing.assert_close(
        attn(src, ref, src, shapes, pad), attn(src, ref, src2, shapes, pad), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(src, ref, src, [(4, 4), (3, 3)])


# ---------------------------------------------------------------------------------------------
# Hugging Face equivalence
# ---------------------------------------------------------------------------------------------
def test_position_embedding_matches_hugging_face():
    m2f = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    x = torch.randn(2, 5, 6, 7)
    ours = PositionEmbeddingSine(16, normalize=True)(x)
    theirs = m2f.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)(
        x.shape, x.device, x.dtype
    )
    assert ours.shape == (2, 32, 6, 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # channel 0 is sin(y_normalised) at the lowest frequency
    y0 = 1 / 6 * 2 * math.pi
    assert abs(ours[0, 0, 0, 0].item() - math.sin(y0)) < 1e-6


def _hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(
        backbone_config=transformers.SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        feature_size=32,
        mask_feature_size=24,
        hidden_dim=32,
        encoder_layers=2,
        encoder_feedforward_dim=48,
        num_attention_heads=4,
    )
    args.update(kw)
    return transformers.Mask2FormerConfig(**args)


def test_pixel_decoder_matches_hugging_face():
    m2f = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    torch.manual_seed(0)
    channels = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}
    hf = m2f.Mask2FormerPixelDecoder(_hf_config(), feature_channels=list(channels.values())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Random everything (HF's init leaves attention weights at zero): bigger offsets so
            # samples land between pixels and off the map.
            p.copy_(torch.randn_like(p) * (0.5 if "sampling_offsets" in name else 0.2))
    ours = MSDeformAttnPixelDecoder(
        input_shape={k: (c, STRIDES[k]) for k, c in channels.items()},
        conv_dim=32,
        mask_dim=24,
        transformer_nheads=4,
        transformer_dim_feedforward=48,
        transformer_enc_layers=2,
    ).eval()
    load_hf_mask2former_pixel_decoder_weights(ours, hf)
    features = _features(height=64, width=96, channels=channels, seed=1)
    with torch.no_grad():
        mask_features, multi_scale = ours(features)
        out = hf([features[k] for k in channels])
    assert mask_features.shape == out.mask_features.shape == (2, 24, 16, 24)
    assert (mask_features - out.mask_features).abs().max() < 1e-4
    assert len(multi_scale) == len(out.multi_scale_features) == 3
    for a, b in zip(multi_scale, out.multi_scale_features):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-4
    # The weights really were copied (a fresh decoder disagrees).
    fresh = MSDeformAttnPixelDecoder(
        input_shape={k: (c, STRIDES[k]) for k, c in channels.items()},
        conv_dim=32, mask_dim=24, transformer_nheads=4,
        transformer_dim_feedforward=48, transformer_enc_layers=2,
    ).eval()
    with torch.no_grad():
        assert (fresh(features)[0] - out.mask_features).abs().max() > 1e-2


def test_hf_weight_loader_rejects_mismatched_sizes():
    m2f = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    channels = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}
    hf = m2f.Mask2FormerPixelDecoder(_hf_config(), feature_channels=list(channels.values()))
    wrong_layers = MSDeformAttnPixelDecoder(
        input_shape={k: (c, STRIDES[k]) for k, c in channels.items()},
        conv_dim=32, mask_dim=24, transformer_nheads=4,
        transformer_dim_feedforward=48, transformer_enc_layers=3,
    )
    with pytest.raises(KeyError):
        load_hf_mask2former_pixel_decoder_weights(wrong_layers, hf)
    wrong_ffn = MSDeformAttnPixelDecoder(
        input_shape={k: (c, STRIDES[k]) for k, c in channels.items()},
        conv_dim=32, mask_dim=24, transformer_nheads=4,
        transformer_dim_feedforward=40, transformer_enc_layers=2,
    )
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_hf_mask2former_pixel_decoder_weights(wrong_ffn, hf)
