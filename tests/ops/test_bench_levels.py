"""The op benchmarks name the CPU model and the CPU level that served, and
--levels times the native CPU kernels at several levels side by side
(tallytrain/bench). What is checked is the table, never a time."""

from __future__ import annotations

import pytest

import tallytrain.ops as ops
from tallytrain.bench import ops as bench_ops

LEVELS = ops.backend_info()["cpu_levels"]
needs_two_levels = pytest.mark.skipif(
    len(LEVELS) < 2, reason="needs the native kernels at two CPU levels"
)


def test_the_header_names_the_cpu_model_and_level():
    lines = bench_ops.describe_machine("cpu")
    assert ops.backend_info()["cpu_model"] in lines[0]
    level = ops.backend_info()["cpu_level"]
    if level is None:
        assert not any("CPU level" in line for line in lines)
    else:
        assert any(
            line.startswith(f"CPU level of the native kernels: {level} ") for line in lines
        ), lines


@needs_two_levels
def test_levels_side_by_side(capsys):
    chosen = [LEVELS[-1], LEVELS[0]]  # the lowest first: the table's order is the option's
    before = ops.backend_info()["cpu_level"]
    rows = bench_ops.main(
        ["--quick", "--ops", "unpack_labels", "--levels", ",".join(chosen)], prog="test"
    )
    out = capsys.readouterr().out
    assert [row.level for row in rows] == chosen
    assert all(row.served == "native" for row in rows)
    head = f"| op | case | {chosen[0]} ms | {chosen[1]} ms | plain ms | {chosen[0]} ratio |"
    assert head in out, out
    assert f"| {chosen[1]} / {chosen[0]} |" in out
    # The level the process chose is back after the run.
    assert ops.backend_info()["cpu_level"] == before


@pytest.mark.skipif(not LEVELS, reason="needs the native extension")
def test_levels_this_machine_does_not_run_are_refused():
    with pytest.raises(SystemExit, match=r"--levels: v9 not run by this machine and build"):
        bench_ops.main(["--quick", "--ops", "unpack_labels", "--levels", "v9"], prog="test")


@needs_two_levels
def test_an_op_that_updates_its_input_agrees_at_every_level(capsys):
    # topk_sparse_ef updates its residual in place: each level must start
    # from the state the plain way started from, or later levels "disagree".
    chosen = [LEVELS[0], LEVELS[-1]]
    rows = bench_ops.main(
        ["--quick", "--ops", "topk_sparse_ef", "--levels", ",".join(chosen)], prog="test"
    )
    capsys.readouterr()
    assert [row.level for row in rows] == chosen
    assert all(row.agrees is True for row in rows), [(r.level, r.agrees) for r in rows]
