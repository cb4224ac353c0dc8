"""Backend selection (docs/design.md §3, TALLYTRAIN_BACKEND), the CPU level
(TALLYTRAIN_CPU_LEVEL) and backend_info().

The first tests check that this very run is served by the backend and the CPU
level it asked for: a CI job that requires the native kernels, or a level,
fails here rather than silently testing something else. The others start
fresh interpreters, some with the extension made unimportable (a meta path
finder that refuses tallytrain._C, installed before tallytrain is imported),
and check each mode's contract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tallytrain
import tallytrain.ops as ops
from tallytrain.ops import _backend
from tallytrain.ops._backend import CPU_LEVELS, MODES
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
            report["cpu_level"] = info["cpu_level"]
    report["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
    report["extension_imported"] = "tallytrain._C" in sys.modules
    report["extension_attempts"] = len(attempts)
    print(json.dumps(report))
""")

EXPECTED_RESULTS = [
    [57],  # symbols 1, 2, 3 of 2 bits: 0b111001
    [1, 2, 3],
    [1],  # argmax 1 then 0, 2 bits each: 0b0001
    [1, 0],
    [1, 2],
    [0.0, 1.0, 1.0],
]


def child_env(**variables):
    """This environment, with the package on the path and TALLYTRAIN_*
    variables set (a value of None removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    for name, value in variables.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_child(mode, failure="missing", cpu_level=None, prelude="", root=None):
    """Run USE_OPS in a fresh interpreter where importing the extension fails
    ("missing", "broken") or does not (failure=None), after `prelude`, with
    the package imported from `root` (default: this session's)."""
    env = child_env(TALLYTRAIN_BACKEND=mode, TALLYTRAIN_CPU_LEVEL=cpu_level)
    if root is not None:
        env["PYTHONPATH"] = str(root)
    program = (
        f"FAILURE = {failure!r}\n" + BLOCK_EXTENSION if failure else "import sys\nattempts = []\n"
    )
    program += prelude + USE_OPS
    # (Run from `root`: the current folder comes first on the child's path.)
    proc = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_extension = pytest.mark.skipif(
    ops.backend_info()["extension"] is None, reason="needs the native extension"
)


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
        assert all(
            kinds["cpu"] == "reference"
            and kinds["cuda_kernel"] == "none"
            and kinds["cuda"] in ("reference", "unavailable")
            for kinds in info["ops"].values()
        ), info["ops"]
    else:  # auto: the extension loaded, or the reason it did not is on record
        assert (info["extension"] is not None) != (info["native_error"] is not None), info


def test_requested_cpu_level_serves():
    requested = os.environ.get("TALLYTRAIN_CPU_LEVEL", "auto").strip().lower() or "auto"
    info = ops.backend_info()
    if info["extension"] is None:
        assert info["cpu_level"] is None and info["cpu_levels"] == []
        return
    levels = info["cpu_levels"]
    assert levels and set(levels) <= set(CPU_LEVELS) - {"auto"}
    assert levels[-1] == "baseline"
    assert info["cpu_level"] == (levels[0] if requested == "auto" else requested)
    assert list(info["extension_build"]["cpu_levels"])[-1] == "baseline"


def test_backend_info_keys():
    info = ops.backend_info()
    assert {
        "mode",
        "cpu",
        "cuda",
        "ops",
        "extension",
        "extension_built_with_cuda",
        "extension_build",
        "extension_torch",
        "extension_torch_cuda",
        "native_error",
        "torch",
        "torch_cuda",
        "cuda_device",
        "cpu_level",
        "cpu_levels",
        "cpu_model",
    } <= set(info)
    assert info["mode"] in MODES
    assert info["cpu"] in ("native", "reference")
    assert info["cuda"] in (
        ("native", "reference") if torch.cuda.is_available() else ("unavailable",)
    )
    assert set(info["ops"]) == set(SCHEMAS)
    for kinds in info["ops"].values():
        assert set(kinds) == {"cpu", "cuda", "cuda_kernel"}
        assert kinds["cpu"] in ("native", "reference")
        assert kinds["cuda_kernel"] in ("registered", "none")
        # Without a device a registered CUDA kernel serves nothing.
        if torch.cuda.is_available():
            assert kinds["cuda"] == (
                "native" if kinds["cuda_kernel"] == "registered" else "reference"
            )
        else:
            assert kinds["cuda"] == "unavailable"
    if info["extension"] is None:
        assert all(kinds["cuda_kernel"] == "none" for kinds in info["ops"].values())
    elif info["extension_built_with_cuda"]:
        assert all(kinds["cuda_kernel"] == "registered" for kinds in info["ops"].values())
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


@pytest.mark.parametrize(
    "mode,failure",
    [(None, "missing"), ("auto", "broken"), (" Auto ", "missing")],
    ids=["unset-missing", "auto-broken", "spaced-missing"],
)
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


# --------------------------------------------------------------------------- #
# the build against the running torch, and installs without the extension
# --------------------------------------------------------------------------- #
# Makes the child's torch report another version before tallytrain is imported.
OTHER_TORCH = "2.0.0+other"
CHANGE_TORCH = f"import torch\ntorch.__version__ = {OTHER_TORCH!r}\n"


def installed_copy(tmp_path, extension=True, record=None):
    """A copy of the package outside any checkout (as pip installs it), with
    or without the extension, and the given build record (None: none)."""
    target = tmp_path / "site" / "tallytrain"
    shutil.copytree(
        Path(tallytrain.__file__).parent,
        target,
        ignore=shutil.ignore_patterns(
            "__pycache__", "_C.build.json", *([] if extension else ["_C*.so"])
        ),
    )
    if record is not None:
        (target / _backend.BUILD_RECORD).write_text(json.dumps(record))
    return target.parent


@needs_extension
def test_extension_reports_the_torch_it_was_built_against():
    info = ops.backend_info()
    assert info["extension_torch"] == torch.__version__
    assert info["extension_torch_cuda"] == torch.version.cuda
    record = _backend.read_build_record()
    assert record is not None, "setup.py writes the build record next to the extension"
    assert (record["torch"], record["torch_cuda"]) == (torch.__version__, torch.version.cuda)


@needs_extension
@pytest.mark.parametrize("mode", ["auto", "native"])
def test_extension_of_another_torch_never_loads(mode):
    """The build record names another torch: auto warns once naming both
    versions and the reference serves, the extension not even imported;
    native raises."""
    report = run_child(mode, failure=None, prelude=CHANGE_TORCH)
    both = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"torch {OTHER_TORCH}",
    ]
    assert not report["extension_imported"]
    if mode == "native":
        kind, message = report["error"]
        assert kind == "ImportError" and all(v in message for v in both), message
        return
    warned = native_warnings(report)
    assert len(warned) == 1 and all(v in warned[0] for v in both), report["warnings"]
    assert "pip install --no-build-isolation -e ." in warned[0]  # this is a checkout
    assert report["results"] == EXPECTED_RESULTS
    assert report["info"]["cpu"] == "reference"


@needs_extension
def test_extension_without_record_is_checked_before_its_kernels_register(tmp_path):
    """Without a build record the versions compiled into the extension decide:
    it is imported, but its kernels are never registered."""
    root = installed_copy(tmp_path)
    report = run_child("auto", failure=None, prelude=CHANGE_TORCH, root=root)
    assert report["extension_imported"]
    warned = native_warnings(report)
    assert len(warned) == 1 and torch.__version__ in warned[0] and OTHER_TORCH in warned[0]
    assert report["info"]["cpu"] == "reference"
    assert report["results"] == EXPECTED_RESULTS
    # The same copy under the torch it was built for serves natively.
    report = run_child("native", failure=None, root=root)
    assert "error" not in report and report["info"]["cpu"] == "native", report


def test_pure_python_install_says_so_and_can_be_silenced(tmp_path):
    """An install made with TALLYTRAIN_BUILD_EXT=0 warns with advice for an
    installed package (not a checkout's), and TALLYTRAIN_BACKEND=reference
    silences it."""
    root = installed_copy(
        tmp_path, extension=False, record={"extension": False, "why": "TALLYTRAIN_BUILD_EXT=0"}
    )
    report = run_child("auto", failure=None, root=root)
    warned = native_warnings(report)
    assert len(warned) == 1, report["warnings"]
    assert "TALLYTRAIN_BUILD_EXT=0" in warned[0] and "--force-reinstall" in warned[0]
    assert "TALLYTRAIN_BACKEND=reference" in warned[0] and "-e ." not in warned[0]
    assert not report["extension_imported"] and report["results"] == EXPECTED_RESULTS
    report = run_child("native", failure=None, root=root)
    assert report["error"][0] == "ImportError" and "TALLYTRAIN_BUILD_EXT=0" in report["error"][1]
    report = run_child("reference", failure=None, root=root)
    assert report["warnings"] == [] and report["results"] == EXPECTED_RESULTS


def test_installed_copy_without_extension_advises_a_reinstall(tmp_path):
    # (The import is refused too: an editable install elsewhere on the path
    # could otherwise lend its own extension.)
    report = run_child("auto", failure="missing", root=installed_copy(tmp_path, extension=False))
    warned = native_warnings(report)
    assert len(warned) == 1 and "could not load" in warned[0], report["warnings"]
    assert "--force-reinstall" in warned[0] and "-e ." not in warned[0]


# --------------------------------------------------------------------------- #
# TALLYTRAIN_CPU_LEVEL
# --------------------------------------------------------------------------- #
def test_invalid_cpu_level_lists_the_levels():
    for mode in ("native", "reference"):
        report = run_child(mode, failure=None, cpu_level="avx512")
        kind, message = report["error"]
        assert kind == "ValueError"
        assert "TALLYTRAIN_CPU_LEVEL" in message and "'avx512'" in message
        assert all(level in message for level in CPU_LEVELS)


@needs_extension
@pytest.mark.parametrize("level", ["auto", " V3 ", "baseline"])
def test_cpu_level_is_chosen_at_import(level):
    supported = ops.backend_info()["cpu_levels"]
    want = level.strip().lower()
    want = supported[0] if want == "auto" else want
    if want not in supported:
        pytest.skip(f"this CPU does not run {want}")
    report = run_child("native", failure=None, cpu_level=level)
    assert "error" not in report, report
    assert report["cpu_level"] == want
    assert report["results"] == EXPECTED_RESULTS


@needs_extension
def test_cpu_level_this_cpu_lacks_is_refused():
    """Where the CPU lacks a level of the build, forcing it fails at import,
    naming the level, what it needs and what the machine runs."""
    info = ops.backend_info()
    lacking = [lv for lv in info["extension_build"]["cpu_levels"] if lv not in info["cpu_levels"]]
    if not lacking:
        pytest.skip("this CPU runs every level of the build (see the stand-in test below)")
    report = run_child("native", failure=None, cpu_level=lacking[0])
    kind, message = report["error"]
    assert kind == "ValueError"
    assert f"TALLYTRAIN_CPU_LEVEL={lacking[0]}" in message and "lacks" in message
    assert all(level in message for level in info["cpu_levels"])


class _StandInExtension:
    """The parts of tallytrain._C that choosing a level uses, for a CPU with
    AVX2 and no AVX-512 under a build of every level, or a portable build."""

    def __init__(self, built, runs):
        self.built, self.runs, self.chosen = built, runs, None

    def build_info(self):
        return {"cpu_levels": self.built}

    def cpu_levels(self):
        return self.runs

    def set_cpu_level(self, level):
        self.chosen = level


@pytest.mark.parametrize(
    "built,runs,asked,cause",
    [
        (["v4", "v3", "v2", "baseline"], ["v3", "v2", "baseline"], "v4", "lacks x86-64-v4"),
        (["baseline"], ["baseline"], "v3", "has no copy of the kernels for it"),
    ],
    ids=["cpu-lacks-v4", "portable-build"],
)
def test_cpu_level_refusal_names_the_cause(built, runs, asked, cause, monkeypatch):
    stand_in = _StandInExtension(built, runs)
    monkeypatch.setitem(_backend._state, "module", stand_in)
    with pytest.raises(ValueError) as info:
        _backend.set_cpu_level(asked)
    message = str(info.value)
    assert f"TALLYTRAIN_CPU_LEVEL={asked}" in message and cause in message
    assert ", ".join(runs) in message and "auto" in message
    assert stand_in.chosen is None
    _backend.set_cpu_level("auto")
    assert stand_in.chosen == runs[0]


@needs_extension
def test_extension_refuses_unknown_level():
    from tallytrain import _C

    with pytest.raises(ValueError, match="not in this build"):
        _C.set_cpu_level("v5")
    assert _C.cpu_level() == ops.backend_info()["cpu_level"]
