"""Benchmarks of every tallytrain op against the plain-PyTorch way (docs/kernels.md).

    tallytrain bench [--device cpu|cuda] [--quick] [--json PATH]
                     [--ops pack_argmax,tally,...] [--threads N]
                     [--levels v4,v3,...]

(in a checkout also ``python -m benchmarks.ops``, the same options and table).
For each op and each size docs/kernels.md lists for the device (the 2-core CPU
table, or the H100 table for cuda) it prints the op as dispatched
(torch.ops.tallytrain.<op>: native where the extension registered a kernel,
else the reference, and says which), the plain-PyTorch recipe, their ratio,
the GB/s of the minimum bytes the op must move, that as a fraction of the copy
ceiling measured in the same run, and the docs/kernels.md target (met / missed).
--quick runs smaller sizes in about 20 s; targets there are indicative only.
Every table names the CPU level the native CPU kernels ran at (set by
TALLYTRAIN_CPU_LEVEL, default the best this CPU runs); --levels times the
native CPU kernels at each listed level in turn with the plain way, in the
same rounds, and adds a table of the levels side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tallytrain import ops as tt
from tallytrain.ops import _backend, bits_for, packed_size

from .harness import Case, Row, Target, copy_bandwidth, format_levels_table, print_table, run_case

OPS = ("pack_argmax", "tally", "topk_sparse", "topk_sparse_ef", "sparse_merge", "unpack_labels")
_native = torch.ops.tallytrain


# --------------------------------------------------------------------------- #
# the plain-PyTorch way (docs/kernels.md)
# --------------------------------------------------------------------------- #
def plain_pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Expand each index to its bits, pad to bytes, weight by 1..128, sum per byte."""
    shifts = torch.arange(bits, device=idx.device, dtype=idx.dtype)
    b = ((idx[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    weights = 1 << torch.arange(8, device=idx.device, dtype=torch.int32)
    return (b.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def plain_unpack(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The inverse: expand bytes to bits, regroup by symbol, weight and sum."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    b = ((packed[:, None] >> shifts) & 1).reshape(-1)[: n * bits]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (b.view(n, bits).to(torch.int64) * weights).sum(-1)


def plain_pack_argmax(logits: torch.Tensor) -> torch.Tensor:
    return plain_pack(logits.argmax(-1), bits_for(logits.shape[1]))


def plain_pack_argmax_abstain(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    c = logits.shape[1]
    prob = torch.softmax(logits.float(), dim=-1).amax(-1)
    idx = torch.where(prob >= threshold, logits.argmax(-1), c)
    return plain_pack(idx, bits_for(c + 1))


def plain_tally(votes: torch.Tensor, n: int, num_classes: int, hist_budget_bytes: int):
    """Unpack every stream to int64, stack to [P, N], then a [N, C] scatter_add
    histogram + argmax where it fits in hist_budget_bytes, else torch.mode."""
    b = bits_for(num_classes)
    labels = torch.stack([plain_unpack(v, n, b) for v in votes])
    if n * num_classes * 8 <= hist_budget_bytes:
        probe = torch.arange(n, device=votes.device, dtype=torch.int64)
        flat = (probe * num_classes + labels).reshape(-1)
        hist = torch.zeros(n * num_classes, dtype=torch.int64, device=votes.device)
        hist.scatter_add_(0, flat, torch.ones_like(flat))
        count, label = hist.view(n, num_classes).max(-1)
        return label, count
    return torch.mode(labels, dim=0)


def plain_topk(x: torch.Tensor, k: int):
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return idx, x[idx]


def plain_topk_ef(x: torch.Tensor, residual: torch.Tensor, k: int):
    acc = x + residual
    idx = torch.topk(acc.abs(), k, sorted=False).indices
    values = acc[idx]
    residual.copy_(acc)
    residual[idx] = 0
    return idx, values


def plain_merge(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], size: int):
    dense = torch.zeros(size, dtype=values[0].dtype, device=values[0].device)
    for idx, val in zip(indices, values):
        dense.index_add_(0, idx, val)
    return dense


# --------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------- #
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def pack_argmax_case(
    device: str, n: int, c: int, dtype: str, target: Optional[Target] = None
) -> Case:
    dt = _DTYPES[dtype]

    def make():
        logits = torch.randn(n, c, dtype=dt, device=device, generator=_generator(device, 0))
        return (
            lambda: _native.pack_argmax(logits, False, None)[0],
            lambda: plain_pack_argmax(logits),
        )

    nbytes = n * c * dt.itemsize + packed_size(n, c)
    return Case("pack_argmax", f"N={n} C={c} {dtype}", make, nbytes, target, check=torch.equal)


# The simulator's default abstention threshold (ProtocolConfig.abstain_below).
ABSTAIN_BELOW = 0.95


def pack_argmax_abstain_case(device: str, n: int, c: int, dtype: str) -> Case:
    """Votes with abstention, as a peer sends them: logits scaled like a
    half-trained peer's (randn * 4), abstaining below ABSTAIN_BELOW."""
    dt = _DTYPES[dtype]

    def make():
        logits = (torch.randn(n, c, device=device, generator=_generator(device, 0)) * 4).to(dt)
        return (
            lambda: _native.pack_argmax(logits, False, ABSTAIN_BELOW)[0],
            lambda: plain_pack_argmax_abstain(logits, ABSTAIN_BELOW),
        )

    nbytes = n * c * dt.itemsize + packed_size(n, c + 1)
    return Case(
        "pack_argmax",
        f"N={n} C={c} {dtype} abstain<{ABSTAIN_BELOW}",
        make,
        nbytes,
        None,
        check=torch.equal,
    )


def unpack_labels_case(device: str, n: int, c: int) -> Case:
    def make():
        labels = torch.randint(0, c, (n,), device=device, generator=_generator(device, 1))
        packed = tt.pack_labels(labels, c)
        return (
            lambda: _native.unpack_labels(packed, n, c),
            lambda: plain_unpack(packed, n, bits_for(c)),
        )

    return Case("unpack_labels", f"N={n} C={c}", make, packed_size(n, c) + 8 * n, check=torch.equal)


def random_votes(
    device: str, peers: int, n: int, c: int, agree: float = 0.7, seed: int = 2
) -> torch.Tensor:
    """[P, bytes] packed votes: each peer votes the probe's true class with
    probability `agree`, else a uniformly random class (the usual regime)."""
    g = _generator(device, seed)
    truth = torch.randint(0, c, (n,), device=device, generator=g)
    streams = []
    for _ in range(peers):
        noise = torch.randint(0, c, (n,), device=device, generator=g)
        keep = torch.rand(n, device=device, generator=g) < agree
        streams.append(tt.pack_labels(torch.where(keep, truth, noise), c))
    return torch.stack(streams)


def tally_case(
    device: str, peers: int, n: int, c: int, hist_budget_bytes: int, target: Optional[Target] = None
) -> Case:
    uses_hist = n * c * 8 <= hist_budget_bytes

    def make():
        votes = random_votes(device, peers, n, c)
        return (
            lambda: _native.tally(votes, n, c, None, False),
            lambda: plain_tally(votes, n, c, hist_budget_bytes),
        )

    def check(native, plain):
        # The histogram breaks ties to the smallest class, as tally does;
        # torch.mode promises no tie rule, so only the histogram is compared.
        return torch.equal(native[0], plain[0]) and torch.equal(native[1], plain[1])

    nbytes = peers * packed_size(n, c) + 4 * 8 * n
    name = f"P={peers} N={n} C={c} ({'histogram' if uses_hist else 'mode'})"
    return Case("tally", name, make, nbytes, target, check=check if uses_hist else None)


def _same_selection(native, plain) -> bool:
    idx_native, val_native = native
    order = torch.argsort(plain[0])
    return torch.equal(idx_native, plain[0][order]) and torch.equal(val_native, plain[1][order])


def topk_case(device: str, m: int, k: int, target: Optional[Target] = None) -> Case:
    def make():
        x = torch.randn(m, device=device, generator=_generator(device, 3))
        return (lambda: _native.topk_sparse(x, k), lambda: plain_topk(x, k))

    return Case(
        "topk_sparse",
        f"M={m:.0e} k={k:.0e} fp32",
        make,
        4 * m + 12 * k,
        target,
        check=_same_selection,
    )


def topk_ef_case(device: str, m: int, k: int, target: Optional[Target] = None) -> Case:
    def make():
        g = _generator(device, 4)
        x = torch.randn(m, device=device, generator=g)
        residual = 0.1 * torch.randn(m, device=device, generator=g)
        # Each side updates its own residual in place.
        residual_native, residual_plain = residual, residual.clone()
        return (
            lambda: _native.topk_sparse_ef(x, residual_native, k),
            lambda: plain_topk_ef(x, residual_plain, k),
        )

    # Reads x and the residual, writes the residual back.
    return Case(
        "topk_sparse_ef",
        f"M={m:.0e} k={k:.0e} fp32",
        make,
        12 * m + 12 * k,
        target,
        check=_same_selection,
    )


def sparse_merge_case(device: str, peers: int, k: int, size: int) -> Case:
    def make():
        g = _generator(device, 5)
        indices = [
            torch.randperm(size, device=device, generator=g)[:k].sort().values for _ in range(peers)
        ]
        values = [torch.randn(k, device=device, generator=g) for _ in range(peers)]
        return (
            lambda: _native.sparse_merge(indices, values, size, None),
            lambda: plain_merge(indices, values, size),
        )

    return Case(
        "sparse_merge",
        f"P={peers} k={k:.0e} size={size:.0e}",
        make,
        peers * k * 12 + 4 * size,
        check=torch.equal,
    )


SCALES = ("full", "quick", "micro")

# Sizes per device and scale: "full" is the docs/kernels.md table for the device
# (CPU: the 2-core table; cuda: the H100 table), "quick" the same shapes
# smaller, "micro" small enough for repeated pytest-benchmark rounds.
# pack_argmax (N, C, dtype), also with abstention; tally (P, N, C); topk (M, k), run plain and with
# error feedback; sparse_merge (peers, k, size); unpack_labels N (C = 1000).
SIZES: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("cpu", "full"): dict(
        pack_argmax=[(4096, 50257, "bf16"), (65536, 1000, "fp32"), (1 << 20, 10, "fp32")],
        # one peer's vote at the README's C = 1000 run (2,000 probes per round)
        pack_argmax_abstain=[(2000, 1000, "fp32")],
        tally=[(100, 16384, 50257), (100, 65536, 1000), (20, 262144, 10)],
        topk=[(10**7, 10**5)],
        sparse_merge=(8, 10**5, 10**7),
        unpack_labels=1 << 22,
    ),
    ("cpu", "quick"): dict(
        pack_argmax=[(512, 50257, "bf16"), (8192, 1000, "fp32"), (1 << 17, 10, "fp32")],
        pack_argmax_abstain=[(2000, 1000, "fp32")],
        tally=[(20, 2048, 50257), (20, 8192, 1000), (20, 32768, 10)],
        topk=[(10**6, 10**4)],
        sparse_merge=(4, 10**4, 10**6),
        unpack_labels=1 << 20,
    ),
    ("cpu", "micro"): dict(
        pack_argmax=[(32, 50257, "bf16"), (1024, 1000, "fp32"), (1 << 14, 10, "fp32")],
        pack_argmax_abstain=[(1024, 1000, "fp32")],
        tally=[(10, 512, 50257), (10, 2048, 1000), (10, 8192, 10)],
        topk=[(10**5, 10**3)],
        sparse_merge=(4, 10**3, 10**5),
        unpack_labels=1 << 16,
    ),
    ("cuda", "full"): dict(
        pack_argmax=[
            (65536, 50257, "bf16"),
            (65536, 1000, "fp32"),
            (1 << 22, 10, "fp32"),
            (1 << 20, 100, "fp16"),
        ],
        pack_argmax_abstain=[(65536, 1000, "fp32")],
        tally=[(100, 65536, 50257), (1000, 262144, 1000), (20, 1 << 20, 10)],
        topk=[(10**8, 10**6), (10**9, 10**6)],
        sparse_merge=(8, 10**6, 10**8),
        unpack_labels=1 << 26,
    ),
    ("cuda", "quick"): dict(
        pack_argmax=[
            (8192, 50257, "bf16"),
            (65536, 1000, "fp32"),
            (1 << 20, 10, "fp32"),
            (1 << 18, 100, "fp16"),
        ],
        pack_argmax_abstain=[(65536, 1000, "fp32")],
        tally=[(100, 8192, 50257), (100, 65536, 1000), (20, 1 << 18, 10)],
        topk=[(10**7, 10**5)],
        sparse_merge=(8, 10**5, 10**7),
        unpack_labels=1 << 22,
    ),
    ("cuda", "micro"): dict(
        pack_argmax=[
            (256, 50257, "bf16"),
            (4096, 1000, "fp32"),
            (1 << 16, 10, "fp32"),
            (1 << 14, 100, "fp16"),
        ],
        pack_argmax_abstain=[(4096, 1000, "fp32")],
        tally=[(10, 2048, 50257), (10, 8192, 1000), (10, 1 << 16, 10)],
        topk=[(10**6, 10**4)],
        sparse_merge=(4, 10**4, 10**6),
        unpack_labels=1 << 18,
    ),
}

# docs/kernels.md targets, per device; pack_argmax one per size in order.
TARGETS: Dict[str, Dict[str, Any]] = {
    "cpu": dict(
        pack_argmax=[Target(ratio=10), Target(ratio=3), Target(ratio=8)],
        tally=Target(ratio=30),
        topk_sparse=Target(ratio=8),
        topk_sparse_ef=None,
    ),
    # >= 85% of the copy ceiling for C >= 1000 (>= 1.5x the plain way at
    # C=50257), >= 50% and >= 8x at C=10, none stated at C=100; top-k with
    # error feedback fused >= 4x.
    "cuda": dict(
        pack_argmax=[
            Target(ratio=1.5, copy_fraction=0.85),
            Target(copy_fraction=0.85),
            Target(ratio=8, copy_fraction=0.5),
            None,
        ],
        tally=Target(ratio=100),
        topk_sparse=None,
        topk_sparse_ef=Target(ratio=4),
    ),
}

# A [N, C] int64 histogram this large or smaller is the plain tally's way.
HISTOGRAM_BUDGET = {"cpu": 1 << 30, "cuda": 8 << 30}


def build_cases(device: str, scale: str = "full") -> List[Case]:
    """The cases of one device ("cpu" or "cuda") at one of SCALES."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    kind = torch.device(device).type
    sizes, targets, hist = SIZES[kind, scale], TARGETS[kind], HISTOGRAM_BUDGET[kind]
    cases = [
        pack_argmax_case(device, n, c, dt, t)
        for (n, c, dt), t in zip(sizes["pack_argmax"], targets["pack_argmax"])
    ]
    cases += [
        pack_argmax_abstain_case(device, n, c, dt) for n, c, dt in sizes["pack_argmax_abstain"]
    ]
    cases += [tally_case(device, p, n, c, hist, targets["tally"]) for p, n, c in sizes["tally"]]
    cases += [topk_case(device, m, k, targets["topk_sparse"]) for m, k in sizes["topk"]]
    cases += [topk_ef_case(device, m, k, targets["topk_sparse_ef"]) for m, k in sizes["topk"]]
    cases.append(sparse_merge_case(device, *sizes["sparse_merge"]))
    cases.append(unpack_labels_case(device, sizes["unpack_labels"], 1000))
    return cases


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
def served_by(device: str) -> Dict[str, str]:
    """Which backend serves each op on the device: 'native' or 'reference'."""
    info = tt.backend_info()
    kind = torch.device(device).type
    return {op: info["ops"][op][kind] for op in OPS}


def describe_machine(device: str) -> List[str]:
    info = tt.backend_info()
    if torch.device(device).type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = (
            f"{_backend.cpu_model()}, {os.cpu_count()} logical CPUs, "
            f"torch uses {torch.get_num_threads()} threads"
        )
    lines = [
        f"device: {device}: {where}",
        f"torch {torch.__version__} (CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}), python {platform.python_version()}",
        f"backend mode {info['mode']}, extension {info['extension']}",
    ]
    if info["cpu_level"]:
        requested = os.environ.get("TALLYTRAIN_CPU_LEVEL", "").strip() or "auto"
        lines.append(
            f"CPU level of the native kernels: {info['cpu_level']} "
            f"(TALLYTRAIN_CPU_LEVEL={requested}; this machine runs "
            f"{', '.join(info['cpu_levels'])})"
        )
    if info["native_error"]:
        lines.append(f"native extension failed to load: {info['native_error']}")
    return lines


def parse_ops(text: Optional[str]) -> Tuple[str, ...]:
    if not text:
        return OPS
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in OPS]
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tallytrain bench` and `python -m benchmarks.ops`."""
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the ops run (default: cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about 20 s")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and run info here")
    parser.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads for both ways (default: torch's own; the simulator runs with 1)",
    )
    parser.add_argument(
        "--levels",
        metavar="L1,L2",
        help="CPU levels to time the native CPU kernels at, side by side "
        "(e.g. v4,v3; default: the active one)",
    )


def main(argv: Optional[Sequence[str]] = None, prog: str = "tallytrain bench") -> List[Row]:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, prog, argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace, prog: str, argv: Sequence[str]) -> List[Row]:
    """The benchmarks for parsed options; the table on stdout. ``prog`` and
    ``argv`` are recorded in the --json file as the command."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    chosen = parse_ops(args.ops)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    levels = [tt.backend_info()["cpu_level"] or "-"]
    if args.levels:
        if device != "cpu":
            raise SystemExit("--levels: CPU levels apply to --device cpu only")
        levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
        supported = _backend.supported_cpu_levels()
        unknown = [lv for lv in levels if lv not in supported]
        if unknown:
            raise SystemExit(
                f"--levels: {', '.join(unknown)} not run by this machine and build "
                f"(it runs {', '.join(supported) or 'none: no native extension'})"
            )
    elif device != "cpu":
        levels = ["-"]

    started = time.perf_counter()
    served = served_by(device)
    budget = 0.2 if args.quick else 1.0
    header = describe_machine(device) + [
        "served: " + ", ".join(f"{op}={served[op]}" for op in chosen),
        "copy ceiling (read + write) measured right before each case; 'of copy' is against that "
        "figure",
    ]
    if args.quick:
        header.append(
            "quick sizes: docs/kernels.md targets are set at full sizes, "
            "so met/missed here is indicative only"
        )
    for line in header:
        print(line, flush=True)

    rows, failures = [], []
    for case in build_cases(device, "quick" if args.quick else "full"):
        if case.op not in chosen:
            continue
        try:
            # Next to the case, so that both see the same machine load.
            copy_gbps = copy_bandwidth(device, budget_s=budget / 2)
            rows += run_case(
                case,
                device,
                served[case.op],
                copy_gbps,
                budget_s=budget,
                indicative=args.quick,
                levels=levels,
                use_level=_backend.set_cpu_level if len(levels) > 1 else None,
            )
            status = "done"
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: report, go on
            failures.append(f"{case.op} {case.name}: {type(exc).__name__}: {exc}")
            status = "FAILED"
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"  {case.op} {case.name}: {status}", file=sys.stderr, flush=True)
    if len(levels) > 1:
        _backend.set_cpu_level(os.environ.get("TALLYTRAIN_CPU_LEVEL", "").strip() or "auto")
    elapsed = time.perf_counter() - started
    print()
    print_table(rows)
    if len(levels) > 1:
        print(
            f"\nThe CPU levels side by side (native times at each level and the plain "
            f"way's, timed in turn in the same rounds; the last columns: time / {levels[0]} "
            f"time):\n"
        )
        print(format_levels_table(rows, levels))
    for line in failures:
        print(f"FAILED {line}")
    if rows:
        low, high = min(r.copy_gbps for r in rows), max(r.copy_gbps for r in rows)
        print(f"\ncopy ceiling {low:.1f} to {high:.1f} GB/s over the run")
    print(f"{len(rows)} cases in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": " ".join([prog] + list(argv)),
                    "header": header,
                    "seconds": elapsed,
                    "levels": levels,
                    "backend_info": tt.backend_info(),
                    "rows": [r.as_dict() for r in rows],
                    "failures": failures,
                },
                f,
                indent=2,
                default=str,
            )
    return rows


if __name__ == "__main__":
    main()
