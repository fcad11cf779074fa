"""Growing and sharing a library: `create` from the shell, writable user copies of committed libraries,
`export-peft` (loads into PEFT's create_arrow_model with our logits), `pack` / `unpack` (a Hub model repository
folder and back, checksums equal), and the refusals of each."""
import hashlib
import json
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

from library_store.cli import main
from library_store.store import user_copy as user_copy_module
from library_store.store.errors import LibraryError
from library_store.store.library import ExpertLibrary
from library_store.store.share import (MANIFEST, export_peft, hub_base_model, pack, record_router_defaults,
                                       router_defaults, unpack)
from library_store.store.upload import intake_adapter
from library_store.store.user_copy import DATA_ENV, is_committed_asset, library_for_adding, user_copy

ROOT = Path(__file__).resolve().parents[2]
SIDE = ("library.sqlite-wal", "library.sqlite-shm", ".lock")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in SIDE}


# ---------------------------------------------------------------- create


def test_create_records_the_fingerprint_and_module_shapes_and_refuses_an_existing_library(tmp_path, capsys):
    code, out, _ = run(capsys, "create", tmp_path / "lib", "--base-model", "tiny-random-llama")
    assert code == 0 and "created" in out and "tiny-random-llama" in out
    lib = ExpertLibrary.open(tmp_path / "lib", readonly=False)
    assert lib.fingerprint == LLAMA_FP and len(lib) == 0
    assert {k: lib.module_shapes[k] for k in LLAMA_SHAPES} == LLAMA_SHAPES and lib.module_shapes["up_proj"] == (64, 128)
    lib.add(random_expert(LLAMA, "a"))
    before = files_of(lib.root)
    code, _, err = run(capsys, "create", lib.root, "--base-model", "tiny-random-phi")
    assert code == 2 and "already exists" in err and "left as it is" in err and files_of(lib.root) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "create", tmp_path / "busy", "--base-model", "tiny-random-llama")
    assert code == 2 and "not an empty directory" in err and not (tmp_path / "busy" / "library.sqlite").exists()
    code, _, err = run(capsys, "create", tmp_path / "x", "--base-model", "no-such-model")
    assert code == 2 and "Unknown base model" in err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- user copies of committed libraries


def _freeze(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_a_committed_library_is_copied_once_and_never_modified(tmp_path, monkeypatch):
    assert is_committed_asset(ROOT / "assets" / "libraries" / "demo-mbc")  # the real demo libraries
    assert not is_committed_asset(tmp_path)
    assets = tmp_path / "assets"
    monkeypatch.setattr(user_copy_module, "assets_dir", lambda: assets)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    demo = ExpertLibrary.create(assets / "libraries" / "demo", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    demo.add(random_expert(LLAMA, "a"))  # writable on disk, as in a git checkout: committed is what counts
    before = files_of(demo.root)
    assert is_committed_asset(demo.root) and not is_committed_asset(tmp_path / "elsewhere")
    path, copied = library_for_adding(demo.root)
    assert copied and path == tmp_path / "data" / "libraries" / "demo"
    lib = ExpertLibrary.open(path, readonly=False)
    assert not lib.readonly and lib.checksums() == demo.checksums()
    src = tmp_path / "adapter"
    lib.export("a", src)
    intake_adapter(src, lib, "added")
    assert library_for_adding(demo.root) == (path, True) and "added" in ExpertLibrary.open(path)  # reused
    assert files_of(demo.root) == before and demo.names() == ["a"]
    mine = ExpertLibrary.create(tmp_path / "mine", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    assert library_for_adding(mine.root) == (mine.root, False)
    _freeze(mine.root)  # a read-only library elsewhere is copied too
    assert library_for_adding(mine.root) == (tmp_path / "data" / "libraries" / "mine", True)


def test_a_user_copy_refuses_a_folder_holding_another_base_models_library(tmp_path):
    src = ExpertLibrary.create(tmp_path / "a" / "demo", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    ExpertLibrary.create(tmp_path / "copies" / "demo", {**LLAMA_FP, "config_hash": "other"})
    with pytest.raises(LibraryError, match="another base model"):
        user_copy(src.root, tmp_path / "copies")


# ---------------------------------------------------------------- export for PEFT's Arrow


@torch.no_grad()
def test_export_peft_loads_into_create_arrow_model_with_our_logits(fresh_tiny, tmp_path, monkeypatch):
    from arrow_helpers import IDS
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from explorer.routing.config import RouterConfig
    from explorer.routing.prototypes import compute_prototypes
    from explorer.routing.model import RoutedModel
    from library_store.testing import make_tiny_mbc_library

    base = fresh_tiny("tiny-random-llama")
    lib = ExpertLibrary.open(make_tiny_mbc_library(tmp_path / "lib", n_tasks=4, k=3, base=base))
    names = lib.routable_names()
    assert names == ["cluster-0", "cluster-1", "cluster-2"]  # warm-up experts are not exported
    dest = export_peft(lib, tmp_path / "peft")
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", *names, "experts.json"]
    assert [e["name"] for e in json.loads((dest / "experts.json").read_text())] == names

    # Run the README's own snippet, from the export folder, with the tiny twin as the base model.
    code = re.search(r"```python\n(.*?)```", (dest / "README.md").read_text(), re.S).group(1)
    code = re.sub(r"base = .*\n", "", code).replace("top_k=3", "top_k=2")
    monkeypatch.chdir(dest)
    scope = {"base": fresh_tiny("tiny-random-llama").model}
    exec(code, scope)
    peft_model = scope["model"].eval()
    peft_model(input_ids=IDS)  # PEFT builds its (approximate) prototypes on the first forward
    for mod in peft_model.modules():
        if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow:
            arrow: ArrowLoraLinearLayer = mod.lora_arrow["arrow_router"]
            A = torch.stack([mod.lora_A[n].weight for n in arrow.task_adapter_names])  # (E, r, d)
            B = torch.stack([mod.lora_B[n].weight for n in arrow.task_adapter_names])  # (E, out, r)
            arrow.prototypes.copy_(compute_prototypes(A, B))  # exact, as ours (docs/design.md)
    expected = peft_model(input_ids=IDS).logits

    rm = RoutedModel.from_library(base, lib, RouterConfig(top_k=2))
    try:
        logits = rm.logits(IDS)
        rm.set_router(RouterConfig(mode="base"))
        plain = rm.logits(IDS)
    finally:
        rm.detach()
    assert (logits - plain).abs().max() > 1e-2  # the experts do change the output
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_export_peft_refuses_a_used_destination_and_the_cli_runs(tmp_path, capsys):
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    for i in range(2):
        lib.add(random_expert(LLAMA, f"e{i}", seed=i))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(LibraryError, match="not an empty directory"):
        export_peft(lib, tmp_path / "used")
    code, out, _ = run(capsys, "export-peft", lib.root, tmp_path / "out")
    assert code == 0 and "exported 2 experts" in out
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "create_arrow_model" in readme and "| task_1 | e1 |" in readme
    assert not list(tmp_path.glob(".exporting-*"))


# ---------------------------------------------------------------- pack / unpack


def test_pack_then_unpack_round_trips_every_expert_with_equal_checksums(tiny_mbc_library, tmp_path, capsys):
    src = ExpertLibrary.open(tiny_mbc_library)
    code, out, _ = run(capsys, "pack", src.root, tmp_path / "hub", "--license", "apache-2.0")
    assert code == 0 and "packed 8 experts" in out
    hub = tmp_path / "hub"
    card = (hub / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "peft" and "lora" in front["tags"]
    assert "base_model" not in front  # the tiny twin is not on the Hub; the card names it instead
    assert "tiny-random-llama" in card and all(f"| {n} |" in card for n in src.names())
    manifest = json.loads((hub / MANIFEST).read_text())
    assert manifest["base_fingerprint"] == src.fingerprint and manifest["clusters"] == src.clusters()
    assert not list(hub.rglob("*.sqlite"))

    code, out, _ = run(capsys, "unpack", hub, tmp_path / "copy")
    assert code == 0 and "unpacked 8 experts" in out
    copy = ExpertLibrary.open(tmp_path / "copy")
    assert copy.checksums() == src.checksums() and copy.infos() == src.infos()
    assert copy.clusters() == src.clusters() and copy.module_shapes == src.module_shapes
    assert copy.fingerprint == src.fingerprint and copy.verify() == []
    assert not list(tmp_path.glob(".unpacking-*")) and not list(tmp_path.glob(".packing-*"))


def test_the_model_card_names_the_hub_base_model_and_defaults_to_an_unchosen_license(tmp_path):
    assert hub_base_model("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("microsoft/phi-2") == "microsoft/phi-2"
    assert hub_base_model("tiny-random-llama") is None and hub_base_model("/models/phi-2") is None
    lib = ExpertLibrary.create(tmp_path / "lib", {**LLAMA_FP, "source": "microsoft/phi-2"},
                               module_shapes=LLAMA_SHAPES)
    lib.add(random_expert(LLAMA, "e0"))
    record_router_defaults(lib, {"top_k": 1, "temperature": 0.5})
    hub = pack(lib, tmp_path / "hub")
    card = (hub / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "microsoft/phi-2" and front["license"] == "other" and "set it before" in card
    assert "Routing defaults: temperature=0.5, top_k=1." in card
    assert json.loads((hub / MANIFEST).read_text())["router_defaults"] == {"temperature": 0.5, "top_k": 1}
    readme = (export_peft(lib, tmp_path / "peft") / "README.md").read_text()
    assert "ArrowConfig(top_k=1, router_temperature=0.5)" in readme
    assert router_defaults(unpack(hub, tmp_path / "back")) == {"temperature": 0.5, "top_k": 1}


@pytest.fixture
def packed(tmp_path) -> Path:
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    for i in range(2):
        lib.add(random_expert(LLAMA, f"e{i}", seed=i, tasks=[f"t{i}"]))
    return pack(lib, tmp_path / "hub")


@pytest.mark.parametrize("damage, message", [
    ("flip-a-byte", "does not match the checksum"),
    ("symlink", "symlink"),
    ("nan", "does not match the checksum|non-finite"),
    ("no-manifest", "not a packed library"),
    ("future-format", "pack format 99"),
    ("alpha-edited", "lora_alpha|alpha"),
    ("path-name", "Invalid expert name in the pack"),
])
def test_unpack_refuses_a_damaged_pack_and_leaves_nothing(packed, tmp_path, damage, message):
    weights = packed / "experts" / "e1" / "adapter_model.safetensors"
    manifest = packed / MANIFEST
    if damage == "flip-a-byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "symlink":
        weights.rename(tmp_path / "outside.safetensors")
        weights.symlink_to(tmp_path / "outside.safetensors")
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
        record = json.loads(manifest.read_text())  # a consistent but broken pack: checksum updated too
        record["experts"][1]["checksum"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(record))
    elif damage == "no-manifest":
        manifest.unlink()
    elif damage == "future-format":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 99}))
    elif damage == "path-name":  # a hostile manifest must not make us read outside the pack
        record = json.loads(manifest.read_text())
        record["experts"][1]["name"] = "../../lib/experts/e1"
        manifest.write_text(json.dumps(record))
    elif damage == "alpha-edited":
        config = packed / "experts" / "e1" / "adapter_config.json"
        config.write_text(config.read_text().replace('"lora_alpha": 16.0', '"lora_alpha": 32.0'))
    with pytest.raises(LibraryError, match=message):
        unpack(packed, tmp_path / "copy")
    assert not (tmp_path / "copy" / "library.sqlite").exists() and not list(tmp_path.glob(".unpacking-*"))


def test_unpack_refuses_an_existing_library(packed, tmp_path):
    existing = ExpertLibrary.create(tmp_path / "there", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    with pytest.raises(LibraryError, match="already exists"):
        unpack(packed, existing.root)
    assert existing.names() == []


def test_similarity_cli_prints_the_matrix_and_json(packed, tmp_path, capsys):
    lib = unpack(packed, tmp_path / "copy")
    code, out, _ = run(capsys, "similarity", lib.root, "--json")
    data = json.loads(out)
    assert code == 0 and data["names"] == ["e0", "e1"] and data["similarity"][0][0] == 1.0
    code, out, _ = run(capsys, "similarity", lib.root)
    assert code == 0 and out.splitlines()[0].startswith("e0")


def test_similarity_record_stores_the_pages_map_in_the_library(packed, tmp_path, capsys, monkeypatch):
    from library_store.store import similarity

    lib = unpack(packed, tmp_path / "copy")
    assert run(capsys, "similarity", lib.root)[0] == 0  # read-only: the map goes to the user cache
    assert ExpertLibrary.open(lib.root).list_derived() == []
    code, _, err = run(capsys, "similarity", lib.root, "--record")  # found in the user cache, stored all the same
    assert code == 0 and "stored in" in err
    assert [d["kind"] for d in ExpertLibrary.open(lib.root).list_derived()].count(similarity.DELTA_KIND) == 1
    monkeypatch.setattr(similarity, "delta_gram", lambda *a: pytest.fail("the recorded map was recomputed"))
    sim = similarity.delta_similarity(ExpertLibrary.open(lib.root, readonly=True))  # as the page asks for it
    assert sim.names == ["e0", "e1"]
    lib.root.chmod(0o555)  # a library that cannot be written: refused, not silently cached elsewhere
    try:
        code, _, err = run(capsys, "similarity", lib.root, "--record")
    finally:
        lib.root.chmod(0o755)
    assert code != 0 and "cannot be written" in err


# ---------------------------------------------------------------- the evaluation travels with the library

PER_PROMPT = {"mode": "arrow", "top_k": 2, "temperature": 0.1, "disabled": [], "centre": "none",
              "centre_scope": "prototypes", "input_centre": "base", "granularity": "prompt", "pick": "readout"}


def evaluated(tmp_path, router: dict = PER_PROMPT) -> ExpertLibrary:
    """A two-expert library with what `eval_routing --record` writes: a report, the default router, a readout."""
    from library_store.store import reports

    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    for i in range(2):
        lib.add(random_expert(LLAMA, f"e{i}", seed=i, tasks=[f"t{i}"]))
    reports.write_report(lib, reports.RoutingReport(content_key=lib.content_key(), split="heldout", router=router,
                                                    experts=["e0", "e1"], tasks=["t0", "t1"], n_per_task=3,
                                                    accuracy={"user": 0.9}, command="python bench/eval_routing.py"))
    reports.write_default_router(lib, router, evidence={"rule": "training prompts"},
                                 command="python bench/eval_routing.py --record")
    reports.write_readout(lib, "key-1", {"coef": torch.arange(6.0).view(2, 3), "intercept": torch.zeros(2)},
                          {"classes": ["e0", "e1"]})
    return lib


def test_pack_carries_the_evaluation_and_unpack_restores_it(tmp_path, capsys):
    from library_store.store import reports

    src = evaluated(tmp_path)
    hub = pack(src, tmp_path / "hub")
    manifest = json.loads((hub / MANIFEST).read_text())
    assert sorted(r["kind"] for r in manifest["evaluation"]) == ["pick-readout", "router-default", "routing-report"]
    card = (hub / "README.md").read_text()
    assert "granularity=prompt" in card and "chosen by the library's evaluation" in card
    copy = unpack(hub, tmp_path / "copy")
    assert reports.read_default_router(copy) == reports.read_default_router(src)
    assert reports.read_report(copy) == reports.read_report(src)
    tensors, meta = reports.read_readout(copy, "key-1")
    assert torch.equal(tensors["coef"], torch.arange(6.0).view(2, 3)) and meta == {"classes": ["e0", "e1"]}


def test_an_evaluation_of_other_experts_is_not_carried(tmp_path):
    from library_store.store import reports

    src = evaluated(tmp_path)
    src.add(random_expert(LLAMA, "e2", seed=2, tasks=["t2"]))  # the content changed: the evaluation is stale
    manifest = json.loads((pack(src, tmp_path / "hub") / MANIFEST).read_text())
    assert manifest["evaluation"] == []
    assert reports.default_router(unpack(tmp_path / "hub", tmp_path / "copy")) is None


@pytest.mark.parametrize("damage, message", [
    ("outside", "evaluation record 0 is malformed"),
    ("kind", "evaluation record 0 is malformed"),
    ("missing", "missing or a symlink"),
])
def test_unpack_refuses_a_damaged_evaluation_and_leaves_nothing(tmp_path, damage, message):
    hub = pack(evaluated(tmp_path), tmp_path / "hub")
    record = json.loads((hub / MANIFEST).read_text())
    readout = next(r for r in record["evaluation"] if r["file"])
    record["evaluation"] = [readout]
    if damage == "outside":  # a hostile manifest must not make us read outside the pack
        readout["file"] = "../lib/library.sqlite"
    elif damage == "kind":
        readout["kind"] = "expert"
    else:
        (hub / readout["file"]).unlink()
    (hub / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(LibraryError, match=message):
        unpack(hub, tmp_path / "copy")
    assert not (tmp_path / "copy" / "library.sqlite").exists() and not list(tmp_path.glob(".unpacking-*"))


def test_the_export_snippet_follows_the_evaluated_router_and_says_what_peft_lacks(tmp_path):
    readme = (export_peft(evaluated(tmp_path), tmp_path / "peft") / "README.md").read_text()
    assert "ArrowConfig(top_k=2, router_temperature=0.1)" in readme and "use_gks" not in readme
    assert "default router, chosen by its evaluation" in readme
    assert "input centring" in readme and "one expert per prompt (by readout)" in readme
    scaled = {**PER_PROMPT, "scales": {"a": 0.9, "b": 1.1}}
    readme = (export_peft(evaluated(tmp_path / "scaled", scaled), tmp_path / "peft-s") / "README.md").read_text()
    assert "expert scales, 0.90-1.10" in readme
    gks = {**PER_PROMPT, "centre": "mean", "centre_scope": "weights", "input_centre": "none", "granularity": "token"}
    readme = (export_peft(evaluated(tmp_path / "gks", gks), tmp_path / "peft-gks") / "README.md").read_text()
    assert "ArrowConfig(top_k=2, router_temperature=0.1, use_gks=True)" in readme
    assert "create_arrow_model(base, paths, config, general_adapter_paths=paths)" in readme
    assert "cannot express" not in readme  # nothing left out: PEFT's GenKnowSub is this router
