# One entry point for setting up, running and testing tallytrain.
#   make demo    set up (venv + torch + build) and run the main federated comparison
#   make test    set up and run the test suite twice: native kernels required, then the reference;
#                then the CUDA kernels once more on the CPU execution model, with AddressSanitizer
#   make bench   op microbenchmarks against the plain-PyTorch way
#   make test-levels     the op tests at every other CPU level this machine runs (CI runs it)
#   make vector-check    the CPU kernels compile with every vector operation in SIMD
#   make check-aarch64   the CPU kernels compile for aarch64 (needs g++-aarch64-linux-gnu)
#   make simt-coverage   which lines of the CUDA kernels the tests never run (on the CPU model)
#   make lint            ruff, mypy (all of tallytrain/) and clang-format --dry-run over csrc (CI runs it)
#   make format          apply ruff's fixes and clang-format in place
# Everything installs from this repository's own files into $(VENV).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Where nvcc exists we take torch's CUDA 13 build so that the CUDA kernels
# compile (and run on a GPU); otherwise the smaller CPU build.
HAVE_NVCC := $(shell command -v nvcc >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_NVCC),1)
TORCH_SPEC ?= torch==2.14.1
else
TORCH_SPEC ?= torch==2.13.0
endif
DEPS = numpy pybind11 ninja scikit-learn matplotlib pytest pytest-timeout hypothesis pytest-benchmark \
       "flwr[simulation]>=1.42,<1.43" "tokenizers>=0.23"
SOURCES = setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/include/tallytrain/*.h)
DEMO_OUT ?= runs/digits-alpha0.1
PYTEST_ARGS ?=

.PHONY: setup install demo test test-native test-reference test-simt-asan test-levels \
        vector-check check-aarch64 simt-coverage bench info clean lint format

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

# The extension is rebuilt (incrementally, with ninja) whenever a source changes.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import tallytrain.ops as o, json; i = o.backend_info(); print('tallytrain backends:', json.dumps({k: i[k] for k in ('cpu', 'cuda', 'extension_built_with_cuda')}))"
	touch $@

setup install: $(VENV)/.built

info: install
	$(BIN)/tallytrain info

demo: install
	$(BIN)/tallytrain compare --dataset digits --methods all --peers 10 --alpha 0.1 \
	  --rounds 20 --seeds 3 --out $(DEMO_OUT) --overwrite

test: install test-native test-reference test-simt-asan

# Static checks; the tools' versions are pinned so that CI and pre-commit
# (.pre-commit-config.yaml) agree. Configuration: pyproject.toml, .clang-format.
LINT_TOOLS = ruff==0.17.6 mypy==2.4.1 clang-format==23.1.5
CXX_SOURCES = $(sort $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/include/tallytrain/*.h))
$(VENV)/.lint: | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q $(LINT_TOOLS)
	touch $@

lint: $(VENV)/.lint $(VENV)/.deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(VENV)/.lint
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/clang-format -i $(CXX_SOURCES)

test-native: install
	TALLYTRAIN_BACKEND=native $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-reference: install
	TALLYTRAIN_BACKEND=reference $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# The simt cases (the CUDA kernels on tests/simt's CPU execution model) built
# with AddressSanitizer, so that a kernel reading or writing past a tensor
# fails. --capture=sys leaves file descriptor 2 alone: a sanitizer report
# ends the process, and must not end in pytest's capture file with it.
test-simt-asan: install
	LD_PRELOAD="$$($(BIN)/python tests/simt/build.py --asan-preload)" ASAN_OPTIONS=detect_leaks=0 \
	  TALLYTRAIN_SIMT_INSTRUMENT=address TALLYTRAIN_BACKEND=native \
	  $(BIN)/python -m pytest -q -m simt --capture=sys $(PYTEST_ARGS) tests

# The op tests (native kernels, CPU cases; tests/ops/test_ops_*.py and
# tests/ops/test_backend.py) once per CPU level this machine runs, except the best
# one, which test-native runs (TALLYTRAIN_CPU_LEVEL=auto); CPU_LEVELS="v3 v2"
# chooses. torch's own kernels run at the capability such a CPU gives them,
# so that no oracle leans on how this CPU's float32 kernels accumulate.
OP_TESTS = $(sort $(wildcard tests/ops/test_ops_*.py)) tests/ops/test_backend.py
CPU_LEVELS ?=
test-levels: install
	@levels="$(CPU_LEVELS)"; \
	if [ -z "$$levels" ]; then \
	  levels="$$($(BIN)/python -c \
	    'import tallytrain.ops as o; print(*o.backend_info()["cpu_levels"][1:])')"; \
	fi; \
	for level in $$levels; do \
	  case $$level in v4) capability=avx512;; v3) capability=avx2;; *) capability=default;; esac; \
	  echo "test-levels: TALLYTRAIN_CPU_LEVEL=$$level ATEN_CPU_CAPABILITY=$$capability"; \
	  start=$$(date +%s); \
	  TALLYTRAIN_CPU_LEVEL=$$level ATEN_CPU_CAPABILITY=$$capability TALLYTRAIN_BACKEND=native \
	    $(BIN)/python -m pytest -q -m "not simt and not cuda" $(PYTEST_ARGS) $(OP_TESTS) || exit 1; \
	  echo "test-levels: $$level passed in $$(( $$(date +%s) - start )) s"; \
	done

# The CPU kernels compiled as the extension compiles them, with GCC's
# -Wvector-operation-performance an error: it fires wherever a vector
# operation of some CPU level's copy would be done lane by lane (docs/ops.md,
# Checking the vectorisation). Objects go to build/vector-check.
TORCH_INCLUDE = $(shell $(BIN)/python -c 'from torch.utils import cpp_extension as c; \
                  print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)
CPU_SOURCES = $(sort $(wildcard csrc/cpu/*.cpp))
CPU_FLAGS = -std=c++20 -O3 -fPIC -fopenmp -fno-math-errno -fno-trapping-math -Wall \
            -Wno-unused-function -Icsrc/include $(TORCH_INCLUDE) -DTORCH_EXTENSION_NAME=_C
vector-check: install
	@mkdir -p build/vector-check
	@for f in $(CPU_SOURCES); do \
	  echo "vector-check: $$f"; \
	  $${CXX:-c++} $(CPU_FLAGS) -Werror=vector-operation-performance -c $$f \
	    -o build/vector-check/$$(basename $$f .cpp).o || exit 1; \
	done
	$(BIN)/python -m benchmarks.isa_report build/vector-check/*.o

# Compile-only check that the CPU kernels and the module build for aarch64
# (the portable build: one copy, NEON), with every vector operation in SIMD
# (the host's Python headers stand in for the target's). Debian: apt-get
# install g++-aarch64-linux-gnu.
AARCH64_CXX ?= aarch64-linux-gnu-g++
PYTHON_INCLUDE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
check-aarch64: install
	@command -v $(AARCH64_CXX) >/dev/null || { echo "check-aarch64: $(AARCH64_CXX) not found;" \
	  "install it (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"; exit 1; }
	@mkdir -p build/aarch64
	@for f in $(CPU_SOURCES) csrc/module.cpp; do \
	  echo "check-aarch64: $$f"; \
	  $(AARCH64_CXX) $(CPU_FLAGS) -I$(PYTHON_INCLUDE) -Werror=vector-operation-performance \
	    -c $$f -o build/aarch64/$$(basename $$f .cpp).o || exit 1; \
	done
	@echo "check-aarch64: the CPU sources compile for aarch64"

# Which lines of csrc/cuda/*.cu the simt cases never run (gcov), from fresh counters.
simt-coverage: install
	rm -f build/simt/tallytrain_simt_kernels_cov/*.gcda
	TALLYTRAIN_SIMT_INSTRUMENT=coverage TALLYTRAIN_BACKEND=native \
	  $(BIN)/python -m pytest -q -m simt $(PYTEST_ARGS) tests
	$(BIN)/python tests/simt/build.py --coverage-report

bench: install
	$(BIN)/python -m benchmarks.ops

clean:
	rm -rf build tallytrain/_C*.so *.egg-info
