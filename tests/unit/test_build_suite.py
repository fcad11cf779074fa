"""A build records its task suite: a resume with changed wordings is refused (named), --rebuild retrains only the
changed experts, and a build killed with SIGKILL resumes without retraining what it finished."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from library_store.store.library import ExpertLibrary
from library_store.tasks import resolve_tasks
from library_store.training.build import build_private
from library_store.training.suite_guard import SuiteChanged, check_suite, recorded_suite
from library_store.training.train import TrainConfig

FAST = TrainConfig(steps=2, batch_size=2, progress=False)
ROOT = Path(__file__).resolve().parents[2]


def _with_wordings(task, wordings):
    """The same task asked in other words (what an edited wordings.py would give)."""
    import dataclasses
    ex = [dataclasses.replace(e, input="Please: " + e.input) for e in task.train]
    return dataclasses.replace(task, train=ex, wordings=dataclasses.replace(
        task.wordings, train=["Please: " + w for w in task.wordings.train]))


@pytest.mark.slow
def test_resume_with_changed_wordings_is_refused_then_rebuilt(tiny_llama, tmp_path):
    tasks = resolve_tasks("builtin:add,first_letter")
    lib = build_private(tiny_llama, tasks, tmp_path / "lib", FAST)
    before = lib.checksums()
    changed = [_with_wordings(tasks[0], None), tasks[1]]
    with pytest.raises(SuiteChanged) as err:
        build_private(tiny_llama, changed, tmp_path / "lib", FAST)
    assert "add: wordings changed" in str(err.value) and "first_letter" not in str(err.value)
    assert ExpertLibrary.open(tmp_path / "lib").checksums() == before  # refused: nothing touched
    lib = build_private(tiny_llama, changed, tmp_path / "lib", FAST, rebuild=True)
    after = lib.checksums()
    assert after["first_letter"] == before["first_letter"]  # unchanged task: kept
    assert after["add"] != before["add"]  # changed task: retrained on the new wordings
    assert check_suite(lib, changed) == []  # the new suite is now the recorded one


def test_growing_a_library_with_new_tasks_is_allowed(tmp_path, tiny_llama):
    lib = ExpertLibrary.open_or_create(tmp_path / "lib", tiny_llama)
    check_suite(lib, resolve_tasks("builtin:add"))
    assert check_suite(lib, resolve_tasks("builtin:add,subtract")) == []
    assert sorted(recorded_suite(lib)["tasks"]) == ["add", "subtract"]


def test_library_without_a_suite_record_is_refused(tmp_path, tiny_llama):
    from library_store.testing import random_expert
    lib = ExpertLibrary.open_or_create(tmp_path / "lib", tiny_llama)
    lib.add(random_expert(tiny_llama, "add", tasks=["add"]))
    with pytest.raises(SuiteChanged, match="no record of the task suite"):
        check_suite(lib, resolve_tasks("builtin:add"))
    assert check_suite(lib, resolve_tasks("builtin:add"), rebuild=True) == ["add"]


@pytest.mark.slow
def test_build_killed_with_sigkill_resumes_without_retraining(tmp_path):
    out = tmp_path / "lib"
    cmd = [sys.executable, "-m", "library_store", "build", "private", "--base-model", "tiny-random-llama",
           "--tasks", "builtin:add,subtract,first_letter,uppercase_word", "--out", str(out), "--steps", "30",
           "--batch-size", "2", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until two experts are in, then kill -9 mid-way through the third
        line = proc.stderr.readline()
        if line.startswith("[2/4]"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = ExpertLibrary.open(out).checksums()
    assert set(done) >= {"add", "subtract"} and len(done) < 4
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for name in done:
        assert f"{name}: already in the library, skipped" in res.stderr
    final = ExpertLibrary.open(out).checksums()
    assert len(final) == 4 and all(final[n] == c for n, c in done.items())
