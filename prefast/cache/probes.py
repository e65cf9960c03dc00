"""Measured probes for the planner: per-unit forward time, and the rates at which each cache
tier takes writes and feeds the loader on this machine (docs/training.md, re-caching)."""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import torch

import store
from prefast import interrupt
from prefast.models import UnitModel
from prefast.monitor import available_host_bytes
from prefast.runtime import TORCH_DTYPES, capture_graph, synchronize
from store import location

PROBE_PREFIX = ".prefast-probe-"  # a rate probe's store, removed by the probe or the next start


class StoreRates(NamedTuple):
    """A store probe's bytes/s (``measure_store_rates``)."""

    write: float  # the steps' writes into a fresh store
    read: float  # through the loader to the device
    ahead_write: float | None  # into a store prepared ahead (None: not measured)


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free device bytes, available host bytes) now; the device figure is 0 off CUDA. It
    counts the blocks torch's caching allocator holds unused (a superseded cache, the freed
    tensors of earlier steps) as free: the driver does not, but torch hands them out, and
    releases them to retry an allocation they do not fit. Without them an explicit --cache
    device went to RAM once the caches written before it had been freed into torch's cache."""
    if device.type != "cuda":
        return 0, available_host_bytes()
    cached = int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
    return int(torch.cuda.mem_get_info(device)[0]) + max(cached, 0), available_host_bytes()


def measure_unit_forward(
    model: UnitModel,
    x: torch.Tensor,
    stop: int,
    device: torch.device,
    repeats: int = 2,
    graphs_amp: str | None = None,
) -> list[float]:
    """Seconds per sample of each unit's eval-mode forward on batch ``x``, for units [0, stop)
    (min over ``repeats``). Units keep their own train/eval flags.

    ``graphs_amp``: time each unit as one replayed CUDA graph (under that ``--amp``), as a run
    whose steps replay graphs runs it. Timed one call at a time from Python, a unit costs its
    kernels' launches, which a graph does not: on an H200 (batch 256, bf16) an eager forward
    took ~0.9 ms per DenseNet-BC-76 unit whatever its size, and three times their sum came
    to 4-8x a replayed step's time (the planner then saw reads and writes as free)."""
    if graphs_amp is not None and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    times = [0.0] * model.num_units
    flags = [u.training for u in model.units]
    try:
        for u in model.units:
            u.eval()
        with torch.no_grad():
            h = x
            for i in range(stop):
                interrupt.check()  # a stop asked for: here, not after every unit's timing
                if graphs_amp is not None:
                    best, h = _replayed(model.units[i], h, device, graphs_amp, repeats)
                    times[i] = best / len(x)
                    continue
                best = math.inf
                out = h
                for _ in range(repeats):
                    synchronize(device)
                    t = time.perf_counter()
                    out = model.units[i](h)
                    synchronize(device)
                    best = min(best, time.perf_counter() - t)
                times[i] = best / len(x)
                h = out
    finally:
        for u, f in zip(model.units, flags, strict=True):
            u.train(f)
    return times


REPLAYS = 5  # replays of a probe's graph per timed round


def _replayed(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    device: torch.device,
    amp: str,
    repeats: int,
    reduce: Callable[[list[float]], float] = min,
) -> tuple[float, torch.Tensor]:
    """Seconds of one replay of ``fn(h)`` captured as a CUDA graph (``reduce``, by default the
    best, of ``repeats`` rounds of REPLAYS replays), and a copy of its output, detached. The
    graph and its memory pool are released before returning. (A copy still attached to a
    training forward's autograd graph kept its parameters' gradient-accumulation nodes, made on
    the capture stream, alive: the next backward through them on another stream, compare.py's
    forward-and-backward warm-up, drew torch's AccumulateGrad stream-mismatch warning.)"""
    graph, out = capture_graph(fn, h, amp)
    rounds = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(REPLAYS):
            graph.replay()
        synchronize(device)
        rounds.append((time.perf_counter() - t) / REPLAYS)
    result = out.detach().clone()
    del out, graph
    return reduce(rounds), result


# A probe runs until it has moved STEADY_BYTES or STEADY_SECONDS have passed, whichever comes
# first, after a warm-up round: short probes (a few batches) measured start-up, not rates. A
# caller may shorten the time (a short run: see CacheManager._probe_limits), and the probe's
# tier then holds at most as many samples as the run's cache would.
STEADY_BYTES = 500_000_000
STEADY_SECONDS = 1.0


def _steady(
    round_: Callable[[int], int],
    device: torch.device,
    off_clock: Callable[[], float] = lambda: 0.0,
    seconds: float = STEADY_SECONDS,
) -> tuple[int, float, float]:
    """``round_(k)`` (which moves and returns some bytes) repeated until it has moved
    STEADY_BYTES or ``seconds`` have passed (at least one round is counted); round 0 warms up
    and is not counted. ``off_clock()``: the seconds the rounds spent so far on work a run
    does elsewhere, kept out of the thresholds' time. Returns (bytes moved, seconds on the
    clock, seconds off it)."""
    round_(0)
    synchronize(device)
    t, skipped = time.perf_counter(), off_clock()
    moved, k = 0, 1
    while True:
        interrupt.check()  # a stop asked for: at the next round, not after every probe
        moved += round_(k)
        k += 1
        synchronize(device)
        off = off_clock() - skipped
        elapsed = time.perf_counter() - t - off
        if moved >= STEADY_BYTES or elapsed >= seconds:
            return moved, max(elapsed, 1e-9), off


def _steady_rate(
    round_: Callable[[int], int], device: torch.device, seconds: float = STEADY_SECONDS
) -> float:
    """Bytes/s of ``round_`` repeated until steady (``_steady``)."""
    moved, elapsed, _ = _steady(round_, device, seconds=seconds)
    return moved / elapsed


def _probe_samples(sample_bytes: int, batch: int, cap_bytes: int, max_samples: int | None) -> int:
    """Samples of a probe's tier: up to ``cap_bytes`` and 64 batches, and at most
    ``max_samples`` (the run's cache), but at least two batches."""
    n = min(64 * batch, cap_bytes // sample_bytes)
    if max_samples is not None:
        n = min(n, max_samples)
    return max(2 * batch, n)


def _loader_rate(
    source: Any, batch: int, device: torch.device, seconds: float = STEADY_SECONDS
) -> float:
    """Bytes/s delivered to ``device`` by a StoreLoader over ``source`` as training reads it:
    shuffled epochs, gather, pinned staging and the host-to-device copy (a prefetch thread on
    CUDA, the caller's thread on a CPU device, as the trainer runs it)."""
    loader = store.StoreLoader(
        source, batch_size=batch, seed=0, device=device, prefetch=2 if device.type == "cuda" else 0
    )

    def epoch(e: int) -> int:
        loader.set_epoch(e)
        n = 0
        for x, _ in loader:
            n += x.numel() * x.element_size()
        return n

    return _steady_rate(epoch, device, seconds)


def _write_rate(
    sink: Any,
    x: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    device: torch.device,
    seconds: float = STEADY_SECONDS,
) -> float:
    """Bytes/s of writing ``x``-sized batches over a sink of ``len(labels)`` samples: rows in a
    shuffled order where the sink takes rows (write-through), whole ranges otherwise."""
    n = len(labels)
    rows = getattr(sink, "supports_rows", False)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()

    def fill(_: int) -> int:
        moved = 0
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            if rows:
                idx = order[start:stop]
                sink.write_rows(0, idx, x[: stop - start], labels[idx])
            else:
                sink.write(0, start, x[: stop - start], labels[start:stop])
            moved += (stop - start) * x[0].numel() * x.element_size()
        return moved

    return _steady_rate(fill, device, seconds)


def measure_tier_rates(
    sample_shape: tuple[int, ...],
    dtype: str,
    device: torch.device,
    batch: int,
    tiers: Collection[str] = ("ram", "device"),
    seconds: float = STEADY_SECONDS,
    max_samples: int | None = None,
) -> dict[str, tuple[float, float]]:
    """(write, read) bytes/s of the in-memory ``tiers`` (of ``ram`` and ``device``), measured
    now (steady, see STEADY_*; each for at most ``seconds``): writes copy a device batch into
    the tier, reads go through the loader to ``device``. A probe's tier holds up to ~128 MiB
    and at most ``max_samples`` samples. Off CUDA the device tier is host memory: it gets
    ram's figures."""
    sample_bytes = math.prod(sample_shape) * TORCH_DTYPES[dtype].itemsize
    n = _probe_samples(sample_bytes, batch, 128 << 20, max_samples)
    x = torch.zeros((batch, *sample_shape), dtype=TORCH_DTYPES[dtype], device=device)
    labels = torch.zeros(n, dtype=torch.int64)
    out: dict[str, tuple[float, float]] = {}
    caches: dict[str, Callable[[], store.TensorCache]] = {}
    if "ram" in tiers or ("device" in tiers and device.type != "cuda"):
        caches["ram"] = lambda: store.RamCache.empty(n, 1, sample_shape, dtype, pin=False)
    if "device" in tiers and device.type == "cuda":
        caches["device"] = lambda: store.DeviceCache.empty(n, 1, sample_shape, dtype, device=device)
    for name, make in caches.items():
        cache = make()
        write = _write_rate(cache, x, labels, batch, device, seconds)
        out[name] = (write, _loader_rate(cache, batch, device, seconds))
    if "device" in tiers and "device" not in out:
        out["device"] = out["ram"]  # on a CPU run the device tier is host memory too
    return {k: v for k, v in out.items() if k in tiers}


def _flush_files(path: Path | str) -> None:
    """``fsync`` every file of a local store (a remote one is left to its object store)."""
    local = location.as_local(path)
    if local is None:
        return
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file() and not p.is_symlink()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def measure_store_rates(
    device: torch.device,
    directory: Path | str,
    sample_shape: tuple[int, ...],
    dtype: str,
    codec: str | None,
    batch: int,
    flush: bool = False,
    prepared: bool = False,
    seconds: float = STEADY_SECONDS,
    max_samples: int | None = None,
) -> StoreRates:
    """Bytes/s of writing and reading a temporary store (up to 256 MiB and ``max_samples``
    samples) in ``directory`` with the run's dtype and codec, steady (see STEADY_*; each of
    the write and the read for at most ``seconds``): written the way the run writes (rows in
    a shuffled order for write-through, whole chunks otherwise) and read through the loader
    to ``device``. ``flush``: each written store is also flushed to disk (``fsync`` of its
    files), so the write rate carries the kernel's writeback of what a cache writes; a run on
    a CPU does that writeback on the cores it trains on (on a file system in memory it is
    free). ``prepared``: each store's files are first faulted in (``prepare_rows``), timed
    apart: ``write`` counts that time, ``ahead_write`` leaves it out, as for a store a run on
    CUDA prepares ahead while the device trains (``prefast.cache.ahead``); None unless
    prepared. The probe's store is removed after."""
    # A fresh, unique name: nothing of the user's is ever overwritten or removed, and two
    # runs probing one folder do not meet.
    path = location.join(directory, f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    sample_bytes = math.prod(sample_shape) * TORCH_DTYPES[dtype].itemsize
    n = _probe_samples(sample_bytes, batch, 256 << 20, max_samples)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn((batch, *sample_shape), generator=g)).to(TORCH_DTYPES[dtype])
    labels = torch.zeros(n, dtype=torch.int64)
    created = False
    ahead = 0.0  # seconds spent preparing stores (paid ahead in a run: off the clock)

    def one_store(k: int) -> int:
        nonlocal created, ahead
        size = n if k else max(2 * batch, n // 4)  # round 0 warms the paths up: a smaller store
        w = store.create(
            path,
            sample_shape=sample_shape,
            num_samples=size,
            dtype=dtype,
            codec=codec,
            overwrite=k > 0,
        )
        created = True
        with w:
            rows = getattr(w, "supports_rows", False)
            if rows and prepared:
                t = time.perf_counter()
                w.prepare_rows()
                ahead += time.perf_counter() - t
            order = torch.randperm(size, generator=torch.Generator().manual_seed(k)).numpy()
            for start in range(0, size, batch):
                stop = min(start + batch, size)
                if rows:
                    idx = order[start:stop]
                    w.write_rows(0, idx, x[: stop - start], labels[idx])
                else:
                    w.write(0, start, x[: stop - start], labels[start:stop])
        if flush:
            _flush_files(path)
        return size * sample_bytes

    try:
        moved, clock, prepare = _steady(one_store, device, lambda: ahead, seconds)
        s = store.open(path)
        read = _loader_rate(s, batch, device, seconds)
        s.close()
    finally:
        if created:  # only what this probe made, and only if it is a store
            location.remove_store(path)
    return StoreRates(
        write=moved / (clock + prepare),
        read=read,
        ahead_write=moved / clock if prepared else None,
    )


__all__ = [
    "StoreRates",
    "free_memory",
    "measure_store_rates",
    "measure_tier_rates",
    "measure_unit_forward",
]
