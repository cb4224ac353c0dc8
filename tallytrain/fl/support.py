"""Support-aware abstention: whether a peer's own shard backs a vote.

A peer trained on a skewed shard predicts confidently on probes unlike
anything it holds: it has never seen their class, or it has, but not
anything near this probe. Such votes are not evidence, and once peers
distill on the consensus they become an echo of it (every peer repeats the
labels it was taught). A peer therefore votes only where its own data backs
the vote, judged from local information alone (zero bytes):

- by label: its shard holds at least ``min_count`` samples of the predicted
  class;
- by input (float inputs only): the probe lies within the shard's support of
  the predicted class: its distance to the nearest shard sample of that
  class is at most the ``radius_quantile``-quantile of the distances from
  the shard's samples to their nearest same-class neighbour (Euclidean, on
  the flattened input). A vote passes this test only if some sample of its
  class lies about as close as the shard's samples typically lie to each
  other.
"""

from __future__ import annotations

from typing import Optional

import torch

_ROWS = 1024  # rows per distance block (bounded memory)


def nearest_same_class_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each row of x [m, d], the distance to the nearest other row of the
    same label (inf where its label occurs once)."""
    out = torch.full((len(x),), float("inf"))
    for label in torch.unique(y).tolist():
        rows = torch.nonzero(y == label).flatten()
        if len(rows) < 2:
            continue
        xs = x[rows]
        for i in range(0, len(rows), _ROWS):
            d = torch.cdist(xs[i : i + _ROWS], xs)
            d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = float("inf")
            out[rows[i : i + _ROWS]] = d.min(1).values
    return out


class LocalSupport:
    """One peer's support test over its own shard (``x`` [m, ...], ``y`` [m])."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        min_count: int,
        radius_quantile: Optional[float],
    ):
        self.min_count = int(min_count)
        # Sequence labels [m, T]: target tokens, padding (-1) left out.
        counts = torch.bincount(y[y >= 0], minlength=num_classes)
        self.class_ok = counts >= self.min_count
        self.radius = None
        if radius_quantile is not None and x.dtype.is_floating_point and len(x):
            self.x = x.reshape(len(x), -1).float()
            self.y = y
            nn = nearest_same_class_distances(self.x, y)
            finite = nn[torch.isfinite(nn)]
            # A shard where no class has two samples gives no scale: only
            # the label test applies then.
            if len(finite):
                self.radius = float(torch.quantile(finite, float(radius_quantile)))

    def backed(self, x_probe: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """bool [n]: whether the shard backs each vote ``labels`` [n] (labels
        < 0, abstentions, are never backed) on the probes ``x_probe`` [n, ...]."""
        ok = (labels >= 0) & self.class_ok[labels.clamp(min=0)]
        if self.radius is None:
            return ok
        xp = x_probe.reshape(len(x_probe), -1).float()
        for label in torch.unique(labels[ok]).tolist():
            rows = torch.nonzero(ok & (labels == label)).flatten()
            mine = self.x[self.y == label]
            if not len(mine):  # --support-min 0: a class the shard never saw backs nothing
                ok[rows] = False
                continue
            near = torch.cat(
                [
                    torch.cdist(xp[rows[i : i + _ROWS]], mine).min(1).values
                    for i in range(0, len(rows), _ROWS)
                ]
            )
            ok[rows] = near <= self.radius
        return ok
