"""Aggregation math, adversaries, the registry, the batched optimizer, and
each method's behaviour on tiny federations."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from tallytrain.data import prepare
from tallytrain.fl import adversary, aggregate, methods
from tallytrain.fl.config import DataConfig, TrainConfig
from tallytrain.fl.loop import Federation
from tallytrain.fl.peer import (
    Batches,
    StackedAdam,
    draw_batches,
    hard_label_loss,
    make_group,
    soft_label_loss,
)
from tallytrain.fl.registry import get_method, method_names
from tests.fl import configs

ALL = method_names()


tiny = functools.partial(configs.tiny, rounds=2)


@functools.lru_cache(maxsize=None)
def digits4():
    return prepare(DataConfig(alpha=0.5, min_shard_size=5), 4, 0)


# --------------------------------------------------------------------------- #
# aggregation math
# --------------------------------------------------------------------------- #
def test_weighted_average_by_hand():
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0]])
    out = aggregate.weighted_average(v, [1, 3, 0])
    assert torch.allclose(out, torch.tensor([2.5, 5.0]))
    assert torch.equal(aggregate.weighted_average(v[:1], [7]), v[0])


@pytest.mark.parametrize(
    "weights, match",
    [([1, 2], "one entry per row"), ([0, 0, 0], "positive sum"), ([1, -1, 1], ">= 0")],
)
def test_weighted_average_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        aggregate.weighted_average(torch.zeros(3, 2), weights)


def test_average_and_sharpen():
    p = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])
    avg = aggregate.average_probs(p)
    assert torch.allclose(avg, torch.tensor([[0.4, 0.6]]))
    sharp = aggregate.sharpen(avg, 0.1)  # DS-FL: softmax(avg / T)
    e = torch.exp(torch.tensor([4.0, 6.0]))
    assert torch.allclose(sharp, (e / e.sum())[None])
    assert float(sharp[0, 1]) > 0.6
    with pytest.raises(ValueError, match="temperature"):
        aggregate.sharpen(avg, 0.0)


def test_consensus_threshold_and_empty_probes():
    label = torch.tensor([3, 1, 0, -1])
    count = torch.tensor([2, 3, 1, 0])
    total = torch.tensor([4, 4, 3, 0])
    c = aggregate.consensus(label, count, total, threshold=0.5)
    assert c.labels.tolist() == [3, 1, 0, -1]
    assert c.keep.tolist() == [True, True, False, False]  # exactly half is kept at 0.5
    assert torch.allclose(c.agreement, torch.tensor([0.5, 0.75, 1 / 3, 0.0]))
    assert aggregate.mean_agreement(c) == pytest.approx((0.5 + 0.75 + 1 / 3) / 3)
    assert aggregate.consensus(label, count, total, 0.0).keep.tolist() == [True, True, True, False]
    assert aggregate.consensus(label, count, total, 0.0, min_votes=2).keep.tolist() == [
        True,
        True,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="min_votes"):
        aggregate.consensus(label, count, total, 0.0, min_votes=0)
    truth = torch.tensor([3, 2, 0, 5])
    assert aggregate.labels_accuracy(c.labels, truth, c.keep) == 0.5
    assert aggregate.labels_accuracy(c.labels, truth) == pytest.approx(2 / 3)
    assert aggregate.labels_accuracy(c.labels, truth, torch.zeros(4, dtype=torch.bool)) is None


def test_share_agreeing():
    peers = torch.tensor([[1, 2, 3], [1, 0, 3]])
    assert aggregate.share_agreeing(peers, torch.tensor([1, 2, 0])) == pytest.approx(0.5)


# --------------------------------------------------------------------------- #
# adversaries
# --------------------------------------------------------------------------- #
def test_adversaries():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 3, 9])
    assert adversary.corrupt_labels(labels, 10, "flip", g).tolist() == [9, 6, 0]
    r = adversary.corrupt_labels(torch.zeros(500, dtype=torch.int64), 10, "random", g)
    assert r.min() >= 0 and r.max() <= 9 and len(set(r.tolist())) == 10
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert torch.equal(adversary.corrupt_probs(probs, "flip", g), torch.tensor([[0.1, 0.2, 0.7]]))
    rp = adversary.corrupt_probs(torch.zeros(50, 4), "random", g)
    assert torch.allclose(rp.sum(-1), torch.ones(50)) and (rp >= 0).all()
    v, ref = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    assert torch.equal(adversary.corrupt_params(v, ref, "flip", g), torch.tensor([0.0, -1.0]))
    honest = 3.0 + 2.0 * torch.randn(1000, generator=g)
    a, b, c = (
        adversary.corrupt_params(honest, ref, "random", torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    # noise with the honest vector's mean and spread, unrelated to its values
    assert abs(float(a.mean()) - 3.0) < 0.3 and abs(float(a.std()) - 2.0) < 0.2
    assert abs(float(torch.corrcoef(torch.stack([a, honest]))[0, 1])) < 0.1
    with pytest.raises(ValueError, match="mode"):
        adversary.corrupt_labels(labels, 10, "nope", g)


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
def test_registry_finds_every_method_and_lists_known_ones_on_error():
    # One module per method (tallytrain/fl/methods/<name>.py, a "-" in the
    # name spelled "_"): a module that fl/methods/__init__.py forgets to
    # import is missing from the registry.
    folder = os.path.dirname(methods.__file__)
    modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py")} - {"__init__", "base"}
    assert {name.replace("-", "_") for name in method_names()} == modules
    assert get_method("tallytrain").name == "tallytrain"
    with pytest.raises(ValueError) as info:
        get_method("fedsgd")
    assert str(info.value) == "unknown method 'fedsgd'; known methods: " + ", ".join(ALL)


# --------------------------------------------------------------------------- #
# batched training
# --------------------------------------------------------------------------- #
def test_stacked_adam_matches_torch_adam_and_skips_inactive_rows():
    torch.manual_seed(0)
    w = torch.randn(2, 5)
    grads = [torch.randn(2, 5) for _ in range(4)]
    ref = w[0].clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.01)
    mine = {"w": w.clone()}
    adam = StackedAdam(mine, lr=0.01)
    for i, g in enumerate(grads):
        ref.grad = g[0].clone()
        opt.step()
        mine["w"].grad = g.clone()
        adam.step(mine, torch.tensor([True, i < 1]))  # row 1 stops after one step
    assert torch.allclose(mine["w"][0], ref.detach(), atol=1e-6)
    one = {"w": w.clone()}
    single = StackedAdam(one, lr=0.01)
    one["w"].grad = grads[0].clone()
    single.step(one, torch.tensor([True, True]))
    assert torch.allclose(mine["w"][1], one["w"][1])


def test_batched_peers_train_exactly_like_separate_peers():
    data = digits4()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    group = make_group("mlp", [0, 1, 2], (1, 8, 8), 10, 16, gens())
    pools = [torch.from_numpy(s) for s in data.shards[:3]]
    steps = [4, 2, 3]
    idx = draw_batches(pools, steps, 8, [torch.Generator().manual_seed(9 + i) for i in range(3)])
    group.fit(
        torch.arange(3),
        steps,
        [Batches(idx, data.x_train, data.y_train, hard_label_loss, 1.0)],
        0.01,
    )
    for i in range(3):
        alone = make_group("mlp", [i], (1, 8, 8), 10, 16, [gens()[i]])
        alone.fit(
            torch.tensor([0]),
            [steps[i]],
            [Batches(idx[i : i + 1, : steps[i]], data.x_train, data.y_train, hard_label_loss, 1.0)],
            0.01,
        )
        for k in group.params:
            assert torch.allclose(group.params[k][i], alone.params[k][0], atol=1e-5), k


def test_soft_label_loss_is_zero_at_the_target_and_scaled_by_t_squared():
    logits = torch.randn(2, 5, 4)
    for t in (1.0, 3.0):
        target = torch.softmax(logits / t, -1)
        assert float(soft_label_loss(t)(logits, target)) == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((2, 5, 4), 0.25)
    assert float(soft_label_loss(2.0)(logits, uniform)) > 0


# --------------------------------------------------------------------------- #
# methods on tiny federations
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", ALL)
def test_every_method_runs_and_reports(method):
    fed = Federation(tiny(method, abstain_below=None, agreement_threshold=0.0), digits4())
    fed.run()
    row = fed.metrics[-1]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["round"] == 1
    assert (row["global_acc"] is not None) == (method in ("fedavg", "fedprox", "feddf"))
    has_consensus = method in ("feddf", "softlabel", "softlabel-topk", "tallytrain", "bridge")
    assert (row["consensus_acc"] is not None) == has_consensus
    assert (row["agreement"] is not None) == has_consensus


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "feddf"])
def test_parameter_methods_refuse_mixed_architectures(method):
    with pytest.raises(ValueError, match="averages parameters.*same architecture.*mlp,cnn"):
        Federation(tiny(method, archs=("mlp", "cnn")), digits4())


@pytest.mark.parametrize("method", ["tallytrain", "softlabel", "local"])
def test_distillation_methods_run_mixed_architectures(method):
    fed = Federation(tiny(method, archs=("mlp", "cnn", "mlp1")), digits4())
    assert [g.arch for g in fed.population.groups] == ["mlp", "cnn", "mlp1"]
    fed.run()
    assert fed.metrics[-1]["peer_acc_min"] >= 0.0


def test_fedavg_peers_start_each_round_from_the_global_model():
    fed = Federation(tiny("fedavg", rounds=1), digits4())
    start = fed.method.global_params().clone()
    fed.run()
    # the new global model is the sample-weighted mean of the peers' models
    flat = fed.population.single_group.flatten()
    expect = aggregate.weighted_average(flat, fed.shard_sizes)
    assert torch.allclose(fed.method.global_params(), expect, atol=1e-6)
    assert not torch.allclose(start, expect)


def test_fedprox_pulls_peers_towards_the_global_model():
    drift = {}
    for mu in (0.0, 50.0):
        cfg = tiny("fedprox", rounds=1, prox_mu=mu)
        fed = Federation(cfg, digits4())
        start = fed.method.global_params().clone()
        fed.run()
        drift[mu] = float((fed.population.single_group.flatten() - start).norm(dim=1).mean())
    assert drift[50.0] < 0.5 * drift[0.0]


def test_feddf_distillation_changes_the_averaged_model():
    fed = Federation(tiny("feddf", rounds=1), digits4())
    fed.run()
    avg = aggregate.weighted_average(fed.population.single_group.flatten(), fed.shard_sizes)
    assert not torch.allclose(fed.method.global_params(), avg)


def test_roles_undertrained_and_adversarial_are_disjoint_and_counted():
    train = TrainConfig(
        local_steps=5,
        undertrained_fraction=0.5,
        undertrained_steps=1,
        batch_size=16,
        distill_batch_size=16,
    )
    fed = Federation(tiny("tallytrain", train=train, adversarial_fraction=0.25), digits4())
    assert fed.adversarial.sum() == 1 and fed.undertrained.sum() == 2
    assert not (fed.adversarial & fed.undertrained).any()
    assert sorted(fed.local_steps) == [1, 1, 5, 5]


def test_undertrained_peers_move_less():
    train = TrainConfig(
        local_steps=8,
        undertrained_fraction=0.5,
        undertrained_steps=1,
        batch_size=16,
        distill_batch_size=16,
    )
    fed = Federation(tiny("local", rounds=1, train=train), digits4())
    before = fed.population.single_group.flatten().clone()
    fed.run()
    moved = (fed.population.single_group.flatten() - before).norm(dim=1)
    assert float(moved[fed.undertrained].max()) < float(moved[~fed.undertrained].min())


@pytest.mark.parametrize("method", ["tallytrain", "softlabel"])
def test_flipping_adversaries_hurt_the_consensus(method):
    def consensus_acc(fraction):
        train = TrainConfig(local_steps=15, batch_size=16, distill_batch_size=16)
        fed = Federation(
            tiny(
                method,
                rounds=2,
                train=train,
                adversarial_fraction=fraction,
                adversarial_mode="flip",
                abstain_below=None,
                agreement_threshold=0.0,
            ),
            digits4(),
        )
        fed.run()
        return fed.metrics[-1]["consensus_acc"]

    bad, clean = consensus_acc(1.0), consensus_acc(0.0)
    # tallytrain: peers that agree with nobody weigh 0, so nothing may be kept
    # at all (None), which is the consensus hurt too
    assert bad is None or bad < clean


@pytest.mark.parametrize("votes_from", ["local", "local-first", "distilled"])
def test_adversaries_among_peers_that_never_abstain(votes_from):
    # Without the threshold and the support test no vote abstains: honest and
    # adversarial peers must send the same stream (C symbols), or the tally
    # refuses the round (a bug once: only local-first votes had C + 1).
    cfg = tiny(
        "tallytrain",
        rounds=2,
        adversarial_fraction=0.25,
        adversarial_mode="flip",
        abstain_below=None,
        support_min=0,
        support_radius=None,
        votes_from=votes_from,
    )
    fed = Federation(cfg, digits4())
    fed.run()
    assert fed.adversarial.sum() == 1
    assert {v.abstain for v in fed.method._votes.values()} == {False}
    assert fed.metrics[-1]["abstained"] == 0.0


def test_abstention_and_threshold_shrink_what_peers_distill_on():
    loose = Federation(
        tiny(
            "tallytrain",
            abstain_below=None,
            agreement_threshold=0.0,
            support_min=0,
            support_radius=None,
            reputation=False,  # every vote weighs 1: no quorum drops a probe
        ),
        digits4(),
    )
    strict = Federation(tiny("tallytrain", abstain_below=0.999, agreement_threshold=0.9), digits4())
    loose.run()
    strict.run()
    assert loose.metrics[-1]["kept_fraction"] == 1.0
    assert strict.metrics[-1]["kept_fraction"] < 1.0


def test_decentralized_peers_reach_the_server_consensus():
    server = Federation(tiny("tallytrain", rounds=3), digits4())
    p2p = Federation(tiny("tallytrain", rounds=3, decentralized=True), digits4())
    server.run()
    p2p.run()
    keys = ("accuracy", "consensus_acc", "agreement", "kept_fraction")
    for a, b in zip(server.metrics, p2p.metrics):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("order", ["distill-train", "train-distill"])
@pytest.mark.parametrize("method", ["tallytrain", "softlabel"])
def test_sequential_orders_distill_on_the_consensus(method, order):
    train = TrainConfig(
        order=order, local_steps=2, distill_steps=3, batch_size=16, distill_batch_size=16
    )
    fed = Federation(
        tiny(method, train=train, abstain_below=None, agreement_threshold=0.0), digits4()
    )
    fed.run()
    assert fed.timer.seconds["distillation"] > 0 and fed.timer.seconds["joint_training"] == 0
