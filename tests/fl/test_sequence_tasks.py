"""pytext and glyphs through the federated engine: data preparation (the
official probe pool, partitions by group, token counts), sequence losses with
padding, chunked evaluation with perplexity, votes / consensus / memory of
token windows, softlabel-topk, and a tiny end-to-end run of every method on
both tasks. pytext runs on a fake standard library written to a temporary
folder (a few small files, a 300-token vocabulary); glyphs on 12 classes."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tallytrain import Votes, wire
from tallytrain.cli import main
from tallytrain.data import load_dataset, partitioners, prepare
from tallytrain.fl import peer as peer_mod
from tallytrain.fl.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, TrainConfig
from tallytrain.fl.loop import Federation, load_checkpoint, save_checkpoint
from tallytrain.fl.methods.softlabel_topk import average_topk, complete
from tallytrain.fl.peer import hard_label_loss, rows_per_chunk, soft_label_loss, topk_label_loss
from tallytrain.fl.registry import method_names
from tallytrain.report import without_timing

VOCAB = 300
CONTEXT = 16
METHODS = method_names()  # the registry's order, which `compare` reports in


def _module(name: str, functions: int) -> str:
    out = [f'"""Module {name}."""', "import os", ""]
    for i in range(functions):
        out += [
            f"def {name}_{i}(value, count={i}):",
            f"    result = value * {i} + count  # {name} step {i}",
            "    return result",
            "",
        ]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    """A fake standard library of three packages and four modules, and a cache."""
    root = tmp_path_factory.mktemp("lib")
    files = {}
    for pkg in ("pkga", "pkgb", "pkgc"):
        files.update(
            {
                f"{pkg}/{m}.py": _module(f"{pkg}{m}", 5 + len(m))
                for m in ("__init__", "one", "two", "three", "four")
            }
        )
    files.update({f"{m}.py": _module(m, 7) for m in ("alpha", "beta", "gamma", "delta")})
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root), str(tmp_path_factory.mktemp("cache"))


def text_config(stdlib, **kw) -> DataConfig:
    root, cache = stdlib
    base = dict(
        dataset="pytext",
        data_dir=root,
        cache_dir=cache,
        vocab_size=VOCAB,
        context=CONTEXT,
        partition="groups",
        min_shard_size=1,
    )
    return DataConfig(**{**base, **kw})


def glyph_config(tmp_path_factory_or_dir, **kw) -> DataConfig:
    base = dict(
        dataset="glyphs",
        num_classes=12,
        renders_per_face=1,
        alpha=0.5,
        min_shard_size=2,
        cache_dir=str(tmp_path_factory_or_dir),
    )
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("glyph_cache")


def run_config(
    method: str, data: DataConfig, peers: int = 3, rounds: int = 2, arch: str = "lm", **protocol
) -> RunConfig:
    proto = dict(
        probes_per_round=4,
        server_distill_steps=2,
        abstain_below=None,
        agreement_threshold=0.0,
        support_min=0,
    )
    return RunConfig(
        method=method,
        peers=peers,
        rounds=rounds,
        data=data,
        model=ModelConfig(archs=(arch,), hidden=16),
        train=TrainConfig(local_steps=2, batch_size=4, distill_batch_size=4, distill_batch_max=4),
        protocol=ProtocolConfig(**{**proto, **protocol}),
    )


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def test_pytext_keeps_its_own_probe_pool_and_partitions_by_module(stdlib):
    cfg = text_config(stdlib)
    ds = load_dataset(cfg)
    data = prepare(cfg, 3, 0, ds)
    # the official splits, whole: training windows, the held-out probe files, the test files
    assert torch.equal(data.x_train, ds.x[torch.from_numpy(data.split.train)])
    assert len(data.y_train) == len(ds.y) and torch.equal(data.x_probe, ds.x_probe)
    assert torch.equal(data.y_test, ds.y_test)
    assert data.split.official_probe and data.split.official_test
    assert data.sequence and data.position_shape == (CONTEXT,)
    # whole modules per peer
    held = [set(ds.groups[torch.from_numpy(data.split.train[s])].tolist()) for s in data.shards]
    assert all(a.isdisjoint(b) for i, a in enumerate(held) for b in held[i + 1 :])
    described = data.describe()
    assert described["probe_index_refers_to"] == "official probe pool"
    assert described["dataset_info"]["files"] == ds.info["files"]
    assert described["class_counts_count"] == "target tokens"


def test_class_counts_count_target_tokens_without_padding(stdlib):
    data = prepare(text_config(stdlib), 3, 0)
    counts = data.class_counts
    assert counts.shape == (3, VOCAB)
    for p, shard in enumerate(data.shards):
        y = data.y_train[torch.from_numpy(shard)].flatten()
        assert counts[p].sum() == int((y >= 0).sum())
        assert np.array_equal(counts[p], np.bincount(y[y >= 0].numpy(), minlength=VOCAB))
    # 1-D labels are unchanged
    labels = np.array([0, 2, 2, 1])
    assert partitioners.class_counts(labels, [np.array([1, 2]), np.array([0, 3])], 3).tolist() == [
        [0, 0, 2],
        [1, 1, 0],
    ]


def test_probe_cap_subsamples_and_training_cap_applies_to_training_windows(stdlib):
    full = prepare(text_config(stdlib), 3, 0)
    capped = prepare(
        text_config(stdlib, max_probe_samples=5, max_samples=40, max_test_samples=7), 3, 0
    )
    assert len(capped.y_probe) == 5 and len(capped.y_train) == 40 and len(capped.y_test) == 7
    assert set(capped.split.probe.tolist()) <= set(full.split.probe.tolist())
    again = prepare(
        text_config(stdlib, max_probe_samples=5, max_samples=40, max_test_samples=7), 3, 0
    )
    assert np.array_equal(again.split.probe, capped.split.probe)
    # an uncapped split of a classifier dataset is exactly what it was before the cap existed
    plain = prepare(DataConfig(alpha=0.5, min_shard_size=5), 4, 0)
    same = prepare(DataConfig(alpha=0.5, min_shard_size=5, max_probe_samples=10**6), 4, 0)
    assert np.array_equal(plain.split.probe, same.split.probe)
    assert all(np.array_equal(a, b) for a, b in zip(plain.shards, same.shards))


def test_dirichlet_on_text_skews_over_modules(stdlib):
    data = prepare(text_config(stdlib, partition="dirichlet", alpha=0.3), 3, 0)
    assert sorted(np.concatenate(data.shards).tolist()) == list(range(len(data.y_train)))


def test_glyphs_partition_by_face_and_by_dirichlet(glyph_cache):
    data = prepare(glyph_config(glyph_cache, partition="groups"), 4, 0)
    faces = load_dataset(glyph_config(glyph_cache)).groups
    held = [set(faces[torch.from_numpy(data.split.train[s])].tolist()) for s in data.shards]
    assert all(a.isdisjoint(b) for i, a in enumerate(held) for b in held[i + 1 :])
    data = prepare(glyph_config(glyph_cache), 4, 0)
    assert not data.sequence and data.class_counts.shape == (4, 12)


def test_partition_groups_without_groups_is_refused_by_flag():
    with pytest.raises(ValueError, match="--partition groups needs a dataset"):
        prepare(DataConfig(partition="groups"), 4, 0)


# --------------------------------------------------------------------------- #
# losses on sequences
# --------------------------------------------------------------------------- #
def _sequence_batch(gen, peers=2, batch=3, t=5, c=7):
    logits = torch.randn(peers, batch, t, c, generator=gen, requires_grad=True)
    labels = torch.randint(c, (peers, batch, t), generator=gen)
    labels[0, 0, 2:] = -1  # padding
    labels[1, :, :] = -1  # a peer without a single target
    labels[1, 2, 0] = 4
    return logits, labels


def test_hard_label_loss_is_each_peers_mean_over_real_targets():
    logits, labels = _sequence_batch(torch.Generator().manual_seed(0))
    loss = hard_label_loss(logits, labels)
    expect = sum(
        F.cross_entropy(logits[p].flatten(0, 1), labels[p].flatten(), ignore_index=-1)
        for p in range(2)
    )
    assert torch.allclose(loss, expect)
    loss.backward()
    assert (logits.grad[labels < 0] == 0).all()  # padding never distills
    assert (logits.grad[labels >= 0] != 0).any(-1).all()
    # a peer with no target at all contributes 0, not NaN
    none = torch.full((1, 2, 5), -1)
    assert float(hard_label_loss(torch.randn(1, 2, 5, 7), none)) == 0.0


def test_soft_label_loss_skips_all_zero_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 6, generator=gen, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 3, 4, 6, generator=gen), -1)
    targets[0, 1, 3] = 0  # padding
    loss = soft_label_loss(2.0)(logits, targets)
    expect = 0.0
    for p in range(2):
        real = targets[p].sum(-1) > 0
        logp = F.log_softmax(logits[p][real] / 2.0, -1)
        expect = expect + F.kl_div(logp, targets[p][real], reduction="batchmean") * 4.0
    assert torch.allclose(loss, expect)
    loss.backward()
    assert (logits.grad[0, 1, 3] == 0).all()


def _dense_completed(index, value, c):
    k = index.shape[-1]
    rest = ((1 - value.sum(-1)).clamp(min=0) / (c - k)).unsqueeze(-1)
    dense = rest.expand(*index.shape[:-1], c).clone()
    return dense.scatter(-1, index, value)


@pytest.mark.parametrize("c, k", [(7, 3), (50, 16), (4, 4)])
def test_topk_label_loss_equals_kl_to_the_completed_target(c, k):
    gen = torch.Generator().manual_seed(c)
    logits = torch.randn(2, 3, 4, c, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(2, 3, 4, c, generator=gen, dtype=torch.float64), -1)
    value, index = probs.topk(k, -1)
    weight = torch.ones(2, 3, 4, 1, dtype=torch.float64)
    weight[1, 2, 0] = 0  # padding
    targets = torch.cat([index.double(), value, weight], -1)
    loss = topk_label_loss(2.0, c)(logits, targets)
    dense = (
        _dense_completed(index, value, c)
        if c > k
        else value.new_zeros(value.shape).scatter(-1, index, value)
    )
    expect = 0.0
    for p in range(2):
        real = weight[p, ..., 0] > 0
        logp = F.log_softmax(logits[p][real].float() / 2.0, -1).double()
        kl = (torch.xlogy(dense[p][real], dense[p][real]) - dense[p][real] * logp).sum(-1)
        expect = expect + kl.mean() * 4.0
    assert torch.allclose(loss.double(), expect, rtol=1e-4, atol=1e-5)
    # zero at the target itself (k = C: the target is the distribution)
    if k == c:
        same = topk_label_loss(1.0, c)(torch.log(probs).float(), targets.float())
        assert abs(float(same)) < 1e-5


# --------------------------------------------------------------------------- #
# softlabel-topk's server
# --------------------------------------------------------------------------- #
def test_average_topk_is_the_top_k_of_the_mean_of_completed_distributions():
    gen = torch.Generator().manual_seed(3)
    c, k = 40, 5
    probs = torch.softmax(torch.randn(3, 6, 2, c, generator=gen) * 3, -1)
    value, index = probs.topk(k, -1)
    value = value.half().float()
    dense = _dense_completed(index, value, c).mean(0)
    got_i, got_v = average_topk(index, value, c, k)
    want_v, want_i = dense.topk(k, -1)
    assert got_i.shape == (6, 2, k) and got_v.dtype == torch.float16
    assert torch.equal(got_i, want_i)
    assert torch.allclose(got_v.float(), want_v, rtol=1e-3)
    # the completion keeps every distribution summing to 1
    assert torch.allclose(dense.sum(-1), torch.ones(6, 2), atol=1e-3)
    assert torch.allclose(
        complete(value, c) * (c - k) + value.sum(-1), torch.ones(3, 6, 2), atol=1e-3
    )
    # sharpened: the top k of softmax(mean / T)
    sharp_i, _ = average_topk(index, value, c, k, sharpen_temperature=0.1)
    assert torch.equal(sharp_i, torch.softmax(dense / 0.1, -1).topk(k, -1).indices)
    # chunked (a tiny chunk) gives the same answer
    from tallytrain.fl.methods import softlabel_topk

    old = softlabel_topk._AVERAGE_ENTRIES
    softlabel_topk._AVERAGE_ENTRIES = c  # one position per chunk
    try:
        again = average_topk(index, value, c, k)
    finally:
        softlabel_topk._AVERAGE_ENTRIES = old
    assert torch.equal(again[0], got_i) and torch.equal(again[1], got_v)


def test_softlabel_topk_sends_k_classes_per_probe_on_a_classifier():
    cfg = RunConfig(
        method="softlabel-topk",
        peers=4,
        rounds=2,
        data=DataConfig(alpha=0.5, min_shard_size=5),
        model=ModelConfig(hidden=16),
        train=TrainConfig(local_steps=3, batch_size=16, distill_batch_size=16),
        protocol=ProtocolConfig(probes_per_round=40, softlabel_topk=3),
    )
    fed = Federation(cfg, prepare(cfg.data, 4, 0))
    fed.run()
    up = [e for e in fed.ledger.entries if e.kind == "soft_topk" and e.receiver == "server"]
    assert len(up) == 8 and {e.bytes for e in up} == {wire.soft_topk_message_bytes((40,), 3, 10)}
    down = [e for e in fed.ledger.entries if e.kind == "soft_topk" and e.sender == "server"]
    assert len(down) == 4  # round 1 only: round 0's aggregate
    assert fed.metrics[-1]["memory_fraction"] > 0
    # k larger than C is C
    cfg = dataclasses.replace(cfg, protocol=ProtocolConfig(probes_per_round=40, softlabel_topk=99))
    assert Federation(cfg, prepare(cfg.data, 4, 0)).method.k == 10


# --------------------------------------------------------------------------- #
# the engine on token windows
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def text_data(stdlib):
    return prepare(text_config(stdlib), 3, 0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_pytext(text_data, stdlib, method):
    fed = Federation(run_config(method, text_config(stdlib)), text_data)
    fed.run()
    row = fed.metrics[-1]
    assert 0 <= row["accuracy"] <= 1 and 1 < row["perplexity"] < 10 * VOCAB
    assert row["peer_ppl_min"] <= row["peer_ppl_mean"] <= row["peer_ppl_max"]
    assert (row["global_ppl"] is not None) == (method in ("fedavg", "fedprox", "feddf"))
    assert (row["cum_bytes"] == 0) == (method == "local")
    # what the ledger counts is what was sent: every entry is a real message size
    assert row["cum_bytes"] == sum(e.bytes for e in fed.ledger.entries)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_glyphs(glyph_cache, method):
    cfg = run_config(method, glyph_config(glyph_cache), peers=4, arch="mlp", probes_per_round=8)
    fed = Federation(cfg, prepare(cfg.data, 4, 0))
    fed.run()
    row = fed.metrics[-1]
    assert 0 <= row["accuracy"] <= 1 and "perplexity" not in row


def test_distillation_batch_bounds_count_positions_on_sequences(text_data, stdlib):
    # A window holds CONTEXT targets: bounds of 32..64 targets are 2..4
    # windows (the default 1,024 counted in windows ran 10 peers at
    # V = 16,384 out of memory).
    train = TrainConfig(local_steps=2, batch_size=4, distill_batch_size=32, distill_batch_max=64)
    cfg = dataclasses.replace(run_config("tallytrain", text_config(stdlib)), train=train)
    fed = Federation(cfg, text_data)
    assert fed.targets_per_sample == CONTEXT
    assert fed.distill_batch(1000, 10) == 64 // CONTEXT
    assert fed.distill_batch(1, 10) == math.ceil(32 / CONTEXT)
    small = dataclasses.replace(train, distill_batch_size=1, distill_batch_max=8)
    fed = Federation(dataclasses.replace(cfg, train=small), text_data)
    assert fed.distill_batch(1000, 10) == 1  # at least one window


def test_tallytrain_votes_token_windows_and_padding_never_votes(text_data, stdlib):
    pool = len(text_data.y_probe)  # every probe: the pool's file ends have padding
    cfg = run_config("tallytrain", text_config(stdlib), rounds=1, probes_per_round=pool)
    fed = Federation(cfg, text_data)
    idx = fed.probe_indices(0)
    real = text_data.y_probe[idx] >= 0
    assert not bool(real.all())  # some padding among the probes, or the test proves nothing
    fed.run_round(0)
    for votes in fed.method._votes.values():
        assert votes.shape == (pool, CONTEXT) and votes.abstain
        assert (votes.labels()[~real] == -1).all() and (votes.labels()[real] >= 0).all()
    # the consensus goes down with its shape, padding without a label
    msg = wire.decode(fed.method.previous)
    assert msg.shape == (pool, CONTEXT) and (msg.labels[~real] == -1).all()
    assert not bool(msg.keep[~real].any()) if msg.keep is not None else True
    # round 1: each peer's memory holds [T] labels per probe, none on padding
    fed.run_round(1)
    for memory in fed.method.memory.values():
        held, labels = memory.labels()
        assert labels.shape[1:] == (CONTEXT,)
        assert (labels[text_data.y_probe[held] < 0] == -1).all()
    stats = fed.metrics[-1]
    assert stats["abstained"] == 0.0  # padding is no abstention


def test_support_filter_uses_token_counts(text_data, stdlib):
    cfg = run_config("tallytrain", text_config(stdlib), rounds=1, support_min=10**9)
    fed = Federation(cfg, text_data)
    supported = torch.stack([fed.method.support[p].class_ok for p in range(3)])
    assert supported.shape == (3, VOCAB) and not supported.any()
    fed.run()
    assert fed.metrics[-1]["abstained"] == 1.0 and fed.metrics[-1]["kept_fraction"] == 0.0
    cfg = run_config("tallytrain", text_config(stdlib), rounds=1, support_min=1)
    fed = Federation(cfg, text_data)
    counts = torch.from_numpy(text_data.class_counts)
    supported = torch.stack([fed.method.support[p].class_ok for p in range(3)])
    assert torch.equal(supported, counts >= 1)
    fed.run_round(0)
    for p, votes in fed.method._votes.items():
        labels = votes.labels()
        assert supported[p][labels[labels >= 0]].all()


def test_softlabel_targets_are_zero_on_padding(text_data, stdlib):
    pool = len(text_data.y_probe)
    cfg = run_config("softlabel", text_config(stdlib), rounds=2, probes_per_round=pool)
    fed = Federation(cfg, text_data)
    fed.run()
    idx = fed.probe_indices(0)
    memory = fed.method.memory[0]
    pad = text_data.y_probe[idx] < 0
    assert pad.any() and (memory.probs[idx][pad] == 0).all()
    assert torch.allclose(memory.probs[idx][~pad].sum(-1), torch.ones(int((~pad).sum())))


def test_evaluation_is_chunked_by_positions_and_matches_one_pass(text_data, stdlib, monkeypatch):
    cfg = run_config("fedavg", text_config(stdlib), rounds=1)
    fed = Federation(cfg, text_data)
    fed.run()
    whole = fed.evaluate(0, fed.method.aggregate(0, [], []))
    shapes = []
    group = fed.population.single_group
    original = group.predict_one

    def recording(x, row):
        out = original(x, row)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(peer_mod, "_PREDICT_POSITIONS", 2 * CONTEXT)
    monkeypatch.setattr(group, "predict_one", recording)
    assert rows_per_chunk(CONTEXT) == 2
    chunked = fed.evaluate(0, fed.method.aggregate(0, [], []))
    assert max(s[0] * s[1] for s in shapes) <= 2 * CONTEXT  # positions per call
    for key in ("peer_acc_mean", "peer_ppl_mean", "global_acc", "global_ppl", "perplexity"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5)
    # the oracle: one peer's perplexity and accuracy, computed plainly
    logits = group.predict(text_data.x_test)[0]
    y = text_data.y_test
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    acc = ((logits.argmax(-1) == y) & (y >= 0)).sum() / (y >= 0).sum()
    assert whole["peer_ppl_min"] <= math.exp(float(nll)) * (1 + 1e-5)
    assert whole["peer_acc_max"] >= float(acc) - 1e-6


def test_resume_equals_uninterrupted_on_pytext(text_data, stdlib, tmp_path):
    for method in ("tallytrain", "softlabel-topk"):
        cfg = run_config(method, text_config(stdlib), rounds=3)
        whole = Federation(cfg, text_data)
        whole.run()
        part = Federation(cfg, text_data)
        part.run_round(0)
        part.run_round(1)
        path = str(tmp_path / f"{method}.pt")
        save_checkpoint(part, path)
        again = Federation(cfg, text_data)
        load_checkpoint(again, path)
        again.run()
        assert without_timing(again.metrics) == without_timing(whole.metrics)


def test_sequence_tasks_need_the_lm_arch_and_the_lm_needs_them(text_data, stdlib, glyph_cache):
    with pytest.raises(ValueError, match="--archs mlp does not fit dataset 'pytext'.*--archs lm"):
        Federation(run_config("local", text_config(stdlib), arch="mlp"), text_data)
    cfg = run_config("local", glyph_config(glyph_cache), peers=4, arch="lm")
    with pytest.raises(ValueError, match="--archs lm does not fit dataset 'glyphs'"):
        Federation(cfg, prepare(cfg.data, 4, 0))


# --------------------------------------------------------------------------- #
# the command line
# --------------------------------------------------------------------------- #
def test_compare_every_method_on_pytext_from_the_command_line(stdlib, tmp_path, capsys):
    root, cache = stdlib
    out = str(tmp_path / "cmp")
    rc = main(
        [
            "compare",
            "--dataset",
            "pytext",
            "--data-dir",
            root,
            "--cache-dir",
            cache,
            "--vocab-size",
            str(VOCAB),
            "--context",
            str(CONTEXT),
            "--archs",
            "lm",
            "--partition",
            "groups",
            "--min-shard-size",
            "1",
            "--peers",
            "3",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--batch-size",
            "2",
            "--distill-batch-size",
            "2",
            "--distill-batch-max",
            "2",
            "--hidden",
            "8",
            "--probes-per-round",
            "2",
            "--max-probe-samples",
            "6",
            "--max-test-samples",
            "5",
            "--server-distill-steps",
            "1",
            "--softlabel-topk",
            "4",
            "--out",
            out,
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "perplexity (mean ± std)" in captured.out
    import json

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert list(summary["methods"]) == METHODS + ["softlabel-matched"]
    assert all(m["final_perplexity_mean"] > 1 for m in summary["methods"].values())
    assert os.path.getsize(os.path.join(out, "perplexity_vs_bytes.png")) > 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["base"]["data"]["vocab_size"] == VOCAB
    assert config["base"]["protocol"]["softlabel_topk"] == 4
    partition = json.load(open(os.path.join(out, "partition.json")))["seeds"]["0"]
    assert len(partition["probe_index"]) == 6
    assert partition["dataset_info"]["vocab_size"] == VOCAB


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--vocab-size", "100"], "--vocab-size"),
        (["--context", "0"], "--context"),
        (["--archs", "mlp"], "--archs"),
        (["--softlabel-topk", "0"], "--softlabel-topk"),
        (["--max-probe-samples", "-1"], "--max-probe-samples"),
    ],
)
def test_bad_text_options_are_one_line_naming_the_flag(stdlib, tmp_path, capsys, args, flag):
    root, cache = stdlib
    out = str(tmp_path / "bad")
    base = [
        "run",
        "--method",
        "tallytrain",
        "--dataset",
        "pytext",
        "--data-dir",
        root,
        "--cache-dir",
        cache,
        "--vocab-size",
        str(VOCAB),
        "--archs",
        "lm",
        "--peers",
        "3",
        "--partition",
        "groups",
        "--min-shard-size",
        "1",
        "--probes-per-round",
        "4",
        "--out",
        out,
        "--quiet",
    ]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tallytrain: error:") and flag in err and "\n" not in err
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--num-classes", "5000"], "--num-classes"),
        (["--fonts", "/no/such/font.ttf"], "--fonts"),
        (["--renders-per-face", "0"], "--renders-per-face"),
        (["--partition", "groups", "--dataset", "digits"], "--partition groups"),
    ],
)
def test_bad_glyph_options_are_one_line_naming_the_flag(glyph_cache, tmp_path, capsys, args, flag):
    out = str(tmp_path / "bad")
    base = [
        "run",
        "--method",
        "local",
        "--dataset",
        "glyphs",
        "--cache-dir",
        str(glyph_cache),
        "--peers",
        "4",
        "--out",
        out,
        "--quiet",
    ]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tallytrain: error:") and flag in err and "\n" not in err
    assert not os.path.exists(out)


def test_votes_of_a_window_batch_round_trip_through_the_wire_with_their_shape():
    logits = torch.randn(3, CONTEXT, 50)
    mask = torch.ones(3, CONTEXT, dtype=torch.bool)
    mask[2, 10:] = False
    from tallytrain import vote

    votes = vote(logits, mask=mask)
    back = Votes.from_bytes(votes.to_bytes(round=0, sender=1))
    assert back == votes and back.shape == (3, CONTEXT)
    assert (back.labels()[2, 10:] == -1).all()
