"""BIG-bench tasks read straight out of the `bigbench==1.0.0` sdist from PyPI (never installed).

Usage::

    tasks = load_bigbench_tasks(["navigate", "snarks"])   # downloads the sdist once (358 MB), then cached

The first use runs `pip download --no-deps bigbench==1.0.0` into `<cache>/bigbench/` with pip's own progress
shown, then extracts every `bigbench/benchmark_tasks/**/task.json` from the tarball in one pass into
`<cache>/bigbench/tasks/` (a few MB); later uses read those files only. Generative examples (`target`) and
multiple-choice ones (`target_scores`) are both read; tasks split into subtasks are joined; programmatic tasks
(a `task.py`, no JSON) are refused by name. The examples are split 80/20 into train and held out, seeded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from .core import Example, Task, TaskError, split_examples, unknown_name_error

BIGBENCH_VERSION = "1.0.0"
SDIST_SIZE = "358 MB"
_TASKS_DIR = "bigbench/benchmark_tasks/"


def bigbench_cache() -> Path:
    from library_store.models import cache_dir

    return cache_dir() / "bigbench"


def find_sdist(folder: Path) -> Path | None:
    found = sorted(folder.glob(f"bigbench-{BIGBENCH_VERSION}.tar.gz"))
    return found[0] if found else None


def download_sdist(folder: Path) -> Path:
    """`pip download` the sdist (pip's progress bar goes straight to the terminal).

    bigbench 1.0.0 declares a `file://` dependency (bleurt), so pip stops with "cannot declare direct URL
    dependencies" after downloading and unpacking it. `--no-clean` and a private TMPDIR keep that unpacked
    tree; the task files are then read from it. Returns the tarball, or the unpacked tree in that case."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "pip-tmp"
    tmp.mkdir(exist_ok=True)
    print(f"Downloading BIG-bench {BIGBENCH_VERSION} from PyPI ({SDIST_SIZE}, once) into {folder} ...",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--progress-bar", "on",
           f"bigbench=={BIGBENCH_VERSION}", "-d", str(folder)]
    result = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(tmp)})  # not captured: pip's progress shows
    sdist = find_sdist(folder)
    if sdist is not None:
        return sdist
    trees = sorted(tmp.glob(f"pip-download-*/bigbench*/{_TASKS_DIR}"))
    if trees:
        return trees[0].parent.parent
    raise TaskError(f"Could not download bigbench=={BIGBENCH_VERSION} (pip exited with {result.returncode}). "
                    f"Download bigbench-{BIGBENCH_VERSION}.tar.gz elsewhere and put it in {folder}.")


def _wanted(rel: str) -> bool:
    return (rel.endswith("/task.json") or rel.endswith("/task.py")) and ".." not in rel.split("/")


def extract_task_files(source: Path, dest: Path) -> int:
    """Copy every task.json (and mark programmatic tasks' task.py) out of the sdist tarball in one streaming
    pass, or out of an unpacked sdist tree. Returns the number of task.json files."""
    import shutil

    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    n = 0
    if Path(source).is_dir():
        root = Path(source) / _TASKS_DIR
        for f in sorted(root.rglob("task.*")):
            rel = f.relative_to(root).as_posix()
            if _wanted("/" + rel) and "/" in rel:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, staging / rel)
                n += rel.endswith("task.json")
    else:
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:  # streaming: the 358 MB archive is read once
                path = member.name.split("/", 1)[-1]  # drop "bigbench-1.0.0/"
                if not member.isfile() or not path.startswith(_TASKS_DIR) or not _wanted(path[len(_TASKS_DIR):]):
                    continue
                out = staging / path[len(_TASKS_DIR):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
                n += path.endswith("task.json")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return n


def task_folder(sdist: Path | None = None, cache: Path | None = None) -> Path:
    """The extracted task files, downloading and extracting on first use."""
    cache = Path(cache) if cache else bigbench_cache()
    dest = cache / "tasks"
    if dest.is_dir():
        return dest
    sdist = sdist or find_sdist(cache) or download_sdist(cache)
    print(f"Extracting BIG-bench task files from {sdist} ...", file=sys.stderr, flush=True)
    n = extract_task_files(sdist, dest)
    import shutil

    shutil.rmtree(cache / "pip-tmp", ignore_errors=True)  # the unpacked sdist is 1.8 GB; the task files suffice
    print(f"BIG-bench: {n} task files cached in {dest}", file=sys.stderr, flush=True)
    return dest


def available_tasks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _examples(data: dict, where: str) -> tuple[list[Example], str]:
    prefix = (data.get("task_prefix") or "").strip()
    out, kinds = [], set()
    for i, ex in enumerate(data.get("examples", [])):
        text = str(ex.get("input", "")).strip()
        text = f"{prefix}\n{text}" if prefix else text
        if "target_scores" in ex:
            scores = ex["target_scores"]
            choices = [str(c) for c in scores]
            if not choices:
                raise TaskError(f"{where}: example {i} has an empty 'target_scores'.")
            values = [float(v) for v in scores.values()]
            answer = values.index(max(values))
            if data.get("append_choices_to_input", True):  # BIG-bench's default: the options follow the input
                text += "".join(f"{data.get('choice_prefix', chr(10) + ' choice: ')}{c}" for c in choices)
            out.append(Example(text, choices[answer], choices=choices, answer=answer))
            kinds.add("multiple_choice")
        elif "target" in ex:
            target = ex["target"]
            target = target[0] if isinstance(target, list) and target else target
            if not isinstance(target, str):
                raise TaskError(f"{where}: example {i} has a target that is not text.")
            out.append(Example(text, target))
            kinds.add("exact_match")
        else:
            raise TaskError(f"{where}: example {i} has neither 'target' nor 'target_scores'.")
    metric = "multiple_choice" if kinds == {"multiple_choice"} else "exact_match"
    return out, metric


def _has_examples(path: Path) -> bool:
    """A parent task's task.json only describes its subtasks; it holds no examples."""
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("examples"))
    except json.JSONDecodeError:
        return True  # let read_task report the broken file


def read_task(folder: Path, name: str, seed: int = 0) -> Task:
    """One task by folder name; subtasks (`<task>/<sub>/task.json`) are joined into one task."""
    root = folder / name
    files = [root / "task.json"] if _has_examples(root / "task.json") else sorted(root.glob("*/task.json"))
    if not files:
        if (root / "task.py").is_file():
            raise TaskError(f"BIG-bench task {name!r} is programmatic (task.py); only JSON tasks can be read.")
        raise TaskError(f"BIG-bench task {name!r} holds no task.json.")
    examples, metrics = [], set()
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TaskError(f"{f}: not valid JSON ({exc.msg}).") from None
        ex, metric = _examples(data, str(f))
        examples += ex
        metrics.add(metric)
    metric = "multiple_choice" if metrics == {"multiple_choice"} else "exact_match"
    if metric == "exact_match":  # a mixed task is scored generatively; its MC examples still have a target
        examples = [Example(e.input, e.target) for e in examples]
    train, heldout = split_examples(examples, seed=seed) if examples else ([], [])
    return Task(name, "bigbench", train, heldout, metric=metric, source="bigbench")


def load_bigbench_tasks(names: list[str], seed: int = 0, sdist: Path | None = None,
                        cache: Path | None = None) -> list[Task]:
    folder = task_folder(sdist, cache)
    known = available_tasks(folder)
    for n in names:
        if n not in known:
            raise unknown_name_error("BIG-bench task", n, known)
    return [read_task(folder, n, seed) for n in names]
