"""Training events: a per-run store of scalar metrics and the writers that report them.

``EventStorage`` is entered as a context by the trainer; code anywhere in the step can then
call ``get_event_storage().put_scalar(...)``. Writers (console, ``metrics.json``,
TensorBoard) read the storage periodically.
"""

from __future__ import annotations

import abc
import datetime
import json
import logging
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from fvcore.common.history_buffer import HistoryBuffer

from .file_io import atomic_write_text

__all__ = [
    "get_event_storage",
    "EventStorage",
    "EventWriter",
    "CommonMetricPrinter",
    "JSONWriter",
    "TensorboardXWriter",
]

_CURRENT_STORAGE_STACK: list["EventStorage"] = []

logger = logging.getLogger(__name__)


def get_event_storage() -> "EventStorage":
    """The innermost ``EventStorage`` being used (raises outside any ``with EventStorage()``)."""
    if not _CURRENT_STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() was called outside an EventStorage context; wrap the code in "
            "`with EventStorage():` (the trainer does this for you)"
        )
    return _CURRENT_STORAGE_STACK[-1]


class EventStorage:
    """Scalar metrics of a run, indexed by iteration.

    Each scalar name keeps a full history (``HistoryBuffer`` of ``(value, iteration)``) and the
    latest value. ``smoothing_hint`` tells writers whether to report a windowed median (noisy
    per-iteration values like losses) or the raw latest value (like the learning rate).
    """

    def __init__(self, start_iter: int = 0):
        self._history: dict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[float, int]] = {}
        self._iter = start_iter
        self._current_prefix = ""
        # (iteration, device values, record) put with put_deferred and not read yet.
        self._deferred: list[tuple[int, torch.Tensor, Callable[[list], None]]] = []

    def put_scalar(self, name: str, value, smoothing_hint: bool = True) -> None:
        """Record ``value`` (a number or a 0-dim tensor) for ``name`` at the current iteration.

        Raises:
            ValueError: if ``name`` was recorded before with a different ``smoothing_hint``.
        """
        name = self._current_prefix + name
        if isinstance(value, torch.Tensor):
            value = value.detach().item()
        value = float(value)
        self._history[name].update(value, self._iter)
        self._latest_scalars[name] = (value, self._iter)
        existing = self._smoothing_hints.get(name)
        if existing is None:
            self._smoothing_hints[name] = smoothing_hint
        elif existing != smoothing_hint:
            raise ValueError(
                f"scalar {name!r} was first put with smoothing_hint={existing} and now with "
                f"{smoothing_hint}; one metric must be smoothed consistently"
            )

    def put_scalars(self, *, smoothing_hint: bool = True, **kwargs) -> None:
        """Put several scalars at once: ``storage.put_scalars(loss=1.0, accuracy=0.5)``."""
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint)

    def put_deferred(self, values: torch.Tensor, record: Callable[[list], None]) -> None:
        """Record values that are still on the device without waiting for them.

        ``record(values.flatten().tolist())`` runs later, with the storage's iteration set to
        the current one (so what it puts is recorded at this iteration), when the storage is
        read (``history``, ``histories``, ``latest``, ``latest_with_smoothing_hint``,
        ``state_dict``) or :meth:`flush` runs: all values deferred since the last read reach
        the host in one copy per device. ``record`` puts scalars (and may raise, e.g. on a
        non-finite loss); a name should be put either always deferred or never, so that its
        history stays in iteration order.
        """
        self._deferred.append((self._iter, values.detach(), record))

    def flush(self) -> None:
        """Bring every deferred value to the host (one copy per device) and record it."""
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for k, (_, values, _) in enumerate(pending):
            by_device[values.device].append(k)
        host: list[list] = [[] for _ in pending]
        for ks in by_device.values():
            flat = torch.cat([pending[k][1].reshape(-1) for k in ks]).tolist()
            start = 0
            for k in ks:
                end = start + pending[k][1].numel()
                host[k] = flat[start:end]
                start = end
        current = self._iter
        try:
            for (iteration, _, record), values in zip(pending, host):
                self._iter = iteration
                record(values)
        finally:
            self._iter = current

    def history(self, name: str) -> HistoryBuffer:
        """The ``HistoryBuffer`` of ``name`` (raises ``KeyError`` naming the known scalars)."""
        self.flush()
        if name not in self._history:
            raise KeyError(
                f"no history for metric {name!r}; recorded: {sorted(self._history)}"
            )
        return self._history[name]

    def histories(self) -> dict[str, HistoryBuffer]:
        self.flush()
        return dict(self._history)

    def latest(self) -> dict[str, tuple[float, int]]:
        """name -> (latest value, iteration it was recorded at)."""
        self.flush()
        return dict(self._latest_scalars)

    def latest_with_smoothing_hint(self, window_size: int = 20) -> dict[str, tuple[float, int]]:
        """Like ``latest`` but smoothed scalars report the median of their last
        ``window_size`` values."""
        self.flush()
        result = {}
        for name, (value, iteration) in self._latest_scalars.items():
            if self._smoothing_hints[name]:
                value = self._history[name].median(window_size)
            result[name] = (value, iteration)
        return result

    def smoothing_hints(self) -> dict[str, bool]:
        return dict(self._smoothing_hints)

    def state_dict(self, max_length: int = 100) -> dict:
        """The last ``max_length`` values of every scalar with their iterations and smoothing
        hints (plain lists, so a checkpoint holding them loads with ``weights_only``).

        A resumed run that loads them reports the same windowed medians (windows up to
        ``max_length``) as an uninterrupted run.
        """
        self.flush()
        state = {}
        for name, buffer in self._history.items():
            kept = buffer.values()[-max_length:]
            state[name] = {
                "values": [float(value) for value, _ in kept],
                "iterations": [int(iteration) for _, iteration in kept],
                "smoothing_hint": self._smoothing_hints[name],
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the histories saved by ``state_dict`` (replacing those of the same names).

        Latest values are not restored: writers report only what this run records, so a
        resumed run writes no row of an iteration before it again.
        """
        for name, entry in state.items():
            buffer = HistoryBuffer()
            for value, iteration in zip(entry["values"], entry["iterations"]):
                buffer.update(float(value), int(iteration))
            self._history[name] = buffer
            self._smoothing_hints[name] = bool(entry["smoothing_hint"])

    def step(self) -> None:
        """Advance the iteration counter by one (the trainer calls this after each step)."""
        self._iter += 1

    @property
    def iter(self) -> int:
        """The iteration that scalars put now are recorded at."""
        return self._iter

    @iter.setter
    def iter(self, value: int) -> None:
        self._iter = int(value)

    def __enter__(self) -> "EventStorage":
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        assert _CURRENT_STORAGE_STACK[-1] is self
        _CURRENT_STORAGE_STACK.pop()

    @contextmanager
    def name_scope(self, name: str):
        """Prefix every scalar put inside the block with ``name/``."""
        old_prefix = self._current_prefix
        self._current_prefix = name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._current_prefix = old_prefix


class EventWriter(abc.ABC):
    """Something that reports the current ``EventStorage`` when ``write()`` is called."""

    def start(self, start_iter: int) -> None:
        """Called once before a run writes anything; the run begins at ``start_iter`` (> 0
        when resumed). Writers that keep files drop what an earlier run in the same place
        wrote for iterations ``>= start_iter``, since this run writes those again."""

    @abc.abstractmethod
    def write(self) -> None:
        """Report the current storage."""

    def close(self) -> None:
        pass


def _progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "|" + "#" * filled + "-" * (width - filled) + f"| {100.0 * done / max(total, 1):3.0f}%"


class CommonMetricPrinter(EventWriter):
    """Print one console line per write: iteration, progress bar, ETA, losses, lr, timing and
    peak CUDA memory. Losses are the medians over ``window_size`` iterations."""

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20):
        self.logger = logging.getLogger("pix2cap.utils.events")
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write: Optional[tuple[int, float]] = None  # (iteration, wall time)

    def _eta_seconds(self, storage: EventStorage, iteration: int) -> Optional[float]:
        if self._max_iter is None:
            return None
        remaining = self._max_iter - iteration - 1
        try:
            return storage.history("time").median(1000) * remaining
        except KeyError:
            # Before IterationTimer has recorded anything, estimate from wall time between writes.
            now = time.perf_counter()
            eta = None
            if self._last_write is not None and iteration > self._last_write[0]:
                per_iter = (now - self._last_write[1]) / (iteration - self._last_write[0])
                eta = per_iter * remaining
            self._last_write = (iteration, now)
            return eta

    def write(self) -> None:
        storage = get_event_storage()
        iteration = storage.iter
        if self._max_iter is not None and iteration == self._max_iter:
            # The storage is stepped past the last iteration after training: nothing new.
            return
        histories = storage.histories()

        def median(name: str) -> Optional[float]:
            return histories[name].median(self._window_size) if name in histories else None

        data_time, iter_time = median("data_time"), median("time")
        eta = self._eta_seconds(storage, iteration)
        try:
            lr = f"{storage.history('lr').latest():.5g}"
        except KeyError:
            lr = "N/A"
        losses = "  ".join(
            f"{name}: {buffer.median(self._window_size):.4g}"
            for name, buffer in histories.items()
            if "loss" in name
        )
        memory = ""
        if torch.cuda.is_available():
            memory = f"  max_mem: {torch.cuda.max_memory_allocated() / 1024 / 1024:.0f}M"
        progress = ""
        if self._max_iter is not None:
            progress = f"/{self._max_iter}  {_progress_bar(iteration + 1, self._max_iter)}"
        eta_text = "" if eta is None else f"eta: {datetime.timedelta(seconds=int(eta))}  "
        self.logger.info(
            f"{eta_text}"
            f"iter: {iteration}{progress}  {losses}"
            f"{f'  time: {iter_time:.4f}' if iter_time is not None else ''}"
            f"{f'  data_time: {data_time:.4f}' if data_time is not None else ''}"
            f"  lr: {lr}{memory}"
        )


def _row_iteration(line: str) -> Optional[int]:
    """The iteration of one ``metrics.json`` row; ``None`` for a line that is not a complete
    row (e.g. torn by a crash mid-write)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    iteration = row.get("iteration") if isinstance(row, dict) else None
    return iteration if isinstance(iteration, int) else None


class JSONWriter(EventWriter):
    """Append one JSON object per iteration to a file (``metrics.json``): the scalars recorded
    since the last write, smoothed over ``window_size`` where hinted.

    Each line is written with a single ``write`` and flushed, so a crash leaves at most the
    current line incomplete, never a corrupted earlier one. ``start(start_iter)`` first keeps
    only the rows of iterations before ``start_iter``, so a resumed run continues the file
    without repeating the iterations the interrupted run logged after its last checkpoint,
    and a run from iteration 0 starts it afresh.
    """

    def __init__(self, json_file: str, window_size: int = 20):
        os.makedirs(os.path.dirname(os.path.abspath(json_file)) or ".", exist_ok=True)
        self._path = json_file
        self._file = None  # opened on start() or the first write
        self._window_size = window_size
        self._last_written_iter = -1

    def start(self, start_iter: int) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._path):
            with open(self._path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            iterations = [_row_iteration(line) for line in lines]
            kept = [
                line for line, it in zip(lines, iterations) if it is not None and it < start_iter
            ]
            if len(kept) != len(lines):
                # Atomic: a crash now leaves the old file, which the next start trims again.
                atomic_write_text(self._path, "".join(line + "\n" for line in kept))
                logger.info(
                    "%s: kept the %d rows before iteration %d, dropped %d",
                    self._path,
                    len(kept),
                    start_iter,
                    len(lines) - len(kept),
                )
        self._file = open(self._path, "a", encoding="utf-8")

    def write(self) -> None:
        if self._file is None:
            self._file = open(self._path, "a", encoding="utf-8")
        storage = get_event_storage()
        by_iter: dict[int, dict[str, float]] = defaultdict(dict)
        for name, (value, iteration) in storage.latest_with_smoothing_hint(
            self._window_size
        ).items():
            if iteration <= self._last_written_iter:
                continue
            by_iter[iteration][name] = value
        if by_iter:
            self._last_written_iter = max(by_iter)
        for iteration, scalars in sorted(by_iter.items()):
            self._file.write(json.dumps({"iteration": iteration, **scalars}, sort_keys=True) + "\n")
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:  # Some filesystems do not support fsync; the flush is enough there.
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorboardXWriter(EventWriter):
    """Write the scalars recorded since the last write to TensorBoard event files.

    The event file is opened on ``start(start_iter)`` with ``purge_step=start_iter``, so
    TensorBoard hides what earlier runs in ``log_dir`` logged for iterations ``>= start_iter``
    (a resumed run's repeated iterations appear once); without ``start``, on the first write.
    """

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs):
        self._log_dir = log_dir
        self._kwargs = kwargs
        self._window_size = window_size
        self._writer = None
        self._last_written_iter = -1

    def _open(self, **kwargs):
        # Imported when needed: tensorboard is slow to import and only the writer needs it.
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self._log_dir, **{**kwargs, **self._kwargs})

    def start(self, start_iter: int) -> None:
        if self._writer is None:
            self._writer = self._open(purge_step=start_iter)

    def write(self) -> None:
        if self._writer is None:
            self._writer = self._open()
        storage = get_event_storage()
        newest = self._last_written_iter
        for name, (value, iteration) in storage.latest_with_smoothing_hint(
            self._window_size
        ).items():
            if iteration > self._last_written_iter:
                self._writer.add_scalar(name, value, iteration)
                newest = max(newest, iteration)
        self._last_written_iter = newest
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
