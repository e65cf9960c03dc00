"""Where stores live: local paths (``file://`` included) and fsspec URLs (``s3://``, ``gs://``,
``memory://``, ...). The few filesystem operations a caller needs around stores, the same for
both; fsspec is imported only for URLs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from store._zarr import as_local
from store.errors import NotAStoreError, StoreInputError, install_hint
from store.layout import ATTRS_KEY, FORMAT_NAME, StoreInfo

Location = str | os.PathLike[str]


def is_url(loc: Location) -> bool:
    """True for a remote fsspec URL (``file://`` counts as local)."""
    return as_local(loc) is None


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec, or the protocol's backend (s3fs, gcsfs, ...)
        raise StoreInputError(missing_backend(url, e)) from None
    except ValueError as e:  # an unknown protocol
        raise StoreInputError(f"{url}: {e}") from None
    return fs, path


def missing_backend(url: str, e: ImportError) -> str:
    """The message for a URL whose fsspec (or protocol backend) does not import."""
    return f"{url}: remote stores need fsspec and its backend: {install_hint('remote')} ({e})"


def check_reachable(loc: Location) -> None:
    """For a URL, that fsspec and the protocol's backend are installed (StoreInputError if
    not); nothing for a local path. Nothing is read or written."""
    if is_url(loc):
        _fs(os.fspath(loc))


def join(base: Location, name: str) -> Path | str:
    """``base / name``: a Path for local locations, a URL string for remote ones."""
    local = as_local(base)
    return local / name if local is not None else os.fspath(base).rstrip("/") + "/" + name


def exists(loc: Location) -> bool:
    local = as_local(loc)
    if local is not None:
        return local.exists()
    fs, path = _fs(os.fspath(loc))
    return bool(fs.exists(path))


def is_store(loc: Location) -> bool:
    """Whether ``loc`` holds a zarr group (a ``zarr.json`` at its root)."""
    local = as_local(loc)
    if local is not None:
        return (local / "zarr.json").is_file()
    fs, path = _fs(os.fspath(loc))
    return bool(fs.exists(path.rstrip("/") + "/zarr.json"))


def children(loc: Location) -> list[Path | str]:
    """The entries directly under ``loc`` (none when it does not exist), sorted."""
    local = as_local(loc)
    if local is not None:
        return sorted(local.iterdir()) if local.is_dir() else []
    url = os.fspath(loc).rstrip("/")
    fs, path = _fs(url)
    if not fs.exists(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [url + "/" + n for n in names]


def make_dirs(loc: Location) -> None:
    """Create a local folder (object stores have no folders to create)."""
    local = as_local(loc)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)


def remove(loc: Location) -> None:
    """Delete ``loc`` and everything under it; a missing location is not an error. Callers
    pass only locations they created (see ``remove_store`` for stores)."""
    local = as_local(loc)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    fs, path = _fs(os.fspath(loc))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def store_record(loc: Location) -> dict[str, Any] | None:
    """The activation-store record in the attributes of ``loc``'s ``zarr.json``, read as JSON
    without opening the store (so also for one whose arrays are gone); None where there is
    none (a folder of a user's, even one with a ``zarr.json``, another format)."""
    local = as_local(loc)
    try:
        if local is not None:
            text = (local / "zarr.json").read_text()
        else:
            fs, path = _fs(os.fspath(loc))
            text = fs.cat_file(path.rstrip("/") + "/zarr.json").decode()
        d = json.loads(text)
    except (OSError, ValueError):
        return None
    record = d.get("attributes", {}).get(ATTRS_KEY) if isinstance(d, dict) else None
    return record if isinstance(record, dict) and record.get("format") == FORMAT_NAME else None


def recorded_info(loc: Location) -> StoreInfo | None:
    """The ``StoreInfo`` of ``store_record`` (so also of a store that no longer opens); None
    where there is no record or one of another shape."""
    record = store_record(loc)
    try:
        return None if record is None else StoreInfo.from_dict(record, os.fspath(loc))
    except (ValueError, KeyError, TypeError):  # StoreError is a ValueError
        return None


def is_activation_store(loc: Location) -> bool:
    """Whether ``loc`` holds a store this package wrote: a zarr group whose attributes carry
    the activation-store record (``store_record``)."""
    return store_record(loc) is not None


def remove_store(loc: Location) -> None:
    """Delete the activation store at ``loc``; anything else there is left alone (a missing
    location is not an error)."""
    if not exists(loc):
        return
    if not is_activation_store(loc):
        raise NotAStoreError(f"{loc}: not an activation store; refusing to delete it")
    remove(loc)


__all__ = [
    "as_local",
    "children",
    "exists",
    "is_activation_store",
    "is_store",
    "is_url",
    "join",
    "make_dirs",
    "recorded_info",
    "remove",
    "remove_store",
    "store_record",
]
