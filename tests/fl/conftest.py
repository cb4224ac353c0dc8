"""The federated engine's tests (tallytrain.fl: the round loop, the methods,
the ledger, the recipe's mechanisms, sequence tasks, your own data). Their
models are tiny, so every module here runs on one thread (``one_thread`` of
tests/conftest.py, autouse here); ``tiny()`` of tests/fl/configs.py is the
run configuration they share."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(one_thread):
    """Every module here on one thread, from its first test to its last."""
