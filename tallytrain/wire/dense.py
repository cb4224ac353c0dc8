"""DENSE_PARAMS: a dense parameter vector (or delta). Size, encoder and decoder."""

from __future__ import annotations

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
    _decoder,
    _dtype,
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


def dense_message_bytes(size: int, dtype: torch.dtype = torch.float32) -> int:
    return OVERHEAD + size * _itemsize(dtype)


def encode_dense(
    vector: torch.Tensor, *, dtype: torch.dtype = torch.float32, round: int, sender: int
) -> bytes:
    """A dense parameter vector (or delta) as float32 or float16."""
    vector = _tensor(vector, "vector", 1)
    m = _uint(vector.numel(), "len(vector)")
    data = _floats(vector, "vector", dtype)
    return _frame(
        MessageKind.DENSE_PARAMS, Flag(0), 0, _float_code(dtype)[0], round, sender, m, 0, [data]
    )


@_decoder(MessageKind.DENSE_PARAMS)
def _decode_dense(h: _Header, payload: memoryview) -> Message:
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    _zero(h, bits=h.bits, aux=h.aux)
    itemsize = _FLOAT_BY_CODE[code][1].itemsize
    _payload_size(h, h.n * itemsize, f"{h.n} {code.name.lower()} values")
    return Message(
        h.kind,
        VERSION,
        h.round,
        h.sender,
        h.flags,
        n=h.n,
        vector=_floats_from(payload, 0, h.n, code),
    )
