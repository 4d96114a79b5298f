"""The training loop: a trainer that runs ``run_step`` for each iteration and hooks around it."""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pix2cap.utils import comm
from pix2cap.utils.events import EventStorage, get_event_storage

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer"]

logger = logging.getLogger(__name__)


class HookBase:
    """A callback of the training loop. Override any of the methods below; the trainer calls
    them in this order::

        hook.before_train()
        for iter in range(start_iter, max_iter):
            hook.before_step()
            trainer.run_step()      # calls hook.after_backward() between backward and step
            hook.after_step()
        hook.after_train()          # also when training stopped with an exception

    ``self.trainer`` is a weak reference to the trainer, set by ``register_hooks``.
    """

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        """State to checkpoint with the trainer (empty for stateless hooks)."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what ``state_dict`` returned (stateless hooks have nothing to restore)."""


class TrainerBase:
    """Iterates ``run_step`` from ``start_iter`` to ``max_iter`` inside an ``EventStorage``.

    Attributes:
        iter: the current iteration (after training: the last one run).
        start_iter, max_iter: the range passed to ``train``.
        storage: the ``EventStorage`` of the run. Its recent history is checkpointed with
            the trainer and restored when training resumes, so smoothed metrics continue.
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage
        self._loaded_storage_state: Optional[dict] = None  # from a checkpoint, for train()

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        """Append hooks (``None`` entries are skipped); they run in registration order."""
        hooks = [h for h in hooks if h is not None]
        for hook in hooks:
            if not isinstance(hook, HookBase):
                raise TypeError(f"hooks must be HookBase instances, got {type(hook).__name__}")
            # A weak proxy: the trainer owns its hooks, hooks must not keep the trainer alive.
            hook.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``."""
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        with EventStorage(start_iter) as self.storage:
            if self._loaded_storage_state is not None:
                self.storage.load_state_dict(self._loaded_storage_state)
                self._loaded_storage_state = None
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                # Metrics still on the device (see SimpleTrainer.metrics_period) are read now.
                self.storage.flush()
                # ``self.iter`` is the last iteration run, so hooks' after_train sees
                # ``iter == max_iter - 1`` after a full run; step past it for the writers.
                self.iter += 1
            except Exception:
                logger.exception("Exception during training:")
                raise
            finally:
                self._flush_after_failure()
                self.after_train()

    def _flush_after_failure(self) -> None:
        """Record the metrics still deferred when training stopped early; a problem with
        them (a non-finite loss) is logged, not raised over the error that stopped it."""
        try:
            self.storage.flush()
        except Exception:  # noqa: BLE001 - an exception is already on its way out
            logger.exception("Metrics of the last iterations could not be recorded:")

    def before_train(self) -> None:
        for hook in self._hooks:
            hook.before_train()

    def after_train(self) -> None:
        self.storage.iter = self.iter
        for hook in self._hooks:
            hook.after_train()

    def before_step(self) -> None:
        self.storage.iter = self.iter
        for hook in self._hooks:
            hook.before_step()

    def after_backward(self) -> None:
        for hook in self._hooks:
            hook.after_backward()

    def after_step(self) -> None:
        for hook in self._hooks:
            hook.after_step()

    def run_step(self) -> None:
        raise TypeError(f"{type(self).__name__} must define run_step()")

    def state_dict(self) -> dict:
        """``{"iteration": int, "hooks": {hook class name: hook state}}`` and, once training
        has started, ``"storage"``: the recent metric history (only plain data)."""
        hooks_state = {}
        for hook in self._hooks:
            state = hook.state_dict()
            if state:
                name = type(hook).__qualname__
                if name in hooks_state:
                    logger.warning("Two hooks of type %s have state; only the first is saved", name)
                    continue
                hooks_state[name] = state
        state = {"iteration": int(self.iter), "hooks": hooks_state}
        if hasattr(self, "storage"):
            state["storage"] = self.storage.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.iter = int(state_dict["iteration"])
        self._loaded_storage_state = state_dict.get("storage")
        for name, state in state_dict.get("hooks", {}).items():
            for hook in self._hooks:
                if type(hook).__qualname__ == name:
                    hook.load_state_dict(state)
                    break
            else:
                logger.warning("Checkpoint has state for hook %s, which is not registered", name)


def _device_collectives(device: torch.device) -> bool:
    """Whether the default process group gathers tensors on ``device`` (NCCL: CUDA, gloo:
    CPU)."""
    backend = dist.get_backend()
    if device.type == "cuda":
        return backend == dist.Backend.NCCL
    return device.type == "cpu" and backend == dist.Backend.GLOO


def _format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in sorted(losses.items()))


class SimpleTrainer(TrainerBase):
    """One optimizer step per batch: ``loss_dict = model(batch)``, sum, backward, clip, step.

    Args:
        model: in training mode, ``model(batch: list[dict])`` returns ``dict[str, 0-dim Tensor]``
            of losses (they are summed).
        data_loader: an iterable yielding batches (iterated indefinitely: make it infinite).
        optimizer: a torch optimizer over the model's parameters.
        grad_clipper: optional ``fn(parameters)`` clipping gradients in place before the step
            (see ``pix2cap.solver.build_gradient_clipper``).
        metrics_period: the losses are checked and recorded every this many iterations (and
            at the end of training, and whenever the event storage is read, e.g. for a
            checkpoint), not every step: until then they stay on the device, so a step never
            waits for the device to finish just to log its losses. 1: every step. The
            default trainer uses ``LOG_PERIOD``, when the writers read them anyway.

    Losses of all processes are all-gathered every step on the device (no host wait) and
    checked every ``metrics_period`` iterations, before that iteration's ``backward``: a
    non-finite loss on any rank makes every rank raise ``FloatingPointError`` (naming the
    first iteration with one and its losses) rather than some ranks waiting forever in a
    collective. The optimizer may have taken up to ``metrics_period - 1`` steps on the bad
    losses by then; no checkpoint holds them (saving reads the storage, which checks first).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        grad_clipper: Optional[Callable] = None,
        metrics_period: int = 1,
    ):
        super().__init__()
        if metrics_period < 1:
            raise ValueError(f"metrics_period must be >= 1, got {metrics_period}")
        model.train()
        self.model = model
        self._data_loader = data_loader
        self._data_loader_iter_obj = None
        self.optimizer = optimizer
        self.grad_clipper = grad_clipper
        self.metrics_period = metrics_period

    @property
    def data_loader(self) -> Iterable:
        return self._data_loader

    @data_loader.setter
    def data_loader(self, data_loader: Iterable) -> None:
        """Replace the loader (e.g. by one that starts at a resumed iteration); the next step
        draws from a new iterator of it."""
        self._data_loader = data_loader
        self._data_loader_iter_obj = None

    @property
    def _data_loader_iter(self):
        # Created lazily so that building a trainer does not start loader workers.
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def _next_batch(self):
        start = time.perf_counter()
        try:
            data = next(self._data_loader_iter)
        except StopIteration as e:
            raise RuntimeError(
                f"the training data loader ran out of batches at iteration {self.iter}; "
                "training loaders must be infinite (use a TrainingSampler)"
            ) from e
        return data, time.perf_counter() - start

    def _trainable_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def run_step(self) -> None:
        assert self.model.training, "SimpleTrainer: the model was switched to eval mode"
        data, data_time = self._next_batch()
        loss_dict = self.model(data)
        losses = self._check_and_sum(loss_dict, data_time)
        self.optimizer.zero_grad(set_to_none=True)
        losses.backward()
        self.after_backward()
        if self.grad_clipper is not None:
            self.grad_clipper(self._trainable_parameters())
        self.optimizer.step()

    def _check_and_sum(self, loss_dict, data_time: float) -> torch.Tensor:
        """Validate the loss dict, record the metrics of all ranks and return the total loss.

        The metrics are deferred (kept on the device); every ``metrics_period`` iterations
        they are read, checked and recorded, before this iteration's ``backward``.
        """
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        if not isinstance(loss_dict, dict) or not loss_dict:
            raise TypeError(
                "in training mode the model must return a non-empty dict of loss tensors, got "
                f"{type(loss_dict).__name__}"
            )
        self.write_metrics(loss_dict, data_time, iteration=self.iter)
        if (self.iter + 1) % self.metrics_period == 0:
            get_event_storage().flush()
        return sum(loss_dict.values())

    @staticmethod
    def write_metrics(
        loss_dict: dict[str, torch.Tensor], data_time: float, iteration: int, prefix: str = ""
    ) -> None:
        """All-gather losses and data time; rank 0 records the means in the event storage.

        The losses stay on the device: they are stacked into one tensor (all-gathered on the
        device between processes) and handed to the storage's ``put_deferred``, which records
        them at this iteration when the storage is next read or flushed.

        Raises (then):
            FloatingPointError: on every rank, if any rank's total loss is not finite.
        """
        keys = list(loss_dict)
        values = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
        world_size = comm.get_world_size()
        gather_on_device = world_size > 1 and _device_collectives(values.device)
        if gather_on_device:
            # The data time travels with the losses (float64 keeps both exact).
            local = torch.cat(
                [
                    values.double(),
                    torch.tensor([data_time], dtype=torch.float64).to(
                        values.device, non_blocking=True
                    ),
                ]
            )
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(gathered, local)
            values = torch.stack(gathered)

        def record(host: list) -> None:
            if gather_on_device:
                width = len(keys) + 1
                rows = [host[r * width : (r + 1) * width] for r in range(world_size)]
                all_metrics = [{**dict(zip(keys, row[:-1])), "data_time": row[-1]} for row in rows]
            else:
                metrics = {**dict(zip(keys, host)), "data_time": data_time}
                all_metrics = comm.all_gather(metrics) if world_size > 1 else [metrics]
            SimpleTrainer._record_metrics(all_metrics, iteration, prefix)

        if world_size > 1 and not gather_on_device:
            # No collective of this backend for these tensors: gather on the host, now (a
            # deferred gather would be a collective some ranks may run at other times).
            record(values.tolist())
            return
        get_event_storage().put_deferred(values, record)

    @staticmethod
    def _record_metrics(all_metrics: list[dict], iteration: int, prefix: str) -> None:
        """Check the metrics of every rank and (rank 0) put their means in the storage."""
        for rank, rank_metrics in enumerate(all_metrics):
            losses = {k: v for k, v in rank_metrics.items() if k != "data_time"}
            if not math.isfinite(sum(losses.values())):
                raise FloatingPointError(
                    f"loss became infinite or NaN at iteration={iteration} on rank {rank}: "
                    f"{_format_losses(losses)}"
                )
        if comm.is_main_process():
            storage = get_event_storage()
            # data_time can differ a lot between workers; the max shows the slowest one.
            storage.put_scalar("data_time", max(m.pop("data_time") for m in all_metrics))
            means = {k: sum(m[k] for m in all_metrics) / len(all_metrics) for k in all_metrics[0]}
            storage.put_scalar(f"{prefix}total_loss", sum(means.values()))
            storage.put_scalars(
                **{f"{prefix}{k}": v for k, v in means.items() if k != "total_loss"}
            )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])


class AMPTrainer(SimpleTrainer):
    """``SimpleTrainer`` with CUDA automatic mixed precision (autocast + ``GradScaler``).

    Mixed precision is a CUDA feature here: building an ``AMPTrainer`` for a model whose
    parameters are not on a CUDA device raises ``RuntimeError``. ``DefaultTrainer`` does not
    build one on the CPU: with ``SOLVER.AMP.ENABLED`` there it logs a warning and trains in
    float32 with ``SimpleTrainer``.

    Args:
        precision: ``torch.float16`` (with loss scaling) or ``torch.bfloat16``.
        grad_scaler: defaults to ``torch.amp.GradScaler("cuda")``; its state is checkpointed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        grad_clipper: Optional[Callable] = None,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        precision: torch.dtype = torch.float16,
        metrics_period: int = 1,
    ):
        module = model.module if isinstance(model, DistributedDataParallel) else model
        devices = {p.device.type for p in module.parameters()}
        if devices != {"cuda"}:
            raise RuntimeError(
                f"AMPTrainer needs a model on CUDA, but its parameters are on {sorted(devices)}. "
                "Set SOLVER.AMP.ENABLED False (or MODEL.DEVICE cuda); DefaultTrainer falls back "
                "to float32 training on the CPU by itself."
            )
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(f"AMP precision must be float16 or bfloat16, got {precision}")
        super().__init__(model, data_loader, optimizer, grad_clipper, metrics_period)
        self.precision = precision
        # bfloat16 has float32's exponent range, so it needs no loss scaling.
        self.grad_scaler = grad_scaler or torch.amp.GradScaler(
            "cuda", enabled=precision == torch.float16
        )

    def run_step(self) -> None:
        assert self.model.training, "AMPTrainer: the model was switched to eval mode"
        data, data_time = self._next_batch()
        with torch.autocast(device_type="cuda", dtype=self.precision):
            loss_dict = self.model(data)
            losses = self._check_and_sum(loss_dict, data_time)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        if self.grad_clipper is not None:
            # Clip the true gradients, not the loss-scaled ones.
            self.grad_scaler.unscale_(self.optimizer)
            self.grad_clipper(self._trainable_parameters())
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
