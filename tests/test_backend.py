"""Backend selection (docs/design.md §3, TALLYTRAIN_BACKEND) and backend_info().

The first test checks that this very run is served by the backend it asked
for: a CI job that requires the native kernels fails here, rather than
silently testing the reference. The others start fresh interpreters with the
extension made unimportable (a meta path finder that refuses tallytrain._C,
installed before tallytrain is imported) and check each mode's contract.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tallytrain
import tallytrain.ops as ops
from tallytrain.ops._backend import MODES
from tallytrain.ops._schema import SCHEMAS

# The folder that holds the tallytrain package this session imported, so the
# child interpreters load the same code.
PACKAGE_ROOT = str(Path(tallytrain.__file__).resolve().parent.parent)

# Prepended to every child program: makes importing tallytrain._C fail and
# records every attempt. "missing" fails as an extension that was never built
# (Python then reports "cannot import name '_C'"); "broken" as one that was
# built against another torch (the loader's message reaches the user as is).
BLOCK_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys
    attempts = []
    class _RefuseExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "tallytrain._C":
                return None
            attempts.append(name)
            if FAILURE == "missing":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            raise ImportError("_C.so: undefined symbol: _ZN3c10blocked_by_test_backend")
    sys.meta_path.insert(0, _RefuseExtension())
""")
# What each failure leaves in the message: the cause, as the user would see it.
CAUSE = {"missing": "cannot import name '_C'", "broken": "blocked_by_test_backend"}

# Calls several ops and reports what happened as one JSON line.
USE_OPS = textwrap.dedent("""
    import json, warnings
    report = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning, not one per place
        try:
            import torch
            import tallytrain.ops as ops
        except Exception as exc:
            report["error"] = [type(exc).__name__, str(exc)]
        else:
            packed = ops.pack_labels(torch.tensor([1, 2, 3]), 4)
            labels = ops.unpack_labels(packed, 3, 4)
            votes = ops.pack_argmax(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]))
            tallied = ops.tally(torch.stack([votes, votes]), 2, 3)
            idx, _ = ops.topk_sparse(torch.tensor([0.5, -3.0, 2.0]), 2)
            merged = ops.sparse_merge([idx], [torch.ones(2)], 3)
            report["results"] = [packed.tolist(), labels.tolist(), votes.tolist(),
                                 tallied.label.tolist(), idx.tolist(), merged.tolist()]
            info = ops.backend_info()
            report["info"] = {k: info[k] for k in ("mode", "cpu", "native_error")}
    report["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
    report["extension_imported"] = "tallytrain._C" in sys.modules
    report["extension_attempts"] = len(attempts)
    print(json.dumps(report))
""")

EXPECTED_RESULTS = [
    [57],          # symbols 1, 2, 3 of 2 bits: 0b111001
    [1, 2, 3],
    [1],           # argmax 1 then 0, 2 bits each: 0b0001
    [1, 0],
    [1, 2],
    [0.0, 1.0, 1.0],
]


def run_child(mode, failure="missing"):
    """Run USE_OPS in a fresh interpreter where importing the extension fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if mode is None:
        env.pop("TALLYTRAIN_BACKEND", None)
    else:
        env["TALLYTRAIN_BACKEND"] = mode
    program = f"FAILURE = {failure!r}\n" + BLOCK_EXTENSION + USE_OPS
    proc = subprocess.run([sys.executable, "-c", program], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def native_warnings(report):
    return [msg for category, msg in report["warnings"] if category == "NativeBackendWarning"]


# --------------------------------------------------------------------------- #
# this run
# --------------------------------------------------------------------------- #
def test_requested_backend_serves():
    requested = os.environ.get("TALLYTRAIN_BACKEND", "auto").strip().lower() or "auto"
    info = ops.backend_info()
    assert info["mode"] == requested
    if requested == "native":
        assert info["native_error"] is None
        assert info["cpu"] == "native", info["ops"]
        assert all(kinds["cpu"] == "native" for kinds in info["ops"].values()), info["ops"]
        if torch.cuda.is_available() and info["extension_built_with_cuda"]:
            assert info["cuda"] == "native", info["ops"]
            assert all(kinds["cuda"] == "native" for kinds in info["ops"].values()), info["ops"]
    elif requested == "reference":
        assert "tallytrain._C" not in sys.modules
        assert info["extension"] is None and info["native_error"] is None
        assert info["cpu"] == "reference"
        assert all(kinds == {"cpu": "reference", "cuda": "reference"}
                   for kinds in info["ops"].values()), info["ops"]
    else:  # auto: the extension loaded, or the reason it did not is on record
        assert (info["extension"] is not None) != (info["native_error"] is not None), info


def test_backend_info_keys():
    info = ops.backend_info()
    assert {"mode", "cpu", "cuda", "ops", "extension", "extension_built_with_cuda",
            "extension_build", "native_error", "torch", "torch_cuda", "cuda_device"} <= set(info)
    assert info["mode"] in MODES
    assert info["cpu"] in ("native", "reference")
    assert info["cuda"] in (("native", "reference") if torch.cuda.is_available()
                            else ("unavailable",))
    assert set(info["ops"]) == set(SCHEMAS)
    for kinds in info["ops"].values():
        assert set(kinds) == {"cpu", "cuda"}
        assert set(kinds.values()) <= {"native", "reference"}
    # A device is native only when every op is.
    all_cpu_native = all(kinds["cpu"] == "native" for kinds in info["ops"].values())
    assert (info["cpu"] == "native") == all_cpu_native
    assert info["torch"] == torch.__version__


# --------------------------------------------------------------------------- #
# fresh interpreters without the extension
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("failure", list(CAUSE))
def test_native_without_extension_raises_import_error(failure):
    report = run_child("native", failure)
    kind, message = report["error"]
    assert kind == "ImportError"
    assert "TALLYTRAIN_BACKEND=native" in message
    assert CAUSE[failure] in message
    assert "pip install" in message and "TALLYTRAIN_BACKEND=reference" in message  # the fix


@pytest.mark.parametrize("mode,failure", [(None, "missing"), ("auto", "broken"),
                                          (" Auto ", "missing")],
                         ids=["unset-missing", "auto-broken", "spaced-missing"])
def test_auto_without_extension_warns_once_and_serves_reference(mode, failure):
    report = run_child(mode, failure)
    assert "error" not in report, report
    warned = native_warnings(report)
    assert len(warned) == 1, report["warnings"]
    assert CAUSE[failure] in warned[0]
    assert "pip install" in warned[0] and "TALLYTRAIN_BACKEND=reference" in warned[0]
    assert report["results"] == EXPECTED_RESULTS
    assert report["info"]["mode"] == "auto" and report["info"]["cpu"] == "reference"
    assert CAUSE[failure] in report["info"]["native_error"]


def test_reference_never_imports_extension():
    report = run_child("reference")
    assert "error" not in report, report
    assert report["extension_attempts"] == 0 and not report["extension_imported"]
    assert native_warnings(report) == []
    assert report["results"] == EXPECTED_RESULTS
    assert report["info"] == {"mode": "reference", "cpu": "reference", "native_error": None}


def test_invalid_mode_lists_the_modes():
    report = run_child("fastest")
    kind, message = report["error"]
    assert kind == "ValueError"
    assert "TALLYTRAIN_BACKEND" in message and "'fastest'" in message
    assert all(mode in message for mode in MODES)
