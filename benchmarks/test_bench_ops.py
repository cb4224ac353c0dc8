"""pytest-benchmark microbenchmarks: each op as dispatched vs the plain-PyTorch
way, at the "micro" sizes of benchmarks.ops.build_cases.

Collected only when asked for (`python -m pytest benchmarks/`): the default
test run looks in tests/ only. Each case is one group holding its native
and plain rows.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.harness import synchronize  # noqa: E402
from benchmarks.ops import build_cases, served_by  # noqa: E402
from tallytrain import ops as tt  # noqa: E402


def _params():
    """(device, case) pairs; building a case allocates nothing (make() does)."""
    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    params = []
    for device in ("cpu", "cuda"):
        for case in build_cases(device, "micro"):
            params.append(
                pytest.param(
                    device,
                    case,
                    id=f"{device}-{case.op}-{case.name.replace(' ', '-')}",
                    marks=[no_cuda] if device == "cuda" else [],
                )
            )
    return params


@pytest.mark.parametrize("impl", ["native", "plain"])
@pytest.mark.parametrize("device,case", _params())
def test_op(benchmark, device, case, impl):
    native, plain = case.make()
    fn = native if impl == "native" else plain
    op_served = served_by(device)[case.op]
    served = op_served if impl == "native" else "plain PyTorch"
    # Both rows of a case carry the level in their group name, so that the
    # native and the plain row stay in one group.
    native_cpu = device == "cpu" and op_served == "native"
    level = tt.backend_info()["cpu_level"] if native_cpu else None
    benchmark.group = f"{device} {case.op} {case.name}" + (f" (CPU level {level})" if level else "")
    benchmark.extra_info.update(
        op=case.op,
        case=case.name,
        served=served,
        cpu_level=level if impl == "native" else None,
        bytes_moved=case.bytes_moved,
    )

    def call():
        out = fn()
        synchronize(device)
        return out

    benchmark(call)
