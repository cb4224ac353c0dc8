# One entry point for setting up, running and testing tallytrain.
#   make demo    set up (venv + torch + build) and run the main federated comparison
#   make test    set up and run the test suite twice: native kernels required, then the reference;
#                then the CUDA kernels once more on the CPU execution model, with AddressSanitizer
#   make bench   op microbenchmarks against the plain-PyTorch way
#   make simt-coverage   which lines of the CUDA kernels the tests never run (on the CPU model)
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

.PHONY: setup install demo test test-native test-reference test-simt-asan simt-coverage bench info \
        clean

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
