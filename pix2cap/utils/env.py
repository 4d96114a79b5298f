"""Process-wide environment helpers."""

from __future__ import annotations

import logging
import os
import random
import zlib
from datetime import datetime
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["derive_seed", "seed_all_rng"]


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


def derive_seed(*keys: Union[int, str]) -> int:
    """A seed in ``[0, 2**31)`` that is a pure function of ``keys``: non-negative integers, and
    strings naming what the seed is for, so that different uses of one run seed draw
    unrelated streams, e.g. ``derive_seed(run_seed, "step", rank, iteration)``.

    Seeding a generator from such a key, instead of letting it run on, makes each draw
    reproducible on its own: a resumed run regenerates what the interrupted one drew at the
    same point without replaying what came before. (Mixed by NumPy's ``SeedSequence``; the
    strings by CRC-32, which, unlike ``hash``, is the same in every process.)
    """
    entropy = [zlib.crc32(k.encode("utf-8")) if isinstance(k, str) else int(k) for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)
    return int(state[0]) >> 1
