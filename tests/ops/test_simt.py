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
    template <class T> __global__ void k(T* p) {
      extern __shared__ __align__(16) unsigned char smem[]; }
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
    assert (
        "::simt::launch(other_kernel<E, kProb>, ::simt::Config(static_cast<unsigned>("
        "(rows + 31) / 32), 32, 0, stream))("
    ) in out
    assert "::simt::launch(plain, ::simt::Config(1, 1))();" in out
    assert (
        "unsigned char* const smem = reinterpret_cast<unsigned char*>(::simt::dynamic_shared());"
    ) in out


def test_translate_keeps_every_line_in_place(simt_build):
    # Compiler messages and coverage counts name the .cu file's lines.
    for cu in sorted((simt_build.CUDA_DIR).glob("*.cu")):
        source = cu.read_text()
        body = simt_build.translate(source, cu).split("\n", 3)[3]
        assert body.count("\n") == source.count("\n"), cu.name
        kernel_lines = [i for i, line in enumerate(source.splitlines()) if "__global__" in line]
        assert kernel_lines and all("__global__" in body.splitlines()[i] for i in kernel_lines), (
            cu.name
        )


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


def test_shuffle_widths_and_votes_follow_cuda(selftest):
    x = torch.tensor([(-1) ** i * (i + 1) for i in range(32)], dtype=torch.int32)
    got = selftest.shuffle_widths(x).tolist()
    v = x.tolist()
    ballot = sum(1 << i for i in range(32) if v[i] > 0)
    ballot -= (1 << 32) if ballot >= (1 << 31) else 0
    for lane in range(32):
        base, end = lane // 8 * 8, lane // 8 * 8 + 8
        xor = lane ^ 5
        want = [
            v[base + 3],  # index within the group of 8
            v[lane - 2] if lane - 2 >= base else v[lane],  # the group's first lanes keep theirs
            v[lane + 2] if lane + 2 < end else v[lane],  # its last lanes keep theirs
            v[xor] if xor < end else v[lane],  # later groups: one's own value
            ballot,
        ]
        assert got[5 * lane : 5 * lane + 5] == want, lane
    assert got[160:] == [1, 0]


def test_shared_memory_starts_as_garbage_in_every_block(selftest):
    garbage = 0xCDCDCDCD - (1 << 32)
    assert selftest.read_fresh_shared(3).flatten().tolist() == [garbage] * (3 * 2 * 32)


def test_threads_run_in_both_orders(selftest):
    # A read of another thread's write without a barrier sees it in one
    # block and garbage in the other.
    assert sorted(selftest.order_dependent(2).tolist()) == [0xCDCDCDCD - (1 << 32), 1]


@pytest.mark.parametrize(
    "which, message",
    [
        (
            0,
            r"^kernel fault: deadlock in block \(0,0,0\): threads 0-0 wait in __syncthreads; "
            r"threads 1-31 wait in __shfl_xor_sync with mask 0xffffffff",
        ),
        # Which lane notices depends on the order threads run in (both happen).
        (1, r"lane 31\b.*exited"),
        (2, r"shuffle reads lane (1[6-9]|2\d|3[01]), which is not in the mask"),
        (
            3,
            r"thread \(0,0,0\) \[warp 0 lane 0\]: __shfl_xor_sync called with mask 0x2, "
            r"which leaves out the caller",
        ),
        (4, r"spin-wait with __nanosleep never satisfied"),
        (5, r"block \(0,0,0\) .* spin-wait with __nanosleep never satisfied"),
        (6, r"65536 bytes of dynamic shared memory, over the kernel's limit of 49152"),
        (7, r"launch with block of 2048x1x1 threads"),
        (9, r"__syncthreads in block \(0,0,0\) reached by 16 threads after 16 exited"),
        (
            10,
            r"deadlock .*threads 0-15 wait in __shfl_xor_sync with mask 0xffffffff; "
            r"threads 16-31 wait in __shfl_down_sync with mask 0xffffffff",
        ),
        (11, r"launched with 128 threads per block, over its __launch_bounds__\(64\)"),
        (12, r"^invalid argument$"),
    ],
    ids=[
        "barrier-against-shuffle",
        "exited-lane",
        "shuffle-outside-mask",
        "caller-not-in-mask",
        "spin-forever",
        "wait-for-later-block",
        "too-much-shared-memory",
        "too-many-threads",
        "barrier-after-exit",
        "mixed-shuffles",
        "over-launch-bounds",
        "error-after-fault",
    ],
)
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
    program.write_text(
        textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("b", {str(simt_build.__file__)!r})
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        selftest = build.load_selftest()
        x = torch.ones(64, dtype=torch.int32)
        print("in bounds", selftest.warp_sums(x).tolist(), flush=True)
        print("past the end", selftest.sum_past_end(x).tolist(), flush=True)
    """)
    )
    env = dict(
        os.environ,
        TALLYTRAIN_SIMT_INSTRUMENT="address",
        LD_PRELOAD=simt_build.asan_preload(),
        ASAN_OPTIONS="detect_leaks=0",
    )
    child = subprocess.run(
        [sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=600
    )
    assert "in bounds [32, 32]" in child.stdout, child.stdout + child.stderr
    assert child.returncode != 0 and "past the end" not in child.stdout
    assert "heap-buffer-overflow" in child.stderr and "sum_past_end_kernel" in child.stderr, (
        child.stderr[-3000:]
    )
