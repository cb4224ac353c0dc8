"""CONTROL: the server's round opener (probe-subset seed and count), with
the previous round's CONSENSUS message embedded whole. Size, encoder and decoder.
"""

from __future__ import annotations

import struct
from typing import Optional, Union

from .frame import (
    OVERHEAD,
    SERVER,
    U64_MAX,
    VERSION,
    Flag,
    _Header,
    Message,
    MessageKind,
    WireDtype,
    WireFormatError,
    decode,
    _decoder,
    _dtype,
    _fail,
    _frame,
    _uint,
    _zero,
)


_CONTROL = struct.Struct("<QI")  # probe_seed num_probes
CONTROL_FIELDS_BYTES = _CONTROL.size


def control_message_bytes(consensus_bytes: int = 0) -> int:
    """len(encode_control(...)) with an embedded consensus of ``consensus_bytes``."""
    return OVERHEAD + CONTROL_FIELDS_BYTES + consensus_bytes


def encode_control(
    *,
    round: int,
    probe_seed: int,
    num_probes: int,
    consensus: Optional[Union[bytes, bytearray, memoryview]] = None,
    sender: int = SERVER,
) -> bytes:
    """The server's round opener: probe-subset seed and count, optionally the
    previous round's consensus message (embedded whole, validated here)."""
    fields = _CONTROL.pack(
        _uint(probe_seed, "probe_seed", U64_MAX), _uint(num_probes, "num_probes")
    )
    parts: list = [fields]
    flags = Flag(0)
    if consensus is not None:
        if not isinstance(consensus, (bytes, bytearray, memoryview)):
            raise TypeError(
                "consensus must be bytes (an encoded CONSENSUS message), got "
                f"{type(consensus).__name__}"
            )
        try:
            decode(consensus, expect_kind=MessageKind.CONSENSUS)
        except WireFormatError as e:
            raise ValueError(f"consensus is not a valid consensus message: {e}") from None
        parts.append(consensus)
        flags = Flag.HAS_CONSENSUS
    return _frame(MessageKind.CONTROL, flags, 0, WireDtype.NONE, round, sender, 0, 0, parts)


@_decoder(MessageKind.CONTROL)
def _decode_control(h: _Header, payload: memoryview) -> Message:
    _dtype(h, WireDtype.NONE)
    _zero(h, bits=h.bits, n=h.n, aux=h.aux)
    has_consensus = bool(h.flags & Flag.HAS_CONSENSUS)
    if h.payload_len < CONTROL_FIELDS_BYTES:
        raise _fail(
            h,
            f"payload size mismatch: the control fields need "
            f"{CONTROL_FIELDS_BYTES} bytes, header says payload_len = {h.payload_len}",
        )
    extra = h.payload_len - CONTROL_FIELDS_BYTES
    if has_consensus != (extra > 0):
        raise _fail(
            h,
            f"payload size mismatch: {extra} bytes follow the control fields "
            f"but HAS_CONSENSUS is {'set' if has_consensus else 'clear'}",
        )
    probe_seed, num_probes = _CONTROL.unpack_from(payload, 0)
    consensus = None
    if has_consensus:
        try:
            consensus = decode(payload[CONTROL_FIELDS_BYTES:], expect_kind=MessageKind.CONSENSUS)
        except WireFormatError as e:
            raise _fail(h, f"embedded consensus: {e}") from None
    return Message(
        h.kind,
        VERSION,
        h.round,
        h.sender,
        h.flags,
        probe_seed=probe_seed,
        num_probes=num_probes,
        consensus=consensus,
    )
