"""Does the routing explain? Routing diagnostics of a library, its default router chosen by evidence, and S5.

Usage::

    .venv/bin/python bench/eval_routing.py --library assets/libraries/demo-private --sweep --record
    .venv/bin/python bench/eval_routing.py --library assets/libraries/demo-mbc --split paraphrase --record
    .venv/bin/python bench/eval_routing.py --library L --top-k 2 --temperature 0.3 --centre mean   # another router
    .venv/bin/python bench/eval_routing.py --quick                     # twin, two tiny libraries, < 1 min

For every task the library's experts were trained on, prompts of one split (`--split heldout|paraphrase|train`;
`paraphrase`: unseen inputs in wordings never trained on) are answered greedily and routed. A prompt counts as
routed right over some tokens when the expert with the largest mean weight there (over layers and modules) is
one trained on its task: the task's own expert, or its cluster's expert in an MBC library. Every number is
read through `RoutingTrace` (`winner`, `positions`, `usage`, `entropy`, `module_weights`), as the page does:

- accuracy over the user's own text (the headline), the generated tokens, both, the prompt and all tokens; for a
  per-prompt router also "pick": the share of prompts answered by their own expert (with `pick="mean"` the same
  choice as the headline; with a readout, the readout's);
- per layer and per module (own text): which layers know the task;
- routing entropy and top-1 margin (top-1 minus top-2 weight) per (layer, own-text token), as quantiles;
- every centring option side by side (same top-k and temperature; `set_router` switches without re-attaching);
- S5: held-in Arrow exact match / the own expert's exact match, per task and overall (`bench/eval_sweep.py`).

`--sweep` first scores top-k x temperature x centring on *training* prompts only and its winner becomes the
headline router (and, with `--record`, the library's default router with the sweep as evidence); without it the
headline router is the library's recorded default (else Arrow top-k 4, T 1, no centring), or the one given by
`--top-k/--temperature/--centre/--centre-scope/--granularity`. `--sweep-granularity` keeps the recorded default's
centring, top-k and T and chooses only per token vs per prompt (exact match on training prompts), much cheaper
than `--sweep`. Held-out prompts never choose anything. A per-prompt router's prompts are answered by their pick
alone; their routing (accuracy, entropy, margin) is read from the per-token evidence over prompt and answer.

Writes `bench/results/routing-<library>-<split>.json`, `docs/figures/routing-<library>-<split>-{confusion,layers}
.svg`, regenerates `docs/routing.md` from every such result (`bench/eval_docs.py`; with another `--out`, all three
go there), and with `--record` stores the RoutingReport in the library (opened writable only then).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_common import (FIGURES, RESULTS, Clock, _batches, _hidden, _right_pad, bootstrap_ci,  # noqa: E402
                               fmt_ci, load_base, prompt_ids, repo_relative, routed_experts, write_json)
from library_store.training.prefix import SharedPrefix, common_prefix_length  # noqa: E402

GOALS = {"private": 0.95, "cluster": 0.98}  # own-text accuracy, issue 13
PARAPHRASE_GOALS = {"private": 0.85, "cluster": 0.95}  # own text on held-out wordings, issue 15
GOAL_USER_GENERATED, GOAL_S5 = 0.90, 0.90
WHICH = ("user", "generated", "user+generated", "prompt", "all")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DOCS = ROOT / "docs" / "routing.md"


def library_tasks(lib) -> dict[str, list[str]]:
    """task -> routed experts trained on it (each expert's `tasks`; an expert without tasks is its own task).
    In an MBC library only the cluster experts count (the warm-up experts are not routed)."""
    use, _ = routed_experts(lib)
    own: dict[str, list[str]] = {}
    for info in lib.infos():
        if info.name in use:
            for t in info.tasks or [info.name]:
                own.setdefault(t, []).append(info.name)
    return own


def _concat(a, b):
    """Two TopKRoutes of the same router, `b`'s tokens after `a`'s."""
    from dataclasses import fields

    from explorer.routing.topk import TopKRoutes

    parts = {}
    for f in fields(TopKRoutes):
        x, y = getattr(a, f.name), getattr(b, f.name)
        parts[f.name] = np.concatenate([x, y], axis=2) if isinstance(x, np.ndarray) and y is not None else x
    return TopKRoutes(**parts)


@torch.no_grad()
def route_prompts(rm, base, texts: list[str], max_tokens: int = 4096, generated: list[list[int]] | None = None) -> list:
    """One `RoutingTrace` per prompt, routed in batches: the shared template prefix once (its routing cannot
    depend on what follows), the rest in right-padded batches whose pads are dropped. `generated[i]` (token
    ids, e.g. from `greedy_generate_ids`) are fed after prompt i and marked generated: a causal model routes
    them exactly as it did while generating them."""
    from explorer.routing.capture import assemble
    from explorer.routing.trace import RoutingTrace, user_token_span

    ids = prompt_ids(base, texts)
    gen = generated or [[] for _ in texts]
    seqs = [p + g for p, g in zip(ids, gen)]
    L = common_prefix_length(ids) if len(ids) > 1 else 0
    E = len(rm.experts)
    with rm.capturing() as records:
        prefix = SharedPrefix(base.model.get_decoder(), ids[0][:L])
    pre = assemble(records, rm.layers, rm.modules, E, L) if L else None  # (layers, modules, L, k)
    traces = [None] * len(texts)
    pad = base.tokenizer.pad_token_id or 0
    for group in _batches([len(s) - L for s in seqs], max_tokens):
        batch = _right_pad([seqs[g][L:] for g in group], pad)  # (b, t)
        b, t = batch.shape
        with rm.capturing() as records:
            _hidden(base.model, batch, prefix)
        routes = assemble(records, rm.layers, rm.modules, E, b * t)  # tokens flattened row by row
        for k, g in enumerate(group):
            own = routes.take(np.arange(k * t, k * t + len(seqs[g]) - L))
            n = len(ids[g])
            formatted = base.format_prompt(texts[g])
            traces[g] = RoutingTrace(
                tokens=rm.display_tokens(seqs[g]), token_ids=seqs[g], is_generated=[False] * n + [True] * len(gen[g]),
                layers=rm.layers, modules=rm.modules, experts=list(rm.experts), router=rm.router,
                routes=_concat(pre, own) if pre is not None else own, prompt=texts[g], formatted_prompt=formatted,
                text=base.tokenizer.decode(gen[g], skip_special_tokens=True), library=dict(rm.library),
                user_span=user_token_span(base.tokenizer, formatted, texts[g], n))
    return traces


def quantiles(x) -> dict:
    x = np.asarray(x, dtype=float).ravel()
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "mean": float(x.mean()),
            **{f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))}}


def diagnose(traces_by_task: dict[str, list], own: dict[str, list[str]]) -> dict:
    """Accuracies (which tokens; per layer; per module), confusion, entropy and margin of routed traces."""
    first = next(t for ts in traces_by_task.values() for t in ts)
    layers, modules, experts = first.layers, first.modules, first.experts
    with_gen = any(any(t.is_generated) for ts in traces_by_task.values() for t in ts)
    which = [w for w in WHICH if with_gen or w not in ("generated", "user+generated")]
    hits = {w: [] for w in which}
    per_layer, per_module = [], {m: [] for m in modules}
    per_task, confusion, entropy, margin = {}, [], [], []
    for task, traces in traces_by_task.items():
        mine = own.get(task, [])
        task_hits = {w: [tr.winner(w) in mine for tr in traces] for w in which}
        for w in which:
            hits[w] += task_hits[w]
        per_layer += [[np.nan if tr.winner("user", layers=[x]) is None else tr.winner("user", layers=[x]) in mine
                       for x in layers] for tr in traces]  # NaN: a layer the router does not route at
        for m in modules:
            per_module[m] += [tr.winner("user", module=m) in mine for tr in traces]
        winners = [tr.winner("user") for tr in traces]
        top = max(set(winners), key=winners.count)
        per_task[task] = {"n": len(traces), "own_experts": mine, "most_chosen": top, "example": traces[0].prompt,
                          **{w: float(np.mean(task_hits[w])) for w in which}}
        confusion.append(np.mean([tr.usage("user") for tr in traces], axis=0).tolist())  # (E,)
        for tr in traces:
            pos = tr.positions("user")
            w = np.sort(tr.module_weights()[:, pos], axis=-1)  # (L, P, E) ascending
            routed = tr.routed()[:, pos].any(axis=1)  # (L,) only the layers the router routes at
            entropy.append(tr.entropy()[routed][:, pos].ravel())  # (L' * P,)
            margin.append((w[routed][..., -1] - (w[routed][..., -2] if w.shape[-1] > 1 else 0)).ravel())
    overall = {}
    for w in which:
        mean, lo, hi = bootstrap_ci(np.array(hits[w], dtype=float))
        overall[w] = {"mean": mean, "ci95": [lo, hi]}
    picked = {t: [tr.meta["pick"]["expert"] in own.get(t, []) for tr in ts] for t, ts in traces_by_task.items()
              if all("pick" in tr.meta for tr in ts)}  # a per-prompt router: the expert that answered
    if picked and len(picked) == len(traces_by_task):
        mean, lo, hi = bootstrap_ci(np.array([h for hs in picked.values() for h in hs], dtype=float))
        overall["pick"] = {"mean": mean, "ci95": [lo, hi]}
        for t, hs in picked.items():
            per_task[t]["pick"] = float(np.mean(hs))
    with warnings.catch_warnings():  # a layer never routed has no accuracy (None), not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        layer_acc = np.nanmean(np.array(per_layer, float), axis=0)  # (L,)
    return {"accuracy": overall, "per_task": per_task, "experts": list(experts), "tasks": list(traces_by_task),
            "per_layer": {"layers": list(layers), "accuracy": [None if np.isnan(a) else float(a) for a in layer_acc]},
            "per_module": {m: float(np.mean(v)) for m, v in per_module.items()}, "confusion": confusion,
            "entropy": quantiles(np.concatenate(entropy)), "margin": quantiles(np.concatenate(margin))}


def adjusted_rand(lib, families: dict[str, str]) -> dict:
    """ARI between the library's clusters and the task families."""
    from sklearn.metrics import adjusted_rand_score

    cluster_of = lib.cluster_of()
    tasks = sorted(t for t in cluster_of if t in families)
    if len(tasks) < 2:
        return {"ari": None, "why": "no clusters over tasks with known families"}
    return {"ari": float(adjusted_rand_score([families[t] for t in tasks], [cluster_of[t] for t in tasks])),
            "clusters": {c: sorted(t for t in tasks if cluster_of[t] == c) for c in sorted(set(cluster_of.values()))},
            "families": {f: sorted(t for t in tasks if families[t] == f) for f in sorted(set(families.values()))}}


def evaluate_library(base, lib, tasks, split: str, n: int, router, args) -> dict:
    """Sweep (optional), headline diagnostics with generation, centring rows and S5 for one library."""
    from bench import eval_sweep as S
    from explorer.routing.model import RoutedModel

    own = library_tasks(lib)
    level = "cluster" if any(i.kind == "cluster" for i in lib.infos()) else "private"
    # a sweep fits the pick readout itself: attach without one (a router recorded before its readout was fitted)
    rm = RoutedModel.from_library(base, lib, replace(router, pick="mean") if args.sweep or args.sweep_granularity
                                  else router)
    clock = Clock()
    try:
        options = S.centring_options(lib)
        sweep = None
        if args.sweep:
            with clock("sweep"):
                sweep = S.sweep(rm, base, tasks, own, args.sweep_n, args.sweep_em, args.sweep_k, args.sweep_t,
                                options, args.max_tokens, args.readout_n)
            router = S.router_of(sweep["winner"])
            rm.set_router(router)
        elif args.sweep_granularity:
            from library_store.store.reports import read_default_router

            recorded = read_default_router(lib)
            if recorded is None:
                raise SystemExit("--sweep-granularity keeps a recorded default router's setting: this library has "
                                 "none; run with --sweep first.")
            with clock("sweep"):
                sweep = S.regranulate(rm, base, tasks, own, recorded, args.sweep_em, args.readout_n, args.max_tokens,
                                      args.sweep_layers, args.rechoose)
            router = S.router_of(sweep["winner"])
            rm.set_router(router)
        with clock("headline"):
            traces, em = {}, {}
            for task in tasks:
                examples = task.examples(split)[:n]
                traces[task.name], em[task.name] = S.answer_and_route(rm, base, examples, args.max_tokens)
            d = diagnose(traces, own)
        with clock("s5"):
            s5 = S.s5(rm, base, tasks, own, split, n, em, args.max_tokens)
        rm.set_router(router)
        with clock("centring"):
            prompts = {t.name: [e.input for e in t.examples(split)[:n]] for t in tasks}
            rows = S.centring_rows(rm, base, prompts, own, router, options, done=d)
    finally:
        rm.detach()
    goal = (PARAPHRASE_GOALS if split == "paraphrase" else GOALS)[level]
    acc = d["accuracy"]
    result = {**d, "level": level, "split": split, "n_per_task": n, "router": router.to_dict(),
              "not_routed": list(routed_experts(lib)[1]), "centring": rows, "s5": s5, "sweep": sweep,
              "families": {t.name: t.family for t in tasks}, "seconds": clock.times,
              "goals": {"user": goal, "user+generated": GOAL_USER_GENERATED, "s5": GOAL_S5},
              "goals_met": {"user": acc["user"]["mean"] >= goal,
                            "user+generated": acc.get("user+generated", {}).get("mean", 0) >= GOAL_USER_GENERATED,
                            "s5": s5["overall"] is not None and s5["overall"] >= GOAL_S5}}
    if level == "cluster":
        result["adjusted_rand"] = adjusted_rand(lib, result["families"])
    return result


def report(r: dict) -> str:
    """Plain-text summary printed by the script (docs/routing.md has the full tables, eval_docs.py)."""
    from bench.eval_docs import task_table

    a = r["accuracy"]
    lines = [task_table(r), "", f"router: {r['router']} ({r.get('router_source', '')}); split {r['split']}"]
    lines += [f"accuracy ({w}): {fmt_ci(a[w]['mean'], *a[w]['ci95'])}" for w in a]
    lines.append(f"S5 overall: {r['s5']['overall']}")
    for k, met in r["goals_met"].items():
        lines.append(f"goal {k} >= {r['goals'][k]:.0%}: {'MET' if met else 'MISSED'}")
    if "adjusted_rand" in r:
        ari = r["adjusted_rand"]["ari"]
        lines.append(f"adjusted Rand index, clusters vs families: {'n/a' if ari is None else f'{ari:.3f}'}")
    return "\n".join(lines)


def headline_router(lib, args):
    """(RouterConfig, source): explicit flags, else the recorded default, else the fallback."""
    from bench.eval_common import library_router

    router, source = library_router(lib)
    names = ("top_k", "temperature", "centre", "centre_scope", "input_centre", "granularity")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return (replace(router, mode="arrow", **given), "command line") if given else (router, source)


def run(library: str, args, label: str | None = None) -> dict:
    from bench.eval_record import record
    from bench.eval_docs import write_routing_doc
    from bench.eval_figures import layers_figure, svg_heatmap, write_figure
    from library_store.store.library import ExpertLibrary
    from library_store.tasks import resolve_tasks

    clock = Clock()
    with clock("load"):
        base = load_base(args.model)
        lib = ExpertLibrary.open(library, readonly=True, base=base)  # routing caches go to the user cache
        writer = ExpertLibrary.open(library, readonly=False) if args.record else None  # only the report is written
        if writer is not None and writer.readonly:
            raise SystemExit(f"--record: the library at {library} is not writable.")
        tasks = resolve_tasks(args.tasks or "builtin:" + ",".join(sorted(library_tasks(lib))))
    label = label or Path(library).name
    router, source = headline_router(lib, args)
    content = lib.content_key()
    result = evaluate_library(base, lib, tasks, args.split, args.n, router, args)
    readout = result["sweep"].pop("readout", None) if result["sweep"] else None  # recorded beside the router
    if result["sweep"] is not None:
        source = "sweep winner (training prompts)" + (", granularity re-chosen" if args.sweep_granularity else "")
    name, figures = f"routing-{label}-{args.split}", Path(args.figures)
    conf = write_figure(f"{name}-confusion.svg", svg_heatmap(
        np.array(result["confusion"]), result["tasks"], result["experts"],
        f"{label} ({args.split}): mean weight over the user's text, task x expert"), figures)
    layers = layers_figure(result, label, args.split, figures)  # bench/eval_figures.py
    result.update(library=label, library_path=str(library), content_key=content, model=args.model,
                  router_source=source, command=" ".join(["python"] + sys.argv),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), total_seconds=clock.total(),
                  torch_threads=torch.get_num_threads(),
                  figures={"confusion": repo_relative(conf), "layers": repo_relative(layers)})
    write_json(Path(args.out) / f"{name}.json", result)
    if args.docs:
        write_routing_doc(Path(args.out), Path(args.docs), quick=label.startswith("quick-"))
    if writer is not None:
        record(writer, result, readout)  # bench/eval_record.py
    print(report(result))
    print(f"time: {clock.total():.1f} s")
    return result


QUICK = ["--model", "tiny-random-llama", "--n", "4", "--sweep", "--sweep-n", "3", "--sweep-em", "2",
         "--sweep-t", "0.3,1.0"]


def quick(out: Path, figures: Path, libs: dict | None = None, record: bool = True) -> list[dict]:
    """Twin model, two tiny libraries (private and MBC, built in a temp folder or given), a few prompts per task:
    the whole path, sweep and --record included, docs written next to the results."""
    from bench.eval_common import quick_libraries

    with tempfile.TemporaryDirectory() as tmp:
        libs = libs or quick_libraries(Path(tmp))
        flags = QUICK + ["--out", str(out), "--figures", str(figures), "--docs", str(Path(out) / "routing-quick.md")]
        return [run(str(p), parse(flags + ["--record"] * record)[1], label=f"quick-{k}") for k, p in libs.items()]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", help="library folder (not needed with --quick)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--split", choices=["heldout", "paraphrase", "train"], default="heldout")
    ap.add_argument("--n", type=int, default=100, help="prompts per task of the split (default 100)")
    ap.add_argument("--top-k", type=int, help="headline router: Arrow with this top-k (default: the library's)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--centre", help="none | mean | general:<expert>")
    ap.add_argument("--centre-scope", choices=["prototypes", "weights"])
    ap.add_argument("--input-centre", choices=["none", "base"],
                    help="subtract the base model's mean layer input before scoring (docs/design.md)")
    ap.add_argument("--granularity", choices=["token", "prompt"],
                    help="route per token (Arrow) or pick one expert per prompt (docs/design.md)")
    ap.add_argument("--sweep", action="store_true", help="choose the headline router on training prompts")
    ap.add_argument("--sweep-granularity", action="store_true",
                    help="keep the recorded default's centring, top-k and T; choose only per token, per prompt "
                         "by mean weight or per prompt by a readout fitted on --readout-n training prompts per "
                         "task, by exact match on the next --sweep-em (and --record it with the readout)")
    ap.add_argument("--sweep-layers", type=int, default=0, metavar="N", help="with --sweep-granularity: first "
                    "choose the routed layers on N training prompts per task (eval_sweep.choose_layers; 0: all)")
    ap.add_argument("--rechoose", action="store_true", help="with --sweep-granularity: centring, top-k, T by the "
                    "winner rule applied again to the recorded sweep's rows (no re-run; e.g. the rule changed)")
    ap.add_argument("--readout-n", type=int, default=20, help="training prompts per task the pick readout is fitted on")
    ap.add_argument("--sweep-n", type=int, default=30, help="training prompts per task routed per sweep setting")
    ap.add_argument("--sweep-em", type=int, default=10, help="training prompts per task answered (0: no EM)")
    ap.add_argument("--sweep-k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--sweep-t", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.3, 1.0])
    ap.add_argument("--record", action="store_true", help="store the report (and a swept default) in the library")
    ap.add_argument("--tasks", help="task spec, default: the built-in tasks the library's experts name")
    ap.add_argument("--out", default=str(RESULTS), help="results (elsewhere: the figures and markdown go there too)")
    ap.add_argument("--figures")
    ap.add_argument("--docs", help="markdown regenerated from the results ('' to skip)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per forward batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    home = Path(args.out).resolve() == RESULTS.resolve()  # elsewhere (a probe) never rewrites docs/
    args.figures = args.figures or str(FIGURES if home else Path(args.out) / "figures")
    args.docs = str(DOCS if home else Path(args.out) / "routing.md") if args.docs is None else args.docs
    return ap, args


def main(argv=None) -> None:
    ap, args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        quick(Path(args.out), Path(args.figures))
        return
    if not args.library:
        ap.error("--library is required (or use --quick)")
    run(args.library, args)


if __name__ == "__main__":
    main()
