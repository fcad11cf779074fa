"""The store under faults: `kill -9` at every point of a write, and four processes writing at once.

A forked child stops itself with SIGKILL at a named `store_io.crash_point` (cheap: no new interpreter, yet a
real process with its own SQLite connections and file lock); one test kills a fresh interpreter from outside.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

from library_store.store import io as store_io
from library_store.store.library import ExpertLibrary

HELPER = Path(__file__).parent / "store_helpers" / "add_expert.py"
BIG_RANK = 128  # ~0.5 MB of weights: large enough that the write takes real file operations


def new_library(root: Path) -> ExpertLibrary:
    lib = ExpertLibrary.create(root, LLAMA_FP, module_shapes=LLAMA_SHAPES)
    lib.add(random_expert(LLAMA, "keep", seed=0))
    return lib


def killed_at(point: str, action) -> None:
    """Run `action` in a forked child that SIGKILLs itself on reaching `point`; assert it died there."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            store_io.crash_point = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == point else None
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child did not die at {point}"


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in [*root.glob(".tmp-*"), *root.glob(".old-*")])


def assert_consistent(lib: ExpertLibrary) -> None:
    assert lib.verify() == []
    assert sorted(os.listdir(lib.root / "experts")) == lib.names()


FRESH_POINTS = ["after_temp_write", "after_journal", "after_rename", "before_commit", "after_commit"]
REPLACE_POINTS = ["after_temp_write", "after_journal", "after_old_aside", "after_rename", "before_commit",
                  "after_commit"]


@pytest.mark.parametrize("replace, point", [(False, p) for p in FRESH_POINTS] + [(True, p) for p in REPLACE_POINTS])
def test_kill_9_mid_add_leaves_the_previous_library(tmp_path, replace, point):
    lib = new_library(tmp_path / "lib")
    if replace:
        lib.add(random_expert(LLAMA, "big", seed=1, rank=BIG_RANK))
    before = lib.checksums()
    new = random_expert(LLAMA, "big", seed=2, rank=BIG_RANK)
    killed_at(point, lambda: ExpertLibrary.open(lib.root, readonly=False).add(new, replace=replace))

    committed = point == "after_commit"
    # Nothing half-written is visible, even to a reader that does not recover anything.
    peek = ExpertLibrary.open(lib.root, readonly=True)
    assert peek.names() == sorted({*before, *(["big"] if committed else [])})
    again = ExpertLibrary.open(lib.root, readonly=False)  # a writable open undoes the dead writer's renames
    assert_consistent(again)
    if committed:
        assert all(torch.equal(again["big"].weights[k], v) for k, v in new.weights.items())
    else:
        assert again.checksums() == before
        if replace:
            assert all(torch.equal(again["big"].weights[k], v)
                       for k, v in random_expert(LLAMA, "big", seed=1, rank=BIG_RANK).weights.items())
    again.add(random_expert(LLAMA, "next", seed=5))  # the next write cleans every leftover
    assert leftovers(again.root) == [] and again.verify() == []


@pytest.mark.parametrize("point", ["after_journal", "after_old_aside", "before_commit"])
def test_kill_9_mid_remove_keeps_the_expert(tmp_path, point):
    lib = new_library(tmp_path / "lib")
    killed_at(point, lambda: ExpertLibrary.open(lib.root, readonly=False).remove("keep"))
    again = ExpertLibrary.open(lib.root, readonly=False)
    assert again.names() == ["keep"] and again["keep"].weights
    assert_consistent(again)


@pytest.mark.parametrize("point", ["after_old_aside", "after_rename", "before_commit"])
def test_kill_9_mid_derived_write_keeps_the_old_entry(tmp_path, point):
    lib = new_library(tmp_path / "lib")
    lib.put_derived("proto", {"v": 1}, {"x": torch.zeros(4)}, {"n": 1})
    new = {"x": torch.ones(8)}
    killed_at(point, lambda: ExpertLibrary.open(lib.root, readonly=False).put_derived("proto", {"v": 1}, new, {"n": 2}))
    again = ExpertLibrary.open(lib.root, readonly=False)
    tensors, meta = again.get_derived("proto", {"v": 1})
    assert meta == {"n": 1} and torch.equal(tensors["x"], torch.zeros(4)) and again.verify() == []


def _helper(lib: Path, name: str, seed: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, str(HELPER), str(lib), name, str(seed), str(BIG_RANK), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_kill_9_from_outside_a_fresh_interpreter(tmp_path):
    lib = new_library(tmp_path / "lib")
    lib.add(random_expert(LLAMA, "big", seed=1, rank=BIG_RANK))
    before = lib.checksums()
    marker = tmp_path / "reached"
    proc = _helper(lib.root, "big", 7, "--replace", "--pause-at", "after_rename", "--marker", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "helper never reached the pause point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the new expert is in place, the index not yet committed
    assert proc.wait() == -signal.SIGKILL
    again = ExpertLibrary.open(lib.root, readonly=False)
    assert again.checksums() == before
    assert_consistent(again)


def test_threads_sharing_one_handle_can_write_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    lib = new_library(tmp_path / "lib")  # one handle, as the page's worker threads would share it
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: lib.add(random_expert(LLAMA, f"t{i}", seed=i)), range(4)))
    assert lib.names() == ["keep", "t0", "t1", "t2", "t3"]
    assert_consistent(lib)


@pytest.mark.slow
def test_four_processes_adding_at_once_all_land(tmp_path):
    lib = new_library(tmp_path / "lib")
    release_r, release_w = os.pipe()  # children block on it, then all start writing at the same moment
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.close(release_w)
                os.read(release_r, 1)
                lib_here = ExpertLibrary.open(lib.root, readonly=False)
                lib_here.add(random_expert(LLAMA, f"proc{i}", seed=10 + i, rank=BIG_RANK))
                lib_here.add_score(f"proc{i}", "t1", "exact_match", i / 4)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(release_r)
    os.close(release_w)  # EOF for every child: go
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0] * 4
    again = ExpertLibrary.open(lib.root, readonly=False)
    assert again.names() == ["keep", "proc0", "proc1", "proc2", "proc3"]
    for i in range(4):
        expected = random_expert(LLAMA, f"proc{i}", seed=10 + i, rank=BIG_RANK)
        assert all(torch.equal(again[f"proc{i}"].weights[k], v) for k, v in expected.weights.items())
    assert sorted(s["expert"] for s in again.scores()) == ["proc0", "proc1", "proc2", "proc3"]
    assert_consistent(again)
    assert leftovers(again.root) == []
