"""Builds the one native extension, tallytrain._C. Metadata is in pyproject.toml.

- CPU kernels (csrc/cpu) always.
- CUDA kernels (csrc/cuda) when the installed torch has CUDA and nvcc is found;
  FORCE_CUDA=1 insists (and fails without them), FORCE_CUDA=0 skips them.
- TALLYTRAIN_BUILD_EXT=0: a pure-Python install (the reference serves).
- TORCH_CUDA_ARCH_LIST is respected; by default 8.0 and 9.0.
No network is touched.
"""
import glob
import os
import shutil
import sys

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
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and (
                glob.glob(os.path.join(c, "lib64", "libcudart.so*"))
                or glob.glob(os.path.join(c, "lib", "x64", "cudart*"))):
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


def _extensions():
    if not _env_flag("TALLYTRAIN_BUILD_EXT", True):
        print("tallytrain: TALLYTRAIN_BUILD_EXT=0, pure-Python install", file=sys.stderr)
        return [], {}
    force_cuda = os.environ.get("FORCE_CUDA")
    import torch

    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported
    from torch.utils import cpp_extension as ce

    want_cuda = _env_flag("FORCE_CUDA", bool(torch.version.cuda and cuda_home))
    if force_cuda and want_cuda and not (torch.version.cuda and cuda_home):
        raise RuntimeError(
            f"FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and the CUDA "
            f"toolkit (nvcc + libcudart) was {'found at ' + cuda_home if cuda_home else 'not found'}")
    if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", f"-std={_torch_cxx_standard(ce)}", "-fno-math-errno", "-fno-trapping-math", "-Wall",
           "-Wno-unused-function"]
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
            "nvcc": ["-O3", "-std=c++17", "-lineinfo",
                     "--expt-relaxed-constexpr"],
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
    print(f"tallytrain: building tallytrain._C ({'CPU + CUDA' if want_cuda else 'CPU'})"
          f"{' with CUDA_HOME=' + cuda_home if want_cuda else ''}", file=sys.stderr)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
