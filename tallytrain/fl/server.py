"""The server's side: choosing the round's peers, and a server-held model
for the methods that have a global model (FedAvg, FedProx, FedDF)."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from .peer import Batches, LossFn, PeerGroup, draw_batches, make_group


def select_peers(
    num_peers: int, participation: float, seed: int, stream: int, round_index: int
) -> List[int]:
    """The sorted peers taking part in a round: everyone at participation 1,
    else max(1, round(participation * P)) drawn from (seed, round) alone, so
    the choice needs no saved state."""
    if participation >= 1.0:
        return list(range(num_peers))
    k = max(1, int(round(participation * num_peers)))
    rng = np.random.default_rng([int(seed), int(stream), int(round_index)])
    return sorted(int(i) for i in rng.choice(num_peers, size=k, replace=False))


class ServerModel:
    """One model of the peers' architecture held by the server, as a flat vector."""

    def __init__(
        self,
        like: PeerGroup,
        input_shape,
        num_classes: int,
        hidden: int,
        init_generator: torch.Generator,
    ):
        self.group = make_group(
            like.arch, ["server"], input_shape, num_classes, hidden, [init_generator]
        )
        self._row = torch.tensor([0])

    @property
    def vector(self) -> torch.Tensor:
        return self.group.flatten()[0]

    @vector.setter
    def vector(self, flat: torch.Tensor) -> None:
        self.group.load_flat(self._row, flat.float()[None])

    def predict(self, x: torch.Tensor, vectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [R, N, C] of the server model, or of each row of ``vectors``
        [R, M] (e.g. the peers' received models) run through the same template."""
        params = None if vectors is None else self.group.unflatten(vectors.float())
        return self.group.predict(x, params=params)

    def distill(
        self,
        x_src: torch.Tensor,
        targets: torch.Tensor,
        steps: int,
        batch: int,
        loss_fn: LossFn,
        lr: float,
        generator: torch.Generator,
    ) -> None:
        """Train the server model on (x_src, targets) for ``steps`` minibatches."""
        pool = torch.arange(len(x_src))
        index = draw_batches([pool], [steps], batch, [generator])
        self.group.fit(self._row, [steps], [Batches(index, x_src, targets, loss_fn, 1.0)], lr)
