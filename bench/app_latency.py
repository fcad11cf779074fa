"""Page latency through gradio_client: a prompt (<= 64 tokens) + 32 new tokens -> text and every figure, and
the time from a second `python app.py` to its first page.

Usage::

    python bench/app_latency.py                                  # SmolLM2 + demo-mbc, 8 runs
    python bench/app_latency.py --library assets/libraries/demo-private --runs 12 --bf16
    python bench/app_latency.py --base-model tiny-random-llama --library /tmp/lib --no-baseline

Every timed run generates exactly 32 new tokens (min_new_tokens: the demo experts would otherwise stop after
a few). Side by side in the same run, the bare model (no experts, no page) makes the same tokens for the same
prompts, so the page's overhead reads as a ratio even on a busy machine. The start-up figures come from
`python app.py` subprocesses. Writes bench/results/app_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Reverse the letters of this word: garden",
    "Add these numbers: 47 + 28",
    "Convert this date to MM/DD/YYYY: 2021-07-04",
    "Is this an animal or a plant? a sleepy tiger",
    "Write the number 42 in words.",
    "Uppercase this word: window",
    "Which is larger, 381 or 318?",
    "Is this a fruit or a vegetable? a ripe mango",
    "Drop the vowels from this word: keyboard",
    "Convert 18:45 to 12-hour time.",
]
NEW_TOKENS = 32
GOALS = {"route_p50_s": 3.0, "second_start_to_page_s": 15.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app_args: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str, float]:
    """Start app.py; return the process, its URL and the seconds until / answered."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *app_args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"no page at {url} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bare_generate(base_model: str, dtype: str, prompts: list[str], new_tokens: list[int]) -> list[float]:
    """The model alone (no experts, no page) making the same number of new tokens for the same prompts."""
    import torch

    from library_store.models import load_base_model

    base = load_base_model(base_model, dtype=getattr(torch, dtype))
    times = []
    for prompt, n in [(prompts[0], 4)] + list(zip(prompts, new_tokens)):  # the first is a warm-up
        ids = base.tokenizer(base.format_prompt(prompt), return_tensors="pt", add_special_tokens=False).input_ids
        t0 = time.perf_counter()
        base.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        times.append(time.perf_counter() - t0)
    return times[1:]


def serve(base_model: str, library: str, dtype: str):
    """The page in this process, so the bench can make every run generate exactly NEW_TOKENS tokens."""
    from explorer.page.session import Explorer
    from explorer.page.ui import build_demo, launch

    explorer = Explorer(base_model, [library], dtype=dtype)
    demo = build_demo(explorer)
    launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    explorer.start()
    if not explorer.wait(timeout=600):
        raise RuntimeError(explorer.status())
    # The demo experts answer in a few tokens; the goal is about 32 new tokens, so no early stop at EOS.
    explorer.base.model.generation_config.min_new_tokens = NEW_TOKENS
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--library", default=str(ROOT / "assets" / "libraries" / "demo-mbc"))
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare-model timing")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "app_latency.json"))
    args = parser.parse_args()
    from gradio_client import Client

    app_args = ["--base-model", args.base_model, "--library", args.library] + (["--bf16"] if args.bf16 else [])
    library = Path(args.library).name
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.runs)]

    proc, _, first_start = start(app_args)  # the first start also fills the caches (converted weights...)
    stop(proc)
    proc, url, second_start = start(app_args)  # what a visitor waits for on a warm machine
    try:
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        status = client.predict(library, api_name="/library")[0]
        ready = second_start + time.perf_counter() - t0
    finally:
        stop(proc)
    print(f"second start: page after {second_start:.1f} s, model ready after {ready:.1f} s ({status})")

    dtype = "bfloat16" if args.bf16 else "float32"
    demo = serve(args.base_model, args.library, dtype)
    try:
        client = Client(demo.local_url, verbose=False)

        def route(prompt: str):
            return client.predict(prompt, library, True, args.top_k, 1.0, NEW_TOKENS, [], "mean", "expert", None,
                                  False, api_name="/route")

        route(prompts[0])  # warm-up: first-call costs are not what a visitor sees on each Run
        times, generated = [], []
        for prompt in prompts:
            t1 = time.perf_counter()
            out = route(prompt)
            times.append(time.perf_counter() - t1)
            generated.append(sum(json.loads(out[9])["is_generated"]))
            print(f"  route {times[-1]:6.2f} s  {generated[-1]:2d} new tokens  {prompt!r}")
        t1 = time.perf_counter()
        client.predict(prompts[0], library, True, NEW_TOKENS, api_name="/compare")
        compare_s = time.perf_counter() - t1
    finally:
        demo.close()

    bare = [] if args.no_baseline else bare_generate(args.base_model, dtype, prompts, generated)
    result = {
        "command": " ".join(["python", "bench/app_latency.py", *sys.argv[1:]]),
        "base_model": args.base_model, "library": args.library, "bf16": args.bf16, "top_k": args.top_k,
        "new_tokens": NEW_TOKENS, "runs": args.runs,
        "route_p50_s": round(statistics.median(times), 3), "route_p90_s": round(pct(times, 0.9), 3),
        "route_s": [round(t, 3) for t in times], "generated_tokens": generated,
        "compare_s": round(compare_s, 3), "forced_new_tokens": True,
        "first_start_to_page_s": round(first_start, 2), "second_start_to_page_s": round(second_start, 2),
        "second_start_to_ready_s": round(ready, 2),
        "bare_generate_p50_s": round(statistics.median(bare), 3) if bare else None,
        "route_over_bare_generate": round(statistics.median(times) / statistics.median(bare), 2) if bare else None,
        "goals": GOALS,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "python": platform.python_version()},
    }
    result["meets_goals"] = {"route_p50": result["route_p50_s"] <= GOALS["route_p50_s"],
                             "second_start": result["second_start_to_page_s"] <= GOALS["second_start_to_page_s"]}
    print(f"\nroute p50 {result['route_p50_s']:.2f} s, p90 {result['route_p90_s']:.2f} s (goal p50 <= 3 s); "
          f"bare generate p50 {result['bare_generate_p50_s']} s, ratio {result['route_over_bare_generate']}; "
          f"second start to page {second_start:.1f} s (goal <= 15 s); compare {compare_s:.1f} s; "
          f"load average {result['machine']['loadavg_1m']:.1f} on {os.cpu_count()} CPUs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
