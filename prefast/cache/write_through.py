"""Write-through re-caching (docs/training.md, re-caching): the next cache is written by the training steps.

Between the cache boundary ``b`` and the frontier ``f`` the frozen units run forward on every
sample in every epoch anyway, so the activation at any ``B`` in ``(b, f]`` is computed for
free. From the step at which ``B`` froze (or the epoch's first), each step hands its
activation at ``B`` (batch order: the epoch's shuffle) to ``WriteThrough.take``; the rows go
into the new cache's sink with ``write_rows``. At the epoch's end ``finish`` computes the
samples no writing step visited (those of the epoch's steps before the writing started: a
resume starts at an epoch's first step, and torchrun runs pass instead) in a catch-up pass, closes the sink (a
store is marked complete only then) and returns the new ``Cache``. So a boundary is cached
the epoch it freezes, at the price of one forward of the new frozen units per sample.

On CUDA the rows leave the device on a side stream into pinned buffers and a writer thread
scatters them into host tiers, so a step never waits for the host; the device tier takes them
with a device ``index_copy``. On a CPU device they are written on the calling thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prefast import interrupt
from prefast.cache.build import Cache
from prefast.errors import CacheError
from prefast.runtime import TORCH_DTYPES, synchronize

log = logging.getLogger(__name__)

_SLOTS = 4  # pinned staging buffers in flight (device -> host)
_END = object()


class _Slot:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.host = torch.empty(shape, dtype=dtype, pin_memory=True)  # (batch, *sample_shape)


class WriteThrough:
    """A cache at ``target`` being written during one epoch (see the module docstring)."""

    def __init__(
        self,
        *,
        target: int,
        sink: Any,  # a store ActivationSink with supports_rows
        tier: str,
        path: Path | str | None,
        fingerprint: str,
        meta: dict[str, Any],
        chain: tuple[int, ...],
        labels: torch.Tensor,  # (N,) int64 on the host
        dtype: str,
        device: torch.device,
        batch_size: int,
        sample_shape: tuple[int, ...],
        catch_up_batch: int | None = None,
        progress: bool = False,
    ) -> None:
        if not getattr(sink, "supports_rows", False):
            raise CacheError(f"the {tier} sink cannot take rows; use a cache pass")
        self.target = target
        self.sink = sink
        self.tier = tier
        self.path = path
        self.fingerprint = fingerprint
        self.meta = meta
        self.chain = chain
        self.labels = labels
        self.dtype = TORCH_DTYPES[dtype]
        self.device = device
        # the catch-up pass's batch: the run's (a larger one is slower per sample on a CPU,
        # whose caches it overflows)
        self.catch_up_batch = catch_up_batch or batch_size
        self.progress = progress  # a bar over the catch-up pass
        self.written = np.zeros(len(labels), dtype=bool)  # (N,) which samples have rows
        self.take_seconds = 0.0  # time take() held the training thread (writes, copies)
        self.take_bytes = 0  # bytes of rows handed over by the steps
        self.copy_wait_seconds = 0.0  # the writer thread waiting for device -> host copies
        self.scatter_seconds = 0.0  # the writer thread writing rows into the sink
        self.catch_up_samples = 0  # rows the epoch-end catch-up pass computed (finish)
        self.finish_seconds = 0.0  # the catch-up pass and the close (finish)
        self._t0 = time.perf_counter()
        self._error: BaseException | None = None
        self._async = device.type == "cuda" and tier != "device"
        self._slot_rows = batch_size
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if self._async:
            self._free: queue.Queue[_Slot] = queue.Queue()
            for _ in range(_SLOTS):
                self._free.put(_Slot((batch_size, *sample_shape), self.dtype))
            self._stream = torch.cuda.Stream(device)
            self._queue = queue.Queue(maxsize=_SLOTS)
            self._thread = threading.Thread(target=self._drain, name="write-through", daemon=True)
            self._thread.start()

    # ---- rows from the steps ----------------------------------------------------------------
    def take(self, h: torch.Tensor, ids: torch.Tensor) -> None:
        """The activations ``h`` (B, *sample_shape) at ``target`` of samples ``ids`` (B,) int64
        on the host. ``h`` may be a CUDA graph's static output: it is read before the device
        moves on to the next step."""
        self._raise()
        t = time.perf_counter()
        try:
            self._take(h, ids)
        finally:
            self.take_seconds += time.perf_counter() - t

    def _take(self, h: torch.Tensor, ids: torch.Tensor) -> None:
        idx = ids.numpy()
        self.written[idx] = True
        self.take_bytes += h.numel() * self.dtype.itemsize
        with torch.no_grad():
            if self.tier == "device":
                x = h.detach().to(self.dtype)
                self.sink.write_rows(0, ids, x, self.labels[ids])  # rows moved by the tier
                return
            if not self._async:
                self.sink.write_rows(0, idx, h.detach().to(self.dtype), self.labels[ids])
                return
            self._stage(h, idx)

    def _stage(self, h: torch.Tensor, idx: np.ndarray) -> None:
        """Copy ``h`` (at most ``batch_size`` rows, on the device) into a pinned slot on the side
        stream and queue it for the writer thread; the caller's stream waits for the copy."""
        with torch.no_grad():
            slot = self._free.get()  # back-pressure: at most _SLOTS batches in flight
            cur = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(cur)
            n = len(idx)
            with torch.cuda.stream(self._stream):
                slot.host[:n].copy_(h.detach().to(self.dtype), non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            cur.wait_event(done)  # the next step may overwrite h (a graph's static output)
            if self._queue is None:
                raise CacheError("write-through queue missing")
            self._queue.put((slot, done, idx, n))

    def _drain(self) -> None:
        """The writer thread: wait for each copy, scatter its rows into the sink."""
        q = self._queue
        if q is None:
            return
        while True:
            item = q.get()
            if item is _END:
                return
            slot, done, idx, n = item
            try:
                if self._error is None:
                    t = time.perf_counter()
                    done.synchronize()
                    t1 = time.perf_counter()
                    self.sink.write_rows(0, idx, slot.host[:n], self.labels[idx])
                    self.copy_wait_seconds += t1 - t
                    self.scatter_seconds += time.perf_counter() - t1
            except BaseException as e:  # surfaced by take() or finish()
                self._error = e
            finally:
                self._free.put(slot)

    def _raise(self) -> None:
        if self._error is not None:
            raise CacheError(
                f"writing the cache at boundary {self.target} failed: {self._error!r}"
            ) from self._error

    def wait_written(self) -> float:
        """Return once every row handed over so far is in the sink (on CUDA with a host tier,
        once the writer thread has written every queued batch), with the seconds waited (0.0
        where rows are written as they are handed over); raise the writer's error."""
        if not self._async:
            return 0.0
        t = time.perf_counter()
        slots = [self._free.get() for _ in range(_SLOTS)]  # all back: none queued or in write
        for slot in slots:
            self._free.put(slot)
        self._raise()
        return time.perf_counter() - t

    def _stop_thread(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(_END)
            self._thread.join()
            self._thread = None

    # ---- the end of the epoch --------------------------------------------------------------
    def finish(
        self, compute: Callable[[np.ndarray], torch.Tensor], open_source: Callable[[], Any]
    ) -> Cache:
        """Fill the samples no step wrote (``compute(indices)`` -> their activations at
        ``target``), close the sink and return the complete cache (``open_source()`` gives the
        loader's source: the reopened store, or the in-memory tier itself)."""
        self._raise()
        t_finish = time.perf_counter()
        missing = np.flatnonzero(~self.written)
        if missing.size:
            log.info(
                "write-through at boundary %d: %d samples no writing step visited, computed "
                "in a catch-up pass",
                self.target,
                missing.size,
            )
            # on CUDA the pass's rows take the steps' way out (side-stream copies, the writer
            # thread's scatter), so each batch's write overlaps the next batch's forward
            step = min(self.catch_up_batch, self._slot_rows) if self._async else self.catch_up_batch
            # up to a whole epoch's samples through the new frozen units: a cache pass
            with tqdm(
                total=int(missing.size),
                desc=f"cache catch-up at boundary {self.target} ({self.tier})",
                unit="sample",
                disable=not self.progress,
                leave=False,
            ) as bar:
                for start in range(0, missing.size, step):
                    interrupt.check()
                    idx = missing[start : start + step]
                    x = compute(idx)
                    if self._async:
                        self._stage(x, idx)
                    else:
                        x = x.to(self.dtype)
                        self.sink.write_rows(0, idx, x, self.labels[torch.from_numpy(idx)])
                    bar.update(len(idx))
            self.written[missing] = True
        self._stop_thread()  # the writer thread has written every queued row
        self._raise()
        synchronize(self.device)
        self.sink.close()
        source = open_source()
        now = time.perf_counter()
        seconds = now - self._t0
        self.catch_up_samples, self.finish_seconds = int(missing.size), now - t_finish
        nbytes = int(source.nbytes)
        writer = (
            f"; the writer thread waited {self.copy_wait_seconds:.2f} s for copies and wrote "
            f"rows for {self.scatter_seconds:.2f} s"
            if self._async
            else ""
        )
        log.info(
            "write-through at boundary %d: the steps handed over %.0f MB, holding the training "
            "thread %.2f s (%.0f MB/s); catch-up of %d samples and close %.2f s%s",
            self.target,
            self.take_bytes / 1e6,
            self.take_seconds,
            self.take_bytes / 1e6 / max(self.take_seconds, 1e-9),
            self.catch_up_samples,
            self.finish_seconds,
            writer,
        )
        return Cache(
            self.target,
            self.tier,
            source,
            self.fingerprint,
            self.path,
            build_seconds=0.0,  # written by the steps: no pass
            write_rate=nbytes / max(seconds, 1e-9),
            meta=self.meta,
            chain=self.chain,
        )

    def account(self) -> dict[str, Any]:
        """Where writing this cache went, for the epoch's record: the boundary and tier, the
        bytes the steps handed over and the seconds that held the training thread, the writer
        thread's waits for device-to-host copies and its row writes (0 where rows are written
        on the training thread), the catch-up's samples and the seconds of catch-up and
        close (after ``finish``)."""
        return {
            "boundary": self.target,
            "tier": self.tier,
            "bytes": self.take_bytes,
            "take_seconds": round(self.take_seconds, 4),
            "copy_wait_seconds": round(self.copy_wait_seconds, 4),
            "scatter_seconds": round(self.scatter_seconds, 4),
            "catch_up_samples": self.catch_up_samples,
            "finish_seconds": round(self.finish_seconds, 4),
        }

    def abort(self) -> None:
        """Stop without completing (the sink stays incomplete: a store never opens as done)."""
        self._stop_thread()
        abort = getattr(self.sink, "abort", None)
        if abort is not None:
            abort()


__all__ = ["WriteThrough"]
