"""tallytrain.data: datasets (bundled, synthetic, on-disk formats written here
in their real layouts), splits, partitioners and probe subsets."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time

import numpy as np
import pytest
import torch

from tallytrain.data import (
    DATASETS,
    load_dataset,
    make_synthetic,
    partitioners,
    prepare,
    probe_subset,
    read_idx,
    split_dataset,
)
from tallytrain.data.datasets import (
    load_cifar10,
    load_cifar100,
    load_digits,
    load_mnist,
    load_fashion_mnist,
)
from tallytrain.fl.config import DataConfig


# --------------------------------------------------------------------------- #
# bundled and synthetic
# --------------------------------------------------------------------------- #
def test_digits_is_bundled_and_shaped():
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and set(ds.y.tolist()) == set(range(10))
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
    assert ds.x_test is None and ds.num_classes == 10


def test_synthetic_is_deterministic_and_scales_to_many_classes():
    a = make_synthetic(50, dim=8, samples_per_class=3, seed=7)
    b = make_synthetic(50, dim=8, samples_per_class=3, seed=7)
    c = make_synthetic(50, dim=8, samples_per_class=3, seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    big = make_synthetic(10_000, dim=8, samples_per_class=1)
    assert big.x.shape == (10_000, 8) and int(big.y.max()) == 9_999


def test_synthetic_task_is_learnable_by_nearest_prototype():
    # The class means (estimated from the data) classify held-out samples
    # well: a linear model, hence the small MLP, can learn the task.
    ds = make_synthetic(1000, samples_per_class=6, seed=0)
    x, y = ds.x.view(1000, 6, -1), ds.y.view(1000, 6)
    means = x[:, :5].mean(1)
    pred = torch.cdist(x[:, 5], means).argmin(-1)
    assert float((pred == y[:, 5]).float().mean()) > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(dim=0), "dim"),
        (dict(samples_per_class=0), "samples_per_class"),
        (dict(noise=-1.0), "noise"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits.*synthetic.*mnist"):
        load_dataset(DataConfig(dataset="nope"))
    assert {"digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100"} <= set(DATASETS)


# --------------------------------------------------------------------------- #
# MNIST / Fashion-MNIST idx files
# --------------------------------------------------------------------------- #
def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_mnist(folder: str, n_train: int, n_test: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for part, kind, arr in (("images", "idx3", images), ("labels", "idx1", labels)):
            name = f"{prefix}-{part}-{kind}-ubyte"
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    arrays = _write_mnist(str(tmp_path), 12, 5, gz)
    ds = load_mnist(str(tmp_path))
    images, labels = arrays["train"]
    assert ds.x.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert torch.allclose(ds.x[:, 0] * 255, torch.from_numpy(images.astype(np.float32)))
    assert ds.y.tolist() == labels.tolist()
    assert ds.y_test.tolist() == arrays["t10k"][1].tolist()


def test_fashion_mnist_reads_the_torchvision_layout(tmp_path):
    _write_mnist(str(tmp_path / "FashionMNIST" / "raw"), 4, 3, gz=True)
    ds = load_fashion_mnist(str(tmp_path))
    assert ds.name == "fashion-mnist" and len(ds.y) == 4 and len(ds.y_test) == 3


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = _idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))
    path = tmp_path / "f"
    path.write_bytes(good)
    assert read_idx(str(path)).tolist() == [[0, 1, 2], [3, 4, 5]]
    for bad, match in (
        (b"\x01\x00\x08\x02" + good[4:], "bad magic"),
        (good[:-1], "payload"),
        (good[:6], "truncated"),
        (b"\x00", "not an idx"),
    ):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=match):
            read_idx(str(path))


def test_missing_files_say_where_we_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*looked at"):
        load_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="--data-dir"):
        load_mnist(None)


# --------------------------------------------------------------------------- #
# CIFAR pickle batches
# --------------------------------------------------------------------------- #
def _cifar_batch(path, n, label_key, classes, rng):
    batch = {
        b"batch_label": b"test",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def test_cifar10_reads_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(folder / f"data_batch_{i}", 3, b"labels", 10, rng) for i in range(1, 6)]
    test = _cifar_batch(folder / "test_batch", 2, b"labels", 10, rng)
    ds = load_cifar10(str(tmp_path))
    assert ds.x.shape == (15, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.y.tolist() == sum((b[b"labels"] for b in batches), [])
    # channel-major rows: the first 1024 bytes are the red plane
    first = batches[0][b"data"][0]
    assert torch.allclose(
        ds.x[0, 0].flatten() * 255, torch.from_numpy(first[:1024].astype(np.float32))
    )
    assert ds.y_test.tolist() == test[b"labels"]


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_batch(folder / "train", 4, b"fine_labels", 100, rng)
    _cifar_batch(folder / "test", 2, b"fine_labels", 100, rng)
    ds = load_cifar100(str(tmp_path))
    assert ds.num_classes == 100 and ds.y.tolist() == train[b"fine_labels"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": _Evil(), b"fine_labels": [0]}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar100(str(tmp_path))


# --------------------------------------------------------------------------- #
# partitioners
# --------------------------------------------------------------------------- #
LABELS = np.repeat(np.arange(10), 50)


def _check_disjoint_cover(shards, n):
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)) == n
    assert all(np.all(np.diff(s) > 0) for s in shards)


def test_iid_is_balanced_disjoint_and_seeded():
    shards = partitioners.iid(LABELS, 7, np.random.default_rng(0))
    _check_disjoint_cover(shards, len(LABELS))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = partitioners.iid(LABELS, 7, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


def test_dirichlet_properties():
    shards = partitioners.dirichlet(LABELS, 10, 0.1, np.random.default_rng(0), min_size=5)
    _check_disjoint_cover(shards, len(LABELS))
    assert min(len(s) for s in shards) >= 5
    again = partitioners.dirichlet(LABELS, 10, 0.1, np.random.default_rng(0), min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = partitioners.dirichlet(LABELS, 10, 0.1, np.random.default_rng(1), min_size=5)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_alpha_controls_skew():
    def mean_classes(alpha):
        shards = partitioners.dirichlet(LABELS, 10, alpha, np.random.default_rng(3))
        counts = partitioners.class_counts(LABELS, shards, 10)
        # classes holding at least 5% of a peer's samples
        return float(((counts / counts.sum(1, keepdims=True)) >= 0.05).sum(1).mean())

    assert mean_classes(0.05) < 3 < 6 < mean_classes(100.0)


def test_dirichlet_gives_up_with_a_clear_error_instead_of_hanging():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="in 3 tries.*raise alpha"):
        partitioners.dirichlet(
            LABELS, 40, 0.01, np.random.default_rng(0), min_size=12, max_retries=3
        )
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: partitioners.dirichlet(LABELS, 10, 0.0, np.random.default_rng(0)),
            "alpha must be > 0",
        ),
        (
            lambda: partitioners.dirichlet(LABELS, 10, -1, np.random.default_rng(0)),
            "alpha must be > 0",
        ),
        (
            lambda: partitioners.iid(LABELS, 501, np.random.default_rng(0)),
            "exceeds the 500 training samples",
        ),
        (lambda: partitioners.iid(LABELS, 0, np.random.default_rng(0)), "peers must be >= 1"),
        (
            lambda: partitioners.iid(LABELS, 10, np.random.default_rng(0), min_size=60),
            "min_shard_size",
        ),
        (
            lambda: partitioners.classes_per_peer(LABELS, 5, 11, np.random.default_rng(0)),
            "classes_per_peer",
        ),
    ],
)
def test_partitioners_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_classes_per_peer():
    shards = partitioners.classes_per_peer(LABELS, 10, 2, np.random.default_rng(0))
    _check_disjoint_cover(shards, len(LABELS))  # 10 peers x 2 classes cover all 10
    counts = partitioners.class_counts(LABELS, shards, 10)
    assert ((counts > 0).sum(1) == 2).all()
    assert counts.sum() == len(LABELS)


# --------------------------------------------------------------------------- #
# splits, prepare, probes
# --------------------------------------------------------------------------- #
def test_split_is_disjoint():
    ds = load_digits()
    split = split_dataset(ds, 0.2, 0.25, np.random.default_rng(0))
    sets = [set(split.train.tolist()), set(split.probe.tolist()), set(split.test.tolist())]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(ds.y)
    assert abs(len(split.probe) - 0.25 * len(ds.y)) <= 1


def test_prepare_is_deterministic_and_records_the_partition():
    cfg = DataConfig(alpha=0.5)
    a, b = prepare(cfg, 6, seed=3), prepare(cfg, 6, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_probe, b.y_probe)
    assert all(np.array_equal(s, t) for s, t in zip(a.shards, b.shards))
    c = prepare(cfg, 6, seed=4)
    assert not torch.equal(a.y_probe, c.y_probe)
    d = a.describe()
    assert np.array(d["class_counts"]).sum(1).tolist() == d["shard_sizes"]
    ds = load_digits()
    for shard, counts in zip(d["shards"], d["class_counts"]):
        assert np.bincount(ds.y[shard].numpy(), minlength=10).tolist() == counts
    assert not set(sum(d["shards"], [])) & set(d["probe_index"])
    assert not set(sum(d["shards"], [])) & set(d["test_index"])


def test_probe_subsets_are_seeded_sorted_and_bounded():
    a = probe_subset(100, 30, 5, 2)
    assert np.array_equal(a, probe_subset(100, 30, 5, 2))
    assert not np.array_equal(a, probe_subset(100, 30, 5, 3))
    assert not np.array_equal(a, probe_subset(100, 30, 6, 2))
    assert len(np.unique(a)) == 30 and np.all(np.diff(a) > 0) and a.max() < 100
    assert np.array_equal(probe_subset(10, 10, 0, 0), np.arange(10))
    with pytest.raises(ValueError, match="exceeds the probe pool of 100"):
        probe_subset(100, 101, 0, 0)
