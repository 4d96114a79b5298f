"""Optimizer construction with per-parameter groups, and gradient clipping."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["build_optimizer", "get_default_optimizer_params", "build_gradient_clipper"]

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

logger = logging.getLogger(__name__)


def _is_embedding_param(module: nn.Module, param_name: str) -> bool:
    """Embedding tables and learned query / position tables: decaying them shrinks the
    representations they store, so they get WEIGHT_DECAY_EMBED instead."""
    if isinstance(module, nn.Embedding):
        return True
    lowered = param_name.lower()
    return any(tag in lowered for tag in ("query_feat", "query_embed", "pos_embed", "level_embed"))


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_bias: Optional[float] = None,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 1.0,
) -> list[dict]:
    """One parameter group per trainable parameter, with its own lr and weight decay.

    * norm-layer parameters get ``weight_decay_norm``; biases ``weight_decay_bias``
      (default: ``weight_decay_norm``); embeddings / learned queries ``weight_decay_embed``;
    * parameters whose name starts with ``backbone.`` get ``lr = base_lr * backbone_multiplier``;
    * frozen parameters (``requires_grad=False``) are left out, and a parameter shared by
      several modules appears once.

    Returns:
        list of ``{"params": [p], "lr": float, "weight_decay": float, "name": str}``.
    """
    if weight_decay_bias is None:
        weight_decay_bias = weight_decay_norm
    groups: list[dict] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            # A DistributedDataParallel wrapper prefixes every name with "module.".
            plain_name = full_name.removeprefix("module.")
            lr = base_lr
            if plain_name.startswith("backbone."):
                lr = base_lr * backbone_multiplier
            if isinstance(module, _NORM_TYPES):
                decay = weight_decay_norm
            elif _is_embedding_param(module, param_name):
                decay = weight_decay_embed
            elif param_name == "bias":
                decay = weight_decay_bias
            else:
                decay = weight_decay
            groups.append(
                {"params": [param], "lr": lr, "weight_decay": decay, "name": plain_name}
            )
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Build ``cfg.SOLVER.OPTIMIZER`` ("ADAMW" or "SGD") over the model's trainable parameters,
    grouped by :func:`get_default_optimizer_params`."""
    solver = cfg.SOLVER
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.WEIGHT_DECAY_EMBED,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
    )
    if not params:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters; nothing to optimize"
        )
    name = solver.OPTIMIZER.upper()
    if name == "ADAMW":
        return torch.optim.AdamW(params, lr=solver.BASE_LR, betas=tuple(solver.BETAS))
    if name == "SGD":
        return torch.optim.SGD(params, lr=solver.BASE_LR, momentum=solver.MOMENTUM)
    raise ValueError(f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r} is not supported; use ADAMW or SGD")


def build_gradient_clipper(cfg) -> Optional[Callable[[Iterable[torch.Tensor]], None]]:
    """A function clipping the gradients of the parameters it is given, per
    ``cfg.SOLVER.CLIP_GRADIENTS``, or ``None`` when clipping is disabled.

    * ``full_model``: scale all gradients together so their joint ``NORM_TYPE``-norm is at
      most ``CLIP_VALUE``;
    * ``norm``: the same, but for each parameter separately;
    * ``value``: clamp every gradient entry to ``[-CLIP_VALUE, CLIP_VALUE]``.

    The trainer calls it after ``backward()`` (after unscaling in AMP) and before
    ``optimizer.step()``.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    clip_type = clip.CLIP_TYPE
    clip_value = float(clip.CLIP_VALUE)
    norm_type = float(clip.NORM_TYPE)
    if clip_value <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clip_value}")

    if clip_type == "full_model":

        def clip_full_model(parameters: Iterable[torch.Tensor]) -> None:
            torch.nn.utils.clip_grad_norm_(list(parameters), clip_value, norm_type)

        return clip_full_model
    if clip_type == "norm":

        def clip_each_norm(parameters: Iterable[torch.Tensor]) -> None:
            for param in parameters:
                if param.grad is not None:
                    torch.nn.utils.clip_grad_norm_(param, clip_value, norm_type)

        return clip_each_norm
    if clip_type == "value":

        def clip_values(parameters: Iterable[torch.Tensor]) -> None:
            torch.nn.utils.clip_grad_value_(list(parameters), clip_value)

        return clip_values
    raise ValueError(
        f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip_type!r} is not supported; "
        "use 'full_model', 'norm' or 'value'"
    )
