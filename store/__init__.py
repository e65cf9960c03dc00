"""The Zarr activation store: write frozen layers' outputs once, stream them back to train.

A library for any project's activations: it imports no model. ``protocols`` holds the two
contracts (``ActivationSource`` to read, ``ActivationSink`` to write); ``writer`` and ``reader``
are the on-disk tier, ``tiers`` the in-memory ones, ``sampling`` and ``loader`` the batches,
``tools`` the inspection functions re-exported here (``store.show`` draws a sample with
matplotlib, the ``plot`` extra).

>>> import torch
>>> import store
>>> n = 120  # samples of (84, 16, 16), two views each
>>> with store.create("acts.zarr", sample_shape=(84, 16, 16), num_samples=n, views=2) as w:
...     for view in range(2):  # the store is complete once every view is written
...         w.write(view=view, start=0, x=torch.randn(n, 84, 16, 16), labels=torch.arange(n) % 10)
>>> s = store.open("acts.zarr")
>>> [len(y) for x, y in store.StoreLoader(s, batch_size=50, seed=0)]
[50, 50, 20]
>>> store.stats(s).mean.shape, store.verify(s).ok
((84,), True)
"""

from typing import TYPE_CHECKING

from store.errors import (
    NotAStoreError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreFormatError,
    StoreIncompleteError,
    StoreInputError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriteError,
)

if TYPE_CHECKING:
    from store.dataset import ActivationDataset
    from store.layout import FORMAT_VERSION, StoreInfo, StoreLayout
    from store.loader import LoaderStats, StoreLoader, resolve_device
    from store.order import epoch_permutation, epoch_views, rank_part
    from store.protocols import ActivationSink, ActivationSource
    from store.reader import ActivationStore, open
    from store.tiers import DeviceCache, RamCache, TensorCache
    from store.tools.diff import DiffReport, diff
    from store.tools.stats import ChannelStats, stats
    from store.tools.verify import VerifyReport, verify
    from store.tools.viz import show
    from store.writer import StoreWriter, create, finalize
else:  # imported on first use (store._lazy): python -m store --help answers without torch
    from store._lazy import exports

    __getattr__, __dir__ = exports(
        __name__,
        {
            "store.dataset": ("ActivationDataset",),
            "store.layout": ("FORMAT_VERSION", "StoreInfo", "StoreLayout"),
            "store.loader": ("LoaderStats", "StoreLoader", "resolve_device"),
            "store.order": ("epoch_permutation", "epoch_views", "rank_part"),
            "store.protocols": ("ActivationSink", "ActivationSource"),
            "store.reader": ("ActivationStore", "open"),
            "store.tiers": ("DeviceCache", "RamCache", "TensorCache"),
            "store.tools.diff": ("DiffReport", "diff"),
            "store.tools.stats": ("ChannelStats", "stats"),
            "store.tools.verify": ("VerifyReport", "verify"),
            "store.tools.viz": ("show",),
            "store.writer": ("StoreWriter", "create", "finalize"),
        },
    )

__all__ = [
    "FORMAT_VERSION",
    "ActivationDataset",
    "ActivationSink",
    "ActivationSource",
    "ActivationStore",
    "ChannelStats",
    "DeviceCache",
    "DiffReport",
    "LoaderStats",
    "NotAStoreError",
    "RamCache",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreIncompleteError",
    "StoreInfo",
    "StoreInputError",
    "StoreLayout",
    "StoreLoader",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriteError",
    "StoreWriter",
    "TensorCache",
    "VerifyReport",
    "create",
    "diff",
    "epoch_permutation",
    "epoch_views",
    "finalize",
    "open",
    "rank_part",
    "resolve_device",
    "show",
    "stats",
    "verify",
]
