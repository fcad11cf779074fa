"""Does the base model know the letters of its words? The letter tasks (drop_vowels, reverse_word) need that.

Few-shot, without the chat template, the base model alone (no expert) is asked to spell each held-out word of
the string tasks letter by letter ("Word: garden / Letters: g a r d e n", three examples, then the word). A word
counts as spelled when the first line of the greedy answer, spaces removed, is the word. Two controls in the same
format show that the model follows it: repeat the word, and give its first letter. A model that cannot
spell its held-out words cannot be taught to reverse them or drop their vowels by a scratchpad that spells
first, so this bounds what any expert of these tasks can learn from the words alone (docs/demo_libraries.md).

Usage::

    .venv/bin/python bench/spelling_probe.py --n 40 --threads 2

Prints each word with the model's spelling and the count; writes bench/results/spelling_probe.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import bootstrap_ci, write_json  # noqa: E402

SHOTS = ("garden", "yellow", "bring")
PROBES = {  # name: (instruction, answer label, the right answer for a word, how an answer is compared)
    "spell": ("Spell each word letter by letter.", "Letters", " ".join, lambda a: a.replace(" ", "")),
    "control: repeat": ("Repeat each word.", "Again", lambda w: w, lambda a: a),
    "control: first letter": ("Give the first letter of each word.", "First letter", lambda w: w[0], lambda a: a),
}


def prompt(probe: str, word: str) -> str:
    """The few-shot prompt of a probe for a word: the instruction, three solved words, then the word."""
    head, label, answer, _ = PROBES[probe]
    shots = "".join(f"Word: {w}\n{label}: {answer(w)}\n" for w in SHOTS)
    return f"{head}\n{shots}Word: {word}\n{label}:"


def held_out_words(n: int) -> list[str]:
    """The first n distinct held-out words of reverse_word (its target reversed is the input word)."""
    from library_store.tasks import resolve_tasks

    task = resolve_tasks("builtin:reverse_word")[0]
    words = []
    for ex in task.heldout:
        word = ex.target[::-1]
        if word not in words:
            words.append(word)
    return words[:n]


def answer(base, probe: str, word: str) -> str:
    """The model's first answer line for `word`, generated greedily after the probe's few-shot prompt."""
    import torch

    tok, model = base.tokenizer, base.model
    ids = tok(prompt(probe, word), return_tensors="pt").input_ids  # (1, t)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2 * len(word) + 3, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:]).split("\n")[0].strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=40, help="held-out words")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    import torch

    from library_store.models import load_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    base = load_base_model(args.model)
    words, out = held_out_words(args.n), {}
    for probe, (_, _, right_answer, compare) in PROBES.items():
        rows = []
        for word in words:
            said = answer(base, probe, word)
            rows.append({"word": word, "answer": said, "right": compare(said) == compare(right_answer(word))})
            if probe == "spell":
                print(f"{word} -> {said}")
        mean, lo, hi = bootstrap_ci([float(r["right"]) for r in rows])
        out[probe] = {"right": [mean, lo, hi], "rows": rows, "example": prompt(probe, words[0])}
    command = "python bench/spelling_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(Path(args.out) / "spelling_probe.json", {"model": args.model, "words": len(words), "probes": out,
                                                        "command": command, "seconds": round(time.time() - start, 1)})
    for probe, r in out.items():
        mean, lo, hi = r["right"]
        print(f"{probe}: {sum(x['right'] for x in r['rows'])} of {len(words)} right ({mean:.2f} [{lo:.2f}, {hi:.2f}])")


if __name__ == "__main__":
    main()
