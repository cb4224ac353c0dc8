"""tests/simt's CUDA execution model on its own: the launch rewrite, warp
collectives and barriers giving a GPU's results, and every programming error
it promises to report (see tests/simt/include/simt.h) reported. The CUDA
kernels themselves run on it through the ``simt`` case of every op test."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.simt


@pytest.fixture(scope="module")
def selftest(simt_build):
    return simt_build.load_selftest()


def test_translate_rewrites_launches_and_dynamic_shared_memory(simt_build):
    source = """
    template <class T> __global__ void k(T* p) { extern __shared__ __align__(16) unsigned char smem[]; }
    void host(cudaStream_t s, float* p) {
      k<float><<<dim3(2, 3), 64, 128, s>>>(p);
      other_kernel<E, kProb>
          <<<static_cast<unsigned>((rows + 31) / 32), 32, 0, stream>>>(
              p, rows);
      plain<<<1, 1>>>();
    }
    """
    out = simt_build.translate(source, "x.cu")
    assert "<<<" not in out and ">>>" not in out
    assert "::simt::launch(k<float>, ::simt::Config(dim3(2, 3), 64, 128, s))(p);" in out
    assert ("::simt::launch(other_kernel<E, kProb>, ::simt::Config(static_cast<unsigned>("
            "(rows + 31) / 32), 32, 0, stream))(") in out
    assert "::simt::launch(plain, ::simt::Config(1, 1))();" in out
    assert ("unsigned char* const smem = reinterpret_cast<unsigned char*>"
            "(::simt::dynamic_shared());") in out


def test_translate_refuses_a_launch_it_cannot_rewrite(simt_build):
    with pytest.raises(RuntimeError, match="could rewrite only 0 launches"):
        simt_build.translate("(*table[i])<<<1, 32>>>(p);", "x.cu")


def test_shuffles_barriers_and_match_groups_compute_what_a_gpu_does(selftest):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-1000, 1000, (1024,), generator=gen, dtype=torch.int32)
    assert torch.equal(selftest.warp_sums(x), x.view(-1, 32).sum(1, dtype=torch.int32))
    scans = x.view(-1, 256).cumsum(1, dtype=torch.int32).view(-1)
    assert torch.equal(selftest.block_scan(x), scans)
    groups = torch.randint(0, 5, (256,), generator=gen, dtype=torch.int32)
    expected = (groups.view(-1, 32, 1) == groups.view(-1, 1, 32)).sum(2, dtype=torch.int32)
    assert torch.equal(selftest.match_counts(groups), expected.view(-1))


def test_dynamic_shared_memory_starts_as_garbage(selftest):
    assert selftest.read_dynamic_shared(8).tolist() == [0xCDCDCDCD - (1 << 32)] * 8


@pytest.mark.parametrize("which, message", [
    (0, r"^kernel fault: deadlock in block \(0,0,0\): thread 0 waits in __syncthreads; "
        r"thread 1 waits in __shfl_\*_sync"),
    (1, r"deadlock .* \(lane 31 of the mask has exited\)"),
    (2, r"shuffle reads lane 31, which is not in the mask"),
    (3, r"thread \(0,0,0\) \[warp 0 lane 0\]: __shfl_\*_sync called with mask 0x2, "
        r"which leaves out the caller"),
    (4, r"spin-wait with __nanosleep never satisfied"),
    (5, r"block \(0,0,0\) .* spin-wait with __nanosleep never satisfied"),
    (6, r"65536 bytes of dynamic shared memory, over the kernel's limit of 49152"),
    (7, r"launch with block of 2048x1x1 threads"),
], ids=["barrier-against-shuffle", "exited-lane", "shuffle-outside-mask",
        "caller-not-in-mask", "spin-forever", "wait-for-later-block",
        "too-much-shared-memory", "too-many-threads"])
def test_programming_errors_are_reported(selftest, which, message):
    error = selftest.fault(which)
    assert re.search(message, error), error


def test_raising_the_shared_memory_limit_lets_the_launch_run(selftest):
    assert selftest.fault(8) == ""


def test_the_sanitizer_build_finds_an_out_of_bounds_read(simt_build, tmp_path):
    """Device memory is host memory: only the AddressSanitizer build
    (`make test-simt-asan` runs the simt cases with it) sees a kernel read
    past a tensor. Run in a child process, which the report ends."""
    program = tmp_path / "oob.py"
    program.write_text(textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("b", {str(simt_build.__file__)!r})
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        selftest = build.load_selftest()
        x = torch.ones(64, dtype=torch.int32)
        print("in bounds", selftest.warp_sums(x).tolist(), flush=True)
        print("past the end", selftest.sum_past_end(x).tolist(), flush=True)
    """))
    env = dict(os.environ, TALLYTRAIN_SIMT_INSTRUMENT="address",
               LD_PRELOAD=simt_build.asan_preload(), ASAN_OPTIONS="detect_leaks=0")
    child = subprocess.run([sys.executable, str(program)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert "in bounds [32, 32]" in child.stdout, child.stdout + child.stderr
    assert child.returncode != 0 and "past the end" not in child.stdout
    assert "heap-buffer-overflow" in child.stderr and "sum_past_end_kernel" in child.stderr, \
        child.stderr[-3000:]
