"""In-memory cache tiers: ``RamCache`` (host memory, optionally pinned) and ``DeviceCache``
(device memory). Both hold one tensor (views, samples, *sample_shape) in the stored dtype, are
filled from a store or from tensors, and are both an ``ActivationSink`` and an
``ActivationSource`` (``store.protocols``): a cache pass writes any tier, and a loader reads any
tier, through the same code as a store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch

from store.errors import StoreInputError, check_bool, check_int, shown
from store.layout import (
    DTYPES,
    MAX_SAMPLES,
    MAX_VIEWS,
    as_shape,
    batch_tensor,
    check_labels,
    check_write,
)
from store.reader import (
    ActivationStore,
    as_tensor,
    check_gather,
    check_opened,
    numpy_view,
    sample_indices,
)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without holding the host: a host tensor bound for a CUDA device is
    copied from pinned memory. CUDA may make a copy from pageable memory wait for the stream's
    queued work (its API synchronisation rules), which keeps the host from running ahead of
    the GPU: per batch, that is a bubble between steps. A device tensor bound for the host is
    copied before this returns."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    if device.type == "cpu" and t.device.type != "cpu":
        # blocking: the host may read the result at once, and a non_blocking copy to the host
        # returns before its data are there
        return t.to(device)
    return t.to(device, non_blocking=True)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; else a cpu or cuda device that is there.
    ``StoreInputError`` for a name torch does not know, another kind of device (the loader
    feeds the CPU or a CUDA device), or a CUDA device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's own refusal of the name: many lines
        raise StoreInputError(f"{device!r} is not a device: use cpu, cuda, cuda:N or auto") from e
    if dev.type not in ("cpu", "cuda"):
        raise StoreInputError(f"device {device!r}: batches go to cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StoreInputError(
                f"device {device!r}: CUDA is not available here (torch.cuda.is_available() is "
                "False); use cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StoreInputError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in {d for _, d in DTYPES.values()}:
            raise StoreInputError(f"dtype={dtype} is not one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise StoreInputError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[dtype][1]


def _checked_labels(data: torch.Tensor, labels: Any) -> torch.Tensor:
    """``labels`` of ``data``'s samples as int64 on the host, refused as a store refuses them
    (fractional labels were truncated, negative ones kept)."""
    if data.dim() < 3:  # TensorCache refuses the data itself
        return torch.as_tensor(labels).cpu()
    return torch.from_numpy(check_labels("", labels, int(data.shape[1])))


def _stacked(x: Any) -> torch.Tensor:
    """``from_tensors``' data as one tensor (views, N, ...): a tensor or array, or a non-empty
    sequence of per-view (N, ...) ones of one shape (else torch's TypeError or RuntimeError
    from its stack)."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return torch.as_tensor(x)
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise StoreInputError(
            f"x must be a tensor (views, N, ...) or a list of per-view tensors, got {type(x).__name__}"
        )
    parts = [torch.as_tensor(v) for v in x]
    if not parts:
        raise StoreInputError("x is an empty list: give at least one view")
    shapes = [tuple(p.shape) for p in parts]
    if len(set(shapes)) > 1:
        raise StoreInputError(f"x: the views' tensors differ in shape: {shapes}")
    return torch.stack(parts)


def _empty_shape(num_samples: Any, views: Any, sample_shape: Any) -> tuple[int, ...]:
    """(views, num_samples, *sample_shape) of an empty tier, checked as a store's layout (a
    str, a float or a negative count was torch's TypeError or RuntimeError)."""
    return (
        check_int("views", views, 1, MAX_VIEWS),
        check_int("num_samples", num_samples, 1, MAX_SAMPLES),
        *as_shape(sample_shape),
    )


class TensorCache:
    """Activations held in one tensor; the shared body of ``RamCache`` and ``DeviceCache``."""

    def __init__(
        self, data: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any] | None = None
    ) -> None:
        if data.dim() < 3:
            raise StoreInputError(
                f"data must be (views, samples, *sample_shape), got shape {tuple(data.shape)}"
            )
        # at least one view and one sample, as a store: an empty tier was taken, and its
        # loader failed later (no views: at the first batch)
        _empty_shape(data.shape[1], data.shape[0], data.shape[2:])
        if labels.shape != (data.shape[1],):
            raise StoreInputError(
                f"labels must have shape ({data.shape[1]},), got {tuple(labels.shape)}"
            )
        resolve_dtype(data.dtype)
        if meta is not None and not isinstance(meta, Mapping):  # dict([1]): a TypeError
            raise StoreInputError(f"field 'meta' must be a dict, got {shown(meta)}")
        self.data = data  # (V, N, *sample_shape) stored dtype
        self.labels = labels.to(torch.int64)  # (N,) on the host
        self.meta = dict(meta or {})

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def _alloc(
        cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool
    ) -> torch.Tensor:
        return torch.empty(
            shape, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu"
        )

    # ---- description ---------------------------------------------------------------------
    @property
    def views(self) -> int:
        return int(self.data.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.data.shape[1])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    # ---- writing (the ActivationSink protocol) ------------------------------------------
    def write(
        self,
        view: int,
        start: int,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        view, start, n = check_write(
            "", self.views, self.num_samples, self.sample_shape, view, start, x
        )
        lab = None if labels is None else torch.from_numpy(check_labels("", labels, n))
        xt = batch_tensor(x)
        self.data[view, start : start + n].copy_(xt.detach(), non_blocking=False)
        if lab is not None:
            self.labels[start : start + n] = lab

    #: ``write_rows`` works on every tensor tier
    supports_rows = True

    def write_rows(
        self,
        view: int,
        rows: Sequence[int] | np.ndarray | torch.Tensor,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Write sample ``rows[k]`` of ``view`` from ``x[k]``, in any order; a row given twice
        keeps its last sample. ``rows`` may be on this cache's device (no host synchronisation
        then, but they must be distinct and ``labels`` must be None: give them with host rows,
        or with ``write``)."""
        # no samples (x[:0]): the rows are checked below; a list has no shape, refused here
        none = x[:0] if hasattr(x, "shape") else x
        view, _, _ = check_write("", self.views, self.num_samples, self.sample_shape, view, 0, none)
        if not isinstance(rows, torch.Tensor):
            r = np.asarray(rows)
            # an empty list is float64 to numpy: no rows, as a store's writer takes it
            rows = r.astype(np.int64) if r.size == 0 and r.ndim == 1 else r
        rt = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows)
        if rt.dim() != 1 or rt.is_floating_point() or rt.dtype == torch.bool:
            raise StoreInputError("field 'rows' must be a 1-D tensor of integers")
        if rt.shape[0] != x.shape[0]:
            raise StoreInputError(f"{rt.shape[0]} rows for {x.shape[0]} samples")
        on_host = rt.device.type == "cpu"
        if on_host and rt.numel() and (int(rt.min()) < 0 or int(rt.max()) >= self.num_samples):
            raise StoreInputError(f"field 'rows': a sample outside [0, {self.num_samples})")
        lab = None
        if labels is not None:
            if not on_host:
                raise StoreInputError("labels with write_rows need the rows on the host")
            lab = torch.from_numpy(check_labels("", labels, int(rt.shape[0])))
        xt = batch_tensor(x).detach()
        if on_host and rt.numel() > 1:
            # a row given twice keeps its last sample, as a store does (index_copy_ on a GPU
            # keeps an undefined one); rows on the device must be distinct
            last, first_rev = np.unique(rt.numpy()[::-1], return_index=True)
            if len(last) < rt.shape[0]:
                keep = torch.from_numpy(rt.shape[0] - 1 - first_rev)
                rt, xt = rt[keep], xt[keep.to(xt.device)]
                lab = lab[keep] if lab is not None else None
        xt = to_device(xt, self.device).to(self.dtype)
        self.data[view].index_copy_(0, to_device(rt.to(torch.int64), self.device), xt)
        if lab is not None:
            self.labels[rt.to(torch.int64)] = lab

    def flush(self) -> None:
        """Nothing to do: ``write`` copies synchronously, nothing is written behind."""

    def close(self) -> None:
        """Nothing to do: the tensor is the whole tier, complete as soon as it is written."""

    def abort(self) -> None:
        """Nothing to do: there is no completion record to withhold."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- reading -------------------------------------------------------------------------

    def read(self, view: int, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Samples ``indices`` of ``view`` on this cache's device, (len, *sample_shape)."""
        idx = torch.from_numpy(sample_indices(indices, self.num_samples))
        view = check_int("view", view)
        if not 0 <= view < self.views:
            raise StoreInputError(f"view {view} out of range [0, {self.views})")
        return self.data[view].index_select(0, idx.to(self.device))

    def gather(self, views: np.ndarray, indices: np.ndarray, out: torch.Tensor) -> None:
        """Fill ``out`` (len, *sample_shape) with sample indices[k] of view views[k]."""
        check_gather("", self, views, indices, out)
        if self.device.type == "cpu":
            # numpy's take copies on the calling thread; torch would split a small copy
            # across its compute threads, which stalls when those are busy training.
            src = numpy_view(self.data)
            dst = numpy_view(out)
            if self.views == 1 or (views == views[:1]).all():  # one view (or none: empty)
                # mode="clip" on checked indices: mode="raise" with out= gathers into a
                # temporary buffer and copies it again
                np.take(
                    src[int(views[0]) if len(views) else 0], indices, axis=0, out=dst, mode="clip"
                )
            else:
                dst[...] = src[views, indices]
            return
        idx = to_device(torch.from_numpy(indices), self.device)
        if self.views == 1 or (views == views[:1]).all():  # one view (or none: empty)
            torch.index_select(self.data[int(views[0]) if len(views) else 0], 0, idx, out=out)
            return
        for v in np.unique(views):
            pos = to_device(torch.from_numpy(np.flatnonzero(views == v)), self.device)
            out[pos] = self.data[int(v)].index_select(0, idx[pos])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(views={self.views}, samples={self.num_samples}, "
            f"sample_shape={self.sample_shape}, dtype={self.dtype}, device={self.device})"
        )


def _fill_from_store(cache: TensorCache, s: ActivationStore) -> None:
    for v in range(s.views):
        for c in range(s.num_chunks):
            c0, c1 = s.layout.chunk_range(c)
            cache.data[v, c0:c1].copy_(as_tensor(s.read_chunk(v, c), s.layout))
    cache.labels.copy_(s.labels)


class RamCache(TensorCache):
    """The host-memory tier. ``pin=True`` pins it (only where CUDA is available) so copies to a
    GPU run at full speed."""

    @classmethod
    def empty(
        cls,
        num_samples: int,
        views: int,
        sample_shape: tuple[int, ...],
        dtype: str | torch.dtype = "float16",
        pin: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> RamCache:
        pin = check_bool("pin", pin) and torch.cuda.is_available()
        data = cls._alloc(
            _empty_shape(num_samples, views, sample_shape),
            resolve_dtype(dtype),
            torch.device("cpu"),
            pin,
        )
        return cls(data, torch.full((data.shape[1],), -1, dtype=torch.int64), meta)

    @classmethod
    def from_tensors(
        cls,
        x: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor,
        dtype: str | torch.dtype | None = None,
        pin: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> RamCache:
        """From (views, N, ...) or a list of per-view (N, ...) tensors."""
        pin = check_bool("pin", pin)
        data = _stacked(x)
        data = data.detach().to(
            "cpu", dtype=resolve_dtype(dtype) if dtype is not None else data.dtype
        )
        if pin and torch.cuda.is_available():
            data = data.pin_memory()
        return cls(data.contiguous(), _checked_labels(data, labels), meta)

    @classmethod
    def from_store(cls, s: ActivationStore, pin: bool = False) -> RamCache:
        check_opened(s, "RamCache.from_store")
        cache = cls.empty(
            s.num_samples, s.views, s.sample_shape, s.layout.dtype, pin=pin, meta=s.meta
        )
        _fill_from_store(cache, s)
        return cache


class DeviceCache(TensorCache):
    """The device-resident tier: activations live on the training device."""

    @classmethod
    def empty(
        cls,
        num_samples: int,
        views: int,
        sample_shape: tuple[int, ...],
        dtype: str | torch.dtype = "float16",
        device: str | torch.device = "cpu",
        meta: dict[str, Any] | None = None,
    ) -> DeviceCache:
        data = cls._alloc(
            _empty_shape(num_samples, views, sample_shape),
            resolve_dtype(dtype),
            resolve_device(device),
            False,
        )
        return cls(data, torch.full((data.shape[1],), -1, dtype=torch.int64), meta)

    @classmethod
    def from_tensors(
        cls,
        x: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        meta: dict[str, Any] | None = None,
    ) -> DeviceCache:
        data = _stacked(x)
        data = data.detach().to(
            resolve_device(device), dtype=resolve_dtype(dtype) if dtype is not None else data.dtype
        )
        return cls(data.contiguous(), _checked_labels(data, labels), meta)

    @classmethod
    def from_store(cls, s: ActivationStore, device: str | torch.device) -> DeviceCache:
        check_opened(s, "DeviceCache.from_store")
        cache = cls.empty(
            s.num_samples, s.views, s.sample_shape, s.layout.dtype, device=device, meta=s.meta
        )
        _fill_from_store(cache, s)
        return cache


__all__ = ["DeviceCache", "RamCache", "TensorCache", "resolve_device", "resolve_dtype"]
