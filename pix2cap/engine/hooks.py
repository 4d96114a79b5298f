"""Standard training hooks: timing, metric writing, checkpointing, LR scheduling, evaluation."""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch
from fvcore.common.checkpoint import PeriodicCheckpointer as _FvcorePeriodicCheckpointer
from fvcore.common.timer import Timer

from pix2cap.utils import comm
from pix2cap.utils.events import EventWriter

from .train_loop import HookBase

__all__ = [
    "CallbackHook",
    "IterationTimer",
    "PeriodicWriter",
    "PeriodicCheckpointer",
    "LRScheduler",
    "EvalHook",
]

logger = logging.getLogger(__name__)


class CallbackHook(HookBase):
    """A hook made of plain functions, each called with the trainer: ``CallbackHook(
    after_step=lambda trainer: ...)``."""

    def __init__(
        self,
        *,
        before_train: Optional[Callable] = None,
        after_train: Optional[Callable] = None,
        before_step: Optional[Callable] = None,
        after_backward: Optional[Callable] = None,
        after_step: Optional[Callable] = None,
    ):
        self._before_train = before_train
        self._after_train = after_train
        self._before_step = before_step
        self._after_backward = after_backward
        self._after_step = after_step

    def before_train(self) -> None:
        if self._before_train:
            self._before_train(self.trainer)

    def after_train(self) -> None:
        if self._after_train:
            self._after_train(self.trainer)
        # The callbacks may close over the trainer; drop them to break the cycle.
        self._before_train = self._after_train = None
        self._before_step = self._after_backward = self._after_step = None

    def before_step(self) -> None:
        if self._before_step:
            self._before_step(self.trainer)

    def after_backward(self) -> None:
        if self._after_backward:
            self._after_backward(self.trainer)

    def after_step(self) -> None:
        if self._after_step:
            self._after_step(self.trainer)


class IterationTimer(HookBase):
    """Record the time of each step (``"time"`` in the storage) and log a summary at the end.

    The first ``warmup_iter`` steps are left out of the summary: they include one-off costs
    (loader start-up, allocator warm-up, cuDNN autotuning).
    """

    def __init__(self, warmup_iter: int = 3):
        self._warmup_iter = warmup_iter
        self._step_timer = Timer()
        self._start_time = 0.0
        self._total_timer = Timer()

    def before_train(self) -> None:
        self._start_time = time.perf_counter()
        self._total_timer.reset()
        self._total_timer.pause()

    def after_train(self) -> None:
        total_time = time.perf_counter() - self._start_time
        timed_time = self._total_timer.seconds()
        hook_time = total_time - timed_time
        num_iter = self.trainer.storage.iter + 1 - self.trainer.start_iter - self._warmup_iter
        if num_iter > 0 and timed_time > 0:
            logger.info(
                "Overall training speed: %d iterations in %s (%.4f s / it)",
                num_iter,
                str(datetime.timedelta(seconds=int(timed_time))),
                timed_time / num_iter,
            )
        logger.info(
            "Total training time: %s (%s on hooks)",
            str(datetime.timedelta(seconds=int(total_time))),
            str(datetime.timedelta(seconds=int(hook_time))),
        )

    def before_step(self) -> None:
        self._step_timer.reset()
        self._total_timer.resume()

    def after_step(self) -> None:
        iter_done = self.trainer.storage.iter - self.trainer.start_iter + 1
        if iter_done >= self._warmup_iter:
            self.trainer.storage.put_scalar("time", self._step_timer.seconds())
        else:
            # Warm-up steps do not count towards the speed summary.
            self._start_time = time.perf_counter()
            self._total_timer.reset()
        self._total_timer.pause()


class PeriodicWriter(HookBase):
    """Call every writer each ``period`` iterations, on the last iteration, and at the end.

    Before training, each writer's ``start(start_iter)`` drops what an earlier run logged for
    iterations this run is about to log (a resumed run's ``metrics.json`` has no duplicates).
    """

    def __init__(self, writers: Sequence[EventWriter], period: int = 20):
        for writer in writers:
            if not isinstance(writer, EventWriter):
                raise TypeError(f"{writer!r} is not an EventWriter")
        self._writers = list(writers)
        self._period = period

    def before_train(self) -> None:
        for writer in self._writers:
            writer.start(self.trainer.start_iter)

    def after_step(self) -> None:
        if (self.trainer.iter + 1) % self._period == 0 or (
            self.trainer.iter == self.trainer.max_iter - 1
        ):
            for writer in self._writers:
                writer.write()

    def after_train(self) -> None:
        for writer in self._writers:
            # Metrics put after the last periodic write (e.g. final evaluation) still go out.
            writer.write()
            writer.close()


class PeriodicCheckpointer(_FvcorePeriodicCheckpointer, HookBase):
    """Save ``model_<iter:07d>.pth`` every ``period`` iterations and ``model_final.pth`` at
    the last one (through fvcore's ``PeriodicCheckpointer``). Only rank 0 writes."""

    def before_train(self) -> None:
        self.max_iter = self.trainer.max_iter

    def after_step(self) -> None:
        self.step(self.trainer.iter)


class LRScheduler(HookBase):
    """Step a torch LR scheduler after every iteration and record the lr (``"lr"``).

    The scheduler's state is checkpointed with the trainer through this hook.

    Args:
        optimizer, scheduler: default to the trainer's ``optimizer`` / ``scheduler``.
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None):
        self._optimizer = optimizer
        self._scheduler = scheduler

    @property
    def scheduler(self):
        return self._scheduler or self.trainer.scheduler

    def before_train(self) -> None:
        self._optimizer = self._optimizer or self.trainer.optimizer
        self._best_group = self._largest_group(self._optimizer)

    @staticmethod
    def _largest_group(optimizer: torch.optim.Optimizer) -> int:
        """Index of the param group whose lr to report: the one with most parameters (among
        ties, the one with the largest lr, i.e. not a reduced-lr backbone group)."""
        counts = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
        lrs = [g["lr"] for g in optimizer.param_groups]
        best_lr = max(lrs)
        candidates = [i for i, lr in enumerate(lrs) if lr == best_lr]
        return max(candidates, key=lambda i: counts[i])

    def after_step(self) -> None:
        lr = self._optimizer.param_groups[self._best_group]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()

    def state_dict(self) -> dict:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):
            return self.scheduler.state_dict()
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):
            logger.info("Loading scheduler from state_dict ...")
            self.scheduler.load_state_dict(state_dict)


def _flatten_results(results: Any, prefix: str = "") -> dict[str, float]:
    """``{"sem_seg": {"mIoU": 1.0}}`` -> ``{"sem_seg/mIoU": 1.0}``; non-numbers are dropped."""
    flat: dict[str, float] = {}
    if isinstance(results, dict):
        for key, value in results.items():
            flat.update(_flatten_results(value, f"{prefix}{key}/"))
    elif isinstance(results, (int, float)) and not isinstance(results, bool):
        flat[prefix.rstrip("/")] = float(results)
    return flat


class EvalHook(HookBase):
    """Run ``eval_function()`` every ``period`` iterations and after the last one, and record
    its (nested dict of numbers) results in the storage as ``"<task>/<metric>"`` scalars.

    ``eval_function`` is called on every process (evaluation is usually distributed); its
    results matter on rank 0.

    Args:
        period: iterations between evaluations; ``0`` evaluates only at the end of training.
        eval_function: takes no argument, returns a (possibly empty) nested dict.
    """

    def __init__(self, period: int, eval_function: Callable[[], Any]):
        self._period = period
        self._func = eval_function

    def _do_eval(self) -> None:
        results = self._func()
        if results and comm.is_main_process():
            flat = _flatten_results(results)
            for name, value in flat.items():
                if not math.isfinite(value):
                    logger.warning("Evaluation metric %s is %s", name, value)
            if flat:
                self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
        # Evaluation may take different times on different ranks; realign before training on.
        comm.synchronize()

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        is_last = next_iter == self.trainer.max_iter  # after_train evaluates that one
        if self._period > 0 and next_iter % self._period == 0 and not is_last:
            self._do_eval()

    def after_train(self) -> None:
        # Only after a full run: an interrupted run is not evaluated.
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._do_eval()
        # The function usually closes over the trainer and its data; release them.
        self._func = None
