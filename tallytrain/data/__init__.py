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

__all__ = [
    "DATASETS",
    "Dataset",
    "FederatedData",
    "load_dataset",
    "load_glyphs",
    "load_pytext",
    "make_synthetic",
    "Split",
    "partitioners",
    "prepare",
    "probe_subset",
    "read_idx",
    "split_dataset",
]


@dataclass
class FederatedData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    shards: List[np.ndarray]  # indices into the training split, one per peer
    x_probe: torch.Tensor  # the public probe pool
    y_probe: torch.Tensor  # hidden: used only to score consensus
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, ...]
    split: "Split"  # where each split came from in the dataset
    info: Optional[dict] = None  # the dataset's provenance (Dataset.info)

    @property
    def sequence(self) -> bool:
        """Labels are per position ([N, T], -1 at padding): a sequence task."""
        return self.y_train.dim() > 1

    @property
    def position_shape(self) -> Tuple[int, ...]:
        """The positions of one sample: () for a classifier, (T,) for token windows."""
        return tuple(self.y_train.shape[1:])

    def probe_mask(self, probe_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Which positions of these probes are real (not padding), or None for
        a classifier. Probes are public, so every peer knows where their
        padding is; padding never votes and is never distilled on."""
        return (self.y_probe[probe_indices] >= 0) if self.sequence else None

    @property
    def class_counts(self) -> np.ndarray:
        """[peers, classes]: samples of each class per shard (sequence tasks:
        target tokens of each vocabulary id, padding left out)."""
        return partitioners.class_counts(self.y_train.numpy(), self.shards, self.num_classes)

    @property
    def shard_sizes(self) -> List[int]:
        return [len(s) for s in self.shards]

    def describe(self) -> dict:
        """The partition as JSON: each peer's samples as dataset indices, and
        the per-peer class counts."""
        return {
            "train_size": len(self.y_train),
            "probe_size": len(self.y_probe),
            "test_size": len(self.y_test),
            "num_classes": self.num_classes,
            "probe_index": self.split.probe.tolist(),
            "probe_index_refers_to": "official probe pool"
            if self.split.official_probe
            else "dataset",
            "test_index": self.split.test.tolist(),
            "test_index_refers_to": "official test split"
            if self.split.official_test
            else "dataset",
            "shards": [self.split.train[s].tolist() for s in self.shards],
            "shard_sizes": self.shard_sizes,
            "class_counts": self.class_counts.tolist(),
            "class_counts_count": "target tokens" if self.sequence else "samples",
            "dataset_info": self.info,
        }


@dataclass(frozen=True)
class Split:
    """Dataset indices of the training pool, the probe pool and the test set
    (test indices refer to the official test split when ``official_test``,
    probe indices to the official probe pool when ``official_probe``)."""

    train: np.ndarray
    probe: np.ndarray
    test: np.ndarray
    official_test: bool
    official_probe: bool = False  # probe indices refer to the dataset's own probe pool


def split_dataset(
    ds: Dataset,
    test_fraction: float,
    probe_fraction: float,
    rng: np.random.Generator,
    max_samples: int = 0,
    max_test_samples: int = 0,
    max_probe_samples: int = 0,
) -> Split:
    """Disjoint train / probe / test indices.

    Without an official test split, ``test_fraction`` of the samples become the
    test set; ``probe_fraction`` of the samples become the public probe pool;
    the rest is the training pool. ``max_samples`` / ``max_test_samples`` (0 =
    all) subsample first, for quick runs on large datasets.

    A dataset with its own probe pool (``ds.x_probe``, e.g. pytext's held-out
    files) keeps it: the probe pool is that pool and the training pool is all
    of ``ds.x`` (``max_samples`` then subsamples the training pool alone).
    ``max_probe_samples`` (0 = all) keeps a random subset of the probe pool
    either way: soft-label payloads and memories of a language model grow
    with the pool times the vocabulary.
    """
    if ds.x_probe is not None:
        return _split_with_probe_pool(ds, rng, max_samples, max_test_samples, max_probe_samples)
    official = ds.x_test is not None
    if not 0 < probe_fraction < 1:
        raise ValueError(f"probe_fraction must be in (0, 1), got {probe_fraction}")
    if not official and not (0 < test_fraction < 1 and test_fraction + probe_fraction < 1):
        raise ValueError(
            f"test_fraction must be in (0, 1) with test_fraction + probe_fraction < 1, got "
            f"{test_fraction} + {probe_fraction}"
        )
    order = rng.permutation(len(ds.y))
    if max_samples:
        order = order[:max_samples]
    n_use = len(order)
    n_probe = int(round(probe_fraction * n_use))
    n_test = 0 if official else int(round(test_fraction * n_use))
    probe = np.sort(order[:n_probe])
    train = np.sort(order[n_probe + n_test :])
    if official:
        if ds.y_test is None:
            raise ValueError(f"dataset {ds.name!r} has x_test but no y_test")
        test = np.arange(len(ds.y_test))
        if max_test_samples and max_test_samples < len(test):
            test = np.sort(rng.permutation(len(test))[:max_test_samples])
    else:
        test = np.sort(order[n_probe : n_probe + n_test])
        if max_test_samples:
            test = test[:max_test_samples]
    if len(probe) < 1 or len(test) < 1 or len(train) < 1:
        raise ValueError(
            f"dataset {ds.name!r} with {n_use} samples is too small for probe_fraction="
            f"{probe_fraction} and test_fraction={test_fraction}"
        )
    probe = _at_most(probe, max_probe_samples, rng)
    return Split(train, probe, test, official)


def _at_most(index: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """A sorted random subset of ``cap`` entries (all when cap is 0 or large
    enough; no random draw then, so uncapped splits are unchanged)."""
    if not cap or cap >= len(index):
        return index
    return np.sort(index[rng.permutation(len(index))[:cap]])


def _split_with_probe_pool(
    ds: Dataset,
    rng: np.random.Generator,
    max_samples: int,
    max_test_samples: int,
    max_probe_samples: int,
) -> Split:
    if ds.x_test is None or ds.y_test is None:
        raise ValueError(f"dataset {ds.name!r} has a probe pool but no test split")
    if ds.y_probe is None:
        raise ValueError(f"dataset {ds.name!r} has x_probe but no y_probe")
    train = _at_most(np.arange(len(ds.y)), max_samples, rng)
    probe = _at_most(np.arange(len(ds.y_probe)), max_probe_samples, rng)
    test = _at_most(np.arange(len(ds.y_test)), max_test_samples, rng)
    if len(probe) < 1 or len(test) < 1 or len(train) < 1:
        raise ValueError(f"dataset {ds.name!r} has an empty training, probe or test split")
    return Split(train, probe, test, True, official_probe=True)


def prepare(cfg, num_peers: int, seed: int, dataset: Optional[Dataset] = None) -> FederatedData:
    """Split and partition ``cfg.dataset`` (a DataConfig) for ``seed``; pass
    ``dataset`` (from :func:`load_dataset`) to avoid reading it again."""
    ds = load_dataset(cfg) if dataset is None else dataset
    split = split_dataset(
        ds,
        cfg.test_fraction,
        cfg.probe_fraction,
        np.random.default_rng([int(seed), SPLIT_STREAM]),
        cfg.max_samples,
        cfg.max_test_samples,
        getattr(cfg, "max_probe_samples", 0),
    )
    tr, pr = torch.from_numpy(split.train), torch.from_numpy(split.probe)
    te = torch.from_numpy(split.test)
    x_test, y_test = (ds.x_test, ds.y_test) if split.official_test else (ds.x, ds.y)
    x_probe, y_probe = (ds.x_probe, ds.y_probe) if split.official_probe else (ds.x, ds.y)
    # split_dataset takes an official split only where the dataset has it
    assert x_test is not None and y_test is not None
    assert x_probe is not None and y_probe is not None
    if cfg.partition == "groups" and ds.groups is None:
        raise ValueError(
            f"--partition groups needs a dataset whose samples have groups "
            f"(pytext: modules, glyphs: font faces); {ds.name!r} has none"
        )
    labels = _partition_labels(ds, split.train, cfg.partition)
    rng = np.random.default_rng([int(seed), PARTITION_STREAM])
    if cfg.partition == "groups":
        shards = partitioners.by_group(labels, num_peers, rng, cfg.min_shard_size)
    elif cfg.partition == "iid":
        shards = partitioners.iid(labels, num_peers, rng, cfg.min_shard_size)
    elif cfg.partition == "dirichlet":
        shards = partitioners.dirichlet(
            labels, num_peers, cfg.alpha, rng, cfg.min_shard_size, cfg.max_retries
        )
    elif cfg.partition == "classes":
        shards = partitioners.classes_per_peer(
            labels, num_peers, cfg.classes_per_peer, rng, cfg.min_shard_size
        )
    else:
        raise ValueError(
            f"unknown partition {cfg.partition!r}; known partitions: "
            f"{', '.join(partitioners.PARTITIONS)}"
        )
    return FederatedData(
        ds.x[tr],
        ds.y[tr],
        shards,
        x_probe[pr],
        y_probe[pr],
        x_test[te],
        y_test[te],
        ds.num_classes,
        ds.input_shape,
        split,
        ds.info,
    )


def _partition_labels(ds: Dataset, train: np.ndarray, partition: str) -> np.ndarray:
    """What the partitioner splits on, per training sample: its class, or its
    group for ``groups``. Sequence labels have a class per position, so
    label skew over classes has no meaning for a window: ``dirichlet`` and
    ``classes`` then skew over the windows' groups (pytext: modules)."""
    if partition == "groups" or (ds.y.dim() > 1 and partition in ("dirichlet", "classes")):
        if ds.groups is None:
            raise ValueError(
                f"--partition {partition} on a sequence task skews over the "
                f"samples' groups, and dataset {ds.name!r} has none; use "
                f"--partition iid"
            )
        return ds.groups[torch.from_numpy(train)].numpy()
    return ds.y[torch.from_numpy(train)].numpy()
