"""``tallytrain``: hard-label federated distillation with packed votes.

Round r (server mode):
1. the server sends each selected peer a CONTROL message: round, the session's
   probe seed, the probes per round, and round r-1's CONSENSUS message
   embedded (packed labels, plus a packed keep mask when agreement filtering
   is on);
2. each peer adds that consensus to its memory (the latest kept label of
   every probe of the pool it has heard of; a label a later consensus drops
   is forgotten, and labels older than ``memory_max_age`` rounds expire),
   distills on everything it holds while it trains on its shard, predicts
   round r's probes and sends ``pack_argmax`` of its logits as a VOTES
   message. Symbol C = abstain: where its top-1 probability is below
   ``abstain_below``, or where its own shard does not back the vote: it holds
   fewer than ``support_min`` samples of the class, or none of them near
   the probe (``support_radius``; fl/support.py; zero bytes);
3. the server tallies the votes, each peer weighted by its reputation (how
   often its votes agreed with past kept consensus, corrected for chance;
   zero bytes) and forms the consensus (a probe is kept when its winner's
   share count/total reaches ``agreement_threshold`` and its winner has at
   least ``min_votes`` votes, a vote counting as its peer's reputation).

Decentralized mode: no server and no control messages (the probe seed is
agreed at setup); every peer sends its VOTES to every other peer, and each
peer tallies its own copy of all votes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import ClassVar, Dict, Optional, Tuple

import torch

from ... import wire
from ...comm import SERVER, Envelope
from ...consensus import Consensus, tally
from ...memory import ConsensusMemory
from ...votes import Votes, vote
from ..adversary import corrupt_labels
from ..aggregate import labels_accuracy, mean_agreement
from ..peer import hard_label_loss
from ..support import LocalSupport
from .base import Method, RoundStats, bytes_to_tensor, register, tensor_to_bytes

# Reputation weights are integers in 0..REPUTATION_SCALE (ops.tally sums
# integer weights exactly).
REPUTATION_SCALE = 16
# The least skill the most reputable peer is credited with (see
# reputation_weights); above the default quorum (0.25), so that peer can
# decide a probe alone.
TRUST_FLOOR = 0.5


def quorum_weight(proto) -> int:
    """``min_votes`` in tally weight: a fully trusted peer's vote weighs
    REPUTATION_SCALE (1 without reputation), and the tally's quorum is an
    integer weight of at least 1."""
    unit = REPUTATION_SCALE if proto.reputation else 1
    return max(1, math.ceil(proto.min_votes * unit))


@register
class TallyTrain(Method):
    name = "tallytrain"
    peer_state_keys: ClassVar[Tuple[str, ...]] = ("memory", "voters")

    def __init__(self, fed):
        super().__init__(fed)
        proto = fed.cfg.protocol
        self.num_classes = fed.num_classes
        self.support_filter = proto.support_min > 0 or proto.support_radius is not None
        # Sequence tasks: padding abstains (a mask), so every vote stream can.
        self.abstain = proto.abstain_below is not None or self.support_filter or fed.data.sequence
        # Peer side, local knowledge only: what each peer's shard backs.
        self.support = {}
        if self.support_filter:
            data = fed.data
            for p in fed.peers:  # held peers: only their own shards are here
                idx = fed.shard_pools[p]
                self.support[p] = LocalSupport(
                    data.x_train[idx],
                    data.y_train[idx],
                    fed.num_classes,
                    proto.support_min,
                    proto.support_radius,
                )
        self.pool_size = len(fed.data.y_probe)
        # Votes from models trained on their own shard only are independent
        # evidence; votes from models distilled on the consensus repeat it.
        self.voters = fed.new_population() if proto.votes_from != "distilled" else None
        self.memory: Dict[int, ConsensusMemory] = {}
        # Server side: each peer's kept-consensus votes and how many agreed.
        self.votes_judged = torch.zeros(fed.cfg.peers, dtype=torch.float64)
        self.votes_agreed = torch.zeros(fed.cfg.peers, dtype=torch.float64)
        self.previous = None  # server mode: round r-1's encoded CONSENSUS
        self.own: Dict[int, Consensus] = {}  # decentralized: each peer's own tally
        self._votes: Dict[int, Votes] = {}  # this round's votes per peer
        self._peer_stats: Dict[str, Optional[float]] = {}

    def memory_of(self, peer: int) -> ConsensusMemory:
        if peer not in self.memory:
            max_age = self.fed.cfg.protocol.memory_max_age or None
            self.memory[peer] = ConsensusMemory(
                self.pool_size, max_age=max_age, position_shape=self.fed.data.position_shape
            )
        return self.memory[peer]

    # ---- 1. downlink --------------------------------------------------------
    def downlink(self, r, selected):
        if self.fed.cfg.protocol.decentralized:
            return []
        with self.fed.timer("messaging"):
            ctrl = wire.encode_control(
                round=r,
                probe_seed=self.fed.probe_seed,
                num_probes=self.fed.cfg.protocol.probes_per_round,
                consensus=self.previous,
                sender=wire.SERVER,
            )
        return [Envelope(SERVER, p, ctrl, wire.MessageKind.CONTROL) for p in selected]

    # ---- 2. peers -------------------------------------------------------------
    def received_consensus(self, r: int, peer: int, inbox: Dict[int, list]):
        """(consensus of round r-1, its probe seed) as peer received it, or None."""
        fed = self.fed
        if fed.cfg.protocol.decentralized:
            return (self.own[peer], fed.probe_seed) if peer in self.own else None
        ctrl = inbox[peer][0]
        cons = ctrl.consensus  # decoded on delivery, with the control message
        if cons is None:
            return None
        if cons.round != r - 1:
            raise wire.WireFormatError(
                f"embedded consensus is for round {cons.round}, expected {r - 1}"
            )
        keep = cons.keep if cons.keep is not None else cons.labels >= 0
        return SimpleNamespace(labels=cons.labels, keep=keep), ctrl.probe_seed

    def peer_update(self, r, selected, inbox):
        fed = self.fed
        targets = {}
        held, correct = 0, 0
        for p in selected:
            memory = self.memory_of(p)
            got = self.received_consensus(r, p, inbox)
            if got is not None:
                cons, probe_seed = got
                memory.update(fed.probe_indices(r - 1, probe_seed), cons, r - 1)
            idx, labels = memory.labels()
            # -1: no target (a position without a label, or padding)
            y = torch.full(fed.data.y_probe.shape, -1, dtype=torch.int64)
            y[idx] = labels
            targets[p] = (fed.data.x_probe, y, idx)
            held += int((labels >= 0).sum())
            correct += int(((labels == fed.data.y_probe[idx]) & (labels >= 0)).sum())
        positions = int((fed.data.y_probe >= 0).sum())  # the pool's real positions
        self._peer_stats = {
            "memory_fraction": held / (len(selected) * positions) if selected else None,
            "memory_acc": correct / held if held else None,
        }
        fed.learn(r, selected, targets, hard_label_loss)
        if self.voters is not None:
            fed.train_local(r, selected, population=self.voters)

    def uplink(self, r, selected):
        fed = self.fed
        proto = fed.cfg.protocol
        c = self.num_classes
        out = []
        self._votes = {}
        x_probe = fed.data.x_probe[fed.probe_indices(r)]
        mask = fed.data.probe_mask(fed.probe_indices(r))  # padding never votes

        def peer_vote(p, logits) -> Votes:  # packed while the logits are still in cache
            with fed.timer("ops"):
                if fed.adversarial[p]:
                    bad = corrupt_labels(
                        logits.argmax(-1), c, proto.adversarial_mode, fed.adversary_generator(r, p)
                    )
                    if mask is not None:
                        bad = bad.masked_fill(~mask, -1)
                    return Votes.from_labels(bad, c, abstain=self.abstain)
                votes = vote(logits, abstain_below=proto.abstain_below, mask=mask)
                if not self.support_filter:
                    return votes
                labels = votes.labels()
                with fed.timer("support"):
                    backed = self.support[p].backed(x_probe, labels)
                return Votes.from_labels(labels.masked_fill(~backed, -1), c, abstain=True)

        cast = fed.consume_probe_logits(r, selected, peer_vote, self.voters)
        if proto.votes_from == "local-first":
            # Where its local-only model abstains, a peer votes with its
            # distilled model (still only where its shard backs the vote).
            fallback = fed.consume_probe_logits(r, selected, peer_vote)
            cast = [
                v
                if fed.adversarial[p]
                else Votes.from_labels(
                    torch.where(v.labels() >= 0, v.labels(), f.labels()), c, abstain=self.abstain
                )
                for p, v, f in zip(selected, cast, fallback)
            ]
        for p, votes in zip(selected, cast):
            self._votes[p] = votes
            with fed.timer("messaging"):
                msg = votes.to_bytes(round=r, sender=p)
            if proto.decentralized:
                out += [Envelope(p, q, msg, wire.MessageKind.VOTES) for q in selected if q != p]
            else:
                out.append(Envelope(p, SERVER, msg, wire.MessageKind.VOTES))
        return out

    # ---- 3. tally -------------------------------------------------------------
    def reputation_weights(self, peers) -> Optional[torch.Tensor]:
        """Integer tally weights in 0..REPUTATION_SCALE: each peer's share of
        votes that agreed with kept consensus (Laplace-smoothed, so equal for
        everyone before any evidence), minus the share a random voter would
        reach (1/C), rescaled so that chance-level agreement weighs 0.

        Reputation ranks peers; it must not silence the whole federation.
        When even the best peer's skill (over every peer's record) is below
        TRUST_FLOOR, all skills are scaled up so that the best is exactly
        TRUST_FLOOR (everyone at TRUST_FLOOR when nobody beats chance): at
        a hard start all records are low, and absolute weights below the
        quorum would keep every probe out of the consensus, so no record
        could ever rise again. At or above the floor nothing is rescaled."""
        if not self.fed.cfg.protocol.reputation:
            return None
        share = (self.votes_agreed + 1) / (self.votes_judged + 2)
        chance = 1.0 / self.num_classes
        skill = ((share - chance) / (1 - chance)).clamp(min=0)
        best = float(skill.max())
        if best == 0:
            skill = torch.full_like(skill, TRUST_FLOOR)
        elif best < TRUST_FLOOR:
            skill = skill * (TRUST_FLOOR / best)
        idx = torch.as_tensor(list(peers))
        return torch.round(skill[idx] * REPUTATION_SCALE).to(torch.int64)

    def _tally(
        self, votes: Dict[int, Votes], weights: Optional[Dict[int, int]] = None
    ) -> Consensus:
        """Tally votes (peer -> Votes) in peer order; form the consensus.
        ``weights`` (peer -> weight) overrides the current reputations."""
        peers = sorted(votes)
        proto = self.fed.cfg.protocol
        if weights is None:
            w = self.reputation_weights(peers)
        else:
            w = torch.as_tensor([weights[p] for p in peers], dtype=torch.int64)
        with self.fed.timer("ops"):
            return tally(
                [votes[p] for p in peers],
                weights=w,
                agreement=proto.agreement_threshold,
                min_votes=quorum_weight(proto),
            )

    def _judge(self, votes: Dict[int, Votes], real: torch.Tensor) -> float:
        """Add to each peer's record how its votes agreed with the kept
        consensus of the other peers (leave-one-out: a vote that decided a
        probe alone would otherwise agree with itself); returns the share of
        votes that abstained over the ``real`` positions (padding is not a
        choice to abstain)."""
        abstained, cast = 0, 0
        # Every peer is judged against the weights the round began with, so
        # that the order of judging does not matter.
        before = self.reputation_weights(sorted(votes))
        weights = None if before is None else dict(zip(sorted(votes), before.tolist()))
        for p, v in votes.items():
            labels = v.labels()
            voted = labels >= 0
            abstained += int((~voted & real).sum())
            cast += int(real.sum())
            if not self.fed.cfg.protocol.reputation:
                continue
            others = {q: w for q, w in votes.items() if q != p}
            if not others:
                continue
            c = self._tally(others, weights)
            judged = voted & c.keep
            self.votes_judged[p] += int(judged.sum())
            self.votes_agreed[p] += int((judged & (labels == c.labels)).sum())
        return abstained / cast if cast else 0.0

    def aggregate(self, r, selected, received):
        fed = self.fed
        truth = fed.data.y_probe[fed.probe_indices(r)]
        if fed.cfg.protocol.decentralized:
            heard: Dict[int, Dict[int, Votes]] = {q: {q: self._votes[q]} for q in selected}
            for env, msg in received:
                heard[env.receiver][env.sender] = received_votes(msg)
            # Every peer tallies the same votes with the same record (kept
            # from the same votes), so one record serves them all.
            results = {q: self._tally(votes) for q, votes in heard.items()}
            self.own = dict(results)
            c = results[selected[0]]
            votes = heard[selected[0]]
        else:
            votes = {env.sender: received_votes(msg) for env, msg in received}
            c = self._tally(votes)
            proto = fed.cfg.protocol
            filtering = proto.agreement_threshold > 0 or quorum_weight(proto) > 1
            keep = c.keep if filtering else None
            with fed.timer("messaging"):
                self.previous = wire.encode_consensus(
                    c.labels, self.num_classes, keep=keep, round=r, sender=wire.SERVER
                )
        real = truth >= 0  # sequence tasks: padding is no position
        with fed.timer("aggregation"):
            abstained = self._judge(votes, real)
        kept = c.labels[c.keep]
        return RoundStats(
            consensus_acc=labels_accuracy(c.labels, truth, c.keep),
            agreement=mean_agreement(c),
            kept_fraction=float(c.keep[real].float().mean()),
            classes_covered=len(torch.unique(kept)) / self.num_classes,
            abstained=abstained,
            **self._peer_stats,
        )

    # ---- checkpoints ----------------------------------------------------------
    def state_dict(self):
        return {
            "previous": bytes_to_tensor(self.previous),
            "own": {int(p): [c.labels.clone(), c.keep.clone()] for p, c in self.own.items()},
            "memory": {int(p): m.state_dict() for p, m in self.memory.items()},
            "voters": self.voters.state_dict() if self.voters is not None else [],
            "votes_judged": self.votes_judged.clone(),
            "votes_agreed": self.votes_agreed.clone(),
        }

    def peer_state(self, peer):
        memory = self.memory.get(peer)
        return {
            "memory": None if memory is None else memory.state_dict(),
            "voters": None if self.voters is None else self.voters.peer_params(peer),
        }

    def load_peer_state(self, peer, state):
        self.memory.pop(peer, None)
        if state["memory"] is not None:
            self.memory_of(peer).load_state_dict(state["memory"])
        if self.voters is not None:
            self.voters.load_peer_params(peer, state["voters"])

    def load_state_dict(self, state):
        self.previous = tensor_to_bytes(state["previous"])
        self.own = {
            int(p): SimpleNamespace(labels=lab, keep=keep)
            for p, (lab, keep) in state["own"].items()
        }
        self.memory = {}
        for p, m in state["memory"].items():
            self.memory_of(int(p)).load_state_dict(m)
        if self.voters is not None:
            self.voters.load_state_dict(state["voters"])
        self.votes_judged = state["votes_judged"].clone()
        self.votes_agreed = state["votes_agreed"].clone()


def received_votes(msg: wire.Message) -> Votes:
    """A decoded VOTES message as the Votes it carries."""
    if msg.packed is None or msg.shape is None or msg.num_classes is None or msg.abstain is None:
        raise wire.WireFormatError(f"a {msg.kind.name} message carries no votes")
    return Votes(msg.packed, msg.shape, msg.num_classes, msg.abstain)
