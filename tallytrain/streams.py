"""Random streams: every random draw of a run comes from a generator seeded
by :func:`seed_int` of (run seed, stream, ...), so that each purpose has a
stream of its own, independent of every other and of the order of draws.

A leaf module (numpy only), so that data, models, methods and the round loop
all take their stream numbers from one place without importing each other.
"""

from __future__ import annotations

import numpy as np

# Data (tallytrain/data): the train / probe / test split, and the partition.
SPLIT_STREAM, PARTITION_STREAM = 1, 2

# The federation (tallytrain/fl): initial parameters, local training,
# distillation, peer selection, peer roles, adversaries, the probe seed, and
# server-side models.
INIT_STREAM, TRAIN_STREAM, DISTILL_STREAM, SELECT_STREAM = 10, 11, 12, 13
ROLE_STREAM, ADVERSARY_STREAM, PROBE_STREAM, SERVER_STREAM = 14, 15, 16, 17


def seed_int(*key: int) -> int:
    """A 63-bit seed derived from integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)
