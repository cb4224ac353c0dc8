"""A peer's hard-label votes: :func:`vote` and :class:`Votes`.

A vote is one class index per position (a probe, or a token of a probe
sequence), packed into ``bits_for(C)`` bits, or ``bits_for(C + 1)`` bits when
the peer may abstain (symbol C). :class:`Votes` keeps the packed stream
together with what is needed to read it (the leading shape, C and whether
the stream has the abstain symbol), so nobody passes those twice.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from ._args import int_arg
from . import ops, wire

__all__ = ["Votes", "vote"]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _int_arg(value, name: str, minimum: int) -> int:
    """An int argument (not a bool, not a float) that is at least ``minimum``."""
    return int_arg(value, name, minimum)


def _position(flat_index: int, shape: Sequence[int]) -> str:
    """``flat_index`` of a row-major ``shape`` as an index string, e.g. ``[1, 4]``."""
    coords = []
    for size in reversed(tuple(shape)):
        coords.append(flat_index % size)
        flat_index //= size
    return "[" + ", ".join(str(c) for c in reversed(coords)) + "]"


class Votes:
    """One peer's packed votes on positions of some leading shape.

    Attributes:
        packed: uint8 ``[ops.packed_size(n, num_symbols)]``, the stream of the
            ``n = prod(shape)`` votes in row-major order (docs/ops.md's layout).
        shape: the leading shape (``torch.Size``), e.g. ``(N,)`` for N probes
            of a classifier or ``(B, T)`` for a language model's tokens.
        num_classes: C >= 2; votes are class indices ``0..C-1``.
        abstain: whether the stream has the abstain symbol C (then each vote
            takes ``bits_for(C + 1)`` bits). An abstaining position is counted
            by nobody: it adds neither to a class nor to the total.

    Build them with :func:`vote` (from logits) or :meth:`from_labels`, and
    send them with :meth:`to_bytes` / :meth:`from_bytes`. The constructor
    checks the stream's dtype and length; the symbols themselves are checked
    where they are read (:meth:`labels`, :func:`tallytrain.tally`), so a
    stream holding a symbol ``>= num_symbols`` raises there.
    """

    __slots__ = ("packed", "shape", "num_classes", "abstain")
    __hash__ = None  # type: ignore[assignment]  # holds a mutable tensor

    packed: torch.Tensor
    shape: torch.Size
    num_classes: int
    abstain: bool

    def __init__(
        self, packed: torch.Tensor, shape: Sequence[int], num_classes: int, abstain: bool = False
    ) -> None:
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
        if packed.dim() != 1:
            raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
        dims = torch.Size([_int_arg(d, f"shape[{i}]", 0) for i, d in enumerate(shape)])
        c = _int_arg(num_classes, "num_classes", 2)
        if c > (1 << 32) - 1:
            raise ValueError(f"num_classes must be < 2**32, got {c}")
        if not isinstance(abstain, bool):
            raise TypeError(f"abstain must be a bool, got {type(abstain).__name__}")
        n = math.prod(dims)
        symbols = c + 1 if abstain else c
        need = ops.packed_size(n, symbols)
        if packed.numel() != need:
            raise ValueError(
                f"packed must hold packed_size(n={n}, num_symbols={symbols}) = {need} bytes "
                f"for votes of shape {tuple(dims)}, got {packed.numel()}"
            )
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "shape", dims)
        object.__setattr__(self, "num_classes", c)
        object.__setattr__(self, "abstain", abstain)

    def __setattr__(self, name, value):
        raise AttributeError("Votes are immutable")

    # ---- derived facts --------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of votes: the product of :attr:`shape`."""
        return math.prod(self.shape)

    @property
    def num_symbols(self) -> int:
        """Symbols in the stream: C, or C + 1 with abstention (symbol C = abstain)."""
        return self.num_classes + 1 if self.abstain else self.num_classes

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: Union[str, torch.device]) -> "Votes":
        """The same votes with the stream on ``device``."""
        return Votes(self.packed.to(device), self.shape, self.num_classes, self.abstain)

    # ---- labels -----------------------------------------------------------------
    @classmethod
    def from_labels(
        cls, labels: torch.Tensor, num_classes: int, *, abstain: bool = False
    ) -> "Votes":
        """Votes from class indices rather than logits.

        Args:
            labels: integer tensor of any shape (the leading shape of the
                votes), values in ``0..num_classes-1``, or ``-1`` for an
                abstaining position, which needs ``abstain=True``.
            num_classes: C >= 2.
            abstain: give the stream the abstain symbol C (``-1`` labels
                become it). Votes that are tallied together must agree on it.

        Raises:
            TypeError: ``labels`` is not an integer tensor.
            ValueError: a label outside ``0..C-1`` (or ``-1..C-1`` with
                ``abstain=True``); the message gives its position.
        """
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in _INT_DTYPES:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        c = _int_arg(num_classes, "num_classes", 2)
        if not isinstance(abstain, bool):
            raise TypeError(f"abstain must be a bool, got {type(abstain).__name__}")
        flat = labels.reshape(-1).to(torch.int64)
        low = -1 if abstain else 0
        if flat.numel():
            bad = (flat < low) | (flat >= c)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                hint = "" if abstain or int(flat[i]) != -1 else " (-1 needs abstain=True)"
                raise ValueError(
                    f"labels{_position(i, labels.shape)} = {int(flat[i])} is outside "
                    f"{low}..{c - 1}{hint}"
                )
        if abstain:
            flat = torch.where(flat < 0, c, flat)
        packed = ops.pack_labels(flat, c + 1 if abstain else c)
        return cls(packed, labels.shape, c, abstain)

    def labels(self) -> torch.Tensor:
        """int64 tensor of :attr:`shape`: each position's class, -1 where it abstains."""
        flat = ops.unpack_labels(self.packed, self.n, self.num_symbols)
        if self.abstain:
            flat = flat.masked_fill_(flat == self.num_classes, -1)
        return flat.reshape(self.shape)

    # ---- wire -----------------------------------------------------------------
    def to_bytes(self, *, round: int = 0, sender: int = 0) -> bytes:
        """This peer's VOTES message (``tallytrain.wire``), shape included.

        Votes of a 1-D shape give exactly ``wire.encode_votes``'s plain bytes;
        any other shape adds a SHAPE section of ``1 + 4 * len(shape)`` bytes.
        ``round`` and ``sender`` go into the header (each in ``0..2**32-1``).
        """
        return wire.encode_votes(
            self.packed,
            self.n,
            self.num_classes,
            abstain=self.abstain,
            shape=self.shape,
            round=round,
            sender=sender,
        )

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview]) -> "Votes":
        """Votes from a VOTES message; ``wire.WireFormatError`` if it is not one.

        The header's round and sender are not kept: use ``wire.decode`` to
        read them."""
        m = wire.decode(data, expect_kind=wire.MessageKind.VOTES)
        # A decoded VOTES message has every one of these fields.
        assert m.packed is not None and m.shape is not None
        assert m.num_classes is not None and m.abstain is not None
        return cls(m.packed, m.shape, m.num_classes, m.abstain)

    # ---- comparison -------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        """Equal when shape, C, abstention and every packed byte are equal."""
        if not isinstance(other, Votes):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.num_classes == other.num_classes
            and self.abstain == other.abstain
            and self.packed.device == other.packed.device
            and torch.equal(self.packed, other.packed)
        )

    def __repr__(self) -> str:
        return (
            f"Votes(shape={tuple(self.shape)}, num_classes={self.num_classes}, "
            f"abstain={self.abstain}, bytes={self.packed.numel()}, "
            f"device={self.packed.device})"
        )

    def __reduce__(self):
        return (Votes, (self.packed, tuple(self.shape), self.num_classes, self.abstain))


def vote(
    logits: torch.Tensor,
    *,
    abstain_below: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
) -> Votes:
    """Each position's argmax class, packed: one peer's votes.

    Args:
        logits: ``[..., C]`` float32, float16 or bfloat16, C >= 2, any
            leading shape (``[N, C]`` for a classifier's probes, ``[B, T, V]``
            for a language model). Never written; detached (votes carry no
            gradient). Leading dimensions are flattened with a view when the
            strides allow it, so contiguous logits are not copied.
        abstain_below: a position whose top-1 softmax probability is not
            ``>= abstain_below`` abstains (``ops.pack_argmax``'s rule,
            compared in float32; a row with a NaN probability always
            abstains). In ``[0, 1]``.
        mask: bool of the leading shape; ``False`` marks a position that
            abstains whatever its logits say (padding). On the logits' device
            or movable there.

    Returns:
        :class:`Votes` of shape ``logits.shape[:-1]``. The class is
        ``torch.argmax``'s: the first index of the maximum wins a tie, NaN
        beats everything. With ``mask`` or ``abstain_below`` the stream has
        the abstain symbol C (``abstain=True``), also where nobody abstains.
        Without them it is exactly ``ops.pack_argmax(logits.reshape(-1, C))``;
        with them it is exactly that stream's labels (abstaining where
        ``abstain_below`` says) with the masked positions set to C, packed in
        ``bits_for(C + 1)`` bits.

    Raises:
        TypeError: ``logits`` is not a float32/float16/bfloat16 tensor, or
            ``mask`` is not a bool tensor.
        ValueError: ``logits`` has no class dimension or C < 2; ``mask`` is
            not of the leading shape; ``abstain_below`` is outside ``[0, 1]``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"logits must be [..., C] with C >= 2 classes, got shape {tuple(logits.shape)}"
        )
    c = logits.shape[-1]
    leading = logits.shape[:-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != leading:
            raise ValueError(
                f"mask must have the logits' leading shape {tuple(leading)}, got "
                f"{tuple(mask.shape)}"
            )
    if abstain_below is not None:
        if isinstance(abstain_below, bool) or not isinstance(abstain_below, numbers.Real):
            raise TypeError(f"abstain_below must be a float, got {type(abstain_below).__name__}")
        if not 0.0 <= abstain_below <= 1.0:  # also rejects NaN
            raise ValueError(f"abstain_below must be in [0, 1], got {abstain_below}")
    rows = logits.detach().reshape(-1, c)
    with torch.no_grad():
        packed = ops.pack_argmax(rows, abstain_below=abstain_below)
    abstain = abstain_below is not None or mask is not None
    if mask is not None:
        # Exact by construction: the labels pack_argmax chose, with the masked
        # positions replaced by the abstain symbol, packed again in C + 1 symbols.
        n = rows.shape[0]
        labels = ops.unpack_labels(packed, n, c + 1 if abstain_below is not None else c)
        keep = mask.reshape(-1).to(labels.device)
        packed = ops.pack_labels(labels.masked_fill_(~keep, c), c + 1)
    return Votes(packed, leading, c, abstain)
