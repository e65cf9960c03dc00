"""Differences between two stores of the same shape (e.g. a float16 store against a float32
one of the same data), streamed block by block with bounded memory.

Both stores are read in blocks of the larger of their two chunk sizes: every chunk is decoded
once when one chunk size divides the other (float16 and float32 stores' default chunks do),
at most twice otherwise. Per channel (the first axis of a sample):

- ``max_abs``  = max |a - b|
- ``mean_abs`` = mean |a - b|
- ``max_rel``  = max |a - b| / max(max |a|, max |b|), both maxima over that channel
- ``mean_rel`` = mean |a - b| / mean(|a| + |b|) * 2

The relative figures are scaled by the channel's magnitude rather than element by element,
so values near zero (float16 subnormals, exact zeros after a ReLU) do not turn rounding into
huge relative errors. Rounding a float32 store to float16 therefore gives ``max_rel`` of at
most 2**-11 (half a unit in the last place of the largest value), bfloat16 at most 2**-8.

Values that are not finite (inf, NaN) are equal when both stores hold the same kind there
(+inf, -inf or NaN); where they differ (one side finite, or another kind) they are counted per
channel (``nonfinite_differ``) and the store differs. The figures above are over the positions
where both values are finite; a channel with no such position shows n/a (``null`` in JSON),
since nothing was compared there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store.errors import StoreMismatchError, check_bool
from store.reader import ActivationStore, check_opened

TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True)
class DiffReport:
    """Per-channel differences of store ``b`` against store ``a``; arrays are (C,) float64."""

    a: str
    b: str
    shape: tuple[int, ...]  # (views, samples, *sample_shape)
    dtype_a: str
    dtype_b: str
    max_abs: np.ndarray
    mean_abs: np.ndarray
    max_rel: np.ndarray
    mean_rel: np.ndarray
    labels_equal: bool
    identical: bool  # every value and label equal
    # (C,) int64: values not finite in a, in b, and positions where a and b hold other
    # non-finite kinds or only one of them does; None: zeros
    nonfinite_a: np.ndarray | None = field(default=None)
    nonfinite_b: np.ndarray | None = field(default=None)
    nonfinite_differ: np.ndarray | None = field(default=None)
    # (C,) int64: positions finite in both, which the figures cover; None: the same in every
    # channel
    count: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("nonfinite_a", "nonfinite_b", "nonfinite_differ"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(len(self.max_abs), dtype=np.int64))
        if self.count is None:
            object.__setattr__(self, "count", np.ones(len(self.max_abs), dtype=np.int64))

    def _overall_mean(self, per_channel: np.ndarray) -> float | None:
        """A per-channel mean over all channels, each weighted by the positions it covers: a
        channel whose values are mostly not finite counts for few, one with none for nothing.
        None when no position is finite in both stores."""
        assert self.count is not None
        total = int(self.count.sum())
        return float((per_channel * self.count).sum() / total) if total else None

    def _per_channel(self, values: np.ndarray) -> list[float | None]:
        """``values`` as a list, None for a channel with no position finite in both stores
        (nothing was compared there, so 0 would claim an agreement)."""
        assert self.count is not None
        return [float(v) if k else None for v, k in zip(values, self.count, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Figures of a channel with no position finite in both stores are None (``null``)."""
        assert self.nonfinite_a is not None and self.nonfinite_b is not None
        assert self.nonfinite_differ is not None and self.count is not None
        compared = bool(self.count.any())
        return {
            "a": self.a,
            "b": self.b,
            "shape": list(self.shape),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "identical": self.identical,
            "labels_equal": self.labels_equal,
            "overall": {
                "max_abs": float(self.max_abs.max()) if compared else None,
                "mean_abs": self._overall_mean(self.mean_abs),
                "max_rel": float(self.max_rel.max()) if compared else None,
                "mean_rel": self._overall_mean(self.mean_rel),
            },
            "max_abs": self._per_channel(self.max_abs),
            "mean_abs": self._per_channel(self.mean_abs),
            "max_rel": self._per_channel(self.max_rel),
            "mean_rel": self._per_channel(self.mean_rel),
            "nonfinite_a": self.nonfinite_a.tolist(),
            "nonfinite_b": self.nonfinite_b.tolist(),
            "nonfinite_differ": self.nonfinite_differ.tolist(),
        }

    def format(self) -> str:
        assert self.nonfinite_a is not None and self.nonfinite_b is not None
        assert self.nonfinite_differ is not None
        d = self.to_dict()
        o = d["overall"]
        bad = bool(self.nonfinite_a.any() or self.nonfinite_b.any())
        lines = [
            f"a: {self.a} ({self.dtype_a})",
            f"b: {self.b} ({self.dtype_b})",
            f"shape (views, samples, *sample): {self.shape}; labels "
            + ("equal" if self.labels_equal else "DIFFER"),
        ]
        head = (
            f"{'channel':>7}  {'max abs':>10}  {'mean abs':>10}  {'max rel':>10}  {'mean rel':>10}"
        )
        if bad:
            lines.append(
                f"values not finite (inf, NaN): {int(self.nonfinite_a.sum())} in a, "
                f"{int(self.nonfinite_b.sum())} in b, {int(self.nonfinite_differ.sum())} "
                "where a and b differ; the figures are over the values finite in both"
            )
            head += f"  {'inf/NaN differ':>14}"
        lines.append(head)

        def differ(i: int | slice) -> str:
            assert self.nonfinite_differ is not None
            return f"  {int(np.sum(self.nonfinite_differ[i])):>14}" if bad else ""

        def cells(*values: float | None) -> str:
            return "  ".join(f"{'n/a' if v is None else format(v, '.3g'):>10}" for v in values)

        for c in range(len(self.max_abs)):
            lines.append(
                f"{c:>7}  "
                + cells(d["max_abs"][c], d["mean_abs"][c], d["max_rel"][c], d["mean_rel"][c])
                + differ(c)
            )
        lines.append(
            f"{'all':>7}  "
            + cells(o["max_abs"], o["mean_abs"], o["max_rel"], o["mean_rel"])
            + differ(slice(None))
        )
        lines.append("identical" if self.identical else "the stores differ")
        return "\n".join(lines)


def _float64(s: ActivationStore, view: int, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of ``view`` as (C, k) float64."""
    x = s.read(view, np.arange(start, stop)).float().numpy()  # (k, C, ...) float32
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)


def diff(a: ActivationStore, b: ActivationStore, progress: bool = False) -> DiffReport:
    """Compare ``b`` with ``a`` value by value; raises ``StoreMismatchError`` when the shapes
    differ."""
    from tqdm.auto import tqdm

    check_opened(a, "store.diff")
    check_opened(b, "store.diff")
    progress = check_bool("progress", progress)

    shape_a = (a.views, a.num_samples, *a.sample_shape)
    shape_b = (b.views, b.num_samples, *b.sample_shape)
    if shape_a != shape_b:
        raise StoreMismatchError(
            f"shapes differ: {a.path} has (views, samples, *sample) = {shape_a}, "
            f"{b.path} has {shape_b}"
        )
    c = a.sample_shape[0]
    max_abs = np.zeros(c)
    sum_abs = np.zeros(c)
    sum_mag = np.zeros(c)
    max_mag = np.zeros(c)
    count = np.zeros(c, dtype=np.int64)  # positions finite in both, per channel
    bad_a = np.zeros(c, dtype=np.int64)
    bad_b = np.zeros(c, dtype=np.int64)
    bad_differ = np.zeros(c, dtype=np.int64)
    block = max(a.chunk_samples, b.chunk_samples)
    n = a.num_samples
    total = a.views * -(-n // block)
    with tqdm(total=total, desc="diff", unit="block", disable=not progress, leave=False) as bar:
        for v in range(a.views):
            for start in range(0, n, block):
                stop = min(start + block, n)
                xa, xb = _float64(a, v, start, stop), _float64(b, v, start, stop)
                aa, ab = np.abs(xa), np.abs(xb)
                ma, mb = aa.max(axis=1), ab.max(axis=1)  # NaN or inf where some value is
                if not (np.isfinite(ma).all() and np.isfinite(mb).all()):
                    fa, fb = np.isfinite(xa), np.isfinite(xb)
                    both = fa & fb
                    same = (xa == xb) | (np.isnan(xa) & np.isnan(xb))  # inf == inf
                    bad_a += (~fa).sum(axis=1)
                    bad_b += (~fb).sum(axis=1)
                    bad_differ += (~both & ~same).sum(axis=1)
                    xa, xb = np.where(both, xa, 0.0), np.where(both, xb, 0.0)
                    aa, ab = np.abs(xa), np.abs(xb)
                    ma, mb = aa.max(axis=1), ab.max(axis=1)
                    count += both.sum(axis=1)
                else:
                    count += xa.shape[1]
                d = np.abs(xa - xb)
                np.maximum(max_abs, d.max(axis=1), out=max_abs)
                sum_abs += d.sum(axis=1)
                sum_mag += (aa + ab).sum(axis=1)
                np.maximum(max_mag, np.maximum(ma, mb), out=max_mag)
                bar.update(1)
    labels_equal = bool(np.array_equal(a.labels.numpy(), b.labels.numpy()))
    return DiffReport(
        a=a.path,
        b=b.path,
        shape=shape_a,
        dtype_a=a.dtype_name,
        dtype_b=b.dtype_name,
        max_abs=max_abs,
        mean_abs=sum_abs / np.maximum(count, 1),
        max_rel=max_abs / np.maximum(max_mag, TINY),
        mean_rel=2 * sum_abs / np.maximum(sum_mag, TINY),
        labels_equal=labels_equal,
        identical=labels_equal and not bool(max_abs.any()) and not bool(bad_differ.any()),
        nonfinite_a=bad_a,
        nonfinite_b=bad_b,
        nonfinite_differ=bad_differ,
        count=count,
    )


__all__ = ["DiffReport", "diff"]
