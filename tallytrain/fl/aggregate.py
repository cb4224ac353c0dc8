"""Aggregation math, as pure functions (no state, no I/O, no randomness).

The methods call these; tests check them against hand-worked cases.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ..consensus import Consensus  # the public type; re-exported for the engine


def weighted_average(vectors: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_p w_p x_p / sum_p w_p over rows of ``vectors`` [P, M] (FedAvg with
    w_p = the peer's sample count). Accumulated in float64 in row order, so the
    result does not depend on the thread count."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if vectors.dim() != 2 or w.numel() != vectors.shape[0]:
        raise ValueError(
            f"weights must have one entry per row of vectors [P, M]; got {w.numel()} weights "
            f"for shape {tuple(vectors.shape)}"
        )
    if vectors.shape[0] == 0:
        raise ValueError("weighted_average needs at least one vector")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    acc = torch.zeros(vectors.shape[1], dtype=torch.float64)
    for p in range(vectors.shape[0]):
        acc += w[p] * vectors[p].double()
    return (acc / w.sum()).to(vectors.dtype)


def average_probs(probs: torch.Tensor) -> torch.Tensor:
    """Mean over peers of [P, N, C] (or [P, N, T, C]) probability tensors, in float32."""
    if probs.dim() < 3 or probs.shape[0] == 0:
        raise ValueError(f"probs must be [P >= 1, N, C], got shape {tuple(probs.shape)}")
    return probs.float().mean(dim=0)


def sharpen(avg: torch.Tensor, temperature: float) -> torch.Tensor:
    """DS-FL's entropy reduction aggregation: softmax(avg / T). With T < 1 the
    averaged soft labels get sharper (T = 0.1 in the DS-FL paper)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(avg.float() / temperature, dim=-1)


def consensus(
    label: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    threshold: float = 0.0,
    min_votes: int = 1,
) -> Consensus:
    """From a tally to a consensus: a probe is kept when its winner has at
    least ``min_votes`` votes and a share count/total of at least
    ``threshold`` (compared as count >= threshold * total in float64, so 0.5
    keeps exact halves). The share is relative to the peers that did not
    abstain; ``min_votes`` is the absolute quorum that stops a few
    non-abstaining voters from deciding a probe everyone else abstained on.

    This is ``tallytrain.Consensus.from_counts`` (the rule ``tallytrain.tally``
    applies) under the engine's argument names; it returns the public
    ``tallytrain.Consensus``."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0.0 <= threshold <= 1.0
    ):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return Consensus.from_counts(label, count, total, agreement=threshold, min_votes=min_votes)


def mean_agreement(c: Consensus) -> Optional[float]:
    """Mean winner share over the probes that received at least one vote."""
    voted = c.labels >= 0
    return float(c.agreement[voted].mean()) if bool(voted.any()) else None


def labels_accuracy(
    labels: torch.Tensor, truth: torch.Tensor, keep: Optional[torch.Tensor] = None
) -> Optional[float]:
    """Share of (kept) probes whose label equals the hidden true label."""
    mask = labels >= 0 if keep is None else keep & (labels >= 0)
    if not bool(mask.any()):
        return None
    return float((labels[mask] == truth[mask]).float().mean())


def share_agreeing(
    peer_labels: torch.Tensor, consensus_labels: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> Optional[float]:
    """Mean over probes of the share of peers whose label [P, N] equals the
    consensus label [N] (the agreement measure for methods that do not tally);
    ``mask`` [N] (e.g. [N, T] with padding False) limits it to some positions."""
    if mask is not None:
        peer_labels, consensus_labels = peer_labels[:, mask], consensus_labels[mask]
    if peer_labels.numel() == 0:
        return None
    return float((peer_labels == consensus_labels[None]).float().mean())
