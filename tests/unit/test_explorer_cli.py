"""`python -m explorer generate|trace` on a tiny twin and a tiny library written to tmp."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from arrow_helpers import experts, fresh

from explorer.cli import main
from library_store.store.library import ExpertLibrary

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "lib"
    base = fresh("tiny-random-llama")
    lib = ExpertLibrary.create(path, base)
    for e in experts(base, 3):
        lib.add(e)
    return str(path)


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_trace_json_via_subprocess(library):
    res = run("trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "Reverse: apple",
              "--top-k", "2", "--temperature", "0.5", "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    for key in ("tokens", "is_generated", "layers", "modules", "experts", "weights", "top_k", "temperature", "text"):
        assert key in data
    n = len(data["tokens"])
    assert sum(data["is_generated"]) == 3 and data["experts"] == ["e0", "e1", "e2"]
    assert (data["top_k"], data["temperature"]) == (2, 0.5) and data["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    w = data["weights"]  # [layer][module][token][expert]
    assert (len(w), len(w[0]), len(w[0][0]), len(w[0][0][0])) == (2, 4, n, 3)
    assert all(sum(1 for x in row if x > 0) == 2 for row in w[1][3])


def test_error_is_one_line_with_status_2_via_subprocess(library):
    res = run("trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "x", "--top-k", "9")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["error: top_k must be between 1 and 3 (the number of enabled "
                                               "experts), got 9"]


def test_generate_base_and_routed(library, capsys):
    assert main(["generate", "--base-model", "tiny-random-llama", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == fresh("tiny-random-llama").generate("hi", max_new_tokens=3) + "\n"
    assert main(["generate", "--base-model", "tiny-random-llama", "--library", library, "--top-k", "3",
                 "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_trace_summary_without_json(library, capsys):
    assert main(["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "hi",
                 "--top-k", "1", "--max-new-tokens", "2", "--mode", "expert:e1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mode=expert:e1 top_k=1") and "e1" in out.splitlines()[-2]


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0"], r"temperature must be in \(0, inf\), got 0.0"),
    (["--mode", "expert:nope", "--top-k", "2"], r"Unknown expert 'nope'"),
    (["--disable", "e0,e1,e2", "--top-k", "1"], r"Every expert is disabled"),
    (["--base-model", "tiny-random-phi"], r"built for another base model"),
    (["--library", "/nonexistent/lib"], r"No library at /nonexistent/lib"),
    (["--base-model", "no-such-model"], r"Unknown base model 'no-such-model'"),
])
def test_bad_input_is_one_line_exit_2(library, capsys, args, message):
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "x", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
