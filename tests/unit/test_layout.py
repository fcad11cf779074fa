"""The layout shows the design (docs/design.md, "Rooms"): imports run one way, the core never imports gradio,
no import circle, files stay readable, and nothing points outside the repository."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("explorer", "library_store")
MAX_LINES = 400
MAX_COLUMNS = 120  # pyproject.toml's line-length


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported by this one, at any depth of the file (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_imports_run_one_way():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("library_store"):
            assert not [d for d in deps if d.startswith("explorer")], f"{name} imports explorer: {deps}"
        if name.startswith("explorer.routing"):
            assert not [d for d in deps if d.startswith("explorer.page")], f"{name} imports the page: {deps}"


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a circle between rooms
    edges = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in edges.get(node, ()):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


@pytest.mark.slow
def test_the_core_never_imports_gradio():
    code = ("import sys, explorer.routing.model, explorer.routing.trace, explorer.page.session, explorer.cli, "
            "library_store.cli, library_store.training.build; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gradio'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_files_stay_readable():
    long, wide = [], []
    for folder in (*PACKAGES, "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = path.read_text().splitlines()
            if len(lines) > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)} ({len(lines)})")
            wide += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(lines, 1) if len(line) > MAX_COLUMNS]
    assert not long, f"files over {MAX_LINES} lines: {long}"
    assert not wide, f"lines over {MAX_COLUMNS} characters (pyproject.toml's line-length): {wide}"


def test_nothing_points_outside_the_repository():
    bad = []
    for folder in (*PACKAGES, "bench", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.is_file():
                text = path.read_text()
                for needle in ("shared/design", "/work/", "ALGORITHMS.md", "ARCHITECTURE.md"):
                    if needle in text and path.name != "test_layout.py":
                        bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not bad, bad
