"""One conformance check run against every cache tier: the protocols it claims, and a write ->
read round trip through ``ActivationSink`` and ``ActivationSource`` only (N=117, chunk 8, 3
views, batches of 50 so writes straddle chunks; values encode their index)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import store
from tests.store_helpers import CHUNK, SHAPE, VIEWS, N, encoded, labels_for, write_store

# A tier under test: the sink to write into, and how to read what was written back.
Tier = tuple[store.ActivationSink, Callable[[], store.ActivationSource]]


def _zarr(path: Path, dtype: str) -> Tier:
    w = store.create(
        path, sample_shape=SHAPE, num_samples=N, views=VIEWS, dtype=dtype, chunk_samples=CHUNK
    )
    return w, lambda: store.open(path)


def _ram(path: Path, dtype: str) -> Tier:
    r = store.RamCache.empty(N, VIEWS, SHAPE, dtype)
    return r, lambda: r


def _device(path: Path, dtype: str) -> Tier:
    d = store.DeviceCache.empty(N, VIEWS, SHAPE, dtype, device="cpu")
    return d, lambda: d


TIERS: dict[str, Callable[[Path, str], Tier]] = {"zarr": _zarr, "ram": _ram, "device": _device}


def check_tier(tier: Tier, x: torch.Tensor, y: torch.Tensor) -> None:
    """The conformance suite: x (views, N, *SHAPE) float32, y (N,) int64."""
    sink, reopen = tier
    assert isinstance(sink, store.ActivationSink)
    with sink as w:
        # a batch that is not a tensor or an array (a list had no .shape: AttributeError)
        with pytest.raises(store.StoreInputError, match="'x' must be a tensor or numpy array"):
            w.write(0, 0, x[0, :2].tolist(), y[:2])
        if w.supports_rows:
            with pytest.raises(store.StoreInputError, match="'x' must be a tensor or numpy"):
                w.write_rows(0, [0, 1], x[0, :2].tolist(), y[:2])
        for v in range(VIEWS):
            for i in range(0, N, 50):
                w.write(v, i, x[v, i : i + 50], y[i : i + 50])
    src = reopen()
    assert isinstance(src, store.ActivationSource)
    assert (src.num_samples, src.views, src.sample_shape) == (N, VIEWS, SHAPE)
    want = x.to(src.dtype)  # what the tier holds: x rounded to its dtype
    for v in range(VIEWS):
        assert torch.equal(src.read(v, np.arange(N)).cpu(), want[v])
    assert torch.equal(src.labels.cpu(), y)
    views = np.array([2, 0, 1, 2], dtype=np.int64)
    idx = np.array([116, 3, 8, 0], dtype=np.int64)
    out = torch.empty((4, *SHAPE), dtype=src.dtype, device=src.device)
    src.gather(views, idx, out)
    assert torch.equal(out.cpu(), want[views, idx])
    # one view or several, every tier: a negative index or view is not read from the end (the
    # tensor tiers did), a view past the last is not numpy's IndexError, and a store's
    # negative view is not its missing chunk file
    for views in ([1, 1], [1, 2]):
        for bad in (N, -1):
            with pytest.raises(store.StoreInputError, match=f"sample index {bad} out of range"):
                src.gather(np.array(views), np.array([0, bad]), out[:2])
    for bad in (VIEWS, -1):
        for views in ([bad, bad], [0, bad]):
            with pytest.raises(store.StoreInputError, match=f"view {bad} out of range"):
                src.gather(np.array(views), np.array([0, 1]), out[:2])
    with pytest.raises(store.StoreInputError, match="indices must be 2 integers"):
        src.gather(np.array([0, 1]), np.array([0, 1, 2]), out[:2])
    with pytest.raises(store.StoreInputError, match="views must be 2 integers"):
        src.gather(np.array([0.0, 1.0]), np.array([0, 1]), out[:2])
    src.gather(np.array([], dtype=np.int64), np.array([], dtype=np.int64), out[:0])
    # a buffer of another dtype was cast (bfloat16's raw words to floats, or floats to
    # words), one of another sample shape was numpy's ValueError
    other = torch.float16 if src.dtype != torch.float16 else torch.float32
    for wrong in (out[:2].to(other), out[:2, :, :, :1].cpu(), out[:2].flatten(1)):
        with pytest.raises(store.StoreInputError, match=r"out must be \(len, \*\(3, 5, 4\)\)"):
            src.gather(np.array([1, 2]), np.array([0, 1]), wrong)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(TIERS))
def test_every_tier_conforms(tmp_path, name, dtype):
    check_tier(TIERS[name](tmp_path / "s", dtype), encoded(), labels_for())


def test_each_side_is_claimed_only_where_it_holds(tmp_path):
    w, _ = _zarr(tmp_path / "s", "float32")
    w.abort()
    assert not isinstance(w, store.ActivationSource)  # a writer cannot be read from
    s = store.open(tmp_path / "s", partial=True)
    assert not isinstance(s, store.ActivationSink)  # an opened store is read-only
    assert not isinstance(object(), store.ActivationSource | store.ActivationSink)


@pytest.mark.parametrize("name", ["zarr", "ram"])
def test_parallel_gather_delivers_the_same_batches(tmp_path, monkeypatch, name):
    # three gather threads split each batch (of 41, odd) into parts: same samples, same order
    monkeypatch.setattr(store.layout, "MIN_PART_BYTES", 1)  # tiny samples: split anyway
    x, y = encoded(), labels_for()
    sink, reopen = TIERS[name](tmp_path / "s", "float32")
    with sink as w:
        # a batch that is not a tensor or an array (a list had no .shape: AttributeError)
        with pytest.raises(store.StoreInputError, match="'x' must be a tensor or numpy array"):
            w.write(0, 0, x[0, :2].tolist(), y[:2])
        if w.supports_rows:
            with pytest.raises(store.StoreInputError, match="'x' must be a tensor or numpy"):
                w.write_rows(0, [0, 1], x[0, :2].tolist(), y[:2])
        for v in range(VIEWS):
            w.write(v, 0, x[v], y)
    src = reopen()
    got = {}
    for workers in (1, 3):
        loader = store.StoreLoader(
            src, batch_size=41, seed=5, prefetch=0, with_indices=True, gather_workers=workers
        )
        assert loader.gather_workers == workers
        loader.set_epoch(2)
        got[workers] = list(loader)
    assert len(got[1]) == len(got[3]) == 3
    views = store.order.epoch_views(N, VIEWS, 5, 2)
    for (x1, y1, i1), (x3, y3, i3) in zip(got[1], got[3], strict=True):
        assert torch.equal(i1, i3) and torch.equal(y1, y3) and torch.equal(x1, x3)
        assert torch.equal(x3, x[views[i3.numpy()], i3.numpy()])
    with pytest.raises(store.StoreInputError, match="gather_workers"):
        store.StoreLoader(src, gather_workers=0)


def test_a_batch_is_split_among_gather_threads_only_into_parts_worth_a_thread(monkeypatch):
    """Parts of at least MIN_PART_BYTES: a batch under twice that is gathered on the calling
    thread, a larger one in as many parts as it holds (at most gather_workers)."""
    src = store.RamCache.empty(64, 1, (4,), "float32")  # 16-byte samples
    src.data[0] = torch.arange(256, dtype=torch.float32).view(64, 4)
    calls: list[tuple[str, int]] = []
    real = src.gather

    def spy(views, indices, out):
        calls.append((threading.current_thread().name, len(indices)))
        real(views, indices, out)

    monkeypatch.setattr(src, "gather", spy)
    monkeypatch.setattr(store.layout, "MIN_PART_BYTES", 16 * 10)  # 10 samples a part
    for batch, parts in ((19, [19]), (32, [10, 11, 11]), (64, [16, 16, 16, 16])):
        calls.clear()
        loader = store.StoreLoader(src, batch_size=batch, prefetch=0, gather_workers=4)
        loader.set_epoch(0)
        xb, _ = next(iter(loader))
        assert sorted(n for _, n in calls) == parts
        on_pool = [name.startswith("store-gather") for name, _ in calls]
        assert all(on_pool) if len(parts) > 1 else not any(on_pool)
        ids = store.order.epoch_permutation(64, 0, 0, True)[:batch]
        assert torch.equal(xb, src.data[0, torch.from_numpy(ids)])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_close_ends_the_gather_threads_and_a_later_pass_starts_them_again(monkeypatch, prefetch):
    """close() and the end of a with block stopped the passes but left the loader's gather
    threads running until the loader was garbage collected."""
    src = store.RamCache.empty(37, 3, (4,), "float32")  # 16-byte samples
    src.data.copy_(torch.arange(3 * 37 * 4, dtype=torch.float32).view(3, 37, 4))
    monkeypatch.setattr(store.layout, "MIN_PART_BYTES", 16 * 5)  # 5 samples a part

    def gathering() -> int:
        return sum(t.name.startswith("store-gather") for t in threading.enumerate())

    before = gathering()
    with store.StoreLoader(src, batch_size=30, prefetch=prefetch, gather_workers=3) as loader:
        loader.set_epoch(2)
        first = [xb.clone() for xb, _ in loader]
        assert gathering() > before  # the batch of 30 was split among the threads
    assert gathering() == before
    loader.set_epoch(2)
    it = iter(loader)
    assert torch.equal(next(it)[0], first[0])  # a later pass gathers (on new threads)
    loader.close()
    assert gathering() == before
    loader.set_epoch(2)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, loader, strict=True))
    del it, loader
    assert [t.name for t in threading.enumerate() if t.name.startswith("store-loader")] == []


def _batches(
    loader: store.StoreLoader, epoch: int, start: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch, start_batch=start)
    return [tuple(t.clone() for t in b) for b in loader]


@pytest.mark.parametrize("name", ["zarr", "zarr-lz4", "ram"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_gathered_in_groups_are_the_batches_gathered_alone(tmp_path, name, prefetch):
    """Groups of 3 and 4 batches (of 13, odd; 117 samples: a short last batch, and a short
    last group) deliver exactly the batches, labels and ids of one batch at a time, from
    the epoch's start, resumed mid-group, on one rank of two and with drop_last."""
    x, y = encoded(), labels_for()
    if name == "zarr-lz4":  # streamed chunk by chunk: no random access
        path = tmp_path / "s"
        kw = {"views": VIEWS, "dtype": "float32", "chunk_samples": CHUNK, "codec": "lz4"}
        with store.create(path, sample_shape=SHAPE, num_samples=N, **kw) as w:
            for v in range(VIEWS):
                w.write(v, 0, x[v], y)
        src: store.ActivationSource = store.open(path)
        assert not src.memory_mapped
    else:
        sink, reopen = TIERS[name](tmp_path / "s", "float32")
        with sink as w:
            for v in range(VIEWS):
                w.write(v, 0, x[v], y)
        src = reopen()
    for kw in ({}, {"rank": 1, "world_size": 2}, {"drop_last": True}):
        ref = store.StoreLoader(
            src, batch_size=13, seed=7, prefetch=prefetch, with_indices=True, **kw
        )
        assert ref.batches_per_copy == 1  # the default on a CPU device
        for k in (3, 4):
            grouped = store.StoreLoader(
                src,
                batch_size=13,
                seed=7,
                prefetch=prefetch,
                with_indices=True,
                batches_per_copy=k,
                **kw,
            )
            for epoch, start in ((0, 0), (1, 5)):
                want, got = _batches(ref, epoch, start), _batches(grouped, epoch, start)
                assert len(got) == len(want) == len(ref) - start
                for a, b in zip(want, got, strict=True):
                    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
            assert grouped.stats.batches == len(grouped) - 5  # counted per batch, not group
            assert grouped.stats.bytes == sum(len(b[0]) for b in got) * x[0, 0].numel() * 4
    if name != "zarr-lz4":  # random access: the exact permutation, each sample its view
        views = store.order.epoch_views(N, VIEWS, 7, 0)
        for xb, yb, ids in _batches(ref, 0):
            i = ids.numpy()
            assert torch.equal(xb, x[views[i], i]) and torch.equal(yb, y[i])


def test_a_group_is_gathered_in_one_call_split_among_the_threads_as_one_batch(monkeypatch):
    """Random access: a group of 4 batches of 5 is one gather of 20 samples, split into
    parts as a batch of 20 would be; the short last group is one gather too."""
    src = store.RamCache.empty(46, 1, (4,), "float32")  # 16-byte samples
    src.data[0] = torch.arange(46 * 4, dtype=torch.float32).view(46, 4)
    calls: list[int] = []
    real = src.gather

    def spy(views, indices, out):
        calls.append(len(indices))
        real(views, indices, out)

    monkeypatch.setattr(src, "gather", spy)
    monkeypatch.setattr(store.layout, "MIN_PART_BYTES", 16 * 10)  # 10 samples a part
    loader = store.StoreLoader(
        src, batch_size=5, prefetch=0, gather_workers=2, batches_per_copy=4, with_indices=True
    )
    loader.set_epoch(3)
    got = list(loader)
    assert [len(b[0]) for b in got] == [5] * 9 + [1]
    # groups of 20, 20 and 6 samples: two parts of 10, two of 10, then one call of 6
    assert calls == [10, 10, 10, 10, 6]
    order = store.order.epoch_permutation(46, 0, 3, True)
    assert torch.equal(torch.cat([b[2] for b in got]), torch.from_numpy(order))
    assert torch.equal(torch.cat([b[0] for b in got]), src.data[0, torch.from_numpy(order)])


def test_batches_per_copy_default_and_validation():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert store.loader.default_batches_per_copy(3_700_000, cpu) == 1
    assert store.loader.default_batches_per_copy(3_700_000, cuda) == 4  # 14.8 MB <= 16 MiB
    assert store.loader.default_batches_per_copy(1_000, cuda) == 8  # at most 8 a group
    assert store.loader.default_batches_per_copy(60_000_000, cuda) == 1  # a big batch alone
    src = store.RamCache.empty(10, 1, (4,), "float32")
    with pytest.raises(store.StoreInputError, match="batches_per_copy"):
        store.StoreLoader(src, batches_per_copy=0)


def test_a_device_the_loader_cannot_feed_is_refused_when_it_is_made(monkeypatch):
    """Not a torch.RuntimeError from the first batch, nor host batches for an mps device."""
    src = store.RamCache.empty(10, 1, (4,), "float32")
    with pytest.raises(store.StoreInputError, match="'gpu' is not a device"):
        store.StoreLoader(src, device="gpu")
    for kind in ("meta", "mps"):
        with pytest.raises(store.StoreInputError, match=f"cpu or cuda, not {kind}"):
            store.StoreLoader(src, device=kind)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(store.StoreInputError, match="CUDA is not available"):
        store.StoreLoader(src, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(store.StoreInputError, match="has 1 CUDA device"):
        store.StoreLoader(src, device="cuda:1")
    assert store.StoreLoader(src, device=torch.device("cpu")).device == torch.device("cpu")


def test_a_device_cache_feeds_only_its_own_device(monkeypatch):
    """A DeviceCache on cuda:0 read by a loader for the CPU or cuda:1 was torch's RuntimeError
    at the first batch (its gathers write into a buffer on its own device)."""

    class OnGpu(store.DeviceCache):  # a DeviceCache as it is on cuda:0, without a GPU
        device = torch.device("cuda", 0)  # type: ignore[assignment]

    src = OnGpu(torch.zeros(1, 10, 4), torch.zeros(10, dtype=torch.long))
    with pytest.raises(store.StoreInputError, match="a cache on cuda:0 feeds batches on cuda:0"):
        store.StoreLoader(src, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for device in ("cuda:1", "cuda"):  # "cuda" is the current device, cuda:1
        with pytest.raises(store.StoreInputError, match=f"not on {device}: .*device='cuda:0'"):
            store.StoreLoader(src, device=device)
    for device in ("cuda:0", torch.device("cuda", 0)):
        assert store.StoreLoader(src, device=device).device == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert store.StoreLoader(src, device="cuda").device == torch.device("cuda")


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_tensor_tiers_refuse_the_labels_a_store_refuses(tier):
    # a cache pass writes any tier: labels a store refuses (negative, fractional) are refused
    # by the in-memory tiers too, before anything is written, not kept as -1 or truncated
    make = store.RamCache.empty if tier == "ram" else store.DeviceCache.empty
    cache = make(4, 1, (3,), dtype="float32")
    cache.data.zero_()
    x = torch.ones(2, 3)
    with pytest.raises(store.StoreInputError, match=r"must be >= 0 .*got -1 at position 0"):
        cache.write(0, 0, x, torch.tensor([-1, 2]))
    with pytest.raises(store.StoreInputError, match="must be 2 integers"):
        cache.write(0, 0, x, torch.tensor([1.7, 2.2]))
    with pytest.raises(store.StoreInputError, match=r"must be >= 0"):
        cache.write_rows(0, [3, 1], x, torch.tensor([0, -5]))
    assert torch.equal(cache.labels, torch.full((4,), -1)) and not cache.data.eq(1).any()
    cache.write_rows(0, [3, 1], x, [0, 5])
    assert cache.labels.tolist() == [-1, 5, -1, 0]


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_tensor_tiers_from_tensors_refuse_the_labels_a_store_refuses(tier):
    """from_tensors took any labels: fractional ones truncated to other classes, negative
    ones kept."""
    make = store.RamCache.from_tensors if tier == "ram" else store.DeviceCache.from_tensors
    x = torch.zeros(1, 3, 2)
    with pytest.raises(store.StoreInputError, match=r"'labels' must be 3 integers, got .*float"):
        make(x, torch.tensor([0.0, 1.7, 2.2]))
    with pytest.raises(store.StoreInputError, match=r"must be >= 0 .*got -1 at position 2"):
        make(x, torch.tensor([0, 1, -1]))
    with pytest.raises(store.StoreInputError, match=r"'labels' must be 3 integers, got shape"):
        make(x, torch.tensor([0, 1]))
    assert make(x, np.array([2, 0, 1], dtype=np.int32)).labels.tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("4", 1, (2,)), "num_samples must be an integer, got '4'"),
        ((-1, 1, (2,)), r"num_samples must be in \[1, "),
        ((4, 1.0, (2,)), "views must be an integer, got 1.0"),
        ((4, 1, 2), "sample_shape must be a sequence of integers, got 2"),
        ((4, 1, (2, -3)), r"sample_shape must be in \[1, "),
    ],
)
@pytest.mark.parametrize("tier", ["ram", "device"])
def test_an_empty_tier_checks_its_layout_as_a_store_does(tier, args, match):
    """RamCache.empty("4", ...) failed with torch's TypeError, a negative count with its
    RuntimeError, and an int sample_shape with a TypeError unpacking it."""
    make = store.RamCache.empty if tier == "ram" else store.DeviceCache.empty
    with pytest.raises(store.StoreInputError, match=match):
        make(*args)
    cache = make(np.int64(4), 1, [2, np.int64(3)])
    assert cache.data.shape == (1, 4, 2, 3) and cache.labels.tolist() == [-1] * 4


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 0, 2), r"num_samples must be in \[1, "),
        ((0, 4, 2), r"views must be in \[1, "),
        ((1, 4, 0), r"sample_shape must be in \[1, "),
    ],
)
@pytest.mark.parametrize("tier", ["ram", "device"])
def test_a_tier_from_tensors_refuses_an_empty_shape_as_a_store_does(tier, shape, match):
    """from_tensors took 0 samples or 0 views (empty() and a store refuse both): the loader
    over it failed later, with no views only at its first batch."""
    make = store.RamCache.from_tensors if tier == "ram" else store.DeviceCache.from_tensors
    with pytest.raises(store.StoreInputError, match=match):
        make(torch.zeros(shape), torch.zeros(shape[1], dtype=torch.long))
    cache = make(torch.zeros(1, 1, 2), torch.zeros(1, dtype=torch.long))
    assert [len(yb) for _, yb in store.StoreLoader(cache, batch_size=3)] == [1]


def test_a_device_tier_on_a_device_that_is_not_there_is_an_input_error(tmp_path, monkeypatch):
    """DeviceCache.from_store(s, "cuda") on a machine without CUDA failed with torch's
    RuntimeError 'Found no NVIDIA driver', and a device name torch does not know with its
    many-line RuntimeError; the loader's device check applies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x = torch.zeros(1, 3, 2)
    for call in (
        lambda: store.DeviceCache.empty(3, 1, (2,), device="cuda"),
        lambda: store.DeviceCache.from_tensors(x, torch.arange(3), device="cuda:0"),
    ):
        with pytest.raises(store.StoreInputError, match="CUDA is not available here"):
            call()
    with pytest.raises(store.StoreInputError, match="'gpu' is not a device"):
        store.DeviceCache.empty(3, 1, (2,), device="gpu")
    assert store.DeviceCache.from_tensors(x, torch.arange(3), device="auto").device.type == "cpu"


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_a_row_given_twice_keeps_its_last_sample_as_a_store_does(tmp_path, tier):
    # index_copy_ with a repeated index keeps an undefined one of its sources on a GPU
    make = store.RamCache.empty if tier == "ram" else store.DeviceCache.empty
    cache = make(5, 1, (3,), dtype="float32")
    rows = [2, 0, 2, 4, 1, 2, 3]
    x = torch.arange(7, dtype=torch.float32)[:, None].expand(7, 3) + 10
    cache.write_rows(0, np.array(rows), x, [7, 0, 8, 4, 1, 9, 3])
    assert cache.data[0, :, 0].tolist() == [11.0, 14.0, 15.0, 16.0, 13.0]
    assert cache.labels.tolist() == [0, 1, 9, 3, 4]
    w = store.create(tmp_path / "s", sample_shape=(3,), num_samples=5, dtype="float32")
    w.write_rows(0, rows, x.numpy(), np.array([7, 0, 8, 4, 1, 9, 3]))
    w.close()
    stored = store.RamCache.from_store(store.open(tmp_path / "s"))
    assert torch.equal(stored.data, cache.data) and torch.equal(stored.labels, cache.labels)


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_no_rows_given_as_an_empty_list_are_written_as_a_store_writes_them(tmp_path, tier):
    """write_rows(0, [], x[:0]) was refused ('rows' must be integers: numpy makes an empty
    list float64) where a store's writer takes it, so a cache pass with an empty batch of rows
    failed on the tensor tiers only."""
    make = store.RamCache.empty if tier == "ram" else store.DeviceCache.empty
    cache = make(5, 1, (3,), dtype="float32")
    cache.data.zero_()
    cache.write_rows(0, [], torch.zeros(0, 3))
    assert cache.data.abs().sum() == 0 and cache.labels.tolist() == [-1] * 5
    with store.create(tmp_path / "s", sample_shape=(3,), num_samples=5, dtype="float32") as w:
        w.write_rows(0, [], np.zeros((0, 3), dtype=np.float32))
        w.abort()
    with pytest.raises(store.StoreInputError, match="'rows' must be a 1-D tensor of integers"):
        cache.write_rows(0, [0.0], torch.zeros(1, 3))
    # and no labels as an empty list, on every sink (numpy makes [] float64 too)
    cache.write_rows(0, [], torch.zeros(0, 3), labels=[])
    with store.create(tmp_path / "s2", sample_shape=(3,), num_samples=5, dtype="float32") as w:
        w.write_rows(0, [], np.zeros((0, 3), dtype=np.float32), labels=[])
        w.abort()
    with pytest.raises(store.StoreInputError, match="'labels' must be 1 integers"):
        cache.write_rows(0, [0], torch.zeros(1, 3), labels=[])


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_from_tensors_refuses_views_it_cannot_stack_in_its_own_words(tier):
    """An empty list, per-view tensors of different shapes or None were torch's RuntimeError
    or TypeError from its stack, and a list of numpy arrays was refused by torch."""
    make = store.RamCache.from_tensors if tier == "ram" else store.DeviceCache.from_tensors
    y = torch.arange(4)
    for x, match in (
        ([], "x is an empty list"),
        ([torch.zeros(4, 2), torch.zeros(4, 3)], r"differ in shape: \[\(4, 2\), \(4, 3\)\]"),
        (None, "got NoneType"),
    ):
        with pytest.raises(store.StoreInputError, match=match):
            make(x, y)
    views = [np.full((4, 2), v, dtype=np.float32) for v in range(2)]
    for x in (views, np.stack(views), tuple(torch.from_numpy(v) for v in views)):
        cache = make(x, y)
        assert cache.data.shape == (2, 4, 2) and cache.data[:, :, 0].tolist() == [[0] * 4, [1] * 4]


def test_ram_cache_refuses_a_pin_that_is_not_a_bool(tmp_path):
    """RamCache.from_store(s, pin="no") took the string as True and pinned the cache where
    CUDA is available; pin is checked as the store checks its flags."""
    x = torch.arange(15, dtype=torch.float32).reshape(1, 5, 3)
    y = torch.arange(5)
    s = write_store(tmp_path / "s.zarr", x, y, chunk=2)
    for call in (
        lambda: store.RamCache.from_store(s, pin="no"),
        lambda: store.RamCache.empty(5, 1, (3,), pin="False"),
        lambda: store.RamCache.from_tensors(x, y, pin=1),
    ):
        with pytest.raises(store.StoreInputError, match="pin must be True or False"):
            call()
    cache = store.RamCache.from_tensors(x, y, pin=np.bool_(False))
    assert cache.data[0, 4].tolist() == [12.0, 13.0, 14.0]
    assert store.RamCache.from_store(s, pin=False).labels.tolist() == s.labels.tolist()


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_a_tier_refuses_a_meta_that_is_not_a_dict_as_a_store_does(tier):
    """from_tensors(..., meta=[1]) failed with dict()'s TypeError, meta="run" with its
    ValueError; a store's writer refuses both as input errors."""
    make = store.RamCache.from_tensors if tier == "ram" else store.DeviceCache.from_tensors
    x, y = torch.zeros(1, 3, 2), torch.arange(3)
    for bad in ([1], "run", 5):
        with pytest.raises(store.StoreInputError, match="field 'meta' must be a dict"):
            make(x, y, meta=bad)
    assert make(x, y, meta={"boundary": 3}).meta == {"boundary": 3}
    assert make(x, y).meta == {}


@pytest.mark.parametrize("tier", ["ram", "device"])
def test_tensor_tiers_take_any_integer_start_and_any_numpy_batch_as_a_store_does(tier):
    """A numpy uint8 start of 250 plus a batch of 10 wrapped to 4 in the checks, and torch's
    size-mismatch RuntimeError followed; a numpy batch with a negative stride on a length-1 axis
    (x[::-1][:1]) failed in torch's conversion; an unsigned index of 2**63 in a read raised a
    TypeError. The writer of a store takes the first two and refuses the third, naming it."""
    make = store.RamCache.empty if tier == "ram" else store.DeviceCache.empty
    cache = make(261, 1, (2,), dtype="float32")
    x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    cache.write(np.int64(0), np.uint8(250), x, torch.arange(10))
    assert torch.equal(cache.data[0, 250:260], x) and cache.labels[250:260].tolist() == list(
        range(10)
    )
    cache.write(0, torch.tensor(260), x[:1].numpy())
    with pytest.raises(store.StoreInputError, match=r"samples \[255, 265\) outside \[0, 261\)"):
        cache.write(0, np.uint8(255), x)
    last = np.arange(8.0).reshape(4, 2)[::-1][:1]  # [[6, 7]], strides negative
    cache.write(0, 3, last, np.array([5]))
    cache.write_rows(0, [7], last)
    assert cache.data[0, 3].tolist() == cache.data[0, 7].tolist() == [6.0, 7.0]
    assert cache.read(0, np.array([3, 260], dtype=np.uint64)).tolist() == [[6.0, 7.0], [0.0, 1.0]]
    with pytest.raises(store.StoreInputError, match=r"sample index 9223372036854775808 out of"):
        cache.read(0, np.array([1, 2**63], dtype=np.uint64))
