"""The order in which a loader visits samples: two policies behind one small interface.

``sampling_for(source, ...)`` picks the policy once, from the source:

* ``RandomAccessSampling`` (memory-mapped raw stores, ``RamCache``, ``DeviceCache``) follows the
  order contract of ``store.order``: epoch ``e`` visits ``epoch_permutation(N, seed, e)``, rank
  ``r`` takes ``rank_part(...)``, and each sample reads view ``epoch_views(N, V, seed, e)[i]``.
  This is an exact, uniform global shuffle and the same order the image loader uses, so
  swapping tiers changes no batch.
* ``ChunkStreamSampling`` (compressed or remote stores, where a per-sample read decodes a whole
  chunk): each epoch visits the chunks in a permuted order (rank ``r`` takes the ``r``-th run
  of ``N // world_size`` of their samples, so neighbours may share a chunk), decodes them on
  ``read_workers`` threads, keeps a window of ``buffer_chunks`` decoded chunks and shuffles
  samples across that window. The view is drawn **per chunk** per epoch (all samples of a
  chunk read the same view in an epoch), and the order is quasi-random rather than the exact
  permutation. Each sample is still read exactly once per epoch (per rank; ranks are cut to
  equal length).

A policy yields ``Batch``es: a size and a ``fill(out)`` that gathers the batch into ``out`` and
returns its sample ids; the policy's ``fill_group`` fills several consecutive batches into one
buffer (the loader's copies to a GPU move a group at a time): a random-access policy gathers the
group in one call, split among its gather threads as one batch would be. The loader owns the
buffers, threads and device copies.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from store import layout as _layout
from store.errors import StoreInputError
from store.order import chunk_rng, epoch_permutation, epoch_views, rank_part
from store.protocols import ActivationSource
from store.reader import ActivationStore, numpy_view


def _samples_per_rank(source: ActivationSource, world_size: int) -> int:
    """N // world_size on every rank (the epoch's remainder is left out); StoreInputError
    where the source has fewer samples than there are ranks, for every kind of source."""
    n = source.num_samples
    if n < world_size:
        where = getattr(source, "path", type(source).__name__)
        raise StoreInputError(f"{where}: {n} sample(s) cannot be shared by {world_size} ranks")
    return n // world_size


@dataclass(frozen=True)
class Batching:
    """How an epoch is cut into batches; the loader validates the values."""

    batch_size: int
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def num_batches(self, samples: int) -> int:
        """Batches of ``samples`` samples (a short last batch counts unless drop_last)."""
        bs = self.batch_size
        return samples // bs if self.drop_last else -(-samples // bs)


@dataclass(frozen=True)
class Batch:
    """One batch of an epoch, not yet read."""

    size: int  # samples in the batch
    # Gathers the batch into out (size, *sample_shape), on the source's device for a
    # DeviceCache, else the host; returns the batch's sample ids, int64 (size,) on the host.
    fill: Callable[[torch.Tensor], torch.Tensor]
    # Random access only: the batch's sample indices and views, int64 (size,) each, so that
    # consecutive batches can be gathered in one call (fill_group).
    idx: np.ndarray | None = None
    views: np.ndarray | None = None


class Sampling(Protocol):
    """A batch order over one source, for one rank."""

    def samples_per_rank(self) -> int:
        """Samples this rank visits per epoch (the same on every rank and in every epoch)."""
        ...

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches for this rank, in order."""
        ...

    def fill_group(self, group: Sequence[Batch], out: torch.Tensor) -> torch.Tensor:
        """Fill consecutive ``group`` batches of this policy into ``out`` (their samples back
        to back); their sample ids, int64 on the host, in that order."""
        ...


class RandomAccessSampling:
    """The exact global permutation of ``store.order``, gathered sample by sample; a host
    source's batch is split into up to ``gather_workers`` contiguous parts of at least
    ``store.layout.MIN_PART_BYTES`` gathered in parallel (numpy's copies release the GIL), a device
    source's in one device op."""

    def __init__(
        self, source: ActivationSource, batching: Batching, gather_workers: int = 1
    ) -> None:
        self.source = source
        self.batching = batching
        self.gather_workers = max(1, gather_workers)
        self._parallel = self.gather_workers > 1 and source.device.type == "cpu"
        # made at the first split gather, shut down by close() (a later gather makes another)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.gather_workers, thread_name_prefix="store-gather"
                )
            return self._pool

    def close(self) -> None:
        """End the gather threads (after the gathers under way)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _gather(self, views: np.ndarray, idx: np.ndarray, out: torch.Tensor) -> None:
        k = self.gather_workers if self._parallel else 1
        k = _layout.part_count(out.numel() * out.element_size(), k)
        if k == 1 or len(idx) < 4 * k:
            self.source.gather(views, idx, out)
            return
        bounds = np.linspace(0, len(idx), k + 1).astype(int)
        pool = self._executor()
        parts = [
            pool.submit(self.source.gather, views[a:b], idx[a:b], out[a:b])
            for a, b in itertools.pairwise(bounds.tolist())
        ]
        for f in parts:
            f.result()

    def samples_per_rank(self) -> int:
        return _samples_per_rank(self.source, self.batching.world_size)

    def plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The epoch's (sample indices, views) per batch of this rank, both int64 (B,)."""
        b = self.batching
        n = self.source.num_samples
        order = rank_part(epoch_permutation(n, b.seed, epoch, b.shuffle), b.rank, b.world_size)
        views = epoch_views(n, self.source.views, b.seed, epoch)
        bs = b.batch_size
        out = []
        for k in range(b.num_batches(self.samples_per_rank())):
            idx = order[k * bs : (k + 1) * bs]
            out.append((idx, views[idx]))
        return out

    def batches(self, epoch: int) -> Iterator[Batch]:
        for idx, views in self.plan(epoch):

            def fill(
                out: torch.Tensor, idx: np.ndarray = idx, views: np.ndarray = views
            ) -> torch.Tensor:
                self._gather(views, idx, out)
                return torch.from_numpy(idx)

            yield Batch(len(idx), fill, idx, views)

    def fill_group(self, group: Sequence[Batch], out: torch.Tensor) -> torch.Tensor:
        """``Sampling.fill_group`` in one gather call (this policy's batches carry their
        indices and views)."""
        idx = np.concatenate([b.idx for b in group])
        self._gather(np.concatenate([b.views for b in group]), idx, out)
        return torch.from_numpy(idx)


class ChunkStreamSampling:
    """Whole chunks in a permuted order, decoded on threads, shuffled within a window."""

    def __init__(
        self, source: ActivationStore, batching: Batching, buffer_chunks: int, read_workers: int
    ) -> None:
        self.source = source
        self.batching = batching
        self.buffer_chunks = buffer_chunks
        self.read_workers = read_workers

    def _chunk_len(self, c: int) -> int:
        c0, c1 = self.source.layout.chunk_range(c)
        return c1 - c0

    def samples_per_rank(self) -> int:
        return _samples_per_rank(self.source, self.batching.world_size)

    def _pieces(self, order: np.ndarray) -> list[tuple[int, int, int]]:
        """This rank's part of an epoch: ``(chunk, lo, hi)``, the chunk's samples ``lo:hi``.
        The chunks' samples in ``order`` are one sequence of N; rank r takes its r-th run of
        N // world_size, so a rank reads at most two chunks it shares with its neighbours."""
        m, r = self.samples_per_rank(), self.batching.rank
        start, stop = r * m, (r + 1) * m
        out, pos = [], 0
        for c in order:
            n = self._chunk_len(int(c))
            lo, hi = max(start - pos, 0), min(stop - pos, n)
            if lo < hi:
                out.append((int(c), lo, hi))
            pos += n
            if pos >= stop:
                break
        return out

    def fill_group(self, group: Sequence[Batch], out: torch.Tensor) -> torch.Tensor:
        """``Sampling.fill_group``, one batch after another (each from its decoded window)."""
        ids, pos = [], 0
        for b in group:
            ids.append(b.fill(out[pos : pos + b.size]))
            pos += b.size
        return torch.cat(ids)

    def batches(self, epoch: int) -> Iterator[Batch]:
        s, b = self.source, self.batching
        nc = s.num_chunks
        # The chunk order and the per-chunk views both start from chunk_rng(seed, epoch).
        order = chunk_rng(b.seed, epoch).permutation(nc) if b.shuffle else np.arange(nc)
        pieces = self._pieces(order)
        limit = self.samples_per_rank()  # equal length on every rank
        views_of_chunk = (
            chunk_rng(b.seed, epoch).integers(0, s.views, size=nc)
            if s.views > 1
            else np.zeros(nc, dtype=np.int64)
        )
        # A separate stream per epoch and rank for the within-window shuffles.
        rng = np.random.default_rng([b.seed, epoch, 3, b.rank])
        windows = [
            pieces[i : i + self.buffer_chunks] for i in range(0, len(pieces), self.buffer_chunks)
        ]
        bs = b.batch_size
        emitted = 0
        carry_x: np.ndarray | None = None
        carry_i = np.empty(0, dtype=np.int64)  # sample ids of the carried samples
        with ThreadPoolExecutor(
            max_workers=self.read_workers, thread_name_prefix="store-read"
        ) as pool:

            def submit(w: list[tuple[int, int, int]]) -> list[Future[np.ndarray]]:
                return [pool.submit(s.read_chunk, int(views_of_chunk[c]), c) for c, _, _ in w]

            pending = submit(windows[0]) if windows else []
            for wi in range(len(windows)):
                data = [
                    f.result()[lo:hi] for f, (_, lo, hi) in zip(pending, windows[wi], strict=True)
                ]
                pending = submit(windows[wi + 1]) if wi + 1 < len(windows) else []
                ids = [np.arange(lo, hi) + s.layout.chunk_range(c)[0] for c, lo, hi in windows[wi]]
                pool_x = np.concatenate(([carry_x] if carry_x is not None else []) + data)
                pool_i = np.concatenate([carry_i, *ids])  # sample id of each pooled sample
                del data  # the window now lives in pool_x only
                # Batches are gathered straight from the pool into the output buffer through
                # a permutation: no shuffled copy of the window.
                perm = rng.permutation(len(pool_x)) if b.shuffle else np.arange(len(pool_x))
                last = wi == len(windows) - 1
                pos = 0
                while emitted < limit:
                    take = min(bs, limit - emitted)
                    if len(pool_x) - pos < take or (not last and len(pool_x) - pos < bs):
                        break
                    sel = perm[pos : pos + take]
                    pos += take
                    emitted += take
                    if take < bs and b.drop_last:
                        break

                    def fill(
                        out: torch.Tensor,
                        sel: np.ndarray = sel,
                        pool_x: np.ndarray = pool_x,
                        pool_i: np.ndarray = pool_i,
                    ) -> torch.Tensor:
                        np.take(pool_x, sel, axis=0, out=numpy_view(out))
                        return torch.from_numpy(pool_i[sel])

                    yield Batch(len(sel), fill)
                carry_x, carry_i = pool_x[perm[pos:]], pool_i[perm[pos:]]
                del pool_x, pool_i


def sampling_for(
    source: ActivationSource,
    batching: Batching,
    buffer_chunks: int = 8,
    read_workers: int = 2,
    gather_workers: int = 1,
) -> RandomAccessSampling | ChunkStreamSampling:
    """The policy for ``source``, chosen once: chunk streaming for a store that is not memory
    mapped (compressed or remote: a per-sample read would decode a whole chunk), random access
    for everything else."""
    if isinstance(source, ActivationStore) and not source.memory_mapped:
        return ChunkStreamSampling(source, batching, buffer_chunks, read_workers)
    return RandomAccessSampling(source, batching, gather_workers)


__all__ = [
    "Batch",
    "Batching",
    "ChunkStreamSampling",
    "RandomAccessSampling",
    "Sampling",
    "sampling_for",
]
