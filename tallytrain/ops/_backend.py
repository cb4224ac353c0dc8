"""Loading the native extension and reporting which backend serves each device.

TALLYTRAIN_BACKEND selects:
  auto       load the extension; if it cannot load, warn once (cause and fix)
             and let the reference serve.
  native     load the extension or raise ImportError.
  reference  never load it.

TALLYTRAIN_CPU_LEVEL selects the CPU level the native CPU kernels run at:
  auto       the best level this CPU runs (the default).
  v4, v3, v2, baseline
             that level (x86-64 builds with GCC >= 12 have all four; other
             builds only baseline); a level the CPU or the build lacks is
             refused with ValueError, never replaced by another.
"""
from __future__ import annotations

import os
import platform
import warnings
from typing import List, Optional

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
FIX = ("build it with `pip install --no-build-isolation -e .` (or `make install`) "
       "against the installed torch, or set TALLYTRAIN_BACKEND=reference to use "
       "the pure-PyTorch reference on purpose")


class NativeBackendWarning(UserWarning):
    """The native extension could not load and the reference serves instead."""


_state = {"mode": None, "module": None, "error": None}


def requested_mode() -> str:
    mode = os.environ.get("TALLYTRAIN_BACKEND", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"TALLYTRAIN_BACKEND must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def requested_cpu_level() -> str:
    level = os.environ.get("TALLYTRAIN_CPU_LEVEL", "auto").strip().lower() or "auto"
    if level not in CPU_LEVELS:
        raise ValueError(
            f"TALLYTRAIN_CPU_LEVEL must be one of {', '.join(CPU_LEVELS)}, got {level!r}")
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
            why = (f"this build of tallytrain._C has no copy of the kernels for it (it has "
                   f"{', '.join(built)}: x86-64 builds with GCC >= 12 have every level)")
        else:
            why = f"this CPU ({cpu_model()}) lacks {LEVEL_NEEDS.get(level, level)}"
        raise ValueError(
            f"TALLYTRAIN_CPU_LEVEL={level}: {why}; this machine runs "
            f"{', '.join(supported)}. Unset it (or set auto) to use the best of those.")
    module.set_cpu_level(level)


def load() -> None:
    """Called once at import of tallytrain.ops."""
    mode = requested_mode()
    _state["mode"] = mode
    # Checked in every mode, so that a misspelt level never passes silently.
    cpu_level = requested_cpu_level()
    if mode == "reference":
        return
    try:
        from .. import _C  # noqa: F401  (registers the CPU/CUDA kernels)
        _state["module"] = _C
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        _state["error"] = f"{type(exc).__name__}: {exc}"
        if mode == "native":
            raise ImportError(
                f"TALLYTRAIN_BACKEND=native but the tallytrain native extension "
                f"could not load ({_state['error']}); {FIX}") from exc
        warnings.warn(
            f"tallytrain: the native extension could not load ({_state['error']}); "
            f"the pure-PyTorch reference serves every op. Fix: {FIX}",
            NativeBackendWarning, stacklevel=3)
        return
    set_cpu_level(cpu_level)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)


def serving(device: str) -> str:
    """'native' when every op has a native kernel for the device, else 'reference'."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return "native" if all(_has_kernel(op, key) for op in SCHEMAS) else "reference"


def backend_info() -> dict:
    module = _state["module"]
    build = module.build_info() if module is not None else {}
    return {
        "mode": _state["mode"],
        "cpu": serving("cpu"),
        "cuda": serving("cuda") if torch.cuda.is_available() else "unavailable",
        "ops": {op: {"cpu": "native" if _has_kernel(op, "CPU") else "reference",
                     "cuda": "native" if _has_kernel(op, "CUDA") else "reference"}
                for op in SCHEMAS},
        "extension": getattr(module, "__file__", None),
        # The CPU level the native CPU kernels run at, and the levels this
        # build and CPU allow (best first); None and [] without the extension.
        "cpu_level": module.cpu_level() if module is not None else None,
        "cpu_levels": list(module.cpu_levels()) if module is not None else [],
        "cpu_model": cpu_model(),
        "extension_built_with_cuda": build.get("with_cuda", False),
        "extension_build": build,
        "native_error": _state["error"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def native_error() -> Optional[str]:
    return _state["error"]


def supported_cpu_levels() -> List[str]:
    """The CPU levels the loaded extension can run here, best first."""
    module = _state["module"]
    return list(module.cpu_levels()) if module is not None else []
