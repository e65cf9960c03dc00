"""A store created ahead of the epoch whose training steps write it (write-through).

Most of the time of a shuffled row write into a fresh raw store is the kernel faulting the
chunk files' pages into the page cache, not the copy (``benchmarks/bench_feed.py``, "where a
row write's time goes"). Where the host works beside the device (CUDA), that part can be paid
before the writing epoch: ``AheadStore`` creates the store and faults its files in on a
thread while the device trains, and the steps that write it later only copy rows.

The store is created without provenance, since the units it will hold may still be training;
``take`` gives it the provenance when its writing starts. A store that is never taken (the
plan changed, the run stopped) is deleted by ``drop``. Until it is written and closed it is
incomplete, so a killed run never leaves it looking like a cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import store
from prefast.cache.identity import delete_store

log = logging.getLogger(__name__)


class AheadStore:
    """The store of boundary ``target`` at ``path``, made by ``create()`` and prepared for
    row writes (``StoreWriter.prepare_rows``) on a thread that starts at once."""

    def __init__(
        self, target: int, path: Path | str, create: Callable[[], store.StoreWriter]
    ) -> None:
        self.target = target
        self.path = path
        self.writer: store.StoreWriter | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0  # the thread's time: create and fault in
        self.prepared = False  # whether the files were faulted in (False: rows go by pwrite)
        self._thread = threading.Thread(
            target=self._run, args=(create,), name=f"store-ahead-{target}", daemon=True
        )
        self._thread.start()

    def _run(self, create: Callable[[], store.StoreWriter]) -> None:
        t = time.perf_counter()
        try:
            self.writer = create()
            self.prepared = self.writer.prepare_rows()
        except BaseException as e:  # reported by take(); the store is then made the usual way
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t

    def take(self, meta: dict[str, Any]) -> store.StoreWriter | None:
        """The prepared writer, given its provenance ``meta``, once the thread is done (the
        caller waits for what is left of it); None where preparing failed (the store is
        deleted and the failure logged: the caller creates the store itself)."""
        t = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - t
        if self.error is not None or self.writer is None:
            log.warning(
                "preparing the store at %s ahead failed (%r); it is created now",
                self.path,
                self.error,
            )
            self.drop()
            return None
        self.writer.set_meta(meta)
        writer, self.writer = self.writer, None
        log.info(
            "boundary %d: the store was created%s ahead, on a thread (%.2f s); the step waited "
            "%.2f s for it",
            self.target,
            " and its files faulted in" if self.prepared else "",
            self.seconds,
            waited,
        )
        return writer

    def drop(self) -> None:
        """Wait for the thread, then abort the writer and delete the store (this run's own,
        never complete). A failure to delete is logged, not raised: the caller goes on."""
        self._thread.join()
        try:
            if self.writer is not None:
                self.writer.abort()
                self.writer = None
            delete_store(self.path)
        except Exception as e:  # e.g. a folder a failed create left half made
            log.warning("could not delete the store prepared ahead at %s: %s", self.path, e)


__all__ = ["AheadStore"]
