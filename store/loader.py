"""``StoreLoader``: batches of cached activations, prefetched on a background thread.

One loader serves every tier (``ActivationStore``, ``RamCache``, ``DeviceCache``):

* Random-access sources (memory-mapped raw stores, both in-memory tiers) follow the order
  contract of ``store.order``: epoch ``e`` visits ``epoch_permutation(N, seed, e)``, rank ``r``
  takes ``rank_part(...)``, and each sample reads view ``epoch_views(N, V, seed, e)[i]``. This is
  an exact, uniform global shuffle and the same order the image loader uses, so swapping tiers
  changes no batch.
* Compressed stores are streamed: each epoch visits the chunks in a permuted order (rank ``r``
  takes every ``world_size``-th of them), decodes them on ``read_workers`` threads, keeps a
  window of ``buffer_chunks`` decoded chunks and shuffles samples across that window. The view
  is drawn **per chunk** per epoch (all samples of a chunk read the same view in an epoch), and
  the order is quasi-random rather than the exact permutation. Each sample is still read
  exactly once per epoch (per rank; ranks are cut to equal length).

With a CUDA device, batches are gathered into pinned host buffers and copied with
``non_blocking=True`` on a side stream; the consumer's stream waits on the copy's event.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import numpy as np
import torch

from store.errors import StoreError, StoreInputError
from store.order import chunk_rng, epoch_permutation, epoch_views, rank_part
from store.protocols import ActivationSource
from store.reader import ActivationStore, numpy_view

_END = object()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else as torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Slot:
    """A pinned host buffer and the event of its last copy to the device."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.host = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.event: torch.cuda.Event | None = None


class StoreLoader:
    """Iterates (x, y) batches of a cache tier: x (B, *sample_shape) on ``device`` in the stored
    dtype, y int64 (B,) on ``device``; with ``with_indices=True`` also the batch's sample ids,
    int64 (B,) on the host. Call ``set_epoch(e)`` before each epoch.

    ``prefetch`` batches are prepared ahead on a background thread; ``prefetch=0`` prepares
    each batch when it is asked for, on the caller's thread (the better choice when training
    runs on the same few CPU cores)."""

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
    ) -> None:
        if batch_size < 1:
            raise StoreInputError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise StoreInputError(f"prefetch must be >= 0, got {prefetch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise StoreInputError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if buffer_chunks < 1 or read_workers < 1:
            raise StoreInputError("buffer_chunks and read_workers must be >= 1")
        if not isinstance(source, ActivationSource):
            raise StoreInputError(
                f"source must be an ActivationStore, RamCache or DeviceCache, got {type(source).__name__}"
            )
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = resolve_device(device)
        self.prefetch = prefetch
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.buffer_chunks = buffer_chunks
        self.read_workers = read_workers
        self.with_indices = with_indices
        self.epoch = 0
        self.start_batch = 0
        self.streaming = isinstance(source, ActivationStore) and not source.memory_mapped
        self._labels = source.labels.cpu()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] | None = None

    # ---- order ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips that many batches (mid-epoch resume)."""
        if epoch < 0 or start_batch < 0:
            raise StoreInputError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def _per_rank_samples(self) -> int:
        if not self.streaming:
            n = self.source.num_samples
            return n if self.world_size == 1 else n // self.world_size
        # Equal on every rank and in every epoch: the worst case of a rank holding
        # floor(chunks / world_size) chunks, one of them the short last chunk.
        assert isinstance(self.source, ActivationStore)
        nc, cs = self.source.num_chunks, self.source.chunk_samples
        k = nc // self.world_size
        if k == 0:
            raise StoreInputError(
                f"{self.source.path}: {nc} chunk(s) cannot be shared by {self.world_size} ranks; "
                "use smaller chunks or an uncompressed store"
            )
        return (k - 1) * cs + self._chunk_len(nc - 1)

    def __len__(self) -> int:
        n = self._per_rank_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_plan(self, epoch: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For random-access sources: the epoch's (sample indices, views) per batch of this rank."""
        if self.streaming:
            raise StoreError(
                "batch_plan() is defined for random-access sources; a compressed store streams"
            )
        e = self.epoch if epoch is None else epoch
        n = self.source.num_samples
        order = rank_part(
            epoch_permutation(n, self.seed, e, self.shuffle), self.rank, self.world_size
        )
        views = epoch_views(n, self.source.views, self.seed, e)
        out = []
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            out.append((idx, views[idx]))
        return out

    # streaming helpers
    def _chunk_len(self, c: int) -> int:
        assert isinstance(self.source, ActivationStore)
        c0, c1 = self.source.layout.chunk_range(c)
        return c1 - c0

    def _rank_chunks(self, epoch: int) -> list[np.ndarray]:
        assert isinstance(self.source, ActivationStore)
        nc = self.source.num_chunks
        rng = chunk_rng(self.seed, epoch)
        order = rng.permutation(nc) if self.shuffle else np.arange(nc)
        return [order[r :: self.world_size] for r in range(self.world_size)]

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.close()
        if self.source.device.type == self.device.type and self.source.device.type != "cpu":
            yield from self._iter_same_device()  # DeviceCache: gathers are device ops, no thread
            return
        if self.prefetch == 0:
            # No background thread: each batch is gathered when asked for. On a CPU-only
            # machine this keeps the gather from competing with the compute threads.
            for item in self._items(threading.Event(), self.epoch, self.start_batch):
                yield self._deliver(item)
            return
        self._stop = threading.Event()
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        self._queue = q
        self._thread = threading.Thread(
            target=self._produce,
            args=(q, self._stop, self.epoch, self.start_batch),
            name="store-loader",
            daemon=True,
        )
        self._thread.start()
        try:
            while True:
                item = self._get(q)
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._deliver(item)
        finally:
            self.close()

    def _deliver(self, item: Any) -> tuple[torch.Tensor, ...]:
        """A produced batch, made safe to use on the consumer's CUDA stream."""
        x, y, ids, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            x.record_stream(stream)
            y.record_stream(stream)
        return (x, y, ids) if self.with_indices else (x, y)

    def _get(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                t = self._thread
                if t is None or not t.is_alive():
                    # The producer always ends with _END or an exception; drain once more.
                    try:
                        return q.get_nowait()
                    except queue.Empty:
                        raise StoreError(
                            "the loader's background thread ended without a result"
                        ) from None

    def _iter_same_device(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for idx, views in self.batch_plan()[self.start_batch :]:
            x = torch.empty(
                (len(idx), *self.source.sample_shape), dtype=self.source.dtype, device=self.device
            )
            self.source.gather(views, idx, x)
            y = self._labels[idx].to(self.device, non_blocking=True)
            yield (x, y, torch.from_numpy(idx)) if self.with_indices else (x, y)

    def _put(self, q: queue.Queue[Any], stop: threading.Event, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(
        self, q: queue.Queue[Any], stop: threading.Event, epoch: int, start_batch: int
    ) -> None:
        """The background thread: every item into the bounded queue, then _END (or the error)."""
        try:
            for item in self._items(stop, epoch, start_batch):
                if not self._put(q, stop, item):
                    return
            self._put(q, stop, _END)
        except BaseException as e:
            self._put(q, stop, e)

    def _items(self, stop: threading.Event, epoch: int, start_batch: int) -> Iterator[Any]:
        """(x, y, ids, event) per batch: gathered on the host (into pinned buffers and copied on
        a side stream when the device is CUDA; event marks the copy)."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        slots = (
            [
                _Slot((self.batch_size, *self.source.sample_shape), self.source.dtype)
                for _ in range(self.prefetch + 2)
            ]
            if cuda
            else []
        )
        batches = self._stream_batches(epoch) if self.streaming else self._random_batches(epoch)
        for b, fill in enumerate(batches):
            if stop.is_set():
                return
            if b < start_batch:
                continue
            if cuda:
                slot = slots[b % len(slots)]
                if slot.event is not None:
                    slot.event.synchronize()  # the previous copy out of this buffer is done
                n, y, ids = fill(slot.host)
                assert stream is not None
                with torch.cuda.stream(stream):
                    x = slot.host[:n].to(self.device, non_blocking=True)
                    yd = y.pin_memory().to(self.device, non_blocking=True)
                    slot.event = torch.cuda.Event()
                    slot.event.record(stream)
                yield (x, yd, ids, slot.event)
            else:
                out = torch.empty(
                    (self.batch_size, *self.source.sample_shape), dtype=self.source.dtype
                )
                n, y, ids = fill(out)
                yield (out[:n], y, ids, None)

    def _random_batches(self, epoch: int) -> Iterator[Any]:
        for idx, views in self.batch_plan(epoch):

            def fill(
                out: torch.Tensor, idx: np.ndarray = idx, views: np.ndarray = views
            ) -> tuple[int, torch.Tensor, torch.Tensor]:
                self.source.gather(views, idx, out[: len(idx)])
                return len(idx), self._labels[idx], torch.from_numpy(idx)

            yield fill

    def _stream_batches(self, epoch: int) -> Iterator[Any]:
        s = self.source
        assert isinstance(s, ActivationStore)
        rank_chunks = self._rank_chunks(epoch)
        limit = self._per_rank_samples()  # equal length on every rank
        chunks = rank_chunks[self.rank]
        views_of_chunk = (
            chunk_rng(self.seed, epoch).integers(0, s.views, size=s.num_chunks)
            if s.views > 1
            else np.zeros(s.num_chunks, dtype=np.int64)
        )
        # A separate stream per epoch and rank for the within-window shuffles.
        rng = np.random.default_rng([self.seed, epoch, 3, self.rank])
        windows = [
            chunks[i : i + self.buffer_chunks] for i in range(0, len(chunks), self.buffer_chunks)
        ]
        bs = self.batch_size
        emitted = 0
        carry_x: np.ndarray | None = None
        carry_i = np.empty(0, dtype=np.int64)  # sample ids of the carried samples
        with ThreadPoolExecutor(
            max_workers=self.read_workers, thread_name_prefix="store-read"
        ) as pool:

            def submit(w: np.ndarray) -> list[Future[np.ndarray]]:
                return [pool.submit(s.read_chunk, int(views_of_chunk[c]), int(c)) for c in w]

            pending = submit(windows[0]) if windows else []
            for wi in range(len(windows)):
                data = [f.result() for f in pending]
                pending = submit(windows[wi + 1]) if wi + 1 < len(windows) else []
                ids = [np.arange(*s.layout.chunk_range(int(c))) for c in windows[wi]]
                pool_x = np.concatenate(([carry_x] if carry_x is not None else []) + data)
                pool_i = np.concatenate([carry_i, *ids])  # sample id of each pooled sample
                del data  # the window now lives in pool_x only
                # Batches are gathered straight from the pool into the output buffer through
                # a permutation: no shuffled copy of the window.
                perm = rng.permutation(len(pool_x)) if self.shuffle else np.arange(len(pool_x))
                last = wi == len(windows) - 1
                pos = 0
                while emitted < limit:
                    take = min(bs, limit - emitted)
                    if len(pool_x) - pos < take or (not last and len(pool_x) - pos < bs):
                        break
                    sel = perm[pos : pos + take]
                    pos += take
                    emitted += take
                    if take < bs and self.drop_last:
                        break

                    def fill(
                        out: torch.Tensor,
                        sel: np.ndarray = sel,
                        pool_x: np.ndarray = pool_x,
                        pool_i: np.ndarray = pool_i,
                    ) -> tuple[int, torch.Tensor, torch.Tensor]:
                        np.take(pool_x, sel, axis=0, out=numpy_view(out[: len(sel)]))
                        ids = torch.from_numpy(pool_i[sel])
                        return len(sel), self._labels[ids], ids

                    yield fill
                carry_x, carry_i = pool_x[perm[pos:]], pool_i[perm[pos:]]
                del pool_x, pool_i

    # ---- shutdown -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background thread (if any) and wait for it."""
        self._stop.set()
        t = self._thread
        if t is not None:
            q = self._queue
            while t.is_alive():
                if q is not None:
                    with contextlib.suppress(queue.Empty):
                        q.get_nowait()
                t.join(timeout=0.05)
        self._thread = None
        self._queue = None

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


__all__ = ["StoreLoader", "resolve_device"]
