"""SOFT_TOPK: each position's k largest class probabilities, as class
indices and values. Size, encoder and decoder.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import ops
from ..ops import bits_for, packed_size
from .frame import (
    _FLOAT_BY_CODE,
    OVERHEAD,
    VERSION,
    Flag,
    _Header,
    Message,
    MessageKind,
    WireDtype,
    _any_tensor,
    _bits,
    _bytes,
    _check_stream,
    _classes,
    _decoder,
    _dtype,
    _fail,
    _float_code,
    _floats,
    _floats_from,
    _frame,
    _index_text,
    _itemsize,
    _num_classes,
    _uint,
)
from .shape import _decode_shape, _shape_section, _shape_section_bytes


def soft_topk_message_bytes(
    positions: Sequence[int], k: int, num_classes: int, dtype: torch.dtype = torch.float16
) -> int:
    """len(encode_soft_topk(...)) for ``positions`` (a shape) of k entries each:
    the shape section of (*positions, k), the n class indices in bits_for(C)
    bits each, and n values, n = prod(positions) * k."""
    n = math.prod(positions) * k
    return (
        OVERHEAD
        + _shape_section_bytes(len(positions) + 1)
        + packed_size(n, num_classes)
        + n * _itemsize(dtype)
    )


def encode_soft_topk(
    indices: torch.Tensor,
    values: torch.Tensor,
    num_classes: int,
    *,
    dtype: torch.dtype = torch.float16,
    round: int,
    sender: int,
) -> bytes:
    """Each position's k largest class probabilities: ``indices`` (integer,
    distinct within a position, each in 0..C-1) and ``values`` (floating, sent
    as ``dtype``), both of shape ``(*positions, k)`` with k >= 1. The shape
    section always comes first, then the indices in bits_for(C) bits each,
    then the values (docs/wire.md)."""
    indices = _any_tensor(indices, "indices")
    values = _any_tensor(values, "values")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() < 1:
        raise ValueError("indices must be (*positions, k), got a 0-D tensor")
    if values.shape != indices.shape:
        raise ValueError(
            f"values must have the indices' shape {tuple(indices.shape)}, got {tuple(values.shape)}"
        )
    c = _num_classes(num_classes)
    dims = tuple(_uint(d, f"indices.shape[{i}]") for i, d in enumerate(indices.shape))
    k = dims[-1]
    if not 1 <= k <= c:
        raise ValueError(f"k = indices.shape[-1] must be in 1..num_classes = {c}, got {k}")
    n = _uint(indices.numel(), "indices.numel()")
    idx = indices.reshape(-1).to(torch.int64)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= c):
        bad = int(torch.nonzero((idx < 0) | (idx >= c))[0])
        raise ValueError(
            f"indices{_index_text(bad, indices.shape)} = {int(idx[bad])} is outside 0..{c - 1}"
        )
    repeated = _first_repeat(idx.view(-1, k))
    if repeated is not None:
        raise ValueError(f"indices of position {repeated} repeat a class (a top-k set is distinct)")
    data = _floats(values, "values", dtype)
    parts = [_shape_section(dims), ops.pack_labels(idx, c).numpy(), data]
    return _frame(
        MessageKind.SOFT_TOPK,
        Flag(0),
        bits_for(c),
        _float_code(dtype)[0],
        round,
        sender,
        n,
        c,
        parts,
    )


def _first_repeat(rows: torch.Tensor) -> Optional[int]:
    """The first row of [M, k] that holds a value twice, or None."""
    if rows.shape[1] < 2 or rows.shape[0] == 0:
        return None
    ordered = rows.sort(dim=1).values
    bad = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    return int(torch.nonzero(bad)[0]) if bool(bad.any()) else None


@_decoder(MessageKind.SOFT_TOPK)
def _decode_soft_topk(h: _Header, payload: memoryview) -> Message:
    c = _classes(h)
    _bits(h, bits_for(c), f"num_classes = {c} (class indices)")
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    index_bytes = packed_size(h.n, c)
    values_bytes = h.n * _FLOAT_BY_CODE[code][1].itemsize
    shape = _decode_shape(
        h,
        payload,
        index_bytes + values_bytes,
        f"n = {h.n} class indices of {h.bits} bits and {h.n} {code.name.lower()} values",
        one_dim_ok=True,
        items="entries",
    )
    if not shape:
        raise _fail(h, "shape: a top-k message needs (*positions, k), got a 0-D shape")
    k = shape[-1]
    if not 1 <= k <= c:
        raise _fail(h, f"k = {k} (the shape's last dimension) must be in 1..num_classes = {c}")
    offset = _shape_section_bytes(len(shape))
    stream = torch.from_numpy(_bytes(payload, offset, index_bytes))
    _check_stream(h, stream, h.n, c, "class indices")
    indices = ops.unpack_labels(stream, h.n, c)
    repeated = _first_repeat(indices.view(-1, k))
    if repeated is not None:
        raise _fail(h, f"class indices of position {repeated} repeat a class")
    values = _floats_from(payload, offset + index_bytes, h.n, code)
    return Message(
        h.kind,
        VERSION,
        h.round,
        h.sender,
        h.flags,
        n=h.n,
        num_classes=c,
        indices=indices.reshape(shape),
        values=values.reshape(shape),
        shape=shape,
    )
