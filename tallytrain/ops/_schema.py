"""Every op declared once: its torch.library schema, the reference as the
default kernel (CompositeExplicitAutograd, so it serves any device), and a fake
kernel for meta/fake tensors. The native extension later registers CPU and CUDA
kernels for the same names; a backend kernel takes precedence over the default.
"""

from __future__ import annotations

import torch

from . import reference as ref

NAMESPACE = "tallytrain"

SCHEMAS = {
    "pack_argmax": "pack_argmax(Tensor logits, bool return_prob=False, float? abstain_below=None) -> (Tensor, Tensor)",
    "pack_labels": "pack_labels(Tensor labels, int num_symbols) -> Tensor",
    "unpack_labels": "unpack_labels(Tensor packed, int n, int num_symbols) -> Tensor",
    "tally": "tally(Tensor votes, int n, int num_classes, Tensor? weights=None, bool abstain=False) -> (Tensor, Tensor, Tensor, Tensor)",
    "topk_sparse": "topk_sparse(Tensor x, int k) -> (Tensor, Tensor)",
    "topk_sparse_ef": "topk_sparse_ef(Tensor x, Tensor(a!) residual, int k) -> (Tensor, Tensor)",
    "sparse_merge": "sparse_merge(Tensor[] indices, Tensor[] values, int size, Tensor? counts=None) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(ref, _name), "CompositeExplicitAutograd")


# ---- fake kernels: shapes and dtypes only, no data-dependent checks -------- #
@torch.library.register_fake(f"{NAMESPACE}::pack_argmax")
def _pack_argmax_fake(logits, return_prob=False, abstain_below=None):
    ref.check_logits(logits)
    n, c = logits.shape
    s = c + 1 if abstain_below is not None else c
    packed = logits.new_empty(ref.packed_size(n, s), dtype=torch.uint8)
    prob = logits.new_empty(n if return_prob else 0, dtype=torch.float32)
    return packed, prob


@torch.library.register_fake(f"{NAMESPACE}::pack_labels")
def _pack_labels_fake(labels, num_symbols):
    return labels.new_empty(ref.packed_size(labels.shape[0], num_symbols), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::unpack_labels")
def _unpack_labels_fake(packed, n, num_symbols):
    return packed.new_empty(n, dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::tally")
def _tally_fake(votes, n, num_classes, weights=None, abstain=False):
    return tuple(votes.new_empty(n, dtype=torch.int64) for _ in range(4))


@torch.library.register_fake(f"{NAMESPACE}::topk_sparse")
def _topk_sparse_fake(x, k):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k)


@torch.library.register_fake(f"{NAMESPACE}::topk_sparse_ef")
def _topk_sparse_ef_fake(x, residual, k):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k)


@torch.library.register_fake(f"{NAMESPACE}::sparse_merge")
def _sparse_merge_fake(indices, values, size, counts=None):
    device = indices[0].device if len(indices) else torch.device("cpu")
    return torch.empty(size, dtype=ref.merge_dtype(values), device=device)
