"""Partitioners: who holds which training samples.

Each returns a list of index arrays (one shard per peer, sorted, disjoint).
Randomness comes only from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

from typing import List

import numpy as np

PARTITIONS = ("iid", "dirichlet", "classes", "groups")


def _check_common(labels: np.ndarray, num_peers: int, min_size: int) -> None:
    if num_peers < 1:
        raise ValueError(f"peers must be >= 1, got {num_peers}")
    if min_size < 0:
        raise ValueError(f"min_shard_size must be >= 0, got {min_size}")
    n = len(labels)
    if num_peers > n:
        raise ValueError(
            f"peers ({num_peers}) exceeds the {n} training samples: every peer needs data"
        )
    if num_peers * max(min_size, 1) > n:
        raise ValueError(
            f"peers ({num_peers}) x min_shard_size ({max(min_size, 1)}) exceeds the {n} training "
            "samples"
        )


def iid(
    labels: np.ndarray, num_peers: int, rng: np.random.Generator, min_size: int = 1
) -> List[np.ndarray]:
    """A uniformly random split into shards whose sizes differ by at most one."""
    _check_common(labels, num_peers, min_size)
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_peers)]


def dirichlet(
    labels: np.ndarray,
    num_peers: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_retries: int = 100,
) -> List[np.ndarray]:
    """Label skew: for each class, the shares of the peers are drawn from
    Dirichlet(alpha); small alpha gives peers few classes.

    Draws are repeated until every shard has at least ``min_size`` samples, at
    most ``max_retries`` times; then a ValueError explains how to relax it.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if max_retries < 1:
        raise ValueError(f"max_retries must be >= 1, got {max_retries}")
    _check_common(labels, num_peers, min_size)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    smallest = 0
    for _ in range(max_retries):
        shards: List[List[np.ndarray]] = [[] for _ in range(num_peers)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_peers, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for peer, part in enumerate(np.split(idx, cuts)):
                shards[peer].append(part)
        out = [np.sort(np.concatenate(parts)) for parts in shards]
        smallest = min(len(s) for s in out)
        if smallest >= max(min_size, 1):
            return out
    raise ValueError(
        f"Dirichlet(alpha={alpha}) partition over {num_peers} peers found no draw with "
        f"every shard >= min_shard_size={max(min_size, 1)} in {max_retries} tries (last "
        f"smallest shard: {smallest}); raise alpha, lower min_shard_size or peers, or "
        f"raise max_retries"
    )


def classes_per_peer(
    labels: np.ndarray, num_peers: int, k: int, rng: np.random.Generator, min_size: int = 1
) -> List[np.ndarray]:
    """Pathological skew: each peer holds exactly ``k`` classes.

    Classes are dealt round-robin over a random class order, so with
    ``peers * k >= C`` every class is held by someone; each class's samples are
    split evenly among the peers holding it.
    """
    _check_common(labels, num_peers, min_size)
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ValueError(f"classes_per_peer must be in 1..{len(classes)}, got {k}")
    order = rng.permutation(classes)
    held = [[order[(p * k + j) % len(order)] for j in range(k)] for p in range(num_peers)]
    holders = {c: [p for p in range(num_peers) if c in held[p]] for c in classes}
    shards: List[List[np.ndarray]] = [[] for _ in range(num_peers)]
    for c in classes:
        if not holders[c]:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for peer, part in zip(holders[c], np.array_split(idx, len(holders[c]))):
            shards[peer].append(part)
    out = [np.sort(np.concatenate(s)) if s else np.zeros(0, np.int64) for s in shards]
    smallest = min(len(s) for s in out)
    if smallest < max(min_size, 1):
        raise ValueError(
            f"classes_per_peer={k} over {num_peers} peers leaves a shard of {smallest} "
            f"samples, below min_shard_size={max(min_size, 1)}; use fewer peers or more classes"
        )
    return out


def by_group(
    groups: np.ndarray, num_peers: int, rng: np.random.Generator, min_size: int = 1
) -> List[np.ndarray]:
    """Feature skew by group: all samples of a group (pytext: a module or
    package; glyphs: a font face) go to one peer, and the groups are dealt so
    that shard sizes balance: largest group first (equal sizes in a random
    order), each to the peer holding the fewest samples so far (the lowest
    such peer), then the peers are renumbered at random so that which peer
    holds the largest group depends on the seed."""
    _check_common(groups, num_peers, min_size)
    names, sizes = np.unique(groups, return_counts=True)
    if num_peers > len(names):
        raise ValueError(
            f"partition by group: peers ({num_peers}) exceeds the {len(names)} "
            f"groups of the training samples; every peer needs a group"
        )
    tie_break = rng.permutation(len(names))
    order = sorted(range(len(names)), key=lambda g: (-sizes[g], tie_break[g]))
    load = np.zeros(num_peers, dtype=np.int64)
    owner = np.empty(len(names), dtype=np.int64)
    for g in order:
        peer = int(np.argmin(load))
        owner[g] = peer
        load[peer] += sizes[g]
    relabel = rng.permutation(num_peers)
    peer_of_sample = relabel[owner[np.searchsorted(names, groups)]]
    out = [np.flatnonzero(peer_of_sample == p) for p in range(num_peers)]
    smallest = min(len(s) for s in out)
    if smallest < max(min_size, 1):
        raise ValueError(
            f"partition by group over {num_peers} peers leaves a shard of {smallest} samples, "
            f"below min_shard_size={max(min_size, 1)}; use fewer peers"
        )
    return out


def class_counts(labels: np.ndarray, shards: List[np.ndarray], num_classes: int) -> np.ndarray:
    """[peers, classes] number of samples of each class in each shard. For
    sequence labels ``[N, T]`` a sample is a target token: the count is how
    many of the shard's target positions hold each class, padding (-1) left out."""

    def count(s: np.ndarray) -> np.ndarray:
        held = labels[s].reshape(-1)
        return np.bincount(held[held >= 0], minlength=num_classes)

    return np.stack([count(s) for s in shards]) if shards else np.zeros((0, num_classes), np.int64)
