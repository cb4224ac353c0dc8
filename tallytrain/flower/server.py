"""The ServerApp and its strategy: tallytrain's server side over a Flower Grid.

:class:`TallyTrainStrategy` is a Flower ``Strategy`` that runs the
simulator's own round loop (:meth:`tallytrain.fl.loop.Federation.run_round`)
with itself as the loop's transport: instead of calling the peers' hooks in
process, it sends each reachable peer its downlink as a Flower message,
waits at most ``flower.round-timeout`` seconds for the replies, and hands
the loop the uplink of the peers that answered (decoded and counted through
the same channel and ledger as in the simulator); a method with an in-round
``reply`` (bridge) gets a second exchange in which the nodes apply it. A
peer that did not answer in time (its node died, or is slow) or answered
with an error is reported missing for that round; the round goes on with the
others.

The server holds no peer: its Federation has no models and no training
data, only the shared probe pool and test set and the method's server
state. It works over the Method hooks only, so any server-mode method runs
through it (tallytrain, softlabel, fedavg, ...). The hard-label methods have
no global model, so Flower's ``initial_arrays`` has no role; ``start``
returns Flower's ``Result`` with each round's metrics (and, for methods with
a global model, that model as ``arrays``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from logging import INFO, WARNING
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from .. import report
from ..comm import SERVER, Channel, Envelope, Ledger
from ..data import FederatedData, prepare
from ..fl.config import RunConfig
from ..fl.loop import Federation, PeerResult, Transport
from . import records
from .config import FlowerOptions, parse_run_config, torch_threads
from .data import SharedData, as_arch, federated_data, resolve_shared, server_view

#: The architecture name a server registers the nodes' own model under (model=).
SERVER_ARCH = "flower-server-model"

# Seconds between polls for replies. Grid.send_and_receive polls every 3 s,
# which would add up to 3 s to every round for nothing.
POLL_INTERVAL = 0.2


def exchange(grid: Grid, messages: List[Message], timeout: float) -> Dict[int, Message]:
    """Send ``messages`` and collect the replies that arrive within ``timeout``
    seconds, keyed by the index of the message each answers. (As
    Grid.send_and_receive, polling more often, and matching replies by the
    message they answer: a reply the SuperLink writes for a node that went
    away comes from the SuperLink, not from the node.)"""
    ids = list(grid.push_messages(messages))  # None where a message could not be pushed
    index = {mid: i for i, mid in enumerate(ids) if mid}
    pending = set(index)
    deadline = time.monotonic() + timeout
    replies: Dict[int, Message] = {}
    while pending:
        for reply in grid.pull_messages(pending):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                replies[index[mid]] = reply
                pending.discard(mid)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL)
    return replies


class TallyTrainStrategy(Strategy, Transport):
    """One tallytrain run (one method, one seed) driven over a Flower Grid.

    cfg, options: the run and the adapter's options (parse_run_config reads
    both from a Flower run config). The shared data, one of:
    ``data``, the bundled dataset as prepared (default: prepared from
    ``cfg``; the server keeps its probes and test set only), or ``probes``,
    the shared probe source of a run whose nodes read their own data
    (:class:`~tallytrain.flower.data.SharedData`, the ClientApp's too).
    model: the nodes' model (a factory ``(num_classes) -> nn.Module``, a
    module, or an architecture name) for methods that average parameters
    when the nodes bring their own; the server needs its shape."""

    def __init__(
        self,
        cfg: RunConfig,
        options: Optional[FlowerOptions] = None,
        data: Optional[FederatedData] = None,
        *,
        probes: Optional[SharedData] = None,
        model: Any = None,
    ):
        if cfg.protocol.decentralized:
            raise ValueError(
                "protocol.decentralized is not supported through Flower: Flower "
                "routes every message through the server"
            )
        if data is not None and probes is not None:
            raise ValueError(
                "TallyTrainStrategy takes data= (a bundled dataset) or probes= "
                "(the shared probe source), not both"
            )
        if probes is not None and not isinstance(probes, SharedData):
            raise ValueError(
                f"TallyTrainStrategy probes= must be a tallytrain.flower.SharedData,"
                f" got {type(probes).__name__}"
            )
        self.cfg = cfg
        self.options = options if options is not None else FlowerOptions()
        server_cfg = cfg
        if model is not None:
            arch = as_arch(model, SERVER_ARCH, "TallyTrainStrategy model=")
            server_cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, archs=(arch,))
            )
        if probes is not None:
            shared = probes.build()
            self.probe_labels = shared.y_probe is not None
            server_data = federated_data(server_cfg, shared)
        else:
            self.probe_labels = True
            server_data = server_view(
                cfg, prepare(cfg.data, cfg.peers, cfg.seed) if data is None else data
            )
        # No peers here: the nodes hold them. Shard sizes come from the nodes.
        self.fed = Federation(server_cfg, server_data, peers=[])
        self._cfg_json = records.config_json(cfg)
        self.peer_nodes: Dict[int, int] = {}  # peer -> Flower node id
        self.unserved: Dict[int, str] = {}  # peer -> why its node cannot serve it
        self.initial_accuracy: Optional[float] = None
        self.result = Result()
        self._grid: Optional[Grid] = None
        # (round, message type, {peer: envelopes}) being sent
        self._exchange: Optional[Tuple[int, str, Dict[int, List[Envelope]]]] = None
        self._out: List[tuple] = []  # (peer, Message) of that exchange
        self._collected: Optional[PeerResult] = None

    @property
    def metrics(self) -> List[dict]:
        return self.fed.metrics

    # ---- which node serves which peer ------------------------------------------------
    def connect(self, grid: Grid) -> None:
        """Wait (at most flower.node-timeout) for a node per peer, then ask each
        node which peer it serves. Peers without a node are reported missing
        in every round they are selected, with the reason when their node
        said why it cannot serve (e.g. its data file is missing)."""
        deadline = time.monotonic() + self.options.node_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.cfg.peers and time.monotonic() < deadline:
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise RuntimeError(
                "no Flower node connected within flower.node-timeout = "
                f"{self.options.node_timeout} s"
            )
        hello = [
            Message(
                records.hello(self._cfg_json, self.options.threads),
                node,
                records.HELLO,
                group_id="hello",
                ttl=self.options.node_timeout,
            )
            for node in nodes
        ]
        replies = exchange(grid, hello, max(deadline - time.monotonic(), 1.0))
        accuracy = []
        for i, reply in sorted(replies.items()):
            node = nodes[i]
            if reply.has_error():
                log(
                    WARNING,
                    "node %s did not say which peer it serves: %s",
                    node,
                    reply.error.reason,
                )
                continue
            record = reply.content.config_records[records.RECORD]
            peer = records.integer(record, "partition-id")
            parts = records.integer(record, "num-partitions")
            if parts != self.cfg.peers or not 0 <= peer < parts:
                raise ValueError(
                    f"node {node} has partition-id={peer} num-partitions={parts}, "
                    f"but the run has {self.cfg.peers} peers"
                )
            if peer in self.peer_nodes or peer in self.unserved:
                raise ValueError(
                    f"nodes {self.peer_nodes.get(peer, '')} and {node} both serve "
                    f"partition-id={peer}"
                )
            if "error" in record:
                self.unserved[peer] = f"its node {node} cannot serve it: {str(record['error'])}"
                log(WARNING, "peer %s: %s", peer, self.unserved[peer])
                continue
            self._check_model(node, peer, records.integer(record, "num-params"))
            self.peer_nodes[peer] = node
            self.fed.shard_sizes[peer] = records.integer(record, "num-examples")
            accuracy.append(records.read_scores(reply.content)[0])
        # Before any training: the mean over the peers' initial models.
        self.initial_accuracy = sum(accuracy) / len(accuracy) if accuracy else None
        absent = [p for p in range(self.cfg.peers) if p not in self.peer_nodes]
        if absent:
            log(WARNING, "no node serves peers %s; they will be reported missing", absent)

    def _check_model(self, node: int, peer: int, num_params: int) -> None:
        """Parameter-averaging methods: the node's model must be the server's."""
        if not self.fed.method.averages_parameters:
            return
        group = self.fed.population.single_group
        if num_params != group.num_params:
            raise ValueError(
                f"node {node} (peer {peer}) has a model of {num_params} parameters, but the "
                f"server's {group.arch!r} model has {group.num_params}; method "
                f"{self.cfg.method!r} averages parameters, so give TallyTrainStrategy "
                f"model= the nodes' model (or set model.archs to it)"
            )

    # ---- one round: the simulator's loop, with this strategy as its transport ---------
    def run_round(self, grid: Grid, r: int) -> dict:
        """Round r with the peers that answer in time; returns its metrics row."""
        self._grid = grid
        return self.fed.run_round(r, self)

    def reachable(self, peers):
        # A node the SuperLink no longer lists (it stopped, or lost its
        # connection) cannot answer: no need to wait for it.
        online = set(self._grid.get_node_ids())
        ok, why = [], {}
        for p in peers:
            node = self.peer_nodes.get(p)
            if node is not None and node in online:
                ok.append(p)
            elif node is not None:
                why[p] = f"its node {node} is no longer connected"
            else:
                why[p] = self.unserved.get(p, "no node serves this peer")
        return ok, why

    def train(self, r, peers, delivered):
        return self._send(r, records.ROUND, peers, delivered)

    def reply(self, r, peers, delivered):
        return self._send(r, records.REPLY, peers, delivered)

    def _send(self, r: int, kind: str, peers: List[int], delivered: list) -> PeerResult:
        """One exchange with ``peers``' nodes through the Strategy's own
        configure/aggregate steps (which is what Flower calls them)."""
        by_peer = defaultdict(list)
        for env, _ in delivered:
            by_peer[env.receiver].append(env)
        grid = self._grid
        assert grid is not None  # run_round set it
        self._exchange = (r, kind, {p: by_peer[p] for p in peers})
        configure = self.configure_train if kind == records.ROUND else self.configure_evaluate
        aggregate = self.aggregate_train if kind == records.ROUND else self.aggregate_evaluate
        messages = list(configure(r + 1, ArrayRecord(), ConfigRecord(), grid))
        replies = exchange(grid, messages, self.options.round_timeout)
        aggregate(r + 1, [replies[i] for i in sorted(replies)])
        self._exchange = None
        assert self._collected is not None  # aggregate collected the replies
        return self._collected

    def annotate(self, r, row, answered, failures):
        if not self.probe_labels:  # unlabelled probes: nothing to score the consensus on
            row.update(consensus_acc=None, memory_acc=None)
        for p in sorted(failures):
            log(WARNING, "round %s: peer %s missing: %s", r, p, failures[p])
        row.update(
            answered_peers=list(answered),
            missing_peers=sorted(failures),
            failures={str(p): why for p, why in sorted(failures.items())},
        )

    # ---- flwr Strategy: the Flower side of each exchange -----------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's instructions, one per reachable selected peer (Flower
        numbers rounds from 1: ``server_round`` is round r + 1). The loop
        prepares them: call :meth:`start` (or :meth:`run_round`)."""
        return self._configure(server_round, records.ROUND)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The method's in-round reply (bridge), one message per peer; none
        for the other methods."""
        if self._exchange is None or self._exchange[1] != records.REPLY:
            return []
        return self._configure(server_round, records.REPLY)

    def _configure(self, server_round: int, kind: str) -> List[Message]:
        if self._exchange is None or self._exchange[1] != kind:
            raise RuntimeError(
                "TallyTrainStrategy prepares its messages in its own round loop: "
                "run it with strategy.start(grid)"
            )
        r, _, by_peer = self._exchange
        if server_round != r + 1:
            raise ValueError(
                f"server_round {server_round} requested but the loop is at round {r + 1}"
            )
        # The TTL bounds the message's life to the round: a node that comes
        # back later must not train on a round the server has closed.
        group = str(r) if kind == records.ROUND else f"{r}-reply"
        self._out = [
            (
                p,
                Message(
                    records.instruction(self._cfg_json, self.options.threads, r, p, envelopes),
                    self.peer_nodes[p],
                    kind,
                    group_id=group,
                    ttl=self.options.round_timeout,
                ),
            )
            for p, envelopes in by_peer.items()
        ]
        return [m for _, m in self._out]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple:
        """Read the peers' replies: their uplink (checked to decode, handed to
        the loop, which counts and aggregates it) and their accuracy. Returns
        no arrays (the hard-label methods have no global model here) and the
        mean accuracy of the peers that answered."""
        return None, self._aggregate(server_round, replies, records.ROUND)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> Optional[MetricRecord]:
        """The peers' accuracy after applying the round's reply."""
        if self._exchange is None or self._exchange[1] != records.REPLY:
            return None
        return self._aggregate(server_round, replies, records.REPLY)

    def _aggregate(
        self, server_round: int, replies: Iterable[Message], kind: str
    ) -> Optional[MetricRecord]:
        r = server_round - 1
        peer_of = {msg.metadata.message_id: p for p, msg in self._out}
        answers, failures = {}, {}
        for reply in replies:
            # Matched by the message answered: a reply the SuperLink writes for
            # a node that went away comes from the SuperLink, not the node.
            p = peer_of.get(reply.metadata.reply_to_message_id)
            if p is None:
                continue
            if reply.has_error():
                # From the node (its ClientApp raised) or from the SuperLink
                # (e.g. the message expired: the node went away).
                failures[p] = (
                    f"error reply (code {reply.error.code}): {reply.error.reason}"
                    if kind == records.ROUND
                    else f"error applying the round's reply (code {reply.error.code}): "
                    f"{reply.error.reason}"
                )
                continue
            try:
                answers[p] = self._read_reply(r, p, reply)
            except (KeyError, ValueError) as exc:  # includes wire.WireFormatError
                failures[p] = f"unusable reply ({type(exc).__name__}: {exc})"
        for p, _ in self._out:
            if p not in answers and p not in failures:
                failures[p] = (
                    f"no reply within flower.round-timeout = {self.options.round_timeout} s"
                    if kind == records.ROUND
                    else f"no answer to the round's reply within flower.round-timeout = "
                    f"{self.options.round_timeout} s"
                )
        answered = sorted(answers)
        self._collected = PeerResult(
            answered,
            [env for p in answered for env in answers[p][0]],
            {p: answers[p][1] for p in answered},
            failures,
        )
        if not answered:
            return None
        return MetricRecord(
            {
                "accuracy": sum(answers[p][1][0] for p in answered) / len(answered),
                "answered": len(answered),
            }
        )

    def _read_reply(self, r: int, peer: int, reply: Message) -> tuple:
        """(the reply's envelopes, (accuracy, perplexity)); raises on a reply
        that does not decode, before anything is counted."""
        record = reply.content.config_records[records.RECORD]
        sender = records.integer(record, "peer")
        if sender != peer:
            raise ValueError(f"reply of peer {peer}'s node says it is from peer {sender}")
        envelopes = records.unpack_envelopes(record, peer, SERVER)
        Channel(Ledger()).deliver(r, envelopes)  # decodes and checks each, counts nothing
        return envelopes, records.read_scores(reply.content)

    def summary(self) -> None:
        log(
            INFO,
            "\ttallytrain method %s, %s peers, %s rounds, seed %s; round timeout %s s",
            self.cfg.method,
            self.cfg.peers,
            self.cfg.rounds,
            self.cfg.seed,
            self.options.round_timeout,
        )

    # ---- the whole run ---------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: Optional[ArrayRecord] = None,
        num_rounds: Optional[int] = None,
        timeout: Optional[float] = None,
        train_config: Optional[ConfigRecord] = None,
        evaluate_config: Optional[ConfigRecord] = None,
        evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]] = None,
    ) -> Result:
        """Connect, run every round of the run config, and return Flower's
        Result: per round (from 1) the metrics row's numbers as a
        MetricRecord, and the global model (methods that have one) as
        ``arrays``. :meth:`report` has the whole run as JSON. ``timeout``
        overrides flower.round-timeout; ``evaluate_fn(round, arrays)`` is
        called after every round, as in Flower's strategies."""
        if initial_arrays is not None and len(initial_arrays):
            raise ValueError(
                "TallyTrainStrategy.start: initial_arrays must be empty; every "
                "peer starts from its own model on its node"
            )
        if num_rounds is not None and num_rounds != self.cfg.rounds:
            raise ValueError(
                f"TallyTrainStrategy.start: num_rounds={num_rounds} differs from "
                f"the run config's rounds={self.cfg.rounds}; set rounds there"
            )
        if train_config or evaluate_config:
            raise ValueError(
                "TallyTrainStrategy.start takes no train_config/evaluate_config: "
                "the run config carries tallytrain's settings to the nodes"
            )
        if timeout is not None:
            self.options = dataclasses.replace(self.options, round_timeout=float(timeout))
        log(INFO, "Starting %s strategy:", type(self).__name__)
        self.summary()
        self.connect(grid)
        for r in range(self.fed.round, self.cfg.rounds):
            row = self.run_round(grid, r)
            log(
                INFO,
                "round %s: accuracy %.4f, consensus accuracy %s, %s bytes, missing peers %s",
                r,
                row["accuracy"],
                row["consensus_acc"],
                row["bytes"],
                row["missing_peers"],
            )
            self.result.train_metrics_clientapp[r + 1] = metric_record(row)
            if evaluate_fn is not None:
                res = evaluate_fn(r + 1, self.global_arrays())
                if res is not None:
                    self.result.evaluate_metrics_serverapp[r + 1] = res
        self.result.arrays = self.global_arrays()
        return self.result

    def global_arrays(self) -> ArrayRecord:
        """The method's global model (fedavg, feddf, ...) by parameter name;
        empty for methods without one."""
        g = self.fed.method.global_params()
        if g is None:
            return ArrayRecord()
        params = self.fed.population.single_group.unflatten(g[None])
        return ArrayRecord(torch_state_dict={k: v[0] for k, v in params.items()})

    def report(self) -> dict:
        missing = sorted({p for row in self.metrics for p in row["missing_peers"]})
        return {
            "config": self.cfg.to_dict(),
            "flower": dataclasses.asdict(self.options),
            "peer_nodes": {str(p): node for p, node in sorted(self.peer_nodes.items())},
            "initial_accuracy": self.initial_accuracy,
            "final_accuracy": self.metrics[-1]["accuracy"] if self.metrics else None,
            "missing_peers": missing,
            "totals": self.fed.ledger.totals(),
            "rounds": self.metrics,
        }


def metric_record(row: dict) -> MetricRecord:
    """The numbers of a metrics row (a MetricRecord holds numbers and lists of them)."""
    keep = {}
    for k, v in row.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)) or (
            isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        ):
            keep[k] = v
    return MetricRecord(keep)


def server_app(probes: Any = None, model: Any = None) -> ServerApp:
    """A Flower ServerApp running :class:`TallyTrainStrategy` with the run
    config of ``flwr run``. probes: the shared probe source
    (:class:`SharedData`, or a function of Flower's run config returning
    one: the ClientApp's), or None for the bundled dataset the run config
    names; model as for the strategy. With flower.report set, it writes
    :meth:`TallyTrainStrategy.report` there as JSON."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, options = parse_run_config(context.run_config)
        shared = (
            None if probes is None else resolve_shared(probes, context.run_config, "the ServerApp")
        )
        with torch_threads(options.threads):
            strategy = TallyTrainStrategy(cfg, options, probes=shared, model=model)
            strategy.start(grid)
        if options.report:
            report.write_json_atomic(options.report, strategy.report())
            log(INFO, "tallytrain report written to %s", options.report)

    return app


#: The default ServerApp: the bundled dataset named by the run config.
app = server_app()
