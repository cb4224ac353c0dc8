"""The versioned wire format of every message a peer or the server sends.

docs/design.md §4; the byte layout is tabulated in docs/wire.md. A message is

    header (28 bytes) | payload (payload_len bytes) | CRC32 of header+payload (4)

all little-endian. ``encode_*`` build messages from tensors and validate their
inputs (``ValueError``/``TypeError`` naming the argument). :func:`decode`
validates every header field and every payload byte that has a meaning, and
raises :class:`WireFormatError` -- and nothing else -- for any input that is
not a message this module could have produced. It never reads past the buffer
and checks every size against the buffer before allocating, so what it allocates
is proportional to the bytes it was given, whatever the header claims.

Decoded tensors are fresh CPU tensors that own their memory, so the buffer may
be reused or mutated afterwards.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import operator
import struct
import zlib
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import ops
from ..ops import bits_for, packed_size

__all__ = [
    "WireFormatError", "MessageKind", "WireDtype", "Flag", "Message",
    "MAGIC", "VERSION", "HEADER_BYTES", "TRAILER_BYTES", "OVERHEAD", "SERVER",
    "RICE_MAX_PARAM", "CONTROL_FIELDS_BYTES", "MAX_SHAPE_DIMS",
    "encode_votes", "encode_consensus", "encode_soft_labels", "encode_soft_topk", "encode_dense",
    "encode_sparse", "encode_control", "decode",
    "votes_message_bytes", "consensus_message_bytes", "soft_labels_message_bytes",
    "soft_topk_message_bytes", "dense_message_bytes", "sparse_message_max_bytes",
    "control_message_bytes",
]

MAGIC = b"TT"
VERSION = 1
# magic, version, kind, flags, bits, dtype, round, sender, n, aux, payload_len
_HEADER = struct.Struct("<2sBBHBBIIIII")
_TRAILER = struct.Struct("<I")            # CRC32
_CONTROL = struct.Struct("<QI")           # probe_seed num_probes
HEADER_BYTES = _HEADER.size
TRAILER_BYTES = _TRAILER.size
OVERHEAD = HEADER_BYTES + TRAILER_BYTES
CONTROL_FIELDS_BYTES = _CONTROL.size
SERVER = 0xFFFFFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
# The SHAPE section's dimension count is one byte.
MAX_SHAPE_DIMS = 255
# Gaps are < 2**32, and a Rice parameter of 32 would always cost more than 31,
# so the encoder never chooses more than 31; the decoder rejects larger ones.
RICE_MAX_PARAM = 31


class WireFormatError(ValueError):
    """Bytes that are not a valid tallytrain message; the text says why."""


class MessageKind(enum.IntEnum):
    VOTES = 1
    CONSENSUS = 2
    SOFT_LABELS = 3
    DENSE_PARAMS = 4
    SPARSE_PARAMS = 5
    CONTROL = 6
    SOFT_TOPK = 7


class WireDtype(enum.IntEnum):
    """The header's ``dtype`` code: the element type of the payload."""
    NONE = 0
    FLOAT16 = 1
    FLOAT32 = 2
    UINT8 = 3


class Flag(enum.IntFlag):
    """Header flag bits. Each kind allows only its own (see ``_ALLOWED_FLAGS``)."""
    ABSTAIN = 1 << 0        # VOTES: symbols are bits_for(C + 1) wide, C = abstain
    KEEP_MASK = 1 << 1      # CONSENSUS: a 1-bit keep mask follows the labels
    BITMAP = 1 << 2         # SPARSE_PARAMS: indices as a bitmap, not Rice-coded gaps
    HAS_CONSENSUS = 1 << 3  # CONTROL: a full CONSENSUS message is embedded
    SHAPE = 1 << 4          # VOTES, CONSENSUS, SOFT_LABELS: the leading shape comes first


_ALLOWED_FLAGS: Dict[MessageKind, Flag] = {
    MessageKind.VOTES: Flag.ABSTAIN | Flag.SHAPE,
    MessageKind.CONSENSUS: Flag.KEEP_MASK | Flag.SHAPE,
    MessageKind.SOFT_LABELS: Flag.SHAPE,
    MessageKind.DENSE_PARAMS: Flag(0),
    MessageKind.SPARSE_PARAMS: Flag.BITMAP,
    MessageKind.CONTROL: Flag.HAS_CONSENSUS,
    MessageKind.SOFT_TOPK: Flag(0),  # its shape section is always there
}

# torch dtype -> (wire code, little-endian numpy dtype)
_FLOAT_CODES: Dict[torch.dtype, Tuple[WireDtype, np.dtype]] = {
    torch.float16: (WireDtype.FLOAT16, np.dtype("<f2")),
    torch.float32: (WireDtype.FLOAT32, np.dtype("<f4")),
}
_FLOAT_BY_CODE: Dict[WireDtype, Tuple[torch.dtype, np.dtype]] = {
    code: (tdt, ndt) for tdt, (code, ndt) in _FLOAT_CODES.items()}


# --------------------------------------------------------------------------- #
# the decoded message
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True, eq=False)
class Message:
    """A decoded message. Fields a kind does not use are ``None``.

    ``n`` is the header's count (probes, vector length, or k) for every kind
    but CONTROL.
    VOTES: ``packed`` (uint8 stream), ``num_classes``, ``abstain``, ``shape`` (the
    votes' leading shape, a tuple of ints whose product is ``n``; ``(n,)`` for a
    message without the SHAPE flag).
    CONSENSUS: ``labels`` (int64 of ``shape``, -1 = no label), ``keep`` (bool of
    ``shape``, or None), ``num_classes``, ``shape`` (as for VOTES).
    SOFT_LABELS: ``probs`` ([*shape, C], float32 or float16 as sent),
    ``num_classes``, ``shape`` (the positions' shape, as for VOTES).
    SOFT_TOPK: ``indices`` (int64) and ``values`` (as sent), both of ``shape`` =
    ``(*positions, k)``: each position's k classes and their probabilities;
    ``num_classes``; ``n`` = prod(shape).
    DENSE_PARAMS: ``vector``. SPARSE_PARAMS: ``indices`` (int64, ascending),
    ``values``, ``size``. CONTROL: ``probe_seed``, ``num_probes``, ``consensus``
    (a decoded CONSENSUS message or None).

    Equality compares every field; tensors must match in dtype, shape and bits
    (so NaN payloads compare equal to themselves, and -0.0 differs from 0.0).
    """
    kind: MessageKind
    version: int
    round: int
    sender: int
    flags: Flag
    n: Optional[int] = None
    num_classes: Optional[int] = None
    packed: Optional[torch.Tensor] = None
    abstain: Optional[bool] = None
    labels: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    vector: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    size: Optional[int] = None
    probe_seed: Optional[int] = None
    num_probes: Optional[int] = None
    consensus: Optional["Message"] = None
    shape: Optional[Tuple[int, ...]] = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self))

    __hash__ = None  # type: ignore[assignment]  # tensors are mutable


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return a.numel() == 0 or torch.equal(_as_bytes(a), _as_bytes(b))
    return a == b


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


# --------------------------------------------------------------------------- #
# closed-form sizes
# --------------------------------------------------------------------------- #
def _itemsize(dtype: torch.dtype) -> int:
    return _float_code(dtype)[1].itemsize


def votes_message_bytes(n: int, num_classes: int, abstain: bool = False,
                        shape: Optional[Sequence[int]] = None) -> int:
    """len(encode_votes(...)): OVERHEAD + ceil(n * bits_for(C or C+1) / 8), plus
    1 + 4 * len(shape) bytes when ``shape`` is given and is not ``(n,)``."""
    stream = packed_size(n, num_classes + 1 if abstain else num_classes)
    if shape is None or tuple(shape) == (n,):
        return OVERHEAD + stream
    return OVERHEAD + _shape_section_bytes(len(shape)) + stream


def _shape_section_bytes(ndim: int) -> int:
    """The SHAPE section: a u8 dimension count, then one u32 per dimension."""
    return 1 + 4 * ndim


def _optional_shape_bytes(n: int, shape: Optional[Sequence[int]]) -> int:
    """The SHAPE section's bytes for a leading ``shape`` of n positions (0 when 1-D)."""
    return 0 if shape is None or tuple(shape) == (n,) else _shape_section_bytes(len(shape))


def consensus_message_bytes(n: int, num_classes: int, keep: bool = False,
                            shape: Optional[Sequence[int]] = None) -> int:
    """len(encode_consensus(...)): labels in bits_for(C + 1) bits, plus ceil(n/8) with
    keep, plus 1 + 4 * len(shape) bytes when the labels' ``shape`` is not ``(n,)``."""
    return (OVERHEAD + _optional_shape_bytes(n, shape) + packed_size(n, num_classes + 1)
            + ((n + 7) // 8 if keep else 0))


def soft_labels_message_bytes(n: int, num_classes: int, dtype: torch.dtype = torch.float32,
                              shape: Optional[Sequence[int]] = None) -> int:
    """len(encode_soft_labels(...)) for n positions of leading ``shape``."""
    return OVERHEAD + _optional_shape_bytes(n, shape) + n * num_classes * _itemsize(dtype)


def soft_topk_message_bytes(positions: Sequence[int], k: int, num_classes: int,
                            dtype: torch.dtype = torch.float16) -> int:
    """len(encode_soft_topk(...)) for ``positions`` (a shape) of k entries each:
    the shape section of (*positions, k), the n class indices in bits_for(C)
    bits each, and n values, n = prod(positions) * k."""
    n = math.prod(positions) * k
    return (OVERHEAD + _shape_section_bytes(len(positions) + 1) + packed_size(n, num_classes)
            + n * _itemsize(dtype))


def dense_message_bytes(size: int, dtype: torch.dtype = torch.float32) -> int:
    return OVERHEAD + size * _itemsize(dtype)


def sparse_message_max_bytes(k: int, size: int, dtype: torch.dtype = torch.float32) -> int:
    """Upper bound of len(encode_sparse(...)): the bitmap form, which the
    encoder uses unless Rice-coded gaps are strictly smaller."""
    return OVERHEAD + (size + 7) // 8 + k * _itemsize(dtype)


def control_message_bytes(consensus_bytes: int = 0) -> int:
    """len(encode_control(...)) with an embedded consensus of ``consensus_bytes``."""
    return OVERHEAD + CONTROL_FIELDS_BYTES + consensus_bytes


# --------------------------------------------------------------------------- #
# encoding
# --------------------------------------------------------------------------- #
def _uint(value, name: str, limit: int = U32_MAX) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not 0 <= v <= limit:
        raise ValueError(f"{name} must be in 0..{limit}, got {v}")
    return v


def _num_classes(value, name: str = "num_classes") -> int:
    c = _uint(value, name)
    if c < 2:
        raise ValueError(f"{name} must be >= 2, got {c}")
    return c


def _float_code(dtype) -> tuple:
    try:
        return _FLOAT_CODES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}") from None


def _tensor(t, name: str, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.detach().cpu()


def _floats(t: torch.Tensor, name: str, dtype: torch.dtype) -> np.ndarray:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    wire = _float_code(dtype)[1]
    return t.to(dtype).contiguous().numpy().astype(wire, copy=False)


def _frame(kind: MessageKind, flags: Flag, bits: int, dtype: WireDtype, round: int,
           sender: int, n: int, aux: int, parts: Sequence) -> bytes:
    round = _uint(round, "round")
    sender = _uint(sender, "sender")
    views = [p.reshape(-1).view(np.uint8).data if isinstance(p, np.ndarray)
             else _byte_view(p) for p in parts]
    payload_len = sum(v.nbytes for v in views)
    if payload_len > U32_MAX:
        raise ValueError(
            f"message too large: a payload of {payload_len} bytes does not fit the "
            f"u32 payload_len field")
    header = _HEADER.pack(MAGIC, VERSION, kind, flags, bits, dtype, round, sender,
                          n, aux, payload_len)
    crc = zlib.crc32(header)
    for v in views:
        crc = zlib.crc32(v, crc)
    return b"".join([header, *views, _TRAILER.pack(crc)])


def _stream_problem(stream: torch.Tensor, n: int, num_symbols: int) -> Optional[str]:
    """Why a packed stream of the right length is not canonical, or None."""
    used = n * bits_for(num_symbols) % 8
    if used and int(stream[-1]) >> used:
        return "nonzero padding bits in the last byte"
    # Every b-bit pattern is a valid symbol when num_symbols is a power of two.
    if num_symbols & (num_symbols - 1):
        try:
            ops.unpack_labels(stream, n, num_symbols)
        except ValueError as e:
            return f"symbol out of range ({e})"
    return None


def encode_votes(packed: torch.Tensor, n: int, num_classes: int, *, abstain: bool = False,
                 shape: Optional[Sequence[int]] = None, round: int, sender: int) -> bytes:
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
            f"{bits_for(symbols)} bits, got {packed.numel()}")
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
    return _frame(MessageKind.VOTES, flags, bits_for(symbols), WireDtype.UINT8, round, sender,
                  n, c, parts)


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


def encode_consensus(labels: torch.Tensor, num_classes: int, *,
                     keep: Optional[torch.Tensor] = None, round: int,
                     sender: int = SERVER) -> bytes:
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
        raise ValueError(f"labels{_index_text(bad, labels.shape)} = {int(lab[bad])} is outside "
                         f"-1..{c - 1}")
    parts = [ops.pack_labels(torch.where(lab < 0, c, lab), c + 1).numpy()]
    flags = Flag(0)
    if keep is not None:
        keep = _any_tensor(keep, "keep")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
        if keep.shape != labels.shape:
            raise ValueError(f"keep must have the labels' shape {tuple(labels.shape)}, got "
                             f"{tuple(keep.shape)}")
        parts.append(ops.pack_labels(keep.reshape(-1).to(torch.uint8), 2).numpy())
        flags = Flag.KEEP_MASK
    if dims is not None:
        flags |= Flag.SHAPE
        parts.insert(0, _shape_section(dims))
    return _frame(MessageKind.CONSENSUS, flags, bits_for(c + 1), WireDtype.UINT8,
                  round, sender, n, c, parts)


def encode_soft_labels(probs: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                       round: int, sender: int) -> bytes:
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
    return _frame(MessageKind.SOFT_LABELS, Flag.SHAPE if dims is not None else Flag(0), 0,
                  _float_code(dtype)[0], round, sender, n, c, parts)


def encode_soft_topk(indices: torch.Tensor, values: torch.Tensor, num_classes: int, *,
                     dtype: torch.dtype = torch.float16, round: int, sender: int) -> bytes:
    """Each position's k largest class probabilities: ``indices`` (integer,
    distinct within a position, each in 0..C-1) and ``values`` (floating, sent
    as ``dtype``), both of shape ``(*positions, k)`` with k >= 1. The shape
    section always comes first, then the indices in bits_for(C) bits each,
    then the values (docs/wire.md)."""
    indices = _any_tensor(indices, "indices")
    values = _any_tensor(values, "values")
    if indices.dtype.is_floating_point or indices.dtype.is_complex \
            or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() < 1:
        raise ValueError("indices must be (*positions, k), got a 0-D tensor")
    if values.shape != indices.shape:
        raise ValueError(f"values must have the indices' shape {tuple(indices.shape)}, got "
                         f"{tuple(values.shape)}")
    c = _num_classes(num_classes)
    dims = tuple(_uint(d, f"indices.shape[{i}]") for i, d in enumerate(indices.shape))
    k = dims[-1]
    if not 1 <= k <= c:
        raise ValueError(f"k = indices.shape[-1] must be in 1..num_classes = {c}, got {k}")
    n = _uint(indices.numel(), "indices.numel()")
    idx = indices.reshape(-1).to(torch.int64)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= c):
        bad = int(torch.nonzero((idx < 0) | (idx >= c))[0])
        raise ValueError(f"indices{_index_text(bad, indices.shape)} = {int(idx[bad])} is "
                         f"outside 0..{c - 1}")
    repeated = _first_repeat(idx.view(-1, k))
    if repeated is not None:
        raise ValueError(f"indices of position {repeated} repeat a class (a top-k set is distinct)")
    data = _floats(values, "values", dtype)
    parts = [_shape_section(dims), ops.pack_labels(idx, c).numpy(), data]
    return _frame(MessageKind.SOFT_TOPK, Flag(0), bits_for(c), _float_code(dtype)[0],
                  round, sender, n, c, parts)


def _first_repeat(rows: torch.Tensor) -> Optional[int]:
    """The first row of [M, k] that holds a value twice, or None."""
    if rows.shape[1] < 2 or rows.shape[0] == 0:
        return None
    ordered = rows.sort(dim=1).values
    bad = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    return int(torch.nonzero(bad)[0]) if bool(bad.any()) else None


def _any_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t.detach().cpu()


def _index_text(flat: int, shape: Sequence[int]) -> str:
    """``[i]`` for 1-D, ``[i, j]`` for a row-major position in a larger shape."""
    coords = []
    for size in reversed(tuple(shape)):
        coords.append(flat % size if size else 0)
        flat //= size if size else 1
    return "[" + ", ".join(str(c) for c in reversed(coords)) + "]"


def encode_dense(vector: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 round: int, sender: int) -> bytes:
    """A dense parameter vector (or delta) as float32 or float16."""
    vector = _tensor(vector, "vector", 1)
    m = _uint(vector.numel(), "len(vector)")
    data = _floats(vector, "vector", dtype)
    return _frame(MessageKind.DENSE_PARAMS, Flag(0), 0, _float_code(dtype)[0],
                  round, sender, m, 0, [data])


def encode_sparse(indices: torch.Tensor, values: torch.Tensor, size: int, *,
                  dtype: torch.dtype = torch.float32, round: int, sender: int) -> bytes:
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
            raise ValueError(f"indices must lie in 0..size-1 = {m - 1}, got "
                             f"{int(idx.min())}..{int(idx.max())}")
        if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise ValueError("indices must be strictly increasing")
    data = _floats(values, "values", dtype)
    code = _float_code(dtype)[0]
    gaps = np.diff(idx, prepend=-1) - 1
    r, rice_bytes = _best_rice_parameter(gaps)
    bitmap_bytes = (m + 7) // 8
    if bitmap_bytes <= rice_bytes:
        return _frame(MessageKind.SPARSE_PARAMS, Flag.BITMAP, 0, code, round, sender, k, m,
                      [_bitmap(idx, m), data])
    return _frame(MessageKind.SPARSE_PARAMS, Flag(0), r, code, round, sender, k, m,
                  [*_rice_encode(gaps, r), data])


def encode_control(*, round: int, probe_seed: int, num_probes: int,
                   consensus: Optional[Union[bytes, bytearray, memoryview]] = None,
                   sender: int = SERVER) -> bytes:
    """The server's round opener: probe-subset seed and count, optionally the
    previous round's consensus message (embedded whole, validated here)."""
    fields = _CONTROL.pack(_uint(probe_seed, "probe_seed", U64_MAX),
                           _uint(num_probes, "num_probes"))
    parts: list = [fields]
    flags = Flag(0)
    if consensus is not None:
        if not isinstance(consensus, (bytes, bytearray, memoryview)):
            raise TypeError(f"consensus must be bytes (an encoded CONSENSUS message), got "
                            f"{type(consensus).__name__}")
        try:
            decode(consensus, expect_kind=MessageKind.CONSENSUS)
        except WireFormatError as e:
            raise ValueError(f"consensus is not a valid consensus message: {e}") from None
        parts.append(consensus)
        flags = Flag.HAS_CONSENSUS
    return _frame(MessageKind.CONTROL, flags, 0, WireDtype.NONE, round, sender, 0, 0, parts)


# --------------------------------------------------------------------------- #
# sparse index coding
# --------------------------------------------------------------------------- #
def _rice_bytes(k: int, unary_bits: int, r: int) -> int:
    return (k + unary_bits + 7) // 8 + (k * r + 7) // 8


def _best_rice_parameter(gaps: np.ndarray) -> tuple:
    """(r, index bytes) minimising the Rice index section for these gaps.

    The cost is exact (k + sum(gap >> r) unary bits, padded to a byte, plus
    k*r remainder bits), evaluated for every useful r: beyond the bit length of
    the largest gap every quotient is 0 and each step only adds k bits."""
    k = gaps.size
    if k == 0:
        return 0, 0
    top = min(RICE_MAX_PARAM, int(gaps.max()).bit_length())
    costs = [(_rice_bytes(k, int((gaps >> r).sum()), r), r) for r in range(top + 1)]
    cost, r = min(costs)
    return r, cost


def _rice_encode(gaps: np.ndarray, r: int) -> tuple:
    """Unary section (quotient q as q zero bits then a one bit, padded to a
    byte) and remainder section (r-bit fields in the §2 stream layout)."""
    q = gaps >> r
    ones = np.cumsum(q + 1) - 1  # stream position of each terminating one bit
    used = int(ones[-1]) + 1 if ones.size else 0
    unary = np.zeros((used + 7) // 8, dtype=np.uint8)
    np.bitwise_or.at(unary, ones >> 3, (1 << (ones & 7)).astype(np.uint8))
    rem = _pack_fields((gaps & ((1 << r) - 1)).astype(np.uint64), r)
    return unary, rem


def _pack_fields(values: np.ndarray, r: int) -> np.ndarray:
    """uint64 values < 2**r -> ceil(k*r/8) bytes; value i at stream bits
    [i*r, i*r + r), LSB first (the docs/design.md §2 layout, in 64-bit words)."""
    k = values.size
    nbytes = (k * r + 7) // 8
    words = np.zeros((nbytes + 7) // 8 + 1, dtype=np.uint64)
    if r and k:
        offset = np.arange(k, dtype=np.uint64) * np.uint64(r)
        word = (offset >> np.uint64(6)).astype(np.int64)
        shift = offset & np.uint64(63)
        np.bitwise_or.at(words, word, values << shift)
        spill = shift > np.uint64(64 - r)  # the field continues in the next word
        np.bitwise_or.at(words, word[spill] + 1, values[spill] >> (np.uint64(64) - shift[spill]))
    return words.astype("<u8").view(np.uint8)[:nbytes]


def _unpack_fields(stream: np.ndarray, k: int, r: int) -> np.ndarray:
    """Inverse of _pack_fields (no validation: callers check padding)."""
    words = np.zeros((stream.size + 7) // 8 + 1, dtype="<u8")
    words.view(np.uint8)[:stream.size] = stream
    words = words.astype(np.uint64, copy=False)
    offset = np.arange(k, dtype=np.uint64) * np.uint64(r)
    word = (offset >> np.uint64(6)).astype(np.int64)
    shift = offset & np.uint64(63)
    low = words[word] >> shift
    # A shift by 64 is undefined, so the s == 0 case masks the high part off.
    high = np.where(shift > 0, words[word + 1] << ((np.uint64(64) - shift) & np.uint64(63)),
                    np.uint64(0))
    return ((low | high) & np.uint64((1 << r) - 1)).astype(np.int64)


def _bitmap(idx: np.ndarray, size: int) -> np.ndarray:
    bitmap = np.zeros((size + 7) // 8, dtype=np.uint8)
    np.bitwise_or.at(bitmap, idx >> 3, (1 << (idx & 7)).astype(np.uint8))
    return bitmap


# --------------------------------------------------------------------------- #
# decoding
# --------------------------------------------------------------------------- #
class _Header(NamedTuple):
    kind: MessageKind
    flags: Flag
    bits: int
    dtype: int
    round: int
    sender: int
    n: int
    aux: int
    payload_len: int


def decode(data: Union[bytes, bytearray, memoryview], *,
           expect_kind: Optional[MessageKind] = None) -> Message:
    """Parse and fully validate one message; WireFormatError says what is wrong."""
    view = _byte_view(data)
    if expect_kind is not None:
        expect_kind = MessageKind(expect_kind)
    total = view.nbytes
    if total < OVERHEAD:
        raise WireFormatError(
            f"truncated message: {total} bytes, shorter than the {OVERHEAD}-byte "
            f"header and trailer")
    (magic, version, kind_code, flags, bits, dtype, round_, sender, n, aux,
     payload_len) = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"unknown version {version}; this decoder reads version {VERSION}")
    end = HEADER_BYTES + payload_len
    if total < end + TRAILER_BYTES:
        raise WireFormatError(
            f"truncated message: header says payload_len = {payload_len}, so "
            f"{end + TRAILER_BYTES} bytes, got {total}")
    if total > end + TRAILER_BYTES:
        raise WireFormatError(
            f"{total - end - TRAILER_BYTES} trailing bytes after the "
            f"{end + TRAILER_BYTES}-byte message")
    (sent_crc,) = _TRAILER.unpack_from(view, end)
    crc = zlib.crc32(view[:end])
    if crc != sent_crc:
        raise WireFormatError(
            f"checksum mismatch: CRC32 is {crc:#010x}, trailer says {sent_crc:#010x}")
    try:
        kind = MessageKind(kind_code)
    except ValueError:
        raise WireFormatError(f"unknown kind {kind_code}") from None
    if expect_kind is not None and kind != expect_kind:
        raise WireFormatError(f"unexpected kind {kind.name}, expected {expect_kind.name}")
    unknown = flags & ~int(_ALLOWED_FLAGS[kind])  # int: ~ on a Flag keeps only defined bits
    if unknown:
        raise WireFormatError(f"unknown flags {unknown:#06x} for {kind.name} messages")
    header = _Header(kind, Flag(flags), bits, dtype, round_, sender, n, aux, payload_len)
    return _DECODERS[kind](header, view[HEADER_BYTES:end])


def _byte_view(data) -> memoryview:
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, memoryview):
        if not data.c_contiguous:
            raise TypeError("data must be a contiguous buffer")
        return data if data.format == "B" and data.ndim == 1 else data.cast("B")
    raise TypeError(f"data must be bytes, bytearray or memoryview, got {type(data).__name__}")


def _fail(h: _Header, what: str) -> WireFormatError:
    return WireFormatError(f"{h.kind.name} message: {what}")


def _zero(h: _Header, **fields: int) -> None:
    for name, value in fields.items():
        if value:
            raise _fail(h, f"unused header field {name} must be 0, got {value}")


def _dtype(h: _Header, *allowed: WireDtype) -> WireDtype:
    if h.dtype not in allowed:
        names = " or ".join(f"{int(a)} ({a.name})" for a in allowed)
        raise _fail(h, f"dtype code {h.dtype} is invalid here, expected {names}")
    return WireDtype(h.dtype)


def _payload_size(h: _Header, expected: int, what: str) -> None:
    if h.payload_len != expected:
        raise _fail(h, f"payload size mismatch: {what} needs {expected} bytes, "
                       f"header says payload_len = {h.payload_len}")


def _classes(h: _Header) -> int:
    if h.aux < 2:
        raise _fail(h, f"num_classes (aux) must be >= 2, got {h.aux}")
    return h.aux


def _bits(h: _Header, expected: int, what: str) -> None:
    if h.bits != expected:
        raise _fail(h, f"bits = {h.bits} is inconsistent with {what}: expected {expected}")


def _bytes(payload: memoryview, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(payload, dtype=np.uint8, count=count, offset=offset).copy()


def _floats_from(payload: memoryview, offset: int, count: int, code: WireDtype) -> torch.Tensor:
    tdt, wire = _FLOAT_BY_CODE[code]
    arr = np.frombuffer(payload, dtype=wire, count=count, offset=offset)
    return torch.from_numpy(arr.astype(wire.newbyteorder("="), copy=True))


def _check_stream(h: _Header, stream: torch.Tensor, n: int, num_symbols: int, what: str) -> None:
    problem = _stream_problem(stream, n, num_symbols)
    if problem:
        raise _fail(h, f"{what}: {problem}")


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
    _payload_size(h, offset + stream_bytes,
                  f"n = {h.n} votes of {h.bits} bits"
                  + (f" after a {len(shape)}-D shape" if offset else ""))
    packed = torch.from_numpy(_bytes(payload, offset, stream_bytes))
    _check_stream(h, packed, h.n, symbols, "votes")
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, n=h.n, num_classes=c,
                   packed=packed, abstain=abstain, shape=shape)


def _decode_shape(h: _Header, payload: memoryview, rest_bytes: int, what: str,
                  one_dim_ok: bool = False, items: str = "votes") -> Tuple[int, ...]:
    """Read and check the shape section, which ``rest_bytes`` bytes of ``what``
    follow; every read stays inside the payload. The product of the
    dimensions must be the header's n (``items`` names what n counts)."""
    if h.payload_len < 1:
        raise _fail(h, "payload size mismatch: a shape section is required but the payload "
                       "has no room for the shape's dimension count")
    ndim = payload[0]
    need = _shape_section_bytes(ndim) + rest_bytes
    if h.payload_len != need:
        raise _fail(h, f"payload size mismatch: a {ndim}-D shape and {what} need {need} "
                       f"bytes, header says payload_len = {h.payload_len}")
    if ndim == 1 and not one_dim_ok:
        raise _fail(h, "shape: a 1-D shape is sent without the SHAPE flag (non-canonical)")
    dims = tuple(int(d) for d in np.frombuffer(payload, dtype="<u4", count=ndim, offset=1))
    if math.prod(dims) != h.n:
        raise _fail(h, f"shape {dims} holds {math.prod(dims)} {items}, but n = {h.n}")
    return dims


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
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, n=h.n, num_classes=c,
                   labels=labels.reshape(shape), keep=keep, shape=shape)


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
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, n=h.n, num_classes=c,
                   probs=probs, shape=shape)


def _decode_soft_topk(h: _Header, payload: memoryview) -> Message:
    c = _classes(h)
    _bits(h, bits_for(c), f"num_classes = {c} (class indices)")
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    index_bytes = packed_size(h.n, c)
    values_bytes = h.n * _FLOAT_BY_CODE[code][1].itemsize
    shape = _decode_shape(h, payload, index_bytes + values_bytes,
                          f"n = {h.n} class indices of {h.bits} bits and {h.n} "
                          f"{code.name.lower()} values", one_dim_ok=True, items="entries")
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
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, n=h.n, num_classes=c,
                   indices=indices.reshape(shape), values=values.reshape(shape), shape=shape)


def _decode_dense(h: _Header, payload: memoryview) -> Message:
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    _zero(h, bits=h.bits, aux=h.aux)
    itemsize = _FLOAT_BY_CODE[code][1].itemsize
    _payload_size(h, h.n * itemsize, f"{h.n} {code.name.lower()} values")
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, n=h.n,
                   vector=_floats_from(payload, 0, h.n, code))


def _decode_sparse(h: _Header, payload: memoryview) -> Message:
    code = _dtype(h, WireDtype.FLOAT32, WireDtype.FLOAT16)
    k, size = h.n, h.aux
    if k > size:
        raise _fail(h, f"k = {k} indices (n) exceed size = {size} (aux)")
    values_bytes = k * _FLOAT_BY_CODE[code][1].itemsize
    if h.flags & Flag.BITMAP:
        _zero(h, bits=h.bits)
        index_bytes = (size + 7) // 8
        _payload_size(h, index_bytes + values_bytes,
                      f"a bitmap of {size} bits and {k} {code.name.lower()} values")
        indices = _bitmap_decode(h, _bytes(payload, 0, index_bytes), k, size)
    else:
        indices = _rice_decode(h, payload, k, size, values_bytes)
    values = _floats_from(payload, h.payload_len - values_bytes, k, code)
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, n=k,
                   indices=torch.from_numpy(indices), values=values, size=size)


def _popcount(stream: np.ndarray) -> int:
    return int(np.bitwise_count(stream).sum(dtype=np.int64))


def _bitmap_decode(h: _Header, bitmap: np.ndarray, k: int, size: int) -> np.ndarray:
    used = size % 8
    if used and int(bitmap[-1]) >> used:
        raise _fail(h, "index bitmap: nonzero padding bits in the last byte")
    ones = _popcount(bitmap)
    if ones != k:
        raise _fail(h, f"index bitmap has {ones} set bits, but n says k = {k}")
    return np.flatnonzero(np.unpackbits(bitmap, bitorder="little")).astype(np.int64)


def _rice_decode(h: _Header, payload: memoryview, k: int, size: int,
                 values_bytes: int) -> np.ndarray:
    r = h.bits
    if r > RICE_MAX_PARAM:
        raise _fail(h, f"bits = {r} is not a valid Rice parameter (0..{RICE_MAX_PARAM})")
    if k == 0 and r:
        raise _fail(h, f"bits (Rice parameter) must be 0 when k = 0, got {r}")
    rem_bytes = (k * r + 7) // 8
    if h.payload_len < rem_bytes + values_bytes:
        raise _fail(h, f"payload size mismatch: {k} Rice remainders of {r} bits and {k} "
                       f"values need at least {rem_bytes + values_bytes} bytes, header "
                       f"says payload_len = {h.payload_len}")
    unary_bytes = h.payload_len - rem_bytes - values_bytes
    unary = _bytes(payload, 0, unary_bytes)
    ones = _popcount(unary)
    if ones < k:
        raise _fail(h, f"Rice unary codes run off the end of the index section: "
                       f"{ones} terminating bits for k = {k} indices")
    if ones > k:
        raise _fail(h, f"Rice unary section holds {ones} terminating bits for k = {k} "
                       f"indices (nonzero padding)")
    ends = np.flatnonzero(np.unpackbits(unary, bitorder="little")).astype(np.int64)
    used = int(ends[-1]) + 1 if k else 0
    if (used + 7) // 8 != unary_bytes:
        raise _fail(h, f"Rice unary section is {unary_bytes} bytes, but its codes end "
                       f"after {used} bits (payload size mismatch)")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    quotients = np.diff(ends, prepend=-1) - 1
    # Checked before shifting so that a hostile quotient cannot overflow int64.
    if int(quotients.max()) > (size - 1) >> r:
        raise _fail(h, f"a Rice-coded gap reaches past size = {size} (index out of range)")
    gaps = quotients << r
    if r:
        rem = _bytes(payload, unary_bytes, rem_bytes)
        used_bits = k * r % 8
        if used_bits and int(rem[-1]) >> used_bits:
            raise _fail(h, "Rice remainders: nonzero padding bits in the last byte")
        gaps |= _unpack_fields(rem, k, r)
    # Each gap + 1 <= size < 2**32 and k < 2**31 (the values fit the payload),
    # so the running sum stays far below 2**63.
    indices = np.cumsum(gaps + 1) - 1
    if int(indices[-1]) >= size:
        raise _fail(h, f"index {int(indices[-1])} out of range for size = {size}")
    return indices


def _decode_control(h: _Header, payload: memoryview) -> Message:
    _dtype(h, WireDtype.NONE)
    _zero(h, bits=h.bits, n=h.n, aux=h.aux)
    has_consensus = bool(h.flags & Flag.HAS_CONSENSUS)
    if h.payload_len < CONTROL_FIELDS_BYTES:
        raise _fail(h, f"payload size mismatch: the control fields need "
                       f"{CONTROL_FIELDS_BYTES} bytes, header says payload_len = {h.payload_len}")
    extra = h.payload_len - CONTROL_FIELDS_BYTES
    if has_consensus != (extra > 0):
        raise _fail(h, f"payload size mismatch: {extra} bytes follow the control fields "
                       f"but HAS_CONSENSUS is {'set' if has_consensus else 'clear'}")
    probe_seed, num_probes = _CONTROL.unpack_from(payload, 0)
    consensus = None
    if has_consensus:
        try:
            consensus = decode(payload[CONTROL_FIELDS_BYTES:], expect_kind=MessageKind.CONSENSUS)
        except WireFormatError as e:
            raise _fail(h, f"embedded consensus: {e}") from None
    return Message(h.kind, VERSION, h.round, h.sender, h.flags, probe_seed=probe_seed,
                   num_probes=num_probes, consensus=consensus)


_DECODERS = {
    MessageKind.VOTES: _decode_votes,
    MessageKind.CONSENSUS: _decode_consensus,
    MessageKind.SOFT_LABELS: _decode_soft_labels,
    MessageKind.DENSE_PARAMS: _decode_dense,
    MessageKind.SPARSE_PARAMS: _decode_sparse,
    MessageKind.CONTROL: _decode_control,
    MessageKind.SOFT_TOPK: _decode_soft_topk,
}
