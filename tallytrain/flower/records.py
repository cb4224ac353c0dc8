"""What tallytrain puts inside Flower messages, and what a peer keeps in its
node state.

The protocol's messages travel unchanged: each is the ``tallytrain.wire``
encoding, carried as a ``bytes`` value of a ConfigRecord, so the ledger
counts ``len(message)`` exactly as the in-process simulator does. Flower's own
framing (protobuf, HTTP) comes on top and is not counted, as a real transport's
headers are not counted in the simulator.

Content of a round's instruction (server -> node), record ``tallytrain``:
``round``, ``peer`` (the partition the server believes the node serves),
``config`` (the RunConfig as JSON, so that a node needs nothing but the
message to act), ``threads`` (torch CPU threads to use), ``messages`` (wire
bytes) and ``kinds`` (the ``wire.MessageKind`` the receiver must find in
each, as the simulator's envelopes say). A reply (node -> server) holds ``peer``, ``messages`` and
``kinds`` in the same record, and the peer's test accuracy (and, on
sequence tasks, perplexity) in the MetricRecord ``metrics``.

Before the first round the server asks every node (``query``, record
``tallytrain`` with ``config``) which peer it serves; the node builds its
peer and answers ``partition-id``, ``num-partitions``, ``num-examples`` (its
shard's size: the server's averaging weights), ``num-params`` (its model's),
and its initial accuracy; or ``error``, one line saying why it cannot serve.
"""

from __future__ import annotations

import io
import json
from typing import Dict, List, Optional, Sequence, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .. import wire
from ..comm import SERVER, Envelope
from ..fl.config import RunConfig

RECORD = "tallytrain"
METRICS = "metrics"
# Message types: Flower routes "query", "train" and "evaluate" to the ClientApp
# handlers. A round is "train"; a method's in-round reply (applied, then the
# peer's model is evaluated) is "evaluate".
HELLO, ROUND, REPLY = "query", "train", "evaluate"
# Keys of the peer's node state (context.state), kept between rounds by Flower.
STATE_PARAMS, STATE_METHOD = "tallytrain.params", "tallytrain.method"


def config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def pack_envelopes(record: ConfigRecord, envelopes: Sequence[Envelope]) -> ConfigRecord:
    record["messages"] = [bytes(env.data) for env in envelopes]
    record["kinds"] = [int(env.expect) for env in envelopes]
    return record


def unpack_envelopes(record: ConfigRecord, sender, receiver) -> List[Envelope]:
    """The envelopes carried by ``record``, as the simulator would have built
    them; a malformed record is a WireFormatError like a malformed message."""
    try:
        messages, kinds = record["messages"], record["kinds"]
    except KeyError as exc:
        raise wire.WireFormatError(f"Flower record {RECORD!r} lacks {exc.args[0]!r}") from None
    if not isinstance(messages, list) or not isinstance(kinds, list):
        raise wire.WireFormatError(f"Flower record {RECORD!r}: messages and kinds must be lists")
    if len(messages) != len(kinds):
        raise wire.WireFormatError(
            f"Flower record {RECORD!r} holds {len(messages)} messages but {len(kinds)} kinds"
        )
    datas = [m for m in messages if isinstance(m, bytes)]
    codes = [k for k in kinds if isinstance(k, int)]
    if len(datas) != len(messages) or len(codes) != len(kinds):
        raise wire.WireFormatError(
            f"Flower record {RECORD!r}: messages must be bytes and kinds integers"
        )
    try:
        expected = [wire.MessageKind(k) for k in codes]
    except ValueError as exc:
        raise wire.WireFormatError(f"Flower record {RECORD!r}: {exc}") from None
    return [Envelope(sender, receiver, data, kind) for data, kind in zip(datas, expected)]


def integer(record: ConfigRecord, key: str) -> int:
    """``record[key]`` as an int; a list there is a WireFormatError."""
    value = record[key]
    if isinstance(value, list):
        raise wire.WireFormatError(f"Flower record entry {key!r} is a list, not a number")
    return int(value)


def _number(metrics: MetricRecord, key: str) -> float:
    value = metrics[key]
    if isinstance(value, list):
        raise wire.WireFormatError(f"Flower metric {key!r} is a list, not a number")
    return float(value)


def instruction(
    cfg_json: str, threads: int, round_index: int, peer: int, envelopes: Sequence[Envelope]
) -> RecordDict:
    record = ConfigRecord(
        {"round": round_index, "peer": peer, "config": cfg_json, "threads": threads}
    )
    return RecordDict({RECORD: pack_envelopes(record, envelopes)})


def scores_record(accuracy: float, perplexity: Optional[float] = None) -> MetricRecord:
    values: Dict[str, Union[int, float, List[int], List[float]]] = {"accuracy": float(accuracy)}
    if perplexity is not None:
        values["perplexity"] = float(perplexity)
    return MetricRecord(values)


def read_scores(content: RecordDict) -> tuple:
    """(accuracy, perplexity or None) from a node's reply."""
    metrics = content.metric_records[METRICS]
    return _number(metrics, "accuracy"), (
        _number(metrics, "perplexity") if "perplexity" in metrics else None
    )


def reply(
    peer: int, envelopes: Sequence[Envelope], accuracy: float, perplexity: Optional[float] = None
) -> RecordDict:
    if any(env.receiver != SERVER for env in envelopes):
        raise ValueError(
            "through Flower a peer sends only to the server; the method's uplink "
            "addressed another peer (is protocol.decentralized on?)"
        )
    record = pack_envelopes(ConfigRecord({"peer": peer}), envelopes)
    return RecordDict({RECORD: record, METRICS: scores_record(accuracy, perplexity)})


def hello(cfg_json: str, threads: int) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({"config": cfg_json, "threads": threads})})


# ---- the peer's state between rounds -------------------------------------------
def save_peer_state(state: RecordDict, params: dict, method_state: dict) -> None:
    """Own model parameters as an ArrayRecord, the method's state for this
    peer alone (Method.peer_state: e.g. its error-feedback residual) as
    torch-serialised bytes."""
    state[STATE_PARAMS] = ArrayRecord(torch_state_dict=params)
    buf = io.BytesIO()
    torch.save(method_state, buf)
    state[STATE_METHOD] = ConfigRecord({"state": buf.getvalue()})


def load_peer_state(state: RecordDict):
    """(params, method state) saved by :func:`save_peer_state`, or None on the
    peer's first round."""
    if STATE_PARAMS not in state.array_records:
        return None
    params = dict(state.array_records[STATE_PARAMS].to_torch_state_dict())
    blob = state.config_records[STATE_METHOD]["state"]
    if not isinstance(blob, bytes):
        raise wire.WireFormatError(f"Flower record {STATE_METHOD!r}: the state must be bytes")
    method_state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return params, method_state
