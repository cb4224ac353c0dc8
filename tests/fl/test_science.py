"""The mechanisms of tallytrain's recipe (docs/protocol.md §2), each with a
test that fails when the mechanism is broken: consensus memory, support-aware
abstention (by label and by input), votes from local-only models, reputation
weights, and the distillation schedule."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tallytrain.data import prepare
from tallytrain.fl.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, TrainConfig
from tallytrain.fl.loop import Federation, load_checkpoint, save_checkpoint
from tallytrain.fl.support import LocalSupport


def config(method="tallytrain", rounds=4, peers=4, train=None, **protocol) -> RunConfig:
    proto = dict(probes_per_round=60, abstain_below=0.5)
    proto.update(protocol)
    return RunConfig(
        method=method,
        peers=peers,
        rounds=rounds,
        data=DataConfig(alpha=0.3, min_shard_size=5),
        model=ModelConfig(hidden=16),
        train=train or TrainConfig(local_steps=10, batch_size=16, distill_batch_size=16),
        protocol=ProtocolConfig(**proto),
    )


@functools.lru_cache(maxsize=None)
def data(peers=4):
    return prepare(DataConfig(alpha=0.3, min_shard_size=5), peers, 0)


def run(cfg):
    fed = Federation(cfg, data(cfg.peers))
    fed.run()
    return fed


# ---- consensus memory --------------------------------------------------------
def test_memory_holds_earlier_rounds_and_max_age_one_only_the_latest():
    """With memory a peer distills on every kept label it has received (more
    probes than one round holds); with memory_max_age=1 only on the latest
    round's kept labels, exactly the consensus it just received."""
    kept = run(config(rounds=4))
    latest = run(config(rounds=4, memory_max_age=1))
    pool = len(data().y_probe)
    held = [r["memory_fraction"] * pool for r in kept.metrics]
    held_latest = [r["memory_fraction"] * pool for r in latest.metrics]
    assert max(held_latest) <= 60 < len(data().y_probe)
    assert held[-1] > held_latest[-1] and held[-1] >= max(held[:-1])
    idx, _ = kept.method.memory[0].labels()
    last = set(kept.probe_indices(kept.cfg.rounds - 2).tolist())
    assert set(idx.tolist()) - last  # labels of earlier rounds are still held
    # the latest round's kept labels are what a max_age=1 peer holds
    m = latest.method.memory[0]
    idx, labels = m.labels()
    assert set(idx.tolist()) <= set(latest.probe_indices(latest.cfg.rounds - 2).tolist())


def test_memory_survives_checkpoint_and_resume(tmp_path):
    cfg = config(rounds=4)
    whole = run(cfg)
    first = Federation(cfg, data())
    first.run_round(0)
    first.run_round(1)
    path = str(tmp_path / "ck.pt")
    save_checkpoint(first, path)
    resumed = Federation(cfg, data())
    load_checkpoint(resumed, path)
    assert {p: m.labels()[1].tolist() for p, m in resumed.method.memory.items()} == {
        p: m.labels()[1].tolist() for p, m in first.method.memory.items()
    }
    resumed.run()
    assert [r["accuracy"] for r in resumed.metrics] == [r["accuracy"] for r in whole.metrics]
    for p in whole.method.memory:
        assert torch.equal(resumed.method.memory[p].labels()[1], whole.method.memory[p].labels()[1])


def test_memory_follows_what_each_peer_received_under_partial_participation():
    fed = run(config(rounds=5, participation=0.5))
    sizes = {p: len(m) for p, m in fed.method.memory.items()}
    assert len(set(sizes.values())) > 1  # peers that missed rounds hold less


# ---- support-aware abstention ------------------------------------------------
def brute_force_backed(x_shard, y_shard, x_probe, labels, min_count, quantile):
    """The support rules of fl/support.py, written out pair by pair."""
    xs = x_shard.reshape(len(x_shard), -1).double()
    xp = x_probe.reshape(len(x_probe), -1).double()
    nn = []
    for i in range(len(xs)):
        same = [
            float((xs[i] - xs[j]).norm())
            for j in range(len(xs))
            if j != i and y_shard[j] == y_shard[i]
        ]
        if same:
            nn.append(min(same))
    radius = float(torch.quantile(torch.tensor(nn), quantile))
    out = []
    for i, lab in enumerate(labels.tolist()):
        if lab < 0 or int((y_shard == lab).sum()) < min_count:
            out.append(False)
            continue
        d = min(float((xp[i] - xs[j]).norm()) for j in range(len(xs)) if y_shard[j] == lab)
        out.append(d <= radius * (1 + 1e-6))
    return torch.tensor(out)


@pytest.mark.parametrize("min_count, quantile", [(1, 0.8), (3, 0.5), (1, 1.0)])
def test_support_test_matches_brute_force(min_count, quantile):
    g = torch.Generator().manual_seed(min_count)
    x = torch.randn(60, 2, 3, generator=g)
    y = torch.randint(0, 5, (60,), generator=g)
    y[0] = 7  # a class with one sample: no neighbour, still a support
    xp = torch.randn(80, 2, 3, generator=g) * 1.5
    labels = torch.randint(-1, 9, (80,), generator=g)
    s = LocalSupport(x, y, 9, min_count, quantile)
    assert torch.equal(
        s.backed(xp, labels), brute_force_backed(x, y, xp, labels, min_count, quantile)
    )


def test_support_far_probe_is_not_backed_and_integer_inputs_use_labels_only():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    s = LocalSupport(x, y, 3, 1, 1.0)
    probes = torch.tensor([[0.05, 0.0], [3.0, 3.0], [0.0, 0.0]])
    assert s.backed(probes, torch.tensor([0, 1, 2])).tolist() == [True, False, False]
    tokens = LocalSupport(torch.zeros(4, 2, dtype=torch.int64), y, 3, 1, 1.0)
    assert tokens.radius is None
    assert tokens.backed(
        torch.zeros(3, 2, dtype=torch.int64), torch.tensor([0, 1, 2])
    ).tolist() == [
        True,
        True,
        False,
    ]


def test_support_aware_abstention_raises_consensus_accuracy():
    """Without support-aware abstention peers vouch for classes and probes
    their shard does not back; the kept consensus is less accurate."""
    on = run(config(rounds=5, votes_from="distilled"))
    off = run(config(rounds=5, votes_from="distilled", support_min=0, support_radius=None))

    def acc(fed):
        return sum(r["consensus_acc"] or 0 for r in fed.metrics[1:]) / (len(fed.metrics) - 1)

    assert acc(on) > acc(off)


# ---- votes from local-only models ----------------------------------------------
def test_local_voters_are_the_local_baselines_models():
    """A peer's voting model is what `local` would train: same initialisation,
    same shard, same minibatches, untouched by the consensus."""
    tt = run(config(rounds=3, votes_from="local"))
    loc = run(config(method="local", rounds=3))
    for a, b in zip(tt.method.voters.groups, loc.population.groups):
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k])
    # and the distilled models are not
    assert not all(
        torch.equal(a.params[k], b.params[k])
        for a, b in zip(tt.population.groups, loc.population.groups)
        for k in a.params
    )


def test_local_first_falls_back_to_the_distilled_vote_only_where_local_abstains():
    fed = run(config(rounds=3, votes_from="local-first"))
    r = fed.cfg.rounds - 1
    x = fed.data.x_probe[fed.probe_indices(r)]
    for p, votes in fed.method._votes.items():
        local = fed.method.voters.predict(x, [p])[0]
        prob, lab = torch.softmax(local.double(), -1).max(-1)
        backed = fed.method.support[p].backed(x, lab)
        local_vote = torch.where((prob >= 0.5) & backed, lab, -1)
        sent = votes.labels()
        assert torch.equal(sent[local_vote >= 0], local_vote[local_vote >= 0])


# ---- reputation ------------------------------------------------------------------
def test_reputation_weighs_a_peer_that_always_disagrees_to_zero():
    fed = run(config(rounds=4, peers=5, adversarial_fraction=0.2, adversarial_mode="flip"))
    weights = fed.method.reputation_weights(range(5))
    bad = int(torch.nonzero(torch.as_tensor(fed.adversarial)).flatten()[0])
    assert int(weights[bad]) == 0
    assert all(int(w) > 0 for p, w in enumerate(weights) if p != bad)
    off = run(
        config(
            rounds=4, peers=5, adversarial_fraction=0.2, adversarial_mode="flip", reputation=False
        )
    )
    assert off.method.reputation_weights(range(5)) is None


def test_a_probe_only_untrusted_voters_decided_is_not_kept():
    # min_votes counts votes at their peer's reputation: with 0.25, a probe
    # that only a near-chance voter decided stays out of the consensus,
    # one a trusted peer decided alone is kept.
    from tallytrain.fl.methods.tallytrain import REPUTATION_SCALE, quorum_weight
    from tallytrain.votes import Votes

    fed = Federation(config(peers=3), data(3))
    method = fed.method
    method.votes_judged[:] = torch.tensor([100, 100, 100])
    method.votes_agreed[:] = torch.tensor([99, 98, 20])  # peer 2: little above chance (1/10)
    weights = method.reputation_weights([0, 1, 2])
    assert int(weights[0]) == REPUTATION_SCALE and 0 < int(weights[2]) < REPUTATION_SCALE // 4
    c = fed.num_classes

    def votes(labels):
        return Votes.from_labels(torch.tensor(labels), c, abstain=True)

    # probe 0: only peer 2 votes; probe 1: only peer 0; probe 2: peers 0 and 2 disagree
    consensus = method._tally({0: votes([-1, 3, 4]), 1: votes([-1, -1, -1]), 2: votes([7, -1, 5])})
    assert consensus.keep.tolist() == [False, True, True]
    assert consensus.labels.tolist()[1:] == [3, 4]
    assert quorum_weight(ProtocolConfig()) == REPUTATION_SCALE // 4  # the default, 0.25
    assert quorum_weight(ProtocolConfig(min_votes=0.25, reputation=False)) == 1
    loose = Federation(config(peers=3, min_votes=0.01), data(3)).method
    loose.votes_judged[:], loose.votes_agreed[:] = method.votes_judged, method.votes_agreed
    assert loose._tally({0: votes([-1]), 1: votes([-1]), 2: votes([7])}).keep.tolist() == [True]


def test_low_records_everywhere_do_not_silence_the_federation():
    # When every peer's record is low (a hard start), absolute weights would
    # all sit below the quorum: no probe kept, no record judged, forever.
    # The most reputable peer is credited TRUST_FLOOR; the ranking stays.
    from tallytrain.fl.methods.tallytrain import REPUTATION_SCALE, TRUST_FLOOR, quorum_weight
    from tallytrain.votes import Votes

    fed = Federation(config(peers=3), data(3))
    method = fed.method
    method.votes_judged[:] = torch.tensor([100, 100, 100])
    method.votes_agreed[:] = torch.tensor([20, 15, 5])  # skill 0.12, 0.06, below chance
    weights = method.reputation_weights([0, 1, 2]).tolist()
    assert weights[0] == round(TRUST_FLOOR * REPUTATION_SCALE) >= quorum_weight(fed.cfg.protocol)
    assert weights[0] > weights[1] > weights[2] == 0
    c = fed.num_classes
    kept = method._tally({0: Votes.from_labels(torch.tensor([3]), c, abstain=True)}).keep
    assert kept.tolist() == [True]
    # At or above the floor nothing is rescaled.
    method.votes_agreed[:] = torch.tensor([60, 15, 5])
    share = 61 / 102
    expected = round((share - 1 / c) / (1 - 1 / c) * REPUTATION_SCALE)
    assert method.reputation_weights([0]).tolist() == [expected]
    # Two classes: a fresh record is chance-level for everyone; all weigh the floor.
    two = DataConfig(dataset="synthetic", num_classes=2, samples_per_class=60, min_shard_size=5)
    cfg = dataclasses.replace(config(peers=3, probes_per_round=8), data=two)
    binary = Federation(cfg, prepare(two, 3, 0)).method
    assert binary.reputation_weights([0, 1, 2]).tolist() == [8, 8, 8]


# ---- schedule --------------------------------------------------------------------
def test_distillation_batch_grows_with_the_pool_within_bounds():
    fed = Federation(
        config(
            train=TrainConfig(
                local_steps=10, distill_batch_size=16, distill_epochs=5, distill_batch_max=200
            )
        ),
        data(),
    )
    assert fed.distill_batch(10, 10) == 16  # at least distill_batch_size
    assert fed.distill_batch(100, 10) == 50  # 5 passes over 100 targets in 10 steps
    assert fed.distill_batch(10_000, 10) == 200  # at most distill_batch_max
    fixed = Federation(config(train=TrainConfig(distill_batch_size=16, distill_epochs=0)), data())
    assert fixed.distill_batch(10_000, 10) == 16


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("support_radius", 1.5, "support_radius must be in"),
        ("support_min", -1, "support_min must be >= 0"),
        ("memory_max_age", -2, "memory_max_age must be >= 0"),
        ("votes_from", "nobody", "votes_from must be one of"),
    ],
)
def test_bad_recipe_values_are_refused_by_name(flag, value, message):
    with pytest.raises(ValueError, match=message):
        ProtocolConfig(**{flag: value})
