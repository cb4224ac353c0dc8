"""The one benchmark harness (docs/design.md §6, docs/kernels.md).

Every figure is a ratio against the plain-PyTorch way measured in the same run,
and a fraction of the memory-bandwidth ceiling (a large copy, bytes read +
written) measured in the same run. Timing synchronises the device before and
after, warms up, and reports the median of repeats, so absolute times on a
shared machine matter less than the ratios.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch


# --------------------------------------------------------------------------- #
# timing
# --------------------------------------------------------------------------- #
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_batch(fn: Callable[[], Any], device: str, calls: int) -> float:
    """Seconds per call of `calls` back-to-back calls, device synchronised."""
    synchronize(device)
    if torch.device(device).type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def timed_call(fn: Callable[[], Any], device: str) -> Tuple[Any, float]:
    """(fn(), seconds) for one call, device synchronised."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int
    calls_per_repeat: int


def measure_interleaved(
    fns: Sequence[Callable[[], Any]],
    device: str,
    *,
    budget_s: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 15,
    min_batch_s: float = 2e-3,
    warm_s: Optional[Sequence[float]] = None,
) -> List[Timing]:
    """Median time of one call of each fn, their samples taken in turn (fn0,
    fn1, fn0, fn1, ...) so that a change of machine load hits all alike.

    One warm-up call each (skipped if the caller made them and passes their
    times as warm_s), then rounds until about budget_s per fn is spent (at
    least min_repeats). Calls shorter than min_batch_s are timed in batches so
    that timer and launch resolution do not dominate."""
    if warm_s is None:
        warm_s = [_time_batch(fn, device, 1) for fn in fns]
    calls, per_round = [], 0.0
    for fn, warm in zip(fns, warm_s):
        # A fast op's first call may carry one-time costs: size on another.
        once = max(warm if warm >= 10e-3 else _time_batch(fn, device, 1), 1e-9)
        calls.append(math.ceil(min_batch_s / once) if once < min_batch_s else 1)
        per_round += once * calls[-1]
    repeats = int(min(max_repeats, max(min_repeats, budget_s * len(fns) // per_round)))
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            samples[i].append(_time_batch(fn, device, calls[i]))
    return [Timing(statistics.median(x), min(x), repeats, c) for x, c in zip(samples, calls)]


def measure(fn: Callable[[], Any], device: str, **kwargs) -> Timing:
    """Median time of one call of fn (see measure_interleaved)."""
    return measure_interleaved([fn], device, **kwargs)[0]


def copy_bandwidth(device: str, nbytes: Optional[int] = None, budget_s: float = 1.0) -> float:
    """Copy ceiling in GB/s: (bytes read + bytes written) / time of dst.copy_(src).

    The tensors are much larger than the last-level cache (256 MiB on the CPU,
    2 GiB on a GPU) unless nbytes says otherwise."""
    if nbytes is None:
        nbytes = (2 << 30) if torch.device(device).type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, budget_s=budget_s)
    return 2 * nbytes / t.median_s / 1e9


# --------------------------------------------------------------------------- #
# cases and results
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Target:
    """What docs/kernels.md asks of a case: a minimum ratio against the plain way
    and/or a minimum fraction of the copy ceiling."""

    ratio: Optional[float] = None
    copy_fraction: Optional[float] = None

    def describe(self) -> str:
        parts = []
        if self.copy_fraction is not None:
            parts.append(f">={self.copy_fraction:.0%} copy")
        if self.ratio is not None:
            parts.append(f">={self.ratio:g}x")
        return ", ".join(parts)

    def met(self, ratio: float, copy_fraction: float) -> bool:
        return (self.ratio is None or ratio >= self.ratio) and (
            self.copy_fraction is None or copy_fraction >= self.copy_fraction
        )


@dataclass
class Case:
    """One benchmark: `make()` allocates the inputs and returns the native call
    (torch.ops.tallytrain.<op> as dispatched) and the plain-PyTorch call, so
    inputs live only while their case runs. `check(native_out, plain_out)`
    says whether the two agree where the plain way defines the same result."""

    op: str
    name: str
    make: Callable[[], Tuple[Callable[[], Any], Callable[[], Any]]]
    bytes_moved: int
    target: Optional[Target] = None
    check: Optional[Callable[[Any, Any], bool]] = None


@dataclass
class Row:
    op: str
    case: str
    served: str  # "native" or "reference": who served the op call
    level: str  # the CPU level of the native CPU kernels, or "-"
    native_s: float
    baseline_s: float
    bytes_moved: int
    copy_gbps: float  # the copy ceiling measured next to this case
    target: Optional[str] = None
    status: str = "-"  # "met", "missed", "n/a (...)" or "-" (no target)
    agrees: Optional[bool] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.baseline_s / self.native_s

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.native_s / 1e9

    @property
    def copy_fraction(self) -> float:
        return self.gbps / self.copy_gbps

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(ratio=self.ratio, gbps=self.gbps, copy_fraction=self.copy_fraction)
        return d


def run_case(
    case: Case,
    device: str,
    served: str,
    copy_gbps: float,
    *,
    budget_s: float = 1.0,
    indicative: bool = False,
    levels: Union[str, Sequence[str]] = "-",
    use_level: Optional[Callable[[str], None]] = None,
) -> List[Row]:
    """Times one case, native then plain, and judges its target: one Row, or
    with several CPU levels one Row per level, the native call at each level
    (use_level(level) switches) timed in turn with the plain one.

    A case whose op the reference served is reported as "reference" and never
    judged against a native target."""
    levels = [levels] if isinstance(levels, str) else list(levels)
    native, plain = case.make()

    # fn is bound as a default so that `del native` below leaves only the
    # references held by `natives` (freed with it before empty_cache).
    def at_level(level: str, fn: Callable[[], Any] = native) -> Callable[[], Any]:
        if use_level is None or len(levels) == 1:
            return fn

        def call():
            use_level(level)
            return fn()

        return call

    # Each further level gets inputs of its own (case.make() again, the same
    # seeded data): an op that updates its input in place (topk_sparse_ef's
    # residual) must meet every level in the state the plain way met it.
    natives = [
        at_level(level, native if i == 0 else case.make()[0]) for i, level in enumerate(levels)
    ]
    # The first calls warm up, and their outputs are compared.
    warm, agrees = [], []
    plain_out, warm_plain = timed_call(plain, device)
    for fn in natives:
        native_out, seconds = timed_call(fn, device)
        warm.append(seconds)
        agrees.append(case.check(native_out, plain_out) if case.check is not None else None)
        del native_out
    del plain_out
    timings = measure_interleaved(
        natives + [plain], device, budget_s=budget_s, warm_s=warm + [warm_plain]
    )
    t_plain = timings[-1]
    rows = []
    for level, t_native, agree in zip(levels, timings, agrees):
        row = Row(
            case.op,
            case.name,
            served,
            level if served == "native" else "-",
            t_native.median_s,
            t_plain.median_s,
            case.bytes_moved,
            copy_gbps,
            target=case.target.describe() if case.target else None,
            agrees=agree,
            extra={"native_repeats": t_native.repeats, "plain_repeats": t_plain.repeats},
        )
        if case.target is not None:
            if served != "native":
                row.status = "n/a (reference served)"
            else:
                row.status = "met" if case.target.met(row.ratio, row.copy_fraction) else "missed"
                if indicative:
                    row.status += " (indicative)"
        rows.append(row)
    del native, plain, natives
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of the rows."""
    head = [
        "op",
        "case",
        "served",
        "level",
        "native ms",
        "plain ms",
        "ratio",
        "GB/s",
        "copy GB/s",
        "of copy",
        "target",
        "status",
        "agrees",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        agrees = "-" if r.agrees is None else ("yes" if r.agrees else "NO")
        cells = [
            r.op,
            r.case,
            r.served,
            r.level,
            _ms(r.native_s),
            _ms(r.baseline_s),
            f"{r.ratio:.1f}x",
            f"{r.gbps:.2f}",
            f"{r.copy_gbps:.1f}",
            f"{r.copy_fraction:.0%}",
            r.target or "-",
            r.status,
            agrees,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_levels_table(rows: Sequence[Row], levels: Sequence[str]) -> str:
    """The same cases at several CPU levels side by side: each level's time
    and ratio against the plain way (timed in the same rounds), and each
    level's time over the first level's."""
    by_case: Dict[Tuple[str, str], Dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault((r.op, r.case), {})[r.level] = r
    first = levels[0]
    head = ["op", "case"] + [f"{lv} ms" for lv in levels] + ["plain ms"]
    head += [f"{lv} ratio" for lv in levels] + [f"{lv} / {first}" for lv in levels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, case), at in by_case.items():
        if not all(lv in at for lv in levels):
            continue
        cells = [op, case] + [_ms(at[lv].native_s) for lv in levels]
        cells += [_ms(at[first].baseline_s)] + [f"{at[lv].ratio:.1f}x" for lv in levels]
        cells += [f"{at[lv].native_s / at[first].native_s:.2f}" for lv in levels[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[Row], header: Sequence[str] = ()) -> None:
    for line in header:
        print(line)
    if header:
        print()
    print(format_table(rows), flush=True)
