"""The two contracts of a cache tier, apart from any implementation.

* ``ActivationSource`` (read side): what ``StoreLoader`` and a cache pass read from.
  ``ActivationStore``, ``RamCache`` and ``DeviceCache`` satisfy it.
* ``ActivationSink`` (write side): what a cache pass writes into, a context manager that
  finishes the tier on a clean exit and abandons it on an exception. ``StoreWriter``,
  ``RamCache`` and ``DeviceCache`` satisfy it.

Both are ``runtime_checkable``: ``isinstance(x, ActivationSource)`` checks that the members
exist (not their signatures).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ActivationSource(Protocol):
    """What a loader needs from a cache tier."""

    @property
    def num_samples(self) -> int: ...
    @property
    def views(self) -> int: ...
    @property
    def sample_shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def labels(self) -> torch.Tensor: ...

    def read(self, view: int, indices: Any) -> torch.Tensor:
        """Samples ``indices`` of ``view``, (len, *sample_shape) in the stored dtype."""
        ...

    def gather(self, views: np.ndarray, indices: np.ndarray, out: torch.Tensor) -> None:
        """Fill ``out`` (len, *sample_shape) with sample ``indices[k]`` of view ``views[k]``."""
        ...


@runtime_checkable
class ActivationSink(Protocol):
    """What a cache pass writes into: batches at any sample offset of any view."""

    def write(
        self,
        view: int,
        start: int,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Samples ``start .. start + len(x)`` of ``view``; x (B, *sample_shape), labels (B,)."""
        ...

    def flush(self) -> None:
        """Wait until everything written so far is stored; raise a deferred write failure."""
        ...

    def close(self) -> None:
        """Flush and finish the tier (a store is marked complete once every chunk is written)."""
        ...

    def abort(self) -> None:
        """Stop without finishing the tier; what is already stored stays."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``close()`` on a clean exit, ``abort()`` when an exception is leaving the block."""
        ...


__all__ = ["ActivationSink", "ActivationSource"]
