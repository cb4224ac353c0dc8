"""Loading the native extension and reporting which backend serves each device.

TALLYTRAIN_BACKEND selects:
  auto       load the extension; if it cannot load, warn once (cause and fix)
             and let the reference serve.
  native     load the extension or raise ImportError.
  reference  never load it.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from ._schema import NAMESPACE, SCHEMAS

MODES = ("auto", "native", "reference")
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


def load() -> None:
    """Called once at import of tallytrain.ops."""
    mode = requested_mode()
    _state["mode"] = mode
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
        "extension_built_with_cuda": build.get("with_cuda", False),
        "extension_build": build,
        "native_error": _state["error"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def native_error() -> Optional[str]:
    return _state["error"]
