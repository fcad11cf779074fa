"""ExpertLibrary on the tiny Llama twin: layout, round trips, refusals with clear messages, damaged files,
derived data, and PEFT interoperability (export loads in PeftModel with the same logits)."""
import hashlib
import json
import os
import pickle
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert, random_weights

from library_store.expert import ExpertInfo, LoraExpert
from library_store.store.library import (ExpertLibrary, ExpertUnavailable, InvalidName, LibraryError, LibraryMismatch,
                                 module_shapes)


@pytest.fixture
def lib(tmp_path):
    return ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".tmp-*")) + sorted(p.name for p in root.glob(".old-*"))


def test_module_shapes_and_the_written_out_fingerprint_match_the_twin(tiny_llama, tmp_path):
    base = tiny_llama
    shapes = module_shapes(base.model)
    assert {k: shapes[k] for k in LLAMA_SHAPES} == LLAMA_SHAPES
    assert shapes["gate_proj"] == (64, 128) and shapes["down_proj"] == (128, 64)
    assert base.fingerprint == LLAMA_FP
    lib = ExpertLibrary.create(tmp_path / "from-base", base_model=base)  # a BaseModel gives fingerprint and shapes
    assert lib.fingerprint == LLAMA_FP and lib.module_shapes == shapes


def test_add_then_reopen_round_trips_weights_and_record(lib):
    expert = random_expert(LLAMA, "alpha", tasks=["reverse_word", "add_two"], cluster="c0", alpha=8.0)
    expert.info.train.steps, expert.info.train.final_loss = 120, 0.25
    stored = lib.add(expert)
    again = ExpertLibrary.open(lib.root, base=LLAMA_FP)
    assert again.names() == ["alpha"] and "alpha" in again and "beta" not in again and len(again) == 1
    loaded = again["alpha"]
    assert loaded.weights.keys() == expert.weights.keys()
    assert all(torch.equal(loaded.weights[k], v) for k, v in expert.weights.items())
    info = again.infos()[0]
    assert info == stored and info.tasks == ["reverse_word", "add_two"] and info.cluster == "c0"
    assert (info.rank, info.alpha, info.n_params) == (4, 8.0, sum(v.numel() for v in expert.weights.values()))
    assert info.target_modules == sorted(LLAMA_SHAPES) and info.train.steps == 120 and info.train.final_loss == 0.25
    assert loaded.scaling == 2.0
    # the layout of docs/design.md, with the checksum of the file that is really there
    folder = lib.root / "experts" / "alpha"
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert info.checksum == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["base_model_name_or_path"] == "tiny-random-llama"
    with sqlite3.connect(lib.root / "library.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT version FROM schema_version").fetchone()[0] == 1
    assert (lib.root / "derived").is_dir() and leftovers(lib.root) == []
    assert again.fingerprint == LLAMA_FP and again.verify() == []


def test_create_refuses_an_existing_library(lib):
    with pytest.raises(LibraryError, match="already exists"):
        ExpertLibrary.create(lib.root, LLAMA_FP)


def test_open_refuses_a_folder_without_a_library(tmp_path):
    with pytest.raises(LibraryError, match="No library at"):
        ExpertLibrary.open(tmp_path)


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 200, ".hidden", "-dash", "sp ace"])
def test_bad_names_are_refused_and_nothing_is_written(lib, name):
    with pytest.raises(InvalidName, match="names must match"):
        lib.add(_renamed(random_expert(LLAMA, "ok"), name))
    assert lib.names() == [] and os.listdir(lib.root / "experts") == [] and leftovers(lib.root) == []
    assert not (lib.root.parent / "x").exists()


def _renamed(expert: LoraExpert, name: str) -> LoraExpert:
    expert.info.name = name
    return expert


def test_a_128_character_name_is_the_longest_allowed(lib):
    lib.add(random_expert(LLAMA, "n" * 128))
    assert lib.names() == ["n" * 128]


def test_duplicate_is_refused_and_replace_swaps_atomically(lib):
    lib.add(random_expert(LLAMA, "dup", seed=1))
    with pytest.raises(LibraryError, match="'dup' already exists.*replace"):
        lib.add(random_expert(LLAMA, "dup", seed=2))
    assert torch.equal(lib["dup"].weights[next(iter(random_weights()))], next(iter(random_weights(seed=1).values())))
    new = random_expert(LLAMA, "dup", seed=2, rank=8, tasks=["other"])
    lib.add(new, replace=True)
    loaded = lib["dup"]
    assert loaded.info.rank == 8 and loaded.info.tasks == ["other"]
    assert all(torch.equal(loaded.weights[k], v) for k, v in new.weights.items())
    assert lib.names() == ["dup"] and leftovers(lib.root) == [] and lib.verify() == []


def test_wrong_shapes_are_refused_naming_the_module_and_both_shapes(lib):
    weights = random_weights()
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    weights[key] = torch.randn(48, 4)  # the twin's v_proj maps 64 -> 32
    with pytest.raises(LibraryError) as err:
        lib.add(LoraExpert.from_state_dict(ExpertInfo("bad"), weights))
    message = str(err.value)
    assert "model.layers.1.self_attn.v_proj" in message and "(48, 4)" in message and "64 -> 32" in message
    assert "(32, r)" in message and lib.names() == []


def test_unknown_module_and_missing_layer_are_refused(lib):
    weights = random_weights(shapes={"qkv_proj": (64, 192)})
    with pytest.raises(LibraryError, match="'qkv_proj', which the base model does not have"):
        lib.add(LoraExpert.from_state_dict(ExpertInfo("bad"), weights))
    with pytest.raises(LibraryError, match="layer 5, but the base model has 2 layers"):
        lib.add(LoraExpert.from_state_dict(ExpertInfo("bad"), random_weights(layers=(5,))))


def test_a_library_for_another_base_model_is_refused_showing_both_fingerprints(lib, tiny_phi):
    phi = tiny_phi
    with pytest.raises(LibraryMismatch) as err:
        ExpertLibrary.open(lib.root, base=phi)
    message = str(err.value)
    assert lib.fingerprint["config_hash"] in message and phi.fingerprint["config_hash"] in message
    assert "tiny-random-phi" in message and "tiny-random-llama" in message
    with pytest.raises(LibraryMismatch):
        lib.check_base(phi.fingerprint)


def test_bin_only_adapter_is_refused_and_never_unpickled(lib, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    canary = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the canary file
        def __reduce__(self):
            return (Path.touch, (canary,))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(LibraryError, match="safetensors is required"):
        lib.import_peft(folder, "pickled")
    assert not canary.exists() and lib.names() == []


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # same size, one byte flipped: only the checksum can tell
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip-a-byte"])
def test_a_damaged_expert_is_reported_not_skipped(lib, how):
    for i, name in enumerate(["e1", "e2", "e3"]):
        lib.add(random_expert(LLAMA, name, seed=i))
    _damage(lib.root / "experts" / "e2" / "adapter_model.safetensors", how)
    again = ExpertLibrary.open(lib.root, readonly=False)  # opening still works
    assert again.names() == ["e1", "e2", "e3"]
    assert again["e1"].weights and again["e3"].weights  # the others still load
    with pytest.raises(ExpertUnavailable, match="'e2' is unavailable"):
        again["e2"]
    problems = again.verify()
    assert len(problems) == 1 and "'e2'" in problems[0]
    if how != "flip-a-byte":  # the quick check sees missing and truncated files without hashing
        assert again.unavailable() == ["e2"]
    with pytest.raises(ExpertUnavailable):
        again.export("e2", lib.root.parent / "out")
    again.add(random_expert(LLAMA, "e2", seed=9), replace=True)  # a broken expert can be replaced
    assert again.verify() == [] and again.unavailable() == []


def test_verify_names_a_missing_or_edited_adapter_config(lib):
    lib.add(random_expert(LLAMA, "a"))
    lib.add(random_expert(LLAMA, "b", seed=1))
    (lib.root / "experts" / "a" / "adapter_config.json").unlink()
    config = lib.root / "experts" / "b" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 8'))
    problems = lib.verify()
    assert len(problems) == 2 and "'a'" in problems[0] and "missing" in problems[0]
    assert "'b'" in problems[1] and "r=8" in problems[1] and lib.unavailable() == ["a"]


def test_remove_deletes_the_files_and_unknown_names_raise_keyerror(lib):
    lib.add(random_expert(LLAMA, "gone"))
    lib.remove("gone")
    assert lib.names() == [] and not (lib.root / "experts" / "gone").exists() and leftovers(lib.root) == []
    with pytest.raises(KeyError, match="No expert 'gone'"):
        lib["gone"]
    with pytest.raises(KeyError):
        lib.remove("gone")


def test_derived_data_is_keyed_by_kind_and_config_hash(lib):
    config = {"experts": {"a": "123"}, "method": "svd"}
    tensors = {"proto": torch.randn(3, 4), "norms": torch.arange(3.0)}
    key = lib.put_derived("prototypes", config, tensors, {"note": "first"})
    assert (lib.root / "derived" / f"prototypes-{key}.safetensors").is_file()
    got, meta = lib.get_derived("prototypes", dict(reversed(config.items())))  # key order does not matter
    assert meta == {"note": "first"} and all(torch.equal(got[k], v) for k, v in tensors.items())
    assert lib.get_derived("prototypes", {**config, "method": "other"}) is None
    assert lib.get_derived("embeddings", config) is None
    assert lib.put_derived("prototypes", config, {"proto": torch.zeros(2)}, {"note": "second"}) == key
    got, meta = lib.get_derived("prototypes", config)
    assert meta == {"note": "second"} and got.keys() == {"proto"}
    assert [(d["kind"], d["key"]) for d in lib.list_derived()] == [("prototypes", key)]
    _damage(lib.root / "derived" / f"prototypes-{key}.safetensors", "truncate")
    with pytest.warns(UserWarning, match="ignored"):
        assert lib.get_derived("prototypes", config) is None
    assert any(f"prototypes-{key}" in p for p in lib.verify())
    lib.remove_derived("prototypes")
    assert lib.list_derived() == [] and os.listdir(lib.root / "derived") == []
    with pytest.raises(InvalidName):
        lib.put_derived("../evil", config, tensors)


def test_clusters_and_scores_round_trip(lib):
    lib.set_clusters({"c0": ["reverse_word", "add_two"], "c1": ["navigate"]})
    lib.set_clusters({"c0": ["reverse_word"], "c1": ["navigate", "add_two"]})  # replaces, not merges
    assert ExpertLibrary.open(lib.root).clusters() == {"c0": ["reverse_word"], "c1": ["navigate", "add_two"]}
    with pytest.raises(InvalidName):
        lib.set_clusters({"a/b": ["x"]})
    lib.add_score("e1", "add_two", "exact_match", 0.75, {"n": 20})
    lib.add_score(None, "add_two", "exact_match", 0.5)
    assert [(s["expert"], s["value"], s["meta"]) for s in lib.scores()] == [("e1", 0.75, {"n": 20}), (None, 0.5, {})]


def test_a_damaged_index_is_a_clear_library_error(lib):
    (lib.root / "library.sqlite").write_bytes(b"not a database at all" * 100)
    for extra in ("-wal", "-shm"):
        (lib.root / ("library.sqlite" + extra)).unlink(missing_ok=True)
    with pytest.raises(LibraryError, match="not a readable library index"):
        ExpertLibrary.open(lib.root)


@pytest.mark.parametrize("point", ["after_old_aside", "after_rename", "before_commit"])
def test_a_write_that_fails_midway_is_undone_at_once(lib, monkeypatch, point):
    from library_store.store import io as store_io

    lib.add(random_expert(LLAMA, "x", seed=1))
    before = lib.checksums()

    def fail(name):
        if name == point:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_io, "crash_point", fail)
    with pytest.raises(OSError, match="No space"):
        lib.add(random_expert(LLAMA, "x", seed=2), replace=True)
    assert lib.checksums() == before and lib.verify() == [] and leftovers(lib.root) == []
    assert torch.equal(lib["x"].weights[next(iter(random_weights()))], next(iter(random_weights(seed=1).values())))


def test_import_normalises_adapter_names_and_refuses_unknown_tensors(lib, tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    weights = {k.replace(".weight", ".default.weight"): v for k, v in random_weights(seed=3).items()}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    info = lib.import_peft(folder, "named")
    assert info.kind == "imported" and info.alpha == 8.0 and info.target_modules == sorted(LLAMA_SHAPES)
    assert all(torch.equal(lib["named"].weights[k], v) for k, v in random_weights(seed=3).items())
    extra = {"base_model.model.lm_head.weight": torch.zeros(2, 2)}
    save_file({**weights, **extra}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LibraryError, match="lm_head.weight.*not a LoRA"):
        lib.import_peft(folder, "other")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "use_dora": True}))
    with pytest.raises(LibraryError, match="DoRA"):
        lib.import_peft(folder, "other")
    with pytest.raises(LibraryError, match="not a directory"):
        lib.import_peft(tmp_path / "missing", "other")


@torch.no_grad()
def test_peft_adapter_imports_exports_and_gives_the_same_logits(tiny_llama, tmp_path):
    base = tiny_llama
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=base.targets, init_lora_weights=False)
    trained = get_peft_model(copy.deepcopy(base.model), config)
    trained.save_pretrained(tmp_path / "adapter")  # PEFT's own writer: safetensors + adapter_config.json
    lib = ExpertLibrary.create(tmp_path / "lib", base)
    lib.import_peft(tmp_path / "adapter", "peft-made")
    dest = lib.export("peft-made", tmp_path / "exported")
    with pytest.raises(LibraryError, match="not an empty directory"):
        lib.export("peft-made", tmp_path / "exported")

    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])  # (1, t)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base.model), str(dest)).eval()
    own = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=4, lora_alpha=8, target_modules=base.targets))
    set_peft_model_state_dict(own, lib["peft-made"].weights)  # the store's own loading
    logits, expected = reloaded(ids).logits, own.eval()(ids).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(expected, trained.eval()(ids).logits, atol=1e-6)
    assert not torch.allclose(expected, base.model(ids).logits, atol=1e-3)  # the adapter does something
    assert lib["peft-made"].weights.keys() == get_peft_model_state_dict(trained).keys()


@torch.no_grad()
def test_an_expert_on_some_layers_exports_with_layers_to_transform(tiny_llama, tmp_path):
    base = tiny_llama
    import copy

    from peft import PeftModel

    lib = ExpertLibrary.create(tmp_path / "lib", base)
    weights = random_weights(layers=(1,), shapes={"q_proj": (64, 64)})
    lib.add(LoraExpert.from_state_dict(ExpertInfo("layer1", alpha=8.0), weights))
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(lib.export("layer1", tmp_path / "out")))
    assert [n for n, _ in model.named_modules() if n.endswith("lora_A")] == [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A"]
    merged = copy.deepcopy(base.model)  # ΔW = scaling * B @ A, by hand
    site = "base_model.model.model.layers.1.self_attn.q_proj"
    a, b = weights[f"{site}.lora_A.weight"], weights[f"{site}.lora_B.weight"]  # (r, d_in), (d_out, r)
    merged.model.layers[1].self_attn.q_proj.weight += 2.0 * b @ a
    ids = torch.tensor([[1, 504, 3575, 282]])  # (1, t)
    assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)
