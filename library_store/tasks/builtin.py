"""The built-in task suite: small seeded generated tasks in families whose members resemble each other.

Usage::

    tasks = builtin_tasks()                     # 16 tasks, 4 families, what the demo libraries are built from
    tasks[0].name, tasks[0].family              # ('reverse_word', 'string')
    heldout_variant_tasks()                     # 8 unseen variants of the same skills (never in the demos)

Every task has a distinct instruction (so one model can tell them apart) and shares its input format with the
rest of its family (so MBC has something to rediscover). Train and held-out examples are disjoint and fixed by
the seed: `builtin_tasks(seed=0)` is the same on every machine.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from . import words as W
from .core import Example, Task

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
    """One generated task: `draw(rng)` returns one (input, target) pair, the instruction prefixes the input."""

    name: str
    family: str
    instruction: str
    draw: Callable[[random.Random], tuple[str, str]]


def _word(rng):
    return rng.choice(W.COMMON_WORDS)


def _string(name, instruction, fn):
    return _Spec(name, "string", instruction, lambda rng: (lambda w: (w, fn(w)))(_word(rng)))


def _pick_label(rng, groups: dict[str, list[str]]):
    label = rng.choice(sorted(groups))
    return label, rng.choice(groups[label])


def _classify(name, instruction, groups, template, subjects):
    def draw(rng):
        label, item = _pick_label(rng, groups)
        return template.format(s=rng.choice(subjects), x=item), label
    return _Spec(name, "classify", instruction, draw)


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


_SPECS: list[_Spec] = [
    # string edits: one word in, the word edited out
    _string("reverse_word", "Reverse the letters of this word:", lambda w: w[::-1]),
    _string("uppercase_word", "Write this word in capital letters:", str.upper),
    _string("first_letter", "Give the first letter of this word:", lambda w: w[0]),
    _string("drop_vowels", "Remove the vowels from this word:", lambda w: "".join(c for c in w if c not in _VOWELS)),
    # arithmetic: small numbers in, one number out
    _Spec("add", "arithmetic", "Add these numbers:", _add),
    _Spec("subtract", "arithmetic", "Subtract these numbers:", _sub),
    _Spec("multiply_small", "arithmetic", "Multiply these numbers:", _mul),
    _Spec("compare_numbers", "arithmetic", "Which number is larger:", _cmp),
    # format conversion: a value in one notation in, the same value in another out
    _Spec("date_iso_to_us", "format", "Convert this date to MM/DD/YYYY:", _iso_to_us),
    _Spec("number_to_words", "format", "Write this number in words:", _num_words),
    _Spec("list_to_csv", "format", "Join these words with commas:", _csv(",")),
    _Spec("time_24_to_12", "format", "Convert this time to 12-hour format:", _time),
    # classification by word lists: a short sentence in, a one-word label out
    _classify("animal_or_plant", "Is this an animal or a plant?", _ANIMAL_PLANT, "a {s} {x}", W.ADJECTIVES),
    _classify("sentiment_words", "Is this review positive or negative?", _SENTIMENT, "The {s} was {x}.",
              W.REVIEW_SUBJECTS),
    _classify("color_or_shape", "Is this a color or a shape?", _COLOR_SHAPE, "{s} picked: {x}", W.THINGS_PEOPLE),
    _classify("fruit_or_vegetable", "Is this a fruit or a vegetable?", _FRUIT_VEG, "{s} bought: {x}",
              W.THINGS_PEOPLE),
]

# New variants of the same skills, never in the demo libraries: "related unseen tasks" for evaluation.
_HELDOUT_SPECS: list[_Spec] = [
    _string("last_letter", "Give the last letter of this word:", lambda w: w[-1]),
    _string("capitalize_word", "Capitalize the first letter of this word:", str.capitalize),
    _Spec("add_three", "arithmetic", "Add these three numbers:", _add3),
    _Spec("max_of_three", "arithmetic", "Which number is the largest:", _max3),
    _Spec("date_us_to_iso", "format", "Convert this date to YYYY-MM-DD:", _us_to_iso),
    _Spec("list_to_semicolons", "format", "Join these words with semicolons:", _csv(";")),
    _classify("day_or_month", "Is this a day or a month?", {"day": W.DAYS, "month": W.MONTHS}, "{s} meets on: {x}",
              W.THINGS_PEOPLE),
    _classify("tool_or_food", "Is this a tool or a food?", {"tool": W.TOOLS, "food": W.FOODS}, "{s} used: {x}",
              W.THINGS_PEOPLE),
]


def _generate(spec: _Spec, seed: int, n_train: int, n_heldout: int) -> Task:
    # crc32, not hash(): Python salts str hashes per process, the suite must be the same everywhere
    rng = random.Random(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    seen: dict[str, str] = {}
    for _ in range(50 * (n_train + n_heldout)):  # draw until enough distinct inputs (or the space runs out)
        if len(seen) >= n_train + n_heldout:
            break
        inp, target = spec.draw(rng)
        seen.setdefault(inp, target)
    pairs = [Example(f"{spec.instruction} {inp}", target) for inp, target in seen.items()]
    rng.shuffle(pairs)
    heldout, train = pairs[:n_heldout], pairs[n_heldout:n_heldout + n_train]
    if len(train) < min(200, n_train):
        raise AssertionError(f"built-in task {spec.name} has only {len(train)} distinct training examples")
    return Task(spec.name, spec.family, train, heldout, metric="exact_match", source="builtin")


def builtin_tasks(seed: int = 0, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> list[Task]:
    """The demo suite: 16 tasks in 4 families (string, arithmetic, format, classify)."""
    return [_generate(s, seed, n_train, n_heldout) for s in _SPECS]


def heldout_variant_tasks(seed: int = 0, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> list[Task]:
    """Unseen variants of the demo families (not in the demo libraries); each has >= 100 held-out examples."""
    return [_generate(s, seed, n_train, n_heldout) for s in _HELDOUT_SPECS]


def builtin_names(include_variants: bool = True) -> list[str]:
    return [s.name for s in _SPECS] + ([s.name for s in _HELDOUT_SPECS] if include_variants else [])


def builtin_by_name(names: list[str], seed: int = 0) -> list[Task]:
    """Tasks of the suite or its variants by name (resolve_tasks checks the names first)."""
    specs = {s.name: s for s in _SPECS + _HELDOUT_SPECS}
    return [_generate(specs[n], seed, N_TRAIN, N_HELDOUT) for n in names]
