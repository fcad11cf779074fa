"""Library builds end to end on the tiny random Llama with 4 built-in tasks (two families)."""
import pytest
import torch

from library_store.training import build as build_mod
from library_store.training.build import build_mbc, build_private
from library_store.cli import main
from library_store.training.mbc import MAP_KIND, SIMILARITY_KIND, MBCConfig, read_mbc
from library_store.store.library import ExpertLibrary
from library_store.training.train import TrainConfig

TASKS = "builtin:add,subtract,uppercase_word,first_letter"
FAST = dict(steps=2, batch_size=2, progress=False)


@pytest.mark.slow
def test_private_build(tiny_llama, tasks, tmp_path):
    lib = build_private(tiny_llama, tasks, tmp_path / "lib", TrainConfig(**FAST))
    assert sorted(lib.names()) == sorted(t.name for t in tasks)
    for info in lib.infos():
        assert info.kind == "private" and info.tasks == [info.name] and info.train.steps == 2
    expert = lib["add"]
    assert all(w.dtype == torch.bfloat16 for w in expert.weights.values())  # bf16 on disk, half the size


@pytest.mark.slow
def test_private_build_resumes_after_interruption(tiny_llama, tasks, tmp_path, monkeypatch):
    real = build_mod.train_expert
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third expert
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "train_expert", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_private(tiny_llama, tasks, tmp_path / "lib", TrainConfig(**FAST))
    assert len(ExpertLibrary.open(tmp_path / "lib")) == 2
    calls.clear()
    lib = build_private(tiny_llama, tasks, tmp_path / "lib", TrainConfig(**FAST))
    assert calls == [t.name for t in tasks[2:]]  # only the missing experts were trained
    assert len(lib) == 4 and lib.verify() == []


@pytest.mark.slow
def test_mbc_build(tiny_llama, tasks, tmp_path):
    lib = build_mbc(tiny_llama, tasks, tmp_path / "mbc", 2, warmup=TrainConfig(**FAST, init_seed=0),
                    train=TrainConfig(**FAST), mbc=MBCConfig(k=2, map_method="pca"))
    infos = {i.name: i for i in lib.infos()}
    warm = [i for i in infos.values() if i.kind == "warmup"]
    clus = [i for i in infos.values() if i.kind == "cluster"]
    assert len(warm) == 4 and len(clus) == 2
    assert all(i.train.init_seed == 0 for i in warm)
    clusters = lib.clusters()
    assert sorted(clusters) == ["cluster-0", "cluster-1"]
    assert sorted(t for ts in clusters.values() for t in ts) == sorted(t.name for t in tasks)
    for c in clus:
        assert c.cluster == c.name and sorted(c.tasks) == sorted(clusters[c.name])
    for w in warm:
        assert w.tasks[0] in clusters[w.cluster]
    assert {"mbc-init", SIMILARITY_KIND, MAP_KIND} <= {d["kind"] for d in lib.list_derived()}
    data = read_mbc(lib)
    assert data.tasks == [t.name for t in tasks] and data.experts == [f"warmup-{t.name}" for t in tasks]
    assert data.settings["mbc"]["delta"] is True and data.method == "pca"
    assert data.families == [t.family for t in tasks] and data.ari_vs_families is not None
    assert data.similarity.shape == (4, 4) and data.coords.shape == (4, 2) and data.raw_similarity.shape == (4, 4)
    assert data.clusters == clusters  # the cluster table is the stored clustering
    assert data.cluster_of == {w.tasks[0]: w.cluster for w in warm} == lib.cluster_of()

    before = {n: lib.info(n).checksum for n in lib.names()}
    again = build_mbc(tiny_llama, tasks, tmp_path / "mbc", 2, warmup=TrainConfig(**FAST, init_seed=0),
                      train=TrainConfig(**FAST), mbc=MBCConfig(k=2, map_method="pca"))
    assert {n: again.info(n).checksum for n in again.names()} == before  # resumed: nothing retrained


@pytest.mark.parametrize("k", [1, 5])
def test_bad_k_refused(tiny_llama, tasks, tmp_path, k):
    with pytest.raises(ValueError, match="clusters"):
        build_mbc(tiny_llama, tasks, tmp_path / "x", k, warmup=TrainConfig(**FAST), train=TrainConfig(**FAST))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_builds(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build", "private", "--base-model", "tiny-random-llama", "--tasks", "builtin:add,subtract",
                 "--out", str(out), "--steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    assert sorted(ExpertLibrary.open(out).names()) == ["add", "subtract"]
    assert "subtract: 2 steps" in capsys.readouterr().err
    assert main(["build", "private", "--base-model", "tiny-random-llama", "--tasks", "builtin:add,subtract",
                 "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert "already in the library, skipped" in capsys.readouterr().err


def test_cli_refuses_bad_k_and_unknown_task(tmp_path, capsys):
    args = ["build", "mbc", "--base-model", "tiny-random-llama", "--out", str(tmp_path / "m"), "--no-progress"]
    assert main(args + ["--tasks", "builtin:add,subtract", "--clusters", "3"]) == 2
    assert "more than the 2 tasks" in capsys.readouterr().err
    assert main(args + ["--tasks", "builtin:add,subtract", "--clusters", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(args + ["--tasks", "builtin:ad", "--clusters", "2"]) == 2
    assert "Did you mean: add" in capsys.readouterr().err
