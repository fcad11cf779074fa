"""The page's model calls all run on one long-lived thread (explorer/page/model_thread.py): a run, a streamed run,
the comparison, a counterfactual and a library edit, whichever thread the page calls back on."""
import threading

import pytest

from explorer.page import callbacks as cb
from explorer.page import callbacks_cell as cc
from explorer.page import registry as registry_module
from explorer.page.model_thread import ModelThread, in_passing
from explorer.page.registry import Registry
from explorer.page.request import RawRequest
from explorer.page.session import Session
from explorer.page.stream import stream_run
from library_store.models import load_base_model
from library_store.testing import TINY, make_tiny_library
from upload_fixtures import aligned_adapter

pytestmark = pytest.mark.usefixtures("module_derived_cache")


def test_jobs_share_one_thread_nest_inline_and_raise_where_called():
    worker = ModelThread()
    idents = {worker.call(threading.get_ident) for _ in range(3)}
    assert len(idents) == 1 and idents != {threading.get_ident()}
    assert worker.call(worker.call, threading.get_ident) == idents.pop()  # a job calling in again: no deadlock
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    assert worker.submit(lambda x: x + 1, 1).result() == 2
    thread = worker._thread
    del worker  # the page's registry is gone: so is its thread
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_waiting_for_the_load_on_the_model_thread_is_refused(tmp_path):
    reg = Registry(TINY, [make_tiny_library(tmp_path / "lib", n_experts=2)])
    with pytest.raises(RuntimeError, match="never return"):
        reg.model_thread.call(reg.wait)  # queued before the load: waiting there would hang the page
    assert reg.wait(timeout=300)  # the load itself still runs, after that job
    assert reg.model_thread.call(reg.wait)  # once loaded, waiting there returns at once


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-thread")
    reg = Registry(TINY, [make_tiny_library(root / "lib", n_experts=3)])
    assert reg.wait(timeout=300), reg.status()
    seen: list[int] = []  # the thread of every forward of the base model
    reg.base.model.register_forward_pre_hook(lambda *_: seen.append(threading.get_ident()))
    return Session(reg), seen, root


def model_threads(seen: list[int], action) -> set[int]:
    seen.clear()
    action()
    assert seen, "the action ran no forward"
    return set(seen)


def test_every_model_call_of_the_page_runs_on_the_model_thread(page):
    session, seen, root = page
    reg = session.registry
    home = {reg.model_thread.call(threading.get_ident)}
    raw = RawRequest(prompt="Reverse the word: apple", library="lib", top_k=2, max_new_tokens=3)
    assert model_threads(seen, lambda: session.run(raw)) == home
    assert model_threads(seen, lambda: list(stream_run(session, raw))) == home
    done = session.run(raw)
    assert model_threads(seen, lambda: session.compare(done.request, done.trace)) == home
    trace = done.trace
    cell = f"{trace.layers[0]}, {trace.n_prompt - 1}"
    out: list = []
    assert model_threads(seen, lambda: out.extend(cc.counterfactual(session, done, "lib", cell, trace.experts[0],
                                                                    "force", "cell"))) == home
    assert len(out) == 2 and "data-kl" in out[0]["cf_out"]

    def in_another_thread():  # gradio calls back on threads of its own pool
        box = {}
        t = threading.Thread(target=lambda: box.update(last=list(cb.route(session, "Uppercase: dog", "lib",
                                                                           *ROUTE_VALUES))[-1]))
        t.start()
        t.join()
        assert box["last"]["trace_json"]
    assert model_threads(seen, in_another_thread) == home
    upload = aligned_adapter(load_base_model(TINY), "Shout: hello there", root / "good")  # a twin of the page's
    attaching: list[int] = []
    attach = reg.attach
    reg.attach = lambda name: attaching.append(threading.get_ident()) or attach(name)
    try:
        reg.add_expert("lib", str(upload), "shouter", tasks=["shout"])  # re-attaches: prototypes of the new expert
    finally:
        del reg.attach
    assert attaching and set(attaching) == home
    assert "shouter" in reg.expert_names("lib") and model_threads(seen, lambda: session.run(raw)) == home


ROUTE_VALUES = (True, 2, 1.0, "none", "prototypes", 3, [], "mean", "expert", "weight", False, "none", None, None)


def test_in_passing_returns_raises_and_leaves_no_thread_behind():
    ran: list[threading.Thread] = []
    assert in_passing(lambda x: ran.append(threading.current_thread()) or x * 2, 21) == 42
    assert ran[0] is not threading.current_thread() and not ran[0].is_alive()
    with pytest.raises(KeyError):
        in_passing(dict().__getitem__, "missing")


def test_maps_and_an_upload_s_checks_run_on_threads_that_end(page, monkeypatch):
    """What the page computes beside the model from gradio's long-lived threads (a library's maps, an upload's
    store side) runs on a thread that ends with it, so its OpenMP pool ends too."""
    session, seen, root = page
    reg = session.registry
    where: list[threading.Thread] = []

    def spy(fn):
        return lambda *a, **k: where.append(threading.current_thread()) or fn(*a, **k)

    for name in ("analyse_library", "delta_analysis"):
        monkeypatch.setattr(registry_module, name, spy(getattr(registry_module, name)))
    monkeypatch.setattr(reg, "_stored", spy(reg._stored))
    reg._analyses.clear()
    reg._maps.clear()
    reg.library_map("lib", "delta")  # the ΔW map, and the analysis it borrows from
    reg.remove_expert("lib", reg.expert_names("lib")[-1])
    assert len(where) == 3 and threading.current_thread() not in where
    assert not any(t.is_alive() for t in where) and not any(t is reg.model_thread._thread for t in where)
