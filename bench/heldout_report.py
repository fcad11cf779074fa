"""The held-out evaluation's summary: per-task and mean scores with bootstrap intervals, chance levels, the
paper's ordering check, paired differences, the markdown table, the text report and the SVG figure.

Usage::

    summary = summarise(tasks, scores, n)      # scores: {method: {task: {"correct": [...], "samples": [...]}}}
    print(report(summary))
    figure(summary, "heldout-A.svg", "Setting A: mean over tasks, 95% CI", FIGURES)

Pure functions of the scores that `bench/eval_heldout.py` collects; `bench/eval_docs.py` reuses `report`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.eval_common import (bootstrap_ci, bootstrap_task_mean, chance_level, fmt_ci, md_table,
                               paired_difference, repo_relative, svg_intervals, write_figure)

ORDER = ["base", "uniform", "private_arrow", "mbc_arrow"]  # the paper's claimed ordering, worst to best
LABELS = {"base": "base", "uniform": "uniform merge (private)", "private_arrow": "Private+Arrow",
          "mbc_arrow": "MBC+Arrow", "oracle": "oracle: closest expert",
          "uniform_centred": "uniform merge, centred (private)"}
EXTRA = ["uniform_centred", "oracle"]  # reported beside the ordering, not part of it


def summarise(tasks, scores: dict, n: int, split: str = "heldout") -> dict:
    """Per-task and mean scores with intervals, chance levels, the ordering check and paired differences."""
    methods = [m for m in ORDER + EXTRA if m in scores]
    per_task, rows = {}, []
    for t in tasks:
        ex = t.examples(split)[:n]
        rec = {"n": len(ex), "metric": t.metric, "family": t.family,
               "chance": chance_level(ex, t.metric, t.train + t.heldout)}
        for m in methods:
            mean, lo, hi = bootstrap_ci(np.array(scores[m][t.name]["correct"]))
            rec[m] = {"mean": mean, "ci95": [lo, hi], "samples": scores[m][t.name]["samples"]}
        per_task[t.name] = rec
        rows.append([t.name, rec["n"], t.metric.replace("_", " "), f"{rec['chance']:.2f}"]
                    + [fmt_ci(rec[m]["mean"], *rec[m]["ci95"]) for m in methods])
    arrays = {m: [np.array(scores[m][t.name]["correct"]) for t in tasks] for m in methods}
    means = {m: bootstrap_task_mean(arrays[m]) for m in methods}
    chance = float(np.mean([per_task[t.name]["chance"] for t in tasks]))
    rows.append(["**mean**", sum(r["n"] for r in per_task.values()), "", f"{chance:.2f}"]
                + [f"**{fmt_ci(*means[m])}**" for m in methods])
    diffs = {}
    present = [m for m in ORDER if m in scores]
    for a, b in zip(present, present[1:]):
        d = paired_difference(arrays[a], arrays[b])
        lo_a, hi_a = means[a][1:]
        lo_b, hi_b = means[b][1:]
        diffs[f"{b} - {a}"] = {"mean": d[0], "ci95": [d[1], d[2]], "excludes_zero": d[1] > 0 or d[2] < 0,
                               "intervals_overlap": not (hi_a < lo_b or hi_b < lo_a)}
    order_means = [means[m][0] for m in present]
    missing = [m for m in ORDER if m not in scores]
    reproduced = all(x < y for x, y in zip(order_means, order_means[1:])) if not missing else None
    return {"methods": methods, "tasks": per_task, "split": split,
            "mean": {m: {"mean": means[m][0], "ci95": [means[m][1], means[m][2]]} for m in methods},
            "chance_mean": chance, "differences": diffs, "partial": bool(missing), "missing_methods": missing,
            "ordering": {"claimed": "base < uniform < private_arrow < mbc_arrow",
                         "means": dict(zip(present, order_means)),
                         "reproduced": reproduced,
                         "observed": observed_order({m: means[m][0] for m in present})},
            "table": md_table(["task", "n", "metric", "chance"] + [LABELS[m] for m in methods], rows)}


def observed_order(means: dict[str, float]) -> str:
    """'base 0.310 < uniform 0.320 = ...' from worst to best; equal means are shown as '='."""
    ms = sorted(means, key=lambda m: means[m])
    text = f"{ms[0]} {means[ms[0]]:.3f}"
    for a, b in zip(ms, ms[1:]):
        text += f" {'=' if abs(means[b] - means[a]) < 1e-12 else '<'} {b} {means[b]:.3f}"
    return text


def report(summary: dict) -> str:
    lines = [summary["table"], ""]
    o = summary["ordering"]
    verdict = {True: "REPRODUCED", False: "NOT reproduced", None: "not decided (PARTIAL: no "
               + ", ".join(summary.get("missing_methods", [])) + ")"}[o["reproduced"]]
    lines.append(f"paper's ordering {o['claimed']}: {verdict} (observed {o['observed']})")
    for k, d in summary["differences"].items():
        lines.append(f"  {k}: {fmt_ci(d['mean'], *d['ci95'])} paired; "
                     f"{'excludes 0' if d['excludes_zero'] else 'includes 0 (no clear difference)'}; "
                     f"separate intervals {'overlap' if d['intervals_overlap'] else 'do not overlap'}")
    return "\n".join(lines)


def figure(summary: dict, name: str, title: str, figures: Path) -> str:
    ms = summary["methods"]
    path = write_figure(name, svg_intervals([LABELS[m] for m in ms],
                                            [(summary["mean"][m]["mean"], *summary["mean"][m]["ci95"]) for m in ms],
                                            title, chance=summary["chance_mean"]), figures)
    return repo_relative(path)
