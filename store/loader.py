"""``StoreLoader``: batches of cached activations, prefetched on a background thread.

One loader serves every tier (``ActivationStore``, ``RamCache``, ``DeviceCache``). Which
samples make up each batch is the business of ``store.sampling``, chosen once per loader: an
exact global permutation for random-access sources (memory-mapped raw stores, both in-memory
tiers), chunk streaming with a shuffle window for compressed or remote stores. This module
does the rest: a bounded prefetch queue on a background thread, one per pass over the loader
(or the caller's thread with ``prefetch=0``), resume from ``start_batch``, and, with a CUDA device, gathers into pinned
host buffers (on ``gather_workers`` threads). The copies to the device are issued by the
consuming thread, one group of ``batches_per_copy`` batches ahead, on a side stream it owns:
the background threads make no CUDA stream or event calls, so nothing crosses threads but host
tensors, and a training thread capturing CUDA graphs is never disturbed. A group is gathered
into one buffer, copied in one call and handed over as its batches (views of the group on the
device): the loader's fixed cost per batch (buffers, labels, the queue, the copy calls) is
paid once per group, and the group's gather is split among the threads as one batch's is.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from store.errors import StoreError, StoreInputError, check_bool, check_int
from store.protocols import ActivationSource
from store.sampling import Batching, ChunkStreamSampling, RandomAccessSampling, sampling_for
from store.tiers import resolve_device, to_device

_END = object()

# Feeding a CUDA device, consecutive batches are gathered and copied as one group of up to
# COPY_GROUP_BYTES (at most MAX_BATCHES_PER_COPY batches; a larger batch goes alone).
COPY_GROUP_BYTES = 16 << 20
MAX_BATCHES_PER_COPY = 8


def default_batches_per_copy(batch_bytes: int, device: torch.device) -> int:
    """Batches per host-to-device copy when the caller does not say: one on a CPU device
    (there is no copy), else as many as fit ``COPY_GROUP_BYTES``, 1 to
    ``MAX_BATCHES_PER_COPY``."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_BATCHES_PER_COPY, COPY_GROUP_BYTES // max(1, batch_bytes)))


@dataclass
class LoaderStats:
    """Where one pass of a loader spent its time, in seconds, for reading where a run's
    epochs go (the trainer records them per epoch). ``gather``: filling the batches from the
    source; ``buffers``: making the batch buffers (pinned for CUDA) and labels; ``copy``:
    issuing the host-to-device copies; ``starved``: the consumer waiting for the prefetch
    thread (the loader behind); ``full``: the prefetch thread waiting on a full queue (the
    loader ahead)."""

    batches: int = 0
    bytes: int = 0
    gather: float = 0.0
    buffers: float = 0.0
    copy: float = 0.0
    starved: float = 0.0
    full: float = 0.0

    def add(self, other: LoaderStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        return {k: (v if isinstance(v, int) else round(v, 4)) for k, v in asdict(self).items()}


class _Prefetch:
    """One pass's background thread and its bounded queue of ``depth`` items."""

    def __init__(self, depth: int, stats: LoaderStats) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.stats = stats  # the pass's: ``full`` and ``starved`` are counted here

    def start(self, produce: Callable[..., None], *args: Any) -> None:
        self.thread = threading.Thread(
            target=produce, args=(self.put, self.stopped, *args), name="store-loader", daemon=True
        )
        self.thread.start()

    def put(self, item: Any) -> bool:
        """Called by the thread: ``item`` into the queue; False once the pass is stopped."""
        t = time.perf_counter()
        try:
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False
        finally:
            self.stats.full += time.perf_counter() - t

    def items(self) -> Iterator[Any]:
        """The thread's items, in order, until _END; its error is raised here."""
        while True:
            t = time.perf_counter()
            item = self._get()
            self.stats.starved += time.perf_counter() - t
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _get(self) -> Any:
        while True:
            if self.stopped.is_set():
                raise StoreError("the loader was closed while this pass over it was under way")
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                t = self.thread
                if t is None or not t.is_alive():
                    # The producer always ends with _END or an exception; drain once more.
                    try:
                        return self.queue.get_nowait()
                    except queue.Empty:
                        raise StoreError(
                            "the loader's background thread ended without a result"
                        ) from None

    def stop(self) -> None:
        """Stop the thread and wait for it (not from the thread itself: it ends on its own)."""
        self.stopped.set()
        t = self.thread
        if t is None or t is threading.current_thread():
            return
        while t.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get_nowait()
            t.join(timeout=0.05)


class StoreLoader:
    """Iterates (x, y) batches of a cache tier: x (B, *sample_shape) on ``device`` in the stored
    dtype, y int64 (B,) on ``device``; with ``with_indices=True`` also the batch's sample ids,
    int64 (B,) on the host. Call ``set_epoch(e)`` before each epoch.

    ``prefetch`` groups of ``batches_per_copy`` batches (one batch a group on a CPU device,
    by default) are prepared ahead on a background thread; ``prefetch=0`` prepares each group
    when it is asked for, on the caller's thread (the better choice when training
    runs on the same few CPU cores). ``buffer_chunks`` and ``read_workers`` tune the streaming
    of compressed stores (see ``store.sampling``). ``gather_workers`` threads gather each
    batch of a host source (RAM or a memory-mapped store); the default is one on a CPU device
    (the cores train) and up to eight, half the host's cores, when feeding a CUDA device.
    ``batches_per_copy`` consecutive batches are gathered and copied as one group (see the
    module docstring); the default groups up to 16 MiB when feeding a CUDA device, 1 batch
    otherwise. Batches, their order and their contents do not depend on it."""

    def __init__(
        self,
        source: ActivationSource,
        batch_size: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        prefetch: int = 2,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        buffer_chunks: int = 8,
        read_workers: int = 2,
        with_indices: bool = False,
        gather_workers: int | None = None,
        batches_per_copy: int | None = None,
    ) -> None:
        # integers (a float, a str or a bool is refused by name, not taken as another count)
        batch_size = check_int("batch_size", batch_size, 1)
        prefetch = check_int("prefetch", prefetch, 0)
        seed = check_int("seed", seed, 0)
        world_size = check_int("world_size", world_size, 1)
        rank = check_int("rank", rank, 0)
        if rank >= world_size:
            raise StoreInputError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        shuffle = check_bool("shuffle", shuffle)
        drop_last = check_bool("drop_last", drop_last)
        with_indices = check_bool("with_indices", with_indices)
        buffer_chunks = check_int("buffer_chunks", buffer_chunks, 1)
        read_workers = check_int("read_workers", read_workers, 1)
        if gather_workers is not None:
            gather_workers = check_int("gather_workers", gather_workers, 1)
        if batches_per_copy is not None:
            batches_per_copy = check_int("batches_per_copy", batches_per_copy, 1)
        if not isinstance(source, ActivationSource):
            raise StoreInputError(
                f"source must be an ActivationStore, RamCache or DeviceCache, got {type(source).__name__}"
            )
        self.source = source
        self.device = resolve_device(device)
        here = source.device
        if here.type != "cpu" and (
            self.device.type != here.type
            or (self.device.index if self.device.index is not None else torch.cuda.current_device())
            != here.index
        ):
            # its gathers are ops on its own device, into batches there (another device's
            # buffer was torch's RuntimeError at the first batch, on the loader's thread)
            raise StoreInputError(
                f"a cache on {here} feeds batches on {here}, not on {self.device}: "
                f"StoreLoader(..., device={str(here)!r})"
            )
        self.prefetch = prefetch
        self.buffer_chunks = buffer_chunks
        self.read_workers = read_workers
        self.with_indices = with_indices
        self.epoch = 0
        self.start_batch = 0
        self.batching = Batching(batch_size, shuffle, seed, drop_last, rank, world_size)
        if gather_workers is None:
            gather_workers = (
                min(8, max(1, (os.cpu_count() or 1) // 2)) if self.device.type == "cuda" else 1
            )
        self.gather_workers = gather_workers
        self.sampling = sampling_for(
            source, self.batching, buffer_chunks, read_workers, gather_workers
        )
        # samples per epoch on this rank; StoreInputError now for fewer samples than ranks
        self._per_rank = self.sampling.samples_per_rank()
        if drop_last and self._per_rank < batch_size:
            # every epoch was one of no batches, silently
            raise StoreInputError(
                f"drop_last=True with batch_size={batch_size}: the {self._per_rank} sample(s) "
                f"each of {world_size} rank(s) reads an epoch make no full batch; lower "
                "batch_size or pass drop_last=False"
            )
        if batches_per_copy is None:
            batch_bytes = (
                min(batch_size, self._per_rank)
                * math.prod(source.sample_shape)
                * source.dtype.itemsize
            )
            batches_per_copy = default_batches_per_copy(batch_bytes, self.device)
        self.batches_per_copy = batches_per_copy
        self.streaming = isinstance(self.sampling, ChunkStreamSampling)
        self._labels = source.labels.cpu()
        # The background threads of the passes under way (each pass over the loader has its
        # own: two passes at once, nested or zipped, do not disturb each other).
        self._passes: set[_Prefetch] = set()
        self._lock = threading.Lock()
        self.stats = LoaderStats()  # the current (or last) pass over the loader

    # The batching, read-only: the sampling policy was built from it.
    batch_size = property(lambda self: self.batching.batch_size)
    shuffle = property(lambda self: self.batching.shuffle)
    seed = property(lambda self: self.batching.seed)
    drop_last = property(lambda self: self.batching.drop_last)
    rank = property(lambda self: self.batching.rank)
    world_size = property(lambda self: self.batching.world_size)

    # ---- order ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips that many batches (mid-epoch resume),
        at most ``len(self)`` (the end of the epoch: no batches)."""
        epoch = check_int("epoch", epoch, 0)
        start_batch = check_int("start_batch", start_batch, 0)
        if start_batch > len(self):
            # an epoch of no batches, silently: a resume point from another batch size or rank
            # count, say
            raise StoreInputError(
                f"start_batch={start_batch} is past the end of an epoch of {len(self)} batches"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batching.num_batches(self.sampling.samples_per_rank())

    def batch_plan(self, epoch: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For random-access sources: the epoch's (sample indices, views) per batch of this rank."""
        if not isinstance(self.sampling, RandomAccessSampling):
            raise StoreError(
                "batch_plan() is defined for random-access sources; a compressed store streams"
            )
        return self.sampling.plan(self.epoch if epoch is None else epoch)

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        st = self.stats = LoaderStats()
        if self.source.device.type == self.device.type and self.source.device.type != "cpu":
            yield from self._iter_same_device(st)  # DeviceCache: gathers are device ops, no thread
            return
        if self.prefetch == 0:
            # No background thread: each batch is gathered when asked for. On a CPU-only
            # machine this keeps the gather from competing with the compute threads.
            items = self._items(threading.Event(), self.epoch, self.start_batch, st)
            yield from self._deliver(items, st)
            return
        run = _Prefetch(self.prefetch, st)
        with self._lock:
            self._passes.add(run)
        try:
            run.start(self._produce, self.epoch, self.start_batch, st)
            yield from self._deliver(run.items(), st)
        finally:
            run.stop()
            with self._lock:
                self._passes.discard(run)

    def _deliver(self, items: Iterator[Any], st: LoaderStats) -> Iterator[tuple[torch.Tensor, ...]]:
        """Host groups (x, y, ids, batch sizes) as the caller's batches. For a CUDA device, group
        g + 1's copy is issued on a side stream before group g's batches are handed over, so
        it overlaps their work; the caller's stream waits for a group's copy (an event on this
        thread) before using one of its batches. The pinned host buffers return to torch's
        pinned-memory cache only after their copies are done (torch records the copy on
        them)."""
        if self.device.type != "cuda":
            for item in items:
                yield from self._split(*item)
            return
        side = torch.cuda.Stream(self.device)

        def issue(item: Any) -> tuple[Any, ...]:
            x, y, ids, sizes = item
            t = time.perf_counter()
            with torch.cuda.stream(side):
                xd = x.to(self.device, non_blocking=True)
                yd = y.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            st.copy += time.perf_counter() - t
            return xd, yd, ids, sizes, done

        ahead = None
        for item in items:
            nxt = issue(item)
            if ahead is not None:
                yield from self._ready(ahead)
            ahead = nxt
        if ahead is not None:
            yield from self._ready(ahead)

    def _split(
        self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, sizes: list[int]
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """A group's batches (of ``sizes`` samples): views of its samples, in order."""
        pos = 0
        for n in sizes:
            part = slice(pos, pos + n)
            pos += n
            yield (x[part], y[part], ids[part]) if self.with_indices else (x[part], y[part])

    def _ready(self, issued: tuple[Any, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
        xd, yd, ids, sizes, done = issued
        for batch in self._split(xd, yd, ids, sizes):
            # per batch: the caller may consume each on another stream (graph warm-ups)
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            xd.record_stream(stream)
            yd.record_stream(stream)
            yield batch

    def _iter_same_device(self, st: LoaderStats) -> Iterator[tuple[torch.Tensor, ...]]:
        batches = self.sampling.batches(self.epoch)
        for batch in itertools.islice(batches, self.start_batch, None):
            t = time.perf_counter()
            x = torch.empty(
                (batch.size, *self.source.sample_shape), dtype=self.source.dtype, device=self.device
            )
            ids = batch.fill(x)  # device ops: queued, not waited for
            y = to_device(self._labels[ids], self.device)
            st.gather += time.perf_counter() - t
            st.batches += 1
            st.bytes += x.numel() * x.element_size()
            yield (x, y, ids) if self.with_indices else (x, y)

    def _produce(
        self,
        put: Callable[[Any], bool],
        stop: threading.Event,
        epoch: int,
        start_batch: int,
        st: LoaderStats,
    ) -> None:
        """The background thread: every item into the bounded queue, then _END (or the error)."""
        try:
            for item in self._items(stop, epoch, start_batch, st):
                if not put(item):
                    return
            put(_END)
        except BaseException as e:
            put(e)

    def _items(
        self, stop: threading.Event, epoch: int, start_batch: int, st: LoaderStats
    ) -> Iterator[Any]:
        """(x, y, ids, batch sizes) per group of ``batches_per_copy`` batches on the host: x
        gathered into a fresh buffer, pinned when the device is CUDA (torch's pinned-memory
        cache makes that cheap after the first groups)."""
        k = self.batches_per_copy
        # one size for every group (pinned buffers are reused by size), never more samples
        # than the epoch has: a batch size above the data allocates only the data
        shape = (min(k * self.batch_size, self._per_rank), *self.source.sample_shape)
        pin = self.device.type == "cuda"
        clock = time.perf_counter
        batches = itertools.islice(self.sampling.batches(epoch), start_batch, None)
        while not stop.is_set():
            group = list(itertools.islice(batches, k))
            if not group:
                return
            sizes = [b.size for b in group]
            n = sum(sizes)
            t0 = clock()
            out = torch.empty(shape, dtype=self.source.dtype, pin_memory=pin)[:n]
            t1 = clock()
            ids = self.sampling.fill_group(group, out)
            t2 = clock()
            y = self._labels[ids]
            if pin:
                y = y.pin_memory()
            st.buffers += t1 - t0 + clock() - t2
            st.gather += t2 - t1
            st.batches += len(group)
            st.bytes += n * out[0].numel() * out.element_size()
            yield (out, y, ids, sizes)

    # ---- shutdown -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background threads of the passes under way (if any) and the gather threads,
        and wait for them; a pass stopped so raises ``StoreError`` if it is iterated further.
        A later pass starts afresh."""
        with self._lock:
            runs = list(self._passes)
            self._passes.clear()
        for run in runs:
            run.stop()
        if isinstance(self.sampling, RandomAccessSampling):
            self.sampling.close()

    def __enter__(self) -> StoreLoader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


__all__ = ["LoaderStats", "StoreLoader", "resolve_device"]
