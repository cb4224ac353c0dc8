"""Fixtures shared by every area of the tests (ops/, fl/, wire/, flower/,
data/, api/; each area's own fixtures are in its conftest.py).

- ``device``: every test that takes it runs on the CPU, marked ``cuda`` on a
  CUDA device (skipped where there is none), and marked ``simt`` on the CUDA
  kernels run by the CPU execution model of tests/simt (the device is then
  "cpu" and tallytrain.ops calls ``torch.ops.tallytrain_simt``). A module
  whose tests call ``torch.ops.tallytrain`` directly sets
  ``EMULATED_CUDA = False`` to leave the simt case out.
- ``float_dtype``: float32, float16 and bfloat16, the logits dtypes.
- ``ref``: ``tallytrain.ops.reference``, the specification, called directly so
  that the dispatched op (native where the extension serves) is compared with
  it rather than with itself.
- ``bitstream``: an independent oracle for the packed layout of docs/design.md §2,
  written out bit by bit in plain Python, so that the tests stay meaningful
  when the reference is what serves.
- ``gen``: a ``torch.Generator`` seeded from the test's id (stable across runs
  and machines, different for every parametrised case).
- ``one_thread``: torch on one intra-op thread from the first test of a
  module that asks for it to the end of that module (autouse in fl/).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from pathlib import Path
from typing import List, Sequence

import pytest
import torch

import tallytrain.ops
from tallytrain.ops import reference

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]
SIMT_PARAM = pytest.param("simt", id="simt", marks=pytest.mark.simt)

FLOAT_DTYPE_PARAMS = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]


def pytest_report_header(config):
    info = tallytrain.ops.backend_info()
    level = (
        f"CPU level {info['cpu_level']} of {', '.join(info['cpu_levels'])}"
        if info["cpu_level"]
        else "no CPU level (the reference serves the CPU)"
    )
    return [
        f"tallytrain: backend {info['mode']}, {level}; {info['cpu_model']}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    ]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        params = list(DEVICE_PARAMS)
        if getattr(metafunc.module, "EMULATED_CUDA", True):
            params.append(SIMT_PARAM)
        metafunc.parametrize("device", params, indirect=True)


@pytest.fixture(scope="session")
def simt_build():
    """tests/simt/build.py as a module. The emulated kernels do not depend on
    TALLYTRAIN_BACKEND, so they run in the native pass only."""
    if reference_requested():
        pytest.skip("the emulated CUDA kernels are tested in the native pass")
    path = Path(__file__).resolve().parent / "simt" / "build.py"
    spec = importlib.util.spec_from_file_location("tallytrain_simt_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # keeps its op definitions alive
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def simt_ops(simt_build):
    """torch.ops.tallytrain_simt, built on first use into build/simt/; a build
    failure fails the tests."""
    return simt_build.load()


def reference_requested() -> bool:
    return os.environ.get("TALLYTRAIN_BACKEND", "").strip().lower() == "reference"


@pytest.fixture
def device(request, monkeypatch) -> str:
    if request.param == "simt":
        monkeypatch.setattr(tallytrain.ops, "_ops", request.getfixturevalue("simt_ops"))
        return "cpu"
    return request.param


@pytest.fixture(params=FLOAT_DTYPE_PARAMS)
def float_dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(scope="session")
def ref():
    return reference


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and on a shared machine two
    threads spin against other processes (measured 70x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BitStream:
    """docs/design.md §2 taken literally: symbol i occupies stream bits
    [i*b, i*b + b), least significant bit first, and stream bit j is bit j % 8
    of byte j // 8; b is the smallest width with 2**b >= num_symbols. Slow on
    purpose (one bit at a time) so that it shares nothing with the kernels."""

    @staticmethod
    def width(num_symbols: int) -> int:
        b = 0
        while (1 << b) < num_symbols:
            b += 1
        return b

    @classmethod
    def pack(cls, symbols: Sequence[int], num_symbols: int) -> torch.Tensor:
        b = cls.width(num_symbols)
        out = bytearray((len(symbols) * b + 7) // 8)
        for i, symbol in enumerate(symbols):
            assert 0 <= symbol < num_symbols, (i, symbol, num_symbols)
            for k in range(b):
                if (symbol >> k) & 1:
                    j = i * b + k
                    out[j // 8] |= 1 << (j % 8)
        return torch.tensor(list(out), dtype=torch.uint8)

    @classmethod
    def unpack(cls, packed: torch.Tensor, n: int, num_symbols: int) -> List[int]:
        b = cls.width(num_symbols)
        data = packed.cpu().tolist()
        assert len(data) == (n * b + 7) // 8, (len(data), n, b)
        symbols = []
        for i in range(n):
            value = 0
            for k in range(b):
                j = i * b + k
                value |= ((data[j // 8] >> (j % 8)) & 1) << k
            symbols.append(value)
        return symbols


@pytest.fixture(scope="session")
def bitstream() -> type:
    return BitStream
