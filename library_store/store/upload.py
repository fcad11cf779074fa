"""Safe intake of an uploaded PEFT LoRA adapter (a folder, a `.zip`, or the two files) into a library.

Usage::

    info = intake_adapter(Path("upload.zip"), lib, "my-expert", tasks=["reverse_word"])    # -> ExpertInfo
    try:
        intake_adapter(folder, lib, "my-expert")
    except DuplicateExpert:                                  # offer "replace?", then:
        intake_adapter(folder, lib, "my-expert", replace=True)
    except UploadRefused as exc:                             # any other refusal (a LibraryError): show str(exc)
        ...

Everything an upload brings is untrusted. Nothing is extracted in place: the checks below run first, then only
`adapter_config.json` and `adapter_model.safetensors` are copied (size-capped while streaming) into a private
temporary folder, read from there, checked against the library's base model, and stored by `ExpertLibrary.add`
(atomic, under the library's lock). Every refusal leaves the library as it was.

Refused, each with a message that says why:
- zip entries with absolute paths, `..`, backslashes or drive letters; symlinks (in a zip or a folder);
- more than MAX_ENTRIES entries, more than MAX_TOTAL_BYTES uncompressed, or an entry that expands more than
  MAX_RATIO times (zip bombs; sizes are counted while copying, not taken from the zip's own headers);
- pickle-only weights (`adapter_model.bin`): never unpickled;
- non-LoRA PEFT types (IA3, prefix tuning...) and LoRA variants the router cannot run (see
  `peft_layout.REFUSED_VARIANTS`: DoRA, lora_bias, target_parameters, aLoRA...); rsLoRA is accepted (its
  scaling α/√r is kept exactly);
- weights that do not fit the library's base model (wrong modules, shapes or layers), rank 0, rank above
  MAX_RANK or above a module's min(d_in, d_out), NaN or inf;
- names that are empty, path-like, longer than 128 characters or hold markup; a duplicate name (DuplicateExpert,
  unless `replace=True`); a library that is read-only or committed (make a `user_copy` first).
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from library_store.expert import ExpertInfo, LoraExpert
from library_store.store.checks import check_finite, check_fit, check_weight_keys
from library_store.store.errors import DuplicateExpert, InvalidName, LibraryError, checked_name
from library_store.store.peft_layout import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, read_adapter
from library_store.store.user_copy import is_committed_asset

MAX_ENTRIES = 64  # files and folders in one upload; an adapter needs two
MAX_TOTAL_BYTES = 512 * 2**20  # uncompressed; a rank-256 adapter on every projection of SmolLM2 is ~80 MB
MAX_RATIO = 100  # uncompressed / compressed per zip entry; real float weights compress ~1.1x
RATIO_FLOOR = 1 << 20  # entries below 1 MiB are not ratio-checked (a JSON file compresses well)
MAX_RANK = 256
MAX_NAME = 128
_CHUNK = 1 << 20
_MARKUP = re.compile(r"[<>&\"'`]")


class UploadRefused(LibraryError):
    """An upload that is refused as it is (hostile, broken, or not for this library); the message says why."""


# ---------------------------------------------------------------- names


def check_upload_name(name, what: str = "expert name") -> str:
    """`name` stripped of surrounding spaces if it is a valid name, else InvalidName saying what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidName(f"The {what} is empty; give the expert a name (letters, digits, '.', '_', '-').")
    name = name.strip()
    if _MARKUP.search(name):
        raise InvalidName(f"The {what} {name!r} contains markup characters (< > & quotes); use letters, digits, "
                          "'.', '_' and '-' only.")
    if "/" in name or "\\" in name or name.startswith(".") or name.startswith("~"):
        raise InvalidName(f"The {what} {name!r} looks like a path; a name is one word of letters, digits, '.', "
                          "'_' and '-' that does not start with '.'.")
    if len(name) > MAX_NAME:
        raise InvalidName(f"The {what} is {len(name)} characters long; at most {MAX_NAME} are allowed.")
    return checked_name(name, what)


# ---------------------------------------------------------------- the intake


def intake_adapter(src, library, name: str, tasks=(), replace: bool = False, kind: str = "imported") -> ExpertInfo:
    """Validate the adapter at `src` (a folder, a `.zip`, or a list of the adapter's file paths) against
    `library` (an ExpertLibrary opened writable, or its path) and store it as `name`; returns the stored record. Raises
    UploadRefused, InvalidName, DuplicateExpert or another LibraryError, with the library unchanged."""
    name = check_upload_name(name)
    tasks = [check_upload_name(t, "task name") for t in (tasks or [])]
    if isinstance(library, (str, os.PathLike)):
        from library_store.store.library import ExpertLibrary

        library = ExpertLibrary.open(library, readonly=False)
    if is_committed_asset(library.root):
        raise UploadRefused(f"{library.root} is a committed demo library and is never modified; add the expert "
                            "to a user copy (store.user_copy) or to another library.")
    if library.readonly:
        raise UploadRefused(f"The library at {library.root} is read-only; open it writable or add the expert to a "
                            "user copy (store.user_copy).")
    if not replace and name in library:
        raise DuplicateExpert(f"An expert named {name!r} already exists in {library.root}; replace it, or choose "
                              "another name.", name)
    with tempfile.TemporaryDirectory(prefix="lora-upload-") as tmp:
        folder = stage_upload(src, Path(tmp))
        try:
            info, weights = read_adapter(folder, name, kind)
        except UploadRefused:
            raise
        except LibraryError as exc:  # name the upload, not our private temporary folder
            raise UploadRefused(str(exc).replace(str(folder), "the upload")) from None
        config = json.loads((folder / CONFIG_FILE).read_text())
    try:
        check_weight_keys(name, weights)  # before the cast below, which would turn integers into floats
    except LibraryError as exc:
        raise UploadRefused(str(exc)) from None
    weights = {k: v.float() for k, v in weights.items()}  # fp16/bf16 uploads route like the library's float32
    expert = LoraExpert.from_state_dict(ExpertInfo(name=name, kind=kind, tasks=tasks, rank=info.rank,
                                                   alpha=info.alpha), weights)
    check_upload_weights(expert, library, config.get("base_model_name_or_path"))
    return library.add(expert, replace=replace)


def check_upload_weights(expert: LoraExpert, library, claimed_base: str | None = None) -> None:
    """Finite, fits the base model (naming the base the adapter claims when it does not), sane rank."""
    check_finite(expert.name, expert.weights)
    factors = expert.factors()
    try:
        check_fit(expert.name, factors, library.fingerprint, library.module_shapes)
    except LibraryError as exc:
        hint = (f" The adapter says it was trained for {claimed_base!r}; this library is for "
                f"{library.fingerprint.get('source')!r}." if claimed_base else "")
        raise UploadRefused(f"{exc}{hint}") from None
    rank = expert.info.rank
    if rank > MAX_RANK:
        raise UploadRefused(f"Expert {expert.name!r} has rank {rank}; at most {MAX_RANK} is accepted (a LoRA "
                            "expert is low rank).")
    for site, (a, b) in factors.items():  # a: (r, d_in), b: (d_out, r)
        if a.shape[0] > min(a.shape[1], b.shape[0]):
            raise UploadRefused(f"Expert {expert.name!r} has rank {a.shape[0]} at {site}, which maps "
                                f"{a.shape[1]} -> {b.shape[0]}: a rank above min(d_in, d_out) = "
                                f"{min(a.shape[1], b.shape[0])} is not a low-rank update.")


# ---------------------------------------------------------------- staging: only the adapter's two files


def stage_upload(src, tmp: Path) -> Path:
    """Check the upload and copy the adapter's config and weights into `tmp/adapter`; returns that folder."""
    out = tmp / "adapter"
    out.mkdir()
    if isinstance(src, (list, tuple)) and len(src) == 1:
        src = src[0]  # one uploaded file: a .zip (or a refusal below)
    if isinstance(src, (list, tuple)):
        loose = tmp / "files"
        loose.mkdir()
        _stage_files([Path(p) for p in src], loose)
        src = loose
    src = Path(src)
    if src.is_symlink():
        raise UploadRefused(f"The upload {src.name} is a symlink; upload the adapter itself.")
    if src.is_dir():
        _stage_folder(src, out)
    elif src.is_file() and zipfile.is_zipfile(src):
        _stage_zip(src, out)
    elif src.is_file() and src.name in PICKLE_FILES:
        raise UploadRefused(_pickle_message(src.name))
    elif src.is_file():
        raise UploadRefused(f"{src.name} is neither a folder nor a .zip; upload {CONFIG_FILE} and {WEIGHTS_FILE}, "
                            "or a .zip of them.")
    else:
        raise UploadRefused(f"The upload {src} does not exist.")
    return out


def _pickle_message(found: str) -> str:
    return (f"The upload holds only {found} (a pickle file, which is never loaded here: it can run code). "
            f"Re-save the adapter with safe_serialization=True to get {WEIGHTS_FILE}.")


def _pick_adapter(files: list[PurePosixPath]) -> PurePosixPath:
    """The one folder (relative) of the upload that holds an adapter_config.json."""
    homes = sorted({f.parent for f in files if f.name == CONFIG_FILE})
    names = {f.name for f in files}
    if not homes:
        pickles = sorted(names & set(PICKLE_FILES))
        if pickles and WEIGHTS_FILE not in names:
            raise UploadRefused(_pickle_message(pickles[0]))
        raise UploadRefused(f"The upload has no {CONFIG_FILE}; a PEFT LoRA adapter is {CONFIG_FILE} + {WEIGHTS_FILE}.")
    if len(homes) > 1:
        raise UploadRefused(f"The upload holds {len(homes)} adapters ({', '.join(str(h) for h in homes)}); "
                            "upload one at a time.")
    home = homes[0]
    if home / WEIGHTS_FILE not in files:
        pickles = [p for p in PICKLE_FILES if home / p in files]
        if pickles:
            raise UploadRefused(_pickle_message(pickles[0]))
        raise UploadRefused(f"The upload has {CONFIG_FILE} but no {WEIGHTS_FILE}.")
    return home


def _check_entry_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if (name.startswith("/") or "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name)
            or ".." in path.parts):
        raise UploadRefused(f"The zip entry {name!r} points outside the upload (an absolute path or '..'); "
                            "the zip is refused.")
    return path


class _Budget:
    """Bytes and entries left; copying counts the real bytes, whatever a zip header claims."""

    def __init__(self):
        self.bytes = MAX_TOTAL_BYTES

    def count_entries(self, n: int) -> None:
        if n > MAX_ENTRIES:
            raise UploadRefused(f"The upload has {n} entries; at most {MAX_ENTRIES} are accepted (an adapter is "
                                "two files).")

    def spend(self, n: int) -> None:
        self.bytes -= n
        if self.bytes < 0:
            raise UploadRefused(f"The upload expands to more than {MAX_TOTAL_BYTES >> 20} MiB; refused (too large, "
                                "or a zip bomb).")

    def copy(self, fin, dest: Path, ratio_base: int | None = None) -> None:
        done = 0
        with open(dest, "wb") as fout:
            for block in iter(lambda: fin.read(_CHUNK), b""):
                done += len(block)
                self.spend(len(block))
                if ratio_base is not None and done > RATIO_FLOOR and done > MAX_RATIO * max(ratio_base, 1):
                    raise UploadRefused(f"A zip entry expands more than {MAX_RATIO} times; refused as a zip bomb.")
                fout.write(block)


def _stage_zip(src: Path, out: Path) -> None:
    budget = _Budget()
    try:
        with zipfile.ZipFile(src) as zf:
            entries = zf.infolist()
            budget.count_entries(len(entries))
            declared = 0
            for zi in entries:
                _check_entry_name(zi.filename)
                if stat.S_ISLNK(zi.external_attr >> 16):
                    raise UploadRefused(f"The zip entry {zi.filename!r} is a symlink; symlinks are refused.")
                declared += zi.file_size
                if zi.file_size > RATIO_FLOOR and zi.file_size > MAX_RATIO * max(zi.compress_size, 1):
                    ratio = zi.file_size // max(zi.compress_size, 1)
                    raise UploadRefused(f"The zip entry {zi.filename!r} expands {ratio} times; more than "
                                        f"{MAX_RATIO} is refused as a zip bomb.")
            budget.spend(declared)  # the headers' claim first (cheap), then the real bytes below
            budget.bytes = MAX_TOTAL_BYTES
            files = {PurePosixPath(zi.filename): zi for zi in entries if not zi.is_dir()}
            home = _pick_adapter(list(files))
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                zi = files[home / fname]
                with zf.open(zi) as fin:
                    budget.copy(fin, out / fname, ratio_base=zi.compress_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, RuntimeError) as exc:
        # RuntimeError: an encrypted entry (zipfile asks for a password)
        raise UploadRefused(f"The zip {src.name} cannot be read ({exc}).") from None


def _stage_folder(src: Path, out: Path) -> None:
    budget = _Budget()
    found: list[PurePosixPath] = []
    n = 0
    for here, dirs, files in os.walk(src, followlinks=False):
        for entry in dirs + files:
            n += 1
            budget.count_entries(n)
            path = Path(here) / entry
            if path.is_symlink():
                raise UploadRefused(f"The upload holds a symlink ({path.relative_to(src)}); symlinks are refused.")
            if entry in files:
                budget.spend(path.lstat().st_size)
                found.append(PurePosixPath(path.relative_to(src).as_posix()))
    budget.bytes = MAX_TOTAL_BYTES
    home = _pick_adapter(found)
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        fd = os.open(src / home / fname, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # swapped for a link since?
        with os.fdopen(fd, "rb") as fin:
            budget.copy(fin, out / fname)


def _stage_files(paths: list[Path], loose: Path) -> None:
    """Uploaded files (as a page receives them, each in its own temporary folder) gathered by file name."""
    budget = _Budget()
    budget.count_entries(len(paths))
    for path in paths:
        if path.is_symlink():
            raise UploadRefused(f"The uploaded file {path.name} is a symlink; symlinks are refused.")
        if not path.is_file():
            raise UploadRefused(f"The uploaded file {path.name} does not exist or is not a file.")
        if (loose / path.name).exists():
            raise UploadRefused(f"Two uploaded files are named {path.name}; upload one adapter at a time.")
        with open(path, "rb") as fin:
            budget.copy(fin, loose / path.name)


def remove_expert(library, name: str) -> None:
    """Remove an expert (the page asks for confirmation first); committed or read-only libraries refuse."""
    if is_committed_asset(library.root):
        raise UploadRefused(f"{library.root} is a committed demo library and is never modified.")
    library.remove(name)


__all__ = ["MAX_ENTRIES", "MAX_RANK", "MAX_RATIO", "MAX_TOTAL_BYTES", "DuplicateExpert", "UploadRefused",
           "check_upload_name", "check_upload_weights", "intake_adapter", "remove_expert", "stage_upload"]
