"""Does a per-prompt pick's confidence say when the pick is wrong? The page flags a readout pick as *uncertain* when
its probability is under the readout's threshold (explorer/routing/prompt_level.py). This script chooses that
threshold on training prompts and measures it on held-out inputs and held-out wordings.

Each prompt is routed with the library's recorded default router (per prompt, readout pick) without generating:
the pick reads the prompt alone. Per split it keeps, per prompt, the pick's probability and whether the pick is
the task's own expert (MBC: its cluster).

- **The threshold** is chosen on the training prompts the readout was never fitted on (per task, those after the
  first 30: the readout is fitted on the first 20, the granularity chosen on the next 10). Among the thresholds
  0.10, 0.15, ..., 0.90 it is the one with the largest Youden's J (share of wrong picks flagged minus share of
  right picks flagged); on a tie, the lower (it flags fewer).
- **Per split** the share of picks flagged, the accuracy of confident and of flagged picks, and the share of
  wrong picks flagged, at the chosen threshold and at a few others.
- **The lead** under which a pick by mean weight (and a per-token run's lean) is flagged is chosen on the same
  prompts picked by mean weight: the smallest of 0.01, 0.02, ..., 0.20 at which the picks it leaves unflagged (the
  weak-routing flag below in place) are right at least 99 % of the time (so an unflagged lean means the routing
  decided). Youden's J, the threshold's
  rule, chose 0.01 on demo-private's training picks, which caught 80 % of the wrong held-out picks against 100 %
  at 0.02 (held-out J 0.71 against 0.79).
- **Weak routing.** A pick (and a lean) is also flagged when its evidence's routing strength (`prompt_level.strength`,
  how strongly the user's text points along any prototype) is under the strength 95 % of these training prompts
  reach (their 5th percentile, rounded down to 0.01): text unlike the library's tasks, which a readout may still
  give a high probability (bench/outside_library.py). It is chosen first; the threshold is then chosen with it in
  place, so the figures are those of the flag the page shows.
- `--record` stores the threshold, the weak-routing strength and the lead in the library's readout (its meta
  `uncertain_below`, `weak_below` and `uncertain_lead`, each with its evidence), so the page and the CLI flag with
  them. `--rows FILE` re-summarises the rows of an earlier run without routing.

Usage::

    .venv/bin/python bench/pick_confidence.py --library assets/libraries/demo-private --n 20 --threads 2 --record

Writes bench/results/pick_confidence-<library>.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import bootstrap_ci, library_arguments, write_json  # noqa: E402

GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10 ... 0.90: readout probabilities
LEAD_GRID = tuple(round(0.01 * i, 2) for i in range(1, 21))  # 0.01 ... 0.20: leads of a pick by mean weight
LEAD_PRECISION = 0.99  # an unflagged lean is right this often on training prompts (see choose_lead)
SHOWN = (0.3, 0.4, 0.5, 0.6)
TRAIN_SKIP = 30  # per task: the readout's 20 fitting prompts and the 10 the granularity was chosen on


def split_rows(rm, tasks, own: dict[str, str], split: str, n: int, skip: int = 0) -> list[dict]:
    """One row per prompt (held-out splits: from each task's `skip`-th example on): task, the pick, its probability
    and the runner-up's, right or wrong; what a pick by mean weight (`prompt_level.pick` without the readout)
    would have taken, by what lead, right or wrong; and the layers' and the intercepts' shares of the pick's logit
    margin over the runner-up (`PromptPick.by_layer`, `bias`)."""
    rows = []
    for task in tasks:
        first = TRAIN_SKIP if split == "train" else skip
        for ex in task.examples(split)[first:first + n]:
            chosen, by_mean = route(rm, ex.input)
            rows.append({"task": task.name, "pick": chosen["expert"], "p": chosen["confidence"],
                         "runner_p": chosen["runner_confidence"], "right": chosen["expert"] == own[task.name],
                         "strength": chosen.get("strength"),
                         "mean_pick": by_mean.expert, "mean_lead": by_mean.margin,
                         "mean_right": by_mean.expert == own[task.name],
                         "layers_sum": sum(chosen["by_layer"] or [0.0]), "bias": chosen["bias"]})
    return rows


def route(rm, prompt: str) -> tuple:
    """The prompt routed without generating: (the default router's pick as the trace records it, the PromptPick a
    pick by mean weight over the same evidence would make)."""
    from explorer.routing.prompt_level import pick

    trace = rm.trace(prompt, max_new_tokens=0)
    return trace.meta["pick"], pick(trace.evidence, lead=rm.lead, weak=rm.weak)


def command_line(argv) -> str:
    return "python bench/pick_confidence.py " + " ".join(argv if argv is not None else sys.argv[1:])


def generic_rows(rm) -> list[dict]:
    """The input-centring calibration prompts (explorer/routing/calibration.py: generic chat requests no library task
    resembles, never used to fit a readout or choose a threshold), one row each: the pick, its probability, whether
    the page flags it, and the mean-weight lead and flag a per-token run would show."""
    from explorer.routing.calibration import CALIBRATION_PROMPTS

    rows = []
    for prompt in CALIBRATION_PROMPTS:
        chosen, by_mean = route(rm, prompt)
        rows.append({"prompt": prompt, "pick": chosen["expert"], "p": chosen["confidence"],
                     "strength": chosen.get("strength"), "flagged": chosen["uncertain"], "mean_pick": by_mean.expert,
                     "mean_lead": by_mean.margin,
                     "mean_flagged": by_mean.uncertain})
    return rows


RULES = {"readout": ("p", "right"), "mean": ("mean_lead", "mean_right")}  # the row keys each pick rule reads


def _arrays(rows: list[dict], rule: str = "readout") -> tuple[np.ndarray, np.ndarray]:
    value, right = RULES[rule]
    return np.array([r[value] for r in rows]), np.array([r[right] for r in rows], dtype=bool)


def flags(rows: list[dict], t: float, rule: str = "readout", weak: float | None = None) -> np.ndarray:
    """(n,) bool: the picks flagged at threshold (or lead) t, or under the weak-routing strength `weak`."""
    p, _ = _arrays(rows, rule)
    if weak is None:
        return p < t
    return (p < t) | np.array([r["strength"] is not None and r["strength"] < weak for r in rows], dtype=bool)


def youden(rows: list[dict], t: float, rule: str = "readout", weak: float | None = None) -> float:
    """Share of wrong picks flagged minus share of right picks flagged, at threshold t (and weak strength)."""
    _, right = _arrays(rows, rule)
    flagged = flags(rows, t, rule, weak)
    caught = flagged[~right].mean() if (~right).any() else 0.0
    return float(caught - (flagged[right].mean() if right.any() else 0.0))


def choose_threshold(train: list[dict], rule: str = "readout", weak: float | None = None) -> float:
    """The grid threshold with the largest Youden's J on the training rows (the lower on a tie)."""
    grid = GRID if rule == "readout" else LEAD_GRID
    return max(grid, key=lambda t: (round(youden(train, t, rule, weak), 9), -t))


def choose_weak(train: list[dict]) -> float | None:
    """The routing strength 95 % of the training prompts reach: their 5th percentile, rounded down to 0.01 (None
    when the rows carry no strength, e.g. an older run's)."""
    values = [r["strength"] for r in train if r.get("strength") is not None]
    return float(np.floor(np.percentile(values, 5) * 100) / 100) if values else None


def choose_lead(train: list[dict], weak: float | None = None) -> float:
    """The smallest lead at which the training picks by mean weight it leaves unflagged (the weak-routing flag in
    place) are right at least `LEAD_PRECISION` of the time; the largest Youden's J when no lead reaches it."""
    _, right = _arrays(train, "mean")
    for t in LEAD_GRID:
        kept = ~flags(train, t, "mean", weak)
        if kept.any() and right[kept].mean() >= LEAD_PRECISION:
            return t
    return choose_threshold(train, "mean", weak)


def at(rows: list[dict], t: float, rule: str = "readout", weak: float | None = None) -> dict:
    """The flag's figures at threshold t (and weak-routing strength `weak`)."""
    _, right = _arrays(rows, rule)
    flagged = flags(rows, t, rule, weak)

    def acc(mask):
        return None if not mask.any() else list(bootstrap_ci(right[mask].astype(float)))

    return {"flagged": float(flagged.mean()), "accuracy_confident": acc(~flagged), "accuracy_flagged": acc(flagged),
            "wrong_flagged": None if right.all() else float(flagged[~right].mean()),
            "youden": youden(rows, t, rule, weak)}


def fmt(x) -> str:
    return "—" if x is None else f"{x[0]:.3f} [{x[1]:.2f}, {x[2]:.2f}]"


def flag_cells(f: dict) -> str:
    """An `at` result as the tables' last four cells: flagged, right when confident, right when flagged, wrong
    picks flagged."""
    wrong = "—" if f["wrong_flagged"] is None else f"{f['wrong_flagged']:.2f}"
    return f"{f['flagged']:.2f} | {fmt(f['accuracy_confident'])} | {fmt(f['accuracy_flagged'])} | {wrong} |"


def lead_in_use(library: str, router) -> float:
    """The lead the library's readout for `router` records (prompt_level.UNCERTAIN_LEAD when none)."""
    from explorer.routing.readout import recorded_lead
    from library_store.store.library import ExpertLibrary

    return recorded_lead({}, ExpertLibrary.open(library), router)


def record(library: str, router, threshold: float, evidence: dict, lead: float | None, lead_evidence: dict,
           weak: float | None = None, weak_evidence: dict | None = None) -> None:
    """Store the threshold (and the lead and the weak-routing strength, unless None) in the library's readout for
    `router` (opened writable)."""
    from explorer.routing.readout import find_readout, readout_key
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import write_readout

    lib = ExpertLibrary.open(library, readonly=False)
    readout = find_readout({}, lib, router)  # MissingReadout (a ValueError) when none is stored
    readout.meta.update(uncertain_below=threshold, uncertain_evidence=evidence)
    if lead is not None:
        readout.meta.update(uncertain_lead=lead, uncertain_lead_evidence=lead_evidence)
    if weak is not None:
        readout.meta.update(weak_below=weak, weak_evidence=weak_evidence or {})
    write_readout(lib, readout_key(router), *readout.to_tensors())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--n", type=int, default=20, help="prompts per task and split")
    ap.add_argument("--skip", type=int, default=0,
                    help="held-out splits: start at this example of each task, past the prompts earlier runs and "
                         "probes saw (the recorded runs used the first 20); the JSON's name gets -from<skip>")
    ap.add_argument("--generic", action="store_true",
                    help="instead: route the 20 generic calibration prompts, which fit no library task, and count how "
                         "many picks the page flags (writes pick_confidence-<library>-generic.json)")
    ap.add_argument("--rows", help="an earlier run's JSON: re-summarise its rows without routing")
    ap.add_argument("--record", action="store_true", help="store the chosen threshold in the library's readout")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    from explorer.routing.config import RouterConfig

    if args.skip and args.record:  # before loading anything
        raise SystemExit("--skip measures fresh held-out prompts; record from a run without it")
    start = time.time()
    name = Path(args.library).name
    if args.generic:
        return generic(args, name, start, argv)
    if args.rows:
        old = json.loads(Path(args.rows).read_text())
        router, source, n = RouterConfig.from_dict(old["router"]), old["source"], old["n"]
        rows = {split: s["rows"] for split, s in old["splits"].items()}
        command, seconds, skip = old["command"], old["seconds"], old.get("skip", 0)
    else:
        from bench.eval_common import attach_from_args
        from library_store.tasks import resolve_tasks

        rm, source, own = attach_from_args(args)
        skip = args.skip
        router, n = rm.router, args.n
        if router.pick != "readout":
            raise SystemExit(f"{args.library}: its default router picks by {router.pick!r}, not by a readout")
        tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
        rows = {split: split_rows(rm, tasks, own, split, n, args.skip) for split in ("train", "heldout", "paraphrase")}
        rm.detach()
        command = command_line(argv)
        seconds = round(time.time() - start, 1)
    weak = choose_weak(rows["train"])
    threshold = choose_threshold(rows["train"], weak=weak)
    out = {"library": name, "router": router.to_dict(), "source": source, "n": n, "skip": skip, "threshold": threshold,
           "rule": "largest Youden's J on training prompts", "weak_below": weak,
           "weak_rule": "the 5th percentile of the training prompts' routing strength, rounded down",
           "command": command, "seconds": seconds, "splits": {}}
    for split, rs in rows.items():
        p, right = _arrays(rs)
        out["splits"][split] = {"n": len(rs), "accuracy": list(bootstrap_ci(right.astype(float))),
                                "chosen": at(rs, threshold, weak=weak),
                                "by_threshold": {str(t): at(rs, t, weak=weak) for t in SHOWN},
                                "weak_alone": None if weak is None else at(rs, 0.0, weak=weak), "rows": rs}
    lead = None
    if all("mean_lead" in r for rs in rows.values() for r in rs):  # the same prompts, picked by mean weight
        lead, in_use = choose_lead(rows["train"], weak), lead_in_use(args.library, router)
        out["mean_rule"] = {"chosen_on_training": lead, "in_use": in_use, "splits": {
            split: {"accuracy": list(bootstrap_ci(_arrays(rs, "mean")[1].astype(float))),
                    "in_use": at(rs, in_use, "mean", weak), "chosen": at(rs, lead, "mean", weak)}
            for split, rs in rows.items()}}
    write_json(Path(args.out) / f"pick_confidence-{name}{f'-from{skip}' if skip else ''}.json", out)
    if args.record:
        chosen = {s: d["chosen"] for s, d in out.get("mean_rule", {"splits": {}})["splits"].items()}
        record(args.library, router, threshold,
               {s: d["chosen"] for s, d in out["splits"].items()} | {"command": command}, lead,
               chosen | {"command": command}, weak,
               {s: d["weak_alone"] for s, d in out["splits"].items()} | {"command": command})
    print(f"{name}, router {router.to_dict()} ({source}); threshold {threshold:g} (largest Youden's J on training "
          f"prompts), weak routing under strength {weak} (their 5th percentile); routing {seconds:.0f} s")
    print("| split | prompts | picks right | flagged | right when confident | right when flagged | "
          "wrong picks flagged |\n|---|---|---|---|---|---|---|")
    for split, s in out["splits"].items():
        print(f"| {split} | {s['n']} | {fmt(s['accuracy'])} | {flag_cells(s['chosen'])}")
    if weak is not None:
        print("\nFlagged for weak routing alone:\n| split | flagged | right when confident | right when flagged | "
              "wrong picks flagged |\n|---|---|---|---|---|")
        for split, s in out["splits"].items():
            print(f"| {split} | {flag_cells(s['weak_alone'])}")
    if "mean_rule" in out:
        m = out["mean_rule"]
        print(f"\nPick by mean weight, flagged under a lead of {m['in_use']:g} (in use; {m['chosen_on_training']:g} "
              "would be chosen on these training prompts):\n| split | picks right | flagged | right when confident | "
              "right when flagged | wrong picks flagged |\n|---|---|---|---|---|---|")
        for split, d in m["splits"].items():
            print(f"| {split} | {fmt(d['accuracy'])} | {flag_cells(d['in_use'])}")
    if all("layers_sum" in r for rs in rows.values() for r in rs):
        print("\nPicks the readout's intercepts decided (the layers alone favour the runner-up):\n| split | picks | "
              "right |\n|---|---|---|")
        for split, rs in rows.items():
            prior = [r for r in rs if r["layers_sum"] < 0]
            print(f"| {split} | {len(prior)} of {len(rs)} | {sum(r['right'] for r in prior)} |")
    print("\n| split | threshold | flagged | right when confident | right when flagged | wrong picks flagged |")
    print("|---|---|---|---|---|---|")
    for split, s in out["splits"].items():
        for t, b in s["by_threshold"].items():
            print(f"| {split} | {t} | {flag_cells(b)}")


def generic(args, name: str, start: float, argv) -> None:
    """--generic: route the generic prompts with the library's default router and report the flags."""
    from bench.eval_common import attach_from_args

    rm, source, _ = attach_from_args(args)
    router, rows = rm.router, generic_rows(rm)
    rm.detach()
    command = command_line(argv)
    flagged, mean_flagged = sum(r["flagged"] for r in rows), sum(r["mean_flagged"] for r in rows)
    write_json(Path(args.out) / f"pick_confidence-{name}-generic.json",
               {"library": name, "router": router.to_dict(), "source": source, "command": command, "rows": rows,
                "flagged": flagged, "mean_flagged": mean_flagged, "seconds": round(time.time() - start, 1)})
    print(f"{name}, router {router.to_dict()} ({source}): {flagged} of {len(rows)} generic prompts' picks flagged "
          f"uncertain; by mean weight {mean_flagged} of {len(rows)}")
    print("| prompt | pick | p | strength | flagged |\n|---|---|---|---|---|")
    for r in rows:
        strength = "—" if r["strength"] is None else f"{r['strength']:.2f}"
        print(f"| {r['prompt']} | {r['pick']} | {r['p']:.2f} | {strength} | {'yes' if r['flagged'] else 'no'} |")


if __name__ == "__main__":
    main()
