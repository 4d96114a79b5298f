import pytest

from pix2cap.utils.env import derive_seed


def test_derive_seed_is_a_pure_function_of_its_keys():
    seeds = {derive_seed(0, "step", rank, it) for rank in range(2) for it in range(50)}
    assert len(seeds) == 100 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(3, "step", 1, 7) == derive_seed(3, "step", 1, 7)
    # The purpose keeps one run seed's uses apart: epoch 5's order, sample 5's augmentations.
    assert derive_seed(3, "epoch", 5) != derive_seed(3, "sample", 5) != derive_seed(3, 5)
    # Strings are mixed by CRC-32, the same in every process (unlike hash()).
    assert derive_seed(3, "epoch", 5) == derive_seed(3, 3002987183, 5)
    with pytest.raises(ValueError):
        derive_seed(-1, "step")

