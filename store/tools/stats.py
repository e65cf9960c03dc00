"""Per-channel statistics of a store in one streaming pass with bounded memory.

The pass reads one chunk at a time (about 8 MiB stored by default), converts it to float64 and
reduces it to per-channel partial statistics (count, mean, M2 = sum of squared deviations,
min, max, zeros), which are merged into the running totals with the parallel update of Chan,
Golub and LeVeque (1979)::

    n = n_a + n_b,  d = mean_b - mean_a
    mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d**2 * n_a * n_b / n

so memory is one chunk plus O(channels), and the result does not suffer the cancellation of
the naive ``sum(x**2) - n * mean**2``. The channel axis is the first axis of a sample
(``(C, H, W)`` activations); ``std`` is the population standard deviation (numpy's default
``ddof=0``) over all reduced elements.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store.errors import StoreInputError
from store.reader import ActivationStore, as_tensor, check_opened
from store.tools.viz import require_matplotlib


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of a store's activations; every array is (C,) float64."""

    path: str
    views: tuple[int, ...]  # the views the statistics cover
    count: int  # elements per channel: views * samples * prod(sample_shape[1:])
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    zero_fraction: np.ndarray
    dtype: str = ""  # the stored dtype
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def overall(self) -> dict[str, float]:
        """The statistics of all channels together (merged, not averaged)."""
        n = self.count
        mean = float(self.mean.mean())
        m2 = float(((self.std**2) * n).sum() + (n * (self.mean - mean) ** 2).sum())
        return {
            "mean": mean,
            "std": (m2 / (n * self.channels)) ** 0.5,
            "min": float(self.min.min()),
            "max": float(self.max.max()),
            "zero_fraction": float(self.zero_fraction.mean()),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: per-channel lists plus the overall figures."""
        return {
            "path": self.path,
            "views": list(self.views),
            "dtype": self.dtype,
            "channels": self.channels,
            "count_per_channel": self.count,
            "overall": self.overall(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
            "zero_fraction": self.zero_fraction.tolist(),
        }


class _Running:
    """Running per-channel count, mean, M2, min, max and zero count (float64)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.zeros = np.zeros(channels, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """Merge a block (channels, k) float64 into the totals."""
        k = x.shape[1]
        if k == 0:
            return
        mean_b = x.mean(axis=1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(axis=1)
        n = self.n + k
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * k / n)
        self.n = n
        np.minimum(self.min, x.min(axis=1), out=self.min)
        np.maximum(self.max, x.max(axis=1), out=self.max)
        self.zeros += (x == 0).sum(axis=1)


def _views(s: ActivationStore, view: int | None) -> tuple[int, ...]:
    if view is None:
        return tuple(range(s.views))
    if not 0 <= view < s.views:
        raise StoreInputError(f"{s.path}: view {view} out of range [0, {s.views})")
    return (view,)


def iter_chunks(
    s: ActivationStore, views: Sequence[int], progress: bool = False, desc: str = "reading"
) -> Iterator[np.ndarray]:
    """Every chunk of ``views`` in order, (chunk_len, *sample_shape) numpy in the stored dtype
    (bfloat16 widened to float32), with a tqdm bar on stderr when ``progress``."""
    from tqdm.auto import tqdm

    total = len(views) * s.num_chunks
    with tqdm(total=total, desc=desc, unit="chunk", disable=not progress, leave=False) as bar:
        for v in views:
            for c in range(s.num_chunks):
                a = s.read_chunk(v, c)
                if s.dtype_name == "bfloat16":
                    a = as_tensor(a, s.layout).float().numpy()
                yield a
                bar.update(1)


def _channels_first(a: np.ndarray) -> np.ndarray:
    """(n, C, *rest) -> (C, n * prod(rest)) float64."""
    c = a.shape[1]
    return np.moveaxis(a, 1, 0).reshape(c, -1).astype(np.float64)


def stats(s: ActivationStore, view: int | None = None, progress: bool = False) -> ChannelStats:
    """Per-channel mean, std, min, max and fraction of exact zeros over ``view`` (all views
    when None), in one pass over the chunks."""
    check_opened(s, "store.stats")
    views = _views(s, view)
    run = _Running(s.sample_shape[0])
    for a in iter_chunks(s, views, progress, desc="stats"):
        run.update(_channels_first(a))
    return ChannelStats(
        path=s.path,
        views=views,
        count=run.n,
        mean=run.mean,
        std=np.sqrt(run.m2 / max(run.n, 1)),
        min=run.min,
        max=run.max,
        zero_fraction=run.zeros / max(run.n, 1),
        dtype=s.dtype_name,
        meta=dict(s.meta),
    )


def histogram(
    s: ActivationStore,
    bins: int = 100,
    value_range: tuple[float, float] | None = None,
    view: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(counts (bins,) int64, edges (bins + 1,)) of every stored value, streamed chunk by
    chunk. Without ``value_range`` the range is the store's min..max (a stats pass first)."""
    views = _views(s, view)
    if value_range is None:
        st = stats(s, view, progress)
        value_range = (float(st.min.min()), float(st.max.max()))
    lo, hi = value_range
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for a in iter_chunks(s, views, progress, desc="histogram"):
        counts += np.histogram(a.astype(np.float64, copy=False), bins=edges)[0]
    return counts, edges


def plot_stats(st: ChannelStats, counts: np.ndarray, edges: np.ndarray, title: str = "") -> Any:
    """A matplotlib Figure: the value histogram (log counts) and per-channel mean +- std with
    the min..max range. Made without pyplot, so no global figure state is touched."""
    require_matplotlib("plot_stats")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.4])
    centers = (edges[:-1] + edges[1:]) / 2
    ax1.bar(centers, counts, width=np.diff(edges), color="tab:blue", linewidth=0)
    ax1.set_yscale("log")
    ax1.set_xlabel("activation value")
    ax1.set_ylabel("count")
    ax1.set_title("all values")
    ch = np.arange(st.channels)
    ax2.vlines(ch, st.min, st.max, color="0.75", lw=4, label="min..max")
    ax2.errorbar(ch, st.mean, yerr=st.std, fmt="o", ms=3, lw=1, capsize=2, label="mean +- std")
    ax2.set_xlabel("channel")
    ax2.set_title("per channel")
    ax2.legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def format_stats(st: ChannelStats) -> str:
    """An aligned per-channel table with an overall row."""
    o = st.overall()
    head = f"{'channel':>7}  {'mean':>11}  {'std':>11}  {'min':>11}  {'max':>11}  {'zeros':>7}"
    lines = [
        f"{st.path}: {st.channels} channels, views {list(st.views)}, "
        f"{st.count} values per channel ({st.dtype})",
        head,
    ]
    for c in range(st.channels):
        lines.append(
            f"{c:>7}  {st.mean[c]:>11.4g}  {st.std[c]:>11.4g}  {st.min[c]:>11.4g}  "
            f"{st.max[c]:>11.4g}  {st.zero_fraction[c]:>7.2%}"
        )
    lines.append(
        f"{'all':>7}  {o['mean']:>11.4g}  {o['std']:>11.4g}  {o['min']:>11.4g}  "
        f"{o['max']:>11.4g}  {o['zero_fraction']:>7.2%}"
    )
    return "\n".join(lines)


__all__ = ["ChannelStats", "format_stats", "histogram", "plot_stats", "stats"]
