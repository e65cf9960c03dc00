"""Where stores live: local paths (``file://`` included) and fsspec URLs (``s3://``, ``gs://``,
``memory://``, ...). The few filesystem operations a caller needs around stores, the same for
both; fsspec is imported only for URLs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from store._zarr import as_local
from store.errors import NotAStoreError, StoreInputError, install_hint
from store.layout import (
    ACTIVATIONS,
    ATTRS_KEY,
    CHUNK_CRC,
    FORMAT_NAME,
    LABEL_CRC,
    LABELS,
    StoreInfo,
)

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


STORE_ARRAYS = (CHUNK_CRC, ACTIVATIONS, LABELS, LABEL_CRC)  # the chunk markers first
# the temporary names a store's files are written under: a table chunk's (the writer's
# ``.KEY.THREAD.tmp``) and zarr's (``NAME.HEX.partial``, a record or a chunk)
_TEMP_NAME = re.compile(r"^(\.\d+\.\d+\.tmp|(zarr|\d+)\.[0-9a-f]{32}\.partial)$")


def _is_own(name: str, is_dir: bool, level: int) -> bool:
    """Whether an entry (not a link) ``level`` deep in a store folder is one the store writes:
    at the top its record and array folders, in an array folder its record and chunk folder,
    under that the chunk files and the folders of their keys (all digits)."""
    if _TEMP_NAME.match(name) and not is_dir:
        return True
    if level == 0:
        return name in STORE_ARRAYS if is_dir else name == "zarr.json"
    if level == 1:
        return name == "c" if is_dir else name == "zarr.json"
    return name.isascii() and name.isdigit()


def store_files(path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """What is in the local store folder ``path``: the files the store wrote (its records,
    chunk files and their temporary files), its folders (deepest first), and the topmost
    entries it did not write (a user's file, a link anywhere: links are never followed)."""
    files: list[Path] = []
    folders: list[Path] = []
    foreign: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                p = Path(e.path)
                is_dir = e.is_dir(follow_symlinks=False)
                if e.is_symlink() or not _is_own(e.name, is_dir, level):
                    foreign.append(p)
                elif is_dir:
                    walk(p, level + 1)
                    folders.append(p)
                else:
                    files.append(p)

    walk(path, 0)
    return files, folders, foreign


def remove_store_files(path: Path) -> list[Path]:
    """Delete the files of the local store at ``path`` that the store wrote (``store_files``),
    its chunk markers first (a chunk is never left marked written with its data gone) and its
    record last, then the folders they leave empty, ``path`` too where nothing else is in it.
    What the store did not write stays, with the folders it is in; returns it."""
    files, folders, foreign = store_files(path)
    record = path / "zarr.json"
    markers = path / CHUNK_CRC
    for f in sorted(files, key=lambda f: (f == record, markers not in f.parents)):
        f.unlink(missing_ok=True)
    for d in (*folders, path):
        with contextlib.suppress(OSError):  # what is not the store's is in it
            d.rmdir()
    return foreign


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
    "remove_store_files",
    "store_files",
    "store_record",
]
