"""From peers' votes to a consensus, and the loss that distills on it.

:func:`tally` counts the votes of several peers position by position
(``ops.tally``) and decides which positions to keep (:class:`Consensus`);
:func:`consensus_loss` is the cross-entropy on the kept positions.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Literal, NamedTuple, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from ._args import int_arg
from . import ops
from .votes import Votes, _position

__all__ = ["Consensus", "ConsensusLike", "tally", "consensus_loss"]

_REDUCTIONS = ("mean", "sum", "none")


class Consensus(NamedTuple):
    """The plurality vote per position, and which positions to distill on.

    Every field has the votes' leading shape ``[...]``.

    Attributes:
        labels: int64, the class with the largest (weighted) count; a tie
            goes to the smallest class index. ``-1`` where nobody voted
            (every peer abstained, or every voter had weight 0).
        keep: bool, the positions to distill on: somebody voted, the
            winner's count is ``>= min_votes`` and ``count >= agreement *
            total``, compared in float64 (so ``agreement=0.5`` keeps a winner
            with exactly half of the votes).
        agreement: float32, ``count / total``, the winner's share of the
            non-abstaining votes; 0 where nobody voted (never NaN).
        count: int64, the winner's summed weight (0 where nobody voted).
        total: int64, the summed weight of the peers that did not abstain.
    """

    labels: torch.Tensor
    keep: torch.Tensor
    agreement: torch.Tensor
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, by design
    total: torch.Tensor

    @classmethod
    def from_counts(
        cls,
        label: torch.Tensor,
        count: torch.Tensor,
        total: torch.Tensor,
        *,
        agreement: float = 0.5,
        min_votes: int = 1,
    ) -> "Consensus":
        """The keep rule applied to a tally's ``label``, ``count`` and ``total``.

        The three are integer tensors of one shape, e.g. the fields of
        ``ops.tally``'s result. A position with ``total == 0`` gets label -1
        whatever ``label`` says. This is the rule :func:`tally` applies.

        Raises:
            ValueError: ``agreement`` outside ``[0, 1]`` (or NaN), ``min_votes``
                < 1, or the three tensors of different shapes.
            TypeError: ``min_votes`` not an int.
        """
        share = _fraction(agreement, "agreement")
        quorum = _positive_int(min_votes, "min_votes")
        if not (label.shape == count.shape == total.shape):
            raise ValueError(
                f"label, count and total must have one shape, got {tuple(label.shape)}, "
                f"{tuple(count.shape)} and {tuple(total.shape)}"
            )
        count = count.to(torch.int64)
        total = total.to(torch.int64)
        voted = total > 0
        keep = voted & (count >= quorum) & (count.double() >= share * total.double())
        # count/total in float64, rounded once to float32 (exact for any counts
        # below 2**53); clamp keeps 0/0 from ever being computed.
        frac = (count.double() / total.clamp(min=1).double()).float()
        zero = torch.zeros((), dtype=torch.float32, device=frac.device)
        labels = torch.where(voted, label.to(torch.int64), torch.full_like(count, -1))
        return cls(
            labels,
            keep,
            torch.where(voted, frac, zero),
            torch.where(voted, count, torch.zeros_like(count)),
            total,
        )


class ConsensusLike(Protocol):
    """Anything with integer ``labels`` (-1 = no label) and bool ``keep`` of one
    shape, e.g. a :class:`Consensus` or a consensus decoded from the wire."""

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def keep(self) -> torch.Tensor: ...


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _positive_int(value, name: str) -> int:
    return int_arg(value, name, 1)


def _weights(weights, peers: int, device: torch.device) -> Optional[torch.Tensor]:
    """Per-peer integer weights as int64 [P]; refuses floats instead of truncating them."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if (
            weights.dtype.is_floating_point
            or weights.dtype.is_complex
            or weights.dtype == torch.bool
        ):
            raise TypeError(f"weights must be integers, got a {weights.dtype} tensor")
        w = weights.to(device=device, dtype=torch.int64)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(
                "weights must be a sequence of ints or an integer tensor, got "
                f"{type(weights).__name__}"
            )
        values = []
        for i, x in enumerate(weights):
            if isinstance(x, bool) or not isinstance(x, int):
                try:
                    x = operator.index(x)
                except TypeError:
                    raise TypeError(
                        f"weights[{i}] must be an int, got {type(x).__name__}"
                    ) from None
            values.append(x)
        try:
            w = torch.tensor(values, dtype=torch.int64, device=device)
        except RuntimeError:  # beyond int64
            raise ValueError("weights must fit int64") from None
    if w.shape != (peers,):
        raise ValueError(
            f"weights must have one entry per Votes ({peers}), got shape {tuple(w.shape)}"
        )
    if peers and bool((w < 0).any()):
        i = int(torch.nonzero(w < 0)[0])
        raise ValueError(f"weights must be >= 0, got weights[{i}] = {int(w[i])}")
    return w


def tally(
    votes: Sequence[Votes],
    *,
    weights: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    agreement: float = 0.5,
    min_votes: int = 1,
) -> Consensus:
    """Count the peers' votes at every position and form the consensus.

    Args:
        votes: one :class:`Votes` per peer (at least one), all of the same
            shape, ``num_classes``, abstention flag and device.
        weights: one non-negative integer per peer (default 1 each); a peer's
            vote counts that many times. Floats are refused, not truncated.
        agreement: keep a position when ``count >= agreement * total``
            (float64), in ``[0, 1]``; 0.5 keeps winners with at least half of
            the non-abstaining votes, 0 keeps every position somebody voted on.
        min_votes: keep a position only when its winner's count is at least
            this (an absolute quorum, >= 1).

    Returns:
        :class:`Consensus` with the votes' leading shape. The winner is the
        class with the largest summed weight; a tie goes to the smallest
        class index. Peers' order does not matter; counts are exact int64.

    Raises:
        TypeError: an element of ``votes`` is not a :class:`Votes`; weights
            not integers.
        ValueError: no votes; votes of different shape, ``num_classes``,
            abstention or device (the message names both values); weights of
            the wrong length or negative; ``agreement`` or ``min_votes`` out
            of range.
    """
    if isinstance(votes, Votes) or not isinstance(votes, Sequence):
        raise TypeError(
            f"votes must be a sequence of Votes (one per peer), got {type(votes).__name__}"
        )
    if len(votes) == 0:
        raise ValueError("votes must hold at least one Votes")
    for i, v in enumerate(votes):
        if not isinstance(v, Votes):
            raise TypeError(f"votes[{i}] must be a Votes, got {type(v).__name__}")
    first = votes[0]
    for i, v in enumerate(votes[1:], start=1):
        for what, a, b in (
            ("shape", tuple(first.shape), tuple(v.shape)),
            ("num_classes", first.num_classes, v.num_classes),
            ("abstain", first.abstain, v.abstain),
            ("device", first.device, v.device),
        ):
            if a != b:
                raise ValueError(f"votes[{i}] has {what} {b}, but votes[0] has {what} {a}")
    # Checked before any counting so that a bad argument costs nothing.
    _fraction(agreement, "agreement")
    _positive_int(min_votes, "min_votes")
    w = _weights(weights, len(votes), first.device)
    stacked = torch.stack([v.packed for v in votes])
    t = ops.tally(stacked, first.n, first.num_classes, weights=w, abstain=first.abstain)
    c = Consensus.from_counts(t.label, t.count, t.total, agreement=agreement, min_votes=min_votes)
    return Consensus(*(field.reshape(first.shape) for field in c))


def consensus_loss(
    logits: torch.Tensor,
    consensus: Union[ConsensusLike, torch.Tensor],
    *,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the consensus labels, where kept.

    Args:
        logits: ``[..., C]`` floating tensor (any float dtype; the loss is
            computed in float32 on the kept rows only, so a position that is
            not kept, padding included, contributes neither value nor
            gradient, even if its logits are inf or NaN).
        consensus: a :class:`Consensus`, or anything with ``labels`` (integer,
            the leading shape ``[...]``, -1 = no label) and ``keep`` (bool, the
            same shape); positions with ``keep`` and ``labels >= 0`` count. Or
            an integer tensor of labels alone (e.g. from
            :meth:`ConsensusMemory.labels`): the positions with a label >= 0
            count.
        reduction: ``"mean"`` (over the counted positions), ``"sum"``, or
            ``"none"`` (float32 ``[...]``: each position's loss, 0 where not
            counted).

    Returns:
        A float32 tensor. With no counted position, ``"mean"`` and ``"sum"``
        give 0.0 still attached to ``logits``' graph (``backward()`` works and
        gives zero gradients), never NaN.

    Raises:
        TypeError: ``logits`` not floating; ``consensus`` neither an integer
            tensor nor something with ``labels`` and ``keep``, or of the wrong
            dtypes.
        ValueError: ``consensus.labels`` or ``consensus.keep`` not of the
            logits' leading shape; a counted label ``>= C``; ``reduction``
            not one of mean, sum, none.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"logits must be [..., C] with C >= 2 classes, got shape {tuple(logits.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    labels: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    if isinstance(consensus, torch.Tensor) and not consensus.dtype.is_floating_point:
        labels, keep = consensus, torch.ones_like(consensus, dtype=torch.bool)
    else:
        labels = getattr(consensus, "labels", None)
        keep = getattr(consensus, "keep", None)
    if not isinstance(labels, torch.Tensor) or not isinstance(keep, torch.Tensor):
        raise TypeError(
            f"consensus must be a Consensus (tensor attributes labels and keep) or an "
            f"integer tensor of labels, got {type(consensus).__name__}"
            + (f" of {consensus.dtype}" if isinstance(consensus, torch.Tensor) else "")
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"consensus.labels must be an integer tensor, got {labels.dtype}")
    if keep.dtype != torch.bool:
        raise TypeError(f"consensus.keep must be a bool tensor, got {keep.dtype}")
    c = logits.shape[-1]
    leading = logits.shape[:-1]
    for name, t in (("labels", labels), ("keep", keep)):
        if t.shape != leading:
            raise ValueError(
                f"consensus.{name} must have the logits' leading shape {tuple(leading)}, got "
                f"{tuple(t.shape)}"
            )
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.int64)
    counted = keep.reshape(-1).to(logits.device) & (flat_labels >= 0)
    index = torch.nonzero(counted).flatten()
    targets = flat_labels[index]
    if targets.numel() and int(targets.max()) >= c:
        i = int(index[int(torch.argmax(targets))])
        raise ValueError(
            f"consensus.labels{_position(i, leading)} = {int(flat_labels[i])} is not a class "
            f"of logits with C = {c}"
        )
    # Only the counted rows enter the loss, so other rows get exactly zero
    # gradient; an empty selection still sums to a graph-attached 0.
    rows = logits.reshape(-1, c)[index].float()
    per = F.cross_entropy(rows, targets, reduction="none")
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.sum() / max(index.numel(), 1)
    out = torch.zeros(math.prod(leading), dtype=torch.float32, device=logits.device)
    return out.index_put((index,), per).reshape(leading)
