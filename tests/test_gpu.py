"""CUDA paths: pinned, side-stream prefetching, the device tier, bf16 autocast and channels_last.
Run on a GPU machine with ``pytest -m gpu``; skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import store
from prefast import TrainConfig, train
from tests.store_helpers import VIEWS, N, encoded, labels_for, write_store

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram-pinned", "device"])
def test_loader_to_cuda_matches_cpu(tmp_path, tier):
    x, y = encoded(), labels_for()
    raw = write_store(tmp_path / "raw", x, y)
    sources = {
        "zarr-raw": raw,
        "zarr-lz4": write_store(tmp_path / "lz4", x, y, codec="lz4"),
        "ram-pinned": store.RamCache.from_store(raw, pin=True),
        "device": store.DeviceCache.from_store(raw, "cuda"),
    }
    src = sources[tier]
    if tier == "ram-pinned":
        assert src.data.is_pinned()
    loader = store.StoreLoader(
        src, batch_size=16, seed=4, device="cuda", prefetch=3, buffer_chunks=2
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for xb, yb in loader:
            assert xb.is_cuda and yb.is_cuda
            codes = xb[:, 0, 0, 0].cpu().numpy().astype(np.int64)
            v, i = codes // 10000, codes % 10000
            assert torch.equal(xb.cpu(), x[v, i])
            assert torch.equal(yb.cpu(), y[i])
            seen.append(i)
        assert sorted(np.concatenate(seen).tolist()) == list(range(N))
    assert VIEWS == 3


def test_cuda_prefetch_matches_cpu_order(tmp_path):
    x, y = encoded(), labels_for()
    s = write_store(tmp_path / "raw", x, y, dtype="bfloat16")
    cpu = [b for b, _ in store.StoreLoader(s, batch_size=20, seed=1)]
    gpu = [b.cpu() for b, _ in store.StoreLoader(s, batch_size=20, seed=1, device="cuda")]
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu, strict=True))


@pytest.mark.parametrize("cache", ["device", "ram", "zarr"])
def test_training_on_cuda_with_bf16_and_channels_last(tmp_path, cache):
    r = train(
        TrainConfig(
            dataset="synthetic",
            num_samples=256,
            model="densenet_bc",
            model_args={"depth": 16, "growth": 8},
            epochs=3,
            batch_size=32,
            t0=0.3,
            how_scale="linear",
            mode="prefast",
            cache=cache,
            cache_dir=str(tmp_path / "c"),
            recache_policy="every",
            views=2,
            device="cuda",
            amp="bf16",
            channels_last=True,
            progress=False,
        )
    )
    assert r.summary["cache_tier"] == cache and r.summary["peak_gpu_bytes"] > 0
    assert np.isfinite(r.losses).all()


def test_parity_on_cuda(tmp_path):
    kw = dict(
        dataset="synthetic", num_samples=96, model="densenet_bc", model_args={"depth": 16, "growth": 8}, epochs=3,
        batch_size=16, t0=0.3, how_scale="linear", augment=False, device="cuda", progress=False,
    )  # fmt: skip
    torch.backends.cudnn.deterministic = True
    ref = train(TrainConfig(**kw, mode="freezeout"))
    got = train(
        TrainConfig(
            **kw,
            mode="prefast",
            cache="zarr",
            cache_dir=str(tmp_path / "c"),
            cache_dtype="float32",
            views=1,
            recache_policy="every",
        )
    )
    torch.testing.assert_close(
        torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5
    )
