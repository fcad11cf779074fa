"""Plot builders: pure functions of synthetic traces and library analyses; assertions on `fig.data`."""
from dataclasses import replace

import numpy as np
import pytest

from explorer.page import plots
from explorer.page.library_view import LibraryAnalysis
from explorer.routing.config import RouterConfig
from explorer.routing.trace import RoutingTrace

XSS = '<img src=x onerror="window.__xss=1">'


def make_trace(tokens=("Re", "verse", " apple", ":", " elp", "pa"), n_generated=2, layers=3,
               modules=("q_proj", "v_proj"), experts=("alpha", "beta", "gamma", "delta"), top_k=2, seed=0):
    """A valid trace: per (layer, module, token) exactly top_k non-zero weights summing to 1."""
    rng = np.random.default_rng(seed)
    L, M, T, E = layers, len(modules), len(tokens), len(experts)
    scores = rng.random((L, M, T, E))
    keep = np.argsort(-scores, axis=-1)[..., :top_k]
    w = np.zeros((L, M, T, E), dtype=np.float32)
    kept = np.take_along_axis(scores, keep, axis=-1)
    soft = np.exp(kept) / np.exp(kept).sum(-1, keepdims=True)
    np.put_along_axis(w, keep, soft, axis=-1)
    return RoutingTrace(tokens=list(tokens), token_ids=list(range(T)),
                        is_generated=[False] * (T - n_generated) + [True] * n_generated,
                        layers=list(range(L)), modules=list(modules), experts=list(experts), weights=w,
                        router=RouterConfig(top_k=top_k), text="".join(tokens[T - n_generated:]), prompt="x")


def one_hot_trace(winner=1, conf=0.9, edit=None):
    """Every cell: `winner` gets conf, the next expert the rest; `edit(w)` changes the dense weights first."""
    w = np.zeros_like(make_trace().weights)  # (L, M, T, E)
    w[..., winner] = conf
    w[..., (winner + 1) % 4] = 1 - conf
    if edit is not None:
        edit(w)
    return replace(make_trace(), weights=w)


def test_plots_hold_no_reductions_of_their_own():
    """The numbers come from the trace's methods (one implementation): plots only lay them out."""
    for name in ("module_weights", "routing_entropy", "expert_usage", "most_used_expert"):
        assert not hasattr(plots, name), name


def test_an_unknown_module_is_refused_by_every_routing_figure():
    t = make_trace()
    for builder in (plots.top1_heatmap, plots.entropy_heatmap, lambda tr, m: plots.expert_heatmap(tr, "beta", m)):
        with pytest.raises(ValueError, match="o_proj"):
            builder(t, "o_proj")


def test_top1_heatmap_encodes_winner_and_confidence():
    def edit(w):
        w[1, ..., 2], w[1, ..., 3] = 0.65, 0.35  # layer 1 less sure
        w[2, ..., 2], w[2, ..., 3] = 0.5, 0.5  # layer 2: an even top-2 split

    t = one_hot_trace(winner=2, conf=0.8, edit=edit)
    fig = plots.top1_heatmap(t)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 6)
    np.testing.assert_array_equal(np.floor(z), 2)  # category = expert index
    # fraction = the winner's weight from an even split (0) to the grid's most decisive cell (1)
    np.testing.assert_allclose(z[:, 0] - 2, [0.999, 0.5 * 0.999, 0], atol=1e-5)
    legend = [d.name for d in fig.data[1:]]
    assert legend == ["alpha", "beta", "gamma", "delta"]
    assert [d.visible for d in fig.data[1:]] == ["legendonly", "legendonly", True, "legendonly"]


def test_top1_heatmap_hover_lists_token_layer_module_and_topk():
    t = one_hot_trace(winner=0, conf=0.7)
    hover = np.asarray(plots.top1_heatmap(t, module="q_proj").data[0].text)
    cell = hover[1, 2]
    assert "apple" in cell and "layer 1" in cell and "q_proj" in cell and "prompt" in cell
    assert "alpha: 0.700" in cell and "beta: 0.300" in cell and "gamma" not in cell
    assert "generated" in hover[0, 5]


def test_top1_heatmap_marks_the_generated_boundary_and_labels_tokens():
    fig = plots.top1_heatmap(make_trace())
    assert [s.x0 for s in fig.layout.shapes] == [3.5]  # 4 prompt tokens, then generated
    assert list(fig.layout.xaxis.ticktext) == ["Re", "verse", " apple", ":", " elp", "pa"]
    assert list(fig.layout.xaxis.tickvals) == list(range(6))


def test_no_boundary_without_generated_tokens():
    assert not plots.top1_heatmap(make_trace(n_generated=0)).layout.shapes


def test_colour_by_cluster_sums_member_weights():
    t = one_hot_trace(winner=0, conf=0.6)  # alpha 0.6, beta 0.4
    fig = plots.top1_heatmap(t, groups={"alpha": "c1", "beta": "c0", "gamma": "c0", "delta": "c1"})
    z = np.asarray(fig.data[0].z)
    np.testing.assert_array_equal(np.floor(z), 1)  # c1 (alpha) wins with 0.6
    assert [d.name for d in fig.data[1:]] == ["c0", "c1"]
    assert "cluster" in fig.layout.title.text


@pytest.mark.parametrize("builder", [plots.top1_heatmap, plots.entropy_heatmap,
                                     lambda t: plots.expert_heatmap(t, "beta"), plots.usage_bar])
def test_token_text_is_escaped_everywhere(builder):
    t = make_trace(tokens=("<script>alert(1)</script>", XSS, "a&b", "\n", " ", "ok"))
    fig = builder(t)
    dumped = fig.to_json()
    assert "<script>" not in dumped and "<img" not in dumped
    if fig.layout.xaxis.ticktext:
        labels = list(fig.layout.xaxis.ticktext)
        assert labels[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
        assert labels[2] == "a&amp;b" and labels[3] == "↵" and labels[4] == "␣"
        assert labels[1] == '&lt;img src=x onerror="window.__xss=1"&gt;'  # quotes as typed: no tag can start


def test_expert_names_are_escaped_too():
    t = make_trace(experts=("a", "<b>x</b>", "c", "d"))
    assert "<b>x</b>" not in plots.top1_heatmap(t).to_json().replace("<b>token", "")


def test_expert_heatmap_is_that_experts_weight():
    t = make_trace()
    fig = plots.expert_heatmap(t, "gamma", module="v_proj")
    np.testing.assert_allclose(np.asarray(fig.data[0].z), t.weights[:, 1, :, 2])
    assert "not in this trace" in plots.expert_heatmap(t, "nope").layout.annotations[0].text


def test_entropy_zero_for_one_hot_and_log_k_for_even_split():
    t = one_hot_trace(conf=1.0)
    np.testing.assert_allclose(np.asarray(plots.entropy_heatmap(t).data[0].z), 0, atol=1e-6)
    t = one_hot_trace(conf=0.5)
    np.testing.assert_allclose(np.asarray(plots.entropy_heatmap(t).data[0].z), np.log(2), atol=1e-6)


def test_usage_bar_is_mean_prompt_weight_sorted():
    t = make_trace()
    fig = plots.usage_bar(t)
    expected = t.weights[:, :, :4].mean(axis=(0, 1, 2))
    np.testing.assert_allclose(sorted(expected, reverse=True), np.asarray(fig.data[0].y), atol=1e-6)
    assert list(fig.data[0].x)[0] == t.experts[int(expected.argmax())]
    assert t.most_used_expert() == t.experts[int(expected.argmax())]
    np.testing.assert_allclose(np.asarray(fig.data[0].y).sum(), 1, atol=1e-5)


def test_diff_heatmap_zero_for_same_and_stops_where_generation_diverges():
    a = make_trace(seed=0)
    assert np.allclose(np.asarray(plots.diff_heatmap(a, a).data[0].z), 0)
    b = make_trace(seed=1)
    b.token_ids[5] = 99  # the last generated token differs
    z = np.asarray(plots.diff_heatmap(a, b).data[0].z)
    assert z.shape == (3, 5) and (z > 0).any() and (z <= 1 + 1e-6).all()


def make_analysis(n=6, with_map=True):
    rng = np.random.default_rng(0)
    tasks = [f"task{i}" for i in range(n)]
    emb = rng.normal(size=(n, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return LibraryAnalysis(name="lib", tasks=tasks, coords=rng.normal(size=(n, 2)) if with_map else None,
                           similarity=emb @ emb.T if with_map else None,
                           cluster_of={t: f"c{i % 2}" for i, t in enumerate(tasks)},
                           note="" if with_map else "no MBC data")


def test_similarity_map_one_point_per_task_coloured_by_cluster():
    an = make_analysis()
    fig = plots.similarity_map(an)
    assert sum(len(d.x) for d in fig.data) == 6
    assert sorted(d.name for d in fig.data) == ["c0", "c1"]
    hover = fig.data[0].customdata[0]
    assert "task0" in hover and "cluster c0" in hover and hover.count("near ") == 3
    nearest = int(np.argsort(-np.where(np.arange(6) == 0, -9, an.similarity[0]))[0])
    assert f"near task{nearest}" in hover


def test_similarity_map_shapes_by_family_when_known():
    an = make_analysis()
    an.family_of = {t: ("string" if i < 3 else "arithmetic") for i, t in enumerate(an.tasks)}
    fig = plots.similarity_map(an)
    points = [d for d in fig.data if d.x[0] is not None]
    assert sum(len(d.x) for d in points) == 6
    assert sorted(d.name for d in fig.data if d.x[0] is None) == ["family arithmetic", "family string"]
    assert "family string" in points[0].customdata[0]
    assert set(points[0].marker.symbol) <= set(plots.SYMBOLS[:2])


def test_similarity_map_labels_stay_inside_the_plot_and_apart():
    """Labels at the edges read inwards, two labels of nearby points take different places, and the axes leave
    room around every point (labels were cut at the edges and drawn over each other before)."""
    coords = np.array([[0.0, 0.5], [1.0, 0.5], [0.5, 0.52], [0.51, 0.5], [0.5, 0.0], [0.5, 1.0]])
    an = make_analysis(n=6)
    an.coords, an.tasks = coords, ["a_long_task_name_left", "a_long_task_name_right", "middle_one", "middle_two",
                                   "bottom", "top"]
    fig = plots.similarity_map(an)
    side = {}
    for d in fig.data:
        if d.x[0] is not None:
            side.update({t: pos for t, pos in zip(d.text, d.textposition)})
    assert side["a_long_task_name_left"].endswith("right") and side["a_long_task_name_right"].endswith("left")
    assert side["top"] == "top center"  # the first placed keeps the preferred place
    assert side["middle_one"] != side["middle_two"]  # 0.02 apart: one of them moves
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    assert x0 < 0 and x1 > 1 and y0 < 0 and y1 - 1 > 0 - y0  # room around the points, more on top


def test_a_map_label_is_not_drawn_beside_another_point():
    """A label whose preferred place (above its point) lies on the marker of a point just above moves off it, so
    that it cannot read as that point's label; the point above keeps the preferred place."""
    from explorer.page.plots import label_sides

    coords = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.62]])  # the last: 22 px above the third
    side, _, _ = label_sides(coords, ["corner_a", "corner_b", "below", "above"])
    assert side[3] == "top center" and not side[2].startswith("top")


def test_library_figures_show_a_note_without_mbc_data():
    an = make_analysis(with_map=False)
    for fig in (plots.similarity_map(an), plots.cosine_matrix(an)):
        assert not fig.data and "no MBC data" in fig.layout.annotations[0].text


def test_cosine_matrix_ordered_by_cluster():
    fig = plots.cosine_matrix(make_analysis())
    labels = list(fig.data[0].x)
    assert [lab.split("[")[1] for lab in labels] == ["c0]"] * 3 + ["c1]"] * 3
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(np.diag(z), 1, atol=1e-6)


def test_figure_html_is_standalone():
    html = plots.figure_html(plots.usage_bar(make_trace()))
    assert "<html>" in html and '<script src="http' not in html and "<script src='http" not in html
    assert len(html) > 1_000_000  # plotly.js is inlined


def test_token_experts_is_that_tokens_layer_by_expert_weights():
    t = make_trace(tokens=("a", XSS, "c", "d", "e", "f"))
    fig = plots.token_experts(t, 1, module="q_proj")
    np.testing.assert_allclose(np.asarray(fig.data[0].z), t.weights[:, 0, 1])
    assert "<img" not in fig.layout.title.text and "&lt;img" in fig.layout.title.text
    assert "Click a token" in plots.token_experts(t, 99).layout.annotations[0].text


def test_token_strip_labels_each_token_with_its_top_expert_or_cluster():
    t = one_hot_trace(winner=3, conf=0.7)
    strip, colours = plots.token_strip(t)
    assert [tok for tok, _ in strip] == t.tokens and {lab for _, lab in strip} == {"delta"}
    assert set(colours) == set(t.experts)
    strip, colours = plots.token_strip(t, groups={"alpha": "x", "beta": "x", "gamma": "y", "delta": "y"})
    assert {lab for _, lab in strip} == {"y"} and set(colours) == {"x", "y"}


def test_top1_heatmap_by_contribution_colours_the_expert_that_added_most():
    """The second-weighted expert of every cell added the most: the contribution grid shows it, not the winner."""
    from explorer.routing.topk import TopKRoutes

    t = make_trace()
    r = t.routes
    c = np.zeros(r.weights.shape, dtype=np.float32)  # (L, M, T, k)
    c[..., 1] = 5.0
    c[..., 0] = np.linspace(0.5, 1.0, c[..., 0].size).reshape(c[..., 0].shape)
    rich = replace(t, routes=TopKRoutes(r.n_experts, r.experts, r.weights, contribution=c))
    fig = plots.top1_heatmap(rich, "q_proj", by="contribution", legend=False)
    z = np.asarray(fig.data[0].z)
    np.testing.assert_array_equal(np.floor(z), r.experts[:, 0, :, 1])  # (L, T): slot 1's expert everywhere
    assert np.allclose(z - np.floor(z), 0.999)  # every winner gave the grid's largest contribution
    assert "by contribution" in fig.layout.title.text and len(fig.data) == 1  # legend left to the page
    by_weight = np.floor(np.asarray(plots.top1_heatmap(rich, "q_proj").data[0].z))
    np.testing.assert_array_equal(by_weight, r.experts[:, 0, :, 0])
    plain = plots.top1_heatmap(t, "q_proj", by="contribution")  # no contribution data: by weight
    assert "by weight" in plain.layout.title.text
