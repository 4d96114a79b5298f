"""Logging set-up: one plain-text format for the console and the log file."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Optional

__all__ = ["setup_logger"]

_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"


@functools.lru_cache()  # Calling it twice must not attach the same handlers twice.
def setup_logger(
    output: Optional[str] = None,
    distributed_rank: int = 0,
    name: str = "pix2cap",
    level: int = logging.DEBUG,
) -> logging.Logger:
    """Configure the logger ``name`` (and its children) for a training or evaluation run.

    Rank 0 logs INFO and above to stdout; every rank logs DEBUG and above to a file when
    ``output`` is given. Other ranks stay quiet on the console, so N processes do not print
    every line N times.

    Args:
        output: a file path ending in ``.txt``/``.log``, or a folder (the file is then
            ``<folder>/log.txt``). Ranks > 0 append ``.rank<r>`` to the file name.
        distributed_rank: the rank of this process.
        name: the logger to configure.
    Returns:
        The configured logger.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    formatter = logging.Formatter(_FORMAT, datefmt=_DATE_FORMAT)

    if distributed_rank == 0:
        console = logging.StreamHandler(stream=sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(formatter)
        logger.addHandler(console)

    if output is not None:
        if output.endswith((".txt", ".log")):
            filename = output
        else:
            filename = os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        file_handler = logging.FileHandler(filename, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger
