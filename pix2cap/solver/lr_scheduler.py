"""Learning-rate schedules: fvcore parameter schedulers with warmup, driven per iteration."""

from __future__ import annotations

import logging

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
    PolynomialDecayParamScheduler,
)

__all__ = ["WarmupParamScheduler", "LRMultiplier", "build_lr_scheduler", "warmup_cosine_schedule"]

logger = logging.getLogger(__name__)


class WarmupParamScheduler(CompositeParamScheduler):
    """``scheduler`` preceded by a warmup over the first ``warmup_length`` fraction of training.

    During warmup the value goes from ``warmup_factor * scheduler(warmup_length)`` to
    ``scheduler(warmup_length)`` linearly (``"linear"``) or stays at the start value
    (``"constant"``); afterwards it follows ``scheduler`` unchanged (not re-scaled in time).
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
    ):
        end_value = scheduler(warmup_length)
        start_value = warmup_factor * end_value
        if warmup_method == "constant":
            warmup = ConstantParamScheduler(start_value)
        elif warmup_method == "linear":
            warmup = LinearParamScheduler(start_value, end_value)
        else:
            raise ValueError(
                f"SOLVER.WARMUP_METHOD={warmup_method!r} is not supported; "
                "use 'linear' or 'constant'"
            )
        super().__init__(
            [warmup, scheduler],
            interval_scaling=["rescaled", "fixed"],
            lengths=[warmup_length, 1 - warmup_length],
        )


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """A torch LR scheduler that sets every group's lr to ``base_lr * multiplier(iter / max_iter)``.

    Each parameter group keeps its own base lr (so backbone groups stay at their smaller lr),
    and ``step()`` is called once per iteration. Its ``state_dict`` holds only numbers, so it
    loads with ``torch.load(..., weights_only=True)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        multiplier: ParamScheduler,
        max_iter: int,
        last_iter: int = -1,
    ):
        if not isinstance(multiplier, ParamScheduler):
            raise TypeError(f"multiplier must be an fvcore ParamScheduler, got {type(multiplier)}")
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}")
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "last_epoch": int(self.last_epoch)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_lrs = [float(lr) for lr in state_dict["base_lrs"]]
        self.last_epoch = int(state_dict["last_epoch"])
        self._last_lr = self.get_lr()

    def get_lr(self) -> list[float]:
        factor = self._multiplier(min(self.last_epoch / self._max_iter, 1.0))
        return [base_lr * factor for base_lr in self.base_lrs]


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """Build ``cfg.SOLVER.LR_SCHEDULER_NAME`` with warmup, stepped once per iteration.

    * ``WarmupMultiStepLR``: multiply by ``GAMMA`` at each of ``STEPS`` (steps at or past
      ``MAX_ITER`` are dropped with a warning);
    * ``WarmupCosineLR``: cosine from 1 to 0 over ``MAX_ITER``;
    * ``WarmupPolyLR``: ``(1 - iter / MAX_ITER) ** POLY_POWER``.
    """
    solver = cfg.SOLVER
    name = solver.LR_SCHEDULER_NAME
    max_iter = int(solver.MAX_ITER)
    if name == "WarmupMultiStepLR":
        steps = [int(s) for s in solver.STEPS if int(s) < max_iter]
        if len(steps) != len(solver.STEPS):
            logger.warning(
                "SOLVER.STEPS %s contains steps >= SOLVER.MAX_ITER=%d; they are ignored",
                tuple(solver.STEPS),
                max_iter,
            )
        if sorted(steps) != steps:
            raise ValueError(f"SOLVER.STEPS must be increasing, got {tuple(solver.STEPS)}")
        scheduler = MultiStepParamScheduler(
            values=[solver.GAMMA**k for k in range(len(steps) + 1)],
            milestones=steps,
            num_updates=max_iter,
        )
    elif name == "WarmupCosineLR":
        scheduler = CosineParamScheduler(1.0, 0.0)
    elif name == "WarmupPolyLR":
        scheduler = PolynomialDecayParamScheduler(1.0, solver.POLY_POWER)
    else:
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME={name!r} is not supported; use WarmupMultiStepLR, "
            "WarmupCosineLR or WarmupPolyLR"
        )
    warmup_length = min(solver.WARMUP_ITERS / max_iter, 1.0)
    if warmup_length > 0:
        scheduler = WarmupParamScheduler(
            scheduler, solver.WARMUP_FACTOR, warmup_length, solver.WARMUP_METHOD
        )
    return LRMultiplier(optimizer, multiplier=scheduler, max_iter=max_iter)


def warmup_cosine_schedule(steps: int, warmup: int) -> ParamScheduler:
    """LR multiplier over training (``where = step / steps``): ``(step + 1) / warmup`` for
    the first ``warmup`` steps, then a cosine from 1 at step ``warmup`` to 0 at ``steps``."""
    if not 0 < warmup <= steps:
        raise ValueError(f"warmup must be in [1, steps={steps}], got {warmup}")
    # Rescaled to the warm-up's own span, the line from 1/warmup to 1 + 1/warmup is
    # (step + 1) / warmup at every warm-up step.
    ramp = LinearParamScheduler(1.0 / warmup, 1.0 + 1.0 / warmup)
    if warmup == steps:
        return ramp
    return CompositeParamScheduler(
        [ramp, CosineParamScheduler(1.0, 0.0)],
        lengths=[warmup / steps, 1.0 - warmup / steps],
        interval_scaling=["rescaled", "rescaled"],
    )
