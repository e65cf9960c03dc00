"""What cache folders hold, and removing run folders (``prefast cache list`` and ``remove``).

A run keeps its last store in ``CACHE_DIR/run-KEY`` (one run folder per set of settings), so
a sweep over settings leaves one folder per point. ``list_run_folders`` describes them (size,
stores, what produced them, whether a run is using them); ``remove_run_folder`` deletes one,
and only one that prefast made (it carries the run marker) and no run is using (its lock is
free, and stays taken while the folder goes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shlex
import shutil
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import store
from prefast.cache.identity import (
    LOCK_BUSY,
    LOCK_NAME,
    RUN_MARKER,
    RUN_PREFIX,
    STORE_PREFIX,
    TRASH_PREFIX,
    delete_store,
    store_path,
)
from prefast.cache.probes import PROBE_PREFIX
from prefast.errors import CacheError
from store import location
from store.tools.inspect import describe_dataset, describe_model

log = logging.getLogger(__name__)


@dataclass
class StoreEntry:
    """One ``boundary-NNN`` store of a run folder."""

    name: str
    nbytes: int
    complete: bool | None  # None: not readable as a store
    what: str  # the model and data that produced it, or why it does not open


@dataclass
class RunFolder:
    """One ``run-KEY`` folder."""

    path: Path
    nbytes: int
    modified: float  # the newest modification time in it (seconds since the epoch)
    ours: bool  # carries the run marker: prefast made it, and ``remove`` may delete it
    user: int | None  # the pid of the run using it (0: in use, pid unknown); None: free
    stores: list[StoreEntry] = field(default_factory=list)
    unreadable: str | None = None  # why it could not be looked into (permissions, a lock link)
    removing: bool = False  # the lock's holder is ``prefast cache remove``, not a run

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": os.fspath(self.path),
            "unreadable": self.unreadable,
            "bytes": self.nbytes,
            "modified": iso_time(self.modified),
            "made_by_prefast": self.ours,
            "in_use_by_pid": self.user,
            "being_removed": self.removing,
            "stores": [
                {"name": s.name, "bytes": s.nbytes, "complete": s.complete, "what": s.what}
                for s in self.stores
            ],
        }


def iso_time(t: float) -> str:
    """A modification time as an ISO date and time in UTC."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def entry_sizes(run_dir: Path) -> tuple[dict[str, int], float]:
    """Bytes of the files under each entry of ``run_dir`` (by the entry's name) and the newest
    mtime in it, in one walk (symlinks not followed)."""
    sizes: dict[str, int] = {}
    newest = run_dir.lstat().st_mtime
    for top, dirs, files in os.walk(run_dir):
        rel = os.path.relpath(top, run_dir)
        entry = None if rel == "." else rel.split(os.sep, 1)[0]
        for name in dirs:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(top, name)).st_mtime)
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                newest = max(newest, st.st_mtime)
                key = entry or name
                sizes[key] = sizes.get(key, 0) + st.st_size
    return sizes, newest


REMOVING = "remove"  # follows the pid in the lock file while ``prefast cache remove`` holds it


def write_lock_holder(fd: int, removing: bool = False) -> None:
    """Write this process into the run-folder lock file open (and locked) as ``fd``: its pid,
    and whether it is removing the folder rather than running in it. The flock is the lock,
    these bytes only name its holder: a disk that cannot take them (full) leaves the file
    saying none, and stops neither the run nor ``prefast cache remove`` freeing space."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}{' ' + REMOVING if removing else ''}\n".encode(), 0)
    except OSError as e:
        log.debug("the run folder lock file does not name its holder: %s", e)


def lock_holder(fd: int) -> tuple[int, bool]:
    """Who wrote into the run-folder lock file open as ``fd`` (``write_lock_holder``): the pid
    (0 where it says none) and whether it is removing the folder."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        words = os.pread(fd, 32, 0).decode().split()
        return int(words[0]), words[1:] == [REMOVING]
    return 0, False


def open_lock_file(run_dir: Path, create: bool) -> int:
    """Open ``run_dir``'s lock file (read-write, made where missing, with ``create``; else
    read-only). Never through a link: the holder's pid is written into it, which would empty
    and overwrite the file a link of that name points to. Nor anything but a file: a folder
    of that name was refused only once folders named before it were removed, and opening a
    named pipe waited for a writer for ever (``prefast cache list`` hung)."""
    path = run_dir / LOCK_NAME
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheError(f"{path} is a link, not prefast's lock file; remove it") from None
        if e.errno == errno.EISDIR:
            raise CacheError(f"{path} is not a file, so not prefast's lock file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(f"{path} is not a file, so not prefast's lock file")
    return fd


def _user(run_dir: Path) -> tuple[int | None, bool]:
    """The pid of the process holding ``run_dir``'s lock (0 where it does not say; None if
    free), and whether that is ``prefast cache remove``."""
    try:
        fd = open_lock_file(run_dir, create=False)
    except FileNotFoundError:
        return None, False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in LOCK_BUSY:
                raise
            return lock_holder(fd)
        return None, False  # the shared lock is dropped with the descriptor
    finally:
        os.close(fd)


def _store_entry(path: Path, nbytes: int) -> StoreEntry:
    try:
        s = store.open(path, partial=True)
    except store.StoreError as e:
        return StoreEntry(path.name, nbytes, None, f"not readable: {' '.join(str(e).split())}")
    try:
        meta, complete = s.meta, s.complete
    finally:
        s.close()
    what = describe_model(meta["model"]) if isinstance(meta.get("model"), dict) else "?"
    if isinstance(meta.get("data"), dict):
        what += " on " + describe_dataset(meta["data"])
    return StoreEntry(path.name, nbytes, complete, what)


def describe_run_folder(run_dir: Path) -> RunFolder:
    """Size, stores and state of one run folder."""
    sizes, modified = entry_sizes(run_dir)
    stores = [
        _store_entry(p, sizes.get(p.name, 0))
        for p in sorted(run_dir.iterdir())
        if p.name.startswith(STORE_PREFIX) and p.is_dir() and not p.is_symlink()
    ]
    try:
        user, removing = _user(run_dir)
        unreadable = None
    except CacheError as e:  # a link where the lock file is: said of this folder alone
        user, removing, unreadable = None, False, str(e)
    return RunFolder(
        run_dir,
        sum(sizes.values()),
        modified,
        (run_dir / RUN_MARKER).is_file(),
        user,
        stores,
        unreadable,
        removing=removing,
    )


def _is_run_folder(path: Path) -> bool:
    return path.name.startswith(RUN_PREFIX) and path.is_dir() and not path.is_symlink()


def _named_like_a_run_folder(path: Path) -> bool:
    """Whether ``path`` is a cache folder whose name starts like a run folder's (a
    ``--cache-dir run-sweep``): unmarked, with run folders in it (a run folder of prefast's
    never holds one)."""
    if not _is_run_folder(path) or (path / RUN_MARKER).is_file():
        return False
    try:
        return any(_is_run_folder(p) for p in path.iterdir())
    except OSError:
        return False


def _local_folder(path: str | Path, what: str) -> Path:
    local = location.as_local(path)
    if local is None:
        raise CacheError(f"{path}: prefast cache {what} works on local folders only")
    if local.name in ("", ".."):  # '.', '..', 'x/..': their names say nothing; the folder's do
        local = local.resolve()
    if not local.is_dir():
        raise CacheError(
            f"{path}: {'a file, not a folder' if local.exists() else 'no such folder'}"
        )
    return local


def list_run_folders(path: str | Path) -> list[RunFolder]:
    """The run folders in cache folder ``path`` (``path`` itself where it is one), newest
    first."""
    local = _local_folder(path, "list")
    if location.is_activation_store(local):  # the path a run prints at its end
        parent = local.absolute().parent
        where = (
            f"its run folder: prefast cache list {shlex.quote(str(parent))}"
            if _is_run_folder(parent)
            else "give the cache folder it is in"
        )
        raise CacheError(f"{path}: an activation store, not a cache folder; {where}")
    itself = _is_run_folder(local) and not _named_like_a_run_folder(local)
    found = [local] if itself else [p for p in local.iterdir() if _is_run_folder(p)]
    described = [r for r in map(_described, found) if r is not None]
    return sorted(described, key=lambda r: r.modified, reverse=True)


def _described(run_dir: Path) -> RunFolder | None:
    """``describe_run_folder``, or a folder that says why it could not be read: one folder of
    another user does not fail the list of the others. None where the folder is gone (a
    run's end or a ``prefast cache remove`` deleted it while the list was made)."""
    try:
        return describe_run_folder(run_dir)
    except OSError as e:
        try:
            modified = run_dir.lstat().st_mtime
        except FileNotFoundError:
            return None
        return RunFolder(run_dir, 0, modified, False, None, [], e.strerror or str(e))


def unique(runs: list[RunFolder]) -> list[RunFolder]:
    """Run folders named more than once (``run-K``, ``./run-K/``, a cache folder and a run
    folder in it) kept once, in their first place."""
    seen: dict[str, RunFolder] = {}
    for r in runs:
        seen.setdefault(os.path.realpath(r.path), r)
    return list(seen.values())


def check_removable(path: str | Path) -> RunFolder:
    """The run folder at ``path``, where ``remove_run_folder`` may delete it; else CacheError
    saying why (not a run folder, not made by prefast, in use)."""
    local = _local_folder(path, "remove")
    if not _is_run_folder(local) or _named_like_a_run_folder(local):
        raise CacheError(
            f"{path}: not a run folder (a {RUN_PREFIX}KEY folder of a cache folder; "
            "'prefast cache list CACHE_DIR' lists them)"
        )
    info = describe_run_folder(local)
    if info.unreadable is not None:  # whether a run uses it cannot be told
        raise CacheError(info.unreadable)
    if not info.ours:
        raise CacheError(f"{path}: not made by prefast (no {RUN_MARKER} in it); left as it is")
    if info.removing:
        raise CacheError(f"{path}: prefast cache remove (pid {info.user}) is deleting it already")
    if info.user is not None:
        pid = f" (pid {info.user})" if info.user else ""
        raise CacheError(f"{path}: a prefast run is using it{pid}; wait for it to finish")
    for folder in (local, local.parent):  # refused now, not after removing the others named
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CacheError(f"{path}: no permission to delete from {folder}")
    return info


def removal_plan(run_dir: Path) -> tuple[int, list[str]]:
    """What ``remove_run_folder`` would do to ``run_dir``: the bytes it frees and the names it
    keeps (what prefast did not write: a file, a link, a folder that is no activation store,
    a store that holds what it did not write, whose own files alone go; the folder then
    stays too)."""
    sizes, _ = entry_sizes(run_dir)
    kept = []
    freed = 0  # of the stores kept for what is in them
    for child in sorted(run_dir.iterdir()):
        if child.name in (RUN_MARKER, LOCK_NAME):
            continue
        if not child.is_symlink() and child.is_dir():
            if child.name.startswith((TRASH_PREFIX, PROBE_PREFIX)):
                continue
            if child.name.startswith(STORE_PREFIX) and location.is_activation_store(child):
                own, _, foreign = location.store_files(child)
                if not foreign:
                    continue
                freed += sum(f.lstat().st_size for f in own)
        kept.append(child.name)
    return freed + sum(n for name, n in sizes.items() if name not in kept), kept


def clear_leftovers(run_dir: Path) -> None:
    """Delete what an interrupted run left in its own run folder (which carries our marker):
    renamed-away stores in the trash, stores of rate probes, and stores whose writing never
    finished (a run never reads those: it writes a boundary's store anew)."""
    if not (run_dir / RUN_MARKER).is_file():
        return
    for child in run_dir.iterdir():
        if child.is_symlink():  # it points at what is not this folder's own
            continue
        if child.is_dir() and child.name.startswith((TRASH_PREFIX, PROBE_PREFIX)):
            shutil.rmtree(child, ignore_errors=True)
            log.info("cleared %s, left by an interrupted run", child)
        elif child.is_dir() and child.name.startswith(STORE_PREFIX) and _unfinished(child):
            delete_store(child)
            log.info("removed %s, a store an interrupted run did not finish writing", child)


def blocked_store_names(run_dir: Path, boundaries: range) -> list[Path]:
    """The entries of ``run_dir`` under the store name of one of ``boundaries`` where no store
    can be written: a file, a folder that holds something and no activation store, or a link
    to either or to nothing (a link to a store or to an empty folder is written through). A
    run refuses them at its start, not when it reaches that boundary."""
    blocked = []
    for b in boundaries:
        p = Path(store_path(run_dir, b))
        if not p.exists():  # follows a link: a dangling one is blocked
            if p.is_symlink():
                blocked.append(p)
            continue
        if not p.is_dir() or (any(p.iterdir()) and not location.is_activation_store(p)):
            blocked.append(p)
    return blocked


def _unfinished(path: Path) -> bool:
    """Whether ``path`` is an activation store marked incomplete (a folder that is not a
    store, or a store that does not open and whose record does not say so, is left alone)."""
    if not location.is_activation_store(path):
        return False
    try:
        s = store.open(path, partial=True)
    except store.StoreError:
        return _marked_incomplete(path)
    try:
        return not s.complete
    finally:
        s.close()


def _marked_incomplete(path: Path) -> bool:
    """Whether the record of a store that does not open marks it incomplete: one whose
    overwriting was cut short (``store.create(..., overwrite=True)`` marks it incomplete
    before it deletes anything, and deletes the record last)."""
    info = location.recorded_info(path)
    return info is not None and not info.complete


def remove_if_unused(run_dir: Path) -> bool:
    """Remove ``run_dir`` where it holds nothing but its marker and lock; True if it went.
    Called with the lock held, so a run that starts meanwhile is refused, or its lock file
    keeps the folder. The lock file goes before the marker: cut short between the two, the
    folder is still marked, and a later ``remove`` (or a run's end) takes it."""
    with contextlib.suppress(OSError):
        names = {p.name for p in run_dir.iterdir()}
        if RUN_MARKER in names and names <= {RUN_MARKER, LOCK_NAME}:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            (run_dir / RUN_MARKER).unlink()
            run_dir.rmdir()
            return True
    return False


def remove_run_folder(path: str | Path) -> list[str]:
    """Delete the run folder at ``path`` (see ``check_removable``), holding its lock meanwhile
    so that no run starts in it. What interrupted runs left goes first (``clear_leftovers``),
    then its stores, each renamed into the folder's trash before it is deleted (a kill leaves
    trash that a later start or remove clears), then the lock and the marker
    (``remove_if_unused``). Anything else in it (a file prefast did not write, also one in a
    store's folder) stays, with the folder; the names left are returned."""
    info = check_removable(path)
    run_dir = info.path
    fd = open_lock_file(run_dir, create=True)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in LOCK_BUSY:
                raise CacheError(f"{path}: a prefast run started using it; left as it is") from None
            raise
        write_lock_holder(fd, removing=True)  # a run refused meanwhile names this, not a pid gone
        clear_leftovers(run_dir)
        for child in sorted(run_dir.iterdir()):
            if child.is_symlink() or not child.is_dir():
                continue
            if child.name.startswith(STORE_PREFIX) and location.is_activation_store(child):
                delete_store(child)  # renamed into the trash first
        if remove_if_unused(run_dir):
            return []
    finally:
        os.close(fd)
    return sorted(p.name for p in run_dir.iterdir() if p.name not in (RUN_MARKER, LOCK_NAME))


__all__ = [
    "RunFolder",
    "StoreEntry",
    "blocked_store_names",
    "check_removable",
    "clear_leftovers",
    "describe_run_folder",
    "entry_sizes",
    "iso_time",
    "list_run_folders",
    "lock_holder",
    "open_lock_file",
    "removal_plan",
    "remove_if_unused",
    "remove_run_folder",
    "unique",
    "write_lock_holder",
]
