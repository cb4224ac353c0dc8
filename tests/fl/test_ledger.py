"""The ledger and channel, and the bytes of real runs against closed forms."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from tallytrain import wire
from tallytrain.comm import SERVER, Channel, Envelope, Ledger
from tallytrain.data import prepare
from tallytrain.fl.config import DataConfig, RunConfig
from tallytrain.fl.loop import Federation
from tallytrain.models import build_model, num_params
from tallytrain.ops import packed_size
from tests.fl import configs


tiny = functools.partial(
    configs.tiny, probes_per_round=37, train=dataclasses.replace(configs.TRAIN, local_steps=2)
)


@functools.lru_cache(maxsize=None)
def data_for(peers: int):
    return prepare(DataConfig(alpha=0.5, min_shard_size=5), peers, 0)


def run(cfg: RunConfig) -> Federation:
    fed = Federation(cfg, data_for(cfg.peers))
    fed.run()
    return fed


# --------------------------------------------------------------------------- #
# the ledger itself
# --------------------------------------------------------------------------- #
def test_directions_and_totals():
    led = Ledger()
    led.record(0, 1, SERVER, "votes", 10)
    led.record(0, SERVER, 1, "control", 7)
    led.record(1, 0, 2, "votes", 5)
    assert [e.direction for e in led.entries] == ["up", "down", "p2p"]
    assert led.totals(0) == {
        "up": 10,
        "down": 7,
        "p2p": 0,
        "uplink": 10,
        "downlink": 7,
        "total": 17,
    }
    assert led.totals() == {"up": 10, "down": 7, "p2p": 5, "uplink": 15, "downlink": 7, "total": 22}
    assert led.by("round") == {(0,): 17, (1,): 5}
    led.truncate(1)
    assert led.totals()["total"] == 17


def test_rejects_impossible_entries():
    led = Ledger()
    with pytest.raises(ValueError, match="itself"):
        led.record(0, 2, 2, "votes", 1)
    with pytest.raises(ValueError, match="peer"):
        led.record(0, SERVER, SERVER, "votes", 1)
    with pytest.raises(ValueError, match="nbytes"):
        led.record(0, 1, SERVER, "votes", -1)


def test_csv_and_state_round_trip():
    led = Ledger()
    led.record(3, 2, SERVER, "votes", 40)
    led.record(3, SERVER, 2, "control", 44)
    text = led.to_csv({"method": "m", "seed": 1})
    assert text.splitlines() == [
        "method,seed,round,sender,receiver,direction,kind,bytes",
        "m,1,3,2,server,up,votes,40",
        "m,1,3,server,2,down,control,44",
    ]
    assert Ledger.from_state(led.state_dict()).entries == led.entries


# --------------------------------------------------------------------------- #
# the channel: decode on delivery, count real lengths, refuse protocol errors
# --------------------------------------------------------------------------- #
def _votes(round_=0, sender=1):
    packed = torch.zeros(packed_size(5, 10), dtype=torch.uint8)
    return wire.encode_votes(packed, 5, 10, round=round_, sender=sender)


def test_channel_counts_len_of_the_real_message():
    led = Ledger()
    out = Channel(led).deliver(0, [Envelope(1, SERVER, _votes(), wire.MessageKind.VOTES)])
    assert out[0][1].kind == wire.MessageKind.VOTES
    assert led.entries[0].bytes == len(_votes()) == wire.votes_message_bytes(5, 10)
    assert led.entries[0].kind == "votes"


@pytest.mark.parametrize(
    "env, match",
    [
        (
            Envelope(1, SERVER, _votes(round_=1), wire.MessageKind.VOTES),
            "round 1, expected round 0",
        ),
        (Envelope(2, SERVER, _votes(sender=1), wire.MessageKind.VOTES), "sender id 1"),
        (Envelope(1, SERVER, _votes(), wire.MessageKind.CONTROL), "unexpected kind"),
        (Envelope(1, SERVER, _votes()[:-1], wire.MessageKind.VOTES), "truncated"),
    ],
)
def test_channel_refuses_what_the_protocol_does_not_expect(env, match):
    led = Ledger()
    with pytest.raises(wire.WireFormatError, match=match):
        Channel(led).deliver(0, [env])
    assert led.entries == []


# --------------------------------------------------------------------------- #
# real runs against closed forms
# --------------------------------------------------------------------------- #
def _per(led: Ledger, kind: str, direction: str):
    return [e for e in led.entries if e.kind == kind and e.direction == direction]


@pytest.mark.parametrize(
    "abstain, threshold, quorum, reputation",
    [
        (None, 0.0, 1, False),
        (0.9, 0.0, 1, False),
        (0.9, 0.5, 1, True),
        (None, 0.0, 2, False),
        (None, 0.0, 0.5, True),
    ],
)
def test_tallytrain_bytes_match_closed_forms(abstain, threshold, quorum, reputation):
    cfg = tiny(
        "tallytrain",
        abstain_below=abstain,
        agreement_threshold=threshold,
        min_votes=quorum,
        reputation=reputation,
    )
    fed = run(cfg)
    n, c, p, rounds = 37, 10, cfg.peers, cfg.rounds
    symbols = c + 1 if abstain is not None else c
    b = math.ceil(math.log2(symbols))
    votes = _per(fed.ledger, "votes", "up")
    assert len(votes) == p * rounds
    # uplink per peer per round = header + ceil(N*b/8)
    assert {e.bytes for e in votes} == {wire.OVERHEAD + math.ceil(n * b / 8)}
    controls = _per(fed.ledger, "control", "down")
    assert len(controls) == p * rounds
    # the keep mask travels when the tally filters: a share threshold, or a
    # quorum above one weight unit (min_votes in fully trusted votes)
    keep = threshold > 0 or quorum * (16 if reputation else 1) > 1
    consensus = wire.consensus_message_bytes(n, c, keep=keep)
    for e in controls:
        expect = wire.control_message_bytes(consensus if e.round > 0 else 0)
        assert e.bytes == expect
    assert fed.ledger.totals()["total"] == sum(e.bytes for e in votes + controls)
    last = fed.metrics[-1]
    assert last["cum_bytes"] == fed.ledger.totals()["total"]
    assert last["bytes_up"] == p * (wire.OVERHEAD + math.ceil(n * b / 8))


def test_decentralized_counts_every_link():
    cfg = tiny("tallytrain", decentralized=True)
    fed = run(cfg)
    p, rounds = cfg.peers, cfg.rounds
    votes = _per(fed.ledger, "votes", "p2p")
    assert len(votes) == rounds * p * (p - 1) and len(fed.ledger.entries) == len(votes)
    assert {e.bytes for e in votes} == {wire.votes_message_bytes(37, 10, abstain=True)}
    t = fed.ledger.totals()
    assert t["downlink"] == 0 and t["uplink"] == t["total"] == sum(e.bytes for e in votes)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_softlabel_bytes_match_closed_forms(dtype, itemsize):
    cfg = tiny("softlabel", softlabel_dtype=dtype)
    fed = run(cfg)
    up = _per(fed.ledger, "soft_labels", "up")
    down = _per(fed.ledger, "soft_labels", "down")
    assert {e.bytes for e in up} == {wire.OVERHEAD + 37 * 10 * itemsize}
    assert len(up) == cfg.peers * cfg.rounds and len(down) == cfg.peers * (cfg.rounds - 1)
    assert {e.bytes for e in down} == {
        wire.soft_labels_message_bytes(37, 10, getattr(torch, dtype))
    }


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "feddf"])
def test_parameter_methods_send_the_whole_model_both_ways(method):
    cfg = tiny(method)
    fed = run(cfg)
    m = num_params(build_model("mlp", (1, 8, 8), 10, 16))
    size = wire.dense_message_bytes(m)
    for direction in ("up", "down"):
        entries = _per(fed.ledger, "dense_params", direction)
        assert len(entries) == cfg.peers * cfg.rounds
        assert {e.bytes for e in entries} == {size}


def test_local_sends_nothing():
    fed = run(tiny("local"))
    assert fed.ledger.entries == [] and fed.metrics[-1]["cum_bytes"] == 0


def test_partial_participation_only_selected_peers_talk():
    cfg = tiny("tallytrain", participation=0.5)
    fed = run(cfg)
    for r in range(cfg.rounds):
        senders = {e.sender for e in fed.ledger.entries if e.round == r and e.direction == "up"}
        assert len(senders) == 2
