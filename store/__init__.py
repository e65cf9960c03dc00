"""The Zarr activation store: write frozen layers' outputs once, stream them back to train.

>>> import store
>>> with store.create(path, sample_shape=(84, 16, 16), num_samples=n, views=2) as w:
...     w.write(view=0, start=0, x=batch, labels=y)
>>> s = store.open(path)
>>> for x, y in store.StoreLoader(s, batch_size=50, seed=0): ...
>>> s.stats().mean, s.show(0).savefig("sample0.png"), s.verify(checkpoint).ok
"""

from store.diff import DiffReport
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
from store.loader import StoreLoader, resolve_device
from store.order import epoch_permutation, epoch_views, rank_part
from store.protocols import ActivationSink, ActivationSource
from store.reader import ActivationStore, open
from store.stats import ChannelStats
from store.tiers import DeviceCache, RamCache, TensorCache
from store.verify import VerifyReport
from store.writer import StoreWriter, create, finalize

__all__ = [
    "FORMAT_VERSION",
    "ActivationSink",
    "ActivationSource",
    "ActivationStore",
    "ChannelStats",
    "DeviceCache",
    "DiffReport",
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
    "epoch_permutation",
    "epoch_views",
    "finalize",
    "open",
    "rank_part",
    "resolve_device",
]
