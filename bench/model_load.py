"""Cold GGUF conversion vs cached load of the embedded SmolLM2 (each in a fresh process).

    .venv/bin/python bench/model_load.py            # prints a table, writes bench/results/model_load.json

Goal: cached load under 3 s. Each measurement runs in its own interpreter so imports and caches do not leak
between them; import time is reported apart from load time.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from library_store.models import load_base_model
from transformers import AutoModelForCausalLM, AutoTokenizer  # imports are reported apart from the load
from transformers.models.llama import modeling_llama  # noqa: F401
t1 = time.perf_counter()
base = load_base_model("smollm2-135m-instruct", dtype=getattr(torch, sys.argv[1]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def run(cache: str, dtype: str) -> dict:
    env = {**os.environ, "LORA_EXPLORER_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, dtype], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        cold = run(cache, "float32")
        warm = {"float32": [], "bfloat16": []}
        for _ in range(3):  # interleaved so machine noise hits both dtypes alike
            for dtype in warm:
                warm[dtype].append(run(cache, dtype)["load_s"])
    rows = {
        "cold_conversion_s": cold["load_s"],
        "cached_load_fp32_s": statistics.median(warm["float32"]),
        "cached_load_bf16_s": statistics.median(warm["bfloat16"]),
        "import_s": cold["import_s"],
    }
    rows["cached_total_with_imports_s"] = rows["import_s"] + rows["cached_load_fp32_s"]
    rows["cold_over_cached"] = rows["cold_conversion_s"] / rows["cached_load_fp32_s"]
    for key, value in rows.items():
        print(f"{key:22s} {value:8.2f}")
    print(f"goal: cached load < 3 s -> {'met' if rows['cached_load_fp32_s'] < 3 else 'NOT met'}")
    out = ROOT / "bench" / "results" / "model_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
