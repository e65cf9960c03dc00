"""The cache of frozen-prefix outputs: fingerprints, tier choice, cache passes and the
re-caching decision (DESIGN sections 3 and 4).

A cache at boundary ``b`` holds ``units[0:b]``'s output for every training sample and view,
computed **after** the freeze, in eval mode, under no_grad, from the final frozen weights.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import store
import store.layout
from prefast.data import Augment, ImageData, make_batch, view_key
from prefast.distributed import DistContext
from prefast.errors import CacheError
from prefast.models import UnitModel
from prefast.monitor import synchronize
from store import location

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STORE_PREFIX = "boundary-"


# ---- identity of a cache ---------------------------------------------------------------------
def fingerprint(
    model: UnitModel, boundary: int, data_desc: dict[str, Any], cache_desc: dict[str, Any]
) -> str:
    """SHA-256 over what produced a cache: the architecture, the boundary, the frozen units'
    weights and buffers, the data (dataset, split, subset, transform) and the cache's views,
    seeds and dtype."""
    h = hashlib.sha256()
    head = {"model": model.config, "boundary": boundary, "data": data_desc, "cache": cache_desc}
    h.update(json.dumps(head, sort_keys=True).encode())
    for i in range(boundary):
        for name, t in sorted(model.units[i].state_dict().items()):
            h.update(f"{i}.{name}".encode())
            h.update(
                t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
    return h.hexdigest()


def store_path(cache_dir: Path | str, boundary: int) -> Path | str:
    """The store of boundary ``boundary`` in a cache folder (a local path or an fsspec URL)."""
    return location.join(cache_dir, f"{STORE_PREFIX}{boundary:03d}")


def check_cache_dir(cache_dir: Path | str, model_config: dict[str, Any]) -> None:
    """Refuse a cache folder that holds another model's stores (never used silently)."""
    local = location.as_local(cache_dir)
    if local is not None and local.exists() and not local.is_dir():
        raise CacheError(f"--cache-dir: {cache_dir} exists and is not a directory")
    for child in location.children(cache_dir):
        if not location.is_store(child):
            continue
        try:
            s = store.open(child, partial=True)
        except store.StoreError as e:
            raise CacheError(
                f"--cache-dir: {child} is not a usable store ({e}); remove it or use another --cache-dir"
            ) from None
        other = s.meta.get("model")
        if other is not None and other != model_config:
            raise CacheError(
                f"--cache-dir: {cache_dir} holds a store from another model ({os.path.basename(os.fspath(child))}: "
                f"{other.get('name', other)} {_short(other)}, this run: {model_config.get('name')} "
                f"{_short(model_config)}); use another --cache-dir or remove that store"
            )


def _short(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "name")


# ---- the cache in use ---------------------------------------------------------------------------
@dataclass
class Cache:
    """A built cache: its boundary, tier, source for the loader, and provenance."""

    boundary: int
    tier: str  # "device" | "ram" | "zarr"
    source: Any  # store.ActivationStore | store.RamCache | store.DeviceCache
    fingerprint: str
    path: Path | str | None = None  # a local path or an fsspec URL
    build_seconds: float = 0.0
    write_rate: float = 0.0  # bytes/s achieved by the pass that built it
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.source.nbytes)

    def delete(self, remove_files: bool = True) -> None:
        """Release the cache; a zarr store is removed from disk when ``remove_files`` (under
        torchrun only rank 0 removes the shared store)."""
        if isinstance(self.source, store.ActivationStore):
            self.source.close()
        if (
            remove_files
            and self.tier == "zarr"
            and self.path is not None
            and location.exists(self.path)
        ):
            location.remove_store(self.path)
            log.info("deleted superseded store %s", self.path)
        self.source = None


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); a conservative 1 GiB where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


def choose_tier(requested: str, nbytes: int, device: torch.device, fraction: float) -> str:
    """``auto``: device if the cache fits ``fraction`` of free device memory, else ram if it
    fits ``fraction`` of available host memory, else zarr."""
    if requested != "auto":
        if requested == "device" and device.type == "cpu":
            return "device"  # a CPU device cache is an in-memory tensor, like ram
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= fraction * free:
            return "device"
    if nbytes <= fraction * available_host_bytes():
        return "ram"
    return "zarr"


# ---- cache passes -----------------------------------------------------------------------------
@contextlib.contextmanager
def _autocast(device: torch.device, amp: str) -> Iterator[None]:
    if amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


@dataclass(frozen=True)
class PassSpec:
    """How to compute a cache: the image side and the target's format."""

    train: ImageData
    augment: Augment
    views: int
    seed: int
    dtype: str
    codec: str | None
    batch_size: int
    amp: str
    channels_last: bool


def _open_sink(
    tier: str,
    path: Path | str | None,
    n: int,
    spec: PassSpec,
    sample_shape: tuple[int, ...],
    chunk: int,
    device: torch.device,
    meta: dict[str, Any],
    dist: DistContext,
) -> Any:
    if tier == "zarr":
        assert path is not None
        kw: dict[str, Any] = dict(
            sample_shape=sample_shape,
            num_samples=n,
            views=spec.views,
            dtype=spec.dtype,
            codec=spec.codec,
            chunk_samples=chunk,
            meta=meta,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        # rank 0 creates the store; the others join it once it exists
        w = store.create(path, overwrite=True, **kw) if dist.is_main else None
        dist.barrier("creating the store")
        return w if w is not None else store.create(path, resume=True, **kw)
    if tier == "device":
        return store.DeviceCache.empty(
            n, spec.views, sample_shape, spec.dtype, device=device, meta=meta
        )
    return store.RamCache.empty(n, spec.views, sample_shape, spec.dtype, pin=False, meta=meta)


def build_cache(
    model: UnitModel,
    boundary: int,
    prev: Cache | None,
    spec: PassSpec,
    tier: str,
    path: Path | str | None,
    device: torch.device,
    fp: str,
    meta: dict[str, Any],
    progress: bool = True,
    dist: DistContext | None = None,
) -> Cache:
    """One pass over every sample and view: ``units[b_prev:boundary]`` in eval mode, under
    no_grad, from the previous cache (or the images when there is none), into a new tier.

    The pass walks the store's chunks (``chunk_samples`` from the store's default chunking),
    each in batches of ``spec.batch_size``. Under torchrun rank ``r`` computes the chunks
    ``c % world_size == r`` of every view: a zarr store gets disjoint chunk files from each rank
    and rank 0 marks it complete after a barrier; an in-memory tier is completed on every rank
    by broadcasting each chunk from the rank that computed it. The batches are the same
    whatever the number of ranks, so the cache is bit-identical to a single process's."""
    dist = dist or DistContext()
    b0 = prev.boundary if prev is not None else 0
    if not b0 < boundary <= model.num_units:
        raise CacheError(f"cannot build a cache at boundary {boundary} from boundary {b0}")
    for i, u in enumerate(model.units[:boundary]):
        if u.training or any(p.requires_grad for p in u.parameters()):
            raise CacheError(
                f"unit {model.unit_names[i]} is not frozen; caches hold frozen units only"
            )
    n = len(spec.train)
    in_shape = tuple(spec.train.images.shape[1:])
    sample_shape = model.boundary_shape(boundary, in_shape)
    chunk = store.layout.default_chunk_samples(sample_shape, spec.dtype, n)
    num_chunks = -(-n // chunk)
    mine = range(dist.rank, num_chunks, dist.world_size)
    labels = spec.train.labels
    t0 = time.perf_counter()
    sink = _open_sink(tier, path, n, spec, sample_shape, chunk, device, meta, dist)
    bs = spec.batch_size
    bar = tqdm(
        total=spec.views * sum(math.ceil((min((c + 1) * chunk, n) - c * chunk) / bs) for c in mine),
        desc=f"cache pass -> {model.unit_names[boundary - 1]} ({tier})",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    try:
        with sink, torch.no_grad(), _autocast(device, spec.amp):
            for v in range(spec.views):
                aug = (
                    spec.augment.params(view_key(spec.seed, v), n)
                    if not spec.augment.identity
                    else None
                )
                for c in mine:
                    for start in range(c * chunk, min((c + 1) * chunk, n), bs):
                        idx = np.arange(start, min(start + bs, (c + 1) * chunk, n))
                        if prev is None:
                            h, _ = make_batch(spec.train, idx, aug, device)
                        else:
                            h = prev.source.read(v, idx).to(device, non_blocking=True).float()
                        if spec.channels_last and h.dim() == 4:
                            h = h.contiguous(memory_format=torch.channels_last)
                        out = model.forward_range(h, b0, boundary)
                        sink.write(v, start, out.contiguous(), labels[start : start + len(idx)])
                        bar.update(1)
    finally:
        bar.close()
    synchronize(device)
    if dist.enabled:
        if tier == "zarr":
            dist.barrier("finishing the sharded store")
            if dist.is_main:
                assert path is not None
                store.finalize(path)
            dist.barrier("marking the store complete")
        else:
            for v in range(spec.views):
                for c in range(num_chunks):
                    dist.broadcast_tensor(
                        sink.data[v, c * chunk : min((c + 1) * chunk, n)],
                        src=c % dist.world_size,
                        what="sharing the cache",
                    )
            sink.labels.copy_(labels)
    seconds = time.perf_counter() - t0
    source: Any = store.open(path) if path is not None else sink
    nbytes = spec.views * n * math.prod(sample_shape) * TORCH_DTYPES[spec.dtype].itemsize
    log.info(
        "cached boundary %d (%s) for %d samples x %d views: %s, %.1f MiB in %.2f s",
        boundary,
        model.unit_names[boundary - 1],
        n,
        spec.views,
        tier if path is None else f"{tier} at {path}",
        nbytes / 2**20,
        seconds,
    )
    return Cache(boundary, tier, source, fp, path, seconds, nbytes / max(seconds, 1e-9), meta)


def provenance(
    model: UnitModel, boundary: int, data_desc: dict[str, Any], cache_desc: dict[str, Any], fp: str
) -> dict[str, Any]:
    """The JSON-able ``meta`` of a store: readable provenance plus the fingerprint."""
    return {
        "model": model.config,
        "boundary": boundary,
        "boundary_unit": model.unit_names[boundary - 1],
        "data": data_desc,
        **cache_desc,
        "fingerprint": fp,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def open_matching(path: Path | str, fp: str) -> store.ActivationStore | None:
    """The complete store at ``path`` if its fingerprint equals ``fp``, else None (with a log
    line saying why)."""
    if not location.is_store(path):
        return None
    try:
        s = store.open(path)
    except store.StoreError as e:
        log.warning("store %s cannot be reused (%s); rebuilding it", path, e)
        return None
    if s.meta.get("fingerprint") != fp:
        log.warning(
            "store %s was built from other weights or data (fingerprint differs); rebuilding it",
            path,
        )
        return None
    return s


# ---- when re-caching pays (DESIGN section 4) --------------------------------------------------
@dataclass
class CostModel:
    """Per-sample costs in seconds, measured on this run's device."""

    unit_fwd: list[float]  # forward of each unit (eval, no_grad)
    image: float  # producing one augmented, normalised input sample
    read_rate: dict[str, float]  # bytes/s by tier
    write_rate: dict[str, float]  # bytes/s by tier

    def read(self, tier: str, nbytes: int) -> float:
        return nbytes / self.read_rate[tier]

    def write(self, tier: str, nbytes: int) -> float:
        return nbytes / self.write_rate[tier]

    def fwd(self, b0: int, b1: int) -> float:
        return float(sum(self.unit_fwd[b0:b1]))


def plan_boundary(policy: str, boundary: int, frontier: int, cut_points: Sequence[int]) -> int:
    """The boundary to cache at now for the fixed policies (``boundary`` itself means: keep
    the current cache): ``every`` follows the frontier; ``transitions`` moves only to the
    model's cut points (cheap-to-store boundaries). ``auto`` is ``plan_boundaries``."""
    if frontier <= boundary:
        return boundary
    if policy == "every":
        return frontier
    if policy == "transitions":
        cands = [c for c in cut_points if boundary < c <= frontier]
        return max(cands) if cands else boundary
    raise CacheError(f"--recache-policy: {policy!r} is planned by plan_boundaries")


def plan_boundaries(
    events: Sequence[tuple[int, int]],
    total_iterations: int,
    batch_size: int,
    num_samples: int,
    views: int,
    cost: CostModel,
    sample_bytes: Sequence[int],
    tier_of: Any,
    boundary: int = 0,
    tier: str | None = None,
) -> list[int]:
    """The cheapest boundary to hold after each freeze event, over the rest of the run.

    ``events`` are the schedule's remaining freeze points ``(iteration, frontier)`` in order
    (known in advance: the schedule is deterministic). Between event e and the next, every
    sample costs ``read(b) + fwd(b..frontier_e)`` (read(0) is making the image); moving from
    ``b`` to ``b'`` at an event costs one pass ``N * V * (read(b) + fwd(b..b') + write(b'))``.
    A dynamic programme over (event, boundary) minimises the sum, so a short-lived boundary
    inside a dense block is skipped when a transition soon replaces it. ``boundary``/``tier``
    describe the cache held now. Costs are per sample in seconds (``CostModel``); the part of
    each step that every plan shares (the trainable units) is left out."""
    if not events:
        return []
    # tier_of may query free host/device memory: ask once per boundary, not per DP step
    tiers = [tier_of(b) for b in range(len(sample_bytes))]

    def read(b: int) -> float:
        if b == 0:
            return cost.image
        t = tier if (b == boundary and tier is not None) else tiers[b]
        return cost.read(t, sample_bytes[b])

    ends = [it for it, _ in events[1:]] + [total_iterations]
    best: dict[int, float] = {boundary: 0.0}
    back: list[dict[int, int]] = []
    for (it, frontier), end in zip(events, ends, strict=True):
        samples = max(0, end - it) * batch_size
        nxt: dict[int, float] = {}
        choice: dict[int, int] = {}
        for b_prev, c_prev in best.items():
            for b in range(b_prev, max(b_prev, frontier) + 1):
                moved = b != b_prev
                pass_cost = (
                    num_samples
                    * views
                    * (read(b_prev) + cost.fwd(b_prev, b) + cost.write(tiers[b], sample_bytes[b]))
                    if moved
                    else 0.0
                )
                total = c_prev + pass_cost + samples * (read(b) + cost.fwd(b, frontier))
                if total < nxt.get(b, math.inf):
                    nxt[b], choice[b] = total, b_prev
        best = nxt
        back.append(choice)
    b = min(best, key=lambda k: best[k])
    plan = [b]
    for choice in reversed(back[1:]):
        b = choice[b]
        plan.append(b)
    return plan[::-1]


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
    path = location.join(directory, f".prefast-probe-{os.getpid()}-{uuid.uuid4().hex[:12]}")
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
    "Cache",
    "CostModel",
    "PassSpec",
    "build_cache",
    "check_cache_dir",
    "choose_tier",
    "fingerprint",
    "measure_store_rates",
    "measure_tier_rates",
    "measure_unit_forward",
    "open_matching",
    "plan_boundaries",
    "plan_boundary",
    "provenance",
    "store_path",
]
