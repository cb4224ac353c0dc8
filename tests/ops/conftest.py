"""Fixtures of the op tests (tallytrain.ops: the native kernels against the
reference, the backend, the CPU levels, the simt model). The shared ones
(``device``, ``float_dtype``, ``ref``, ``bitstream``, ``gen``) are in
tests/conftest.py.

- ``across_threads``: runs a callable under several intra-op thread counts, so
  that a CPU kernel whose result depends on how work was split shows it.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch


@pytest.fixture
def across_threads() -> Callable:
    def run(fn: Callable) -> list:
        saved = torch.get_num_threads()
        try:
            results = []
            for threads in (1, 2, 5):
                torch.set_num_threads(threads)
                results.append(fn())
            return results
        finally:
            torch.set_num_threads(saved)

    return run
