"""MBC warm-ups copied from a private library (`--warmup-from`) instead of trained again."""
import pytest
import torch

from library_store.cli import main
from library_store.store.library import ExpertLibrary
from library_store.tasks import resolve_tasks
from library_store.training import build as build_mod
from library_store.training.build import build_mbc, build_private
from library_store.training.mbc import MBCConfig, read_mbc, warmup_name
from library_store.training.suite_guard import SuiteChanged
from library_store.training.train import TrainConfig
from library_store.training.warmup_from import WarmupSourceError

TASKS = "builtin:add,subtract,uppercase_word,first_letter"
FAST = dict(steps=2, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def private(_twins, tasks, tmp_path_factory):
    """A 4-expert private library (2 steps each), built once for the module."""
    return build_private(_twins("tiny-random-llama"), tasks, tmp_path_factory.mktemp("p") / "lib",
                         TrainConfig(**FAST)).root


@pytest.mark.slow
def test_warmups_are_the_private_experts_and_none_is_trained(tiny_llama, tasks, private, tmp_path, monkeypatch):
    trained = []
    real = build_mod.train_expert
    monkeypatch.setattr(build_mod, "train_expert", lambda *a, **k: trained.append(a[2]) or real(*a, **k))
    lib = build_mbc(tiny_llama, tasks, tmp_path / "mbc", 2, warmup=TrainConfig(**FAST, init_seed=0),
                    train=TrainConfig(**FAST), mbc=MBCConfig(k=2, map_method="pca"), warmup_from=private)
    src = ExpertLibrary.open(private)
    for t in tasks:
        copy = lib[warmup_name(t.name)]
        assert copy.info.kind == "warmup" and copy.info.tasks == [t.name]
        for key, w in src[t.name].weights.items():
            assert torch.equal(copy.weights[key], w)
    assert all(name.startswith("cluster-") for name in trained)  # only the cluster experts trained
    data = read_mbc(lib)
    assert data.settings["warmup_from"] == str(private) and data.settings["warmup"]["steps"] == 2
    assert sorted(src.names()) == sorted(t.name for t in tasks)  # the source library is untouched


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(rank=8), "did not start from the warm-up init: rank 4 \\(warm-ups: 8\\)"),
    (dict(init_seed=3), "init seed 0 \\(warm-ups: 3\\)"),
])
def test_another_init_is_refused_naming_it(tiny_llama, tasks, private, tmp_path, change, message):
    warm = TrainConfig(**{**FAST, "init_seed": 0, **change})
    with pytest.raises(WarmupSourceError, match=message):
        build_mbc(tiny_llama, tasks, tmp_path / "mbc", 2, warmup=warm, train=TrainConfig(**FAST),
                  mbc=MBCConfig(k=2, map_method="pca"), warmup_from=private)


@pytest.mark.slow
def test_a_task_without_a_private_expert_is_refused(tiny_llama, tasks, private, tmp_path):
    more = tasks + resolve_tasks("builtin:reverse_word")
    with pytest.raises(WarmupSourceError, match="has no private expert for reverse_word"):
        build_mbc(tiny_llama, more, tmp_path / "mbc", 2, warmup=TrainConfig(**FAST, init_seed=0),
                  train=TrainConfig(**FAST), mbc=MBCConfig(k=2, map_method="pca"), warmup_from=private)


@pytest.mark.slow
def test_a_changed_suite_is_refused(tiny_llama, tasks, private, tmp_path):
    other = resolve_tasks("builtin:" + ",".join(t.name for t in tasks), seed=5)  # other examples
    with pytest.raises(SuiteChanged, match="differs from the one"):
        build_mbc(tiny_llama, other, tmp_path / "mbc", 2, warmup=TrainConfig(**FAST, init_seed=0),
                  train=TrainConfig(**FAST), mbc=MBCConfig(k=2, map_method="pca"), warmup_from=private)


@pytest.mark.slow
def test_cli_refuses_a_missing_source_with_exit_2(tmp_path, capsys):
    code = main(["build", "mbc", "--base-model", "tiny-random-llama", "--tasks", "builtin:add,subtract",
                 "--clusters", "2", "--out", str(tmp_path / "mbc"), "--steps", "1", "--no-progress",
                 "--warmup-from", str(tmp_path / "nothing")])
    assert code != 0
    assert "No library at" in capsys.readouterr().err
