"""How long an upload to a library with a UMAP map takes on the page, with and without the Library tab's warm-up.

Adding (or removing) an expert redraws the library's ΔW map; from 10 experts up that map is UMAP, and the first
UMAP fit in a process compiles numba code. Each case runs in a fresh `python` process on a temporary copy of the
library's user data (the committed library is never modified): the page's registry is loaded, the Library tab's
`show` runs (the recorded map: no UMAP), then

- `cold`: the upload (`library_actions.upload`: store, attach, redraw) right away;
- `warm`: `warm_umap()` first, as opening the tab starts it in the background (its own time is printed), then the
  upload: what a user sees who opened the tab at least that long before uploading.

The uploaded adapter is a copy of one of the library's experts under a new name. Cases alternate, `--reps` each.

Usage::

    .venv/bin/python bench/upload_latency.py --library assets/libraries/demo-private --reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(library: str, case: str) -> dict:
    """One case in this process (see the module docstring): {"case", "warm_s", "upload_s", "message"}."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(2)
    from explorer.page import library_actions as act
    from explorer.page.registry import Registry
    from explorer.page.session import Session
    from library_store.training.mbc import warm_umap

    name = Path(library).name
    registry = Registry("smollm2-135m-instruct", [library])
    if not registry.wait(timeout=600):
        raise SystemExit(registry.status())
    session = Session(registry)
    act.show(session, name)
    warm = None
    if case == "warm":
        t0 = time.perf_counter()
        warm_umap()
        warm = time.perf_counter() - t0
    expert = sorted(registry.libs[name].names())[0]
    src = Path(library) / "experts" / expert
    files = [str(src / "adapter_config.json"), str(src / "adapter_model.safetensors")]
    t0 = time.perf_counter()
    out = act.upload(session, name, files, f"{expert}_copy", "", False)
    seconds = time.perf_counter() - t0
    if "Added expert" not in str(out.get("edit_msg", "")):
        raise SystemExit(f"upload refused: {out.get('edit_msg')}")
    return {"case": case, "warm_s": warm, "upload_s": seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--one", choices=["cold", "warm"], help=argparse.SUPPRESS)  # a child process's case
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.library, args.one)))
        return
    rows = []
    for rep in range(args.reps):
        for case in ("cold", "warm") if rep % 2 == 0 else ("warm", "cold"):
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "LORA_EXPLORER_DATA": f"{tmp}/data", "LORA_EXPLORER_DERIVED_CACHE": f"{tmp}/cache",
                       "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
                out = subprocess.run([sys.executable, __file__, "--library", args.library, "--one", case], env=env,
                                     capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for case in ("cold", "warm"):
        ups = [r["upload_s"] for r in rows if r["case"] == case]
        print(f"{case}: upload {statistics.median(ups):.1f} s (min {min(ups):.1f}, max {max(ups):.1f}, n={len(ups)})")
    warms = [r["warm_s"] for r in rows if r["warm_s"] is not None]
    print(f"the warm-up itself: {statistics.median(warms):.1f} s (min {min(warms):.1f}, max {max(warms):.1f})")


if __name__ == "__main__":
    main()
