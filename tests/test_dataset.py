"""store.ActivationDataset under a real torch DataLoader (0 and 2 workers), every tier."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import store
from tests.store_helpers import SHAPE, VIEWS, N, encoded, labels_for, write_store


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    x, y = encoded(), labels_for()
    raw = write_store(tmp_path_factory.mktemp("ds") / "raw", x, y, dtype="float32")
    return x, y, {"zarr": raw, "ram": store.RamCache.from_store(raw)}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("tier", ["zarr", "ram"])
def test_a_dataloader_sees_every_sample_once_with_its_value(tiers, tier, workers):
    x, y, sources = tiers
    ds = store.ActivationDataset(sources[tier], view=1)
    assert len(ds) == N
    # batch_size=10: the DataLoader hands each batch's indices to __getitems__ in one call
    loader = DataLoader(ds, batch_size=10, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    seen = []
    for xb, yb in loader:
        assert xb.shape[1:] == SHAPE and xb.dtype == torch.float32 and yb.dtype == torch.int64
        ids = xb.reshape(len(xb), -1)[:, 0].long() % 10000  # element 0 encodes the sample
        assert torch.equal(xb, x[1, ids]) and torch.equal(yb, y[ids])
        seen.append(ids)
    assert sorted(torch.cat(seen).tolist()) == list(range(N))


def test_per_epoch_views_follow_the_store_order(tiers):
    x, y, sources = tiers
    ds = store.ActivationDataset(sources["zarr"], seed=4, epoch=2)
    views = store.order.epoch_views(N, VIEWS, 4, 2)
    for i in (0, 57, 116, -1):
        xi, yi = ds[i]
        j = i % N
        assert torch.equal(xi, x[views[j], j]) and int(yi) == int(y[j])
    ds.set_epoch(3)
    views3 = store.order.epoch_views(N, VIEWS, 4, 3)
    xb, yb = ds.batch([5, 6, 7])
    assert torch.equal(xb, x[views3[[5, 6, 7]], [5, 6, 7]]) and torch.equal(yb, y[[5, 6, 7]])
    pairs = ds.__getitems__([116, 0])
    assert len(pairs) == 2 and torch.equal(pairs[0][0], x[views3[116], 116])


@pytest.mark.parametrize("tier", ["zarr", "ram"])
def test_persistent_workers_read_the_epoch_set_since_they_started(tiers, tier):
    """set_epoch changed the main process's dataset only: persistent workers kept the copy
    they started with and read epoch 0's views in every epoch."""
    x, _, sources = tiers
    ds = store.ActivationDataset(sources[tier], seed=4)
    loader = DataLoader(ds, batch_size=40, num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        views = torch.from_numpy(store.order.epoch_views(N, VIEWS, 4, epoch))
        xb = torch.cat([xb for xb, _ in loader])
        assert torch.equal(xb, x[views, torch.arange(N)])
    assert ds.epoch == 2
    ds.epoch = 1  # the same as set_epoch(1)
    assert torch.equal(ds[0][0], x[int(store.order.epoch_views(N, VIEWS, 4, 1)[0]), 0])


@pytest.mark.parametrize("tier", ["zarr", "ram", "device"])
def test_indices_must_be_integers_and_an_empty_batch_is_empty(tiers, tier):
    x, y, sources = tiers
    src = sources[tier] if tier != "device" else store.DeviceCache.from_tensors(x, y)
    ds = store.ActivationDataset(src)  # several views: each sample reads its epoch's view
    for bad in (1.5, True, torch.tensor(2.0)):
        with pytest.raises(IndexError, match="must be integers"):
            ds[bad]  # not sample 1 or 2: truncating picks another sample than asked for
    with pytest.raises(IndexError, match="must be integers"):
        ds.batch([3.9, 4.0])
    # the whole list went into the message: 100 kB for 20,000 floats
    with pytest.raises(IndexError, match=r"got float64 \[0\.5, 0\.5, .*\.\.\.$") as e:
        ds.batch([0.5] * 20_000)
    assert len(str(e.value)) < 200
    for several in ([1, 2], torch.tensor([1, 2]), (3,), np.array([5])):
        with pytest.raises(IndexError, match="one sample index"):
            ds[several]  # not its first sample alone
    assert torch.equal(ds[np.int64(4)][0], ds[torch.tensor(4)][0])
    xb, yb = ds.batch([])
    assert xb.shape == (0, *SHAPE) and yb.shape == (0,) and ds.__getitems__([]) == []
    # a 2-D index came back as one flat batch of its 4 samples, a bare one as a batch of 1
    for shaped in ([[1, 2], [3, 4]], np.array([[5]]), torch.tensor([[1, 2]]), 3):
        with pytest.raises(IndexError, match="must be one list of integers"):
            ds.batch(shaped)
    # a uint64 beyond int64 wrapped to -1, read as the last sample
    with pytest.raises(IndexError, match="out of range"):
        ds.batch(np.array([2**64 - 1], dtype=np.uint64))
    assert torch.equal(ds.batch(np.array([N - 1], dtype=np.uint64))[0], ds.batch([-1])[0])


def test_a_store_dataset_reopens_after_pickling_and_bad_input_is_refused(tiers):
    x, _, sources = tiers
    ds = store.ActivationDataset(sources["zarr"], view=2)
    back = pickle.loads(pickle.dumps(ds))
    assert back._source is None  # reopened on first use
    assert torch.equal(back[9][0], x[2, 9])
    with pytest.raises(IndexError):
        ds[N]
    with pytest.raises(store.StoreInputError, match="view 3"):
        store.ActivationDataset(sources["ram"], view=3)
    with pytest.raises(store.StoreInputError, match="source"):
        store.ActivationDataset(np.zeros(3))  # type: ignore[arg-type]
    dev = store.DeviceCache.from_store(sources["zarr"], "cpu")
    assert torch.equal(store.ActivationDataset(dev, view=0)[3][0], x[0, 3])


def test_xarray_opens_a_store(tiers):
    xr = pytest.importorskip("xarray")
    x, y, sources = tiers
    ds = xr.open_zarr(sources["zarr"].path, consolidated=False, zarr_format=3)
    a = ds["activations"]
    assert a.dims == ("view", "sample", "channel", "y", "x")
    assert ds["labels"].dims == ("sample",)
    np.testing.assert_array_equal(a.isel(view=1, sample=[4, 100]).values, x[1, [4, 100]].numpy())
    np.testing.assert_array_equal(ds["labels"].values, y.numpy())


def test_a_dataset_over_a_partial_store_reopens_it_in_workers(tmp_path):
    """A store opened with partial=True is reopened with partial=True in the worker processes
    (it raised StoreIncompleteError there); its written samples read as in the main process."""
    x, y = encoded(num_samples=20, views=1), labels_for(20)
    with store.create(tmp_path / "s", sample_shape=SHAPE, num_samples=20, chunk_samples=8,
                      dtype="float32") as w:  # fmt: skip
        w.write(view=0, start=0, x=x[0, :16], labels=y[:16])  # chunk 2 (samples 16..19) missing
    ds = store.ActivationDataset(store.open(tmp_path / "s", partial=True), view=0)
    back = pickle.loads(pickle.dumps(ds))
    assert torch.equal(back[15][0], x[0, 15])
    loader = DataLoader(torch.utils.data.Subset(ds, range(16)), batch_size=8, num_workers=1)
    xb = torch.cat([b for b, _ in loader])
    assert torch.equal(xb, x[0, :16])


def test_a_worker_refuses_a_store_replaced_since_the_dataset_was_made(tmp_path, monkeypatch):
    """A worker reopens the store by path: a store created anew there since (other values, the
    same layout) was read silently, its values paired with the labels the dataset holds."""
    x, y = encoded(num_samples=20, views=1), labels_for(20)
    ds = store.ActivationDataset(write_store(tmp_path / "s", x, y, chunk=8), view=0)
    assert torch.equal(pickle.loads(pickle.dumps(ds))[3][0], x[0, 3])
    monkeypatch.setattr(store.writer, "_now", lambda: "2099-01-01T00:00:00+00:00")
    write_store(tmp_path / "s", -x, y, chunk=8, overwrite=True)
    with pytest.raises(store.StoreCorruptError, match="replaced since this dataset was made"):
        pickle.loads(pickle.dumps(ds))[3]
