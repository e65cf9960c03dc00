"""Pictures of stored activations: one sample's channels as tiles, or its views side by side.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot,
so nothing is registered in pyplot's global figure list and nothing needs closing; the
caller owns the returned Figure (``fig.savefig(path)``; in Jupyter it displays as usual).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from store.errors import StoreInputError, check_bool, check_int, install_hint, shown
from store.reader import ActivationStore, check_opened

DEFAULT_CHANNELS = 64  # tiles of a one-view grid when channels=None
DEFAULT_COMPARE_CHANNELS = 8  # columns of a views-by-channels grid when channels=None
TILE_INCHES = 1.3
TITLE_CHAR_INCHES = 0.08  # width of a character of the title (10 pt DejaVu Sans, at most)
# drawn for values that are not finite (inf, NaN): absent from both automatic colour maps
NONFINITE_COLOUR = "magenta"


def require_matplotlib(what: str) -> None:
    """Raise ``ModuleNotFoundError`` naming the ``plot`` extra when matplotlib does not import;
    ``what`` says who needs it (``"store.show"``, ``"--hist"``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(
            f"{what} needs matplotlib: {install_hint('plot')}", name="matplotlib"
        ) from e


def _tiles(x: np.ndarray, path: str) -> np.ndarray:
    """A sample (C, H, W), (C, L) or (D,) as 2-D tiles (C, H, W), (C, 1, L) or (1, 1, D)."""
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim == 1:
        return x[None, None, :]
    raise StoreInputError(
        f"{path}: show draws samples of 1 to 3 dimensions, this store's are {x.shape}"
    )


def _channel_list(channels: Any, num: int, default: int) -> list[int]:
    """``show``'s channels: None, a count (the first N), or channel indices; checked."""
    if channels is None:
        return list(range(min(num, default)))
    if isinstance(channels, str):  # "12" drew channels 1 and 2
        raise StoreInputError(
            f"channels must be a count or a list of integers, got {shown(channels)}"
        )
    if getattr(channels, "ndim", None) == 0 or not hasattr(channels, "__iter__"):
        # one count: an int (a numpy or 0-d tensor one too; True is not 1, 2.5 was a TypeError)
        return list(range(min(check_int("channels", channels, 1), num)))
    # each an integer: [1.7] drew channel 1, [True] channel 1
    out = [check_int("channels entry", c) for c in channels]
    bad = [c for c in out if not 0 <= c < num]
    if not out or bad:
        raise StoreInputError(f"channels {bad or out} out of range [0, {num})")
    return out


def _colour_scale(values: np.ndarray) -> tuple[float, float, str]:
    """(vmin, vmax, cmap) from the finite values: symmetric and diverging around 0 when they
    have both signs."""
    ok = np.isfinite(values)
    if not ok.all():
        values = values[ok]
    if values.size == 0:  # nothing finite to scale by
        return 0.0, 1.0, "viridis"
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 < hi:
        m = max(-lo, hi)
        return -m, m, "RdBu_r"
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi, "viridis"


def show(
    s: ActivationStore,
    sample: int,
    view: int = 0,
    channels: int | Sequence[int] | None = None,
    compare_views: bool = False,
    cmap: str | None = None,
) -> Any:
    """A Figure of sample ``sample``'s activation maps.

    One view: channels as tiles in a near-square grid (the first ``DEFAULT_CHANNELS`` when
    ``channels`` is None; an int N means the first N, a sequence names channels). With
    ``compare_views`` the rows are the views and the columns the channels (the first
    ``DEFAULT_COMPARE_CHANNELS`` by default). All tiles share one colour scale, shown by a
    colorbar: diverging and centred on 0 when the values have both signs, scaled by the
    finite values. Values that are not finite (inf, NaN) are drawn in ``NONFINITE_COLOUR``, and
    a second title line counts them.
    """
    check_opened(s, "store.show")
    require_matplotlib("store.show")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

    if isinstance(sample, bool) or not isinstance(sample, int | np.integer):
        raise StoreInputError(f"sample must be an int, got {shown(sample)}")
    if not 0 <= sample < s.num_samples:
        raise StoreInputError(f"{s.path}: sample {sample} out of range [0, {s.num_samples})")
    compare_views = check_bool("compare_views", compare_views)
    # an unknown name was matplotlib's ValueError when drawing, or a KeyError where a value is
    # not finite
    if not (
        cmap is None or isinstance(cmap, Colormap) or (isinstance(cmap, str) and cmap in colormaps)
    ):
        raise StoreInputError(
            f"cmap {shown(cmap)} is not a matplotlib colormap (matplotlib.colormaps lists them)"
        )
    views = list(range(s.views)) if compare_views else [view]
    maps = np.stack(
        [_tiles(s.read(v, [int(sample)])[0].float().numpy(), s.path) for v in views]
    )  # (views, C, H, W) float32
    num_channels = maps.shape[1]
    chans = _channel_list(
        channels, num_channels, DEFAULT_COMPARE_CHANNELS if compare_views else DEFAULT_CHANNELS
    )
    maps = maps[:, chans]
    vmin, vmax, auto_cmap = _colour_scale(maps)
    bad = ~np.isfinite(maps)
    colours: Any = cmap or auto_cmap
    if bad.any():
        # inf and NaN pixels are masked and drawn in one colour that the title names
        base = colours if isinstance(colours, Colormap) else colormaps[colours]
        colours = base.with_extremes(bad=NONFINITE_COLOUR)
    if compare_views:
        nrows, ncols = len(views), len(chans)
    else:
        ncols = math.ceil(math.sqrt(len(chans)))
        nrows = math.ceil(len(chans) / ncols)
    label = int(s.labels[int(sample)])
    unit = s.meta.get("boundary_unit")
    where = f", after {unit}" if unit else ""
    which = f"views 0..{s.views - 1}" if compare_views else f"view {view}"
    title = (
        f"{os.path.basename(os.path.normpath(s.path))}: sample {sample} (label {label}), "
        f"{which}{where}; {len(chans)} of {num_channels} channels"
    )
    if bad.any():
        kinds = ", ".join(
            f"{n} {name}"
            for n, name in (
                (int(np.isposinf(maps).sum()), "+inf"),
                (int(np.isneginf(maps).sum()), "-inf"),
                (int(np.isnan(maps).sum()), "NaN"),
            )
            if n
        )
        n = int(bad.sum())
        title += f"\n{NONFINITE_COLOUR}: {n} value{'s' if n != 1 else ''} not finite ({kinds})"
    h, w = maps.shape[2:]
    tile_h = TILE_INCHES * (min(1.0, h / w) if h > 1 else 0.3)
    # wide enough for the title too (a few tiles would clip it): ~0.08 in a character
    longest = max(len(line) for line in title.splitlines())
    width = max(ncols * TILE_INCHES + 1.2, TITLE_CHAR_INCHES * longest + 0.3)
    extra = 0.2 * title.count("\n")  # inches for a second title line
    fig = Figure(figsize=(width, nrows * tile_h + 0.7 + extra), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    images: list[Any] = []  # one per drawn tile; _channel_list never returns an empty list
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if compare_views:
                v, k = r, c
            else:
                v, k = 0, r * ncols + c
                if k >= len(chans):
                    ax.set_axis_off()
                    continue
            images.append(
                ax.imshow(
                    np.ma.masked_invalid(maps[v, k]) if bad[v, k].any() else maps[v, k],
                    vmin=vmin,
                    vmax=vmax,
                    cmap=colours,
                    interpolation="nearest",
                    aspect="equal" if h > 1 else "auto",
                )
            )
            if not compare_views or r == 0:
                ax.set_title(f"ch {chans[k]}", fontsize="small")
            if compare_views and c == 0:
                ax.set_ylabel(f"view {views[r]}", fontsize="small")
    fig.colorbar(images[0], ax=axes.ravel().tolist(), shrink=0.9, pad=0.02)
    fig.suptitle(title, fontsize="medium")
    return fig


__all__ = [
    "DEFAULT_CHANNELS",
    "DEFAULT_COMPARE_CHANNELS",
    "require_matplotlib",
    "show",
]
