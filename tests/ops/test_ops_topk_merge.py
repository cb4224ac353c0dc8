"""topk_sparse, topk_sparse_ef and sparse_merge (docs/design.md §3): the dispatched
op against the reference and against independent oracles (a full Python sort
by (-|x|, index) for top-k, a dense Python loop for the merge).

Selected indices are exact. Values returned by top-k are copies of x (or of
x + residual, rounded once to x's dtype), so they are compared bit for bit,
sign of zero included. Merged sums agree within rtol=1e-4, atol=1e-6.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytrain.ops as ops

assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)
assert_sum_close = functools.partial(torch.testing.assert_close, rtol=1e-4, atol=1e-6)

TOPK_DTYPE_PARAMS = [
    pytest.param(d, id=str(d).removeprefix("torch."))
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
]
LENGTHS = (0, 1, 7, 8, 9, 1000, 100_003)


def magnitude_order(values):
    """All indices by a full sort on (-|x|, index): the top-k selection is
    ``sorted(order[:k])``, the k largest |x| with ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))


def assert_same_bits(actual, expected):
    """Equal bit patterns (so -0.0 != +0.0), same dtype, shape and device."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.device == expected.device
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    assert_equal(actual.contiguous().view(as_int), expected.contiguous().view(as_int))


def random_vector(m, dtype, gen, kind="normal"):
    if kind == "normal":
        x = torch.randn(m, generator=gen) * 3
    else:  # "few_values": |x| in 0..3 with random signs, -0.0 included: many ties
        sign = torch.randint(0, 2, (m,), generator=gen) * 2.0 - 1.0
        x = torch.randint(0, 4, (m,), generator=gen).float() * sign
    return x.to(dtype)


def ks_for(m):
    ks = {0, 1, m // 3, m - 1, m} if m <= 1000 else {1, 1000, m // 3, m}
    return sorted(k for k in ks if 0 <= k <= m)


# --------------------------------------------------------------------------- #
# topk_sparse
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["normal", "few_values"])
@pytest.mark.parametrize("m", LENGTHS)
@pytest.mark.parametrize("dtype", TOPK_DTYPE_PARAMS)
def test_topk_sparse_matches_full_sort(dtype, m, kind, device, gen, ref):
    x = random_vector(m, dtype, gen, kind).to(device)
    order = magnitude_order(x.tolist())
    for k in ks_for(m):
        idx, val = ops.topk_sparse(x, k)
        assert idx.dtype == torch.int64 and idx.device == x.device
        assert idx.tolist() == sorted(order[:k]), f"k={k}"
        assert_same_bits(val, x[idx])
        ref_idx, ref_val = ref.topk_sparse(x, k)
        assert_equal(idx, ref_idx)
        assert_same_bits(val, ref_val)


@pytest.mark.parametrize("dtype", TOPK_DTYPE_PARAMS)
def test_topk_sparse_hostile_values(dtype, device, ref):
    finfo = torch.finfo(dtype)
    sub = finfo.tiny / 2  # subnormal
    inf = float("inf")
    x = torch.tensor(
        [1.0, -2.0, 2.0, -1.0, 0.0, -0.0, inf, -inf, sub, -sub, finfo.max, -finfo.max, -0.0, 0.0],
        dtype=dtype,
        device=device,
    )
    # |x| order with ties to the lower index: inf(6), inf(7), max(10), max(11),
    # 2(1), 2(2), 1(0), 1(3), sub(8), sub(9), 0(4), 0(5), 0(12), 0(13).
    order = [6, 7, 10, 11, 1, 2, 0, 3, 8, 9, 4, 5, 12, 13]
    for k in range(len(order) + 1):
        idx, val = ops.topk_sparse(x, k)
        assert idx.tolist() == sorted(order[:k]), f"k={k}"
        assert_same_bits(val, x[idx])
        assert_equal(idx, ref.topk_sparse(x, k)[0])


@pytest.mark.parametrize("dtype", TOPK_DTYPE_PARAMS)
def test_topk_sparse_all_equal_magnitude(dtype, device, gen):
    # Every |x| equal: the k lowest indices, whatever the signs.
    m = 10_007
    x = (1.5 * (torch.randint(0, 2, (m,), generator=gen) * 2 - 1)).to(dtype).to(device)
    for k in (1, 999, m // 2, m):
        idx, val = ops.topk_sparse(x, k)
        assert idx.tolist() == list(range(k))
        assert_same_bits(val, x[:k])


@pytest.mark.parametrize("layout", ["stride", "offset"])
def test_topk_sparse_non_contiguous(layout, device, gen, ref):
    m = 50_001
    dense = random_vector(m, torch.float32, gen, "few_values")
    # Larger magnitudes between the elements would be selected if read.
    if layout == "stride":
        big = torch.full((2 * m,), 1e30)
        big[::2] = dense
        x = big.to(device)[::2]
    else:
        big = torch.cat([torch.full((1,), 1e30), dense])
        x = big.to(device)[1:]
    order = magnitude_order(dense.tolist())
    for k in (0, 1, 777, m):
        idx, val = ops.topk_sparse(x, k)
        assert idx.tolist() == sorted(order[:k])
        assert_same_bits(val, x[idx])
        assert_equal(idx, ref.topk_sparse(x, k)[0])


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, width=16),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, float("inf")]),
        ),
        max_size=60,
    ),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    data=st.data(),
)
def test_topk_sparse_property(values, dtype, data):
    k = data.draw(st.integers(0, len(values)))
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    idx, val = ops.topk_sparse(x, k)
    assert idx.tolist() == sorted(magnitude_order(x.tolist())[:k])
    assert_same_bits(val, x[idx])


@pytest.mark.parametrize("k", [1, 1000, 100_000])
def test_topk_sparse_same_for_any_thread_count(k, gen, ref, across_threads):
    x = random_vector(300_007, torch.float32, gen, "few_values")
    runs = across_threads(lambda: ops.topk_sparse(x, k))
    for idx, val in runs:
        assert_equal(idx, runs[0][0])
        assert_same_bits(val, runs[0][1])
    assert_equal(runs[0][0], ref.topk_sparse(x, k)[0])


# --------------------------------------------------------------------------- #
# topk_sparse_ef
# --------------------------------------------------------------------------- #
def expected_ef(acc, order, k):
    """(indices, values, new residual) by the definition: acc = x + residual in
    x's dtype, the top-k of acc is sent, the rest stays in the residual."""
    idx = torch.tensor(sorted(order[:k]), dtype=torch.int64, device=acc.device)
    left = acc.clone()
    left[idx] = 0
    return idx, acc[idx], left


@pytest.mark.parametrize("m", [1, 9, 1000, 30_011])
@pytest.mark.parametrize("dtype", TOPK_DTYPE_PARAMS)
def test_topk_sparse_ef_matches_definition(dtype, m, device, gen, ref):
    x = random_vector(m, dtype, gen, "few_values").to(device)
    residual = (random_vector(m, dtype, gen, "normal") / 2).to(device)
    acc = x + residual
    order = magnitude_order(acc.tolist())
    for k in ks_for(m):
        mine = residual.clone()
        x_before = x.clone()
        pointer = mine.data_ptr()
        idx, val = ops.topk_sparse_ef(x, mine, k)
        want_idx, want_val, want_residual = expected_ef(acc, order, k)
        assert_equal(idx, want_idx, msg=lambda msg, k=k: f"k={k}: {msg}")
        assert_same_bits(val, want_val)
        assert_same_bits(mine, want_residual)
        assert mine.data_ptr() == pointer  # updated in place
        assert_same_bits(x, x_before)
        theirs = residual.clone()
        ref_idx, ref_val = ref.topk_sparse_ef(x, theirs, k)
        assert_equal(idx, ref_idx)
        assert_same_bits(val, ref_val)
        assert_same_bits(mine, theirs)


@pytest.mark.parametrize("dtype", TOPK_DTYPE_PARAMS)
def test_topk_sparse_ef_rounds(dtype, device, gen, ref):
    # Error feedback over several rounds: the residual trajectories agree.
    m, k = 4099, 40
    mine = torch.zeros(m, dtype=dtype, device=device)
    theirs = mine.clone()
    for _ in range(4):
        x = random_vector(m, dtype, gen, "normal").to(device)
        idx, val = ops.topk_sparse_ef(x, mine, k)
        ref_idx, ref_val = ref.topk_sparse_ef(x, theirs, k)
        assert_equal(idx, ref_idx)
        assert_same_bits(val, ref_val)
        assert_same_bits(mine, theirs)


def test_topk_sparse_ef_non_contiguous_residual(device, gen):
    m, k = 30_001, 500
    x = random_vector(m, torch.float32, gen, "normal").to(device)
    start = random_vector(m, torch.float32, gen, "normal")
    # The residual is every other element of a buffer; the rest is a sentinel
    # that must survive the in-place update.
    big = torch.full((2 * m,), 7.0)
    big[::2] = start
    big = big.to(device)
    residual = big[::2]
    acc = x + start.to(device)
    want_idx, want_val, want_residual = expected_ef(acc, magnitude_order(acc.tolist()), k)
    idx, val = ops.topk_sparse_ef(x, residual, k)
    assert_equal(idx, want_idx)
    assert_same_bits(val, want_val)
    assert_same_bits(big[::2], want_residual)
    assert_equal(big[1::2].cpu(), torch.full((m,), 7.0))


# --------------------------------------------------------------------------- #
# sparse_merge
# --------------------------------------------------------------------------- #
def dense_merge(indices, values, size, counts=None):
    """The sum (or the counts-weighted average) of sparse vectors, by a dense
    Python loop in double precision."""
    peers = len(indices)
    scales = [1.0] * peers if counts is None else [c / sum(counts) for c in counts]
    out = [0.0] * size
    for scale, idx, val in zip(scales, indices, values):
        for i, v in zip(idx.tolist(), val.tolist()):
            out[i] += v * scale
    return out


def random_peers(peers, size, dtypes, gen, device):
    """Per peer: k distinct sorted indices (k random up to size or 3000, so
    short vectors are often dense) and values that are multiples of 1/8 in
    [-1, 1]. Those are exact in every dtype, so sums are exact and averages
    are off the double-precision loop by a few float32 roundings of numbers
    <= 1 in magnitude, well inside atol."""
    indices, values = [], []
    for p in range(peers):
        k = int(torch.randint(0, min(size, 3000) + 1, (1,), generator=gen))
        idx = torch.randperm(size, generator=gen)[:k].sort().values
        val = torch.randint(-8, 9, (k,), generator=gen) / 8
        indices.append(idx.to(device))
        values.append(val.to(dtypes[p % len(dtypes)]).to(device))
    return indices, values


def check_merge(out, indices, values, size, counts, device, ref):
    want_dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    assert out.dtype == want_dtype and out.shape == (size,) and out.device.type == device
    oracle = torch.tensor(dense_merge(indices, values, size, counts), dtype=want_dtype)
    assert_sum_close(out.cpu(), oracle)
    counts_tensor = None if counts is None else torch.tensor(counts)
    assert_sum_close(out, ref.sparse_merge(indices, values, size, counts_tensor))


MERGE_DTYPES = {
    "float32": [torch.float32],
    "float16": [torch.float16],
    "bfloat16": [torch.bfloat16],
    "float64": [torch.float64],
    "mixed16": [torch.float16, torch.bfloat16, torch.float32],
    "mixed64": [torch.float16, torch.float64],
    "mixed64b": [torch.float32, torch.bfloat16, torch.float64],
}


@pytest.mark.parametrize("averaged", [False, True], ids=["sum", "average"])
@pytest.mark.parametrize("dtypes", list(MERGE_DTYPES.values()), ids=list(MERGE_DTYPES))
@pytest.mark.parametrize("peers", [1, 2, 5])
@pytest.mark.parametrize("size", [1, 9, 1000, 100_003])
def test_sparse_merge_matches_dense_loop(size, peers, dtypes, averaged, device, gen, ref):
    indices, values = random_peers(peers, size, dtypes, gen, device)
    counts = None
    if averaged:  # zeros allowed (a peer that contributes nothing), positive sum
        counts = torch.randint(0, 6, (peers,), generator=gen).tolist()
        counts[-1] += 1
    out = ops.sparse_merge(indices, values, size, counts=counts)
    check_merge(out, indices, values, size, counts, device, ref)
    # Deterministic: the same call gives the same bits.
    assert_same_bits(ops.sparse_merge(indices, values, size, counts=counts), out)


def test_sparse_merge_same_for_any_thread_count(gen, ref, across_threads):
    size = 200_003
    indices, values = [], []
    for _ in range(4):  # dense enough to overlap everywhere
        idx = torch.randperm(size, generator=gen)[:150_000].sort().values
        indices.append(idx)
        values.append(torch.randn(idx.numel(), generator=gen))
    runs = across_threads(lambda: ops.sparse_merge(indices, values, size, counts=[1, 2, 3, 7]))
    for out in runs:
        assert_same_bits(out, runs[0])
    assert_sum_close(runs[0], ref.sparse_merge(indices, values, size, torch.tensor([1, 2, 3, 7])))


def test_sparse_merge_adds_in_peer_order(device, ref):
    # In float32, (1e8 + 1) - 1e8 is 0 but 1e8 - 1e8 + 1 is 1: peer 0 first,
    # then peer 1, then peer 2, accumulating in the output dtype.
    indices = [torch.tensor([3], device=device)] * 3
    values = [torch.tensor([v], device=device) for v in (1e8, 1.0, -1e8)]
    out = ops.sparse_merge(indices, values, 5)
    assert out.tolist() == [0.0] * 5
    assert_equal(out, ref.sparse_merge(indices, values, 5))


@pytest.mark.parametrize(
    "counts",
    [[2**62] * 3, [2**63 - 1, 1], [2**63 - 1] * 4 + [0]],
    ids=["three-2^62", "max-and-1", "four-max"],
)
def test_sparse_merge_counts_summing_past_int64(counts, device, ref):
    # Each count fits in int64 but their sum does not: the reference sums
    # Python ints, so every backend must sum exactly too (a 64-bit sum wraps
    # negative and would refuse the counts, or scale by garbage).
    peers = len(counts)
    indices = [torch.tensor([0, 2, 3], device=device)] * peers
    values = [torch.tensor([3.0, -1.5, 0.25], device=device)] * peers
    out = ops.sparse_merge(indices, values, 5, counts=counts)
    check_merge(out, indices, values, 5, counts, device, ref)
    assert_sum_close(out.cpu(), torch.tensor([3.0, 0.0, -1.5, 0.25, 0.0]))


def test_sparse_merge_no_peers():
    out = ops.sparse_merge([], [], 6)
    assert_equal(out, torch.zeros(6, dtype=torch.float32))


def test_sparse_merge_empty_parts(device, ref):
    empty_idx = torch.empty(0, dtype=torch.int64, device=device)
    empty_val = torch.empty(0, device=device)
    out = ops.sparse_merge([empty_idx, empty_idx], [empty_val, empty_val], 0)
    assert out.shape == (0,) and out.device.type == device
    idx = torch.tensor([0, 4], device=device)
    val = torch.tensor([1.5, -2.0], device=device)
    out = ops.sparse_merge(
        [empty_idx, idx, empty_idx], [empty_val, val, empty_val], 5, counts=[4, 1, 1]
    )
    assert_sum_close(out.cpu(), torch.tensor([0.25, 0, 0, 0, -2 / 6]))
    assert_sum_close(
        out,
        ref.sparse_merge(
            [empty_idx, idx, empty_idx], [empty_val, val, empty_val], 5, torch.tensor([4, 1, 1])
        ),
    )


def test_sparse_merge_input_forms(device, gen, ref):
    size, k = 200, 17
    idx = torch.stack([torch.randperm(size, generator=gen)[:k].sort().values for _ in range(3)])
    val = torch.randn(3, k, generator=gen)
    idx, val = idx.to(device), val.to(device)
    as_list = ops.sparse_merge(list(idx), list(val), size, counts=torch.tensor([1, 2, 3]))
    assert_same_bits(ops.sparse_merge(idx, val, size, counts=[1, 2, 3]), as_list)
    check_merge(as_list, list(idx), list(val), size, [1, 2, 3], device, ref)
    single = ops.sparse_merge(idx[0], val[0], size)
    check_merge(single, [idx[0]], [val[0]], size, None, device, ref)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(0, 40), peers=st.integers(0, 4), averaged=st.booleans())
def test_sparse_merge_property(data, size, peers, averaged, ref):
    indices, values = [], []
    for _ in range(peers):
        picked = data.draw(st.sets(st.integers(0, size - 1), max_size=size)) if size else set()
        indices.append(torch.tensor(sorted(picked), dtype=torch.int64))
        # Multiples of 1/8 in [-1, 1], as in random_peers.
        eighths = data.draw(
            st.lists(st.integers(-8, 8), min_size=len(picked), max_size=len(picked))
        )
        values.append(torch.tensor(eighths, dtype=torch.float32) / 8)
    counts = None
    if averaged and peers:
        counts = data.draw(
            st.lists(st.integers(0, 5), min_size=peers, max_size=peers).filter(lambda c: sum(c) > 0)
        )
    out = ops.sparse_merge(indices, values, size, counts=counts)
    check_merge(out, indices, values, size, counts, "cpu", ref)
