"""Measured probes for the planner: per-unit forward time, and the rates at which each cache
tier takes writes and feeds the loader on this machine (DESIGN section 4)."""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

import store
from prefast.models import UnitModel
from prefast.monitor import available_host_bytes
from prefast.runtime import TORCH_DTYPES, synchronize
from store import location

PROBE_PREFIX = ".prefast-probe-"  # a rate probe's store, removed by the probe or the next start


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free device bytes, available host bytes) now; the device figure is 0 off CUDA."""
    free_device = int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0
    return free_device, available_host_bytes()


def measure_unit_forward(
    model: UnitModel, x: torch.Tensor, stop: int, device: torch.device, repeats: int = 2
) -> list[float]:
    """Seconds per sample of each unit's eval-mode forward on batch ``x``, for units [0, stop)
    (min over ``repeats``). Units keep their own train/eval flags."""
    times = [0.0] * model.num_units
    flags = [u.training for u in model.units]
    try:
        for u in model.units:
            u.eval()
        with torch.no_grad():
            h = x
            for i in range(stop):
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


def _loader_rate(source: Any, batch: int, device: torch.device, epochs: int = 2) -> float:
    """Bytes/s delivered to ``device`` by a StoreLoader over ``source``: gather, pinned staging
    and the host-to-device copy, as training reads it (best of ``epochs`` shuffled epochs)."""
    loader = store.StoreLoader(source, batch_size=batch, seed=0, device=device, prefetch=2)
    best, nbytes = math.inf, 0
    for e in range(epochs + 1):  # the first epoch warms up
        loader.set_epoch(e)
        synchronize(device)
        t = time.perf_counter()
        nbytes = 0
        for x, _ in loader:
            nbytes += x.numel() * x.element_size()
        synchronize(device)
        if e:
            best = min(best, time.perf_counter() - t)
    return nbytes / max(best, 1e-9)


def measure_tier_rates(
    sample_shape: tuple[int, ...], dtype: str, device: torch.device, batch: int
) -> dict[str, tuple[float, float]]:
    """(write, read) bytes/s of the in-memory tiers, measured now: writes copy a device batch
    into the tier, reads go through the loader to ``device``."""
    n = 8 * batch
    x = torch.zeros((batch, *sample_shape), dtype=TORCH_DTYPES[dtype], device=device)
    labels = torch.zeros(n, dtype=torch.int64)
    out: dict[str, tuple[float, float]] = {}
    tiers: dict[str, store.TensorCache] = {
        "ram": store.RamCache.empty(n, 1, sample_shape, dtype, pin=False)
    }
    if device.type == "cuda":
        tiers["device"] = store.DeviceCache.empty(n, 1, sample_shape, dtype, device=device)
    for name, cache in tiers.items():
        synchronize(device)
        t = time.perf_counter()
        for start in range(0, n, batch):
            cache.write(0, start, x, labels[start : start + batch])
        synchronize(device)
        write = n * x[0].numel() * x.element_size() / max(time.perf_counter() - t, 1e-9)
        out[name] = (write, _loader_rate(cache, batch, device))
    if "device" not in out:
        out["device"] = out["ram"]  # on a CPU run the device tier is host memory too
    return out


def measure_store_rates(
    device: torch.device,
    directory: Path | str,
    sample_shape: tuple[int, ...],
    dtype: str,
    codec: str | None,
    batch: int,
) -> tuple[float, float]:
    """(write, read) bytes/s of a temporary store (about 64 MiB) in ``directory`` with the run's
    dtype and codec, read through the loader to ``device``: a measured probe, removed after."""
    # A fresh, unique name: nothing of the user's is ever overwritten or removed, and two
    # runs probing one folder do not meet.
    path = location.join(directory, f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    sample_bytes = math.prod(sample_shape) * TORCH_DTYPES[dtype].itemsize
    n = max(2 * batch, min(8 * batch, (64 << 20) // sample_bytes))
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn((batch, *sample_shape), generator=g)).to(TORCH_DTYPES[dtype])
    labels = torch.zeros(n, dtype=torch.int64)
    created = False
    try:
        t = time.perf_counter()
        with store.create(
            path, sample_shape=sample_shape, num_samples=n, dtype=dtype, codec=codec
        ) as w:
            created = True
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                w.write(0, start, x[: stop - start], labels[start:stop])
        write = n * sample_bytes / max(time.perf_counter() - t, 1e-9)
        s = store.open(path)
        read = _loader_rate(s, batch, device)
        s.close()
    finally:
        if created:  # only what this probe made, and only if it is a store
            location.remove_store(path)
    return write, read


__all__ = [
    "free_memory",
    "measure_store_rates",
    "measure_tier_rates",
    "measure_unit_forward",
]
