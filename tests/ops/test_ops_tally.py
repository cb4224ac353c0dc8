"""tally (docs/design.md §3): the dispatched op against the reference and against a
brute-force counter over each probe's votes.

Votes are built as a [P, N] matrix of symbols and packed with the reference
pack_labels called directly (its layout is checked bit by bit in
test_ops_pack.py), so these tests exercise the tally alone.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytrain.ops as ops

assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)

CLASS_COUNTS = (2, 3, 10, 255, 256, 257, 1000, 50257, 65536, 65537)
PROBE_COUNTS = (0, 1, 7, 8, 9, 3001)
PEER_COUNTS = (1, 4, 33)
# Many probes only with few peers: the brute force and the reference are slow.
MAX_VOTES = 13_000
GRID = [
    (c, n, p) for c in CLASS_COUNTS for n in PROBE_COUNTS for p in PEER_COUNTS if n * p <= MAX_VOTES
]
GRID_IDS = [f"C{c}-N{n}-P{p}" for c, n, p in GRID]


def brute_tally(symbols, n, num_classes, weights=None, abstain=False):
    """The contract, probe by probe, with collections.Counter."""
    peers = len(symbols)
    weights = [1] * peers if weights is None else list(weights)
    label, count, total, runner_up = [], [], [], []
    for i in range(n):
        counts = Counter()
        weight_sum = 0
        for p in range(peers):
            vote = symbols[p][i]
            if abstain and vote == num_classes:
                continue
            counts[vote] += weights[p]
            weight_sum += weights[p]
        if weight_sum == 0:  # no supported vote: no label
            row = (-1, 0, 0, 0)
        else:
            best = min(counts, key=lambda c: (-counts[c], c))
            second = max((v for c, v in counts.items() if c != best), default=0)
            row = (best, counts[best], weight_sum, second)
        for column, value in zip((label, count, total, runner_up), row):
            column.append(value)
    return label, count, total, runner_up


def pack_votes(ref, symbols, n, num_symbols, device="cpu"):
    """[P, N] nested lists of symbols -> uint8 [P, bytes] on `device`."""
    width = ref.packed_size(n, num_symbols)
    if not symbols:
        return torch.empty(0, width, dtype=torch.uint8, device=device)
    rows = [
        ref.pack_labels(torch.tensor(row, dtype=torch.int64).reshape(n), num_symbols)
        for row in symbols
    ]
    return torch.stack(rows).to(device)


def random_votes(peers, n, num_classes, abstain, gen):
    """Votes concentrated on a few classes (0, C-1 and two random ones), so
    that ties and runner-ups are common; with abstention ~20% abstain."""
    pool = torch.tensor(
        [
            0,
            num_classes - 1,
            int(torch.randint(num_classes, (1,), generator=gen)),
            int(torch.randint(num_classes, (1,), generator=gen)),
        ]
    )
    symbols = pool[torch.randint(len(pool), (peers, n), generator=gen)]
    if abstain:
        symbols[torch.rand(peers, n, generator=gen) < 0.2] = num_classes
    return symbols.tolist()


def check_tally(result, expected, n, device):
    assert isinstance(result, ops.Tally)
    for field, got, want in zip(ops.Tally._fields, result, expected):
        assert got.dtype == torch.int64 and got.shape == (n,) and got.device.type == device, field
        assert got.tolist() == want, field


def check_against_reference(result, ref_result):
    for field, got, want in zip(ops.Tally._fields, result, ref_result):
        assert_equal(got, want, msg=lambda m, f=field: f"{f}: {m}")


# --------------------------------------------------------------------------- #
# random votes over the grid
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("abstain", [False, True], ids=["vote", "abstain"])
@pytest.mark.parametrize("num_classes,n,peers", GRID, ids=GRID_IDS)
def test_tally_matches_brute_force(num_classes, n, peers, abstain, device, gen, ref):
    symbols = random_votes(peers, n, num_classes, abstain, gen)
    votes = pack_votes(ref, symbols, n, num_classes + 1 if abstain else num_classes, device)
    # Weights 0..3: zeros make some probes unsupported; uneven weights make
    # the winner differ from the unweighted one.
    weight_list = torch.randint(0, 4, (peers,), generator=gen).tolist()
    for weights in (None, torch.tensor(weight_list, device=device)):
        result = ops.tally(votes, n, num_classes, weights=weights, abstain=abstain)
        check_tally(
            result,
            brute_tally(symbols, n, num_classes, None if weights is None else weight_list, abstain),
            n,
            device,
        )
        check_against_reference(result, ref.tally(votes, n, num_classes, weights, abstain))


# --------------------------------------------------------------------------- #
# hand-made cases
# --------------------------------------------------------------------------- #
def test_tally_even_peers_tie_goes_to_smallest_class(device, ref):
    c = 10
    symbols = [[5, 9, 7, 0, 4], [3, 0, 8, 0, 4], [5, 0, 9, 9, 6], [3, 9, 2, 9, 6]]
    votes = pack_votes(ref, symbols, 5, c, device)
    result = ops.tally(votes, 5, c)
    check_tally(result, ([3, 0, 2, 0, 4], [2, 2, 1, 2, 2], [4] * 5, [2, 2, 1, 2, 2]), 5, device)
    # A heavier first peer breaks every tie its way.
    result = ops.tally(votes, 5, c, weights=torch.tensor([2, 1, 1, 1], device=device))
    check_tally(result, ([5, 9, 7, 0, 4], [3, 3, 2, 3, 3], [5] * 5, [2, 2, 1, 2, 2]), 5, device)


@pytest.mark.parametrize("abstain", [False, True], ids=["vote", "abstain"])
def test_tally_one_peer(abstain, device, ref):
    c = 257
    symbols = [[0, 256, 17, c if abstain else 3, 128, 1, 2, 255, 256]]
    n = len(symbols[0])
    votes = pack_votes(ref, symbols, n, c + abstain, device)
    for w in (1, 5, 0):
        result = ops.tally(votes, n, c, weights=torch.tensor([w], device=device), abstain=abstain)
        check_tally(result, brute_tally(symbols, n, c, [w], abstain), n, device)


@pytest.mark.parametrize("abstain", [False, True], ids=["vote", "abstain"])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_tally_no_peers(n, abstain, device):
    c = 10
    votes = torch.empty(
        0, ops.packed_size(n, c + 1 if abstain else c), dtype=torch.uint8, device=device
    )
    for weights in (None, torch.empty(0, dtype=torch.int64, device=device)):
        result = ops.tally(votes, n, c, weights=weights, abstain=abstain)
        check_tally(result, ([-1] * n, [0] * n, [0] * n, [0] * n), n, device)


@pytest.mark.parametrize("num_classes", [2, 3, 255, 65536])
def test_tally_all_abstain(num_classes, device, ref):
    n, peers = 9, 5
    symbols = [[num_classes] * n for _ in range(peers)]
    votes = pack_votes(ref, symbols, n, num_classes + 1, device)
    result = ops.tally(votes, n, num_classes, abstain=True)
    check_tally(result, ([-1] * n, [0] * n, [0] * n, [0] * n), n, device)


def test_tally_zero_weights(device, ref):
    c = 10
    symbols = [[1, 2, 3, c], [4, 2, c, c], [1, 5, 6, 7]]
    votes = pack_votes(ref, symbols, 4, c + 1, device)
    # Only the third peer counts.
    result = ops.tally(votes, 4, c, weights=torch.tensor([0, 0, 3], device=device), abstain=True)
    check_tally(result, ([1, 5, 6, 7], [3] * 4, [3] * 4, [0] * 4), 4, device)
    result = ops.tally(votes, 4, c, weights=torch.tensor([0, 0, 0], device=device), abstain=True)
    check_tally(result, ([-1] * 4, [0] * 4, [0] * 4, [0] * 4), 4, device)
    # Probe 0 ties at one vote each; probe 3's only voter has weight 0.
    result = ops.tally(votes, 4, c, weights=torch.tensor([1, 1, 0], device=device), abstain=True)
    check_tally(result, ([1, 2, 3, -1], [1, 2, 1, 0], [2, 2, 1, 0], [1, 0, 0, 0]), 4, device)


@pytest.mark.parametrize("num_classes", [3, 7, 255, 65535])
def test_tally_abstain_fills_the_width(num_classes, device, gen, ref):
    # C = 2**k - 1: with abstention the stream holds 2**k symbols of exactly k
    # bits, and the abstain symbol C is all ones.
    width = ref.bits_for(num_classes + 1)
    assert 2**width == num_classes + 1
    n, peers = 301, 6
    symbols = random_votes(peers, n, num_classes, True, gen)
    symbols[0] = [num_classes] * n  # a peer that always abstains
    symbols[1] = [num_classes - 1] * n  # one that always votes the largest class
    votes = pack_votes(ref, symbols, n, num_classes + 1, device)
    assert votes.shape == (peers, (n * width + 7) // 8)
    result = ops.tally(votes, n, num_classes, abstain=True)
    check_tally(result, brute_tally(symbols, n, num_classes, None, True), n, device)
    check_against_reference(result, ref.tally(votes, n, num_classes, None, True))


def test_tally_ignores_padding_bits(device, gen, ref):
    # 7 probes of 4 bits leave the high half of the last byte unused; set it.
    n, c, peers = 7, 10, 4
    symbols = random_votes(peers, n, c, False, gen)
    votes = pack_votes(ref, symbols, n, c)
    votes[:, -1] |= 0xF0
    result = ops.tally(votes.to(device), n, c)
    check_tally(result, brute_tally(symbols, n, c), n, device)


@pytest.mark.parametrize("num_classes", [2**24 + 1, 2**31, 2**32 - 1])
def test_tally_huge_class_counts(num_classes, device, ref):
    # Symbols up to 32 bits wide; the result must not depend on C-sized tables.
    n = 5
    symbols = [
        [0, num_classes - 1, 12345, num_classes, num_classes - 1],
        [7, num_classes - 1, 12345, num_classes, 2**23],
        [7, 3, 54321, 1, 2**23],
    ]
    votes = pack_votes(ref, symbols, n, num_classes + 1, device)
    result = ops.tally(votes, n, num_classes, abstain=True)
    check_tally(result, brute_tally(symbols, n, num_classes, None, True), n, device)


def test_tally_counts_beyond_16_bits(device):
    # 70,000 peers, one probe: counts that overflow 8- or 16-bit counters.
    peers = 70_000
    # One 2-bit symbol per peer: each peer's stream is one byte equal to it.
    votes = torch.tensor([1] * 40_000 + [0] * 29_999 + [2], dtype=torch.uint8)[:, None]
    votes = votes.to(device)
    result = ops.tally(votes, 1, 3)
    check_tally(result, ([1], [40_000], [peers], [29_999]), 1, device)


def test_tally_weights_beyond_32_bits(device, ref):
    big = 2**40
    symbols = [[0, 2], [0, 1], [1, 1]]
    votes = pack_votes(ref, symbols, 2, 3, device)
    weights = torch.tensor([big, big, big + 1], device=device)
    result = ops.tally(votes, 2, 3, weights=weights)
    check_tally(
        result, ([0, 1], [2 * big, 2 * big + 1], [3 * big + 1] * 2, [big + 1, big]), 2, device
    )


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str
)
def test_tally_weight_dtypes(dtype, device, gen, ref):
    n, c, peers = 64, 10, 7
    symbols = random_votes(peers, n, c, True, gen)
    votes = pack_votes(ref, symbols, n, c + 1, device)
    weight_list = [3, 0, 1, 2, 1, 0, 5]
    weights = torch.tensor(weight_list, dtype=dtype, device=device)
    result = ops.tally(votes, n, c, weights=weights, abstain=True)
    check_tally(result, brute_tally(symbols, n, c, weight_list, True), n, device)


@pytest.mark.parametrize("layout", ["column_slice", "row_stride", "transposed"])
def test_tally_non_contiguous_votes(layout, device, gen, ref):
    n, c, peers = 1001, 257, 5
    symbols = random_votes(peers, n, c, True, gen)
    dense = pack_votes(ref, symbols, n, c + 1, device)
    if layout == "column_slice":  # 0xFF around each row: out-of-range symbols if read
        big = torch.full((peers, dense.shape[1] + 2), 0xFF, dtype=torch.uint8, device=device)
        big[:, 1:-1] = dense
        votes = big[:, 1:-1]
    elif layout == "row_stride":
        big = torch.full((2 * peers, dense.shape[1]), 0xFF, dtype=torch.uint8, device=device)
        big[::2] = dense
        votes = big[::2]
    else:
        votes = dense.t().contiguous().t()
    assert not votes.is_contiguous()
    result = ops.tally(votes, n, c, abstain=True)
    check_tally(result, brute_tally(symbols, n, c, None, True), n, device)
    check_against_reference(result, ref.tally(votes, n, c, None, True))


def test_tally_accepts_lists(device, gen, ref):
    n, c = 50, 1000
    symbols = random_votes(3, n, c, False, gen)
    votes = pack_votes(ref, symbols, n, c, device)
    as_tensor = ops.tally(votes, n, c, weights=torch.tensor([1, 2, 3], device=device))
    as_lists = ops.tally(list(votes.unbind(0)), n, c, weights=[1, 2, 3])
    check_tally(as_lists, brute_tally(symbols, n, c, [1, 2, 3]), n, device)
    for got, want in zip(as_lists, as_tensor):
        assert_equal(got, want)


@pytest.mark.parametrize("n,peers", [(10_007, 2), (10_007, 33), (2_003, 100)])
def test_tally_many_probes(n, peers, device, gen, ref):
    # Enough probes to be split over threads and blocks; N not a multiple of 8.
    c = 10
    symbols = random_votes(peers, n, c, True, gen)
    votes = pack_votes(ref, symbols, n, c + 1, device)
    result = ops.tally(votes, n, c, abstain=True)
    check_against_reference(result, ref.tally(votes, n, c, None, True))
    check_tally(result, brute_tally(symbols, n, c, None, True), n, device)


def test_tally_same_for_any_thread_count(gen, ref, across_threads):
    n, c, peers = 20_003, 1000, 7
    symbols = random_votes(peers, n, c, True, gen)
    votes = pack_votes(ref, symbols, n, c + 1)
    weights = torch.tensor([1, 3, 0, 2, 2, 1, 5])
    runs = across_threads(lambda: ops.tally(votes, n, c, weights=weights, abstain=True))
    for result in runs:
        check_against_reference(result, runs[0])
    check_against_reference(runs[0], ref.tally(votes, n, c, weights, True))


# --------------------------------------------------------------------------- #
# property: any votes, any weights
# --------------------------------------------------------------------------- #
@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    num_classes=st.sampled_from([2, 3, 4, 5, 7, 8, 10, 255, 256, 257, 65535, 65537]),
    peers=st.integers(1, 6),
    n=st.integers(0, 30),
    abstain=st.booleans(),
    weighted=st.booleans(),
)
def test_tally_property(data, num_classes, peers, n, abstain, weighted, ref):
    num_symbols = num_classes + 1 if abstain else num_classes
    # Draw from a few symbols (including C-1 and, with abstention, C) so that
    # ties and abstentions are frequent.
    choices = sorted({0, 1, num_classes - 1, num_symbols - 1})
    symbol = st.sampled_from(choices) | st.integers(0, num_symbols - 1)
    symbols = data.draw(
        st.lists(st.lists(symbol, min_size=n, max_size=n), min_size=peers, max_size=peers)
    )
    weight_list = (
        data.draw(st.lists(st.integers(0, 4), min_size=peers, max_size=peers)) if weighted else None
    )
    votes = pack_votes(ref, symbols, n, num_symbols)
    weights = None if weight_list is None else torch.tensor(weight_list, dtype=torch.int64)
    result = ops.tally(votes, n, num_classes, weights=weights, abstain=abstain)
    check_tally(result, brute_tally(symbols, n, num_classes, weight_list, abstain), n, "cpu")


# --------------------------------------------------------------------------- #
# the kernel's strategies at their edges
# --------------------------------------------------------------------------- #
# (C, P, N): tiny C (vector unpack of 4-bit symbols); class-major at 10-bit
# symbols; the per-probe table with 4 probes side by side (C = 1000, few
# peers) and with one table (C = 50257, too large for 4).
STRATEGY_CASES = [(10, 5, 103), (257, 33, 67), (1000, 7, 103), (50257, 7, 103)]


@pytest.mark.parametrize("abstain", [False, True], ids=["vote", "abstain"])
@pytest.mark.parametrize("heavy", [False, True], ids=["small-weights", "large-weights"])
@pytest.mark.parametrize(
    "num_classes,peers,n", STRATEGY_CASES, ids=[f"C{c}-P{p}-N{n}" for c, p, n in STRATEGY_CASES]
)
def test_tally_strategies_with_wide_counts(num_classes, peers, n, heavy, abstain, device, gen, ref):
    """Weights summing past 2^12 and 2^15 switch the counts to wider lanes
    and keys; every strategy must still agree with the brute force."""
    symbols = random_votes(peers, n, num_classes, abstain, gen)
    votes = pack_votes(ref, symbols, n, num_classes + 1 if abstain else num_classes, device)
    high = 20_000 if heavy else 4
    weight_list = torch.randint(0, high, (peers,), generator=gen).tolist()
    weights = torch.tensor(weight_list, device=device)
    result = ops.tally(votes, n, num_classes, weights=weights, abstain=abstain)
    check_tally(result, brute_tally(symbols, n, num_classes, weight_list, abstain), n, device)
    check_against_reference(result, ref.tally(votes, n, num_classes, weights, abstain))


# (C, P, N, weight) for the plans of the CUDA warp-per-probe kernel (P > 32),
# found unexercised by a coverage run of the simt cases: 64-bit counts
# (weights summing past 2^31) with class-indexed and with hashed tables; a
# block over 48 KiB of shared memory (C = 4096 tables beside the staged
# streams); tables in global memory (over 2,048 peers and 4,096 classes).
WARP_PLAN_CASES = [
    (1000, 40, 37, 2**40),
    (70_000, 40, 37, 2**40),
    (4096, 100, 150, 1),
    (5000, 2100, 19, 1),
]


@pytest.mark.parametrize(
    "num_classes,peers,n,weight",
    WARP_PLAN_CASES,
    ids=["wide-direct", "wide-hashed", "large-shared", "global-tables"],
)
def test_tally_warp_per_probe_plans(num_classes, peers, n, weight, device, gen, ref):
    # Half the votes on a few classes (ties, runner-ups), half spread over
    # all classes (many distinct keys in the hashed tables).
    symbols = torch.tensor(random_votes(peers, n, num_classes, True, gen))
    spread = torch.rand(peers, n, generator=gen) < 0.5
    symbols[spread] = torch.randint(num_classes, (int(spread.sum()),), generator=gen)
    symbols = symbols.tolist()
    votes = pack_votes(ref, symbols, n, num_classes + 1, device)
    weight_list = [weight + q % 3 for q in range(peers)]
    weights = torch.tensor(weight_list, device=device)
    result = ops.tally(votes, n, num_classes, weights=weights, abstain=True)
    check_tally(result, brute_tally(symbols, n, num_classes, weight_list, True), n, device)
    check_against_reference(result, ref.tally(votes, n, num_classes, weights, True))


@pytest.mark.parametrize("num_classes,peers", [(10, 3), (200, 3), (257, 33), (50257, 3)])
def test_tally_rejects_an_out_of_range_symbol_mid_stream(num_classes, peers, device, gen, ref):
    """A symbol >= the number of symbols deep inside a long stream (where the
    vectorised unpack reads it) is an error naming `votes`, as at the tail."""
    n = 77
    symbols = random_votes(peers, n, num_classes, False, gen)
    b = ref.bits_for(num_classes)
    if (1 << b) == num_classes:
        pytest.skip("every b-bit pattern is a class")
    votes = pack_votes(ref, symbols, n, num_classes, device).cpu()
    # Overwrite probe 41 of the last peer with the all-ones pattern (>= C).
    stream = [int(bit) for byte in votes[-1].tolist() for bit in format(byte, "08b")[::-1]]
    for j in range(b):
        stream[41 * b + j] = 1
    votes[-1] = torch.tensor(
        [
            sum(bit << k for k, bit in enumerate(stream[i : i + 8]))
            for i in range(0, len(stream), 8)
        ],
        dtype=torch.uint8,
    )
    with pytest.raises(ValueError, match="votes"):
        ops.tally(votes.to(device), n, num_classes)
