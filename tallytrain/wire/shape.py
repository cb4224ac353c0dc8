"""The SHAPE section, both directions: the leading shape of a message's
positions (votes, consensus labels, soft labels) and the ``(*positions, k)``
shape of a soft top-k message. docs/wire.md, "The leading shape".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .frame import _Header, _fail, _uint


# The SHAPE section's dimension count is one byte.
MAX_SHAPE_DIMS = 255


def _shape_section_bytes(ndim: int) -> int:
    """The SHAPE section: a u8 dimension count, then one u32 per dimension."""
    return 1 + 4 * ndim


def _optional_shape_bytes(n: int, shape: Optional[Sequence[int]]) -> int:
    """The SHAPE section's bytes for a leading ``shape`` of n positions (0 when 1-D)."""
    return 0 if shape is None or tuple(shape) == (n,) else _shape_section_bytes(len(shape))


def _shape_section(dims: Sequence[int]) -> np.ndarray:
    """A u8 dimension count, then the dimensions as u32 (docs/wire.md)."""
    if len(dims) > MAX_SHAPE_DIMS:
        raise ValueError(f"shape must have at most {MAX_SHAPE_DIMS} dimensions, got {len(dims)}")
    section = np.empty(_shape_section_bytes(len(dims)), dtype=np.uint8)
    section[0] = len(dims)
    section[1:] = np.asarray(dims, dtype="<u4").view(np.uint8)
    return section


def _leading_shape(t: torch.Tensor, name: str) -> Optional[Tuple[int, ...]]:
    """The dimensions of a tensor's leading shape to send in a SHAPE section, or
    None when it is 1-D (sent without the section)."""
    dims = tuple(_uint(d, f"{name}.shape[{i}]") for i, d in enumerate(t.shape))
    if len(dims) > MAX_SHAPE_DIMS:
        raise ValueError(f"{name} must have at most {MAX_SHAPE_DIMS} dimensions, got {len(dims)}")
    return None if len(dims) == 1 else dims


def _votes_shape(shape: Optional[Sequence[int]], n: int) -> Optional[Tuple[int, ...]]:
    """The dimensions to send in a SHAPE section, or None when the votes are 1-D."""
    if shape is None:
        return None
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    dims = tuple(_uint(d, f"shape[{i}]") for i, d in enumerate(shape))
    if len(dims) > MAX_SHAPE_DIMS:
        raise ValueError(f"shape must have at most {MAX_SHAPE_DIMS} dimensions, got {len(dims)}")
    if math.prod(dims) != n:
        raise ValueError(f"shape {dims} holds {math.prod(dims)} votes, but n = {n}")
    return None if dims == (n,) else dims


def _decode_shape(
    h: _Header,
    payload: memoryview,
    rest_bytes: int,
    what: str,
    one_dim_ok: bool = False,
    items: str = "votes",
) -> Tuple[int, ...]:
    """Read and check the shape section, which ``rest_bytes`` bytes of ``what``
    follow; every read stays inside the payload. The product of the
    dimensions must be the header's n (``items`` names what n counts)."""
    if h.payload_len < 1:
        raise _fail(
            h,
            "payload size mismatch: a shape section is required but the payload "
            "has no room for the shape's dimension count",
        )
    ndim = payload[0]
    need = _shape_section_bytes(ndim) + rest_bytes
    if h.payload_len != need:
        raise _fail(
            h,
            f"payload size mismatch: a {ndim}-D shape and {what} need {need} "
            f"bytes, header says payload_len = {h.payload_len}",
        )
    if ndim == 1 and not one_dim_ok:
        raise _fail(h, "shape: a 1-D shape is sent without the SHAPE flag (non-canonical)")
    dims = tuple(int(d) for d in np.frombuffer(payload, dtype="<u4", count=ndim, offset=1))
    if math.prod(dims) != h.n:
        raise _fail(h, f"shape {dims} holds {math.prod(dims)} {items}, but n = {h.n}")
    return dims
