"""`python -m explorer generate|trace` on a tiny twin and a tiny library written to tmp."""
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from arrow_helpers import experts, fresh

from explorer.cli import main
from library_store.store.library import ExpertLibrary

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("module_derived_cache")  # an empty derived cache for this module


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


@pytest.mark.slow
def test_trace_json_via_subprocess(library):
    res = run("trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "Reverse: apple",
              "--top-k", "2", "--temperature", "0.5", "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    for key in ("tokens", "is_generated", "layers", "modules", "experts", "weights", "router", "text", "user_span",
                "formatted_prompt", "library"):
        assert key in data
    n = len(data["tokens"])
    assert sum(data["is_generated"]) == 3 and data["experts"] == ["e0", "e1", "e2"]
    router = data["router"]
    assert (router["mode"], router["top_k"], router["temperature"], router["disabled"]) == ("arrow", 2, 0.5, [])
    assert data["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and data["library"]["name"] == "lib"
    w = data["weights"]  # [layer][module][token][expert]
    assert (len(w), len(w[0]), len(w[0][0]), len(w[0][0][0])) == (2, 4, n, 3)
    assert all(sum(1 for x in row if x > 0) == 2 for row in w[1][3])


@pytest.mark.slow
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


def test_per_token_summary_says_what_the_user_text_leans_to(library, capsys):
    assert main(["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "hi there",
                 "--top-k", "2", "--max-new-tokens", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mode=arrow") and lines[1].startswith("Per token: your text leans to e")


def tree_digest(root) -> dict[str, str]:
    """path -> sha256 of every file of a library folder, but SQLite's side files (-shm, -wal: a reader's
    shared memory, ignored by git; the committed index is library.sqlite alone)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


@pytest.mark.parametrize("folder_writable", [False, True])
def test_trace_leaves_the_library_byte_identical(library, tmp_path, capsys, monkeypatch, folder_writable):
    """As `python -m explorer trace --library assets/libraries/demo-private ...` must: nothing written, not even
    the prototype cache (it goes to the user cache), whether the folder is read-only (a copy without write
    permission) or writable (the command opens it read-only). Root ignores permissions: the bytes are compared."""
    monkeypatch.setenv("LORA_EXPLORER_DERIVED_CACHE", str(tmp_path / "cache"))  # empty: prototypes are computed
    copy = Path(shutil.copytree(library, tmp_path / "lib"))
    paths = [copy, *copy.rglob("*")]
    if not folder_writable:
        for path in paths:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = tree_digest(copy)
    try:
        for _ in range(2):  # the second run reads what the first cached
            assert main(["trace", "--base-model", "tiny-random-llama", "--library", str(copy), "--prompt", "hi",
                         "--top-k", "2", "--max-new-tokens", "2", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["experts"] == ["e0", "e1", "e2"]
        assert tree_digest(copy) == before and any((tmp_path / "cache").rglob("*.safetensors"))
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_settings_are_checked_by_the_page_normaliser(library, capsys):
    """Strict: the page would clamp an unknown disabled expert with a notice; the command line refuses it."""
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "x", "--top-k", "1"]
    assert main([*argv, "--disable", "e0,nope"]) == 2
    assert "Cannot disable unknown experts ['nope']" in capsys.readouterr().err
    assert main([*argv, "--max-new-tokens", "-1"]) == 2
    assert "max_new_tokens must be between 0 and" in capsys.readouterr().err
    assert main(["generate", "--base-model", "tiny-random-llama", "--prompt", "  "]) == 2
    assert "The prompt is empty" in capsys.readouterr().err


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


# ---------------------------------------------------------------- centring and the library's default router


def test_centre_flags_reach_the_trace(library, capsys):
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "hi", "--top-k", "2",
            "--json"]
    assert main([*argv, "--centre", "mean", "--centre-scope", "weights"]) == 0
    router = json.loads(capsys.readouterr().out)["router"]
    assert (router["centre"], router["centre_scope"]) == ("mean", "weights")
    assert main(argv) == 0  # no flag, no recorded default: no centring
    assert json.loads(capsys.readouterr().out)["router"]["centre"] == "none"
    assert main(["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "hi",
                 "--top-k", "1", "--centre", "mean"]) == 0
    assert "centre=mean scope=prototypes" in capsys.readouterr().out.splitlines()[0]


def test_input_centre_flag_is_in_help_and_reaches_the_trace(library, capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    assert "--input-centre {none,base}" in capsys.readouterr().out
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "hi", "--top-k", "2"]
    assert main([*argv, "--input-centre", "base", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["router"]["input_centre"] == "base"
    assert main([*argv, "--json"]) == 0  # no flag, no recorded default: none
    assert json.loads(capsys.readouterr().out)["router"]["input_centre"] == "none"
    assert main([*argv, "--input-centre", "base"]) == 0
    assert "input_centre=base" in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(SystemExit):
        main([*argv, "--input-centre", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--centre", "general:nope"], r"No expert 'nope' to centre on .* the library has \['e0', 'e1', 'e2'\]"),
    (["--centre", "sideways"], r"Unknown centre 'sideways': use one of none, mean, general:<expert>"),
    (["--centre", "mean", "--disable", "e0"], None),  # disabling does not change what is routed: mean is fine
])
def test_bad_centring_is_one_line_exit_2(library, capsys, args, message):
    code = main(["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "x", "--top-k",
                 "1", *args])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_mean_centring_of_a_two_expert_library_is_refused_with_the_engines_reason(tmp_path, capsys):
    path = tmp_path / "two"
    base = fresh("tiny-random-llama")
    lib = ExpertLibrary.create(path, base)
    for e in experts(base, 2):
        lib.add(e)
    assert main(["trace", "--base-model", "tiny-random-llama", "--library", str(path), "--prompt", "x",
                 "--top-k", "1", "--centre", "mean"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 3 routed experts; this library routes 2" in err and len(err.strip().splitlines()) == 1


def test_recorded_default_router_is_used_unless_flags_override(library, tmp_path, capsys):
    from library_store.store.reports import write_default_router

    copy = shutil.copytree(library, tmp_path / "lib")
    write_default_router(ExpertLibrary.open(copy, readonly=False),
                         {"mode": "arrow", "top_k": 1, "temperature": 0.5, "disabled": [], "centre": "mean",
                          "centre_scope": "weights"}, evidence={"rule": "test"}, command="test")
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", str(copy), "--prompt", "hi", "--json"]
    assert main(argv) == 0
    router = json.loads(capsys.readouterr().out)["router"]
    assert (router["top_k"], router["temperature"], router["centre"], router["centre_scope"]) == (1, 0.5, "mean",
                                                                                                 "weights")
    assert main([*argv, "--top-k", "3", "--centre", "none", "--temperature", "2"]) == 0
    router = json.loads(capsys.readouterr().out)["router"]
    assert (router["top_k"], router["temperature"], router["centre"], router["centre_scope"]) == (3, 2.0, "none",
                                                                                                 "weights")


def test_recorded_input_centring_is_used_unless_the_flag_overrides(library, tmp_path, capsys):
    from library_store.store import reports

    copy = shutil.copytree(library, tmp_path / "lib")
    reports.write_default_router(ExpertLibrary.open(copy, readonly=False),
                                 {"mode": "arrow", "top_k": 2, "temperature": 1.0, "disabled": [], "centre": "none",
                                  "centre_scope": "prototypes", "input_centre": "base"},
                                 evidence={"rule": "test"}, command="test")
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", str(copy), "--prompt", "hi", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["router"]["input_centre"] == "base"
    assert main([*argv, "--input-centre", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["router"]["input_centre"] == "none"


def test_granularity_flag_picks_one_expert_per_prompt_and_follows_the_recorded_default(library, tmp_path, capsys):
    from library_store.store import reports

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--granularity {token,prompt}" in capsys.readouterr().out
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", library, "--prompt", "Count: one two",
            "--top-k", "2", "--max-new-tokens", "3"]
    assert main([*argv, "--granularity", "prompt", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["router"]["granularity"] == "prompt" and data["evidence"]["router"]["granularity"] == "token"
    assert main([*argv, "--granularity", "prompt"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "granularity=prompt" in out[0] and out[1].startswith("Per prompt:")
    picked = re.search(r"(\S+) alone answered\.", out[1]).group(1)  # (an uncertain pick says more after it)
    assert main(["generate", *argv[1:], "--granularity", "prompt"]) == 0  # same router: same pick
    by_prompt = capsys.readouterr().out
    assert main(["generate", *argv[1:], "--mode", f"expert:{picked}"]) == 0
    assert by_prompt == capsys.readouterr().out  # the pick answers alone
    with pytest.raises(SystemExit):
        main([*argv, "--granularity", "sentence"])
    assert "invalid choice: 'sentence'" in capsys.readouterr().err
    copy = shutil.copytree(library, tmp_path / "lib")
    reports.write_default_router(ExpertLibrary.open(copy, readonly=False),
                                 {"mode": "arrow", "top_k": 2, "temperature": 1.0, "disabled": [], "centre": "none",
                                  "centre_scope": "prototypes", "input_centre": "none", "granularity": "prompt"},
                                 evidence={"rule": "test"}, command="test")
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", str(copy), "--prompt", "hi", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["router"]["granularity"] == "prompt"
    assert main([*argv, "--granularity", "token"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["router"]["granularity"] == "token" and data["evidence"] is None


def test_pick_readout_is_refused_without_a_fitted_readout_and_used_with_one(library, tmp_path, capsys):
    import numpy as np

    from explorer.routing.config import RouterConfig
    from explorer.routing.readout import Readout, readout_key
    from library_store.store import reports

    copy = shutil.copytree(library, tmp_path / "lib")
    argv = ["trace", "--base-model", "tiny-random-llama", "--library", str(copy), "--prompt", "Count: one two",
            "--top-k", "2", "--granularity", "prompt", "--pick", "readout"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No pick readout is fitted for this library" in err and len(err.strip().splitlines()) == 1
    layers = list(range(fresh("tiny-random-llama").model.config.num_hidden_layers))
    names = ["e0", "e1", "e2"]
    readout = Readout(names, layers, names, np.zeros((3, 3 * len(layers))), np.array([0.0, 0.0, 4.0]))
    reports.write_readout(ExpertLibrary.open(copy, readonly=False),
                          readout_key(RouterConfig(top_k=2, temperature=1.0)), *readout.to_tensors())
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "pick=readout" in out[0] and "readout" in out[1] and "e2 alone answered" in out[1]
