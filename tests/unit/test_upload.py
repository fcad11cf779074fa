"""Uploading an adapter into a library (`store.upload.intake_adapter`): good uploads land and hostile or broken
ones are refused with a clear message, the library unchanged (same checksums, same files byte for byte)."""
import hashlib
import json
import os
import pickle
import stat
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert, random_weights

from library_store.cli import main
from library_store.store import upload
from library_store.store.errors import DuplicateExpert, InvalidName, LibraryError
from library_store.store.library import ExpertLibrary
from library_store.store.upload import UploadRefused, intake_adapter

SIDE = ("library.sqlite-wal", "library.sqlite-shm", ".lock")


@pytest.fixture
def lib(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    lib.add(random_expert(LLAMA, "keep", seed=0))
    return lib


def snapshot(lib) -> tuple:
    files = {str(p.relative_to(lib.root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(lib.root.rglob("*")) if p.is_file() and p.name not in SIDE}
    return lib.checksums(), files


def config(**extra) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted(LLAMA_SHAPES),
            "base_model_name_or_path": "tiny-random-llama", **extra}


def adapter(folder: Path, weights=None, cfg=None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg if cfg is not None else config(**extra)))
    save_file(random_weights(seed=3) if weights is None else weights, str(folder / "adapter_model.safetensors"))
    return folder


def zipped(path: Path, entries: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, name)  # a symlink entry: its "data" is the link target
            else:
                zf.writestr(name, data)
    return path


def adapter_files(tmp_path: Path, **extra) -> dict:
    folder = adapter(tmp_path / "src", **extra)
    return {f.name: f.read_bytes() for f in folder.iterdir()}


# ---------------------------------------------------------------- good uploads


def test_a_zipped_folder_lands_with_its_name_tasks_and_exact_weights(lib, tmp_path):
    files = {f"my_adapter/{k}": v for k, v in adapter_files(tmp_path).items()}
    files["my_adapter/README.md"] = b"# trained elsewhere"
    info = intake_adapter(zipped(tmp_path / "up.zip", files), lib, " mine ", tasks=["reverse_word"])
    assert (info.name, info.kind, info.tasks, info.rank, info.alpha) == ("mine", "imported", ["reverse_word"], 4, 8.0)
    stored = ExpertLibrary.open(lib.root)["mine"]
    assert all(torch.equal(stored.weights[k], v) for k, v in random_weights(seed=3).items())
    assert lib.names() == ["keep", "mine"] and lib.verify() == []
    assert sorted(os.listdir(lib.root / "experts" / "mine")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_two_loose_files_and_a_folder_are_accepted(lib, tmp_path):
    folder = adapter(tmp_path / "a")
    intake_adapter([folder / "adapter_config.json", folder / "adapter_model.safetensors"], lib, "loose")
    intake_adapter(folder, lib, "folder")
    assert lib.checksums()["loose"] == lib.checksums()["folder"]


def test_half_precision_is_stored_as_float32_and_rslora_keeps_its_scaling(lib, tmp_path):
    half = {k: v.half() for k, v in random_weights(seed=4).items()}
    intake_adapter(adapter(tmp_path / "h", weights=half), lib, "half")
    assert all(t.dtype == torch.float32 for t in lib["half"].weights.values())
    intake_adapter(adapter(tmp_path / "rs", use_rslora=True), lib, "rs")
    assert lib["rs"].scaling == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r), not alpha / r


def test_two_uploads_at_once_both_land_or_one_is_refused_cleanly(lib, tmp_path):
    folder = adapter(tmp_path / "a")
    results: dict = {}

    def go(key, name):
        try:
            results[key] = intake_adapter(folder, ExpertLibrary.open(lib.root, readonly=False), name).name
        except LibraryError as exc:
            results[key] = exc

    threads = [threading.Thread(target=go, args=(i, f"t{i}")) for i in range(2)]
    threads += [threading.Thread(target=go, args=(f"same{i}", "same")) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == "t0" and results[1] == "t1"
    same = [results["same0"], results["same1"]]
    assert sorted(type(r).__name__ for r in same) == ["DuplicateExpert", "str"]
    assert lib.names() == ["keep", "same", "t0", "t1"] and lib.verify() == []


def test_a_duplicate_is_refused_offering_replace_and_replace_swaps(lib, tmp_path):
    intake_adapter(adapter(tmp_path / "a"), lib, "dup")
    before = snapshot(lib)
    with pytest.raises(DuplicateExpert, match="'dup' already exists.*replace") as err:
        intake_adapter(adapter(tmp_path / "b", weights=random_weights(seed=9)), lib, "dup")
    assert err.value.name == "dup" and snapshot(lib) == before
    intake_adapter(adapter(tmp_path / "b", weights=random_weights(seed=9)), lib, "dup", replace=True)
    assert all(torch.equal(lib["dup"].weights[k], v) for k, v in random_weights(seed=9).items())


# ---------------------------------------------------------------- hostile and broken uploads


def _symlink_entry(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zi


def _case(case: str, tmp_path: Path):
    """Build the upload for one bad case; returns (src, expected message regex)."""
    good = adapter_files(tmp_path)
    if case == "dotdot":
        return zipped(tmp_path / "u.zip", {**good, "../evil.txt": b"x"}), "points outside"
    if case == "absolute":
        return zipped(tmp_path / "u.zip", {"/tmp/adapter_config.json": good["adapter_config.json"],
                                           "adapter_model.safetensors": good["adapter_model.safetensors"]}), "outside"
    if case == "zip-symlink":
        return zipped(tmp_path / "u.zip", {**good, "/etc/passwd": _symlink_entry("link")}), "symlink"
    if case == "folder-symlink":
        folder = adapter(tmp_path / "f")
        (folder / "adapter_model.safetensors").rename(tmp_path / "elsewhere.safetensors")
        (folder / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
        return folder, "symlink"
    if case == "bomb":
        return zipped(tmp_path / "u.zip", {**good, "pad.bin": bytes(8 << 20)}), "zip bomb"
    if case == "too-many-entries":
        return zipped(tmp_path / "u.zip", {**good, **{f"x{i}.txt": b"" for i in range(63)}}), "at most 64"
    if case == "bad-zip":
        (tmp_path / "u.zip").write_bytes(b"PK\x03\x04" + b"\0" * 40)
        return tmp_path / "u.zip", "cannot be read|neither"
    if case == "two-adapters":
        return zipped(tmp_path / "u.zip", {**{f"a/{k}": v for k, v in good.items()},
                                           **{f"b/{k}": v for k, v in good.items()}}), "2 adapters"
    if case == "no-config":
        return zipped(tmp_path / "u.zip", {"adapter_model.safetensors": good["adapter_model.safetensors"]}), \
            "no adapter_config.json"
    kinds = {"ia3": ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
             "prefix": ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
             "dora": ({"use_dora": True}, "DoRA"), "lora-bias": ({"lora_bias": True}, "lora_bias"),
             "target-parameters": ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
             "bias": ({"bias": "all"}, "bias is 'all'"), "alpha-string": ({"lora_alpha": "8"}, "lora_alpha")}
    if case in kinds:
        return adapter(tmp_path / "f", **kinds[case][0]), kinds[case][1]
    weights = random_weights(seed=3)
    if case == "nan":
        weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
        return adapter(tmp_path / "f", weights=weights), "non-finite"
    if case == "inf":
        weights[next(iter(weights))][0, 0] = float("inf")
        return adapter(tmp_path / "f", weights=weights), "non-finite"
    if case == "wrong-base":  # Phi's attention output is `dense`
        phi = random_weights(seed=3, shapes={"q_proj": (64, 64), "dense": (64, 64)})
        return adapter(tmp_path / "f", weights=phi, base_model_name_or_path="tiny-random-phi"), \
            "'dense', which the base model does not have.*trained for 'tiny-random-phi'"
    if case == "wrong-shape":
        weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.randn(48, 4)
        return adapter(tmp_path / "f", weights=weights), "v_proj.*64 -> 32"
    if case == "rank-0":
        return adapter(tmp_path / "f", weights=random_weights(rank=0), r=0), "rank 0"
    if case == "rank-above-dims":
        return adapter(tmp_path / "f", weights=random_weights(rank=40), r=40), r"min\(d_in, d_out\) = 32"
    if case == "rank-above-cap":
        return adapter(tmp_path / "f", weights=random_weights(rank=300), r=300), "at most 256"
    if case == "int-weights":
        weights = {k: (v * 100).to(torch.int32) for k, v in weights.items()}
        return adapter(tmp_path / "f", weights=weights), "2-D float"
    raise AssertionError(case)


CASES = ["dotdot", "absolute", "zip-symlink", "folder-symlink", "bomb", "too-many-entries", "bad-zip",
         "two-adapters", "no-config", "ia3", "prefix", "dora", "lora-bias", "target-parameters", "bias",
         "alpha-string", "nan", "inf", "wrong-base", "wrong-shape", "rank-0", "rank-above-dims", "rank-above-cap",
         "int-weights"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_upload_is_refused_with_a_message_and_the_library_unchanged(lib, tmp_path, case):
    src, message = _case(case, tmp_path)
    before = snapshot(lib)
    with pytest.raises(LibraryError, match=message) as err:
        intake_adapter(src, lib, "incoming")
    assert str(tmp_path / "lora-upload") not in str(err.value)
    assert snapshot(lib) == before and "incoming" not in lib
    assert not (tmp_path / "evil.txt").exists() and not (lib.root.parent / "evil.txt").exists()


def test_the_size_cap_counts_real_bytes_in_zips_and_folders(lib, tmp_path, monkeypatch):
    monkeypatch.setattr(upload, "MAX_TOTAL_BYTES", 4096)  # the adapter's weights are ~10 KB
    before = snapshot(lib)
    for src in (adapter(tmp_path / "f"), zipped(tmp_path / "u.zip", adapter_files(tmp_path))):
        with pytest.raises(UploadRefused, match="more than 0 MiB"):
            intake_adapter(src, lib, "big")
    assert snapshot(lib) == before


@pytest.mark.parametrize("packed", [False, True])
def test_pickle_only_weights_are_refused_and_never_unpickled(lib, tmp_path, packed):
    canary = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the canary file
        def __reduce__(self):
            return (Path.touch, (canary,))

    files = {"adapter_config.json": json.dumps(config()).encode(), "adapter_model.bin": pickle.dumps(Boom())}
    if packed:
        src = zipped(tmp_path / "u.zip", files)
    else:
        src = tmp_path / "f"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
    before = snapshot(lib)
    with pytest.raises(UploadRefused, match="adapter_model.bin.*pickle.*safe_serialization"):
        intake_adapter(src, lib, "pickled")
    assert not canary.exists() and snapshot(lib) == before


@pytest.mark.parametrize("name, message", [
    ("", "empty"), ("   ", "empty"), ("../x", "path"), ("a/b", "path"), (".hidden", "path"),
    ("x" * 129, "129 characters"), ("<b>hi</b>", "markup"), ("a&b", "markup"), ("it's", "markup"),
    ("sp ace", "names must match"),
])
def test_bad_names_are_refused(lib, tmp_path, name, message):
    before = snapshot(lib)
    with pytest.raises(InvalidName, match=message):
        intake_adapter(adapter(tmp_path / "a"), lib, name)
    with pytest.raises(InvalidName, match=message) as err:
        intake_adapter(adapter(tmp_path / "a"), lib, "fine", tasks=[name])
    assert "task name" in str(err.value)
    assert snapshot(lib) == before


def test_read_only_and_committed_libraries_refuse_uploads(lib, tmp_path, monkeypatch):
    from library_store.store import user_copy

    folder = adapter(tmp_path / "a")
    with pytest.raises(UploadRefused, match="read-only.*user copy"):
        intake_adapter(folder, ExpertLibrary.open(lib.root), "x")
    monkeypatch.setattr(user_copy, "assets_dir", lambda: tmp_path)  # as if the library were under assets/
    with pytest.raises(UploadRefused, match="committed demo library"):
        intake_adapter(folder, lib, "x")
    with pytest.raises(UploadRefused, match="committed demo library"):
        upload.remove_expert(lib, "keep")
    assert lib.names() == ["keep"]


def test_non_finite_weights_are_refused_by_add_and_by_the_cli_import(lib, tmp_path, capsys):
    nan = random_expert(LLAMA, "nan", seed=1)
    nan.weights = {k: torch.full_like(v, float("nan")) for k, v in nan.weights.items()}
    before = snapshot(lib)
    with pytest.raises(LibraryError, match="non-finite"):
        lib.add(nan)
    folder = adapter(tmp_path / "nan", weights=nan.weights)
    with pytest.raises(LibraryError, match="non-finite"):
        lib.import_peft(folder, "nan")
    code = main(["import", str(lib.root), "--peft", str(folder), "--name", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err and snapshot(lib) == before
    zipped(tmp_path / "nan.zip", {f.name: f.read_bytes() for f in folder.iterdir()})
    code = main(["import", str(lib.root), "--peft", str(tmp_path / "nan.zip"), "--name", "nan"])
    assert code == 2 and "non-finite" in capsys.readouterr().err and snapshot(lib) == before
    good = adapter(tmp_path / "good")
    zipped(tmp_path / "good.zip", {f.name: f.read_bytes() for f in good.iterdir()})
    code = main(["import", str(lib.root), "--peft", str(tmp_path / "good.zip"), "--name", "z", "--tasks", "a,b"])
    assert code == 0 and lib.info("z").tasks == ["a", "b"]


def test_verify_names_an_expert_stored_with_non_finite_weights_before_the_refusal(lib, monkeypatch):
    from library_store.store import library as library_module

    nan = random_expert(LLAMA, "old-nan", seed=1)
    nan.weights = {k: torch.full_like(v, float("nan")) for k, v in nan.weights.items()}
    monkeypatch.setattr(library_module, "check_finite", lambda *a: None)  # as a library written before the check
    lib.add(nan)
    problems = lib.verify()
    assert len(problems) == 1 and "'old-nan'" in problems[0] and "non-finite" in problems[0]
