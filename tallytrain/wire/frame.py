"""The frame every message shares, and what all the kinds build on.

A message is ``header (28 bytes) | payload (payload_len bytes) | CRC32 (4)``
(docs/wire.md). This module holds the header's fields and codes
(:class:`MessageKind`, :class:`Flag`, :class:`WireDtype`), the decoded
:class:`Message`, the framing of an encoded payload (:func:`_frame`) and the
generic :func:`decode`, which checks the header and the checksum and hands the
payload to its kind's decoder (registered with :func:`_decoder` by the kind's
module). The helpers after those are shared by the kinds' modules: input checks
for the encoders, header and payload checks for the decoders.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._args import int_arg
from .. import ops
from ..ops import bits_for


MAGIC = b"TT"
VERSION = 1
# magic, version, kind, flags, bits, dtype, round, sender, n, aux, payload_len
_HEADER = struct.Struct("<2sBBHBBIIIII")
_TRAILER = struct.Struct("<I")  # CRC32
HEADER_BYTES = _HEADER.size
TRAILER_BYTES = _TRAILER.size
OVERHEAD = HEADER_BYTES + TRAILER_BYTES
SERVER = 0xFFFFFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


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

    ABSTAIN = 1 << 0  # VOTES: symbols are bits_for(C + 1) wide, C = abstain
    KEEP_MASK = 1 << 1  # CONSENSUS: a 1-bit keep mask follows the labels
    BITMAP = 1 << 2  # SPARSE_PARAMS: indices as a bitmap, not Rice-coded gaps
    HAS_CONSENSUS = 1 << 3  # CONTROL: a full CONSENSUS message is embedded
    SHAPE = 1 << 4  # VOTES, CONSENSUS, SOFT_LABELS: the leading shape comes first


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
    code: (tdt, ndt) for tdt, (code, ndt) in _FLOAT_CODES.items()
}


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
        return all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

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
# the generic decode: header, checksum, then the kind's decoder
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


# Each kind's module registers the decoder of its payload with @_decoder(kind);
# tallytrain/wire/__init__.py imports every kind's module (and checks that none
# is missing), so the table is complete before anyone can call decode.
_Decoder = Callable[[_Header, memoryview], Message]
_DECODERS: Dict[MessageKind, _Decoder] = {}


def _decoder(kind: MessageKind) -> Callable[[_Decoder], _Decoder]:
    """Register the decorated function as :func:`decode`'s reader of ``kind``."""

    def register(fn: _Decoder) -> _Decoder:
        _DECODERS[kind] = fn
        return fn

    return register


def decode(
    data: Union[bytes, bytearray, memoryview], *, expect_kind: Optional[MessageKind] = None
) -> Message:
    """Parse and fully validate one message; WireFormatError says what is wrong."""
    view = _byte_view(data)
    if expect_kind is not None:
        expect_kind = MessageKind(expect_kind)
    total = view.nbytes
    if total < OVERHEAD:
        raise WireFormatError(
            f"truncated message: {total} bytes, shorter than the {OVERHEAD}-byte header and trailer"
        )
    (magic, version, kind_code, flags, bits, dtype, round_, sender, n, aux, payload_len) = (
        _HEADER.unpack_from(view, 0)
    )
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"unknown version {version}; this decoder reads version {VERSION}")
    end = HEADER_BYTES + payload_len
    if total < end + TRAILER_BYTES:
        raise WireFormatError(
            f"truncated message: header says payload_len = {payload_len}, so "
            f"{end + TRAILER_BYTES} bytes, got {total}"
        )
    if total > end + TRAILER_BYTES:
        raise WireFormatError(
            f"{total - end - TRAILER_BYTES} trailing bytes after the {end + TRAILER_BYTES}-byte "
            "message"
        )
    (sent_crc,) = _TRAILER.unpack_from(view, end)
    crc = zlib.crc32(view[:end])
    if crc != sent_crc:
        raise WireFormatError(
            f"checksum mismatch: CRC32 is {crc:#010x}, trailer says {sent_crc:#010x}"
        )
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


# --------------------------------------------------------------------------- #
# encoding: the frame, and checks of the encoders' inputs
# --------------------------------------------------------------------------- #
def _frame(
    kind: MessageKind,
    flags: Flag,
    bits: int,
    dtype: WireDtype,
    round: int,
    sender: int,
    n: int,
    aux: int,
    parts: Sequence,
) -> bytes:
    round = _uint(round, "round")
    sender = _uint(sender, "sender")
    views = [
        p.reshape(-1).view(np.uint8).data if isinstance(p, np.ndarray) else _byte_view(p)
        for p in parts
    ]
    payload_len = sum(v.nbytes for v in views)
    if payload_len > U32_MAX:
        raise ValueError(
            f"message too large: a payload of {payload_len} bytes does not fit the u32 "
            "payload_len field"
        )
    header = _HEADER.pack(
        MAGIC, VERSION, kind, flags, bits, dtype, round, sender, n, aux, payload_len
    )
    crc = zlib.crc32(header)
    for v in views:
        crc = zlib.crc32(v, crc)
    return b"".join([header, *views, _TRAILER.pack(crc)])


def _uint(value, name: str, limit: int = U32_MAX) -> int:
    return int_arg(value, name, 0, limit)


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


def _itemsize(dtype: torch.dtype) -> int:
    return _float_code(dtype)[1].itemsize


def _tensor(t, name: str, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.detach().cpu()


def _any_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t.detach().cpu()


def _floats(t: torch.Tensor, name: str, dtype: torch.dtype) -> np.ndarray:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    wire = _float_code(dtype)[1]
    return t.to(dtype).contiguous().numpy().astype(wire, copy=False)


def _index_text(flat: int, shape: Sequence[int]) -> str:
    """``[i]`` for 1-D, ``[i, j]`` for a row-major position in a larger shape."""
    coords = []
    for size in reversed(tuple(shape)):
        coords.append(flat % size if size else 0)
        flat //= size if size else 1
    return "[" + ", ".join(str(c) for c in reversed(coords)) + "]"


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


# --------------------------------------------------------------------------- #
# decoding: checks of the header's fields and readers of the payload
# --------------------------------------------------------------------------- #
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
        raise _fail(
            h,
            f"payload size mismatch: {what} needs {expected} bytes, "
            f"header says payload_len = {h.payload_len}",
        )


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
