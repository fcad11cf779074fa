"""The one task record every source produces.

Usage::

    task = Task("add", "arithmetic", train=[Example("Add these numbers: 2 + 3", "5")], heldout=[...])
    Example("Which is red?", "apple", choices=["apple", "sky"], answer=0)   # multiple choice
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_EXAMPLES = 10  # fewer than this cannot train an expert nor score one: such a task is refused
METRICS = ("exact_match", "multiple_choice")


class TaskError(ValueError):
    """A task spec, file or task cannot be used; the message says which and why."""


@dataclass
class Example:
    """One example. Multiple-choice examples also carry `choices` and the index of the right one (`answer`);
    their `target` is the right choice's text, so they can train a generative expert too."""

    input: str
    target: str
    choices: list[str] | None = None
    answer: int | None = None


@dataclass
class Task:
    name: str
    family: str  # what MBC should rediscover for the built-in suite; the source name otherwise
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    metric: str = "exact_match"  # one of METRICS
    source: str = "builtin"

    def __len__(self) -> int:
        return len(self.train) + len(self.heldout)


def split_examples(examples: list[Example], heldout_fraction: float = 0.2, seed: int = 0):
    """A seeded disjoint train / held-out split (at least one held-out example)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(examples) * heldout_fraction)))
    held = [examples[i] for i in order[:n_held]]
    train = [examples[i] for i in order[n_held:]]
    return train, held
