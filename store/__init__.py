"""The Zarr activation store: write frozen layers' outputs once, stream them back to train.

A library for any project's activations: it imports no model. ``protocols`` holds the two
contracts (``ActivationSource`` to read, ``ActivationSink`` to write); ``writer`` and ``reader``
are the on-disk tier, ``tiers`` the in-memory ones, ``sampling`` and ``loader`` the batches,
``tools`` the inspection functions re-exported here.

>>> import store
>>> with store.create(path, sample_shape=(84, 16, 16), num_samples=n, views=2) as w:
...     w.write(view=0, start=0, x=batch, labels=y)
>>> s = store.open(path)
>>> for x, y in store.StoreLoader(s, batch_size=50, seed=0): ...
>>> store.stats(s).mean, store.show(s, 0).savefig("sample0.png"), store.verify(s).ok
"""

from store.dataset import ActivationDataset
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
