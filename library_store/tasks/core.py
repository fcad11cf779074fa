"""The one task record every source produces, and the instruction wordings a generated task is asked in.

Usage::

    task = Task("add", "arithmetic", train=[Example("Add these numbers: 2 + 3", "5")], heldout=[...])
    Example("Which is red?", "apple", choices=["apple", "sky"], answer=0)   # multiple choice
    task.examples("paraphrase")      # held-out inputs asked in held-out wordings (built-in tasks)
    Wordings(train=("What is {x}?", "{x} = ?"), heldout=("How much is {x}?", "Work out {x}."))

A task has up to three splits (`SPLITS`): `train`, `heldout` (unseen inputs, training wordings) and
`paraphrase` (the same unseen inputs as `heldout`, pair for pair, asked in wordings never trained on). Only tasks
with `wordings` (the built-in suite) have a paraphrase split.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field

MIN_EXAMPLES = 10  # fewer than this cannot train an expert nor score one: such a task is refused
METRICS = ("exact_match", "multiple_choice")
SPLITS = ("train", "heldout", "paraphrase")
SLOT = "{x}"  # where a wording puts the task's input
HELDOUT_WORDINGS = 2  # wordings per task kept out of training, for the paraphrase split
MIN_WORDINGS = HELDOUT_WORDINGS + 1  # at least one wording left to train on


class TaskError(ValueError):
    """A task spec, file or task cannot be used; the message says which and why."""


def unknown_name_error(kind: str, name: str, known: list[str]) -> TaskError:
    """'Unknown task ...; did you mean ...?' with difflib's close matches (or a sample of the known names)."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"Did you mean: {', '.join(close)}?" if close else f"Known names include: {', '.join(sorted(known)[:12])}"
    return TaskError(f"Unknown {kind} {name!r}. {hint}")


@dataclass
class Example:
    """One example. Multiple-choice examples also carry `choices` and the index of the right one (`answer`);
    their `target` is the right choice's text, so they can train a generative expert too. Generated examples
    record the `wording` (template with `{x}`) their input was asked in."""

    input: str
    target: str
    choices: list[str] | None = None
    answer: int | None = None
    wording: str | None = None


@dataclass(frozen=True)
class Wordings:
    """A task's instruction templates, each holding `{x}` once: `train` ones appear in the train and held-out
    splits, `heldout` ones only in the paraphrase split."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.train + self.heldout

    def digest(self) -> str:
        """Stable across machines and processes: sha256 of the templates and which are held out (16 hex)."""
        blob = json.dumps({"train": list(self.train), "heldout": list(self.heldout)}, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def check_wordings(task: str, wordings: Wordings) -> Wordings:
    """Refuse wordings that cannot give both a training mixture and a paraphrase split."""
    n = len(wordings.all)
    if n < MIN_WORDINGS:
        raise TaskError(f"Task {task!r} has {n} wording{'s' * (n != 1)}; at least {MIN_WORDINGS} are needed "
                        f"({HELDOUT_WORDINGS} held out for the paraphrase split, at least 1 to train on).")
    if len(wordings.heldout) != HELDOUT_WORDINGS:
        raise TaskError(f"Task {task!r} holds out {len(wordings.heldout)} wordings; exactly {HELDOUT_WORDINGS} "
                        "are held out for the paraphrase split.")
    for w in wordings.all:
        if w.count(SLOT) != 1:
            raise TaskError(f"Task {task!r}: wording {w!r} must hold {SLOT} exactly once (where the input goes).")
    dupes = sorted({w for w in wordings.all if wordings.all.count(w) > 1})
    if dupes:
        raise TaskError(f"Task {task!r} lists a wording twice: {dupes[0]!r}.")
    return wordings


def fill(wording: str, raw: str) -> str:
    """The prompt: `raw` put into the wording's slot (str.replace, so braces in inputs are safe)."""
    return wording.replace(SLOT, raw)


def wording_shape(wording: str) -> tuple[str, str, str]:
    """(where the input sits, sentence kind, layout): ('input first' | 'input last' | 'input inside',
    'question' | 'statement', 'one line' | 'two lines'). Quotes and end punctuation around the slot are ignored."""
    head, tail = (part.strip(" \"'") for part in wording.split(SLOT))
    where = "input first" if not head else "input last" if not tail.strip("?.") else "input inside"
    kind = "question" if "?" in wording else "statement"
    return where, kind, "two lines" if "\n" in wording else "one line"


def raw_input(example: Example) -> str:
    """The input without its wording (the example's whole input when it records none)."""
    if example.wording is None:
        return example.input
    head, tail = example.wording.split(SLOT)
    return example.input[len(head): len(example.input) - len(tail)]


@dataclass
class Task:
    name: str
    family: str  # what MBC should rediscover for the built-in suite; the source name otherwise
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)  # unseen inputs, training wordings
    metric: str = "exact_match"  # one of METRICS
    source: str = "builtin"
    paraphrase: list[Example] = field(default_factory=list)  # heldout's inputs in held-out wordings, pair for pair
    wordings: Wordings | None = None  # None: the inputs carry their own instruction (JSONL, BIG-bench)

    def __len__(self) -> int:
        return len(self.train) + len(self.heldout)  # the paraphrase split repeats heldout's inputs

    def examples(self, split: str) -> list[Example]:
        """One split by name (see `SPLITS`); a task without held-out wordings has no paraphrase split."""
        if split not in SPLITS:
            raise TaskError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
        if split == "paraphrase" and not self.paraphrase:
            raise TaskError(f"Task {self.name!r} ({self.source}) has no paraphrase split: only tasks with "
                            "instruction wordings (the built-in suite) hold wordings out.")
        return getattr(self, split)

    @property
    def wordings_hash(self) -> str | None:
        return self.wordings.digest() if self.wordings else None


def split_examples(examples: list[Example], heldout_fraction: float = 0.2, seed: int = 0):
    """A seeded disjoint train / held-out split (at least one held-out example)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(examples) * heldout_fraction)))
    held = [examples[i] for i in order[:n_held]]
    train = [examples[i] for i in order[n_held:]]
    return train, held
