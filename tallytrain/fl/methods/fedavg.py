"""``fedavg``: the server sends the global model; peers train it locally and
send their parameters back; the server averages them weighted by shard size."""
from __future__ import annotations

import torch

from ... import wire
from ...comm import SERVER, Envelope
from ..adversary import corrupt_params
from ..aggregate import weighted_average
from ..loop import SERVER_STREAM
from ..registry import register
from ..server import ServerModel
from .base import Method, RoundStats


@register
class FedAvg(Method):
    name = "fedavg"
    averages_parameters = True

    def __init__(self, fed):
        super().__init__(fed)
        self.group = fed.population.single_group
        self.server = ServerModel(self.group, fed.data.input_shape, fed.num_classes,
                                  fed.cfg.model.hidden, fed.generator(SERVER_STREAM))
        self.dtype = getattr(torch, fed.cfg.protocol.param_dtype)
        self._received = {}  # peer -> the global vector it received this round

    def prox_mu(self) -> float:
        return 0.0

    def downlink(self, r, selected):
        with self.fed.timer("messaging"):
            msg = wire.encode_dense(self.server.vector, dtype=self.dtype, round=r,
                                    sender=wire.SERVER)
        return [Envelope(SERVER, p, msg, wire.MessageKind.DENSE_PARAMS) for p in selected]

    def peer_update(self, r, selected, inbox):
        self._received = {p: inbox[p][0].vector.float() for p in selected}
        rows = torch.tensor([self.fed.population.where[p][1] for p in selected])
        self.group.load_flat(rows, torch.stack([self._received[p] for p in selected]))
        # Every peer received the same global model, the FedProx anchor.
        anchor = self._received[selected[0]]
        self.fed.train_local(r, selected, self.prox_mu(), anchor)

    def uplink(self, r, selected):
        fed = self.fed
        rows = torch.tensor([fed.population.where[p][1] for p in selected])
        flat = self.group.flatten(rows)
        out = []
        for i, p in enumerate(selected):
            vec = flat[i]
            if fed.adversarial[p]:
                vec = corrupt_params(vec, self._received[p], fed.cfg.protocol.adversarial_mode,
                                     fed.adversary_generator(r, p))
            with fed.timer("messaging"):
                msg = wire.encode_dense(vec, dtype=self.dtype, round=r, sender=p)
            out.append(Envelope(p, SERVER, msg, wire.MessageKind.DENSE_PARAMS))
        return out

    def aggregate(self, r, selected, received):
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
