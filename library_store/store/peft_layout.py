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
from safetensors.torch import load_file, save_file

from library_store.expert import PEFT_PREFIX, ExpertInfo, parse_site
from library_store.store.io import LibraryError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
# PEFT saves `...q_proj.lora_A.weight`; some tools keep the adapter name: `...q_proj.lora_A.default.weight`.
_KEY_RE = re.compile(r"^(?P<site>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only: a file that is missing, truncated or not safetensors raises LibraryError."""
    try:
        return load_file(str(path))
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
    except json.JSONDecodeError as exc:
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


def _check_config(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise LibraryError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be imported.")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise LibraryError(f"{path} has no {key!r}; it is not a LoRA adapter config.")
    refused = {
        "use_dora": "DoRA adapters",
        "fan_in_fan_out": "fan-in-fan-out (Conv1D) adapters",
        "rank_pattern": "per-module rank patterns",
        "alpha_pattern": "per-module alpha patterns",
        "modules_to_save": "adapters that save whole modules",
    }
    for key, what in refused.items():
        if config.get(key):
            raise LibraryError(f"{path}: {key} is set; {what} cannot be imported (one rank and alpha per expert).")
