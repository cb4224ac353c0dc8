"""The round loop, written once for every method, and the federation state it
runs on (config, data, peers, ledger, timers, per-round randomness).

A run is a :class:`Federation`; :meth:`Federation.run_round` is the one loop
body: select peers -> downlink -> peer update -> uplink -> aggregate ->
reply -> evaluate. Everything random is derived from (seed, purpose, round, peer), so
the state after round r is just the parameters, the method's state, the
ledger and the metrics: that is what a checkpoint holds, and a resumed run
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..comm import Channel, Envelope, Ledger
from ..data import FederatedData, probe_subset
from ..models import SEQUENCE_ARCHS, build_model
from ..streams import (
    ADVERSARY_STREAM,
    DISTILL_STREAM,
    INIT_STREAM,
    PROBE_STREAM,
    ROLE_STREAM,
    SELECT_STREAM,
    TRAIN_STREAM,
    seed_int,
)
from .config import RunConfig, config_diff
from .peer import LossFn, Objective, Population, hard_label_loss, rows_per_chunk
from .registry import get_method
from .server import select_peers

# "support" is the support-aware abstention's local check (fl/support.py): a
# protocol step that is not one of the ops, kept apart so that "ops" is the ops.
PHASES = (
    "local_training",
    "distillation",
    "joint_training",
    "inference",
    "ops",
    "support",
    "messaging",
    "aggregation",
    "evaluation",
    "checkpoint",
    "other",
)
CHECKPOINT_VERSION = 1


class PhaseTimer:
    """Wall time per phase, exclusive: time in a nested phase is not also
    counted in the enclosing one, so the phases add up to the total."""

    def __init__(self, seconds: Optional[Dict[str, float]] = None):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds.update(seconds or {})
        self._stack: List[str] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase not in self.seconds:
            raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
        start = time.perf_counter()
        self._stack.append(phase)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._stack.pop()
            self.seconds[phase] += elapsed
            if self._stack:
                self.seconds[self._stack[-1]] -= elapsed


def peer_archs(cfg: RunConfig) -> List[str]:
    """Each peer's architecture: ``model.archs`` dealt round-robin."""
    return [cfg.model.archs[i % len(cfg.model.archs)] for i in range(cfg.peers)]


def validate(cfg: RunConfig, data: FederatedData) -> None:
    """Refuse (ValueError) what :class:`Federation` would refuse for ``cfg``
    on ``data``, without building it: no parameters are initialised, so a
    caller can check every configuration before running any."""
    method_cls = get_method(cfg.method)
    if len(data.shards) != cfg.peers:
        raise ValueError(f"data has {len(data.shards)} shards for {cfg.peers} peers")
    if cfg.protocol.probes_per_round > len(data.y_probe):
        raise ValueError(
            f"probes_per_round ({cfg.protocol.probes_per_round}) exceeds the probe pool of "
            f"{len(data.y_probe)} samples; lower probes_per_round or raise probe_fraction"
        )
    archs = peer_archs(cfg)
    wrong = [a for a in dict.fromkeys(archs) if (a in SEQUENCE_ARCHS) != data.sequence]
    if wrong:
        raise ValueError(
            f"--archs {','.join(wrong)} does not fit dataset {cfg.data.dataset!r}: "
            + (
                f"its samples are token windows with a label per position; use --archs "
                f"{','.join(SEQUENCE_ARCHS)}"
                if data.sequence
                else f"arch {wrong[0]!r} needs token windows (a text dataset such as pytext)"
            )
        )
    if method_cls.averages_parameters and len(set(archs)) > 1:
        raise ValueError(
            f"method {cfg.method!r} averages parameters, so every peer needs the same "
            f"architecture; got archs {','.join(cfg.model.archs)}. Mixed architectures "
            f"work with the distillation methods (tallytrain, softlabel) and local"
        )
    method_cls.check(cfg)
    for arch in dict.fromkeys(archs):  # templates live on the meta device: no parameters
        build_model(arch, data.input_shape, data.num_classes, cfg.model.hidden)


class Federation:
    """One run (one method, one seed) and everything its rounds need.

    ``peers``: the peers this process holds (default: all of them, as the
    simulator does). A Flower node holds one, its own, and ``data`` then has
    only that peer's shard (the others empty); the Flower server holds none.
    Models, shards and the method's per-peer state exist only for held peers."""

    def __init__(self, cfg: RunConfig, data: FederatedData, peers: Optional[Sequence[int]] = None):
        validate(cfg, data)
        method_cls = get_method(cfg.method)
        self.cfg = cfg
        self.data = data
        p = cfg.peers
        self.peers = list(range(p)) if peers is None else sorted(set(int(q) for q in peers))
        outside = [q for q in self.peers if not 0 <= q < p]
        if outside:
            raise ValueError(f"peers {outside} are outside 0..{p - 1} (the run has {p} peers)")
        self.archs = peer_archs(cfg)
        self.num_classes = data.num_classes
        self.population = self.new_population()
        self.timer = PhaseTimer()
        self.ledger = Ledger()
        self.channel = Channel(self.ledger, self.timer)
        # The session's probe seed: the server announces it in every control
        # message; round r's probes are probe_subset(pool, N, probe_seed, r).
        self.probe_seed = seed_int(cfg.seed, PROBE_STREAM) & 0xFFFFFFFF
        roles = np.random.default_rng([cfg.seed, ROLE_STREAM]).permutation(p)
        n_adv = int(round(cfg.protocol.adversarial_fraction * p))
        n_under = min(int(round(cfg.train.undertrained_fraction * p)), p - n_adv)
        self.adversarial = np.zeros(p, bool)
        self.adversarial[roles[:n_adv]] = True
        self.undertrained = np.zeros(p, bool)
        self.undertrained[roles[n_adv : n_adv + n_under]] = True
        self.local_steps = [
            cfg.train.undertrained_steps if u else cfg.train.local_steps for u in self.undertrained
        ]
        # Only held peers' shards are used; the sizes of all are known to the
        # server (a Flower server learns them from the nodes when they connect).
        self.shard_pools = {
            q: torch.from_numpy(data.shards[q].astype(np.int64)) for q in self.peers
        }
        self.shard_sizes = [len(s) for s in data.shards]
        self.round = 0
        self.metrics: List[dict] = []
        self.method = method_cls(self)

    # ---- per-round randomness ---------------------------------------------
    def generator(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed_int(self.cfg.seed, *key))

    def probe_indices(self, r: int, probe_seed: Optional[int] = None) -> torch.Tensor:
        seed = self.probe_seed if probe_seed is None else probe_seed
        return torch.from_numpy(
            probe_subset(len(self.data.y_probe), self.cfg.protocol.probes_per_round, seed, r)
        )

    # ---- what peers do -----------------------------------------------------
    def _local_objective(self, peers: Sequence[int]) -> Objective:
        t = self.cfg.train
        return Objective(
            [self.shard_pools[p] for p in peers],
            self.data.x_train,
            self.data.y_train,
            t.batch_size,
            hard_label_loss,
        )

    def new_population(self) -> Population:
        """Every held peer's model as initialised at the start of the run."""
        return Population(
            self.archs,
            self.data.input_shape,
            self.data.num_classes,
            self.cfg.model.hidden,
            [self.generator(INIT_STREAM, i) for i in range(self.cfg.peers)],
            self.peers,
        )

    def train_local(
        self,
        r: int,
        peers: Sequence[int],
        prox_mu: float = 0.0,
        prox_ref: Optional[torch.Tensor] = None,
        population: Optional[Population] = None,
    ) -> None:
        """Each peer's minibatch steps on its own shard (hard labels), on its
        model in ``population`` (default: the peers' models)."""
        population = self.population if population is None else population
        with self.timer("local_training"):
            population.fit(
                peers,
                [self.local_steps[p] for p in peers],
                [self._local_objective(peers)],
                self.cfg.train.lr,
                [self.generator(TRAIN_STREAM, r, p) for p in peers],
                prox_mu,
                prox_ref,
                self.cfg.train.peer_batch,
            )

    def distill_batch(self, pool_size: int, steps: int) -> int:
        """The distillation batch for a pool of ``pool_size`` targets learnt
        in ``steps`` steps: large enough for ``train.distill_epochs`` passes
        over the pool in the round, within [distill_batch_size,
        distill_batch_max]. A fixed batch under-uses a large pool (each
        target seen a fraction of a time per round) and over-fits a small
        one; every distilling method gets the same rule.

        Both bounds count targets: on a sequence task a sample (a window)
        holds T of them (one per position, as votes and soft labels do), so
        the bounds in windows are the bounds divided by T (at least one).
        Counted in windows, the default 1,024 would be 65,536 positions x V
        logits per peer and step: 43 GB for 10 peers at V = 16,384."""
        t = self.cfg.train
        per = self.targets_per_sample
        least = max(1, math.ceil(t.distill_batch_size / per))
        most = max(least, t.distill_batch_max // per)
        if t.distill_epochs == 0 or steps == 0:
            return least
        want = math.ceil(t.distill_epochs * pool_size / steps)
        return min(max(want, least), most)

    @property
    def targets_per_sample(self) -> int:
        """Targets one sample carries: 1, or T positions of a sequence task."""
        return math.prod(self.data.position_shape)

    def learn(
        self, r: int, peers: Sequence[int], targets: Dict[int, tuple], loss_fn: LossFn
    ) -> None:
        """A distillation method's peer step. ``targets[peer] = (x, y, pool)``:
        the peer's distillation targets ``y`` for the inputs ``x``, ``pool``
        the usable rows; an optional fourth item is a key that is equal
        exactly when two peers' targets are (else y and pool are compared).
        Per ``train.order``: distill then train on the shard, the reverse, or
        (``joint``) every step on the sum of both losses. Peers with identical
        targets train together (one vectorised call)."""
        t = self.cfg.train
        groups: Dict[tuple, List[int]] = defaultdict(list)
        for peer in peers:
            if peer in targets and len(targets[peer][2]):
                x, y, pool = targets[peer][:3]
                key = targets[peer][3] if len(targets[peer]) > 3 else y.numpy().tobytes()
                groups[(id(x), key, pool.numpy().tobytes())].append(peer)
        with_targets = {p for members in groups.values() for p in members}
        plain = [p for p in peers if p not in with_targets]

        def objective(members: List[int], weight: float, steps: int) -> Objective:
            x, y, pool = targets[members[0]][:3]
            return Objective(
                [pool] * len(members), x, y, self.distill_batch(len(pool), steps), loss_fn, weight
            )

        if t.order == "joint":
            # One fused pass (shard loss + consensus loss per step) cannot be
            # split honestly between the two phases: it has its own.
            with self.timer("joint_training"):
                for members in groups.values():
                    self.population.fit(
                        members,
                        [self.local_steps[p] for p in members],
                        [
                            self._local_objective(members),
                            objective(members, t.distill_weight, t.local_steps),
                        ],
                        t.lr,
                        [self.generator(TRAIN_STREAM, r, p) for p in members],
                        peer_batch=t.peer_batch,
                    )
            if plain:
                self.train_local(r, plain)
            return

        def distill() -> None:
            with self.timer("distillation"):
                for members in groups.values():
                    self.population.fit(
                        members,
                        [t.distill_steps] * len(members),
                        [objective(members, 1.0, t.distill_steps)],
                        t.lr,
                        [self.generator(DISTILL_STREAM, r, p) for p in members],
                        peer_batch=t.peer_batch,
                    )

        if t.order == "distill-train":
            distill()
            self.train_local(r, peers)
        else:
            self.train_local(r, peers)
            distill()

    def consume_probe_logits(
        self,
        r: int,
        peers: Sequence[int],
        consume: Callable[[int, torch.Tensor], Any],
        population: Optional[Population] = None,
    ) -> List[Any]:
        """``consume(peer, logits [N, C])`` on round r's probes, one peer at a
        time (Population.predict_each): uplinks turn each peer's logits into
        its payload (a packed vote, soft labels) while they are still in
        cache, and the logits of every peer are never held at once. Time in
        ``consume`` counts in the phases it opens, the rest as inference."""
        x = self.data.x_probe[self.probe_indices(r)]
        population = self.population if population is None else population
        with self.timer("inference"):
            return population.predict_each(x, peers, lambda j, logits: consume(peers[j], logits))

    def adversary_generator(self, r: int, peer: int) -> torch.Generator:
        return self.generator(ADVERSARY_STREAM, r, peer)

    # ---- the loop -----------------------------------------------------------
    def run_round(self, r: int, transport: Optional["Transport"] = None) -> dict:
        """Round r, the one loop body of every method and every deployment:
        select peers -> downlink -> (transport: peer_update, uplink) ->
        aggregate -> reply (transport: apply_reply) -> evaluate. The
        transport reaches the peers: :class:`InProcess` (default) runs their
        hooks here, on this federation's own models; the Flower strategy
        sends the envelopes to the peers' nodes (tallytrain/flower/server.py).
        Bytes are counted here, on the server's side, either way."""
        if r != self.round:
            raise ValueError(f"round {r} requested but the run is at round {self.round}")
        transport = InProcess(self) if transport is None else transport
        start = time.perf_counter()
        before = sum(self.timer.seconds.values())
        selected = select_peers(
            self.cfg.peers,
            self.cfg.protocol.participation,
            self.cfg.seed,
            SELECT_STREAM,
            self.method.selection_round(r),
        )
        reachable, failures = transport.reachable(selected)
        # Downlink bytes are counted when sent: a server cannot know which arrive.
        sent = [env for env in self.method.downlink(r, selected) if env.receiver in reachable]
        result = transport.train(r, reachable, self.channel.deliver(r, sent))
        failures.update(result.failures)
        answered = result.answered
        if not answered:
            raise RuntimeError(
                f"round {r}: no peer answered; "
                + "; ".join(f"peer {p}: {why}" for p, why in sorted(failures.items()))
            )
        received = self.channel.deliver(r, result.uplink)
        with self.timer("aggregation"):
            stats = self.method.aggregate(r, answered, received)
        scores = result.scores
        closing = self.method.reply(r, answered)
        if closing:
            # The method's in-round reply (bridge's merged update): peers apply
            # it before they are evaluated, so their scores come from this step.
            online, _ = transport.reachable(sorted({int(env.receiver) for env in closing}))
            sent = [env for env in closing if env.receiver in online]
            result = transport.reply(r, online, self.channel.deliver(r, sent))
            for p, why in result.failures.items():
                failures.setdefault(p, why)
            scores = result.scores
            if scores is not None and not scores:
                raise RuntimeError(
                    f"round {r}: no peer applied the round's reply; "
                    + "; ".join(f"peer {p}: {why}" for p, why in sorted(failures.items()))
                )
        with self.timer("evaluation"):
            if scores is None:  # the peers are here: evaluate them here
                row = self.evaluate(r, stats)
            else:  # as the peers measured themselves
                peers = sorted(scores)
                ppl = [scores[p][1] for p in peers]
                row = self.metrics_row(
                    r,
                    stats,
                    torch.tensor([scores[p][0] for p in peers]),
                    None if None in ppl else torch.tensor(ppl, dtype=torch.float64),
                )
        transport.annotate(r, row, answered, failures)
        elapsed = time.perf_counter() - start
        self.timer.seconds["other"] += elapsed - (sum(self.timer.seconds.values()) - before)
        row["round_seconds"] = elapsed
        self.metrics.append(row)
        self.round = r + 1
        return row

    @torch.no_grad()
    def evaluate(self, r: int, stats) -> dict:
        return self.metrics_row(r, stats, *self.peer_scores(self.peers))

    @torch.no_grad()
    def peer_scores(self, peers: Sequence[int]) -> tuple:
        """(test accuracy [P'], perplexity [P'] or None) of held ``peers``'
        models: what the simulator evaluates every round, and what a Flower
        node measures of its own peer."""
        if not self.data.sequence:
            y = self.data.y_test
            acc = self.population.predict_each(
                self.data.x_test, peers, lambda j, logits: (logits.argmax(-1) == y).float().mean()
            )
            return torch.stack(acc), None
        return self.sequence_scores(
            lambda x, score: self.population.predict_each(x, peers, lambda j, lg: score(lg))
        )

    def sequence_scores(self, predict: Callable) -> tuple:
        """Next-token top-1 accuracy (float32 [M]) and perplexity (float64 [M])
        of M models on the test windows' real (non-padding) positions.
        ``predict(x, score)`` runs every model on windows ``x`` and returns
        ``[score(logits) for each model]``. The windows go in chunks of
        peer.rows_per_chunk positions, so the logits held at once stay
        bounded (the whole test split at V = 16,384 would be over 100 GB)."""
        x, y = self.data.x_test, self.data.y_test
        step = rows_per_chunk(math.prod(y.shape[1:]))
        totals: Optional[torch.Tensor] = None
        for i in range(0, len(x), step):
            target = y[i : i + step]
            real = target >= 0

            # Bound as defaults: predict calls score within this iteration.
            def score(logits: torch.Tensor, target=target, real=real) -> tuple:
                correct = int(((logits.argmax(-1) == target) & real).sum())
                nll = float(
                    F.cross_entropy(
                        logits.flatten(0, -2).float(),
                        target.flatten(),
                        ignore_index=-1,
                        reduction="sum",
                    )
                )
                return correct, nll

            chunk = torch.tensor(predict(x[i : i + step], score), dtype=torch.float64)
            totals = chunk if totals is None else totals + chunk
        if totals is None:
            raise ValueError("the test split is empty")
        count = max(int((y >= 0).sum()), 1)
        return (totals[:, 0] / count).float(), torch.exp(totals[:, 1] / count)

    @torch.no_grad()
    def metrics_row(
        self, r: int, stats, peer_acc: torch.Tensor, peer_ppl: Optional[torch.Tensor] = None
    ) -> dict:
        """Round r's metrics from the aggregation's stats and the test accuracy
        of each evaluated peer (``peer_acc`` [P']; the Flower adapter passes
        those its nodes measured). Sequence tasks add perplexity (``peer_ppl``
        [P'], and the global model's): accuracy is then next-token top-1
        accuracy, both over the test windows' real positions."""
        y = self.data.y_test
        g = self.method.global_params()
        global_acc = global_ppl = None
        if g is not None:
            group = self.population.single_group
            params = group.unflatten(g[None])
            if self.data.sequence:
                acc, ppl = self.sequence_scores(
                    lambda x, score: [score(group.predict(x, params=params)[0])]
                )
                global_acc, global_ppl = float(acc[0]), float(ppl[0])
            else:
                glog = group.predict(self.data.x_test, params=params)
                global_acc = float((glog[0].argmax(-1) == y).float().mean())
        now, cum = self.ledger.totals(r), self.ledger.totals()
        mean_acc = float(peer_acc.mean())
        row = {
            "method": self.cfg.method,
            "seed": self.cfg.seed,
            "round": r,
            "accuracy": global_acc if global_acc is not None else mean_acc,
            "peer_acc_mean": mean_acc,
            "peer_acc_min": float(peer_acc.min()),
            "peer_acc_max": float(peer_acc.max()),
            "global_acc": global_acc,
            "consensus_acc": stats.consensus_acc,
            "agreement": stats.agreement,
            "kept_fraction": stats.kept_fraction,
            "classes_covered": stats.classes_covered,
            "memory_fraction": stats.memory_fraction,
            "memory_acc": stats.memory_acc,
            "abstained": stats.abstained,
            "bytes_up": now["uplink"],
            "bytes_down": now["downlink"],
            "bytes": now["total"],
            "cum_bytes_up": cum["uplink"],
            "cum_bytes_down": cum["downlink"],
            "cum_bytes": cum["total"],
        }
        if peer_ppl is not None:
            # The deployed model's, like accuracy: the global model where
            # there is one, else the mean over peers of each peer's own.
            mean_ppl = float(peer_ppl.mean())
            row.update(
                perplexity=global_ppl if global_ppl is not None else mean_ppl,
                peer_ppl_mean=mean_ppl,
                peer_ppl_min=float(peer_ppl.min()),
                peer_ppl_max=float(peer_ppl.max()),
                global_ppl=global_ppl,
            )
        return row

    def run(self, on_round: Optional[Callable[["Federation"], None]] = None) -> None:
        """Run the remaining rounds; ``on_round`` is called after each one."""
        while self.round < self.cfg.rounds:
            self.run_round(self.round)
            if on_round is not None:
                on_round(self)

    # ---- checkpoints --------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "round": self.round,
            "population": self.population.state_dict(),
            "method": self.method.state_dict(),
            "ledger": self.ledger.state_dict(),
            "metrics": [dict(m) for m in self.metrics],
            "timer": dict(self.timer.seconds),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint is not a version-{CHECKPOINT_VERSION} tallytrain checkpoint"
            )
        diff = config_diff(state["config"], self.cfg.to_dict())
        if diff:
            raise ValueError("checkpoint was written for another configuration: " + "; ".join(diff))
        rounds = int(state["round"])
        if not 0 <= rounds <= self.cfg.rounds or len(state["metrics"]) != rounds:
            raise ValueError(f"checkpoint round {rounds} is inconsistent with its metrics")
        self.population.load_state_dict(state["population"])
        self.method.load_state_dict(state["method"])
        self.ledger = Ledger.from_state(state["ledger"])
        self.channel.ledger = self.ledger
        self.metrics = [dict(m) for m in state["metrics"]]
        self.timer.seconds.update(state["timer"])
        self.round = rounds


@dataclass
class PeerResult:
    """What a transport brings back from the peers of one exchange."""

    answered: List[int]  # peers that answered, sorted
    uplink: List[Envelope]  # their messages, in peer order (not yet counted)
    # peer -> (test accuracy, perplexity or None) as the peer measured its
    # own model; None: the peers' models are in this process, evaluate here
    scores: Optional[Dict[int, tuple]] = None
    failures: Dict[int, str] = field(default_factory=dict)  # peer -> why it did not answer


class Transport:
    """The seam between the round loop and the peers (Federation.run_round).

    ``reachable(peers)`` -> (the peers a message can reach, {peer: why not}
    for the others); ``train(r, peers, delivered)`` hands each peer its
    downlink (``delivered``: the decoded (envelope, message) pairs, already
    counted) and returns a :class:`PeerResult` with the peers' uplink;
    ``reply(r, peers, delivered)`` the same for a method's in-round reply;
    ``annotate`` adds what the transport knows to a round's metrics row."""

    def reachable(self, peers: Sequence[int]) -> tuple:
        return list(peers), {}

    def train(self, r: int, peers: Sequence[int], delivered: list) -> PeerResult:
        raise NotImplementedError

    def reply(self, r: int, peers: Sequence[int], delivered: list) -> PeerResult:
        raise NotImplementedError

    def annotate(self, r: int, row: dict, answered: List[int], failures: Dict[int, str]) -> None:
        pass


def inbox_of(delivered: list) -> Dict[int, list]:
    """Decoded messages per receiving peer, in arrival order."""
    inbox: Dict[int, list] = defaultdict(list)
    for env, msg in delivered:
        inbox[env.receiver].append(msg)
    return inbox


def peer_round(fed: Federation, r: int, peers: Sequence[int], delivered: list) -> List[Envelope]:
    """The peers' half of round r, on ``fed``'s models of ``peers``: digest
    the downlink and train (peer_update), then the uplink. Run for every
    peer at once in one process (InProcess), or by a Flower node for its
    own peer alone (tallytrain/flower/client.py)."""
    fed.method.peer_update(r, peers, inbox_of(delivered))
    return fed.method.uplink(r, peers)


def peer_reply(fed: Federation, r: int, delivered: list) -> None:
    """The peers' half of a method's in-round reply: apply it."""
    replies = inbox_of(delivered)
    if replies:
        with fed.timer("aggregation"):
            fed.method.apply_reply(r, replies)


class InProcess(Transport):
    """The simulator's transport: the peers are ``fed``'s own, in this process."""

    def __init__(self, fed: Federation):
        self.fed = fed

    def train(self, r, peers, delivered):
        return PeerResult(list(peers), peer_round(self.fed, r, peers, delivered))

    def reply(self, r, peers, delivered):
        peer_reply(self.fed, r, delivered)
        return PeerResult(list(peers), [])


def save_checkpoint(fed: Federation, path: str) -> None:
    """Atomically: write a temporary file next to ``path``, then os.replace."""
    with fed.timer("checkpoint"):
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(fed.state_dict(), tmp)
        os.replace(tmp, path)


def load_checkpoint(fed: Federation, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch archive, ...
        raise ValueError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        fed.load_state_dict(state)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} is malformed ({type(exc).__name__}: {exc})") from exc
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from exc
