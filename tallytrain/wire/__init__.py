"""The versioned wire format of every message a peer or the server sends.

docs/design.md §4; the byte layout is tabulated in docs/wire.md. A message is

    header (28 bytes) | payload (payload_len bytes) | CRC32 of header+payload (4)

all little-endian. ``encode_*`` build messages from tensors and validate their
inputs (``ValueError``/``TypeError`` naming the argument). :func:`decode`
validates every header field and every payload byte that has a meaning, and
raises :class:`WireFormatError` -- and nothing else -- for any input that is
not a message this package could have produced. It never reads past the buffer
and checks every size against the buffer before allocating, so what it allocates
is proportional to the bytes it was given, whatever the header claims.

Decoded tensors are fresh CPU tensors that own their memory, so the buffer may
be reused or mutated afterwards.

The package is laid out by concern. :mod:`.frame`: the header, the checksum,
the codes (:class:`MessageKind`, :class:`Flag`, :class:`WireDtype`),
:class:`Message`, the generic :func:`decode` and the helpers every kind uses.
:mod:`.shape`: the SHAPE section; :mod:`.index`: the sparse index coding (Rice
or bitmap); each in both directions. Then one module per kind, its size,
encoder and decoder side by side: :mod:`.votes`, :mod:`.consensus`,
:mod:`.soft_labels`, :mod:`.soft_topk`, :mod:`.dense`, :mod:`.sparse`,
:mod:`.control`. Import from ``tallytrain.wire``; names with a leading
underscore are private to the package.
"""

from __future__ import annotations

from .consensus import consensus_message_bytes, encode_consensus
from .control import CONTROL_FIELDS_BYTES, control_message_bytes, encode_control
from .dense import dense_message_bytes, encode_dense
from .frame import (
    _DECODERS,
    HEADER_BYTES,
    MAGIC,
    OVERHEAD,
    SERVER,
    TRAILER_BYTES,
    VERSION,
    Flag,
    Message,
    MessageKind,
    WireDtype,
    WireFormatError,
    decode,
)
from .frame import U32_MAX as U32_MAX, U64_MAX as U64_MAX
from .index import RICE_MAX_PARAM

# The tests exercise the Rice remainders' field packer directly.
from .index import _pack_fields as _pack_fields, _unpack_fields as _unpack_fields
from .shape import MAX_SHAPE_DIMS
from .soft_labels import encode_soft_labels, soft_labels_message_bytes
from .soft_topk import encode_soft_topk, soft_topk_message_bytes
from .sparse import encode_sparse, sparse_message_max_bytes
from .votes import encode_votes, votes_message_bytes


__all__ = [
    "WireFormatError",
    "MessageKind",
    "WireDtype",
    "Flag",
    "Message",
    "MAGIC",
    "VERSION",
    "HEADER_BYTES",
    "TRAILER_BYTES",
    "OVERHEAD",
    "SERVER",
    "RICE_MAX_PARAM",
    "CONTROL_FIELDS_BYTES",
    "MAX_SHAPE_DIMS",
    "encode_votes",
    "encode_consensus",
    "encode_soft_labels",
    "encode_soft_topk",
    "encode_dense",
    "encode_sparse",
    "encode_control",
    "decode",
    "votes_message_bytes",
    "consensus_message_bytes",
    "soft_labels_message_bytes",
    "soft_topk_message_bytes",
    "dense_message_bytes",
    "sparse_message_max_bytes",
    "control_message_bytes",
]

# Importing the kinds' modules above registered their decoders; a kind
# without one would make decode raise KeyError instead of WireFormatError.
if set(_DECODERS) != set(MessageKind):
    raise ImportError(
        "tallytrain.wire: no decoder registered for "
        + ", ".join(k.name for k in MessageKind if k not in _DECODERS)
    )
