"""`python -m library_store`: info --json fields, list, import/export/remove, verify's exit code, and errors as
one line on stderr with exit 2 and no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

from library_store.cli import main
from library_store.store.library import ExpertLibrary

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lib(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    expert = random_expert(LLAMA, "alpha", tasks=["reverse_word", "add_two"], cluster="c0")
    expert.info.train.steps, expert.info.train.lr = 50, 1e-3
    lib.add(expert)
    lib.add(random_expert(LLAMA, "beta", seed=1, tasks=["navigate"], cluster="c1", kind="warmup"))
    lib.set_clusters({"c0": ["reverse_word", "add_two"], "c1": ["navigate"]})
    lib.put_derived("prototypes", {"v": 1}, {"x": torch.ones(2)})
    return lib


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_has_the_documented_fields(lib, capsys):
    code, out, _ = run(capsys, "info", lib.root, "--json")
    info = json.loads(out)
    assert code == 0 and info["format_version"] == 1
    assert info["base_model"] == LLAMA_FP and info["base_model"]["source"] == "tiny-random-llama"
    alpha = info["experts"][0]
    assert [e["name"] for e in info["experts"]] == ["alpha", "beta"]
    fields = {"name", "kind", "tasks", "cluster", "rank", "target_modules", "n_params", "train", "available"}
    assert fields <= alpha.keys()
    assert (alpha["kind"], alpha["tasks"]) == ("private", ["reverse_word", "add_two"])
    assert (alpha["cluster"], alpha["rank"]) == ("c0", 4)
    assert alpha["target_modules"] == sorted(LLAMA_SHAPES) and alpha["n_params"] > 0 and alpha["available"]
    assert alpha["train"]["steps"] == 50 and alpha["train"]["lr"] == 1e-3
    assert info["experts"][1]["kind"] == "warmup"
    assert info["clusters"] == {"c0": ["reverse_word", "add_two"], "c1": ["navigate"]}
    assert [(d["kind"], len(d["key"])) for d in info["derived"]] == [("prototypes", 16)]


@pytest.mark.parametrize("verb", ["info", "list", "verify"])
def test_read_verbs_open_the_library_read_only(lib, capsys, monkeypatch, verb):
    opened = []
    real = ExpertLibrary.open.__func__

    def spy(cls, path, *args, **kwargs):
        opened.append(real(cls, path, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(ExpertLibrary, "open", classmethod(spy))
    code, _, _ = run(capsys, verb, lib.root)
    assert code == 0 and opened and all(o.readonly for o in opened)


def test_info_and_list_show_an_unavailable_expert(lib, capsys):
    (lib.root / "experts" / "beta" / "adapter_model.safetensors").unlink()
    code, out, _ = run(capsys, "list", lib.root)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("alpha") and "UNAVAILABLE" not in lines[0]
    assert lines[1].startswith("beta") and "UNAVAILABLE" in lines[1]
    code, out, _ = run(capsys, "info", lib.root)
    assert code == 0 and "tiny-random-llama" in out and "c0: reverse_word, add_two" in out
    assert [e["available"] for e in json.loads(run(capsys, "info", lib.root, "--json")[1])["experts"]] == [True, False]


def test_verify_exits_non_zero_naming_each_broken_expert(lib, capsys):
    code, out, _ = run(capsys, "verify", lib.root)
    assert code == 0 and "ok: 2 experts" in out
    lib.add(random_expert(LLAMA, "gamma", seed=2))
    for name in ("alpha", "gamma"):
        path = lib.root / "experts" / name / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    code, out, err = run(capsys, "verify", lib.root)
    assert code == 1 and "'alpha'" in out and "'gamma'" in out and "'beta'" not in out and "2 problem(s)" in err


def test_export_import_replace_and_remove(lib, tmp_path, capsys):
    dest = tmp_path / "out"
    assert run(capsys, "export", lib.root, "alpha", dest)[0] == 0
    assert sorted(os.listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors"]
    code, out, _ = run(capsys, "import", lib.root, "--peft", dest, "--name", "alpha-copy")
    assert code == 0 and "imported alpha-copy" in out
    copy = ExpertLibrary.open(lib.root)["alpha-copy"]
    assert copy.info.kind == "imported"
    assert all(torch.equal(copy.weights[k], v) for k, v in lib["alpha"].weights.items())
    code, _, err = run(capsys, "import", lib.root, "--peft", dest, "--name", "beta")
    assert code == 2 and "already exists" in err and "--replace" in err
    code, _, _ = run(capsys, "import", lib.root, "--peft", dest, "--name", "beta", "--kind", "private", "--replace")
    assert code == 0 and lib.info("beta").kind == "private" and lib.info("beta").checksum == lib.info("alpha").checksum
    assert run(capsys, "remove", lib.root, "alpha-copy")[0] == 0
    assert lib.names() == ["alpha", "beta"]


@pytest.mark.parametrize("argv, message", [
    (["info", "{tmp}/nowhere"], "No library at"),
    (["import", "{lib}", "--peft", "{tmp}/binonly", "--name", "x"], "safetensors is required"),
    (["import", "{lib}", "--peft", "{tmp}/out", "--name", "../x"], "Invalid expert name"),
    (["export", "{lib}", "nobody", "{tmp}/o2"], "No expert 'nobody'"),
    (["remove", "{lib}", "nobody"], "No expert 'nobody'"),
])
def test_errors_are_one_line_with_exit_2(lib, tmp_path, capsys, argv, message):
    (tmp_path / "binonly").mkdir()
    (tmp_path / "binonly" / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    lib.export("alpha", tmp_path / "out")
    code, out, err = run(capsys, *[a.format(tmp=tmp_path, lib=lib.root) for a in argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


@pytest.mark.slow
def test_python_dash_m_runs_without_traceback(lib, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "library_store", "info", str(lib.root), "--json"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["experts"][0]["name"] == "alpha"
    bad = subprocess.run([sys.executable, "-m", "library_store", "verify", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "No library at" in bad.stderr
