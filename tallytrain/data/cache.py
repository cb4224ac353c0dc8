"""The on-disk cache for derived data (trained tokenizers, tokenized corpora,
rendered glyphs).

Every entry is named by a hash of everything that determines its content, so
a changed input is a new entry and an old one is never reused by mistake.
Entries are written to a temporary file and renamed into place, so parallel
runs that build the same entry cannot read a half-written file; and they are
written byte-for-byte deterministically (fixed zip timestamps), so the same
inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from typing import Any, Dict, Optional

import numpy as np

CACHE_ENV = "TALLYTRAIN_CACHE_DIR"

# A fixed timestamp for every zip entry: numpy's own savez stamps the current
# time, which would make two identical caches differ in their bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def cache_dir(override: Optional[str] = None) -> str:
    """The cache folder: ``override``, else $TALLYTRAIN_CACHE_DIR, else
    $XDG_CACHE_HOME/tallytrain, else ~/.cache/tallytrain."""
    if override:
        return os.path.abspath(os.path.expanduser(override))
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tallytrain")


def key_of(inputs: Dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of an entry's inputs."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for every run to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_arrays(path: str, **arrays: np.ndarray) -> None:
    """An .npz (readable by ``np.load``) whose bytes depend only on the arrays."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    write_atomic(path, buffer.getvalue())


def load_arrays(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
