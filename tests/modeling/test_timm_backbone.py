import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from pix2cap.checkpoint import CheckpointError
from pix2cap.config.config import CfgNode as CN
from pix2cap.config.config import get_cfg
from pix2cap.modeling.backbone import BACKBONE_REGISTRY, ShapeSpec, TimmBackbone
from pix2cap.modeling.backbone import timm_backbone as timm_backbone_module

# channels timm's tf_efficientnet_lite0 produces at strides 4, 8, 16, 32
LITE0_CHANNELS = {"res2": 24, "res3": 40, "res4": 112, "res5": 320}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class _Records(logging.Handler):
    """Collects the backbone module's log records, whatever the root logger's set-up."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


@pytest.fixture
def backbone_log():
    handler = _Records()
    logger = timm_backbone_module.logger
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _norm_layers(module):
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return [m for m in module.modules() if isinstance(m, norm_types)]


def test_registered():
    assert BACKBONE_REGISTRY.get("TimmBackbone") is TimmBackbone


def test_output_names_strides_channels_lite0():
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name="tf_efficientnet_lite0", freeze=False).eval()
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5"]
    for name, spec in shapes.items():
        assert isinstance(spec, ShapeSpec)
        assert spec.channels == LITE0_CHANNELS[name] and spec.stride == STRIDES[name]
        assert spec["channels"] == spec.channels  # dict-style access works too

    x = torch.randn(2, 3, 64, 96)
    out = backbone(x)
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, feature in out.items():
        s = STRIDES[name]
        assert feature.shape == (2, LITE0_CHANNELS[name], 64 // s, 96 // s)
        assert torch.isfinite(feature).all()


def test_subset_of_features_resnet18():
    backbone = TimmBackbone(model_name="resnet18", out_features=("res5", "res3"), freeze=False)
    out = backbone(torch.randn(1, 3, 64, 64))
    # returned in stride order whatever the order asked for
    assert list(out) == ["res3", "res5"]
    assert out["res3"].shape == (1, 128, 8, 8)
    assert out["res5"].shape == (1, 512, 2, 2)
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        "res3": (128, 8),
        "res5": (512, 32),
    }


def test_frozen_has_no_grad_and_norms_stay_in_eval():
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name="tf_efficientnet_lite0", freeze=True)
    backbone.train()
    assert backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    norms = _norm_layers(backbone)
    assert len(norms) > 40
    assert all(not m.training for m in norms)

    bn = norms[0]
    stats_before = bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = backbone(x)
    # no graph is built through a frozen backbone, even for an input that requires grad
    assert all(not f.requires_grad and f.grad_fn is None for f in out.values())
    # eval-mode batch norm: running statistics untouched by a "training" forward
    assert torch.equal(bn.running_mean, stats_before)
    # a frozen backbone is deterministic in train mode
    assert torch.equal(backbone(x)["res5"], out["res5"])


def test_unfrozen_trains_normally():
    backbone = TimmBackbone(model_name="resnet18", freeze=False).train()
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(m.training for m in _norm_layers(backbone))
    out = backbone(torch.randn(2, 3, 64, 64))
    out["res5"].sum().backward()
    assert backbone.model.conv1.weight.grad is not None
    assert backbone.model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, backbone_log, suffix):
    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False, num_classes=10)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    path = str(tmp_path / f"resnet18{suffix}")
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)  # wrapped checkpoints are unwrapped

    torch.manual_seed(2)  # a different random init, so equality proves the load happened
    backbone = TimmBackbone(model_name="resnet18", weights=path, freeze=True)
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key

    # features equal the full model's own stage outputs
    full.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        expected = full.layer4(full.layer3(full.layer2(full.layer1(stem))))
    assert torch.allclose(backbone(x)["res5"], expected, atol=1e-6)

    dropped = [m for level, m in backbone_log if "Dropped 2 checkpoint tensors" in m]
    assert len(dropped) == 1 and "fc.{bias, weight}" in dropped[0]
    assert not [m for level, m in backbone_log if level >= logging.WARNING]


def test_missing_keys_are_logged(tmp_path, backbone_log):
    full = timm.create_model("resnet18", pretrained=False)
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("layer4.1.conv2")}
    path = str(tmp_path / "partial.safetensors")
    save_file(state, path)
    TimmBackbone(model_name="resnet18", weights=path)
    warnings = [m for level, m in backbone_log if level == logging.WARNING]
    assert len(warnings) == 1
    assert "1 tensors not found" in warnings[0] and "layer4.1.conv2.weight" in warnings[0]


def test_wrong_shapes_raise(tmp_path):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\)"):
        TimmBackbone(model_name="resnet18", weights=path)


class _Hostile:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_and_hostile_weight_files_name_the_file(tmp_path, suffix):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    good = str(tmp_path / f"good{suffix}")
    if suffix == ".safetensors":
        save_file(state, good)
    else:
        torch.save(state, good)
    truncated = str(tmp_path / f"truncated{suffix}")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        TimmBackbone(model_name="resnet18", weights=truncated)
    message = str(info.value)
    if suffix == ".pth":
        assert message == (
            f"{truncated}: corrupt or truncated checkpoint (PytorchStreamReader failed reading "
            "zip archive: failed finding central directory)"
        )
    else:
        assert message.startswith(f"{truncated}: not a readable safetensors file, corrupt or ")
    assert "weights_only" not in message


def test_hostile_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "hostile.pth")
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save({"state_dict": state, "extra": _Hostile(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        TimmBackbone(model_name="resnet18", weights=path)
    assert str(info.value) == (
        f"{path}: refused: it holds pickled Python objects, not only tensors and plain "
        "containers (loading it would import and call io.open); pix2cap loads checkpoints "
        "without unpickling objects. Provide the weights as a state dict of tensors "
        "(torch.save(model.state_dict(), ...)) or as a .safetensors file"
    )
    assert not marker.exists()
    listed = str(tmp_path / "list.pth")
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError) as info:
        TimmBackbone(model_name="resnet18", weights=listed)
    assert str(info.value) == (
        f"{listed}: does not hold a state dict (a mapping of names to tensors)"
    )


def test_weights_of_another_architecture_are_refused(tmp_path):
    # convnext keys share no name with resnet18's: nothing would load, the frozen backbone
    # would stay random.
    path = str(tmp_path / "convnext.safetensors")
    save_file(timm.create_model("convnext_atto", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        TimmBackbone(model_name="resnet18", weights=path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: covers only 0 of the 11,176,512 parameter values of timm's 'resnet18' (0.0%; "
        "at least 50% needed): is it for another architecture, or does it need a converter "
        "(pretrained_filter)? Its keys: "
    )


def test_pretrained_filter_renames_foreign_keys(tmp_path):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = str(tmp_path / "prefixed.pth")
    torch.save({f"encoder.{k}": v for k, v in state.items()}, path)
    backbone = TimmBackbone(
        model_name="resnet18",
        weights=path,
        pretrained_filter=lambda sd: {k.removeprefix("encoder."): v for k, v in sd.items()},
    )
    assert torch.equal(backbone.model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_nested_stage_names_match_flattened_feature_modules(tmp_path):
    # convnext's features-only wrapper renames "stages.0" -> "stages_0"; classifier
    # checkpoints use the dotted names.
    torch.manual_seed(3)
    full = timm.create_model("convnext_atto", pretrained=False)
    state = full.state_dict()
    path = str(tmp_path / "convnext.safetensors")
    save_file(state, path)
    backbone = TimmBackbone(model_name="convnext_atto", weights=path)
    assert torch.equal(
        backbone.model.state_dict()["stages_2.blocks.0.conv_dw.weight"],
        state["stages.2.blocks.0.conv_dw.weight"],
    )


@pytest.mark.parametrize(
    "weights",
    [
        "timm/tf_efficientnet_lite0",
        "hf-hub:timm/tf_efficientnet_lite0.in1k",
        "https://example.com/tf_efficientnet_lite0.pth",
        "/nonexistent/tf_efficientnet_lite0.safetensors",
    ],
)
def test_hub_like_weights_fail_with_local_file_hint(weights):
    with pytest.raises(FileNotFoundError) as info:
        TimmBackbone(model_name="tf_efficientnet_lite0", weights=weights)
    message = str(info.value)
    assert repr(weights) in message
    assert "model_zoo/backbones/tf_efficientnet_lite0.safetensors" in message
    assert "python tools/convert_efficientnet_lite0.py" in message
    if not weights.startswith("/"):
        assert "never downloads" in message


def test_other_model_hint_names_its_file():
    with pytest.raises(FileNotFoundError, match="model_zoo/backbones/resnet18.safetensors"):
        TimmBackbone(model_name="resnet18", weights="timm/resnet18.a1_in1k")


def test_unsupported_suffix_and_strides(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"0")
    with pytest.raises(ValueError, match="unsupported weights format"):
        TimmBackbone(model_name="resnet18", weights=str(path))
    with pytest.raises(ValueError, match="subset of"):
        TimmBackbone(model_name="resnet18", out_features=("res6",))
    # a plain ViT has every level at stride 16
    with pytest.raises(ValueError, match=r"none at \[4, 8, 32\]"):
        TimmBackbone(model_name="vit_tiny_patch16_224")


def test_from_config():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.TIMM = CN()
    cfg.MODEL.BACKBONE.TIMM.NAME = "resnet18"
    cfg.MODEL.BACKBONE.TIMM.OUT_FEATURES = ["res4", "res5"]
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    cfg.MODEL.BACKBONE.FREEZE = False
    backbone = TimmBackbone(cfg)
    assert backbone.model_name == "resnet18" and not backbone.freeze
    assert list(backbone.output_shape()) == ["res4", "res5"]
    # explicit keywords override the config
    frozen = TimmBackbone(cfg, freeze=True)
    assert all(not p.requires_grad for p in frozen.parameters())
