"""The page's engine (session.Explorer) and the Blocks wiring on a tiny twin + tiny library: bad input gives
messages, never tracebacks; settings are clamped with notices; the Library tab's data is read from the store."""
import json

import numpy as np
import pytest

from explorer.page import plots
from explorer.page.library_view import analyse_library, experts_table
from explorer.page.session import Explorer, RunRequest, crop_to_prompt
from library_store.store.library import ExpertLibrary
from tests.page_fixtures import TASKS, TINY, make_tiny_library, make_tiny_mbc_library


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory):
    return make_tiny_library(tmp_path_factory.mktemp("ui") / "lib", n_experts=5)


@pytest.fixture(scope="module")
def explorer(lib_path):
    ex = Explorer(TINY, [lib_path])
    assert ex.wait(timeout=300), ex.status()
    return ex


def req(prompt="Reverse the word: apple", **kw):
    return RunRequest(prompt=prompt, library="lib", **{"max_new_tokens": 4, "top_k": 2, **kw})


def test_run_returns_a_trace_of_prompt_and_generated_tokens(explorer):
    result = explorer.run(req())
    t = result.trace
    assert result.error is None and result.notices == []
    assert t.weights.shape == (2, 4, len(t.tokens), 5)
    assert sum(t.is_generated) == 4 and t.top_k == 2 and t.meta["library"] == "lib"
    nz = (t.weights > 0).sum(-1)
    assert (nz == 2).all()  # exactly top-k experts per token, module, layer
    np.testing.assert_allclose(t.weights.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt_is_a_message(explorer, prompt):
    result = explorer.run(req(prompt))
    assert result.trace is None and "The prompt is empty" in result.error


def test_long_prompt_is_truncated_with_a_notice(explorer):
    result = explorer.run(req("apple banana " * 1700))  # ~22,000 characters
    assert result.trace is not None and any("truncated" in n for n in result.notices)
    assert explorer.view(result.trace, show_template=False).n_prompt <= explorer.prompt_tokens + 1


def test_top_k_above_library_size_is_clamped_with_a_notice(explorer):
    result = explorer.run(req(top_k=50))
    assert result.trace.top_k == 5
    assert any("clamped to 5" in n for n in result.notices)
    result = explorer.run(req(top_k=4, disabled=("add_two", "sentiment")))
    assert result.trace.top_k == 3 and any("clamped to 3" in n for n in result.notices)


def test_all_experts_disabled_is_a_message(explorer):
    assert "Every expert is disabled" in explorer.run(req(disabled=tuple(TASKS[:5]))).error


def test_unknown_library_is_a_message(explorer):
    assert "not available" in explorer.run(RunRequest("hi", library="nope")).error


def test_intervention_removes_the_expert_and_keeps_a_reference(explorer):
    result = explorer.run(req(disabled=("reverse_word",)))
    i = result.trace.experts.index("reverse_word")
    assert (result.trace.weights[..., i] == 0).all()
    assert result.reference is not None and (result.reference.weights[..., i] > 0).any()
    assert result.trace.meta["disabled"] == ["reverse_word"]


def test_same_request_gives_the_same_trace(explorer):
    a, b = explorer.run(req()), explorer.run(req(top_k=3))
    c = explorer.run(req())
    assert a.trace == c.trace and not np.array_equal(a.trace.weights, b.trace.weights)


def test_view_hides_the_chat_template_tokens(explorer):
    trace = explorer.run(req("Reverse the word: apple")).trace
    view = explorer.view(trace, show_template=False)
    assert "".join(view.tokens[: view.n_prompt]) == "Reverse the word: apple"
    assert view.tokens[view.n_prompt:] == trace.tokens[trace.n_prompt:]
    assert explorer.view(trace, show_template=True) is trace
    no_chat = explorer.run(req(chat=False)).trace
    assert explorer.view(no_chat, show_template=False) is no_chat


def test_crop_keeps_weights_aligned(explorer):
    trace = explorer.run(req()).trace
    cropped = crop_to_prompt(trace, [1, 3])
    np.testing.assert_array_equal(cropped.weights, trace.weights[:, :, [1, 3]])
    assert cropped.tokens == [trace.tokens[1], trace.tokens[3]]


def test_compare_gives_four_texts(explorer):
    trace = explorer.run(req()).trace
    texts = explorer.compare(req(), trace)
    top = plots.most_used_expert(trace)
    assert list(texts) == ["base", "uniform merge", f"most-used expert ({top})", "arrow"]
    assert texts["arrow"] == trace.text


def test_library_analysis_reads_map_similarity_clusters_and_table(lib_path):
    lib = ExpertLibrary.open(lib_path, readonly=True)
    an = analyse_library(lib, "lib")
    assert an.tasks == TASKS[:5] and an.coords.shape == (5, 2) and an.similarity.shape == (5, 5)
    assert an.cluster_of["reverse_word"] == "cluster0" and an.cluster_of["add_two"] == "cluster1"
    table = experts_table(lib)
    assert list(table.columns) == ["name", "kind", "tasks", "cluster", "rank", "parameters", "steps", "final loss"]
    assert len(table) == 5 and (table["rank"] == 4).all() and (table["parameters"] > 0).all()


def test_library_without_mbc_data_gets_a_note(tmp_path):
    path = make_tiny_library(tmp_path / "plain", n_experts=3, with_map=False)
    an = analyse_library(ExpertLibrary.open(path), "plain")
    assert an.coords is None and "no MBC map" in an.note
    assert "no MBC map" in plots.similarity_map(an).layout.annotations[0].text


def test_mismatched_library_is_reported_not_fatal(tmp_path, lib_path):
    from library_store.models import load_base_model

    other = ExpertLibrary.create(tmp_path / "phi", load_base_model("tiny-random-phi"))
    del other
    ex = Explorer(TINY, [lib_path, tmp_path / "phi"])
    assert ex.wait(timeout=300)
    assert "phi" in ex.problems and "another base model" in ex.problems["phi"]
    assert "unavailable" in ex.status() and ex.run(RunRequest("hi", library="phi")).error


def test_build_demo_has_an_api_name_on_every_event(explorer):
    from explorer.page.ui import build_demo

    demo = build_demo(explorer, examples=[{"family": "free text", "prompt": "hi"}])
    config = demo.get_config_file()
    names = [dep.get("api_name") for dep in config["dependencies"]]
    assert all(names), names
    assert {"route", "compare", "library", "status", "export"} <= set(names)


def test_examples_cover_the_task_families():
    from explorer.page.ui import load_examples

    examples = load_examples()
    assert any(e["family"] == "free text" for e in examples)
    assert all(e["prompt"].strip() for e in examples)
    assert len({e["family"] for e in examples}) == len(examples)  # one per family
    json.dumps(examples)


def test_mbc_library_routes_over_cluster_experts_and_maps_the_warmups(tmp_path, lib_path):
    mbc = make_tiny_mbc_library(tmp_path / "mbc", n_tasks=6, k=2)
    plain = make_tiny_library(tmp_path / "private", n_experts=6, with_map=False)
    ex = Explorer(TINY, [mbc, plain])
    assert ex.wait(timeout=300), ex.status()
    assert ex.expert_names("mbc") == ["cluster-0", "cluster-1"]  # warm-ups are the map's data, not routed
    trace = ex.run(RunRequest("Add these numbers: 4 + 5", library="mbc", top_k=2, max_new_tokens=2)).trace
    assert trace.experts == ["cluster-0", "cluster-1"]
    an = ex.analysis("mbc")
    assert an.tasks == TASKS[:6] and an.coords.shape == (6, 2)
    assert an.cluster_of == {t: f"cluster-{i % 2}" for i, t in enumerate(TASKS[:6])}
    assert (an.experts["kind"] == "warmup").sum() == 6  # the table lists every adapter
    # the private library has no clusters of its own: it borrows the MBC library's (same task names)
    groups = ex.groups("private")
    assert groups["reverse_word"] == "cluster-0" and groups["add_two"] == "cluster-1"
    fig = plots.top1_heatmap(ex.run(RunRequest("hi", library="private", top_k=2, max_new_tokens=1)).trace,
                             groups=groups)
    assert sorted(d.name for d in fig.data[1:]) == ["cluster-0", "cluster-1"]
