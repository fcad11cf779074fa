"""Where `bench/eval_routing.py` writes: its own results, figures and docs/routing.md by default; a probe's --out
elsewhere takes the figures and the markdown with it, so a probe never rewrites the committed docs."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import eval_routing  # noqa: E402
from bench.eval_common import FIGURES, RESULTS  # noqa: E402


def test_default_out_writes_the_committed_figures_and_docs():
    _, args = eval_routing.parse(["--library", "x"])
    assert (args.out, args.figures, args.docs) == (str(RESULTS), str(FIGURES), str(eval_routing.DOCS))


def test_another_out_keeps_figures_and_docs_beside_it(tmp_path):
    _, args = eval_routing.parse(["--library", "x", "--out", str(tmp_path)])
    assert Path(args.figures) == tmp_path / "figures" and Path(args.docs) == tmp_path / "routing.md"
    assert not Path(args.figures).is_relative_to(ROOT / "docs") and not Path(args.docs).is_relative_to(ROOT)


def test_explicit_figures_and_docs_win(tmp_path):
    _, args = eval_routing.parse(["--library", "x", "--out", str(tmp_path), "--figures", "f", "--docs", ""])
    assert (args.figures, args.docs) == ("f", "")
