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

Values that are not finite (``inf`` or ``NaN``: a float16 cache where an activation passed
65504, a diverged model; the writer stores them as given) are counted per channel, ``+inf``,
``-inf`` and ``NaN`` apart, and left out of the mean, std, min, max and histogram, which are
over the finite values. A chunk whose per-channel min and max (computed anyway) are finite
holds none, so a store without them costs no extra pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store.errors import StoreInputError, check_bool, check_int
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
    # (C,) int64 counts of values that are not finite; None: zeros. mean, std, min and max
    # are over the finite values (NaN for a channel that has none)
    posinf: np.ndarray | None = None
    neginf: np.ndarray | None = None
    nan: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("posinf", "neginf", "nan"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(len(self.mean), dtype=np.int64))

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def nonfinite(self) -> np.ndarray:
        """(C,) int64: values per channel that are +inf, -inf or NaN."""
        assert self.posinf is not None and self.neginf is not None and self.nan is not None
        return self.posinf + self.neginf + self.nan

    @property
    def finite(self) -> np.ndarray:
        """(C,) int64: finite values per channel, those the mean, std, min and max cover."""
        return self.count - self.nonfinite

    def overall(self) -> dict[str, float]:
        """The statistics of all channels together (merged, not averaged), over the finite
        values."""
        if not self.nonfinite.any():
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
        # channels differ in their finite counts; those without finite values drop out
        k = self.finite
        has = k > 0
        total = int(k.sum())
        nan = float("nan")
        if total == 0:
            mean = std = lo = hi = nan
        else:
            kh, mh = k[has], self.mean[has]
            mean = float((kh * mh).sum() / total)
            m2 = float((kh * self.std[has] ** 2).sum() + (kh * (mh - mean) ** 2).sum())
            std = (m2 / total) ** 0.5
            lo, hi = float(self.min[has].min()), float(self.max[has].max())
        return {
            "mean": mean,
            "std": std,
            "min": lo,
            "max": hi,
            "zero_fraction": float(self.zero_fraction.mean()),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: per-channel lists plus the overall figures. Figures of a channel without
        finite values are null (strict JSON has no NaN)."""
        assert self.posinf is not None and self.neginf is not None and self.nan is not None

        def num(x: float) -> float | None:
            return x if np.isfinite(x) else None

        def nums(a: np.ndarray) -> list[float | None]:
            return [num(x) for x in a.tolist()]

        return {
            "path": self.path,
            "views": list(self.views),
            "dtype": self.dtype,
            "channels": self.channels,
            "count_per_channel": self.count,
            "overall": {k: num(v) for k, v in self.overall().items()},
            "nonfinite": {
                "total": int(self.nonfinite.sum()),
                "posinf": int(self.posinf.sum()),
                "neginf": int(self.neginf.sum()),
                "nan": int(self.nan.sum()),
            },
            "mean": nums(self.mean),
            "std": nums(self.std),
            "min": nums(self.min),
            "max": nums(self.max),
            "zero_fraction": self.zero_fraction.tolist(),
            "finite": self.finite.tolist(),
            "posinf": self.posinf.tolist(),
            "neginf": self.neginf.tolist(),
            "nan": self.nan.tolist(),
        }


class _Running:
    """Running per-channel counts, mean, M2, min, max and zero count (float64) of the finite
    values, and counts of the others."""

    def __init__(self, channels: int) -> None:
        self.total = 0  # values per channel, finite or not
        self.n = np.zeros(channels, dtype=np.int64)  # finite values per channel
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.zeros = np.zeros(channels, dtype=np.int64)
        self.posinf = np.zeros(channels, dtype=np.int64)
        self.neginf = np.zeros(channels, dtype=np.int64)
        self.nan = np.zeros(channels, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """Merge a block (channels, k) float64 into the totals."""
        k = x.shape[1]
        if k == 0:
            return
        self.total += k
        lo, hi = x.min(axis=1), x.max(axis=1)  # NaN when a NaN is there (no warning)
        self.zeros += (x == 0).sum(axis=1)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            self._update_nonfinite(x)
            return
        mean_b = x.mean(axis=1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(axis=1)
        self._merge(k, mean_b, m2_b)
        np.minimum(self.min, lo, out=self.min)
        np.maximum(self.max, hi, out=self.max)

    def _merge(self, k: np.ndarray | int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Chan et al.'s update with k (per channel) new values of mean ``mean_b``."""
        n = self.n + k
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * k / n)
        self.n = n

    def _update_nonfinite(self, x: np.ndarray) -> None:
        """The block holds +-inf or NaN: count them, merge the finite values per channel."""
        ok = np.isfinite(x)
        nan = np.isnan(x)
        self.nan += nan.sum(axis=1)
        self.posinf += (x == np.inf).sum(axis=1)
        self.neginf += (x == -np.inf).sum(axis=1)
        k = ok.sum(axis=1)  # (C,) finite values
        has = k > 0
        if not has.any():
            return
        xs = np.where(ok, x, 0.0)
        mean_b = xs.sum(axis=1) / np.maximum(k, 1)
        m2_b = (np.where(ok, x - mean_b[:, None], 0.0) ** 2).sum(axis=1)
        old = (self.n, self.mean, self.m2)
        with np.errstate(divide="ignore", invalid="ignore"):
            self._merge(k, mean_b, m2_b)
        # channels without finite values in this block keep their totals (0 / 0 above)
        self.n, self.mean, self.m2 = (
            np.where(has, new, prev)
            for new, prev in zip((self.n, self.mean, self.m2), old, strict=True)
        )
        np.minimum(self.min, np.where(ok, x, np.inf).min(axis=1), out=self.min)
        np.maximum(self.max, np.where(ok, x, -np.inf).max(axis=1), out=self.max)


def _views(s: ActivationStore, view: int | None) -> tuple[int, ...]:
    if view is None:
        return tuple(range(s.views))
    # a str failed comparing with 0, and True was taken as view 1
    view = check_int(f"{s.path}: view", view)
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
    when None), in one pass over the chunks. Values that are not finite are counted
    (``posinf``, ``neginf``, ``nan``) and left out of the mean, std, min and max."""
    check_opened(s, "store.stats")
    views = _views(s, view)
    progress = check_bool("progress", progress)
    run = _Running(s.sample_shape[0])
    for a in iter_chunks(s, views, progress, desc="stats"):
        run.update(_channels_first(a))
    none = run.n == 0  # channels without a finite value (or an empty store)
    if run.total == 0:
        none[:] = False  # an empty store keeps its zeros
    nan = np.nan
    return ChannelStats(
        path=s.path,
        views=views,
        count=run.total,
        mean=np.where(none, nan, run.mean),
        std=np.where(none, nan, np.sqrt(run.m2 / np.maximum(run.n, 1))),
        min=np.where(none, nan, run.min),
        max=np.where(none, nan, run.max),
        zero_fraction=run.zeros / max(run.total, 1),
        dtype=s.dtype_name,
        meta=dict(s.meta),
        posinf=run.posinf,
        neginf=run.neginf,
        nan=run.nan,
    )


def histogram(
    s: ActivationStore,
    bins: int = 100,
    value_range: tuple[float, float] | None = None,
    view: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(counts (bins,) int64, edges (bins + 1,)) of every stored finite value, streamed chunk
    by chunk (values that are not finite fall outside every bin). Without ``value_range`` the
    range is the store's finite min..max (a stats pass first)."""
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise StoreInputError(f"histogram: bins must be an int >= 1, got {bins!r}")
    views = _views(s, view)
    progress = check_bool("progress", progress)
    if value_range is None:
        o = stats(s, view, progress).overall()
        value_range = (o["min"], o["max"])
        if not (np.isfinite(value_range[0]) and np.isfinite(value_range[1])):
            value_range = (0.0, 1.0)  # no finite value: every bin empty
    lo, hi = value_range
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise StoreInputError(f"histogram: value_range must be finite, got {value_range}")
    if hi < lo:  # was replaced by (lo, lo + 1): counts of a range nobody asked for
        raise StoreInputError(f"histogram: value_range must be (low, high), got {value_range}")
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
    bad = st.nonfinite
    if bad.any():
        ax1.set_title(f"finite values; not shown: {_nonfinite_kinds(st)}", fontsize="small")
    else:
        ax1.set_title("all values")
    ch = np.arange(st.channels)
    ax2.vlines(ch, st.min, st.max, color="0.75", lw=4, label="min..max")
    ax2.errorbar(ch, st.mean, yerr=st.std, fmt="o", ms=3, lw=1, capsize=2, label="mean +- std")
    if bad.any():
        # channels holding inf or NaN: a red cross at the top of the panel
        ax2.plot(
            ch[bad > 0],
            np.ones(int((bad > 0).sum())),
            "x",
            color="tab:red",
            transform=ax2.get_xaxis_transform(),
            clip_on=False,
            label="has inf/NaN (left out)",
        )
    ax2.set_xlabel("channel")
    ax2.set_title("per channel")
    ax2.legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def _nonfinite_kinds(st: ChannelStats) -> str:
    """``1 +inf, 2 NaN``: the kinds of values that are not finite, those present only."""
    assert st.posinf is not None and st.neginf is not None and st.nan is not None
    return ", ".join(
        f"{int(a.sum())} {name}"
        for a, name in ((st.posinf, "+inf"), (st.neginf, "-inf"), (st.nan, "NaN"))
        if a.any()
    )


def _nonfinite_words(st: ChannelStats) -> str:
    """``3 values not finite (1 +inf, 1 -inf, 1 NaN)``."""
    n = int(st.nonfinite.sum())
    return f"{n} value{'s' if n != 1 else ''} not finite ({_nonfinite_kinds(st)})"


def format_stats(st: ChannelStats) -> str:
    """An aligned per-channel table with an overall row; with columns counting +inf, -inf and
    NaN when the store holds any (the other figures are then over the finite values)."""
    assert st.posinf is not None and st.neginf is not None and st.nan is not None
    o = st.overall()
    bad = bool(st.nonfinite.any())

    def g(x: float) -> str:
        return f"{x:>11.4g}" if np.isfinite(x) else f"{'n/a':>11}"

    head = f"{'channel':>7}  {'mean':>11}  {'std':>11}  {'min':>11}  {'max':>11}  {'zeros':>7}"
    w = max(5, len(str(st.count)))
    if bad:
        head += f"  {'+inf':>{w}}  {'-inf':>{w}}  {'NaN':>{w}}"
    lines = [
        f"{st.path}: {st.channels} channels, views {list(st.views)}, "
        f"{st.count} values per channel ({st.dtype})",
    ]
    if bad:
        lines.append(f"{_nonfinite_words(st)}; mean, std, min and max are over the finite values")
    lines.append(head)

    def counts(i: int | slice) -> str:
        assert st.posinf is not None and st.neginf is not None and st.nan is not None
        if not bad:
            return ""
        return "".join(f"  {int(np.sum(a[i])):>{w}}" for a in (st.posinf, st.neginf, st.nan))

    for c in range(st.channels):
        lines.append(
            f"{c:>7}  {g(st.mean[c])}  {g(st.std[c])}  {g(st.min[c])}  "
            f"{g(st.max[c])}  {st.zero_fraction[c]:>7.2%}" + counts(c)
        )
    lines.append(
        f"{'all':>7}  {g(o['mean'])}  {g(o['std'])}  {g(o['min'])}  "
        f"{g(o['max'])}  {o['zero_fraction']:>7.2%}" + counts(slice(None))
    )
    return "\n".join(lines)


__all__ = ["ChannelStats", "format_stats", "histogram", "plot_stats", "stats"]
