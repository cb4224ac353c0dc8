"""tallytrain's accelerated ops (docs/design.md §3).

Each op is also ``torch.ops.tallytrain.<name>``; these wrappers only give it a
Pythonic signature. Which kernel runs is decided by the dispatcher: the native
CPU/CUDA kernel where the extension registered one, else the reference.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _schema  # noqa: F401  (declares the ops)
from . import _backend
from .reference import bits_for, packed_size

_backend.load()
backend_info = _backend.backend_info
_ops = torch.ops.tallytrain

__all__ = [
    "bits_for", "packed_size", "pack_argmax", "pack_labels", "unpack_labels",
    "tally", "Tally", "topk_sparse", "topk_sparse_ef", "sparse_merge", "backend_info",
]


class Tally(NamedTuple):
    label: torch.Tensor      # int64[N]: plurality class, -1 where no support
    count: torch.Tensor      # int64[N]: the winner's summed weight
    total: torch.Tensor      # int64[N]: summed weight of non-abstaining peers
    runner_up: torch.Tensor  # int64[N]: largest count among the other classes


def pack_argmax(logits: torch.Tensor, *, return_prob: bool = False,
                abstain_below: Optional[float] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Pack ``logits.argmax(-1)`` into bits_for(C) bits per row, fused.

    return_prob: also return each row's top-1 softmax probability (float32).
    abstain_below: rows whose top-1 probability is not >= this value emit the
    abstain symbol C; the stream then uses bits_for(C + 1) bits per row.
    """
    packed, prob = _ops.pack_argmax(logits, return_prob,
                                    None if abstain_below is None else float(abstain_below))
    return (packed, prob) if return_prob else packed


def pack_labels(labels: torch.Tensor, num_symbols: int) -> torch.Tensor:
    """Pack integer labels in 0..num_symbols-1 into a uint8 stream."""
    return _ops.pack_labels(labels, int(num_symbols))


def unpack_labels(packed: torch.Tensor, n: int, num_symbols: int) -> torch.Tensor:
    """Inverse of pack_labels: int64[n]."""
    return _ops.unpack_labels(packed, int(n), int(num_symbols))


def tally(votes: Union[torch.Tensor, Sequence[torch.Tensor]], n: int, num_classes: int, *,
          weights: Optional[Union[torch.Tensor, Sequence[int]]] = None,
          abstain: bool = False) -> Tally:
    """Weighted plurality vote per probe over P packed streams ([P, bytes] or a list)."""
    if not isinstance(votes, torch.Tensor):
        votes = torch.stack(list(votes)) if len(votes) else torch.empty(0, 0, dtype=torch.uint8)
    if weights is not None and not isinstance(weights, torch.Tensor):
        weights = torch.tensor(list(weights), dtype=torch.int64, device=votes.device)
    return Tally(*_ops.tally(votes, int(n), int(num_classes), weights, bool(abstain)))


def topk_sparse(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices ascending, values) of the k largest |x|; ties to the lower index."""
    return _ops.topk_sparse(x, int(k))


def topk_sparse_ef(x: torch.Tensor, residual: torch.Tensor, k: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """top-k of x + residual; the unsent remainder is left in residual (in place)."""
    return _ops.topk_sparse_ef(x, residual, int(k))


def sparse_merge(indices: Union[torch.Tensor, Sequence[torch.Tensor]],
                 values: Union[torch.Tensor, Sequence[torch.Tensor]], size: int, *,
                 counts: Optional[Union[torch.Tensor, Sequence[int]]] = None) -> torch.Tensor:
    """Dense sum of peers' sparse vectors, or with ``counts`` their weighted average.

    indices/values: one 1-D tensor per peer (a list, or a [P, k] tensor, or a
    single 1-D tensor for one peer). Each peer's indices strictly increasing."""
    indices = _as_list(indices)
    values = _as_list(values)
    if counts is not None and not isinstance(counts, torch.Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int64)
    return _ops.sparse_merge(indices, values, int(size), counts)


def _as_list(t):
    if isinstance(t, torch.Tensor):
        return [t] if t.dim() == 1 else list(t.unbind(0))
    return list(t)
