"""Argument checks shared by the public API and the wire codec (a leaf
module: it imports nothing of tallytrain's)."""

from __future__ import annotations

import operator
from typing import Optional


def int_arg(value, name: str, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` as an int (not a bool, not a float), at least ``minimum``
    and, where given, at most ``maximum``; else one TypeError / ValueError
    naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if maximum is not None:
        if not minimum <= v <= maximum:
            raise ValueError(f"{name} must be in {minimum}..{maximum}, got {v}")
    elif v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v
