"""Samples written in place, in any order (``write_rows``): the write-through path."""

from __future__ import annotations

import logging

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
