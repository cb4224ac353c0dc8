"""Builds the one native extension, tallytrain._C. Metadata is in pyproject.toml.

- CPU kernels (csrc/cpu) always.
- CUDA kernels (csrc/cuda) when the installed torch has CUDA and nvcc is found;
  FORCE_CUDA=1 insists (and fails without them), FORCE_CUDA=0 skips them.
- TALLYTRAIN_BUILD_EXT=0: a pure-Python install (the reference serves).
- TORCH_CUDA_ARCH_LIST is respected; by default 8.0 and 9.0.
The build prints one summary line (CPU levels, CUDA yes/no and why). Without a
working C++ compiler, or when the extension fails to compile, it stops with
one line naming the cause and TALLYTRAIN_BUILD_EXT=0 (no traceback). Next to
the extension it writes _C.build.json: the torch and CUDA versions it was built
against, which tallytrain/ops/_backend.py compares with the running torch
before loading it (a pure-Python install writes one saying so).
No network is touched.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _find_cuda_home():
    """The toolkit folder: the one whose lib64 holds libcudart and bin holds nvcc.

    `nvcc` on PATH may be a wrapper script, so its parent is not always the
    toolkit; look at the usual places too."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script that execs the real nvcc: read its target
            with open(nvcc, "r", errors="ignore") as f:
                for token in f.read().split():
                    if token.endswith("/bin/nvcc") and os.path.exists(token):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if (
            c
            and os.path.exists(os.path.join(c, "bin", "nvcc"))
            and (
                glob.glob(os.path.join(c, "lib64", "libcudart.so*"))
                or glob.glob(os.path.join(c, "lib", "x64", "cudart*"))
            )
        ):
            return c
    return None


def _torch_cxx_standard(ce):
    """The C++ standard the installed torch was built for.

    Newer torch headers insist on C++20 (they #error otherwise); older ones
    are written for C++17, which is also what their own builds use."""
    for inc in ce.include_paths():
        header = os.path.join(inc, "torch", "csrc", "api", "include", "torch", "all.h")
        if os.path.exists(header):
            with open(header, errors="ignore") as f:
                return "c++20" if "C++20 or later" in f.read() else "c++17"
    return "c++17"


# The file next to tallytrain/_C*.so that says how it was built (read by
# tallytrain/ops/_backend.py before it loads the extension).
BUILD_RECORD = "_C.build.json"
NO_EXTENSION = (
    "set TALLYTRAIN_BUILD_EXT=0 to install without it "
    "(the pure-PyTorch reference then serves every op)"
)


def _fail(cause, cuda=False):
    """Ends the build with one line: the cause and the way out."""
    cpu_only = "; FORCE_CUDA=0 builds the CPU kernels only" if cuda else ""
    raise SystemExit(
        f"tallytrain: cannot build the native extension: {cause}. Fix that, or "
        f"{NO_EXTENSION}{cpu_only}."
    )


def _probe_compiler(cxx, workdir):
    """(None, predefined macros) if `cxx` compiles and links a shared object,
    else (cause, None)."""
    source = os.path.join(workdir, "probe.cpp")
    with open(source, "w") as f:
        f.write("#include <vector>\nint probe() { return int(std::vector<int>(3).size()); }\n")
    try:
        subprocess.run(
            [cxx, "-shared", "-fPIC", source, "-o", os.path.join(workdir, "probe.so")],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        macros = subprocess.run(
            [cxx, "-dM", "-E", "-x", "c++", os.devnull],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except FileNotFoundError:
        return f"no C++ compiler: {cxx!r} (the CXX variable, or c++) was not found", None
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip().splitlines()
        return (
            f"the C++ compiler {cxx!r} cannot build a test program (exit status "
            f"{exc.returncode}{': ' + said[0] if said else ''})"
        ), None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the C++ compiler {cxx!r} cannot run ({type(exc).__name__}: {exc})", None
    return None, macros


def _cpu_levels(macros):
    """The CPU levels csrc/cpu/cpu_level.h compiles with this compiler (its
    TT_X86_LEVELS test), and why."""
    defined = {}
    for line in macros.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] == "#define":
            defined[parts[1]] = parts[2] if len(parts) == 3 else ""
    gcc = int(defined.get("__GNUC__", "0") or 0)
    if "__x86_64__" in defined and "__clang__" not in defined and gcc >= 12:
        return "CPU levels v4, v3, v2, baseline"
    return "CPU level baseline only (one portable copy: the levels need x86-64 and GCC >= 12)"


def _build_ext_class(ce, torch, plan):
    base = ce.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """torch's BuildExtension, with a compiler check first, one summary
        line, one line on failure, and the build record."""

        def build_extensions(self):
            os.makedirs(self.build_temp, exist_ok=True)
            cxx = ce.get_cxx_compiler()
            with tempfile.TemporaryDirectory(dir=self.build_temp) as probe_dir:
                cause, macros = _probe_compiler(cxx, probe_dir)
            if cause:
                _fail(cause, plan["cuda"])
            self._write_version_header()
            print(
                f"tallytrain: building tallytrain._C with {cxx}: {_cpu_levels(macros)}; "
                f"CUDA {plan['cuda_line']}",
                file=sys.stderr,
                flush=True,
            )
            try:
                super().build_extensions()
            except Exception as exc:  # compile or link errors, printed above
                _fail(
                    f"{type(exc).__name__}: {str(exc).strip() or 'failed'} (the compiler's "
                    f"messages are above)",
                    plan["cuda"],
                )

        def _write_version_header(self):
            # The versions compiled into build_info() (module.cpp), as a
            # header rewritten only when it changes, so that an unchanged build
            # stays incremental.
            folder = os.path.join(os.path.abspath(self.build_temp), "tallytrain_generated")
            os.makedirs(folder, exist_ok=True)
            text = (
                f"#define TALLYTRAIN_BUILT_TORCH {json.dumps(torch.__version__)}\n"
                f"#define TALLYTRAIN_BUILT_TORCH_CUDA "
                f"{json.dumps(torch.version.cuda or '')}\n"
            )
            path = os.path.join(folder, "tallytrain_build_versions.h")
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            for ext in self.extensions:
                if folder not in ext.include_dirs:
                    ext.include_dirs.append(folder)

        def build_extension(self, ext):
            super().build_extension(ext)
            record = {
                "extension": True,
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "with_cuda": plan["cuda"],
            }
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_RECORD)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace, regular = self._get_inplace_equivalent(build_py, ext)
                self.copy_file(
                    os.path.join(os.path.dirname(regular), BUILD_RECORD),
                    os.path.join(os.path.dirname(inplace), BUILD_RECORD),
                )

    return BuildExt


def _pure_python_build_py():
    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        """build_py that records a pure-Python install, so that the warning at
        import names how it was installed (tallytrain/ops/_backend.py)."""

        def run(self):
            super().run()
            if getattr(self, "editable_mode", False):
                return  # the checkout itself is imported; its advice fits
            folder = os.path.join(self.build_lib, "tallytrain")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_RECORD), "w") as f:
                json.dump({"extension": False, "why": "TALLYTRAIN_BUILD_EXT=0"}, f, indent=1)

    return BuildPy


def _extensions():
    if not _env_flag("TALLYTRAIN_BUILD_EXT", True):
        print(
            "tallytrain: TALLYTRAIN_BUILD_EXT=0, pure-Python install (no native extension; "
            "the reference serves every op)",
            file=sys.stderr,
        )
        return [], {"build_py": _pure_python_build_py()}
    force_cuda = os.environ.get("FORCE_CUDA")
    import torch

    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported
    from torch.utils import cpp_extension as ce

    want_cuda = _env_flag("FORCE_CUDA", bool(torch.version.cuda and cuda_home))
    if force_cuda and want_cuda and not (torch.version.cuda and cuda_home):
        raise SystemExit(
            f"tallytrain: FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and the "
            f"CUDA toolkit (nvcc + libcudart) was "
            f"{'found at ' + cuda_home if cuda_home else 'not found'}"
        )
    if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    if want_cuda:
        cuda_line = (
            f"yes (torch CUDA {torch.version.cuda}, toolkit {cuda_home}, "
            f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
    elif force_cuda and not _env_flag("FORCE_CUDA", True):
        cuda_line = "no (FORCE_CUDA=0)"
    elif not torch.version.cuda:
        cuda_line = f"no (torch {torch.__version__} is built without CUDA)"
    else:
        cuda_line = "no (no CUDA toolkit found: nvcc and libcudart, CUDA_HOME)"
    plan = {"cuda": want_cuda, "cuda_line": cuda_line}

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = [
        "-O3",
        f"-std={_torch_cxx_standard(ce)}",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-Wall",
        "-Wno-unused-function",
    ]
    # ATen's parallel_for is an OpenMP loop in the headers: without -fopenmp
    # every kernel of the extension would run on one thread.
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    define_macros = []
    kwargs = {}
    if want_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        # Wheels of torch built for CUDA 13 keep cusparse.h and friends here.
        for site in sys.path:
            inc = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        define_macros.append(("TALLYTRAIN_WITH_CUDA", "1"))
        extension = ce.CUDAExtension
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        }
    else:
        extension = ce.CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx}
    if "-fopenmp" in cxx:
        kwargs["extra_link_args"] = ["-fopenmp"]
    ext = extension(
        name="tallytrain._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        **kwargs,
    )
    return [ext], {"build_ext": _build_ext_class(ce, torch, plan)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
