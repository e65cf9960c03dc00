"""``ActivationDataset``: a map-style ``torch.utils.data.Dataset`` over any cache tier.

For users of ``torch.utils.data.DataLoader`` (their own sampler, collate, ``num_workers``,
Lightning, Accelerate). Sample ``i`` is ``(x, y)``: x (sample_shape,) in the stored dtype, y an
int64 scalar. ``__getitems__`` gathers a whole batch of indices in one call (the path the
DataLoader takes with a batch sampler), through the same ``gather`` as ``StoreLoader``.

Which view a sample reads: a fixed ``view``, or (``view=None``) the view ``store.order``
assigns to it in epoch ``epoch`` (the one ``StoreLoader`` reads, except from a store it streams,
compressed or remote, where it draws a view per chunk), changed with ``set_epoch``.

Over a compressed or remote store a batch decodes every chunk it touches (nearly every chunk,
for a shuffled batch), where ``StoreLoader`` decodes each chunk once an epoch: there, prefer
``StoreLoader`` or a ``RamCache``.

Workers: a store-backed dataset reopens its store in each worker process (memory maps and
locks are never shared across a fork), as it was opened (``partial``, ``checksums``); a store
created anew at its path since raises ``StoreCorruptError`` there. A RAM tier is shared as the
tensor it is; a device tier cannot go to worker processes (CUDA does not survive a fork) and
says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from store.errors import StoreCorruptError, StoreInputError, check_int, shown
from store.order import epoch_views
from store.protocols import ActivationSource
from store.reader import ActivationStore


def _made(s: ActivationStore) -> tuple[Any, ...]:
    """What tells a store apart from one created anew at its path."""
    return (s.info.layout, s.info.meta, s.info.created)


class ActivationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(x, y) per sample of ``source``; see the module docstring."""

    def __init__(
        self,
        source: ActivationSource,
        view: int | None = None,
        epoch: int = 0,
        seed: int = 0,
    ) -> None:
        if not isinstance(source, ActivationSource):
            raise StoreInputError(
                f"source must be an ActivationStore, RamCache or DeviceCache, got {type(source).__name__}"
            )
        if view is not None:
            view = check_int("view", view)
            if not 0 <= view < source.views:
                raise StoreInputError(f"view {view} out of range [0, {source.views})")
        seed = check_int("seed", seed, 0)
        self._source: ActivationSource | None = source
        self._path = source.path if isinstance(source, ActivationStore) else None
        self._checksums = source.checksums if isinstance(source, ActivationStore) else True
        # a store opened with partial=True is reopened so, where a worker reopens it
        self._partial = isinstance(source, ActivationStore) and not source.complete
        # what the reopened store must still be: not one made anew at the path since
        self._made = _made(source) if isinstance(source, ActivationStore) else None
        self._pid = os.getpid()
        self.view = view
        self.seed = seed
        self.num_samples = source.num_samples
        self.views = source.views
        self.sample_shape = source.sample_shape
        self.dtype = source.dtype
        self.device = source.device
        self.labels = source.labels.cpu()
        # The epoch in shared memory: a DataLoader's persistent workers hold copies of this
        # dataset made at their start, and read epoch 0's views every epoch from a plain int.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._views_of = -1  # the epoch self._views holds
        self.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """With ``view=None``: read each sample's view of epoch ``epoch`` (in DataLoader
        workers too, persistent ones included)."""
        epoch = check_int("epoch", epoch, 0)
        self._epoch[0] = epoch
        self._epoch_views()

    def _epoch_views(self) -> np.ndarray:
        """The view each sample reads in the current epoch."""
        epoch = self.epoch
        if self._views_of != epoch:
            if self.view is None:
                self._views = epoch_views(self.num_samples, self.views, self.seed, epoch)
            else:
                self._views = np.full(self.num_samples, self.view, dtype=np.int64)
            self._views_of = epoch
        return self._views

    # ---- the source, reopened in a worker process ---------------------------------------
    @property
    def source(self) -> ActivationSource:
        stale = self._path is not None and os.getpid() != self._pid  # a store, forked
        if self._source is None or stale:
            if self._path is None:
                raise StoreInputError("this dataset's in-memory tier did not reach this process")
            from store.reader import open as open_store

            s = open_store(self._path, partial=self._partial, checksums=self._checksums)
            if _made(s) != self._made:  # its values would go with the labels held here
                s.close()
                raise StoreCorruptError(
                    f"{self._path}: the store was replaced since this dataset was made (created "
                    f"{s.info.created}, not {self._made and self._made[2]}); make the dataset "
                    "again over store.open(path)"
                )
            self._source = s
            self._pid = os.getpid()
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_source"] = None  # reopened where it lands
        elif self.device.type != "cpu":
            raise StoreInputError(
                "a device-tier ActivationDataset cannot be sent to DataLoader worker processes; "
                "use num_workers=0 (its reads are device operations already)"
            )
        return state

    # ---- the Dataset protocol -----------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def _index(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        raw = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if raw.size and (raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer)):
            # a float index would be truncated to another sample
            raise IndexError(f"sample indices must be integers, got {raw.dtype} {shown(indices)}")
        if raw.ndim != 1:
            # (2, 3) indices came back as 6 samples, not a (2, 3, ...) batch
            raise IndexError(f"sample indices must be one list of integers, got shape {raw.shape}")
        n = self.num_samples
        # on the given values: a uint64 beyond int64 wrapped to a negative index, a valid one
        if raw.size and (int(raw.min()) < -n or int(raw.max()) >= n):
            raise IndexError(f"sample index out of range [0, {n})")
        idx = raw.astype(np.int64).reshape(-1)
        return np.where(idx < 0, idx + n, idx)

    def _gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.source
        out = torch.empty((len(idx), *self.sample_shape), dtype=self.dtype, device=self.device)
        src.gather(self._epoch_views()[idx], idx, out)
        return out, self.labels[torch.from_numpy(idx)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (i.dim() if isinstance(i, torch.Tensor) else np.ndim(i)) != 0:
            # a list or a 1-D tensor would otherwise give its first sample alone
            raise IndexError(
                f"ds[i] takes one sample index, got {shown(i)}; ds.batch(indices) reads several"
            )
        x, y = self._gather(self._index([i]))
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch in one gather; returned as per-sample pairs (views of the batch), which
        the DataLoader's default collate stacks back."""
        x, y = self._gather(self._index(indices))
        return list(zip(x.unbind(0), y.unbind(0), strict=True))

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as two stacked tensors (x (B, *sample_shape), y (B,)), one gather."""
        return self._gather(self._index(indices))

    def __repr__(self) -> str:
        view = "per epoch" if self.view is None else str(self.view)
        return (
            f"ActivationDataset({self.num_samples} samples of {self.sample_shape}, view {view}, "
            f"epoch {self.epoch}, {type(self._source).__name__})"
        )


__all__ = ["ActivationDataset"]
