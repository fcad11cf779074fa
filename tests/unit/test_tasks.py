"""Task sources: the built-in suite, JSONL folders, BIG-bench from an sdist, and the spec resolver."""
import io
import json
import tarfile

import pytest

from library_store.models import load_tokenizer
from library_store.tasks import TaskError, builtin_tasks, heldout_variant_tasks, resolve_tasks
from library_store.tasks.bigbench import extract_task_files, load_bigbench_tasks
from library_store.tasks.builtin import number_words
from library_store.tasks.jsonl import load_jsonl_folder


@pytest.fixture(scope="module")
def suite():
    return builtin_tasks()


@pytest.fixture(scope="module")
def variants():
    return heldout_variant_tasks()


def _instruction(example):
    return example.input.split(":")[0].split("?")[0]


def test_builtin_suite_has_16_tasks_in_4_families(suite):
    assert len(suite) >= 16
    families = {}
    for t in suite:
        families.setdefault(t.family, []).append(t.name)
    assert len(families) >= 4
    assert all(len(members) >= 3 for members in families.values())
    assert len({t.name for t in suite}) == len(suite)


def test_builtin_tasks_are_big_enough_disjoint_and_distinct(suite, variants):
    for t in suite + variants:
        assert len(t.train) >= 200 and len(t.heldout) >= 100, t.name
        assert not {e.input for e in t.train} & {e.input for e in t.heldout}, t.name
        assert all(e.target for e in t.train + t.heldout)
        assert len({_instruction(x) for x in t.train}) == 1  # one instruction per task
    instructions = [_instruction(t.train[0]) for t in suite + variants]
    assert len(set(instructions)) == len(instructions)  # the model can tell the tasks apart


def test_builtin_inputs_are_short():
    tok = load_tokenizer()
    for t in builtin_tasks() + heldout_variant_tasks():
        longest = max(len(tok(e.input).input_ids) for e in t.train[:50] + t.heldout[:50])
        assert longest <= 64, t.name


def test_builtin_suite_is_deterministic_and_seeded(suite):
    again = builtin_tasks()
    assert [t.train[:5] for t in again] == [t.train[:5] for t in suite]
    other = builtin_tasks(seed=1)
    assert other[0].train[:5] != suite[0].train[:5]


def test_builtin_targets_are_right(suite):
    by = {t.name: t for t in suite}
    for e in by["add"].train[:20]:
        a, b = e.input.split(":")[1].split("+")
        assert int(e.target) == int(a) + int(b)
    for e in by["reverse_word"].train[:20]:
        assert e.target == e.input.split(": ")[1][::-1]
    assert number_words(347) == "three hundred forty-seven"
    assert number_words(90) == "ninety" and number_words(0) == "zero"


def test_variants_are_new_tasks_of_the_same_families(suite, variants):
    assert len(variants) >= 6
    assert not {t.name for t in variants} & {t.name for t in suite}
    assert {t.family for t in variants} <= {t.family for t in suite}


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
