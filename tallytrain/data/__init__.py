"""Data for federated runs: datasets, splits, partitions and probes.

:func:`prepare` turns a DataConfig and a seed into a :class:`FederatedData`:
disjoint train / probe / test splits, one shard of the training split per
peer, and the per-peer class counts. The same (config, seed) always gives the
same split and partition, whatever method runs on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..streams import PARTITION_STREAM, SPLIT_STREAM
from . import partition as partitioners
from .datasets import DATASETS, Dataset, load_dataset, make_synthetic, read_idx
from .glyphs import load_glyphs
from .probes import probe_subset
from .pytext import load_pytext

__all__ = ["DATASETS", "Dataset", "FederatedData", "load_dataset", "load_glyphs", "load_pytext",
           "make_synthetic", "Split", "partitioners", "prepare", "probe_subset", "read_idx",
           "split_dataset"]


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
    split: "Split"                # where each split came from in the dataset

    @property
    def class_counts(self) -> np.ndarray:
        return partitioners.class_counts(self.y_train.numpy(), self.shards, self.num_classes)

    @property
    def shard_sizes(self) -> List[int]:
        return [len(s) for s in self.shards]

    def describe(self) -> dict:
        """The partition as JSON: each peer's samples as dataset indices, and
        the per-peer class counts."""
        return {
            "train_size": len(self.y_train), "probe_size": len(self.y_probe),
            "test_size": len(self.y_test), "num_classes": self.num_classes,
            "probe_index": self.split.probe.tolist(),
            "test_index": self.split.test.tolist(),
            "test_index_refers_to": "official test split" if self.split.official_test
                                    else "dataset",
            "shards": [self.split.train[s].tolist() for s in self.shards],
            "shard_sizes": self.shard_sizes,
            "class_counts": self.class_counts.tolist(),
        }


@dataclass(frozen=True)
class Split:
    """Dataset indices of the training pool, the probe pool and the test set
    (test indices refer to the official test split when ``official_test``)."""

    train: np.ndarray
    probe: np.ndarray
    test: np.ndarray
    official_test: bool


def split_dataset(ds: Dataset, test_fraction: float, probe_fraction: float,
                  rng: np.random.Generator, max_samples: int = 0,
                  max_test_samples: int = 0) -> Split:
    """Disjoint train / probe / test indices.

    Without an official test split, ``test_fraction`` of the samples become the
    test set; ``probe_fraction`` of the samples become the public probe pool;
    the rest is the training pool. ``max_samples`` / ``max_test_samples`` (0 =
    all) subsample first, for quick runs on large datasets.
    """
    official = ds.x_test is not None
    if not 0 < probe_fraction < 1:
        raise ValueError(f"probe_fraction must be in (0, 1), got {probe_fraction}")
    if not official and not (0 < test_fraction < 1 and test_fraction + probe_fraction < 1):
        raise ValueError(
            f"test_fraction must be in (0, 1) with test_fraction + probe_fraction < 1, got "
            f"{test_fraction} + {probe_fraction}")
    order = rng.permutation(len(ds.y))
    if max_samples:
        order = order[:max_samples]
    n_use = len(order)
    n_probe = int(round(probe_fraction * n_use))
    n_test = 0 if official else int(round(test_fraction * n_use))
    probe = np.sort(order[:n_probe])
    train = np.sort(order[n_probe + n_test:])
    if official:
        test = np.arange(len(ds.y_test))
        if max_test_samples and max_test_samples < len(test):
            test = np.sort(rng.permutation(len(test))[:max_test_samples])
    else:
        test = np.sort(order[n_probe:n_probe + n_test])
        if max_test_samples:
            test = test[:max_test_samples]
    if len(probe) < 1 or len(test) < 1 or len(train) < 1:
        raise ValueError(
            f"dataset {ds.name!r} with {n_use} samples is too small for probe_fraction="
            f"{probe_fraction} and test_fraction={test_fraction}")
    return Split(train, probe, test, official)


def prepare(cfg, num_peers: int, seed: int, dataset: Optional[Dataset] = None) -> FederatedData:
    """Split and partition ``cfg.dataset`` (a DataConfig) for ``seed``; pass
    ``dataset`` (from :func:`load_dataset`) to avoid reading it again."""
    ds = load_dataset(cfg) if dataset is None else dataset
    split = split_dataset(ds, cfg.test_fraction, cfg.probe_fraction,
                          np.random.default_rng([int(seed), SPLIT_STREAM]), cfg.max_samples,
                          cfg.max_test_samples)
    tr, pr = torch.from_numpy(split.train), torch.from_numpy(split.probe)
    te = torch.from_numpy(split.test)
    x_test, y_test = (ds.x_test, ds.y_test) if split.official_test else (ds.x, ds.y)
    labels = ds.y[tr].numpy()
    rng = np.random.default_rng([int(seed), PARTITION_STREAM])
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
    return FederatedData(ds.x[tr], ds.y[tr], shards, ds.x[pr], ds.y[pr], x_test[te], y_test[te],
                         ds.num_classes, ds.input_shape, split)
