"""Methods are found by name. Each method module registers its class with
``register`` (tallytrain/fl/methods/base.py, where the table lives); this
module imports the built-in methods, so that looking a name up here always
sees them. A plugin registers more with the same ``register``."""

from __future__ import annotations

from typing import List, Type

from . import methods  # noqa: F401  (importing the package registers every built-in method)
from .methods.base import METHODS, Method, register

__all__ = ["METHODS", "get_method", "method_names", "register"]


def method_names() -> List[str]:
    return list(METHODS)


def get_method(name: str) -> Type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None
