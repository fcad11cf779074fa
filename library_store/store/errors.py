"""The store's errors, and the one name check every store component applies.

Usage::

    try:
        lib = ExpertLibrary.open(path)
    except LibraryError as exc:     # every store failure; the message says what to do
        print(exc)
"""
from __future__ import annotations

from library_store.expert import check_name


class LibraryError(RuntimeError):
    """Anything wrong with a library: its path, its files, or a write it refuses. The message says which."""


class LibraryMismatch(LibraryError):
    """The library was built for another base model; the message shows both fingerprints."""


class ExpertUnavailable(LibraryError):
    """An indexed expert whose files are missing or damaged; the message names it."""


class DuplicateExpert(LibraryError):
    """An expert of that name is already in the library; `replace=True` (`--replace`) overwrites it."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


class InvalidName(LibraryError, ValueError):
    """A name outside `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`."""


def checked_name(name: str, what: str = "name") -> str:
    """`name` if it is a valid expert, task, cluster or derived-kind name, else InvalidName."""
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidName(f"Invalid {what}: {exc}") from None
