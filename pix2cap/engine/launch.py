"""Start a (multi-process) job: spawned workers, or processes started by ``torchrun``.

Backends: NCCL when CUDA is available (one process per GPU), gloo otherwise. On a machine
without CUDA, ``num_gpus_per_machine=N`` (``--num-gpus N``) starts N CPU processes that
train together over gloo, which is how multi-process training is tested on the CPU.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pix2cap.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT", "started_by_torchrun"]

DEFAULT_TIMEOUT = timedelta(minutes=30)

logger = logging.getLogger(__name__)

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another env:// launcher)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in every process of the job.

    * Started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
      ``MASTER_PORT`` set): join the process group from the environment and call
      ``main_func`` here; nothing is spawned and the other arguments are ignored.
    * World size ``num_machines * num_gpus_per_machine`` > 1: spawn ``num_gpus_per_machine``
      local processes (``torch.multiprocessing``, start method "spawn"), each joining the group
      at ``dist_url``. If one fails, the others are terminated and the error is re-raised.
    * Otherwise: call ``main_func`` in this process.

    Args:
        main_func: a module-level function (spawned processes import it by name).
        num_gpus_per_machine: processes per machine (GPUs, or CPU processes without CUDA).
        dist_url: ``"tcp://host:port"``; ``None`` or ``"auto"`` picks a free local port
            (single machine only).
    """
    if started_by_torchrun():
        _init_from_environment(timeout)
        try:
            main_func(*args)
        finally:
            _destroy_process_group()
        return

    world_size = num_machines * num_gpus_per_machine
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"need at least one process per machine and one machine, got "
            f"num_gpus_per_machine={num_gpus_per_machine}, num_machines={num_machines}"
        )
    if world_size == 1:
        main_func(*args)
        return

    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// init on several machines needs a file system they all share")
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} CUDA devices"
        )
    mp.start_processes(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            tuple(args),
            timeout,
        ),
        daemon=False,
        start_method="spawn",
    )


def _init_from_environment(timeout: timedelta) -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    backend = _backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    comm.set_local_rank(local_rank, local_size)
    comm.synchronize()


def _distributed_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    backend = _backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception as e:
        raise RuntimeError(f"process group initialisation failed at {dist_url}: {e}") from e
    comm.set_local_rank(local_rank, num_gpus_per_machine)
    # Every process must be up before training starts, or the first collective can time out.
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # Groups cached for the old process group are invalid once it is gone.
    comm._object_group.cache_clear()
