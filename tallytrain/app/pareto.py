"""The accuracy-versus-bytes study: every operating point of the baselines and
of ``bridge`` on identical partitions, probes and seeds, and which points
dominate which.

Operating points (defaults; each list is an option of ``tallytrain pareto``):
FedAvg, FedProx and FedDF averaging every 1, 2, 5 and 10 rounds (the same
local work per round, so fewer merges mean fewer bytes); ``softlabel`` and
``tallytrain`` as they are; ``bridge`` with top-k fractions 0.1%, 1% and 10%
merged every 1, 5 and 10 rounds.

Point A dominates point B when A's mean final accuracy is >= B's and A's
total bytes are <= B's, one of the two strictly. The frontier is the set of
points no other point dominates. For every baseline point the study names
the bridge points that dominate it, and, because the seeds (partitions,
probes, initialisations) are shared, which of them are at least as accurate
on every seed as well (a paired check; ``None`` with one seed), so that a
domination within the seeds' noise is not presented as a clear one.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Sequence

from .. import report
from ..fl.config import CompareConfig, RunConfig
from .experiment import run_compare, run_dir_of

PARAMETER_BASELINES = ("fedavg", "fedprox", "feddf")
PERIODS = (1, 2, 5, 10)
BRIDGE_FRACTIONS = (0.001, 0.01, 0.1)
BRIDGE_PERIODS = (1, 5, 10)
PARETO_FILE, PARETO_TABLE, PARETO_PLOT = "pareto.json", "pareto.md", "pareto.png"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def pareto_config(
    base: RunConfig,
    seeds: Sequence[int],
    periods: Sequence[int] = PERIODS,
    bridge_fractions: Sequence[float] = BRIDGE_FRACTIONS,
    bridge_periods: Sequence[int] = BRIDGE_PERIODS,
    baselines: Sequence[str] = PARAMETER_BASELINES,
) -> CompareConfig:
    """The study as one comparison: a label per operating point."""
    for name, values in (("periods", periods), ("bridge_periods", bridge_periods)):
        if not values or any(int(v) != v or v < 1 for v in values):
            raise ValueError(f"{name} must list integers >= 1, got {list(values)}")
        # A period longer than the run merges only in its last round, as a
        # period of exactly the run's length does: the same point twice.
        longer = [int(v) for v in values if v > base.rounds]
        if longer:
            raise ValueError(
                f"{name} {', '.join(map(str, longer))} exceed the {base.rounds} "
                f"rounds: such a period merges only in the last round, the same "
                f"point as a period of {base.rounds}; lower them or run more rounds"
            )
    if not bridge_fractions or any(not 0 < f <= 1 for f in bridge_fractions):
        raise ValueError(
            f"bridge_fractions must list fractions in (0, 1], got {list(bridge_fractions)}"
        )
    for name, listed in (
        ("periods", periods),
        ("bridge_periods", bridge_periods),
        ("bridge_fractions", bridge_fractions),
        ("baselines", baselines),
    ):
        if len(set(listed)) != len(listed):
            raise ValueError(f"{name} lists a value twice: {list(listed)}")
    unknown = set(baselines) - set(PARAMETER_BASELINES)
    if unknown:
        raise ValueError(
            f"baselines may only name {', '.join(PARAMETER_BASELINES)}; got "
            f"{', '.join(sorted(unknown))}"
        )
    settings: Dict[str, dict] = {}
    for method in baselines:
        for r in periods:
            settings[f"{method}-R{int(r)}"] = {
                "method": method,
                "protocol": {"merge_period": int(r)},
            }
    labels = list(settings) + ["softlabel", "tallytrain"]
    for f in bridge_fractions:
        for r in bridge_periods:
            label = f"bridge-k{_percent(f)[:-1]}pct-R{int(r)}"
            settings[label] = {
                "method": "bridge",
                "protocol": {"merge_period": int(r), "topk_fraction": float(f)},
            }
            labels.append(label)
    return CompareConfig(methods=tuple(labels), seeds=tuple(seeds), base=base, settings=settings)


def describe(cfg: CompareConfig, label: str) -> str:
    """The operating point in words, e.g. "every 5 rounds" or "top 1%, every 5 rounds"."""
    proto = cfg.run(label, cfg.seeds[0]).protocol
    method = cfg.method_of(label)
    every = "every round" if proto.merge_period == 1 else f"every {proto.merge_period} rounds"
    if method == "bridge":
        return f"top {_percent(proto.topk_fraction)}, {every}"
    if method in PARAMETER_BASELINES:
        return every
    return "every round"


def dominates(a: Mapping, b: Mapping) -> bool:
    acc_a, acc_b = a["final_accuracy_mean"], b["final_accuracy_mean"]
    bytes_a, bytes_b = a["total_bytes"], b["total_bytes"]
    return acc_a >= acc_b and bytes_a <= bytes_b and (acc_a > acc_b or bytes_a < bytes_b)


def analyze(
    cfg: CompareConfig, summary: Mapping, seed_accuracy: Mapping[str, Sequence[float]]
) -> dict:
    """pareto.json: every point, the frontier, and for each baseline point the
    bridge points that dominate it. ``seed_accuracy[label]`` lists the final
    accuracy of each seed, in ``cfg.seeds`` order."""
    points: List[dict] = []
    for label in cfg.methods:
        m = summary["methods"][label]
        points.append(
            {
                "label": label,
                "method": cfg.method_of(label),
                "setting": describe(cfg, label),
                "final_accuracy_mean": m["final_accuracy_mean"],
                "final_accuracy_std": m["final_accuracy_std"],
                "total_bytes": m["total_bytes"],
                "seeds": m["seeds"],
                "seed_accuracy": list(seed_accuracy[label]),
            }
        )
    bridge = [p for p in points if p["method"] == "bridge"]
    paired = len(cfg.seeds) > 1
    for p in points:
        p["on_frontier"] = not any(dominates(q, p) for q in points if q is not p)
        if p["method"] == "bridge":
            continue
        by = [q for q in bridge if dominates(q, p)]
        p["dominated_by_bridge"] = [q["label"] for q in by]
        p["dominated_on_every_seed_by"] = (
            [
                q["label"]
                for q in by
                if all(a >= b for a, b in zip(q["seed_accuracy"], p["seed_accuracy"]))
            ]
            if paired
            else None
        )
    baselines = [p for p in points if p["method"] != "bridge"]
    return {
        "points": points,
        "baselines": len(baselines),
        "baselines_dominated": sum(bool(p["dominated_by_bridge"]) for p in baselines),
        "baselines_dominated_on_every_seed": sum(
            bool(p["dominated_on_every_seed_by"]) for p in baselines
        )
        if paired
        else None,
        "seeds": list(cfg.seeds),
    }


def _names(labels: Sequence[str], limit: int = 3) -> str:
    return ", ".join(labels[:limit]) + (", ..." if len(labels) > limit else "")


def pareto_table(result: Mapping) -> str:
    head = [
        "point",
        "method",
        "setting",
        "accuracy (mean ± std)",
        "total bytes",
        "frontier",
        "dominated by a bridge point",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(result["points"], key=lambda p: p["total_bytes"]):
        if p["method"] == "bridge":
            dom = "(bridge)"
        elif p["dominated_by_bridge"]:
            every = p["dominated_on_every_seed_by"]
            dom = f"yes, by {len(p['dominated_by_bridge'])} ({_names(p['dominated_by_bridge'])})"
            if every is not None:
                dom += (
                    f"; on every seed by {len(every)} ({_names(every)})"
                    if every
                    else "; on every seed by none"
                )
        else:
            dom = "**no**"
        lines.append(
            "| "
            + " | ".join(
                [
                    p["label"],
                    p["method"],
                    p["setting"],
                    report.mean_and_spread(p["final_accuracy_mean"], p["final_accuracy_std"]),
                    f"{p['total_bytes']:,}",
                    "yes" if p["on_frontier"] else "",
                    dom,
                ]
            )
            + " |"
        )
    lines.append("")
    every = result["baselines_dominated_on_every_seed"]
    lines.append(
        f"Bridge points dominate {result['baselines_dominated']} of "
        f"{result['baselines']} baseline points (mean accuracy >= at total bytes <=, "
        f"{len(result['seeds'])} seed(s))"
        + (f"; {every} of them on every seed as well." if every is not None else ".")
    )
    return "\n".join(lines) + "\n"


def run_pareto(cfg: CompareConfig, out: str, **run_options) -> dict:
    """Run the study into ``out`` (a run directory like ``compare``'s, plus
    pareto.json, pareto.md and pareto.png); returns pareto.json's dict."""
    summary = run_compare(cfg, out, **run_options)
    seed_accuracy: Dict[str, List[float]] = {}
    for label in cfg.methods:
        seed_accuracy[label] = []
        for seed in cfg.seeds:
            with open(
                os.path.join(run_dir_of(out, label, seed), "result.json"), encoding="utf-8"
            ) as f:
                seed_accuracy[label].append(json.load(f)["final_accuracy"])
    result = analyze(cfg, summary, seed_accuracy)
    report.write_json_atomic(os.path.join(out, PARETO_FILE), result)
    report.write_text_atomic(os.path.join(out, PARETO_TABLE), pareto_table(result))
    d = cfg.base.data
    title = (
        f"{d.dataset}, {cfg.base.peers} peers, alpha={d.alpha}, {cfg.base.rounds} rounds, "
        f"{len(cfg.seeds)} seed(s)"
    )
    report.plot_pareto(result["points"], os.path.join(out, PARETO_PLOT), title)
    return result
