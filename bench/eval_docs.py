"""Render the result tables of `bench/results/{routing,heldout}-*.json` as markdown for docs/evaluation.md.

Usage::

    .venv/bin/python bench/eval_docs.py > /tmp/tables.md     # then paste / include in docs/evaluation.md

Only formats what the evaluation scripts wrote; every number comes from those JSON files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_common import RESULTS  # noqa: E402
from bench.eval_heldout import report as heldout_report  # noqa: E402
from bench.eval_routing import report as routing_report  # noqa: E402


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def routing_section(r: dict) -> str:
    lines = [f"### Routing: `{r['library']}` ({r['level']} level, {len(r['experts'])} routed experts, "
             f"top-k {r['top_k']}, {r['n_per_task']} held-out prompts per task)", "",
             f"Command: `{r['command']}` — {r['date']}, {_minutes(r['total_seconds'])}", "",
             routing_report(r), "", f"![confusion]({r['figure'].removeprefix('docs/')})"]
    return "\n".join(lines)


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


def main() -> None:
    for path in sorted(RESULTS.glob("routing-*.json")):
        if "quick" not in path.name:
            print(routing_section(json.loads(path.read_text())), end="\n\n")
    for path in sorted(RESULTS.glob("heldout-*.json")):
        if "quick" not in path.name and "builds" not in path.name:
            print(heldout_section(json.loads(path.read_text())), end="\n\n")


if __name__ == "__main__":
    main()
