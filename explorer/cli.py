"""Command line: generate with a routed library, or print the routing trace of a prompt as JSON.

Usage::

    python -m explorer generate --prompt "What is the capital of France?"
    python -m explorer generate --library assets/libraries/demo-mbc --prompt "Reverse the word: apple"
    python -m explorer trace --library assets/libraries/demo-mbc --prompt "Reverse the word: apple" \\
        --top-k 4 --max-new-tokens 8 --json
    python -m explorer trace --library assets/libraries/demo-private --prompt "Add: 2 + 3" --centre mean \\
        --centre-scope weights
    python -m explorer trace --library assets/libraries/demo-mbc --prompt "Reverse the word: apple" \\
        --input-centre base
    python -m explorer generate --library assets/libraries/demo-private --prompt "Please compute 25 + 19" \\
        --granularity prompt

Router settings not given on the command line come from the library's recorded default router (what its
evaluation chose, `library_store.store.reports.default_router`), else the built-in defaults. Settings are checked
by the page's request normaliser (`explorer.page.request`, strict: what the page would
clamp is refused here). Libraries are opened read-only. Errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    from explorer.routing.config import GRANULARITIES, INPUT_CENTRES, PICKS
    from explorer.routing.device import add_device_arguments
    from library_store.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m explorer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, library_required: bool):
        sp.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template)")
        sp.add_argument("--base-model", default=DEFAULT_MODEL, help="built-in name, Hugging Face id or local dir")
        sp.add_argument("--library", required=library_required, help="expert library folder")
        sp.add_argument("--mode", default="arrow", help="arrow | base | uniform | expert:<name>")
        sp.add_argument("--top-k", type=int, default=None,
                        help="experts per token (1..number of experts; default: the library's default router)")
        sp.add_argument("--temperature", type=float, default=None,
                        help="router softmax temperature (> 0; default: the library's default router)")
        sp.add_argument("--centre", default=None, metavar="{none,mean,general:<name>}",
                        help="subtract the experts' mean LoRA (or one general expert) before routing "
                             "(default: the library's default router)")
        sp.add_argument("--centre-scope", default=None, choices=["prototypes", "weights"],
                        help="centre the prototypes only, or the applied weights too (PEFT's GenKnowSub)")
        sp.add_argument("--input-centre", default=None, choices=list(INPUT_CENTRES),
                        help="subtract the base model's mean layer input before scoring (docs/design.md, "
                             "\"Input centring\"; default: the library's default router)")
        sp.add_argument("--granularity", default=None, choices=list(GRANULARITIES),
                        help="route every token (Arrow), or pick one expert per prompt from the routing of your "
                             "text and answer with it alone (docs/design.md, \"Prompt-level routing\"; default: "
                             "the library's default router)")
        sp.add_argument("--pick", default=None, choices=list(PICKS),
                        help="per prompt: the expert with the largest mean weight, or the library's fitted readout "
                             "of the per-layer routing (default: the library's default router)")
        sp.add_argument("--route-layers", default=None, metavar="LAYERS",
                        help="Arrow routes at these layers only, e.g. '0-3, 12, 15' or 'all'; the others run the "
                             "base model (docs/design.md, \"Routed layers\"; default: the library's default router)")
        sp.add_argument("--expert-scales", default=None, choices=["default", "none"],
                        help="score each expert times the factor fitted on the library's training prompts, or "
                             "Arrow's plain score (docs/design.md, \"Expert scales\"; default: the library's "
                             "default router)")
        sp.add_argument("--disable", default="", help="comma-separated experts to leave out")
        sp.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
        sp.add_argument("--bf16", action="store_true", help="load the base model in bfloat16 (= --dtype bfloat16)")
        add_device_arguments(sp)

    g = sub.add_parser("generate", help="print the model's answer to a prompt")
    common(g, library_required=False)
    g.add_argument("--max-new-tokens", type=int, default=32)
    t = sub.add_parser("trace", help="print the routing of every token of a prompt (and its answer)")
    common(t, library_required=True)
    t.add_argument("--max-new-tokens", type=int, default=0)
    t.add_argument("--json", action="store_true", help="print one JSON object (else a short summary)")
    return p


def _routed(args):
    """The RoutedModel and the checked request of the command line (ValueError: one line for the user)."""
    from transformers.utils import logging as hf_logging

    from explorer.page.registry import library_default_router
    from explorer.page.request import CLI_LIMITS, RawRequest, normalise
    from explorer.routing.config import RouterConfig
    from explorer.routing.device import resolve_device, resolve_dtype
    from explorer.routing.model import RoutedModel
    from library_store.models import load_base_model
    from library_store.store.library import ExpertLibrary

    hf_logging.disable_progress_bar()  # stderr is for the one error line, not a weight-loading bar
    device = resolve_device(args.device)
    base = load_base_model(args.base_model, dtype=resolve_dtype("bfloat16" if args.bf16 else args.dtype, device))
    base.model.to(device)  # routed buffers are built on the base layers' device
    names, defaults = [], {}
    if args.library is None:  # the bare model: nothing to route
        rm = RoutedModel(base, [], RouterConfig(mode="base"))
    else:  # read-only: a command line run never writes into the library (caches go to the user's cache dir)
        lib = ExpertLibrary.open(args.library, readonly=True)
        rm = RoutedModel.from_library(base, lib, RouterConfig(mode="base"))
        names, defaults = lib.names(), library_default_router(lib)
    raw = RawRequest(prompt=args.prompt, library=args.library or "", mode=args.mode if args.library else "base",
                     top_k=args.top_k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                     disabled=args.disable, chat=not args.no_chat, centre=args.centre,
                     centre_scope=args.centre_scope, input_centre=args.input_centre,
                     granularity=args.granularity, pick=args.pick, layers=args.route_layers,
                     scales=args.expert_scales)
    done = normalise(raw, rm.experts, tokenizer=base.tokenizer, context_length=base.context_length,
                     limits=CLI_LIMITS, strict=True, names=names, defaults=defaults, model_layers=rm.layers)
    if done.error:
        raise ValueError(done.error)
    rm.set_router(done.request.router)
    return rm, done.request


def _summary(trace) -> str:
    """One line per token: the expert with the largest weight averaged over layers and modules."""
    from explorer.routing.config import compact_layers

    router = trace.router
    centre = f" centre={router.centre} scope={router.centre_scope}" if router.centre != "none" else ""
    centre += f" input_centre={router.input_centre}" if router.input_centre != "none" else ""
    centre += f" layers={compact_layers(router.layers)}" if router.layers is not None else ""
    centre += " expert_scales=fitted" if router.scales else ""
    lines = [f"mode={trace.mode} top_k={trace.top_k} temperature={trace.temperature}{centre} "
             f"granularity={router.granularity}{' pick=' + router.pick if router.per_prompt else ''} "
             f"experts={len(trace.experts)}"]
    if trace.evidence is not None:  # per prompt: the pick and why; the lines below show it applied
        lines.append(trace.meta["pick"]["text"])
    elif "lean" in trace.meta:  # per token: what the user's text leans to, flagged when it hardly decided
        lines.append(trace.meta["lean"]["text"])
    for i, tok in enumerate(trace.tokens):
        best = trace.crop([i]).winner("all") or "-"
        lines.append(f"{i:4d} {'gen' if trace.is_generated[i] else '   '} {tok!r:24} {best}")
    if trace.text:
        lines.append(f"text: {trace.text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        rm, req = _routed(args)
        if args.command == "generate":
            print(rm.generate(req.prompt, max_new_tokens=req.max_new_tokens, chat=req.chat))
        else:
            trace = rm.trace(req.prompt, max_new_tokens=req.max_new_tokens, chat=req.chat)
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
