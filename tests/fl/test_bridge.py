"""The bridge variant (TallyTrain + sparse top-k merges with error feedback)
and FedAvg's merge periods."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tallytrain import ops, wire
from tallytrain.data import prepare
from tallytrain.fl import aggregate
from tallytrain.fl.config import DataConfig, ModelConfig, ProtocolConfig, TrainConfig
from tallytrain.fl.loop import Federation
from tallytrain.report import without_timing
from tests.fl import configs


# The default distillation steps (peers' and the server's), unlike the other modules.
tiny = functools.partial(
    configs.tiny,
    rounds=4,
    abstain_below=0.5,
    server_distill_steps=ProtocolConfig.server_distill_steps,
    train=TrainConfig(local_steps=3, batch_size=16, distill_batch_size=16),
)


@functools.lru_cache(maxsize=None)
def digits4():
    return prepare(DataConfig(alpha=0.5, min_shard_size=5), 4, 0)


def shared_views(fed: Federation) -> torch.Tensor:
    """Each peer's view of the shared model: anchor - residual (module docstring)."""
    return fed.method.anchor - fed.method.residual


def spy_on_merges(fed: Federation):
    """Record, for every reply, the peers' parameters before and after it and
    the decoded merged update."""
    seen = []
    apply_reply = fed.method.apply_reply

    def spy(r, inbox):
        before = fed.population.single_group.flatten().clone()
        apply_reply(r, inbox)
        update = next(iter(inbox.values()))[0]
        seen.append((r, before, fed.population.single_group.flatten().clone(), update))

    fed.method.apply_reply = spy
    return seen


# --------------------------------------------------------------------------- #
# error feedback
# --------------------------------------------------------------------------- #
def test_error_feedback_conserves_the_accumulated_change():
    """Op level: over many steps, everything sent plus the residual equals the
    sum of the inputs (nothing is lost, nothing is sent twice)."""
    g = torch.Generator().manual_seed(0)
    m, k = 1000, 13
    residual = torch.zeros(m, dtype=torch.float64)
    sent = torch.zeros(m, dtype=torch.float64)
    total = torch.zeros(m, dtype=torch.float64)
    for _ in range(25):
        x = torch.randn(m, generator=g, dtype=torch.float64)
        total += x
        idx, values = ops.topk_sparse_ef(x, residual, k)
        assert len(idx) == k
        sent.index_add_(0, idx, values)
    torch.testing.assert_close(sent + residual, total, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "protocol",
    [
        dict(merge_period=1, topk_fraction=0.02),
        dict(merge_period=2, topk_fraction=0.1, param_dtype="float16"),
        dict(merge_period=1, topk_fraction=0.05, participation=0.5),
        dict(
            merge_period=1, topk_fraction=0.05, adversarial_fraction=0.25, adversarial_mode="flip"
        ),
        dict(
            merge_period=1,
            topk_fraction=0.05,
            adversarial_fraction=0.25,
            adversarial_mode="random",
            param_dtype="float16",
        ),
    ],
)
def test_every_peer_keeps_the_same_view_of_the_shared_model(protocol):
    """Engine level: anchor - residual is one vector on every peer (what a
    peer sent, with its rounding, plus what it kept equals its accumulated
    change), and it moves by exactly the merged updates the server replied."""
    fed = Federation(tiny("bridge", rounds=4, **protocol), digits4())
    seen = spy_on_merges(fed)
    start = shared_views(fed)[0].clone()
    assert torch.equal(shared_views(fed), start.expand(4, -1))  # one common start
    expected = start.clone()
    for r in range(4):
        fed.run_round(r)
        for rr, _, _, update in seen:
            if rr == r:
                expected[update.indices] += update.values.float()
        views = shared_views(fed)
        # Peers agree with each other to float rounding (a forgotten float16
        # rounding error shows up as ~1e-5), and with start + sum of replies.
        torch.testing.assert_close(views, views[:1].expand(4, -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(views, expected.expand(4, -1), rtol=0, atol=1e-6)
        if seen:  # k < M: after a merge, something is held back
            assert float(fed.method.residual.abs().sum()) > 0
    assert len(seen) == (4 if protocol["merge_period"] == 1 else 2)


def test_merge_with_every_parameter_is_the_dense_weighted_average():
    fed = Federation(tiny("bridge", rounds=2, merge_period=1, topk_fraction=1.0), digits4())
    seen = spy_on_merges(fed)
    fed.run()
    assert len(seen) == 2
    for _, before, after, _update in seen:
        average = aggregate.weighted_average(before, fed.shard_sizes)
        torch.testing.assert_close(after, average.expand(4, -1), rtol=0, atol=2e-6)
    assert float(fed.method.residual.abs().max()) == 0.0


def test_bridge_without_merges_is_tallytrain_round_for_round():
    a = Federation(tiny("tallytrain", rounds=3), digits4())
    b = Federation(tiny("bridge", rounds=3, merge_period=0), digits4())
    a.run()
    b.run()

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "method"} for r in without_timing(rows)]

    assert strip(a.metrics) == strip(b.metrics)
    assert a.ledger.entries == b.ledger.entries
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            a.population.single_group.params.values(), b.population.single_group.params.values()
        )
    )


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_bridge_messages_are_sparse_and_counted(dtype, itemsize):
    fed = Federation(
        tiny("bridge", rounds=3, merge_period=2, topk_fraction=0.01, param_dtype=dtype), digits4()
    )
    fed.run()
    m, k = fed.population.single_group.num_params, fed.method.k
    assert k == -(-m // 100)
    sparse = [e for e in fed.ledger.entries if e.kind == "sparse_params"]
    up = [e for e in sparse if e.direction == "up"]
    down = [e for e in sparse if e.direction == "down"]
    # merges in round 1 (period 2) and round 2 (the last round); 4 peers each
    assert sorted({e.round for e in sparse}) == [1, 2]
    assert len(up) == len(down) == 2 * 4
    dense_bytes = wire.dense_message_bytes(m, getattr(torch, dtype))
    for e in up:
        assert e.bytes <= wire.sparse_message_max_bytes(k, m, getattr(torch, dtype))
        assert e.bytes < dense_bytes / 20
    for e in down:  # the merged update: at most the union of 4 peers' k entries
        assert e.bytes <= wire.sparse_message_max_bytes(4 * k, m, getattr(torch, dtype))


def test_fedavg_merge_period_keeps_peers_training_between_merges():
    fed = Federation(tiny("fedavg", rounds=5, merge_period=2), digits4())
    fed.run()
    dense = [e for e in fed.ledger.entries if e.kind == "dense_params"]
    # down at the start of each period (rounds 0, 2, 4), up at its end (1, 3) and the last round
    assert sorted({e.round for e in dense if e.direction == "down"}) == [0, 2, 4]
    assert sorted({e.round for e in dense if e.direction == "up"}) == [1, 3, 4]
    every = Federation(tiny("fedavg", rounds=5), digits4())
    every.run()
    assert fed.ledger.totals()["total"] * 5 == every.ledger.totals()["total"] * 3


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "feddf"])
def test_between_merges_peers_train_on_and_the_global_model_waits(method):
    """Merge period 3 over 3 rounds: the global model changes only in the
    merge round, while every round trains the peers further; FedProx pulls
    towards the period's global model throughout."""
    fed = Federation(tiny(method, rounds=3, merge_period=3, prox_mu=1.0), digits4())
    start = fed.method.global_params().clone()
    peers = []
    for r in range(3):
        fed.run_round(r)
        peers.append(fed.population.single_group.flatten().clone())
        if r < 2:
            assert torch.equal(fed.method.global_params(), start)
    assert not torch.equal(fed.method.global_params(), start)
    assert not torch.equal(peers[0], peers[1]) and not torch.equal(peers[1], peers[2])
    if method == "fedavg":
        average = aggregate.weighted_average(peers[2], fed.shard_sizes)
        torch.testing.assert_close(fed.method.global_params(), average, rtol=0, atol=1e-6)


def test_fedprox_anchor_is_the_periods_global_model():
    """With a strong proximal term, FedProx peers stay much closer to the
    period's global model over a whole period than FedAvg peers do."""
    drift = {}
    for method in ("fedavg", "fedprox"):
        fed = Federation(tiny(method, rounds=4, merge_period=4, prox_mu=50.0), digits4())
        start = fed.method.global_params().clone()
        for r in range(3):  # the period's rounds before its merge
            fed.run_round(r)
        drift[method] = float((fed.population.single_group.flatten() - start).norm(dim=1).mean())
    assert drift["fedprox"] < 0.5 * drift["fedavg"]


def test_periodic_selection_keeps_the_same_peers_for_a_period():
    fed = Federation(tiny("fedavg", rounds=4, merge_period=2, participation=0.5), digits4())
    fed.run()
    senders = {}
    for e in fed.ledger.entries:
        if e.direction == "up":
            senders.setdefault(e.round, set()).add(e.sender)
    received = {}
    for e in fed.ledger.entries:
        if e.direction == "down":
            received.setdefault(e.round, set()).add(e.receiver)
    assert senders[1] == received[0] and senders[3] == received[2]
    assert len(senders[1]) == 2


@pytest.mark.parametrize(
    "protocol, match",
    [
        (dict(method="fedavg", merge_period=0), "needs merge_period >= 1"),
        (
            dict(method="bridge", merge_period=2, decentralized=True),
            "decentralized mode works only",
        ),
    ],
)
def test_bad_merge_settings_are_refused(protocol, match):
    method = protocol.pop("method")
    with pytest.raises(ValueError, match=match):
        Federation(tiny(method, **protocol), digits4())


def test_bridge_refuses_mixed_architectures():
    cfg = dataclasses.replace(tiny("bridge"), model=ModelConfig(archs=("mlp", "cnn"), hidden=16))
    with pytest.raises(ValueError, match="averages parameters"):
        Federation(cfg, digits4())


def test_adversaries_corrupt_what_they_send_but_keep_honest_books(monkeypatch):
    """Round 0 is the same for an honest run and one with a flipping
    adversary until the uplink (nobody has distilled yet): the adversary
    sends exactly the negation of its honest change and keeps the same
    error-feedback residual as its honest twin."""
    sent = {}
    encode = wire.encode_sparse

    def spy(indices, values, size, **kw):
        if kw["sender"] != wire.SERVER:
            sent[(tag, kw["sender"])] = (indices.clone(), values.clone())
        return encode(indices, values, size, **kw)

    monkeypatch.setattr(wire, "encode_sparse", spy)
    feds = {}
    for tag, protocol in (
        ("honest", {}),
        ("flip", dict(adversarial_fraction=0.25, adversarial_mode="flip")),
    ):
        feds[tag] = Federation(
            tiny("bridge", rounds=2, merge_period=1, topk_fraction=0.05, **protocol), digits4()
        )
        feds[tag].run_round(0)
    adversary = int(feds["flip"].adversarial.nonzero()[0][0])
    idx_h, val_h = sent[("honest", adversary)]
    idx_f, val_f = sent[("flip", adversary)]
    assert torch.equal(idx_h, idx_f) and torch.equal(val_f, -val_h) and bool(val_h.abs().sum() > 0)
    for p in range(4):
        assert torch.equal(feds["flip"].method.residual[p], feds["honest"].method.residual[p])
        if p != adversary:
            assert torch.equal(sent[("flip", p)][1], sent[("honest", p)][1])


def test_random_adversary_values_stay_bounded():
    fed = Federation(
        tiny(
            "bridge",
            rounds=5,
            merge_period=1,
            topk_fraction=0.05,
            adversarial_fraction=0.25,
            adversarial_mode="random",
        ),
        digits4(),
    )
    fed.run()
    adversary = int(torch.nonzero(torch.from_numpy(fed.adversarial)).flatten()[0])
    honest = [p for p in range(4) if p != adversary]
    # Its residual is kept like an honest peer's: same order of magnitude.
    assert float(fed.method.residual[adversary].abs().max()) < 10 * float(
        fed.method.residual[honest].abs().max()
    )


@pytest.mark.parametrize("value", [2.5, True, -1])
def test_merge_period_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match="merge_period must be an integer >= 0"):
        ProtocolConfig(merge_period=value)


@pytest.mark.parametrize(
    "methods, settings, match",
    [
        (("..",), {"..": {"method": "fedavg"}}, "not only dots"),
        (("a/b",), {}, "must use letters"),
        (
            ("x",),
            {"x": {"method": "fedavg", "protocol": {"merge_periods": 2}}},
            "unknown protocol fields: merge_periods",
        ),
        (
            ("x",),
            {"x": {"method": "fedavg", "protocol": {"merge_period": 2.5}}},
            "merge_period must be an integer",
        ),
        (("x",), {"y": {"method": "fedavg"}}, "which methods does not list"),
    ],
)
def test_compare_settings_are_validated(methods, settings, match):
    from tallytrain.fl.config import CompareConfig

    with pytest.raises(ValueError, match=match):
        CompareConfig(methods=methods, settings=settings)


def test_compare_settings_are_copied():
    from tallytrain.fl.config import CompareConfig

    settings = {"f": {"method": "fedavg", "protocol": {"merge_period": 2}}}
    cfg = CompareConfig(methods=("f",), settings=settings)
    settings["f"]["protocol"]["merge_period"] = 7
    cfg.to_dict()["settings"]["f"]["protocol"]["merge_period"] = 9
    assert cfg.run("f", 0).protocol.merge_period == 2
    assert CompareConfig.from_dict(cfg.to_dict()) == cfg
