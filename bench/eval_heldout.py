"""Does the library help on tasks no expert saw? base / uniform merge / Private+Arrow / MBC+Arrow (+ oracle).

Usage::

    .venv/bin/python bench/eval_heldout.py --setting A                # related unseen variants, demo libraries
    .venv/bin/python bench/eval_heldout.py --setting B --build        # BIG-bench: build 2 libraries, evaluate
    .venv/bin/python bench/eval_heldout.py --quick                    # twin + tiny libraries, < 1 min

Setting A: the built-in held-out variant tasks (`variants`, never in the demo libraries, same families), exact
match, with the demo libraries. The oracle is the single private expert *of the same family* that gets the
largest mean Arrow weight on 20 of the task's *training* prompts (no held-out score is looked at).
Setting B: a private and an MBC library built with `python -m library_store build` from BIG-bench training
tasks, evaluated on other BIG-bench tasks: multiple choice by rank classification (length-normalised
log-likelihood), generative by exact match.

`--split paraphrase`: the same inputs in wordings never trained on (built-in tasks). Each library routes with
its recorded default router (`library_store.store.reports`; chosen on training prompts by `eval_routing.py
--sweep`), else Arrow top-k 4, T 1. The uniform merge is reported raw (used for the ordering) and mean-centred.

Every score comes with a 95 % bootstrap interval (examples resampled; the mean over tasks resamples within
each task) and paired bootstrap intervals of the differences between methods, which answer "is this method
better than that one" more sharply than two overlapping intervals can. Nothing is tuned on held-out tasks.
Writes `bench/results/heldout-<setting>[-<split>].json` and `docs/figures/heldout-<setting>[-<split>].svg`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_common import (FIGURES, RESULTS, Clock, exact_match,  # noqa: E402
                               greedy_generate, library_router, load_base, prompt_ids, rank_classify, target_tokens,
                               write_json)
from bench.heldout_report import figure, observed_order, report, summarise  # noqa: E402,F401 (re-exported)

# Chosen for short inputs (cheap CPU training and scoring) before any score was seen; the evaluation tasks are
# multiple choice with one-token options (one forward per example) plus one generative task.
SETTING_B_TRAIN = "bigbench:" + ",".join([
    "anachronisms", "social_iqa", "movie_recommendation", "ruin_names", "misconceptions", "emojis_emotion_prediction",
    "hindu_knowledge", "date_understanding", "entailed_polarity", "qa_wikidata", "word_unscrambling", "emoji_movie"])
SETTING_B_EVAL = "bigbench:" + ",".join([
    "navigate", "strategyqa", "logical_fallacy_detection", "implicatures", "metaphor_boolean", "hyperbaton",
    "object_counting"])



def score_task(base, task, n: int, max_tokens: int, split: str = "heldout", rm=None) -> dict:
    """Per-example 0/1 scores of the model as it is now routed, plus a few predictions to read. `rm`: the
    RoutedModel attached to `base`, needed only when its router picks one expert per prompt (each prompt is
    then answered by its pick alone; the picks are returned too)."""
    examples = task.examples(split)[:n]
    ids = prompt_ids(base, [e.input for e in examples])
    tok = base.tokenizer

    def answer(rows):
        if task.metric == "multiple_choice":  # the index of the chosen choice
            choices = [[tok(c, add_special_tokens=False).input_ids for c in examples[i].choices] for i in rows]
            return rank_classify(base.model, tok, [ids[i] for i in rows], choices, max_tokens)
        budget = target_tokens(tok, [examples[i].target for i in rows])
        return greedy_generate(base.model, tok, [ids[i] for i in rows], budget, max_tokens)

    picks = None
    if rm is not None and rm.router.per_prompt:
        from bench.eval_sweep import per_prompt

        shown, chosen = per_prompt(rm, base, [e.input for e in examples], answer, max_tokens)
        picks = [c.expert for c in chosen]
    else:
        shown = answer(list(range(len(examples))))
    if task.metric == "multiple_choice":
        correct = [int(p == e.answer) for p, e in zip(shown, examples)]
        shown = [e.choices[p] for p, e in zip(shown, examples)]
    else:
        correct = [exact_match(p, e.target) for p, e in zip(shown, examples)]
    out = {"correct": correct, "samples": [[e.input[-80:], e.target, p] for e, p in zip(examples[:3], shown[:3])]}
    return out if picks is None else {**out, "picks": picks}


def score_all(base, tasks, n: int, max_tokens: int, clock: Clock, label: str, split: str = "heldout",
              rm=None) -> dict:
    out = {}
    for t in tasks:
        with clock(label):
            out[t.name] = score_task(base, t, n, max_tokens, split, rm)
        print(f"  {label:14s} {t.name:24s} {np.mean(out[t.name]['correct']):.3f}", flush=True)
    return out


def oracle_experts(base, rm, private_lib, tasks, n_train: int = 20) -> dict[str, dict]:
    """Per held-out task: the same-family private expert with the largest mean Arrow weight on training
    prompts of that task (its family from the built-in suite)."""
    from bench.eval_routing import route_prompts
    from library_store.tasks import resolve_tasks

    names = [i.name for i in private_lib.infos()]
    fam_of = {t.name: t.family for t in resolve_tasks("builtin:" + ",".join(
        sorted({t for i in private_lib.infos() for t in (i.tasks or [i.name])})))}
    expert_family = {i.name: fam_of.get((i.tasks or [i.name])[0]) for i in private_lib.infos()}
    out = {}
    for task in tasks:
        traces = route_prompts(rm, base, [e.input for e in task.train[:n_train]])
        mean = dict(zip(rm.experts, np.mean([tr.usage("prompt") for tr in traces], axis=0)))
        same = [n for n in names if expert_family[n] == task.family] or names
        best = max(same, key=lambda n: mean[n])
        out[task.name] = {"expert": best, "family_candidates": same, "mean_weight": float(mean[best])}
    return out


def evaluate(base, tasks, private_path: str, mbc_path: str, n: int, max_tokens: int, with_oracle: bool,
             clock: Clock, mbc_ready=None, on_method=None, private_ready=None, split: str = "heldout",
             routers: dict | None = None, router_changes: dict | None = None) -> tuple[dict, dict]:
    """{method: {task: score record}} for base, uniform (raw and centred), private_arrow, mbc_arrow (and oracle).
    `routers` (if given) is filled with the router each library was routed with and where it came from;
    `router_changes` (e.g. {"input_centre": "base"}) are applied over each library's default router.
    `mbc_ready()`, if given, is polled before the MBC library is opened (it may still be building);
    `on_method(scores, oracle)` is called after each method, so a run stopped early leaves its partial results."""
    done = on_method or (lambda *_: None)
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel
    from library_store.store.library import ExpertLibrary

    scores, oracle = {}, {}
    routers = {} if routers is None else routers

    def score(label, ts=tasks, rm=None):
        return score_all(base, ts, n, max_tokens, clock, label, split, rm)

    def attach(kind: str, path: str, ready):
        """Wait for the library's build (if `ready` is given), open it, attach it with its default router."""
        while ready is not None and not ready():
            with clock(f"waiting_for_{kind}_build"):
                time.sleep(30)
        lib = ExpertLibrary.open(path, readonly=True)
        router, source = library_router(lib)
        if router_changes:
            router = RouterConfig.from_dict({**router.to_dict(), **router_changes})
            source += f", then --router {router_changes}"
        routers[kind] = {"router": router.to_dict(), "source": source}
        return lib, router, RoutedModel.from_library(base, lib, router)  # an MBC library: cluster experts only

    scores["base"] = score("base")
    done(scores, oracle)
    private, router, rm = attach("private", private_path, private_ready)
    try:
        if with_oracle:
            with clock("oracle_choice"):
                oracle = oracle_experts(base, rm, private, tasks)
        rm.set_router(RouterConfig(mode="uniform"))
        scores["uniform"] = score("uniform")
        done(scores, oracle)
        if len(rm.experts) >= 3:  # 'mean' centring needs 3 experts (see RoutedModel.set_router)
            rm.set_router(RouterConfig(mode="uniform", centre="mean", centre_scope="weights"))
            scores["uniform_centred"] = score("uniform_centred")
            done(scores, oracle)
        rm.set_router(router)
        scores["private_arrow"] = score("private_arrow", rm=rm)
        done(scores, oracle)
        if with_oracle:
            by_task = {}
            for t in tasks:
                rm.set_router(RouterConfig(mode=f"expert:{oracle[t.name]['expert']}"))
                by_task.update(score("oracle", [t]))
            scores["oracle"] = by_task
            done(scores, oracle)
    finally:
        rm.detach()
    rm = attach("mbc", mbc_path, mbc_ready)[2]
    try:
        scores["mbc_arrow"] = score("mbc_arrow", rm=rm)
        done(scores, oracle)
    finally:
        rm.detach()
    return scores, oracle



def build_library(kind: str, spec: str, dest: Path, model: str, steps: int, extra: list[str], log: Path,
                  threads: int) -> dict:
    """`python -m library_store build <kind> ...` in a subprocess (the documented command), timed."""
    cmd = [sys.executable, "-m", "library_store", "build", kind, "--tasks", spec, "--out", str(dest),
           "--base-model", model, "--steps", str(steps), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    clock = Clock()
    log.parent.mkdir(parents=True, exist_ok=True)
    with clock("build"), open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return {"command": " ".join(["python"] + cmd[1:]), "seconds": clock.total(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_setting(setting: str, args, out: Path, figures: Path, model: str, tasks_spec: str, private: str,
                mbc: str, n: int, builds=None, tag: str = "", mbc_ready=None, private_ready=None,
                split: str = "heldout", router_changes: dict | None = None) -> dict:
    from library_store.tasks import resolve_tasks

    clock = Clock()
    with clock("load"):
        base = load_base(model)
        tasks = resolve_tasks(tasks_spec)
    name = f"heldout-{setting}{tag}" + ("" if split == "heldout" else f"-{split}")
    routers: dict = {}

    def save(scores: dict, oracle: dict, final: bool = False) -> dict:
        summary = summarise(tasks, scores, n, split)
        built = builds() if callable(builds) else builds  # re-read: a build may have finished meanwhile
        summary.update(
            setting=setting, model=model, tasks_spec=tasks_spec, private_library=private, mbc_library=mbc,
            n_cap=n, oracle=oracle, builds=built or {}, routers=dict(routers),
            command=" ".join(["python"] + sys.argv), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seconds=dict(clock.times), eval_seconds=clock.total(), torch_threads=torch.get_num_threads(),
            finished=final, scores={m: {t: s["correct"] for t, s in v.items()} for m, v in scores.items()})
        summary["total_seconds"] = clock.total() + sum(b.get("seconds", 0) for b in (built or {}).values())
        summary["figure"] = figure(summary, f"{name}.svg", f"Setting {setting}: mean over tasks, 95% CI", figures)
        write_json(out / f"{name}.json", summary)
        return summary

    scores, oracle = evaluate(base, tasks, private, mbc, n, args.max_tokens, setting == "A", clock, mbc_ready,
                              on_method=save, private_ready=private_ready, split=split, routers=routers,
                              router_changes=router_changes)
    summary = save(scores, oracle, final=True)
    print(report(summary))
    print(f"time: eval {clock.total():.0f} s, total {summary['total_seconds']:.0f} s")
    return summary


def parse_router(spec: str) -> dict:
    """"input_centre=base,top_k=2,temperature=0.1" -> {"input_centre": "base", "top_k": 2, "temperature": 0.1},
    checked against RouterConfig (an unknown field or value is refused before anything runs)."""
    from explorer.routing.config import RouterConfig

    changes: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--router takes KEY=VALUE pairs, got {part!r}")
        key, value = key.strip(), value.strip()
        try:
            changes[key] = int(value) if key == "top_k" else float(value) if key == "temperature" else value
        except ValueError:
            raise ValueError(f"--router: {key} takes a number, got {value!r}") from None
    RouterConfig.from_dict({**RouterConfig().to_dict(), **changes})
    return changes


def router_tag(args) -> str:
    return f"-{args.tag}" if args.router else ""


def mbc_complete(path: str) -> bool:
    """True once an MBC library holds an expert for every one of its clusters (a build may still be running)."""
    from library_store.store.library import ExpertLibrary

    try:
        lib = ExpertLibrary.open(path, readonly=True)
        clusters = lib.clusters()
        return bool(clusters) and all(c in lib for c in clusters)
    except Exception:  # not created yet, or mid-write
        return False


def setting_b(args, out: Path, figures: Path) -> dict | None:
    """Build (with --build; existing libraries are kept) and evaluate setting B. Build times are kept in
    `heldout-B-builds.json` so an evaluation run later reports the whole cost."""
    lib_dir = Path(args.b_dir)
    private, mbc = lib_dir / "bb-private", lib_dir / "bb-mbc"
    record = out / "heldout-B-builds.json"
    builds = json.loads(record.read_text()) if record.is_file() else {}
    if args.build:
        log = Path(args.build_log)
        for kind, dest in (("private", private), ("mbc", mbc)):
            if kind in builds and (dest / "library.sqlite").exists():
                continue
            extra = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-len", str(args.max_len)]
            if kind == "mbc":
                extra += ["--clusters", str(args.b_k), "--warmup-steps", str(args.warmup_steps),
                          "--warmup-batch-size", str(args.batch_size), "--warmup-lr", str(args.lr)]
            builds[kind] = build_library(kind, args.b_train, dest, args.model, args.steps, extra, log, args.threads)
            write_json(record, builds)
    if args.build_only:
        return None

    def recorded() -> dict:
        return json.loads(record.read_text()) if record.is_file() else {}

    ready = (lambda: "mbc" in recorded()) if args.wait_mbc else None
    private_ready = (lambda: "private" in recorded()) if args.wait_mbc else None
    return run_setting("B", args, out, figures, args.model, args.b_eval, str(private), str(mbc), args.n_b,
                       builds=recorded, mbc_ready=ready, private_ready=private_ready, split=args.split,
                       tag=router_tag(args), router_changes=parse_router(args.router))


def quick(out: Path, figures: Path, args, libs: dict | None = None) -> list[dict]:
    """Twin model, tiny libraries in a temp folder (or given); setting A on two variants, setting B on
    multiple-choice versions of two variant classification tasks (rank classification), a few examples each."""
    from bench.eval_common import quick_libraries, quick_mc_spec

    with tempfile.TemporaryDirectory() as tmp:
        libs = libs or quick_libraries(Path(tmp))
        a = run_setting("A", args, out, figures, "tiny-random-llama", "variants:add_three,last_letter",
                        str(libs["private"]), str(libs["mbc"]), 6, tag="-quick",
                        split=getattr(args, "split", "heldout"),
                        router_changes=parse_router(getattr(args, "router", "")))
        b = run_setting("B", args, out, figures, "tiny-random-llama", quick_mc_spec(Path(tmp)),
                        str(libs["private"]), str(libs["mbc"]), 6, tag="-quick")
        return [a, b]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["A", "B", "both"], default="A")
    ap.add_argument("--split", choices=["heldout", "paraphrase", "train"], default="heldout",
                    help="which examples to score (paraphrase: held-out wordings; built-in tasks only)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--private", default=str(ROOT / "assets/libraries/demo-private"), help="setting A library")
    ap.add_argument("--mbc", default=str(ROOT / "assets/libraries/demo-mbc"), help="setting A library")
    ap.add_argument("--n", type=int, default=100, help="setting A: held-out examples per task (cap)")
    ap.add_argument("--n-b", type=int, default=200, help="setting B: held-out examples per task (cap)")
    ap.add_argument("--b-train", default=SETTING_B_TRAIN, help="setting B: the library's training tasks")
    ap.add_argument("--b-eval", default=SETTING_B_EVAL, help="setting B: unseen evaluation tasks")
    ap.add_argument("--b-dir", default=str(ROOT / "build" / "eval-libraries"), help="setting B libraries")
    ap.add_argument("--b-k", type=int, default=4, help="setting B: MBC clusters")
    ap.add_argument("--build", action="store_true", help="setting B: build the libraries first (skips existing)")
    ap.add_argument("--build-only", action="store_true", help="setting B: build, do not evaluate")
    ap.add_argument("--wait-mbc", action="store_true",
                    help="start with what is built (base first) while other processes build the libraries")
    ap.add_argument("--steps", type=int, default=24, help="setting B: training steps per private / cluster expert")
    ap.add_argument("--warmup-steps", type=int, default=6, help="setting B: MBC warm-up steps per task")
    ap.add_argument("--batch-size", type=int, default=4, help="setting B: training batch size")
    ap.add_argument("--lr", type=float, default=2e-3, help="setting B: learning rate (short CPU runs)")
    ap.add_argument("--max-len", type=int, default=80, help="setting B: training tokens per example")
    ap.add_argument("--build-log", default=str(ROOT / "build" / "eval-libraries" / "build.log"))
    ap.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per forward batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--figures", default=str(FIGURES))
    ap.add_argument("--router", default="",
                    help="changes over each library's default router, e.g. input_centre=base,top_k=2 (results are "
                         "written as heldout-<setting>-<tag>.json)")
    ap.add_argument("--tag", default="router", help="with --router: the results' name tag")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    try:
        parse_router(args.router)
    except ValueError as exc:
        ap.error(str(exc))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out, figures = Path(args.out), Path(args.figures)
    if args.quick:
        quick(out, figures, args)
        return
    if args.setting in ("A", "both"):
        ready = (lambda: mbc_complete(args.mbc)) if args.wait_mbc else None
        run_setting("A", args, out, figures, args.model, "variants", args.private, args.mbc, args.n, mbc_ready=ready,
                    split=args.split, tag=router_tag(args), router_changes=parse_router(args.router))
    if args.setting in ("B", "both"):
        setting_b(args, out, figures)


if __name__ == "__main__":
    main()
