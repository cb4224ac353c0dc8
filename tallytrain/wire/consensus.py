"""CONSENSUS: the consensus labels (-1 = no label), an optional keep mask, and
their shape when it is not 1-D. Size, encoder and decoder.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import ops
from ..ops import bits_for, packed_size
from .frame import (
    OVERHEAD,
    SERVER,
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
    _frame,
    _index_text,
    _num_classes,
    _payload_size,
    _uint,
)
from .shape import (
    _decode_shape,
    _leading_shape,
    _optional_shape_bytes,
    _shape_section,
    _shape_section_bytes,
)


def consensus_message_bytes(
    n: int, num_classes: int, keep: bool = False, shape: Optional[Sequence[int]] = None
) -> int:
    """len(encode_consensus(...)): labels in bits_for(C + 1) bits, plus ceil(n/8) with
    keep, plus 1 + 4 * len(shape) bytes when the labels' ``shape`` is not ``(n,)``."""
    return (
        OVERHEAD
        + _optional_shape_bytes(n, shape)
        + packed_size(n, num_classes + 1)
        + ((n + 7) // 8 if keep else 0)
    )


def encode_consensus(
    labels: torch.Tensor,
    num_classes: int,
    *,
    keep: Optional[torch.Tensor] = None,
    round: int,
    sender: int = SERVER,
) -> bytes:
    """Consensus labels (-1 = no label) in bits_for(C + 1) bits each, symbol C
    standing for -1; with ``keep`` (bool, the labels' shape), a 1-bit keep mask
    follows. Labels of any shape (e.g. ``[N, T]`` for token windows): a shape
    other than 1-D is sent in a SHAPE section, as for votes."""
    labels = _any_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    c = _num_classes(num_classes)
    dims = _leading_shape(labels, "labels")
    n = _uint(labels.numel(), "len(labels)")
    lab = labels.reshape(-1).to(torch.int64)
    if n and (int(lab.min()) < -1 or int(lab.max()) >= c):
        bad = int(torch.nonzero((lab < -1) | (lab >= c))[0])
        raise ValueError(
            f"labels{_index_text(bad, labels.shape)} = {int(lab[bad])} is outside -1..{c - 1}"
        )
    parts = [ops.pack_labels(torch.where(lab < 0, c, lab), c + 1).numpy()]
    flags = Flag(0)
    if keep is not None:
        keep = _any_tensor(keep, "keep")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
        if keep.shape != labels.shape:
            raise ValueError(
                f"keep must have the labels' shape {tuple(labels.shape)}, got {tuple(keep.shape)}"
            )
        parts.append(ops.pack_labels(keep.reshape(-1).to(torch.uint8), 2).numpy())
        flags = Flag.KEEP_MASK
    if dims is not None:
        flags |= Flag.SHAPE
        parts.insert(0, _shape_section(dims))
    return _frame(
        MessageKind.CONSENSUS, flags, bits_for(c + 1), WireDtype.UINT8, round, sender, n, c, parts
    )


@_decoder(MessageKind.CONSENSUS)
def _decode_consensus(h: _Header, payload: memoryview) -> Message:
    c = _classes(h)
    _bits(h, bits_for(c + 1), f"num_classes = {c} (consensus symbols are C + 1)")
    _dtype(h, WireDtype.UINT8)
    has_keep = bool(h.flags & Flag.KEEP_MASK)
    label_bytes = packed_size(h.n, c + 1)
    keep_bytes = (h.n + 7) // 8 if has_keep else 0
    what = f"n = {h.n} labels of {h.bits} bits{' and a keep mask' if has_keep else ''}"
    shape: Tuple[int, ...] = (h.n,)
    offset = 0
    if h.flags & Flag.SHAPE:
        shape = _decode_shape(h, payload, label_bytes + keep_bytes, what, items="labels")
        offset = _shape_section_bytes(len(shape))
    _payload_size(h, offset + label_bytes + keep_bytes, what)
    stream = torch.from_numpy(_bytes(payload, offset, label_bytes))
    _check_stream(h, stream, h.n, c + 1, "labels")
    labels = ops.unpack_labels(stream, h.n, c + 1)
    labels[labels == c] = -1
    keep = None
    if has_keep:
        mask = torch.from_numpy(_bytes(payload, offset + label_bytes, keep_bytes))
        _check_stream(h, mask, h.n, 2, "keep mask")
        keep = ops.unpack_labels(mask, h.n, 2).to(torch.bool).reshape(shape)
    return Message(
        h.kind,
        VERSION,
        h.round,
        h.sender,
        h.flags,
        n=h.n,
        num_classes=c,
        labels=labels.reshape(shape),
        keep=keep,
        shape=shape,
    )
