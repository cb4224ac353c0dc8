"""VOTES: a peer's packed votes (``ops.pack_argmax`` output), with their
leading shape when it is not 1-D. Size, encoder and decoder.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..ops import bits_for, packed_size
from .frame import (
    OVERHEAD,
    VERSION,
    Flag,
    _Header,
    Message,
    MessageKind,
    WireDtype,
    _bits,
    _bytes,
    _check_stream,
    _classes,
    _decoder,
    _dtype,
    _frame,
    _num_classes,
    _payload_size,
    _stream_problem,
    _tensor,
    _uint,
)
from .shape import _decode_shape, _shape_section, _shape_section_bytes, _votes_shape


def votes_message_bytes(
    n: int, num_classes: int, abstain: bool = False, shape: Optional[Sequence[int]] = None
) -> int:
    """len(encode_votes(...)): OVERHEAD + ceil(n * bits_for(C or C+1) / 8), plus
    1 + 4 * len(shape) bytes when ``shape`` is given and is not ``(n,)``."""
    stream = packed_size(n, num_classes + 1 if abstain else num_classes)
    if shape is None or tuple(shape) == (n,):
        return OVERHEAD + stream
    return OVERHEAD + _shape_section_bytes(len(shape)) + stream


def encode_votes(
    packed: torch.Tensor,
    n: int,
    num_classes: int,
    *,
    abstain: bool = False,
    shape: Optional[Sequence[int]] = None,
    round: int,
    sender: int,
) -> bytes:
    """A peer's packed votes (``ops.pack_argmax`` output) on ``n`` probes.

    ``shape``: the leading shape the ``n`` votes came from (e.g. ``(B, T)`` for
    a language model's tokens), whose product must be ``n``. It is sent in a
    SHAPE section (Flag.SHAPE) unless it is ``None`` or ``(n,)``, so plain 1-D
    votes are the same bytes with or without it."""
    packed = _tensor(packed, "packed", 1)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    n = _uint(n, "n")
    c = _num_classes(num_classes)
    symbols = c + 1 if abstain else c
    need = packed_size(n, symbols)
    if packed.numel() != need:
        raise ValueError(
            f"packed must hold ceil(n*bits/8) = {need} bytes for n={n} votes of "
            f"{bits_for(symbols)} bits, got {packed.numel()}"
        )
    dims = _votes_shape(shape, n)
    packed = packed.contiguous()
    problem = _stream_problem(packed, n, symbols)
    if problem:
        raise ValueError(f"packed: {problem}")
    flags = Flag.ABSTAIN if abstain else Flag(0)
    parts = [packed.numpy()]
    if dims is not None:
        flags |= Flag.SHAPE
        parts.insert(0, _shape_section(dims))
    return _frame(
        MessageKind.VOTES, flags, bits_for(symbols), WireDtype.UINT8, round, sender, n, c, parts
    )


@_decoder(MessageKind.VOTES)
def _decode_votes(h: _Header, payload: memoryview) -> Message:
    c = _classes(h)
    abstain = bool(h.flags & Flag.ABSTAIN)
    symbols = c + 1 if abstain else c
    _bits(h, bits_for(symbols), f"num_classes = {c}{' with abstain' if abstain else ''}")
    _dtype(h, WireDtype.UINT8)
    stream_bytes = packed_size(h.n, symbols)
    shape: Tuple[int, ...] = (h.n,)
    offset = 0
    if h.flags & Flag.SHAPE:
        shape = _decode_shape(h, payload, stream_bytes, f"n = {h.n} votes of {h.bits} bits")
        offset = _shape_section_bytes(len(shape))
    _payload_size(
        h,
        offset + stream_bytes,
        f"n = {h.n} votes of {h.bits} bits" + (f" after a {len(shape)}-D shape" if offset else ""),
    )
    packed = torch.from_numpy(_bytes(payload, offset, stream_bytes))
    _check_stream(h, packed, h.n, symbols, "votes")
    return Message(
        h.kind,
        VERSION,
        h.round,
        h.sender,
        h.flags,
        n=h.n,
        num_classes=c,
        packed=packed,
        abstain=abstain,
        shape=shape,
    )
