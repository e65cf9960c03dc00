"""Building a cache: one pass over every sample and view through the frozen units into a
sink (a Zarr store, host RAM or device memory), and the ``Cache`` that results.

A cache at boundary ``b`` holds ``units[0:b]``'s output for every training sample and view,
computed **after** the freeze, in eval mode, under no_grad, from the final frozen weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import store
from prefast import interrupt
from prefast.data import Augment, ImageData, make_batch, view_key
from prefast.distributed import DistContext
from prefast.errors import CacheError
from prefast.models import UnitModel
from prefast.runtime import TORCH_DTYPES, GraphedForward, autocast, synchronize
from store import location

log = logging.getLogger(__name__)


@dataclass
class Cache:
    """A built cache: its boundary, tier, source for the loader, and provenance."""

    boundary: int
    tier: str  # "device" | "ram" | "zarr"
    source: Any  # store.ActivationStore | store.RamCache | store.DeviceCache
    fingerprint: str
    path: Path | str | None = None  # a local path or an fsspec URL
    build_seconds: float = 0.0
    # bytes/s of the writes (the sink's writes and its close) of the pass that built it, its
    # forward and reads left out (a device tier's: as queued, not run); a cache written
    # through: its bytes over the epoch that wrote it
    write_rate: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    # The boundaries this cache was computed through, ending at ``boundary`` ([4, 9]: from the
    # images to 4, then from the 16-bit cache at 4 to 9). Rebuilding along the same chain gives
    # the same bits (each hop rounds to the cache dtype).
    chain: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.source.nbytes)

    def release(self) -> None:
        """Let go of the source (close a store's memory maps); files stay where they are."""
        if isinstance(self.source, store.ActivationStore):
            self.source.close()
        self.source = None


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
    graphs: bool = False  # the steps replay CUDA graphs: so does the pass (frozen_forward)
    # the activation's dtype at each boundary as the steps compute it (activation_dtypes):
    # what a pass from a previous cache hands the units after it; empty: float32
    act_dtypes: tuple[torch.dtype, ...] = ()

    def act_dtype(self, b: int) -> torch.dtype:
        return self.act_dtypes[b] if self.act_dtypes else torch.float32


def activation_dtypes(
    model: UnitModel, input_shape: tuple[int, ...], device: torch.device, amp: str
) -> tuple[torch.dtype, ...]:
    """The dtype of the activation at each boundary ``0..num_units`` as a step computes it:
    float32 for the images, then what each unit returns (under ``amp="bf16"`` in autocast:
    bfloat16 for a unit that ends in a convolution or a sum of them, float32 for one that
    ends in an op autocast runs in float32), from one eval-mode pass of a dummy batch
    (training flags restored). A cached batch is handed to the units after it in this dtype:
    read as float32, a bfloat16 activation made the units after it compute in float32 where
    freezeout's steps compute in bfloat16 (DenseNet's concatenations promote), so they
    rounded otherwise; and a unit of one's own that returns float64 (or float16) was handed
    float32, which a float64 layer after it refused in the middle of the run."""
    with model._probe(), autocast(device, amp):
        h = model._dummy(input_shape, 2).float()  # as make_batch gives the images
        dtypes = [torch.float32]  # the images (make_batch)
        for u in model.units:
            h = u(h)
            dtypes.append(h.dtype)
    return tuple(dtypes)


def frozen_forward(
    model: UnitModel, b0: int, b1: int, channels_last: bool, amp: str, graphs: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``units[b0:b1]`` as a batch function for passes over frozen units (eval mode, no_grad,
    inside the caller's ``autocast``), in the steps' memory format; its output is contiguous.
    Where the steps replay CUDA graphs it does too (``GraphedForward``, captured at the first
    batch: its result is then the graph's static output, to be used before the next call):
    run eagerly one call at a time, each unit costs its kernels' launches (~0.9 ms per
    DenseNet unit and batch on an H200, whatever its size), and the planner prices these
    forwards as replayed."""

    def forward(h: torch.Tensor) -> torch.Tensor:
        if channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        return model.forward_range(h, b0, b1).contiguous()

    return GraphedForward(forward, amp) if graphs else forward


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
        if path is None:
            raise CacheError("a zarr cache needs a store path")
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
        # Rank 0 creates the store; the others join it once it exists. Where a rank cannot
        # (rank 0's create refused, or another rank does not see the store: a cache folder on
        # each node's own disk), every rank stops with its reason, not as if it had died.
        w = dist.on_main("creating the store", lambda: store.create(path, overwrite=True, **kw))
        failed: Exception | None = None
        if not dist.is_main:
            try:
                if not location.exists(path):
                    raise CacheError(
                        f"rank {dist.rank}: {path}, the store rank 0 created, is not there for "
                        "this rank: the cache folder must be on a file system every rank sees "
                        "(--cache-dir on a shared file system, or an object store URL)"
                    )
                w = store.create(path, resume=True, **kw)
            except (CacheError, store.StoreError) as e:
                failed = e
        try:
            dist.share_refusal(failed, "opening the store", CacheError)
        except CacheError:
            if w is not None:
                w.abort()
            raise
        return w
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
    forward = frozen_forward(model, b0, boundary, spec.channels_last, spec.amp, spec.graphs)
    write_seconds = 0.0  # in the sink's writes and close: what a store's write rate counts
    try:
        with sink, torch.no_grad(), autocast(device, spec.amp):
            for v in range(spec.views):
                aug = (
                    spec.augment.params(view_key(spec.seed, v), n)
                    if not spec.augment.identity
                    else None
                )
                for c in mine:
                    for start in range(c * chunk, min((c + 1) * chunk, n), bs):
                        interrupt.check()
                        idx = np.arange(start, min(start + bs, (c + 1) * chunk, n))
                        if prev is None:
                            h, _ = make_batch(spec.train, idx, aug, device)
                        else:
                            h = prev.source.read(v, idx).to(device, non_blocking=True)
                            h = h.to(spec.act_dtype(b0))
                        out = forward(h)
                        if tier != "device":  # a host tier's write waits for them anyway
                            synchronize(device)  # the forward's kernels: outside the timing
                        tw = time.perf_counter()
                        sink.write(v, start, out, labels[start : start + len(idx)])
                        write_seconds += time.perf_counter() - tw
                        bar.update(1)
            closing = time.perf_counter()
        write_seconds += time.perf_counter() - closing  # the sink's close: its last chunks
    finally:
        bar.close()
    synchronize(device)
    if dist.enabled:
        if tier == "zarr":
            dist.barrier("finishing the sharded store")
            if dist.is_main and path is not None:
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
    sample_nbytes = math.prod(sample_shape) * TORCH_DTYPES[spec.dtype].itemsize
    nbytes = spec.views * n * sample_nbytes
    # the rate of this rank's writes, its share's bytes over its time: the planner prices a
    # rank's share of a pass (under torchrun the whole cache's bytes made it world_size x)
    written = spec.views * sum(min((c + 1) * chunk, n) - c * chunk for c in mine) * sample_nbytes
    log.debug(
        "cached boundary %d (%s) for %d samples x %d views: %s, %.1f MiB in %.2f s",
        boundary,
        model.unit_names[boundary - 1],
        n,
        spec.views,
        tier if path is None else f"{tier} at {path}",
        nbytes / 2**20,
        seconds,
    )
    chain = (*(prev.chain if prev is not None else ()), boundary)
    return Cache(
        boundary, tier, source, fp, path, seconds, written / max(write_seconds, 1e-9), meta, chain
    )


__all__ = ["Cache", "PassSpec", "activation_dtypes", "build_cache"]
