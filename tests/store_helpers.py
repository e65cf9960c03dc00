"""Shared helpers for store tests: data whose first element encodes (view, sample)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

import store

N = 117
SHAPE = (3, 5, 4)
VIEWS = 3
CHUNK = 8


def encoded(
    num_samples: int = N, views: int = VIEWS, shape: tuple[int, ...] = SHAPE, seed: int = 0
) -> torch.Tensor:
    """(views, N, *shape) float32; element [v, i, 0, 0, 0] = v * 10000 + i, the rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((views, num_samples, *shape), generator=g)
    x.view(views, num_samples, -1)[:, :, 0] = (
        torch.arange(views)[:, None] * 10000 + torch.arange(num_samples)[None, :]
    ).float()
    return x


def labels_for(num_samples: int = N) -> torch.Tensor:
    return (torch.arange(num_samples) * 7 + 3) % 10


def decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(views, samples) encoded in a batch (B, *shape)."""
    code = x.reshape(len(x), -1)[:, 0].float().numpy().astype(np.int64)
    return code // 10000, code % 10000


def write_store(
    path: Path,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    dtype: str = "float32",
    codec: str | None = None,
    chunk: int = CHUNK,
    batch: int = 50,
    meta: dict | None = None,
    overwrite: bool = False,
) -> store.ActivationStore:
    views, n = x.shape[:2]
    with store.create(
        path,
        sample_shape=tuple(x.shape[2:]),
        num_samples=n,
        views=views,
        dtype=dtype,
        codec=codec,
        chunk_samples=chunk,
        meta=meta or {"test": True},
        overwrite=overwrite,
    ) as w:
        for v in range(views):
            for i in range(0, n, batch):
                w.write(view=v, start=i, x=x[v, i : i + batch], labels=labels[i : i + batch])
    return store.open(path)


def chunk_files(path: Path) -> dict[str, bytes]:
    """Every file under the store's array folders, by relative path."""
    out = {}
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.name != "zarr.json":
            out[str(f.relative_to(path))] = f.read_bytes()
    return out


def cut_short_after_removing(monkeypatch, name: str) -> None:
    """Make the next ``shutil.rmtree`` of a folder called ``name`` be the last thing a writer
    does (it removes it, then is killed: raises ``KeyboardInterrupt``)."""
    rmtree = shutil.rmtree

    def _rmtree(path, *a, **k):
        rmtree(path, *a, **k)
        if Path(path).name == name:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", _rmtree)
