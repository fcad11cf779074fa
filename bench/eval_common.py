"""Shared helpers of the evaluation scripts: batched scoring, bootstrap intervals, tables and SVG figures.

Usage::

    from bench.eval_common import rank_classify, greedy_generate, exact_match, bootstrap_ci
    preds = rank_classify(model, tok, prompt_ids, choice_ids)        # index of the best choice per example
    texts = greedy_generate(model, tok, prompt_ids, max_new_tokens=8)
    new_ids = greedy_generate_ids(model, tok, prompt_ids, 8)          # the same, as token ids (eos kept)
    router, source = library_router(lib)                             # the library's default router, or Arrow
    mean, lo, hi = bootstrap_ci(np.array([1, 0, 1, 1]))

`model` is the (possibly Arrow-routed) Hugging Face causal LM, e.g. `RoutedModel.base.model`: routing is per
token, so it works unchanged on padded batches. Padding is safe here because
- scoring pads on the right: a causal model never lets a real token see a later pad, and each pad's own
  routing touches nothing but the pad;
- generation pads on the left with an attention mask (HF derives the positions from it).
`tests/unit/test_eval_quick.py` checks both against one-example-at-a-time runs.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.eval_figures import (FIGURES, repo_relative, svg_heatmap, svg_intervals,  # noqa: F401 (re-exported)
                                write_figure)
from library_store.training.prefix import SharedPrefix, cache_kwarg, common_prefix_length, output_cache

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------- prompts

_BASES: dict = {}


def load_base(name: str):
    """`load_base_model(name)`, loaded once per process: the evaluation attaches and detaches libraries on one
    model (RoutedModel.detach and train_expert both restore it), so the quick runs and a test share it."""
    if name not in _BASES:
        from library_store.models import load_base_model

        _BASES[name] = load_base_model(name)
    return _BASES[name]


def prompt_ids(base, texts: list[str], chat: bool = True) -> list[list[int]]:
    """Token ids of each text inside the model's chat template (as the experts were trained)."""
    tok = base.tokenizer
    return [tok(base.format_prompt(t, chat), add_special_tokens=False).input_ids for t in texts]


def _batches(lengths: list[int], max_tokens: int, max_rows: int = 64):
    """Index groups, sorted by length, whose padded size stays under max_tokens (less padding, bounded memory)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in group] + [lengths[i]])
        if group and (longest * (len(group) + 1) > max_tokens or len(group) >= max_rows):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _right_pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (b, width)


def routed_experts(lib) -> tuple[list[str], tuple[str, ...]]:
    """(experts that route, experts stored but not routed). `RoutedModel.from_library` attaches only the
    library's routable experts (an MBC library's warm-up experts are left out), so nothing needs disabling."""
    use = lib.routable_names()
    return use, tuple(n for n in lib.names() if n not in use)


def arrow_router(lib, top_k: int = 4):
    """The fallback router when a library has recorded none: Arrow, top-k 4 (at most the routed experts), T 1,
    no centring."""
    from explorer.routing.config import RouterConfig

    use, _ = routed_experts(lib)
    return RouterConfig(mode="arrow", top_k=min(top_k, len(use)))


def library_router(lib, fallback_top_k: int = 4):
    """(RouterConfig, source): the library's recorded default router (`library_store.store.reports`, chosen by
    `bench/eval_routing.py --sweep --record` on training prompts), source "recorded default"; else the
    fallback `arrow_router`, source "fallback (no recorded default)"."""
    from explorer.routing.config import RouterConfig
    from library_store.store.reports import default_router

    recorded = default_router(lib)
    if recorded is not None:
        return RouterConfig.from_dict(recorded), "recorded default"
    return arrow_router(lib, fallback_top_k), "fallback (no recorded default)"


def library_arguments(ap, library: str) -> None:
    """--library, --model and --threads of the scripts that look at one library's start-up router."""
    ap.add_argument("--library", default=library)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def attach_from_args(args):
    """`args.library` read-only, attached to `args.model` with its default router, offline, at `args.threads`
    torch threads (if set): (RoutedModel, source of the router, {task: the routed expert trained on it})."""
    from explorer.routing.model import RoutedModel
    from library_store.store.library import ExpertLibrary

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.model)
    lib = ExpertLibrary.open(args.library, readonly=True, base=base)
    router, source = library_router(lib)
    rm = RoutedModel.from_library(base, lib, router)
    own = {t: i.name for i in lib.infos() if i.name in rm.experts for t in i.tasks}
    return rm, source, own


# ---------------------------------------------------------------- scoring


def _hidden(model, ids: torch.Tensor, prefix: SharedPrefix | None = None) -> torch.Tensor:
    """(b, t, d) final hidden states of right-padded `ids` (after the shared prefix, if any); callers apply the
    LM head to the few positions they need, so (b, t, vocab) logits of a 49k vocabulary are never formed."""
    cached = prefix.kwargs(ids.shape[0]) if prefix is not None else {}
    return model.get_decoder()(input_ids=ids, use_cache=bool(cached), **cached).last_hidden_state


@torch.no_grad()
def choice_loglik(model, tokenizer, prompts: list[list[int]], choices: list[list[list[int]]],
                  max_tokens: int = 4096, share_prefix: bool = True) -> list[list[float]]:
    """Length-normalised log-likelihood (mean log-prob per choice token) of every choice after its prompt.

    prompts[i] are the prompt ids of example i, choices[i][j] the ids of its j-th choice. When all choices of
    an example are one token long, the prompt alone is run once and the choices read off its last position.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = model.get_output_embeddings()
    out: list[list[float]] = [[math.nan] * len(c) for c in choices]
    rows, owners = [], []  # one row per forward sequence: (example, choice or -1 for "all single-token")
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        if any(len(c) == 0 for c in cs):
            raise ValueError(f"example {i}: a choice tokenises to nothing")
        if all(len(c) == 1 for c in cs):
            rows.append(p)
            owners.append((i, -1))
        else:
            for j, c in enumerate(cs):
                rows.append(p + c)
                owners.append((i, j))
    L = common_prefix_length(rows) if share_prefix and len(rows) > 1 else 0
    prefix = SharedPrefix(model.get_decoder(), rows[0][:L])
    for group in _batches([len(r) - L for r in rows], max_tokens):
        h = _hidden(model, _right_pad([rows[g][L:] for g in group], pad), prefix)  # (b, t - L, d)
        for b, g in enumerate(group):
            i, j = owners[g]
            n_p = len(prompts[i]) - L
            if j < 0:
                logp = torch.log_softmax(head(h[b, n_p - 1]).float(), -1)  # (vocab,)
                out[i] = [float(logp[c[0]]) for c in choices[i]]
            else:
                c = choices[i][j]
                pos = torch.arange(n_p - 1, n_p - 1 + len(c))  # positions predicting the choice tokens
                logp = torch.log_softmax(head(h[b, pos]).float(), -1)  # (len(c), vocab)
                out[i][j] = float(logp[torch.arange(len(c)), torch.tensor(c)].mean())
    return out


def rank_classify(model, tokenizer, prompts, choices, max_tokens: int = 4096, share_prefix: bool = True) -> list[int]:
    """Rank classification: the index of the choice with the highest length-normalised log-likelihood."""
    scores = choice_loglik(model, tokenizer, prompts, choices, max_tokens, share_prefix)
    return [int(np.argmax(s)) for s in scores]


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, max_tokens: int = 4096,
                    share_prefix: bool = True) -> list[str]:
    """Greedy continuations of many prompts; the new text of each (see `greedy_generate_ids`)."""
    return [decode_new(tokenizer, ids) for ids in
            greedy_generate_ids(model, tokenizer, prompts, max_new_tokens, max_tokens, share_prefix)]


def decode_new(tokenizer, ids: list[int]) -> str:
    """The text of generated ids, up to the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    return tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


@torch.no_grad()
def greedy_generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, max_tokens: int = 4096,
                        share_prefix: bool = True) -> list[list[int]]:
    """Greedy continuations of many prompts: the new token ids of each, up to and including the
    end-of-sequence token when one was produced (what `RoutedModel.trace` routes as generated tokens).

    Batched with left padding placed *after* the shared prefix ([prefix][pads][own tokens]), an attention
    mask hiding the pads and explicit positions, so every row sees exactly what it would see alone. Stops
    when every row has produced the end-of-sequence token.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    out: list[list[int]] = [[] for _ in prompts]
    L = common_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
    prefix = SharedPrefix(decoder, prompts[0][:L])
    for group in _batches([len(p) - L + max_new_tokens for p in prompts], max_tokens):
        rows = [prompts[g][L:] for g in group]
        b, width = len(rows), max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (b, width)
        own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (b, width)
        mask = torch.cat([torch.ones(b, L, dtype=torch.long), own], 1)  # (b, L + width)
        pos = (L + own.cumsum(1) - 1).clamp(min=L)  # (b, width) positions of the own tokens
        cache = prefix.cache(b)
        new = torch.full((b, max_new_tokens), pad)
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(max_new_tokens):
            res = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          **({cache_kwarg(decoder): cache} if cache is not None else {}))
            cache = output_cache(res)
            nxt = head(res.last_hidden_state[:, -1]).argmax(-1)  # (b,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new[:, step] = nxt
            done |= nxt == eos
            if bool(done.all()):
                break
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
        for k, g in enumerate(group):
            toks = new[k].tolist()  # a row that stopped early is padded after its eos
            out[g] = toks[: toks.index(eos) + 1] if eos in toks else toks
    return out


def normalize_answer(text: str) -> str:
    """First line of the answer, outer whitespace and a trailing full stop removed (case is kept: some tasks
    are about case)."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


def exact_match(pred: str, target: str) -> int:
    return int(normalize_answer(pred) == normalize_answer(target))


def target_tokens(tokenizer, targets: list[str]) -> int:
    """A small generation budget: the longest target's token count plus room for the end-of-turn token."""
    return max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in targets) + 2


# ---------------------------------------------------------------- statistics


def bootstrap_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of per-example scores."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one score (the task has no evaluated examples).")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def _task_mean_draws(per_task: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means over tasks of per-task means, examples resampled within each task (stratified)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for x in per_task:
        x = np.asarray(x, dtype=float)
        draws += x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return draws / len(per_task)


def bootstrap_task_mean(per_task: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the unweighted mean over tasks, each task resampled on its own examples."""
    draws = _task_mean_draws(per_task, n_boot, seed)
    mean = float(np.mean([np.mean(x) for x in per_task]))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return mean, float(lo), float(hi)


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of mean_over_tasks(b) - mean_over_tasks(a), resampling the *same* examples for both
    (both methods answered the same prompts), which is sharper than comparing two separate intervals."""
    diffs = [np.asarray(y, float) - np.asarray(x, float) for x, y in zip(a, b)]
    return bootstrap_task_mean(diffs, n_boot, seed)


def chance_level(examples, metric: str, all_examples=None) -> float:
    """Multiple choice: mean of 1 / number of choices. Exact match: 1 / number of distinct targets when the
    task (all of `all_examples`, train included) is a small closed set (at most 10 labels, e.g. 'day' /
    'month'), else 0."""
    if metric == "multiple_choice":
        return float(np.mean([1.0 / len(e.choices) for e in examples]))
    labels = {e.target for e in (all_examples or examples)}
    return 1.0 / len(labels) if len(labels) <= 10 else 0.0


# ---------------------------------------------------------------- output


class Clock:
    """Wall-clock sections: ``with clock("build"): ...``; ``clock.times`` maps section -> seconds."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.time()

    def __call__(self, name: str):
        clock = self

        class _Section:
            def __enter__(self):
                self.t0 = time.time()

            def __exit__(self, *exc):
                clock.times[name] = clock.times.get(name, 0.0) + time.time() - self.t0

        return _Section()

    def total(self) -> float:
        return time.time() - self.start


def write_json(path: Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float))
    return path


def fmt_ci(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- --quick fixtures (random twin, tiny libraries)

QUICK_TASKS = {"string": ["reverse_word", "first_letter"], "arithmetic": ["add", "subtract"]}


def quick_libraries(folder: Path, model: str = "tiny-random-llama", steps: int = 3) -> dict[str, Path]:
    """A private library (one expert per task) and an MBC-shaped library (one cluster expert per family, plus
    one warm-up expert as MBC builds keep them) of four built-in tasks, trained a few steps on the twin: real
    experts through the real training code, made in seconds. The clusters are the families by construction
    (the quick run tests the plumbing, not MBC)."""
    from library_store.store.library import ExpertLibrary
    from library_store.tasks import resolve_tasks
    from library_store.training.mbc import cluster_name, warmup_name
    from library_store.training.train import TrainConfig, train_expert

    base = load_base(model)
    tasks = {t.name: t for t in resolve_tasks("builtin:" + ",".join(sum(QUICK_TASKS.values(), [])))}
    cfg = TrainConfig(steps=steps, batch_size=4, init_seed=0, progress=False)
    private = ExpertLibrary.create(folder / "quick-private", base.fingerprint)
    for name, task in tasks.items():
        private.add(train_expert(base, [task], name, "private", cfg))
    mbc = ExpertLibrary.create(folder / "quick-mbc", base.fingerprint)
    mbc.add(train_expert(base, [tasks["add"]], warmup_name("add"), "warmup", cfg))  # stored, never routed
    clusters = {cluster_name(i): names for i, names in enumerate(QUICK_TASKS.values())}
    for c, names in clusters.items():
        mbc.add(train_expert(base, [tasks[n] for n in names], c, "cluster", cfg, cluster=c))
    mbc.set_clusters(clusters)
    return {"private": folder / "quick-private", "mbc": folder / "quick-mbc"}


def quick_mc_spec(folder: Path, n: int = 30) -> str:
    """A `jsonl:` spec of two small multiple-choice tasks (the labels of two held-out classification variants
    as choices), so the quick run exercises rank classification."""
    from library_store.tasks import resolve_tasks

    out = Path(folder) / "quick-mc"
    out.mkdir(parents=True, exist_ok=True)
    for task in resolve_tasks("variants:day_or_month,tool_or_food"):
        ex = (task.train + task.heldout)[:n]
        labels = sorted({e.target for e in ex})
        lines = [json.dumps({"input": e.input, "choices": labels, "answer": labels.index(e.target)}) for e in ex]
        (out / f"{task.name}_mc.jsonl").write_text("\n".join(lines) + "\n")
    return f"jsonl:{out}"
