"""Builds on a local Ray (2 CPUs, tiny-random-llama): the same experts as a local build, a killed worker retried,
an interrupted driver resumed, a failed expert named while the others are stored, an unreachable cluster refused
in seconds. One Ray for the module; its files live in a temporary folder that is removed at the end."""
import dataclasses
import os
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from library_store.cli import main
from library_store.store.library import ExpertLibrary
from library_store.training.build import build_mbc, build_private
from library_store.training.executor import BuildFailed
from library_store.training.mbc import MBCConfig, read_mbc
from library_store.training.train import TrainConfig

pytestmark = pytest.mark.slow
TASKS = "builtin:add,subtract,uppercase_word,first_letter"
FAST = TrainConfig(steps=2, batch_size=2, progress=False)
ROOT = Path(__file__).resolve().parents[2]
RAY_DEFAULT_TMP = Path("/tmp/ray")


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def test_unreachable_ray_address_fails_fast_and_leaves_the_library_alone(tmp_path, tiny_llama, capsys):
    from library_store.testing import random_expert

    lib = ExpertLibrary.create(tmp_path / "lib", tiny_llama)
    lib.add(random_expert(tiny_llama, "add", tasks=["add"]))
    before = _tree(tmp_path / "lib")
    start = time.perf_counter()
    code = main(["build", "private", "--base-model", "tiny-random-llama", "--tasks", "builtin:add,subtract",
                 "--out", str(tmp_path / "lib"), "--steps", "2", "--no-progress", "--executor", "ray",
                 "--ray-address", "127.0.0.1:1"])
    assert code == 2 and time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "Cannot reach a Ray cluster at 127.0.0.1:1" in err and "nothing was trained or written" in err
    assert _tree(tmp_path / "lib") == before
    assert main(["build", "private", "--base-model", "tiny-random-llama", "--tasks", "builtin:add",
                 "--out", str(tmp_path / "lib"), "--ray-address", "auto"]) == 2  # local executor: flag refused
    assert "only apply with --executor ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: 2 CPUs, files under a fresh /tmp folder (short: Ray's socket paths must
    fit in 107 bytes), a token held in the environment (so Ray writes no ~/.ray/auth_token)."""
    ray = pytest.importorskip("ray")
    had_default_tmp = RAY_DEFAULT_TMP.exists()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)  # ray.init turns token mode on and finds this token
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the local reference builds run like a worker (1 CPU each): equal sums, equal bits
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
        yield ray
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert not Path(temp_dir).exists()
    assert had_default_tmp or not RAY_DEFAULT_TMP.exists(), "Ray wrote into /tmp/ray"


def _ray(**kwargs):
    from library_store.training.ray_build import RayExecutor

    return RayExecutor(cpus_per_expert=1, **kwargs)


def test_private_build_on_ray_equals_the_local_build(ray_local, tiny_llama, tasks, tmp_path):
    local = build_private(tiny_llama, tasks, tmp_path / "local", FAST, save_dtype="fp32")
    ex = _ray()
    on_ray = build_private(tiny_llama, tasks, tmp_path / "ray", FAST, save_dtype="fp32", executor=ex)
    assert on_ray.checksums() == local.checksums() and len(local) == 4  # fp32: bit for bit
    assert ex.attempts == {t.name: 1 for t in tasks}
    for info in on_ray.infos():
        assert info.train.wall_seconds > 0 and info.train.final_loss == local.info(info.name).train.final_loss


def test_mbc_build_on_ray_equals_the_local_build(ray_local, tiny_llama, tasks, tmp_path):
    def build(out, executor=None):
        return build_mbc(tiny_llama, tasks, tmp_path / out, 2, warmup=dataclasses.replace(FAST, init_seed=0),
                         train=FAST, mbc=MBCConfig(k=2, map_method="pca"), executor=executor)

    local, on_ray = build("local"), build("ray", _ray())
    assert on_ray.checksums() == local.checksums() and len(local) == 6  # 4 warm-up + 2 cluster experts (bf16)
    assert on_ray.clusters() == local.clusters()
    assert read_mbc(on_ray).labels == read_mbc(local).labels


def test_killed_worker_is_retried_and_the_build_completes(ray_local, tiny_llama, tasks, tmp_path):
    victim, killed = "add", []

    def kill_first_start(event):
        if event.name == victim and not killed:
            os.kill(event.pid, signal.SIGKILL)  # the worker process dies mid-task
            killed.append(event.pid)

    ex = _ray(on_start=kill_first_start, max_retries=2)
    steps = {victim: 150}  # long enough to be still training when the kill lands
    lib = build_private(tiny_llama, tasks[:2], tmp_path / "ray", FAST, save_dtype="fp32", task_steps=steps,
                        executor=ex)
    assert killed and ex.attempts[victim] == 2 and ex.attempts[tasks[1].name] == 1
    local = build_private(tiny_llama, tasks[:1], tmp_path / "local", FAST, save_dtype="fp32", task_steps=steps)
    assert lib.checksums()[victim] == local.checksums()[victim]  # the retry trained the same expert
    assert sorted(lib.names()) == sorted(t.name for t in tasks[:2]) and lib.verify() == []


def test_interrupted_driver_resumes_without_retraining(ray_local, tiny_llama, tasks, tmp_path, monkeypatch,
                                                        capsys):
    real_add, stored = ExpertLibrary.add, []

    def add_then_interrupt(self, expert, replace=False):
        if len(stored) == 2:
            raise KeyboardInterrupt  # Ctrl-C on the driver while the third expert arrives
        stored.append(expert.name)
        return real_add(self, expert, replace)

    monkeypatch.setattr(ExpertLibrary, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_private(tiny_llama, tasks, tmp_path / "lib", FAST, executor=_ray())
    monkeypatch.setattr(ExpertLibrary, "add", real_add)
    first = ExpertLibrary.open(tmp_path / "lib").checksums()
    assert sorted(first) == sorted(stored)
    capsys.readouterr()  # the interrupted run's lines
    code = main(["build", "private", "--base-model", "tiny-random-llama", "--tasks", TASKS, "--out",
                 str(tmp_path / "lib"), "--steps", "2", "--batch-size", "2", "--no-progress", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 0, err
    trained = {t.name for t in tasks if f" {t.name}: 2 steps in " in err}  # the CLI's per-expert lines
    assert trained == {t.name for t in tasks} - set(stored)  # only the missing ones ran
    assert all(f"{n}: already in the library, skipped" in err for n in stored)
    lib = ExpertLibrary.open(tmp_path / "lib")
    assert len(lib) == 4 and all(lib.checksums()[n] == c for n, c in first.items()) and lib.verify() == []


def test_failed_expert_is_named_while_the_others_are_stored(ray_local, tiny_llama, tasks, tmp_path):
    broken = dataclasses.replace(tasks[1], train=[])  # no examples: a ValueError, not worth a retry
    ex = _ray()
    with pytest.raises(BuildFailed) as err:
        build_private(tiny_llama, [tasks[0], broken, tasks[2]], tmp_path / "lib", FAST, executor=ex)
    assert set(err.value.failed) == {broken.name} and "no training examples" in err.value.failed[broken.name]
    assert ex.attempts[broken.name] == 1
    assert sorted(ExpertLibrary.open(tmp_path / "lib").names()) == sorted([tasks[0].name, tasks[2].name])
