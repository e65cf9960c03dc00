"""Raw stores with page-aligned chunks: all chunks mapped side by side, one gather per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import store
from store.errors import StoreCorruptError, StoreInputError
from store.layout import default_chunk_samples

N, SHAPE, CHUNK = 75, (4, 16, 16), 6  # 2,048-byte fp16 samples: 12,288-byte (3-page) chunks


def _store(path, views=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((views, N, *SHAPE), generator=g).to(torch.float16)
    y = torch.arange(N) % 7
    with store.create(
        path, sample_shape=SHAPE, num_samples=N, views=views, dtype="float16", chunk_samples=CHUNK
    ) as w:
        for v in range(views):
            w.write(v, 0, x[v], y)
    return x, y


def test_side_by_side_map_reads_what_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(store.layout, "MIN_PART_BYTES", 1)  # tiny samples: split anyway
    x, _ = _store(tmp_path / "s")
    s = store.open(tmp_path / "s")
    assert s._cm is not None  # the aligned layout takes the one-map path
    idx = np.random.default_rng(0).permutation(N)
    for v in range(2):
        assert torch.equal(s.read(v, idx), x[v, idx])
        assert torch.equal(s.read(v, [74, 0, 74]), x[v, [74, 0, 74]])  # the padded edge chunk
    views = np.array([1, 0, 1, 1, 0])
    rows = np.array([3, 74, 12, 3, 40])
    out = torch.empty((5, *SHAPE), dtype=torch.float16)
    s.gather(views, rows, out)
    assert torch.equal(out, x[views, rows])
    for bad in (75, 77, -1):  # 75..77 are the edge chunk's padding, inside the map
        with pytest.raises(StoreInputError, match=f"sample index {bad} out of range"):
            s.gather(np.zeros(2, dtype=np.int64), np.array([3, bad]), out[:2])
    assert np.array_equal(s.read_chunk(1, 12), x[1, 72:75].numpy())
    loader = store.StoreLoader(
        s, batch_size=16, seed=3, prefetch=0, gather_workers=3, with_indices=True
    )
    loader.set_epoch(1)
    xs, _, ids = (torch.cat(t) for t in zip(*loader, strict=True))
    assert sorted(ids.tolist()) == list(range(N))
    picked = store.order.epoch_views(N, 2, 3, 1)[ids.numpy()]
    assert torch.equal(xs, x[picked, ids.numpy()])


def test_without_address_space_for_one_map_chunks_are_mapped_one_by_one(tmp_path, monkeypatch):
    """Where the side-by-side map cannot be reserved (a limit on address space, ulimit -v,
    smaller than the store), open() raised OSError and write_rows StoreWriteError; both now
    fall back, to chunk by chunk maps and to pwrite."""

    def no_room(*a, **k):
        raise OSError(12, "cannot reserve address space for a store map")

    monkeypatch.setattr(store._mmap.Region, "__init__", no_room)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((N, *SHAPE), generator=g).to(torch.float16)
    rows = np.random.default_rng(0).permutation(N)
    with store.create(
        tmp_path / "s", sample_shape=SHAPE, num_samples=N, dtype="float16", chunk_samples=CHUNK
    ) as w:
        for i in range(0, N, 20):
            r = rows[i : i + 20]
            w.write_rows(0, r, x[r], torch.from_numpy(r % 7))
    s = store.open(tmp_path / "s")
    assert s.memory_mapped and s._cm is None
    assert torch.equal(s.read(0, rows), x[rows]) and torch.equal(s.labels, torch.arange(N) % 7)


def test_a_store_of_more_chunks_than_maps_allowed_is_not_mapped_side_by_side(tmp_path, monkeypatch):
    """Each chunk mapped side by side is one of the process's memory maps (vm.max_map_count,
    65,530 by default): a store of more chunks failed with ENOMEM partway through a read, and
    so did write_rows. Such a store now takes the bounded chunk by chunk maps and pwrite."""
    monkeypatch.setattr(store._mmap, "map_limit", lambda: 40, raising=False)  # 26 > 40 // 2
    x, _ = _store(tmp_path / "s")  # 2 views x 13 chunks
    s = store.open(tmp_path / "s")
    assert s.memory_mapped and s._cm is None
    assert torch.equal(s.read(1, np.arange(N)[::-1].copy()), x[1].flip(0))
    w = store.create(
        tmp_path / "w", sample_shape=SHAPE, num_samples=N, views=2, chunk_samples=CHUNK
    )
    w.write_rows(0, [3], x[0, 3:4], torch.tensor([1]))
    assert w._row_map is None  # rows went by pwrite
    w.abort()
    monkeypatch.setattr(store._mmap, "map_limit", lambda: 52)  # 26 chunks: side by side again
    assert store.open(tmp_path / "s")._cm is not None


def _store_with_bad_chunk_3(path):
    """A one-view store whose chunk 3 has a flipped byte: (its samples as written, the file)."""
    x, _ = _store(path, views=1)
    f = path / "activations" / "c" / "0" / "3" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0x10
    f.write_bytes(bytes(raw))
    return x, f


def test_a_flipped_byte_is_caught_when_its_chunk_is_first_read(tmp_path):
    x, f = _store_with_bad_chunk_3(tmp_path / "s")
    s = store.open(tmp_path / "s")
    assert s._cm is not None
    assert torch.equal(s.read(0, [0, 17, 30]), x[0, [0, 17, 30]])  # chunks 0, 2, 5
    for _ in range(2):  # a failed check leaves the chunk unmapped: it fails again
        with pytest.raises(StoreCorruptError, match=r"chunk \(view 0, chunk 3"):
            s.read(0, [19])
    f.unlink()
    s2 = store.open(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match="missing"):
        s2.read(0, [18])
    assert torch.equal(s2.read(0, [74]), x[0, [74]])


def test_chunks_first_touched_together_are_mapped_and_checked_on_threads(tmp_path, monkeypatch):
    """A read touching several unmapped chunks maps and checks them on MAP_WORKERS threads:
    the same values; a bad chunk raises after every chunk was tried, the good ones stay
    mapped and the bad one unmapped; the threads end with the store."""
    import threading

    import store.reader as R

    monkeypatch.setattr(R, "MAP_WORKERS", 3)
    x, _ = _store_with_bad_chunk_3(tmp_path / "s")
    s = store.open(tmp_path / "s")
    good = np.array([0, 7, 30, 74, 55, 2])  # chunks 0, 1, 5, 12, 9
    assert torch.equal(s.read(0, good), x[0, good])
    assert {t.name.split("_")[0] for t in threading.enumerate()} >= {"store-map"}
    with pytest.raises(StoreCorruptError, match=r"chunk \(view 0, chunk 3"):
        s.read(0, [19, 45, 61])  # chunks 3 (bad), 7, 10
    assert s._cm is not None
    assert s._cm._ready[0].nonzero()[0].tolist() == [0, 1, 5, 7, 9, 10, 12]
    assert torch.equal(s.read(0, [45, 61]), x[0, [45, 61]])
    with pytest.raises(StoreCorruptError, match=r"chunk \(view 0, chunk 3"):
        s.read(0, [18])  # unmapped again: checked again
    s.close()
    assert not any(t.name.startswith("store-map") for t in threading.enumerate())


def test_default_chunks_are_whole_pages_where_that_is_cheap():
    for shape, dtype, n in [((84, 16, 16), "float16", 50_000), ((3, 32, 32), "float32", 50_000),
                            ((1, 28, 28), "float16", 60_000), ((40, 32, 32), "bfloat16", 50_000)]:  # fmt: skip
        cs = default_chunk_samples(shape, dtype, n)
        sample_bytes = int(np.prod(shape)) * (4 if dtype == "float32" else 2)
        assert (cs * sample_bytes) % 4096 == 0, (shape, cs)
        assert 4 * 2**20 <= cs * sample_bytes <= 12 * 2**20  # still about 8 MiB
    assert default_chunk_samples((3, 5, 4), "float32", 117) == 117  # one chunk: no padding added
