import math

import pytest
import torch
from torch import nn

from pix2cap.config import get_cfg
from pix2cap.solver import (
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    get_default_optimizer_params,
)


def _lrs(cfg, num_iter):
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(num_iter):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.MAX_ITER = 100
    cfg.SOLVER.WARMUP_ITERS = 10
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    cfg.SOLVER.STEPS = (50, 80)
    cfg.SOLVER.GAMMA = 0.1
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


def test_warmup_multistep_values_at_given_iterations():
    lrs = _lrs(_cfg(), 100)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 5 / 10)  # linear ramp
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[49] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1)
    assert lrs[79] == pytest.approx(0.1)
    assert lrs[80] == pytest.approx(0.01)
    assert lrs[99] == pytest.approx(0.01)


def test_constant_warmup_and_steps_beyond_max_iter_are_dropped():
    lrs = _lrs(_cfg(WARMUP_METHOD="constant", STEPS=(50, 200)), 100)
    assert lrs[0] == lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1)


def test_cosine_and_poly_schedules():
    cosine = _lrs(_cfg(LR_SCHEDULER_NAME="WarmupCosineLR", WARMUP_ITERS=0), 100)
    assert cosine[0] == pytest.approx(1.0)
    assert cosine[50] == pytest.approx(0.5)
    assert cosine[75] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    poly = _lrs(_cfg(LR_SCHEDULER_NAME="WarmupPolyLR", WARMUP_ITERS=0, POLY_POWER=2.0), 100)
    assert poly[50] == pytest.approx(0.25)
    assert poly[90] == pytest.approx(0.01)


def test_scheduler_state_dict_is_plain_and_restores_position():
    cfg = _cfg()
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(55):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state == {"base_lrs": [1.0, 1.0], "last_epoch": 55}
    restored = build_lr_scheduler(cfg, build_optimizer(cfg, nn.Linear(2, 2)))
    restored.load_state_dict(state)
    assert restored.get_last_lr() == pytest.approx([0.1, 0.1])


def test_bad_scheduler_settings_raise():
    with pytest.raises(ValueError, match="LR_SCHEDULER_NAME"):
        _lrs(_cfg(LR_SCHEDULER_NAME="Nope"), 1)
    with pytest.raises(ValueError, match="WARMUP_METHOD"):
        _lrs(_cfg(WARMUP_METHOD="exp"), 1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.embed = nn.Embedding(10, 4)
        self.query_feat = nn.Parameter(torch.zeros(5, 4))
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(4)


def test_param_groups_weight_decay_and_backbone_multiplier():
    groups = get_default_optimizer_params(
        _Net(),
        base_lr=1.0,
        weight_decay=0.05,
        weight_decay_norm=0.0,
        weight_decay_embed=0.01,
        backbone_multiplier=0.1,
    )
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.1.weight",
        "backbone.1.bias",
        "embed.weight",
        "query_feat",
        "head.weight",
        "head.bias",
        "norm.weight",
        "norm.bias",
    }  # frozen.* skipped
    assert by_name["backbone.0.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["backbone.0.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.0.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.1.weight"]["weight_decay"] == 0.0  # norm
    assert by_name["embed.weight"]["weight_decay"] == 0.01
    assert by_name["query_feat"]["weight_decay"] == 0.01
    assert by_name["head.weight"] == {**by_name["head.weight"], "lr": 1.0, "weight_decay": 0.05}
    assert by_name["norm.weight"]["weight_decay"] == 0.0


def test_build_optimizer_types_and_errors():
    cfg = get_cfg()
    assert isinstance(build_optimizer(cfg, _Net()), torch.optim.AdamW)
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(build_optimizer(cfg, _Net()), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="LAMB"):
        build_optimizer(cfg, _Net())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(get_cfg(), frozen)


def _params_with_grads():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(4))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    b.grad = torch.tensor([0.0, 0.0, 12.0, -0.5])  # norm ~12.01
    return a, b


def test_clipping_full_model_norm_and_value():
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0

    a, b = _params_with_grads()
    build_gradient_clipper(cfg)([a, b])  # full_model
    total = torch.cat([a.grad, b.grad]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-4)
    assert (a.grad[0] / a.grad[1]).item() == pytest.approx(0.75)  # direction kept

    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    a, b = _params_with_grads()
    build_gradient_clipper(cfg)([a, b])
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert b.grad.norm().item() == pytest.approx(1.0, rel=1e-4)

    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    a, b = _params_with_grads()
    build_gradient_clipper(cfg)([a, b])
    assert a.grad.tolist() == [1.0, 1.0, 0.0]
    assert b.grad.tolist() == [0.0, 0.0, 1.0, -0.5]

    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert build_gradient_clipper(cfg) is None
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        build_gradient_clipper(cfg)
