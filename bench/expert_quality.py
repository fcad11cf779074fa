"""Does every expert beat the base model on its own task? Held-out exact match, greedy decoding.

Usage::

    .venv/bin/python bench/expert_quality.py                                   # demo-private, 100 examples
    .venv/bin/python bench/expert_quality.py --library assets/libraries/demo-mbc --n 50   # cluster experts
    .venv/bin/python bench/expert_quality.py --split paraphrase                # held-out wordings
    .venv/bin/python bench/expert_quality.py --quick                           # tiny twin library, seconds

For every private (or cluster) expert and every task it was trained on: the task's examples of one split
(`--split`: `heldout` by default; `paraphrase`, the same inputs in wordings never trained on; `train`), scored
once by the base model alone and once with that single expert attached (no routing), both inside the chat
template the experts were trained with. Prints a table, writes `bench/results/expert_quality-<library>.json`
(`-<split>` appended for another split than `heldout`),
and with `--record` stores the scores in the library's index (`lib.add_score`). Exits 1 if an expert does not
beat the base on one of its tasks.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_common import (RESULTS, bootstrap_ci, exact_match, greedy_generate, md_table,  # noqa: E402
                               prompt_ids, target_tokens, write_json)
from library_store.models import load_base_model  # noqa: E402
from library_store.store.library import ExpertLibrary  # noqa: E402
from library_store.tasks import resolve_tasks  # noqa: E402
from library_store.training.train import attached  # noqa: E402


@torch.no_grad()
def score(base, task, n: int, split: str = "heldout") -> np.ndarray:
    """Per-example exact match (0/1) of whatever is attached to `base.model` right now."""
    if task.metric != "exact_match":
        raise SystemExit(f"{task.name} is {task.metric}; this benchmark scores exact-match tasks "
                         "(bench/eval_heldout.py does rank classification).")
    examples = task.examples(split)[:n]
    prompts = prompt_ids(base, [e.input for e in examples])
    preds = greedy_generate(base.model, base.tokenizer, prompts, target_tokens(base.tokenizer,
                                                                               [e.target for e in examples]))
    return np.array([exact_match(p, e.target) for p, e in zip(preds, examples)], dtype=float)


def run(library: Path, base_name: str, tasks_spec: str, n: int, kinds: tuple[str, ...], record: bool,
        only: list[str] | None = None, split: str = "heldout") -> dict:
    base = load_base_model(base_name)
    lib = ExpertLibrary.open(library, readonly=not record, base=base)  # --record writes the scores
    tasks = {t.name: t for t in resolve_tasks(tasks_spec)}
    experts = [i for i in lib.infos() if i.kind in kinds and (not only or i.name in only)]
    needed = sorted({t for i in experts for t in i.tasks})
    missing = [t for t in needed if t not in tasks]
    if missing:
        raise SystemExit(f"Tasks {missing} are not in --tasks {tasks_spec!r}.")
    start = time.perf_counter()
    base_scores = {}
    for name in needed:
        base_scores[name] = score(base, tasks[name], n, split)
        print(f"base on {name}: {base_scores[name].mean():.3f}", file=sys.stderr, flush=True)
    rows = []
    for info in experts:
        with attached(base, lib[info.name]):
            for name in info.tasks:
                s = score(base, tasks[name], n, split)
                b = base_scores[name]
                lo, hi = bootstrap_ci(s - b)[1:]
                rows.append({"expert": info.name, "kind": info.kind, "task": name, "family": tasks[name].family,
                             "n": len(s), "base": float(b.mean()), "expert_score": float(s.mean()),
                             "delta": float(s.mean() - b.mean()), "delta_ci95": [float(lo), float(hi)],
                             "beats_base": bool(s.mean() > b.mean()), "train_steps": info.train.steps,
                             "final_loss": info.train.final_loss})
                print(f"{info.name} on {name}: {s.mean():.3f} (base {b.mean():.3f})", file=sys.stderr, flush=True)
    if record:
        for name, b in base_scores.items():
            lib.add_score(None, name, "exact_match", float(b.mean()), {"split": split, "n": len(b),
                                                                        "model": "base"})
        for r in rows:
            lib.add_score(r["expert"], r["task"], "exact_match", r["expert_score"], {"split": split, "n": r["n"]})
    return {"library": str(library), "base_model": base_name, "split": split, "n_per_task": n, "rows": rows,
            "all_beat_base": all(r["beats_base"] for r in rows), "seconds": round(time.perf_counter() - start, 1),
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    rows = [[r["task"], r["family"], r["expert"], f"{r['base']:.2f}", f"{r['expert_score']:.2f}",
             f"{r['delta']:+.2f} [{r['delta_ci95'][0]:+.2f}, {r['delta_ci95'][1]:+.2f}]",
             "yes" if r["beats_base"] else "**no**"]
            for r in sorted(result["rows"], key=lambda r: (r["family"], r["task"]))]
    mean_b = np.mean([r["base"] for r in result["rows"]])
    mean_e = np.mean([r["expert_score"] for r in result["rows"]])
    rows.append(["**mean**", "", "", f"{mean_b:.2f}", f"{mean_e:.2f}", f"{mean_e - mean_b:+.2f}", ""])
    return md_table(["task", "family", "expert", "base EM", "expert EM", "Δ [95% CI]", "beats base"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default=str(ROOT / "assets/libraries/demo-private"))
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="builtin", help="task spec the experts' tasks come from")
    p.add_argument("--n", type=int, default=100, help="examples per task")
    p.add_argument("--split", choices=["heldout", "paraphrase", "train"], default="heldout")
    p.add_argument("--kinds", default="private,cluster")
    p.add_argument("--record", action="store_true", help="store the scores in the library's index")
    p.add_argument("--experts", default=None, help="score only these experts (comma-separated); their rows "
                   "replace the same experts' rows in an earlier JSON result, the others are kept")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="build a tiny twin library and score it (smoke test)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        from library_store.training.build import build_private
        from library_store.training.train import TrainConfig

        tmp = Path(tempfile.mkdtemp()) / "quick"
        build_private(load_base_model("tiny-random-llama"), resolve_tasks("builtin:add,first_letter"), tmp,
                      TrainConfig(steps=2, batch_size=2, progress=False))
        args.library, args.base_model, args.n = str(tmp), "tiny-random-llama", 8
    only = args.experts.split(",") if args.experts else None
    result = run(Path(args.library), args.base_model, args.tasks, args.n, tuple(args.kinds.split(",")), args.record,
                 only, args.split)
    out = RESULTS / (f"expert_quality-{Path(args.library).name}"
                     + ("" if args.split == "heldout" else f"-{args.split}") + ".json")
    if only and out.is_file() and not args.quick:  # an incremental run: keep the other experts' rows
        import json

        earlier = json.loads(out.read_text())
        if earlier.get("n_per_task") == args.n and earlier.get("split", "heldout") == args.split:
            rows = [r for r in earlier["rows"] if r["expert"] not in only] + result["rows"]
            result["rows"] = sorted(rows, key=lambda r: (r["kind"], r["expert"], r["task"]))
            result["all_beat_base"] = all(r["beats_base"] for r in result["rows"])
            result["seconds"] = round(result["seconds"] + earlier.get("seconds", 0), 1)
    print(table(result))
    print(f"{len(result['rows'])} expert-task pairs, {result['seconds']} s; every expert beats the base: "
          f"{result['all_beat_base']}")
    if not args.quick:
        print(f"wrote {write_json(out, result)}")
    return 0 if result["all_beat_base"] or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
