"""Adapters to upload in the page tests: a good one that wins its prompt, and every hostile or bad kind.

Usage::

    good = aligned_adapter(base, "Shout: hello there", tmp_path / "good", name="shouter")   # PEFT folder
    zipped = zip_folder(good, tmp_path / "good.zip")
    for label, (files, name, message) in hostile_uploads(good, tmp_path / "bad").items(): ...

The good adapter's leading direction is the principal direction of every wrapped layer's inputs for its prompt,
so its Arrow prototype scores those tokens far above random experts': it wins the prompt. Everything is written by hand
(ExpertLibrary.export for the good one), never by the code under test.
"""
from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from library_store.store.library import ExpertLibrary
from library_store.testing import random_expert


@torch.no_grad()
def aligned_adapter(base, prompt: str, dest: Path, name: str = "shouter", tasks=("shout",), seed: int = 7,
                    strength: float = 8.0, rounds: int = 3) -> Path:
    """A PEFT adapter folder (exported from a scratch library) whose prototypes follow `prompt`'s user tokens.
    The inputs of layer 1 depend on what layer 0 applied, so the directions are refined a few rounds with the
    expert itself applied (what happens once it wins)."""
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel
    from explorer.routing.trace import user_token_span

    formatted = base.format_prompt(prompt, True)
    ids = base.tokenizer(formatted, return_tensors="pt", add_special_tokens=False).input_ids
    lo, hi = user_token_span(base.tokenizer, formatted, prompt, ids.shape[1])  # the user's own tokens
    expert = random_expert(base, name, list(tasks), seed=seed)
    sites = list(expert.factors())
    applied = None
    for _ in range(rounds):
        rm = RoutedModel(base, [applied], RouterConfig(mode=f"expert:{name}", top_k=1)) if applied else None
        directions, hooks = {}, []
        for site in sites:
            hooks.append(base.model.get_submodule(site).register_forward_hook(
                lambda m, args, out, site=site: directions.__setitem__(site, _top_direction(args[0][0, lo:hi]))))
        try:
            base.model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
            if rm is not None:
                rm.detach()
        weights = dict(expert.weights)
        for site in sites:
            key_a = next(k for k in weights if k.endswith(f"{site}.lora_A.weight"))
            key_b = key_a.replace("lora_A", "lora_B")
            a, b = weights[key_a].clone(), weights[key_b].clone()  # (r, d), (out, r)
            a[0], a[1:] = directions[site], a[1:] * 0.1  # (d,): the user tokens' principal direction
            b[:, 0] = b[:, 0] * strength  # the aligned component dominates B·A: its top singular direction
            weights[key_a], weights[key_b] = a, b
        applied = type(expert)(expert.info, weights)
    scratch = ExpertLibrary.create(Path(dest).parent / f".scratch-{name}", base)
    scratch.add(applied)
    return scratch.export(name, dest)


def _top_direction(h: torch.Tensor) -> torch.Tensor:
    """(t, d) inputs -> (d,) unit vector maximising the sum of squared scores |h · p|² over the tokens."""
    return torch.linalg.svd(h.float(), full_matrices=False).Vh[0]


def zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(folder).iterdir()):
            zf.write(f, prefix + f.name)
    return out


def _folder_with(good: Path, dest: Path, config: dict | None = None, weights: dict | None = None) -> list[str]:
    dest.mkdir(parents=True)
    cfg = json.loads((good / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if weights is None:
        (dest / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(dest / "adapter_model.safetensors"))
    return [str(dest / "adapter_config.json"), str(dest / "adapter_model.safetensors")]


def hostile_uploads(good: Path, root: Path) -> dict[str, tuple[list[str], str, str]]:
    """label -> (files to upload, expert name, a regex of the message shown); none may change the library."""
    from safetensors.torch import load_file

    root.mkdir(parents=True, exist_ok=True)
    cfg, weights = (good / "adapter_config.json").read_bytes(), load_file(str(good / "adapter_model.safetensors"))
    out = {}

    def zipped(label, entries, symlink=None):
        path = root / f"{label}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for arcname, data in entries:
                zf.writestr(arcname, data)
            if symlink:
                info = zipfile.ZipInfo(symlink)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, "/etc/passwd")
        return [str(path)]

    st = (good / "adapter_model.safetensors").read_bytes()
    out["traversal"] = (zipped("traversal", [("../adapter_config.json", cfg), ("../adapter_model.safetensors", st)]),
                        "t1", r"points outside the upload")
    out["absolute"] = (zipped("absolute", [("/tmp/adapter_config.json", cfg), ("adapter_model.safetensors", st)]),
                       "t2", r"points outside the upload")
    out["symlink"] = (zipped("symlink", [("adapter_config.json", cfg), ("adapter_model.safetensors", st)],
                             symlink="evil"), "t3", r"symlink")
    out["bomb"] = (zipped("bomb", [("adapter_config.json", cfg), ("adapter_model.safetensors", b"\0" * (24 << 20))]),
                   "t4", r"zip bomb")
    out["entries"] = (zipped("entries", [(f"f{i}.txt", b"x") for i in range(80)]), "t5", r"80 entries")
    out["pickle"] = (zipped("pickle", [("adapter_config.json", cfg), ("adapter_model.bin", b"\x80\x04pickle")]),
                     "t6", r"pickle")
    out["ia3"] = (_folder_with(good, root / "ia3", {"peft_type": "IA3"}), "t7", r"not a LoRA adapter")
    out["dora"] = (_folder_with(good, root / "dora", {"use_dora": True}), "t8", r"DoRA")
    wrong = {k: (v[:, :32] if "lora_A" in k else v) for k, v in weights.items()}  # d_in 32, the base has 64
    out["shapes"] = (_folder_with(good, root / "shapes", weights=wrong), "t9", r"(?i)shape|does not fit|expects")
    big = {k: torch.randn(300, v.shape[1]) if "lora_A" in k else torch.randn(v.shape[0], 300)
           for k, v in weights.items()}
    out["rank"] = (_folder_with(good, root / "rank", {"r": 300}, big), "t10", r"rank")
    nan = {k: v.clone().fill_(float("nan")) for k, v in weights.items()}
    out["nan"] = (_folder_with(good, root / "nan", weights=nan), "t11", r"(?i)non-finite|NaN")
    for label, name, message in (("empty-name", "", r"name is empty"), ("path-name", "../escape", r"looks like a path"),
                                 ("long-name", "x" * 200, r"200 characters"),
                                 ("html-name", "<b>x</b>", r"markup")):
        out[label] = ([str(good / "adapter_config.json"), str(good / "adapter_model.safetensors")], name, message)
    return out


def tree_digest(root, derived: bool = False) -> dict[str, str]:
    """path -> bytes of every file of a library folder but SQLite's side files: unchanged means unchanged. Derived
    data (caches a writable library may add) counts only with `derived` (a committed library gains none)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.endswith(("-shm", "-wal"))
            and not p.name.startswith(".lock") and (derived or os.sep + "derived" + os.sep not in str(p))}
