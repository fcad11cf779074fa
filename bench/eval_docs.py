"""Render the evaluation results (`bench/results/{routing,heldout}-*.json`) as markdown.

Usage::

    .venv/bin/python bench/eval_docs.py > /tmp/tables.md        # held-out settings, for docs/evaluation.md
    .venv/bin/python bench/eval_docs.py --routing docs/routing.md   # regenerate the routing page

`bench/eval_routing.py` regenerates docs/routing.md itself after every run (`write_routing_doc`). Only formats
what the evaluation scripts wrote; every number comes from those JSON files, each with its command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_common import RESULTS, fmt_ci, md_table  # noqa: E402
from bench.heldout_report import report as heldout_report  # noqa: E402
from explorer.routing.config import describe_router  # noqa: E402


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _link(path: str, doc: Path) -> str:
    """A figure path as stored in a result (relative to the repository) as seen from the markdown file."""
    p = Path(path) if Path(path).is_absolute() else ROOT / path
    return os.path.relpath(p, doc.parent)


def _refused(row: dict) -> str:
    return "refused: " + row["refused"].split(". ")[0]  # the first sentence says why


def task_table(r: dict) -> str:
    cols = list(r["accuracy"])
    s5 = r["s5"]["per_task"]
    rows = [[t, r["families"].get(t, ""), ", ".join(p["own_experts"]), p["n"]] + [f"{p[w]:.2f}" for w in cols]
            + [p["most_chosen"], s5_cell(s5.get(t))] for t, p in r["per_task"].items()]
    return md_table(["task", "family", "own expert(s)", "n"] + [f"acc ({w})" for w in cols]
                    + ["most chosen (user text)", "S5 (Arrow / own EM)"], rows)


def s5_cell(s: dict | None) -> str:
    if not s:
        return "n/a"
    ratio = "n/a" if s["ratio"] is None else f"{s['ratio']:.2f}"
    return f"{ratio} ({s['arrow']:.2f} / {s['own']:.2f})"


def routing_section(r: dict, doc: Path) -> str:
    """One library and split: headline, per task, centring, sweep, per module, distributions, figures."""
    a, s5 = r["accuracy"], r["s5"]
    goals = r["goals"]
    lines = [f"## `{r['library']}`, split `{r['split']}`", "",
             f"{r['level']} level, {len(r['experts'])} routed experts, {r['n_per_task']} prompts per task. "
             f"Router: {describe_router(r['router'])} ({r['router_source']}).", "",
             f"Command: `{r['command']}` — {r['date']}, {_minutes(r['total_seconds'])}, "
             f"{r['torch_threads']} torch threads.", "",
             md_table(["tokens", "prompts routed to their own expert [95% CI]", "goal"],
                      [[w, fmt_ci(v["mean"], *v["ci95"]), f"≥ {goals['user']:.0%}" if w == "user" else
                        f"≥ {goals['user+generated']:.0%}" if w == "user+generated" else ""] for w, v in a.items()]),
             "", f"S5 (held-in Arrow exact match / own expert's): **{_f(s5['overall'])}** "
                 f"(Arrow {_f(s5['arrow_mean'])}, own {_f(s5['own_mean'])}; goal ≥ {goals['s5']:.0%}).", "",
             task_table(r), ""]
    if "adjusted_rand" in r:
        lines += [f"Adjusted Rand index, clusters vs task families: {_f(r['adjusted_rand']['ari'], 3)}.", ""]
    again = f" Recomputed by `{r['centring_command']}`." if r.get("centring_command") else ""
    lines += [f"Centring options (same top-k and temperature, prompts of this split, each routed per token: a "
              f"per-prompt router's evidence).{again}", "",
              md_table(["centre", "scope", "input centre", "acc (user text)", "acc (prompt)", "entropy median",
                        "margin median"],
                       [[c["centre"], c["scope"] or "", c.get("input_centre", "none"), _f(c.get("user")),
                         _f(c.get("prompt")), _f(c.get("entropy_median")), _f(c.get("margin_median"))]
                        if "refused" not in c else
                        [c["centre"], c["scope"] or "", c.get("input_centre", "none"), _refused(c), "", "", ""]
                        for c in r["centring"]]), ""]
    if r.get("sweep"):
        win = r["sweep"]["winner"]
        ev = r["sweep"]["evidence"]
        lines += [f"Sweep on training prompts ({ev['train_prompts_per_task']} routed, {ev['em_prompts_per_task']} "
                  f"answered per task); rule: {ev['rule']}. Winner: **{describe_router(win)}**.", "",
                  md_table(["centre", "scope", "input centre", "top-k", "T", "acc (user text)", "acc (prompt)",
                            "train EM", "margin median"],
                           [[s["centre"], s["centre_scope"], s.get("input_centre", "none"), s["top_k"],
                             f"{s['temperature']:g}",
                             *([_refused(s), "", "", ""] if "refused" in s else
                               [_f(s["user"]), _f(s["prompt"]), _f(s.get("em")), _f(s.get("margin_median"))])]
                            for s in r["sweep"]["rows"]]), ""]
        gran = ev.get("granularity")
        if gran:
            fit = gran.get("readout") or {}
            lines += [f"Granularity and pick on training prompts ({gran['em_prompts_per_task']} answered per task"
                      + (f", after a readout fitted on the {fit['prompts_per_task']} before them, training "
                         f"accuracy {_f(fit.get('train_accuracy'))}" if fit.get("prompts_per_task") else "")
                      + f"); rule: {gran['rule']}.", "",
                      md_table(["granularity", "pick", "train EM"],
                               [[g["granularity"], g.get("pick", "mean") if g["granularity"] == "prompt" else "",
                                 _f(g["em"])] for g in gran["rows"]]), ""]
    ent, mar = r["entropy"], r["margin"]
    q = ["mean", "q05", "q25", "q50", "q75", "q95"]
    lines += ["Per module (user text): " + ", ".join(f"{m} {v:.2f}" for m, v in r["per_module"].items()) + ".", "",
              md_table(["per (layer, user token)"] + q, [["entropy (nats)"] + [_f(ent.get(k)) for k in q],
                                                         ["top-1 margin"] + [_f(mar.get(k)) for k in q]]), "",
              f"![confusion]({_link(r['figures']['confusion'], doc)}) ![layers]({_link(r['figures']['layers'], doc)})",
              ""]
    return "\n".join(lines)


def legacy_table(results: list[dict]) -> str:
    """Results written before the diagnostics (no split): their two accuracies, kept for comparison."""
    rows = [[r["library"], r.get("top_k", ""), fmt_ci(r["overall"]["mean"], *r["overall"]["ci95"]),
             fmt_ci(r["overall_user_tokens"]["mean"], *r["overall_user_tokens"]["ci95"]), r.get("date", ""),
             f"`{r.get('command', '')}`"] for r in results]
    return md_table(["library", "top-k", "acc (all prompt tokens)", "acc (user text)", "date", "command"], rows)


def write_routing_doc(results: Path = RESULTS, doc: Path = ROOT / "docs" / "routing.md", quick: bool = False) -> Path:
    """Regenerate the routing page from every `routing-*.json` in `results` (only the quick ones when
    `quick`, never them otherwise)."""
    new, old = [], []
    for path in sorted(Path(results).glob("routing-*.json")):
        if ("quick" in path.name) != quick:
            continue
        r = json.loads(path.read_text())
        (new if "split" in r else old).append(r)
    doc = Path(doc)
    parts = ["# Routing: does it explain?", "",
             "Generated by `bench/eval_docs.py` from `bench/results/routing-*.json` (written by "
             "`bench/eval_routing.py`, which documents each measure); do not edit by hand. Accuracy: the share of "
             "prompts whose own expert (cluster level: the task's cluster expert) gets the largest mean routing "
             "weight over those tokens. The per-layer figure has one curve per centring option.", ""]
    parts += [routing_section(r, doc) for r in new]
    if old:
        parts += ["## Earlier results (before the diagnostics)", "", legacy_table(old), ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts))
    return doc


def heldout_section(s: dict) -> str:
    lines = [f"### Setting {s['setting']}: `{s['tasks_spec']}`", "",
             f"Command: `{s['command']}` — {s['date']}; evaluation {_minutes(s['eval_seconds'])}, "
             f"total with builds {_minutes(s['total_seconds'])}; at most {s['n_cap']} examples per task", ""]
    if s.get("builds"):
        for kind, b in s["builds"].items():
            lines.append(f"- build {kind}: `{b['command']}` ({_minutes(b['seconds'])})")
        lines.append("")
    if s.get("oracle"):
        lines.append("Oracle expert per task (same family, largest mean Arrow weight on 20 training prompts): "
                     + ", ".join(f"{t} -> {o['expert']}" for t, o in s["oracle"].items()))
        lines.append("")
    lines += [heldout_report(s), "", f"![intervals]({s['figure'].removeprefix('docs/')})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", help="write the routing page here instead of printing the held-out tables")
    args = ap.parse_args(argv)
    if args.routing:
        print(write_routing_doc(RESULTS, Path(args.routing)))
        return
    for path in sorted(RESULTS.glob("heldout-*.json")):
        if "quick" not in path.name and "builds" not in path.name:
            print(heldout_section(json.loads(path.read_text())), end="\n\n")


if __name__ == "__main__":
    main()
