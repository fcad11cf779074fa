"""The store: a folder of LoRA experts for one base model, crash-safe, with an SQLite index.

Usage::

    from library_store.store import ExpertLibrary
    lib = ExpertLibrary.open("assets/libraries/demo-mbc")     # read-only unless readonly=False

One job per file: `library` (ExpertLibrary: open/create, experts in and out), `io` (SQLite schema, crash-safe
swaps, hashing), `derived` (cached derived data), `user_cache` (derived data of read-only libraries),
`records` (cluster table and scores), `checks` (does an expert fit, verify), `peft_layout` (PEFT's files),
`upload` (safe intake of an uploaded adapter), `user_copy` (writable copies of committed libraries),
`similarity` (ΔW similarity map), `share` (export for PEFT, pack / unpack for the Hub), `errors`.
"""
from library_store.store.errors import (DuplicateExpert, ExpertUnavailable, InvalidName, LibraryError,
                                        LibraryMismatch)
from library_store.store.library import ExpertLibrary

__all__ = ["DuplicateExpert", "ExpertLibrary", "ExpertUnavailable", "InvalidName", "LibraryError", "LibraryMismatch"]
