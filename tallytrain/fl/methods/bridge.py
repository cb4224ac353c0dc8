"""``bridge``: TallyTrain's hard-label consensus every round, plus a sparse
top-k merge of parameter changes every ``merge_period`` rounds.

Every round is a TallyTrain round (control + consensus down, votes up). In
addition, in a merge round r (every ``merge_period``-th round, and the run's
last round, as for FedAvg):

1. each selected peer sends its parameter change since it last sent,
   ``x = w - anchor``, through error feedback: it sends the top-k entries of
   ``x + residual`` (``ops.topk_sparse_ef``; k = ``topk_fraction`` of its
   parameters, values as ``param_dtype``) and keeps the remainder, payload
   rounding included, in ``residual`` for next time;
2. the server merges the sparse changes into their sample-weighted average
   ``u`` (``ops.sparse_merge`` with the peers' shard sizes) and replies, in
   the same round, with ``u`` sparse (its nonzero entries) to every peer, so
   that every peer's view of the shared model stays the same;
3. each peer applies ``u - s``, where ``s`` is what it sent itself: its own
   sent change is replaced by everyone's average, while what it has not sent
   yet stays in its model.

So each peer's model is always ``shared + residual + (training since it last
sent)``, where ``shared`` (the common start plus every merged update) is the
same on every peer; the server keeps no model at all. With k = every
parameter and a merge every round this is exactly FedAvg's average (tested);
with merges off (``merge_period = 0``) it is exactly ``tallytrain``.

Peers start from one common model, initialised from a seed agreed at setup
(like the probe seed; no bytes), because averaging parameter changes is only
meaningful between models that share an origin. With merges off they keep
TallyTrain's independent initialisations.
"""

from __future__ import annotations

import math

import torch

from ... import ops, wire
from ...comm import SERVER, Envelope
from ...streams import ADVERSARY_STREAM, SERVER_STREAM
from ..adversary import corrupt_params
from ..server import ServerModel
from .base import register
from .tallytrain import TallyTrain

SPARSE = wire.MessageKind.SPARSE_PARAMS


@register
class Bridge(TallyTrain):
    name = "bridge"
    peer_state_keys = TallyTrain.peer_state_keys + ("anchor", "residual", "sent")
    averages_parameters = True

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.protocol.decentralized and cfg.protocol.merge_period > 0:
            raise ValueError(
                "bridge merges parameters through the server; decentralized mode "
                "works only with merge_period = 0 (no merges)"
            )

    def __init__(self, fed):
        super().__init__(fed)
        proto = fed.cfg.protocol
        self.period = proto.merge_period
        self.dtype = getattr(torch, proto.param_dtype)
        self.group = fed.population.single_group
        self.size = self.group.num_params
        self.k = max(1, math.ceil(proto.topk_fraction * self.size))
        # Peer side, for the peers held here (all in the simulator, its own on
        # a Flower node, none on the Flower server): row ``slot[p]`` of the
        # stacks below is peer p's.
        self.slot = {p: i for i, p in enumerate(fed.peers)}
        self.rows = torch.tensor([fed.population.where[p][1] for p in fed.peers], dtype=torch.int64)
        if self.period > 0 and fed.peers:
            start = ServerModel(
                self.group,
                fed.data.input_shape,
                fed.num_classes,
                fed.cfg.model.hidden,
                fed.generator(SERVER_STREAM),
            ).vector
            self.group.load_flat(self.rows, start.expand(len(self.rows), -1))
        # Each peer's parameters when it last sent (or last applied a merge),
        # its error-feedback residual, and what it sent this merge.
        self.anchor = self.group.flatten(self.rows).clone()
        self.residual = torch.zeros_like(self.anchor)
        self.sent = {}  # peer -> (indices, values as sent, in float32), until the reply
        self._reply = None  # server: this round's encoded merged update

    def merges(self, r: int) -> bool:
        return self.period > 0 and ((r + 1) % self.period == 0 or r == self.fed.cfg.rounds - 1)

    # ---- peers: TallyTrain's votes, plus the sparse change in a merge round ------
    def _apply_merge(self, p: int, msg: wire.Message) -> None:
        if msg.size != self.size:
            raise wire.WireFormatError(
                f"merged update has {msg.size} entries, the model {self.size}"
            )
        if msg.indices is None or msg.values is None:
            raise wire.WireFormatError(f"a {msg.kind.name} message carries no sparse update")
        change = torch.zeros(self.size)
        change[msg.indices] = msg.values.float()
        if p in self.sent:
            idx, values = self.sent.pop(p)
            change.index_add_(0, idx, -values)
        i = self.slot[p]
        row = self.rows[i : i + 1]
        self.group.load_flat(row, self.group.flatten(row) + change)
        self.anchor[i] += change

    def uplink(self, r, selected):
        votes = super().uplink(r, selected)  # server mode: one VOTES message per peer
        if not self.merges(r):
            return votes
        out = []
        fed = self.fed
        slots = [self.slot[p] for p in selected]
        flat = self.group.flatten(self.rows[slots])
        for i, p in enumerate(selected):
            s = slots[i]
            with fed.timer("ops"):
                idx, values = ops.topk_sparse_ef(flat[i] - self.anchor[s], self.residual[s], self.k)
                sent = values.to(self.dtype)
                # The payload's rounding is not lost either: it waits in the residual.
                self.residual[s].index_add_(0, idx, values - sent.float())
            self.anchor[s] = flat[i]
            self.sent[p] = (idx, sent.float())
            if fed.adversarial[p]:
                # An adversary keeps honest books and an honest model (as in
                # tallytrain) but sends corrupted values at the same indices:
                # the change reversed (flip) or noise of its mean and spread.
                sent = corrupt_params(
                    sent.float(),
                    torch.zeros_like(values),
                    fed.cfg.protocol.adversarial_mode,
                    fed.generator(ADVERSARY_STREAM, r, p, SPARSE),
                ).to(self.dtype)
            with fed.timer("messaging"):
                msg = wire.encode_sparse(idx, sent, self.size, dtype=self.dtype, round=r, sender=p)
            out += [votes[i], Envelope(p, SERVER, msg, SPARSE)]  # each peer's messages together
        return out

    # ---- 3. server: tally, merge the sparse changes, reply ------------------------
    def aggregate(self, r, selected, received):
        votes = [(env, msg) for env, msg in received if msg.kind != SPARSE]
        changes = sorted(
            ((env.sender, msg) for env, msg in received if msg.kind == SPARSE),
            key=lambda item: item[0],
        )
        stats = super().aggregate(r, selected, votes)
        self._reply = None
        if changes:
            fed = self.fed
            with fed.timer("ops"):
                merged = ops.sparse_merge(
                    [msg.indices for _, msg in changes],
                    [msg.values.float() for _, msg in changes],
                    self.size,
                    counts=torch.tensor([fed.shard_sizes[p] for p, _ in changes]),
                )
                idx = torch.nonzero(merged).flatten()
            with fed.timer("messaging"):
                self._reply = wire.encode_sparse(
                    idx,
                    merged[idx].to(self.dtype),
                    self.size,
                    dtype=self.dtype,
                    round=r,
                    sender=wire.SERVER,
                )
        return stats

    def reply(self, r, selected):
        if self._reply is None:
            return []
        return [Envelope(SERVER, p, self._reply, SPARSE) for p in range(self.fed.cfg.peers)]

    def apply_reply(self, r, inbox):
        for p, messages in inbox.items():
            for msg in messages:
                self._apply_merge(p, msg)

    # ---- checkpoints ------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        # In the simulator ``sent`` is settled by the same round's reply, so it
        # is empty at checkpoints; a deployed peer (tallytrain.flower) saves
        # its state between its uplink and the reply, where it is not.
        state.update(
            anchor=self.anchor.clone(),
            residual=self.residual.clone(),
            sent={int(p): [i.clone(), v.clone()] for p, (i, v) in self.sent.items()},
        )
        return state

    def peer_state(self, peer):
        state = super().peer_state(peer)
        s = self.slot[peer]
        sent = self.sent.get(peer)
        # A deployed peer saves between its uplink and the round's reply, when
        # what it sent is still pending.
        state.update(
            anchor=self.anchor[s].clone(),
            residual=self.residual[s].clone(),
            sent=None if sent is None else [sent[0].clone(), sent[1].clone()],
        )
        return state

    def load_peer_state(self, peer, state):
        super().load_peer_state(peer, state)
        s = self.slot[peer]
        for name in ("anchor", "residual"):
            if tuple(state[name].shape) != tuple(self.anchor[s].shape):
                raise ValueError(
                    f"peer {peer}'s saved {name} has shape "
                    f"{tuple(state[name].shape)}, its model {self.size} entries"
                )
        self.anchor[s] = state["anchor"]
        self.residual[s] = state["residual"]
        self.sent.pop(peer, None)
        if state["sent"] is not None:
            self.sent[peer] = (state["sent"][0].clone(), state["sent"][1].clone())

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.anchor = state["anchor"].clone()
        self.residual = state["residual"].clone()
        self.sent = {int(p): (i.clone(), v.clone()) for p, (i, v) in state["sent"].items()}
