"""Ablations of tallytrain's recipe: the default recipe, and one row per
mechanism with that mechanism (and only it) off, on identical partitions,
probes and seeds, with softlabel under the same peer schedule for reference,
and a row with the probability threshold the recipe no longer uses.

Each row's mechanism shows in its per-round metrics (metrics.jsonl):
consensus accuracy and kept fraction (what the tally produces), memory
fraction and accuracy (what peers distill on), the share of abstentions
(what peers vouch for); ablation.md tabulates them at the last round, and
ablation.png draws them round by round.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .. import report
from ..fl.config import CompareConfig, RunConfig
from .experiment import METRICS_FILE, run_compare

RECIPE = "tallytrain"
REFERENCE = "softlabel"

#: label -> (what is off, the overrides that turn it off)
ABLATIONS: Dict[str, tuple] = {
    "no-memory": (
        "consensus memory: only the latest round's consensus",
        {"protocol": {"memory_max_age": 1}},
    ),
    "no-support": (
        "support-aware abstention (by label and by input)",
        {"protocol": {"support_min": 0, "support_radius": None}},
    ),
    "no-radius": (
        "the input-space support radius (the label test stays)",
        {"protocol": {"support_radius": None}},
    ),
    "no-local-votes": (
        "votes from local-only models: votes from the distilled models",
        {"protocol": {"votes_from": "distilled"}},
    ),
    "no-quorum": (
        "the quorum: a probe any voter of weight >= 1 (of 16) decided is kept",
        {"protocol": {"min_votes": 1 / 16}},
    ),
    "no-reputation": (
        "reputation weights: every peer weighs 1",
        {"protocol": {"reputation": False}},
    ),
    # Not a mechanism of the recipe: the probability threshold it dropped
    # (docs/results.md section 5), a row to keep that evidence current.
    "with-threshold": (
        "nothing; adds the probability threshold (0.95) the recipe dropped",
        {"protocol": {"abstain_below": 0.95}},
    ),
    "no-schedule": (
        "the distillation schedule: a fixed distillation batch",
        {"train": {"distill_epochs": 0.0}},
    ),
}
COLUMNS = (
    "consensus_acc",
    "kept_fraction",
    "memory_fraction",
    "memory_acc",
    "abstained",
    "classes_covered",
)
ABLATION_TABLE, ABLATION_JSON, ABLATION_PLOT = "ablation.md", "ablation.json", "ablation.png"


def ablate_config(base: RunConfig, seeds: Sequence[int]) -> CompareConfig:
    labels = [RECIPE] + [f"{RECIPE}-{name}" for name in ABLATIONS] + [REFERENCE]
    settings = {
        f"{RECIPE}-{name}": {"method": RECIPE, **overrides}
        for name, (_, overrides) in ABLATIONS.items()
    }
    return CompareConfig(methods=tuple(labels), seeds=tuple(seeds), base=base, settings=settings)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def ablation_rows(summary: Mapping, rows: Sequence[Mapping]) -> List[dict]:
    """One dict per label: final accuracy, its change against the recipe, and
    the last round's mechanism metrics (means over seeds)."""
    last: Dict[str, List[Mapping]] = defaultdict(list)
    final_round = max(r["round"] for r in rows)
    for r in rows:
        if r["round"] == final_round:
            last[r["label"]].append(r)
    recipe = summary["methods"][RECIPE]["final_accuracy_mean"]
    out = []
    for label, m in summary["methods"].items():
        name = label[len(RECIPE) + 1 :] if label.startswith(RECIPE + "-") else None
        off = (
            ABLATIONS[name][0]
            if name in ABLATIONS
            else ("nothing (the default recipe)" if label == RECIPE else "reference, same schedule")
        )
        row = {
            "label": label,
            "off": off,
            "accuracy": m["final_accuracy_mean"],
            "accuracy_std": m["final_accuracy_std"],
            "change": m["final_accuracy_mean"] - recipe,
            "uplink_bytes": m["uplink_bytes"],
        }
        row.update({k: _mean([r.get(k) for r in last[label]]) for k in COLUMNS})
        out.append(row)
    return out


def ablation_table(rows: Sequence[Mapping]) -> str:
    head = [
        "row",
        "off",
        "accuracy",
        "change",
        "consensus acc",
        "kept",
        "memory",
        "memory acc",
        "abstained",
        "classes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v):
        return "–" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    r["off"],
                    report.mean_and_spread(r["accuracy"], r["accuracy_std"]),
                    f"{r['change']:+.3f}",
                ]
                + [f(r[k]) for k in COLUMNS]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_ablation(rows: Sequence[Mapping], path: str, title: str = "") -> None:
    plt = report._pyplot()
    keys = ("accuracy", "consensus_acc", "memory_fraction", "abstained")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    by_label: Dict[str, Dict[int, List[Mapping]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_label[r["label"]][r["round"]].append(r)
    for ax, key in zip(axes.flat, keys):
        for label, rounds in by_label.items():
            xs = sorted(rounds)
            ys = [_mean([r.get(key) for r in rounds[x]]) for x in xs]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    label=label,
                    lw=2.2 if label == RECIPE else 1.2,
                    ls="--" if label == REFERENCE else "-",
                )
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("round")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.8, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_ablate(cfg: CompareConfig, out: str, **options) -> List[dict]:
    summary = run_compare(cfg, out, **options)
    rows = report.read_jsonl(os.path.join(out, METRICS_FILE))
    table = ablation_rows(summary, rows)
    report.write_text_atomic(os.path.join(out, ABLATION_TABLE), ablation_table(table))
    report.write_text_atomic(os.path.join(out, ABLATION_JSON), json.dumps(table, indent=2))
    d = cfg.base.data
    plot_ablation(
        rows,
        os.path.join(out, ABLATION_PLOT),
        f"tallytrain ablations: {d.dataset}, {cfg.base.peers} peers, alpha {d.alpha}",
    )
    return table
