"""``tallytrain``: hard-label federated distillation with packed votes.

Round r (server mode):
1. the server sends each selected peer a CONTROL message: round, the session's
   probe seed, the probes per round, and round r-1's CONSENSUS message
   embedded (packed labels, plus a packed keep mask when agreement filtering
   is on);
2. each peer distills on that consensus (cross-entropy on the kept probes of
   round r-1), trains on its shard, predicts round r's probes and sends
   ``pack_argmax`` of its logits as a VOTES message (symbol C = abstain when
   its top-1 probability is below ``abstain_below``);
3. the server tallies the votes and forms the consensus (a probe is kept when
   its winner's share count/total reaches ``agreement_threshold`` and its
   winner has at least ``min_votes`` votes).

Decentralized mode: no server and no control messages (the probe seed is
agreed at setup); every peer sends its VOTES to every other peer, and each
peer tallies its own copy of all votes.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ... import ops, wire
from ...comm import SERVER, Envelope
from ..adversary import corrupt_labels
from ..aggregate import Consensus, consensus, labels_accuracy, mean_agreement
from ..peer import hard_label_loss
from ..registry import register
from .base import Method, RoundStats, bytes_to_tensor, tensor_to_bytes


@register
class TallyTrain(Method):
    name = "tallytrain"

    def __init__(self, fed):
        super().__init__(fed)
        proto = fed.cfg.protocol
        self.abstain = proto.abstain_below is not None
        self.num_classes = fed.num_classes
        self.previous = None        # server mode: round r-1's encoded CONSENSUS
        self.own: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # decentralized
        self._votes: Dict[int, torch.Tensor] = {}  # this round's packed votes per peer

    # ---- 1. downlink --------------------------------------------------------
    def downlink(self, r, selected):
        if self.fed.cfg.protocol.decentralized:
            return []
        with self.fed.timer("messaging"):
            ctrl = wire.encode_control(round=r, probe_seed=self.fed.probe_seed,
                                       num_probes=self.fed.cfg.protocol.probes_per_round,
                                       consensus=self.previous, sender=wire.SERVER)
        return [Envelope(SERVER, p, ctrl, wire.MessageKind.CONTROL) for p in selected]

    # ---- 2. peers -------------------------------------------------------------
    def peer_update(self, r, selected, inbox):
        fed = self.fed
        targets = {}
        for p in selected:
            if fed.cfg.protocol.decentralized:
                if p not in self.own:
                    continue
                labels, keep = self.own[p]
                probe_seed = fed.probe_seed
            else:
                ctrl = inbox[p][0]
                cons = ctrl.consensus  # decoded on delivery, with the control message
                if cons is None:
                    continue
                if cons.round != r - 1:
                    raise wire.WireFormatError(
                        f"embedded consensus is for round {cons.round}, expected {r - 1}")
                labels = cons.labels
                keep = cons.keep if cons.keep is not None else torch.ones_like(labels, dtype=torch.bool)
                probe_seed = ctrl.probe_seed
            x = fed.data.x_probe[fed.probe_indices(r - 1, probe_seed)]
            pool = torch.nonzero(keep & (labels >= 0)).flatten()
            targets[p] = (x, labels.clamp(min=0), pool)
        fed.learn(r, selected, targets, hard_label_loss)

    def uplink(self, r, selected):
        fed = self.fed
        proto = fed.cfg.protocol
        n = proto.probes_per_round
        out = []
        self._votes = {}

        def vote(p, logits):  # each peer's logits are packed while still in cache
            with fed.timer("ops"):
                if fed.adversarial[p]:
                    bad = corrupt_labels(logits.argmax(-1), self.num_classes,
                                         proto.adversarial_mode, fed.adversary_generator(r, p))
                    return ops.pack_labels(bad, self.num_classes + int(self.abstain))
                return ops.pack_argmax(logits, abstain_below=proto.abstain_below)

        packed_votes = fed.consume_probe_logits(r, selected, vote)
        for p, packed in zip(selected, packed_votes):
            self._votes[p] = packed
            with fed.timer("messaging"):
                msg = wire.encode_votes(packed, n, self.num_classes, abstain=self.abstain,
                                        round=r, sender=p)
            if proto.decentralized:
                out += [Envelope(p, q, msg, wire.MessageKind.VOTES) for q in selected if q != p]
            else:
                out.append(Envelope(p, SERVER, msg, wire.MessageKind.VOTES))
        return out

    # ---- 3. tally -------------------------------------------------------------
    def _tally(self, votes: Dict[int, torch.Tensor], n: int) -> Consensus:
        """Tally votes (peer -> packed stream) in peer order; form the consensus."""
        with self.fed.timer("ops"):
            stacked = torch.stack([votes[p] for p in sorted(votes)])
            t = ops.tally(stacked, n, self.num_classes, abstain=self.abstain)
        proto = self.fed.cfg.protocol
        return consensus(t.label, t.count, t.total, proto.agreement_threshold, proto.min_votes)

    def aggregate(self, r, selected, received):
        fed = self.fed
        n = fed.cfg.protocol.probes_per_round
        truth = fed.data.y_probe[fed.probe_indices(r)]
        if fed.cfg.protocol.decentralized:
            heard: Dict[int, Dict[int, torch.Tensor]] = {q: {q: self._votes[q]} for q in selected}
            for env, msg in received:
                heard[env.receiver][env.sender] = msg.packed
            results = {q: self._tally(votes, n) for q, votes in heard.items()}
            self.own = {q: (c.labels, c.keep) for q, c in results.items()}
            c = results[selected[0]]  # every peer tallied the same votes
        else:
            c = self._tally({env.sender: msg.packed for env, msg in received}, n)
            filtering = fed.cfg.protocol.agreement_threshold > 0 or fed.cfg.protocol.min_votes > 1
            keep = c.keep if filtering else None
            with fed.timer("messaging"):
                self.previous = wire.encode_consensus(c.labels, self.num_classes, keep=keep,
                                                      round=r, sender=wire.SERVER)
        return RoundStats(consensus_acc=labels_accuracy(c.labels, truth, c.keep),
                          agreement=mean_agreement(c),
                          kept_fraction=float(c.keep.float().mean()))

    # ---- checkpoints ----------------------------------------------------------
    def state_dict(self):
        return {"previous": bytes_to_tensor(self.previous),
                "own": {int(p): [lab.clone(), keep.clone()] for p, (lab, keep) in self.own.items()}}

    def load_state_dict(self, state):
        self.previous = tensor_to_bytes(state["previous"])
        self.own = {int(p): (lab, keep) for p, (lab, keep) in state["own"].items()}

