"""The SPARSE_PARAMS index section, both directions: Rice-coded gaps or a
bitmap, whichever is smaller (docs/wire.md, "Sparse index coding").
"""

from __future__ import annotations

import numpy as np

from .frame import _Header, _bytes, _fail


# Gaps are < 2**32, and a Rice parameter of 32 would always cost more than 31,
# so the encoder never chooses more than 31; the decoder rejects larger ones.
RICE_MAX_PARAM = 31


# --------------------------------------------------------------------------- #
# Rice-coded gaps: the unary section, then the remainder section
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


def _rice_decode(
    h: _Header, payload: memoryview, k: int, size: int, values_bytes: int
) -> np.ndarray:
    r = h.bits
    if r > RICE_MAX_PARAM:
        raise _fail(h, f"bits = {r} is not a valid Rice parameter (0..{RICE_MAX_PARAM})")
    if k == 0 and r:
        raise _fail(h, f"bits (Rice parameter) must be 0 when k = 0, got {r}")
    rem_bytes = (k * r + 7) // 8
    if h.payload_len < rem_bytes + values_bytes:
        raise _fail(
            h,
            f"payload size mismatch: {k} Rice remainders of {r} bits and {k} "
            f"values need at least {rem_bytes + values_bytes} bytes, header "
            f"says payload_len = {h.payload_len}",
        )
    unary_bytes = h.payload_len - rem_bytes - values_bytes
    unary = _bytes(payload, 0, unary_bytes)
    ones = _popcount(unary)
    if ones < k:
        raise _fail(
            h,
            f"Rice unary codes run off the end of the index section: "
            f"{ones} terminating bits for k = {k} indices",
        )
    if ones > k:
        raise _fail(
            h,
            f"Rice unary section holds {ones} terminating bits for k = {k} indices (nonzero "
            "padding)",
        )
    ends = np.flatnonzero(np.unpackbits(unary, bitorder="little")).astype(np.int64)
    used = int(ends[-1]) + 1 if k else 0
    if (used + 7) // 8 != unary_bytes:
        raise _fail(
            h,
            f"Rice unary section is {unary_bytes} bytes, but its codes end "
            f"after {used} bits (payload size mismatch)",
        )
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


# --------------------------------------------------------------------------- #
# r-bit fields in the §2 stream layout (the Rice remainders)
# --------------------------------------------------------------------------- #
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
    words.view(np.uint8)[: stream.size] = stream
    words = words.astype(np.uint64, copy=False)
    offset = np.arange(k, dtype=np.uint64) * np.uint64(r)
    word = (offset >> np.uint64(6)).astype(np.int64)
    shift = offset & np.uint64(63)
    low = words[word] >> shift
    # A shift by 64 is undefined, so the s == 0 case masks the high part off.
    high = np.where(
        shift > 0, words[word + 1] << ((np.uint64(64) - shift) & np.uint64(63)), np.uint64(0)
    )
    return ((low | high) & np.uint64((1 << r) - 1)).astype(np.int64)


# --------------------------------------------------------------------------- #
# the bitmap
# --------------------------------------------------------------------------- #
def _bitmap(idx: np.ndarray, size: int) -> np.ndarray:
    bitmap = np.zeros((size + 7) // 8, dtype=np.uint8)
    np.bitwise_or.at(bitmap, idx >> 3, (1 << (idx & 7)).astype(np.uint8))
    return bitmap


def _bitmap_decode(h: _Header, bitmap: np.ndarray, k: int, size: int) -> np.ndarray:
    used = size % 8
    if used and int(bitmap[-1]) >> used:
        raise _fail(h, "index bitmap: nonzero padding bits in the last byte")
    ones = _popcount(bitmap)
    if ones != k:
        raise _fail(h, f"index bitmap has {ones} set bits, but n says k = {k}")
    return np.flatnonzero(np.unpackbits(bitmap, bitorder="little")).astype(np.int64)


def _popcount(stream: np.ndarray) -> int:
    return int(np.bitwise_count(stream).sum(dtype=np.int64))
