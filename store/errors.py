"""The store's error family: every error names the path and, where one applies, the field."""

from __future__ import annotations

import math
import operator
from typing import Any


def install_hint(extra: str) -> str:
    """How to install one of the package's extras, from PyPI or from a checkout."""
    return f"pip install 'prefast[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def shown(value: Any, limit: int = 80) -> str:
    """``value`` as an error message quotes it: an array or tensor of more than one element by
    its kind, shape and dtype (its repr can run to thousands of lines), anything else by its
    repr, cut to ``limit`` characters."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and math.prod(shape) > 1 and hasattr(value, "dtype"):
        kind = type(value).__name__
        kind = {"Tensor": "tensor", "ndarray": "array"}.get(kind, kind)
        article = "an" if kind[0] in "aeiou" else "a"
        return f"{article} {kind} of shape {tuple(shape)} and dtype {value.dtype}"
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


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


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int if it is an integer (a numpy one, or a 0-d integer tensor or
    array, too; not a bool, a float or a str) in ``[lo, hi]`` (``lo=None``: any integer;
    ``hi=None``: no upper bound), else raise ``StoreInputError`` naming ``name``."""
    # bool is an int subclass; a record saying `"views": true` is damaged, not 1 view. A
    # 1-element tensor or array has an index too, but is a list of indices, not one
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0 or "bool" in str(dtype):
        raise StoreInputError(f"{name} must be an integer, got {shown(value)}")
    try:
        n = operator.index(value)  # cheap: on the step path of write-through
    except TypeError:
        raise StoreInputError(f"{name} must be an integer, got {shown(value)}") from None
    if lo is None:
        pass
    elif hi is None:
        if n < lo:
            raise StoreInputError(f"{name} must be >= {lo}, got {n}")
    elif not lo <= n <= hi:
        raise StoreInputError(f"{name} must be in [{lo}, {hi}], got {n}")
    return n


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False (a numpy bool too), else raise ``StoreInputError``
    naming ``name``: a str such as ``"False"`` is truthy, and ``overwrite="False"`` replaced
    the store."""
    numpy_bool = type(value).__module__ == "numpy" and getattr(value, "dtype", None) == "bool"
    if not isinstance(value, bool) and not (numpy_bool and getattr(value, "ndim", 1) == 0):
        raise StoreInputError(f"{name} must be True or False, got {shown(value)}")
    return bool(value)


def naming(e: OSError, path: object) -> OSError:
    """``e`` again, naming the file ``path``: a failed write's own names none (``[Errno 28] No
    space left on device``)."""
    return OSError(e.errno, e.strerror or str(e), str(path))


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
    "check_bool",
    "check_int",
    "naming",
]
