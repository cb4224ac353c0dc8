"""Every CPU level the machine runs gives the reference's results.

The native CPU kernels are compiled once per CPU level (docs/ops.md, CPU
levels) and TALLYTRAIN_CPU_LEVEL picks one per process; CI runs the whole op
suite at each level (`make test-levels`). These tests switch levels within
one process (tallytrain.ops._backend.set_cpu_level) and run every vectorised
path of every level on the same inputs: integer outputs must equal the
reference's, top-k values and residuals bit for bit, probabilities within
the tolerance of a float64 oracle. Native pass only: the reference has no
levels.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tallytrain.ops as ops
from tallytrain.ops import _backend

pytestmark = pytest.mark.skipif(
    ops.backend_info()["cpu"] != "native", reason="the CPU levels are the native kernels'"
)

assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)
LEVELS = _backend.supported_cpu_levels()


@pytest.fixture(params=LEVELS or ["none"])
def level(request):
    """Runs the test with the native CPU kernels at one level, then restores
    the level the process started with."""
    before = ops.backend_info()["cpu_level"]
    _backend.set_cpu_level(request.param)
    try:
        yield request.param
    finally:
        _backend.set_cpu_level(before)


def test_set_cpu_level_switches(level):
    assert ops.backend_info()["cpu_level"] == level


def same_bits(a, b):
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert a.dtype == b.dtype and a.shape == b.shape
    assert_equal(a.contiguous().view(view), b.contiguous().view(view))


def logits_with_features(n, c, dtype, gen):
    """Random rows, then rows with ties, NaN, +-inf, signed zeros and the
    maximum in the first, last and a middle position (every vector width's
    head, body and tail)."""
    x = torch.randn(n, c, generator=gen) * 4
    specials = []
    for j in sorted({0, 1, c // 2, c - 2, c - 1}):
        row = torch.randn(c, generator=gen)
        row[j] = 9.0
        specials.append(row)
        tie = torch.randn(c, generator=gen)
        tie[[j, c - 1]] = 9.0
        specials.append(tie)
        nan = torch.randn(c, generator=gen)
        nan[j] = float("nan")
        specials.append(nan)
        inf = torch.full((c,), float("-inf"))
        inf[j] = float("inf") if j % 2 else -1.0
        specials.append(inf)
    zeros = torch.full((c,), -0.0)
    zeros[c - 1] = 0.0
    specials.append(zeros)
    return torch.cat([x, torch.stack(specials)]).to(dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
@pytest.mark.parametrize("c", [2, 10, 63, 64, 100, 127, 128, 1000, 4099])
def test_pack_argmax(c, dtype, level, ref):
    gen = torch.Generator().manual_seed(c)
    logits = logits_with_features(67, c, dtype, gen)
    packed, prob = ops.pack_argmax(logits, return_prob=True)
    assert_equal(packed, ref.pack_argmax(logits)[0])
    exact = torch.softmax(logits.double(), -1).amax(-1)
    torch.testing.assert_close(prob.double(), exact, rtol=1e-4, atol=1e-6, equal_nan=True)
    for threshold in (0.0, 0.3, 0.95):
        voted = ops.pack_argmax(logits, abstain_below=threshold)
        assert_equal(voted, ops.pack_argmax(logits, return_prob=True, abstain_below=threshold)[0])
        far = ((prob.double() - threshold).abs() > 1e-3) | torch.isnan(prob)
        symbols = ops.unpack_labels(voted, logits.shape[0], c + 1)
        ref_symbols = ops.unpack_labels(
            ref.pack_argmax(logits, False, threshold)[0], logits.shape[0], c + 1
        )
        assert_equal(symbols[far], ref_symbols[far])


@pytest.mark.parametrize(
    "c,peers,weighted,abstain",
    [
        (2, 5, False, False),
        (3, 20, True, True),
        (10, 20, False, False),
        (10, 7, True, False),
        (16, 9, False, True),
        (31, 33, False, True),
        (32, 4, True, True),
        (100, 40, False, False),
        (1000, 100, False, True),
        (1000, 3, True, False),
        (50257, 30, False, False),
        (65537, 5, True, True),
    ],
    ids=lambda v: str(v),
)
def test_tally(c, peers, weighted, abstain, level, ref):
    # Every strategy (tiny, class-major, table, sort), 16- and 32-bit counts,
    # and every symbol width's unpack path (1-8 bits, more).
    gen = torch.Generator().manual_seed(c * 100 + peers)
    n = 1001
    num_symbols = c + 1 if abstain else c
    symbols = torch.randint(0, num_symbols, (peers, n), generator=gen)
    symbols[:, :3] = c - 1
    votes = torch.stack([ref.pack_labels(row, num_symbols) for row in symbols])
    weights = None
    if weighted:  # large enough that the counts need 32 bits
        weights = torch.randint(0, 5000, (peers,), generator=gen)
    got = ops.tally(votes, n, c, weights=weights, abstain=abstain)
    want = ref.tally(votes, n, c, weights, abstain)
    for a, b in zip(got, want):
        assert_equal(a, b)


@pytest.mark.parametrize("bits", range(1, 33))
def test_tally_every_symbol_width(bits, level, ref):
    """Each width has its own unpack path per level (byte fields, widening
    copies, windows, pairs of groups, one symbol at a time): C just above a
    power of two, so that every width 1..32 is used, with runs of symbols
    long enough for the vector steps and a tail shorter than one."""
    c = (1 << (bits - 1)) + 1 if bits > 1 else 2
    gen = torch.Generator().manual_seed(bits)
    n = 16 * 40 + 13
    symbols = torch.randint(0, c, (3, n), generator=gen)
    symbols[:, 1::7] = c - 1  # the largest symbol: the top bit of the width set
    votes = torch.stack([ref.pack_labels(row, c) for row in symbols])
    got = ops.tally(votes, n, c)
    want = ref.tally(votes, n, c)
    for a, b in zip(got, want):
        assert_equal(a, b)


@pytest.mark.parametrize("bits", [3, 5, 6, 10])
def test_tally_reports_the_first_bad_symbol(bits, level, ref):
    c = (1 << bits) - 3  # leaves symbols that are out of range
    symbols = torch.randint(0, c, (5, 300), generator=torch.Generator().manual_seed(bits))
    symbols[3, 217] = symbols[4, 5] = c + 1
    votes = torch.stack([ref.pack_labels(row, 1 << bits) for row in symbols])
    first = f"votes holds symbol {c + 1} at position {3 * 300 + 217},"
    with pytest.raises(ValueError, match=first):
        ops.tally(votes, 300, c)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=["float32", "float64", "float16", "bfloat16"],
)
def test_topk_sparse(dtype, level, ref):
    gen = torch.Generator().manual_seed(7)
    m = 200_003
    x = (torch.randn(m, generator=gen) * 3).to(dtype)
    x[::97] = x[5]  # ties across vectors
    x[1234] = float("inf")
    x[4321] = -0.0
    for k in (1, 1000, 20_000, m):
        idx, val = ops.topk_sparse(x, k)
        ref_idx, ref_val = ref.topk_sparse(x, k)
        assert_equal(idx, ref_idx)
        same_bits(val, ref_val)
    residual = (torch.randn(m, generator=gen) / 2).to(dtype)
    mine, theirs = residual.clone(), residual.clone()
    idx, val = ops.topk_sparse_ef(x, mine, 3000)
    ref_idx, ref_val = ref.topk_sparse_ef(x, theirs, 3000)
    assert_equal(idx, ref_idx)
    same_bits(val, ref_val)
    same_bits(mine, theirs)
    x[150_001] = float("nan")
    with pytest.raises(ValueError, match="first at index 150001"):
        ops.topk_sparse(x, 10)
