"""``softlabel-topk``: softlabel with sparse payloads. For each probe position
a peer sends only its k largest probabilities of softmax(logits / T), as
class indices (bits_for(C) bits each) and float16 values, in a SOFT_TOPK
message (docs/wire.md); k = ``softlabel_topk`` (16), or C when C is smaller.

The missing mass. A top-k message says exactly how much probability lies
outside its k classes (1 - the sum of its values), but not where. We read it
as spread evenly over the other C - k classes: of all distributions that
agree with what was sent, that is the one of maximum entropy, so it claims
nothing the sender did not say, it keeps every distribution summing to 1,
and each class outside the top k gets less than the k-th value, as it must.
Renormalising the k values to 1 instead would make every target more
confident than the peer was, and would tell a student that the other
C - k classes (most of a 16,384-token vocabulary) are impossible.

Round r (server mode, as softlabel):
1. the server sends each selected peer a CONTROL message and, from round 1
   on, a SOFT_TOPK message with the top k of round r-1's aggregate;
2. each peer distills on the targets it holds (the last round's; with
   ``softlabel_memory``, as softlabel, the latest target of every probe of
   the pool, expiring after ``memory_max_age`` rounds) with
   KL(target || softmax(logits / T)) * T^2, the
   target completed as above (peer.topk_label_loss, exact without a dense
   target), on the schedule every distilling method gets (Federation.learn);
   then it sends the top k of its own probabilities on round r's probes;
3. the server completes every peer's message the same way, averages the
   completed distributions (optionally sharpened as in DS-FL), and keeps the
   top k of the average for the next round. The average of completed
   distributions is a base (the mean of the peers' spread mass) plus each
   peer's sparse excess at its own k classes, so the server builds it dense
   only a chunk of positions at a time.

Padding of token windows is public: peers weigh it 0 in their targets, so it
is never distilled on, and it is left out of every statistic.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ... import wire
from ...comm import SERVER, Envelope
from ..adversary import corrupt_probs
from ..aggregate import labels_accuracy, share_agreeing, sharpen
from ..peer import topk_label_loss
from .base import Method, RoundStats, register

TOPK = wire.MessageKind.SOFT_TOPK
VALUE_DTYPE = torch.float16
# Dense entries (positions x classes) the server builds at once while averaging.
_AVERAGE_ENTRIES = 1 << 22


@register
class SoftLabelTopK(Method):
    name = "softlabel-topk"
    peer_state_keys = ("memory",)

    def __init__(self, fed):
        super().__init__(fed)
        self.k = min(fed.cfg.protocol.softlabel_topk, fed.num_classes)
        self.previous: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (indices, values)
        self.memory: Dict[int, TopKMemory] = {}
        self._peer_stats: dict = {}

    # ---- 1. downlink ------------------------------------------------------------
    def downlink(self, r, selected):
        fed = self.fed
        with fed.timer("messaging"):
            ctrl = wire.encode_control(
                round=r,
                probe_seed=fed.probe_seed,
                num_probes=fed.cfg.protocol.probes_per_round,
                sender=wire.SERVER,
            )
            top = None
            if self.previous is not None:
                top = wire.encode_soft_topk(
                    *self.previous, fed.num_classes, dtype=VALUE_DTYPE, round=r, sender=wire.SERVER
                )
        out = []
        for p in selected:
            out.append(Envelope(SERVER, p, ctrl, wire.MessageKind.CONTROL))
            if top is not None:
                out.append(Envelope(SERVER, p, top, TOPK))
        return out

    # ---- 2. peers -------------------------------------------------------------------
    def peer_update(self, r, selected, inbox):
        fed = self.fed
        targets = {}
        held, correct = 0, 0
        pool_size = len(fed.data.y_probe)
        for p in selected:
            if p not in self.memory:
                proto = fed.cfg.protocol  # softlabel's memory rule (--softlabel-memory)
                self.memory[p] = TopKMemory(
                    pool_size,
                    fed.data.position_shape,
                    self.k,
                    fed.num_classes,
                    proto.memory_max_age if proto.softlabel_memory else 1,
                )
            memory = self.memory[p]
            if len(inbox[p]) == 2:  # from round 1 on: control + top-k soft labels
                ctrl, top = inbox[p]
                where = fed.probe_indices(r - 1, ctrl.probe_seed)
                real = fed.data.probe_mask(where)
                memory.update(where, top.indices, top.values.float(), real, r - 1)
            idx = memory.held()
            # Peers that received the same messages hold the same targets.
            targets[p] = (fed.data.x_probe, memory.targets, idx, memory.stamp.numpy().tobytes())
            truth = fed.data.y_probe[idx]
            held += int((truth >= 0).sum())
            correct += int((memory.top1(idx) == truth).sum())
        positions = int((fed.data.y_probe >= 0).sum())  # the pool's real positions
        self._peer_stats = {
            "memory_fraction": held / (len(selected) * positions) if selected else None,
            "memory_acc": correct / held if held else None,
        }
        fed.learn(r, selected, targets, topk_label_loss(fed.cfg.train.temperature, fed.num_classes))

    def uplink(self, r, selected):
        fed = self.fed
        t = fed.cfg.train.temperature

        def top_k(p, logits):  # reduced while the logits are still in cache
            probs = torch.softmax(logits.float() / t, dim=-1)
            if fed.adversarial[p]:
                probs = corrupt_probs(
                    probs, fed.cfg.protocol.adversarial_mode, fed.adversary_generator(r, p)
                )
            values, indices = probs.topk(self.k, dim=-1)
            return indices, values

        out = []
        for p, (indices, values) in zip(selected, fed.consume_probe_logits(r, selected, top_k)):
            with fed.timer("messaging"):
                msg = wire.encode_soft_topk(
                    indices, values, fed.num_classes, dtype=VALUE_DTYPE, round=r, sender=p
                )
            out.append(Envelope(p, SERVER, msg, TOPK))
        return out

    # ---- 3. server ------------------------------------------------------------------
    def aggregate(self, r, selected, received):
        fed = self.fed
        indices = torch.stack([msg.indices for _, msg in received])
        values = torch.stack([msg.values.float() for _, msg in received])
        self.previous = average_topk(
            indices, values, fed.num_classes, self.k, fed.cfg.protocol.sharpen_temperature
        )
        consensus = self.previous[0][..., 0]  # topk is sorted: the first is the largest
        truth = fed.data.y_probe[fed.probe_indices(r)]
        real = truth >= 0  # sequence tasks: padding is no position
        peer_top1 = indices.gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1)
        return RoundStats(
            consensus_acc=labels_accuracy(consensus, truth, real),
            agreement=share_agreeing(peer_top1, consensus, real),
            **self._peer_stats,
        )

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self):
        previous = None if self.previous is None else [t.clone() for t in self.previous]
        return {
            "previous": previous,
            "memory": {int(p): m.state_dict() for p, m in self.memory.items()},
        }

    def peer_state(self, peer):
        memory = self.memory.get(peer)
        return {"memory": None if memory is None else memory.state_dict()}

    def load_peer_state(self, peer, state):
        self.memory.pop(peer, None)
        if state["memory"] is not None:
            self.memory[peer] = TopKMemory.from_state(state["memory"])

    def load_state_dict(self, state):
        self.previous = (
            None if state["previous"] is None else tuple(t.clone() for t in state["previous"])
        )
        self.memory = {int(p): TopKMemory.from_state(m) for p, m in state["memory"].items()}


def complete(values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The probability of each class outside a top-k message's k classes: the
    mass the message leaves out, spread evenly over the other C - k classes
    (0 when k = C). values [..., k] -> [...]."""
    k = values.shape[-1]
    if num_classes <= k:
        return values.new_zeros(values.shape[:-1])
    return (1.0 - values.sum(-1)).clamp(min=0.0) / (num_classes - k)


def average_topk(
    indices: torch.Tensor,
    values: torch.Tensor,
    num_classes: int,
    k: int,
    sharpen_temperature: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top k of the mean over peers of their completed distributions.

    indices [P, *positions, k'] (int64), values [P, *positions, k'] (float):
    each peer's message; returns (indices, values) [*positions, k], values
    float16 as sent, sorted by value, largest first. With
    ``sharpen_temperature`` the mean is sharpened (softmax(mean / T), DS-FL)
    before its top k is taken. The dense mean is built ``_AVERAGE_ENTRIES``
    entries at a time, so memory stays bounded at any C."""
    peers, positions = indices.shape[0], indices.shape[1:-1]
    flat_i = indices.reshape(peers, -1, indices.shape[-1])
    flat_v = values.float().reshape(peers, -1, values.shape[-1])
    spread = complete(flat_v, num_classes)  # [P, M]
    rows = flat_i.shape[1]
    step = max(1, _AVERAGE_ENTRIES // num_classes)
    out_i, out_v = [], []
    for m0 in range(0, rows, step):
        part = slice(m0, m0 + step)
        base = spread[:, part].mean(0)
        dense = base.unsqueeze(-1).repeat(1, num_classes)
        for p in range(peers):  # peer order: the float sums do not depend on threads
            excess = (flat_v[p, part] - spread[p, part].unsqueeze(-1)) / peers
            dense.scatter_add_(1, flat_i[p, part], excess)
        if sharpen_temperature is not None:
            dense = sharpen(dense, sharpen_temperature)
        top_v, top_i = dense.topk(k, dim=-1)
        out_i.append(top_i)
        out_v.append(top_v.to(VALUE_DTYPE))
    shape = (*positions, k)
    if not out_i:
        return (torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=VALUE_DTYPE))
    return torch.cat(out_i).reshape(shape), torch.cat(out_v).reshape(shape)


class TopKMemory:
    """The latest top-k target a peer received for each probe of the pool, as
    one float tensor ``targets`` [pool, *positions, 2k + 1] (k class indices,
    k probabilities, a weight: 0 at padding) that the distillation loss reads
    directly; replaced when a newer one arrives, expired ``max_age`` rounds
    after it arrived (0 = never). Class indices are exact in float32 up to
    2**24 classes, float64 beyond."""

    def __init__(
        self,
        pool_size: int,
        position_shape: Sequence[int],
        k: int,
        num_classes: int,
        max_age: int = 0,
    ):
        dtype = torch.float32 if num_classes <= 1 << 24 else torch.float64
        self.targets = torch.zeros(pool_size, *position_shape, 2 * k + 1, dtype=dtype)
        self.stamp = torch.full((pool_size,), -1, dtype=torch.int64)
        self.k = k
        self.max_age = int(max_age)

    def update(
        self,
        probe_indices: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        real: Optional[torch.Tensor],
        round: int,
    ) -> None:
        """Store the targets of ``probe_indices``; ``real`` (bool of the probes'
        positions, or None) marks the positions that are not padding."""
        k = self.k
        if indices.shape[-1] != k:
            raise wire.WireFormatError(f"top-k message has k = {indices.shape[-1]}, expected {k}")
        weight = torch.ones(indices.shape[:-1]) if real is None else real.float()
        rows = torch.cat(
            [
                indices.to(self.targets.dtype),
                values.to(self.targets.dtype),
                weight.unsqueeze(-1).to(self.targets.dtype),
            ],
            dim=-1,
        )
        self.targets[probe_indices] = rows
        self.stamp[probe_indices] = round
        if self.max_age:
            old = (self.stamp >= 0) & (round - self.stamp >= self.max_age)
            self.stamp[old] = -1

    def held(self) -> torch.Tensor:
        return torch.nonzero(self.stamp >= 0).flatten()

    def top1(self, probe_indices: torch.Tensor) -> torch.Tensor:
        """The most probable class of every position of these probes (-1 at padding)."""
        rows = self.targets[probe_indices]
        k = self.k
        best = rows[..., k : 2 * k].argmax(-1, keepdim=True)
        label = rows[..., :k].gather(-1, best).squeeze(-1).long()
        return label.masked_fill(rows[..., 2 * k] == 0, -1)

    def state_dict(self) -> dict:
        return {
            "targets": self.targets.clone(),
            "stamp": self.stamp.clone(),
            "k": self.k,
            "max_age": self.max_age,
        }

    @classmethod
    def from_state(cls, state: dict) -> "TopKMemory":
        m = cls(0, (), int(state["k"]), 2, int(state["max_age"]))
        m.targets, m.stamp = state["targets"].clone(), state["stamp"].clone()
        return m
