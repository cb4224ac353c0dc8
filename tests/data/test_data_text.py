"""tallytrain.data.pytext on fake standard libraries written in tmp_path (a
few small files, a small vocabulary), plus invariants of the real one that
are cheap to check (listing and splitting, no tokenizer). Needs the
tokenizers package (the test extra; `make test` installs it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tallytrain.data import DATASETS, load_dataset, partitioners
from tallytrain.data import pytext
from tallytrain.data.pytext import (
    list_sources,
    load_pytext,
    make_windows,
    split_sources,
    tokenizer_key,
    train_tokenizer,
)
from tallytrain.fl.config import DataConfig

SMALL_VOCAB = 300


def _source(name: str, lines: int) -> str:
    """Python-looking text that differs by name (so BPE has pairs to merge)."""
    out = [f'"""Module {name}."""', "import os", ""]
    for i in range(lines):
        out += [
            f"def {name}_{i}(value, count={i}):",
            f"    result = value * {i} + count  # {name} step {i}",
            "    return result",
            "",
        ]
    return "\n".join(out) + "\n"


def _write(root, files: dict) -> str:
    for rel, text in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


def _fake_stdlib(root) -> str:
    """Two packages of 4 files, three one-file modules, and what must be
    skipped: third-party folders, caches, empty files and non-.py files."""
    files = {f"pkga/{m}.py": _source(f"a{m}", 6) for m in ("__init__", "one", "two", "three")}
    files.update({f"pkgb/{m}.py": _source(f"b{m}", 6) for m in ("__init__", "x", "y", "z")})
    files.update({f"{m}.py": _source(m, 8) for m in ("alpha", "beta", "gamma")})
    files.update(
        {
            "site-packages/thirdparty.py": _source("third", 3),
            "pkga/dist-packages/vendored.py": _source("vendored", 3),
            "__pycache__/cached.py": _source("cached", 3),
            "pkgb/empty.py": "  \n\n",
            "README.txt": "not python",
        }
    )
    return _write(root, files)


# --------------------------------------------------------------------------- #
# files and groups
# --------------------------------------------------------------------------- #
def test_sources_skip_third_party_caches_and_empty_files(tmp_path):
    files = list_sources(_fake_stdlib(tmp_path))
    paths = [f.path for f in files]
    assert paths == sorted(paths) and len(paths) == 11
    assert not any("packages" in p or "pycache" in p or "empty" in p for p in paths)
    groups = {f.path: f.group for f in files}
    assert groups["pkga/two.py"] == "pkga" and groups["alpha.py"] == "alpha"
    assert all(f.size == os.path.getsize(tmp_path / f.path) for f in files)


def test_a_package_holding_too_much_of_the_corpus_is_split_one_level_down(tmp_path):
    files = {f"test/test_{m}.py": _source(m, 20) for m in ("os", "re", "io")}
    files["test/support/__init__.py"] = _source("support", 20)
    files["test/support/helper.py"] = _source("helper", 20)
    files.update({f"{m}.py": _source(m, 5) for m in ("os", "re")})
    groups = {f.path: f.group for f in list_sources(_write(tmp_path, files), max_group_share=0.5)}
    assert groups["test/test_os.py"] == "test.test_os"
    assert groups["test/support/helper.py"] == groups["test/support/__init__.py"] == "test.support"
    assert groups["os.py"] == "os"
    # with a share nothing exceeds, test stays one group
    whole = {f.path: f.group for f in list_sources(str(tmp_path), max_group_share=1.0)}
    assert whole["test/test_os.py"] == whole["test/support/helper.py"] == "test"


def test_held_out_files_are_disjoint_and_drawn_from_every_group(tmp_path):
    files = list_sources(_fake_stdlib(tmp_path))
    split = split_sources(files, 0.25, 0.25, seed=3)
    sets = [set(split[s]) for s in ("train", "probe", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
    assert sets[1].isdisjoint(sets[2]) and set.union(*sets) == set(range(len(files)))
    # every package (4 files) and the pool of one-file modules gives one
    # probe file, one test file and keeps two (or one) for training
    for group in ("pkga", "pkgb"):
        in_group = {i for i, f in enumerate(files) if f.group == group}
        assert [len(in_group & s) for s in sets] == [2, 1, 1]
    assert split == split_sources(files, 0.25, 0.25, seed=3)
    seeds = {tuple(split_sources(files, 0.25, 0.25, seed=s)["probe"]) for s in range(8)}
    assert len(seeds) > 1


def test_three_files_are_enough_and_two_are_not(tmp_path):
    root = _write(tmp_path / "three", {f"{m}.py": _source(m, 4) for m in "abc"})
    split = split_sources(list_sources(root), 0.2, 0.2)
    assert [len(split[s]) for s in ("train", "probe", "test")] == [1, 1, 1]
    root = _write(tmp_path / "two", {f"{m}.py": _source(m, 4) for m in "ab"})
    with pytest.raises(ValueError, match=r"at least 3 non-empty \.py files.*--data-dir"):
        list_sources(root)
    with pytest.raises(ValueError, match="--data-dir"):
        list_sources(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "probe, test, match",
    [(0.0, 0.2, "probe_fraction"), (0.2, 1.0, "test_fraction"), (0.5, 0.5, "probe_fraction")],
)
def test_bad_fractions_are_refused(tmp_path, probe, test, match):
    files = list_sources(_fake_stdlib(tmp_path))
    with pytest.raises(ValueError, match=match):
        split_sources(files, probe, test)


def test_the_real_standard_library_lists_and_splits(tmp_path):
    # Whatever this interpreter's stdlib holds (with or without test/).
    files = list_sources()
    assert len(files) >= pytext.MIN_FILES
    assert not any(part in pytext.EXCLUDED_DIRS for f in files for part in f.path.split("/"))
    total = sum(f.size for f in files)
    size, count = {}, {}
    for f in files:
        size[f.group] = size.get(f.group, 0) + f.size
        count[f.group] = count.get(f.group, 0) + 1
    for group in size:  # only a single file can hold more than the cap
        assert size[group] <= pytext.MAX_GROUP_SHARE * total or count[group] == 1
    split = split_sources(files, 0.2, 0.2)
    assert sum(map(len, split.values())) == len(files)
    assert set(split["train"]).isdisjoint(split["probe"] + split["test"])


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #
def test_tokenizer_training_is_deterministic(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    files = list_sources(root)
    _, path_a = train_tokenizer(root, files, SMALL_VOCAB, str(tmp_path / "cache_a"))
    _, path_b = train_tokenizer(root, files, SMALL_VOCAB, str(tmp_path / "cache_b"))
    assert os.path.basename(path_a) == os.path.basename(path_b)
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        assert fa.read() == fb.read()


def test_tokenizer_cache_is_reused_and_invalidated_when_inputs_change(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    cache = str(tmp_path / "cache")
    files = list_sources(root)
    tok, path = train_tokenizer(root, files, SMALL_VOCAB, cache)
    assert tok.get_vocab_size() == SMALL_VOCAB
    os.utime(path, (1, 1))  # a reuse leaves the file alone
    assert train_tokenizer(root, files, SMALL_VOCAB, cache)[1] == path
    assert os.stat(path).st_mtime == 1
    # another vocabulary size, another training set, an edited file: new entries
    assert train_tokenizer(root, files, SMALL_VOCAB + 1, cache)[1] != path
    assert train_tokenizer(root, files[:-1], SMALL_VOCAB, cache)[1] != path
    with open(os.path.join(root, "alpha.py"), "a") as f:
        f.write("extra = 1\n")
    edited = list_sources(root)
    _, new_path = train_tokenizer(root, edited, SMALL_VOCAB, cache)
    assert new_path != path and os.path.isfile(path) and os.path.isfile(new_path)
    assert tokenizer_key(edited, SMALL_VOCAB) != tokenizer_key(files, SMALL_VOCAB)


def test_the_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path / "lib")
    monkeypatch.setenv("TALLYTRAIN_CACHE_DIR", str(tmp_path / "envcache"))
    _, path = train_tokenizer(root, list_sources(root), SMALL_VOCAB)
    assert path.startswith(str(tmp_path / "envcache"))


@pytest.mark.parametrize("vocab", [0, 256, 4096.0])
def test_a_vocabulary_too_small_is_refused_naming_the_flag(tmp_path, vocab):
    root = _fake_stdlib(tmp_path)
    with pytest.raises(ValueError, match=r"--vocab-size must be an integer >= 257"):
        load_pytext(vocab_size=vocab, root=root, cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(context=0), "--context must be an integer >= 1"),
        (dict(max_group_share=0.0), r"max_group_share must be in \(0, 1\]"),
    ],
)
def test_bad_context_and_group_share_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_pytext(
            vocab_size=SMALL_VOCAB,
            root=_fake_stdlib(tmp_path),
            cache_dir=str(tmp_path / "c"),
            **kwargs,
        )


# --------------------------------------------------------------------------- #
# windows and the dataset
# --------------------------------------------------------------------------- #
def test_windows_shift_targets_and_pad_the_tail():
    x, y, owner = make_windows([np.arange(1, 11), np.array([7]), np.array([5, 6])], 4, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0], [5, 6, 0, 0]]
    assert y.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, -1, -1, -1], [6, -1, -1, -1]]
    assert owner.tolist() == [0, 0, 0, 2]  # a one-token list predicts nothing
    x, y, _ = make_windows([np.arange(9)], 4, pad_id=99)  # n - 1 a multiple of T: no padding
    assert x.shape == (2, 4) and (y >= 0).all() and (x != 99).all()
    with pytest.raises(ValueError, match="--context"):
        make_windows([np.arange(3)], 0, 0)


def test_load_pytext_gives_disjoint_windowed_splits(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    data = load_pytext(
        vocab_size=SMALL_VOCAB, context=16, root=root, cache_dir=str(tmp_path / "cache")
    )
    tok, _ = train_tokenizer(
        root,
        [data.files[i] for i in data.file_split["train"]],
        SMALL_VOCAB,
        str(tmp_path / "cache"),
    )
    for name in ("train", "probe", "test"):
        part = getattr(data, name)
        assert part.x.dtype == part.y.dtype == torch.int64 and part.x.shape[1] == 16
        assert part.x.shape == part.y.shape and len(part.file_ids) == len(part.x)
        assert int(part.x.max()) < SMALL_VOCAB and int(part.y.min()) >= -1
        assert set(part.file_ids.tolist()) == set(data.file_split[name])
        for file_id in set(part.file_ids.tolist()):
            # the windows of a file are its tokens, in order, then padding
            rows = part.file_ids == file_id
            with open(os.path.join(root, data.files[file_id].path)) as f:
                ids = tok.encode(f.read(), add_special_tokens=False).ids
            flat_y = part.y[rows].flatten()
            assert flat_y[flat_y >= 0].tolist() == ids[1:]
            assert part.x[rows].flatten()[: len(ids)].tolist() == ids
            assert set(part.x[rows].flatten()[len(ids) :].tolist()) <= {data.pad_id}
            assert (part.groups[rows] == data.group_names.index(data.files[file_id].group)).all()
    ids = [set(getattr(data, s).file_ids.tolist()) for s in ("train", "probe", "test")]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])

    ds = data.dataset()
    assert ds.num_classes == SMALL_VOCAB and ds.input_shape == (16,)
    assert ds.x is data.train.x and ds.x_probe is data.probe.x and ds.y_test is data.test.y
    assert ds.groups is data.train.groups and len(ds.group_names) == len(set(ds.group_names))
    assert sorted(
        ds.info["files"]["train"] + ds.info["files"]["probe"] + ds.info["files"]["test"]
    ) == [f.path for f in data.files]

    again = load_pytext(
        vocab_size=SMALL_VOCAB, context=16, root=root, cache_dir=str(tmp_path / "cache2")
    )
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.test.y, data.test.y)


def test_pytext_is_registered_and_reads_data_dir(tmp_path, monkeypatch):
    assert "pytext" in DATASETS
    monkeypatch.setenv("TALLYTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    root = _fake_stdlib(tmp_path / "lib")
    ds = load_dataset(DataConfig(dataset="pytext", data_dir=root))
    assert ds.name == "pytext" and ds.num_classes == pytext.DEFAULT_VOCAB_SIZE
    assert ds.info["root"] == root and ds.y.dim() == 2


def test_partition_by_group_keeps_groups_whole_and_balances(tmp_path):
    groups = np.repeat(np.arange(6), [50, 40, 30, 20, 10, 10])
    shards = partitioners.by_group(groups, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(groups)))
    held = [set(groups[s].tolist()) for s in shards]
    assert all(a.isdisjoint(b) for i, a in enumerate(held) for b in held[i + 1 :])
    assert sorted(map(len, shards)) == [50, 50, 60]  # 50 | 40+10 | 30+20+10
    again = partitioners.by_group(groups, 3, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    owners = {
        tuple(len(s) for s in partitioners.by_group(groups, 3, np.random.default_rng(k)))
        for k in range(10)
    }
    assert len(owners) > 1  # the seed decides which peer holds what
    with pytest.raises(ValueError, match=r"peers \(7\) exceeds the 6 groups"):
        partitioners.by_group(groups, 7, np.random.default_rng(0))
    with pytest.raises(ValueError, match="leaves a shard of 50 samples, below min_shard_size=51"):
        partitioners.by_group(groups, 3, np.random.default_rng(0), min_size=51)
