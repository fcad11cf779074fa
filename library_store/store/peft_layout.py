"""PEFT's adapter layout: write an expert as `adapter_config.json` + `adapter_model.safetensors`, read one back.

Usage::

    write_adapter(folder, expert, base_source="smollm2-135m-instruct")   # PeftModel.from_pretrained loads it
    info, weights = read_adapter(folder, name="mine", kind="imported")   # safetensors only, never pickle

Only plain LoRA on linear layers is accepted; anything whose math our LoraExpert cannot hold (DoRA,
per-module rank or alpha patterns, Conv1D's fan-in-fan-out, extra saved modules) is refused by name.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from library_store.expert import PEFT_PREFIX, ExpertInfo, parse_site
from library_store.store.errors import LibraryError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
# PEFT saves `...q_proj.lora_A.weight`; some tools keep the adapter name: `...q_proj.lora_A.default.weight`.
_KEY_RE = re.compile(r"^(?P<site>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def load_weights(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """safetensors only: a file that is missing, truncated or not safetensors raises LibraryError. `data`: the
    file's bytes, already read (and checked) by the caller, parsed instead of reading `path` again."""
    try:
        return load_file(str(path)) if data is None else load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LibraryError(f"Cannot read {path}: {exc}") from exc


def write_adapter(folder: Path, weights: dict[str, torch.Tensor], info: ExpertInfo, base_source: str) -> Path:
    """Write PEFT's two files into `folder` (which exists); returns the safetensors path."""
    layers = sorted({parse_site(k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0])[0] for k in weights})
    # The fields of peft.LoraConfig that decide loading; PEFT fills the rest with its defaults. Written by
    # hand so that storing an expert does not import peft (and transformers) in every build worker.
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_source,
        "r": info.rank, "lora_alpha": info.alpha, "target_modules": sorted(info.target_modules),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
        # An expert that covers only some layers must not get (zero) LoRA modules on the others.
        "layers_to_transform": layers if layers != list(range(max(layers) + 1)) else None,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = folder / WEIGHTS_FILE
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})
    return path


def read_adapter(folder: Path, name: str, kind: str = "imported") -> tuple[ExpertInfo, dict[str, torch.Tensor]]:
    """An existing PEFT LoRA adapter directory -> (record, weights keyed as PEFT saves them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LibraryError(f"{folder} is not a directory; pass a PEFT adapter directory "
                           f"(with {CONFIG_FILE} and {WEIGHTS_FILE}).")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
        if pickles:
            raise LibraryError(
                f"{folder} holds only {pickles[0]} (a pickle file, which is never loaded here): safetensors is "
                f"required. Re-save the adapter with safe_serialization=True to get {WEIGHTS_FILE}.")
        raise LibraryError(f"{folder} has no {WEIGHTS_FILE}.")
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise LibraryError(f"{folder} has no {CONFIG_FILE}; it is not a PEFT adapter directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise LibraryError(f"{config_path} is not valid JSON: {exc}") from None
    _check_config(config, config_path)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); we keep scaling = alpha/r
    weights = {}
    for key, tensor in load_weights(weights_path).items():
        match = _KEY_RE.match(key)
        if match is None:
            raise LibraryError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight; only plain LoRA "
                               "adapters on linear layers can be imported.")
        site = match["site"] if match["site"].startswith(PEFT_PREFIX) else PEFT_PREFIX + match["site"]
        weights[f"{site}.lora_{match['ab']}.weight"] = tensor
    ranks = {t.shape[0] for k, t in weights.items() if k.endswith("lora_A.weight")}
    if ranks != {rank}:
        raise LibraryError(f"{config_path} says r={rank} but the weights have ranks {sorted(ranks)}.")
    return ExpertInfo(name=name, kind=kind, rank=rank, alpha=alpha), weights


# LoRA variants whose forward pass is not plain `W x + s·B A x`, so the engine cannot route them; each is
# refused by name rather than imported with the wrong maths. (rsLoRA is supported: it only changes the scaling.)
REFUSED_VARIANTS = {
    "use_dora": "DoRA adapters (a learned magnitude vector rescales W + ΔW)",
    "fan_in_fan_out": "fan-in-fan-out (Conv1D) adapters",
    "rank_pattern": "per-module rank patterns",
    "alpha_pattern": "per-module alpha patterns",
    "modules_to_save": "adapters that save whole modules",
    "lora_bias": "LoRA adapters with a bias on lora_B",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts)",
    "use_qalora": "QA-LoRA adapters (pooled inputs)",
    "alora_invocation_tokens": "activated LoRA (aLoRA: only active after invocation tokens)",
    "layer_replication": "adapters with layer replication",
    "trainable_token_indices": "adapters that train token embeddings",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "PEFT Arrow router adapters (import the task adapters instead)",
    "megatron_config": "Megatron-parallel LoRA layers",
}


def _check_config(config: dict, path: Path) -> None:
    if not isinstance(config, dict):
        raise LibraryError(f"{path} is not a JSON object; it is not a PEFT adapter config.")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LibraryError(f"{path}: peft_type is {peft_type!r}, not a LoRA adapter; only LORA adapters can be "
                           "imported (IA3, prefix tuning, prompt tuning and other PEFT methods are refused).")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise LibraryError(f"{path} has no {key!r}; it is not a LoRA adapter config.")
    rank, alpha = config["r"], config["lora_alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise LibraryError(f"{path}: r is {rank!r}; it must be a whole number.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LibraryError(f"{path}: lora_alpha is {alpha!r}; it must be a positive number.")
    for key, what in REFUSED_VARIANTS.items():
        if config.get(key):
            raise LibraryError(f"{path}: {key} is set; {what} cannot be imported: the router only runs plain "
                               "LoRA (one rank and alpha per expert).")
    if config.get("bias", "none") != "none":
        raise LibraryError(f"{path}: bias is {config.get('bias')!r}; adapters that train biases cannot be "
                           "imported (only bias='none').")
