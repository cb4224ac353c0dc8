"""SOFT_LABELS: every position's class probabilities, float32 or float16.
Size, encoder and decoder.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

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
    _any_tensor,
    _classes,
    _decoder,
    _dtype,
    _float_code,
    _floats,
    _floats_from,
    _frame,
    _itemsize,
    _num_classes,
    _payload_size,
    _uint,
    _zero,
)
from .shape import (
    _decode_shape,
    _leading_shape,
    _optional_shape_bytes,
    _shape_section,
    _shape_section_bytes,
)


def soft_labels_message_bytes(
    n: int,
    num_classes: int,
    dtype: torch.dtype = torch.float32,
    shape: Optional[Sequence[int]] = None,
) -> int:
    """len(encode_soft_labels(...)) for n positions of leading ``shape``."""
    return OVERHEAD + _optional_shape_bytes(n, shape) + n * num_classes * _itemsize(dtype)


def encode_soft_labels(
    probs: torch.Tensor, *, dtype: torch.dtype = torch.float32, round: int, sender: int
) -> bytes:
    """Per-position class probabilities [*shape, C] as float32 or float16: [N, C]
    for N probes, [N, T, C] for token windows (a leading shape other than 1-D
    is sent in a SHAPE section)."""
    probs = _any_tensor(probs, "probs")
    if probs.dim() < 1:
        raise ValueError("probs must have a class dimension, got a 0-D tensor")
    c = _num_classes(probs.shape[-1], "probs.shape[-1] (classes)")
    dims = _leading_shape(probs[..., 0], "probs")
    n = _uint(math.prod(probs.shape[:-1]), "positions (prod(probs.shape[:-1]))")
    data = _floats(probs, "probs", dtype)
    parts = [data] if dims is None else [_shape_section(dims), data]
    return _frame(
        MessageKind.SOFT_LABELS,
        Flag.SHAPE if dims is not None else Flag(0),
        0,
        _float_code(dtype)[0],
        round,
        sender,
        n,
        c,
        parts,
    )


@_decoder(MessageKind.SOFT_LABELS)
def _decode_soft_labels(h: _Header, payload: memoryview) -> Message:
    c = _classes(h)
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    _zero(h, bits=h.bits)
    itemsize = _FLOAT_BY_CODE[code][1].itemsize
    # h.n * c < 2**64: no overflow in Python, and compared before allocating.
    what = f"[{h.n}, {c}] {code.name.lower()} probabilities"
    shape: Tuple[int, ...] = (h.n,)
    offset = 0
    if h.flags & Flag.SHAPE:
        shape = _decode_shape(h, payload, h.n * c * itemsize, what, items="positions")
        offset = _shape_section_bytes(len(shape))
    _payload_size(h, offset + h.n * c * itemsize, what)
    probs = _floats_from(payload, offset, h.n * c, code).reshape(*shape, c)
    return Message(
        h.kind, VERSION, h.round, h.sender, h.flags, n=h.n, num_classes=c, probs=probs, shape=shape
    )
