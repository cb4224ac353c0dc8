"""pack_argmax, pack_labels and unpack_labels (docs/design.md §2-§3).

Every case runs the dispatched op (native where the extension serves) and
compares it with the reference called directly and with independent oracles:
torch.argmax, torch.softmax in float64 and the bit-by-bit packer of
tests/conftest.py. Integer outputs must be identical; probabilities agree within
rtol=1e-4, atol=1e-6 with NaN in the same places.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytrain.ops as ops

RTOL, ATOL = 1e-4, 1e-6  # for probabilities (docs/ops.md, Tolerances)
assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)
_prob_close = functools.partial(torch.testing.assert_close, rtol=RTOL, atol=ATOL, equal_nan=True)


def assert_prob_close(actual, expected):
    """Probabilities (float32 from the ops) against each other or against a
    float64 oracle, compared in float64."""
    _prob_close(actual.double(), expected.double())


CLASS_COUNTS = (2, 3, 10, 255, 256, 257, 1000, 50257, 65536, 65537)
ROW_COUNTS = (0, 1, 7, 8, 9, 3001)
# Keeps every case to a few MB of logits: many rows only with modest C.
MAX_ELEMENTS = 4_000_000
SHAPES = [(n, c) for c in CLASS_COUNTS for n in ROW_COUNTS if n * c <= MAX_ELEMENTS]
SHAPE_IDS = [f"N{n}-C{c}" for n, c in SHAPES]
# A subset for the costlier variants (layouts, abstention).
FEW_SHAPES = [(1, 2), (9, 3), (3001, 10), (8, 256), (7, 257), (300, 1000), (9, 50257), (2, 65537)]
FEW_SHAPE_IDS = [f"N{n}-C{c}" for n, c in FEW_SHAPES]


def random_logits(n, c, dtype, gen, kind="normal"):
    if kind == "normal":
        x = torch.randn(n, c, generator=gen) * 4
    else:  # "few_values": small integers, so the maximum is usually shared
        x = torch.randint(-2, 3, (n, c), generator=gen).float()
    return x.to(dtype)


def softmax_top1(logits):
    """The top-1 probability from torch.softmax in float64 (an oracle for prob).

    Never in float32: torch's float32 softmax accumulates in vector lanes
    whose number depends on the CPU, and at C = 1e6 it is off from the exact
    value by 1e-4 relative (AVX2) or 1e-5 (AVX-512), as large as the
    tolerance. In float64 its error is far below it on any machine."""
    x = logits.double()
    return torch.softmax(x, dim=-1).gather(1, x.argmax(-1, keepdim=True)).squeeze(1)


# --------------------------------------------------------------------------- #
# pack_argmax: random logits over the whole shape grid
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["normal", "few_values"])
@pytest.mark.parametrize("n,c", SHAPES, ids=SHAPE_IDS)
def test_pack_argmax_matches_argmax_and_reference(
    n, c, kind, float_dtype, device, gen, ref, bitstream
):
    logits = random_logits(n, c, float_dtype, gen, kind).to(device)
    packed = ops.pack_argmax(logits)
    assert packed.dtype == torch.uint8 and packed.device == logits.device
    assert_equal(packed.cpu(), bitstream.pack(logits.argmax(-1).tolist(), c))
    assert_equal(packed, ref.pack_argmax(logits)[0])


@pytest.mark.parametrize("n,c", SHAPES, ids=SHAPE_IDS)
def test_pack_argmax_return_prob(n, c, float_dtype, device, gen, ref, bitstream):
    logits = random_logits(n, c, float_dtype, gen).to(device)
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert prob.dtype == torch.float32 and prob.shape == (n,) and prob.device == logits.device
    assert_equal(packed.cpu(), bitstream.pack(logits.argmax(-1).tolist(), c))
    assert_prob_close(prob, ref.pack_argmax(logits, True)[1])
    assert_prob_close(prob, softmax_top1(logits))


# --------------------------------------------------------------------------- #
# pack_argmax: hostile rows (ties, NaN, inf, signed zeros, subnormals)
# --------------------------------------------------------------------------- #
def _special_bits(dtype):
    """(a NaN with a payload, a negative NaN with a payload) as 0-d tensors."""
    int_view, positive, negative = {
        torch.float32: (torch.int32, 0x7F800001, 0xFF800001 - 2**32),
        torch.float16: (torch.int16, 0x7C01, 0xFC01 - 2**16),
        torch.bfloat16: (torch.int16, 0x7F81, 0xFF81 - 2**16),
    }[dtype]
    bits = torch.tensor([positive, negative], dtype=int_view)
    return bits.view(dtype)[0], bits.view(dtype)[1]


def hostile_rows(c, dtype, gen):
    """Rows of C logits in `dtype`, each with the index torch.argmax must give.

    Features sit at the first and last positions and around likely vector
    boundaries, so that a kernel splitting a row into head, body and tail sees
    them in every part."""
    finfo = torch.finfo(dtype)
    nan, inf = float("nan"), float("inf")
    payload_nan, negative_nan = _special_bits(dtype)
    sub = finfo.tiny / 2  # a subnormal in every float dtype here
    # Fewer boundaries for very long rows, which cost the most to check.
    boundaries = (1, 31, 32, 63, 64) if c > 1000 else (1, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128)
    spots = sorted({p for p in (0, *boundaries, c // 2, c - 2, c - 1) if 0 <= p < c})
    pairs = sorted({(spots[0], spots[-1])} | set(zip(spots, spots[1:])))

    def mixed():  # finite values of both signs, all below the features
        return (torch.rand(c, generator=gen) * 16 - 8).to(dtype)

    def negative():  # finite values below -1
        return (torch.rand(c, generator=gen) * -7 - 1).to(dtype)

    def neg_inf():
        return torch.full((c,), -inf, dtype=dtype)

    def filled(value):
        return lambda: torch.full((c,), value, dtype=dtype)

    # (background, value at i, value at j, winner) for positions i < j.
    pair_cases = [
        (mixed, 10.0, 10.0, "i"),  # tied maximum: the first wins
        (mixed, nan, nan, "i"),  # the first NaN wins
        (mixed, inf, nan, "j"),  # NaN beats +inf ...
        (mixed, nan, inf, "i"),
        (mixed, 10.0, nan, "j"),  # ... and any finite maximum
        (mixed, inf, inf, "i"),  # tied +inf
        (mixed, inf, 10.0, "i"),  # a lone +inf (probability NaN)
        (mixed, inf, payload_nan, "j"),  # a NaN with a payload is a NaN
        (mixed, negative_nan, nan, "i"),  # so is a NaN with the sign bit set
        (negative, -0.0, 0.0, "i"),  # -0.0 == +0.0: the first wins
        (negative, 0.0, -0.0, "i"),
        (negative, 0.0, sub, "j"),  # a subnormal is > 0 (no flush to zero)
        (negative, -sub, -0.0, "j"),
        (mixed, finfo.max, finfo.max, "i"),
        (neg_inf, -finfo.max, -inf, "i"),  # the only finite value
        (neg_inf, -inf, nan, "j"),
    ]
    rows, expected = [], []
    for i, j in pairs:
        for make, at_i, at_j, winner in pair_cases:
            row = make()
            row[i] = at_i
            row[j] = at_j
            rows.append(row)
            expected.append(i if winner == "i" else j)
    for j in spots:
        for make, value in ((mixed, 10.0), (neg_inf, -3.0), (filled(1.5), 2.0)):
            row = make()
            row[j] = value
            rows.append(row)
            expected.append(j)
    for value in (-inf, inf, nan, 1.5, -0.0):  # constant rows: index 0
        rows.append(filled(value)())
        expected.append(0)
    row = filled(-0.0)()
    row[c - 1] = 0.0  # equal to every -0.0 before it
    rows.append(row)
    expected.append(0)
    return torch.stack(rows), expected


@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_pack_argmax_hostile_rows(c, float_dtype, device, gen, ref, bitstream):
    logits, expected = hostile_rows(c, float_dtype, gen)
    # The hand-derived indices are torch.argmax's: the contract is torch.argmax.
    assert logits.argmax(-1).tolist() == expected
    logits = logits.to(device)
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert_equal(packed.cpu(), bitstream.pack(expected, c))
    assert_equal(packed, ref.pack_argmax(logits)[0])
    assert_prob_close(prob, ref.pack_argmax(logits, True)[1])
    assert_prob_close(prob, softmax_top1(logits))
    # Abstention without return_prob finds the argmax (and the runner-up
    # logit) on a path of its own: threshold 0 makes every row with a
    # probability vote, so the stream is the argmax with NaN rows abstaining.
    voted = ops.pack_argmax(logits, abstain_below=0.0)
    abstaining = torch.isnan(softmax_top1(logits)).tolist()
    assert_equal(
        voted.cpu(), bitstream.pack([c if a else e for a, e in zip(abstaining, expected)], c + 1)
    )
    assert_equal(voted, ref.pack_argmax(logits, False, 0.0)[0])
    # At a threshold that splits these rows, deciding from the gap to the
    # runner-up (ties, NaN, inf, signed zeros included) is the full decision.
    for threshold in (0.5, 0.99):
        assert_equal(
            ops.pack_argmax(logits, abstain_below=threshold),
            ops.pack_argmax(logits, return_prob=True, abstain_below=threshold)[0],
        )


def _layout(x, layout):
    """The same values as `x` in a non-standard memory layout. Memory around
    and between the elements holds NaN, which would win the argmax if a kernel
    read it."""
    n, c = x.shape
    nan = float("nan")
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "column_slice":
        big = x.new_full((n, c + 2), nan)
        big[:, 1:-1] = x
        return big[:, 1:-1]
    if layout == "column_stride":
        big = x.new_full((n, 2 * c), nan)
        big[:, ::2] = x
        return big[:, ::2]
    if layout == "row_stride":
        big = x.new_full((2 * n, c), nan)
        big[::2] = x
        return big[::2]
    if layout == "misaligned":  # contiguous, data pointer one element off
        flat = x.new_full((n * c + 1,), nan)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(n, c)
    if layout == "broadcast_row":  # row stride 0
        return x[:1].expand(n, c)
    raise AssertionError(layout)


LAYOUTS = [
    "transposed",
    "column_slice",
    "column_stride",
    "row_stride",
    "misaligned",
    "broadcast_row",
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,c", FEW_SHAPES, ids=FEW_SHAPE_IDS)
def test_pack_argmax_memory_layouts(n, c, layout, float_dtype, device, gen, ref, bitstream):
    dense = random_logits(n, c, float_dtype, gen, "few_values").to(device)
    logits = _layout(dense, layout)
    assert torch.equal(logits, _layout(dense, layout))  # sanity: no NaN leaked in
    before = logits.clone()
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert_equal(logits, before)  # the input is not written
    assert_equal(packed.cpu(), bitstream.pack(logits.argmax(-1).tolist(), c))
    assert_equal(packed, ref.pack_argmax(logits)[0])
    assert_prob_close(prob, softmax_top1(logits))


@pytest.mark.parametrize("n,c", [(100_003, 2), (40_001, 3), (20_003, 10)])
def test_pack_argmax_many_rows(n, c, float_dtype, device, gen, ref, bitstream):
    # Enough rows to be split over threads and blocks; N odd to leave a tail.
    logits = random_logits(n, c, float_dtype, gen, "few_values").to(device)
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert_equal(packed.cpu(), bitstream.pack(logits.argmax(-1).tolist(), c))
    assert_equal(packed, ref.pack_argmax(logits)[0])
    assert_prob_close(prob, softmax_top1(logits))


def test_pack_argmax_very_long_rows(float_dtype, device, gen, ref, bitstream):
    # C far above the grid, so that a kernel may split one row over several
    # blocks or threads and combine the parts: ties and NaN across the parts
    # must still resolve to the first index.
    c = 1_000_003
    logits = random_logits(4, c, float_dtype, gen)
    logits[0, [5, c - 1]] = 50.0  # tie between the first and the last part
    logits[1, [c // 2, c - 2]] = float("nan")
    logits[2, c - 1] = float("inf")  # the maximum in the very last element
    logits = logits.to(device)
    expected = [5, c // 2, c - 1, int(logits[3].float().argmax())]
    assert logits.argmax(-1).tolist() == expected
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert_equal(packed.cpu(), bitstream.pack(expected, c))
    assert_equal(packed, ref.pack_argmax(logits)[0])
    assert_prob_close(prob, softmax_top1(logits))


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 9),
    c=st.one_of(st.integers(2, 40), st.sampled_from([63, 64, 65, 129])),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_pack_argmax_property(data, n, c, dtype, bitstream):
    # Any values, NaN, infinities, signed zeros and subnormals included, drawn
    # from a handful so that ties are frequent.
    special = st.sampled_from(
        [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40]
    )
    value = special | st.floats(-1e4, 1e4, width=16)
    rows = data.draw(st.lists(st.lists(value, min_size=c, max_size=c), min_size=n, max_size=n))
    logits = torch.tensor(rows, dtype=torch.float32).reshape(n, c).to(dtype)
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert_equal(packed, bitstream.pack(logits.argmax(-1).tolist(), c))
    assert_prob_close(prob, softmax_top1(logits))


@pytest.mark.parametrize(
    "n,c,dtype",
    [
        pytest.param(100_003, 3, torch.bfloat16, id="N100003-C3-bfloat16"),
        pytest.param(30_001, 100, torch.float16, id="N30001-C100-float16"),
        pytest.param(301, 50257, torch.float32, id="N301-C50257-float32"),
    ],
)
def test_pack_argmax_same_for_any_thread_count(n, c, dtype, gen, ref, across_threads):
    logits = random_logits(n, c, dtype, gen, "few_values")
    runs = across_threads(lambda: ops.pack_argmax(logits, return_prob=True, abstain_below=0.4))
    for packed, prob in runs:
        assert_equal(packed, runs[0][0])
        assert_equal(prob, runs[0][1])
    assert_prob_close(runs[0][1], ref.pack_argmax(logits, True)[1])


# --------------------------------------------------------------------------- #
# pack_argmax with abstention
# --------------------------------------------------------------------------- #
def abstention_logits(n, c, dtype, gen):
    """Logits and, per row, what it must do at every threshold: "vote",
    "abstain", or None where that depends on the threshold.

    n random rows whose top-1 probabilities spread over (1/C, 1]; three rows
    whose probability is exactly 1 (every other logit -inf), which always
    vote; three whose probability is NaN (a NaN, a +inf, all -inf), which
    always abstain."""
    scale = torch.rand(n, 1, generator=gen) * 30
    spread = torch.randn(n, c, generator=gen) * scale
    sure = torch.full((3, c), float("-inf"))
    for row, (col, value) in enumerate([(0, 5.0), (c // 2, -7.0), (c - 1, 0.0)]):
        sure[row, col] = value
    garbage = torch.randn(3, c, generator=gen)
    garbage[0, c // 2] = float("nan")
    garbage[1, c - 1] = float("inf")
    garbage[2] = float("-inf")
    logits = torch.cat([spread, sure, garbage]).to(dtype)
    return logits, [None] * n + ["vote"] * 3 + ["abstain"] * 3


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n,c", FEW_SHAPES, ids=FEW_SHAPE_IDS)
def test_pack_argmax_abstain(n, c, threshold, float_dtype, device, gen, ref, bitstream):
    logits, must = abstention_logits(n, c, float_dtype, gen)
    logits = logits.to(device)
    rows = logits.shape[0]
    packed, prob = ops.pack_argmax(logits, return_prob=True, abstain_below=threshold)
    assert packed.numel() == ref.packed_size(rows, c + 1)
    symbols = bitstream.unpack(packed, rows, c + 1)
    labels = logits.argmax(-1).tolist()
    expected_prob = softmax_top1(logits)
    assert_prob_close(prob, expected_prob)
    for row, (symbol, label, p) in enumerate(zip(symbols, labels, expected_prob.tolist())):
        if must[row] == "abstain":
            assert symbol == c, f"row {row} (NaN probability) must abstain"
        elif must[row] == "vote":
            assert symbol == label, f"row {row} (probability exactly 1) must vote"
        elif abs(p - threshold) <= ATOL + RTOL * threshold:  # within the tolerance
            assert symbol in (label, c), (row, symbol)
        else:
            assert symbol == (label if p >= threshold else c), (row, p, threshold)
    # The decision is the kernel's own probability compared with the threshold.
    own = [label if p >= threshold else c for label, p in zip(labels, prob.tolist())]
    assert symbols == own
    # The stream does not depend on whether the probabilities are returned.
    assert_equal(ops.pack_argmax(logits, abstain_below=threshold), packed)
    ref_packed = ref.pack_argmax(logits, False, threshold)[0]
    ref_symbols = bitstream.unpack(ref_packed, rows, c + 1)
    assert all(
        a == b
        for a, b, p in zip(symbols, ref_symbols, expected_prob.tolist())
        if not abs(p - threshold) <= ATOL + RTOL * threshold
    )


def gap_rows(c, threshold, dtype):
    """Rows whose top-1 probability sits at, or just beside, the point where
    the bounds from the gap d = max - runner-up decide the abstention.

    With every other logit -inf, p = 1 / (1 + e^-d) exactly (the upper
    bound); with every other logit equal to the runner-up, p = 1 / (1 +
    (C-1) e^-d) (the lower bound). For each, d is swept across the gap where
    p = threshold, from 1e-2 to 1e-7 relative on both sides. The maximum and
    the runner-up sit in different vector lanes and chains."""
    t = threshold
    odds = 1 / t - 1  # p = t  <=>  (sum of the other terms) = odds
    rows = []
    for others in ("-inf", "runner-up"):
        count = 1 if others == "-inf" else c - 1
        if odds == 0:
            continue
        d0 = math.log(count / odds)
        for rel in (0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
            for d in {d0 * (1 + rel), d0 * (1 - rel), d0 + rel, d0 - rel}:
                row = torch.full((c,), -float("inf") if others == "-inf" else -d)
                row[c // 3] = 0.0
                row[c - 1 if others == "-inf" else 0] = -d
                rows.append(row)
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.95, 0.999])
@pytest.mark.parametrize("c", [257, 1000, 50257])
def test_pack_argmax_abstain_at_the_decision_bounds(
    c, threshold, float_dtype, device, ref, bitstream
):
    """Abstention without return_prob decides most rows from the gap between
    the two largest logits; at and around the bounds' edges it must make the
    decision of the full probability."""
    logits = gap_rows(c, threshold, float_dtype).to(device)
    rows = logits.shape[0]
    decided = ops.pack_argmax(logits, abstain_below=threshold)
    full, prob = ops.pack_argmax(logits, return_prob=True, abstain_below=threshold)
    assert_equal(decided, full)
    # In double: float32 softmax over 50,256 equal terms is itself ~1e-4 off.
    exact = torch.softmax(logits.double(), dim=-1).amax(-1)
    assert_prob_close(prob.double(), exact)
    symbols = bitstream.unpack(decided, rows, c + 1)
    labels = logits.argmax(-1).tolist()
    ref_symbols = bitstream.unpack(ref.pack_argmax(logits, False, threshold)[0], rows, c + 1)
    for row, (symbol, label, ref_symbol, p) in enumerate(
        zip(symbols, labels, ref_symbols, exact.tolist())
    ):
        assert symbol in (label, c), row
        if abs(p - threshold) > 1e-3 * threshold:  # beyond both computations' errors
            assert symbol == ref_symbol == (label if p >= threshold else c), (row, p)


def shared_lane_rows(c):
    """Rows whose two largest logits lie 128 positions apart (one vector lane
    of one block chain of the float32 kernel, whose runner-up is then only a
    lower bound) or 64 apart, or in one block, at the start, the middle and
    the end of the row: an exact tie (p = 0.5), a gap whose lower bound alone
    would vote, and a clear vote. Every other logit is far below."""
    rows = []
    for apart in (128, 64, 16, 1):
        for first in (0, (c // 2) - (c // 2) % 64 + 5, c - 1 - apart):
            for gap in (0.0, 1.0, 3.0, 12.0):
                if first < 0 or first + apart >= c:
                    continue
                row = torch.full((c,), -40.0)
                row[first] = 10.0
                row[first + apart] = 10.0 - gap
                rows.append(row)
                flipped = row.clone()  # the larger one second
                flipped[first], flipped[first + apart] = 10.0 - gap, 10.0
                rows.append(flipped)
    return torch.stack(rows)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.95])
@pytest.mark.parametrize("c", [200, 1000, 4099])
def test_pack_argmax_abstain_with_the_top_two_in_one_lane(c, threshold, device, ref):
    """The float32 kernel bounds the runner-up from below by the second
    largest of its lane maxima; a row it would vote on from that bound alone
    must still abstain when the true runner-up is close."""
    logits = shared_lane_rows(c).to(device)
    got = ops.pack_argmax(logits, abstain_below=threshold)
    assert_equal(got.cpu(), ref.pack_argmax(logits.cpu(), False, threshold)[0])
    assert_equal(ops.pack_argmax(logits).cpu(), ref.pack_argmax(logits.cpu(), False, None)[0])


@pytest.mark.parametrize("c", [2, 10, 255, 65536])
def test_pack_argmax_all_abstain(c, float_dtype, device, bitstream):
    # Equal logits: probability 1/C < 1, so threshold 1 makes every row abstain.
    logits = torch.zeros(9, c, dtype=float_dtype, device=device)
    packed = ops.pack_argmax(logits, abstain_below=1.0)
    assert_equal(packed.cpu(), bitstream.pack([c] * 9, c + 1))


@pytest.mark.parametrize("c", [2, 4, 256, 65536])
def test_pack_argmax_threshold_compared_in_float32(c, float_dtype, device, bitstream):
    # Equal logits: probability exactly 1/C (a power of two) on any backend.
    # A row votes when prob >= t, with t rounded to float32 as torch compares
    # a float32 tensor with a Python float: t = 1/C and the next double above
    # it vote, the next float32 above it abstains.
    logits = torch.zeros(5, c, dtype=float_dtype, device=device)
    t = 1 / c
    above_in_float32 = float(torch.tensor(t).nextafter(torch.tensor(1.0)))
    for threshold, symbol in ((t, 0), (math.nextafter(t, 1), 0), (above_in_float32, c)):
        packed = ops.pack_argmax(logits, abstain_below=threshold)
        assert_equal(packed.cpu(), bitstream.pack([symbol] * 5, c + 1), msg=str(threshold))


def test_pack_argmax_no_rows(float_dtype, device):
    logits = torch.empty(0, 257, dtype=float_dtype, device=device)
    packed, prob = ops.pack_argmax(logits, return_prob=True, abstain_below=0.5)
    assert packed.shape == (0,) and packed.dtype == torch.uint8
    assert prob.shape == (0,) and prob.dtype == torch.float32


# --------------------------------------------------------------------------- #
# pack_labels / unpack_labels
# --------------------------------------------------------------------------- #
SYMBOL_COUNTS = (2, 3, 4, 5, 10, 255, 256, 257, 1000, 50257, 65536, 65537, 2**31, 2**31 + 1, 2**32)
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def random_labels(n, num_symbols, dtype, gen):
    """Labels in 0..num_symbols-1 that `dtype` can hold, with the extremes 0
    and the largest such value (often the all-ones symbol) present."""
    top = min(num_symbols - 1, torch.iinfo(dtype).max)
    labels = torch.randint(0, top + 1, (n,), generator=gen, dtype=torch.int64)
    if n >= 2:
        labels[0], labels[-1] = top, 0
    return labels.to(dtype)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("num_symbols", SYMBOL_COUNTS)
def test_pack_labels_matches_oracle(num_symbols, n, dtype, device, gen, ref, bitstream):
    labels = random_labels(n, num_symbols, dtype, gen).to(device)
    packed = ops.pack_labels(labels, num_symbols)
    assert packed.dtype == torch.uint8 and packed.device == labels.device
    assert_equal(packed.cpu(), bitstream.pack(labels.tolist(), num_symbols))
    assert_equal(packed, ref.pack_labels(labels, num_symbols))


@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("num_symbols", SYMBOL_COUNTS)
def test_unpack_labels_matches_oracle(num_symbols, n, device, gen, ref, bitstream):
    labels = random_labels(n, num_symbols, torch.int64, gen).tolist()
    packed = bitstream.pack(labels, num_symbols).to(device)
    unpacked = ops.unpack_labels(packed, n, num_symbols)
    assert unpacked.dtype == torch.int64 and unpacked.device == packed.device
    assert unpacked.tolist() == labels
    assert_equal(unpacked, ref.unpack_labels(packed, n, num_symbols))


@pytest.mark.parametrize("num_symbols", [3, 10, 257, 65537])
def test_unpack_labels_ignores_padding_bits(num_symbols, device, gen, ref, bitstream):
    # n*b not a multiple of 8: the last byte has unused high bits. Producers
    # leave them zero; a reader ignores them (as the reference does).
    n = 7
    labels = random_labels(n, num_symbols, torch.int64, gen).tolist()
    packed = bitstream.pack(labels, num_symbols)
    used = (n * bitstream.width(num_symbols)) % 8
    assert used, "the case must leave unused bits"
    packed[-1] |= (0xFF << used) & 0xFF
    packed = packed.to(device)
    assert ops.unpack_labels(packed, n, num_symbols).tolist() == labels
    assert_equal(
        ops.unpack_labels(packed, n, num_symbols), ref.unpack_labels(packed, n, num_symbols)
    )


@pytest.mark.parametrize("num_symbols", [2, 10, 257, 65537, 2**32])
def test_pack_labels_non_contiguous(num_symbols, device, gen, ref, bitstream):
    base = random_labels(3001 * 3, num_symbols, torch.int64, gen).to(device)
    for labels in (base[::3], base[5 : 5 + 3001], base[:1].expand(3001)):
        packed = ops.pack_labels(labels, num_symbols)
        assert_equal(packed.cpu(), bitstream.pack(labels.tolist(), num_symbols))
        assert_equal(packed, ref.pack_labels(labels, num_symbols))


@pytest.mark.parametrize("num_symbols", [2, 10, 257, 65537, 2**32])
def test_unpack_labels_non_contiguous(num_symbols, device, gen, ref, bitstream):
    n = 3001
    labels = random_labels(n, num_symbols, torch.int64, gen).tolist()
    packed = bitstream.pack(labels, num_symbols)
    # Interleave with 0xFF bytes (which would decode to out-of-range or wrong
    # symbols) and read back through a strided view and an offset view.
    big = torch.full((2 * packed.numel(),), 0xFF, dtype=torch.uint8)
    big[::2] = packed
    offset = torch.cat([torch.full((1,), 0xFF, dtype=torch.uint8), packed])
    for view in (big.to(device)[::2], offset.to(device)[1:]):
        assert ops.unpack_labels(view, n, num_symbols).tolist() == labels
        assert_equal(
            ops.unpack_labels(view, n, num_symbols), ref.unpack_labels(view, n, num_symbols)
        )


@pytest.mark.parametrize("n", [1, 8, 9, 100_003])
def test_unpack_labels_all_ones_symbols(n, device, bitstream):
    # Power-of-two symbol counts: every symbol the largest value, all bits set.
    for num_symbols in (2, 256, 65536):
        bits = n * bitstream.width(num_symbols)
        packed = torch.full(((bits + 7) // 8,), 0xFF, dtype=torch.uint8)
        packed[-1] &= 0xFF >> (-bits % 8)  # the unused high bits stay zero
        assert_equal(packed, bitstream.pack([num_symbols - 1] * n, num_symbols))
        out = ops.unpack_labels(packed.to(device), n, num_symbols)
        assert_equal(out.cpu(), torch.full((n,), num_symbols - 1, dtype=torch.int64))


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    num_symbols=st.one_of(st.integers(2, 300), st.sampled_from(SYMBOL_COUNTS)),
    n=st.integers(0, 70),
)
def test_pack_unpack_round_trip_property(data, num_symbols, n, ref, bitstream):
    labels = data.draw(st.lists(st.integers(0, num_symbols - 1), min_size=n, max_size=n))
    tensor = torch.tensor(labels, dtype=torch.int64)
    packed = ops.pack_labels(tensor, num_symbols)
    assert_equal(packed, bitstream.pack(labels, num_symbols))
    assert ops.unpack_labels(packed, n, num_symbols).tolist() == labels
    assert packed.numel() == ref.packed_size(n, num_symbols)


@pytest.mark.parametrize(
    "num_symbols,bits",
    [
        (2, 1),
        (3, 2),
        (4, 2),
        (5, 3),
        (10, 4),
        (100, 7),
        (1000, 10),
        (50257, 16),
        (65536, 16),
        (65537, 17),
        (2**32, 32),
    ],
)
def test_bits_for_and_packed_size(num_symbols, bits):
    assert ops.bits_for(num_symbols) == bits
    assert ops.packed_size(0, num_symbols) == 0
    assert ops.packed_size(9, num_symbols) == (9 * bits + 7) // 8
