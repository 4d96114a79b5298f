"""Defaults that make a standard training script short: argument parser, run set-up and
``DefaultTrainer`` (model, optimizer, scheduler, loaders, checkpointing, hooks from a config).
"""

from __future__ import annotations

import argparse
import glob
import inspect
import logging
import os
import sys
import weakref
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from pix2cap.checkpoint import Checkpointer
from pix2cap.config import CfgNode, load_cfg
from pix2cap.data.build import build_test_loader, build_train_loader
from pix2cap.evaluation import (
    DatasetEvaluators,
    HtmlReportWriter,
    build_evaluator,
    inference_on_dataset,
    log_results_to_storage,
    print_results_table,
    write_results_json,
)
from pix2cap.modeling import build_model
from pix2cap.solver import build_gradient_clipper, build_lr_scheduler, build_optimizer
from pix2cap.utils import comm
from pix2cap.utils.env import derive_seed, seed_all_rng
from pix2cap.utils.file_io import atomic_write_text, remove_stale_temp_files
from pix2cap.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from pix2cap.utils.logger import setup_logger

from . import hooks
from .train_loop import AMPTrainer, SimpleTrainer, TrainerBase

__all__ = [
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "setup_cfg",
    "collect_image_files",
    "IMAGE_EXTENSIONS",
    "create_ddp_model",
    "DefaultTrainer",
]

logger = logging.getLogger(__name__)

#: The image files a folder or glob input of the tools takes (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command-line flags of ``tools/train_net.py`` (detectron2's names).

    ``--num-gpus N`` starts N processes per machine: one per GPU with CUDA, or N CPU processes
    (gloo backend) on a machine without CUDA.
    """
    parser = argparse.ArgumentParser(
        epilog=epilog
        or (
            "Examples:\n"
            "  Train on the CPU:\n"
            "    tools/train_net.py --config-file configs/shapes/pix2cap_effl0.yaml\n"
            "  Evaluate:\n"
            "    tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth\n"
            "  Resume an interrupted run:\n"
            "    tools/train_net.py --config-file CFG --resume\n"
            "  Two CPU processes (gloo) or two GPUs (NCCL):\n"
            "    tools/train_net.py --config-file CFG --num-gpus 2\n"
            "  Under torchrun:\n"
            "    torchrun --nproc-per-node 2 tools/train_net.py --config-file CFG\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the last checkpoint in OUTPUT_DIR exactly where it left off "
        "(weights, optimizer, scheduler, iteration, data order, seed, metric history); "
        "without it only MODEL.WEIGHTS is loaded",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes per machine (GPUs; CPU processes with the gloo backend without CUDA)",
    )
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument(
        "--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)"
    )
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="initialisation URL of the process group; 'auto' = tcp://127.0.0.1:<free port> "
        "(one machine). Ignored under torchrun.",
    )
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100",
    )
    return parser


def default_setup(cfg, args) -> None:
    """Prepare a run: create ``OUTPUT_DIR``, set up logging (file + console, rank-aware),
    log the environment, the command line and the config, write ``OUTPUT_DIR/config.yaml``
    (atomically, rank 0), seed every RNG (``SEED`` + rank: model initialisation and
    evaluation; ``DefaultTrainer`` reseeds every step) and apply ``CUDNN_BENCHMARK``."""
    output_dir = cfg.OUTPUT_DIR
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    comm.synchronize()
    setup_logger(output_dir or None, distributed_rank=rank, name="pix2cap")
    # fvcore's checkpointer logs what it loads; route it to the same console and file.
    setup_logger(output_dir or None, distributed_rank=rank, name="fvcore")
    log = logging.getLogger("pix2cap")
    log.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    log.info(
        "Environment: python %s, torch %s, CUDA available: %s",
        sys.version.split()[0],
        torch.__version__,
        torch.cuda.is_available(),
    )
    log.info("Command line arguments: %s", args)
    config_file = getattr(args, "config_file", "")
    if config_file:
        with open(config_file, encoding="utf-8") as f:
            log.info("Contents of config file %s:\n%s", config_file, f.read())
    log.info("Running with full config:\n%s", cfg.dump())
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        atomic_write_text(path, cfg.dump())
        log.info("Full config saved to %s", path)

    seed = cfg.SEED
    seed_all_rng(None if seed < 0 else seed + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def setup_cfg(args) -> CfgNode:
    """The config of a command-line tool: ``args.config_file`` (may be empty: the defaults)
    with ``args.opts`` (``KEY VALUE`` overrides) applied."""
    return load_cfg(args.config_file, args.opts)


def collect_image_files(
    inputs: Sequence[str], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[str]:
    """Expand a tool's image inputs into image paths, in the order given.

    Each input is a file (taken as is), a folder (its files ending in ``extensions``, sorted,
    not recursive) or a glob pattern such as ``"images/*.jpg"`` (the matching files ending in
    ``extensions``, sorted). Paths are returned as given or joined (not made absolute); a path
    named twice is kept once.

    Raises:
        FileNotFoundError: an input does not exist, or a folder or pattern gives no image.
    """
    suffixes = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(suffixes) and os.path.isfile(os.path.join(item, name))
            )
            if not found:
                raise FileNotFoundError(f"{item}: folder holds no {'/'.join(suffixes)} image")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        elif any(c in item for c in "*?["):  # a pattern, not a missing file
            found = sorted(
                p for p in glob.glob(item) if p.lower().endswith(suffixes) and os.path.isfile(p)
            )
            if not found:
                raise FileNotFoundError(f"{item}: pattern matches no {'/'.join(suffixes)} image")
            paths.extend(found)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return list(dict.fromkeys(paths))


def default_writers(output_dir: str, max_iter: Optional[int] = None) -> list:
    """Console printer, ``<output_dir>/metrics.json`` and TensorBoard event files."""
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when there is more than one process.

    On CUDA the process's own GPU (its local rank) is used; on the CPU (gloo) no device ids.
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
        kwargs.setdefault("output_device", comm.get_local_rank())
    return DistributedDataParallel(model, **kwargs)


class DefaultTrainer(TrainerBase):
    """A trainer with the standard behaviour, built from a config:

    1. model (``build_model``), optimizer with per-parameter groups, LR scheduler with warmup,
       gradient clipping, and the training loader, each from an overridable classmethod;
    2. ``DistributedDataParallel`` when the world size is > 1;
    3. a ``Checkpointer`` in ``OUTPUT_DIR`` saving the model and the trainer state
       (iteration, optimizer, scheduler, AMP scaler, seed, recent metric history);
       ``resume_or_load`` resumes or loads ``MODEL.WEIGHTS``;
    4. hooks: iteration timer, LR scheduler, evaluation (``TEST.EVAL_PERIOD``), metric
       writers on rank 0 (every ``LOG_PERIOD`` iterations), periodic checkpointer (last, so
       a checkpoint's iteration is always evaluated and logged already).

    Resuming is exact: everything random in a step is a function of the run seed (``SEED``,
    or one drawn once and saved in the checkpoints), the iteration and the rank. The loader
    is rebuilt to start at the resumed iteration (the sampler skips what was trained on,
    each sample's augmentations are seeded by its position in the stream) and every step
    reseeds torch / NumPy / Python from ``(seed, rank, iteration)``, so a run killed at any
    moment and resumed computes the same losses and weights as one never interrupted (on the
    CPU; on CUDA as far as its kernels are deterministic). Temporary files of checkpoint
    writes cut short are removed when training starts.

    ``SOLVER.AMP.ENABLED`` uses ``AMPTrainer`` on CUDA; on the CPU it is ignored with a
    warning (float32 ``SimpleTrainer``), as the config documents.

    Usage::

        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
    """

    def __init__(self, cfg):
        super().__init__()
        cfg = cfg.clone()
        self.cfg = cfg
        self._seed_from_config = cfg.SEED >= 0
        if not self._seed_from_config:
            # One seed for the whole run, saved in its checkpoints so a resume continues it.
            self._set_seed(comm.shared_random_seed())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        grad_clipper = self.build_gradient_clipper(cfg)
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            # Models whose heads skip some parameters on some batches need this; it costs an
            # extra graph traversal per step, so it is off unless the config asks for it.
            find_unused_parameters=bool(cfg.MODEL.get("DDP_FIND_UNUSED_PARAMETERS", False)),
        )
        self._trainer = self._build_inner_trainer(cfg, model, data_loader, optimizer, grad_clipper)
        # The inner trainer calls after_backward on its hooks: share this trainer's hook list.
        self._trainer._hooks = self._hooks

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
        self.checkpointer = Checkpointer(
            unwrapped,
            cfg.OUTPUT_DIR,
            # A weak proxy avoids a reference cycle trainer -> checkpointer -> trainer.
            trainer=weakref.proxy(self),
            partial=cfg.MODEL.WEIGHTS_PARTIAL,
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    @staticmethod
    def _build_inner_trainer(cfg, model, data_loader, optimizer, grad_clipper) -> SimpleTrainer:
        if cfg.SOLVER.AMP.ENABLED:
            module = model.module if isinstance(model, DistributedDataParallel) else model
            if next(module.parameters()).device.type == "cuda":
                dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
                dtype = dtypes.get(cfg.SOLVER.AMP.DTYPE)
                if dtype is None:
                    raise ValueError(
                        f"SOLVER.AMP.DTYPE={cfg.SOLVER.AMP.DTYPE!r}; use 'float16' or 'bfloat16'"
                    )
                return AMPTrainer(
                    model,
                    data_loader,
                    optimizer,
                    grad_clipper,
                    precision=dtype,
                    metrics_period=cfg.LOG_PERIOD,
                )
            logger.warning(
                "SOLVER.AMP.ENABLED is set but the model is on the CPU; training in float32"
            )
        # Losses stay on the device between writes: checked and logged every LOG_PERIOD.
        return SimpleTrainer(
            model, data_loader, optimizer, grad_clipper, metrics_period=cfg.LOG_PERIOD
        )

    # The inner trainer does the step; expose its parts under the usual names.
    @property
    def model(self) -> torch.nn.Module:
        return self._trainer.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    @property
    def data_loader(self):
        return self._trainer.data_loader

    def _set_seed(self, seed: int) -> None:
        was_frozen = self.cfg.is_frozen()
        self.cfg.defrost()
        self.cfg.SEED = int(seed)
        if was_frozen:
            self.cfg.freeze()

    def resume_or_load(self, resume: bool = True) -> None:
        """With ``resume`` and a checkpoint in ``OUTPUT_DIR``: load the last one (model,
        optimizer, scheduler, scaler, iteration, seed, metric history) and continue at its
        iteration + 1 with a training loader rebuilt to start there.
        Otherwise load only the model weights of ``MODEL.WEIGHTS`` (if set) and start at 0."""
        extra = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            # The checkpoint was saved after its iteration ran: continue with the next one.
            self.start_iter = int(extra.get("iteration", self.iter)) + 1
            self._restart_train_loader()
        else:
            self.start_iter = 0

    def _restart_train_loader(self) -> None:
        """Replace the loader by one that yields the batches the uninterrupted run trained on
        from ``start_iter`` on (with the checkpoint's seed, now in ``cfg.SEED``)."""
        if "start_iter" not in inspect.signature(self.build_train_loader).parameters:
            logger.warning(
                "%s.build_train_loader takes no start_iter: the resumed run reads its loader "
                "from the beginning, not the batches an uninterrupted run would read",
                type(self).__name__,
            )
            return
        self._trainer.data_loader = self.build_train_loader(self.cfg, start_iter=self.start_iter)

    def build_hooks(self) -> list:
        cfg = self.cfg
        hook_list = [hooks.IterationTimer(), hooks.LRScheduler()]

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        # Every rank evaluates (inference is sharded); the hook must be on all of them.
        if cfg.DATASETS.TEST:
            hook_list.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            # Written after evaluation so its results go out too.
            hook_list.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.LOG_PERIOD))
            # Last: a checkpoint exists only once its iteration is evaluated and logged, so
            # a resume (which starts after the checkpoint) repeats no row and misses none.
            hook_list.append(
                hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD)
            )
        return hook_list

    def build_writers(self) -> list:
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def train(self):
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``; returns the last evaluation's
        results (``{}`` if none ran)."""
        if comm.is_main_process() and self.cfg.OUTPUT_DIR:
            for path in remove_stale_temp_files(self.cfg.OUTPUT_DIR):
                logger.info("Removed %s, left by a write that was interrupted", path)
        self._last_eval_results = {}
        super().train(self.start_iter, self.max_iter)
        return self._last_eval_results

    def before_step(self) -> None:
        # A step's randomness (dropout, sampled points) depends on (seed, rank, iteration)
        # only, not on the steps before: a resumed run draws what an uninterrupted one drew.
        seed_all_rng(derive_seed(self.cfg.SEED, "step", comm.get_rank(), self.iter))
        super().before_step()

    def run_step(self) -> None:
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def state_dict(self) -> dict:
        state = super().state_dict()
        inner = self._trainer.state_dict()
        inner.pop("iteration")
        inner.pop("hooks")
        state.update(inner)
        state["seed"] = int(self.cfg.SEED)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict({**state_dict, "hooks": {}, "storage": None})
        seed = state_dict.get("seed")
        if seed is not None and int(seed) != self.cfg.SEED:
            if self._seed_from_config:
                logger.warning(
                    "The checkpoint's run used SEED %d, the config says %d; continuing with "
                    "%d so the resumed run repeats the interrupted one",
                    seed,
                    self.cfg.SEED,
                    seed,
                )
            self._set_seed(seed)

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        model = build_model(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_gradient_clipper(cls, cfg):
        return build_gradient_clipper(cfg)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """The training loader from ``cfg`` (``cfg.SEED`` is the run's seed, never negative
        here), yielding the batches of iterations ``start_iter, start_iter + 1, ...``.

        An override should accept ``start_iter`` too; one that does not still works, but a
        resumed run then reads its loader from the beginning (with a warning).
        """
        return build_train_loader(cfg, start_iter=start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: Optional[str] = None):
        """The evaluator registered for the dataset's ``evaluator_type``, or ``None``."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None) -> dict:
        """Evaluate ``model`` on every dataset of ``DATASETS.TEST``.

        Args:
            evaluators: ``None`` (build one per dataset with ``build_evaluator``) or one
                evaluator (or ``None``) per dataset.
        Returns:
            ``{dataset_name: results}``; with a single dataset, its results directly.
            A dataset without evaluator is run for inference only (logged) and has ``{}``.
            With ``TEST.HTML_REPORT``, an HTML report of each dataset (prediction beside
            ground truth, the results as tables) is written to
            ``OUTPUT_DIR/inference/<dataset>/report/index.html``
            (:class:`~pix2cap.evaluation.HtmlReportWriter`).
        """
        dataset_names = list(cfg.DATASETS.TEST)
        if evaluators is not None and not isinstance(evaluators, (list, tuple)):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(dataset_names):
            raise ValueError(
                f"{len(evaluators)} evaluators given for {len(dataset_names)} datasets "
                f"in DATASETS.TEST {dataset_names}"
            )
        results: OrderedDict = OrderedDict()
        for index, dataset_name in enumerate(dataset_names):
            data_loader = cls.build_test_loader(cfg, dataset_name)
            if evaluators is not None:
                evaluator = evaluators[index]
            else:
                evaluator = cls.build_evaluator(cfg, dataset_name)
            if evaluator is None:
                logger.info(
                    "Dataset %s has no evaluator (no evaluator_type registered); running "
                    "inference only",
                    dataset_name,
                )
            report = None
            if cfg.TEST.HTML_REPORT:
                folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name, "report")
                report = HtmlReportWriter.from_config(cfg, dataset_name, folder)
                evaluator = report if evaluator is None else DatasetEvaluators([evaluator, report])
            results[dataset_name] = inference_on_dataset(model, data_loader, evaluator)
            if report is not None:
                report.write_index(results[dataset_name])
            if comm.is_main_process() and results[dataset_name]:
                logger.info(
                    "Evaluation results for %s:\n%s",
                    dataset_name,
                    print_results_table(results[dataset_name]),
                )
                write_results_json(
                    results[dataset_name],
                    os.path.join(cfg.OUTPUT_DIR, "inference", f"{dataset_name}_results.json"),
                )
                # Goes to TensorBoard / metrics.json when called during training.
                log_results_to_storage(results[dataset_name])
        if len(results) == 1:
            return next(iter(results.values()))
        return results
