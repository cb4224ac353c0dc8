"""The ClientApp: one tallytrain peer on a Flower SuperNode.

A node serves the peer named by its ``partition-id`` (node config). For a
round it builds the same :class:`~tallytrain.fl.loop.Federation` as the
simulator from the run config carried by the server's message (same seed, same
bundled data split, so the same shards and initial models), restores its own
peer's parameters and method state from Flower's ``context.state``, and runs
the method's peer hooks for that peer alone: the downlink messages are decoded
and checked as the simulator's channel does, then ``peer_update`` and
``uplink``; the uplink's wire bytes are the reply. Nothing depends on the
process surviving between rounds (Flower may run each message in a fresh
process); a process that does survive reuses its Federation, which saves
re-reading the data.
"""
from __future__ import annotations

import copy
import functools
import json
from collections import defaultdict
from typing import Dict, Tuple

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..comm import SERVER, Channel, Ledger
from ..data import prepare
from ..fl.config import RunConfig
from ..fl.loop import Federation
from . import records
from .config import torch_threads

app = ClientApp()


def partition_of(context: Context) -> Tuple[int, int]:
    """(partition-id, num-partitions) of this node, from its node config."""
    cfg = context.node_config
    missing = [k for k in ("partition-id", "num-partitions") if k not in cfg]
    if missing:
        raise ValueError(
            f"the SuperNode's node config lacks {' and '.join(missing)}; start it with "
            f"--node-config \"partition-id=<peer> num-partitions=<peers>\"")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


@functools.lru_cache(maxsize=1)
def _federation(cfg_json: str) -> Tuple[Federation, dict]:
    """The run's Federation and its method's initial state (restored for a
    peer's first round, in case this process served another peer before)."""
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    fed = Federation(cfg, prepare(cfg.data, cfg.peers, cfg.seed))
    return fed, fed.method.state_dict()


def _own_params(fed: Federation, peer: int) -> Dict[str, torch.Tensor]:
    group_index, row = fed.population.where[peer]
    return {k: v[row].clone() for k, v in fed.population.groups[group_index].params.items()}


def _restore(fed: Federation, peer: int, initial_method_state: dict, state: RecordDict) -> None:
    saved = records.load_peer_state(state)
    if saved is None:  # the peer's first round: the initial model is already in place
        # A copy: the method may keep (and later change in place) what it loads.
        fed.method.load_state_dict(copy.deepcopy(initial_method_state))
        return
    params, method_state = saved
    group_index, row = fed.population.where[peer]
    group = fed.population.groups[group_index]
    if set(params) != set(group.params):
        raise ValueError(f"peer {peer}'s saved state does not match the configured model")
    for k, v in params.items():
        group.params[k][row] = v
    fed.method.load_state_dict(method_state)


def _receive(content: RecordDict, context: Context):
    """(federation, peer, round, inbox) for a server instruction, with this
    node's peer restored from its saved state."""
    record = content.config_records[records.RECORD]
    peer, num_partitions = partition_of(context)
    if int(record["peer"]) != peer:
        raise ValueError(f"the server addressed peer {record['peer']} but this node serves "
                         f"partition-id {peer}")
    fed, initial_method_state = _federation(str(record["config"]))
    if num_partitions != fed.cfg.peers:
        raise ValueError(f"node config num-partitions={num_partitions} but the run has "
                         f"{fed.cfg.peers} peers")
    r = int(record["round"])
    _restore(fed, peer, initial_method_state, context.state)
    # The peer's copy of the channel: it decodes and checks what arrives; the
    # bytes are counted once, by the server.
    inbox = defaultdict(list)
    for _, msg in Channel(Ledger()).deliver(r, records.unpack_envelopes(record, SERVER, peer)):
        inbox[peer].append(msg)
    return fed, peer, r, inbox


@torch.no_grad()
def _accuracy(fed: Federation, peer: int) -> float:
    logits = fed.population.predict(fed.data.x_test, [peer], fed.cfg.train.peer_batch)
    return float((logits[0].argmax(-1) == fed.data.y_test).float().mean())


def run_peer_round(content: RecordDict, context: Context) -> RecordDict:
    """One round of this node's peer: the server's instruction in, the reply out."""
    fed, peer, r, inbox = _receive(content, context)
    fed.method.peer_update(r, [peer], inbox)
    out = fed.method.uplink(r, [peer])
    records.save_peer_state(context.state, _own_params(fed, peer), fed.method.state_dict())
    return records.reply(peer, out, _accuracy(fed, peer))


def apply_round_reply(content: RecordDict, context: Context) -> RecordDict:
    """The method's in-round reply (bridge's merged update): apply it to this
    node's peer, save, and report the peer's accuracy."""
    fed, peer, r, inbox = _receive(content, context)
    fed.method.apply_reply(r, inbox)
    records.save_peer_state(context.state, _own_params(fed, peer), fed.method.state_dict())
    return records.reply(peer, [], _accuracy(fed, peer))


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tell the server which peer this node serves."""
    peer, num_partitions = partition_of(context)
    content = RecordDict({records.RECORD: ConfigRecord(
        {"partition-id": peer, "num-partitions": num_partitions})})
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    threads = int(message.content.config_records[records.RECORD]["threads"])
    with torch_threads(threads):
        return Message(run_peer_round(message.content, context), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    threads = int(message.content.config_records[records.RECORD]["threads"])
    with torch_threads(threads):
        return Message(apply_round_reply(message.content, context), reply_to=message)
