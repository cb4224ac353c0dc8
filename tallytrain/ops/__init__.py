"""tallytrain's accelerated ops (docs/design.md §3).

Each op is also ``torch.ops.tallytrain.<name>``; these wrappers only give it a
Pythonic signature. Which kernel runs is decided by the dispatcher: the native
CPU/CUDA kernel where the extension registered one, else the reference
(tallytrain.ops.reference, the specification). ``backend_info()`` says which
serves (docs/ops.md has every op's contract, tolerances and the backends).

Votes are classes packed into b = ``bits_for(S)`` bits each, for a stream of
S symbols: S = C classes, or C + 1 where peers may abstain (the abstain
symbol is C, one past the last class).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import torch

from . import _schema  # noqa: F401  (declares the ops)
from . import _backend
from .reference import bits_for, packed_size

_backend.load()
backend_info = _backend.backend_info
_ops = torch.ops.tallytrain

__all__ = [
    "bits_for",
    "packed_size",
    "pack_argmax",
    "pack_labels",
    "unpack_labels",
    "tally",
    "Tally",
    "topk_sparse",
    "topk_sparse_ef",
    "sparse_merge",
    "backend_info",
]


class Tally(NamedTuple):
    """One entry per probe (int64 [N] each); see :func:`tally`."""

    label: torch.Tensor  # the plurality class, -1 where no weighted support
    count: torch.Tensor  # type: ignore[assignment]  # the winner's summed weight (0 where label is -1)
    total: torch.Tensor  # summed weight of the peers that did not abstain
    runner_up: torch.Tensor  # largest summed weight among the other classes


@overload
def pack_argmax(
    logits: torch.Tensor,
    *,
    return_prob: Literal[False] = False,
    abstain_below: Optional[float] = None,
) -> torch.Tensor: ...


@overload
def pack_argmax(
    logits: torch.Tensor, *, return_prob: Literal[True], abstain_below: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]: ...


@overload
def pack_argmax(
    logits: torch.Tensor, *, return_prob: bool, abstain_below: Optional[float] = None
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]: ...


def pack_argmax(
    logits: torch.Tensor, *, return_prob: bool = False, abstain_below: Optional[float] = None
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Each row's ``logits.argmax(-1)``, packed into a stream of b-bit symbols
    (b = ``bits_for(C)``), in one pass that never builds the N indices.

    Args:
        logits: float32, float16 or bfloat16 ``[N, C]``, 2 <= C < 2**32, on
            the CPU or a CUDA device; any strides.
        return_prob: also return each row's top-1 softmax probability,
            ``1 / sum_j exp(x_j - max_j x)`` as float32 ``[N]`` (NaN where
            ``torch.softmax`` is: a row holding NaN or +inf, or all -inf).
        abstain_below: a threshold t in [0, 1]. A row votes its argmax when
            its top-1 probability is >= t, and otherwise abstains: it emits
            the abstain symbol C (one past the last class), so the stream
            then holds C + 1 symbols of ``bits_for(C + 1)`` bits; a NaN
            probability abstains. :func:`tally` with ``abstain=True`` skips
            those symbols.

    Returns:
        The packed stream, uint8 ``[packed_size(N, S)]`` (S = C, or C + 1
        with abstention): row i's symbol in bits ``[i*b, (i+1)*b)``, least
        significant bit first (docs/design.md §2). With ``return_prob=True``
        the pair ``(packed, prob)``.

    The argmax is ``torch.argmax``'s exactly: ties go to the smallest class
    index (the first maximum), a NaN is larger than everything (the first
    NaN wins), -0.0 equals +0.0. ValueError/TypeError name the argument at
    fault.
    """
    packed, prob = _ops.pack_argmax(
        logits, return_prob, None if abstain_below is None else float(abstain_below)
    )
    return (packed, prob) if return_prob else packed


def pack_labels(labels: torch.Tensor, num_symbols: int) -> torch.Tensor:
    """Integer labels packed into a stream of ``bits_for(num_symbols)``-bit
    symbols (the layout of :func:`pack_argmax`).

    Args:
        labels: 1-D integer tensor (uint8, int8, int16, int32 or int64) of
            values in ``0..num_symbols-1``; anything else is a ValueError
            naming the first position outside.
        num_symbols: how many distinct symbols the stream holds, 2 to 2**32
            (C, or C + 1 to leave room for an abstain symbol C).

    Returns:
        uint8 ``[packed_size(len(labels), num_symbols)]``.
    """
    return _ops.pack_labels(labels, int(num_symbols))


def unpack_labels(packed: torch.Tensor, n: int, num_symbols: int) -> torch.Tensor:
    """The inverse of :func:`pack_labels`: the first ``n`` symbols of a stream
    as int64 ``[n]``.

    ``packed`` (1-D uint8) must hold at least ``packed_size(n, num_symbols)``
    bytes; a symbol >= ``num_symbols`` (possible when that is not a power of
    two) is a ValueError naming its position.
    """
    return _ops.unpack_labels(packed, int(n), int(num_symbols))


def tally(
    votes: Union[torch.Tensor, Sequence[torch.Tensor]],
    n: int,
    num_classes: int,
    *,
    weights: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    abstain: bool = False,
) -> Tally:
    """Weighted plurality vote per probe over P peers' packed vote streams.

    Args:
        votes: uint8 ``[P, bytes]`` (or a list of P 1-D streams of equal
            length), each peer's ``n`` symbols as :func:`pack_argmax` or
            :func:`pack_labels` packed them, with ``bits_for(num_classes)``
            bits, or ``bits_for(num_classes + 1)`` with ``abstain``.
        n: probes per stream.
        num_classes: C >= 2; symbols are classes ``0..C-1``.
        weights: one integer weight >= 0 per peer (default all 1). Per-probe
            sums must stay below 2**63.
        abstain: the streams hold C + 1 symbols and symbol C means "this
            peer abstains on this probe": it counts for no class and not in
            ``total``. Without it, any symbol >= C is a ValueError (as is
            one > C with it), naming the first such position.

    Returns:
        :class:`Tally` of int64 ``[n]`` tensors: ``label``, the class with the
        largest summed weight, ties to the smallest class index; ``count``,
        its summed weight; ``total``, the summed weight of the peers that
        voted (did not abstain); ``runner_up``, the largest summed weight of
        any other class (equal to ``count`` on a tie, 0 without a second
        class). A probe without weighted support (every peer abstained, or
        every voter has weight 0) has label -1, count 0 and runner_up 0.
        Counts are integers, so every backend gives the same answer.
    """
    if not isinstance(votes, torch.Tensor):
        votes = torch.stack(list(votes)) if len(votes) else torch.empty(0, 0, dtype=torch.uint8)
    if weights is not None and not isinstance(weights, torch.Tensor):
        weights = torch.tensor(list(weights), dtype=torch.int64, device=votes.device)
    return Tally(*_ops.tally(votes, int(n), int(num_classes), weights, bool(abstain)))


def topk_sparse(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k entries of ``x`` with the largest magnitude, exactly.

    Args:
        x: 1-D float32, float64, float16 or bfloat16 ``[M]`` without NaN
            (ValueError naming the first).
        k: 0 <= k <= M.

    Returns:
        ``(indices, values)``: int64 ``[k]`` in ascending order, and
        ``x[indices]``. Among equal magnitudes the lower index is taken.
    """
    return _ops.topk_sparse(x, int(k))


def topk_sparse_ef(
    x: torch.Tensor, residual: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k with error feedback: :func:`topk_sparse` of ``acc = x + residual``.

    ``residual`` (same shape, dtype and device as ``x``) is updated in place
    to what was not sent: ``acc`` with the k selected entries zeroed. Returns
    ``(indices, acc[indices])``; a NaN in ``acc`` is a ValueError.
    """
    return _ops.topk_sparse_ef(x, residual, int(k))


def sparse_merge(
    indices: Union[torch.Tensor, Sequence[torch.Tensor]],
    values: Union[torch.Tensor, Sequence[torch.Tensor]],
    size: int,
    *,
    counts: Optional[Union[torch.Tensor, Sequence[int]]] = None,
) -> torch.Tensor:
    """Dense sum of peers' sparse vectors, or with ``counts`` their weighted
    average.

    Args:
        indices: one int64 1-D tensor per peer, strictly increasing, in
            ``0..size-1`` (a list, a ``[P, k]`` tensor, or one 1-D tensor
            for one peer).
        values: the matching float values, one tensor per peer, the same
            lengths.
        size: length of the dense result.
        counts: one integer >= 0 per peer, summing to more than 0: peer p's
            values are scaled by ``counts[p] / sum(counts)``.

    Returns:
        ``[size]``, float64 if any values are float64, else float32. Each
        peer's (scaled) values are rounded to that dtype and added in peer
        order, peer 0 first, so every backend gives the same floats.
    """
    indices = _as_list(indices)
    values = _as_list(values)
    if counts is not None and not isinstance(counts, torch.Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int64)
    return _ops.sparse_merge(indices, values, int(size), counts)


def _as_list(t):
    if isinstance(t, torch.Tensor):
        return [t] if t.dim() == 1 else list(t.unbind(0))
    return list(t)
