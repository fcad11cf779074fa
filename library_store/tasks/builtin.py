"""The built-in task suite: small seeded generated tasks in families whose members resemble each other.

Usage::

    tasks = builtin_tasks()                     # 16 tasks, 4 families, what the demo libraries are built from
    tasks[0].name, tasks[0].family              # ('plural_word', 'string')
    heldout_variant_tasks()                     # 8 unseen variants of the same skills (never in the demos)
    builtin_tasks(wordings="original")          # the suite as it was before wordings varied (version 1)
    tasks[0].paraphrase                         # held-out inputs asked in the 2 held-out wordings

Every task is asked in 8 training wordings (drawn per example, balanced, with the seed) and has 2 more held out
for the `paraphrase` split (tasks/wordings.py; the table in docs/tasks.md). Its wordings tell it apart from the
other tasks, and it shares its input format with the rest of its family (so MBC has something to rediscover).
Train and held-out inputs are disjoint and fixed by the seed: `builtin_tasks(seed=0)` is the same on every
machine. Targets depend on the input only; the wording never changes an answer.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from typing import Callable

from . import words as W
from .core import Example, Task, TaskError, Wordings, check_wordings, fill, unknown_name_error
from .wordings import WORDINGS

SUITE_VERSION = 2  # bump whenever generated examples change (2: varied wordings + paraphrase split)
WORDING_SETS = ("varied", "original")  # varied: 8 training wordings; original: version 1's single one
N_TRAIN, N_HELDOUT = 400, 100  # at most 400 train examples; always >= 200 (checked) and exactly 100 held out

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..999 in English words: 347 -> 'three hundred forty-seven'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


@dataclass(frozen=True)
class _Spec:
    """One generated task: `draw(rng)` returns one (input, target) pair; wordings.py holds its instructions."""

    name: str
    family: str
    draw: Callable[[random.Random], tuple[str, str]]


def _string(name, fn, words=W.COMMON_WORDS):
    return _Spec(name, "string", lambda rng: (lambda w: (w, fn(w)))(rng.choice(words)))


def plural(noun: str) -> str:
    """The plural of one of words.NOUNS: its exception, else -es after s/x/z/ch/sh, -ies after a consonant + y,
    else -s."""
    if noun in W.IRREGULAR_PLURALS:
        return W.IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _pick_label(rng, groups: dict[str, list[str]]):
    label = rng.choice(sorted(groups))
    return label, rng.choice(groups[label])


def _classify(name, groups, template, subjects):
    def draw(rng):
        label, item = _pick_label(rng, groups)
        return template.format(s=rng.choice(subjects), x=item), label
    return _Spec(name, "classify", draw)


def _two(lo, hi, ordered=False, distinct=False):
    def draw(rng):
        while True:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if ordered and a < b:
                a, b = b, a
            if not distinct or a != b:
                return a, b
    return draw


def _date(rng):
    return rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)


def _time12(h: int, m: int) -> str:
    return f"{(h % 12) or 12}:{m:02d} {'AM' if h < 12 else 'PM'}"


def _items(rng, k_lo=3, k_hi=4):
    return rng.sample(W.LIST_ITEMS, rng.randint(k_lo, k_hi))


_VOWELS = set("aeiou")
_ANIMAL_PLANT = {"animal": W.ANIMALS, "plant": W.PLANTS}
_SENTIMENT = {"positive": W.POSITIVE, "negative": W.NEGATIVE}
_COLOR_SHAPE = {"color": W.COLORS, "shape": W.SHAPES}
_FRUIT_VEG = {"fruit": W.FRUITS, "vegetable": W.VEGETABLES}


def _add(rng):
    a, b = _two(0, 99)(rng)
    return f"{a} + {b}", str(a + b)


def _sub(rng):
    a, b = _two(0, 99, ordered=True)(rng)
    return f"{a} - {b}", str(a - b)


def _mul(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 12)
    return f"{a} x {b}", str(a * b)


def _cmp(rng):
    a, b = _two(0, 999, distinct=True)(rng)
    return f"{a} or {b}?", str(max(a, b))


def _add3(rng):
    a, b, c = (rng.randint(0, 50) for _ in range(3))
    return f"{a} + {b} + {c}", str(a + b + c)


def _max3(rng):
    xs = rng.sample(range(1000), 3)
    return f"{xs[0]}, {xs[1]} or {xs[2]}?", str(max(xs))


def _iso_to_us(rng):
    y, m, d = _date(rng)
    return f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}"


def _us_to_iso(rng):
    y, m, d = _date(rng)
    return f"{m:02d}/{d:02d}/{y}", f"{y}-{m:02d}-{d:02d}"


def _num_words(rng):
    n = rng.randint(0, 999)
    return str(n), number_words(n)


def _time(rng):
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    return f"{h:02d}:{m:02d}", _time12(h, m)


def _csv(sep):
    def draw(rng):
        xs = _items(rng)
        return " ".join(xs), sep.join(xs)
    return draw


# Letter-level edits SmolLM2-135M cannot learn (docs/tasks.md, "The letter tasks, retired"): the base model
# spells none of 40 held-out words, and no LoRA tried reached 0.5. In the suite until 2026-12-01, in `original`'s
# version-1 suite still; resolvable by name (`builtin:reverse_word`), never in `builtin`.
_LETTER_SPECS: dict[str, _Spec] = {
    "reverse_word": _string("reverse_word", lambda w: w[::-1]),
    "drop_vowels": _string("drop_vowels", lambda w: "".join(c for c in w if c not in _VOWELS)),
}

_SPECS: list[_Spec] = [
    # string edits: one word in, the word edited out
    _string("plural_word", plural, sorted(W.NOUNS)),
    _string("uppercase_word", str.upper),
    _string("first_letter", lambda w: w[0]),
    _string("double_word", lambda w: f"{w} {w}"),
    # arithmetic: small numbers in, one number out
    _Spec("add", "arithmetic", _add),
    _Spec("subtract", "arithmetic", _sub),
    _Spec("multiply_small", "arithmetic", _mul),
    _Spec("compare_numbers", "arithmetic", _cmp),
    # format conversion: a value in one notation in, the same value in another out
    _Spec("date_iso_to_us", "format", _iso_to_us),
    _Spec("number_to_words", "format", _num_words),
    _Spec("list_to_csv", "format", _csv(",")),
    _Spec("time_24_to_12", "format", _time),
    # classification by word lists: a short sentence in, a one-word label out
    _classify("animal_or_plant", _ANIMAL_PLANT, "a {s} {x}", W.ADJECTIVES),
    _classify("sentiment_words", _SENTIMENT, "The {s} was {x}.", W.REVIEW_SUBJECTS),
    _classify("color_or_shape", _COLOR_SHAPE, "{s} picked: {x}", W.THINGS_PEOPLE),
    _classify("fruit_or_vegetable", _FRUIT_VEG, "{s} bought: {x}", W.THINGS_PEOPLE),
]

# New variants of the same skills, never in the demo libraries: "related unseen tasks" for evaluation.
_HELDOUT_SPECS: list[_Spec] = [
    _string("last_letter", lambda w: w[-1]),
    _string("capitalize_word", str.capitalize),
    _Spec("add_three", "arithmetic", _add3),
    _Spec("max_of_three", "arithmetic", _max3),
    _Spec("date_us_to_iso", "format", _us_to_iso),
    _Spec("list_to_semicolons", "format", _csv(";")),
    _classify("day_or_month", {"day": W.DAYS, "month": W.MONTHS}, "{s} meets on: {x}", W.THINGS_PEOPLE),
    _classify("tool_or_food", {"tool": W.TOOLS, "food": W.FOODS}, "{s} used: {x}", W.THINGS_PEOPLE),
]


def wordings_for(name: str, wording_set: str = "varied") -> Wordings:
    """A built-in task's wordings in one set (see WORDING_SETS), checked."""
    if wording_set not in WORDING_SETS:
        raise unknown_name_error("wording set", wording_set, list(WORDING_SETS))
    if name not in WORDINGS:
        raise TaskError(f"Built-in task {name!r} has no wordings (add them to library_store/tasks/wordings.py).")
    train, heldout = WORDINGS[name]
    if wording_set == "original":  # version 1 trained on the first wording only; same paraphrase split
        train = train[:1]
    return check_wordings(name, Wordings(tuple(train), tuple(heldout)))


def _rng(seed: int, key: str) -> random.Random:
    # crc32, not hash(): Python salts str hashes per process, the suite must be the same everywhere
    return random.Random(seed * 1_000_003 + zlib.crc32(key.encode()))


def _assign(n: int, wordings: tuple[str, ...], rng: random.Random) -> list[str]:
    """n wordings in a seeded order, each used equally often (within one)."""
    order = list(wordings)
    rng.shuffle(order)  # which wordings get the one extra use is seeded too
    pool = (order * math.ceil(n / len(order)))[:n]
    rng.shuffle(pool)
    return pool


def _generate(spec: _Spec, seed: int, n_train: int, n_heldout: int, wording_set: str = "varied") -> Task:
    wordings = wordings_for(spec.name, wording_set)
    rng = _rng(seed, spec.name)  # the input draws are version 1's, so the same inputs get the same targets
    seen: dict[str, str] = {}
    for _ in range(50 * (n_train + n_heldout)):  # draw until enough distinct inputs (or the space runs out)
        if len(seen) >= n_train + n_heldout:
            break
        inp, target = spec.draw(rng)
        seen.setdefault(inp, target)
    pairs = list(seen.items())
    rng.shuffle(pairs)
    held, train = pairs[:n_heldout], pairs[n_heldout:n_heldout + n_train]
    if len(train) < min(200, n_train):
        raise AssertionError(f"built-in task {spec.name} has only {len(train)} distinct training examples")
    # own streams: the paraphrase split is the same whichever wording set trains
    wrng, prng = _rng(seed, spec.name + "/wordings"), _rng(seed, spec.name + "/paraphrase")

    def examples(rows, pool):
        return [Example(fill(w, inp), target, wording=w) for (inp, target), w in zip(rows, pool)]

    train_w = _assign(len(train), wordings.train, wrng)
    held_w = _assign(len(held), wordings.train, wrng)  # the heldout split asks in training wordings too
    para_w = _assign(len(held), wordings.heldout, prng)
    return Task(spec.name, spec.family, examples(train, train_w), examples(held, held_w), metric="exact_match",
                source="builtin", paraphrase=examples(held, para_w), wordings=wordings)


_V1_PLACES = {"plural_word": "reverse_word", "double_word": "drop_vowels"}  # version 1 had the letter tasks there
_BY_NAME = {s.name: s for s in _SPECS + list(_LETTER_SPECS.values()) + _HELDOUT_SPECS}  # what builtin:NAME resolves


def _suite(wordings: str) -> list[_Spec]:
    """The suite's specs; `original` rebuilds version 1, whose string family had the letter tasks."""
    if wordings != "original":
        return _SPECS
    return [_LETTER_SPECS[_V1_PLACES[s.name]] if s.name in _V1_PLACES else s for s in _SPECS]


def builtin_tasks(seed: int = 0, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT,
                  wordings: str = "varied") -> list[Task]:
    """The demo suite: 16 tasks in 4 families (string, arithmetic, format, classify)."""
    return [_generate(s, seed, n_train, n_heldout, wordings) for s in _suite(wordings)]


def heldout_variant_tasks(seed: int = 0, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT,
                          wordings: str = "varied") -> list[Task]:
    """Unseen variants of the demo families (not in the demo libraries); each has >= 100 held-out examples."""
    return [_generate(s, seed, n_train, n_heldout, wordings) for s in _HELDOUT_SPECS]


def builtin_names(include_variants: bool = True) -> list[str]:
    """The suite's names first; with `include_variants`, every name `builtin:NAME` resolves."""
    return list(_BY_NAME) if include_variants else [s.name for s in _SPECS]


def builtin_family(name: str) -> str:
    return _BY_NAME[name].family


def builtin_by_name(names: list[str], seed: int = 0, wordings: str = "varied") -> list[Task]:
    """Tasks of the suite or its variants by name (resolve_tasks checks the names first)."""
    return [_generate(_BY_NAME[n], seed, N_TRAIN, N_HELDOUT, wordings) for n in names]
