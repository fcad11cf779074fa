"""Command line: generate with a routed library, or print the routing trace of a prompt as JSON.

Usage::

    python -m explorer generate --prompt "What is the capital of France?"
    python -m explorer generate --library assets/libraries/demo-mbc --prompt "Reverse the word: apple"
    python -m explorer trace --library assets/libraries/demo-mbc --prompt "Reverse the word: apple" \\
        --top-k 4 --max-new-tokens 8 --json

Errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    from library_store.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m explorer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, library_required: bool):
        sp.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template)")
        sp.add_argument("--base-model", default=DEFAULT_MODEL, help="built-in name, Hugging Face id or local dir")
        sp.add_argument("--library", required=library_required, help="expert library folder")
        sp.add_argument("--mode", default="arrow", help="arrow | base | uniform | expert:<name>")
        sp.add_argument("--top-k", type=int, default=4, help="experts per token (1..number of experts)")
        sp.add_argument("--temperature", type=float, default=1.0, help="router softmax temperature (> 0)")
        sp.add_argument("--disable", default="", help="comma-separated experts to leave out")
        sp.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
        sp.add_argument("--bf16", action="store_true", help="load the base model in bfloat16")

    g = sub.add_parser("generate", help="print the model's answer to a prompt")
    common(g, library_required=False)
    g.add_argument("--max-new-tokens", type=int, default=32)
    t = sub.add_parser("trace", help="print the routing of every token of a prompt (and its answer)")
    common(t, library_required=True)
    t.add_argument("--max-new-tokens", type=int, default=0)
    t.add_argument("--json", action="store_true", help="print one JSON object (else a short summary)")
    return p


def _routed(args):
    import torch

    from explorer.routing.model import RoutedModel, RouterConfig
    from library_store.models import load_base_model
    from library_store.store.library import ExpertLibrary

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for the one error line, not a weight-loading bar
    router = RouterConfig(mode=args.mode, top_k=args.top_k, temperature=args.temperature,
                          disabled=tuple(n for n in args.disable.split(",") if n))
    base = load_base_model(args.base_model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.library is None:
        return RoutedModel(base, [], RouterConfig(mode="base"))
    return RoutedModel.from_library(base, ExpertLibrary.open(args.library), router)


def _summary(trace) -> str:
    """One line per token: the expert with the largest weight averaged over layers and modules."""
    mean = trace.weights.mean(axis=(0, 1))  # (tokens, experts)
    lines = [f"mode={trace.mode} top_k={trace.top_k} temperature={trace.temperature} experts={len(trace.experts)}"]
    for i, tok in enumerate(trace.tokens):
        best = trace.experts[int(mean[i].argmax())] if trace.experts and mean[i].max() > 0 else "-"
        lines.append(f"{i:4d} {'gen' if trace.is_generated[i] else '   '} {tok!r:24} {best}")
    if trace.text:
        lines.append(f"text: {trace.text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        rm = _routed(args)
        if args.command == "generate":
            print(rm.generate(args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat))
        else:
            trace = rm.trace(args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat)
            trace.meta["library"] = args.library
            print(json.dumps(trace.to_dict()) if args.json else _summary(trace))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line, not a traceback
        from library_store.models import BaseModelError
        from library_store.store.library import LibraryError

        if not isinstance(exc, (ValueError, LookupError, KeyError, OSError, LibraryError, BaseModelError)):
            raise
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0
