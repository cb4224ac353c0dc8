"""What a peer keeps of the consensus labels it has received: :class:`ConsensusMemory`.

Peers vote on a different subset of a public probe pool every round. A peer
that distills only on the latest round's consensus forgets the earlier ones;
the memory keeps every label it has received, per probe position, until a
newer consensus replaces or drops it, it grows too old (``max_age``), or it
is forgotten on purpose (:meth:`ConsensusMemory.forget`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ._args import int_arg
from .consensus import ConsensusLike
from .votes import _position

__all__ = ["ConsensusMemory"]

_STATE_VERSION = 1
_STATE_KEYS = ("version", "pool_size", "position_shape", "max_age", "round", "labels", "stamps")


def _int(value, name: str, minimum: int) -> int:
    return int_arg(value, name, minimum)


def _is_int_tensor(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


class ConsensusMemory:
    """The consensus labels a peer holds over a public probe pool.

    Probe ``i`` of the pool (``0 <= i < pool_size``) has ``position_shape``
    positions: ``()`` for a classifier (one label per probe), ``(T,)`` for a
    language model's windows of T tokens. Each position either holds a label
    (>= 0), stamped with the round of the update that wrote it, or holds
    nothing (-1).

    Rules, applied by :meth:`update` for each probe it is given:

    * a kept position with a label >= 0 holds that label, stamped with the
      update's round; a later consensus replaces it, agreeing or not;
    * a position that is not kept (dropped by the agreement rule, or nobody
      voted) holds nothing afterwards: the newer consensus overrides the
      older label;
    * probes not given are unchanged;
    * then, with ``max_age = A``, every label stamped at a round ``s`` with
      ``round - s >= A`` is forgotten (``max_age=1`` keeps only the latest
      update's labels; ``None`` keeps labels until replaced).

    Everything is tensor code over whole probes (no Python loop per probe):
    an update costs O(n * positions) plus O(pool_size) for the ages.

    Args:
        pool_size: probes in the pool, >= 0.
        max_age: rounds a label is kept, >= 1, or ``None`` for no limit.
        position_shape: the positions of one probe, e.g. ``()`` or ``(T,)``.
        device: where the memory's tensors live (consensus tensors given to
            :meth:`update` are moved there).
    """

    def __init__(
        self,
        pool_size: int,
        *,
        max_age: Optional[int] = None,
        position_shape: Sequence[int] = (),
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self._pool_size = _int(pool_size, "pool_size", 0)
        self._max_age = None if max_age is None else _int(max_age, "max_age", 1)
        if isinstance(position_shape, (str, bytes)) or not isinstance(position_shape, Sequence):
            raise TypeError(
                f"position_shape must be a sequence of ints, got {type(position_shape).__name__}"
            )
        self._position_shape = torch.Size(
            [_int(d, f"position_shape[{i}]", 0) for i, d in enumerate(position_shape)]
        )
        self._positions = math.prod(self._position_shape)  # positions per probe
        self._device = torch.device(device)
        shape = (self._pool_size, *self._position_shape)
        i64, dev = torch.int64, self._device
        self._labels = torch.full(shape, -1, dtype=i64, device=dev)  # -1 = nothing held
        # the round that wrote each probe, and the positions held per probe
        self._stamps = torch.full((self._pool_size,), -1, dtype=i64, device=dev)
        self._held = torch.zeros(self._pool_size, dtype=i64, device=dev)
        self._round = -1  # latest update's round

    # ---- facts ----------------------------------------------------------------
    @property
    def pool_size(self) -> int:
        return self._pool_size

    @property
    def max_age(self) -> Optional[int]:
        return self._max_age

    @property
    def position_shape(self) -> torch.Size:
        return self._position_shape

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def round(self) -> Optional[int]:
        """The latest update's round, ``None`` before the first update."""
        return None if self._round < 0 else self._round

    def __len__(self) -> int:
        """Number of positions that hold a label."""
        return int(self._held.sum())

    def __repr__(self) -> str:
        return (
            f"ConsensusMemory(pool_size={self._pool_size}, max_age={self._max_age}, "
            f"position_shape={tuple(self._position_shape)}, held={len(self)}, "
            f"round={self.round})"
        )

    # ---- update -----------------------------------------------------------------
    def update(self, probe_indices: torch.Tensor, consensus: ConsensusLike, round: int) -> None:
        """Take in one consensus over the probes ``probe_indices``.

        Args:
            probe_indices: integer ``[n]``, distinct, each in ``0..pool_size-1``:
                which pool probe each consensus row belongs to.
            consensus: a :class:`tallytrain.Consensus` (or anything with
                ``labels`` and ``keep``) of shape ``[n, *position_shape]``.
            round: the consensus' round, >= 0 and not below the previous
                update's (equal is allowed).

        Raises:
            TypeError: ``probe_indices`` not an integer tensor; ``consensus``
                without integer ``labels`` and bool ``keep``.
            ValueError: ``probe_indices`` not 1-D, outside the pool or
                repeated; ``consensus.labels``/``keep`` of the wrong shape or
                a label below -1; ``round`` going backwards.
        """
        r = _int(round, "round", 0)
        if r < self._round:
            raise ValueError(
                f"round must not go backwards: got {r} after an update of round {self._round}"
            )
        idx = self._probe_indices(probe_indices, distinct=True)
        n = idx.numel()
        labels = getattr(consensus, "labels", None)
        keep = getattr(consensus, "keep", None)
        if not isinstance(labels, torch.Tensor) or not isinstance(keep, torch.Tensor):
            raise TypeError(
                f"consensus must have tensor attributes labels and keep (a Consensus), got "
                f"{type(consensus).__name__}"
            )
        if not _is_int_tensor(labels):
            raise TypeError(f"consensus.labels must be an integer tensor, got {labels.dtype}")
        if keep.dtype != torch.bool:
            raise TypeError(f"consensus.keep must be a bool tensor, got {keep.dtype}")
        expected = torch.Size([n, *self._position_shape])
        for name, t in (("labels", labels), ("keep", keep)):
            if t.shape != expected:
                raise ValueError(
                    f"consensus.{name} must have shape [n, *position_shape] = {tuple(expected)} "
                    f"for {n} probe_indices, got {tuple(t.shape)}"
                )
        labels = labels.to(device=self._device, dtype=torch.int64)
        if labels.numel() and int(labels.min()) < -1:
            i = int(torch.nonzero(labels.reshape(-1) < -1)[0])
            raise ValueError(
                f"consensus.labels{_position(i, expected)} = {int(labels.reshape(-1)[i])} is "
                "below -1"
            )
        # Each step is one pass over the n rows (a full pool of 10^5 x 64 takes
        # tens of milliseconds; a round's subset a few).
        valid = keep.to(self._device) & (labels >= 0)
        held = valid.reshape(n, self._positions).view(torch.uint8).sum(1)
        self._labels.index_copy_(0, idx, torch.where(valid, labels, -1))
        self._held[idx] = held
        self._stamps[idx] = torch.where(held > 0, r, -1)
        self._round = r
        self._expire()

    def _expire(self) -> None:
        """Forget every probe whose labels were written max_age or more rounds ago."""
        if self._max_age is None:
            return
        old = (self._stamps >= 0) & (self._stamps <= self._round - self._max_age)
        rows = torch.nonzero(old).flatten()
        if rows.numel():
            self._labels[rows] = -1
            self._held[rows] = 0
            self._stamps[rows] = -1

    def _probe_indices(
        self, probe_indices: torch.Tensor, *, distinct: bool, name: str = "probe_indices"
    ) -> torch.Tensor:
        if not isinstance(probe_indices, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(probe_indices).__name__}")
        if not _is_int_tensor(probe_indices):
            raise TypeError(f"{name} must be an integer tensor, got {probe_indices.dtype}")
        if probe_indices.dim() != 1:
            raise ValueError(f"{name} must be 1-D [n], got shape {tuple(probe_indices.shape)}")
        idx = probe_indices.to(device=self._device, dtype=torch.int64)
        if idx.numel() == 0:
            return idx
        outside = (idx < 0) | (idx >= self._pool_size)
        if bool(outside.any()):
            i = int(torch.nonzero(outside)[0])
            raise ValueError(
                f"{name}[{i}] = {int(idx[i])} is outside the pool 0..{self._pool_size - 1}"
            )
        if distinct:
            ordered = torch.sort(idx).values
            repeated = ordered[1:] == ordered[:-1]
            if bool(repeated.any()):
                value = int(ordered[1:][repeated][0])
                raise ValueError(f"{name} must be distinct, but {value} appears more than once")
        return idx

    # ---- reading ------------------------------------------------------------------
    def labels(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(indices, labels)`` of the probes that hold at least one label.

        ``indices``: int64 ``[m]``, ascending pool indices. ``labels``: int64
        ``[m, *position_shape]``, each position's label, -1 where it holds
        nothing. Both are fresh tensors on the memory's device (pass them to
        :func:`tallytrain.consensus_loss` as ``labels`` with ``keep = labels
        >= 0``)."""
        indices = torch.nonzero(self._held > 0).flatten()
        return indices, self._labels[indices]

    # ---- forgetting -----------------------------------------------------------------
    def forget(self, which: torch.Tensor) -> int:
        """Drop labels on purpose (e.g. from a peer found to be poisoning the consensus).

        Args:
            which: integer pool indices ``[k]`` (whole probes; repeats are
                fine), or a bool mask ``[pool_size]`` (whole probes) or
                ``[pool_size, *position_shape]`` (single positions).

        Returns:
            The number of held positions dropped.
        """
        before = len(self)
        if isinstance(which, torch.Tensor) and which.dtype == torch.bool:
            full = torch.Size([self._pool_size, *self._position_shape])
            mask = which.to(self._device)
            if mask.shape == full:
                self._labels[mask] = -1
                per_probe = mask.reshape(self._pool_size, self._positions)
                rows = torch.nonzero(per_probe.any(1)).flatten()
                self._held[rows] = (
                    (self._labels[rows] >= 0).reshape(rows.numel(), self._positions).sum(1)
                )
                return before - len(self)
            if mask.shape != (self._pool_size,):
                raise ValueError(
                    f"which must be a bool mask of shape {(self._pool_size,)} or "
                    f"{tuple(full)}, got {tuple(mask.shape)}"
                )
            rows = torch.nonzero(mask).flatten()
        else:
            rows = self._probe_indices(which, distinct=False, name="which")
        self._labels[rows] = -1
        self._held[rows] = 0
        self._stamps[rows] = -1
        return before - len(self)

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The memory as tensors and ints (``torch.load(weights_only=True)`` reads it).

        Keys: ``version`` (1), ``pool_size``, ``position_shape`` (int64 ``[d]``),
        ``max_age`` (0 for no limit), ``round`` (-1 before the first update),
        ``labels`` (int64 ``[pool_size, *position_shape]``, -1 = nothing held),
        ``stamps`` (int64 ``[pool_size]``, the round that wrote each probe,
        -1 for none). Tensors are CPU copies."""
        return {
            "version": _STATE_VERSION,
            "pool_size": self._pool_size,
            "position_shape": torch.tensor(list(self._position_shape), dtype=torch.int64),
            "max_age": 0 if self._max_age is None else self._max_age,
            "round": self._round,
            "labels": self._labels.cpu().clone(),
            "stamps": self._stamps.cpu().clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output into a memory built with the same
        ``pool_size``, ``position_shape`` and ``max_age``.

        Raises:
            TypeError / ValueError: a missing or unknown key, a wrong type,
                dtype or shape, a configuration that differs from this
                memory's, or contents no sequence of updates could produce
                (a label below -1, a held probe without a stamp or stamped
                after ``round``, or older than ``max_age``). Nothing is
                changed when it raises.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        unknown = sorted(str(k) for k in state if k not in _STATE_KEYS)
        if missing or unknown:
            raise ValueError(f"state: missing keys {missing}, unknown keys {unknown}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"state['version'] is {state['version']!r}; this code reads {_STATE_VERSION}"
            )
        pool = _int(state["pool_size"], "state['pool_size']", 0)
        shape_t = state["position_shape"]
        if (
            not isinstance(shape_t, torch.Tensor)
            or shape_t.dtype != torch.int64
            or shape_t.dim() != 1
        ):
            raise TypeError("state['position_shape'] must be a 1-D int64 tensor")
        max_age = _int(state["max_age"], "state['max_age']", 0)
        r = _int(state["round"], "state['round']", -1)
        mine = (self._pool_size, tuple(self._position_shape), self._max_age or 0)
        theirs = (pool, tuple(int(d) for d in shape_t), max_age)
        if mine != theirs:
            raise ValueError(
                f"state is for (pool_size, position_shape, max_age) = {theirs} (0 = no "
                f"max_age), but this memory has {mine}"
            )
        labels, stamps = state["labels"], state["stamps"]
        full = torch.Size([pool, *self._position_shape])
        for name, t, shape in (("labels", labels, full), ("stamps", stamps, (pool,))):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"state['{name}'] must be an int64 tensor")
            if t.shape != shape:
                raise ValueError(
                    f"state['{name}'] must have shape {tuple(shape)}, got {tuple(t.shape)}"
                )
        labels = labels.to(self._device).clone()
        stamps = stamps.to(self._device).clone()
        if labels.numel() and int(labels.min()) < -1:
            raise ValueError("state['labels'] holds a value below -1")
        if stamps.numel() and (int(stamps.min()) < -1 or int(stamps.max()) > r):
            raise ValueError(f"state['stamps'] must lie in -1..round = {r}")
        held = (labels >= 0).reshape(pool, self._positions).sum(1)
        if bool(((held > 0) & (stamps < 0)).any()):
            raise ValueError("state['labels'] holds labels of a probe without a stamp")
        if max_age and bool(((held > 0) & (stamps <= r - max_age)).any()):
            raise ValueError(f"state['labels'] holds labels older than max_age = {max_age}")
        self._labels, self._stamps, self._held, self._round = labels, stamps, held, r
