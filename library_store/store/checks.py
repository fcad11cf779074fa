"""Does an expert fit a library's base model? Shape and key checks with messages that name the module.

Usage::

    check_weight_keys("mine", expert.weights)                          # only PEFT lora_A / lora_B keys
    check_finite("mine", expert.weights)                               # no NaN or inf anywhere
    check_fit("mine", expert.factors(), lib.fingerprint, lib.module_shapes)   # raises LibraryError on a misfit
    verify_library(lib)                  # every problem of a stored library, one line each
"""
from __future__ import annotations

import json

import torch

from library_store.expert import PEFT_PREFIX, parse_site
from library_store.store.errors import LibraryError


def check_weight_keys(name: str, weights: dict[str, torch.Tensor]) -> None:
    if not weights:
        raise LibraryError(f"Expert {name!r} holds no weights.")
    for key, tensor in weights.items():
        if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise LibraryError(f"Expert {name!r}: weight {key!r} is not a PEFT LoRA key "
                               f"('{PEFT_PREFIX}<site>.lora_A.weight' / '.lora_B.weight').")
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or not tensor.is_floating_point():
            raise LibraryError(f"Expert {name!r}: weight {key!r} must be a 2-D float tensor.")


def check_finite(name: str, weights: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or inf anywhere: one such expert would break the prototype computation (an SVD) for the whole
    library it routes in, so it is stopped at every entry (add, import, upload, attaching a file changed on disk).
    One fused norm over every tensor is finite unless some value is not; only then is each tensor scanned."""
    if bool(torch.isfinite(torch.nn.utils.get_total_norm(list(weights.values())))):
        return
    for key, tensor in weights.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise LibraryError(f"Expert {name!r}: weight {key!r} holds {bad} of {tensor.numel()} non-finite values "
                               "(NaN or inf); a broken adapter (diverged training?) cannot be routed.")


def check_fit(name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], fingerprint: dict,
              shapes: dict[str, tuple[int, int]]) -> None:
    """Each site's A (r, d_in) and B (d_out, r) must match the base model's module at that site.

    `shapes` is leaf name -> (d_in, d_out) recorded when the library was created; without it only the
    layer count and the hidden size (one side of every attention/MLP projection) can be checked.
    """
    num_layers = fingerprint.get("num_layers")
    hidden = fingerprint.get("hidden_size")
    ranks = set()
    for site, (a, b) in factors.items():  # a: (r, d_in), b: (d_out, r)
        try:
            layer, module = parse_site(site)
        except LookupError as exc:
            raise LibraryError(f"Expert {name!r}: {exc}") from None
        if num_layers is not None and layer >= num_layers:
            raise LibraryError(f"Expert {name!r} does not fit the base model: {site} is layer {layer}, "
                               f"but the base model has {num_layers} layers.")
        if a.shape[0] != b.shape[1]:
            raise LibraryError(f"Expert {name!r}: {site} lora_A is {tuple(a.shape)} and lora_B is "
                               f"{tuple(b.shape)}; their ranks differ.")
        if a.shape[0] == 0:
            raise LibraryError(f"Expert {name!r}: {site} has rank 0 (lora_A {tuple(a.shape)}); a rank-0 LoRA "
                               "changes nothing and is refused.")
        ranks.add(a.shape[0])
        if shapes:
            if module not in shapes:
                raise LibraryError(f"Expert {name!r} does not fit the base model: {site} targets module "
                                   f"{module!r}, which the base model does not have as a linear layer "
                                   f"(it has {', '.join(sorted(shapes))}).")
            d_in, d_out = shapes[module]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise LibraryError(
                    f"Expert {name!r} does not fit the base model at module {site}: the expert has lora_A "
                    f"{tuple(a.shape)} and lora_B {tuple(b.shape)} (maps {a.shape[1]} -> {b.shape[0]}), the base "
                    f"model's {module} maps {d_in} -> {d_out} (needs lora_A (r, {d_in}), lora_B ({d_out}, r)).")
        elif hidden is not None and hidden not in (a.shape[1], b.shape[0]):
            raise LibraryError(
                f"Expert {name!r} does not fit the base model at module {site}: the expert maps "
                f"{a.shape[1]} -> {b.shape[0]} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}), but every "
                f"projection of the base model has hidden size {hidden} on one side.")
    if len(ranks) > 1:
        raise LibraryError(f"Expert {name!r} mixes ranks {sorted(ranks)}; one rank per expert is stored.")


def verify_library(lib) -> list[str]:
    """Every problem of an ExpertLibrary, one line each naming the expert or derived entry; empty when all is
    well. Re-hashes every file and checks every expert's shapes against the base model."""
    from library_store.store.io import file_problem
    from library_store.store.peft_layout import CONFIG_FILE

    problems: list[str] = []
    with lib._read() as con:
        rows = list(con.execute("SELECT * FROM experts ORDER BY name"))
        derived = list(con.execute("SELECT * FROM derived ORDER BY kind, key"))
        pending = con.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    if pending:
        problems.append(f"{pending} interrupted write(s) not yet recovered (open the library writable to fix)")
    for row in rows:
        name, issues = row["name"], _config_problems(lib.expert_dir(row["name"]) / CONFIG_FILE, row)
        try:
            expert = lib[name]
            check_finite(name, expert.weights)  # stored before every entry refused them
            check_fit(name, expert.factors(), lib.fingerprint, lib.module_shapes)
        except LibraryError as exc:
            issues.append(str(exc))
        if issues:
            problems.append(f"expert {name!r}: {'; '.join(issues)}")
    for row in derived:
        problem = file_problem(lib.root / row["file"], row["checksum"], row["size"], full=True)
        if problem:
            problems.append(f"derived {row['kind']}-{row['key']}: {problem}")
    return problems


def _config_problems(path, row) -> list[str]:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, ValueError) as exc:
        return [f"{path} is unreadable ({exc})"]
    if (config.get("r"), float(config.get("lora_alpha", -1))) != (row["rank"], row["alpha"]):
        return [f"{path} says r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; the index says "
                f"rank {row['rank']}, alpha {row['alpha']}"]
    return []
