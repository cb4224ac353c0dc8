"""The public probe set and the per-round probe subsets.

The probe pool is carved from the data once per seed, disjoint from every
shard and from the test set; its true labels stay hidden from peers and serve
only to measure consensus accuracy. A round's subset is a function of the
session's probe seed and the round, so a peer that receives the seed can
rebuild the subset of any round (including the previous one, whose consensus
it distills on) without holding state.
"""

from __future__ import annotations

import numpy as np


def probe_subset(pool_size: int, num_probes: int, probe_seed: int, round_index: int) -> np.ndarray:
    """Sorted indices into the probe pool used in round ``round_index``."""
    if num_probes < 1:
        raise ValueError(f"probes_per_round must be >= 1, got {num_probes}")
    if num_probes > pool_size:
        raise ValueError(
            f"probes_per_round ({num_probes}) exceeds the probe pool of {pool_size} samples; "
            f"lower probes_per_round or raise probe_fraction"
        )
    if round_index < 0:
        raise ValueError(f"round must be >= 0, got {round_index}")
    rng = np.random.default_rng([int(probe_seed), int(round_index)])
    if num_probes == pool_size:
        return np.arange(pool_size)
    return np.sort(rng.choice(pool_size, size=num_probes, replace=False))
