"""Activation store vs RAM tier: write and read throughput, disk size and private memory.

One process writes the same synthetic activations three times, as a raw (uncompressed) store,
an lz4 store and a zstd store, then reads each back through ``store.StoreLoader`` one full
shuffled epoch at a time, beside a ``store.RamCache`` filled from the raw store. The raw store is
read through numpy memory maps, the compressed ones by the streaming reader. Each variant's read
runs in a fresh subprocess, so one variant's private memory cannot hide another's.

What is timed:

* write: only the ``w.write(...)`` calls and ``w.close()``; the data (a small pool of seeded
  random fp16 batches) is generated before. ``close()`` does not fsync, so this is the speed of
  encoding and writing into the page cache; ``os.sync()`` runs afterwards, untimed. Every
  store is written once untimed, then in ``--repeats`` rounds, the stores' order reversed in
  every other round (none always pays for running first).
* read: one shuffled epoch through ``StoreLoader`` (device cpu), consuming every batch with a
  cheap reduction over one element per sample; one untimed warm-up epoch first (warm page
  cache), then ``--repeats`` timed epochs, each a different order.
* memory: peak RssAnon (private anonymous resident memory) sampled every 5 ms on a thread over
  the reading process's epochs. Page-cache pages behind a memory map are reclaimable and not
  counted; VmHWM, which counts them, is recorded in the JSON for reference.

Side-by-side comparisons (each in one fresh process, the compared variants alternating in
order, one untimed warm-up round, median of ``--repeats`` rounds, printed as ratios):

* checks: reads of the raw store with chunk checksums verified vs not (``store.open(...,
  checksums=False)``): the first epoch after ``open`` (every chunk is checked when first mapped)
  and the next epoch on the same open store (maps already checked).

Examples::

    python benchmarks/bench_store.py                  # 50,000 x (84, 16, 16) fp16, 3 repeats
    python benchmarks/bench_store.py --quick          # 3,000 samples, 1 repeat: a few seconds
    python benchmarks/bench_store.py --data normal    # dense (pre-activation-like) values
    python benchmarks/bench_store.py --dir /scratch --keep
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import store
from benchmarks.common import (
    GB,
    MIB,
    RESULTS_DIR,
    RssAnonSampler,
    Timer,
    current_rss_anon,
    environment,
    peak_rss,
    read_proc_status,
    spread,
    summarize,
    write_json,
)
from store.layout import default_chunk_samples

log = logging.getLogger("bench_store")

STORE_VARIANTS: dict[str, str | None] = {"raw": None, "lz4": "lz4", "zstd": "zstd"}
VARIANTS = (*STORE_VARIANTS, "ram")
LABELS = {
    "raw": "raw store (mmap)",
    "lz4": "lz4 store (stream)",
    "zstd": "zstd store (stream)",
    "ram": "RamCache",
}
DATA_KINDS = {
    "relu": "ReLU(N(0, 1)) in fp16: about half exact zeros, like post-ReLU activations",
    "normal": "N(0, 1) in fp16: dense, like pre-activation outputs (DenseNet-BC transitions)",
}
MEM_LIMIT = 1e9  # bytes: the store-backed epoch's private-memory target (1 GB = 953.7 MiB)
RAW_VS_RAM_TARGET = 0.8
SAMPLE_INTERVAL_S = 0.005


@dataclass(frozen=True)
class Config:
    num_samples: int = 50_000
    shape: tuple[int, ...] = (84, 16, 16)
    batch_size: int = 256
    repeats: int = 3
    seed: int = 0
    data: str = "relu"
    prefetch: int = 2
    write_workers: int = 2
    chunk_samples: int | None = None  # None: the store's default (about 8 MiB per chunk)
    buffer_chunks: int = 8
    read_workers: int = 2
    torch_threads: int | None = None  # None: torch's default (one per core)

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "repeats", "write_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("chunk_samples", "torch_threads"):  # None: the default
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"data={self.data!r} is not one of {list(DATA_KINDS)}")
        if not self.shape or any(d < 1 for d in self.shape):
            raise ValueError(f"shape must be non-empty and positive, got {self.shape}")

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * 2  # fp16

    @property
    def array_bytes(self) -> int:
        return self.num_samples * self.sample_bytes

    @property
    def resolved_chunk_samples(self) -> int:
        if self.chunk_samples:  # store.create takes a larger one as num_samples
            return min(self.chunk_samples, self.num_samples)
        return default_chunk_samples(self.shape, "float16", self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(**{**d, "shape": tuple(d["shape"])})


# ---- data ---------------------------------------------------------------------------------
def make_pool(cfg: Config) -> list[torch.Tensor]:
    """Distinct seeded fp16 batches (B, *shape), reused in turn while writing. The pool is large
    enough that no chunk holds the same batch twice, so compression sees no repeats."""
    n_batches = -(-cfg.num_samples // cfg.batch_size)
    size = min(n_batches, max(8, -(-cfg.resolved_chunk_samples // cfg.batch_size) + 2))
    g = torch.Generator().manual_seed(cfg.seed)
    pool = []
    for _ in range(size):
        x = torch.randn((cfg.batch_size, *cfg.shape), generator=g)
        if cfg.data == "relu":
            x.relu_()
        pool.append(x.half())  # (B, *shape) fp16
    return pool


def batches(cfg: Config, pool: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """(start, x) of every write, x a view into the pool (no copy)."""
    out = []
    for b, start in enumerate(range(0, cfg.num_samples, cfg.batch_size)):
        n = min(cfg.batch_size, cfg.num_samples - start)
        out.append((start, pool[b % len(pool)][:n]))
    return out


def expected_checksum(cfg: Config, pool: list[torch.Tensor]) -> float:
    """Sum of every sample's first element (float64; exact for fp16 values at these sizes, so
    it does not depend on the order an epoch visits the samples in)."""
    return float(sum(x.flatten(1)[:, 0].double().sum().item() for _, x in batches(cfg, pool)))


# ---- write --------------------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_once(
    path: Path,
    codec: str | None,
    cfg: Config,
    plan: list[tuple[int, torch.Tensor]],
    labels: torch.Tensor,
) -> float:
    """Write the store once (overwriting); seconds of the write() calls and close()."""
    w = store.create(
        path,
        sample_shape=cfg.shape,
        num_samples=cfg.num_samples,
        views=1,
        dtype="float16",
        codec=codec,
        chunk_samples=cfg.chunk_samples,
        meta={"benchmark": "bench_store", "data": cfg.data, "seed": cfg.seed},
        overwrite=True,
        workers=cfg.write_workers,
    )
    try:
        t0 = time.perf_counter()
        for start, x in plan:
            w.write(0, start, x, labels[start : start + len(x)])
        w.close()
        return time.perf_counter() - t0
    except BaseException:
        w.abort()
        raise


def write_order(names: list[str], r: int) -> list[str]:
    """The stores written in round ``r``: as listed in even rounds, reversed in odd ones."""
    return list(names) if r % 2 == 0 else list(reversed(names))


def bench_writes(
    paths: dict[str, Path], cfg: Config, pool: list[torch.Tensor], labels: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Write every store (STORE_VARIANTS) once untimed, then ``cfg.repeats`` timed rounds, the
    variants alternating in order between rounds (``write_order``), each round overwriting
    the last; each store's record (times of the write() calls + close(), disk size)."""
    plan = batches(cfg, pool)
    names = list(STORE_VARIANTS)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg.repeats + 1):  # round 0 warms up (allocator, codecs, the file system)
        for name in write_order(names, r):
            t = _write_once(paths[name], STORE_VARIANTS[name], cfg, plan, labels)
            if r == 0:
                log.info("write %s: warm-up %.2f s (untimed)", name, t)
                continue
            seconds[name].append(t)
            log.info(
                "write %s %d/%d: %.2f s, %.2f GB/s",
                name,
                r,
                cfg.repeats,
                t,
                cfg.array_bytes / t / GB,
            )
    return {name: _write_record(paths[name], cfg, seconds[name]) for name in names}


def _write_record(path: Path, cfg: Config, seconds: list[float]) -> dict[str, Any]:
    s = store.open(path)
    disk = s.nbytes_stored()
    acts = dir_bytes(path / "activations")
    rec = {
        "codec": s.layout.codec,
        "codec_level": s.layout.codec_level,
        "chunk_samples": s.chunk_samples,
        "num_chunks": s.num_chunks,
        "seconds": summarize(seconds),
        "gb_per_s": summarize([cfg.array_bytes / t / GB for t in seconds]),
        "samples_per_s": summarize([cfg.num_samples / t for t in seconds]),
        "disk_bytes": disk,  # every file of the store: activations, labels, CRCs, metadata
        "activation_bytes_on_disk": acts,
        "compression_ratio": cfg.array_bytes / acts,  # uncompressed / stored activation bytes
    }
    s.close()
    return rec


# ---- read (runs in a fresh subprocess per variant) ----------------------------------------
def measure_read(variant: str, path: Path, cfg: Config) -> dict[str, Any]:
    """One warm-up epoch and ``cfg.repeats`` timed epochs of ``variant`` in this process."""
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    s = store.open(path)
    rec: dict[str, Any] = {
        "variant": variant,
        "memory_mapped": s.memory_mapped,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": list(os.getloadavg()),
        "rss_anon_before_source": current_rss_anon(),  # imports + the opened store
    }
    source: store.ActivationSource
    if variant == "ram":
        with Timer() as t:
            cache = store.RamCache.from_store(s)
        s.close()
        rec["ram_fill_s"] = t.s
        rec["ram_cache_bytes"] = cache.nbytes
        source = cache
    else:
        source = s
    rec["rss_anon_after_source"] = current_rss_anon()
    loader = store.StoreLoader(
        source,
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        device="cpu",
        prefetch=cfg.prefetch,
        buffer_chunks=cfg.buffer_chunks,
        read_workers=cfg.read_workers,
    )
    rec["streaming"] = loader.streaming
    epochs = []
    with RssAnonSampler(SAMPLE_INTERVAL_S) as mem:
        for e in range(cfg.repeats + 1):
            loader.set_epoch(e)
            n, batches_seen, checksum = 0, 0, 0.0
            t0 = time.perf_counter()
            for x, y in loader:
                checksum += x.flatten(1)[:, 0].double().sum().item()  # touch every sample
                n += len(y)
                batches_seen += 1
            dt = time.perf_counter() - t0
            epochs.append(
                {
                    "epoch": e,
                    "warmup": e == 0,
                    "seconds": dt,
                    "samples": n,
                    "batches": batches_seen,
                    "checksum": checksum,
                }
            )
            log.info(
                "read %s epoch %d%s: %.2f s, %.0f samples/s",
                variant,
                e,
                " (warm-up)" if e == 0 else "",
                dt,
                n / dt,
            )
    loader.close()
    timed = [ep for ep in epochs if not ep["warmup"]]
    rec.update(
        {
            "epochs": epochs,
            "seconds": summarize([ep["seconds"] for ep in timed]),
            "samples_per_s": summarize([ep["samples"] / ep["seconds"] for ep in timed]),
            "gb_per_s": summarize(
                [ep["samples"] * cfg.sample_bytes / ep["seconds"] / GB for ep in timed]
            ),
            "peak_rss_anon": mem.peak,  # sampled over all epochs, warm-up included
            "peak_rss_anon_added": mem.peak - rec["rss_anon_before_source"],
            "rss_anon_samples": mem.samples,
            "vm_hwm": peak_rss(),  # peak total RSS, mapped page-cache pages included
        }
    )
    return rec


def _epoch(loader: store.StoreLoader, epoch: int) -> tuple[float, int]:
    """Seconds and samples of one epoch, touching one element of every sample."""
    loader.set_epoch(epoch)
    n, checksum = 0, 0.0
    t0 = time.perf_counter()
    for x, y in loader:
        checksum += x.flatten(1)[:, 0].double().sum().item()
        n += len(y)
    return time.perf_counter() - t0, n


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(a["median"] / b["median"])


def compare_checks(path: Path, cfg: Config) -> dict[str, Any]:
    """Raw store read with and without chunk checksums, alternating, in this process."""
    first: dict[bool, list[float]] = {True: [], False: []}
    later: dict[bool, list[float]] = {True: [], False: []}
    for r in range(cfg.repeats + 1):  # round 0 is the warm-up
        for checked in (True, False) if r % 2 == 0 else (False, True):
            s = store.open(path, checksums=checked)
            loader = store.StoreLoader(
                s, batch_size=cfg.batch_size, seed=cfg.seed, prefetch=cfg.prefetch
            )
            t_first, _ = _epoch(loader, 2 * r)  # every chunk is mapped (and checked) here
            t_later, _ = _epoch(loader, 2 * r + 1)
            s.close()
            if r > 0:
                first[checked].append(t_first)
                later[checked].append(t_later)
    rec: dict[str, Any] = {
        "first_epoch_s": {"checked": summarize(first[True]), "unchecked": summarize(first[False])},
        "later_epoch_s": {"checked": summarize(later[True]), "unchecked": summarize(later[False])},
    }
    rec["first_epoch_ratio"] = _ratio(
        rec["first_epoch_s"]["checked"], rec["first_epoch_s"]["unchecked"]
    )
    rec["later_epoch_ratio"] = _ratio(
        rec["later_epoch_s"]["checked"], rec["later_epoch_s"]["unchecked"]
    )
    # what one checksum pass over the store costs on its own: CRC-32C of every chunk in memory
    s = store.open(path)
    data = [s.read_chunk(0, c) for c in range(min(s.num_chunks, 16))]
    t0 = time.perf_counter()
    for d in data:
        store.layout.chunk_crc(d)
    dt = time.perf_counter() - t0
    rec["crc32c_gb_per_s"] = sum(d.nbytes for d in data) / dt / GB
    return rec


def compare_dataset(path: Path, cfg: Config) -> dict[str, Any]:
    """One shuffled epoch of the raw store through ``StoreLoader`` and through a
    ``torch.utils.data.DataLoader`` over ``store.ActivationDataset`` (batches gathered by
    ``__getitems__``, default collate, no workers), alternating, in this process."""
    from torch.utils.data import DataLoader

    s = store.open(path)
    times: dict[str, list[float]] = {"StoreLoader": [], "DataLoader": []}
    for r in range(cfg.repeats + 1):  # round 0 is the warm-up
        for name in ("StoreLoader", "DataLoader") if r % 2 == 0 else ("DataLoader", "StoreLoader"):
            if name == "StoreLoader":
                loader = store.StoreLoader(
                    s, batch_size=cfg.batch_size, seed=cfg.seed, prefetch=cfg.prefetch
                )
                t, _ = _epoch(loader, r)
            else:
                ds = store.ActivationDataset(s, epoch=r, seed=cfg.seed)
                dl = DataLoader(
                    ds,
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(cfg.seed + r),
                )
                checksum = 0.0
                t0 = time.perf_counter()
                for x, _ in dl:
                    checksum += x.flatten(1)[:, 0].double().sum().item()
                t = time.perf_counter() - t0
            if r > 0:
                times[name].append(t)
    n = s.num_samples
    rec: dict[str, Any] = {k: summarize(v) for k, v in times.items()}
    rec["samples_per_s"] = {k: n / rec[k]["median"] for k in times}
    rec["dataloader_vs_storeloader"] = _ratio(rec["DataLoader"], rec["StoreLoader"])
    return rec


COMPARISONS = {"checks": compare_checks, "dataset": compare_dataset}


def run_compare_subprocess(name: str, path: Path, cfg: Config, workdir: Path) -> dict[str, Any]:
    out = workdir / f"compare-{name}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_compare",
        name,
        "--_store",
        str(path),
        "--_result",
        str(out),
        "--_config",
        json.dumps(cfg.to_dict()),
    ]
    r = subprocess.run(cmd, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"the comparison {name} failed (exit {r.returncode})")
    rec: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return rec


def run_read_subprocess(variant: str, path: Path, cfg: Config, workdir: Path) -> dict[str, Any]:
    out = workdir / f"read-{variant}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_measure-read",
        variant,
        "--_store",
        str(path),
        "--_result",
        str(out),
        "--_config",
        json.dumps(cfg.to_dict()),
    ]
    r = subprocess.run(cmd, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"the read measurement of {variant} failed (exit {r.returncode})")
    rec: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return rec


# ---- report -------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    v = result["variants"]
    ram = v["ram"]["read"]["samples_per_s"]["median"]
    raw_ratio = v["raw"]["read"]["samples_per_s"]["median"] / ram
    store_peaks = {k: v[k]["read"]["peak_rss_anon"] for k in STORE_VARIANTS}
    # what the RamCache added over the process before it: its whole array (the absolute peak
    # would count the process's own ~0.4 GB too)
    ram_peak = v["ram"]["read"].get("peak_rss_anon_added", v["ram"]["read"]["peak_rss_anon"])
    array = result["config"]["array_bytes"]
    peaks = ", ".join(f"{k} {p / MIB:.0f} MiB" for k, p in store_peaks.items())
    return [
        {
            "name": "raw memory-mapped loader >= 0.8x RamCache read throughput (median samples/s)",
            "value": raw_ratio,
            "met": raw_ratio >= RAW_VS_RAM_TARGET,
            "detail": f"{raw_ratio:.2f}x",
        },
        {
            "name": "store-backed epoch peak private memory (RssAnon) < 1 GB while RamCache holds "
            "the whole array",
            "value": max(store_peaks.values()),
            # 2 % slack: pages the process freed between its reading before and the peak
            "met": max(store_peaks.values()) < MEM_LIMIT and ram_peak >= 0.98 * array,
            "detail": f"{peaks}; RamCache added {ram_peak / MIB:.0f} MiB vs array {array / MIB:.0f} MiB",
        },
    ]


def format_comparisons(c: dict[str, Any]) -> list[str]:
    """One line per side-by-side comparison (ratios of medians, same process)."""
    out = ["side by side (same process, alternating, median of the timed rounds):"]
    if "checks" in c:
        k = c["checks"]
        f, l_ = k["first_epoch_s"], k["later_epoch_s"]
        out.append(
            f"  chunk checksums, raw store: first epoch after open {k['first_epoch_ratio']:.3f}x "
            f"({f['checked']['median']:.3f} s checked vs {f['unchecked']['median']:.3f} s), "
            f"later epochs {k['later_epoch_ratio']:.3f}x ({l_['checked']['median']:.3f} vs "
            f"{l_['unchecked']['median']:.3f} s); CRC-32C alone {k['crc32c_gb_per_s']:.1f} GB/s"
        )
    if "dataset" in c:
        k = c["dataset"]
        out.append(
            f"  raw store, one shuffled epoch: DataLoader over ActivationDataset "
            f"{k['samples_per_s']['DataLoader']:,.0f} samples/s, StoreLoader "
            f"{k['samples_per_s']['StoreLoader']:,.0f} samples/s (time ratio "
            f"{k['dataloader_vs_storeloader']:.3f}x)"
        )
    return out


def format_table(result: dict[str, Any]) -> str:
    v = result["variants"]
    cols = [
        "variant",
        "write GB/s",
        "write min-max",
        "read samples/s",
        "read GB/s",
        "read min-max (samples/s)",
        "disk bytes",
        "ratio",
        "peak RssAnon MiB",
        "added MiB",
    ]
    rows = []
    for name in VARIANTS:
        w, r = v[name].get("write"), v[name]["read"]
        rows.append(
            [
                LABELS[name],
                f"{w['gb_per_s']['median']:.2f}" if w else "-",
                spread(w["gb_per_s"], "{:.2f}") if w else "-",
                f"{r['samples_per_s']['median']:,.0f}",
                f"{r['gb_per_s']['median']:.2f}",
                spread(r["samples_per_s"], "{:,.0f}"),
                f"{w['disk_bytes']:,}" if w else "(in RAM)",
                f"{w['compression_ratio']:.2f}x" if w else "-",
                f"{r['peak_rss_anon'] / MIB:,.0f}",
                f"{r['peak_rss_anon_added'] / MIB:,.0f}",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(wd) if i == 0 else c.rjust(wd)
            for i, (c, wd) in enumerate(zip(cells, widths, strict=True))
        )

    cfg = result["config"]
    ram = v["ram"]["read"]["samples_per_s"]["median"]
    base = v["raw"]["read"]["rss_anon_before_source"]
    threads = v["raw"]["read"]["torch_threads"]
    out = [
        f"bench_store: {cfg['num_samples']:,} samples of {tuple(cfg['shape'])} fp16 "
        f"({cfg['array_bytes'] / GB:.2f} GB), 1 view, chunk {cfg['chunk_samples_resolved']} "
        f"samples, batch {cfg['batch_size']}, {cfg['repeats']} timed epoch(s) after 1 warm-up, "
        f"device cpu, torch threads {threads}",
        f"data: {DATA_KINDS[cfg['data']]}",
        f"machine: {result['environment']['device']['name']}, load average at start "
        f"{result['environment']['loadavg_1_5_15'][0]:.2f}, at end {result['loadavg_end'][0]:.2f}",
        "",
        line(cols),
        line(["-" * wd for wd in widths]),
        *(line(row) for row in rows),
        "",
        "read throughput vs RamCache (median samples/s): "
        + ", ".join(
            f"{k} {v[k]['read']['samples_per_s']['median'] / ram:.2f}x" for k in STORE_VARIANTS
        ),
        *format_comparisons(result["comparisons"]),
        f"data check: every epoch of every variant visited each sample once: "
        f"{'yes' if result['checksums_ok'] else 'NO'}",
        "targets:",
        *(
            f"  [{'met' if t['met'] else 'missed'}] {t['name']}: {t['detail']}"
            for t in result["targets"]
        ),
        "notes:",
        "  write = write() calls + close() into the page cache (no fsync); median, min-max over "
        "repeats",
        "  read = one shuffled StoreLoader epoch; median, min-max over the timed epochs; GB/s of "
        "uncompressed samples",
        "  peak RssAnon = private memory sampled every 5 ms over the epochs, in a fresh process "
        "per variant (page cache behind memory maps not counted)",
        "  added = peak RssAnon minus the process's RssAnon after importing torch/zarr and "
        f"opening the store ({base / MIB:.0f} MiB)",
        "  ratio = uncompressed / stored activation bytes; disk bytes = every file of the store",
    ]
    return "\n".join(out)


# ---- driver -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__[__doc__.index("Examples::") :] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--shape", type=int, nargs="+", default=[84, 16, 16], metavar="D")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed writes and epochs per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=sorted(DATA_KINDS), default="relu")
    p.add_argument("--chunk-samples", type=int, default=None)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the reading processes (default: torch's, one per core)",
    )
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--quick", action="store_true", help="3,000 samples, 1 repeat (tests)")
    p.add_argument("--out", type=Path, default=None, help="JSON result path")
    p.add_argument("--_measure-read", dest="measure_read", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument(
        "--_compare", dest="compare", choices=sorted(COMPARISONS), help=argparse.SUPPRESS
    )
    p.add_argument("--_store", dest="store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_result", dest="result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_config", dest="config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_resources(cfg: Config, workdir: Path) -> str | None:
    """A message when the disk or memory cannot hold the run, else None."""
    need_disk = 3 * cfg.array_bytes + 64 * MIB  # compressed stores can be as large as the raw one
    free = shutil.disk_usage(workdir).free
    if free < need_disk:
        return (
            f"{workdir}: {free / GB:.1f} GB free, the three stores need up to {need_disk / GB:.1f} GB "
            "(compressed ones can be as large as the raw one); pass --dir on a larger filesystem "
            "or lower --num-samples"
        )
    avail = read_proc_status("/proc/meminfo").get("MemAvailable", -1)
    need_mem = int(1.3 * cfg.array_bytes)  # the RamCache plus the pool and process overhead
    if 0 <= avail < need_mem:
        return (
            f"{avail / GB:.1f} GB of memory available, the RamCache variant needs about "
            f"{need_mem / GB:.1f} GB; lower --num-samples"
        )
    return None


def run(cfg: Config, workdir: Path, keep: bool, out: Path) -> dict[str, Any]:
    env = environment("cpu")  # host reads and writes only
    paths = {k: workdir / f"bench_store-{k}.zarr" for k in STORE_VARIANTS}
    result: dict[str, Any] = {
        "benchmark": "bench_store",
        "environment": env,
        "config": {
            **cfg.to_dict(),
            "chunk_samples_resolved": cfg.resolved_chunk_samples,
            "sample_bytes": cfg.sample_bytes,
            "array_bytes": cfg.array_bytes,
            "data_description": DATA_KINDS[cfg.data],
            "views": 1,
            "dtype": "float16",
            "loader_device": "cpu",
            "rss_anon_sample_interval_s": SAMPLE_INTERVAL_S,
            "store_dir": str(workdir),
        },
        "variants": {k: {} for k in VARIANTS},
    }
    try:
        log.info("generating a pool of seeded %s batches", cfg.data)
        pool = make_pool(cfg)
        labels = torch.arange(cfg.num_samples, dtype=torch.int64) % 10
        checksum = expected_checksum(cfg, pool)
        log.info("writing the %s stores to %s", ", ".join(STORE_VARIANTS), workdir)
        for name, rec in bench_writes(paths, cfg, pool, labels).items():
            result["variants"][name]["write"] = rec
        del pool
        with Timer() as t:
            os.sync()  # flush dirty pages so write-back does not overlap the reads
        result["os_sync_s"] = t.s  # system-wide, untimed
        for name in VARIANTS:
            log.info("reading %s in a fresh process", name)
            path = paths["raw" if name == "ram" else name]
            result["variants"][name]["read"] = run_read_subprocess(name, path, cfg, workdir)
        result["comparisons"] = {}
        for name in COMPARISONS:
            log.info("comparison %s in a fresh process", name)
            result["comparisons"][name] = run_compare_subprocess(name, paths["raw"], cfg, workdir)
    finally:
        if not keep:
            for p in paths.values():
                shutil.rmtree(p, ignore_errors=True)
    result["expected_checksum"] = checksum
    result["checksums_ok"] = all(
        ep["checksum"] == checksum and ep["samples"] == cfg.num_samples
        for k in VARIANTS
        for ep in result["variants"][k]["read"]["epochs"]
    )
    result["loadavg_end"] = list(os.getloadavg())
    result["targets"] = targets(result)
    result["stores_kept"] = {k: str(p) for k, p in paths.items()} if keep else None
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.measure_read:
        cfg = Config.from_dict(json.loads(args.config))
        write_json(args.result, measure_read(args.measure_read, args.store, cfg))
        return 0
    if args.compare:
        cfg = Config.from_dict(json.loads(args.config))
        write_json(args.result, COMPARISONS[args.compare](args.store, cfg))
        return 0

    if args.quick:
        args.num_samples, args.repeats = 3_000, 1
    try:
        cfg = Config(
            num_samples=args.num_samples,
            shape=tuple(args.shape),
            batch_size=args.batch_size,
            repeats=args.repeats,
            seed=args.seed,
            data=args.data,
            chunk_samples=args.chunk_samples,
            torch_threads=args.torch_threads,
        )
    except ValueError as e:  # before anything runs: one line, not a traceback
        raise SystemExit(f"bench_store.py: --{str(e).replace('_', '-')}") from None
    out = args.out or RESULTS_DIR / f"bench_store-cpu{'-quick' if args.quick else ''}.json"
    made_dir = args.dir is None or not args.dir.exists()
    if args.dir is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench_store-"))
    else:
        workdir = args.dir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        problem = check_resources(cfg, workdir)
        if problem:
            log.error("not enough room: %s", problem)
            return 2
        log.info(
            "stores in %s (%.1f GB free; up to %.1f GB needed)",
            workdir,
            shutil.disk_usage(workdir).free / GB,
            3 * cfg.array_bytes / GB,
        )
        result = run(cfg, workdir, args.keep, out)
    finally:
        if made_dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(result))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
