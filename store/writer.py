"""Crash-safe, write-behind creation of an activation store.

``create()`` returns a ``StoreWriter``; ``write()`` takes batches at any sample offset, assembles
them into whole chunks in memory and hands each finished chunk to a bounded pool of threads
that checksum, encode and store it (crc32c and numcodecs' Blosc and Zstd release the GIL). A
chunk counts as done only once its data, its labels (with view 0) and its CRC marker are
stored, in that order, and the group's ``complete`` flag is written last, so a writer that
dies leaves a store that opens as incomplete and that ``create(..., resume=True)`` completes.
A failure on the pool (a full disk, say) is raised once, as ``StoreWriteError``, at the next
call (or logged, where ``abort`` ends a writer whose caller is failing already); the writer then
refuses further writes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import fcntl
import logging
import math
import os
import re
import resource
import shutil
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr

from store import _mmap, _zarr
from store import layout as _layout
from store.errors import (
    NotAStoreError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    StoreInputError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriteError,
    check_bool,
    check_int,
)
from store.layout import (
    ACTIVATIONS,
    ATTRS_KEY,
    CHUNK_CRC,
    LABEL_CRC,
    LABELS,
    StoreInfo,
    StoreLayout,
    batch_tensor,
    check_labels,
    check_write,
    chunk_crc,
    count_nonfinite,
    default_chunk_samples,
    json_meta,
    merge_ranges,
    unwritten_ranges,
)
from store.location import (
    check_reachable,
    children,
    is_activation_store,
    missing_backend,
    recorded_info,
    remove,
    remove_store_files,
    store_files,
)

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def to_stored_numpy(x: torch.Tensor | np.ndarray, layout: StoreLayout) -> np.ndarray:
    """A batch converted to the stored dtype as a C-contiguous numpy array on the host."""
    x = batch_tensor(x)
    if not (x.is_floating_point()):
        raise StoreInputError(f"field 'x': expected a floating-point batch, got dtype {x.dtype}")
    t = x.detach().to(device="cpu", dtype=layout.torch_dtype).contiguous()
    if layout.dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@dataclass
class _ChunkBuffer:
    data: np.ndarray  # (chunk_len, *sample_shape) stored dtype
    filled: np.ndarray  # (chunk_len,) bool

    @property
    def full(self) -> bool:
        return bool(self.filled.all())


class _DirLock:
    """An advisory ``flock`` on the store directory. The kernel drops it when the process dies,
    so a crashed writer never leaves a stale lock. Exclusive for a single writer, shared for the
    ranks of a sharded write (they own disjoint chunks)."""

    def __init__(self, path: Path, shared: bool) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"{path}: another writer holds this store; wait for it to finish or stop it"
                ) from None
            raise

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(jobs: list[tuple[int, np.ndarray, int]]) -> None:
    """(file descriptor, bytes, offset) each written whole (``os.pwrite`` releases the GIL)."""
    for fd, src, off in jobs:
        mv = memoryview(np.ascontiguousarray(src).data).cast("B")
        while mv:
            k = os.pwrite(fd, mv, off)
            mv, off = mv[k:], off + k


def _clear_store_dir(path: Path) -> None:
    """Empty a folder a store is being created over. A store there marked complete is first
    marked incomplete, and its record (``zarr.json``) goes last: a writer killed meanwhile
    leaves an incomplete store, never a half-deleted one still marked complete. The chunk
    markers (``chunk_crc``) go first: a chunk whose data is deleted is never left marked as
    written, which a resumed writer would take as stored. A folder that holds what the store
    did not write (a user's file, a link anywhere in it) is refused before anything goes: it
    was emptied whole, and zarr would write through a link at one of the store's names."""
    foreign = store_files(path)[2]
    if foreign:
        names = ", ".join(os.path.relpath(f, path) for f in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise StoreExistsError(
            f"{path}: the store here holds what it did not write ({names}{more}); move that "
            "out of its folder to overwrite the store, or write the store elsewhere"
        )
    _mark_incomplete(path)
    for child in sorted(path.iterdir(), key=lambda c: c.name != CHUNK_CRC):
        if child.name == "zarr.json":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / "zarr.json").unlink(missing_ok=True)


def clear_store_files(path: Path) -> list[Path]:
    """Delete the local store at ``path`` where it holds what the store did not write (a
    user's file, a link): the store's own files and the folders they leave empty go, the
    rest stays (``location.remove_store_files``), and is returned. It is marked incomplete
    first: cut short, it leaves an incomplete store, never one marked complete with chunks
    gone."""
    _mark_incomplete(path)
    return remove_store_files(path)


def _clear_store_url(url: str) -> None:
    """``_clear_store_dir`` at a URL: the store there is marked incomplete, its record goes
    last, so an overwrite cut short leaves an incomplete store that a later overwrite takes,
    never keys without a record (which ``create`` refuses to overwrite), nor a chunk marked
    written whose data is gone (the chunk markers go first)."""
    _mark_incomplete(url)
    record = url.rstrip("/") + "/zarr.json"
    for child in sorted(children(url), key=lambda c: not str(c).endswith("/" + CHUNK_CRC)):
        if child != record:
            remove(child)
    remove(record)


def _mark_incomplete(path: Path | str) -> None:
    """Rewrite the record of the store at ``path`` as incomplete (one atomic write of its
    ``zarr.json``), where it is a store of this format marked complete."""
    info = recorded_info(path)
    if info is None or not info.complete:
        return  # none, or one this code cannot read: no reader takes it as complete either
    try:
        group = _zarr.open_group(path, mode="r+")
    except (StoreError, OSError, ValueError):
        return
    group.attrs[ATTRS_KEY] = dataclasses.replace(info, complete=False, completed=None).to_dict()


def _layout_mismatch(a: StoreLayout, b: StoreLayout) -> list[str]:
    return [
        f"{name}: store has {getattr(a, name)!r}, asked for {getattr(b, name)!r}"
        for name in a.__dataclass_fields__
        if getattr(a, name) != getattr(b, name)
    ]


def _check_path(path: Any) -> str:
    """``path`` as a str, where it is a str or ``os.PathLike`` of one, not empty; else
    ``StoreInputError`` (bytes failed inside the URL check with 'startswith first arg must be
    bytes', None with os.fspath's TypeError, and "" stood for the working directory)."""
    text = _zarr.location_str(path)
    if not text:
        raise StoreInputError("path must be a non-empty str or a pathlib.Path, got ''")
    return text


def create(
    path: str | os.PathLike[str],
    *,
    sample_shape: tuple[int, ...],
    num_samples: int,
    views: int = 1,
    dtype: str = "float16",
    codec: str | None = None,
    codec_level: int | None = None,
    chunk_samples: int | None = None,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
    max_pending: int | None = None,
) -> StoreWriter:
    """Create a store at ``path`` (or, with ``resume=True``, reopen a partial one) for writing.

    ``meta`` is JSON-able provenance kept in the group's attributes; on resume it must equal
    the stored one. ``rank``/``world_size`` make this writer own the chunks ``c`` with
    ``c % world_size == rank`` of every view, so ranks write disjoint chunk files; with
    ``world_size > 1`` every rank must pass ``resume=True`` except the one that creates the store,
    and ``finalize(path)`` marks it complete once all ranks are done. ``chunk_samples``
    (default: about 8 MiB of samples) above ``num_samples`` is taken as ``num_samples``.
    """
    if workers is None:  # encoding, checksums and writes release the GIL
        workers = min(8, max(2, (os.cpu_count() or 2) // 2))
    workers = check_int("workers", workers, 1)
    if max_pending is not None:
        max_pending = check_int("max_pending", max_pending, 1)

    overwrite = check_bool("overwrite", overwrite)
    resume = check_bool("resume", resume)
    if overwrite and resume:
        raise StoreInputError("overwrite=True and resume=True exclude each other")
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise StoreInputError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    shape = _layout.as_shape(sample_shape)
    # before the default chunking, which computes with it
    check_int("num_samples", num_samples, 1, _layout.MAX_SAMPLES)
    if chunk_samples is None:
        chunk_samples = default_chunk_samples(shape, dtype, max(num_samples, 1))
    else:
        # one chunk holds every sample: a larger one was a raw chunk file of that many
        # samples, nearly all padding (10 samples with chunk_samples=100000 took 100000)
        chunk_samples = min(check_int("chunk_samples", chunk_samples, 1), num_samples)
    layout = StoreLayout(
        num_samples=num_samples,
        views=views,
        sample_shape=shape,
        dtype=dtype,
        codec=codec,
        codec_level=codec_level,
        chunk_samples=chunk_samples,
    )
    meta = json_meta(meta, f"{_check_path(path)}: ")
    root = _zarr.as_local(path)
    if root is None:
        return _create_remote(
            os.fspath(path), layout, meta, overwrite, resume, rank, world_size, workers, max_pending
        )

    try:
        exists = root.exists()
    except OSError as e:  # a folder on the way this user may not enter
        raise StoreWriteError(f"{root}: cannot look for the store: {_mkdir_reason(root, e)}") from e
    if exists and not root.is_dir():
        raise NotAStoreError(f"{root}: exists and is not a directory")
    args = (rank, world_size, workers, max_pending)
    if exists and resume and is_activation_store(root):
        lock = _DirLock(root, shared=world_size > 1)
        try:
            return _reopened(root, layout, meta, lock, *args)
        except BaseException:
            lock.release()
            raise
    if exists and any(root.iterdir()):
        if not is_activation_store(root):
            raise StoreExistsError(
                f"{root}: directory is not empty and holds no activation store; refusing to overwrite it"
            )
        if not overwrite and not resume:
            raise StoreExistsError(
                f"{root}: a store exists here; pass overwrite=True to replace it or resume=True"
            )
    if world_size > 1 and rank != 0:
        raise StoreInputError(_rank_joins(root, rank, resume))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreWriteError(
            f"{root}: cannot create the store's folder: {_mkdir_reason(root, e)}"
        ) from e
    lock = _DirLock(root, shared=world_size > 1)
    try:
        if any(root.iterdir()):  # what another writer made here between the look above and the lock
            if resume and is_activation_store(root):
                return _reopened(root, layout, meta, lock, *args)
            if not overwrite or not is_activation_store(root):
                raise StoreExistsError(
                    f"{root}: another writer made a store here meanwhile; pass overwrite=True "
                    "to replace it or resume=True"
                )
        _clear_store_dir(root)
        info = StoreInfo(layout=layout, meta=meta, complete=False, created=_now())
        group = zarr.create_group(str(root), zarr_format=3, attributes={ATTRS_KEY: info.to_dict()})
        _create_arrays(group, layout)
        log.debug("created store %s: %s", root, layout)
        return StoreWriter(root, group, info, lock, *args)
    except BaseException:
        lock.release()
        raise


def _rank_joins(where: Path | str, rank: int, resume: bool) -> str:
    """Why a rank other than 0 found no store to join: it passed no ``resume=True``, or it
    did and rank 0 has not created the store yet."""
    if resume:
        return (
            f"{where}: rank {rank} found no store to resume; rank 0 creates it: open it with "
            "resume=True once rank 0's store.create has returned"
        )
    return f"{where}: rank {rank} must open an existing store with resume=True (rank 0 creates it)"


def _reopened(
    root: Path,
    layout: StoreLayout,
    meta: dict[str, Any],
    lock: _DirLock,
    rank: int,
    world_size: int,
    workers: int,
    max_pending: int | None,
) -> StoreWriter:
    """A writer of the partial store at ``root`` (``resume=True``), under ``lock``."""
    group = _zarr.open_group(root, mode="r+")
    info = _check_resume(group, layout, meta, str(root))
    return StoreWriter(root, group, info, lock, rank, world_size, workers, max_pending)


def _mkdir_reason(root: Path, e: OSError) -> str:
    """Why ``root.mkdir(parents=True)`` failed, naming a file that stands where a folder must
    or a link to nothing (a disk not mounted) that stands where one must be created."""
    for parent in (root, *root.parents):
        try:
            if parent.is_symlink() and not parent.exists():
                return f"{parent} is a link to {os.readlink(parent)}, which does not exist"
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a folder"
                break
        except OSError:  # a folder above this user may not enter: e says so
            continue
    return e.strerror or str(e)


def _check_resume(
    group: zarr.Group, layout: StoreLayout, meta: dict[str, Any], where: str
) -> StoreInfo:
    d = _zarr.read_info_dict(group)
    if d is None:
        raise NotAStoreError(f"{where}: a zarr group without '{ATTRS_KEY}' attributes")
    info = StoreInfo.from_dict(d, where)
    problems = _layout_mismatch(info.layout, layout)
    if info.meta != meta:
        problems.append("meta: the stored provenance differs from the one given")
    if problems:
        raise StoreMismatchError(
            f"{where}: cannot resume a different store: " + "; ".join(problems)
        )
    if not info.complete:
        _create_missing_arrays(group, info.layout, where)
    _zarr.check_arrays(group, info.layout, where, info.complete)
    return info


def _has_member(group: zarr.Group, name: str) -> bool:
    """Whether ``group`` has a member ``name`` (listing the group would read every entry of
    the folder, a killed writer's temporary files among them)."""
    try:
        group[name]
    except KeyError:
        return False
    except Exception:  # there but unreadable: check_arrays names it
        return True
    return True


def _create_missing_arrays(group: zarr.Group, layout: StoreLayout, where: str) -> None:
    """Make the arrays an incomplete store lacks, where none of its chunks can be marked
    written: its writer was killed after the record and before the last of its arrays, or an
    overwrite was killed while it emptied the folder (the chunk markers go first). Otherwise
    (chunk markers without the other arrays) ``check_arrays`` refuses the store."""
    missing = [name for name in _zarr.array_specs(layout) if not _has_member(group, name)]
    if not missing:
        return
    if CHUNK_CRC not in missing:
        crcs = _zarr.read_table(_zarr.array(group, CHUNK_CRC), where, _zarr.as_local(where))
        if (crcs >= 0).any():
            return
    log.info("%s: making the arrays its writer did not make: %s", where, missing)
    _create_arrays(group, layout, missing)


def _create_arrays(group: zarr.Group, layout: StoreLayout, names: list[str] | None = None) -> None:
    """Make the store's member arrays (``names`` only, where given)."""
    for name, spec in _zarr.array_specs(layout).items():
        if names is not None and name not in names:
            continue
        group.create_array(
            name,
            **spec,
            compressors=_zarr.compressors_for(layout) if name == ACTIVATIONS else None,
            serializer=_zarr.little_endian(),
            filters=None,
            config={"write_empty_chunks": True},
        )


def _create_remote(
    url: str,
    layout: StoreLayout,
    meta: dict[str, Any],
    overwrite: bool,
    resume: bool,
    rank: int,
    world_size: int,
    workers: int,
    max_pending: int | None,
) -> StoreWriter:
    """A store at an fsspec URL (s3://, gs://, memory://, ...) through zarr's FsspecStore.
    Object stores have no advisory locks: run one writer (or one per rank) per store."""
    check_reachable(url)  # an unknown protocol, a missing backend: StoreInputError
    if not is_activation_store(url) and children(url):
        # zarr's create_group(overwrite=True) deletes everything under the URL
        raise StoreExistsError(
            f"{url}: not empty and holds no activation store; refusing to overwrite it"
        )
    group: zarr.Group | None
    try:
        group = _zarr.open_group(url, mode="r+")
    except FileNotFoundError:
        group = None
    except ImportError as e:
        raise StoreInputError(missing_backend(url, e)) from None
    if group is not None and resume:
        info = _check_resume(group, layout, meta, url)
        return StoreWriter(url, group, info, None, rank, world_size, workers, max_pending)
    if group is not None and not overwrite:
        raise StoreExistsError(
            f"{url}: a store exists here; pass overwrite=True to replace it or resume=True"
        )
    if world_size > 1 and rank != 0:
        raise StoreInputError(_rank_joins(url, rank, resume))
    if group is not None:
        _clear_store_url(url)
    info = StoreInfo(layout=layout, meta=meta, complete=False, created=_now())
    group = zarr.create_group(
        url, zarr_format=3, overwrite=True, attributes={ATTRS_KEY: info.to_dict()}
    )
    _create_arrays(group, layout)
    log.debug("created remote store %s (no writer lock on object stores): %s", url, layout)
    return StoreWriter(url, group, info, None, rank, world_size, workers, max_pending)


def _mark_complete(group: zarr.Group, info: StoreInfo) -> StoreInfo:
    done = StoreInfo(
        layout=info.layout,
        meta=info.meta,
        complete=True,
        created=info.created,
        completed=_now(),
    )
    group.attrs[ATTRS_KEY] = done.to_dict()
    return done


_TABLE_TEMP = re.compile(r"^\.\d+\.\d+\.tmp$")  # what _table_temp names, and only that


def _table_temp(f: Path) -> Path:
    """The temporary name a table chunk file ``f`` is written under, then renamed from: the
    thread's id keeps two writer threads apart."""
    return f.with_name(f".{f.name}.{threading.get_ident()}.tmp")


def _sweep_table_temps(root: Path) -> int:
    """Remove the temporary files a killed writer can leave in a local store's table folders
    (a table chunk is written to ``.KEY.THREAD.tmp`` and renamed into place; readers never
    open those names). Called when the store is marked complete, when no writer is left.
    Returns how many were removed."""
    removed = 0
    for name in (LABELS, LABEL_CRC, CHUNK_CRC):
        folder = root / name / "c"
        if not folder.is_dir():
            continue
        for f in folder.rglob(".*.tmp"):
            if f.is_file() and _TABLE_TEMP.match(f.name):
                f.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info(
            "%s: removed %d temporary table file(s) left by an interrupted writer", root, removed
        )
    return removed


def finalize(path: str | os.PathLike[str]) -> None:
    """Mark a store written by several ranks complete; raises StoreIncompleteError listing the
    missing ranges if some rank did not finish."""
    _check_path(path)
    local = _zarr.as_local(path)
    if local is not None and local.exists() and not (local / "zarr.json").is_file():
        # a file here made zarr raise FileExistsError, a folder without a store "no store"
        raise NotAStoreError(
            f"{local}: not an activation store (no zarr.json); nothing to finalize"
        )
    try:
        group = _zarr.open_group(path, mode="r+")
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path}: no store to finalize") from None
    except ImportError as e:
        raise NotAStoreError(missing_backend(os.fspath(path), e)) from None
    except ValueError as e:  # a damaged zarr.json (JSONDecodeError), a zarr array
        raise NotAStoreError(f"{path}: not a zarr v3 group: {e!r}") from e
    d = _zarr.read_info_dict(group)
    if d is None:
        raise NotAStoreError(f"{path}: not an activation store")
    info = StoreInfo.from_dict(d, os.fspath(path))
    arrays = _zarr.check_arrays(group, info.layout, os.fspath(path), info.complete)
    crcs = _zarr.read_table(arrays[CHUNK_CRC], os.fspath(path), _zarr.as_local(path))
    ranges = unwritten_ranges(crcs, info.layout)
    if ranges:
        raise StoreIncompleteError(
            f"{path}: cannot finalize, missing (view, start, stop) ranges {ranges[:10]}"
        )
    if not info.complete:
        local = _zarr.as_local(path)
        if local is not None:  # every rank has closed its writer: nothing writes here now
            _sweep_table_temps(local)
        _mark_complete(group, info)


def _open_chunk_file(f: Path, size: int) -> int:
    """A raw chunk file opened for writing (a descriptor), created at ``size`` bytes (holes
    read as the fill value 0) if it is new or of another size."""
    f.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _NoPreallocation(OSError):
    """A chunk file's blocks cannot be reserved ahead on this file system."""


class _RowMap:
    """Every chunk file of a raw local store mapped writable side by side (see ``store._mmap``)
    for ``write_rows``: view ``v`` is one array ``rows[v]`` (capacity, sample_bytes) uint8, so a
    shuffled batch is scattered with one numpy call. A chunk is mapped when a row first goes
    to it (the chunks a batch touches first, in parallel on the writer's row threads): its file is created at full size and preallocated (a full disk fails there, as an
    ``OSError``, never later as a fault inside a write to the map), then its pages are faulted
    in for writing in one call. Stores through the map land in the page cache exactly as
    ``pwrite`` does; nothing here is synced to disk."""

    def __init__(self, layout: StoreLayout, file_of: Any) -> None:
        self.layout = layout
        self.file_of = file_of
        self.chunk_bytes = layout.chunk_samples * layout.sample_bytes
        self.span = layout.num_chunks * self.chunk_bytes
        cap = layout.num_chunks * layout.chunk_samples
        self.region = _mmap.Region(
            layout.views * self.span, (layout.views, cap, layout.sample_bytes), "|u1", writable=True
        )
        self.rows = np.asarray(self.region)  # (views, capacity, sample_bytes) uint8
        self.mapped = np.zeros((layout.views, layout.num_chunks), dtype=bool)

    def ensure(self, view: int, chunks: np.ndarray, pool: ThreadPoolExecutor | None) -> None:
        """Map the chunks of ``view`` not mapped yet, several at a time on ``pool`` (faulting
        pages in is the kernel's work and scales with threads; every call releases the GIL).
        A chunk that fails stays unmapped (``_mmap.map_chunks``)."""
        _mmap.map_chunks(
            view, chunks[~self.mapped[view, chunks]].tolist(), self._map, self.mapped, pool
        )

    def _map(self, view: int, chunk: int) -> None:
        f = self.file_of(view, chunk)
        fd = _open_chunk_file(f, self.chunk_bytes)
        try:
            try:
                os.posix_fallocate(fd, 0, self.chunk_bytes)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise _NoPreallocation(e.errno, f"{f}: {e.strerror}") from None
                raise
            offset = view * self.span + chunk * self.chunk_bytes
            self.region.map_file(offset, self.chunk_bytes, fd, writable=True)
        finally:
            os.close(fd)
        self.region.populate_write(offset, self.chunk_bytes)


class StoreWriter:
    """Writes batches into a store; use as a context manager (see ``create``)."""

    def __init__(
        self,
        root: Path | str,
        group: zarr.Group,
        info: StoreInfo,
        lock: _DirLock | None,
        rank: int,
        world_size: int,
        workers: int,
        max_pending: int | None,
    ) -> None:
        self.path = root
        self.layout = info.layout
        self._group = group
        self._info = info
        self._lock = lock
        self.rank = rank
        self.world_size = world_size
        self._acts = _zarr.writable(_zarr.array(group, ACTIVATIONS))
        self._labels_arr = _zarr.writable(_zarr.array(group, LABELS))
        self._crc_arr = _zarr.writable(_zarr.array(group, CHUNK_CRC))
        self._label_crc_arr = _zarr.writable(_zarr.array(group, LABEL_CRC))
        # Local stores: the labels and CRC tables' chunks are plain files written directly.
        # Raw local stores: so is every activation chunk (the chunk's bytes, what a memory
        # map reads), and ``write_rows`` writes samples in place. None for compressed or
        # remote stores.
        self._local_root = root if isinstance(root, Path) else None
        self._raw_root = self._local_root if info.layout.codec is None else None
        # read from their chunk files where local, as a reader does (a damaged one is named)
        where = os.fspath(root)
        self._done = _zarr.read_table(self._crc_arr, where, self._local_root) >= 0
        # Chunks handed to the pool (set on the caller's thread; ``_done`` only once stored):
        # a later write of one of them is skipped, never raced with its store and checksum.
        self._submitted = self._done.copy()
        # -1 = not yet given
        self._labels = _zarr.read_int64(self._labels_arr, where, self._local_root)
        self._buffers: dict[tuple[int, int], _ChunkBuffer] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="store-writer"
        )
        self._max_pending = max_pending if max_pending is not None else 2 * max(1, workers)
        self._pending: deque[Future[None]] = deque()
        # The first background failure; reported (raised) once, after which every write
        # is refused and close() leaves the store incomplete without raising again.
        self._error: BaseException | None = None
        self._error_reported = False
        self._state_lock = threading.Lock()
        self._closed = False
        self.chunks_written = 0
        # values that are not finite in the chunks written: (inf, NaN, chunks holding some);
        # stored as given, said once at close
        self.nonfinite = (0, 0, 0)
        self._mode: str | None = (
            None  # 'batches' (write) or 'rows' (write_rows), fixed by the first call
        )
        self._row_filled: np.ndarray | None = None  # (views, N) bool, rows given so far
        self._row_counts: np.ndarray | None = None  # (views, num_chunks) int64
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()  # open chunk files
        self._workers = max(1, workers)
        self._row_pool: ThreadPoolExecutor | None = None  # parallel writes of shuffled rows
        # write_rows scatters a batch into all chunk files mapped side by side (one numpy call
        # that releases the GIL) where the chunks are whole pages; else one pwrite per run
        self._map_rows = self._raw_root is not None and _mmap.usable(
            info.layout.chunk_samples * info.layout.sample_bytes,
            info.layout.views * info.layout.num_chunks,
        )
        self._row_map: _RowMap | None = None
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._fd_capacity = max(8, soft // 8)
        missing = self.missing
        if info.complete:
            log.info("store %s is already complete", root)
        elif self._done.any():
            log.info("resuming store %s; missing (view, start, stop): %s", root, missing)

    # ---- what is left -------------------------------------------------------------------
    def _owned(self, chunk: int) -> bool:
        return chunk % self.world_size == self.rank

    @property
    def missing(self) -> list[tuple[int, int, int]]:
        """Merged (view, start, stop) sample ranges this writer still has to write."""
        pairs = [
            (v, c)
            for v in range(self.layout.views)
            for c in range(self.layout.num_chunks)
            if not self._done[v, c] and self._owned(c)
        ]
        return merge_ranges(pairs, self.layout)

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    # ---- failures -----------------------------------------------------------------------
    def _record_error(self, exc: BaseException) -> None:
        """Keep the first background failure, raised once (``_raise_once``) or logged once
        (``abort``); later ones are its echoes (the same full disk) and are dropped."""
        with self._state_lock:
            if self._error is None:
                self._error = exc

    def _collect(self, block: bool) -> None:
        """Retire finished background writes (all of them when ``block``), keeping a failure."""
        while self._pending and (block or self._pending[0].done()):
            fut = self._pending.popleft()
            try:
                fut.result()
            except BaseException as e:
                self._record_error(e)

    def _raise_once(self) -> None:
        """Raise the recorded failure as ``StoreWriteError`` the first time only."""
        if self._error is None or self._error_reported:
            return
        self._error_reported = True
        raise StoreWriteError(
            f"{self.path}: a background chunk write failed: {self._error!r}; the store is left "
            "incomplete"
        ) from self._error

    def _raise_pending_error(self) -> None:
        self._collect(block=False)
        if self._error is not None and self._error_reported:
            raise StoreWriteError(
                f"{self.path}: this writer failed earlier ({self._error!r}, already raised); "
                "it takes no more writes"
            )
        self._raise_once()

    # ---- writing ------------------------------------------------------------------------
    def _set_mode(self, mode: str) -> None:
        if self._mode is None:
            self._mode = mode
        elif self._mode != mode:
            raise StoreInputError(
                f"{self.path}: this writer takes {'write()' if self._mode == 'batches' else 'write_rows()'} "
                "calls; one writer does not mix write() and write_rows()"
            )

    def _agree_labels(self, rows: np.ndarray, lab: np.ndarray) -> None:
        seen = self._labels[rows]
        clash = (seen >= 0) & (seen != lab)
        if clash.any():
            k = int(np.nonzero(clash)[0][0])
            raise StoreInputError(
                f"{self.path}: field 'labels': sample {int(rows[k])} got label {lab[k]}, earlier {seen[k]}"
            )
        self._labels[rows] = lab

    def write(
        self,
        view: int,
        start: int,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Write samples ``start .. start + len(x)`` of ``view``; x is (B, *sample_shape), any
        float dtype, any device. Labels (B,) must have been given for every sample by the time
        its view-0 chunk is full; giving them again with other views is checked for agreement."""
        if self._closed:
            raise StoreError(f"{self.path}: write() after close()")
        self._raise_pending_error()
        lay = self.layout
        view, start, n = check_write(
            f"{self.path}: ", lay.views, lay.num_samples, lay.sample_shape, view, start, x
        )
        self._set_mode("batches")
        first, last = start // lay.chunk_samples, (start + n - 1) // lay.chunk_samples
        for c in range(first, last + 1):
            if not self._owned(c):
                raise StoreInputError(
                    f"{self.path}: chunk {c} (samples {lay.chunk_range(c)}) belongs to rank "
                    f"{c % self.world_size}, this writer is rank {self.rank} of {self.world_size}"
                )
        if labels is not None:
            self._agree_labels(
                np.arange(start, start + n), check_labels(f"{self.path}: ", labels, n)
            )
        if view == 0:  # refused before any chunk is touched, so the batch can be given again
            for c in range(first, last + 1):
                if not self._submitted[view, c] and self._completes(view, c, start, start + n):
                    self._check_chunk_labels(c)
        data = to_stored_numpy(x, lay)
        for c in range(first, last + 1):
            if self._submitted[view, c]:
                continue  # already stored or on its way (resume, or the same chunk written twice)
            c0, c1 = lay.chunk_range(c)
            s0, s1 = max(c0, start), min(c1, start + n)
            buf = self._buffers.get((view, c))
            if buf is None:
                buf = _ChunkBuffer(
                    np.empty((c1 - c0, *lay.sample_shape), dtype=lay.np_dtype),
                    np.zeros(c1 - c0, dtype=bool),
                )
                self._buffers[(view, c)] = buf
            buf.data[s0 - c0 : s1 - c0] = data[s0 - start : s1 - start]
            buf.filled[s0 - c0 : s1 - c0] = True
            if buf.full:
                del self._buffers[(view, c)]
                self._submit(view, c, buf.data)

    def _completes(self, view: int, chunk: int, start: int, stop: int) -> bool:
        """Whether samples ``start .. stop`` fill ``chunk`` of ``view`` with those buffered."""
        c0, c1 = self.layout.chunk_range(chunk)
        s0, s1 = max(c0, start), min(c1, stop)
        buf = self._buffers.get((view, chunk))
        if buf is None:
            return s0 == c0 and s1 == c1
        return bool(buf.filled[: s0 - c0].all() and buf.filled[s1 - c0 :].all())

    def set_meta(self, meta: Mapping[str, Any] | None) -> None:
        """Replace the store's provenance while none of its chunks is written yet: a writer
        created ahead of its data (see ``prepare_rows``) is told what produced the data when
        the writing starts. Single writer only."""
        if self._closed:
            raise StoreError(f"{self.path}: set_meta() after close()")
        if (
            self.world_size != 1
            or self._mode is not None  # set by the first write: its chunks may be in flight
            or self._done.any()
            or self._buffers
            or self._row_filled is not None
        ):
            raise StoreError(
                f"{self.path}: set_meta() only before anything is written, by a single writer"
            )
        info = dataclasses.replace(self._info, meta=json_meta(meta, f"{self.path}: "))
        self._group.attrs[ATTRS_KEY] = info.to_dict()
        self._info = info

    # ---- writing samples in place (write-through) ------------------------------------------
    @property
    def supports_rows(self) -> bool:
        """Whether ``write_rows`` works here: raw (uncompressed) local stores of one writer."""
        return self._raw_root is not None and self.world_size == 1

    def _check_rows(self, call: str) -> None:
        """Refuse ``call`` (a rows method) on a closed writer or a store that takes no rows."""
        if self._closed:
            raise StoreError(f"{self.path}: {call}() after close()")
        if not self.supports_rows:
            raise StoreInputError(
                f"{self.path}: {call}() needs a raw (uncompressed) local store of one writer; "
                f"this one has codec {self.layout.codec!r}, world size {self.world_size}"
            )

    def write_rows(
        self,
        view: int,
        rows: np.ndarray | torch.Tensor | Any,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Write sample ``rows[k]`` of ``view`` from ``x[k]``, in any order (a shuffled batch).

        The samples go straight into their chunk files (no chunk is held in memory); a chunk
        whose samples have all arrived is checksummed from its file on the pool and only then
        gets its CRC marker, so a writer that dies leaves those chunks unwritten. A sample
        given twice before its chunk completes is simply overwritten; rows in a chunk that is
        already complete are skipped (resume). Raw local stores only (``supports_rows``)."""
        self._check_rows("write_rows")
        self._raise_pending_error()
        lay = self.layout
        r = np.asarray(rows.detach().cpu() if isinstance(rows, torch.Tensor) else rows)
        if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise StoreInputError(f"{self.path}: field 'rows' must be a 1-D array of integers")
        # no samples (x[:0]): the rows are checked below; a list has no shape, refused here
        none = x[:0] if hasattr(x, "shape") else x
        view, _, _ = check_write(
            f"{self.path}: ", lay.views, lay.num_samples, lay.sample_shape, view, 0, none
        )
        n = int(x.shape[0])
        if len(r) != n:
            raise StoreInputError(f"{self.path}: {len(r)} rows for {n} samples")
        if n and (r.min() < 0 or r.max() >= lay.num_samples):
            bad = r[(r < 0) | (r >= lay.num_samples)][0]
            raise StoreInputError(
                f"{self.path}: field 'rows': sample {int(bad)} outside [0, {lay.num_samples})"
            )
        # checked first: an unsigned row of 2**64 - 1 wrapped to -1 and was named so
        r = r.astype(np.int64, copy=False)
        self._set_mode("rows")
        if self._row_filled is None:
            self._row_filled = np.zeros((lay.views, lay.num_samples), dtype=bool)
            self._row_counts = np.zeros((lay.views, lay.num_chunks), dtype=np.int64)
        if labels is not None:
            self._agree_labels(r, check_labels(f"{self.path}: ", labels, n))
        if n == 0:
            return
        data = to_stored_numpy(x, lay).reshape(n, -1).view(np.uint8)  # (n, sample_bytes)
        cs = lay.chunk_samples
        chunk_of = r // cs
        keep = ~self._submitted[view, chunk_of]  # a chunk handed to the pool is not touched again
        if not keep.any():
            return
        filled = self._row_filled[view]
        rk = r[keep]
        fresh = np.unique(rk[~filled[rk]])
        counts = self._row_counts[view]  # type: ignore[index]
        touched, arrived = np.unique(fresh // cs, return_counts=True)
        # a chunk holds chunk_samples samples, the last one what is left
        sizes = np.minimum(cs, lay.num_samples - touched * cs)
        completed = touched[counts[touched] + arrived == sizes]  # the chunks this batch completes
        if view == 0:  # refused before any row is written, so the batch can be given again
            for c in completed.tolist():
                self._check_chunk_labels(c)
        try:
            if not (self._map_rows and self._scatter_rows(view, r, chunk_of, data, keep)):
                self._pwrite_rows(view, r, chunk_of, data, keep)
        except OSError as e:  # a full disk, a file that cannot be created or mapped
            raise StoreWriteError(f"{self.path}: writing rows of view {view} failed: {e}") from e
        filled[fresh] = True
        counts[touched] += arrived
        for c in completed.tolist():
            self._close_fd(view, c)
            self._submit(view, c, None)

    def _rows_parallel(self, jobs: int) -> ThreadPoolExecutor | None:
        """The pool for splitting one batch's ``jobs`` writes or chunk maps (None: do them on
        the calling thread: one worker, or too few jobs to pay for the hand-off)."""
        if self._workers < 2 or jobs < 2:
            return None
        if self._row_pool is None:
            self._row_pool = ThreadPoolExecutor(self._workers, thread_name_prefix="store-rows")
        return self._row_pool

    def _scatter_rows(
        self, view: int, r: np.ndarray, chunk_of: np.ndarray, data: np.ndarray, keep: np.ndarray
    ) -> bool:
        """Rows ``r[keep]`` (in chunks ``chunk_of[keep]``) into the side-by-side map of the chunk
        files: the chunks touched are mapped (and their pages faulted in) first, then the batch
        is one numpy scatter per thread. False where the chunk files cannot be preallocated here (the caller writes
        with pwrite instead, and so does every later call)."""
        rows, src = (r, data) if keep.all() else (r[keep], data[keep])  # no copy of a batch
        if np.unique(rows).size != rows.size:  # a sample given twice: its last row wins
            _, first_in_reversed = np.unique(rows[::-1], return_index=True)
            last = rows.size - 1 - first_in_reversed
            rows, src = rows[last], src[last]
        if not self._map_chunks(view, np.unique(chunk_of[keep])) or self._row_map is None:
            return False
        dst = self._row_map.rows[view]  # (capacity, sample_bytes) uint8
        # parts of at least MIN_PART_BYTES: a smaller one costs more to hand to a thread
        k = _layout.part_count(src.nbytes, self._workers)
        pool = self._rows_parallel(k) if rows.size >= 64 else None
        if pool is None:
            dst[rows] = src
        else:
            parts = [(rows[i::k], src[i::k]) for i in range(k)]
            for f in [pool.submit(dst.__setitem__, ri, si) for ri, si in parts]:
                f.result()
        return True

    def _map_chunks(self, view: int, chunks: np.ndarray) -> bool:
        """Map ``chunks`` of ``view`` into the row map (those not mapped yet; their pages
        faulted in). False where chunk files cannot be preallocated here, or the map's
        address space cannot be reserved (a limit on it: ``ulimit -v``): rows then go by
        pwrite, in this call and every later one."""
        if self._row_map is None:
            try:
                self._row_map = _RowMap(self.layout, self._raw_file)
            except OSError as e:
                log.debug("%s: no row map (%s); rows go by pwrite", self.path, e)
                self._map_rows = False
                return False
        try:
            self._row_map.ensure(view, chunks, self._rows_parallel(chunks.size))
        except _NoPreallocation as e:
            if self._row_map.mapped.any():
                raise
            log.debug(
                "%s: chunk files cannot be preallocated here (%s); rows go by pwrite", self.path, e
            )
            self._map_rows = False
            self._row_map = None
            return False
        return True

    def prepare_rows(self) -> bool:
        """Map the files of every chunk still to write for ``write_rows`` and fault their pages
        in now, several chunks at a time on the row threads, so that the rows written later
        are copies only. Faulting in is the kernel's work and most of a shuffled row write's
        time (``benchmarks/bench_feed.py``): a writer created ahead of its writes can pay it
        early, for instance on a thread while a GPU trains. Not to be called while
        ``write_rows`` runs on another thread. False where rows go by pwrite (nothing to
        prepare); a full disk raises ``StoreWriteError``, as a write would."""
        self._check_rows("prepare_rows")
        if not self._map_rows:
            return False
        try:
            for view in range(self.layout.views):
                if not self._map_chunks(view, np.flatnonzero(~self._submitted[view])):
                    return False
        except OSError as e:
            raise StoreWriteError(f"{self.path}: preparing rows failed: {e}") from e
        return True

    def _pwrite_rows(
        self, view: int, r: np.ndarray, chunk_of: np.ndarray, data: np.ndarray, keep: np.ndarray
    ) -> None:
        """Rows ``r[keep]`` with one pwrite per run of consecutive samples in a chunk."""
        lay = self.layout
        cs, sb = lay.chunk_samples, lay.sample_bytes
        order = np.argsort(r, kind="stable")
        order = order[keep[order]]
        # runs of consecutive samples in one chunk: one pwrite each
        rs, cs_of = r[order], chunk_of[order]
        breaks = np.flatnonzero((np.diff(rs) != 1) | (np.diff(cs_of) != 0)) + 1
        runs = np.split(np.arange(order.size), breaks)
        touched = np.unique(cs_of)
        jobs = []
        parallel = len(runs) >= 64 and 2 * len(touched) <= self._fd_capacity
        pool = self._rows_parallel(len(runs)) if parallel else None
        if pool is not None:  # opened first: each stays open while the threads write
            for c in touched.tolist():
                self._chunk_fd(view, c)
        for run in runs:
            c = int(cs_of[run[0]])
            fd = self._chunk_fd(view, c) if pool is None else self._fds[(view, c)]
            src = data[order[run]] if run.size > 1 else data[order[run[0]]]
            jobs.append((fd, src, (int(rs[run[0]]) - c * cs) * sb))
        if pool is not None:
            k = self._workers
            for f in [pool.submit(_pwrite_all, jobs[i::k]) for i in range(k)]:
                f.result()
        else:
            _pwrite_all(jobs)

    def _chunk_fd(self, view: int, chunk: int) -> int:
        """The open chunk file, created at its full size (an edge chunk padded with the fill
        value 0, as zarr stores it) on first use; at most ``_fd_capacity`` stay open."""
        key = (view, chunk)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = _open_chunk_file(
            self._raw_file(view, chunk), self.layout.chunk_samples * self.layout.sample_bytes
        )
        self._fds[key] = fd
        while len(self._fds) > self._fd_capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _close_fd(self, view: int, chunk: int) -> None:
        fd = self._fds.pop((view, chunk), None)
        if fd is not None:
            os.close(fd)

    def _close_fds(self) -> None:
        if self._row_pool is not None:
            self._row_pool.shutdown(wait=True)
            self._row_pool = None
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def _check_chunk_labels(self, chunk: int) -> np.ndarray:
        """The labels of a full chunk (a copy); ``StoreInputError`` where some were never given."""
        c0, c1 = self.layout.chunk_range(chunk)
        labels = self._labels[c0:c1].copy()
        if (labels < 0).any():
            raise StoreInputError(
                f"{self.path}: chunk {chunk} of view 0 is full but some labels were never given"
            )
        return labels

    def _submit(self, view: int, chunk: int, data: np.ndarray | None) -> None:
        labels = None
        if view == 0:
            labels = self._check_chunk_labels(chunk)
        while len(self._pending) >= self._max_pending:  # back-pressure: bounded memory
            wait([self._pending[0]])
            self._raise_pending_error()
        self._pending.append(self._pool.submit(self._store_chunk, view, chunk, data, labels))
        self._submitted[view, chunk] = True

    def _store_chunk(
        self, view: int, chunk: int, data: np.ndarray | None, labels: np.ndarray | None
    ) -> None:
        """On a pool thread: data (None: already in its file, written in place), then labels
        and their CRC (view 0), then the marker."""
        if self._error is not None:
            return  # an earlier chunk failed (a full disk): do not pile up more failures
        c0, c1 = self.layout.chunk_range(chunk)
        if data is None:
            raw = self._read_raw(view, chunk)[: c1 - c0]
            crc = chunk_crc(raw)
            inf, nan = count_nonfinite(raw, self.layout.dtype)
        else:
            crc = chunk_crc(data)
            inf, nan = count_nonfinite(data, self.layout.dtype)
            self._write_activations(view, chunk, data)
        if labels is not None:
            self._put_table(LABELS, (chunk,), labels, self._labels_arr, slice(c0, c1), -1)
            lcrc = np.array([chunk_crc(labels)], dtype=np.int64)
            self._put_table(LABEL_CRC, (chunk,), lcrc, self._label_crc_arr, chunk)
        # The marker goes last: a chunk with a CRC entry is fully on disk.
        marker = np.array([crc], dtype=np.int64)
        self._put_table(CHUNK_CRC, (view, chunk), marker, self._crc_arr, (view, chunk))
        with self._state_lock:
            self._done[view, chunk] = True
            self.chunks_written += 1
            if inf or nan:
                i, n, k = self.nonfinite
                self.nonfinite = (i + inf, n + nan, k + 1)

    def _put_table(
        self,
        name: str,
        key: tuple[int, ...],
        values: np.ndarray,
        arr: zarr.Array,
        index: Any,
        fill: int | None = None,
    ) -> None:
        """One chunk of an int64 table (labels, a CRC entry): in a local store the chunk file
        itself, the bytes zarr would store (little-endian, uncompressed, padded to the chunk
        with ``fill``), written to a temporary name and renamed, so the file is whole or
        absent; through zarr elsewhere. A zarr write of a chunk this small costs about 0.7 ms
        of Python, several times the chunk's checksum."""
        if self._local_root is None:
            arr[index] = values if values.size > 1 else values.reshape(-1)[0]
            return
        data = np.asarray(values, dtype="<i8").reshape(-1)
        size = math.prod(arr.chunks)
        if data.size < size:
            data = np.concatenate([data, np.full(size - data.size, fill, dtype="<i8")])
        f = _zarr.chunk_file(self._local_root, name, key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = _table_temp(f)
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, f)

    def _raw_file(self, view: int, chunk: int) -> Path:
        if self._raw_root is None:  # only raw local stores write chunk files directly
            raise StoreError(f"{self.path}: not a raw local store")
        return _zarr.chunk_file(
            self._raw_root, ACTIVATIONS, (view, chunk, *([0] * len(self.layout.sample_shape)))
        )

    def _read_raw(self, view: int, chunk: int) -> np.ndarray:
        """A raw chunk file's samples as written, (chunk_samples, *sample_shape): from the
        row map where the chunk is mapped (no copy), else read from its file."""
        shape = (self.layout.chunk_samples, *self.layout.sample_shape)
        rm = self._row_map
        if rm is not None and rm.mapped[view, chunk]:
            c0 = chunk * self.layout.chunk_samples
            rows = rm.rows[view, c0 : c0 + self.layout.chunk_samples]
            return rows.view(self.layout.np_dtype).reshape(shape)
        raw = self._raw_file(view, chunk).read_bytes()
        return np.frombuffer(raw, dtype=self.layout.np_dtype).reshape(shape)

    def _write_activations(self, view: int, chunk: int, data: np.ndarray) -> None:
        """Store one chunk's samples, (chunk_len, *sample_shape) stored dtype. A raw local
        chunk is written as a plain file of its bytes (an edge chunk padded with the fill
        value), which is what zarr itself stores; other stores go through zarr."""
        c0, c1 = self.layout.chunk_range(chunk)
        if self._raw_root is None:
            self._acts[view, c0:c1] = data
            return
        f = self._raw_file(view, chunk)
        f.parent.mkdir(parents=True, exist_ok=True)
        pad = (self.layout.chunk_samples - (c1 - c0)) * self.layout.sample_bytes
        with open(f, "wb") as fh:
            fh.write(np.ascontiguousarray(data).data)
            if pad:
                fh.write(bytes(pad))

    # ---- finishing ----------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every finished chunk is on disk; raise a background failure that was not
        raised yet."""
        self._collect(block=True)
        self._raise_once()

    def close(self) -> None:
        """Flush, and mark the store complete when every chunk is written (single writer). A
        writer whose background write failed leaves the store incomplete."""
        if self._closed:
            return
        try:
            self.flush()
            if self._error is not None:
                return  # already raised; the store stays incomplete and resumable
            inf, nan, chunks = self.nonfinite
            if inf or nan:
                log.warning(
                    "%s: %d value(s) written are not finite (%d inf, %d NaN) in %d chunk(s); "
                    "they are stored as given%s; 'python -m store stats' counts them per channel",
                    self.path,
                    inf + nan,
                    inf,
                    nan,
                    chunks,
                    " (a float16 store rounds values beyond 65504 to inf)"
                    if self.layout.dtype == "float16" and inf
                    else "",
                )
            if self._row_counts is not None:
                partial_rows = np.argwhere((self._row_counts > 0) & ~self._done)
                if len(partial_rows):
                    log.warning(
                        "%s: %d chunk(s) whose rows did not all arrive stay unwritten "
                        "(view, chunk): %s",
                        self.path,
                        len(partial_rows),
                        [tuple(map(int, p)) for p in partial_rows[:8]],
                    )
            if self._buffers:
                partial = sorted(self._buffers)
                log.warning(
                    "%s: %d chunk(s) only partly written were dropped (view, chunk): %s",
                    self.path,
                    len(partial),
                    partial[:8],
                )
            if self.world_size == 1 and self.complete and not self._info.complete:
                if self._local_root is not None:
                    _sweep_table_temps(self._local_root)
                try:
                    self._info = _mark_complete(self._group, self._info)
                except OSError as e:  # a full disk: the record is whole or the old one
                    raise StoreWriteError(
                        f"{self.path}: marking the store complete failed: {e}; the store is "
                        "left incomplete"
                    ) from e
                log.debug("store %s complete (%d chunks written)", self.path, self.chunks_written)
            elif self.world_size == 1 and not self.complete:
                log.warning("store %s left incomplete; missing %s", self.path, self.missing[:8])
        finally:
            self._closed = True
            self._close_fds()
            self._pool.shutdown(wait=True)
            if self._row_map is not None:
                # unmapping every faulted page of a store (~0.1 s a GB) is the kernel's work:
                # a short-lived thread drops the map (the last reference), so the caller, the
                # training thread in write-through, does not wait for it. The rows are in the
                # page cache already and nothing reads through this map again.
                held = [self._row_map]
                self._row_map = None
                threading.Thread(target=held.clear, name="store-unmap", daemon=True).start()
            if self._lock is not None:
                self._lock.release()

    def abort(self) -> None:
        """Stop without marking complete; chunks already handed to the pool are finished (a
        failure among them is logged once, never raised: the caller is already failing)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close_fds()
            self._collect(block=True)
            if self._error is not None and not self._error_reported:
                self._error_reported = True
                log.error(
                    "%s: a background chunk write failed: %r; the store is left incomplete",
                    self.path,
                    self._error,
                )
        finally:
            self._pool.shutdown(wait=True)
            self._row_map = None
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._lock is not None:
            self._lock.release()


__all__ = ["StoreWriter", "create", "finalize", "to_stored_numpy"]
