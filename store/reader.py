"""Opening and reading an activation store.

Raw (uncompressed) local stores are read through ``numpy.memmap`` over the chunk files: an
uncompressed Zarr v3 chunk file is the raw little-endian array, so a random gather costs a
memory copy, never a per-sample zarr call. Compressed stores are read a whole chunk at a time
through zarr (see ``store.sampling`` for the streaming order that keeps a buffer of chunks).
Statistics, pictures, checks and comparisons of a store are functions in ``store.tools``
(``store.stats(s)``, ``store.show(s, i)``, ``store.verify(s)``, ``store.diff(a, b)``).

Integrity: ``open`` checks the record's checksum and its agreement with the arrays' own
metadata, and loads the CRC tables once. Every chunk is then checked against the table when it
is first read in the process: a memory-mapped chunk when it is mapped (over all its samples;
a map stays open, so later reads cost nothing), a decoded chunk on every decode (the CRC costs
far less than the decode); labels when they are loaded. A mismatch raises
``StoreCorruptError`` naming the chunk's file, view and samples. Because the tables are the
ones loaded at open and an open map pins the file it maps, a reader whose store is replaced
under it (``create(..., overwrite=True)`` in another process) reads the old store's values or
gets ``StoreCorruptError``, never the new store's values.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from store import _mmap, _zarr
from store.errors import (
    NotAStoreError,
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreInputError,
    StoreNotFoundError,
    check_bool,
    check_int,
    shown,
)
from store.layout import (
    ACTIVATIONS,
    ATTRS_KEY,
    CHUNK_CRC,
    LABEL_CRC,
    LABELS,
    StoreInfo,
    StoreLayout,
    chunk_crc,
    unwritten_ranges,
)
from store.location import missing_backend

log = logging.getLogger(__name__)


def as_tensor(a: np.ndarray, layout: StoreLayout) -> torch.Tensor:
    """Stored-dtype numpy array -> torch tensor sharing its memory (bfloat16 from uint16 words)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if layout.dtype == "bfloat16" else t


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor in a stored dtype as a numpy array sharing its memory."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def check_gather(where: str, source: Any, views: Any, indices: Any, out: torch.Tensor) -> None:
    """The arguments of ``source.gather``: ``out`` (len, *sample_shape) in the stored dtype,
    integer ``views`` and ``indices`` of its length, each in range, else ``StoreInputError``
    (a negative one read from the end, a view past the last was numpy's IndexError, a
    negative view a store's missing chunk file; another dtype was cast, bfloat16's raw words
    to floats or floats to words)."""
    if not isinstance(out, torch.Tensor) or out.dim() < 1:
        raise StoreInputError(f"{where}gather: out must be a tensor, got {type(out).__name__}")
    shape, dtype, device = tuple(source.sample_shape), source.dtype, source.device
    if out.dtype != dtype or tuple(out.shape[1:]) != shape or out.device != device:
        raise StoreInputError(
            f"{where}gather: out must be (len, *{shape}) {dtype} on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    num_views, num_samples = source.views, source.num_samples
    n = len(out)
    for name, field, a, hi in (
        ("view", "views", views, num_views),
        ("sample index", "indices", indices, num_samples),
    ):
        a = np.asarray(a)
        if a.ndim != 1 or len(a) != n or (n and not np.issubdtype(a.dtype, np.integer)):
            raise StoreInputError(
                f"{where}gather: {field} must be {n} integers (one per sample of out), "
                f"got shape {a.shape} dtype {a.dtype}"
            )
        if n and (a.min() < 0 or a.max() >= hi):
            bad = a[(a < 0) | (a >= hi)][0]
            raise StoreInputError(f"{where}{name} {bad} out of range [0, {hi})")


def _samples(layout: StoreLayout, chunk: int) -> str:
    c0, c1 = layout.chunk_range(chunk)
    return f"samples {c0}..{c1 - 1}"


def _mismatch(where: Any, what: str, recorded: int, computed: int) -> StoreCorruptError:
    return StoreCorruptError(
        f"{where}: {what} fails its checksum (CRC-32C recorded {recorded:08x}, computed "
        f"{computed:08x}): the file was damaged, or the store was replaced since it was opened; "
        "run 'python -m store verify' and rebuild the store"
    )


def _open_raw_chunk(f: Path, name: str, chunk_bytes: int) -> tuple[int, os.stat_result]:
    """A raw chunk file opened read-only (a descriptor, and its ``fstat``), after checking that
    it exists and has the whole chunk's bytes; otherwise ``StoreCorruptError`` naming it."""
    try:
        fd = os.open(f, os.O_RDONLY)
    except FileNotFoundError:
        raise StoreCorruptError(f"{f}: {name} is marked written but its file is missing") from None
    st = os.fstat(fd)  # the file opened, even if the path is replaced now
    if st.st_size != chunk_bytes:
        os.close(fd)
        raise StoreCorruptError(
            f"{f}: {name} has {st.st_size} bytes, expected {chunk_bytes} (truncated or not a "
            "raw chunk); rebuild the store or resume it after deleting this file"
        )
    return fd, st


class _MemmapChunks:
    """Chunk files of one raw local array mapped on demand, with an LRU bound on open maps
    (each map holds a file descriptor). A chunk is CRC-checked when it is mapped; the file
    identity (device, inode, size, mtime, ctime) it was checked under is remembered, so a
    chunk mapped again after an eviction is checked again only if its file changed."""

    def __init__(
        self, root: Path, layout: StoreLayout, crcs: np.ndarray | None, where: str
    ) -> None:
        self.root = root
        self.layout = layout
        self.crcs = crcs  # (views, num_chunks) int64 from open; None: no checks
        self.where = where
        self.chunk_shape = (layout.chunk_samples, *layout.sample_shape)
        self.chunk_bytes = layout.chunk_samples * layout.sample_bytes
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.capacity = max(16, min(soft, _mmap.map_limit()) // 4)
        self._maps: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._checked: dict[tuple[int, int], tuple[int, ...]] = {}
        self._key_locks: dict[tuple[int, int], threading.Lock] = {}
        self._lock = threading.Lock()

    def file(self, view: int, chunk: int) -> Path:
        return _zarr.chunk_file(
            self.root, ACTIVATIONS, (view, chunk, *([0] * len(self.layout.sample_shape)))
        )

    def get(self, view: int, chunk: int) -> np.ndarray:
        """The whole chunk (chunk_samples, *sample_shape), mapped and checked."""
        key = (view, chunk)
        with self._lock:
            m = self._maps.get(key)
            if m is not None:
                self._maps.move_to_end(key)
                return m
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one thread maps and checks a chunk; the others wait for it
            with self._lock:
                m = self._maps.get(key)
            if m is None:
                m = self._map(view, chunk)
                with self._lock:
                    self._maps[key] = m
                    while len(self._maps) > self.capacity:
                        self._maps.popitem(last=False)
        return m

    def _map(self, view: int, chunk: int) -> np.ndarray:
        f = self.file(view, chunk)
        name = f"chunk (view {view}, chunk {chunk}, {_samples(self.layout, chunk)})"
        fd, st = _open_raw_chunk(f, name, self.chunk_bytes)
        with os.fdopen(fd, "rb") as fh:
            # A plain ndarray view of the map: indexing it skips np.memmap's slow __getitem__;
            # the view keeps the map alive through its base.
            m = np.memmap(fh, dtype=self.layout.np_dtype, mode="r", shape=self.chunk_shape).view(
                np.ndarray
            )
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        key = (view, chunk)
        if self.crcs is not None and self._checked.get(key) != ident:
            c0, c1 = self.layout.chunk_range(chunk)
            got = chunk_crc(m[: c1 - c0])  # reads the chunk once: ~16 GB/s, GIL released
            want = int(self.crcs[view, chunk])
            if got != want:
                raise _mismatch(f, name, want, got)
            self._checked[key] = ident
        return m

    def close(self) -> None:
        with self._lock:
            self._maps.clear()


# Threads that map and check a store's chunks when a read first touches several of them
# (half the cores, up to 8; one on a 2-core machine, where the cores train).
MAP_WORKERS = min(8, max(1, (os.cpu_count() or 1) // 2))


class _ContiguousMap:
    """Every chunk file of a raw local store mapped side by side into one reserved range of
    address space, so that view ``v`` is one array (samples, *sample_shape) and a shuffled
    batch is gathered with a single ``np.take`` (which releases the GIL: several threads gather
    parts of a batch in parallel). A chunk is mapped, and CRC-checked, when a read first
    touches it; a chunk never touched stays unmapped. Needs Linux and chunks whose byte size is
    a multiple of the page size (``usable``); otherwise the store uses ``_MemmapChunks``."""

    @staticmethod
    def usable(layout: StoreLayout) -> bool:
        return _mmap.usable(
            layout.chunk_samples * layout.sample_bytes, layout.views * layout.num_chunks
        )

    def __init__(self, files: _MemmapChunks, crcs: np.ndarray | None) -> None:
        lay = files.layout
        self.files = files
        self.layout = lay
        self.crcs = crcs
        self.chunk_bytes = lay.chunk_samples * lay.sample_bytes
        self.span = lay.num_chunks * self.chunk_bytes  # bytes of one view
        cap = lay.num_chunks * lay.chunk_samples
        self._region = _mmap.Region(
            lay.views * self.span,
            (lay.views, cap, *lay.sample_shape),
            np.dtype(lay.np_dtype).newbyteorder("<").str,
            writable=False,
        )
        self._all = np.asarray(self._region)  # (views, cap, *sample_shape), read-only by mapping
        self._ready = np.zeros((lay.views, lay.num_chunks), dtype=bool)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def view(self, view: int) -> np.ndarray:
        return self._all[view]

    def ensure(self, view: int, chunks: np.ndarray) -> None:
        """Map (and check) the chunks of ``view`` not mapped yet; they must be written.

        Several at once are mapped and checked on ``MAP_WORKERS`` threads (the checksum and
        the page faults it takes run without the GIL): a shuffled batch touches nearly every
        chunk, so the first batch read from a new store checks almost all of them."""
        todo = chunks[~self._ready[view, chunks]]
        if todo.size == 0:
            return
        with self._lock:
            todo = todo[~self._ready[view, todo]]  # another thread may have mapped some
            if todo.size > 1 and MAP_WORKERS > 1 and self._pool is None:
                self._pool = ThreadPoolExecutor(MAP_WORKERS, thread_name_prefix="store-map")
            _mmap.map_chunks(view, todo.tolist(), self._map, self._ready, self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _map(self, view: int, chunk: int) -> None:
        f = self.files.file(view, chunk)
        name = f"chunk (view {view}, chunk {chunk}, {_samples(self.layout, chunk)})"
        fd, _ = _open_raw_chunk(f, name, self.chunk_bytes)
        offset = view * self.span + chunk * self.chunk_bytes
        try:
            self._region.map_file(offset, self.chunk_bytes, fd, writable=False)
        except OSError as e:
            raise OSError(e.errno, f"{f}: cannot map {name}: {e.strerror}") from None
        finally:
            os.close(fd)
        if self.crcs is not None:
            c0, c1 = self.layout.chunk_range(chunk)
            got_crc = chunk_crc(self._all[view, c0:c1])
            want = int(self.crcs[view, chunk])
            if got_crc != want:
                # unmap again: a later read must not see the bad chunk as checked
                self._region.unmap(offset, self.chunk_bytes)
                raise _mismatch(f, name, want, got_crc)


def sample_indices(
    indices: Sequence[int] | np.ndarray | torch.Tensor, num_samples: int, where: str = ""
) -> np.ndarray:
    """``indices`` as int64 sample indices, each in ``[0, num_samples)``, else
    ``StoreInputError`` naming the first bad one (a float index would be truncated to another
    sample). Checked before the cast: a uint64 index beyond int64 wrapped to a negative one."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise StoreInputError(f"{where}indices must be a 1-D sequence of integers")
    if idx.size and (idx.min() < 0 or idx.max() >= num_samples):
        bad = idx[(idx < 0) | (idx >= num_samples)][0]
        raise StoreInputError(f"{where}sample index {int(bad)} out of range [0, {num_samples})")
    return idx.astype(np.int64, copy=False)


class ActivationStore:
    """A read-only view of a store. Use ``store.open(path)``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        group: zarr.Group,
        info: StoreInfo,
        arrays: dict[str, zarr.Array],
        crcs: np.ndarray,
        label_crcs: np.ndarray,
        checksums: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.info = info
        self.layout = info.layout
        self.checksums = checksums
        self._group = group
        self._acts = arrays[ACTIVATIONS]
        self._labels_arr = arrays[LABELS]
        self._crcs = crcs  # (views, num_chunks) int64, -1 = not written
        self._label_crcs = label_crcs  # (num_chunks,) int64, -1 = not written
        self._labels: torch.Tensor | None = None
        self._closed = False
        root = _zarr.as_local(path)
        self._local_root = root
        # a local store of Blosc frames: each chunk file's frame is checked before decoding
        self._check_frames = root is not None and _zarr.blosc_compressed(self._acts)
        self._mm = (
            _MemmapChunks(root, self.layout, crcs if checksums else None, self.path)
            if root is not None and self.layout.codec is None
            else None
        )
        self._cm: _ContiguousMap | None = None
        if self._mm is not None and _ContiguousMap.usable(self.layout):
            try:
                self._cm = _ContiguousMap(self._mm, crcs if checksums else None)
            except OSError as e:  # address space limited (ulimit -v): chunk by chunk maps
                log.debug("%s: chunks mapped one by one (%s)", self.path, e)

    # ---- description --------------------------------------------------------------------
    num_samples = property(lambda self: self.layout.num_samples)
    views = property(lambda self: self.layout.views)
    sample_shape = property(lambda self: self.layout.sample_shape)
    dtype = property(lambda self: self.layout.torch_dtype, doc="torch dtype of what read() returns")
    dtype_name = property(lambda self: self.layout.dtype)
    codec = property(lambda self: self.layout.codec)
    chunk_samples = property(lambda self: self.layout.chunk_samples)
    num_chunks = property(lambda self: self.layout.num_chunks)
    meta = property(lambda self: self.info.meta)
    complete = property(lambda self: self.info.complete)
    device = torch.device("cpu")

    @property
    def memory_mapped(self) -> bool:
        """True when reads go through numpy.memmap (raw codec, local path)."""
        return self._mm is not None

    @property
    def zarr_array(self) -> zarr.Array:
        """The ``activations`` array, for plain-zarr access: (views, samples, *sample_shape)."""
        return self._acts

    @property
    def labels(self) -> torch.Tensor:
        """int64 (num_samples,); -1 where a partial store has no label yet. Checked against
        the label CRCs when first loaded."""
        if self._labels is None:
            labels = self._read_labels()
            if self.checksums:
                bad = self._bad_label_chunks(labels)
                if bad:
                    c, want, got = bad[0]
                    raise _mismatch(
                        self.chunk_path(LABELS, c),
                        f"the labels of chunk {c} ({_samples(self.layout, c)})",
                        want,
                        got,
                    )
            self._labels = torch.from_numpy(labels)
        return self._labels

    def _read_labels(self) -> np.ndarray:
        return _zarr.read_int64(self._labels_arr, os.fspath(self.path), self._local_root)

    def _bad_label_chunks(self, labels: np.ndarray) -> list[tuple[int, int, int]]:
        """(chunk, recorded, computed) of every labelled chunk whose labels fail their CRC."""
        bad = []
        for c in np.flatnonzero(self._label_crcs >= 0).tolist():
            c0, c1 = self.layout.chunk_range(c)
            got = chunk_crc(labels[c0:c1])
            if got != int(self._label_crcs[c]):
                bad.append((c, int(self._label_crcs[c]), got))
        return bad

    def verify_labels(self) -> list[int]:
        """Read the labels afresh and return the chunks whose labels fail their CRC."""
        return [c for c, _, _ in self._bad_label_chunks(self._read_labels())]

    def chunk_path(self, array: str, chunk: int, view: int | None = None) -> str:
        """The file (local stores) or key under the store's URL of one chunk of ``array``
        (activations need ``view``)."""
        if array == ACTIVATIONS:
            key: tuple[int, ...] = (view or 0, chunk, *([0] * len(self.sample_shape)))
        else:
            key = (chunk,)
        if self._local_root is not None:
            return str(_zarr.chunk_file(self._local_root, array, key))
        return f"{self.path.rstrip('/')}/{array}/c/{'/'.join(map(str, key))}"

    def chunk_written(self, view: int, chunk: int) -> bool:
        view, chunk = self._check_chunk(view, chunk)
        return bool(self._crcs[view, chunk] >= 0)

    def missing_ranges(self) -> list[tuple[int, int, int]]:
        """Merged (view, start, stop) sample ranges whose chunks were never written."""
        return unwritten_ranges(self._crcs, self.layout)

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the activations."""
        return self.layout.raw_bytes

    def nbytes_stored(self, array: str | None = None) -> int:
        """Bytes on disk of all files of the store, or of one member array (``activations``,
        ``labels``, ``chunk_crc``, ``label_crc``; local stores), else -1."""
        members = (ACTIVATIONS, LABELS, CHUNK_CRC, LABEL_CRC)
        if array is not None and array not in members:
            # another name counted 0 bytes, or a folder outside the store ("..")
            raise StoreInputError(
                f"{self.path}: array must be one of {', '.join(members)} or None, got {shown(array)}"
            )
        if self._local_root is None:
            return -1
        total = 0
        top = self._local_root if array is None else self._local_root / array
        for dirpath, _, files in os.walk(top):
            for f in files:
                total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"ActivationStore({self.path!r}, views={lay.views}, samples={lay.num_samples}, "
            f"sample_shape={lay.sample_shape}, dtype={lay.dtype}, codec={lay.codec}, complete={self.complete})"
        )

    # ---- reading ------------------------------------------------------------------------
    def _check_view(self, view: int) -> int:
        """``view`` as a plain int (a 0-d tensor named a chunk file 'tensor(1)'), in range."""
        view = check_int(f"{self.path}: view", view)
        if not 0 <= view < self.views:
            raise StoreInputError(f"{self.path}: view {view} out of range [0, {self.views})")
        return view

    def _check_chunk_written(self, view: int, chunk: int) -> None:
        if self._crcs[view, chunk] < 0:
            c0, c1 = self.layout.chunk_range(chunk)
            raise StoreIncompleteError(
                f"{self.path}: chunk {chunk} of view {view} (samples {c0}..{c1 - 1}) was never written"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: read after close(); store.open(path) opens it again")

    def _check_chunk(self, view: int, chunk: int) -> tuple[int, int]:
        """A view and a chunk index in range (integers: a float or a bool is refused), as
        plain ints."""
        view = self._check_view(view)
        chunk = check_int(f"{self.path}: chunk", chunk)
        if not 0 <= chunk < self.num_chunks:
            raise StoreInputError(f"{self.path}: chunk {chunk} out of range [0, {self.num_chunks})")
        return view, chunk

    def _check_chunk_index(self, view: int, chunk: int) -> tuple[int, int]:
        self._check_open()
        view, chunk = self._check_chunk(view, chunk)
        self._check_chunk_written(view, chunk)
        return view, chunk

    def read_chunk(self, view: int, chunk: int) -> np.ndarray:
        """One whole chunk, (chunk_len, *sample_shape) in the stored numpy dtype, checked
        against its CRC (see the module's docstring)."""
        view, chunk = self._check_chunk_index(view, chunk)
        c0, c1 = self.layout.chunk_range(chunk)
        if self._cm is not None:
            self._cm.ensure(view, np.array([chunk]))
            return np.array(self._cm.view(view)[c0:c1])
        if self._mm is not None:
            return np.array(self._mm.get(view, chunk)[: c1 - c0])
        data = self._decode(view, chunk)
        if self.checksums:
            got, want = chunk_crc(data), int(self._crcs[view, chunk])
            if got != want:
                raise _mismatch(
                    self.chunk_path(ACTIVATIONS, chunk, view),
                    f"chunk (view {view}, chunk {chunk}, {_samples(self.layout, chunk)})",
                    want,
                    got,
                )
        return data

    def _decode(self, view: int, chunk: int) -> np.ndarray:
        """A chunk read through zarr, unchecked; a missing or undecodable one raises."""
        c0, c1 = self.layout.chunk_range(chunk)
        where = self.chunk_path(ACTIVATIONS, chunk, view)
        name = f"chunk (view {view}, chunk {chunk}, {_samples(self.layout, chunk)})"
        if self._check_frames:  # missing, or cut short: the decoder reads past a cut frame
            _zarr.check_blosc_frame(Path(where), name)
        elif self._local_root is not None and not Path(where).exists():
            # zarr would return the fill value for a missing chunk
            raise StoreCorruptError(f"{where}: {name} is marked written but its file is missing")
        try:
            return np.asarray(self._acts[view, c0:c1])
        except Exception as e:
            raise StoreCorruptError(f"{where}: {name} cannot be decoded: {e!r}") from e

    def verify_chunk(self, view: int, chunk: int) -> bool:
        """Read a chunk afresh from storage (never a cached map) and compare it with the CRC
        recorded when it was written. A missing, truncated or undecodable chunk raises
        ``StoreCorruptError``."""
        return self._verify_chunk(view, chunk)[0]

    def _verify_chunk(self, view: int, chunk: int) -> tuple[bool, np.ndarray]:
        """``verify_chunk``'s answer and the chunk's values it read, (chunk_len * prod(sample),)
        or (chunk_len, *sample) in the stored numpy dtype."""
        view, chunk = self._check_chunk_index(view, chunk)
        c0, c1 = self.layout.chunk_range(chunk)
        if self._mm is not None:
            f = self._mm.file(view, chunk)
            name = f"chunk (view {view}, chunk {chunk}, {_samples(self.layout, chunk)})"
            try:
                raw = f.read_bytes()
            except FileNotFoundError:
                raise StoreCorruptError(
                    f"{f}: {name} is marked written but its file is missing"
                ) from None
            if len(raw) != self._mm.chunk_bytes:
                raise StoreCorruptError(
                    f"{f}: {name} has {len(raw)} bytes, expected {self._mm.chunk_bytes} "
                    "(truncated or not a raw chunk)"
                )
            data = np.frombuffer(raw, dtype=self.layout.np_dtype)[
                : (c1 - c0) * int(np.prod(self.sample_shape))
            ]
        else:
            data = self._decode(view, chunk)
        return chunk_crc(data) == int(self._crcs[view, chunk]), data

    def _indices(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        return sample_indices(indices, self.num_samples, f"{self.path}: ")

    def read_into(
        self, view: int, indices: np.ndarray, out: np.ndarray, positions: np.ndarray | None = None
    ) -> None:
        """Gather samples ``indices`` of ``view`` into ``out[positions]`` (all of ``out`` when
        positions is None; stored numpy dtype), never through a per-sample zarr call.

        Memory-mapped with page-aligned chunks: one ``np.take`` over the side-by-side map of
        all chunks. Other memory-mapped stores: a shuffled batch touches nearly as many chunks
        as it has samples, so it is copied sample by sample from the mapped chunks (one small
        memcpy each); a batch concentrated in few chunks is copied one vectorised gather per
        chunk. Compressed: each chunk touched is decoded once."""
        self._check_open()
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            self._indices(indices)  # raises, naming the index
        cs = self.chunk_samples
        chunk_of = indices // cs
        touched = np.unique(chunk_of)
        unwritten = touched[self._crcs[view, touched] < 0]
        if unwritten.size:
            self._check_chunk_written(view, int(unwritten[0]))
        if self._cm is not None:
            self._cm.ensure(view, touched)
            src = self._cm.view(view)
            # mode="clip" on indices checked above: with out= and mode="raise" numpy gathers
            # into a temporary buffer and copies it again
            if positions is None:
                np.take(src, indices, axis=0, out=out, mode="clip")
            else:
                out[positions] = np.take(src, indices, axis=0, mode="clip")
            return
        offsets = indices - chunk_of * cs
        pos = np.arange(len(indices)) if positions is None else positions
        if self._mm is not None and 4 * len(touched) > len(indices):
            # the chunks held at once stay within the bound on open maps (each holds a file
            # descriptor): a batch over more chunks than that goes a part of them at a time
            step = max(1, self._mm.capacity // 2)
            for lo in range(0, len(touched), step):
                part = touched[lo : lo + step]
                maps = {int(c): self._mm.get(view, int(c)) for c in part}
                sel = (
                    slice(None)
                    if len(part) == len(touched)
                    else np.flatnonzero((chunk_of >= part[0]) & (chunk_of <= part[-1]))
                )
                ps, chunks, offs = pos[sel].tolist(), chunk_of[sel].tolist(), offsets[sel].tolist()
                for p, c, o in zip(ps, chunks, offs, strict=True):
                    out[p] = maps[c][o]
                del maps
            return
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            c = int(chunk_of[group[0]])
            src = self._mm.get(view, c) if self._mm is not None else self.read_chunk(view, c)
            out[pos[group]] = src[offsets[group]]

    def gather(self, views: np.ndarray, indices: np.ndarray, out: torch.Tensor) -> None:
        """Fill the CPU tensor ``out`` (len, *sample_shape) with sample indices[k] of view views[k]."""
        check_gather(f"{self.path}: ", self, views, indices, out)
        out_np = numpy_view(out)
        if self.views == 1 or (views == views[:1]).all():  # one view (or none: empty)
            self.read_into(int(views[0]) if len(views) else 0, indices, out_np)
            return
        for v in np.unique(views):
            pos = np.flatnonzero(views == v)
            self.read_into(int(v), indices[pos], out_np, positions=pos)

    def read(self, view: int, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Samples ``indices`` of ``view`` as a CPU tensor (len, *sample_shape) in the stored dtype."""
        view = self._check_view(view)
        idx = self._indices(indices)
        out = np.empty((len(idx), *self.sample_shape), dtype=self.layout.np_dtype)
        self.read_into(view, idx, out)
        return as_tensor(out, self.layout)

    def close(self) -> None:
        """Unmap the chunk files. Reads after it raise ``StoreError``; a second close is a
        no-op. ``with store.open(path) as s:`` closes at the block's end."""
        self._closed = True
        if self._mm is not None:
            self._mm.close()
        if self._cm is not None:
            self._cm.close()
        self._cm = None  # its address range is unmapped once no array over it is left

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- as a labelled array ------------------------------------------------------------
    def to_xarray(self) -> Any:
        """The activations as an ``xarray.DataArray`` (dims view, sample, channel, ...; labels
        as a coordinate), lazy through dask when dask is installed. Needs xarray, which is not
        a dependency; without it, use plain zarr: ``s.zarr_array`` or
        ``zarr.open_group(path)["activations"]``."""
        try:
            import xarray as xr
        except ImportError:
            raise ImportError(
                "to_xarray() needs xarray, which is not installed (nor a dependency of store); "
                "read the activations with plain zarr instead: s.zarr_array, or "
                f"zarr.open_group({self.path!r})['activations'] (shape (views, samples, *sample), "
                "bfloat16 stored as uint16 words)"
            ) from None
        try:
            import dask.array as da

            data: Any = da.from_zarr(self._acts)
        except ImportError:
            data = self._acts[...]
        extra = ["channel", "y", "x"] if len(self.sample_shape) == 3 else []
        dims = ["view", "sample", *(extra or [f"dim_{k}" for k in range(len(self.sample_shape))])]
        return xr.DataArray(
            data,
            dims=dims,
            coords={"label": ("sample", self.labels.numpy())},
            name=ACTIVATIONS,
            attrs={"store_dtype": self.dtype_name, "path": self.path},
        )


def check_opened(s: object, call: str) -> None:
    """Refuse what is not an opened store (a path, say) where ``call`` needs one."""
    if not isinstance(s, ActivationStore):
        raise StoreInputError(
            f"{call}() takes an opened store, got {type(s).__name__}: {call}(store.open(path))"
        )


def _stores_below(folder: Path, most: int = 4) -> str:
    """``; the stores in it: a/b, ...`` for a folder holding stores up to three levels down (a
    run folder, a cache folder, a checkpoint folder: what a user gives for the store in it),
    else ''. The nearest level that holds any is listed."""
    found: list[str] = []
    try:
        for depth in ("*", "*/*", "*/*/*"):
            for z in sorted(folder.glob(f"{depth}/zarr.json")):
                if z.is_file() and ATTRS_KEY in z.read_text(errors="replace"):
                    found.append(os.path.relpath(z.parent, folder))
            if found:
                break
    except OSError:
        return ""
    if not found:
        return ""
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return "; the stores in it: " + ", ".join(found[:most]) + more


def open(
    path: str | os.PathLike[str], *, partial: bool = False, checksums: bool = True
) -> ActivationStore:
    """Open a store read-only. An incomplete store raises ``StoreIncompleteError`` (listing the
    missing ranges) unless ``partial=True``; reading an unwritten chunk then raises.

    The record is always checked (its checksum, its fields, its agreement with the arrays);
    ``checksums=False`` skips the per-chunk and label CRC checks on read (for measuring what
    they cost; ``store.verify`` still checks everything)."""
    partial = check_bool("partial", partial)
    checksums = check_bool("checksums", checksums)
    local = _zarr.as_local(path)
    if local is not None:
        if not local.exists():
            raise StoreNotFoundError(f"{local}: no such file or directory")
        if not (local / "zarr.json").is_file():
            raise NotAStoreError(
                f"{local}: not an activation store (no zarr.json){_stores_below(local)}"
            )
    try:
        group = _zarr.open_group(path, mode="r")
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path}: no store at this URL") from None
    except ImportError as e:
        raise NotAStoreError(missing_backend(os.fspath(path), e)) from None
    except Exception as e:
        raise NotAStoreError(f"{path}: not a zarr v3 group: {e!r}") from e
    if not isinstance(group.attrs.get(ATTRS_KEY), dict):
        raise NotAStoreError(f"{path}: a zarr group without prefast store attributes")
    where = os.fspath(path)
    info = StoreInfo.from_dict(group.attrs[ATTRS_KEY], where)
    arrays = _zarr.check_arrays(group, info.layout, where, info.complete)
    crcs = _zarr.read_table(arrays[CHUNK_CRC], where, local)
    label_crcs = _zarr.read_table(arrays[LABEL_CRC], where, local)
    unlabelled = np.flatnonzero((crcs[0] >= 0) & (label_crcs < 0))
    if unlabelled.size:
        raise StoreCorruptError(
            f"{where}: chunk {int(unlabelled[0])} of view 0 is marked written but its labels "
            "have no checksum; rebuild the store"
        )
    if info.complete and (crcs < 0).any():
        raise StoreCorruptError(
            f"{where}: the store is marked complete but chunks are missing, (view, start, stop) "
            f"{unwritten_ranges(crcs, info.layout)[:6]}; rebuild the store"
        )
    s = ActivationStore(path, group, info, arrays, crcs, label_crcs, checksums)
    if not info.complete and not partial:
        missing = s.missing_ranges()
        raise StoreIncompleteError(
            f"{path}: the store is incomplete (its writer did not finish); missing (view, start, stop) "
            f"ranges {missing[:10]}{' ...' if len(missing) > 10 else ''}; resume it with "
            "store.create(..., resume=True) or open it with partial=True"
        )
    return s


__all__ = ["ActivationStore", "as_tensor", "check_opened", "numpy_view", "open"]
