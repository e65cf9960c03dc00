"""The store: layout, round trips, readers, crash safety and errors (N=117, chunk 8, 3 views)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import store
from store.__main__ import main as store_main
from store.errors import check_int
from tests.store_helpers import (
    CHUNK,
    SHAPE,
    VIEWS,
    N,
    chunk_files,
    cut_short_after_removing,
    decode,
    encoded,
    labels_for,
    write_store,
)

ALL = np.arange(N)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return encoded(), labels_for()


def _threads() -> int:
    """Live threads, less the short-lived ones that unmap a closed writer's row map (an
    earlier test's store may still be dropping its map)."""
    return sum(t.name != "store-unmap" for t in threading.enumerate())


# ---- round trips and layout -----------------------------------------------------------------
@pytest.mark.parametrize("codec", [None, "lz4", "zstd"])
def test_float32_round_trip_is_bit_exact(tmp_path, data, codec):
    x, y = data
    s = write_store(tmp_path / "s", x, y, codec=codec)
    assert s.complete and s.num_samples == N and s.views == VIEWS and s.sample_shape == SHAPE
    assert s.dtype == torch.float32 and s.codec == codec and s.meta == {"test": True}
    assert s.num_chunks == 15  # 14 full chunks of 8 and one of 5
    for v in range(VIEWS):
        assert torch.equal(s.read(v, ALL), x[v])
    assert torch.equal(s.labels, y)
    assert s.read(2, [116, 0, 116]).shape == (3, *SHAPE)
    assert torch.equal(s.read(2, [116, 0, 116]), x[2, [116, 0, 116]])


@pytest.mark.parametrize(
    ("dtype", "tdtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
@pytest.mark.parametrize("codec", [None, "zstd"])
def test_16_bit_round_trip_equals_rounding(tmp_path, data, dtype, tdtype, codec):
    x, y = data
    s = write_store(tmp_path / "s", x, y, dtype=dtype, codec=codec)
    assert s.dtype == tdtype
    got = s.read(1, ALL)
    assert got.dtype == tdtype
    assert torch.equal(got, x[1].to(tdtype))
    torch.testing.assert_close(
        got.float(), x[1], rtol=1e-2 if dtype == "bfloat16" else 1e-3, atol=0
    )


def test_layout_is_plain_zarr(tmp_path, data):
    x, y = data
    write_store(tmp_path / "s", x, y, dtype="bfloat16")
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    acts = g["activations"]
    assert acts.shape == (VIEWS, N, *SHAPE)
    assert acts.chunks == (1, CHUNK, *SHAPE)
    assert acts.dtype == np.uint16  # raw bfloat16 words
    assert np.array_equal(g["labels"][...], y.numpy())
    attrs = g.attrs["prefast_store"]
    assert attrs["format_version"] == store.FORMAT_VERSION
    assert attrs["layout"]["dtype"] == "bfloat16" and attrs["complete"] is True
    words = torch.from_numpy(np.asarray(acts[1, 10:12]).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(words, x[1, 10:12].bfloat16())


@pytest.mark.parametrize("codec", [None, "lz4"])
def test_table_chunks_written_as_files_are_what_zarr_writes(tmp_path, data, codec):
    """In a local store the labels and CRC tables' chunks are plain files: byte for byte what
    zarr writes for them (the labels' edge chunk padded with -1), and read back by zarr."""
    x, y = data
    made = {}
    for name, direct in (("direct", True), ("zarr", False)):
        w = store.create(tmp_path / name, sample_shape=SHAPE, num_samples=N, views=VIEWS,
                         dtype="float32", codec=codec, chunk_samples=CHUNK)  # fmt: skip
        if not direct:
            w._local_root = None  # every table chunk through zarr's own writes
        with w:
            for v in range(VIEWS):
                w.write(v, 0, x[v], y)
        made[name] = tmp_path / name
    for table in ("labels", "chunk_crc", "label_crc"):
        files = sorted(f for f in (made["zarr"] / table / "c").rglob("*") if f.is_file())
        assert len(files) == {"labels": 15, "chunk_crc": 45, "label_crc": 15}[table]
        for f in files:
            assert (made["direct"] / f.relative_to(made["zarr"])).read_bytes() == f.read_bytes()
        mine = sorted(f for f in (made["direct"] / table).rglob("*") if f.is_file())
        assert [f.name for f in mine if f.name.endswith(".tmp")] == []  # renamed into place
    s = store.open(made["direct"])
    assert s.complete and torch.equal(s.labels, y) and s.verify_labels() == []
    assert all(s.verify_chunk(v, c) for v in range(VIEWS) for c in range(s.num_chunks))


def test_memory_map_bytes_equal_zarr_read(tmp_path, data):
    x, y = data
    s = write_store(tmp_path / "s", x, y, dtype="float16")
    assert s.memory_mapped
    for v in range(VIEWS):
        via_zarr = np.asarray(zarr.open_group(str(tmp_path / "s"), mode="r")["activations"][v])
        via_mmap = s.read(v, ALL).numpy()
        assert via_mmap.tobytes() == via_zarr.tobytes()


def test_default_chunk_is_about_8_mib(tmp_path):
    w = store.create(tmp_path / "s", sample_shape=(84, 16, 16), num_samples=50_000, dtype="float16")
    w.abort()
    assert w.layout.chunk_samples == 196  # 8 MiB / 43,008 B = 195, rounded up to whole pages


def test_writing_a_chunk_twice_is_harmless(tmp_path, data):
    x, y = data
    with store.create(
        tmp_path / "s",
        sample_shape=SHAPE,
        num_samples=N,
        views=1,
        dtype="float32",
        chunk_samples=CHUNK,
    ) as w:
        w.write(0, 0, x[0, :20], y[:20])
        w.write(0, 4, x[0, 4:30], y[4:30])  # overlaps the first write
        w.write(0, 0, x[0], y)  # everything again
    s = store.open(tmp_path / "s")
    assert torch.equal(s.read(0, ALL), x[0])


def test_a_write_that_completes_an_unlabelled_chunk_is_refused_whole_and_can_be_given_again(
    tmp_path, data
):
    # The refusal comes before the chunk is touched: the samples buffered by earlier writes
    # stay, so the same write given again with its labels completes the chunk (the buffer was
    # dropped with the refusal, and the chunk never filled again: the store stayed incomplete).
    x, y = data
    kw = dict(sample_shape=SHAPE, num_samples=N, views=1, dtype="float32", chunk_samples=CHUNK)
    with store.create(tmp_path / "s", **kw) as w:
        w.write(0, 0, x[0, :4], y[:4])
        with pytest.raises(store.StoreInputError, match="labels were never given"):
            w.write(0, 4, x[0, 4:12])
        w.write(0, 4, x[0, 4:12], y[4:12])
        w.write(0, 12, x[0, 12:], y[12:])
    s = store.open(tmp_path / "s")
    assert s.complete and torch.equal(s.read(0, ALL), x[0]) and torch.equal(s.labels, y)


def test_a_chunk_written_again_while_its_first_write_is_in_flight_keeps_the_first(tmp_path):
    # The pool's one thread is held, so chunk 0's first write is still queued when it is
    # written again: the second write is skipped as for a stored chunk, never stored too
    # (two stores of one chunk race: one's data with the other's checksum).
    gate = threading.Event()
    with store.create(
        tmp_path / "s", sample_shape=(3,), num_samples=8, dtype="float32", chunk_samples=4,
        workers=1,
    ) as w:  # fmt: skip
        held = w._pool.submit(gate.wait, 10)
        w.write(0, 0, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
        w.write(0, 0, torch.ones(8, 3), torch.zeros(8, dtype=torch.long))
        gate.set()
        held.result()
    assert w.chunks_written == 2
    s = store.open(tmp_path / "s")
    assert torch.equal(
        s.read(0, np.arange(8)), torch.tensor([0.0] * 4 + [1.0] * 4)[:, None].expand(8, 3)
    )
    assert all(s.verify_chunk(0, c) for c in range(2))


def test_writes_in_random_order_and_from_any_device_dtype(tmp_path, data):
    x, y = data
    order = np.random.default_rng(3).permutation(N)
    with store.create(
        tmp_path / "s",
        sample_shape=SHAPE,
        num_samples=N,
        views=1,
        dtype="float16",
        chunk_samples=CHUNK,
    ) as w:
        for i in order:
            w.write(0, int(i), x[0, i : i + 1].double(), y[i : i + 1])
    assert torch.equal(store.open(tmp_path / "s").read(0, ALL), x[0].half())


# ---- readers and tiers ----------------------------------------------------------------------
def _tiers(tmp_path, x, y):
    raw = write_store(tmp_path / "raw", x, y)
    lz4 = write_store(tmp_path / "lz4", x, y, codec="lz4")
    return {
        "zarr-raw": raw,
        "zarr-lz4": lz4,
        "ram": store.RamCache.from_store(raw),
        "device": store.DeviceCache.from_store(lz4, "cpu"),
        "ram-tensors": store.RamCache.from_tensors(x, y),
    }


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram", "device", "ram-tensors"])
def test_every_tier_yields_every_sample_once_with_the_stored_data(tmp_path, data, tier):
    x, y = data
    src = _tiers(tmp_path, x, y)[tier]
    for epoch in range(3):
        loader = store.StoreLoader(src, batch_size=10, seed=5, prefetch=2, buffer_chunks=3)
        loader.set_epoch(epoch)
        assert len(loader) == 12
        seen, sizes = [], []
        for xb, yb in loader:
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64
            v, i = (
                xb.reshape(len(xb), -1)[:, 0].numpy().astype(np.int64) // 10000,
                xb.reshape(len(xb), -1)[:, 0].numpy().astype(np.int64) % 10000,
            )
            assert torch.equal(xb, x[v, i])  # the same data as s.read(view, index)
            assert torch.equal(yb, y[i])
            seen.append(i)
            sizes.append(len(xb))
        allseen = np.concatenate(seen)
        assert sorted(allseen.tolist()) == list(range(N))
        assert sizes == [10] * 11 + [7]


def test_random_access_tiers_share_one_order(tmp_path, data):
    x, y = data
    t = _tiers(tmp_path, x, y)
    batches = {}
    for name in ("zarr-raw", "ram", "device"):
        loader = store.StoreLoader(t[name], batch_size=16, seed=9)
        loader.set_epoch(4)
        batches[name] = [xb for xb, _ in loader]
    for name in ("ram", "device"):
        for a, b in zip(batches["zarr-raw"], batches[name], strict=True):
            assert torch.equal(a, b)
    # and it is the documented contract
    order = store.epoch_permutation(N, 9, 4)
    views = store.epoch_views(N, VIEWS, 9, 4)
    first = batches["ram"][0]
    assert torch.equal(first, x[views[order[:16]], order[:16]])


def test_order_is_reproducible_and_changes_with_epoch(tmp_path, data):
    x, y = data
    src = store.RamCache.from_tensors(x, y)

    def run(seed, epoch):
        loader = store.StoreLoader(src, batch_size=32, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([yb for _, yb in loader]), torch.cat([xb[:, 0, 0, 0] for xb, _ in loader])

    a, b, c = run(1, 0), run(1, 0), run(1, 1)
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(run(2, 0)[1], a[1])


def test_one_view_per_sample_per_epoch_and_all_views_used(tmp_path, data):
    x, y = data
    src = store.RamCache.from_tensors(x, y)
    loader = store.StoreLoader(src, batch_size=50, seed=0)
    counts = np.zeros(VIEWS, dtype=int)
    for epoch in range(4):
        loader.set_epoch(epoch)
        codes = torch.cat([xb[:, 0, 0, 0] for xb, _ in loader]).numpy().astype(int)
        assert sorted((codes % 10000).tolist()) == list(range(N))
        np.add.at(counts, codes // 10000, 1)
    assert (counts > 100).all()  # 468 draws over 3 views


def test_streaming_reader_draws_one_view_per_chunk(tmp_path, data):
    x, y = data
    s = write_store(tmp_path / "z", x, y, codec="zstd")
    loader = store.StoreLoader(s, batch_size=13, seed=2, buffer_chunks=2)
    assert loader.streaming
    loader.set_epoch(1)
    codes = torch.cat([xb[:, 0, 0, 0] for xb, _ in loader]).numpy().astype(int)
    views, idx = codes // 10000, codes % 10000
    assert sorted(idx.tolist()) == list(range(N))
    for c in range(s.num_chunks):
        assert len(set(views[idx // CHUNK == c].tolist())) == 1


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram"])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_parts_are_disjoint_equal_and_cover(tmp_path, data, tier, world):
    x, y = data
    src = _tiers(tmp_path, x, y)[tier]
    parts = []
    for rank in range(world):
        loader = store.StoreLoader(src, batch_size=7, seed=3, rank=rank, world_size=world)
        loader.set_epoch(2)
        idx = np.concatenate([(xb[:, 0, 0, 0].numpy().astype(int) % 10000) for xb, _ in loader])
        assert len(loader) == -(-len(idx) // 7)
        parts.append(idx)
    assert {len(p) for p in parts} == {N // world}  # as the trainer counts its steps
    union = np.concatenate(parts)
    assert len(set(union.tolist())) == len(union)  # disjoint
    assert len(union) == N - N % world  # covers all but the epoch's remainder


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: store.epoch_permutation(-3, 0, 0), "num_samples"),  # was an empty epoch
        (lambda: store.epoch_permutation(5, 0, 0, shuffle="False"), "shuffle"),  # was shuffled
        (lambda: store.epoch_views(5, 2.5, 0, 0), "views"),  # drew views 0 and 1 only
        (lambda: store.epoch_views(-1, 2, 0, 0), "num_samples"),  # numpy's ValueError
        (lambda: store.rank_part(np.arange(10), True, 2), "rank"),  # was rank 1
        (lambda: store.rank_part(np.arange(10), 0, 2.0), "world_size"),  # numpy's TypeError
    ],
)
def test_the_order_functions_refuse_a_count_or_flag_of_the_wrong_type(call, field):
    with pytest.raises(store.StoreInputError, match=field):
        call()
    assert store.rank_part(np.arange(10), np.int64(1), np.int64(3)).tolist() == [1, 4, 7]
    assert store.epoch_permutation(np.int64(4), 0, 0, np.bool_(False)).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram"])
def test_fewer_samples_than_ranks_is_refused_by_every_tier(tmp_path, data, tier):
    # random access gave each rank 0 samples (a silent epoch of nothing), streaming raised
    x, y = data
    src = _tiers(tmp_path, x[:, :2], y[:2])[tier]
    with pytest.raises(store.StoreInputError, match=r"2 sample\(s\) cannot be shared by 3 ranks"):
        len(store.StoreLoader(src, batch_size=7, seed=3, rank=2, world_size=3))
    assert len(store.StoreLoader(src, batch_size=7, seed=3, rank=1, world_size=2)) == 1
    # when the loader is made, not at its first len() or batch
    with pytest.raises(store.StoreInputError, match=r"cannot be shared by 3 ranks"):
        store.StoreLoader(src, batch_size=7, rank=0, world_size=3)


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram"])
def test_drop_last_with_no_full_batch_is_refused(tmp_path, data, tier):
    # every epoch was one of no batches, silently (a training loop of no steps)
    x, y = data
    src = _tiers(tmp_path, x, y)[tier]
    with pytest.raises(store.StoreInputError, match=r"the 39 sample\(s\) each of 3 rank"):
        store.StoreLoader(src, batch_size=40, drop_last=True, rank=1, world_size=3)
    assert len(store.StoreLoader(src, batch_size=39, drop_last=True, world_size=3)) == 1
    assert len(store.StoreLoader(src, batch_size=40, world_size=3)) == 1


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram"])
@pytest.mark.parametrize("batches_per_copy", [1, 3])
def test_a_batch_size_above_the_data_allocates_only_the_data(
    tmp_path, data, tier, batches_per_copy
):
    """The batch buffer had room for batch_size samples whatever the data: a batch size of
    10**12 over 37 samples failed allocating terabytes, 10**6 took a gigabyte."""
    x, y = data
    src = _tiers(tmp_path, x[:, :37], y[:37])[tier]
    sizes = []
    loader = store.StoreLoader(
        src, batch_size=10**12, prefetch=0, batches_per_copy=batches_per_copy
    )
    fill = loader.sampling.fill_group

    def spy(group, out):
        sizes.append(out.untyped_storage().nbytes())
        return fill(group, out)

    loader.sampling.fill_group = spy
    batches = [(decode(xb)[1], yb) for xb, yb in loader]
    assert len(loader) == len(batches) == 1 and sorted(batches[0][0].tolist()) == list(range(37))
    assert torch.equal(batches[0][1], y[torch.from_numpy(batches[0][0])])
    assert sizes == [37 * x[0, 0].numel() * x.element_size()]


def test_drop_last_and_start_batch(tmp_path, data):
    x, y = data
    src = store.RamCache.from_tensors(x, y)
    loader = store.StoreLoader(src, batch_size=10, seed=0, drop_last=True)
    assert len(loader) == 11
    full = [yb for _, yb in loader]
    assert len(full) == 11 and all(len(b) == 10 for b in full)
    loader.set_epoch(0, start_batch=8)
    rest = [yb for _, yb in loader]
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(full[8:], rest, strict=True))
    loader.set_epoch(0, start_batch=11)  # the end of the epoch: nothing left
    assert list(loader) == []
    with pytest.raises(store.StoreInputError, match="past the end of an epoch of 11 batches"):
        loader.set_epoch(0, start_batch=12)


def test_loader_source_error_surfaces_instead_of_hanging(data):
    x, y = data

    class Broken(store.RamCache):
        def gather(self, views, indices, out):
            raise RuntimeError("disk on fire")

    src = Broken(x.clone(), y.clone())
    loader = store.StoreLoader(src, batch_size=10)
    with pytest.raises(RuntimeError, match="disk on fire"):
        for _ in loader:
            pass


def test_loader_close_stops_its_thread(data):
    x, y = data
    before = _threads()
    src = store.RamCache.from_tensors(x, y)
    with store.StoreLoader(src, batch_size=5, prefetch=1) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
    assert _threads() == before
    it = iter(store.StoreLoader(src, batch_size=5, prefetch=1))
    next(it)
    it.close()
    assert _threads() == before


@pytest.mark.parametrize("prefetch", [0, 2])
def test_nested_passes_over_one_loader_each_see_the_whole_epoch(data, prefetch):
    x, y = data
    before = _threads()
    loader = store.StoreLoader(store.RamCache.from_tensors(x, y), batch_size=20, prefetch=prefetch)
    outer = []
    for k, (xb, yb) in enumerate(loader):
        outer.append(decode(xb)[1])
        if k < 3:  # an inner pass (an evaluation, say) while the outer one is under way
            inner = np.concatenate([decode(b)[1] for b, _ in loader])
            assert sorted(inner.tolist()) == list(range(N))
        assert torch.equal(yb, y[torch.from_numpy(outer[-1])])
    assert sorted(np.concatenate(outer).tolist()) == list(range(N))
    # two passes side by side deliver the same batches
    pairs = list(zip(loader, loader, strict=True))
    assert len(pairs) == len(loader) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    assert _threads() == before


def test_a_pass_stopped_by_close_says_so(data):
    x, y = data
    before = _threads()
    loader = store.StoreLoader(store.RamCache.from_tensors(x, y), batch_size=20, prefetch=1)
    it = iter(loader)
    next(it)
    loader.close()
    assert _threads() == before
    with pytest.raises(store.StoreError, match="closed while this pass"):
        next(it)


def test_ram_and_device_cache_written_like_a_store(data):
    x, y = data
    ram = store.RamCache.empty(N, VIEWS, SHAPE, "float16")
    dev = store.DeviceCache.empty(N, VIEWS, SHAPE, torch.float32, device="cpu")
    for tier in (ram, dev):
        with tier:
            for v in range(VIEWS):
                for i in range(0, N, 40):
                    tier.write(v, i, x[v, i : i + 40], y[i : i + 40])
    assert torch.equal(ram.read(2, ALL), x[2].half())
    assert torch.equal(dev.read(1, [5, 3]), x[1, [5, 3]])
    assert torch.equal(ram.labels, y) and ram.nbytes == VIEWS * N * 60 * 2


# ---- crash safety, resume, locking ------------------------------------------------------------
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import store
    from tests.store_helpers import encoded, labels_for, SHAPE, N, VIEWS, CHUNK
    x, y = encoded(), labels_for()
    w = store.create(sys.argv[1], sample_shape=SHAPE, num_samples=N, views=VIEWS,
                     dtype="float16", codec=sys.argv[2] if sys.argv[2] != "none" else None,
                     chunk_samples=CHUNK, meta={"test": True})
    for v in range(VIEWS):
        for i in range(0, N, 9):
            w.write(v, i, x[v, i:i + 9], y[i:i + 9])
            if v == 1 and i >= 45:
                w.flush()
                print("ready", flush=True)
                time.sleep(60)
    """
)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_killed_writer_leaves_incomplete_store_that_resume_completes(tmp_path, data, codec):
    x, y = data
    path = tmp_path / "s"
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), codec],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    with pytest.raises(store.StoreIncompleteError, match="missing"):
        store.open(path)
    partial = store.open(path, partial=True)
    missing = partial.missing_ranges()
    assert missing[0][0] == 1 and missing[-1] == (2, 0, N)
    assert torch.equal(partial.read(0, ALL), x[0].half())
    with pytest.raises(store.StoreIncompleteError):
        partial.read(2, [0])
    # the dead writer's lock went with it: resume completes the store
    with store.create(
        path,
        sample_shape=SHAPE,
        num_samples=N,
        views=VIEWS,
        dtype="float16",
        codec=None if codec == "none" else codec,
        chunk_samples=CHUNK,
        meta={"test": True},
        resume=True,
    ) as w:
        assert w.missing == missing
        for v, start, stop in w.missing:
            w.write(v, start, x[v, start:stop], y[start:stop])
    ref = write_store(
        tmp_path / "ref", x, y, dtype="float16", codec=None if codec == "none" else codec
    )
    assert store.open(path).complete and ref.complete
    assert chunk_files(path) == chunk_files(tmp_path / "ref")


@pytest.mark.parametrize("table", ["chunk_crc/c/0/1", "labels/c/1"])
def test_resume_names_a_truncated_table_chunk(tmp_path, data, table):
    # zarr's read of the table raised a bare ValueError ('cannot reshape array of size 0')
    x, y = data
    kw = dict(sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK, dtype="float32")
    w = store.create(tmp_path / "s", **kw)
    w.write(0, 0, x[0, :20], y[:20])  # chunks 0, 1 written, then killed
    w.abort()
    f = tmp_path / "s" / table
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(store.StoreCorruptError, match=rf"{f}: a chunk of the .* has 5 bytes"):
        store.create(tmp_path / "s", resume=True, **kw)
    if table.startswith("chunk_crc"):
        f.unlink()  # a missing CRC chunk: the chunk is written again
        with store.create(tmp_path / "s", resume=True, **kw) as w:
            assert w.missing == [(0, 8, N)]
            w.write(0, 8, x[0, 8:], y[8:])
        assert torch.equal(store.open(tmp_path / "s").read(0, ALL), x[0])


def test_second_writer_is_refused(tmp_path):
    w = store.create(
        tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float32", chunk_samples=CHUNK
    )
    try:
        with pytest.raises(store.StoreLockedError, match="another writer"):
            store.create(
                tmp_path / "s",
                sample_shape=SHAPE,
                num_samples=N,
                dtype="float32",
                chunk_samples=CHUNK,
                resume=True,
            )
    finally:
        w.abort()
    # released: resuming now works
    store.create(
        tmp_path / "s",
        sample_shape=SHAPE,
        num_samples=N,
        dtype="float32",
        chunk_samples=CHUNK,
        resume=True,
    ).abort()


def test_disjoint_ranks_write_one_store(tmp_path, data):
    x, y = data
    kw = dict(
        sample_shape=SHAPE,
        num_samples=N,
        views=VIEWS,
        dtype="float32",
        chunk_samples=CHUNK,
        meta={"test": True},
    )
    writers = [store.create(tmp_path / "s", rank=0, world_size=2, **kw)]
    writers.append(store.create(tmp_path / "s", rank=1, world_size=2, resume=True, **kw))
    for rank, w in enumerate(writers):
        for v in range(VIEWS):
            for c in range(rank, 15, 2):
                s0, s1 = c * CHUNK, min((c + 1) * CHUNK, N)
                w.write(v, s0, x[v, s0:s1], y[s0:s1])
        with pytest.raises(store.StoreInputError, match="belongs to rank"):
            w.write(0, (1 - rank) * CHUNK, x[0, :1], y[:1])
    for w in writers:
        w.close()
    with pytest.raises(store.StoreIncompleteError):
        store.open(tmp_path / "s")  # nobody finalized yet
    store.finalize(tmp_path / "s")
    ref = write_store(tmp_path / "ref", x, y)
    assert chunk_files(tmp_path / "s") == chunk_files(tmp_path / "ref")
    assert torch.equal(store.open(tmp_path / "s").read(2, ALL), ref.read(2, ALL))


def test_failing_background_write_is_raised_once_and_logged_only_where_not_raised(
    tmp_path, data, caplog
):
    x, y = data
    w = store.create(
        tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float32", chunk_samples=CHUNK
    )

    def full_disk(view, chunk, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    w._write_activations = full_disk  # every chunk write fails, like a full disk
    raised = []
    with caplog.at_level(logging.DEBUG, logger="store"):
        try:
            with w:
                for i in range(0, N, 8):  # 15 chunks go to the pool, each one fails
                    w.write(0, i, x[0, i : i + 8], y[i : i + 8])
        except store.StoreWriteError as e:
            raised.append(e)
        with pytest.raises(store.StoreError, match="write"):
            w.write(0, 0, x[0, :8], y[:8])  # a closed writer takes no more writes
        w.close()  # closing again raises nothing
    assert len(raised) == 1 and "No space left" in str(raised[0])
    assert isinstance(raised[0].__cause__, OSError)
    # raised, so not logged too (a CLI printed an ERROR line, then the same as its error line)
    logged = [r for r in caplog.records if "No space left" in r.getMessage() or r.exc_info]
    assert logged == []
    with pytest.raises(store.StoreIncompleteError):
        store.open(tmp_path / "s")

    # a caller failing for another reason aborts the writer: the failure it never raised is logged
    w = store.create(
        tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float32", chunk_samples=CHUNK,
        resume=True,
    )  # fmt: skip
    w._write_activations = full_disk
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="store"), pytest.raises(KeyError), w:
        w.write(0, 0, x[0, :8], y[:8])  # one chunk to the pool, which fails
        w._collect(block=True)
        raise KeyError("the caller's own failure")
    logged = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert [r.levelname for r in logged] == ["ERROR"]
    assert "left incomplete" in logged[0].getMessage()


def test_a_full_disk_when_marking_complete_names_the_store(tmp_path, data, monkeypatch):
    x, y = data
    path = tmp_path / "s"
    w = store.create(path, sample_shape=SHAPE, num_samples=N, dtype="float32", chunk_samples=CHUNK)
    w.write_rows(0, ALL[::-1].copy(), x[0].flip(0), y.flip(0))

    def full_disk(group, info):  # the record's write is the one that finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("store.writer._mark_complete", full_disk)
    with pytest.raises(store.StoreWriteError, match=f"{path}: marking the store complete failed"):
        w.close()
    monkeypatch.undo()
    assert not store.open(path, partial=True).complete
    store.create(path, sample_shape=SHAPE, num_samples=N, dtype="float32", chunk_samples=CHUNK,
                 resume=True).close()  # fmt: skip
    assert store.verify(store.open(path)).ok


def test_failure_raised_by_flush_is_not_raised_again_by_close(tmp_path, data):
    x, y = data
    w = store.create(
        tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float32", chunk_samples=CHUNK
    )

    def full_disk(view, chunk, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    w._write_activations = full_disk
    w.write(0, 0, x[0, :8], y[:8])  # one full chunk goes to the pool
    with pytest.raises(store.StoreWriteError, match="No space left"):
        w.flush()
    with pytest.raises(store.StoreWriteError, match="failed earlier"):
        w.write(0, 8, x[0, 8:16], y[8:16])
    w.close()  # the failure was raised already; the store stays incomplete
    assert store.open(tmp_path / "s", partial=True).missing_ranges() == [(0, 0, N)]


# ---- bad input --------------------------------------------------------------------------------
def test_open_errors_name_the_path(tmp_path, data):
    x, y = data
    with pytest.raises(store.StoreNotFoundError, match="nowhere"):
        store.open(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(store.NotAStoreError, match="plain"):
        store.open(tmp_path / "plain")
    zarr.create_group(str(tmp_path / "foreign"))
    with pytest.raises(store.NotAStoreError, match="foreign"):
        store.open(tmp_path / "foreign")
    write_store(tmp_path / "s", x, y)
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    attrs = dict(g.attrs["prefast_store"])
    g.attrs["prefast_store"] = {**attrs, "format_version": 99}
    with pytest.raises(store.StoreFormatError, match="format_version 99"):
        store.open(tmp_path / "s")


def test_create_under_a_file_names_the_file(tmp_path):
    (tmp_path / "afile").write_text("a user's file")
    with pytest.raises(store.StoreWriteError, match=r"afile is a file, not a folder"):
        store.create(tmp_path / "afile" / "sub" / "s", sample_shape=SHAPE, num_samples=N)
    assert (tmp_path / "afile").read_text() == "a user's file"


def test_create_through_a_dangling_link_names_the_link(tmp_path):
    """A store path, or a folder on its way, that is a link to nothing (a disk not mounted) was
    reported as 'File exists'."""
    (tmp_path / "s").symlink_to(tmp_path / "gone" / "s")
    (tmp_path / "cache").symlink_to(tmp_path / "unmounted")
    for path, link in ((tmp_path / "s", "s"), (tmp_path / "cache" / "run" / "s", "cache")):
        with pytest.raises(store.StoreWriteError, match=f"{link} is a link to .*, which does not"):
            store.create(path, sample_shape=SHAPE, num_samples=N)
    assert not (tmp_path / "gone").exists() and not (tmp_path / "unmounted").exists()


def test_create_where_a_folder_may_not_be_entered_is_a_write_error(tmp_path, monkeypatch):
    # a folder on the way this user may not enter (mode 700, another user's): mkdir fails with
    # EACCES and so does every stat below it; simulated, as root may enter any folder
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir, real_stat = Path.mkdir, Path.stat

    def denied(p: Path) -> bool:
        return p != locked and locked in p.parents

    def mkdir(self, *a, **k):
        if denied(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    def stat(self, *a, **k):
        if denied(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(
        store.StoreWriteError,
        match=r"locked.sub.s: cannot (look for|create) the store.*Permission denied",
    ):
        store.create(locked / "sub" / "s", sample_shape=SHAPE, num_samples=N)


def test_write_errors_name_the_field(tmp_path, data):
    x, y = data
    with store.create(
        tmp_path / "s",
        sample_shape=SHAPE,
        num_samples=N,
        views=2,
        dtype="float32",
        chunk_samples=CHUNK,
    ) as w:
        with pytest.raises(store.StoreInputError, match="'x' has sample shape"):
            w.write(0, 0, torch.zeros(4, 3, 5, 5), y[:4])
        with pytest.raises(store.StoreInputError, match="floating-point"):
            w.write(0, 0, torch.zeros(4, *SHAPE, dtype=torch.int32), y[:4])
        with pytest.raises(store.StoreInputError, match="'labels' must be 4"):
            w.write(0, 0, x[0, :4], y[:3])
        with pytest.raises(store.StoreInputError, match="'start'"):
            w.write(0, 115, x[0, :4], y[:4])
        with pytest.raises(store.StoreInputError, match="'view'"):
            w.write(2, 0, x[0, :4], y[:4])
        w.write(0, 0, x[0, :4], y[:4])
        with pytest.raises(store.StoreInputError, match="sample 1 got label"):
            w.write(1, 0, x[0, :4], y[:4] + torch.tensor([0, 1, 0, 0]))
    with pytest.raises(store.StoreInputError, match="dtype='float64'"):
        store.create(tmp_path / "t", sample_shape=SHAPE, num_samples=N, dtype="float64")
    with pytest.raises(store.StoreInputError, match="codec='gzip'"):
        store.create(tmp_path / "t", sample_shape=SHAPE, num_samples=N, codec="gzip")


@pytest.mark.parametrize(("codec", "level"), [("lz4", 10), ("lz4", -1), ("zstd", 23)])
def test_a_codec_level_the_codec_does_not_take_is_refused_at_create(tmp_path, codec, level):
    # lz4 (Blosc) takes levels 0..9: 10 made a store whose every chunk write failed in the
    # background with "error during blosc compression: -10"
    with pytest.raises(store.StoreInputError, match=rf"codec_level for codec='{codec}'.*{level}"):
        store.create(
            tmp_path / "c", sample_shape=(3,), num_samples=6, codec=codec, codec_level=level
        )
    assert not (tmp_path / "c").exists()
    with store.create(
        tmp_path / "ok", sample_shape=(3,), num_samples=6, codec="lz4", codec_level=9
    ) as w:
        w.write(0, 0, torch.ones(6, 3), torch.arange(6))
    assert torch.equal(
        store.open(tmp_path / "ok").read(0, [5]), torch.ones(1, 3, dtype=torch.float16)
    )


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_a_chunk_larger_than_the_store_holds_just_its_samples(tmp_path, codec):
    # chunk_samples=1000 for 10 samples wrote a raw chunk file of 1000 samples, 99 % padding
    x = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    with store.create(
        tmp_path / "s", sample_shape=(4,), num_samples=10, dtype="float32", codec=codec,
        chunk_samples=1000,
    ) as w:  # fmt: skip
        w.write(0, 0, x, torch.arange(10))
    s = store.open(tmp_path / "s")
    assert s.chunk_samples == 10 and s.num_chunks == 1
    assert torch.equal(s.read(0, np.arange(10)), x)
    if codec is None:
        assert (tmp_path / "s" / "activations" / "c" / "0" / "0" / "0").stat().st_size == 10 * 16


@pytest.mark.parametrize("sink", ["write", "write_rows", "ram"])
def test_a_numpy_batch_torch_cannot_hold_is_refused_by_name(tmp_path, sink):
    # numpy's longdouble passed the float check and failed in torch.from_numpy with a TypeError
    x = np.ones((2, 3), dtype=np.longdouble)
    if x.dtype.itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    y = np.arange(2)
    if sink == "ram":
        with pytest.raises(store.StoreInputError, match=r"field 'x'.*astype\(numpy.float64\)"):
            store.RamCache.empty(2, 1, (3,), "float32").write(0, 0, x, y)
        return
    with store.create(tmp_path / "s", sample_shape=(3,), num_samples=2, dtype="float32") as w:
        write = w.write if sink == "write" else lambda v, s, a, b: w.write_rows(v, [0, 1], a, b)
        with pytest.raises(store.StoreInputError, match=r"field 'x'.*astype\(numpy.float64\)"):
            write(0, 0, x, y)
        write(0, 0, x.astype(np.float64), y)
    assert torch.equal(store.open(tmp_path / "s").read(0, [0, 1]), torch.ones(2, 3))


def test_numpy_integer_sizes_make_a_store(tmp_path):
    # The layout takes numpy integers (a size computed with numpy); the record that holds
    # them is JSON, so they are kept as Python ints.
    x = torch.randn(6, 3)
    kw = {"num_samples": np.int64(6), "views": np.int64(1), "chunk_samples": np.int32(4)}
    with store.create(tmp_path / "s", sample_shape=(3,), dtype="float32", **kw) as w:
        w.write(0, 0, x, torch.arange(6))
    with store.create(
        tmp_path / "z", sample_shape=(3,), num_samples=np.int64(6), codec="zstd",
        codec_level=np.int64(3),
    ) as w:  # fmt: skip
        w.write(0, 0, x, torch.arange(6))
    s = store.open(tmp_path / "s")
    assert s.complete and s.chunk_samples == 4 and torch.equal(s.read(0, np.arange(6)), x)
    assert store.open(tmp_path / "z").layout.codec_level == 3


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        (512, "sequence of integers, got 512"),
        (None, "sequence of integers, got None"),
        ((3.5,), "must be an integer, got 3.5"),
        ((2, "a"), "must be an integer, got 'a'"),
    ],
)
def test_a_bad_sample_shape_is_refused_by_create_as_an_input_error(tmp_path, shape, match):
    # checked before the default chunk size is worked out from it
    with pytest.raises(store.StoreInputError, match=match):
        store.create(tmp_path / "s", sample_shape=shape, num_samples=4)


def test_an_argument_error_names_an_array_by_shape_not_by_its_whole_repr(tmp_path):
    # w.write(0, x, y) (start left out) printed all of x's values in the error: thousands of
    # lines for a real batch
    x = torch.zeros(40, 3, 5, 5)
    with store.create(tmp_path / "s", sample_shape=(3, 5, 5), num_samples=40) as w:
        with pytest.raises(store.StoreInputError) as e:
            w.write(0, x, torch.zeros(40, dtype=torch.long))  # type: ignore[arg-type]
        w.write(0, 0, x, torch.zeros(40, dtype=torch.long))
    assert str(e.value).endswith(
        "field 'start' must be an integer, got a tensor of shape (40, 3, 5, 5) and dtype "
        "torch.float32"
    )
    with pytest.raises(store.StoreInputError, match=r"got an array of shape \(2, 3\) and dtype"):
        check_int("n", np.zeros((2, 3)))
    with pytest.raises(store.StoreInputError, match=r"got 'aaaa.*aaa\.\.\.$"):
        check_int("n", "a" * 500)
    with pytest.raises(store.StoreInputError, match=r"got tensor\(\[4\]\)$"):
        check_int("n", torch.tensor([4]))  # one element: its repr is short and exact


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_a_closed_store_refuses_reads(tmp_path, data, codec):
    # reads after close() went on, the raw store mapping its chunk files again one by one
    x, y = data
    write_store(tmp_path / "s", x, y, codec=codec)
    with store.open(tmp_path / "s") as s:
        assert torch.equal(s.read(1, [5, 116]), x[1, [5, 116]])
    out = np.empty((2, *SHAPE), dtype=np.float32)
    for call in (
        lambda: s.read(0, [0]),
        lambda: s.read_chunk(0, 0),
        lambda: s.read_into(0, np.array([3, 4]), out),
        lambda: s.verify_chunk(0, 1),
        lambda: store.ActivationDataset(s)[0],
    ):
        with pytest.raises(store.StoreError, match=r"read after close\(\); store.open"):
            call()
    s.close()  # a second close is a no-op
    assert torch.equal(s.labels, y)  # what describes the store stays readable


def test_read_errors(tmp_path, data):
    x, y = data
    s = write_store(tmp_path / "s", x, y)
    with pytest.raises(store.StoreInputError, match="sample index 117 out of range"):
        s.read(0, [3, 117])
    with pytest.raises(store.StoreInputError, match="sample index -1"):
        s.read(0, [-1])
    # an unsigned index is named as given, not as the int64 it wraps to (2**64 - 1 was -1)
    with pytest.raises(store.StoreInputError, match=f"sample index {2**64 - 1} out of range"):
        s.read(0, np.array([5, 2**64 - 1], dtype=np.uint64))
    assert torch.equal(s.read(2, np.array([116, 0, 9], dtype=np.uint64)), x[2, [116, 0, 9]])
    with pytest.raises(store.StoreInputError, match="view 3"):
        s.read(3, [0])
    with pytest.raises(store.StoreInputError):
        store.RamCache.from_store(s).read(0, [117])
    # a chunk index that is a float or out of range: StoreInputError, not numpy's IndexError
    for call in (s.read_chunk, s.verify_chunk, s.chunk_written):
        with pytest.raises(store.StoreInputError, match=r"chunk must be an integer, got 0\.0"):
            call(0, 0.0)
        with pytest.raises(store.StoreInputError, match=r"chunk 99 out of range \[0, 15\)"):
            call(0, 99)
    assert s.chunk_written(0, np.int64(14)) and s.read_chunk(0, np.int64(14)).shape == (5, *SHAPE)


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_a_view_or_chunk_given_as_a_0d_tensor_reads_that_chunk(tmp_path, data, codec):
    # check_int took a 0-d tensor, but the tensor itself named the chunk file
    # (activations/c/tensor(1)/...), so the read raised StoreCorruptError: file missing
    x, y = data
    s = write_store(tmp_path / "s", x, y, codec=codec)
    v, c = torch.tensor(1), torch.tensor(14)
    assert torch.equal(s.read(v, [116, 3]), x[1, [116, 3]])
    assert np.array_equal(s.read_chunk(v, c), x[1, 112:].numpy())
    assert s.verify_chunk(v, c) and s.chunk_written(v, c)


def test_a_batch_over_more_chunks_than_files_may_be_open_is_read(tmp_path, data):
    """A shuffled batch over a raw store whose chunks are not whole pages held a map (and its
    file descriptor) of every chunk it touched at once: past the limit on open files it failed
    with OSError 'Too many open files'."""
    import resource

    x, y = data
    s = write_store(tmp_path / "s", x, y, chunk=1)  # 117 chunks a view, of 240 bytes
    assert s.memory_mapped and s._cm is None
    idx = np.random.default_rng(0).permutation(N)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 60, hard))
    try:
        s._mm.capacity = 16  # as open() sets it under this limit
        got = s.read(2, idx)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert torch.equal(got, x[2, idx])


def test_existing_store_needs_overwrite_or_resume(tmp_path, data):
    x, y = data
    write_store(tmp_path / "s", x, y)
    with pytest.raises(store.StoreExistsError, match="overwrite=True"):
        store.create(tmp_path / "s", sample_shape=SHAPE, num_samples=N)
    with pytest.raises(store.StoreMismatchError, match="views: store has 3, asked for 1"):
        store.create(
            tmp_path / "s",
            sample_shape=SHAPE,
            num_samples=N,
            dtype="float32",
            chunk_samples=CHUNK,
            resume=True,
            meta={"test": True},
        )
    store.create(tmp_path / "s", sample_shape=(2,), num_samples=5, overwrite=True).abort()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(store.StoreExistsError, match="refusing"):
        store.create(tmp_path / "other", sample_shape=SHAPE, num_samples=N, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_store_made_between_creates_look_and_its_lock_is_not_cleared(
    tmp_path, data, monkeypatch, resume
):
    """create() looks at the folder, then takes the lock: a store another writer made and
    completed in between was emptied as if the folder had been empty (without overwrite)."""
    x, y = data
    path = tmp_path / "s"
    lock = store.writer._DirLock

    def raced(p, shared):
        monkeypatch.setattr(store.writer, "_DirLock", lock)
        write_store(path, x, y)  # the other writer, done by the time this one locks
        return lock(p, shared)

    monkeypatch.setattr(store.writer, "_DirLock", raced)
    kw = dict(sample_shape=SHAPE, num_samples=N, views=VIEWS, dtype="float32", chunk_samples=CHUNK)
    if resume:  # the store made meanwhile is resumed (it is complete: nothing to write)
        with store.create(path, resume=True, meta={"test": True}, **kw) as w:
            assert w.missing == []
    else:
        with pytest.raises(store.StoreExistsError, match="another writer made a store here"):
            store.create(path, **kw)
    s = store.open(path)
    assert s.complete and store.verify(s).ok and torch.equal(s.read(2, ALL), x[2])
    store.create(path, overwrite=True, **kw).abort()  # the lock was released


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # a str, a float or a bool where an integer goes: refused by name, never a TypeError
        # from a comparison, an IndexError from numpy, nor taken as another count
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples="10"), "num_samples must"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, rank="0"), "rank must"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, world_size=2.0), "world_"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, workers="2"), "workers"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, workers=0), "workers"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, max_pending=0), "max_pe"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, meta="x"), "be a dict"),
        (lambda s, p: store.StoreLoader(s, batch_size="5"), "batch_size must be an integer"),
        (lambda s, p: store.StoreLoader(s, batch_size=True), "batch_size must be an integer"),
        (lambda s, p: store.StoreLoader(s, prefetch=1.5), "prefetch must be an integer"),
        (lambda s, p: store.StoreLoader(s, seed=1.5), "seed must be an integer"),
        (lambda s, p: store.StoreLoader(s, rank="0"), "rank must be an integer"),
        (lambda s, p: store.StoreLoader(s, read_workers="2"), "read_workers must be an integer"),
        (lambda s, p: store.StoreLoader(s, batches_per_copy=2.5), "batches_per_copy must be an"),
        (lambda s, p: store.StoreLoader(s).set_epoch("1"), "epoch must be an integer"),
        (lambda s, p: store.ActivationDataset(s, view="1"), "view must be an integer"),
        (lambda s, p: store.ActivationDataset(s, view=True), "view must be an integer"),
        (lambda s, p: store.ActivationDataset(s, seed=-1, view=0), "seed must be >= 0"),
        (lambda s, p: store.ActivationDataset(s, epoch=1.5), "epoch must be an integer"),
        (lambda s, p: s.read("0", [1]), "view must be an integer"),
        (lambda s, p: s.read(True, [1]), "view must be an integer"),
        (lambda s, p: store.RamCache.from_store(s).read(0, [1.5]), "1-D sequence of integers"),
        (lambda s, p: store.RamCache.from_store(s).read(0.0, [1]), "view must be an integer"),
        # anything but True or False where a flag goes: "False" is truthy
        (lambda s, p: store.StoreLoader(s, shuffle="False"), "shuffle must be True or False"),
        (lambda s, p: store.StoreLoader(s, drop_last="no"), "drop_last must be True or False"),
        (lambda s, p: store.StoreLoader(s, with_indices=1), "with_indices must be True or Fal"),
        (lambda s, p: store.open(s.path, partial="no"), "partial must be True or False"),
        (lambda s, p: store.open(s.path, checksums="0"), "checksums must be True or False"),
        (lambda s, p: store.create(p, sample_shape=SHAPE, num_samples=4, resume=0), "resume m"),
    ],
)
def test_arguments_of_the_wrong_type_are_input_errors_naming_them(tmp_path, data, call, match):
    x, y = data
    s = write_store(tmp_path / "s", x, y)
    with pytest.raises(store.StoreInputError, match=match):
        call(s, tmp_path / "new")


def test_overwrite_given_as_a_string_does_not_replace_the_store(tmp_path, data):
    """overwrite="False" (a flag read from a text config) is truthy: the store there was
    replaced by an empty one."""
    x, y = data
    s = write_store(tmp_path / "s", x, y)
    with pytest.raises(store.StoreInputError, match=r"^overwrite must be True or False, got "):
        store.create(s.path, sample_shape=SHAPE, num_samples=len(y), overwrite="False")
    assert store.open(s.path).complete and torch.equal(store.open(s.path).labels, y)
    loader = store.StoreLoader(s, batch_size=len(y), shuffle=np.False_)  # a numpy bool is fine
    assert torch.equal(next(iter(loader))[1], y)


def test_integer_arguments_may_be_numpy_integers_or_0_d_tensors(tmp_path, data):
    """0-d integer tensors (what indexing a tensor gives) were taken as integers; the
    check that refuses floats and strings refused them too. Booleans and 1-element tensors
    stay refused."""
    x, y = data
    s = write_store(tmp_path / "s", x, y)
    one, np_one = torch.tensor(1), np.int64(1)
    assert len(store.StoreLoader(s, batch_size=torch.tensor(5))) == len(
        store.StoreLoader(s, batch_size=5)
    )
    second = store.ActivationDataset(s, view=1)[0][0]
    assert store.ActivationDataset(s, view=one)[0][0].equal(second)
    assert store.ActivationDataset(s, view=np_one)[0][0].equal(second)
    ram = store.RamCache.from_store(s)
    assert ram.read(one, [0])[0].equal(ram.read(1, [0])[0])
    for bad in (torch.tensor(True), torch.tensor([1]), np.array([1]), np.True_):
        with pytest.raises(store.StoreInputError, match="view must be an integer"):
            store.ActivationDataset(s, view=bad)


@pytest.mark.parametrize(("view", "start"), [("0", 0), (0.0, 0), (0, "0"), (0, 1.5), (0, True)])
def test_write_refuses_a_view_or_start_that_is_not_an_integer(tmp_path, view, start):
    with store.create(tmp_path / "s", sample_shape=(2,), num_samples=4) as w:
        with pytest.raises(store.StoreInputError, match="must be an integer"):
            w.write(view=view, start=start, x=torch.zeros(2, 2), labels=torch.zeros(2).long())
        w.write(view=0, start=0, x=torch.zeros(4, 2), labels=torch.zeros(4).long())


@pytest.mark.parametrize("name", ["activations", "chunk_crc"])
def test_an_overwrite_cut_short_leaves_the_store_marked_incomplete(
    tmp_path, data, monkeypatch, name
):
    """Overwriting a complete store empties its folder first; a writer killed meanwhile must
    not leave a half-deleted store still marked complete (its record goes last)."""
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    cut_short_after_removing(monkeypatch, name)
    with pytest.raises(KeyboardInterrupt):
        store.create(path, sample_shape=SHAPE, num_samples=N, overwrite=True)
    monkeypatch.undo()
    assert not (path / name).exists()
    record = json.loads((path / "zarr.json").read_text())["attributes"]["prefast_store"]
    assert record["complete"] is False
    assert store.location.is_activation_store(path)  # so a later overwrite takes it
    write_store(path, x, y, overwrite=True)
    assert store.verify(store.open(path)).ok


@pytest.mark.parametrize("where", ["local", "url"])
def test_an_overwrite_cut_short_never_leaves_a_deleted_chunk_marked_written(
    tmp_path, data, monkeypatch, where
):
    """The chunk markers go before the data: an overwrite killed while it deletes the chunks
    of a store of the same layout left their markers, and a resumed writer took those chunks
    as stored and marked the store complete with its chunk files missing."""
    import fsspec

    x, y = data
    path = tmp_path / "s" if where == "local" else "memory://prefast-test-overwrite-cut/s"
    kw = dict(sample_shape=SHAPE, num_samples=N, views=VIEWS, dtype="float32", chunk_samples=CHUNK)
    write_store(path, x, y)
    kill = KeyboardInterrupt("killed")
    if where == "local":
        monkeypatch.setattr(Path, "iterdir", lambda p, it=Path.iterdir: iter(sorted(it(p))))
        rmtree = shutil.rmtree

        def cut_short(p, *a, **k):
            if Path(p).name == "activations":  # its chunk files go, then the writer dies
                rmtree(Path(p) / "c")
                raise kill
            rmtree(p, *a, **k)

        monkeypatch.setattr(shutil, "rmtree", cut_short)
    else:
        remove = store.writer.remove

        def cut_short(loc):
            if str(loc).endswith("/activations"):
                fsspec.filesystem("memory").rm(str(loc) + "/c", recursive=True)
                raise kill
            remove(loc)

        monkeypatch.setattr(store.writer, "remove", cut_short)
    with pytest.raises(KeyboardInterrupt):
        store.create(path, overwrite=True, meta={"test": True}, **kw)
    monkeypatch.undo()
    with store.create(path, resume=True, meta={"test": True}, **kw) as w:
        assert w.missing == [(v, 0, N) for v in range(VIEWS)]  # nothing left marked written
        for v in range(VIEWS):
            w.write(v, 0, x[v], y)
    s = store.open(path)
    assert store.verify(s).ok and torch.equal(s.read(2, ALL), x[2])


@pytest.mark.parametrize("made", [0, 1, 3])
def test_resume_makes_the_arrays_a_writer_killed_after_its_record_did_not_make(
    tmp_path, data, monkeypatch, made
):
    # resume=True was refused ('its activations array is not there ... overwrite=True'),
    # though no chunk of such a store can be written: it now makes the missing arrays
    x, y = data
    path = tmp_path / "s"
    kw = dict(sample_shape=SHAPE, num_samples=N, views=VIEWS, dtype="float32", chunk_samples=CHUNK)
    create_array = zarr.Group.create_array
    count = [0]

    def killed(self, *a, **k):
        if count[0] == made:
            raise KeyboardInterrupt("killed")
        count[0] += 1
        return create_array(self, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        store.create(path, meta={"test": True}, **kw)
    monkeypatch.undo()
    with store.create(path, resume=True, meta={"test": True}, **kw) as w:
        for v in range(VIEWS):
            w.write(v, 0, x[v], y)
    write_store(tmp_path / "ref", x, y)
    assert store.verify(store.open(path)).ok
    assert chunk_files(path) == chunk_files(tmp_path / "ref")


def _raw_chunk(path: Path, view: int, chunk: int) -> Path:
    return path / "activations" / "c" / str(view) / str(chunk) / "0" / "0" / "0"


def test_truncated_raw_chunk_is_named(tmp_path, data):
    x, y = data
    write_store(tmp_path / "s", x, y)
    f = _raw_chunk(tmp_path / "s", 1, 3)
    f.write_bytes(f.read_bytes()[:100])
    s = store.open(tmp_path / "s")
    with pytest.raises(store.StoreCorruptError, match=r"c/1/3/0/0/0.*has 100 bytes"):
        s.read(1, [25])
    assert torch.equal(s.read(1, [0, 40]), x[1, [0, 40]])  # other chunks still read


def test_corrupt_compressed_chunk_is_named(tmp_path, data):
    x, y = data
    write_store(tmp_path / "s", x, y, codec="zstd")
    f = _raw_chunk(tmp_path / "s", 2, 14)
    f.write_bytes(b"garbage" * 10)
    s = store.open(tmp_path / "s")
    with pytest.raises(store.StoreCorruptError, match=r"c/2/14/0/0/0.*cannot be decoded"):
        s.read(2, [116])
    os.remove(_raw_chunk(tmp_path / "s", 0, 0))
    with pytest.raises(store.StoreCorruptError, match="file is missing"):
        s.read(0, [1])


@pytest.mark.parametrize("checksums", [True, False])
def test_truncated_lz4_chunk_is_named_before_it_is_decoded(tmp_path, data, checksums):
    # the Blosc decoder reads past the end of a cut frame: garbage values where checksums
    # were off, a segmentation fault for a chunk of megabytes
    x, y = data
    write_store(tmp_path / "s", x, y, codec="lz4")
    f = _raw_chunk(tmp_path / "s", 1, 3)
    whole = f.read_bytes()
    assert len(whole) > 100
    for cut in (100, 10):  # a frame cut short, a header cut short
        f.write_bytes(whole[:cut])
        s = store.open(tmp_path / "s", checksums=checksums)
        with pytest.raises(store.StoreCorruptError, match=rf"c/1/3/0/0/0.*has {cut} bytes.*trunc"):
            s.read(1, [25])
        assert torch.equal(s.read(1, [0, 40]), x[1, [0, 40]])  # other chunks still read


def test_verify_chunk_detects_a_flipped_byte(tmp_path, data):
    x, y = data
    write_store(tmp_path / "s", x, y)
    f = _raw_chunk(tmp_path / "s", 0, 2)
    b = bytearray(f.read_bytes())
    b[17] ^= 0xFF
    f.write_bytes(bytes(b))
    s = store.open(tmp_path / "s")
    assert s.verify_chunk(0, 1)
    assert not s.verify_chunk(0, 2)


# ---- integrity on the read path ---------------------------------------------------------------
def _flip(f: Path, pos: int) -> None:
    b = bytearray(f.read_bytes())
    b[pos] ^= 0x10
    f.write_bytes(bytes(b))


def _epoch(src) -> None:
    for _ in store.StoreLoader(src, batch_size=16, seed=0, buffer_chunks=2):
        pass


def test_flipped_byte_in_a_raw_chunk_fails_the_training_read(tmp_path, data):
    x, y = data
    write_store(tmp_path / "s", x, y, dtype="float16")
    f = _raw_chunk(tmp_path / "s", 1, 3)
    _flip(f, 100)
    s = store.open(tmp_path / "s")
    assert s.memory_mapped
    assert torch.equal(s.read(1, [0, 40]), x[1, [0, 40]].half())  # other chunks read
    with pytest.raises(
        store.StoreCorruptError,
        match=rf"{f}: chunk \(view 1, chunk 3, samples 24..31\) fails its checksum",
    ):
        s.read(1, [25])
    with pytest.raises(store.StoreCorruptError, match="c/1/3/0/0/0"):
        _epoch(s)
    with pytest.raises(store.StoreCorruptError, match="c/1/3/0/0/0"):
        store.RamCache.from_store(s)
    # the bytes the chunk was checked under stay mapped: a repaired file is not re-read
    assert torch.equal(store.open(tmp_path / "s", checksums=False).read(1, [0]), x[1, [0]].half())


def _decodable_flip(f: Path, path: Path, view: int, chunk: int) -> None:
    """Flip a byte of the zstd chunk file ``f`` such that it still decodes (these zstd frames
    carry no checksum) to other values."""
    good = f.read_bytes()
    ref = store.open(path).read_chunk(view, chunk)
    for pos in range(len(good) - 1, len(good) // 2, -1):
        _flip(f, pos)
        try:
            changed = store.open(path, checksums=False).read_chunk(view, chunk)
            if not np.array_equal(changed, ref, equal_nan=True):
                return
        except store.StoreCorruptError:
            pass  # this flip breaks the frame; try another
        f.write_bytes(good)
    raise AssertionError("no byte flip of the chunk decodes")


def test_flipped_byte_in_a_zstd_chunk_that_still_decodes_fails_the_read(tmp_path, data):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y, dtype="float16", codec="zstd")
    f = _raw_chunk(path, 2, 5)
    _decodable_flip(f, path, 2, 5)
    unchecked = store.open(path, checksums=False).read_chunk(2, 5)
    assert not np.array_equal(unchecked, x[2, 40:48].half().numpy())  # silently different
    s = store.open(path)
    with pytest.raises(
        store.StoreCorruptError,
        match=rf"{f}: chunk \(view 2, chunk 5, samples 40..47\) fails its checksum",
    ):
        s.read(2, [41])
    with pytest.raises(store.StoreCorruptError, match="c/2/5/0/0/0"):
        _epoch(s)
    assert torch.equal(s.read(2, [39, 48]), x[2, [39, 48]].half())


def test_flipped_label_byte_is_caught(tmp_path, data):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    f = path / "labels" / "c" / "6"
    _flip(f, 9)  # sample 49's label, chunk 6 = samples 48..55
    s = store.open(path)
    assert torch.equal(s.read(0, [50]), x[0, [50]])  # activations are fine
    with pytest.raises(
        store.StoreCorruptError, match=rf"{f}: the labels of chunk 6 \(samples 48..55\) fail"
    ):
        s.labels  # noqa: B018
    with pytest.raises(store.StoreCorruptError, match="labels"):
        store.StoreLoader(s, batch_size=8)
    r = store.verify(store.open(path))
    assert not r.ok and [p.chunk for p in r.bad_label_chunks] == [6]


def _edit_record(path: Path, resign: bool, **changes) -> None:
    """Edit the store's record in zarr.json by hand; ``resign`` also recomputes its checksum
    (an editor who knows the format)."""
    f = path / "zarr.json"
    doc = json.loads(f.read_text())
    rec = doc["attributes"]["prefast_store"]
    for k, v in changes.items():
        if k in rec["layout"] and k not in ("layout",):
            rec["layout"][k] = v
        else:
            rec[k] = v
    if resign:
        rec["checksum"] = store.layout.record_checksum(rec)
    f.write_text(json.dumps(doc))


@pytest.mark.parametrize("resign", [False, True])
@pytest.mark.parametrize(
    "change",
    [{"num_samples": 110}, {"sample_shape": [3, 4, 5]}, {"dtype": "bfloat16"}, {"codec": "lz4"}],
)
def test_edited_attributes_are_caught_at_open(tmp_path, data, change, resign):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    _edit_record(path, resign, **change)
    err = store.StoreCorruptError
    with pytest.raises(err, match="fail their checksum" if not resign else "the record says"):
        store.open(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"layout": None}, "'layout' must be an object"),
        ({"views": "3"}, "views must be an integer"),
        ({"views": True}, "views must be an integer"),
        ({"num_samples": -5}, r"num_samples must be in \[1, "),
        ({"num_samples": 10**12, "chunk_samples": 1}, "exceeds"),
        ({"sample_shape": "abc"}, "'sample_shape' must be a list"),
        ({"sample_shape": [3, None]}, "sample_shape must be an integer"),
        ({"meta": None}, "'meta' has a bad value"),
        ({"complete": "yes"}, "'complete' has a bad value"),
    ],
)
def test_malformed_attributes_raise_format_errors(tmp_path, data, change, match):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    _edit_record(path, resign=True, **change)
    with pytest.raises(store.StoreFormatError, match=match):
        store.open(path)


def test_layout_and_info_from_dict_validate_their_fields():
    lay = store.StoreLayout(num_samples=10, views=2, sample_shape=(3, 4), chunk_samples=4)
    assert store.StoreLayout.from_dict(lay.to_dict()) == lay
    info = store.StoreInfo(layout=lay, meta={"a": [1, 2]})
    assert store.StoreInfo.from_dict(info.to_dict()) == info
    for bad in (None, [], "layout"):
        with pytest.raises(store.StoreFormatError, match="'layout' must be an object"):
            store.StoreLayout.from_dict(bad)
    d = lay.to_dict()
    for field, value in (("chunk_samples", 0), ("codec", 5), ("dtype", None), ("views", 2.0)):
        with pytest.raises(store.StoreFormatError, match=field):
            store.StoreLayout.from_dict({**d, field: value})
    with pytest.raises(store.StoreFormatError, match=r"fields \['views'\] are missing"):
        store.StoreLayout.from_dict({k: v for k, v in d.items() if k != "views"})
    with pytest.raises(store.StoreFormatError, match="must be an object"):
        store.StoreInfo.from_dict(None)


def test_version_1_store_is_refused_with_a_rebuild_hint(tmp_path, data):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    _edit_record(path, resign=False, format_version=1)
    with pytest.raises(store.StoreFormatError, match=r"format_version 1 .*older version: rebuild"):
        store.open(path)


def test_a_newer_or_incomplete_record_says_so(tmp_path, data):
    # a store from a newer version was told to "rebuild the store with this version", and a
    # record without 'meta' said "attribute 'meta' has a bad value None"
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    _edit_record(path, resign=True, format_version=3)
    with pytest.raises(store.StoreFormatError, match=r"format_version 3 .*newer version"):
        store.open(path)
    _edit_record(path, resign=True, format_version=store.FORMAT_VERSION)
    store.open(path)
    rec = json.loads((path / "zarr.json").read_text())["attributes"]["prefast_store"]
    for name in ("meta", "complete", "created"):
        d = {k: v for k, v in rec.items() if k != name}
        d["checksum"] = store.layout.record_checksum(d)
        with pytest.raises(store.StoreFormatError, match=f"attribute '{name}' is missing"):
            store.StoreInfo.from_dict(d, "s")


def test_complete_store_with_a_lost_marker_is_corrupt(tmp_path, data):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    os.remove(path / "chunk_crc" / "c" / "2" / "7")
    with pytest.raises(store.StoreCorruptError, match="marked complete but chunks are missing"):
        store.open(path)


OVERWRITER = textwrap.dedent(
    """
    import sys
    import store
    from tests.store_helpers import encoded, labels_for, write_store
    codec = None if sys.argv[2] == "none" else sys.argv[2]
    # other values and labels, same shape: only the checksums can tell the stores apart
    s = write_store(sys.argv[1], encoded(seed=1) + 0.5, (labels_for() + 1) % 10,
                    dtype="float16", codec=codec, overwrite=True)
    print(s.complete)
    """
)


@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_reader_of_a_replaced_store_reads_old_values_or_fails(tmp_path, data, codec, evict):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y, dtype="float16", codec=None if codec == "none" else codec)
    s = store.open(path)
    if evict and s.memory_mapped:
        s._mm.capacity = 2  # maps are dropped and mapped again: the old files are not pinned
    old = x.half()
    assert torch.equal(s.read(0, np.arange(40)), old[0, :40])  # chunks 0..4 of view 0
    r = subprocess.run(
        [sys.executable, "-c", OVERWRITER, str(path), codec],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == "True"
    outcomes = []
    for v in range(VIEWS):
        for c in range(s.num_chunks):
            c0, c1 = s.layout.chunk_range(c)
            try:
                got = s.read(v, np.arange(c0, c1))
            except store.StoreCorruptError as e:
                assert f"chunk (view {v}, chunk {c}" in str(e)
                outcomes.append("error")
                continue
            assert torch.equal(got, old[v, c0:c1]), (v, c)  # never the new values
            outcomes.append("old")
    with pytest.raises(store.StoreCorruptError, match="labels"):
        s.labels  # noqa: B018
    if codec == "none" and not evict:
        assert outcomes[:5] == ["old"] * 5  # the maps opened before pin the old files
    assert outcomes.count("error") >= len(outcomes) - 5


# ---- inspect ------------------------------------------------------------------------------------
def test_inspect_command(tmp_path, data, capsys):
    x, y = data
    write_store(tmp_path / "s", x, y, codec="zstd", meta={"model": "densenet_bc", "boundary": 13})
    assert store_main(["inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "(3, 117, 3, 5, 4)" in out and "zstd" in out and "complete        yes" in out
    assert "meta.boundary" in out and "15 chunks/view" in out
    assert store_main(["inspect", str(tmp_path / "s"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bytes_raw"] == 3 * 117 * 60 * 4 and d["bytes_on_disk"] > 0 and d["ratio"] > 1.0
    assert store_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- stores at URLs -----------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [None, "zstd"])
def test_memory_url_round_trip_streams(data, codec):
    x, y = data
    url = f"memory://prefast-test-{codec}/s"
    s = write_store(url, x, y, codec=codec)
    assert s.complete and not s.memory_mapped
    assert torch.equal(s.read(2, ALL), x[2]) and torch.equal(s.labels, y)
    loader = store.StoreLoader(s, batch_size=20, seed=1)
    assert loader.streaming
    seen = np.concatenate([(xb[:, 0, 0, 0].numpy().astype(int) % 10000) for xb, _ in loader])
    assert sorted(seen.tolist()) == list(range(N))
    with pytest.raises(store.StoreExistsError, match="overwrite=True"):
        store.create(url, sample_shape=SHAPE, num_samples=N)
    with pytest.raises(store.StoreNotFoundError):
        store.open("memory://prefast-test-nothing/here")


def test_a_url_of_an_unknown_protocol_is_refused_as_store_input():
    """create() at a URL fsspec has no filesystem for raised zarr's bare ValueError."""
    with pytest.raises(store.StoreInputError, match=r"nosuch://x/s: .*Protocol not known"):
        store.create("nosuch://x/s", sample_shape=SHAPE, num_samples=N)


def test_create_at_a_url_never_deletes_what_is_there_but_a_store():
    """create() at a URL holding other files or another zarr group deleted all of it (zarr's
    create_group(overwrite=True)), even without overwrite=True; it refuses, as for a local
    folder, and still replaces a store of its own with overwrite=True."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/prefast-test-keep/files/notes.txt", b"keep")
    with pytest.raises(store.StoreExistsError, match="holds no activation store"):
        store.create("memory://prefast-test-keep/files", sample_shape=SHAPE, num_samples=N)
    zarr.create_group("memory://prefast-test-keep/grp").create_array("a", shape=(3,), dtype="f4")
    with pytest.raises(store.StoreExistsError, match="holds no activation store"):
        store.create("memory://prefast-test-keep/grp", sample_shape=SHAPE, num_samples=N,
                     overwrite=True)  # fmt: skip
    assert fs.cat_file("/prefast-test-keep/files/notes.txt") == b"keep"
    assert fs.exists("/prefast-test-keep/grp/a/zarr.json")
    url = "memory://prefast-test-keep/s"
    store.create(url, sample_shape=SHAPE, num_samples=N).abort()
    store.create(url, sample_shape=(2,), num_samples=3, overwrite=True).abort()
    assert store.location.recorded_info(url).layout.sample_shape == (2,)


def test_create_over_a_plain_zarr_array_is_refused(tmp_path):
    """create(resume=True) over a zarr array (a folder or URL) raised zarr's own
    ContainsArrayError, and so did any create() at a URL holding one."""
    zarr.create_array(str(tmp_path / "arr"), shape=(3,), dtype="f4")
    zarr.create_array("memory://prefast-test-arr/a", shape=(3,), dtype="f4")
    for where in (tmp_path / "arr", "memory://prefast-test-arr/a"):
        for how in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(store.StoreExistsError, match="holds no activation store"):
                store.create(where, sample_shape=SHAPE, num_samples=N, **how)
    assert zarr.open_array(str(tmp_path / "arr"), mode="r").shape == (3,)


def test_an_overwrite_at_a_url_cut_short_leaves_a_store_it_can_overwrite(data, monkeypatch):
    """An overwrite at a URL killed while it deletes the old store leaves that store marked
    incomplete with its record (zarr deleted the record first: keys without one were left,
    which create() refuses to overwrite)."""
    memory = pytest.importorskip("fsspec.implementations.memory")
    x, y = data
    url = "memory://prefast-test-cut/s"
    write_store(url, x, y)
    removed = []
    real_rm_file = memory.MemoryFileSystem.rm_file

    def killed_after_one(self, path):
        real_rm_file(self, path)
        removed.append(path)
        raise RuntimeError("killed")

    monkeypatch.setattr(memory.MemoryFileSystem, "rm_file", killed_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        store.create(url, sample_shape=SHAPE, num_samples=N, overwrite=True)
    monkeypatch.undo()
    assert removed and not removed[0].endswith("/s/zarr.json")  # the record goes last
    info = store.location.recorded_info(url)
    assert info is not None and not info.complete
    with pytest.raises(store.StoreError):
        store.open(url)
    assert torch.equal(write_store(url, x, y, overwrite=True).read(1, ALL), x[1])


def test_file_url_is_a_local_memory_mapped_store(tmp_path, data):
    x, y = data
    s = write_store(f"file://{tmp_path / 's'}", x, y)
    assert s.memory_mapped and torch.equal(s.read(0, ALL), x[0])
    assert chunk_files(tmp_path / "s")  # the files are where the URL points


def test_store_opened_before_its_arrays_exist_is_incomplete(tmp_path, data, monkeypatch):
    """A store opened between its record and its arrays (its writer making them, or killed
    there) was called corrupt ('the labels array is missing'): nothing in it is wrong, it is
    not finished. A store marked complete without an array is still corrupt."""
    import store.writer as writer_mod

    def killed(group, layout):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "_create_arrays", killed)
    with pytest.raises(KeyboardInterrupt):
        store.create(tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float32")
    monkeypatch.undo()
    for opening in (
        lambda: store.open(tmp_path / "s"),
        lambda: store.open(tmp_path / "s", partial=True),
    ):
        with pytest.raises(
            store.StoreIncompleteError,
            match=r"is not there .* resume=True\)\) or create it again with overwrite=True",
        ):
            opening()
    x, y = data
    with store.create(
        tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float32", resume=True
    ) as w:  # resume makes the arrays (no chunk of such a store can be written)
        w.write(0, 0, x[0], y)
    assert store.open(tmp_path / "s").complete
    write_store(tmp_path / "s", x, y, overwrite=True)
    shutil.rmtree(tmp_path / "s" / "labels")
    with pytest.raises(store.StoreCorruptError, match="'labels' array is missing"):
        store.open(tmp_path / "s")


def test_file_url_is_percent_decoded(tmp_path, data):
    """``file:///a%20b`` (what ``Path.as_uri`` writes for ``/a b``) made a folder named
    ``a%20b``; a URL's escapes and a ``localhost`` host now name the path they stand for."""
    x, y = data
    folder = tmp_path / "a b%"  # a bare % is no escape and stays
    write_store(folder.as_uri(), x, y)
    assert chunk_files(folder) and not (tmp_path / "a%20b%25").exists()
    assert torch.equal(store.open(folder).read(2, ALL), x[2])
    assert torch.equal(store.open(f"file://localhost{folder}").read(2, ALL), x[2])
    assert store.location.as_local("file:///x/100%zz") == Path("/x/100%zz")


def test_prefetch_zero_gathers_on_the_callers_thread(data):
    x, y = data
    src = store.RamCache.from_tensors(x, y)
    before = _threads()
    sync = store.StoreLoader(src, batch_size=16, seed=2, prefetch=0)
    sync.set_epoch(1)
    batches = []
    for xb, _ in sync:
        assert _threads() == before  # no background thread
        batches.append(xb)
    threaded = store.StoreLoader(src, batch_size=16, seed=2, prefetch=2)
    threaded.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(batches, [xb for xb, _ in threaded], strict=True))


@pytest.mark.parametrize("prefetch", [0, 1])
def test_loader_stats_count_one_pass_and_restart_with_the_next(data, prefetch):
    x, y = data

    class Slow(store.RamCache):  # a gather that takes at least 2 ms
        def gather(self, views, indices, out):
            time.sleep(0.002)
            super().gather(views, indices, out)

    loader = store.StoreLoader(Slow(x.clone(), y.clone()), batch_size=20, seed=0, prefetch=prefetch)
    for _ in range(2):  # the second pass starts from zero
        n = 0
        for _ in loader:
            time.sleep(0.02)  # a slow consumer: a prefetch thread finds its queue full
            n += 1
        st = loader.stats
        assert n == st.batches == 6  # 117 samples in batches of 20
        assert st.bytes == N * x[0, 0].numel() * x.element_size()
        assert st.gather >= 6 * 0.002
        assert st.copy == 0.0  # no device copies on a CPU
        if prefetch:  # the thread runs at most two batches ahead of 6 x 20 ms of consumer
            assert st.full >= 0.02
        else:  # each batch is made when asked for, on the caller's thread
            assert st.full == 0.0 and st.starved == 0.0
    d = st.as_dict()
    assert set(d) == {"batches", "bytes", "gather", "buffers", "copy", "starved", "full"}
    total = store.LoaderStats()
    total.add(st)
    total.add(st)
    assert total.batches == 12 and total.gather == pytest.approx(2 * st.gather)


@pytest.mark.parametrize("ranks", [1, 2])
def test_completing_a_store_removes_the_temporary_table_files_a_killed_writer_left(
    tmp_path, data, ranks
):
    """A table chunk goes to ``.KEY.THREAD.tmp`` and is renamed into place; a writer killed in
    between leaves that file. The store's completion (close, or finalize for several ranks)
    removes such files, and nothing else."""
    x, y = data
    path = tmp_path / "s"
    kw = dict(sample_shape=SHAPE, num_samples=N, views=VIEWS, dtype="float32",
              chunk_samples=CHUNK, meta={"test": True})  # fmt: skip
    first = store.create(path, world_size=ranks, **kw)
    first.write(0, 0, x[0, :CHUNK], y[:CHUNK])
    first.abort()  # as if killed: incomplete
    left = [path / "labels" / "c" / ".1.140211.tmp", path / "chunk_crc" / "c" / "0" / ".3.77.tmp"]
    kept = [
        path / "labels" / "c" / ".notes.tmp",
        path / ".0.1.tmp",
        path / "labels" / "c" / "x.tmp",
    ]
    for f in left + kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"partial")
    writers = [
        store.create(path, rank=r, world_size=ranks, resume=True, **kw) for r in range(ranks)
    ]
    for r, w in enumerate(writers):
        for v, start, stop in w.missing:
            if (start // CHUNK) % ranks == r:
                w.write(v, start, x[v, start:stop], y[start:stop])
    for f in left:
        assert f.exists()  # not while writers may still write
    for w in writers:
        w.close()
    if ranks > 1:
        store.finalize(path)
    assert not any(f.exists() for f in left)
    assert all(f.exists() for f in kept)
    s = store.open(path)
    assert s.complete and torch.equal(s.read(1, ALL), x[1])
    assert store.verify(s).ok


@pytest.mark.parametrize(
    "call",
    [
        lambda: store.verify("s"),
        lambda: store.stats("s"),
        lambda: store.diff("s", "t"),
        lambda: store.show("s", 0),
        lambda: store.RamCache.from_store("s"),
        lambda: store.DeviceCache.from_store("s", "cpu"),
    ],
    ids=["verify", "stats", "diff", "show", "RamCache", "DeviceCache"],
)
def test_a_path_where_an_opened_store_is_needed_is_refused_clearly(call):
    with pytest.raises(
        store.StoreInputError, match=r"takes an opened store, got str: .*store\.open\(path\)"
    ):
        call()


def test_finalize_without_a_store_is_a_store_error(tmp_path):
    with pytest.raises(store.StoreNotFoundError, match="no store to finalize"):
        store.finalize(tmp_path / "nope")
    # a file, an empty folder, a damaged zarr.json, a zarr array: FileExistsError,
    # StoreNotFoundError ('no store'), JSONDecodeError and ContainsArrayError before
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zarr.json").write_text("{")
    zarr.create_array(tmp_path / "array", shape=(3,), dtype="f4")
    for name, match in [
        ("file", "not an activation store"),
        ("empty", "not an activation store"),
        ("bad", "not a zarr v3 group"),
        ("array", "not a zarr v3 group"),
    ]:
        with pytest.raises(store.NotAStoreError, match=match):
            store.finalize(tmp_path / name)


def test_prefast_option_checks_quote_an_array_by_its_shape_too():
    from prefast.errors import ConfigError, check_bool, check_int, check_number

    for check in (check_int, check_number, check_bool):
        with pytest.raises(ConfigError, match=r"got a tensor of shape \(64, 3\) and dtype"):
            check("seed", torch.zeros(64, 3))  # type: ignore[operator]
    with pytest.raises(ConfigError, match=r"got 'xxxxx.*x\.\.\.$"):
        check_int("seed", "x" * 300)


def test_opening_a_folder_above_stores_names_the_stores_in_it(tmp_path, data):
    # a run's checkpoint, cache or run folder given for the store in it: only 'no zarr.json'
    x, y = data
    x, y = x[:1, :9], y[:9]
    write_store(tmp_path / "ck" / "cache" / "run-a" / "boundary-004", x, y, chunk=4)
    for where, named in (
        ("ck", "cache/run-a/boundary-004"),
        ("ck/cache", "run-a/boundary-004"),
        ("ck/cache/run-a", "boundary-004"),
    ):
        with pytest.raises(store.NotAStoreError) as e:
            store.open(tmp_path / where)
        assert str(e.value) == (
            f"{tmp_path / where}: not an activation store (no zarr.json); the stores in it: {named}"
        )
    for k in range(6):
        write_store(tmp_path / "many" / f"s{k}", x, y, chunk=4)
    with pytest.raises(store.NotAStoreError, match=r"in it: s0, s1, s2, s3 and 2 more$"):
        store.open(tmp_path / "many")
    (tmp_path / "other" / "notes").mkdir(parents=True)
    (tmp_path / "other" / "notes" / "zarr.json").write_text("{}")  # a zarr group, not a store
    with pytest.raises(store.NotAStoreError, match=r"\(no zarr.json\)$"):
        store.open(tmp_path / "other")


def test_a_path_that_is_no_str_or_path_is_an_input_error(tmp_path, monkeypatch):
    """store.open(None), open(5), finalize(None) and create(None, ...) failed with os.fspath's
    TypeError, and a bytes path with one from str.startswith."""
    monkeypatch.chdir(tmp_path)
    for bad in (None, 5, b"s.zarr"):
        for call in (
            lambda p: store.open(p),
            lambda p: store.finalize(p),
            lambda p: store.create(p, sample_shape=(2,), num_samples=3),
        ):
            with pytest.raises(
                store.StoreInputError, match=r"path must be a str or a pathlib\.Path"
            ):
                call(bad)
    assert not list(tmp_path.iterdir())
    with store.create(tmp_path / "s.zarr", sample_shape=(2,), num_samples=3) as w:
        w.write(0, 0, torch.ones(3, 2), torch.arange(3))
    assert store.open(tmp_path / "s.zarr").labels.tolist() == [0, 1, 2]


def test_nbytes_stored_counts_a_member_array_and_refuses_other_names(tmp_path):
    """nbytes_stored("activation") counted 0 bytes and nbytes_stored("..") the folder around
    the store; an array that is not one of the store's is an input error."""
    (tmp_path / "beside.bin").write_bytes(b"x" * 5000)
    s = write_store(tmp_path / "s.zarr", torch.ones(1, 13, 3), torch.arange(13), chunk=4)
    per = {a: s.nbytes_stored(a) for a in ("activations", "labels", "chunk_crc", "label_crc")}
    meta = (tmp_path / "s.zarr/activations/zarr.json").stat().st_size
    assert per["activations"] == 4 * 4 * 3 * 4 + meta  # 4 chunks of 4 float32 samples of 3
    assert s.nbytes_stored() == sum(per.values()) + (tmp_path / "s.zarr/zarr.json").stat().st_size
    for bad in ("activation", "..", 5):
        with pytest.raises(store.StoreInputError, match="array must be one of activations"):
            s.nbytes_stored(bad)


def test_write_takes_start_and_view_as_any_integer_without_wrapping(tmp_path):
    # a numpy uint8 start of 250 plus a batch of 10 wrapped to 4: the write was taken and its
    # samples dropped; a 0-d integer tensor or array was refused
    x = torch.arange(261 * 2, dtype=torch.float32).reshape(261, 2)
    y = torch.arange(261) % 7
    with store.create(tmp_path / "s", sample_shape=(2,), num_samples=261, chunk_samples=9) as w:
        w.write(np.int64(0), np.uint8(0), x[:250], y[:250])
        w.write(torch.tensor(0), np.uint8(250), x[250:260], y[250:260])
        w.write(np.array(0), torch.tensor(260), x[260:], y[260:])
        with pytest.raises(store.StoreInputError, match=r"field 'start': samples \[255, 265\)"):
            w.write(0, np.uint8(255), x[:10], y[:10])
        with pytest.raises(store.StoreInputError, match=r"field 'view' must be an integer"):
            w.write(torch.tensor(0.0), 0, x[:1], y[:1])
    s = store.open(tmp_path / "s")
    assert torch.equal(s.read(0, np.arange(261)), x) and torch.equal(s.labels, y)
    with store.create(tmp_path / "r", sample_shape=(2,), num_samples=261, chunk_samples=9) as w:
        w.write_rows(torch.tensor(0), np.arange(261)[::-1].copy(), x.flip(0), y.flip(0))
    assert torch.equal(store.open(tmp_path / "r").read(0, np.arange(261)), x)


def test_write_takes_a_numpy_batch_with_a_reversed_axis_of_length_one(tmp_path):
    # x[::-1][:1] is C-contiguous to numpy with a negative stride, which torch.from_numpy
    # refused with a ValueError: the last sample of a batch read backwards could not be written
    x = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    rev = x[::-1]
    with store.create(tmp_path / "s", sample_shape=(2, 3), num_samples=5, chunk_samples=2) as w:
        w.write(0, 0, rev[:4], np.arange(4))
        w.write(0, 4, rev[4:], np.array([4]))  # strides (-24, 12, 4)
    got = store.open(tmp_path / "s").read(0, np.arange(5))
    assert torch.equal(got, torch.from_numpy(rev.copy()).half())
    with store.create(tmp_path / "r", sample_shape=(1, 3), num_samples=5, chunk_samples=2) as w:
        for i in range(5):
            w.write_rows(0, [i], x[i : i + 1, :1, ::-1], [i])  # strides (24, 12, -4)
    got = store.open(tmp_path / "r").read(0, np.arange(5))
    assert torch.equal(got, torch.from_numpy(x[:, :1, ::-1].copy()).half())


def test_meta_whose_keys_meet_as_json_strings_is_refused_not_half_kept(tmp_path):
    # {1: "a", "1": "b"} was written as {"1": "b"}: the value of key 1 was lost silently
    for meta in ({1: "a", "1": "b"}, {"run": [{"lr": 1, "x": {True: 0, "true": 1}}]}):
        with pytest.raises(store.StoreInputError, match=r"field 'meta'.* both '(1|true)'"):
            store.create(tmp_path / "s", num_samples=3, sample_shape=(2,), meta=meta)
    meta = {"z": {"b": [1, (2, 3)], 7: None}, "a": "é"}
    with store.create(tmp_path / "s", num_samples=3, sample_shape=(2,), meta=meta) as w:
        with pytest.raises(store.StoreInputError, match=r"both '2'"):
            w.set_meta({2: 0, "2": 1})
        w.write(0, 0, torch.zeros(3, 2), torch.arange(3))
    assert store.open(tmp_path / "s").meta == {"z": {"b": [1, [2, 3]], "7": None}, "a": "é"}


@pytest.mark.parametrize("path", [None, b"acts.zarr", "", 3])
def test_create_and_finalize_refuse_a_path_that_is_not_a_path(tmp_path, monkeypatch, path):
    # bytes failed inside the URL check ('startswith first arg must be bytes'), None and 3
    # with os.fspath's TypeError, and "" created the store in the working directory
    monkeypatch.chdir(tmp_path)
    for call in (
        lambda: store.create(path, sample_shape=(2,), num_samples=3),
        lambda: store.finalize(path),
    ):
        with pytest.raises(
            store.StoreInputError, match=r"path must be a (non-empty )?str or a pathlib\.Path"
        ):
            call()
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_resumes_before_rank_0_created_the_store_is_told_so(tmp_path):
    # it was told to pass resume=True, which it had passed
    kw = {"sample_shape": (2,), "num_samples": 5, "world_size": 2, "rank": 1}
    with pytest.raises(store.StoreInputError, match="rank 1 found no store to resume; rank 0"):
        store.create(tmp_path / "s", resume=True, **kw)
    with pytest.raises(store.StoreInputError, match="rank 1 found no store to resume; rank 0"):
        store.create("memory://rank-join/s", resume=True, **kw)
    with pytest.raises(store.StoreInputError, match="must open an existing store with resume=True"):
        store.create(tmp_path / "s", **kw)


@pytest.mark.parametrize("what", ["file", "link"])
def test_overwrite_refuses_a_store_folder_holding_what_the_store_did_not_write(
    tmp_path, data, what
):
    """``overwrite=True`` emptied the whole store folder: a user's file in it was deleted, and
    a link at one of the store's own names (or anywhere in it) was unlinked or written
    through. It is refused before anything goes; the store, the file and the link's target
    stay as they were."""
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("mine")
    if what == "file":
        (path / "activations" / "notes.txt").write_text("mine")
        named = "activations/notes.txt"
    else:
        (path / "labels" / "c" / "extra").symlink_to(elsewhere)
        named = "labels/c/extra"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(store.StoreExistsError, match=f"holds what it did not write \\({named}\\)"):
        store.create(path, sample_shape=SHAPE, num_samples=N, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (elsewhere / "mine.txt").read_text() == "mine"
    s = store.open(path)
    assert s.complete and torch.equal(s.read(1, ALL), x[1])
