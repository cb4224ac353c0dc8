"""torch.library.opcheck on every op: the schema (including the declared
mutation of topk_sparse_ef's residual), the fake kernels, autograd
registration and AOT dispatch, each over several sample inputs."""

from __future__ import annotations

import pytest
import torch

from tallytrain.ops import reference as ref
from tallytrain.ops._schema import SCHEMAS

OPS = torch.ops.tallytrain
EMULATED_CUDA = False  # opcheck needs the fake kernels, registered for torch.ops.tallytrain only


def _votes(peers, n, num_symbols, gen, device):
    labels = torch.randint(num_symbols, (peers, n), generator=gen)
    return torch.stack([ref.pack_labels(row, num_symbols) for row in labels]).to(device)


def samples(device):
    """(id, op, args, kwargs) for every op, several inputs each."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    def sparse(size, k):
        return torch.randperm(size, generator=gen)[:k].sort().values.to(device), randn(k)

    yield "pack_argmax-fp32", OPS.pack_argmax.default, (randn(9, 10),), {}
    yield (
        "pack_argmax-fp16-prob",
        OPS.pack_argmax.default,
        (randn(33, 257, dtype=torch.float16), True),
        {},
    )
    yield (
        "pack_argmax-bf16-abstain",
        OPS.pack_argmax.default,
        (randn(7, 3, dtype=torch.bfloat16), True, 0.5),
        {},
    )
    yield "pack_argmax-empty", OPS.pack_argmax.default, (randn(0, 65537), False, 0.0), {}

    labels = torch.randint(1000, (77,), generator=gen).to(device)
    yield "pack_labels-int64", OPS.pack_labels.default, (labels, 1000), {}
    yield "pack_labels-uint8", OPS.pack_labels.default, (labels[:9].to(torch.uint8) % 2, 2), {}
    yield "pack_labels-empty", OPS.pack_labels.default, (labels[:0], 65537), {}

    for num_symbols, n in ((10, 77), (2, 9), (65537, 3), (257, 0)):
        packed = ref.pack_labels(torch.randint(num_symbols, (n,), generator=gen), num_symbols).to(
            device
        )
        yield (
            f"unpack_labels-S{num_symbols}-N{n}",
            OPS.unpack_labels.default,
            (packed, n, num_symbols),
            {},
        )

    yield "tally", OPS.tally.default, (_votes(5, 40, 10, gen, device), 40, 10), {}
    yield (
        "tally-weights-abstain",
        OPS.tally.default,
        (_votes(4, 9, 257, gen, device), 9, 256),
        {"weights": torch.tensor([1, 0, 2, 3], device=device), "abstain": True},
    )
    yield "tally-one-peer", OPS.tally.default, (_votes(1, 8, 2, gen, device), 8, 2), {}

    yield "topk_sparse", OPS.topk_sparse.default, (randn(100), 10), {}
    yield "topk_sparse-fp16-all", OPS.topk_sparse.default, (randn(9, dtype=torch.float16), 9), {}
    yield "topk_sparse-k0", OPS.topk_sparse.default, (randn(5, dtype=torch.bfloat16), 0), {}

    yield "topk_sparse_ef", OPS.topk_sparse_ef.default, (randn(100), randn(100), 7), {}
    yield (
        "topk_sparse_ef-fp64",
        OPS.topk_sparse_ef.default,
        (randn(31, dtype=torch.float64), randn(31, dtype=torch.float64), 31),
        {},
    )

    (i0, v0), (i1, v1) = sparse(50, 5), sparse(50, 20)
    yield "sparse_merge", OPS.sparse_merge.default, ([i0, i1], [v0, v1], 50), {}
    yield (
        "sparse_merge-counts",
        OPS.sparse_merge.default,
        ([i0, i1], [v0.half(), v1.double()], 50),
        {"counts": torch.tensor([3, 1])},
    )
    yield "sparse_merge-one-peer", OPS.sparse_merge.default, ([i1], [v1], 64), {}


SAMPLE_NAMES = [name for name, *_ in samples("cpu")]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_opcheck(name, device):
    op, args, kwargs = {n: rest for n, *rest in samples(device)}[name]
    torch.library.opcheck(op, args, kwargs)


def test_every_op_has_samples():
    covered = {op._schema.name.split("::")[1] for _, op, _, _ in samples("cpu")}
    assert covered == set(SCHEMAS)
