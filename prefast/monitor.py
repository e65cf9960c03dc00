"""Resource readings for metrics: peak private host memory and peak device memory."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import torch

from prefast.runtime import synchronize


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a /proc file, in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_anon_bytes() -> int:
    """Private (anonymous) resident memory of this process from /proc/self/status, in bytes;
    page cache behind memory maps is not counted. -1 where /proc is unavailable."""
    v = _proc_kib("/proc/self/status", "RssAnon")
    return -1 if v is None else v


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); a conservative 1 GiB where unreadable."""
    v = _proc_kib("/proc/meminfo", "MemAvailable")
    return (1 << 30) if v is None else v


class PeakMemory:
    """Samples RssAnon on a background thread every ``interval`` seconds and keeps the peak;
    ``reset()`` starts a new window (e.g. per epoch)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._peak = rss_anon_bytes()
        self.samples = 1  # readings taken
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            v = rss_anon_bytes()
            with self._lock:
                self._peak = max(self._peak, v)
                self.samples += 1

    def start(self) -> PeakMemory:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def peak(self) -> int:
        with self._lock:
            self._peak = max(self._peak, rss_anon_bytes())
            return self._peak

    def reset(self) -> None:
        with self._lock:
            self._peak = rss_anon_bytes()

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def peak_device_bytes(device: torch.device, reset: bool = False) -> int:
    """Peak memory allocated by torch on a CUDA device since the last reset; 0 elsewhere."""
    if device.type != "cuda":
        return 0
    v = int(torch.cuda.max_memory_allocated(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return v


class Stopwatch:
    """Accumulates seconds across ``with`` blocks, synchronising the device at each edge."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0


__all__ = [
    "PeakMemory",
    "Stopwatch",
    "available_host_bytes",
    "peak_device_bytes",
    "rss_anon_bytes",
    "synchronize",
]
