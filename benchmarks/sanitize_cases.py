"""Every CUDA kernel path of tallytrain at small sizes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 1 python benchmarks/sanitize_cases.py

(without the caching allocator every tensor is its own allocation, so a read
past a tensor's end is caught). Each case also checks its result against the
reference, so the script fails on a wrong answer as well as on a bad access.
"""

from __future__ import annotations

import sys

import torch

import tallytrain.ops as ops
from tallytrain.ops import reference as ref

DEV = "cuda"
_ops = torch.ops.tallytrain


def expect_equal(name, got, want):
    if isinstance(got, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want)):
            expect_equal(f"{name}[{i}]", g, w)
        return
    if got.is_floating_point():
        ok = torch.equal(got.isnan(), want.isnan()) and torch.allclose(
            got.nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-6
        )
    else:
        ok = torch.equal(got, want)
    if not ok:
        raise AssertionError(f"{name}: CUDA result differs from the reference")


def expect_error(name, fn, *args):
    try:
        fn(*args)
    except ValueError:
        return
    raise AssertionError(f"{name}: expected ValueError")


def pack_argmax_cases(g):
    # (rows, cols): staged with 1, 2 and 4 lanes a row, a warp a row, split rows
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, c in ((37, 3), (33, 50), (65, 100), (40, 3000), (300, 5000), (2, 20000)):
            x = (torch.randn(n, c, device=DEV, generator=g) * 3).to(dtype)
            x[0, c // 2] = float("nan")
            flat = torch.empty(n * c + 1, device=DEV, dtype=dtype)
            flat[1:] = x.reshape(-1)
            for logits in (x, flat[1:].view(n, c)):
                expect_equal(
                    f"pack_argmax {n}x{c} {dtype}",
                    _ops.pack_argmax(logits, True, None),
                    ref.pack_argmax(logits, True, None),
                )
            _ops.pack_argmax(x, False, 0.5)


def label_cases(g):
    for s in (2, 10, 1000, 65537, 2**32):
        for n in (1, 31, 33, 1001):
            labels = torch.randint(0, s, (n,), device=DEV, generator=g)
            packed = _ops.pack_labels(labels, s)
            expect_equal(f"pack_labels {n} {s}", packed, ref.pack_labels(labels, s))
            expect_equal(f"unpack_labels {n} {s}", _ops.unpack_labels(packed, n, s), labels)
    bad = torch.arange(100, device=DEV)
    expect_error("pack_labels out of range", _ops.pack_labels, bad, 50)
    expect_error("unpack_labels bad symbol", _ops.unpack_labels, ref.pack_labels(bad, 128), 100, 99)


def tally_cases(g):
    # small P; large P with a class-indexed table, a hash table, and global
    # (unstaged) tables
    for p, n, c, abstain in (
        (3, 333, 10, False),
        (20, 257, 50257, True),
        (40, 129, 1000, True),
        (100, 77, 50257, False),
        (2500, 9, 1 << 20, False),
    ):
        s = c + 1 if abstain else c
        labels = torch.randint(0, s, (p, n), device=DEV, generator=g)
        votes = torch.stack([ref.pack_labels(labels[i], s) for i in range(p)])
        weights = torch.randint(0, 3, (p,), device=DEV, generator=g)
        expect_equal(
            f"tally P={p} C={c}",
            _ops.tally(votes, n, c, weights, abstain),
            ref.tally(votes, n, c, weights, abstain),
        )
    labels = torch.randint(0, 10, (40, 50), device=DEV, generator=g)
    labels[3, 7] = 12
    votes = torch.stack([ref.pack_labels(labels[i], 16) for i in range(40)])
    expect_error("tally bad symbol", _ops.tally, votes, 50, 10, None, False)


def topk_cases(g):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # 300_001 > 2**18: a strided sample (float32 only, to keep the run short)
        for m in (1, 1000, 50_000) + ((300_001,) if dtype == torch.float32 else ()):
            x = torch.randn(m, device=DEV, generator=g).to(dtype)
            for k in sorted({0, 1, m // 100, m // 2, m}):
                expect_equal(
                    f"topk m={m} k={k} {dtype}", _ops.topk_sparse(x, k), ref.topk_sparse(x, k)
                )
                r = torch.randn(m, device=DEV, generator=g).to(dtype)
                r2 = r.clone()
                expect_equal(
                    f"topk_ef m={m} k={k} {dtype}",
                    _ops.topk_sparse_ef(x, r, k),
                    ref.topk_sparse_ef(x, r2, k),
                )
                expect_equal(f"topk_ef residual m={m} k={k} {dtype}", r, r2)
        ties = torch.randint(-2, 3, (50_001,), device=DEV, generator=g).to(dtype)[1:]
        expect_equal(f"topk ties {dtype}", _ops.topk_sparse(ties, 777), ref.topk_sparse(ties, 777))
    x = torch.randn(5000, device=DEV, generator=g)
    x[17] = float("nan")
    expect_error("topk NaN", _ops.topk_sparse, x, 10)


def merge_cases(g):
    size = 10_000
    idx = [
        torch.sort(torch.randperm(size, device=DEV, generator=g)[:k]).values for k in (100, 0, 5000)
    ]
    val = [
        torch.randn(i.numel(), device=DEV, generator=g).to(dt)
        for i, dt in zip(idx, (torch.float16, torch.float32, torch.float64))
    ]
    for counts in (None, torch.tensor([1, 2, 3])):
        expect_equal(
            "sparse_merge",
            _ops.sparse_merge(idx, val, size, counts),
            ref.sparse_merge(idx, val, size, counts),
        )
    bad = [idx[2].flip(0)]
    expect_error("sparse_merge order", _ops.sparse_merge, bad, [val[2]], size, None)


def main() -> int:
    info = ops.backend_info()
    if info["cuda"] != "native":
        print(f"CUDA kernels are not native: {info}", file=sys.stderr)
        return 1
    g = torch.Generator(device=DEV).manual_seed(0)
    for case in (pack_argmax_cases, label_cases, tally_cases, topk_cases, merge_cases):
        case(g)
        torch.cuda.synchronize()
        print(f"{case.__name__}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
