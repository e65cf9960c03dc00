"""Resource readings for metrics: peak private host memory and peak device memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
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


PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v2 and v1 files: (limit, usage, the memory.stat line of page cache the kernel drops first)
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "inactive_file"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def _cgroup_int(path: Path, key: str | None = None) -> int | None:
    """The integer in a cgroup file (the ``key N`` line of a memory.stat where ``key`` is
    given); None where absent, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text()
        if key is None:
            return int(text.split()[0])
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_memory_headroom(proc_cgroup: str | None = None, root: str | None = None) -> int | None:
    """Bytes this process's memory cgroup, and each above it, can still take before its limit
    (the limit less the usage, the inactive page cache the kernel reclaims first not counted),
    the least of them; None where no limit applies or none can be read. A container, a SLURM
    job or a systemd unit limits memory this way, and /proc/meminfo does not show it.
    ``proc_cgroup``, ``root``: PROC_CGROUP and CGROUP_ROOT by default."""
    root = root or CGROUP_ROOT
    try:
        lines = Path(proc_cgroup or PROC_CGROUP).read_text().splitlines()
    except OSError:
        return None
    headroom: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2, mounted at the root or (hybrid) at root/unified
            base = Path(root)
            if not (base / "cgroup.controllers").exists():
                base = base / "unified"
            files = _CGROUP_FILES["v2"]
        elif "memory" in controllers.split(","):
            base, files = Path(root) / "memory", _CGROUP_FILES["v1"]
        else:
            continue
        here = base / rel.strip("/")
        if not here.is_dir():  # a container's own view: its cgroup is the mount's root
            here = base
        for d in (here, *here.parents):
            limit = _cgroup_int(d / files[0])
            if limit is not None and limit < (1 << 60):  # v1 writes "no limit" as ~2**63
                usage = _cgroup_int(d / files[1]) or 0
                inactive = _cgroup_int(d / "memory.stat", files[2]) or 0
                free = max(0, limit - max(0, usage - inactive))
                headroom = free if headroom is None else min(headroom, free)
            if d == base:
                break
    return headroom


def available_host_bytes() -> int:
    """Memory this process may still take (bytes): MemAvailable from /proc/meminfo (a
    conservative 1 GiB where unreadable), or less where a memory cgroup's limit is nearer
    (``cgroup_memory_headroom``)."""
    v = _proc_kib("/proc/meminfo", "MemAvailable")
    avail = (1 << 30) if v is None else v
    try:
        cg = cgroup_memory_headroom()
    except OSError:  # a cgroup tree this process may not look into: no limit it can see
        cg = None
    return avail if cg is None else min(avail, cg)


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
