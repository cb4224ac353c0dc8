"""Run-directory files: metrics.jsonl, comm.csv, summary.json and the plots.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted run never leaves a half-written file.
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, cast

import numpy as np

# Timing fields differ between two runs of the same configuration; everything
# else in a metrics row is a deterministic function of the config.
TIMING_FIELDS = ("round_seconds",)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def metrics_jsonl(rows: Iterable[Mapping]) -> str:
    return "".join(json.dumps(dict(r), sort_keys=False) + "\n" for r in rows)


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def without_timing(rows: Iterable[Mapping]) -> List[dict]:
    """Metrics rows minus the wall-clock fields (for determinism checks)."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


# --------------------------------------------------------------------------- #
# summary
# --------------------------------------------------------------------------- #
def summarize(results: Mapping[str, Sequence[Mapping]]) -> dict:
    """summary.json from per-run results ({method: [result per seed]}).

    A result holds ``final_accuracy``, ``totals`` (ledger totals of the whole
    run: uplink / downlink / total bytes summed over peers and rounds) and
    ``phase_seconds``. Accuracy: mean and sample standard deviation (ddof=1;
    None for one seed, which has no spread) over seeds. Bytes: mean over seeds (message sizes do not
    depend on the seed, except the index coding of sparse messages). Phase seconds: summed
    over seeds (the wall time the method cost)."""
    methods = {}
    for name, runs in results.items():
        acc = np.array([r["final_accuracy"] for r in runs], dtype=np.float64)
        phases: Dict[str, float] = {}
        for r in runs:
            for k, v in r["phase_seconds"].items():
                phases[k] = phases.get(k, 0.0) + float(v)
        methods[name] = {
            "final_accuracy_mean": float(acc.mean()),
            "final_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else None,
            "total_bytes": int(round(np.mean([r["totals"]["total"] for r in runs]))),
            "uplink_bytes": int(round(np.mean([r["totals"]["uplink"] for r in runs]))),
            "downlink_bytes": int(round(np.mean([r["totals"]["downlink"] for r in runs]))),
            "seeds": len(runs),
            "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
        }
        ppl = [r.get("final_perplexity") for r in runs]
        if all(p is not None for p in ppl):  # sequence tasks
            ppl_a = np.array(ppl, dtype=np.float64)
            methods[name]["final_perplexity_mean"] = float(ppl_a.mean())
            methods[name]["final_perplexity_std"] = (
                float(ppl_a.std(ddof=1)) if len(ppl_a) > 1 else None
            )
    return {"methods": methods}


def mean_and_spread(mean: float, std: Optional[float]) -> str:
    """``0.912 ± 0.013``, or ``0.912 ± –`` for one seed (no spread measured)."""
    return f"{mean:.3f} ± " + ("–" if std is None else f"{std:.3f}")


def summary_table(summary: Mapping, reference: str = "softlabel") -> str:
    """A Markdown table of summary.json; byte ratios against ``reference``
    when it was run."""
    methods = summary["methods"]
    ref = methods.get(reference)
    ppl = all("final_perplexity_mean" in m for m in methods.values())
    head = (
        ["method", "accuracy (mean ± std)"]
        + (["perplexity (mean ± std)"] if ppl else [])
        + ["uplink bytes", "total bytes"]
    )
    if ref:
        head += [f"uplink / {reference}", f"total / {reference}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, mean_and_spread(m["final_accuracy_mean"], m["final_accuracy_std"])]
        if ppl:
            spread = m["final_perplexity_std"]
            cells.append(
                f"{m['final_perplexity_mean']:.1f} ± "
                + ("–" if spread is None else f"{spread:.1f}")
            )
        cells += [f"{m['uplink_bytes']:,}", f"{m['total_bytes']:,}"]
        if ref:
            cells += [
                _ratio(m["uplink_bytes"], ref["uplink_bytes"]),
                _ratio(m["total_bytes"], ref["total_bytes"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def phase_table(summary: Mapping) -> str:
    """A Markdown table of phase_seconds per method, with each run's total and
    the share of the protocol ops in it."""
    methods = summary["methods"]
    phases = []
    for m in methods.values():
        phases += [k for k in m["phase_seconds"] if k not in phases]
    head = ["method"] + phases + ["total", "ops share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        ps = m["phase_seconds"]
        total = sum(ps.values())
        share = ps.get("ops", 0.0) / total if total else 0.0
        lines.append(
            "| "
            + " | ".join(
                [name]
                + [f"{ps.get(k, 0.0):.2f}" for k in phases]
                + [f"{total:.2f}", f"{100 * share:.2f}%"]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _ratio(a: int, b: int) -> str:
    if b == 0:
        return "n/a"
    if a == 0:
        return "0"
    r = a / b
    return f"{r:.4f}" if r < 0.01 else f"{r:.3f}" if r < 10 else f"{r:.1f}"


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(rows: Sequence[Mapping], key: str):
    """{label: (rounds, mean[key] over seeds, std, mean cum_bytes)}."""
    by: Dict[str, Dict[int, Dict[int, Mapping]]] = {}
    for r in rows:
        by.setdefault(_label(r), {}).setdefault(r["seed"], {})[r["round"]] = r
    out = {}
    for method, seeds in by.items():
        rounds = sorted(set.intersection(*(set(s) for s in seeds.values())))
        vals = np.array([[seeds[s][t][key] for t in rounds] for s in seeds], dtype=np.float64)
        cum = np.array(
            [[seeds[s][t]["cum_bytes"] for t in rounds] for s in seeds], dtype=np.float64
        )
        out[method] = (np.array(rounds) + 1, vals.mean(0), vals.std(0), cum.mean(0))
    return out


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = "osD^vP*Xh<>"


def _method_colors(methods: Sequence[str]) -> Dict[str, str]:
    """One colour per method: tab10's ten, then tab20's other ten."""
    palette = [f"C{i}" for i in range(10)]
    if len(methods) > 10:
        import matplotlib

        tab20 = matplotlib.colormaps["tab20"]
        assert isinstance(tab20, matplotlib.colors.ListedColormap)
        rgb = cast(Sequence[Tuple[float, float, float]], tab20.colors)  # tab20 lists RGB tuples
        palette += [matplotlib.colors.to_hex(c) for c in rgb[1::2]]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _styles(rows: Sequence[Mapping]) -> Dict[str, dict]:
    """A style per curve, the same in every plot of a run directory: the
    colour says the method, and the operating points of one method (a
    pareto study's fedavg-R1, fedavg-R2, ...) differ by line style and
    marker, so that no two curves look alike."""
    labels = list(dict.fromkeys(_label(r) for r in rows))
    method_of: Dict[str, str] = {}
    for r in rows:
        method_of.setdefault(_label(r), r.get("method", _label(r)))
    colors = _method_colors(list(dict.fromkeys(method_of[label] for label in labels)))
    seen: Dict[str, int] = {}
    styles = {}
    for label in labels:
        k = seen[method_of[label]] = seen.get(method_of[label], -1) + 1
        styles[label] = {
            "color": colors[method_of[label]],
            "linestyle": _LINESTYLES[k % len(_LINESTYLES)],
            "marker": _MARKERS[k % len(_MARKERS)],
        }
    return styles


def _label(row: Mapping) -> str:
    """A curve per run label (a method, or an operating point of one)."""
    return row.get("label", row["method"])


def _legend_outside(ax, count: int) -> None:
    """The legend right of the axes, where it covers neither the title nor
    the data, in columns of at most 20 entries."""
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=7 if count > 8 else 8,
        ncol=max(1, math.ceil(count / 20)),
    )


def plot_accuracy_vs_round(rows: Sequence[Mapping], path: str, title: str = "") -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    styles = _styles(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, (x, mean, std, _) in _curves(rows, "accuracy").items():
        ax.plot(x, mean, label=method, markersize=2.5, **styles[method])
        ax.fill_between(x, mean - std, mean + std, color=styles[method]["color"], alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("test accuracy (mean over seeds, ±1 std)")
    ax.set_title(title or "accuracy per round")
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(styles))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy_vs_bytes(
    rows: Sequence[Mapping],
    path: str,
    title: str = "",
    key: str = "accuracy",
    ylabel: str = "test accuracy (mean over seeds)",
) -> None:
    """Accuracy (or another metric, ``key``) against cumulative bytes (log x).
    A method that sends nothing (local) cannot sit on a log axis: it is drawn
    as a dashed horizontal line at its final value."""
    plt = _pyplot()
    styles = _styles(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    silent = []
    for method, (_, mean, _, cum) in _curves(rows, key).items():
        if cum[-1] <= 0:
            silent.append((method, mean[-1]))
            continue
        ax.plot(cum, mean, label=method, markersize=2.5, **styles[method])
    for method, acc in silent:
        ax.axhline(
            acc,
            linestyle="--",
            color=styles[method]["color"],
            linewidth=1,
            label=f"{method} (no communication)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes, all peers (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "accuracy vs communication")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        _legend_outside(ax, len(styles))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _place_labels(ax, points: Sequence[tuple], fontsize: float) -> None:
    """Annotate each ``(x, y, text, color)`` next to its point where the text
    overlaps no label placed before it: try eight offsets around the point,
    then further out; a label that fits nowhere takes the least crowded spot."""
    renderer = ax.figure.canvas.get_renderer()
    placed: List = []
    offsets = [(4, 3), (4, -9), (-4, 3), (-4, -9), (0, 8), (0, -13), (8, -3), (-8, -3)]
    offsets += [(2 * dx, 2 * dy) for dx, dy in offsets]
    for x, y, text, color in points:
        best, best_overlap = None, None
        for dx, dy in offsets:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                color=color,
                ha="left" if dx >= 0 else "right",
            )
            box = ann.get_window_extent(renderer)
            overlap = sum(
                max(0.0, min(box.x1, b.x1) - max(box.x0, b.x0))
                * max(0.0, min(box.y1, b.y1) - max(box.y0, b.y0))
                for b in placed
            )
            if best is None or overlap < best_overlap:
                if best is not None:
                    best.remove()
                best, best_overlap, best_box = ann, overlap, box
            else:
                ann.remove()
            if overlap == 0:
                break
        placed.append(best_box)


def plot_pareto(points: Sequence[Mapping], path: str, title: str = "") -> None:
    """Final accuracy (mean ± std over seeds) against total bytes (log x), one
    colour per method (as in the run directory's other plots), each point
    labelled with its setting where the label overlaps no other, and the
    frontier (the points nobody dominates) as a staircase."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    methods = list(dict.fromkeys(p["method"] for p in points))
    colors = _method_colors(methods)
    labels = []
    for i, method in enumerate(methods):
        mine = [p for p in points if p["method"] == method and p["total_bytes"] > 0]
        spread = [p["final_accuracy_std"] for p in mine]
        ax.errorbar(
            [p["total_bytes"] for p in mine],
            [p["final_accuracy_mean"] for p in mine],
            yerr=None
            if all(s is None for s in spread)
            else [0.0 if s is None else s for s in spread],
            fmt=_MARKERS[i % len(_MARKERS)],
            color=colors[method],
            label=method,
            markersize=5,
            capsize=2,
            linewidth=1,
        )
        labels += [
            (
                p["total_bytes"],
                p["final_accuracy_mean"],
                p["setting"].replace("every ", "/").replace(" rounds", "r").replace(" round", "r"),
                colors[method],
            )
            for p in mine
        ]
    front = sorted(
        (p for p in points if p.get("on_frontier") and p["total_bytes"] > 0),
        key=lambda p: p["total_bytes"],
    )
    if front:
        ax.step(
            [p["total_bytes"] for p in front],
            [p["final_accuracy_mean"] for p in front],
            where="post",
            color="black",
            linewidth=1,
            alpha=0.6,
            label="frontier",
        )
    ax.set_xscale("log")
    ax.set_xlabel("total bytes, all peers and rounds (log scale)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_title(title or "accuracy vs bytes")
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax, len(methods) + bool(front))
    fig.canvas.draw()  # fixes the axes' limits, so that label boxes can be measured
    _place_labels(ax, labels, 5.5)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_partition(class_counts: np.ndarray, path: str, title: str = "") -> None:
    """Peers x classes heatmap of sample counts (numbers written when small)."""
    plt = _pyplot()
    counts = np.asarray(class_counts)
    peers, classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 0.45 * classes), 1.5 + 0.35 * peers))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    if peers * classes <= 400:
        top = counts.max() or 1
        for p in range(peers):
            for c in range(classes):
                ax.text(
                    c,
                    p,
                    str(counts[p, c]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if counts[p, c] < 0.6 * top else "black",
                )
    ax.set_xlabel("class")
    ax.set_ylabel("peer")
    ax.set_title(title or "samples per peer and class")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_seconds(s: float) -> str:
    s = max(0, int(math.ceil(s)))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"
