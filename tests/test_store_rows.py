"""Samples written in place, in any order (``write_rows``): the write-through path."""

from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np
import pytest
import torch

import store
from store.errors import StoreInputError
from tests.store_helpers import CHUNK, SHAPE, N, encoded, labels_for

ALL = np.arange(N)


def _create(path, views=2, dtype="float32", codec=None, **kw):
    return store.create(
        path,
        sample_shape=SHAPE,
        num_samples=N,
        views=views,
        dtype=dtype,
        codec=codec,
        chunk_samples=CHUNK,
        **kw,
    )


def _shuffled_batches(seed: int, batch: int = 13) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(N)
    return [order[i : i + batch] for i in range(0, N, batch)]


@pytest.mark.parametrize(
    ("dtype", "batch", "workers"),
    [("float32", 13, 1), ("float16", 13, 2), ("bfloat16", 13, 2), ("float16", 117, 3)],
)
def test_shuffled_rows_make_the_same_store_as_batches(tmp_path, dtype, batch, workers):
    # batch 117 with 3 workers: every row its own run, written on parallel threads
    x, y = encoded(views=2), labels_for()
    with _create(tmp_path / "rows", dtype=dtype, workers=workers) as w:
        assert w.supports_rows
        for v in range(2):
            for idx in _shuffled_batches(v, batch):
                w.write_rows(v, idx, x[v, idx], y[idx] if v == 0 else None)
    with _create(tmp_path / "batches", dtype=dtype) as w:
        for v in range(2):
            w.write(v, 0, x[v], y)
    a, b = store.open(tmp_path / "rows"), store.open(tmp_path / "batches")
    assert a.complete and b.complete
    for v in range(2):
        assert torch.equal(a.read(v, ALL), b.read(v, ALL))
        assert torch.equal(a.read(v, ALL).float(), x[v].to(a.dtype).float())
        assert all(a.verify_chunk(v, c) for c in range(a.num_chunks))
    assert torch.equal(a.labels, y)
    # the chunk files are byte for byte what the batch writer stores, the padded edge included
    for f in sorted((tmp_path / "batches" / "activations" / "c").rglob("*")):
        if f.is_file():
            g = tmp_path / "rows" / f.relative_to(tmp_path / "batches")
            assert g.read_bytes() == f.read_bytes(), f


def test_rows_of_a_killed_writer_leave_their_chunks_unwritten_and_resume(tmp_path):
    x, y = encoded(views=1), labels_for()
    first = np.arange(20, -1, -1)  # chunks 0 and 1 full, chunk 2 (16..23) partial
    w = _create(tmp_path / "s", views=1)
    w.write_rows(0, first, x[0, first], y[first])
    w.flush()
    w.abort()  # as if killed: nothing more arrives
    s = store.open(tmp_path / "s", partial=True)
    assert not s.complete
    assert s.missing_ranges() == [(0, 16, N)]
    with _create(tmp_path / "s", views=1, resume=True) as w:
        for idx in _shuffled_batches(3, batch=29):
            w.write_rows(0, idx, x[0, idx], y[idx])  # rows of done chunks are skipped
    s = store.open(tmp_path / "s")
    assert s.complete and torch.equal(s.read(0, ALL), x[0]) and torch.equal(s.labels, y)


def test_a_row_given_twice_before_its_chunk_completes_is_overwritten(tmp_path):
    x, y = encoded(views=1), labels_for()
    with _create(tmp_path / "s", views=1) as w:
        w.write_rows(0, [5, 5], torch.stack([x[0, 0], x[0, 5]]), y[[5, 5]])
        rest = np.setdiff1d(ALL, [5])
        w.write_rows(0, rest, x[0, rest], y[rest])
    s = store.open(tmp_path / "s")
    assert torch.equal(s.read(0, ALL), x[0])


def test_rows_of_a_chunk_already_handed_to_the_pool_are_skipped_not_raced_with_its_checksum(
    tmp_path, monkeypatch
):
    # Chunk 0 completes and goes to the pool, which checksums its file; its rows written
    # again meanwhile must not change the file under the checksum (a complete store whose
    # chunk fails its CRC), nor the data: a chunk handed over counts as written.
    import store.writer as writer_module

    crc, in_crc, gate = writer_module.chunk_crc, threading.Event(), threading.Event()

    def held_crc(data):
        value = crc(data)
        if threading.current_thread().name.startswith("store-writer"):
            in_crc.set()
            gate.wait(10)
        return value

    monkeypatch.setattr(writer_module, "chunk_crc", held_crc)
    with store.create(
        tmp_path / "s", sample_shape=(3,), num_samples=8, dtype="float32", chunk_samples=4,
        workers=1,
    ) as w:  # fmt: skip
        zero = torch.zeros(4, dtype=torch.long)
        w.write_rows(0, np.arange(4), torch.zeros(4, 3), zero)  # chunk 0 complete
        assert in_crc.wait(10)  # its checksum is computed, its marker not written yet
        w.write_rows(0, np.arange(4), torch.ones(4, 3), zero)
        gate.set()
        w.write_rows(0, np.arange(4, 8), torch.ones(4, 3), zero)
    s = store.open(tmp_path / "s")
    assert all(s.verify_chunk(0, c) for c in range(2))
    assert torch.equal(s.read(0, np.arange(4)), torch.zeros(4, 3))


def test_missing_rows_leave_the_store_incomplete_with_a_warning(tmp_path, caplog):
    x, y = encoded(views=1), labels_for()
    some = np.delete(ALL, [3, 100])
    with caplog.at_level(logging.WARNING), _create(tmp_path / "s", views=1) as w:
        w.write_rows(0, some, x[0, some], y[some])
    assert "did not all arrive" in caplog.text
    s = store.open(tmp_path / "s", partial=True)
    assert s.missing_ranges() == [(0, 0, 8), (0, 96, 104)]


def test_rows_refused_where_they_cannot_be_written_in_place(tmp_path):
    x, y = encoded(views=1), labels_for()
    with _create(tmp_path / "z", views=1, codec="zstd") as w:
        assert not w.supports_rows
        with pytest.raises(StoreInputError, match="raw"):
            w.write_rows(0, [0], x[0, :1], y[:1])
        w.write(0, 0, x[0], y)
    with _create(tmp_path / "m", views=1) as w:
        w.write(0, 0, x[0, :8], y[:8])
        with pytest.raises(StoreInputError, match="mix"):
            w.write_rows(0, [9], x[0, 9:10], y[9:10])
        w.write(0, 8, x[0, 8:], y[8:])
    with _create(tmp_path / "r", views=1) as w:
        with pytest.raises(StoreInputError, match="outside"):
            w.write_rows(0, [N], x[0, :1])
        # named as given: an unsigned row of 2**64 - 1 was called sample -1
        with pytest.raises(StoreInputError, match=rf"sample {2**64 - 1} outside \[0, {N}\)"):
            w.write_rows(0, np.array([3, 2**64 - 1], dtype=np.uint64), x[0, :2])
        with pytest.raises(StoreInputError, match="2 rows for 1"):
            w.write_rows(0, [0, 1], x[0, :1])
        with pytest.raises(StoreInputError, match="label"):
            w.write_rows(0, [1, 2], x[0, 1:3], torch.tensor([y[1], y[2] + 1]))
            w.write_rows(0, [2], x[0, 2:3], y[2:3])
        w.abort()


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_tensor_tiers_take_rows_in_any_order(tier):
    x, y = encoded(views=2), labels_for()
    c = (
        store.RamCache.empty(N, 2, SHAPE, "float32")
        if tier == "ram"
        else store.DeviceCache.empty(N, 2, SHAPE, "float32", device="cpu")
    )
    assert c.supports_rows
    for v in range(2):
        for idx in _shuffled_batches(10 + v, batch=17):
            c.write_rows(v, torch.from_numpy(idx), x[v, idx], y[idx])
    assert torch.equal(c.data, x) and torch.equal(c.labels, y)
    with pytest.raises(StoreInputError):
        c.write_rows(0, [N], x[0, :1])


# ---- the side-by-side map of chunk files (chunks of whole pages) ------------------------------
PAGE_SHAPE = (2, 4, 8)  # float32: 256 bytes a sample, 16 samples a 4 KiB chunk


def _create_paged(path, views=1, **kw):
    return store.create(
        path,
        sample_shape=PAGE_SHAPE,
        num_samples=N,
        views=views,
        dtype="float32",
        chunk_samples=16,
        **kw,
    )


@pytest.mark.parametrize(
    ("mapped", "workers", "batch"), [(True, 1, 13), (True, 3, 117), (False, 3, 117)]
)
def test_rows_of_whole_page_chunks_go_through_one_map(
    tmp_path, monkeypatch, mapped, workers, batch
):
    monkeypatch.setattr(store.layout, "MIN_PART_BYTES", 1)  # small rows: split anyway
    x, y = encoded(views=2, shape=PAGE_SHAPE), labels_for()
    with _create_paged(tmp_path / "rows", views=2, workers=workers) as w:
        w._map_rows = mapped  # False: the pwrite path, on the same layout
        for v in range(2):
            for idx in _shuffled_batches(20 + v, batch):
                w.write_rows(v, idx, x[v, idx], y[idx] if v == 0 else None)
        assert (w._row_map is not None) == mapped
    with _create_paged(tmp_path / "batches", views=2) as w:
        for v in range(2):
            w.write(v, 0, x[v], y)
    a = store.open(tmp_path / "rows")
    assert a.complete and torch.equal(a.labels, y)
    for v in range(2):
        assert torch.equal(a.read(v, ALL), x[v])
        assert all(a.verify_chunk(v, c) for c in range(a.num_chunks))
    for f in sorted((tmp_path / "batches" / "activations" / "c").rglob("*")):
        if f.is_file():  # byte for byte, the zero-padded edge chunk (117 = 7 x 16 + 5) included
            assert (
                tmp_path / "rows" / f.relative_to(tmp_path / "batches")
            ).read_bytes() == f.read_bytes()


def test_mapped_rows_given_twice_keep_the_last_and_resume_skips_done_chunks(tmp_path):
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    w = _create_paged(tmp_path / "s")
    w.write_rows(0, [5, 40, 5], torch.stack([x[0, 0], x[0, 40], x[0, 5]]), y[[5, 40, 5]])
    first = np.setdiff1d(np.arange(32), [5])  # chunks 0 and 1 complete, chunk 2 partial
    w.write_rows(0, first, x[0, first], y[first])
    w.flush()
    assert w._row_map is not None
    w.abort()  # as if killed
    s = store.open(tmp_path / "s", partial=True)
    assert s.missing_ranges() == [(0, 32, N)]
    assert torch.equal(s.read(0, np.arange(32)), x[0, :32])
    with _create_paged(tmp_path / "s", resume=True) as w:
        junk = torch.zeros_like(x[0, :32])
        w.write_rows(0, np.arange(32), junk, y[:32])  # rows of done chunks are skipped
        rest = np.arange(32, N)[::-1].copy()
        w.write_rows(0, rest, x[0, rest], y[rest])
    s = store.open(tmp_path / "s")
    assert s.complete and torch.equal(s.read(0, ALL), x[0])


def test_mapped_rows_fall_back_to_pwrite_where_files_cannot_be_preallocated(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    with _create_paged(tmp_path / "s") as w:
        for idx in _shuffled_batches(4, batch=31):
            w.write_rows(0, idx, x[0, idx], y[idx])
        assert w._row_map is None and not w._map_rows
    assert torch.equal(store.open(tmp_path / "s").read(0, ALL), x[0])


def test_a_full_disk_under_mapped_rows_raises_a_store_error_and_leaves_the_store_incomplete(
    tmp_path, monkeypatch
):
    calls = []

    def full(fd, offset, length):
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    w = _create_paged(tmp_path / "s")
    w.write_rows(0, np.arange(32), x[0, :32], y[:32])  # chunks 0 and 1: preallocated
    with pytest.raises(store.StoreWriteError, match="No space left"):
        w.write_rows(0, np.arange(32, 48), x[0, 32:48], y[32:48])
    w.close()
    s = store.open(tmp_path / "s", partial=True)
    assert s.missing_ranges() == [(0, 32, N)]
    assert torch.equal(s.read(0, np.arange(32)), x[0, :32])


@pytest.mark.parametrize("workers", [1, 3])
def test_prepare_rows_maps_the_chunks_to_write_before_any_row(tmp_path, workers):
    """Created ahead, prepared (every chunk file mapped and faulted in, on the row threads),
    then written in shuffled order: the same store as without preparing; after a kill, a
    resumed writer prepares only the chunks still to write."""
    x, y = encoded(views=2, shape=PAGE_SHAPE), labels_for()
    with _create_paged(tmp_path / "s", views=2, workers=workers) as w:
        assert w.prepare_rows()
        assert w._row_map is not None and w._row_map.mapped.all()  # 2 views x 8 chunks
        files = [p for p in (tmp_path / "s" / "activations" / "c").rglob("*") if p.is_file()]
        assert len(files) == 16 and all(f.stat().st_size == 16 * 256 for f in files)
        for v in range(2):
            for idx in _shuffled_batches(30 + v, 29):
                w.write_rows(v, idx, x[v, idx], y[idx] if v == 0 else None)
    s = store.open(tmp_path / "s")
    assert s.complete and torch.equal(s.labels, y)
    for v in range(2):
        assert torch.equal(s.read(v, ALL), x[v])
        assert all(s.verify_chunk(v, c) for c in range(s.num_chunks))

    w = _create_paged(tmp_path / "r", views=1, overwrite=True)
    w.write_rows(0, np.arange(32), x[0, :32], y[:32])  # chunks 0 and 1 complete
    w.flush()
    w.abort()
    with _create_paged(tmp_path / "r", views=1, resume=True) as w:
        assert w.prepare_rows()
        assert w._row_map is not None
        assert w._row_map.mapped[0].tolist() == [False, False] + [True] * 6
        w.write_rows(0, np.arange(32, N), x[0, 32:], y[32:])
    assert torch.equal(store.open(tmp_path / "r").read(0, ALL), x[0])


def test_prepare_rows_where_it_cannot(tmp_path, monkeypatch):
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    with _create_paged(tmp_path / "lz4", codec="lz4") as w, pytest.raises(StoreInputError):
        w.prepare_rows()  # a compressed store takes whole chunks only
    monkeypatch.setattr(
        os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no"))
    )
    with _create_paged(tmp_path / "s") as w:
        assert not w.prepare_rows()  # no preallocation here: rows will go by pwrite
        w.write_rows(0, ALL, x[0], y)
    assert torch.equal(store.open(tmp_path / "s").read(0, ALL), x[0])
    monkeypatch.setattr(
        os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    w = _create_paged(tmp_path / "full", overwrite=True)
    with pytest.raises(store.StoreWriteError, match="preparing rows failed"):
        w.prepare_rows()
    w.abort()
    w.abort()
    with pytest.raises(store.StoreError, match="after close"):
        w.prepare_rows()


def test_set_meta_before_anything_is_written(tmp_path):
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    with _create_paged(tmp_path / "s") as w:
        w.set_meta({"boundary": 3, "fingerprint": "abc"})
        w.write_rows(0, ALL, x[0], y)
        with pytest.raises(store.StoreError, match="before anything is written"):
            w.set_meta({"boundary": 4})
    s = store.open(tmp_path / "s")
    assert s.complete and s.info.meta == {"boundary": 3, "fingerprint": "abc"}
    w = _create_paged(tmp_path / "t", meta={"a": 1})
    w.set_meta(None)
    w.abort()
    assert store.open(tmp_path / "t", partial=True).info.meta == {}


def test_set_meta_after_a_write_whose_chunks_are_still_in_flight_is_refused(tmp_path, monkeypatch):
    """write() hands full chunks to a pool; set_meta() must refuse from the first write on,
    not only once the pool has stored a chunk."""
    import threading

    from store.writer import StoreWriter

    hold = threading.Event()
    store_chunk = StoreWriter._store_chunk

    def held(self, *a):
        hold.wait(30)
        return store_chunk(self, *a)

    monkeypatch.setattr(StoreWriter, "_store_chunk", held)
    x, y = encoded(views=1), labels_for()
    w = store.create(tmp_path / "s", sample_shape=tuple(x.shape[2:]), num_samples=len(y))
    w.write(0, 0, x[0], y)  # every chunk full, none stored yet
    with pytest.raises(store.StoreError, match="before anything is written"):
        w.set_meta({"boundary": 4})
    hold.set()
    w.close()
    assert store.open(tmp_path / "s").info.meta == {}


def test_negative_labels_are_refused_where_they_are_given(tmp_path):
    x, y = encoded(views=1), labels_for()
    y[5] = -1
    w = store.create(tmp_path / "s", sample_shape=tuple(x.shape[2:]), num_samples=len(y))
    with pytest.raises(store.StoreInputError, match=r"must be >= 0 .*got -1 at position 5"):
        w.write(0, 0, x[0], y)
    y[5] = 1
    big = y.numpy().astype(np.uint64)  # 2**63 and more wrapped to negative labels
    big[7] = 2**63
    with pytest.raises(store.StoreInputError, match=r"must fit in int64 .*at position 7"):
        w.write(0, 0, x[0], big)
    w.write(0, 0, x[0], y.numpy().astype(np.uint64))  # uint64 class indices are fine
    w.abort()


@pytest.mark.parametrize("chunk", [CHUNK, 32])  # pwrite, and whole-page chunks (one map)
def test_rows_that_complete_an_unlabelled_chunk_are_refused_whole_and_can_be_given_again(
    tmp_path, chunk
):
    # The refusal comes before any row is written: the same rows given again with their
    # labels complete the store (they were counted as arrived, so no chunk ever completed).
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    kw = {"sample_shape": PAGE_SHAPE, "num_samples": N, "dtype": "float32", "chunk_samples": chunk}
    with store.create(tmp_path / "s", **kw) as w:
        rows = np.arange(N)[::-1].copy()
        with pytest.raises(store.StoreInputError, match="labels were never given"):
            w.write_rows(0, rows, x[0, rows])
        w.write_rows(0, rows, x[0, rows], y[rows])
    s = store.open(tmp_path / "s")
    assert s.complete and torch.equal(s.read(0, ALL), x[0]) and torch.equal(s.labels, y)


def test_a_closed_writers_row_map_is_unmapped_off_the_closing_thread(tmp_path, monkeypatch):
    """Unmapping a store's faulted pages takes ~0.1 s a GB: close() leaves it to a thread, and
    the store is complete and readable meanwhile."""
    import threading

    from store import _mmap

    seen: list[str] = []
    target = [0]
    release = threading.Event()
    original = _mmap.Region.__del__

    def spy(self):
        if id(self) == target[0]:  # the writer's map (not a reader's, nor another test's)
            release.wait(5)  # unmapping is slow: the store must not wait for it
            seen.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(_mmap.Region, "__del__", spy)
    x, y = encoded(views=1, shape=PAGE_SHAPE), labels_for()
    w = _create_paged(tmp_path / "s", views=1)
    for idx in _shuffled_batches(5, 29):
        w.write_rows(0, idx, x[0, idx], y[idx])
    assert w._row_map is not None
    target[0] = id(w._row_map.region)
    w.close()
    s = store.open(tmp_path / "s")  # complete while the old map is still being dropped
    assert s.complete and torch.equal(s.read(0, ALL), x[0]) and seen == []
    release.set()
    for t in threading.enumerate():
        if t.name == "store-unmap":
            t.join(5)
    assert seen == ["store-unmap"]


@pytest.mark.parametrize(
    ("dtype", "codec"), [("float16", None), ("bfloat16", None), ("float16", "lz4")]
)
def test_writer_says_once_how_many_values_are_not_finite(tmp_path, caplog, dtype, codec):
    # 70000 rounds to inf in float16 (its largest value is 65504), not in bfloat16
    x, y = encoded(views=2), labels_for()
    x[0, 5, 1, 2, 3] = 70000.0
    x[1, 116, 0, 0, 1] = float("nan")  # the last, partial chunk
    x[1, 40, 2, 4, 0] = float("-inf")
    x[1, 41, 2, 4, 0] = float("nan")  # the same chunk as sample 40
    with caplog.at_level(logging.WARNING, logger="store"):
        # rows: written in place (write-through); batches: copied (a cache pass, compressed)
        for name, rows in (("rows", True), ("batches", False)):
            if rows and codec is not None:
                continue
            with _create(tmp_path / name, dtype=dtype, codec=codec) as w:
                for v in range(2):
                    if rows:
                        for idx in _shuffled_batches(v):
                            w.write_rows(v, idx, x[v, idx], y[idx] if v == 0 else None)
                    else:
                        w.write(v, 0, x[v], y)
            inf = 2 if dtype == "float16" else 1
            assert w.nonfinite == (inf, 2, 3 if dtype == "float16" else 2)
    said = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(said) == (2 if codec is None else 1)  # once per store
    assert said[-1].startswith(
        f"{tmp_path / 'batches'}: {inf + 2} value(s) written are not finite ({inf} inf, 2 NaN)"
    )
    # the float16 rounding is named where it applies only (it was said of every dtype)
    assert ("a float16 store rounds values beyond 65504" in said[-1]) == (dtype == "float16")
    with caplog.at_level(logging.WARNING, logger="store"):
        caplog.clear()
        with _create(tmp_path / "clean", dtype=dtype, codec=codec) as w:
            for v in range(2):
                w.write(v, 0, encoded(views=2)[v], y)
        assert w.nonfinite == (0, 0, 0) and not caplog.records
