"""The evaluator protocol and the inference loop that feeds it."""

from __future__ import annotations

import datetime
import inspect
import logging
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from pix2cap.data.catalog import MetadataCatalog
from pix2cap.utils import comm

from .build import EVALUATOR_REGISTRY

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_on_dataset",
    "inference_context",
    "build_evaluator",
]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Accumulates (input, output) pairs over a dataset and computes metrics at the end.

    Subclasses override ``reset`` (start afresh), ``process`` (one batch: the model's inputs
    ``list[dict]`` and outputs ``list[dict]``, same length) and ``evaluate`` (return
    ``{task: {metric: float}}`` on the main process; may return ``None`` on others). In
    multi-process evaluation each process sees its own shard; ``evaluate`` gathers.
    The base class accumulates nothing and reports no metrics.
    """

    def reset(self) -> None:
        pass

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        pass

    def evaluate(self) -> Optional[dict]:
        return None


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run together; their result dicts are merged (task names must differ)."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict:
        results: OrderedDict = OrderedDict()
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if comm.is_main_process() and result is not None:
                for task, metrics in result.items():
                    if task in results:
                        raise KeyError(
                            f"two evaluators both report task {task!r}; "
                            f"{type(evaluator).__name__} would overwrite the other's results"
                        )
                    results[task] = metrics
        return results


@contextmanager
def inference_context(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(iterable: Iterable, total: Optional[int], desc: str):
    """A tqdm progress bar (with ETA) on the main process; the plain iterable elsewhere."""
    if not comm.is_main_process():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0)


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable,
    evaluator: Optional[DatasetEvaluator | Sequence[DatasetEvaluator]],
    warmup_iters: int = 5,
) -> dict:
    """Run ``model`` on every batch of ``data_loader`` under ``torch.no_grad()`` in eval mode
    and feed the results to ``evaluator``.

    Args:
        model: in eval mode, ``model(inputs: list[dict]) -> list[dict]`` (one output per input).
        data_loader: a finite iterable of batches (``list[dict]``).
        evaluator: a ``DatasetEvaluator``, a list of them, or ``None`` (inference only: the
            outputs are discarded and ``{}`` is returned).
        warmup_iters: the first batches left out of the timing (one-off start-up costs).
    Returns:
        ``evaluator.evaluate()`` on the main process (``{}`` when there are no metrics).
    """
    num_devices = comm.get_world_size()
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif not isinstance(evaluator, DatasetEvaluator):
        evaluator = DatasetEvaluators(evaluator)
    evaluator.reset()

    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    logger.info(
        "Start inference on %s batches%s",
        total if total is not None else "an unknown number of",
        f" ({num_devices} processes)" if num_devices > 1 else "",
    )

    num_images = 0
    timed_images = 0
    compute_time = 0.0
    timed_start = time.perf_counter()
    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        for batch_index, inputs in enumerate(_progress(data_loader, total, "inference")):
            if batch_index == warmup_iters:
                timed_start = time.perf_counter()
                timed_images = 0
                compute_time = 0.0
            start = time.perf_counter()
            outputs = model(inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # time the kernels, not their launch
            compute_time += time.perf_counter() - start
            evaluator.process(inputs, outputs)
            num_images += len(inputs)
            timed_images += len(inputs)

    total_time = time.perf_counter() - timed_start
    if timed_images > 0:
        logger.info(
            "Total inference time: %s (%.6f s / image per device, on %d devices)",
            str(datetime.timedelta(seconds=int(total_time))),
            total_time / timed_images,
            num_devices,
        )
        logger.info(
            "Total inference pure compute time: %s (%.6f s / image per device)",
            str(datetime.timedelta(seconds=int(compute_time))),
            compute_time / timed_images,
        )
    logger.info("Ran inference on %d images", num_images)
    results = evaluator.evaluate()
    # An empty dict (not None) keeps callers simple on ranks without results.
    return {} if results is None else results


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """The evaluator registered for ``MetadataCatalog.get(dataset_name).evaluator_type``.

    Returns:
        ``EVALUATOR_REGISTRY.get(type)(dataset_name=..., output_dir=...)``, or ``None`` when
        the dataset declares no evaluator type or nothing is registered for it. An evaluator
        whose constructor takes ``train_dataset_names`` also gets ``cfg.DATASETS.TRAIN`` (to
        tell captions copied from training data); one with a ``from_config(cfg)`` classmethod
        also gets the keyword arguments it returns.
    """
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type")
    if not evaluator_type:
        return None
    if evaluator_type not in EVALUATOR_REGISTRY:
        logger.info(
            "No evaluator registered for evaluator_type=%r of dataset %s",
            evaluator_type,
            dataset_name,
        )
        return None
    evaluator_cls = EVALUATOR_REGISTRY.get(evaluator_type)
    kwargs = {}
    if cfg is not None and hasattr(evaluator_cls, "from_config"):
        kwargs.update(evaluator_cls.from_config(cfg))
    train_names = _train_dataset_names(cfg)
    if train_names and "train_dataset_names" in inspect.signature(evaluator_cls).parameters:
        kwargs["train_dataset_names"] = train_names
    return evaluator_cls(dataset_name=dataset_name, output_dir=output_folder, **kwargs)


def _train_dataset_names(cfg) -> tuple[str, ...]:
    """``cfg.DATASETS.TRAIN`` as a tuple; empty without a config (evaluation-only callers)."""
    datasets = getattr(cfg, "DATASETS", None) if cfg is not None else None
    return tuple(str(n) for n in (getattr(datasets, "TRAIN", None) or ()))
