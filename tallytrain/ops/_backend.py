"""Loading the native extension and reporting which backend serves each device.

TALLYTRAIN_BACKEND selects:
  auto       load the extension; if it cannot serve, warn once (cause and
             fix) and let the reference serve.
  native     load the extension or raise ImportError.
  reference  never load it (and never warn: the way to use a pure-Python
             install on purpose).

The extension serves only when it was built against the running torch: the
torch and CUDA versions setup.py records next to it (_C.build.json), checked
before it is imported, and those compiled into it, checked before its kernels
are registered. A pure-Python install (TALLYTRAIN_BUILD_EXT=0) records that it
has no extension, so that the warning says so.

TALLYTRAIN_CPU_LEVEL selects the CPU level the native CPU kernels run at:
  auto       the best level this CPU runs (the default).
  v4, v3, v2, baseline
             that level (x86-64 builds with GCC >= 12 have all four; other
             builds only baseline); a level the CPU or the build lacks is
             refused with ValueError, never replaced by another.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ._schema import NAMESPACE, SCHEMAS

MODES = ("auto", "native", "reference")
CPU_LEVELS = ("auto", "v4", "v3", "v2", "baseline")
# What each x86-64 level needs of the CPU (the x86-64 psABI's levels).
LEVEL_NEEDS = {
    "v4": "x86-64-v4 (AVX-512 F, BW, CD, DQ and VL)",
    "v3": "x86-64-v3 (AVX2, FMA, BMI1, BMI2, F16C, LZCNT, MOVBE)",
    "v2": "x86-64-v2 (SSE4.2, SSSE3, POPCNT, CMPXCHG16B, LAHF)",
    "baseline": "nothing beyond the build's target",
}
# The file setup.py writes next to the extension: how it was built (the torch
# and CUDA versions), or that the install has no extension on purpose.
BUILD_RECORD = "_C.build.json"
SILENCE = (
    "set TALLYTRAIN_BACKEND=reference to use the pure-PyTorch reference on purpose (no warning)"
)


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def _in_checkout() -> bool:
    """Whether the imported package is a source checkout's (editable or run
    from the tree), where building in place is the fix."""
    root = _package_dir().parent
    return (root / "setup.py").is_file() and (root / "csrc").is_dir()


def build_advice() -> str:
    """How to build the native kernels, for the way this copy was installed."""
    if _in_checkout():
        return (
            "build it with `pip install --no-build-isolation -e .` (or `make install`) "
            "against the installed torch"
        )
    return (
        "reinstall tallytrain from its source (sdist or checkout) against the installed "
        "torch, with a C++ compiler: `pip install --no-build-isolation --no-deps "
        "--force-reinstall <sdist or folder>`"
    )


def fix_advice() -> str:
    return f"{build_advice()}; or {SILENCE}"


def read_build_record() -> Optional[dict]:
    """The build record next to the extension, or None without one."""
    try:
        with open(_package_dir() / BUILD_RECORD) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(torch_version: Optional[str], cuda: Optional[str]) -> str:
    return f"torch {torch_version or 'unknown'} (CUDA {cuda or 'none'})"


def version_mismatch(built: dict) -> Optional[str]:
    """Why an extension built as `built` says (torch, torch_cuda) must not
    serve under the running torch, or None when the versions agree."""
    running = (torch.__version__, torch.version.cuda)
    if (built.get("torch"), built.get("torch_cuda")) == running:
        return None
    return (
        f"it was built against {_describe(built.get('torch'), built.get('torch_cuda'))}, "
        f"but {_describe(*running)} is running"
    )


class NativeBackendWarning(UserWarning):
    """The native extension could not load and the reference serves instead."""


# module: the extension once its kernels are registered; build: how the
# extension (loaded or refused) was built, from itself or its record.
_state: Dict[str, Any] = {"mode": None, "module": None, "error": None, "build": {}}


def requested_mode() -> str:
    mode = os.environ.get("TALLYTRAIN_BACKEND", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TALLYTRAIN_BACKEND must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def requested_cpu_level() -> str:
    level = os.environ.get("TALLYTRAIN_CPU_LEVEL", "auto").strip().lower() or "auto"
    if level not in CPU_LEVELS:
        raise ValueError(
            f"TALLYTRAIN_CPU_LEVEL must be one of {', '.join(CPU_LEVELS)}, got {level!r}"
        )
    return level


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_cpu_level(level: str) -> None:
    """Runs every later native CPU kernel call at `level` ("auto" for the best
    one); ValueError, naming the cause, for a level the CPU or the build lacks.
    TALLYTRAIN_CPU_LEVEL does this at import; the benchmarks switch levels
    within a run."""
    module = _state["module"]
    if module is None:
        raise RuntimeError("the native extension is not loaded: no CPU level to choose")
    supported = list(module.cpu_levels())
    if level == "auto":
        level = supported[0]
    if level not in supported:
        built = list(module.build_info()["cpu_levels"])
        if level not in built:
            why = (
                f"this build of tallytrain._C has no copy of the kernels for it (it has "
                f"{', '.join(built)}: x86-64 builds with GCC >= 12 have every level)"
            )
        else:
            why = f"this CPU ({cpu_model()}) lacks {LEVEL_NEEDS.get(level, level)}"
        raise ValueError(
            f"TALLYTRAIN_CPU_LEVEL={level}: {why}; this machine runs "
            f"{', '.join(supported)}. Unset it (or set auto) to use the best of those."
        )
    module.set_cpu_level(level)


def _refuse(cause: str, advice: str) -> None:
    """The native kernels will not serve: raise in native mode, else warn
    once (cause and advice) and let the reference serve."""
    _state["error"] = cause
    if _state["mode"] == "native":
        raise ImportError(
            f"TALLYTRAIN_BACKEND=native but the tallytrain native extension "
            f"cannot serve: {cause}. Fix: {advice}"
        )
    warnings.warn(
        f"tallytrain: the native extension cannot serve: {cause}. The pure-PyTorch "
        f"reference serves every op. Fix: {advice}",
        NativeBackendWarning,
        stacklevel=4,
    )


def load() -> None:
    """Called once at import of tallytrain.ops: checks the build against the
    running torch before the extension is imported (an extension built for
    another torch may not even load), imports it, checks the versions it
    was compiled with, and only then registers its kernels."""
    mode = requested_mode()
    _state["mode"] = mode
    # Checked in every mode, so that a misspelt level never passes silently.
    cpu_level = requested_cpu_level()
    if mode == "reference":
        return
    record = read_build_record()
    if record is not None and record.get("extension") is False:
        _state["build"] = dict(record)
        why = record.get("why") or "installed without it"
        _refuse(
            f"this install has none (installed with {why})",
            f"to have the native kernels, {build_advice()}, without "
            f"TALLYTRAIN_BUILD_EXT=0; to keep this install, {SILENCE}",
        )
        return
    if record is not None:
        _state["build"] = {k: record.get(k) for k in ("torch", "torch_cuda")}
        mismatch = version_mismatch(record)
        if mismatch:
            _refuse(mismatch, fix_advice())
            return
    try:
        from .. import _C  # noqa: F401  (registers nothing until register_kernels)
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        _refuse(f"it could not load ({type(exc).__name__}: {exc})", fix_advice())
        return
    build = dict(_C.build_info())
    _state["build"] = build
    mismatch = version_mismatch(build)
    if mismatch:
        _refuse(mismatch, fix_advice())
        return
    _C.register_kernels()
    _state["module"] = _C
    set_cpu_level(cpu_level)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)


def serving(device: str) -> str:
    """'native' when every op has a native kernel for the device, else 'reference'."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return "native" if all(_has_kernel(op, key) for op in SCHEMAS) else "reference"


def backend_info() -> dict:
    module = _state["module"]
    build = dict(_state["build"])
    cuda_usable = torch.cuda.is_available()

    def on_cuda(op: str) -> str:
        if not cuda_usable:
            return "unavailable"
        return "native" if _has_kernel(op, "CUDA") else "reference"

    return {
        "mode": _state["mode"],
        "cpu": serving("cpu"),
        "cuda": serving("cuda") if cuda_usable else "unavailable",
        # Per op: who serves on the CPU, who serves on a CUDA device here
        # ("unavailable" without one), and whether a CUDA kernel is registered
        # at all (it may be, with no device to run it).
        "ops": {
            op: {
                "cpu": "native" if _has_kernel(op, "CPU") else "reference",
                "cuda": on_cuda(op),
                "cuda_kernel": "registered" if _has_kernel(op, "CUDA") else "none",
            }
            for op in SCHEMAS
        },
        "extension": getattr(module, "__file__", None),
        # The CPU level the native CPU kernels run at, and the levels this
        # build and CPU allow (best first); None and [] without the extension.
        "cpu_level": module.cpu_level() if module is not None else None,
        "cpu_levels": list(module.cpu_levels()) if module is not None else [],
        "cpu_model": cpu_model(),
        "extension_built_with_cuda": bool(build.get("with_cuda", False)),
        # How the extension was built (from itself, or from its record when
        # it was refused): cpu_levels, with_cuda, torch, torch_cuda.
        "extension_build": build,
        "extension_torch": build.get("torch"),
        "extension_torch_cuda": build.get("torch_cuda"),
        "native_error": _state["error"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if cuda_usable else None,
    }


def native_error() -> Optional[str]:
    return _state["error"]


def supported_cpu_levels() -> List[str]:
    """The CPU levels the loaded extension can run here, best first."""
    module = _state["module"]
    return list(module.cpu_levels()) if module is not None else []
