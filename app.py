"""The LoRA Expert Library Explorer page.

Usage::

    python app.py                                   # SmolLM2 + the two demo libraries, http://127.0.0.1:7860
    python app.py --base-model tiny-random-llama --library /tmp/lib --port 7861
    python app.py --library my-lib --host 0.0.0.0 --share --bf16
    python app.py --device cuda                     # bfloat16 on the GPU (--dtype to choose)

The page comes up at once; the model loads in a background thread and the page shows its progress. Libraries
are opened read-only: the page never writes into them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
DEMO_LIBRARIES = [ROOT / "assets" / "libraries" / "demo-mbc", ROOT / "assets" / "libraries" / "demo-private"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Token-by-layer routing over a library of LoRA experts.")
    parser.add_argument("--base-model", default="smollm2-135m-instruct",
                        help="built-in name (smollm2-135m-instruct, tiny-random-llama...), HF id or local path")
    parser.add_argument("--library", action="append", default=None, metavar="PATH",
                        help="an expert library folder; repeat for several (default: the demo libraries)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--bf16", action="store_true",
                        help="run the model in bfloat16 (= --dtype bfloat16; faster only on CPUs with bf16 units)")
    # the same flags as explorer.routing.device.add_device_arguments, without importing torch before the page is up
    parser.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda or cuda:N "
                        "(auto: a CUDA GPU when present). Default: %(default)s")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on the CPU), float32, "
                        "bfloat16 or float16. Default: %(default)s")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from explorer.page.registry import Registry
    from explorer.page.session import Session
    from explorer.page.ui import build_demo, launch

    libraries = args.library or [str(p) for p in DEMO_LIBRARIES]
    registry = Registry(args.base_model, libraries, dtype="bfloat16" if args.bf16 else args.dtype,
                        device=args.device)
    demo = build_demo(Session(registry))
    # The page first, then the model: loading competes for the CPU with the server's start, and the page shows
    # the loading progress anyway.
    launch(demo, host=args.host, port=args.port, share=args.share, prevent_thread_lock=True)
    registry.start()
    demo.block_thread()


if __name__ == "__main__":
    main()
