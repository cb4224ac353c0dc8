"""The ClientApp: one tallytrain peer on a Flower SuperNode, holding only its
own shard, its own model and its own part of the method's state.

:func:`client_app` builds it. A node serves the peer named by its
``partition-id`` (node config). With ``load`` and ``probes``, the node calls
``load(node_config) -> (model, train_data)`` and reads its own data (a file
path in its node config, say); ``probes`` is the shared probe source
(:class:`~tallytrain.flower.data.SharedData`), the same one the server has.
Without them (``app``, the default), the node derives its shard of the
bundled dataset from the run config, as the simulator does.

For a round the node builds a :class:`~tallytrain.fl.loop.Federation` that
holds its peer alone, restores the peer's parameters and method state
(:meth:`Method.peer_state`) from Flower's ``context.state``, decodes and
checks the downlink as the simulator's channel does, and runs the peers'
half of the round loop (``fl.loop.peer_round``: ``peer_update`` then
``uplink``) for its peer; the uplink's wire bytes are the reply. Nothing
depends on the process surviving between rounds (Flower may run each
message in a fresh process); a process that does survive reuses its
Federation, which saves reading the data again.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from typing import Any, Mapping, Optional, Tuple

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..comm import SERVER, Channel, Ledger
from ..fl.config import RunConfig
from ..fl.loop import Federation, peer_reply, peer_round
from . import records
from .config import torch_threads
from .data import NodeLoader, SharedData, bundled_node, load_node, resolve_shared


def partition_of(context: Context) -> Tuple[int, int]:
    """(partition-id, num-partitions) of this node, from its node config."""
    cfg = context.node_config
    missing = [k for k in ("partition-id", "num-partitions") if k not in cfg]
    if missing:
        raise ValueError(
            f"the SuperNode's node config lacks {' and '.join(missing)}; start it with "
            f'--node-config "partition-id=<peer> num-partitions=<peers>"'
        )
    try:
        return int(cfg["partition-id"]), int(cfg["num-partitions"])
    except (TypeError, ValueError):
        raise ValueError(
            f"node config partition-id and num-partitions must be integers, got "
            f"{cfg['partition-id']!r} and {cfg['num-partitions']!r}"
        ) from None


class NodeSource:
    """Where a node's peer comes from: the user's ``load`` and shared
    ``probes``, or (both None) the bundled dataset split from the run config."""

    def __init__(self, load: Optional[NodeLoader] = None, probes: Any = None):
        if (load is None) != (probes is None):
            raise ValueError(
                "client_app needs both load= (the node's own model and data) and "
                "probes= (the shared probe pool and test set), or neither (the "
                "bundled datasets)"
            )
        if load is not None and not callable(load):
            raise ValueError(
                f"client_app load= must be a callable (node_config) -> (model, "
                f"train_data), got {type(load).__name__}"
            )
        if probes is not None and not (isinstance(probes, SharedData) or callable(probes)):
            raise ValueError(
                f"client_app probes= must be a tallytrain.flower.SharedData or a "
                f"function (run_config) -> SharedData, got {type(probes).__name__}"
            )
        self.load, self.probes = load, probes

    def federation(
        self,
        cfg: RunConfig,
        peer: int,
        node_config: Mapping[str, Any],
        run_config: Mapping[str, Any],
    ) -> Federation:
        if self.load is None:
            return Federation(cfg, bundled_node(cfg, peer), peers=[peer])
        shared = resolve_shared(self.probes, run_config, f"the node of peer {peer}").build()
        # The probes' labels (if the source has them) only score the
        # consensus on the server; a peer never needs them.
        shared = dataclasses.replace(shared, y_probe=None)
        node_cfg, data = load_node(self.load, node_config, peer, cfg, shared, run_config)
        return Federation(node_cfg, data, peers=[peer])


@functools.lru_cache(maxsize=1)
def _federation(
    source: NodeSource,
    cfg_json: str,
    peer: int,
    node_items: Tuple[tuple, ...],
    run_items: Tuple[tuple, ...],
) -> Tuple[Federation, dict, dict]:
    """This node's Federation (its peer alone), with the peer's initial
    parameters and method state, restored for its first round (the process
    may have served this peer in an earlier run)."""
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    fed = source.federation(cfg, peer, dict(node_items), dict(run_items))
    return fed, fed.population.peer_params(peer), copy.deepcopy(fed.method.peer_state(peer))


def _node_federation(source: NodeSource, cfg_json: str, context: Context) -> Tuple[Federation, int]:
    peer, num_partitions = partition_of(context)
    peers = int(json.loads(cfg_json)["peers"])
    if num_partitions != peers:
        raise ValueError(
            f"node config num-partitions={num_partitions} but the run has {peers} peers"
        )
    if not 0 <= peer < peers:
        raise ValueError(f"node config partition-id={peer} is outside 0..{peers - 1}")
    fed, initial_params, initial_state = _federation(
        source, cfg_json, peer, _items(context.node_config), _items(context.run_config)
    )
    saved = records.load_peer_state(context.state)
    if saved is None:  # the peer's first round: its initial model and state
        params, state = initial_params, initial_state
    else:
        params, state = saved
    fed.population.load_peer_params(peer, {k: v.clone() for k, v in params.items()})
    # A copy: the method may keep (and later change in place) what it loads.
    fed.method.load_peer_state(peer, copy.deepcopy(state))
    return fed, peer


def _items(config: Mapping[str, Any]) -> Tuple[tuple, ...]:
    """A config as a cache key (values are scalars, or lists of them)."""
    return tuple(
        sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in (config or {}).items())
    )


def _receive(source: NodeSource, content: RecordDict, context: Context):
    """(federation, peer, round, delivered) for a server instruction, with
    this node's peer restored from its saved state."""
    record = content.config_records[records.RECORD]
    peer, _ = partition_of(context)
    addressed = records.integer(record, "peer")
    if addressed != peer:
        raise ValueError(
            f"the server addressed peer {addressed} but this node serves partition-id {peer}"
        )
    fed, peer = _node_federation(source, str(record["config"]), context)
    r = records.integer(record, "round")
    # The peer's copy of the channel: it decodes and checks what arrives; the
    # bytes are counted once, by the server.
    delivered = Channel(Ledger()).deliver(r, records.unpack_envelopes(record, SERVER, peer))
    return fed, peer, r, delivered


def _scores(fed: Federation, peer: int) -> tuple:
    acc, ppl = fed.peer_scores([peer])
    return float(acc[0]), None if ppl is None else float(ppl[0])


def _save(fed: Federation, peer: int, context: Context) -> None:
    records.save_peer_state(
        context.state, fed.population.peer_params(peer), fed.method.peer_state(peer)
    )


def run_peer_round(
    content: RecordDict, context: Context, source: Optional[NodeSource] = None
) -> RecordDict:
    """One round of this node's peer: the server's instruction in, the reply out."""
    fed, peer, r, delivered = _receive(source or BUNDLED, content, context)
    out = peer_round(fed, r, [peer], delivered)
    _save(fed, peer, context)
    return records.reply(peer, out, *_scores(fed, peer))


def apply_round_reply(
    content: RecordDict, context: Context, source: Optional[NodeSource] = None
) -> RecordDict:
    """The method's in-round reply (bridge's merged update): apply it to this
    node's peer, save, and report the peer's scores."""
    fed, peer, r, delivered = _receive(source or BUNDLED, content, context)
    peer_reply(fed, r, delivered)
    _save(fed, peer, context)
    return records.reply(peer, [], *_scores(fed, peer))


def introduce(
    content: RecordDict, context: Context, source: Optional[NodeSource] = None
) -> RecordDict:
    """The answer to the server's hello: which peer this node serves, its
    shard size and model size, and its initial accuracy; or, when the node
    cannot build its peer (a missing data file, a bad node config), ``error``:
    one line saying why, which the server reports for that peer."""
    record = content.config_records[records.RECORD]
    peer, num_partitions = partition_of(context)
    answer = ConfigRecord({"partition-id": peer, "num-partitions": num_partitions})
    try:
        fed, peer = _node_federation(source or BUNDLED, str(record["config"]), context)
    except ValueError as exc:
        answer["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return RecordDict({records.RECORD: answer})
    accuracy, perplexity = _scores(fed, peer)
    answer["num-examples"] = fed.shard_sizes[peer]
    answer["num-params"] = sum(v.numel() for v in fed.population.peer_params(peer).values())
    return RecordDict(
        {records.RECORD: answer, records.METRICS: records.scores_record(accuracy, perplexity)}
    )


def client_app(load: Optional[NodeLoader] = None, probes: Any = None) -> ClientApp:
    """A Flower ClientApp serving one tallytrain peer per SuperNode.

    load: ``(node_config) -> (model, train_data)``, called on the node with
    its node config (``--node-config``; a second parameter, if ``load`` has
    one, receives Flower's run config); model is a factory
    ``(num_classes) -> nn.Module``, an nn.Module (its parameters are the
    initial ones) or an architecture name; train_data is ``(x, y)``, a torch
    Dataset of ``(x, y)`` pairs, or a function returning either. probes: the
    shared probe source (:class:`SharedData`, or a function of Flower's run
    config returning one), the same as the server's.
    Without both, the node serves its shard of the bundled dataset named by
    the run config (as ``tallytrain run`` splits it)."""
    source = NodeSource(load, probes)
    app = ClientApp()

    def threads(message: Message) -> int:
        return records.integer(message.content.config_records[records.RECORD], "threads")

    @app.query()
    def hello(message: Message, context: Context) -> Message:
        with torch_threads(threads(message)):
            return Message(introduce(message.content, context, source), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        with torch_threads(threads(message)):
            return Message(run_peer_round(message.content, context, source), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        with torch_threads(threads(message)):
            return Message(apply_round_reply(message.content, context, source), reply_to=message)

    return app


BUNDLED = NodeSource()
#: The default ClientApp: each node derives its shard of the bundled dataset.
app = client_app()

__all__ = ["app", "client_app", "partition_of", "NodeSource"]
