#!/usr/bin/env bash
# One-shot check of tallytrain's CUDA kernels on a GPU machine (budget: under
# 8 minutes on an H100). Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit, each logged to $OUT (default /tmp):
#   1. nvidia-smi
#   2. build from source for sm_90 (pip editable install; fallback: build_ext
#      --inplace), and stop unless backend_info() says CUDA is native
#   3. one C++ exception from a CUDA binding, which must reach Python (where it
#      crashes the process, the libraries involved are printed and a retry
#      with the extension's libstdc++ preloaded is kept if it works); then
#      the CUDA tests of tests/ops/test_cuda_large.py (pytest -m cuda)
#   4. the other CUDA tests: the device-parametrised op tests (pytest -k cuda,
#      without tests/ops/test_cuda_large.py, which step 3 ran)
#   5. compute-sanitizer memcheck over benchmarks/sanitize_cases.py
#   6. the benchmarks (python -m benchmarks.ops --device cuda), table printed
#      last; where that module is missing, a short built-in timing of the
#      docs/kernels.md cases against the plain-PyTorch way instead
# A failing step does not stop the later ones (one GPU run should tell as much
# as it can); the script exits non-zero if any step failed.
set -euo pipefail

OUT="${OUT:-/tmp}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PY
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()
START=$SECONDS

log() { echo "== [$(( SECONDS - START ))s] $*"; }

# step NAME LIMIT_SECONDS LOGFILE COMMAND...: runs COMMAND under a time limit,
# its output to the terminal and to $OUT/LOGFILE, and records a failure.
step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  log "$name"
  if timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$logfile"; then
    log "$name: ok"
  else
    log "$name: FAILED (exit ${PIPESTATUS[0]}; log in $OUT/$logfile)"
    FAILED+=("$name")
  fi
}

# Shell functions run by `timeout bash -c NAME`, hence exported.
build() {
  # The tests import tallytrain from this tree (PYTHONPATH), so the built
  # extension must land in tallytrain/ here.
  if TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1 \
      "$PY" -m pip install --no-build-isolation --no-deps -e . \
      && compgen -G "tallytrain/_C*.so" > /dev/null; then
    return 0
  fi
  echo "pip install -e . failed or left no tallytrain/_C*.so; falling back to build_ext --inplace"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
}

check_native() {
  "$PY" -c '
import json
import tallytrain.ops as ops
info = ops.backend_info()
print(json.dumps(info, indent=1))
if info["cuda"] != "native":
    raise SystemExit("CUDA is served by %r, not native: %s" % (info["cuda"], info["native_error"]))
'
}

# Fallback timing: tallytrain's CUDA ops against the plain-PyTorch way of
# docs/kernels.md (median of CUDA-event timings) and the copy ceiling measured here.
quick_bench() {
  "$PY" -c '
import torch
import tallytrain.ops as ops
from tallytrain.ops import reference as ref

def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2] / 1e3

g = torch.Generator(device="cuda").manual_seed(0)
buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
copy_bw = 2 * buf.numel() / timed(lambda: buf.clone())
del buf
rows = []
def row(name, ours, plain, nbytes):
    t, p = timed(ours), timed(plain, reps=3)
    rows.append((name, t * 1e3, p * 1e3, p / t, nbytes / t / 1e12, nbytes / t / copy_bw))

for n, c, dt in ((65536, 50257, torch.bfloat16), (65536, 1000, torch.float32),
                 (1 << 22, 10, torch.float32), (1 << 20, 100, torch.float16)):
    x = torch.randn(n, c, device="cuda", generator=g).to(dt)
    row(f"pack_argmax N={n} C={c} {str(dt)[6:]}", lambda: ops.pack_argmax(x),
        lambda: ref.pack_labels(x.argmax(-1), c), x.numel() * x.element_size())
    del x
for p, n, c in ((100, 65536, 50257), (1000, 262144, 1000), (20, 1 << 20, 10)):
    b = ref.bits_for(c)
    labels = torch.randint(0, c, (n,), device="cuda", generator=g)
    votes = torch.stack([ops.pack_labels((labels + (i % 3)) % c, c) for i in range(p)])
    def plain():
        stacked = torch.stack([ref._unpack_rows(votes[i:i + 1], n, b)[0] for i in range(p)])
        return torch.mode(stacked, dim=0)
    row(f"tally P={p} N={n} C={c}", lambda: ops.tally(votes, n, c), plain,
        votes.numel() + 32 * n)
    del votes, labels
for n in (10**8, 10**9):
    x = torch.randn(n, device="cuda", generator=g)
    r = torch.zeros_like(x)
    k = 10**6
    def plain():
        i = torch.topk(x.abs(), k, sorted=False).indices
        return i, x[i]
    row(f"topk_sparse n={n:.0e} k=1e6", lambda: ops.topk_sparse(x, k), plain, 4 * n)
    row(f"topk_sparse_ef n={n:.0e} k=1e6", lambda: ops.topk_sparse_ef(x, r, k), plain, 12 * n)
    del x, r

print(f"copy ceiling {copy_bw / 1e12:.2f} TB/s (read + write) on {torch.cuda.get_device_name()}")
print("%-40s %9s %9s %7s %6s %7s" % ("case", "ours ms", "plain ms", "ratio", "TB/s", "of copy"))
for name, t, p, ratio, tbs, frac in rows:
    print("%-40s %9.3f %9.3f %7.1f %6.2f %6.0f%%" % (name, t, p, ratio, tbs, 100 * frac))
'
}
# A C++ exception thrown in the extension must reach Python as an error. On
# the 2026-11-26 GPU image it crashed the process instead, for any freshly
# built extension. AddressSanitizer shows the same crash wherever a library
# that intercepts __cxa_throw is loaded before libstdc++ (tests/simt), so
# where it happens this step prints which libstdc++ the process and the
# extension use, and tries again with the extension's libstdc++ loaded first.
raise_check() {
  "$PY" -c '
import torch
import tallytrain.ops as ops
try:
    ops.pack_labels(torch.tensor([5], device="cuda"), 2)
except ValueError as e:
    print("the CUDA binding raised ValueError as it should:", e)
else:
    raise SystemExit("no error raised for an out-of-range label")
'
}

libraries() {
  echo "gcc: $(gcc --version 2>/dev/null | head -1)"
  echo "extension links:"; ldd tallytrain/_C*.so | grep -E "stdc\+\+|gcc_s" || true
  echo "the process maps:"
  "$PY" -c 'import torch, tallytrain.ops; print(open("/proc/self/maps").read())' \
    | awk '/stdc\+\+|gcc_s|asan|preload/ {print $6}' | sort -u
  echo "LD_PRELOAD=${LD_PRELOAD:-}"
}
export -f build check_native quick_bench raise_check libraries

log "nvidia-smi"
nvidia-smi | tee "$OUT/nvidia_smi.txt"

step "build" 180 build.log bash -c build
step "backend_info says CUDA native" 30 backend_info.log bash -c check_native
if [[ ${#FAILED[@]} -ne 0 ]]; then
  log "no native CUDA build: stopping here"
  exit 1
fi

step "C++ exceptions reach Python" 60 raise_check.log bash -c raise_check
if [[ " ${FAILED[*]} " == *" C++ exceptions reach Python "* ]]; then
  libraries 2>&1 | tee "$OUT/libraries.log"
  STDCXX="$(ldd tallytrain/_C*.so | awk '/libstdc\+\+/ {print $3; exit}')"
  if [[ -n "$STDCXX" ]] && LD_PRELOAD="$STDCXX" timeout 60 bash -c raise_check; then
    export LD_PRELOAD="$STDCXX"
    log "with LD_PRELOAD=$STDCXX exceptions reach Python: kept for the later steps"
  fi
fi

# Much of the tests' time is the reference on the CPU: spread it over 4
# workers (they share the GPU) where pytest-xdist is installed.
PARALLEL=()
if "$PY" -c "import xdist" 2> /dev/null; then PARALLEL=(-n 4); fi
step "pytest -m cuda (tests/ops/test_cuda_large.py)" 180 pytest_cuda.log \
  "$PY" -m pytest -q -m cuda "${PARALLEL[@]}" --maxfail=5 -p no:cacheprovider --timeout=120 \
  tests/ops/test_cuda_large.py
step "pytest -k cuda (other tests)" 90 pytest_k_cuda.log \
  "$PY" -m pytest -q -k cuda "${PARALLEL[@]}" --maxfail=5 -p no:cacheprovider --timeout=60 \
  --ignore=tests/ops/test_cuda_large.py tests

SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
if [[ -n "$SANITIZER" ]]; then
  # Without the caching allocator every tensor is its own allocation, so
  # memcheck sees reads and writes past a tensor's end.
  step "compute-sanitizer memcheck" 90 memcheck.log \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" benchmarks/sanitize_cases.py
else
  log "compute-sanitizer not found (PATH, /usr/local/cuda/bin): memcheck skipped"
fi

if [[ -f benchmarks/ops.py ]]; then
  step "benchmarks" 120 bench.log \
    "$PY" -m benchmarks.ops --device cuda --json "$OUT/gpu_bench.json"
else
  log "benchmarks/ops.py is missing: running the built-in timing instead"
  step "benchmarks (built-in)" 120 bench.log bash -c quick_bench
fi

log "done in $(( SECONDS - START ))s; failed steps: ${FAILED[*]:-none}"
echo
echo "== benchmark table"
cat "$OUT/bench.log"
[[ ${#FAILED[@]} -eq 0 ]]
