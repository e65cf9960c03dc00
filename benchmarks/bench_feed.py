"""Raw-store writes and loader feed rates, compared side by side in one process.

Writes (the same seeded fp16 samples, into the page cache; ``close()`` does not fsync):

* ``zarr-path``: whole chunks, and the labels and CRC tables, through zarr's own array
  writes, the store's write path before chunks were written as plain files (the baseline);
* ``write``: ``StoreWriter.write`` of sequential batches (plain chunk files, checksums on the
  writer's threads);
* ``write_rows``: ``StoreWriter.write_rows`` of shuffled batches, as write-through caching
  writes them: one scatter per batch into the chunk files mapped side by side (the default
  where chunks are whole pages), a chunk checksummed from the map when complete; each
  batch's samples are gathered in the shuffled order before the clock starts, as a training
  step hands a batch over (results before this change timed that gather too: a copy of
  every row, about as long as the write itself on a CPU);
* ``write_rows-pwrite``: the same rows with one ``pwrite`` per sample (the fallback, and the
  path before the map);
* ``write_rows-prepared``: ``write_rows`` into a store whose files ``prepare_rows`` mapped and
  faulted in before the clock starts, as a CUDA run prepares the next epoch's store on a
  thread while the device trains (``prepare_rows``' own time is reported beside it).

Beside a busy thread: the three ``write_rows`` paths again, each on a second thread
(as the write-through writer thread runs) while the calling thread runs a loop like a training
loop's host side (a little Python and a few small torch ops per iteration): the write rate, and
the loop's iteration rate as a share of its rate alone (1.0: the writes cost it nothing).

Where the time of a shuffled row write goes (the same rows, no store): ``ram-fresh`` scatters
them into fresh host memory (the kernel faults every page in on first touch), ``ram-touched``
into memory touched before (the copy alone), and ``map-populate`` only creates, preallocates,
maps and faults in the chunk files for writing, as the row map does, without writing a row.

Without the loader: a shuffled gather (``np.take``) on one thread and on the loader's number of
gather threads, and on CUDA copies from one pinned batch buffer to the device: the host's
memory and the bus alone. The loader's cost per batch beyond moving bytes: an epoch of 8-byte
samples, in microseconds per batch, made on the caller's thread and on the prefetch thread,
one batch a copy and ``GROUP`` batches a copy (gathered, copied and handed over as one group).

Feeds: one shuffled epoch through ``StoreLoader`` to ``--device``, every batch consumed on the
device (a sum of one element per sample, synchronised at the end), after an untimed warm-up
epoch (warm page cache), for the RAM tier and the memory-mapped raw store, with one gather
thread and with the loader's default, the latter also with ``GROUP`` batches a copy. Rates are
GB of samples delivered per second.

Beside a consumer's Python: the trainer's loader on that device (prefetch 2, the defaults) fed
to a consumer that runs, after each batch, about as many busy-loop iterations as the loader
takes per batch alone, as a training thread runs each step's Python. Its epoch against the
feed alone and the Python alone; "share hidden" is how much of the shorter of the two the
other hid (1: they overlap fully; 0: one waits for the other, as where they share the GIL or
the cores).

Each measurement is the median of ``--repeats``; ratios are printed against the baseline of
their group. Examples::

    python benchmarks/bench_feed.py --device cuda            # 50,000 x (84, 16, 16) fp16
    python benchmarks/bench_feed.py --num-samples 3000 --repeats 1   # a few seconds on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import store
from benchmarks.common import environment, write_json

GB = 1e9
# Batches a copy in the grouped feeds and per-batch rows (``StoreLoader(batches_per_copy=)``):
# fixed here, so that the comparison runs whatever the batch size (the loader's default
# groups only batches under 8 MiB).
GROUP = 4


def _samples(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).relu_().to(torch.float16)


def _shuffled(order: np.ndarray, batch: int, *arrays: Any) -> list[tuple[Any, ...]]:
    """One shuffled epoch's batches: ``(ids, *rows)`` per batch of ``batch`` samples in
    ``order``, each of ``arrays`` (tensors or numpy arrays, samples first) gathered in ``order``
    once, here, so that a batch's rows are a contiguous slice: as a training step hands a batch
    over. Called before a clock starts: a write is timed without gathering its rows."""
    gathered = [a[order] for a in arrays]  # one copy of each array, untimed
    return [
        (order[s : s + batch], *(g[s : s + batch] for g in gathered))
        for s in range(0, len(order), batch)
    ]


def _write(
    path: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    how: str,
    batch: int,
    seed: int,
    prepare_s: list[float] | None = None,
    started: threading.Event | None = None,
) -> float:
    """Seconds to write ``x`` the ``how`` way (``prepare_s`` gets prepare_rows' seconds;
    ``started`` is set as the timed writes begin)."""
    shutil.rmtree(path, ignore_errors=True)
    n = len(x)
    w = store.create(path, sample_shape=tuple(x.shape[1:]), num_samples=n, dtype="float16")
    if how == "zarr-path":
        w._raw_root = w._local_root = None  # the baseline: every chunk through zarr
    if how == "write_rows-pwrite":
        w._map_rows = False  # one pwrite per sample, not the map
    if how == "write_rows-prepared":  # paid ahead, off the clock (a thread, in a CUDA run)
        t0 = time.perf_counter()
        w.prepare_rows()
        if prepare_s is not None:
            prepare_s.append(time.perf_counter() - t0)
    rows = (
        _shuffled(np.random.default_rng(seed).permutation(n), batch, x, y)
        if how.startswith("write_rows")
        else None
    )  # gathered before the clock: the rows' own gather is no part of a write
    if started is not None:
        started.set()
    t0 = time.perf_counter()
    if rows is None:
        for s in range(0, n, batch):
            w.write(0, s, x[s : s + batch], y[s : s + batch])
    else:
        for idx, xb, yb in rows:
            w.write_rows(0, idx, xb, yb)
    w.close()
    return time.perf_counter() - t0


def _host_step(a: torch.Tensor) -> None:
    """One iteration of a training loop's host side, roughly: some Python, a few small ops."""
    s = 0
    for i in range(200):
        s += i
    for _ in range(5):
        a.add_(1)


def _beside_busy_loop(
    path: Path, x: torch.Tensor, y: torch.Tensor, how: str, batch: int, seed: int, alone: float
) -> tuple[float, float]:
    """(write seconds, the busy loop's iterations per second as a share of ``alone``, over the
    timed writes only: not the store's creation or prepare_rows)."""
    a = torch.zeros(4)
    got: list[float] = []
    started = threading.Event()
    th = threading.Thread(
        target=lambda: got.append(_write(path, x, y, how, batch, seed, started=started))
    )
    th.start()
    while not started.is_set() and th.is_alive():
        _host_step(a)  # uncounted: the store is being made
    t0 = time.perf_counter()
    n = 0
    while th.is_alive():
        _host_step(a)
        n += 1
    th.join()
    if not got:
        raise RuntimeError(f"{how}: the write beside the busy loop failed")
    return got[0], n / (time.perf_counter() - t0) / alone


def _breakdown(
    path: Path, x: torch.Tensor, batch: int, seed: int, chunk_samples: int
) -> dict[str, float]:
    """Seconds of the parts of a shuffled row write (see the module docstring)."""
    from store import _mmap
    from store.layout import StoreLayout
    from store.writer import _RowMap  # the row map write_rows uses

    n = len(x)
    rows = x.reshape(n, -1).view(torch.uint8).numpy()
    # each batch's rows gathered before the clock, as write_rows gets them (_write)
    plan = _shuffled(np.random.default_rng(seed).permutation(n), batch, rows)
    out: dict[str, float] = {}
    for name in ("ram-fresh", "ram-touched"):
        dst = np.empty_like(rows)
        if name == "ram-touched":
            dst.fill(0)
        t0 = time.perf_counter()
        for idx, src in plan:
            dst[idx] = src
        out[name] = time.perf_counter() - t0
        del dst
    lay = StoreLayout(n, 1, tuple(x.shape[1:]), "float16", chunk_samples=chunk_samples)
    if _mmap.usable(lay.chunk_samples * lay.sample_bytes):
        shutil.rmtree(path, ignore_errors=True)
        rm = _RowMap(lay, lambda view, chunk: path / f"{view}.{chunk}")
        t0 = time.perf_counter()
        rm.ensure(0, np.arange(lay.num_chunks), None)  # one thread: the kernel's cost alone
        out["map-populate"] = time.perf_counter() - t0
        del rm
        shutil.rmtree(path, ignore_errors=True)
    return out


def _gathers(x: torch.Tensor, batch: int, seed: int, threads: int) -> dict[str, float]:
    """Seconds to gather one shuffled epoch of ``x`` into a reused batch buffer: on one thread,
    ``np.take(..., out=buf)`` as numpy defaults it (mode="raise": into a temporary, then
    copied) against mode="clip" on indices checked first, which the host tiers use; and the
    latter split into ``threads`` contiguous parts on a thread pool, as the loader's gather
    threads split a batch (``take-direct/Nt``): the host's memory bandwidth for this pattern,
    without the loader. Only whole batches are gathered; their seconds are scaled to the
    epoch's samples, which the rates are computed on (as ``_h2d``'s)."""
    src = x.reshape(len(x), -1).view(torch.uint8).numpy()
    buf = np.empty((batch, src.shape[1]), dtype=src.dtype)
    order = np.random.default_rng(seed).permutation(len(src))
    scale = len(src) / (len(src) // batch * batch)
    out: dict[str, float] = {}
    for name, mode in (("take-buffered", "raise"), ("take-direct", "clip")):
        t0 = time.perf_counter()
        for s in range(0, len(src) - batch + 1, batch):
            np.take(src, order[s : s + batch], axis=0, out=buf, mode=mode)  # type: ignore[call-overload]
        out[name] = (time.perf_counter() - t0) * scale
    if threads > 1:
        bounds = np.linspace(0, batch, threads + 1).astype(int).tolist()
        parts = list(itertools.pairwise(bounds))
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            for s in range(0, len(src) - batch + 1, batch):
                idx = order[s : s + batch]
                for f in [
                    pool.submit(np.take, src, idx[a:b], 0, buf[a:b], "clip") for a, b in parts
                ]:
                    f.result()
            out[f"take-direct/{threads}t"] = (time.perf_counter() - t0) * scale
    return out


def _h2d(x: torch.Tensor, batch: int, device: torch.device) -> float:
    """Seconds to copy one epoch's bytes of ``x`` to a CUDA ``device`` a batch at a time from
    one pinned buffer (queued copies, synchronised at the end): the bus, without the loader."""
    buf = x[:batch].clone().pin_memory()
    dst = torch.empty_like(buf, device=device)
    dst.copy_(buf, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(len(x) // batch):
        dst.copy_(buf, non_blocking=True)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * len(x) / (len(x) // batch * batch)


def _per_batch(
    num: int, batch: int, device: torch.device, seed: int, repeats: int = 1
) -> dict[str, float]:
    """Microseconds per batch of a loader over tiny samples (8 bytes each) from the RAM tier,
    batches made on the caller's thread (``prefetch=0``) and on the prefetch thread, one batch
    a copy and ``GROUP`` batches a copy: what the loader costs per batch beyond moving bytes
    (buffers, labels, the queue, copies). A tiny batch is never split among gather threads."""
    tiny = store.RamCache.empty(num, 1, (4,), "float16", pin=device.type == "cuda")
    out: dict[str, float] = {}
    for (name, prefetch), per_copy in itertools.product(
        (("caller's thread", 0), ("prefetch thread", 4)), (1, GROUP)
    ):
        if per_copy > 1:
            name += f", {per_copy} a copy"
        loader = store.StoreLoader(
            tiny,
            batch_size=batch,
            device=device,
            prefetch=prefetch,
            seed=seed,
            batches_per_copy=per_copy,
        )
        _epoch(loader, 0, device)  # warm-up
        times = [_epoch(loader, 1 + k, device) for k in range(max(1, repeats))]
        out[name] = 1e6 * statistics.median(times) / len(loader)
        loader.close()
    return out


def _beside_host_work(
    loader: store.StoreLoader, epoch: int, device: torch.device, steps: int
) -> tuple[float, float]:
    """(seconds of the loader's epoch when its consumer runs ``steps`` busy-loop iterations
    after each batch, as a training thread runs a step's Python; seconds of the same
    iterations with no loader)."""
    a = torch.zeros(4)
    t0 = time.perf_counter()
    for _ in range(len(loader) * steps):
        _host_step(a)
    work = time.perf_counter() - t0
    loader.set_epoch(epoch)
    acc = torch.zeros((), device=device, dtype=torch.float32)
    t0 = time.perf_counter()
    for xb, _ in loader:
        acc += xb.reshape(len(xb), -1)[:, 0].float().sum()
        for _ in range(steps):
            _host_step(a)
    float(acc)
    return time.perf_counter() - t0, work


def _steps_like_a_batch(loader: store.StoreLoader, device: torch.device, per_s: float) -> int:
    """Busy-loop iterations (``per_s`` a second alone) that take about as long as one of the
    loader's batches alone: timed on an epoch after an untimed warm-up epoch, whose first
    touches make it several times slower than the epochs the consumer is then timed beside."""
    _epoch(loader, 0, device)  # warm-up
    per_batch = _epoch(loader, 0, device) / len(loader)
    return max(1, round(per_batch * per_s))


def _epoch(loader: store.StoreLoader, epoch: int, device: torch.device) -> float:
    loader.set_epoch(epoch)
    acc = torch.zeros((), device=device, dtype=torch.float32)
    t0 = time.perf_counter()
    for xb, _ in loader:
        acc += xb.reshape(len(xb), -1)[:, 0].float().sum()
    float(acc)  # synchronises the device
    return time.perf_counter() - t0


def run(
    args: argparse.Namespace, save: Callable[[dict[str, Any]], object] | None = None
) -> dict[str, Any]:
    """Every measurement; ``save`` is given the results so far after each part (a run stopped
    by a time limit, as gpu.sh's feed stage is, keeps what it measured)."""
    device = torch.device(args.device)
    shape = tuple(args.shape)
    x = _samples(args.num_samples, shape, args.seed)
    y = torch.arange(args.num_samples) % 10
    nbytes = x.numel() * x.element_size()
    work = Path(tempfile.mkdtemp(prefix="bench-feed-", dir=args.dir))
    out: dict[str, Any] = {
        "num_samples": args.num_samples,
        "shape": shape,
        "bytes": nbytes,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "write_s": {},
        "feed_s": {},
    }
    try:
        hows = ["zarr-path", "write", "write_rows", "write_rows-pwrite", "write_rows-prepared"]
        times: dict[str, list[float]] = {h: [] for h in hows}
        prepare_s: list[float] = []
        for r in range(args.repeats + 1):  # round 0 is a warm-up
            for h in hows:
                t = _write(work / h, x, y, h, args.batch_size, args.seed + r, prepare_s)
                if r:
                    times[h].append(t)
        for h in hows:
            out["write_s"][h] = statistics.median(times[h])
        out["prepare_s"] = statistics.median(prepare_s[1:])  # round 0 warmed up
        _saved(save, out)
        for h in hows[1:]:
            s = store.open(work / h)
            assert torch.equal(s.read(0, np.arange(args.num_samples)), x), h
        a = torch.zeros(4)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.5:
            _host_step(a)
            n += 1
        alone = n / (time.perf_counter() - t0)
        out["busy_loop_alone_per_s"] = alone
        out["beside_busy"] = {}
        for h in ["write_rows", "write_rows-pwrite", "write_rows-prepared"]:
            rounds = [
                _beside_busy_loop(work / h, x, y, h, args.batch_size, args.seed + r, alone)
                for r in range(args.repeats)
            ]
            out["beside_busy"][h] = {
                "write_s": statistics.median(t for t, _ in rounds),
                "loop_share": statistics.median(s for _, s in rounds),
            }
        raw = store.open(work / "write")
        parts = [
            _breakdown(work / "breakdown", x, args.batch_size, args.seed + r, raw.chunk_samples)
            for r in range(args.repeats)
        ]
        out["breakdown_s"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        _saved(save, out)
        default_workers = store.StoreLoader(raw, device=device).gather_workers
        threads = max(2, default_workers)
        _gathers(x, args.batch_size, args.seed, threads)  # warm-up
        gathers = [
            _gathers(x, args.batch_size, args.seed + r, threads) for r in range(args.repeats)
        ]
        out["gather_s"] = {k: statistics.median(g[k] for g in gathers) for k in gathers[0]}
        _saved(save, out)
        if device.type == "cuda":
            out["h2d_s"] = statistics.median(
                _h2d(x, args.batch_size, device) for _ in range(args.repeats)
            )
        out["per_batch_us"] = _per_batch(
            args.num_samples, args.batch_size, device, args.seed, args.repeats
        )
        _saved(save, out)
        ram = store.RamCache.from_store(raw, pin=device.type == "cuda")
        feeds: dict[str, tuple[store.ActivationSource, int, int]] = {}
        tiers: tuple[tuple[str, store.ActivationSource], ...] = (("ram", ram), ("zarr", raw))
        for tier, tier_src in tiers:
            feeds[f"{tier}/1"] = (tier_src, 1, 1)
            feeds[f"{tier}/{default_workers}"] = (tier_src, default_workers, 1)
            feeds[f"{tier}/{default_workers} x{GROUP}"] = (tier_src, default_workers, GROUP)
        ft: dict[str, list[float]] = {k: [] for k in feeds}
        out["feed_stats"] = {}
        for k, (src, workers, per_copy) in feeds.items():
            loader = store.StoreLoader(
                src,
                batch_size=args.batch_size,
                device=device,
                prefetch=4,
                seed=args.seed,
                gather_workers=workers,
                batches_per_copy=per_copy,
            )
            _epoch(loader, 0, device)  # warm-up
            for r in range(args.repeats):
                ft[k].append(_epoch(loader, r + 1, device))
            out["feed_stats"][k] = loader.stats.as_dict()  # the last epoch's account
            loader.close()
        for k in feeds:
            out["feed_s"][k] = statistics.median(ft[k])
        _saved(save, out)
        # The loader's prefetch thread beside a consumer that runs Python between batches, as
        # the training thread does (the trainer's loader on CUDA: prefetch 2, the defaults):
        # about as much Python per batch as the loader alone takes per batch.
        out["beside_work"] = {}
        for tier, src in tiers:
            loader = store.StoreLoader(
                src, batch_size=args.batch_size, device=device, prefetch=2, seed=args.seed
            )
            steps = _steps_like_a_batch(loader, device, out["busy_loop_alone_per_s"])
            trials = [
                (_epoch(loader, r + 1, device), *_beside_host_work(loader, r + 1, device, steps))
                for r in range(args.repeats)
            ]
            loader.close()
            out["beside_work"][tier] = {
                "feed_s": statistics.median(f for f, _, _ in trials),
                "work_s": statistics.median(w for _, _, w in trials),
                "together_s": statistics.median(t for _, t, _ in trials),
                "steps_per_batch": steps,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _saved(save: Callable[[dict[str, Any]], object] | None, out: dict[str, Any]) -> None:
    if save is not None:
        save(out)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, after an empty line."""
    return ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def report(r: dict[str, Any]) -> str:
    b = r["bytes"]

    def gbs(t: float) -> str:
        return f"{b / t / GB:.2f}"

    lines = [
        f"{r['num_samples']:,} x {tuple(r['shape'])} fp16 = {b / GB:.2f} GB; device {r['device']} "
        f"({r['device_name']}), {r['cpus']} CPUs, torch {r['torch']}"
    ]
    base = r["write_s"]["zarr-path"]
    lines += _table(
        ["write", "s", "GB/s", "vs zarr-path"],
        [[h, f"{t:.2f}", gbs(t), f"{base / t:.2f}x"] for h, t in r["write_s"].items()],
    )
    if r.get("prepare_s") is not None:
        p = r["prepare_s"]
        lines.append(
            f"\nwrite_rows-prepared: its store's files were mapped and faulted in before the "
            f"clock started (prepare_rows on the row threads: {p:.2f} s, {gbs(p)} GB/s)"
        )
    if r.get("beside_busy"):
        lines += _table(
            ["write beside a busy loop", "s", "GB/s", "loop's rate vs alone"],
            [
                [h, f"{v['write_s']:.2f}", gbs(v["write_s"]), f"{v['loop_share']:.2f}"]
                for h, v in r["beside_busy"].items()
            ],
        )
    if r.get("breakdown_s"):
        lines += _table(
            ["where a row write's time goes", "s", "GB/s"],
            [[k, f"{t:.2f}", gbs(t)] for k, t in r["breakdown_s"].items()],
        )
    if r.get("gather_s"):
        g = r["gather_s"]
        lines += _table(
            ["gather (one epoch, no loader; /Nt: N threads)", "s", "GB/s", "vs buffered"],
            [[k, f"{t:.3f}", gbs(t), f"{g['take-buffered'] / t:.2f}x"] for k, t in g.items()],
        )
    if r.get("h2d_s"):
        t = r["h2d_s"]
        lines.append(
            f"\nhost to device from one pinned batch buffer (no loader): {t:.3f} s an epoch, "
            f"{gbs(t)} GB/s"
        )
    if r.get("per_batch_us"):
        lines += _table(
            ["loader, 8-byte samples, batches made on", "us per batch"],
            [[k, f"{us:.0f}"] for k, us in r["per_batch_us"].items()],
        )
    feed = r["feed_s"]
    lines += _table(
        [f"feed (tier/threads, x{GROUP}: {GROUP} batches a copy)", "s/epoch", "GB/s", "vs tier/1"],
        [
            [k, f"{t:.3f}", gbs(t), f"{feed[k.split('/')[0] + '/1'] / t:.2f}x"]
            for k, t in feed.items()
        ],
    )
    if r.get("beside_work"):
        rows = []
        for tier, v in r["beside_work"].items():
            feed_s, work_s, both = v["feed_s"], v["work_s"], v["together_s"]
            hidden = (feed_s + work_s - both) / min(feed_s, work_s)
            rows.append([tier, f"{feed_s:.3f}", f"{work_s:.3f}", f"{both:.3f}", f"{hidden:.2f}"])
        head = ["feed beside a consumer's Python (s/epoch)", "feed alone", "Python alone"]
        lines += _table([*head, "together", "share hidden"], rows)
    if r.get("feed_stats"):
        parts = ["gather", "buffers", "copy", "starved", "full"]
        head = ["feed, the last epoch's account (s)", "gather", "buffers", "copy issue"]
        lines += _table(
            [*head, "starved", "full"],
            [[k, *(f"{st[p]:.3f}" for p in parts)] for k, st in r["feed_stats"].items()],
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--shape", type=int, nargs="+", default=[84, 16, 16], metavar="D")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=None, help="where to write the stores (a temp dir)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result path (and .txt beside it); the results so far are saved after each part",
    )
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.repeats < 1 or args.batch_size < 1:
        p.error("--num-samples, --repeats and --batch-size must be >= 1")
    if any(d < 1 for d in args.shape):
        p.error(f"--shape: every size must be >= 1, got {' '.join(map(str, args.shape))}")
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:N)")
    if args.num_samples < args.batch_size:  # the gathers and copies time whole batches
        p.error(f"--num-samples {args.num_samples} must be at least --batch-size {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    env = environment(torch.device(args.device).type)  # commit, versions, machine
    out = args.out

    def save(partial: dict[str, Any]) -> None:
        if out is not None:
            write_json(out, {**partial, "partial": True, "environment": env})

    r = run(args, save)
    r["environment"] = env
    text = report(r)
    sys.stdout.write(text + "\n")
    if out is not None:
        write_json(out, r)
        out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
