"""CUDA kernels at large sizes and on hostile small cases.

Every result of the CUDA dispatch is compared with the reference
(tallytrain.ops.reference, run on the GPU where the CPU would be too slow)
and with the CPU dispatch of the same op on the same data; integers must be
identical, float outputs bit-identical where the contract fixes the
arithmetic (top-k values, sparse merges) and within rtol=1e-4, atol=1e-6
(NaN in the same places) for softmax probabilities. Where a full reference
would need tens of GB (tally at P=1000, N=262144), a prefix of the probes gets
the full reference and a random subset gets a brute-force count.

Every test is marked ``cuda`` and skipped without a CUDA device.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tallytrain.ops as ops
from tallytrain.ops import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

CUDA = "cuda"
assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)
assert_prob_close = functools.partial(
    torch.testing.assert_close, rtol=1e-4, atol=1e-6, equal_nan=True
)
_ops = torch.ops.tallytrain


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Float tensors equal bit for bit (NaN payloads and -0.0 included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert_equal(a.cpu().view(view), b.cpu().view(view))


def test_cuda_backend_is_native():
    info = ops.backend_info()
    assert info["cuda"] == "native", info


# --------------------------------------------------------------------------- #
# pack_argmax
# --------------------------------------------------------------------------- #
def stream_prefix(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The first `bits` bits of a stream as a stream of their own (the unused
    high bits of its last byte zero)."""
    head = packed[: (bits + 7) // 8].clone()
    if bits % 8:
        head[-1] &= (1 << (bits % 8)) - 1
    return head


def check_pack_argmax(logits: torch.Tensor, abstain_below=None, cpu_rows=None) -> None:
    packed, prob = _ops.pack_argmax(logits, True, abstain_below)
    ref_packed, ref_prob = ref.pack_argmax(logits, True, abstain_below)
    assert packed.device == logits.device and packed.dtype == torch.uint8
    assert_equal(packed, ref_packed)
    assert_prob_close(prob, ref_prob)
    # Without return_prob the same stream and an empty prob.
    packed2, prob2 = _ops.pack_argmax(logits, False, abstain_below)
    assert_equal(packed2, packed)
    assert prob2.numel() == 0
    # The CPU dispatch on (a prefix of) the same rows.
    rows = logits if cpu_rows is None else logits[:cpu_rows]
    cpu_packed, cpu_prob = _ops.pack_argmax(rows.cpu(), True, abstain_below)
    b = ref.bits_for(logits.shape[1] + (abstain_below is not None))
    assert_equal(cpu_packed, stream_prefix(packed, rows.shape[0] * b).cpu())
    assert_prob_close(cpu_prob, prob[: rows.shape[0]].cpu())


def test_pack_argmax_large_bf16():
    """N=65536, C=50257 bfloat16 (6.6 GB): one warp per row, unaligned rows."""
    logits = torch.randn(65536, 50257, device=CUDA, dtype=torch.bfloat16, generator=gen(1))
    check_pack_argmax(logits, cpu_rows=1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,c",
    [
        (0, 2),
        (1, 2),
        (7, 2),
        (8, 3),
        (9, 10),
        (31, 16),
        (32, 17),
        (1000, 100),
        (33, 255),
        (257, 256),
        (1000, 257),
        (4097, 1000),
        (300, 1023),
        (300, 1025),
        (2100, 2048),
        (2100, 2049),
        (3, 50257),
        (1, 65536),
        (2, 65537),
        (5, 1 << 20),
        (600, 65537),
    ],
)
def test_pack_argmax_shapes(n, c, dtype):
    """Every regime: staged tiles (1, 2, 4 lanes a row), a warp a row, split rows."""
    g = gen(n * 100003 + c)
    logits = (torch.randn(n, c, device=CUDA, generator=g) * 4).to(dtype)
    check_pack_argmax(logits, cpu_rows=min(n, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [2, 3, 100, 1000, 5000, 70000])
def test_pack_argmax_hostile_values(c, dtype):
    n = 67
    g = gen(c)
    x = torch.randint(-2, 3, (n, c), device=CUDA, generator=g).to(dtype)  # many ties
    rows = torch.arange(n, device=CUDA)
    x[rows[::3], torch.randint(0, c, (len(rows[::3]),), device=CUDA, generator=g)] = float("nan")
    x[rows[1::3], -1] = float("inf")
    x[2, :] = float("-inf")  # all -inf: index 0, prob NaN
    x[4, :] = float("nan")  # all NaN: index 0
    x[5, :] = -0.0
    x[5, c // 2] = 0.0  # -0 == +0: index 0
    x[7, :] = float("-inf")
    x[7, c - 1] = 3.0  # maximum in the last column
    check_pack_argmax(x)


@pytest.mark.parametrize("c", [10, 1000, 50257])
def test_pack_argmax_layouts(c):
    """Non-contiguous and misaligned inputs give the same stream."""
    n = 129
    g = gen(c + 7)
    dense = torch.randn(n, c, device=CUDA, generator=g)
    expected = ref.pack_argmax(dense)[0]
    transposed = dense.t().contiguous().t()  # column-major
    strided = torch.randn(n, 2 * c, device=CUDA, generator=g)
    strided[:, ::2] = dense
    flat = torch.empty(n * c + 1, device=CUDA)
    flat[1:] = dense.reshape(-1)
    misaligned = flat[1:].view(n, c)  # 4-byte offset
    for x in (transposed, strided[:, ::2], misaligned):
        assert_equal(_ops.pack_argmax(x, False, None)[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [3, 257, 50257])
def test_pack_argmax_abstain(c, dtype):
    n = 2001
    g = gen(c + 11)
    logits = (torch.randn(n, c, device=CUDA, generator=g) * 6).to(dtype)
    prob = ref.top1_prob(logits)
    # Thresholds away from every probability, so rounding cannot flip a row.
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        if bool(((prob - t).abs() < 1e-5).any()):
            continue
        check_pack_argmax(logits, abstain_below=t, cpu_rows=300)
    # Every row abstains: small logits spread over many classes.
    flat = torch.randn(64, max(c, 100), device=CUDA, generator=g).to(dtype) * 0.01
    packed, _ = _ops.pack_argmax(flat, False, 0.9)
    assert_equal(
        ops.unpack_labels(packed, 64, flat.shape[1] + 1),
        torch.full((64,), flat.shape[1], device=CUDA),
    )


def test_pack_argmax_errors():
    x = torch.randn(4, 10, device=CUDA)
    with pytest.raises(TypeError, match="logits"):
        _ops.pack_argmax(x.double(), False, None)
    with pytest.raises(ValueError, match="logits"):
        _ops.pack_argmax(x[0], False, None)
    with pytest.raises(ValueError, match="logits"):
        _ops.pack_argmax(x[:, :1], False, None)
    with pytest.raises(ValueError, match="abstain_below"):
        _ops.pack_argmax(x, False, 1.5)


def test_pack_argmax_deterministic():
    logits = torch.randn(3, 1 << 21, device=CUDA, generator=gen(5))  # split rows
    a = _ops.pack_argmax(logits, True, None)
    b = _ops.pack_argmax(logits, True, None)
    assert_equal(a[0], b[0])
    same_bits(a[1], b[1])


# --------------------------------------------------------------------------- #
# pack_labels / unpack_labels
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "num_symbols", [2, 3, 10, 255, 256, 257, 1000, 50257, 65536, 65537, 2**31 + 5, 2**32]
)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 32, 33, 1000, 3_000_001])
def test_pack_unpack_labels(n, num_symbols):
    g = gen(n + num_symbols)
    labels = torch.randint(0, num_symbols, (n,), device=CUDA, generator=g, dtype=torch.int64)
    packed = _ops.pack_labels(labels, num_symbols)
    assert_equal(packed, ref.pack_labels(labels, num_symbols))
    assert_equal(_ops.unpack_labels(packed, n, num_symbols), labels)
    if n <= 1000:
        assert_equal(packed.cpu(), _ops.pack_labels(labels.cpu(), num_symbols))
        assert_equal(_ops.unpack_labels(packed.cpu(), n, num_symbols), labels.cpu())
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        if num_symbols - 1 <= torch.iinfo(dtype).max:
            assert_equal(_ops.pack_labels(labels.to(dtype), num_symbols), packed)


def test_pack_labels_errors():
    labels = torch.randint(0, 10, (1000,), device=CUDA, generator=gen(3))
    bad = labels.clone()
    bad[417] = 10
    bad[900] = -1
    with pytest.raises(ValueError, match=r"labels\[417\] = 10"):
        _ops.pack_labels(bad, 10)
    with pytest.raises(TypeError, match="labels"):
        _ops.pack_labels(labels.float(), 10)
    with pytest.raises(ValueError, match="num_symbols"):
        _ops.pack_labels(labels, 1)
    # A 4-bit stream holding 15 where only 0..9 are symbols.
    stream_labels = labels.clone()
    stream_labels[123] = 15
    stream = ref.pack_labels(stream_labels, 16)
    with pytest.raises(ValueError, match="symbol 15 at position 123"):
        _ops.unpack_labels(stream, 1000, 10)
    with pytest.raises(ValueError, match="packed"):
        _ops.unpack_labels(stream[:-1], 1000, 10)


# --------------------------------------------------------------------------- #
# tally
# --------------------------------------------------------------------------- #
def make_votes(p, n, c, g, agree=0.6, abstain_rate=0.0):
    """[P, N] labels where most peers agree with a per-probe class, packed."""
    base = torch.randint(0, c, (n,), device=CUDA, generator=g)
    noise = torch.randint(0, c, (p, n), device=CUDA, generator=g)
    keep = torch.rand(p, n, device=CUDA, generator=g) < agree
    labels = torch.where(keep, base.expand(p, n), noise)
    s = c
    if abstain_rate:
        s = c + 1
        off = torch.rand(p, n, device=CUDA, generator=g) < abstain_rate
        labels = torch.where(off, torch.full_like(labels, c), labels)
    votes = (
        torch.stack([ops.pack_labels(labels[i], s) for i in range(p)])
        if p
        else torch.zeros(0, ref.packed_size(n, s), dtype=torch.uint8, device=CUDA)
    )
    return labels, votes


def brute_force(labels, weights, c, probes):
    """label, count, total, runner_up of the given probes by counting."""
    out = []
    lab = labels[:, probes].cpu()
    w = weights.cpu() if weights is not None else torch.ones(labels.shape[0], dtype=torch.int64)
    for j in range(lab.shape[1]):
        valid = lab[:, j] < c
        counts = torch.zeros(c, dtype=torch.int64).index_add_(0, lab[valid, j], w[valid])
        total = int(w[valid].sum())
        if total == 0:
            out.append((-1, 0, 0, 0))
            continue
        win = int(torch.argmax(counts))  # first maximum = smallest class
        present = torch.zeros(c, dtype=torch.bool)
        present[lab[valid, j]] = True
        present[win] = False
        runner = int(counts[present].max()) if bool(present.any()) else 0
        out.append((win, int(counts[win]), total, runner))
    return torch.tensor(out, dtype=torch.int64)


def check_tally(
    labels, votes, n, c, weights=None, abstain=False, full_prefix=None, sample=500, seed=0
):
    result = _ops.tally(votes, n, c, weights, abstain)
    prefix = n if full_prefix is None else min(n, full_prefix)
    b = ref.bits_for(c + 1 if abstain else c)
    head = votes[:, : (prefix * b + 7) // 8] if prefix % 8 == 0 or prefix == n else None
    if head is not None and votes.shape[0] > 0:
        expected = ref.tally(head, prefix, c, weights, abstain)
        cpu = _ops.tally(head.cpu(), prefix, c, None if weights is None else weights.cpu(), abstain)
        for got, exp, on_cpu in zip(result, expected, cpu):
            assert_equal(got[:prefix], exp)
            assert_equal(got[:prefix].cpu(), on_cpu)
    if n:
        probes = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]
        expected = brute_force(labels, weights, c, probes)
        got = torch.stack([r[probes.to(CUDA)].cpu() for r in result], dim=1)
        assert_equal(got, expected)
    return result


def test_tally_p1000_n262144_c1000():
    g = gen(21)
    labels, votes = make_votes(1000, 262144, 1000, g)
    check_tally(labels, votes, 262144, 1000, full_prefix=2048, sample=300)


def test_tally_p100_n65536_c50257():
    g = gen(22)
    labels, votes = make_votes(100, 65536, 50257, g)
    check_tally(labels, votes, 65536, 50257, full_prefix=8192, sample=500)


def test_tally_p20_n1m_c10():
    g = gen(23)
    labels, votes = make_votes(20, 1 << 20, 10, g, agree=0.3)
    check_tally(labels, votes, 1 << 20, 10, full_prefix=1 << 16, sample=1000)


@pytest.mark.parametrize("p", [1, 31, 32, 33, 257])
@pytest.mark.parametrize("c", [2, 17, 1000, 4097, 50257])
@pytest.mark.parametrize("abstain", [False, True])
def test_tally_shapes(p, c, abstain):
    n = 1001
    g = gen(p * 7 + c + abstain)
    labels, votes = make_votes(p, n, c, g, agree=0.4, abstain_rate=0.3 if abstain else 0.0)
    if abstain:
        labels[:, 5] = c
        votes = torch.stack([ops.pack_labels(labels[i], c + 1) for i in range(p)])
    result = check_tally(labels, votes, n, c, abstain=abstain, sample=100, seed=p + c)
    if abstain:
        assert [int(r[5]) for r in result] == [-1, 0, 0, 0]


@pytest.mark.parametrize("p", [5, 40, 300])
def test_tally_weights(p):
    n, c = 777, 37
    g = gen(p + 1)
    labels, votes = make_votes(p, n, c, g, agree=0.3)
    weights = torch.randint(0, 4, (p,), device=CUDA, generator=g)
    weights[0] = 0
    check_tally(labels, votes, n, c, weights=weights, seed=p)
    wide = torch.randint(0, 2**40, (p,), device=CUDA, generator=g)  # counts beyond 32 bits
    check_tally(labels, votes, n, c, weights=wide, seed=p + 1)
    zero = torch.zeros(p, dtype=torch.int64, device=CUDA)
    result = _ops.tally(votes, n, c, zero, False)
    assert bool((result[0] == -1).all()) and bool((result[2] == 0).all())


def test_tally_large_tables():
    """P and C so large that the count tables live in global memory."""
    p, n, c = 2500, 40, 1 << 20
    g = gen(31)
    labels, votes = make_votes(p, n, c, g, agree=0.1)
    check_tally(labels, votes, n, c, sample=40)


def test_tally_no_peers_and_layout():
    votes = torch.zeros(0, ref.packed_size(9, 10), dtype=torch.uint8, device=CUDA)
    label, count, total, runner = _ops.tally(votes, 9, 10, None, False)
    assert_equal(label, torch.full((9,), -1, device=CUDA))
    for t in (count, total, runner):
        assert_equal(t, torch.zeros(9, dtype=torch.int64, device=CUDA))
    g = gen(41)
    labels, votes = make_votes(50, 333, 10, g)
    wide = torch.zeros(50, votes.shape[1] + 3, dtype=torch.uint8, device=CUDA)
    wide[:, 1:-2] = votes
    for a, b in zip(
        _ops.tally(wide[:, 1:-2], 333, 10, None, False), _ops.tally(votes, 333, 10, None, False)
    ):
        assert_equal(a, b)


def test_tally_errors():
    g = gen(51)
    for p in (3, 40):
        labels, _ = make_votes(p, 100, 10, g)
        labels[p - 1, 77] = 13
        votes = torch.stack([ref.pack_labels(labels[i], 16) for i in range(p)])
        with pytest.raises(ValueError, match=f"symbol 13 at position {(p - 1) * 100 + 77}"):
            _ops.tally(votes, 100, 10, None, False)
        with pytest.raises(ValueError, match="weights"):
            _ops.tally(votes, 100, 10, torch.full((p,), -1, device=CUDA), False)
        with pytest.raises(ValueError, match="votes"):
            _ops.tally(votes[:, :-1], 100, 10, None, False)


# --------------------------------------------------------------------------- #
# topk_sparse / topk_sparse_ef
# --------------------------------------------------------------------------- #
def check_topk(x, k, cpu=True):
    idx, val = _ops.topk_sparse(x, k)
    ridx, rval = ref.topk_sparse(x, k)
    assert_equal(idx, ridx)
    same_bits(val, rval)
    if cpu:
        cidx, cval = _ops.topk_sparse(x.cpu(), k)
        assert_equal(idx.cpu(), cidx)
        same_bits(val, cval)


def check_topk_ef(x, residual, k, cpu=True):
    r = residual.clone()
    idx, val = _ops.topk_sparse_ef(x, r, k)
    rr = residual.clone()
    ridx, rval = ref.topk_sparse_ef(x, rr, k)
    assert_equal(idx, ridx)
    same_bits(val, rval)
    same_bits(r, rr)
    if cpu:
        cr = residual.cpu()
        cidx, cval = _ops.topk_sparse_ef(x.cpu(), cr, k)
        assert_equal(idx.cpu(), cidx)
        same_bits(val, cval)
        same_bits(r, cr)


def test_topk_1e8():
    x = torch.randn(100_000_000, device=CUDA, generator=gen(61))
    check_topk(x, 1_000_000, cpu=False)
    residual = torch.randn(100_000_000, device=CUDA, generator=gen(62)) * 0.1
    check_topk_ef(x, residual, 1_000_000, cpu=False)


def test_topk_1e7_against_cpu():
    x = torch.randn(10_000_000, device=CUDA, generator=gen(63))
    check_topk(x, 100_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 7, 1000, 300_001, 5_000_000])
def test_topk_shapes(m, dtype):
    g = gen(m + 3)
    x = torch.randn(m, device=CUDA, generator=g).to(dtype)
    residual = (torch.randn(m, device=CUDA, generator=g) * 0.5).to(dtype)
    for k in sorted({0, 1, m // 1000, m // 10, m // 2, m - 1, m}):
        if 0 <= k <= m:
            check_topk(x, k, cpu=m <= 300_001)
            check_topk_ef(x, residual, k, cpu=m <= 300_001)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_hostile(dtype):
    m = 400_000
    g = gen(71)
    ties = torch.randint(-3, 4, (m,), device=CUDA, generator=g).to(dtype)  # massive ties
    ties[ties == 0] = -0.0
    for k in (1, 1000, 57_000, 200_000):
        check_topk(ties, k)
    zeros = torch.zeros(m, device=CUDA, dtype=dtype)
    zeros[12345] = -2.0
    check_topk(zeros, 10)
    inf = torch.randn(m, device=CUDA, generator=g).to(dtype)
    inf[::1000] = float("inf")
    inf[1::1000] = float("-inf")
    check_topk(inf, 1500)
    # Large values clustered where the strided sample does not look.
    clustered = (torch.randn(m, device=CUDA, generator=g) * 1e-3).to(dtype)
    clustered[100_000:104_000] = torch.linspace(1, 2, 4000, device=CUDA).to(dtype)
    check_topk(clustered, 3000)
    # Non-contiguous and misaligned inputs.
    base = torch.randn(2 * m + 1, device=CUDA, generator=g).to(dtype)
    check_topk(base[::2], 999)
    check_topk(base[1:], 999)
    r = torch.randn(m + 1, device=CUDA, generator=g).to(dtype)
    check_topk_ef(base[1 : m + 1], r[1:], 777)


def test_topk_nan_and_errors():
    x = torch.randn(1_000_000, device=CUDA, generator=gen(81))
    x[654_321] = float("nan")
    x[800_000] = float("nan")
    for k in (0, 5, 1_000_000):
        with pytest.raises(ValueError, match="first at index 654321"):
            _ops.topk_sparse(x, k)
    y = torch.randn(1000, device=CUDA, generator=gen(82))
    r = torch.zeros(1000, device=CUDA)
    y[3] = float("inf")
    r[3] = float("-inf")
    for k in (0, 10, 500, 1000):  # every path; the residual stays as it was
        before = r.clone()
        with pytest.raises(ValueError, match="first at index 3"):
            _ops.topk_sparse_ef(y, r, k)
        same_bits(r, before)
    big = torch.randn(1_000_000, device=CUDA, generator=gen(83))
    big_r = torch.zeros_like(big)
    big_r[999_999] = float("nan")
    with pytest.raises(ValueError, match="first at index 999999"):
        _ops.topk_sparse_ef(big, big_r, 1000)  # the sampled path
    assert bool(big_r[:999_999].eq(0).all())
    with pytest.raises(ValueError, match="k"):
        _ops.topk_sparse(y, 1001)
    with pytest.raises(TypeError, match="x"):
        _ops.topk_sparse(y.int(), 1)
    with pytest.raises(ValueError, match="residual"):
        _ops.topk_sparse_ef(y, torch.zeros(999, device=CUDA), 1)


def test_topk_residual_not_contiguous():
    g = gen(91)
    x = torch.randn(5000, device=CUDA, generator=g)
    buf = torch.randn(10000, device=CUDA, generator=g)
    r = buf[::2]
    expected_r = r.clone()
    ridx, rval = ref.topk_sparse_ef(x, expected_r, 100)
    idx, val = _ops.topk_sparse_ef(x, r, 100)
    assert_equal(idx, ridx)
    same_bits(val, rval)
    same_bits(buf[::2], expected_r)


# --------------------------------------------------------------------------- #
# sparse_merge
# --------------------------------------------------------------------------- #
def sparse_peers(size, ks, dtypes, g):
    idx, val = [], []
    for k, dt in zip(ks, dtypes):
        idx.append(torch.sort(torch.randperm(size, device=CUDA, generator=g)[:k]).values)
        val.append(torch.randn(k, device=CUDA, generator=g).to(dt))
    return idx, val


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32,) * 4,
        (torch.float16, torch.bfloat16, torch.float32, torch.float16),
        (torch.float32, torch.float64, torch.bfloat16, torch.float32),
    ],
)
@pytest.mark.parametrize("with_counts", [False, True])
def test_sparse_merge(dtypes, with_counts):
    size = 3_000_000
    g = gen(101)
    idx, val = sparse_peers(size, (1_000_000, 0, 30_000, 2_999_999), dtypes, g)
    counts = torch.tensor([3, 0, 11, 7]) if with_counts else None
    out = _ops.sparse_merge(idx, val, size, counts)
    expected = ref.sparse_merge(idx, val, size, counts)
    same_bits(out, expected)
    cpu = _ops.sparse_merge([i.cpu() for i in idx], [v.cpu() for v in val], size, counts)
    same_bits(out, cpu)
    again = _ops.sparse_merge(idx, val, size, counts)
    same_bits(out, again)


def test_sparse_merge_one_peer_and_errors():
    g = gen(102)
    idx, val = sparse_peers(1000, (100,), (torch.float32,), g)
    same_bits(_ops.sparse_merge(idx, val, 1000, None), ref.sparse_merge(idx, val, 1000))
    bad = [idx[0].clone(), idx[0].clone()]
    bad[1][10] = bad[1][9]
    with pytest.raises(ValueError, match=r"indices\[1\] must be strictly increasing"):
        _ops.sparse_merge(bad, [val[0], val[0]], 1000, None)
    with pytest.raises(ValueError, match=r"indices\[0\] must lie in"):
        _ops.sparse_merge(idx, val, int(idx[0][-1]), None)
    with pytest.raises(TypeError, match=r"indices\[0\]"):
        _ops.sparse_merge([idx[0].int()], val, 1000, None)
    with pytest.raises(ValueError, match="counts"):
        _ops.sparse_merge(idx, val, 1000, torch.tensor([0]))


# --------------------------------------------------------------------------- #
# opcheck: schema, fake tensors, aot dispatch, on CUDA tensors
# --------------------------------------------------------------------------- #
def _opcheck_cases():
    g = gen(111)
    logits = torch.randn(37, 1000, device=CUDA, generator=g)
    labels = torch.randint(0, 1000, (37,), device=CUDA, generator=g)
    packed = ref.pack_labels(labels, 1000)
    _, votes = make_votes(40, 50, 10, g)
    x = torch.randn(5000, device=CUDA, generator=g)
    idx, val = sparse_peers(100, (10, 20), (torch.float32, torch.float16), g)
    return [
        (_ops.pack_argmax.default, (logits, True, 0.2)),
        (_ops.pack_argmax.default, (logits.bfloat16(), False, None)),
        (_ops.pack_labels.default, (labels, 1000)),
        (_ops.unpack_labels.default, (packed, 37, 1000)),
        (
            _ops.tally.default,
            (votes, 50, 10, torch.ones(40, dtype=torch.int64, device=CUDA), False),
        ),
        (_ops.topk_sparse.default, (x, 50)),
        (_ops.topk_sparse_ef.default, (x, torch.randn(5000, device=CUDA, generator=g), 50)),
        (_ops.sparse_merge.default, (idx, val, 100, torch.tensor([1, 2]))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
