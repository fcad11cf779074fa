"""Expert scales on the page: a library whose default router has fitted scales starts the page with them (the
control offers switching them off), and the report card says how they were fitted and checked."""
from explorer.page import library_actions as act
from explorer.page.request import RawRequest, normalise
from library_store.store.library import ExpertLibrary
from library_store.store.reports import write_default_router
from test_library_page import EXPERTS, pristine, session, user_data  # noqa: F401 (fixtures)


def test_fitted_expert_scales_start_the_page_and_the_card_says_how_they_were_chosen(session):
    path = session.registry.paths["lib"]
    assert act.router_controls(session, "lib")["expert_scales"].props["interactive"] is False  # none fitted yet
    writer = ExpertLibrary.open(path, readonly=False)
    a, b = EXPERTS[:2]
    fit = {"factors": {a: 0.8, b: 1.25}, "n_fit": 20, "fit_before": 0.9, "fit_after": 0.99,
           "check_before": 0.92, "check_after": 0.98, "command": "python bench/fit_scales.py --record"}
    write_default_router(writer, {"mode": "arrow", "top_k": 2, "temperature": 1.0, "disabled": [], "centre": "none",
                                  "scales": {a: 0.8, b: 1.25}}, evidence={"scales": fit},
                         command="python bench/eval_routing.py --sweep")
    card = act.show(session, "lib")["report"]
    assert "expert scales 0.80-1.25 fitted on training prompts" in card  # the router in words
    assert "92% → 98% on prompts 21-40" in card and f"0.80 ({a}) to 1.25 ({b})" in card
    assert "`python bench/fit_scales.py --record`" in card
    controls = act.router_controls(session, "lib")
    assert controls["expert_scales"].props["value"] == "default" and controls["expert_scales"].props["interactive"]
    defaults = session.registry.default_router("lib")
    assert normalise(RawRequest("hi"), EXPERTS, defaults=defaults).request.router.scales == ((a, 0.8), (b, 1.25))
    assert normalise(RawRequest("hi", scales="none"), EXPERTS, defaults=defaults).request.router.scales == ()


def test_a_run_on_the_page_routes_with_the_library_scales_unless_switched_off(session):
    writer = ExpertLibrary.open(session.registry.paths["lib"], readonly=False)
    a, b = EXPERTS[:2]
    write_default_router(writer, {"mode": "arrow", "top_k": 2, "temperature": 1.0, "disabled": [], "centre": "none",
                                  "scales": {a: 50.0, b: 0.02}}, evidence={}, command="test")
    scaled = session.run(RawRequest("Shout: hello there, friend", library="lib", max_new_tokens=0))
    plain = session.run(RawRequest("Shout: hello there, friend", library="lib", max_new_tokens=0, scales="none"))
    assert scaled.error is None and plain.error is None
    assert scaled.trace.router.scales == ((a, 50.0), (b, 0.02)) and plain.trace.router.scales == ()
    assert scaled.trace.crop("user").most_used_expert() == a  # 50x its score: it wins the text
    assert plain.trace.weights.tolist() != scaled.trace.weights.tolist()  # switched off, Arrow routes plain
