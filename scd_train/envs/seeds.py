"""Which seed starts which episode, shared by the recorder and the evaluation.

Training episodes get even seeds and held-out episodes odd ones, so no held-out episode can ever
start from a training episode's seed, whatever the counts. Policies draw from their own streams.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "holdout")
SEED_RANGE = 2**31  # gymnasium and crafter take seeds below 2**31; it is even, so parity survives the modulo


def episode_seed(seed: int, split: str, index: int) -> int:
    """The env seed of episode ``index`` of ``split`` in a recording made with ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    return (2 * (seed * 1_000_003 + index) + SPLITS.index(split)) % SEED_RANGE


def policy_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The random stream a policy draws from in that episode (``stream`` tells uses apart)."""
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])
