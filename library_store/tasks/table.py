"""The built-in suite's wordings as one markdown table, rendered from the code so the docs cannot drift.

Usage::

    python -m library_store.tasks.table                        # print the table
    python -m library_store.tasks.table --write docs/tasks.md  # replace the table between the markers
    python -m library_store.tasks.table --check docs/tasks.md  # exit 1 when the file's table is stale

The table sits in docs/tasks.md between `<!-- tasks-table:start -->` and `<!-- tasks-table:end -->`; the prose
around it is written by hand. A unit test checks the file against `render_table()`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .builtin import SUITE_VERSION, builtin_tasks, heldout_variant_tasks
from .core import SLOT, Task, raw_input
from .suite import suite_hash

START, END = "<!-- tasks-table:start -->", "<!-- tasks-table:end -->"


def _cell(text: str) -> str:
    """One markdown table cell: newlines shown as ⏎, pipes escaped, the input slot as `{x}`."""
    return "`" + text.replace("|", "\\|").replace("\n", " ⏎ ").replace("`", "'") + "`"


def _row(task: Task, kind: str) -> str:
    ex = task.train[0]
    example = f"{_cell(raw_input(ex))} → {_cell(ex.target)}"
    train = "<br>".join(_cell(w) for w in task.wordings.train)
    held = "<br>".join(_cell(w) for w in task.wordings.heldout)
    return f"| `{task.name}` | {task.family} | {kind} | {example} | {train} | {held} | `{task.wordings_hash}` |"


def render_table(seed: int = 0) -> str:
    """The markdown table (suite tasks, then held-out variants) and the suite hashes under it."""
    suite, variants = builtin_tasks(seed), heldout_variant_tasks(seed)
    lines = ["| task | family | set | example input → target | training wordings | held-out wordings "
             "| wordings hash |", "|---|---|---|---|---|---|---|"]
    lines += [_row(t, "suite") for t in suite] + [_row(t, "variant") for t in variants]
    lines += ["", f"`{SLOT}` is where the input goes; ⏎ is a line break. Suite version {SUITE_VERSION}; "
              f"`suite_hash` with seed {seed}: `builtin` `{suite_hash(suite)}`, `variants` "
              f"`{suite_hash(variants)}`."]
    return "\n".join(lines) + "\n"


def table_block(text: str, where: str = "the document") -> str:
    """The text between the markers (without them)."""
    if START not in text or END not in text:
        raise ValueError(f"{where} lacks the markers {START} ... {END}.")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_table(path: Path, seed: int = 0) -> bool:
    """Replace the table in `path`; returns whether the file changed."""
    text = path.read_text(encoding="utf-8")
    table_block(text, str(path))
    head, rest = text.split(START, 1)
    new = f"{head}{START}\n{render_table(seed)}{END}{rest.split(END, 1)[1]}"
    path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library_store.tasks.table", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="MD", help="replace the table between the markers in MD")
    group.add_argument("--check", type=Path, metavar="MD", help="exit 1 when MD's table differs from the code")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{args.write}: {'updated' if write_table(args.write) else 'already up to date'}")
    elif args.check:
        if table_block(args.check.read_text(encoding="utf-8"), str(args.check)) != render_table():
            print(f"{args.check} is stale; run python -m library_store.tasks.table --write {args.check}",
                  file=sys.stderr)
            return 1
        print(f"{args.check}: up to date")
    else:
        sys.stdout.write(render_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
