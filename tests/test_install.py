"""Installing from source where the native extension cannot be built: the
build stops with one line that names the cause and TALLYTRAIN_BUILD_EXT=0,
never a traceback (setup.py). Each case builds a copy of the sources in a
temporary folder with a compiler that cannot work, so it fails within
seconds, before anything compiles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINE = "tallytrain: cannot build the native extension: "


def source_copy(tmp_path: Path) -> Path:
    """What setup.py needs: itself, the metadata, the C++ sources and the
    package's Python files (no built extension)."""
    target = tmp_path / "src"
    target.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "csrc", target / "csrc")
    shutil.copytree(
        ROOT / "tallytrain",
        target / "tallytrain",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_C.build.json"),
    )
    return target


def build_env(cxx: str) -> dict:
    # FORCE_CUDA=0: the CPU build, whatever toolkit this machine has.
    return dict(os.environ, CXX=cxx, FORCE_CUDA="0", TALLYTRAIN_BUILD_EXT="1")


@pytest.mark.parametrize(
    "cxx,cause",
    [
        ("/bin/false", "the C++ compiler '/bin/false' cannot build a test program"),
        ("/nonexistent/c++", "no C++ compiler: '/nonexistent/c++'"),
    ],
    ids=["broken-compiler", "no-compiler"],
)
def test_build_without_a_working_compiler_stops_with_one_line(tmp_path, cxx, cause):
    src = source_copy(tmp_path)
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext"],
        cwd=src,
        env=build_env(cxx),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(LINE + cause), proc.stderr
    assert "set TALLYTRAIN_BUILD_EXT=0 to install without it" in last
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(src.glob("build/**/_C*.so"))


def test_pip_install_without_a_working_compiler_shows_the_line(tmp_path):
    """What a user of `pip install` sees: pip's report ends with our line."""
    src = source_copy(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-w",
            str(tmp_path / "wheels"),
            str(src),
        ],
        env=build_env("/bin/false"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert LINE in output and "TALLYTRAIN_BUILD_EXT=0" in output, output
    assert "Traceback" not in output
    assert not list(tmp_path.glob("wheels/*.whl"))
