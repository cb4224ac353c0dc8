"""Data for federated runs: datasets, splits, partitions and probes.

:func:`prepare` turns a DataConfig and a seed into a :class:`FederatedData`:
disjoint train / probe / test splits, one shard of the training split per
peer, and the per-peer class counts. The same (config, seed) always gives the
same split and partition, whatever method runs on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from . import partition as partitioners
from .datasets import DATASETS, Dataset, load_dataset, make_synthetic, read_idx
from .probes import probe_subset

__all__ = ["DATASETS", "Dataset", "FederatedData", "load_dataset", "make_synthetic",
           "partitioners", "prepare", "probe_subset", "read_idx", "split_dataset"]

# Independent random streams derived from the run seed.
_SPLIT_STREAM, _PARTITION_STREAM = 1, 2


@dataclass
class FederatedData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    shards: List[np.ndarray]      # indices into the training split, one per peer
    x_probe: torch.Tensor         # the public probe pool
    y_probe: torch.Tensor         # hidden: used only to score consensus
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, ...]

    @property
    def class_counts(self) -> np.ndarray:
        return partitioners.class_counts(self.y_train.numpy(), self.shards, self.num_classes)

    @property
    def shard_sizes(self) -> List[int]:
        return [len(s) for s in self.shards]


def split_dataset(ds: Dataset, test_fraction: float, probe_fraction: float,
                  rng: np.random.Generator, max_samples: int = 0, max_test_samples: int = 0):
    """(train, probe, test) index-free splits as tensors.

    Without an official test split, ``test_fraction`` of the samples become the
    test set; ``probe_fraction`` of the samples become the public probe pool;
    the rest is the training pool. ``max_samples`` / ``max_test_samples`` (0 =
    all) subsample first, for quick runs on large datasets.
    """
    has_test = ds.x_test is not None
    if not 0 < probe_fraction < 1:
        raise ValueError(f"probe_fraction must be in (0, 1), got {probe_fraction}")
    if not has_test and not (0 < test_fraction < 1 and test_fraction + probe_fraction < 1):
        raise ValueError(
            f"test_fraction must be in (0, 1) with test_fraction + probe_fraction < 1, got "
            f"{test_fraction} + {probe_fraction}")
    n = len(ds.y)
    order = rng.permutation(n)
    if max_samples:
        order = order[:max_samples]
    n_use = len(order)
    n_probe = int(round(probe_fraction * n_use))
    n_test = 0 if has_test else int(round(test_fraction * n_use))
    probe_idx = order[:n_probe]
    test_idx = order[n_probe:n_probe + n_test]
    train_idx = order[n_probe + n_test:]
    if has_test:
        x_test, y_test = ds.x_test, ds.y_test
        if max_test_samples and max_test_samples < len(y_test):
            keep = torch.from_numpy(np.sort(rng.permutation(len(y_test))[:max_test_samples]))
            x_test, y_test = x_test[keep], y_test[keep]
    else:
        x_test, y_test = ds.x[test_idx], ds.y[test_idx]
    if n_probe < 1 or len(y_test) < 1 or len(train_idx) < 1:
        raise ValueError(
            f"dataset {ds.name!r} with {n_use} samples is too small for probe_fraction="
            f"{probe_fraction} and test_fraction={test_fraction}")
    return ((ds.x[train_idx], ds.y[train_idx]), (ds.x[probe_idx], ds.y[probe_idx]),
            (x_test, y_test))


def prepare(cfg, num_peers: int, seed: int) -> FederatedData:
    """Load ``cfg.dataset`` (a DataConfig), split it and partition it for ``seed``."""
    ds = load_dataset(cfg)
    split_rng = np.random.default_rng([int(seed), _SPLIT_STREAM])
    (x_tr, y_tr), (x_pr, y_pr), (x_te, y_te) = split_dataset(
        ds, cfg.test_fraction, cfg.probe_fraction, split_rng, cfg.max_samples,
        cfg.max_test_samples)
    rng = np.random.default_rng([int(seed), _PARTITION_STREAM])
    labels = y_tr.numpy()
    if cfg.partition == "iid":
        shards = partitioners.iid(labels, num_peers, rng, cfg.min_shard_size)
    elif cfg.partition == "dirichlet":
        shards = partitioners.dirichlet(labels, num_peers, cfg.alpha, rng, cfg.min_shard_size,
                                        cfg.max_retries)
    elif cfg.partition == "classes":
        shards = partitioners.classes_per_peer(labels, num_peers, cfg.classes_per_peer, rng,
                                               cfg.min_shard_size)
    else:
        raise ValueError(f"unknown partition {cfg.partition!r}; known partitions: "
                         f"{', '.join(partitioners.PARTITIONS)}")
    return FederatedData(x_tr, y_tr, shards, x_pr, y_pr, x_te, y_te, ds.num_classes,
                         ds.input_shape)
