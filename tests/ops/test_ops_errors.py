"""Bad inputs: every op raises TypeError for a wrong dtype and ValueError for
anything else, with a message that names the argument at fault.

The cases call the dispatched ops, so each backend that serves (the native
kernels, or the reference in a TALLYTRAIN_BACKEND=reference run) is checked.
"""

from __future__ import annotations

import re

import pytest
import torch

import tallytrain.ops as ops

NAN = float("nan")
INF = float("inf")


def _u8(values, device):
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _i64(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def _f32(values, device):
    return torch.tensor(values, dtype=torch.float32, device=device)


def _nan_at(size, index, device):
    x = torch.linspace(-1, 1, size, device=device)
    x[index] = NAN
    return x


def case(call, error, name, id):
    """`call(device)` must raise `error` with `name` as a word in the message."""
    return pytest.param(call, error, name, id=id)


PACK_ARGMAX = [
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 4, dtype=torch.int32, device=d)),
        TypeError,
        "logits",
        "pack_argmax-int-logits",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 4, dtype=torch.float64, device=d)),
        TypeError,
        "logits",
        "pack_argmax-float64-logits",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(4, device=d)), ValueError, "logits", "pack_argmax-1d"
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(2, 3, 4, device=d)),
        ValueError,
        "logits",
        "pack_argmax-3d",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 1, device=d)),
        ValueError,
        "logits",
        "pack_argmax-C1",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 0, device=d)),
        ValueError,
        "logits",
        "pack_argmax-C0",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 4, device=d), abstain_below=-0.5),
        ValueError,
        "abstain_below",
        "pack_argmax-threshold-negative",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 4, device=d), abstain_below=1.5),
        ValueError,
        "abstain_below",
        "pack_argmax-threshold-above-1",
    ),
    case(
        lambda d: ops.pack_argmax(torch.zeros(3, 4, device=d), abstain_below=NAN),
        ValueError,
        "abstain_below",
        "pack_argmax-threshold-nan",
    ),
]

PACK_LABELS = [
    case(
        lambda d: ops.pack_labels(torch.zeros(3, device=d), 4),
        TypeError,
        "labels",
        "pack_labels-float",
    ),
    case(
        lambda d: ops.pack_labels(torch.zeros(3, dtype=torch.bool, device=d), 4),
        TypeError,
        "labels",
        "pack_labels-bool",
    ),
    case(
        lambda d: ops.pack_labels(torch.zeros(2, 3, dtype=torch.int64, device=d), 4),
        ValueError,
        "labels",
        "pack_labels-2d",
    ),
    case(
        lambda d: ops.pack_labels(_i64([0, 1], d), 1),
        ValueError,
        "num_symbols",
        "pack_labels-one-symbol",
    ),
    case(
        lambda d: ops.pack_labels(_i64([0, 1], d), 0),
        ValueError,
        "num_symbols",
        "pack_labels-no-symbols",
    ),
    case(
        lambda d: ops.pack_labels(_i64([0, 1], d), 2**32 + 1),
        ValueError,
        "num_symbols",
        "pack_labels-too-many-symbols",
    ),
    case(
        lambda d: ops.pack_labels(_i64([0, 1, 9, 10, 2], d), 10),
        ValueError,
        "labels",
        "pack_labels-label-equal-num-symbols",
    ),
    case(
        lambda d: ops.pack_labels(_i64([0, -1, 2], d), 10),
        ValueError,
        "labels",
        "pack_labels-negative-label",
    ),
    case(
        lambda d: ops.pack_labels(torch.tensor([3, -128], dtype=torch.int8, device=d), 4),
        ValueError,
        "labels",
        "pack_labels-negative-int8",
    ),
]

UNPACK_LABELS = [
    case(
        lambda d: ops.unpack_labels(torch.zeros(3, dtype=torch.int32, device=d), 5, 10),
        TypeError,
        "packed",
        "unpack-int32-buffer",
    ),
    case(
        lambda d: ops.unpack_labels(torch.zeros(1, 3, dtype=torch.uint8, device=d), 5, 10),
        ValueError,
        "packed",
        "unpack-2d-buffer",
    ),
    # 5 symbols of 4 bits need exactly 3 bytes.
    case(
        lambda d: ops.unpack_labels(_u8([0, 0], d), 5, 10),
        ValueError,
        "packed",
        "unpack-short-buffer",
    ),
    case(
        lambda d: ops.unpack_labels(_u8([0, 0, 0, 0], d), 5, 10),
        ValueError,
        "packed",
        "unpack-long-buffer",
    ),
    case(
        lambda d: ops.unpack_labels(_u8([0], d), 0, 10),
        ValueError,
        "packed",
        "unpack-bytes-for-no-symbols",
    ),
    case(
        lambda d: ops.unpack_labels(_u8([0, 0, 0], d), 5, 1),
        ValueError,
        "num_symbols",
        "unpack-one-symbol",
    ),
    case(
        lambda d: ops.unpack_labels(_u8([0, 0, 0], d), -1, 10), ValueError, "n", "unpack-negative-n"
    ),
    # C=10 uses 4-bit symbols; 0xC3 holds symbol 3 then symbol 12.
    case(
        lambda d: ops.unpack_labels(_u8([0xC3], d), 2, 10),
        ValueError,
        "packed",
        "unpack-symbol-12-of-10",
    ),
    # 9-bit symbols (257 classes): symbol 0, then 0x1FF = 511.
    case(
        lambda d: ops.unpack_labels(_u8([0x00, 0xFE, 0x03], d), 2, 257),
        ValueError,
        "packed",
        "unpack-symbol-511-of-257",
    ),
]

TALLY = [
    case(
        lambda d: ops.tally(torch.zeros(2, 3, device=d), 5, 10),
        TypeError,
        "votes",
        "tally-float-votes",
    ),
    case(lambda d: ops.tally(_u8([0, 0, 0], d), 5, 10), ValueError, "votes", "tally-1d-votes"),
    case(
        lambda d: ops.tally(torch.zeros(2, 1, 3, dtype=torch.uint8, device=d), 5, 10),
        ValueError,
        "votes",
        "tally-3d-votes",
    ),
    case(
        lambda d: ops.tally(torch.zeros(2, 3, dtype=torch.uint8, device=d), 5, 1),
        ValueError,
        "num_classes",
        "tally-one-class",
    ),
    case(
        lambda d: ops.tally(torch.zeros(2, 2, dtype=torch.uint8, device=d), 5, 10),
        ValueError,
        "votes",
        "tally-short-rows",
    ),
    case(
        lambda d: ops.tally(torch.zeros(2, 4, dtype=torch.uint8, device=d), 5, 10),
        ValueError,
        "votes",
        "tally-long-rows",
    ),
    # With abstention C=16 needs 5-bit symbols: 5 probes need 4 bytes, not 3.
    case(
        lambda d: ops.tally(torch.zeros(2, 3, dtype=torch.uint8, device=d), 5, 16, abstain=True),
        ValueError,
        "votes",
        "tally-abstain-width",
    ),
    case(
        lambda d: ops.tally(torch.zeros(2, 3, dtype=torch.uint8, device=d), -1, 10),
        ValueError,
        "n",
        "tally-negative-n",
    ),
    case(
        lambda d: ops.tally(_u8([[0x11], [0xC3]], d), 2, 10),
        ValueError,
        "votes",
        "tally-symbol-12-of-10",
    ),
    # Symbol 10 is "abstain" only with abstain=True; symbol 11 never is.
    case(
        lambda d: ops.tally(_u8([[0x11], [0xA1]], d), 2, 10),
        ValueError,
        "votes",
        "tally-abstain-symbol-without-abstain",
    ),
    case(
        lambda d: ops.tally(_u8([[0x11], [0xB1]], d), 2, 10, abstain=True),
        ValueError,
        "votes",
        "tally-symbol-11-with-abstain",
    ),
    case(
        lambda d: ops.tally(
            torch.zeros(3, 1, dtype=torch.uint8, device=d), 2, 10, weights=_i64([1, -2, 1], d)
        ),
        ValueError,
        "weights",
        "tally-negative-weight",
    ),
    case(
        lambda d: ops.tally(
            torch.zeros(3, 1, dtype=torch.uint8, device=d), 2, 10, weights=_i64([1, 1], d)
        ),
        ValueError,
        "weights",
        "tally-short-weights",
    ),
    case(
        lambda d: ops.tally(
            torch.zeros(3, 1, dtype=torch.uint8, device=d), 2, 10, weights=_i64([1, 1, 1, 1], d)
        ),
        ValueError,
        "weights",
        "tally-long-weights",
    ),
    case(
        lambda d: ops.tally(
            torch.zeros(3, 1, dtype=torch.uint8, device=d),
            2,
            10,
            weights=torch.ones(3, 1, dtype=torch.int64, device=d),
        ),
        ValueError,
        "weights",
        "tally-2d-weights",
    ),
    case(
        lambda d: ops.tally(
            torch.zeros(3, 1, dtype=torch.uint8, device=d), 2, 10, weights=torch.ones(3, device=d)
        ),
        TypeError,
        "weights",
        "tally-float-weights",
    ),
]

TOPK = [
    case(lambda d: ops.topk_sparse(torch.arange(5, device=d), 2), TypeError, "x", "topk-int-x"),
    case(lambda d: ops.topk_sparse(torch.zeros(2, 3, device=d), 2), ValueError, "x", "topk-2d-x"),
    case(lambda d: ops.topk_sparse(torch.zeros(5, device=d), 6), ValueError, "k", "topk-k-above-M"),
    case(
        lambda d: ops.topk_sparse(torch.zeros(5, device=d), -1), ValueError, "k", "topk-negative-k"
    ),
    case(
        lambda d: ops.topk_sparse(torch.zeros(0, device=d), 1), ValueError, "k", "topk-k-of-empty"
    ),
    case(lambda d: ops.topk_sparse(_f32([1, NAN, 3, 4], d), 2), ValueError, "x", "topk-nan"),
    case(
        lambda d: ops.topk_sparse(_f32([1, 2, 3, NAN], d).half(), 1),
        ValueError,
        "x",
        "topk-nan-float16",
    ),
    case(
        lambda d: ops.topk_sparse(torch.tensor([NAN] + [1.0] * 3000, device=d), 3001),
        ValueError,
        "x",
        "topk-nan-k-equals-M",
    ),
    # Large M and small k: the CUDA kernel's sampled path meets the NaN.
    case(
        lambda d: ops.topk_sparse(_nan_at(50_000, 31_337, d), 10),
        ValueError,
        "x",
        "topk-nan-sampled",
    ),
]

TOPK_EF = [
    case(
        lambda d: ops.topk_sparse_ef(torch.zeros(5, device=d), torch.zeros(4, device=d), 2),
        ValueError,
        "residual",
        "ef-residual-shape",
    ),
    case(
        lambda d: ops.topk_sparse_ef(
            torch.zeros(5, device=d), torch.zeros(5, dtype=torch.float64, device=d), 2
        ),
        ValueError,
        "residual",
        "ef-residual-dtype",
    ),
    case(
        lambda d: ops.topk_sparse_ef(torch.arange(5, device=d), torch.arange(5, device=d), 2),
        TypeError,
        "x",
        "ef-int-x",
    ),
    case(
        lambda d: ops.topk_sparse_ef(torch.zeros(5, device=d), torch.zeros(5, device=d), 6),
        ValueError,
        "k",
        "ef-k-above-M",
    ),
    case(
        lambda d: ops.topk_sparse_ef(torch.zeros(5, device=d), torch.zeros(5, device=d), -1),
        ValueError,
        "k",
        "ef-negative-k",
    ),
    case(
        lambda d: ops.topk_sparse_ef(_f32([1, NAN, 0], d), torch.zeros(3, device=d), 1),
        ValueError,
        "x",
        "ef-nan-in-x",
    ),
    case(
        lambda d: ops.topk_sparse_ef(torch.zeros(3, device=d), _f32([0, 0, NAN], d), 1),
        ValueError,
        "residual",
        "ef-nan-in-residual",
    ),
    case(
        lambda d: ops.topk_sparse_ef(_f32([1, INF, 0], d), _f32([0, -INF, 0], d), 1),
        ValueError,
        "residual",
        "ef-inf-minus-inf",
    ),
    case(
        lambda d: ops.topk_sparse_ef(torch.ones(50_000, device=d), _nan_at(50_000, 49_999, d), 10),
        ValueError,
        "residual",
        "ef-nan-in-residual-sampled",
    ),
]

SPARSE_MERGE = [
    case(
        lambda d: ops.sparse_merge([_i64([1, 3, 2], d)], [_f32([1, 1, 1], d)], 5),
        ValueError,
        "indices",
        "merge-not-increasing",
    ),
    case(
        lambda d: ops.sparse_merge(
            [_i64([0, 1], d), _i64([1, 1], d)], [_f32([1, 1], d), _f32([1, 1], d)], 5
        ),
        ValueError,
        "indices",
        "merge-duplicate-index",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1, 5], d)], [_f32([1, 1], d)], 5),
        ValueError,
        "indices",
        "merge-index-equal-size",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([-1, 2], d)], [_f32([1, 1], d)], 5),
        ValueError,
        "indices",
        "merge-negative-index",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1], d)], [], 5),
        ValueError,
        "indices",
        "merge-peer-count-mismatch",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1, 2], d)], [_f32([1], d)], 5),
        ValueError,
        "values",
        "merge-length-mismatch",
    ),
    case(
        lambda d: ops.sparse_merge(
            [torch.tensor([1, 2], dtype=torch.int32, device=d)], [_f32([1, 1], d)], 5
        ),
        TypeError,
        "indices",
        "merge-int32-indices",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1, 2], d)], [_i64([1, 1], d)], 5),
        TypeError,
        "values",
        "merge-int-values",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1, 2], d)], [_f32([1, 1], d)], -1),
        ValueError,
        "size",
        "merge-negative-size",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1, 2], d)] * 2, [_f32([1, 1], d)] * 2, 5, counts=[1, -1]),
        ValueError,
        "counts",
        "merge-negative-count",
    ),
    case(
        lambda d: ops.sparse_merge([_i64([1, 2], d)] * 2, [_f32([1, 1], d)] * 2, 5, counts=[0, 0]),
        ValueError,
        "counts",
        "merge-zero-count-sum",
    ),
    case(
        lambda d: ops.sparse_merge(
            [_i64([1, 2], d)] * 2, [_f32([1, 1], d)] * 2, 5, counts=[1, 2, 3]
        ),
        ValueError,
        "counts",
        "merge-counts-length",
    ),
    case(
        lambda d: ops.sparse_merge(
            [_i64([1, 2], d)] * 2, [_f32([1, 1], d)] * 2, 5, counts=torch.tensor([1.0, 2.0])
        ),
        TypeError,
        "counts",
        "merge-float-counts",
    ),
]


@pytest.mark.parametrize(
    "call,error,name",
    PACK_ARGMAX + PACK_LABELS + UNPACK_LABELS + TALLY + TOPK + TOPK_EF + SPARSE_MERGE,
)
def test_bad_input_raises_naming_the_argument(call, error, name, device):
    with pytest.raises(error) as info:
        call(device)
    # The exact class, not merely a subclass of it.
    assert type(info.value) is error, type(info.value)
    message = str(info.value)
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message), message


@pytest.mark.parametrize("size", [4, 50_000])
def test_topk_sparse_ef_leaves_residual_on_error(size, device):
    # A failed call must not have half-updated the residual, on the direct
    # path (small M) or the sampled one (large M, small k).
    x = torch.linspace(-3, 3, size, device=device)
    residual = torch.linspace(1, 2, size, device=device)
    x[size * 3 // 4], residual[size * 3 // 4] = INF, -INF
    before = residual.clone()
    with pytest.raises(ValueError):
        ops.topk_sparse_ef(x, residual, 2)
    torch.testing.assert_close(residual, before, rtol=0, atol=0, equal_nan=True)
