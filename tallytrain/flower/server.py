"""The ServerApp and its strategy: tallytrain's server side over a Flower Grid.

:class:`TallyTrainStrategy` runs the simulator's round loop with the peers on
Flower nodes. It holds its own :class:`~tallytrain.fl.loop.Federation` for the
server's side: every round it selects peers as the simulator does, calls the
method's ``downlink``, sends each reachable peer its wire messages, waits at
most ``flower.round-timeout`` seconds for the replies, decodes and counts them
through the same channel and ledger as the simulator, and calls
``aggregate`` with the peers that answered; a method with an in-round
``reply`` (bridge) gets a second exchange in which the nodes apply it. A peer that did not answer in time
(its node died, or is slow) or answered with an error is reported missing for
that round; the round goes on with the others.

It works over the Method hooks only, so any server-mode method runs through it
(tallytrain, softlabel, fedavg, ...). Flower's own ``Strategy`` base class is
not used: it is built around one global model in an ArrayRecord, which a
hard-label method does not have.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from logging import INFO, WARNING
from typing import Dict, List, Optional

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .. import report
from ..comm import SERVER, Channel, Ledger
from ..data import FederatedData, prepare
from ..fl.config import RunConfig
from ..fl.loop import SELECT_STREAM, Federation
from ..fl.server import select_peers
from . import records
from .config import FlowerOptions, parse_run_config, torch_threads

app = ServerApp()

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


class TallyTrainStrategy:
    """One tallytrain run (one method, one seed) driven over a Flower Grid."""

    def __init__(self, cfg: RunConfig, options: FlowerOptions = FlowerOptions(),
                 data: Optional[FederatedData] = None):
        if cfg.protocol.decentralized:
            raise ValueError("protocol.decentralized is not supported through Flower: Flower "
                             "routes every message through the server")
        self.cfg = cfg
        self.options = options
        self.fed = Federation(cfg, prepare(cfg.data, cfg.peers, cfg.seed) if data is None
                              else data)
        self._cfg_json = records.config_json(cfg)
        self.peer_nodes: Dict[int, int] = {}  # peer -> Flower node id
        self.metrics: List[dict] = []
        # Before any training the server's population holds every peer's
        # initial model (the same seeds as on the nodes).
        self.initial_accuracy = self._mean_accuracy(self.fed.population.predict(
            self.fed.data.x_test, list(range(cfg.peers)), cfg.train.peer_batch))

    def _mean_accuracy(self, logits: torch.Tensor) -> float:
        return float((logits.argmax(-1) == self.fed.data.y_test).float().mean())

    # ---- which node serves which peer ------------------------------------------------
    def connect(self, grid: Grid) -> None:
        """Wait (at most flower.node-timeout) for a node per peer, then ask each
        node its partition-id. Peers without a node are reported missing in
        every round they are selected."""
        deadline = time.monotonic() + self.options.node_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.cfg.peers and time.monotonic() < deadline:
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no Flower node connected within flower.node-timeout = "
                               f"{self.options.node_timeout} s")
        hello = [Message(RecordDict({records.RECORD: ConfigRecord()}), node, records.HELLO,
                         group_id="hello", ttl=self.options.node_timeout) for node in nodes]
        replies = exchange(grid, hello, max(deadline - time.monotonic(), 1.0))
        for i, reply in sorted(replies.items()):
            node = nodes[i]
            if reply.has_error():
                log(WARNING, "node %s did not say which peer it serves: %s", node,
                    reply.error.reason)
                continue
            record = reply.content.config_records[records.RECORD]
            peer, parts = int(record["partition-id"]), int(record["num-partitions"])
            if parts != self.cfg.peers or not 0 <= peer < parts:
                raise ValueError(f"node {node} has partition-id={peer} num-partitions={parts}, "
                                 f"but the run has {self.cfg.peers} peers")
            if peer in self.peer_nodes:
                raise ValueError(f"nodes {self.peer_nodes[peer]} and {node} both serve "
                                 f"partition-id={peer}")
            self.peer_nodes[peer] = node
        absent = [p for p in range(self.cfg.peers) if p not in self.peer_nodes]
        if absent:
            log(WARNING, "no node serves peers %s; they will be reported missing", absent)

    # ---- one round -------------------------------------------------------------------
    def run_round(self, grid: Grid, r: int) -> dict:
        """Round r with the peers that answer in time; returns its metrics row."""
        fed = self.fed
        if r != fed.round:
            raise ValueError(f"round {r} requested but the run is at round {fed.round}")
        start = time.perf_counter()
        selected = select_peers(self.cfg.peers, self.cfg.protocol.participation,
                                self.cfg.seed, SELECT_STREAM, fed.method.selection_round(r))
        # A node the SuperLink no longer lists (it stopped, or lost its
        # connection) cannot answer: no need to wait for it.
        online = set(grid.get_node_ids())
        reachable = [p for p in selected if self.peer_nodes.get(p) in online]
        # Downlink bytes are counted when sent: the server cannot know which
        # arrived. The channel also checks the method's own messages.
        sent = [env for env in fed.method.downlink(r, selected) if env.receiver in reachable]
        fed.channel.deliver(r, sent)
        by_peer = defaultdict(list)
        for env in sent:
            by_peer[env.receiver].append(env)
        # The TTL bounds the message's life to the round: a node that comes
        # back later must not train on a round the server has closed.
        out = [Message(records.instruction(self._cfg_json, self.options.threads, r, p,
                                           by_peer[p]),
                       self.peer_nodes[p], records.ROUND, group_id=str(r),
                       ttl=self.options.round_timeout) for p in reachable]
        replies = exchange(grid, out, self.options.round_timeout)
        answers, failures = self._collect(r, selected, reachable, replies)
        answered = sorted(answers)
        if not answered:
            raise RuntimeError(f"round {r}: no peer answered; " + "; ".join(
                f"peer {p}: {why}" for p, why in sorted(failures.items())))
        received = []
        for p in answered:  # peer order, as in the simulator
            ledger, delivered, _ = answers[p]
            for e in ledger.entries:
                fed.ledger.record(e.round, e.sender, e.receiver, e.kind, e.bytes)
            received += delivered
        with fed.timer("aggregation"):
            stats = fed.method.aggregate(r, answered, received)
        accuracy = {p: answers[p][2] for p in answered}
        closing = fed.method.reply(r, answered)
        if closing:
            # The method's in-round reply (bridge's merged update): peers apply
            # it before they are evaluated, so their accuracy comes from this step.
            accuracy = self._reply_round(grid, r, closing, online, failures)
        with fed.timer("evaluation"):
            row = fed.metrics_row(r, stats, torch.tensor([accuracy[p] for p in sorted(accuracy)]))
        for p in sorted(failures):
            log(WARNING, "round %s: peer %s missing: %s", r, p, failures[p])
        row.update(answered_peers=answered, missing_peers=sorted(failures),
                   failures={str(p): why for p, why in sorted(failures.items())},
                   round_seconds=time.perf_counter() - start)
        self.metrics.append(row)
        fed.round = r + 1
        return row

    def _collect(self, r: int, selected: List[int], reachable: List[int],
                 replies: Dict[int, Message]):
        """(answers, failures): per peer that answered usefully, its messages'
        ledger, the decoded messages and its accuracy; per selected peer that
        did not, why."""
        failures: Dict[int, str] = {}
        answers = {}
        for i, reply in sorted(replies.items()):
            peer = reachable[i]
            if reply.has_error():
                # From the node (its ClientApp raised) or from the SuperLink
                # (e.g. the message expired: the node went away).
                failures[peer] = f"error reply (code {reply.error.code}): {reply.error.reason}"
                continue
            try:
                answers[peer] = self._read_reply(r, peer, reply)
            except (KeyError, ValueError) as exc:  # includes wire.WireFormatError
                failures[peer] = f"unusable reply ({type(exc).__name__}: {exc})"
        for p in selected:
            if p not in answers and p not in failures:
                if p in reachable:
                    failures[p] = (f"no reply within flower.round-timeout = "
                                   f"{self.options.round_timeout} s")
                elif p in self.peer_nodes:
                    failures[p] = f"its node {self.peer_nodes[p]} is no longer connected"
                else:
                    failures[p] = "no node serves this peer"
        return answers, failures

    def _read_reply(self, r: int, peer: int, reply: Message):
        record = reply.content.config_records[records.RECORD]
        if int(record["peer"]) != peer:
            raise ValueError(f"reply of peer {peer}'s node says it is from peer {record['peer']}")
        # A channel of its own, so that a reply that fails half-way leaves no
        # entries in the run's ledger.
        channel = Channel(Ledger())
        delivered = channel.deliver(r, records.unpack_envelopes(record, peer, SERVER))
        accuracy = float(reply.content.metric_records[records.METRICS]["accuracy"])
        return channel.ledger, delivered, accuracy

    def _reply_round(self, grid: Grid, r: int, closing: list, online: set,
                     failures: Dict[int, str]) -> Dict[int, float]:
        """Send the method's reply envelopes (counted when sent, as the
        downlink) to the peers whose nodes are online; each node applies
        them, saves its state and measures its accuracy. A node that fails
        here joins ``failures``; returns {peer: accuracy} of the others."""
        fed = self.fed
        sent = [env for env in closing if self.peer_nodes.get(env.receiver) in online]
        fed.channel.deliver(r, sent)
        by_peer = defaultdict(list)
        for env in sent:
            by_peer[env.receiver].append(env)
        peers = sorted(by_peer)
        out = [Message(records.instruction(self._cfg_json, self.options.threads, r, p,
                                           by_peer[p]),
                       self.peer_nodes[p], records.REPLY, group_id=f"{r}-reply",
                       ttl=self.options.round_timeout) for p in peers]
        replies = exchange(grid, out, self.options.round_timeout)
        accuracy = {}
        for i, p in enumerate(peers):
            reply = replies.get(i)
            if reply is None:
                failures.setdefault(p, f"no answer to the round's reply within "
                                       f"flower.round-timeout = {self.options.round_timeout} s")
            elif reply.has_error():
                failures.setdefault(p, f"error applying the round's reply (code "
                                       f"{reply.error.code}): {reply.error.reason}")
            else:
                accuracy[p] = float(reply.content.metric_records[records.METRICS]["accuracy"])
        if not accuracy:
            raise RuntimeError(f"round {r}: no peer applied the round's reply; " + "; ".join(
                f"peer {p}: {why}" for p, why in sorted(failures.items())))
        return accuracy

    # ---- the whole run ---------------------------------------------------------------
    def start(self, grid: Grid) -> dict:
        """Connect, run every round, and return :meth:`report`."""
        self.connect(grid)
        for r in range(self.cfg.rounds):
            row = self.run_round(grid, r)
            log(INFO, "round %s: accuracy %.4f, consensus accuracy %s, %s bytes, missing "
                "peers %s", r, row["accuracy"], row["consensus_acc"], row["bytes"],
                row["missing_peers"])
        return self.report()

    def report(self) -> dict:
        missing = sorted({p for row in self.metrics for p in row["missing_peers"]})
        return {
            "config": self.cfg.to_dict(), "flower": dataclasses.asdict(self.options),
            "peer_nodes": {str(p): node for p, node in sorted(self.peer_nodes.items())},
            "initial_accuracy": self.initial_accuracy,
            "final_accuracy": self.metrics[-1]["accuracy"] if self.metrics else None,
            "missing_peers": missing, "totals": self.fed.ledger.totals(),
            "rounds": self.metrics,
        }


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, options = parse_run_config(context.run_config)
    with torch_threads(options.threads):
        result = TallyTrainStrategy(cfg, options).start(grid)
    if options.report:
        report.write_json_atomic(options.report, result)
        log(INFO, "tallytrain report written to %s", options.report)
