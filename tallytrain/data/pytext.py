"""``pytext``: next-token prediction on the Python standard library.

The corpus is the ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` /
``dist-packages``), present on every Python install, so nothing is downloaded.
Documents are files. Every file belongs to a *group*, its top-level module or
package (``asyncio``, ``email``, ``argparse``, ...): peers that each hold a few
groups see different code, a natural non-IID split.

Pipeline (each step deterministic; the costly ones cached, see data/cache.py):

1. :func:`list_sources`: the files, their groups, sizes and content hashes.
2. :func:`split_sources`: held-out files for the public probe pool and the test
   set, disjoint from the training files, drawn within every group.
3. :func:`train_tokenizer`: a byte-level BPE trained on the training files only.
4. :func:`tokenize_sources` and :func:`make_windows`: each file cut into
   non-overlapping windows of ``context`` tokens, the targets shifted by one.

:func:`load_pytext` runs them all and returns a :class:`PyText`;
``PyText.dataset()`` is the :class:`~tallytrain.data.datasets.Dataset` the
engine consumes.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cache
from .datasets import DATASETS, Dataset

PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN,)
# Byte-level BPE starts from the 256 byte symbols; the special tokens come first.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CONTEXT = 64
# One file each for the training, probe and test splits.
MIN_FILES = 3
# A package holding more than this share of the corpus's bytes is split one
# level down into groups of its own (repeatedly): on CPython the ``test``
# package is 54% of the standard library, and as one group it would hand one
# peer more data than all the others together. No other package comes close
# (the next, encodings, is 4.5%).
MAX_GROUP_SHARE = 0.5
# Groups with fewer files than this cannot give a file to each split; they are
# pooled into one stratum when the held-out files are drawn.
_MIN_STRATUM_FILES = 3
# Folders never read: third-party code installed next to the standard library.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Everything that shapes the tokenizer, recorded in its cache key.
TOKENIZER_SETTINGS: Dict[str, Any] = {
    "model": "BPE",
    "pre_tokenizer": "ByteLevel(add_prefix_space=False, use_regex=True)",
    "decoder": "ByteLevel",
    "min_frequency": 2,
    "special_tokens": list(SPECIAL_TOKENS),
    "initial_alphabet": "ByteLevel.alphabet()",
    "text": "utf-8, errors=replace",
}
_FORMAT = 1  # bump when the cached files' layout or meaning changes
_SPLITS = ("train", "probe", "test")


@dataclass(frozen=True)
class SourceFile:
    """One document: ``path`` relative to the corpus root, with '/' separators."""

    path: str
    group: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TextSplit:
    """Token windows of one split: x [N, T] inputs, y [N, T] targets (-1 at
    padding), and for each window the index of its file (into
    ``PyText.files``) and the id of its group (into ``PyText.group_names``)."""

    x: torch.Tensor
    y: torch.Tensor
    file_ids: torch.Tensor
    groups: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Predicted positions (targets that are not padding)."""
        return int((self.y >= 0).sum())


@dataclass(frozen=True)
class PyText:
    """The windowed corpus with its provenance."""

    train: TextSplit
    probe: TextSplit
    test: TextSplit
    files: Tuple[SourceFile, ...]
    file_split: Dict[str, Tuple[int, ...]]  # split name -> indices into files
    group_names: Tuple[str, ...]
    vocab_size: int  # the requested size: the number of classes
    tokenizer_vocab_size: int  # what BPE reached (<= vocab_size on a small corpus)
    pad_id: int
    context: int
    root: str
    tokenizer_path: str
    split_seed: int

    def dataset(self) -> Dataset:
        """The engine's view: training windows with their groups, the held-out
        probe windows as the official probe pool, the test windows as the
        official test split, and the file split in ``info``."""
        return Dataset(
            "pytext",
            self.train.x,
            self.train.y,
            self.vocab_size,
            self.test.x,
            self.test.y,
            x_probe=self.probe.x,
            y_probe=self.probe.y,
            groups=self.train.groups,
            group_names=self.group_names,
            info=self.describe(),
        )

    def describe(self) -> Dict[str, Any]:
        """JSON-able provenance: the files of each split, the tokenizer, sizes."""
        return {
            "root": self.root,
            "split_seed": self.split_seed,
            "context": self.context,
            "vocab_size": self.vocab_size,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "pad_id": self.pad_id,
            "tokenizer": self.tokenizer_path,
            "files": {s: [self.files[i].path for i in self.file_split[s]] for s in _SPLITS},
            "windows": {s: len(getattr(self, s).y) for s in _SPLITS},
            "tokens": {s: getattr(self, s).num_tokens for s in _SPLITS},
            "groups": len(self.group_names),
        }


# --------------------------------------------------------------------------- #
# 1. the files
# --------------------------------------------------------------------------- #
def stdlib_root() -> str:
    """The standard library folder of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def _read_text(path: str) -> str:
    # A handful of CPython's test files are deliberately not UTF-8; replacing
    # their odd bytes keeps every file readable, the same way every time.
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _walk_py_files(root: str) -> List[str]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found += [
            prefix + n
            for n in names
            if n.endswith(".py") and os.path.isfile(os.path.join(folder, n))
        ]
    return sorted(found)


def _module_name(part: str) -> str:
    return part[:-3] if part.endswith(".py") else part


def _groups_of(paths: Sequence[str], sizes: Sequence[int], max_share: float) -> List[str]:
    """Each file's group: its top-level module or package, with any package
    above ``max_share`` of the bytes split into its sub-modules / packages."""
    depth = [1] * len(paths)
    total = max(sum(sizes), 1)
    while True:
        names = [
            ".".join(_module_name(p) for p in path.split("/")[:d]) for path, d in zip(paths, depth)
        ]
        share: Dict[str, int] = {}
        for name, size in zip(names, sizes):
            share[name] = share.get(name, 0) + size
        # A group can be split only where its files lie deeper than the group.
        too_big = {n for n, s in share.items() if s > max_share * total}
        grow = [
            i
            for i, (n, path) in enumerate(zip(names, paths))
            if n in too_big and path.count("/") + 1 > depth[i]
        ]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def list_sources(
    root: Optional[str] = None, max_group_share: float = MAX_GROUP_SHARE
) -> List[SourceFile]:
    """The corpus: every ``*.py`` file under ``root`` (default the standard
    library) outside site-packages / dist-packages, without the empty or
    whitespace-only ones (nothing to predict), sorted by path."""
    root = stdlib_root() if root is None else root
    if not os.path.isdir(root):
        raise ValueError(f"pytext corpus folder (--data-dir) {root!r} is not a folder")
    if not 0 < max_group_share <= 1:
        raise ValueError(f"max_group_share must be in (0, 1], got {max_group_share}")
    paths, sizes, hashes = [], [], []
    for path in _walk_py_files(root):
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
        if not data.strip():
            continue
        paths.append(path)
        sizes.append(len(data))
        hashes.append(hashlib.sha256(data).hexdigest())
    if len(paths) < MIN_FILES:
        raise ValueError(
            f"pytext needs at least {MIN_FILES} non-empty .py files (one each for training, "
            f"probes and test) under {root!r} (--data-dir), found {len(paths)}"
        )
    groups = _groups_of(paths, sizes, max_group_share)
    return [SourceFile(p, g, s, h) for p, g, s, h in zip(paths, groups, sizes, hashes)]


# --------------------------------------------------------------------------- #
# 2. held-out files
# --------------------------------------------------------------------------- #
def split_sources(
    files: Sequence[SourceFile], probe_fraction: float, test_fraction: float, seed: int = 0
) -> Dict[str, Tuple[int, ...]]:
    """Indices into ``files`` of the training, probe and test files.

    The held-out files are drawn *within every group* (stratified), not from
    the corpus as a whole: a whole-corpus draw could leave a package out of
    the probe and test sets, or put all of a small package there, and then
    the probes (on which peers agree) and the test score would not cover the
    code the peers hold. Groups of fewer than 3 files (most top-level
    modules are one file) cannot give a file to each split, so they are
    pooled into one stratum and drawn from together. From a stratum of n >= 3
    files, round(fraction x n) files (at least 1) go to the probe set and to
    the test set, and at least one file stays for training; smaller strata
    stay in training. The draw depends only on ``seed``.
    """
    for name, value in (("probe_fraction", probe_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if probe_fraction + test_fraction >= 1:
        raise ValueError(
            f"probe_fraction + test_fraction must be < 1, got {probe_fraction} + {test_fraction}"
        )
    members: Dict[str, List[int]] = {}
    for i, f in enumerate(files):
        members.setdefault(f.group, []).append(i)
    pooled = sorted(i for idx in members.values() if len(idx) < _MIN_STRATUM_FILES for i in idx)
    strata = [idx for _, idx in sorted(members.items()) if len(idx) >= _MIN_STRATUM_FILES]
    strata.append(pooled)
    rng = np.random.default_rng([int(seed), 0x70797478])  # its own stream: "pytx"
    out: Dict[str, List[int]] = {s: [] for s in _SPLITS}
    for idx in strata:
        order = [idx[j] for j in rng.permutation(len(idx))]
        n = len(order)
        if n < _MIN_STRATUM_FILES:
            out["train"] += order
            continue
        n_probe = max(1, int(round(probe_fraction * n)))
        n_test = max(1, int(round(test_fraction * n)))
        while n_probe + n_test > n - 1:  # keep a training file in every stratum
            if n_probe >= n_test:
                n_probe -= 1
            else:
                n_test -= 1
        out["probe"] += order[:n_probe]
        out["test"] += order[n_probe : n_probe + n_test]
        out["train"] += order[n_probe + n_test :]
    if not out["probe"] or not out["test"]:
        raise ValueError(
            f"pytext's {len(files)} files leave no group of {_MIN_STRATUM_FILES}+ files to draw "
            f"probe and test files from; add .py files under --data-dir"
        )
    return {s: tuple(sorted(v)) for s, v in out.items()}


# --------------------------------------------------------------------------- #
# 3. the tokenizer
# --------------------------------------------------------------------------- #
def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"--vocab-size must be an integer >= {MIN_VOCAB_SIZE} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special token {PAD_TOKEN}), got {vocab_size!r}"
        )


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dataset pytext needs HuggingFace tokenizers: pip install 'tallytrain[text]'"
        ) from None
    return tokenizers


def tokenizer_key(files: Sequence[SourceFile], vocab_size: int) -> str:
    """The cache key of the tokenizer trained on ``files``: their paths,
    sizes and content hashes, the vocabulary size, the settings and the
    tokenizers version."""
    return cache.key_of(
        {
            "kind": "pytext-bpe",
            "format": _FORMAT,
            "vocab_size": vocab_size,
            "settings": TOKENIZER_SETTINGS,
            "tokenizers": _tokenizers_version(),
            "files": [[f.path, f.size, f.sha256] for f in files],
        }
    )


def train_tokenizer(
    root: str,
    files: Sequence[SourceFile],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: Optional[str] = None,
):
    """A byte-level BPE trained on ``files`` (the training files only), loaded
    from the cache when there; returns ``(tokenizer, path of its JSON)``.

    Training is deterministic: the same files and vocabulary size give the same
    vocabulary and merges, whatever the thread count (tokenizers breaks ties
    between equally frequent pairs by the pair itself)."""
    check_vocab_size(vocab_size)
    tk = _require_tokenizers()
    path = os.path.join(
        cache.cache_dir(cache_dir), "pytext", f"tokenizer-{tokenizer_key(files, vocab_size)}.json"
    )
    if os.path.isfile(path):
        return tk.Tokenizer.from_file(path), path
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=TOKENIZER_SETTINGS["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [_read_text(os.path.join(root, f.path)) for f in files]
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    cache.write_atomic(path, tokenizer.to_str().encode())
    return tokenizer, path


# --------------------------------------------------------------------------- #
# 4. tokens and windows
# --------------------------------------------------------------------------- #
def tokenize_sources(
    root: str,
    files: Sequence[SourceFile],
    tokenizer,
    tokenizer_path: str,
    cache_dir: Optional[str] = None,
) -> List[np.ndarray]:
    """The token ids of every file (int32), cached: encoding the standard
    library takes 7-40 s on 2 cores (idle to loaded), about twice its BPE
    training (docs/datasets.md)."""
    with open(tokenizer_path, "rb") as f:
        tokenizer_hash = hashlib.sha256(f.read()).hexdigest()
    key = cache.key_of(
        {
            "kind": "pytext-tokens",
            "format": _FORMAT,
            "tokenizer": tokenizer_hash,
            "files": [[f.path, f.size, f.sha256] for f in files],
        }
    )
    path = os.path.join(cache.cache_dir(cache_dir), "pytext", f"tokens-{key}.npz")
    if os.path.isfile(path):
        arrays = cache.load_arrays(path)
    else:
        encoded = tokenizer.encode_batch(
            [_read_text(os.path.join(root, f.path)) for f in files], add_special_tokens=False
        )
        lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
        arrays = {
            "tokens": np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encoded]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        }
        cache.save_arrays(path, **arrays)
    off = arrays["offsets"]
    return [arrays["tokens"][off[i] : off[i + 1]] for i in range(len(files))]


def make_windows(
    token_lists: Sequence[np.ndarray], context: int, pad_id: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping windows over each token list: window k of a list t has
    x = t[kT : kT+T] and y = t[kT+1 : kT+T+1]. The last window is padded:
    inputs with ``pad_id``, targets with -1 (ignored). A list of n >= 2 tokens
    gives ceil((n-1)/T) windows, shorter ones none. Returns x, y (int64
    [N, T]) and the index of each window's list."""
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    xs, ys, owners = [], [], []
    for i, tokens in enumerate(token_lists):
        n = len(tokens)
        if n < 2:
            continue
        count = -(-(n - 1) // context)
        padded = np.full(count * context + 1, pad_id, dtype=np.int64)
        padded[:n] = tokens
        target = padded[1:].copy()
        target[n - 1 :] = -1
        xs.append(padded[:-1].reshape(count, context))
        ys.append(target.reshape(count, context))
        owners.append(np.full(count, i, dtype=np.int64))
    if not xs:
        empty = np.zeros((0, context), dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.int64)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(owners)


# --------------------------------------------------------------------------- #
# all together
# --------------------------------------------------------------------------- #
def load_pytext(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    context: int = DEFAULT_CONTEXT,
    probe_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    max_group_share: float = MAX_GROUP_SHARE,
) -> PyText:
    """The pytext task (see the module docstring).

    vocab_size: BPE vocabulary size, the number of classes (>= 257).
    context: tokens per window (T).
    probe_fraction, test_fraction: shares of every group's files held out for
        the public probe pool and the test set.
    split_seed: the held-out draw; fixed across run seeds by default, so that
        every run seed shares the tokenizer and the task (as synthetic_seed).
    root: the corpus folder (default: the standard library).
    cache_dir: where the tokenizer and the token ids are cached (default:
        $TALLYTRAIN_CACHE_DIR or ~/.cache/tallytrain).
    """
    check_vocab_size(vocab_size)
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"--context must be an integer >= 1, got {context!r}")
    root = os.path.abspath(stdlib_root() if root is None else root)
    files = list_sources(root, max_group_share)
    file_split = split_sources(files, probe_fraction, test_fraction, split_seed)
    tokenizer, tokenizer_path = train_tokenizer(
        root, [files[i] for i in file_split["train"]], vocab_size, cache_dir
    )
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    tokens = tokenize_sources(root, files, tokenizer, tokenizer_path, cache_dir)
    group_names = tuple(sorted({f.group for f in files}))
    group_id = {name: i for i, name in enumerate(group_names)}
    group_of_file = np.array([group_id[f.group] for f in files], dtype=np.int64)
    splits = {}
    for name in _SPLITS:
        ids = np.asarray(file_split[name], dtype=np.int64)
        x, y, owner = make_windows([tokens[i] for i in ids], context, pad_id)
        if len(y) == 0:
            raise ValueError(
                f"pytext's {name} files hold no window of 2+ tokens; add .py files "
                f"under --data-dir or change the split fractions"
            )
        file_ids = ids[owner]
        splits[name] = TextSplit(
            torch.from_numpy(x),
            torch.from_numpy(y),
            torch.from_numpy(file_ids),
            torch.from_numpy(group_of_file[file_ids]),
        )
    return PyText(
        splits["train"],
        splits["probe"],
        splits["test"],
        tuple(files),
        file_split,
        group_names,
        vocab_size,
        tokenizer.get_vocab_size(),
        pad_id,
        context,
        root,
        tokenizer_path,
        split_seed,
    )


def _from_config(cfg) -> Dataset:
    # Options that DataConfig does not have (yet) take their defaults.
    return load_pytext(
        vocab_size=getattr(cfg, "vocab_size", DEFAULT_VOCAB_SIZE),
        context=getattr(cfg, "context", DEFAULT_CONTEXT),
        probe_fraction=cfg.probe_fraction,
        test_fraction=cfg.test_fraction,
        root=cfg.data_dir,
        cache_dir=getattr(cfg, "cache_dir", None),
    ).dataset()


# Python standard library, next-token prediction. Registered here rather than
# in datasets.py, which this module imports: no import cycle.
DATASETS["pytext"] = _from_config
