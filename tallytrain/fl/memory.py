"""TEMPORARY stand-in for tallytrain.ConsensusMemory (api branch); same contract."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class ConsensusMemory:
    def __init__(self, pool_size: int, *, max_age: Optional[int] = None):
        self.pool_size = int(pool_size)
        self.max_age = max_age
        self.held = torch.full((self.pool_size,), -1, dtype=torch.int64)
        self.stamp = torch.full((self.pool_size,), -1, dtype=torch.int64)
        self.round = -1

    def update(self, probe_indices: torch.Tensor, consensus, round: int) -> None:
        idx = torch.as_tensor(probe_indices, dtype=torch.int64)
        keep = consensus.keep & (consensus.labels >= 0)
        self.held[idx] = torch.where(keep, consensus.labels, torch.full_like(consensus.labels, -1))
        self.stamp[idx] = torch.where(keep, torch.full_like(idx, round), torch.full_like(idx, -1))
        self.round = round
        if self.max_age:
            old = (self.held >= 0) & (round - self.stamp >= self.max_age)
            self.held[old] = -1
            self.stamp[old] = -1

    def labels(self) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(self.held >= 0).flatten()
        return idx, self.held[idx]

    def __len__(self) -> int:
        return int((self.held >= 0).sum())

    def state_dict(self) -> dict:
        return {"held": self.held.clone(), "stamp": self.stamp.clone(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.held = state["held"].clone()
        self.stamp = state["stamp"].clone()
        self.round = int(state["round"])
