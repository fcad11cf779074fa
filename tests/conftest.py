"""Shared fixtures: the tiny twins loaded once per session, tiny libraries built once, tasks and trained experts
shared within a module.

Usage::

    def test_x(tiny_llama):             # the session's tiny-random-llama; must be left unwrapped
    def test_y(fresh_tiny):             # fresh_tiny("tiny-random-phi"): a private copy to change freely
    def test_z(tiny_mbc_library):       # a path; open it read-only (its files are read-only)
    TASKS = "builtin:add,subtract"      # at module level, then `tasks` resolves it once per module
    def test_w(trained): trained(base, tasks[:1], "add", TrainConfig(steps=2))   # trained once per session
"""
import copy
import os
import stat
from pathlib import Path

import pytest

# No network here: never let a library try a hub or send analytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def module_derived_cache(tmp_path_factory):
    """An empty derived-data cache for one test module (so its libraries' prototypes are really computed);
    use with `pytestmark = pytest.mark.usefixtures("module_derived_cache")`. Subprocesses inherit it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_EXPLORER_DERIVED_CACHE", str(tmp_path_factory.mktemp("derived-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def _derived_cache(tmp_path_factory):
    """Caches of read-only libraries go to a per-session folder, not the user's cache."""
    from library_store.store.user_cache import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("derived-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


# ---------------------------------------------------------------- tiny base models


@pytest.fixture(scope="session")
def _twins():
    """kind -> BaseModel, each loaded on first use (the first load costs ~3 s, a copy ~0.1 s)."""
    from library_store.models import load_base_model

    loaded = {}

    def get(kind: str):
        if kind not in loaded:
            loaded[kind] = load_base_model(kind)
        return loaded[kind]

    return get


def _shape_of(base) -> tuple:
    model = base.model
    return (tuple(type(m).__name__ for _, m in model.named_modules()), model.training,
            tuple(p.requires_grad for p in model.parameters()))


def _shared(base):
    """Yield the shared twin, then fail the test that left it wrapped, trainable or in training mode."""
    before = _shape_of(base)
    yield base
    assert _shape_of(base) == before, (
        f"the shared {base.source} was left changed (wrapped modules, training mode or requires_grad): "
        "detach what you attach, or use fresh_tiny() for a private copy")


@pytest.fixture
def tiny_llama(_twins):
    yield from _shared(_twins("tiny-random-llama"))


@pytest.fixture
def tiny_phi(_twins):
    yield from _shared(_twins("tiny-random-phi"))


@pytest.fixture
def fresh_tiny(_twins):
    """A factory of private deep copies (same weights as the shared twin), free to wrap or change."""
    return lambda kind="tiny-random-llama": copy.deepcopy(_twins(kind))


# ---------------------------------------------------------------- tiny libraries (read-only)


def _freeze(root: Path) -> None:
    """Make a fixture library read-only, so a test that writes into it fails instead of leaking state."""
    for path in [*root.rglob("*"), root]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory, _twins) -> str:
    """Five private experts on tiny-random-llama, two clusters, MBC data (`make_tiny_library`)."""
    from library_store.testing import make_tiny_library

    path = make_tiny_library(tmp_path_factory.mktemp("libs") / "tiny", n_experts=5,
                             base=_twins("tiny-random-llama"))
    _freeze(Path(path))
    return path


@pytest.fixture(scope="session")
def tiny_mbc_library(tmp_path_factory, _twins) -> str:
    """Six warm-up experts, two `cluster-<i>` experts, MBC data (`make_tiny_mbc_library`)."""
    from library_store.testing import make_tiny_mbc_library

    path = make_tiny_mbc_library(tmp_path_factory.mktemp("libs") / "tiny-mbc", n_tasks=6, k=2,
                                 base=_twins("tiny-random-llama"))
    _freeze(Path(path))
    return path


# ---------------------------------------------------------------- tasks and trained experts


@pytest.fixture(scope="module")
def tasks(request):
    """The test module's `TASKS` spec (e.g. "builtin:add,subtract"), resolved once per module."""
    from library_store.tasks import resolve_tasks

    return resolve_tasks(getattr(request.module, "TASKS"))


@pytest.fixture(scope="session")
def trained():
    """trained(base, tasks, name, config, kind="private") -> LoraExpert, trained once per session for the
    same (base, tasks, name, kind, config); callers must not change the expert they get."""
    from library_store.training.train import train_expert

    done = {}

    def get(base, tasks, name, config, kind="private"):
        key = (base.source, tuple(t.name for t in tasks), name, kind, repr(config))
        if key not in done:
            done[key] = train_expert(base, tasks, name, kind, config)
        return done[key]

    return get
