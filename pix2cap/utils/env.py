"""Process-wide environment helpers."""

from __future__ import annotations

import logging
import os
import random
from datetime import datetime
from typing import Optional

import numpy as np
import torch

__all__ = ["seed_all_rng"]


def seed_all_rng(seed: Optional[int] = None) -> int:
    """Seed Python's, NumPy's and torch's random generators.

    Args:
        seed: the seed; ``None`` or a negative value draws one from the pid and the clock.
    Returns:
        The seed that was used (log it to reproduce a run).
    """
    if seed is None or seed < 0:
        seed = (
            os.getpid()
            + int(datetime.now().strftime("%S%f"))
            + int.from_bytes(os.urandom(2), "big")
        ) % (2**31)
        logging.getLogger(__name__).info("Using a generated random seed %d", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed
