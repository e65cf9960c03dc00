"""Shared helpers for the benchmark scripts: the environment record saved beside every result,
process memory read from ``/proc/self/status``, median/spread summaries and the JSON sink.

Memory is reported as **RssAnon**, the process's private anonymous resident memory. Pages of a
memory-mapped file (``RssFile``) sit in the page cache, are reclaimable and shared, and are not
counted; ``VmHWM`` (the kernel's peak RSS) does count them, so it is recorded for reference only.
The kernel keeps no peak of RssAnon, so :class:`RssAnonSampler` samples it on a thread.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefast.monitor import PeakMemory, rss_anon_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

MIB = 1024**2
GB = 1e9  # throughputs are decimal GB/s


# ---- environment --------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip()


def git_commit() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked or untracked files differ from it
    (results under ``benchmarks/results`` excluded); ``unknown`` outside a git checkout.
    ``PREFAST_COMMIT``, where set, wins: a copy of the tree on a lent machine carries a
    ``.git`` of another commit (gpu.sh's command names the commit it was copied from)."""
    given = os.environ.get("PREFAST_COMMIT")
    if given:
        return given
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return head + ("-dirty" if status else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        m = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(m, "__version__", "unknown"))


def device_record(device_type: str | None = None) -> dict[str, Any]:
    """The compute device: the CUDA device when one is visible (and the run's
    ``device_type`` is not ``cpu``), else the CPU model and cores."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    d: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and device_type != "cpu":
        d["name"] = torch.cuda.get_device_name(0)
        d["cuda"] = torch.version.cuda
    else:
        d["name"] = f"CPU: {d['cpu']} ({cores} cores)"
    return d


def environment(device_type: str | None = None) -> dict[str, Any]:
    """What a result needs beside it to be reproducible; no host name. ``device_type``: the
    run's (``cpu`` or ``cuda``; default: CUDA where visible)."""
    mem_total = read_proc_status("/proc/meminfo").get("MemTotal")
    return {
        "commit": git_commit(),
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "zarr", "numcodecs", "numpy")},
        "commit_given": bool(os.environ.get("PREFAST_COMMIT")),
        "device": device_record(device_type),
        "mem_total_bytes": mem_total,
        "loadavg_1_5_15": list(os.getloadavg()),
        "argv": sys.argv[1:],
    }


# ---- memory -------------------------------------------------------------------------------
def read_proc_status(path: str = "/proc/self/status") -> dict[str, int]:
    """The ``kB`` fields of a /proc status-like file, in bytes (empty where /proc is absent)."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def current_rss_anon() -> int:
    """Private anonymous resident bytes of this process now (-1 where unknown)."""
    return rss_anon_bytes()


def peak_rss() -> int:
    """``VmHWM``: peak total RSS of this process, file-backed mapped pages included (-1 where
    unknown). An upper bound on private memory, not a measure of it."""
    return read_proc_status().get("VmHWM", -1)


class RssAnonSampler:
    """Peak RssAnon between entering and leaving the context, sampled every ``interval_s`` on a
    thread (``prefast.monitor.PeakMemory``); ``peak`` in bytes.

    >>> with RssAnonSampler() as m:
    ...     work()
    >>> m.peak
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self._mem = PeakMemory(interval_s)
        self.peak = -1
        self.samples = 0

    def __enter__(self) -> RssAnonSampler:
        self._mem.reset()
        self._mem.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mem.stop()
        self.peak = self._mem.peak()
        self.samples = self._mem.samples


# ---- statistics ---------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the raw values of repeated measurements."""
    if not values:
        raise ValueError("summarize() needs at least one value")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def spread(s: dict[str, Any], fmt: str = "{:.3g}") -> str:
    """``min-max`` of a :func:`summarize` record as a short string."""
    return f"{fmt.format(s['min'])}-{fmt.format(s['max'])}"


class Timer:
    """``with Timer() as t: ...``; ``t.s`` is the elapsed wall time (perf_counter) in seconds."""

    def __enter__(self) -> Timer:
        self.s = 0.0
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._t0


# ---- output -------------------------------------------------------------------------------
def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(p)
    return p


__all__ = [
    "GB",
    "MIB",
    "REPO",
    "RESULTS_DIR",
    "RssAnonSampler",
    "Timer",
    "current_rss_anon",
    "device_record",
    "environment",
    "git_commit",
    "peak_rss",
    "read_proc_status",
    "spread",
    "summarize",
    "write_json",
]
