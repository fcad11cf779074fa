"""Tasks from a folder of `<task>.jsonl` files.

Usage::

    tasks = load_jsonl_folder("my_tasks/")     # my_tasks/greet.jsonl -> Task "greet"

Each line is `{"input": ..., "target": ...}` (generative) or `{"input": ..., "choices": [...], "answer": i}`
(multiple choice; `answer` may also be the right choice's text). A file's examples are split 80/20 into train
and held out with a fixed seed. A malformed line is reported with its file and line number.
"""
from __future__ import annotations

import json
from pathlib import Path

from .core import Example, Task, TaskError, split_examples


def _parse_line(raw: str, where: str) -> Example:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{where}: not valid JSON ({exc.msg}).") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
        raise TaskError(f"{where}: each line must be an object with a string 'input'.")
    if "choices" in obj:
        choices, answer = obj["choices"], obj.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: 'choices' must be a list of at least two strings.")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TaskError(f"{where}: 'answer' must be the index (0..{len(choices) - 1}) or text of one choice.")
        return Example(obj["input"], choices[answer], choices=choices, answer=answer)
    if not isinstance(obj.get("target"), str):
        raise TaskError(f"{where}: a line needs a string 'target' (or 'choices' and 'answer').")
    return Example(obj["input"], obj["target"])


def load_jsonl_file(path: Path, seed: int = 0) -> Task:
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                examples.append(_parse_line(raw, f"{path}, line {lineno}"))
    kinds = {ex.choices is not None for ex in examples}
    if len(kinds) > 1:
        raise TaskError(f"{path}: mixes generative and multiple-choice lines; use one kind per file.")
    train, heldout = split_examples(examples, seed=seed) if examples else ([], [])
    metric = "multiple_choice" if kinds == {True} else "exact_match"
    return Task(path.stem, "jsonl", train, heldout, metric=metric, source=f"jsonl:{path.parent}")


def load_jsonl_folder(folder: str | Path, names: list[str] | None = None, seed: int = 0) -> list[Task]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TaskError(f"JSONL task folder {folder} does not exist (expected a folder of <task>.jsonl files).")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise TaskError(f"JSONL task folder {folder} holds no .jsonl files.")
    by_name = {f.stem: f for f in files}
    if names:
        files = [by_name[n] for n in names]
    return [load_jsonl_file(f, seed=seed) for f in files]
