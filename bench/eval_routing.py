"""Does the routing explain? Share of held-out prompts whose own expert gets the largest mean Arrow weight.

Usage::

    .venv/bin/python bench/eval_routing.py --library assets/libraries/demo-private     # goal >= 90 %
    .venv/bin/python bench/eval_routing.py --library assets/libraries/demo-mbc         # goal >= 95 % (cluster)
    .venv/bin/python bench/eval_routing.py --quick                                     # twin, tiny library, < 1 min

For every task an expert of the library was trained on, its held-out prompts are routed (Arrow, the library's
default top-k) and each prompt's weights are averaged over its tokens, layers and modules. The prompt counts as
routed right when the expert with the largest mean weight is one trained on that task: the task's own expert
in a private library, its cluster's expert in an MBC library. Two token sets are reported: every prompt token
(chat template included; the headline, as in the page's trace) and the user's own text only.

Writes `bench/results/routing-<library>.json`, `docs/figures/routing-<library>-confusion.svg` (task x expert,
mean weight) and prints a per-task table. For an MBC library it also reports the adjusted Rand index between
its clusters and the built-in task families.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_common import (FIGURES, RESULTS, Clock, SharedPrefix, _batches, _hidden, _right_pad,  # noqa: E402
                               arrow_router, bootstrap_ci, common_prefix, fmt_ci, load_base, md_table, prompt_ids,
                               routed_experts, svg_heatmap, user_positions, write_figure, write_json)

GOALS = {"private": 0.90, "cluster": 0.95}


def library_tasks(lib) -> dict[str, list[str]]:
    """task -> routed experts trained on it (each expert's `tasks`; an expert without tasks is its own task).
    In an MBC library only the cluster experts count (the warm-up experts are not routed)."""
    use, _ = routed_experts(lib)
    own: dict[str, list[str]] = {}
    for info in lib.infos():
        if info.name not in use:
            continue
        for t in info.tasks or [info.name]:
            own.setdefault(t, []).append(info.name)
    return own


@torch.no_grad()
def routing_profiles(rm, base, texts: list[str], max_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(n, E) mean routing weight of each prompt over all its tokens, layers and modules; and the same over
    the user-text tokens only. The shared template prefix is routed once (its routing cannot depend on what
    follows); the rest goes in right-padded batches, pads masked out of the means."""
    ids = prompt_ids(base, texts)
    users = [user_positions(base, t) for t in texts]
    E = len(rm.experts)
    L = min([common_prefix(ids) if len(ids) > 1 else 0] + [min(u) for u in users])  # user text is never shared
    with rm.capturing() as records:
        prefix = SharedPrefix(base.model, ids[0][:L])
    pre_sum = (sum(w.float() for _, w in records) / len(records)).sum(0) if L else torch.zeros(E)  # (E,)
    all_w, user_w = np.zeros((len(texts), E)), np.zeros((len(texts), E))
    pad = base.tokenizer.pad_token_id or 0
    for group in _batches([len(i) - L for i in ids], max_tokens):
        batch = _right_pad([ids[g][L:] for g in group], pad)  # (b, t)
        b, t = batch.shape
        with rm.capturing() as records:
            _hidden(base.model, batch, prefix)
        total = sum(w.float() for _, w in records).view(b, t, E) / len(records)  # (b, t, E), mean over sites
        for k, g in enumerate(group):
            all_w[g] = ((pre_sum + total[k, : len(ids[g]) - L].sum(0)) / len(ids[g])).numpy()
            user_w[g] = total[k, [u - L for u in users[g]]].mean(0).numpy()
    return all_w, user_w


def adjusted_rand(lib, families: dict[str, str]) -> dict:
    """ARI between the library's clusters (its cluster experts' task lists) and the task families."""
    from sklearn.metrics import adjusted_rand_score

    clusters = {t: info.name for info in lib.infos() if info.kind == "cluster" for t in info.tasks}
    tasks = sorted(t for t in clusters if t in families)
    if len(tasks) < 2:
        return {"ari": None, "why": "no cluster experts with known task families"}
    return {"ari": float(adjusted_rand_score([families[t] for t in tasks], [clusters[t] for t in tasks])),
            "clusters": {c: sorted(t for t in tasks if clusters[t] == c) for c in sorted(set(clusters.values()))},
            "families": {f: sorted(t for t in tasks if families[t] == f) for f in sorted(set(families.values()))}}


def evaluate_library(base, lib, tasks, n_per_task: int, top_k: int, label: str, figures=FIGURES) -> dict:
    """Route every task's held-out prompts through `lib`; the result dict written to JSON (see module doc)."""
    from explorer.routing.model import RoutedModel

    own = library_tasks(lib)
    use, _ = routed_experts(lib)
    rm = RoutedModel.from_library(base, lib, arrow_router(lib, top_k))
    cols = [rm.experts.index(n) for n in use]  # disabled (warm-up) experts always weigh 0: not shown
    try:
        kinds = {i.kind for i in lib.infos()}
        level = "cluster" if "cluster" in kinds else "private"
        rows, per_task, conf = [], {}, []
        hits_all, hits_user = [], []
        for task in tasks:
            texts = [e.input for e in task.heldout[:n_per_task]]
            w_all, w_user = routing_profiles(rm, base, texts)
            w_all, w_user = w_all[:, cols], w_user[:, cols]
            own_idx = [use.index(n) for n in own.get(task.name, []) if n in use]
            ok_all = np.isin(w_all.argmax(1), own_idx).astype(int)
            ok_user = np.isin(w_user.argmax(1), own_idx).astype(int)
            hits_all.append(ok_all)
            hits_user.append(ok_user)
            winners = [use[i] for i in w_all.argmax(1)]
            top = max(set(winners), key=winners.count)
            per_task[task.name] = {"n": len(texts), "family": task.family, "own_experts": own.get(task.name, []),
                                   "accuracy": float(ok_all.mean()), "accuracy_user_tokens": float(ok_user.mean()),
                                   "most_chosen": top, "most_chosen_share": winners.count(top) / len(winners),
                                   "mean_weight": dict(zip(use, map(float, w_all.mean(0))))}
            conf.append(w_all.mean(0))
            rows.append([task.name, task.family, ", ".join(own.get(task.name, [])), len(texts),
                         f"{ok_all.mean():.2f}", f"{ok_user.mean():.2f}", top])
        overall = bootstrap_ci(np.concatenate(hits_all))
        overall_user = bootstrap_ci(np.concatenate(hits_user))
        goal = GOALS[level]
        fig = write_figure(f"routing-{label}-confusion.svg",
                           svg_heatmap(np.array(conf), [t.name for t in tasks], use,
                                       f"{label}: mean Arrow weight, task (rows) x expert (cols)"), figures)
        families = {t.name: t.family for t in tasks}
        result = {
            "library": label, "level": level, "experts": use, "top_k": rm.router.top_k,
            "not_routed": list(routed_experts(lib)[1]),
            "n_per_task": n_per_task, "tasks": per_task,
            "overall": {"mean": overall[0], "ci95": overall[1:]},
            "overall_user_tokens": {"mean": overall_user[0], "ci95": overall_user[1:]},
            "goal": goal, "goal_met": overall[0] >= goal,
            "confusion": {"rows": [t.name for t in tasks], "cols": use, "mean_weight": np.array(conf).tolist()},
            "figure": str(fig.relative_to(ROOT)) if fig.is_relative_to(ROOT) else str(fig),
        }
        if level == "cluster":
            result["adjusted_rand"] = adjusted_rand(lib, families)
        result["table"] = md_table(["task", "family", "own expert(s)", "n", "acc (all tokens)", "acc (user text)",
                                    "most chosen"], rows)
        return result
    finally:
        rm.detach()


def report(result: dict) -> str:
    o, ou = result["overall"], result["overall_user_tokens"]
    lines = [result["table"], "",
             f"overall ({result['level']} level): {fmt_ci(o['mean'], *o['ci95'])} (all prompt tokens); "
             f"{fmt_ci(ou['mean'], *ou['ci95'])} (user text only)",
             f"goal >= {result['goal']:.0%}: {'MET' if result['goal_met'] else 'MISSED'}"]
    if "adjusted_rand" in result:
        ari = result["adjusted_rand"]["ari"]
        lines.append(f"adjusted Rand index, clusters vs families: {'n/a' if ari is None else f'{ari:.3f}'}")
    return "\n".join(lines)


def run(library: str, model: str, n_per_task: int, top_k: int, task_spec: str | None, out: Path,
        figures: Path = FIGURES, label: str | None = None) -> dict:
    from library_store.store.library import ExpertLibrary
    from library_store.tasks import resolve_tasks

    clock = Clock()
    with clock("load"):
        base = load_base(model)
        lib = ExpertLibrary.open(library, readonly=True)
        names = sorted(library_tasks(lib))
        tasks = resolve_tasks(task_spec or "builtin:" + ",".join(names))
    label = label or Path(library).name
    with clock("route"):
        result = evaluate_library(base, lib, tasks, n_per_task, top_k, label, figures)
    result.update(command=" ".join(["python"] + sys.argv), model=model, library_path=str(library),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), seconds=clock.times,
                  total_seconds=clock.total(), torch_threads=torch.get_num_threads())
    write_json(out / f"routing-{label}.json", result)
    print(report(result))
    print(f"time: {clock.total():.1f} s")
    return result


def quick(out: Path, figures: Path, libs: dict | None = None) -> list[dict]:
    """Twin model, two tiny libraries (private and MBC) built in a temp folder (or given), a few prompts per
    task."""
    from bench.eval_common import quick_libraries

    with tempfile.TemporaryDirectory() as tmp:
        libs = libs or quick_libraries(Path(tmp))
        return [run(str(p), "tiny-random-llama", 6, 2, None, out, figures, label=f"quick-{k}")
                for k, p in libs.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", help="library folder (not needed with --quick)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per task (default 100)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tasks", help="task spec, default: the built-in tasks the library's experts name")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--figures", default=str(FIGURES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        quick(Path(args.out), Path(args.figures))
        return
    if not args.library:
        ap.error("--library is required (or use --quick)")
    run(args.library, args.model, args.n, args.top_k, args.tasks, Path(args.out), Path(args.figures))


if __name__ == "__main__":
    main()
