"""Task sources: the built-in suite and its wordings, JSONL folders, BIG-bench from an sdist, the spec resolver,
suite hashes and the docs table."""
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from library_store.models import load_tokenizer
from library_store.tasks import (SPLITS, Example, Task, TaskError, Wordings, builtin_tasks, check_task, check_wordings,
                                 heldout_variant_tasks, resolve_tasks, suite_changes, suite_hash, suite_manifest)
from library_store.tasks.bigbench import extract_task_files, load_bigbench_tasks
from library_store.tasks.builtin import number_words, plural
from library_store.tasks.words import NOUNS
from library_store.tasks.core import fill, raw_input, wording_shape
from library_store.tasks.jsonl import load_jsonl_folder
from library_store.tasks.table import main as table_main
from library_store.tasks.table import render_table, table_block
from library_store.tasks.wordings import WORDINGS


@pytest.fixture(scope="module")
def suite():
    return builtin_tasks()


@pytest.fixture(scope="module")
def variants():
    return heldout_variant_tasks()


def test_builtin_suite_has_16_tasks_in_4_families(suite):
    assert len(suite) >= 16
    families = {}
    for t in suite:
        families.setdefault(t.family, []).append(t.name)
    assert len(families) >= 4
    assert all(len(members) >= 3 for members in families.values())
    assert len({t.name for t in suite}) == len(suite)


def test_builtin_tasks_are_big_enough_disjoint_and_paired(suite, variants):
    for t in suite + variants:
        assert len(t.train) >= 200 and len(t.heldout) >= 100, t.name
        assert not {raw_input(e) for e in t.train} & {raw_input(e) for e in t.heldout}, t.name
        assert all(e.target for e in t.train + t.heldout)
        # the paraphrase split asks the held-out inputs again, pair for pair, in other words
        assert [(raw_input(e), e.target) for e in t.paraphrase] == [(raw_input(e), e.target) for e in t.heldout]
        assert all(p.input != h.input for p, h in zip(t.paraphrase, t.heldout)), t.name


def test_builtin_inputs_are_short():
    tok = load_tokenizer()
    for t in builtin_tasks() + heldout_variant_tasks():
        longest = max(len(tok(e.input).input_ids) for e in t.train[:50] + t.heldout[:50] + t.paraphrase[:50])
        assert longest <= 64, t.name


def test_builtin_suite_is_deterministic_and_seeded(suite):
    again = builtin_tasks()
    for split in SPLITS:
        assert [getattr(t, split) for t in again] == [getattr(t, split) for t in suite]
    other = builtin_tasks(seed=1)
    assert other[0].train[:5] != suite[0].train[:5]
    assert [e.wording for e in other[0].paraphrase] != [e.wording for e in suite[0].paraphrase]
    assert suite_hash(other) != suite_hash(suite)


def test_builtin_targets_are_right(suite):
    by = {t.name: t for t in suite}
    for e in by["add"].train[:20] + by["add"].paraphrase[:20]:
        a, b = raw_input(e).split("+")
        assert int(e.target) == int(a) + int(b) and e.input.count("+") == 1
    for e in by["double_word"].train[:20] + by["double_word"].paraphrase[:20]:
        assert e.target == f"{raw_input(e)} {raw_input(e)}" and raw_input(e) in e.input
    for e in by["plural_word"].train[:20] + by["plural_word"].paraphrase[:20]:
        assert e.target == plural(raw_input(e)) and raw_input(e) in NOUNS
    assert [plural(w) for w in ("city", "boy", "box", "church", "lake", "mouse", "knife")] == \
        ["cities", "boys", "boxes", "churches", "lakes", "mice", "knives"]
    assert number_words(347) == "three hundred forty-seven"
    assert number_words(90) == "ninety" and number_words(0) == "zero"


# sha256 of version 1's suite (one wording per task), train and heldout inputs and targets, seed 0
V1_DIGEST = "636b7da973954d96dd93a891a49035b84e05001d04e094db76f5e5f8c8c0d6ac"


def _v1_digest(tasks):
    rows = [[t.name, [[e.input, e.target] for e in t.train], [[e.input, e.target] for e in t.heldout]] for t in tasks]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_original_wording_set_is_version_1_and_targets_are_unchanged(suite, variants):
    v1 = builtin_tasks(wordings="original")
    original = v1 + heldout_variant_tasks(wordings="original")
    assert _v1_digest(original) == V1_DIGEST  # the single-wording suite, example for example
    varied = resolve_tasks("builtin:" + ",".join(t.name for t in v1)) + variants  # v1's tasks, varied wordings
    assert [t.name for t in varied[4:16]] == [t.name for t in suite[4:]]
    for old, new in zip(original, varied, strict=True):
        for split in ("train", "heldout"):  # same inputs, same targets: only the instruction differs
            assert [(raw_input(e), e.target) for e in getattr(old, split)] == \
                   [(raw_input(e), e.target) for e in getattr(new, split)]
        assert old.paraphrase == new.paraphrase  # scored alike whichever set trained the expert
        assert {e.wording for e in old.train} == {new.wordings.train[0]}


def test_every_task_has_8_training_and_2_heldout_wordings_used_as_declared(suite, variants):
    for t in suite + variants:
        w = t.wordings
        assert len(w.train) >= 8 and len(w.heldout) == 2 and len(set(w.all)) == len(w.all), t.name
        train_used = {e.wording for e in t.train}
        assert train_used == set(w.train), t.name  # every training wording is drawn
        assert {e.wording for e in t.heldout} <= set(w.train), t.name
        assert {e.wording for e in t.paraphrase} == set(w.heldout), t.name
        texts = {e.input for e in t.train + t.heldout}
        for held in w.heldout:  # never trained on: neither as a template nor as text
            assert held not in train_used
            assert not any(fill(held, raw_input(e)) in texts for e in t.train), (t.name, held)
        counts = [sum(e.wording == x for e in t.train) for x in w.train]
        assert max(counts) - min(counts) <= 1, t.name  # balanced


def _words(wording):
    return set(re.findall(r"[a-z0-9]+", wording.replace("{x}", "").lower()))


def test_wordings_differ_in_structure_and_words(suite, variants):
    for t in suite + variants:
        shapes = [wording_shape(x) for x in t.wordings.train]
        assert len(set(shapes)) >= 3, t.name
        assert {"input first", "input last"} <= {s[0] for s in shapes}, t.name  # instruction after and before
        assert {"question", "statement"} <= {s[1] for s in shapes}, t.name
        assert {"one line", "two lines"} <= {s[2] for s in shapes}, t.name
        for held in t.wordings.heldout:  # a real paraphrase, not a one-word edit of a training wording
            assert min(len(_words(held) ^ _words(x)) for x in t.wordings.train) >= 3, (t.name, held)


ANSWER_HINTS = {"date_iso_to_us": ["MM/DD/YYYY"], "date_us_to_iso": ["YYYY-MM-DD"], "list_to_csv": ["comma"],
                "list_to_semicolons": ["semicolon"], "time_24_to_12": ["12-hour", "AM"],
                "first_letter": ["first", "initial", "start", "begin", "opening"],
                "last_letter": ["last", "final", "end", "closing"]}


def test_every_wording_makes_the_answer_unambiguous(suite, variants):
    for t in suite + variants:
        labels = sorted({e.target for e in t.train}) if t.family == "classify" else []
        for x in t.wordings.all:
            assert all(label in x.lower() for label in labels), (t.name, x)  # both class labels are named
            hints = ANSWER_HINTS.get(t.name, [])
            assert not hints or any(h.lower() in x.lower() for h in hints), (t.name, x)
    seen = {}  # one text, one answer: no wording of one task reads as another task's prompt
    for t in suite + variants:
        for e in t.train + t.heldout + t.paraphrase:
            assert seen.setdefault(e.input, (t.name, e.target))[1] == e.target, (e.input, seen[e.input], t.name)


def test_variants_are_new_tasks_of_the_same_families(suite, variants):
    assert len(variants) >= 6
    assert not {t.name for t in variants} & {t.name for t in suite}
    assert {t.family for t in variants} <= {t.family for t in suite}


def test_splits_by_name(suite, tmp_path):
    add = next(t for t in suite if t.name == "add")
    assert add.examples("paraphrase") is add.paraphrase and add.examples("heldout") is add.heldout
    with pytest.raises(TaskError, match="Unknown split 'test'"):
        add.examples("test")
    _write_jsonl(tmp_path / "greet.jsonl", [{"input": f"hi {i}", "target": f"hello {i}"} for i in range(20)])
    greet = resolve_tasks(f"jsonl:{tmp_path}")[0]
    assert greet.wordings is None and greet.wordings_hash is None
    with pytest.raises(TaskError, match="'greet' .* has no paraphrase split"):
        greet.examples("paraphrase")


def test_wordings_hash_and_suite_hash_follow_the_wordings(monkeypatch):
    tasks = builtin_tasks()
    before = {t.name: t.wordings_hash for t in tasks}
    manifest = suite_manifest(tasks)
    assert suite_hash(builtin_tasks()) == suite_hash(tasks) and suite_changes(manifest, manifest) == []
    train, held = WORDINGS["add"]
    monkeypatch.setitem(WORDINGS, "add", (train[:-1] + ("Sum up {x}.",), held))  # one wording reworded
    changed = builtin_tasks()
    assert {t.name for t in changed if t.wordings_hash != before[t.name]} == {"add"}
    assert suite_hash(changed) != suite_hash(tasks)
    diff = suite_changes(manifest, suite_manifest(changed))
    assert any(line.startswith("add: wordings changed") for line in diff)
    assert not any(line.startswith("subtract") for line in diff)
    monkeypatch.setitem(WORDINGS, "add", (train[:-1] + held[:1], train[-1:] + held[1:]))  # same ten, other split
    swapped = builtin_tasks()
    assert set(swapped[4].wordings.all) == set(tasks[4].wordings.all)
    assert swapped[4].wordings_hash != before["add"] and suite_hash(swapped) != suite_hash(tasks)
    assert "suite version 1 -> 2" in suite_changes({**manifest, "version": 1}, manifest)
    assert "add: examples changed (inputs, targets or split)" in suite_changes(
        manifest, suite_manifest(builtin_tasks(seed=3)))


def test_unknown_wording_set_is_refused():
    with pytest.raises(TaskError, match="Unknown wording set 'orignal'. Did you mean: original"):
        resolve_tasks("builtin@orignal:add")
    with pytest.raises(TaskError, match="wording set 'fancy'.*original"):
        resolve_tasks("variants@fancy")
    with pytest.raises(TaskError, match="wording set 'fancy'"):
        builtin_tasks(wordings="fancy")
    with pytest.raises(TaskError, match="apply to builtin and variants tasks only"):
        resolve_tasks("jsonl@varied:/tmp")
    picked = resolve_tasks("builtin@original:add+variants@varied:add_three")
    assert len(picked[0].wordings.train) == 1 and len(picked[1].wordings.train) >= 8


def test_too_few_wordings_are_refused_naming_task_and_count(monkeypatch):
    ex = [Example(f"What is {i} + 1?", str(i + 1)) for i in range(12)]
    task = Task("plus_one", "arithmetic", ex[:10], ex[10:], wordings=Wordings(("What is {x}?",), ("{x} = ?",)))
    with pytest.raises(TaskError, match="Task 'plus_one' has 2 wordings; at least 3 are needed"):
        check_task(task)
    task.wordings = Wordings(("What is {x}?", "Add: {x}"), ("{x} = ?", "How much is {x}?"))
    assert check_task(task) is task
    for bad, message in [(Wordings(("What is it?", "b {x}"), ("{x} = ?", "d {x}")), "exactly once"),
                         (Wordings(("a {x}", "a {x}"), ("{x} = ?", "d {x}")), "twice"),
                         (Wordings(("a {x}", "b {x}", "c {x}"), ("d {x}",)), "holds out 1 wordings")]:
        with pytest.raises(TaskError, match=message):
            check_wordings("plus_one", bad)
    monkeypatch.setitem(WORDINGS, "add", (WORDINGS["add"][0][:0], WORDINGS["add"][1]))
    with pytest.raises(TaskError, match="Task 'add' has 2 wordings"):
        resolve_tasks("builtin:add")
    monkeypatch.delitem(WORDINGS, "subtract")
    with pytest.raises(TaskError, match="'subtract' has no wordings"):
        resolve_tasks("builtin:subtract")


def test_docs_table_matches_the_code(tmp_path):
    doc = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"
    table = render_table()
    assert table_block(doc.read_text(encoding="utf-8"), str(doc)) == table, \
        "docs/tasks.md is stale: python -m library_store.tasks.table --write docs/tasks.md"
    for t in builtin_tasks() + heldout_variant_tasks():
        assert f"| `{t.name}` | {t.family} |" in table and t.wordings_hash in table
        assert all(x.replace("\n", " ⏎ ") in table for x in t.wordings.all)
    stale = tmp_path / "tasks.md"
    broken = doc.read_text(encoding="utf-8").replace("| `plural_word` |", "| `plural_wrd` |", 1)  # in the table
    stale.write_text(broken, encoding="utf-8")
    assert table_main(["--check", str(stale)]) == 1
    assert table_main(["--write", str(stale)]) == 0 and table_main(["--check", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == doc.read_text(encoding="utf-8")


def test_letter_tasks_are_retired_but_resolvable(suite):
    names = [t.name for t in suite]
    assert "reverse_word" not in names and "drop_vowels" not in names
    rw, dv = resolve_tasks("builtin:reverse_word,drop_vowels")
    assert (rw.family, dv.family) == ("string", "string")
    e = rw.heldout[0]
    assert e.target == raw_input(e)[::-1] and dv.train[0].target == "".join(
        c for c in raw_input(dv.train[0]) if c not in "aeiou")
    original = [t.name for t in builtin_tasks(wordings="original")]  # version 1 had them in these places
    assert original[0] == "reverse_word" and original[3] == "drop_vowels" and original[4:] == names[4:]


def test_resolve_specs(suite):
    assert [t.name for t in resolve_tasks("builtin")] == [t.name for t in suite]
    picked = resolve_tasks("builtin:add,reverse_word")
    assert [t.name for t in picked] == ["add", "reverse_word"]
    assert [t.name for t in resolve_tasks("variants:last_letter")] == ["last_letter"]
    assert len(resolve_tasks("builtin:add+variants:add_three")) == 2


def test_unknown_task_name_lists_close_matches():
    with pytest.raises(TaskError, match="reverse_word"):
        resolve_tasks("builtin:revers_word")
    with pytest.raises(TaskError, match="builtin"):
        resolve_tasks("bultin")
    with pytest.raises(TaskError, match="twice"):
        resolve_tasks("builtin:add,add")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_generative_and_multiple_choice(tmp_path):
    _write_jsonl(tmp_path / "greet.jsonl", [{"input": f"hi {i}", "target": f"hello {i}"} for i in range(20)])
    _write_jsonl(tmp_path / "pick.jsonl",
                 [{"input": f"q{i}", "choices": ["yes", "no"], "answer": i % 2} for i in range(10)]
                 + [{"input": "last", "choices": ["yes", "no"], "answer": "no"}])
    tasks = {t.name: t for t in resolve_tasks(f"jsonl:{tmp_path}")}
    assert tasks["greet"].metric == "exact_match" and len(tasks["greet"].train) == 16
    pick = tasks["pick"]
    assert pick.metric == "multiple_choice"
    ex = next(e for e in pick.train + pick.heldout if e.input == "last")
    assert ex.answer == 1 and ex.target == "no" and ex.choices == ["yes", "no"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    _write_jsonl(tmp_path / "bad.jsonl", [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}, "{oops"])
    with pytest.raises(TaskError, match=r"bad\.jsonl, line 3"):
        load_jsonl_folder(tmp_path)
    _write_jsonl(tmp_path / "bad.jsonl", [{"input": "a"}])
    with pytest.raises(TaskError, match=r"line 1: a line needs a string 'target'"):
        load_jsonl_folder(tmp_path)
    _write_jsonl(tmp_path / "bad.jsonl", [{"input": "a", "choices": ["x", "y"], "answer": 5}])
    with pytest.raises(TaskError, match="'answer' must be"):
        load_jsonl_folder(tmp_path)


def test_too_few_examples_refused(tmp_path):
    _write_jsonl(tmp_path / "tiny.jsonl", [{"input": str(i), "target": str(i)} for i in range(9)])
    with pytest.raises(TaskError, match="only 9 examples; at least 10"):
        resolve_tasks(f"jsonl:{tmp_path}")


def test_missing_jsonl_folder(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        resolve_tasks(f"jsonl:{tmp_path / 'nope'}")


def _fake_sdist(path):
    """A miniature bigbench-1.0.0.tar.gz with a generative, a multiple-choice, a split and a programmatic task."""
    gen = {"examples": [{"input": f"{i} + 1 =", "target": [str(i + 1), "x"]} for i in range(12)]}
    mc = {"task_prefix": "Answer.", "examples": [{"input": f"q{i}", "target_scores": {"a": 0, "b": 1}}
                                                for i in range(15)]}
    files = {
        "bigbench-1.0.0/bigbench/benchmark_tasks/plus_one/task.json": json.dumps(gen),
        "bigbench-1.0.0/bigbench/benchmark_tasks/choose/task.json": json.dumps(mc),
        "bigbench-1.0.0/bigbench/benchmark_tasks/split/task.json": json.dumps({"name": "split"}),
        "bigbench-1.0.0/bigbench/benchmark_tasks/split/one/task.json": json.dumps(gen),
        "bigbench-1.0.0/bigbench/benchmark_tasks/split/two/task.json": json.dumps(gen),
        "bigbench-1.0.0/bigbench/benchmark_tasks/coded/task.py": "print('hi')",
        "bigbench-1.0.0/setup.py": "",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bigbench_from_sdist(tmp_path):
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    tasks = load_bigbench_tasks(["plus_one", "choose", "split"], sdist=sdist, cache=tmp_path / "cache")
    plus, choose, split = tasks
    assert plus.metric == "exact_match" and len(plus) == 12
    assert all(e.target == str(int(e.input.split()[0]) + 1) for e in plus.train)
    assert choose.metric == "multiple_choice"
    ex = choose.train[0]
    assert ex.choices == ["a", "b"] and ex.answer == 1 and ex.target == "b"
    assert ex.input.startswith("Answer.\nq") and "choice: a" in ex.input
    assert len(split) == 24  # both subtasks joined
    assert (tmp_path / "cache" / "tasks" / "plus_one" / "task.json").is_file()  # cached: next time no tarball
    again = load_bigbench_tasks(["plus_one"], cache=tmp_path / "cache")
    assert again[0].train == plus.train


def test_bigbench_unknown_and_programmatic(tmp_path):
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    with pytest.raises(TaskError, match="plus_one"):
        load_bigbench_tasks(["plus_on"], sdist=sdist, cache=tmp_path / "c")
    with pytest.raises(TaskError, match="programmatic"):
        load_bigbench_tasks(["coded"], sdist=sdist, cache=tmp_path / "c")


def test_bigbench_from_unpacked_tree(tmp_path):
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "tree", filter="data")
    n = extract_task_files(tmp_path / "tree" / "bigbench-1.0.0", tmp_path / "out")
    assert n == 5 and (tmp_path / "out" / "split" / "two" / "task.json").is_file()
