"""tallytrain.wire: round trips, closed-form sizes, index-coding cost, and
rejection of every kind of corrupt input (targeted cases plus hypothesis fuzzing).

Run with TALLYTRAIN_BACKEND=reference; nothing here needs the extension.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tallytrain import ops, wire
from tallytrain.wire import Flag, MessageKind, WireFormatError

U32 = 2**32 - 1
HEADER = struct.Struct("<2sBBHBBIIIII")
FIELDS = (
    "magic",
    "version",
    "kind",
    "flags",
    "bits",
    "dtype",
    "round",
    "sender",
    "n",
    "aux",
    "payload_len",
)
CLASS_COUNTS = [2, 3, 4, 5, 8, 9, 16, 17, 255, 256, 257, 1000]
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def header_of(data: bytes) -> dict:
    return dict(zip(FIELDS, HEADER.unpack_from(data, 0)))


def reframe(data: bytes, payload: bytes = None, **fields) -> bytes:
    """Rebuild a message with some header fields and/or the payload replaced,
    and a correct CRC, so that the decoder's deeper checks are what fires."""
    h = header_of(data)
    old = data[wire.HEADER_BYTES : wire.HEADER_BYTES + h["payload_len"]]
    payload = old if payload is None else payload
    h["payload_len"] = len(payload)
    h.update(fields)
    body = HEADER.pack(*(h[f] for f in FIELDS)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def fix_crc(data: bytes) -> bytes:
    """Replace the last four bytes with the CRC32 of everything before them."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def rejects(data, match: str, **kw) -> None:
    with pytest.raises(WireFormatError, match=match):
        wire.decode(data, **kw)


def random_symbols(rng, n, num_symbols):
    return torch.from_numpy(rng.integers(0, num_symbols, n)).to(torch.int64)


def random_topk(rng, positions, k, num_classes, dtype=torch.float16):
    """(indices, values) of shape (*positions, k): distinct classes per position."""
    m = int(np.prod(positions))
    idx = np.argsort(rng.random((m, num_classes)), axis=1)[:, :k]
    indices = torch.from_numpy(idx).reshape(*positions, k).to(torch.int64)
    values = torch.from_numpy(rng.random((*positions, k))).to(dtype)
    return indices, values


def random_indices(rng, size, k):
    return torch.from_numpy(np.sort(rng.choice(size, k, replace=False))).to(torch.int64)


def sparse_msg(indices, size, force_bitmap=None, **kw):
    data = wire.encode_sparse(
        torch.tensor(indices, dtype=torch.int64),
        torch.arange(len(indices), dtype=torch.float32),
        size,
        round=0,
        sender=0,
        **kw,
    )
    if force_bitmap is not None:
        assert bool(header_of(data)["flags"] & Flag.BITMAP) == force_bitmap
    return data


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and (
            a.numel() == 0
            or torch.equal(
                a.contiguous().reshape(-1).view(torch.uint8),
                b.contiguous().reshape(-1).view(torch.uint8),
            )
        )
    )


def reencode(m: wire.Message) -> bytes:
    """Encode a decoded message again (for the canonical kinds)."""
    common = dict(round=m.round, sender=m.sender)
    if m.kind == MessageKind.VOTES:
        return wire.encode_votes(
            m.packed, m.n, m.num_classes, abstain=m.abstain, shape=m.shape, **common
        )
    if m.kind == MessageKind.CONSENSUS:
        return wire.encode_consensus(m.labels, m.num_classes, keep=m.keep, **common)
    if m.kind == MessageKind.SOFT_LABELS:
        return wire.encode_soft_labels(m.probs, dtype=m.probs.dtype, **common)
    if m.kind == MessageKind.SOFT_TOPK:
        return wire.encode_soft_topk(
            m.indices, m.values, m.num_classes, dtype=m.values.dtype, **common
        )
    if m.kind == MessageKind.DENSE_PARAMS:
        return wire.encode_dense(m.vector, dtype=m.vector.dtype, **common)
    if m.kind == MessageKind.CONTROL:
        return wire.encode_control(
            probe_seed=m.probe_seed,
            num_probes=m.num_probes,
            consensus=None if m.consensus is None else reencode(m.consensus),
            **common,
        )
    raise AssertionError(m.kind)


# --------------------------------------------------------------------------- #
# round trips and sizes
# --------------------------------------------------------------------------- #
def test_constants():
    assert (wire.HEADER_BYTES, wire.TRAILER_BYTES, wire.OVERHEAD) == (28, 4, 32)
    assert wire.SERVER == 0xFFFFFFFF
    assert [int(k) for k in MessageKind] == [1, 2, 3, 4, 5, 6, 7]
    assert issubclass(WireFormatError, ValueError)


def test_golden_bytes():
    """The byte layout of docs/wire.md, written out by hand."""

    def framed(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    # votes 2, 0, 1 with C = 3 (2 bits each): 0b01_00_10
    votes = framed(
        b"TT"
        + bytes([1, 1])
        + struct.pack("<H", 0)
        + bytes([2, 3])
        + struct.pack("<IIIII", 1, 2, 3, 3, 1)
        + bytes([0b01_00_10])
    )
    packed = ops.pack_labels(torch.tensor([2, 0, 1]), 3)
    assert wire.encode_votes(packed, 3, 3, round=1, sender=2) == votes
    # consensus -1, 1 with C = 2 (3 symbols in 2 bits, -1 sent as 2), keep 0, 1
    consensus = framed(
        b"TT"
        + bytes([1, 2])
        + struct.pack("<H", 2)
        + bytes([2, 3])
        + struct.pack("<IIIII", 4, 0xFFFFFFFF, 2, 2, 2)
        + bytes([0b01_10, 0b10])
    )
    assert (
        wire.encode_consensus(torch.tensor([-1, 1]), 2, keep=torch.tensor([False, True]), round=4)
        == consensus
    )
    control = framed(
        b"TT"
        + bytes([1, 6])
        + struct.pack("<H", 8)
        + bytes([0, 0])
        + struct.pack("<IIIII", 5, 0xFFFFFFFF, 0, 0, 12 + len(consensus))
        + struct.pack("<QI", 2**64 - 2, 7)
        + consensus
    )
    assert (
        wire.encode_control(round=5, probe_seed=2**64 - 2, num_probes=7, consensus=consensus)
        == control
    )
    dense = framed(
        b"TT"
        + bytes([1, 4])
        + struct.pack("<H", 0)
        + bytes([0, 1])
        + struct.pack("<IIIII", 0, 9, 2, 0, 4)
        + struct.pack("<ee", 1.5, -2.0)
    )
    assert (
        wire.encode_dense(torch.tensor([1.5, -2.0]), dtype=torch.float16, round=0, sender=9)
        == dense
    )
    # bitmap of size 10 with indices 0, 9 (a tie with Rice r = 0, so the bitmap)
    sparse = framed(
        b"TT"
        + bytes([1, 5])
        + struct.pack("<H", 4)
        + bytes([0, 2])
        + struct.pack("<IIIII", 0, 1, 2, 10, 10)
        + bytes([0x01, 0x02])
        + struct.pack("<ff", 3.0, 4.0)
    )
    assert (
        wire.encode_sparse(torch.tensor([0, 9]), torch.tensor([3.0, 4.0]), 10, round=0, sender=1)
        == sparse
    )


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 61])
@pytest.mark.parametrize("abstain", [False, True])
def test_votes_round_trip(num_classes, n, abstain):
    rng = np.random.default_rng(n * 7919 + num_classes)
    symbols = num_classes + 1 if abstain else num_classes
    packed = ops.pack_labels(random_symbols(rng, n, symbols), symbols)
    data = wire.encode_votes(packed, n, num_classes, abstain=abstain, round=5, sender=3)
    assert len(data) == wire.votes_message_bytes(n, num_classes, abstain)
    assert len(data) == wire.OVERHEAD + math.ceil(n * ops.bits_for(symbols) / 8)
    h = header_of(data)
    assert (h["magic"], h["version"], h["kind"], h["bits"], h["n"], h["aux"]) == (
        b"TT",
        1,
        1,
        ops.bits_for(symbols),
        n,
        num_classes,
    )
    m = wire.decode(data, expect_kind=MessageKind.VOTES)
    assert (m.kind, m.version, m.round, m.sender) == (MessageKind.VOTES, 1, 5, 3)
    assert (m.n, m.num_classes, m.abstain) == (n, num_classes, abstain)
    assert m.flags == (Flag.ABSTAIN if abstain else Flag(0))
    assert m.packed.dtype == torch.uint8 and torch.equal(m.packed, packed)
    assert m.labels is None and m.probs is None and m.consensus is None


def test_votes_from_pack_argmax_with_abstention():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    packed = ops.pack_argmax(logits, abstain_below=0.3)
    m = wire.decode(wire.encode_votes(packed, 50, 10, abstain=True, round=0, sender=0))
    assert torch.equal(ops.unpack_labels(m.packed, 50, 11), ops.unpack_labels(packed, 50, 11))


@pytest.mark.parametrize("shape", [(2, 3), (3, 1, 2), (6, 1), (1, 6), (2, 0, 4), (0, 0), ()])
@pytest.mark.parametrize("abstain", [False, True])
def test_votes_shape_round_trip(shape, abstain):
    n = math.prod(shape)
    symbols = 6 if abstain else 5
    labels = torch.arange(n) % symbols
    packed = ops.pack_labels(labels, symbols)
    data = wire.encode_votes(packed, n, 5, abstain=abstain, shape=shape, round=4, sender=9)
    # one u8 dimension count, then one little-endian u32 per dimension, then the stream
    section = bytes([len(shape)]) + b"".join(struct.pack("<I", d) for d in shape)
    assert data[wire.HEADER_BYTES : -4] == section + packed.numpy().tobytes()
    assert len(data) == wire.votes_message_bytes(n, 5, abstain, shape=shape)
    assert header_of(data)["flags"] == Flag.SHAPE | (Flag.ABSTAIN if abstain else Flag(0))
    m = wire.decode(data)
    assert m.shape == shape and m.n == n and torch.equal(m.packed, packed)
    assert reencode(m) == data


def test_votes_one_dimensional_shape_is_the_plain_format():
    packed = ops.pack_labels(torch.tensor([2, 0, 1, 1]), 3)
    plain = wire.encode_votes(packed, 4, 3, round=0, sender=0)
    assert wire.encode_votes(packed, 4, 3, shape=(4,), round=0, sender=0) == plain
    assert wire.encode_votes(packed, 4, 3, shape=torch.Size([4]), round=0, sender=0) == plain
    assert wire.votes_message_bytes(4, 3, shape=(4,)) == len(plain)
    assert wire.decode(plain).shape == (4,)


def test_votes_shape_encode_errors():
    packed = ops.pack_labels(torch.tensor([2, 0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"shape \(3, 2\) holds 6 votes, but n = 4"):
        wire.encode_votes(packed, 4, 3, shape=(3, 2), round=0, sender=0)
    with pytest.raises(ValueError, match=r"shape\[1\] must be in 0\.\."):
        wire.encode_votes(packed, 4, 3, shape=(4, -1), round=0, sender=0)
    with pytest.raises(TypeError, match=r"shape\[0\] must be an int"):
        wire.encode_votes(packed, 4, 3, shape=(2.0, 2), round=0, sender=0)
    with pytest.raises(TypeError, match="shape must be a sequence"):
        wire.encode_votes(packed, 4, 3, shape=4, round=0, sender=0)
    with pytest.raises(ValueError, match="at most 255 dimensions"):
        wire.encode_votes(packed, 4, 3, shape=(4,) + (1,) * 255, round=0, sender=0)


def test_votes_shape_decode_errors():
    packed = ops.pack_labels(torch.tensor([2, 0, 1, 1, 0, 2]), 3)
    data = wire.encode_votes(packed, 6, 3, shape=(2, 3), round=0, sender=0)
    stream = packed.numpy().tobytes()

    def shaped(*dims, ndim=None):
        ndim = len(dims) if ndim is None else ndim
        return bytes([ndim]) + b"".join(struct.pack("<I", d) for d in dims)

    rejects(reframe(data, payload=b""), "no room for the shape")
    rejects(reframe(data, payload=shaped(2, 3)), "payload size mismatch")  # no stream
    rejects(reframe(data, payload=shaped(2, 3) + stream + b"\0"), "payload size mismatch")
    rejects(reframe(data, payload=shaped(2, 3, ndim=3) + stream), "payload size mismatch")
    rejects(reframe(data, payload=shaped(2, 3, ndim=1) + stream), "payload size mismatch")
    rejects(reframe(data, payload=shaped(6) + stream), "1-D shape .*non-canonical")
    rejects(reframe(data, payload=shaped(3, 3) + stream), r"shape \(3, 3\) holds 9 votes")
    rejects(reframe(data, payload=shaped(2, 0) + stream), r"shape \(2, 0\) holds 0 votes")
    rejects(reframe(data, payload=shaped(U32, U32) + stream), "holds .* votes, but n = 6")
    rejects(reframe(data, payload=shaped(ndim=255) + stream), "payload size mismatch")
    # the stream behind the shape is checked as without it
    rejects(reframe(data, payload=shaped(2, 3) + bytes([0xFF, 0x0F])), "symbol out of range")
    rejects(reframe(data, payload=shaped(2, 3) + bytes([0x00, 0xF0])), "padding")
    # a shape section without the flag is only a wrong payload size
    rejects(reframe(data, flags=0), "payload size mismatch")


def shape_section(*dims, ndim=None) -> bytes:
    ndim = len(dims) if ndim is None else ndim
    return bytes([ndim]) + b"".join(struct.pack("<I", d) for d in dims)


# --------------------------------------------------------------------------- #
# consensus and soft labels of any leading shape (token windows: [N, T])
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(2, 3), (3, 1, 2), (1, 6), (2, 0), ()])
@pytest.mark.parametrize("with_keep", [False, True])
def test_consensus_shape_round_trip(shape, with_keep):
    n = math.prod(shape)
    labels = (torch.arange(n) % 6 - 1).reshape(shape)
    keep = (labels % 2 == 0) if with_keep else None
    data = wire.encode_consensus(labels, 5, keep=keep, round=3)
    assert data[wire.HEADER_BYTES : wire.HEADER_BYTES + 1 + 4 * len(shape)] == shape_section(*shape)
    assert len(data) == wire.consensus_message_bytes(n, 5, with_keep, shape=shape)
    assert header_of(data)["flags"] == Flag.SHAPE | (Flag.KEEP_MASK if with_keep else Flag(0))
    m = wire.decode(data)
    assert m.shape == shape and torch.equal(m.labels, labels)
    assert (m.keep is None) == (keep is None) and (keep is None or torch.equal(m.keep, keep))
    assert reencode(m) == data
    # embedded in a control message, the shape survives too
    ctrl = wire.decode(wire.encode_control(round=4, probe_seed=1, num_probes=2, consensus=data))
    assert ctrl.consensus.shape == shape and torch.equal(ctrl.consensus.labels, labels)


def test_consensus_one_dimensional_is_the_plain_format_and_shape_errors():
    labels = torch.tensor([2, -1, 0, 1, 1, 0])
    plain = wire.encode_consensus(labels, 3, round=0)
    assert header_of(plain)["flags"] == 0 and wire.decode(plain).shape == (6,)
    assert (
        len(plain)
        == wire.consensus_message_bytes(6, 3)
        == wire.consensus_message_bytes(6, 3, shape=(6,))
    )
    stream = plain[wire.HEADER_BYTES : -4]
    shaped = wire.encode_consensus(labels.reshape(2, 3), 3, round=0)
    rejects(reframe(shaped, payload=shape_section(6) + stream), "1-D shape .*non-canonical")
    rejects(reframe(shaped, payload=shape_section(3, 3) + stream), r"holds 9 labels, but n = 6")
    rejects(reframe(shaped, payload=shape_section(2, 3)), "payload size mismatch")
    rejects(reframe(shaped, payload=b""), "no room for the shape")
    with pytest.raises(ValueError, match=r"labels\[1, 0\] = 3 is outside -1\.\.2"):
        wire.encode_consensus(torch.tensor([[0, 1], [3, 0]]), 3, round=0)
    with pytest.raises(ValueError, match="keep must have the labels' shape"):
        wire.encode_consensus(
            labels.reshape(2, 3), 3, keep=torch.ones(6, dtype=torch.bool), round=0
        )


@pytest.mark.parametrize("lead", [(2, 3), (1, 4), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_soft_labels_shape_round_trip(lead, dtype):
    probs = torch.rand(*lead, 5).to(dtype)
    data = wire.encode_soft_labels(probs, dtype=dtype, round=1, sender=2)
    n = math.prod(lead)
    assert len(data) == wire.soft_labels_message_bytes(n, 5, dtype, shape=lead)
    assert header_of(data)["flags"] == Flag.SHAPE and header_of(data)["n"] == n
    m = wire.decode(data)
    assert m.shape == lead and bitwise_equal(m.probs, probs) and reencode(m) == data
    flat = wire.encode_soft_labels(probs.reshape(n, 5), dtype=dtype, round=1, sender=2)
    assert header_of(flat)["flags"] == 0 and len(flat) == len(data) - 1 - 4 * len(lead)
    body = flat[wire.HEADER_BYTES : -4]
    rejects(reframe(data, payload=shape_section(n) + body), "non-canonical")
    rejects(reframe(data, payload=shape_section(n + 1, 1) + body), "holds")


# --------------------------------------------------------------------------- #
# SOFT_TOPK: k classes and probabilities per position
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("positions", [(7,), (2, 3), (), (0,)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_soft_topk_round_trip(num_classes, positions, dtype):
    rng = np.random.default_rng(num_classes)
    k = min(num_classes, 4)
    indices, values = random_topk(rng, positions, k, num_classes, dtype)
    data = wire.encode_soft_topk(indices, values, num_classes, dtype=dtype, round=5, sender=1)
    n = indices.numel()
    assert len(data) == wire.soft_topk_message_bytes(positions, k, num_classes, dtype)
    h = header_of(data)
    assert (h["kind"], h["flags"], h["n"], h["aux"]) == (7, 0, n, num_classes)
    assert h["bits"] == ops.bits_for(num_classes)
    # layout: the shape section, the packed indices, the values
    section = shape_section(*positions, k)
    packed = ops.pack_labels(indices.reshape(-1), num_classes).numpy().tobytes()
    raw = values.contiguous().numpy().tobytes()
    assert data[wire.HEADER_BYTES : -4] == section + packed + raw
    m = wire.decode(data)
    assert m.shape == (*positions, k) and m.num_classes == num_classes and m.n == n
    assert torch.equal(m.indices, indices) and bitwise_equal(m.values, values)
    assert reencode(m) == data


def test_soft_topk_size_formula_at_a_language_model_scale():
    # 8 probe windows of 64 tokens, k = 16 of V = 16,384 (14-bit indices), float16 values
    size = wire.soft_topk_message_bytes((8, 64), 16, 16384)
    assert size == 32 + (1 + 3 * 4) + 8 * 64 * 16 * 14 // 8 + 8 * 64 * 16 * 2
    assert size < wire.soft_labels_message_bytes(8 * 64, 16384, shape=(8, 64)) / 400


def test_soft_topk_encode_errors():
    ok = dict(round=0, sender=0)
    idx = torch.tensor([[0, 2], [1, 3]])
    val = torch.tensor([[0.5, 0.2], [0.6, 0.1]])
    wire.encode_soft_topk(idx, val, 4, **ok)
    with pytest.raises(TypeError, match="indices"):
        wire.encode_soft_topk(idx.float(), val, 4, **ok)
    with pytest.raises(TypeError, match="values"):
        wire.encode_soft_topk(idx, val.int(), 4, **ok)
    with pytest.raises(ValueError, match="values must have the indices' shape"):
        wire.encode_soft_topk(idx, val[:, :1], 4, **ok)
    with pytest.raises(ValueError, match=r"indices\[1, 1\] = 4 is outside 0\.\.3"):
        wire.encode_soft_topk(torch.tensor([[0, 2], [1, 4]]), val, 4, **ok)
    with pytest.raises(ValueError, match="position 1 repeat a class"):
        wire.encode_soft_topk(torch.tensor([[0, 2], [3, 3]]), val, 4, **ok)
    with pytest.raises(ValueError, match=r"k = indices.shape\[-1\] must be in 1\.\.num_classes"):
        wire.encode_soft_topk(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0), 4, **ok)
    with pytest.raises(ValueError, match=r"k = indices.shape\[-1\] must be in 1\.\.num_classes"):
        wire.encode_soft_topk(torch.tensor([[0, 1, 2]]), torch.rand(1, 3), 2, **ok)
    with pytest.raises(ValueError, match="0-D"):
        wire.encode_soft_topk(torch.tensor(1), torch.tensor(0.5), 4, **ok)
    with pytest.raises(ValueError, match="num_classes"):
        wire.encode_soft_topk(idx, val, 1, **ok)
    with pytest.raises(ValueError, match="dtype"):
        wire.encode_soft_topk(idx, val, 4, dtype=torch.bfloat16, **ok)


def test_soft_topk_decode_errors():
    idx = torch.tensor([[0, 2], [1, 3], [4, 0]])
    val = torch.tensor([[0.5, 0.2], [0.6, 0.1], [0.3, 0.3]], dtype=torch.float16)
    data = wire.encode_soft_topk(idx, val, 5, round=0, sender=0)  # C = 5: 3-bit indices
    packed = ops.pack_labels(idx.reshape(-1), 5).numpy().tobytes()
    raw = val.numpy().tobytes()

    def with_indices(flat):
        return shape_section(3, 2) + ops.pack_labels(torch.tensor(flat), 8).numpy().tobytes() + raw

    rejects(reframe(data, payload=with_indices([0, 2, 1, 1, 4, 0])), "position 1 repeat a class")
    rejects(reframe(data, payload=with_indices([0, 2, 1, 3, 4, 5])), "symbol out of range")
    rejects(
        reframe(data, payload=shape_section(3, 2) + packed[:-1] + b"\xff" + raw),
        "padding|symbol out of range",
    )
    rejects(reframe(data, payload=shape_section(3, 3) + packed + raw), "holds 9 entries")
    rejects(reframe(data, payload=shape_section(6, 0) + packed + raw), "holds 0 entries")
    rejects(reframe(data, payload=shape_section(3, 2) + packed + raw[:-2]), "payload size mismatch")
    rejects(reframe(data, payload=b""), "no room for the shape")
    rejects(reframe(data, bits=2), "bits")
    rejects(reframe(data, aux=1), "num_classes")
    rejects(reframe(data, aux=2), "bits")
    rejects(reframe(data, dtype=3), "dtype")
    rejects(reframe(data, flags=Flag.SHAPE), "unknown flags")
    rejects(reframe(data, n=U32), "payload size mismatch")
    # k > C: the 6 entries read as one position of k = 6 classes, with C = 5
    rejects(
        reframe(data, payload=shape_section(6) + packed + raw),
        r"k = 6 .* must be in 1\.\.num_classes = 5",
    )
    one = wire.encode_soft_topk(torch.tensor([3]), torch.tensor([0.9]), 5, round=0, sender=0)
    body = one[wire.HEADER_BYTES + 5 : -4]  # after the 1-D shape section (5 bytes)
    rejects(reframe(one, payload=shape_section(ndim=0) + body), "0-D shape")


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("n", [0, 1, 8, 13])
@pytest.mark.parametrize("with_keep", [False, True])
def test_consensus_round_trip(num_classes, n, with_keep):
    rng = np.random.default_rng(n * 31 + num_classes)
    labels = random_symbols(rng, n, num_classes + 1) - 1  # -1..C-1
    keep = torch.from_numpy(rng.random(n) < 0.5) if with_keep else None
    data = wire.encode_consensus(labels, num_classes, keep=keep, round=9)
    assert len(data) == wire.consensus_message_bytes(n, num_classes, with_keep)
    m = wire.decode(data, expect_kind=MessageKind.CONSENSUS)
    assert m.sender == wire.SERVER and m.round == 9 and m.num_classes == num_classes
    assert m.labels.dtype == torch.int64 and torch.equal(m.labels, labels)
    if with_keep:
        assert m.flags == Flag.KEEP_MASK and m.keep.dtype == torch.bool
        assert torch.equal(m.keep, keep)
    else:
        assert m.flags == Flag(0) and m.keep is None


def test_consensus_all_missing_and_extremes():
    labels = torch.tensor([-1, -1, 0, 1, -1], dtype=torch.int32)
    m = wire.decode(wire.encode_consensus(labels, 2, round=0))
    assert torch.equal(m.labels, labels.to(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(0, 2), (1, 2), (5, 3), (4, 17)])
def test_soft_labels_round_trip(dtype, shape):
    probs = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    if probs.numel() > 2:
        probs[0, 0], probs[0, 1] = float("nan"), float("inf")  # floats are data
    data = wire.encode_soft_labels(probs, dtype=dtype, round=1, sender=2)
    assert len(data) == wire.soft_labels_message_bytes(*shape, dtype)
    m = wire.decode(data)
    assert m.kind == MessageKind.SOFT_LABELS and m.num_classes == shape[1]
    assert bitwise_equal(m.probs, probs.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("size", [0, 1, 7, 1000])
def test_dense_round_trip(dtype, size):
    vector = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if size:
        vector[-1] = float("nan")
    data = wire.encode_dense(vector, dtype=dtype, round=U32, sender=U32 - 1)
    assert len(data) == wire.dense_message_bytes(size, dtype)
    m = wire.decode(data)
    assert (m.round, m.sender, m.n) == (U32, U32 - 1, size)
    assert bitwise_equal(m.vector, vector.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "size,k",
    [
        (0, 0),
        (1, 0),
        (1, 1),
        (9, 9),
        (100, 0),
        (100, 1),
        (100, 50),
        (100, 99),
        (100, 100),
        (4096, 3),
        (10_000, 10),
        (10_000, 700),
        (10_000, 5000),
    ],
)
def test_sparse_round_trip(dtype, size, k):
    rng = np.random.default_rng(size + k)
    indices = random_indices(rng, size, k)
    values = torch.from_numpy(rng.standard_normal(k)).to(dtype)
    data = wire.encode_sparse(indices, values, size, dtype=dtype, round=4, sender=0)
    assert len(data) <= wire.sparse_message_max_bytes(k, size, dtype)
    m = wire.decode(data, expect_kind=MessageKind.SPARSE_PARAMS)
    assert (m.size, m.n) == (size, k)
    assert m.indices.dtype == torch.int64 and torch.equal(m.indices, indices)
    assert bitwise_equal(m.values, values)
    if m.flags & Flag.BITMAP:
        assert len(data) == wire.sparse_message_max_bytes(k, size, dtype)


def test_sparse_bitmap_versus_rice_choice():
    rng = np.random.default_rng(3)
    size = 8000

    def coding(k):
        data = wire.encode_sparse(
            random_indices(rng, size, k), torch.zeros(k), size, round=0, sender=0
        )
        return "bitmap" if header_of(data)["flags"] & Flag.BITMAP else "rice"

    assert coding(size) == "bitmap"  # every index: 1 bit each
    assert coding(size // 2) == "bitmap"  # Rice needs ~2.3 bits per index here
    assert coding(size // 100) == "rice"
    assert coding(0) == "rice"  # nothing at all beats ceil(M/8) bytes


def test_sparse_accepts_huge_size_without_dense_work():
    size = U32
    indices = torch.tensor([0, 12345, size - 2, size - 1], dtype=torch.int64)
    data = wire.encode_sparse(indices, torch.ones(4), size, round=0, sender=0)
    assert len(data) < 100
    m = wire.decode(data)
    assert torch.equal(m.indices, indices) and m.size == size


@pytest.mark.parametrize("ratio", [2, 4, 16, 100, 1000, 2**16])
def test_sparse_index_bits_within_bound(ratio):
    """At most log2(M/k) + 2 bits per kept index on uniformly random positions."""
    rng = np.random.default_rng(ratio)
    k = 2000
    size = k * ratio
    data = wire.encode_sparse(
        random_indices(rng, size, k),
        torch.zeros(k, dtype=torch.float16),
        size,
        dtype=torch.float16,
        round=0,
        sender=0,
    )
    index_bits = 8 * (len(data) - wire.OVERHEAD - 2 * k)
    assert index_bits <= k * (math.log2(ratio) + 2), index_bits / k


@pytest.mark.parametrize("r", [1, 2, 7, 8, 13, 31])
def test_rice_remainders_use_the_packed_stream_layout(r):
    """The remainder section is the docs/design.md §2 stream of r-bit symbols."""
    rng = np.random.default_rng(r)
    for k in (1, 5, 64, 333):
        values = rng.integers(0, 2**r, k, dtype=np.uint64)
        stream = wire._pack_fields(values, r)
        expected = ops.pack_labels(torch.from_numpy(values.astype(np.int64)), 2**r)
        assert torch.equal(torch.from_numpy(stream.copy()), expected)
        assert np.array_equal(wire._unpack_fields(stream, k, r), values.astype(np.int64))


@pytest.mark.parametrize("with_consensus", [False, True])
def test_control_round_trip(with_consensus):
    consensus = None
    if with_consensus:
        consensus = wire.encode_consensus(
            torch.tensor([0, -1, 2]), 3, keep=torch.tensor([True, False, True]), round=6
        )
    for seed in (0, 2**64 - 1):
        data = wire.encode_control(round=7, probe_seed=seed, num_probes=U32, consensus=consensus)
        assert len(data) == wire.control_message_bytes(len(consensus) if consensus else 0)
        m = wire.decode(data, expect_kind=MessageKind.CONTROL)
        assert (m.probe_seed, m.num_probes, m.round, m.sender) == (seed, U32, 7, wire.SERVER)
        if with_consensus:
            assert m.flags == Flag.HAS_CONSENSUS
            assert m.consensus == wire.decode(consensus)
            assert torch.equal(m.consensus.labels, torch.tensor([0, -1, 2]))
        else:
            assert m.consensus is None and m.flags == Flag(0)


def test_decode_accepts_bytearray_and_memoryview_and_copies():
    packed = ops.pack_labels(torch.tensor([1, 0, 1]), 2)
    buf = bytearray(wire.encode_votes(packed, 3, 2, round=0, sender=0))
    m = wire.decode(buf)
    buf[wire.HEADER_BYTES] ^= 0xFF  # decoded tensors must not alias the buffer
    assert torch.equal(m.packed, packed)
    big = bytearray(b"x" * 5) + bytes(wire.encode_dense(torch.ones(3), round=0, sender=0))
    assert torch.equal(wire.decode(memoryview(big)[5:]).vector, torch.ones(3))
    with pytest.raises(TypeError, match="data"):
        wire.decode("TT")


def test_message_equality():
    data = wire.encode_dense(torch.tensor([float("nan"), 1.0]), round=0, sender=0)
    assert wire.decode(data) == wire.decode(data)
    other = wire.encode_dense(torch.tensor([float("nan"), 2.0]), round=0, sender=0)
    assert wire.decode(data) != wire.decode(other)


# --------------------------------------------------------------------------- #
# encoder input validation
# --------------------------------------------------------------------------- #
def test_encode_rejects_bad_arguments():
    packed = ops.pack_labels(torch.tensor([0, 1, 2]), 3)
    ok = dict(round=0, sender=0)
    for name, bad in (("round", -1), ("round", 2**32), ("sender", -1), ("sender", 2**32)):
        args = {**ok, name: bad}
        with pytest.raises(ValueError, match=name):
            wire.encode_votes(packed, 3, 3, **args)
    with pytest.raises(TypeError, match="round"):
        wire.encode_votes(packed, 3, 3, round=1.5, sender=0)
    with pytest.raises(TypeError, match="packed"):
        wire.encode_votes(packed.to(torch.int32), 3, 3, **ok)
    with pytest.raises(ValueError, match="packed"):
        wire.encode_votes(packed, 5, 3, **ok)
    with pytest.raises(ValueError, match="num_classes"):
        wire.encode_votes(packed, 3, 1, **ok)
    with pytest.raises(ValueError, match="padding"):
        wire.encode_votes(torch.tensor([0xF0], dtype=torch.uint8), 2, 3, **ok)
    with pytest.raises(ValueError, match="symbol"):
        wire.encode_votes(torch.tensor([0x03], dtype=torch.uint8), 1, 3, **ok)
    with pytest.raises(ValueError, match="labels"):
        wire.encode_consensus(torch.tensor([0, 3]), 3, round=0)
    with pytest.raises(ValueError, match="labels"):
        wire.encode_consensus(torch.tensor([-2]), 3, round=0)
    with pytest.raises(TypeError, match="labels"):
        wire.encode_consensus(torch.tensor([0.0]), 3, round=0)
    with pytest.raises(ValueError, match="keep"):
        wire.encode_consensus(torch.tensor([0, 1]), 3, keep=torch.tensor([True]), round=0)
    with pytest.raises(TypeError, match="keep"):
        wire.encode_consensus(torch.tensor([0]), 3, keep=torch.tensor([1]), round=0)
    with pytest.raises(ValueError, match="probs"):
        wire.encode_soft_labels(torch.rand(()), **ok)
    with pytest.raises(ValueError, match="classes"):
        wire.encode_soft_labels(torch.rand(3, 1), **ok)
    with pytest.raises(ValueError, match="dtype"):
        wire.encode_soft_labels(torch.rand(3, 2), dtype=torch.bfloat16, **ok)
    with pytest.raises(TypeError, match="vector"):
        wire.encode_dense(torch.arange(3), **ok)
    idx = torch.tensor([1, 3])
    with pytest.raises(ValueError, match="increasing"):
        wire.encode_sparse(torch.tensor([3, 1]), torch.ones(2), 5, **ok)
    with pytest.raises(ValueError, match="increasing"):
        wire.encode_sparse(torch.tensor([1, 1]), torch.ones(2), 5, **ok)
    with pytest.raises(ValueError, match="indices"):
        wire.encode_sparse(idx, torch.ones(2), 3, **ok)
    with pytest.raises(ValueError, match="indices"):
        wire.encode_sparse(torch.tensor([-1, 0]), torch.ones(2), 3, **ok)
    with pytest.raises(TypeError, match="indices"):
        wire.encode_sparse(idx.to(torch.int32), torch.ones(2), 5, **ok)
    with pytest.raises(ValueError, match="values"):
        wire.encode_sparse(idx, torch.ones(3), 5, **ok)
    with pytest.raises(ValueError, match="size"):
        wire.encode_sparse(idx, torch.ones(2), 2**32, **ok)
    with pytest.raises(ValueError, match="probe_seed"):
        wire.encode_control(round=0, probe_seed=2**64, num_probes=1)
    with pytest.raises(ValueError, match="num_probes"):
        wire.encode_control(round=0, probe_seed=0, num_probes=-1)
    votes = wire.encode_votes(packed, 3, 3, **ok)
    with pytest.raises(ValueError, match="consensus"):
        wire.encode_control(round=0, probe_seed=0, num_probes=1, consensus=votes)


# --------------------------------------------------------------------------- #
# targeted corruptions
# --------------------------------------------------------------------------- #
@pytest.fixture
def votes_msg():
    # 3 votes of C = 3 (2 bits each): 6 bits used, 2 padding bits.
    return wire.encode_votes(ops.pack_labels(torch.tensor([2, 0, 1]), 3), 3, 3, round=1, sender=2)


def test_framing_corruptions(votes_msg):
    rejects(b"", "truncated")
    rejects(votes_msg[: wire.OVERHEAD - 1], "truncated")
    rejects(votes_msg[:-1], "truncated")
    rejects(votes_msg + b"\x00", "trailing")
    rejects(reframe(votes_msg, magic=b"TX"), "magic")
    rejects(reframe(votes_msg, version=2), "version")
    rejects(reframe(votes_msg, version=0), "version")
    for kind in (0, 8, 255):
        rejects(reframe(votes_msg, kind=kind), "unknown kind")
    rejects(
        votes_msg, "unexpected kind VOTES, expected CONSENSUS", expect_kind=MessageKind.CONSENSUS
    )
    flipped = bytearray(votes_msg)
    flipped[wire.HEADER_BYTES] ^= 0x01
    rejects(bytes(flipped), "checksum")
    flipped = bytearray(votes_msg)
    flipped[10] ^= 0x80  # round
    rejects(bytes(flipped), "checksum")
    rejects(votes_msg[:-4] + b"\0\0\0\0", "checksum")


def test_header_field_corruptions(votes_msg):
    rejects(reframe(votes_msg, flags=Flag.KEEP_MASK), "unknown flags")
    rejects(reframe(votes_msg, flags=0x8000), "unknown flags")
    rejects(reframe(votes_msg, bits=3), "bits")
    rejects(reframe(votes_msg, aux=1), "num_classes")
    rejects(reframe(votes_msg, aux=0), "num_classes")
    rejects(reframe(votes_msg, aux=5), "bits")  # C=5 needs 3 bits
    rejects(reframe(votes_msg, dtype=2), "dtype")
    rejects(reframe(votes_msg, n=5), "payload size mismatch")
    rejects(reframe(votes_msg, aux=4, flags=Flag.ABSTAIN), "bits")  # 5 symbols need 3 bits
    # a hostile count must be rejected from the header alone, allocating nothing
    rejects(reframe(votes_msg, n=U32), "payload size mismatch")
    soft = wire.encode_soft_labels(torch.rand(2, 2), round=0, sender=0)
    rejects(reframe(soft, n=U32, aux=U32), "payload size mismatch")
    consensus = wire.encode_consensus(torch.tensor([0, 1]), 2, round=0)
    rejects(reframe(consensus, n=U32), "payload size mismatch")
    sparse = sparse_msg([0, 5], 6, force_bitmap=True)
    rejects(reframe(sparse, n=U32, aux=U32), "payload size mismatch")
    rejects(reframe(sparse, n=U32 // 4, aux=U32, flags=0), "payload size mismatch")
    rejects(reframe(soft, bits=1), "must be 0")
    rejects(reframe(soft, dtype=3), "dtype")
    rejects(reframe(soft, dtype=0), "dtype")
    dense = wire.encode_dense(torch.ones(2), round=0, sender=0)
    rejects(reframe(dense, aux=1), "must be 0")
    rejects(reframe(dense, bits=4), "must be 0")
    rejects(reframe(dense, dtype=wire.WireDtype.FLOAT16), "payload size mismatch")
    rejects(reframe(dense, n=U32), "payload size mismatch")


def test_packed_stream_corruptions(votes_msg):
    payload = votes_msg[wire.HEADER_BYTES : -4]
    rejects(reframe(votes_msg, payload=bytes([payload[0] | 0x40])), "padding")
    rejects(reframe(votes_msg, payload=bytes([payload[0] | 0x03])), "symbol out of range")
    consensus = wire.encode_consensus(
        torch.tensor([0, -1, 1]), 2, keep=torch.ones(3, dtype=torch.bool), round=0
    )
    # C = 2 -> 3 symbols in 2 bits: symbol 3 is out of range
    labels_byte, keep_byte = consensus[wire.HEADER_BYTES : -4]
    rejects(
        reframe(consensus, payload=bytes([labels_byte | 0x03, keep_byte])),
        "labels: symbol out of range",
    )
    rejects(
        reframe(consensus, payload=bytes([labels_byte | 0x80, keep_byte])),
        "labels: nonzero padding",
    )
    rejects(
        reframe(consensus, payload=bytes([labels_byte, keep_byte | 0x08])),
        "keep mask: nonzero padding",
    )
    rejects(reframe(consensus, bits=3), "bits")
    rejects(reframe(consensus, flags=0), "payload size mismatch")


def test_sparse_bitmap_corruptions():
    data = sparse_msg([0, 2, 5, 9], 10, force_bitmap=True)  # 2 bitmap bytes
    payload = bytearray(data[wire.HEADER_BYTES : -4])
    rejects(reframe(data, n=3), "payload size mismatch")
    rejects(reframe(data, n=11), "exceed size")
    bad = bytearray(payload)
    bad[1] |= 0x80  # bit 15 > size
    rejects(reframe(data, payload=bytes(bad)), "padding")
    bad = bytearray(payload)
    bad[0] |= 0x02
    rejects(reframe(data, payload=bytes(bad)), "set bits")
    rejects(reframe(data, bits=1), "must be 0")
    rejects(reframe(data, dtype=3), "dtype")


def test_sparse_rice_corruptions():
    # gaps 1, 18, 12 with r = 2: quotients 0, 4, 3 -> unary bits 1|00001|0001
    # (10 bits, 2 bytes: ones at stream bits 0, 5, 9), remainders 1, 2, 0 in
    # 6 bits (1 byte), then three float32 values.
    data = sparse_msg([1, 20, 33], 1000, force_bitmap=False)
    assert header_of(data)["bits"] == 2
    payload = data[wire.HEADER_BYTES : -4]
    unary, rem, values = payload[:2], payload[2:3], payload[3:]
    assert (unary, rem) == (bytes([0x21, 0x02]), bytes([0x09]))

    def with_payload(u, r=rem, **fields):
        return reframe(data, payload=bytes(u) + bytes(r) + values, **fields)

    assert wire.decode(with_payload(unary)) == wire.decode(data)
    rejects(with_payload([0x21, 0x00]), "run off the end")  # last terminator lost
    rejects(with_payload([0x00, 0x00]), "run off the end")
    rejects(with_payload([0x21, 0x82]), "terminating bits")  # nonzero unary padding
    rejects(with_payload([0x21, 0x02, 0x00]), "payload size mismatch")  # trailing byte
    rejects(with_payload([0x21]), "run off the end")
    rejects(with_payload(unary, [0x49]), "Rice remainders: nonzero padding")
    rejects(reframe(data, payload=payload[:1] + values), "run off the end")
    rejects(reframe(data, payload=values[1:]), "payload size mismatch")
    rejects(reframe(data, n=2), "payload size mismatch|terminating bits")
    rejects(reframe(data, bits=wire.RICE_MAX_PARAM + 1), "Rice parameter")
    rejects(reframe(data, bits=3), "payload size mismatch|run off the end|padding")
    # indices beyond size: the last index is 33
    rejects(reframe(data, aux=33), "out of range")
    assert wire.decode(reframe(data, aux=34)).size == 34
    rejects(reframe(data, aux=12), "out of range")  # a quotient alone reaches past size
    # k = 0: empty index section and r = 0
    empty = sparse_msg([], 100)
    assert wire.decode(empty).indices.numel() == 0
    rejects(reframe(empty, bits=3), "must be 0 when k = 0")
    rejects(reframe(empty, payload=b"\x00"), "payload size mismatch")
    # a quotient of 2**15 with r = 31 is rejected before it is shifted
    huge = sparse_msg([2**32 - 2], 2**32 - 1, force_bitmap=False)
    hostile = b"\x00" * 4096 + b"\x01" + b"\x00" * 4 + huge[-8:-4]
    rejects(reframe(huge, bits=31, payload=hostile), "out of range")


def test_control_corruptions():
    consensus = wire.encode_consensus(torch.tensor([1, -1]), 2, round=0)
    data = wire.encode_control(round=1, probe_seed=5, num_probes=2, consensus=consensus)
    plain = wire.encode_control(round=1, probe_seed=5, num_probes=2)
    rejects(reframe(plain, flags=Flag.HAS_CONSENSUS), "HAS_CONSENSUS is set")
    rejects(reframe(data, flags=0), "HAS_CONSENSUS is clear")
    rejects(reframe(plain, payload=plain[wire.HEADER_BYTES : -5]), "control fields")
    rejects(reframe(plain, n=1), "must be 0")
    rejects(reframe(plain, aux=1), "must be 0")
    rejects(reframe(plain, dtype=1), "dtype")
    fields = plain[wire.HEADER_BYTES : -4]
    rejects(
        reframe(data, payload=fields + consensus[:-1] + b"\x00"), "embedded consensus: checksum"
    )
    rejects(reframe(data, payload=fields + consensus + b"\x00"), "embedded consensus: .*trailing")
    votes = wire.encode_votes(torch.tensor([1], dtype=torch.uint8), 1, 2, round=0, sender=0)
    rejects(reframe(data, payload=fields + votes), "embedded consensus: unexpected kind")
    nested = wire.encode_control(round=0, probe_seed=0, num_probes=0)
    rejects(reframe(data, payload=fields + nested), "embedded consensus")


# --------------------------------------------------------------------------- #
# fuzzing
# --------------------------------------------------------------------------- #
@st.composite
def valid_messages(draw):
    """(bytes, check) for a random valid message; check(decoded) asserts it."""
    kind = draw(st.sampled_from(list(MessageKind)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    common = dict(
        round=draw(st.sampled_from([0, 1, U32])), sender=draw(st.sampled_from([0, 7, wire.SERVER]))
    )
    n = draw(st.sampled_from([0, 1, 5, 8, 9, 33]))
    num_classes = draw(st.sampled_from(CLASS_COUNTS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))

    # a leading shape of n positions: plain (n,), or one sent in a SHAPE section
    lead = draw(st.sampled_from([(n,), (1, n), (n, 1, 1)] + ([()] if n == 1 else [])))

    def consensus():
        labels = (random_symbols(rng, n, num_classes + 1) - 1).reshape(lead)
        keep = torch.from_numpy(np.asarray(rng.random(lead) < 0.5)) if draw(st.booleans()) else None
        data = wire.encode_consensus(labels, num_classes, keep=keep, **common)

        def check(m):
            assert torch.equal(m.labels, labels) and m.num_classes == num_classes
            assert m.shape == lead
            assert (m.keep is None) == (keep is None)
            assert keep is None or torch.equal(m.keep, keep)

        return data, check

    if kind == MessageKind.VOTES:
        abstain = draw(st.booleans())
        symbols = num_classes + 1 if abstain else num_classes
        packed = ops.pack_labels(random_symbols(rng, n, symbols), symbols)
        shape = draw(st.sampled_from([None, (n,), (1, n), (n, 1, 1)] + ([()] if n == 1 else [])))
        data = wire.encode_votes(packed, n, num_classes, abstain=abstain, shape=shape, **common)

        def check(m):
            assert torch.equal(m.packed, packed) and (m.n, m.num_classes, m.abstain) == (
                n,
                num_classes,
                abstain,
            )
            assert m.shape == ((n,) if shape is None else shape)
    elif kind == MessageKind.CONSENSUS:
        data, check = consensus()
    elif kind == MessageKind.SOFT_LABELS:
        probs = torch.from_numpy(rng.random((*lead, num_classes % 7 + 2))).to(dtype)
        data = wire.encode_soft_labels(probs, dtype=dtype, **common)

        def check(m):
            assert bitwise_equal(m.probs, probs) and m.shape == lead
    elif kind == MessageKind.SOFT_TOPK:
        k = draw(st.integers(1, min(num_classes, 5)))
        indices, values = random_topk(rng, lead, k, num_classes, dtype)
        data = wire.encode_soft_topk(indices, values, num_classes, dtype=dtype, **common)

        def check(m):
            assert torch.equal(m.indices, indices) and bitwise_equal(m.values, values)
            assert m.shape == (*lead, k) and m.num_classes == num_classes
    elif kind == MessageKind.DENSE_PARAMS:
        vector = torch.from_numpy(rng.standard_normal(n)).to(dtype)
        data = wire.encode_dense(vector, dtype=dtype, **common)

        def check(m):
            assert bitwise_equal(m.vector, vector)
    elif kind == MessageKind.SPARSE_PARAMS:
        size = draw(st.sampled_from([0, 1, 9, 64, 1000, 100_000]))
        k = draw(st.integers(0, min(size, 40)))
        indices = random_indices(rng, size, k)
        values = torch.from_numpy(rng.standard_normal(k)).to(dtype)
        data = wire.encode_sparse(indices, values, size, dtype=dtype, **common)

        def check(m):
            assert torch.equal(m.indices, indices) and bitwise_equal(m.values, values)
            assert m.size == size
    else:
        embedded, check_embedded = consensus() if draw(st.booleans()) else (None, None)
        seed = draw(st.integers(0, 2**64 - 1))
        data = wire.encode_control(probe_seed=seed, num_probes=n, consensus=embedded, **common)

        def check(m):
            assert (m.probe_seed, m.num_probes) == (seed, n)
            assert (m.consensus is None) == (embedded is None)
            if embedded is not None:
                check_embedded(m.consensus)

    def full_check(m):
        assert (m.kind, m.version) == (kind, 1)
        assert (m.round, m.sender) == (common["round"], common["sender"])
        check(m)

    return data, full_check


def decode_or_reject(data: bytes) -> None:
    """Decoding corrupt bytes either fails with WireFormatError or yields a
    message that is exactly what the encoder makes of its contents."""
    try:
        m = wire.decode(data)
    except WireFormatError:
        return
    if m.kind == MessageKind.SPARSE_PARAMS:
        # The index coding is the encoder's choice, so compare contents only.
        assert m.indices.numel() == m.values.numel() == m.n <= m.size
        idx = m.indices
        assert idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < m.size)
        assert bool((idx[1:] > idx[:-1]).all())
        again = wire.decode(
            wire.encode_sparse(
                idx, m.values, m.size, dtype=m.values.dtype, round=m.round, sender=m.sender
            )
        )
        assert torch.equal(again.indices, idx) and bitwise_equal(again.values, m.values)
    else:
        assert reencode(m) == bytes(data)


@FUZZ
@given(valid_messages())
def test_fuzz_unmodified_messages_decode_exactly(msg):
    data, check = msg
    check(wire.decode(data))
    check(wire.decode(bytearray(data)))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    decode_or_reject(data)
    # the same bytes behind a valid magic and version, with a matching CRC
    forged = b"TT\x01" + data
    if len(forged) >= wire.OVERHEAD:
        decode_or_reject(fix_crc(forged))


@FUZZ
@given(valid_messages(), st.data())
def test_fuzz_mutated_messages(msg, draw):
    data = bytearray(msg[0])
    how = draw.draw(st.sampled_from(["bytes", "truncate", "extend", "header"]))
    if how == "bytes":
        for _ in range(draw.draw(st.integers(1, 4))):
            pos = draw.draw(st.integers(0, len(data) - 1))
            data[pos] = draw.draw(st.integers(0, 255))
    elif how == "truncate":
        data = data[: draw.draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        data += draw.draw(st.binary(min_size=1, max_size=16))
    else:
        field = draw.draw(st.sampled_from(FIELDS[2:]))
        width = {"flags": 16, "bits": 8, "dtype": 8, "kind": 8}.get(field, 32)
        value = draw.draw(st.one_of(st.integers(0, 2**width - 1), st.integers(0, 40)))
        if field == "payload_len":
            value = min(value, len(data))
        payload = None
        if draw.draw(st.booleans()):  # also resize the payload to match
            old = data[wire.HEADER_BYTES : -4]
            payload = bytes(old[: draw.draw(st.integers(0, len(old)))]) + draw.draw(
                st.binary(max_size=8)
            )
        data = bytearray(reframe(bytes(data), payload=payload, **{field: value}))
    decode_or_reject(bytes(data))
    if len(data) >= wire.OVERHEAD:
        decode_or_reject(fix_crc(bytes(data)))
