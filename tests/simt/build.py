"""Builds the CUDA kernels of csrc/cuda/ for the CPU execution model of
tests/simt/include/simt.h and registers them as ``torch.ops.tallytrain_simt``.

Each .cu file is compiled as C++ after two rewrites that C++ cannot express:
a launch ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::simt::launch(kernel, ::simt::Config(grid, block, smem, stream))(args)``,
and an ``extern __shared__`` array becomes a pointer to the block's dynamic
shared memory. The bindings (csrc/cuda/*_binding.cpp) compile unchanged with
TALLYTRAIN_SIMT defined, which makes them serve CPU tensors under the
``tallytrain_simt`` namespace, with the schemas of tallytrain.ops.

The build goes through torch.utils.cpp_extension.load into build/simt/<name>/, so a
second call with unchanged sources only loads the library.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = Path(__file__).resolve().parent / "include"
CUDA_DIR = ROOT / "csrc" / "cuda"
NAMESPACE = "tallytrain_simt"

_LAUNCH = re.compile(
    r"\b(?P<kernel>[A-Za-z_]\w*(?:\s*<[^<>;(){}]*>)?)\s*<<<(?P<config>.*?)>>>\s*\(", re.S
)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w\s]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;"
)
_STATIC_SHARED = re.compile(
    r"(?<!extern )__shared__\s+(?P<decl>[^;]*?\b(?P<name>\w+)\s*(?:\[[^;]*\])?)\s*;"
)
_LAUNCH_BOUNDS = re.compile(
    r"__global__\s+void\s+__launch_bounds__\((?P<bound>[^,()]+)[^()]*\)\s*\w+\s*\("
)


def _body_start(source: str, open_paren: int) -> int:
    """Index just past the `{` that follows the parameter list opened at `open_paren`."""
    depth = 0
    for i in range(open_paren, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source.index("{", i) + 1
    raise RuntimeError("unbalanced parameter list")


def translate(source: str, path: Path) -> str:
    """The C++ that simt.h compiles for one .cu file, line for line: each
    rewrite keeps the newlines it replaces, so that compiler messages and
    coverage counts name the .cu file's own lines."""
    launches = len(_LAUNCH.findall(source))
    if launches != source.count("<<<"):
        raise RuntimeError(
            f"{path}: found {source.count('<<<')} '<<<' but could rewrite only {launches} launches"
        )
    # Kernels with __launch_bounds__(N) check their block size on entry.
    for m in reversed(list(_LAUNCH_BOUNDS.finditer(source))):
        at = _body_start(source, m.end() - 1)
        source = f"{source[:at]} ::simt::launch_bounds({m['bound'].strip()});{source[at:]}"
    out = _LAUNCH.sub(
        lambda m: (
            f"::simt::launch({m['kernel']}, ::simt::Config({m['config']}))("
            + "\n" * (m[0].count("\n") - m["kernel"].count("\n") - m["config"].count("\n"))
        ),
        source,
    )
    out = _EXTERN_SHARED.sub(
        lambda m: (
            f"{m['type']}* const {m['name']} = "
            f"reinterpret_cast<{m['type']}*>(::simt::dynamic_shared());"
        ),
        out,
    )
    out = _STATIC_SHARED.sub(
        lambda m: (
            f"__shared__ {m['decl']}; ::simt::fresh_shared(&{m['name']}, sizeof({m['name']}));"
        ),
        out,
    )
    # __CUDACC__: the shared headers (tallytrain/common.h) then offer their device helpers.
    return f'#include "simt.h"\n#define __CUDACC__ 1\n#line 1 "{path}"\n{out}'


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_library = []  # the definitions last as long as this module holds the Library


def _define_schemas() -> None:
    from tallytrain.ops._schema import SCHEMAS

    if _library:
        return
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    _library.append(lib)


# TALLYTRAIN_SIMT_INSTRUMENT: (compiler flags, linker flags, library suffix).
#   address   AddressSanitizer; its runtime must then be loaded first
#             (LD_PRELOAD=asan_preload(), as `make test-simt-asan` does)
#   coverage  gcov counters, read by coverage_report() (`make simt-coverage`)
INSTRUMENTS = {
    "": ([], [], ""),
    "address": (["-fsanitize=address", "-fno-omit-frame-pointer"], ["-fsanitize=address"], "_asan"),
    "coverage": (["-O0", "--coverage"], ["--coverage"], "_cov"),
}


def instrument() -> str:
    mode = os.environ.get("TALLYTRAIN_SIMT_INSTRUMENT", "").strip().lower()
    if mode not in INSTRUMENTS:
        raise ValueError(
            f"TALLYTRAIN_SIMT_INSTRUMENT must be one of "
            f"{', '.join(m for m in INSTRUMENTS if m)} or empty, got {mode!r}"
        )
    return mode


def asan_preload() -> str:
    """LD_PRELOAD for the AddressSanitizer build: the runtime of the compiler
    torch builds with, and libstdc++ beside it (loaded first, so that the
    runtime finds the real __cxa_throw to intercept; without it the first C++
    exception aborts the process)."""
    compiler = os.environ.get("CXX", "c++")
    paths = []
    for lib in ("libasan.so", "libstdc++.so.6"):
        path = subprocess.run(
            [compiler, f"-print-file-name={lib}"], check=True, capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            raise RuntimeError(
                f"{compiler} has no {lib}; install it (Debian/Ubuntu: the "
                f"libasan and libstdc++ development packages of your gcc)"
            )
        paths.append(os.path.realpath(path))
    return " ".join(paths)


def _build(name: str, cu_files, cpp_files, python_module: bool, verbose: bool):
    from torch.utils import cpp_extension

    flags = [
        "-O1",
        "-DTALLYTRAIN_SIMT",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-Wno-unknown-pragmas",
        "-Wno-unused-function",
        "-Wno-unused-variable",
    ]
    extra_flags, ldflags, suffix = INSTRUMENTS[instrument()]
    flags += extra_flags  # a later -O wins
    name += suffix
    build_dir = ROOT / "build" / "simt" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in cu_files:
        translated = build_dir / f"{cu.stem}_cu.cpp"
        _write_if_changed(translated, translate(cu.read_text(), cu))
        sources.append(str(translated))
    sources += [str(p) for p in cpp_files]
    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(INCLUDE), str(CUDA_DIR), str(ROOT / "csrc" / "include")],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        is_python_module=python_module,
        verbose=verbose,
    )


def load(verbose: bool = False):
    """Builds (when needed) and loads the emulated kernels; returns
    ``torch.ops.tallytrain_simt``."""
    _define_schemas()
    _build(
        "tallytrain_simt_kernels",
        sorted(CUDA_DIR.glob("*.cu")),
        sorted(CUDA_DIR.glob("*_binding.cpp")),
        False,
        verbose,
    )
    return getattr(torch.ops, NAMESPACE)


def load_selftest(verbose: bool = False):
    """The Python module of selftest.cu: kernels that show what the execution
    model does, including the errors it reports."""
    here = Path(__file__).resolve().parent
    return _build(
        "tallytrain_simt_selftest",
        [here / "selftest.cu"],
        [here / "selftest_binding.cpp"],
        True,
        verbose,
    )


def coverage_report() -> int:
    """Prints the lines of csrc/cuda/*.cu that no run of the coverage build
    has executed (counters add up over runs until build/simt/*_cov/*.gcda are
    deleted); returns how many. A line counts as run if any template
    instance ran it."""
    build_dir = ROOT / "build" / "simt" / ("tallytrain_simt_kernels" + INSTRUMENTS["coverage"][2])
    counters = sorted(build_dir.glob("*_cu.gcda"))
    if not counters:
        raise RuntimeError(
            f"no coverage counters in {build_dir}: run the simt tests with "
            f"TALLYTRAIN_SIMT_INSTRUMENT=coverage first"
        )
    never_run = 0
    for gcda in counters:
        out = subprocess.run(
            ["gcov", "--json-format", "--stdout", "-o", str(build_dir), str(gcda)],
            check=True,
            capture_output=True,
            text=True,
            cwd=build_dir,
        ).stdout
        for report in map(json.loads, filter(None, out.splitlines())):
            for source in report["files"]:
                if not source["file"].endswith(".cu"):
                    continue
                runs = {}
                for line in source["lines"]:
                    n = line["line_number"]
                    runs[n] = max(runs.get(n, 0), line["count"])
                text = Path(source["file"]).read_text().splitlines()
                missed = sorted(n for n, count in runs.items() if count == 0)
                never_run += len(missed)
                print(f"{source['file']}: {len(runs) - len(missed)} of {len(runs)} lines run")
                for n in missed:
                    print(f"  {n:5d}  {text[n - 1].strip()}")
    return never_run


if __name__ == "__main__":
    if sys.argv[1:] == ["--asan-preload"]:
        print(asan_preload())
    elif sys.argv[1:] == ["--coverage-report"]:
        coverage_report()
    else:
        print("loaded", load(verbose=True), "and", load_selftest(verbose=True))
