"""``softlabel``: peers send softmax vectors on the probes (float32 or float16),
the server averages them (optionally sharpened as in DS-FL), and next round
peers distill on the average with KL at temperature T.

Messages mirror tallytrain's: the server opens round r with a CONTROL message
(round, probe seed, probes per round) and, from round 1 on, a SOFT_LABELS
message holding round r-1's averaged labels (a control message can embed only
a hard-label consensus, so the soft labels travel as their own message).

Peers distill with tallytrain's schedule (loop.Federation.learn). With
``softlabel_memory`` each peer also keeps, like tallytrain's peers, the
latest soft label it received for every probe of the pool (expiring after
``memory_max_age`` rounds) and distills on all of them; off by default,
because it measured slower: soft labels made by earlier, weaker models are
flatter and keep pulling peers back (docs/results.md)."""

from __future__ import annotations

from typing import Dict

import torch

from ... import wire
from ...comm import SERVER, Envelope
from ..adversary import corrupt_probs
from ..aggregate import average_probs, labels_accuracy, share_agreeing, sharpen
from ..peer import soft_label_loss
from .base import Method, RoundStats, register


@register
class SoftLabel(Method):
    name = "softlabel"
    peer_state_keys = ("memory",)

    def __init__(self, fed):
        super().__init__(fed)
        self.dtype = getattr(torch, fed.cfg.protocol.softlabel_dtype)
        self.previous = None  # float32 [N, C]: the last round's aggregated labels
        self.memory: Dict[int, SoftLabelMemory] = {}
        self._peer_stats: dict = {}

    def downlink(self, r, selected):
        with self.fed.timer("messaging"):
            ctrl = wire.encode_control(
                round=r,
                probe_seed=self.fed.probe_seed,
                num_probes=self.fed.cfg.protocol.probes_per_round,
                sender=wire.SERVER,
            )
            soft = None
            if self.previous is not None:
                soft = wire.encode_soft_labels(
                    self.previous, dtype=self.dtype, round=r, sender=wire.SERVER
                )
        out = []
        for p in selected:
            out.append(Envelope(SERVER, p, ctrl, wire.MessageKind.CONTROL))
            if soft is not None:
                out.append(Envelope(SERVER, p, soft, wire.MessageKind.SOFT_LABELS))
        return out

    def peer_update(self, r, selected, inbox):
        fed = self.fed
        targets = {}
        held, correct = 0, 0
        pool_size = len(fed.data.y_probe)
        for p in selected:
            if p not in self.memory:
                proto = fed.cfg.protocol
                self.memory[p] = SoftLabelMemory(
                    pool_size,
                    fed.num_classes,
                    proto.memory_max_age if proto.softlabel_memory else 1,
                    fed.data.position_shape,
                )
            memory = self.memory[p]
            if len(inbox[p]) == 2:  # from round 1 on: control + soft labels
                ctrl, soft = inbox[p]
                where = fed.probe_indices(r - 1, ctrl.probe_seed)
                probs = soft.probs.float()
                mask = fed.data.probe_mask(where)
                if mask is not None:  # an all-zero target: padding is never distilled on
                    probs = probs * mask.unsqueeze(-1)
                memory.update(where, probs, r - 1)
            idx = memory.held()
            # Peers that received the same messages hold the same labels:
            # their stamps say so without comparing N x C floats.
            targets[p] = (fed.data.x_probe, memory.probs, idx, memory.stamp.numpy().tobytes())
            truth = fed.data.y_probe[idx]
            held += int((truth >= 0).sum())
            correct += int((memory.probs[idx].argmax(-1) == truth).sum())
        positions = int((fed.data.y_probe >= 0).sum())  # the pool's real positions
        self._peer_stats = {
            "memory_fraction": held / (len(selected) * positions) if selected else None,
            "memory_acc": correct / held if held else None,
        }
        fed.learn(r, selected, targets, soft_label_loss(fed.cfg.train.temperature))

    def uplink(self, r, selected):
        fed = self.fed
        t = fed.cfg.train.temperature
        probs = fed.consume_probe_logits(
            r, selected, lambda p, logits: torch.softmax(logits / t, dim=-1)
        )
        out = []
        for i, p in enumerate(selected):
            payload = probs[i]
            if fed.adversarial[p]:
                payload = corrupt_probs(
                    payload, fed.cfg.protocol.adversarial_mode, fed.adversary_generator(r, p)
                )
            with fed.timer("messaging"):
                msg = wire.encode_soft_labels(payload, dtype=self.dtype, round=r, sender=p)
            out.append(Envelope(p, SERVER, msg, wire.MessageKind.SOFT_LABELS))
        return out

    def aggregate(self, r, selected, received):
        fed = self.fed
        probs = torch.stack([msg.probs.float() for _, msg in received])
        avg = average_probs(probs)
        if fed.cfg.protocol.sharpen_temperature is not None:
            avg = sharpen(avg, fed.cfg.protocol.sharpen_temperature)
        self.previous = avg
        consensus = avg.argmax(-1)
        truth = fed.data.y_probe[fed.probe_indices(r)]
        real = truth >= 0  # sequence tasks: padding is no position
        return RoundStats(
            consensus_acc=labels_accuracy(consensus, truth, real),
            agreement=share_agreeing(probs.argmax(-1), consensus, real),
            **self._peer_stats,
        )

    def state_dict(self):
        return {
            "previous": self.previous,
            "memory": {int(p): m.state_dict() for p, m in self.memory.items()},
        }

    def peer_state(self, peer):
        memory = self.memory.get(peer)
        return {"memory": None if memory is None else memory.state_dict()}

    def load_peer_state(self, peer, state):
        self.memory.pop(peer, None)
        if state["memory"] is not None:
            self.memory[peer] = SoftLabelMemory.from_state(state["memory"])

    def load_state_dict(self, state):
        self.previous = state["previous"]
        self.memory = {}
        for p, m in state["memory"].items():
            self.memory[int(p)] = SoftLabelMemory.from_state(m)


class SoftLabelMemory:
    """The latest soft label a peer received for each probe of the pool:
    replaced when a newer one arrives, expired ``max_age`` rounds after it
    arrived (0 = never)."""

    def __init__(
        self, pool_size: int, num_classes: int, max_age: int = 0, position_shape: tuple = ()
    ):
        self.probs = torch.zeros(pool_size, *position_shape, num_classes)
        self.stamp = torch.full((pool_size,), -1, dtype=torch.int64)
        self.max_age = int(max_age)

    def update(self, probe_indices: torch.Tensor, probs: torch.Tensor, round: int) -> None:
        self.probs[probe_indices] = probs
        self.stamp[probe_indices] = round
        if self.max_age:
            old = (self.stamp >= 0) & (round - self.stamp >= self.max_age)
            self.stamp[old] = -1

    def held(self) -> torch.Tensor:
        return torch.nonzero(self.stamp >= 0).flatten()

    def state_dict(self) -> dict:
        return {"probs": self.probs.clone(), "stamp": self.stamp.clone(), "max_age": self.max_age}

    @classmethod
    def from_state(cls, state: dict) -> "SoftLabelMemory":
        m = cls(0, 0, int(state["max_age"]))
        m.probs, m.stamp = state["probs"].clone(), state["stamp"].clone()
        return m
