"""``fedavg``: the server sends the global model; peers train it locally and
send their parameters back; the server averages them weighted by shard size.

With ``merge_period = R`` the exchange happens every R rounds: a period
starts with the global model going down to its peers (the same peers all
period), each of its rounds is one round of local work, and its last round
sends the parameters up and averages them. The run's last round always
averages, so that every run ends with a global model."""

from __future__ import annotations

import torch

from ... import wire
from ...comm import SERVER, Envelope
from ...streams import SERVER_STREAM
from ..adversary import corrupt_params
from ..aggregate import weighted_average
from ..server import ServerModel
from .base import Method, RoundStats, register


@register
class FedAvg(Method):
    name = "fedavg"
    averages_parameters = True

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.protocol.merge_period < 1:
            raise ValueError(
                f"method {cls.name!r} needs merge_period >= 1, got {cfg.protocol.merge_period}"
            )

    def __init__(self, fed):
        super().__init__(fed)
        self.period = fed.cfg.protocol.merge_period
        self.group = fed.population.single_group
        self.server = ServerModel(
            self.group,
            fed.data.input_shape,
            fed.num_classes,
            fed.cfg.model.hidden,
            fed.generator(SERVER_STREAM),
        )
        self.dtype = getattr(torch, fed.cfg.protocol.param_dtype)
        # Peer side: the global model of this period as the peers received it
        # (None until one arrives here; see anchor()).
        self.received = None

    def prox_mu(self) -> float:
        return 0.0

    def selection_round(self, r):
        return r - r % self.period

    def merges(self, r: int) -> bool:
        return (r + 1) % self.period == 0 or r == self.fed.cfg.rounds - 1

    def downlink(self, r, selected):
        if r % self.period:
            return []  # mid-period: peers keep training what they received
        with self.fed.timer("messaging"):
            msg = wire.encode_dense(
                self.server.vector, dtype=self.dtype, round=r, sender=wire.SERVER
            )
        return [Envelope(SERVER, p, msg, wire.MessageKind.DENSE_PARAMS) for p in selected]

    def peer_update(self, r, selected, inbox):
        received = [p for p in selected if inbox[p]]
        if received:
            rows = torch.tensor([self.fed.population.where[p][1] for p in received])
            self.group.load_flat(rows, torch.stack([inbox[p][0].vector.float() for p in received]))
            # Every peer of a period receives the same message, at its start.
            self.received = inbox[received[0]][0].vector.float()
        self.fed.train_local(r, selected, self.prox_mu(), self.anchor())

    def anchor(self) -> torch.Tensor:
        """The global model of this period as the peers received it: the
        FedProx anchor, and an adversary's reference. In one process it is
        also the server's copy with the payload's rounding (param_dtype)
        applied (the server's copy changes only when the period's parameters
        come back), which is what a resumed run uses; a Flower node keeps
        the one it received (peer_state)."""
        if self.received is not None:
            return self.received
        return self.server.vector.to(self.dtype).float()

    def peer_state(self, peer):
        return {"received": self.received}

    def load_peer_state(self, peer, state):
        self.received = state["received"]

    def uplink(self, r, selected):
        if not self.merges(r):
            return []
        fed = self.fed
        rows = torch.tensor([fed.population.where[p][1] for p in selected])
        flat = self.group.flatten(rows)
        out = []
        for i, p in enumerate(selected):
            vec = flat[i]
            if fed.adversarial[p]:
                vec = corrupt_params(
                    vec,
                    self.anchor(),
                    fed.cfg.protocol.adversarial_mode,
                    fed.adversary_generator(r, p),
                )
            with fed.timer("messaging"):
                msg = wire.encode_dense(vec, dtype=self.dtype, round=r, sender=p)
            out.append(Envelope(p, SERVER, msg, wire.MessageKind.DENSE_PARAMS))
        return out

    def aggregate(self, r, selected, received):
        if not received:
            return RoundStats()
        vectors = torch.stack([msg.vector.float() for _, msg in received])
        weights = [self.fed.shard_sizes[env.sender] for env, _ in received]
        self.server.vector = weighted_average(vectors, weights)
        return self.after_average(r, vectors)

    def after_average(self, r: int, vectors: torch.Tensor) -> RoundStats:
        """Hook for FedDF's server-side step; plain FedAvg measures nothing more."""
        return RoundStats()

    def global_params(self):
        return self.server.vector

    def state_dict(self):
        return {"global": self.server.vector.clone()}

    def load_state_dict(self, state):
        self.server.vector = state["global"]
