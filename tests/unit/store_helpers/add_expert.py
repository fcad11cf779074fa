"""Add one random expert to a library in a fresh interpreter, optionally stopping at a named crash point.

    python add_expert.py LIB NAME SEED RANK [--replace] [--pause-at POINT --marker FILE]

With --pause-at, the process writes MARKER when it reaches POINT and sleeps, so the test can `kill -9` it
from outside exactly there.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/unit, for store_helpers

from library_store.store import io as store_io  # noqa: E402
from library_store.store.library import ExpertLibrary  # noqa: E402
from store_helpers.experts import LLAMA, random_expert  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("lib")
parser.add_argument("name")
parser.add_argument("seed", type=int)
parser.add_argument("rank", type=int)
parser.add_argument("--replace", action="store_true")
parser.add_argument("--pause-at")
parser.add_argument("--marker")
args = parser.parse_args()


def pause(point: str) -> None:
    if point == args.pause_at:
        Path(args.marker).write_text(point)
        time.sleep(600)


store_io.crash_point = pause
lib = ExpertLibrary.open(args.lib, readonly=False)
lib.add(random_expert(LLAMA, args.name, rank=args.rank, seed=args.seed), replace=args.replace)
print("added", args.name)
