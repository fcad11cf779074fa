"""The Library tab without a server (issues 13 and 16): the report card read from the store, defaults by
evidence, the ΔW map, and adding / removing experts from the page, on a tiny twin and tiny libraries. Every
hostile upload is a message and leaves the library unchanged; committed libraries are copied, never written."""
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from upload_fixtures import aligned_adapter, hostile_uploads, tree_digest, zip_folder

from explorer.page import library_actions as act
from explorer.page.registry import Registry
from explorer.page.request import CLI_LIMITS, RawRequest, normalise
from explorer.page.session import Session
from explorer.routing.config import RouterConfig
from library_store.store.library import ExpertLibrary
from library_store.store.reports import RoutingReport, read_default_router, write_default_router, write_report
from library_store.testing import TASKS, TINY, make_tiny_library, make_tiny_mbc_library

PROMPT = "Shout: hello there, friend"
EXPERTS = sorted(TASKS[:5])


@pytest.fixture(autouse=True)
def user_data(tmp_path, monkeypatch):
    """User copies go to a tmp folder, never to the real ~/.local/share."""
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "user-data"))


@pytest.fixture(scope="module")
def good(tmp_path_factory, _twins):
    return aligned_adapter(_twins(TINY), PROMPT, tmp_path_factory.mktemp("adapters") / "good")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, _twins):
    return make_tiny_library(tmp_path_factory.mktemp("pristine") / "lib", n_experts=5, with_map=False,
                             base=_twins(TINY))


@pytest.fixture
def session(pristine, tmp_path, fresh_tiny, monkeypatch):
    """A page over a private writable copy of the tiny library (a fresh model each: attaching wraps it)."""
    path = shutil.copytree(pristine, tmp_path / "lib")
    monkeypatch.setattr("library_store.models.load_base_model", lambda *a, **k: fresh_tiny(TINY))
    reg = Registry(TINY, [path])
    assert reg.wait(timeout=300), reg.status()
    yield Session(reg)
    if reg._routed is not None:
        reg._routed.detach()


def routed_winner(session, library="lib", prompt=PROMPT) -> str:
    trace = session.run(RawRequest(prompt, library=library, top_k=1, max_new_tokens=0)).trace
    return trace.crop("user+generated").most_used_expert()


def upload(session, files, name, tasks="shout", replace=False, library="lib"):
    return act.upload(session, library, files, name, tasks, replace)


def files_of(folder: Path) -> list[str]:
    return [str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors")]


# ---------------------------------------------------------------- report card and defaults by evidence


def test_library_without_evaluation_says_so_and_shows_the_command(session):
    out = act.show(session, "lib")
    assert tuple(out) == act.SHOW_OUTPUTS
    assert "Not evaluated yet" in out["report"]
    assert f"python bench/eval_routing.py --library {session.registry.paths['lib']} --record" in out["report"]
    assert "No routing report" in out["confusion"].layout.annotations[0].text
    assert session.registry.default_router("lib") == dict(
        top_k=4, temperature=1.0, centre="none", layers=None, centre_scope="prototypes", input_centre="none",
        granularity="token", pick="mean", scales=None, recorded=False)


def test_report_card_and_default_router_are_read_from_the_store(session):
    path = session.registry.paths["lib"]
    writer = ExpertLibrary.open(path, readonly=False)
    report = RoutingReport(content_key=writer.content_key(), split="heldout", router={"mode": "arrow", "top_k": 2},
                           experts=EXPERTS, tasks=EXPERTS, n_per_task=3,
                           confusion=[[0.9 if i == j else 0.025 for j in range(5)] for i in range(5)],
                           per_layer={"layers": [0, 1], "accuracy": [0.4, 0.8]},
                           accuracy={"user": 0.96, "all": 0.31}, command="python bench/eval_routing.py --x 1")
    write_report(writer, report)
    write_default_router(writer, {"mode": "arrow", "top_k": 2, "temperature": 0.7, "disabled": [], "centre": "mean",
                                  "centre_scope": "weights"}, evidence={"rule": "best training accuracy"},
                         command="python bench/eval_routing.py --sweep")
    out = act.show(session, "lib")
    assert [list(r) for r in out["confusion"].data[0].z] == report.confusion
    assert list(out["layers"].data[0].y) == [0.4, 0.8]
    card = out["report"]
    assert "**yes**" in card and "**96%**" in card and "31.0%" in card
    assert "`python bench/eval_routing.py --x 1`" in card and "`python bench/eval_routing.py --sweep`" in card
    assert "top-k 2, temperature 0.7, centre mean (weights)" in card and "best training accuracy" in card
    assert "input centring" not in card  # a record written before input centring existed: "none"
    controls = act.router_controls(session, "lib")
    assert {k: v.props["value"] for k, v in controls.items()} == {"top_k": 2, "temperature": 0.7, "centre": "mean",
                                                                  "centre_scope": "weights", "input_centre": "none",
                                                                  "granularity": "token", "pick_by": "mean",
                                                                  "route_layers": "all", "expert_scales": "none"}
    done = normalise(RawRequest("hi"), EXPERTS, defaults=session.registry.default_router("lib"))
    assert (done.request.router.top_k, done.request.router.centre) == (2, "mean")
    assert done.request.router.input_centre == "none"


def test_default_router_evidence_reads_as_words_with_rounded_figures():
    from explorer.page.report_plots import report_card
    from library_store.store.reports import DefaultRouter

    winner = {"centre": "none", "centre_scope": "prototypes", "input_centre": "base", "top_k": 4, "temperature": 0.3,
              "user": 0.825, "prompt": 0.5625, "margin_median": 0.07740028947591782,
              "entropy_median": 1.2140874862670898, "em": 0.46249999999999997, "granularity": "prompt",
              "pick": "readout"}
    default = DefaultRouter({"mode": "arrow", "top_k": 4, "temperature": 0.3, "input_centre": "base"},
                            {"rule": "highest own-text accuracy", "winner": winner, "split": "train",
                             "rows": [winner, {**winner, "top_k": 2}]}, "key", "python x.py")
    card = report_card(None, default, "lib", "/tmp/lib")
    line = next(x for x in card.splitlines() if "training prompts:" in x)
    assert ("own-text routing accuracy 0.825, accuracy over all prompt tokens 0.562, exact match 0.462, "
            "median top-1 margin 0.0774, median routing entropy 1.21.") in line
    assert "0.0774002" not in card and "centre_scope" not in card and "top_k" not in card  # no raw keys or floats
    assert "- Why: highest own-text accuracy." in card and "- Chosen by `python x.py`." in card
    assert "- 2 settings swept on train prompts only" in card  # bench/eval_sweep.py's evidence keeps them as rows


def test_confusion_colours_start_at_zero_weight():
    from explorer.page.report_plots import confusion_heatmap

    report = RoutingReport(content_key="k", split="heldout", router={"mode": "arrow", "top_k": 4}, experts=EXPERTS[:2],
                           tasks=EXPERTS[:2], n_per_task=3, confusion=[[0.32, 0.21], [0.24, 0.28]])
    heat = confusion_heatmap(report).data[0]
    assert (heat.zmin, heat.zmax) == (0, 0.32)  # an almost even split must look almost even


def test_recorded_input_centring_is_the_page_default(session):
    writer = ExpertLibrary.open(session.registry.paths["lib"], readonly=False)
    write_default_router(writer, {"mode": "arrow", "top_k": 2, "temperature": 1.0, "disabled": [], "centre": "none",
                                  "centre_scope": "prototypes", "input_centre": "base"},
                         evidence={"rule": "best held-out accuracy"}, command="python bench/eval_routing.py --sweep")
    assert session.registry.default_router("lib")["input_centre"] == "base"
    assert act.router_controls(session, "lib")["input_centre"].props["value"] == "base"
    assert "top-k 2, temperature 1.0, no centring, input centring base" in act.show(session, "lib")["report"]
    done = normalise(RawRequest("hi"), EXPERTS, defaults=session.registry.default_router("lib"))
    assert done.request.router.input_centre == "base" and done.notices == []
    off = normalise(RawRequest("hi", input_centre="none"), EXPERTS, defaults=session.registry.default_router("lib"))
    assert off.request.router.input_centre == "none"  # the user's choice beats the library's
    trace = session.run(RawRequest(PROMPT, library="lib", max_new_tokens=0)).trace
    assert trace.router.input_centre == "base"


def test_recorded_per_prompt_routing_is_the_page_default_and_the_user_can_leave_it(session):
    writer = ExpertLibrary.open(session.registry.paths["lib"], readonly=False)
    write_default_router(writer, {"mode": "arrow", "top_k": 2, "temperature": 0.3, "disabled": [], "centre": "none",
                                  "centre_scope": "prototypes", "input_centre": "none", "granularity": "prompt"},
                         evidence={"rule": "best training exact match"}, command="python bench/eval_routing.py --x")
    assert act.router_controls(session, "lib")["granularity"].props["value"] == "prompt"
    assert "top-k 2, temperature 0.3, no centring, one expert per prompt, picked by mean weight" in \
        act.show(session, "lib")["report"]
    trace = session.run(RawRequest(PROMPT, library="lib", max_new_tokens=2)).trace
    assert trace.router.per_prompt and trace.evidence is not None
    trace = session.run(RawRequest(PROMPT, library="lib", max_new_tokens=2, granularity="token")).trace
    assert not trace.router.per_prompt and trace.evidence is None
    bad = normalise(RawRequest("hi", granularity="sentence"), EXPERTS, defaults=session.registry.default_router("lib"))
    assert bad.request.router.granularity == "token" and "Unknown granularity 'sentence'" in bad.notices[0]
    strict = normalise(RawRequest("hi", granularity="sentence"), EXPERTS, strict=True)
    assert strict.error == "Unknown granularity 'sentence': use one of token, prompt."


def test_normaliser_checks_centring_with_notices():
    lib = ["a", "b", "c"]
    cases = [(dict(centre="sideways"), "Unknown centring 'sideways'"), (dict(centre=3), "Unknown centring '3'"),
             (dict(centre="general:zz"), "the library has ['a', 'b', 'c', 'gk']"),
             (dict(centre="mean", centre_scope="all"), "Unknown centring scope 'all'")]
    for settings, notice in cases:
        done = normalise(RawRequest("hi", **settings), lib, names=lib + ["gk"])
        assert done.error is None and any(notice in n for n in done.notices), (settings, done.notices)
    two = normalise(RawRequest("hi", centre="mean"), ["a", "b"])
    assert two.request.router.centre == "none" and "needs at least 3 routed experts" in two.notices[0]
    ok = normalise(RawRequest("hi", centre="general:gk", centre_scope="weights"), lib, names=lib + ["gk"])
    assert (ok.request.router.centre, ok.request.router.centre_scope, ok.notices) == ("general:gk", "weights", [])


def test_normaliser_checks_input_centring_with_notices():
    lib = ["a", "b", "c"]
    assert normalise(RawRequest("hi"), lib).request.router.input_centre == "none"
    base = normalise(RawRequest("hi", input_centre=" base "), lib)
    assert (base.request.router.input_centre, base.notices) == ("base", [])
    for value in ("median", 3):
        done = normalise(RawRequest("hi", input_centre=value), lib)
        assert done.error is None and done.request.router.input_centre == "none", done.notices
        assert done.notices == [f"Unknown input centring '{value}': using 'none' (choose none or base)."]
    bad_default = normalise(RawRequest("hi"), lib, defaults={"input_centre": "median"})
    assert bad_default.request.router.input_centre == "none" and "Unknown input centring" in bad_default.notices[0]
    strict = normalise(RawRequest("hi", input_centre="median"), lib, limits=CLI_LIMITS, strict=True)
    assert strict.request is None and strict.error == "Unknown input centring 'median': use one of none, base."


# ---------------------------------------------------------------- adding an expert


def test_uploaded_adapter_routes_at_once_and_is_in_the_table_and_on_the_map(session, good):
    reg = session.registry
    before = act.show(session, "lib")
    assert before["map_kind"].props["visible"] is False  # no MBC data: the ΔW map is the only one
    assert routed_winner(session) != "shouter"
    out = upload(session, files_of(good), "shouter")
    assert tuple(out) == act.EDIT_OUTPUTS and "Added expert shouter to lib" in out["edit_msg"], out["edit_msg"]
    assert "prototypes of the new expert computed" in out["edit_msg"]
    assert "shouter" in list(out["table"]["name"]) and "shouter" in reg.expert_names("lib")
    points = [t for d in out["similarity"].data for t in (d.text or [])]
    assert sorted(points) == sorted(EXPERTS + ["shouter"])
    assert out["lib_changed"].startswith("lib@") and "shouter" in out["remove_name"].props["choices"]
    assert routed_winner(session) == "shouter"


def test_only_the_new_experts_prototypes_are_computed(session, good, monkeypatch):
    import explorer.routing.inject as inject

    act.show(session, "lib")
    computed = []
    original = inject.compute_prototypes
    monkeypatch.setattr(inject, "compute_prototypes", lambda A, B: computed.append(A.shape[0]) or original(A, B))
    edit = session.registry.add_expert("lib", files_of(good), "shouter")
    n_sites = len(session.registry._routed.sites)
    assert edit.computed == 1 and sum(computed) == n_sites, computed  # one prototype per site: the new expert's
    assert edit.seconds["attach"] < 30


def test_zip_upload_into_an_mbc_library_keeps_the_warmup_map_with_a_switch(tmp_path, good, fresh_tiny, monkeypatch):
    path = make_tiny_mbc_library(tmp_path / "mbc", n_tasks=6, k=2, base=fresh_tiny(TINY))
    monkeypatch.setattr("library_store.models.load_base_model", lambda *a, **k: fresh_tiny(TINY))
    session = Session(Registry(TINY, [path]))
    out = upload(session, [str(zip_folder(good, tmp_path / "good.zip"))], "shouter", library="mbc")
    assert "Added expert shouter" in out["edit_msg"], out["edit_msg"]
    assert out["map_kind"].props == {"value": "mbc", "visible": True, "choices": act.MAP_KINDS}
    mbc_points = [t for d in out["similarity"].data for t in (d.text or [])]
    assert "shouter" not in mbc_points and len(mbc_points) == 6  # the warm-up map: one point per task
    delta = act.switch_map(session, "mbc", "delta")
    points = [t for d in delta["similarity"].data for t in (d.text or [])]
    assert "shouter" in points and "ΔW" in delta["similarity"].layout.title.text
    session.registry._routed.detach()


@pytest.mark.parametrize("label", ["traversal", "absolute", "symlink", "bomb", "entries", "pickle", "ia3", "dora",
                                   "shapes", "rank", "nan", "empty-name", "path-name", "long-name", "html-name"])
def test_hostile_and_bad_uploads_are_messages_and_change_nothing(session, good, tmp_path, label):
    files, name, message = hostile_uploads(good, tmp_path / "bad")[label]
    root = session.registry.paths["lib"]
    before, names = tree_digest(root), session.registry.expert_names("lib")
    out = upload(session, files, name)
    assert set(out) == {"edit_msg", "confirm_row"} and out["edit_msg"].startswith("⚠️"), out
    assert re.search(message, out["edit_msg"]), out["edit_msg"]
    assert "<b>" not in out["edit_msg"]  # escaped: a name or path never becomes markup
    assert tree_digest(root) == before and session.registry.expert_names("lib") == names


def test_duplicate_name_offers_replace(session, good, _twins, tmp_path):
    out = upload(session, files_of(good), "add_two")
    assert "already exists" in out["edit_msg"] and "Replace an expert of the same name" in out["edit_msg"]
    out = upload(session, files_of(good), "add_two", replace=True)
    assert "Added expert add_two" in out["edit_msg"], out["edit_msg"]
    assert routed_winner(session) == "add_two"  # the replaced weights route now


def test_committed_library_is_copied_never_written(tmp_path, pristine, good, fresh_tiny, monkeypatch):
    assets = tmp_path / "assets"
    committed = Path(shutil.copytree(pristine, assets / "libraries" / "demo"))
    monkeypatch.setattr("library_store.store.user_copy.assets_dir", lambda: assets)
    monkeypatch.setattr("library_store.models.load_base_model", lambda *a, **k: fresh_tiny(TINY))
    before = tree_digest(committed)
    session = Session(Registry(TINY, [committed]))
    out = upload(session, files_of(good), "shouter", library="demo")
    copy = tmp_path / "user-data" / "libraries" / "demo"
    assert "committed demo library" in out["edit_msg"] and str(copy) in out["edit_msg"], out["edit_msg"]
    assert tree_digest(committed) == before and "shouter" in ExpertLibrary.open(copy).names()
    assert session.registry.paths["demo"] == copy and "Served from your copy" in out["lib_summary"]
    assert routed_winner(session, "demo") == "shouter"
    session.registry._routed.detach()
    again = Registry(TINY, [committed])  # a restart serves the copy: what was added stays on the page
    assert again.wait(timeout=300) and again.paths["demo"] == copy and "shouter" in again.expert_names("demo")
    assert f"served from your copy at {copy}" in again.status()
    again._routed.detach()


# ---------------------------------------------------------------- removing, concurrency


def test_remove_asks_first_then_removes(session, good):
    upload(session, files_of(good), "shouter")
    ask = act.ask_remove(session, "lib", "shouter")
    assert ask["confirm_row"].props == {"visible": True} and "Remove expert shouter from lib?" in ask["edit_msg"]
    assert "shouter" in session.registry.expert_names("lib")  # nothing removed yet
    assert act.cancel_remove(session)["confirm_row"].props == {"visible": False}
    out = act.remove(session, "lib", "shouter")
    assert "Removed expert shouter" in out["edit_msg"] and "shouter" not in list(out["table"]["name"])
    assert session.registry.expert_names("lib") == EXPERTS and routed_winner(session) != "shouter"
    assert "No expert &#x27;nope&#x27;" in act.remove(session, "lib", "nope")["edit_msg"]


def test_two_uploads_at_once(session, good):
    outs = {}
    threads = [threading.Thread(target=lambda n=n: outs.__setitem__(n, upload(session, files_of(good), n)))
               for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all("Added expert" in o["edit_msg"] for o in outs.values()), outs
    assert {"one", "two"} <= set(session.registry.expert_names("lib"))
    same = []
    threads = [threading.Thread(target=lambda: same.append(upload(session, files_of(good), "three")["edit_msg"]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum("Added expert three" in m for m in same) == 1 and sum("already exists" in m for m in same) == 1


def test_a_route_running_during_an_upload_finishes_on_its_library(session, good):
    from explorer.routing.config import RouterConfig

    reg = session.registry
    done = {}
    with reg.lock:  # a route has started: it holds the lock from attach to the end of generation
        routed = reg.attach("lib")
        routed.set_router(RouterConfig(top_k=1))
        first = routed.trace(PROMPT, max_new_tokens=2)
        worker = threading.Thread(target=lambda: done.setdefault("out", upload(session, files_of(good), "shouter")))
        worker.start()
        for _ in range(600):  # the upload is checked and stored meanwhile...
            if "shouter" in ExpertLibrary.open(reg.paths["lib"]).names():
                break
            threading.Event().wait(0.05)
        worker.join(1.0)
        assert worker.is_alive() and reg._routed is routed  # ...but waits to swap the model
        assert routed.trace(PROMPT, max_new_tokens=2) == first  # the route finishes on what it started with
    worker.join(120)
    assert "Added expert shouter" in done["out"]["edit_msg"] and routed_winner(session) == "shouter"


def test_report_card_shows_the_pick_accuracy_and_the_granularity_evidence(session):
    writer = ExpertLibrary.open(session.registry.paths["lib"], readonly=False)
    router = {"mode": "arrow", "top_k": 2, "granularity": "prompt", "pick": "readout"}
    write_report(writer, RoutingReport(content_key=writer.content_key(), split="heldout", level="private",
                                       router=router, experts=EXPERTS, tasks=EXPERTS, n_per_task=4,
                                       accuracy={"user": 0.8, "pick": 0.96}, command="python bench/eval_routing.py"))
    rows = [{"granularity": "token", "pick": "mean", "em": 0.36}, {"granularity": "prompt", "pick": "mean", "em": 0.91,
            "lead_median": 0.035}, {"granularity": "prompt", "pick": "readout", "em": 0.89, "lead_median": 0.53}]
    write_default_router(writer, {**router, "temperature": 0.1, "disabled": [], "centre": "none", "centre_scope":
                                  "prototypes"}, command="python bench/x.py",
                         evidence={"rule": "r", "granularity": {"rows": rows, "winner": rows[2]}})
    card = act.show(session, "lib")["report"]
    assert "the expert that answered was the task's own for **96%** of prompts" in card
    assert ("per token 0.36, per prompt by mean 0.91 (picks lead by a median 0.04), per prompt by readout 0.89 "
            "(picks lead by a median 0.53; chosen)") in card  # why the readout won though the mean answered better
    assert "one expert per prompt, picked by the fitted readout" in card
    assert "Uncertain picks" not in card  # no readout stored for this router
    from explorer.routing.readout import readout_key
    from library_store.store.reports import write_readout
    router = RouterConfig.from_dict(read_default_router(writer).router)
    write_readout(writer, readout_key(router), {"coef": np.zeros((2, 2), np.float32),
                                                "intercept": np.zeros(2, np.float32)},
                  {"experts": EXPERTS[:2], "layers": [0], "classes": EXPERTS[:2], "uncertain_below": 0.4,
                   "uncertain_evidence": {"heldout": {"flagged": 0.2, "accuracy_flagged": [0.7, 0.5, 0.9]}}})
    assert "under p 0.4" in act.show(session, "lib")["report"]  # the default router's own readout, from the store
    write_default_router(writer, {"mode": "arrow", "top_k": 2, "temperature": "hot", "granularity": "prompt",
                                  "pick": "readout"}, evidence={"rule": "r"}, command="python bench/x.py")
    assert "Default router" in act.show(session, "lib")["report"]  # a hand-edited default: the card, no crash


def test_report_card_says_how_uncertain_picks_fared():
    from explorer.page.report_plots import report_card
    from library_store.store.reports import DefaultRouter

    default = DefaultRouter({"mode": "arrow", "top_k": 2, "granularity": "prompt", "pick": "readout"},
                            {"rule": "r"}, "key", "python x.py")
    meta = {"uncertain_below": 0.35, "uncertain_evidence": {
        "heldout": {"flagged": 0.1, "accuracy_flagged": [0.645, 0.48, 0.81], "accuracy_confident": [1.0, 1.0, 1.0]},
        "command": "python bench/pick_confidence.py --record"}}
    card = report_card(None, default, "lib", "/tmp/lib", meta)
    assert "under p 0.35" in card and "On held-out inputs: 10% of picks flagged, right 64% of the time, the others " \
        "right 100%." in card and "`python bench/pick_confidence.py --record`" in card
    assert "Uncertain picks" not in report_card(None, default, "lib", "/tmp/lib")  # no threshold recorded: silent
    assert "lead the runner-up" not in card  # no lead recorded: silent
    lead = report_card(None, default, "lib", "/tmp/lib", meta | {"uncertain_lead": 0.04, "uncertain_lead_evidence": {
        "paraphrase": {"flagged": 0.54, "accuracy_flagged": [0.74, 0.6, 0.8]}}})
    assert "when they lead the runner-up by less than 0.04 (chosen on training prompts)." in lead
    assert "On held-out wordings: 54% of picks flagged, right 74% of the time." in lead and "under p 0.35" in lead
    for bad in ({"uncertain_below": "x"}, {"uncertain_below": 0.3, "uncertain_evidence": {"heldout": {"flagged": "?"}}},
                {"uncertain_below": 0.3, "uncertain_evidence": {"heldout": {"flagged": 0.1, "accuracy_flagged": 5}}},
                {"uncertain_lead": "x"}, {"uncertain_lead": 0.02, "uncertain_lead_evidence": "not a dict"}):
        card = report_card(None, default, "lib", "/tmp/lib", bad)  # hand-edited: no line, no card crash
        assert "Uncertain picks" not in card and "lead the runner-up" not in card
