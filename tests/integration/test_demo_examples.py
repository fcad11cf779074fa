"""The page's example prompts with the real SmolLM2 and each demo library's recorded default router (issue 15): each
one per family routes to its task's own expert (MBC: cluster), decisively (a lead of at least eval_sweep.DECISIVE
on the scale that picked), and answers right; running the check leaves the committed libraries as they were."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from upload_fixtures import tree_digest  # noqa: E402

LIBRARIES = ("demo-mbc", "demo-private")


@pytest.mark.slow
@pytest.mark.parametrize("name", LIBRARIES)
def test_the_page_examples_route_decisively_and_answer_right(name, capsys):
    from bench import check_examples

    library = ROOT / "assets" / "libraries" / name
    if not (library / "library.sqlite").exists():
        pytest.skip(f"{name} is not built")
    examples = json.loads(check_examples.EXAMPLES.read_text())
    assert {e["family"] for e in examples if e.get("task")} == {"string", "arithmetic", "format", "classify"}
    before = tree_digest(library, derived=True)
    status = check_examples.main(["--library", str(library), "--threads", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count(" OK") == 4 and "(recorded default)" in out, out  # one per family, with the library's default
    assert tree_digest(library, derived=True) == before
