"""SPARSE_PARAMS: a sparse parameter vector, k indices (coded by
:mod:`.index`) and k values. Size bound, encoder and decoder.
"""

from __future__ import annotations

import numpy as np
import torch

from .frame import (
    _FLOAT_BY_CODE,
    OVERHEAD,
    VERSION,
    Flag,
    _Header,
    Message,
    MessageKind,
    WireDtype,
    _bytes,
    _decoder,
    _dtype,
    _fail,
    _float_code,
    _floats,
    _floats_from,
    _frame,
    _itemsize,
    _payload_size,
    _tensor,
    _uint,
    _zero,
)
from .index import _best_rice_parameter, _bitmap, _bitmap_decode, _rice_decode, _rice_encode


def sparse_message_max_bytes(k: int, size: int, dtype: torch.dtype = torch.float32) -> int:
    """Upper bound of len(encode_sparse(...)): the bitmap form, which the
    encoder uses unless Rice-coded gaps are strictly smaller."""
    return OVERHEAD + (size + 7) // 8 + k * _itemsize(dtype)


def encode_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    size: int,
    *,
    dtype: torch.dtype = torch.float32,
    round: int,
    sender: int,
) -> bytes:
    """A sparse vector of ``size`` entries: k strictly increasing indices, k values.

    The indices are coded as whichever is smaller: Rice-coded gaps (parameter
    in the header's ``bits``) or a bitmap of ``size`` bits (Flag.BITMAP, chosen
    on a tie because it decodes in one pass). See docs/wire.md."""
    indices = _tensor(indices, "indices", 1)
    values = _tensor(values, "values", 1)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got {indices.dtype}")
    m = _uint(size, "size")
    k = indices.numel()
    if values.numel() != k:
        raise ValueError(f"values must have one entry per index ({k}), got {values.numel()}")
    if k > m:
        raise ValueError(f"indices has {k} entries, more than size = {m}")
    idx = indices.numpy().astype(np.int64, copy=False)
    if k:
        if idx[0] < 0 or idx[-1] >= m:
            raise ValueError(
                f"indices must lie in 0..size-1 = {m - 1}, got {int(idx.min())}..{int(idx.max())}"
            )
        if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise ValueError("indices must be strictly increasing")
    data = _floats(values, "values", dtype)
    code = _float_code(dtype)[0]
    gaps = np.diff(idx, prepend=-1) - 1
    r, rice_bytes = _best_rice_parameter(gaps)
    bitmap_bytes = (m + 7) // 8
    if bitmap_bytes <= rice_bytes:
        return _frame(
            MessageKind.SPARSE_PARAMS,
            Flag.BITMAP,
            0,
            code,
            round,
            sender,
            k,
            m,
            [_bitmap(idx, m), data],
        )
    return _frame(
        MessageKind.SPARSE_PARAMS,
        Flag(0),
        r,
        code,
        round,
        sender,
        k,
        m,
        [*_rice_encode(gaps, r), data],
    )


@_decoder(MessageKind.SPARSE_PARAMS)
def _decode_sparse(h: _Header, payload: memoryview) -> Message:
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    k, size = h.n, h.aux
    if k > size:
        raise _fail(h, f"k = {k} indices (n) exceed size = {size} (aux)")
    values_bytes = k * _FLOAT_BY_CODE[code][1].itemsize
    if h.flags & Flag.BITMAP:
        _zero(h, bits=h.bits)
        index_bytes = (size + 7) // 8
        _payload_size(
            h,
            index_bytes + values_bytes,
            f"a bitmap of {size} bits and {k} {code.name.lower()} values",
        )
        indices = _bitmap_decode(h, _bytes(payload, 0, index_bytes), k, size)
    else:
        indices = _rice_decode(h, payload, k, size, values_bytes)
    values = _floats_from(payload, h.payload_len - values_bytes, k, code)
    return Message(
        h.kind,
        VERSION,
        h.round,
        h.sender,
        h.flags,
        n=k,
        indices=torch.from_numpy(indices),
        values=values,
        size=size,
    )
