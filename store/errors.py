"""The store's error family: every error names the path and, where one applies, the field."""

from __future__ import annotations


def install_hint(extra: str) -> str:
    """How to install one of the package's extras, from PyPI or from a checkout."""
    return f"pip install 'prefast[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


class StoreError(ValueError):
    """Base of all store errors."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path does not exist."""


class NotAStoreError(StoreError):
    """The path exists but holds no activation store."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where a new one was asked for."""


class StoreFormatError(StoreError):
    """The store was written in a format version this code does not read."""


class StoreIncompleteError(StoreError):
    """The writer of the store did not finish; some chunks are missing."""


class StoreMismatchError(StoreError):
    """The store does not match what the caller expected (shape, dtype, provenance)."""


class StoreLockedError(StoreError):
    """Another writer holds the store."""


class StoreCorruptError(StoreError):
    """A chunk file is truncated, unreadable or fails its checksum."""


class StoreWriteError(StoreError):
    """Writing the store failed (its folder, a chunk, its record); the original exception is
    chained."""


class StoreInputError(StoreError):
    """A call got a bad argument: wrong shape, dtype, count or out-of-range index."""


__all__ = [
    "NotAStoreError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreIncompleteError",
    "StoreInputError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriteError",
]
