"""Methods are found by name. Each method module registers its class with
:func:`register`; :func:`get_method` imports them all on first use."""
from __future__ import annotations

from typing import Dict, List, Type

METHODS: Dict[str, Type] = {}


def register(cls: Type) -> Type:
    name = cls.name
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = cls
    return cls


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (each module registers itself)


def method_names() -> List[str]:
    _load_builtin()
    return list(METHODS)


def get_method(name: str) -> Type:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None
