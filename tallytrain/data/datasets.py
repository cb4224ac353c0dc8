"""Datasets: scikit-learn's digits (bundled), a synthetic many-class task,
readers for the on-disk formats of MNIST, Fashion-MNIST (idx) and CIFAR-10/100
(python pickle batches), and two tasks built from files every install has:
glyphs (data/glyphs.py) and pytext (data/pytext.py).

Every loader returns a :class:`Dataset` of inputs shaped ``[N, *shape]``
(float32 images and vectors; int64 token windows for pytext) and int64 labels.
Nothing is downloaded: the image datasets are read from a user-given folder,
and a missing file is an error that says where we looked.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch


@dataclass(frozen=True)
class Dataset:
    """Inputs and labels; ``x_test``/``y_test`` hold an official test split
    when the dataset has one (else None, and the caller carves one).

    Labels are int64 ``[N]`` class ids, or ``[N, T]`` for sequence tasks
    (pytext: one next-token target per position, -1 at padding).
    ``x_probe``/``y_probe``: an official public probe pool, disjoint from the
    training and test samples (pytext's held-out files), else None.
    ``groups``: int64 ``[N]``, the group of each training sample, named by
    ``group_names`` (pytext: the file's module or package; glyphs: the font
    face), for partitions by group; else None.
    ``info``: JSON-able provenance (which files went where, the tokenizer).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    x_test: Optional[torch.Tensor] = None
    y_test: Optional[torch.Tensor] = None
    x_probe: Optional[torch.Tensor] = None
    y_probe: Optional[torch.Tensor] = None
    groups: Optional[torch.Tensor] = None
    group_names: Tuple[str, ...] = ()
    info: Optional[Dict[str, Any]] = field(default=None, compare=False)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape[1:])


# --------------------------------------------------------------------------- #
# bundled and synthetic
# --------------------------------------------------------------------------- #
def load_digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits: 1797 images, 10 classes, bundled."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset("digits", x, y, 10)


def make_synthetic(
    num_classes: int = 100,
    dim: int = 32,
    samples_per_class: int = 30,
    noise: float = 0.6,
    seed: int = 0,
) -> Dataset:
    """A many-class task a small MLP can learn: each class is a Gaussian blob
    around a random prototype in ``dim`` dimensions.

    Prototypes are standard normal; a sample is its prototype plus isotropic
    noise of standard deviation ``noise`` (0.6 in 32 dims leaves the nearest
    other prototype several noise radii away for C up to ~10^4, yet peers that
    never saw a class cannot place it). The task depends only on ``seed``, so
    every run seed sees the same task and only splits and partitions change.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(int(seed))
    prototypes = torch.randn(num_classes, dim, generator=gen)
    y = torch.arange(num_classes).repeat_interleave(samples_per_class)
    x = prototypes[y] + noise * torch.randn(y.numel(), dim, generator=gen)
    return Dataset(f"synthetic{num_classes}", x, y, num_classes)


# --------------------------------------------------------------------------- #
# MNIST / Fashion-MNIST: the idx format
# --------------------------------------------------------------------------- #
_IDX_DTYPES: Dict[int, Union[type, str]] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (optionally gzipped): 2 zero bytes, a dtype code, the
    number of dimensions, big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # not gzip (BadGzipFile), truncated (EOFError), ...
        raise ValueError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4].hex()})")
    ndim = data[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(data) < head:
        raise ValueError(f"{path}: idx header truncated or with {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(data) - head != need:
        raise ValueError(
            f"{path}: idx payload is {len(data) - head} bytes, header {dims} needs {need}"
        )
    return np.frombuffer(data, dtype=dtype, offset=head).reshape(dims)


def _find_file(data_dir: str, subdirs: Sequence[str], names: Sequence[str]) -> str:
    tried = []
    for sub in subdirs:
        for name in names:
            path = os.path.join(data_dir, sub, name)
            tried.append(path)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        "could not find " + " or ".join(names) + " under data_dir; looked at: " + ", ".join(tried)
    )


def _load_idx_dataset(name: str, data_dir: Optional[str], subdirs: Sequence[str]) -> Dataset:
    if not data_dir:
        raise ValueError(f"dataset {name!r} is read from disk: pass --data-dir")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for part, kind in (("images", "idx3"), ("labels", "idx1")):
            base = f"{prefix}-{part}-{kind}-ubyte"
            path = _find_file(data_dir, subdirs, [base, base + ".gz"])
            arrays[split, part] = read_idx(path)
    out = []
    for split in ("train", "test"):
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{name} {split}: images {images.shape} and labels {labels.shape} do not match"
            )
        out.append(torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1))
        out.append(torch.from_numpy(labels.astype(np.int64)))
    _check_labels(name, out[1], 10)
    _check_labels(name, out[3], 10)
    return Dataset(name, out[0], out[1], 10, out[2], out[3])


def load_mnist(data_dir: Optional[str]) -> Dataset:
    return _load_idx_dataset("mnist", data_dir, ["", "MNIST/raw", "mnist", "MNIST"])


def load_fashion_mnist(data_dir: Optional[str]) -> Dataset:
    return _load_idx_dataset(
        "fashion-mnist", data_dir, ["", "FashionMNIST/raw", "fashion-mnist", "FashionMNIST"]
    )


# --------------------------------------------------------------------------- #
# CIFAR-10 / CIFAR-100: python pickle batches
# --------------------------------------------------------------------------- #
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, bytes, numpy
    arrays), so a hostile file in --data-dir cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # protocol-2 pickles written by Python 3 spell bytes this way
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        if module.startswith("numpy.core"):  # numpy >= 2 moved it to numpy._core
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: str, label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: a CIFAR batch must be a dict with b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(data) != len(labels)
    ):
        raise ValueError(
            f"{path}: data must be uint8 [N, 3072] with one label each, got "
            f"{data.dtype} {data.shape} and {labels.shape[0]} labels"
        )
    return data, labels


def _cifar(
    name: str,
    data_dir: Optional[str],
    folder: str,
    train: List[str],
    test: List[str],
    label_key: bytes,
    num_classes: int,
) -> Dataset:
    if not data_dir:
        raise ValueError(f"dataset {name!r} is read from disk: pass --data-dir")
    parts = []
    for files in (train, test):
        xs, ys = [], []
        for fname in files:
            xb, yb = _read_cifar_batch(_find_file(data_dir, [folder, ""], [fname]), label_key)
            xs.append(xb)
            ys.append(yb)
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0).view(-1, 3, 32, 32)
        y = torch.from_numpy(np.concatenate(ys))
        _check_labels(name, y, num_classes)
        parts += [x, y]
    return Dataset(name, parts[0], parts[1], num_classes, parts[2], parts[3])


def load_cifar10(data_dir: Optional[str]) -> Dataset:
    return _cifar(
        "cifar10",
        data_dir,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    )


def load_cifar100(data_dir: Optional[str]) -> Dataset:
    return _cifar(
        "cifar100", data_dir, "cifar-100-python", ["train"], ["test"], b"fine_labels", 100
    )


def _check_labels(name: str, y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}"
        )


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
DATASETS: Dict[str, Callable[..., Dataset]] = {
    "digits": lambda cfg: load_digits(),
    "synthetic": lambda cfg: make_synthetic(
        cfg.num_classes,
        cfg.synthetic_dim,
        cfg.samples_per_class,
        cfg.synthetic_noise,
        cfg.synthetic_seed,
    ),
    "mnist": lambda cfg: load_mnist(cfg.data_dir),
    "fashion-mnist": lambda cfg: load_fashion_mnist(cfg.data_dir),
    "cifar10": lambda cfg: load_cifar10(cfg.data_dir),
    "cifar100": lambda cfg: load_cifar100(cfg.data_dir),
    # Registered by the modules that build them, which import this one:
    # "pytext" (data/pytext.py), "glyphs" (data/glyphs.py).
}


def load_dataset(cfg) -> Dataset:
    """The dataset named by ``cfg.dataset`` (a DataConfig)."""
    try:
        loader = DATASETS[cfg.dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {cfg.dataset!r}; known datasets: {', '.join(DATASETS)}"
        ) from None
    return loader(cfg)
