"""Inspecting stores: inspect, stats, show, verify and diff, from Python and the command line
(N=117, chunk 8, 3 views; values encode their index, see tests/store_helpers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import store
import store.__main__ as store_cli
from store.__main__ import main as store_main
from tests.store_helpers import CHUNK, SHAPE, VIEWS, N, encoded, labels_for, write_store


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = encoded()
    x[:, :, 1] = torch.relu(x[:, :, 1])  # channel 1 is about half exact zeros
    return x, labels_for()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, data) -> dict[str, Path]:
    """One float32 raw store and a float16 zstd store of the same data."""
    root = tmp_path_factory.mktemp("stores")
    x, y = data
    write_store(root / "f32", x, y)
    write_store(root / "f16", x, y, dtype="float16", codec="zstd")
    return {"f32": root / "f32", "f16": root / "f16"}


def _per_channel(x: np.ndarray) -> np.ndarray:
    """(views, N, C, *rest) -> (C, views * N * prod(rest)) float64."""
    return np.moveaxis(x, 2, 0).reshape(x.shape[2], -1).astype(np.float64)


def _imread(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return np.asarray(imread(path))


# ---- stats ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "codec"), [("float32", None), ("bfloat16", "zstd")])
def test_stats_equal_numpy_over_the_whole_array(tmp_path, data, dtype, codec):
    x, y = data
    s = write_store(tmp_path / "s", x, y, dtype=dtype, codec=codec)
    ref = x.to(s.dtype).float().numpy()  # what the store holds
    for view, sel in ((None, ref), (1, ref[1:2])):
        st = store.stats(s, view=view)
        flat = _per_channel(sel)
        assert st.views == ((0, 1, 2) if view is None else (1,))
        assert st.count == flat.shape[1] == len(sel) * N * 5 * 4
        np.testing.assert_allclose(st.mean, flat.mean(1), rtol=1e-6)
        np.testing.assert_allclose(st.std, flat.std(1), rtol=1e-6)
        np.testing.assert_array_equal(st.min, flat.min(1))
        np.testing.assert_array_equal(st.max, flat.max(1))
        np.testing.assert_allclose(st.zero_fraction, (flat == 0).mean(1), rtol=1e-6)
    assert 0.4 < st.zero_fraction[1] < 0.6
    o = store.stats(s).overall()
    np.testing.assert_allclose(o["std"], ref.astype(np.float64).std(), rtol=1e-6)
    np.testing.assert_allclose(o["mean"], ref.astype(np.float64).mean(), rtol=1e-6)


def test_stats_refuses_a_view_that_is_not_an_integer(stores):
    """store.stats(s, view="1") failed with a TypeError comparing it with 0, and view=True
    read view 1; both are input errors, and a numpy integer is a view."""
    s = store.open(stores["f32"])
    for bad in ("1", True, 1.0):
        with pytest.raises(store.StoreInputError, match="view must be an integer"):
            store.stats(s, view=bad)
    st = store.stats(s, view=np.int64(2))
    assert st.views == (2,) and st.count == N * 5 * 4
    np.testing.assert_array_equal(st.max, store.stats(s, view=2).max)


def test_the_tools_refuse_a_flag_that_is_not_a_bool(stores):
    """progress="no" drew progress bars and show(compare_views="no") drew every view: a str
    is truthy. The flags are checked as the store's others are."""
    s = store.open(stores["f32"])
    calls = {
        "progress": (
            lambda: store.stats(s, progress="no"),
            lambda: store.verify(s, progress="False"),
            lambda: store.diff(s, s, progress=0),
            lambda: store.tools.stats.histogram(s, 4, (0.0, 1.0), progress=None),
        ),
        "compare_views": (lambda: store.show(s, 0, compare_views="no"),),
    }
    for flag, bad in calls.items():
        for call in bad:
            with pytest.raises(store.StoreInputError, match=f"{flag} must be True or False"):
                call()
    assert store.verify(s, progress=np.bool_(False)).ok
    assert store.stats(s, view=0, progress=False).count == N * 5 * 4


def test_stats_merge_is_stable_far_from_zero(tmp_path):
    # mean 1e6, std 1e-2: the naive sum of squares loses every digit in float64 here
    x = 1e6 + 1e-2 * torch.randn((1, 117, 2, 3, 3), generator=torch.Generator().manual_seed(1))
    s = write_store(tmp_path / "s", x, labels_for())
    ref = _per_channel(x.numpy())
    np.testing.assert_allclose(store.stats(s).std, ref.std(1), rtol=1e-4)


def test_a_bare_python_m_store_names_its_commands(capsys):
    with pytest.raises(SystemExit) as e:
        store_main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m store") and "required" not in err
    assert err.strip().endswith(
        "python -m store: error: give a command: inspect (what is in a store), stats "
        "(per-channel statistics), show (pictures of a sample), verify (every chunk's checksum) "
        "or diff (two stores)"
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspect", "c/run-1/boundary-3", "c/run-2/boundary-5"], "inspect reads one store, got 2"),
        (["verify", "A", "B", "--json"], "verify reads one store, got 2 paths: A, B"),
        (
            ["stats", "A", "B", "C", "--out", "s.json"],
            "stats reads one store, got 3 paths: A, B, C",
        ),
        (["diff", "A", "B", "C"], "diff reads two stores, got 3 paths: A, B, C"),
        (["inspect", "A", "B", "--jsn"], "unrecognized arguments: B --jsn"),
    ],
)
def test_a_glob_that_matched_several_stores_is_named_as_such(argv, needle, capsys):
    # `python -m store inspect runs/c/run-*/boundary-*` over a cache folder holding two runs'
    # stores said only 'unrecognized arguments: c/run-2/boundary-5'
    with pytest.raises(SystemExit) as e:
        store_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"python -m store: error: {needle}"), err


def test_every_argument_of_python_m_store_says_what_it_is():
    import argparse

    sub = next(
        a for a in store_cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    bare = {
        f"{name} {a.dest}"
        for name, p in sub.choices.items()
        for a in p._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    }
    assert bare == set()


def test_stats_command_writes_json_and_histogram(tmp_path, stores, capsys):
    out, hist = tmp_path / "stats.json", tmp_path / "hist.png"
    rc = store_main(
        ["stats", str(stores["f32"]), "--out", str(out), "--hist", str(hist), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "channel" in text and "zeros" in text and "all" in text
    d = json.loads(out.read_text())
    st = store.stats(store.open(stores["f32"]))
    assert d["channels"] == 3 and d["views"] == [0, 1, 2]
    np.testing.assert_allclose(d["mean"], st.mean)
    img = _imread(hist)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.var() > 0
    assert store_main(["stats", str(stores["f32"]), "--view", "3"]) == 2
    assert "view 3 out of range" in capsys.readouterr().err


def test_an_output_that_does_not_fit_on_the_disk_is_named_and_not_left_half_written(
    tmp_path, stores, capsys, monkeypatch
):
    """stats --out and --hist on a full disk said '[Errno 28] No space left on device' without
    the file, and left it half written (a JSON file cut short, a PNG missing its end)."""
    import errno

    from matplotlib.figure import Figure

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    out, hist = tmp_path / "stats.json", tmp_path / "hist.png"
    args = ["stats", str(stores["f32"]), "--no-progress", "--out", str(out)]
    monkeypatch.setattr(Path, "write_text", lambda self, text: full(self, text.encode()))
    assert store_main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: [Errno 28] No space left on device: '{out}'\n"
    assert not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: full(path, b"\x89PNG" * 9))
    assert store_main([*args, "--hist", str(hist)]) == 2
    assert capsys.readouterr().err.endswith(f"No space left on device: '{hist}'\n")
    assert json.loads(out.read_text())["channels"] == 3 and not hist.exists()
    # an output through a link (/dev/stdout is one) is not unlinked: the link and its file stay
    link = tmp_path / "link.json"
    link.symlink_to(out)
    monkeypatch.undo()
    monkeypatch.setattr(Path, "write_text", lambda self, text: full(self, text.encode()))
    assert store_main(["stats", str(stores["f32"]), "--no-progress", "--out", str(link)]) == 2
    assert capsys.readouterr().err.endswith(f"No space left on device: '{link}'\n")
    assert link.is_symlink() and out.is_file()


def _planted(x: torch.Tensor) -> torch.Tensor:
    """x with +inf, -inf and NaN planted at odd places: first and last (partial) chunks, a
    chunk's inner sample, two in one channel of one sample."""
    x = x.clone()
    x[0, 3, 1, 2, 1] = float("inf")
    x[1, 116, 0, 4, 3] = float("-inf")  # last sample, in the partial chunk
    x[2, 100, 1, 0, 3] = float("nan")
    x[2, 100, 1, 4, 0] = float("nan")
    x[0, 0, 2, 0, 0] = float("inf")  # first value of the store's first chunk
    return x


def test_stats_count_nonfinite_values_and_ignore_them(tmp_path, data, capsys):
    x, y = data
    x = _planted(x)
    s = write_store(tmp_path / "s", x, y)
    ref = _per_channel(x.numpy())  # (C, values)
    ok = np.isfinite(ref)
    st = store.stats(s)
    assert st.posinf.tolist() == [0, 1, 1]
    assert st.neginf.tolist() == [1, 0, 0]
    assert st.nan.tolist() == [0, 2, 0]
    assert st.finite.tolist() == ok.sum(1).tolist() == [st.count - 1, st.count - 3, st.count - 1]
    for c in range(3):
        fin = ref[c][ok[c]]
        np.testing.assert_allclose(st.mean[c], fin.mean(), rtol=1e-9)
        np.testing.assert_allclose(st.std[c], fin.std(), rtol=1e-9)
        assert st.min[c] == fin.min() and st.max[c] == fin.max()
    o = st.overall()
    fin = ref[ok]
    np.testing.assert_allclose([o["mean"], o["std"]], [fin.mean(), fin.std()], rtol=1e-9)
    assert (o["min"], o["max"]) == (fin.min(), fin.max())
    # the histogram covers the finite values only
    counts, edges = store.tools.stats.histogram(s, bins=7)
    assert counts.sum() == ok.sum() and (edges[0], edges[-1]) == (fin.min(), fin.max())

    out = tmp_path / "stats.json"
    hist = tmp_path / "hist.png"
    args = ["stats", str(s.path), "--out", str(out), "--hist", str(hist), "--no-progress"]
    assert store_main(args) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1] == (
        "5 values not finite (2 +inf, 1 -inf, 2 NaN); mean, std, min and max are over the "
        "finite values"
    )
    assert text[2].split() == [
        "channel",
        "mean",
        "std",
        "min",
        "max",
        "zeros",
        "+inf",
        "-inf",
        "NaN",
    ]
    assert text[3].split()[-3:] == ["0", "1", "0"] and text[6].split()[-3:] == ["2", "1", "2"]
    d = json.loads(out.read_text())  # strict JSON: no NaN
    assert d["nonfinite"] == {"total": 5, "posinf": 2, "neginf": 1, "nan": 2}
    assert d["nan"] == [0, 2, 0] and d["finite"] == st.finite.tolist()
    assert d["overall"]["min"] == fin.min()
    assert _imread(hist)[..., :3].var() > 0


def test_stats_of_a_channel_without_finite_values(tmp_path, capsys):
    x = torch.arange(13 * 2 * 3, dtype=torch.float32).reshape(1, 13, 2, 3)
    x[0, :, 1] = float("nan")  # channel 1: NaN only
    x[0, 5, 0, 2] = float("-inf")
    s = write_store(tmp_path / "s", x, labels_for(13), chunk=4)
    st = store.stats(s)
    assert st.nan.tolist() == [0, 39] and st.neginf.tolist() == [1, 0]
    ch0 = x[0, :, 0].numpy().astype(np.float64).ravel()
    ch0 = ch0[np.isfinite(ch0)]
    np.testing.assert_allclose(st.mean[0], ch0.mean(), rtol=1e-12)
    assert np.isnan(st.mean[1]) and np.isnan(st.min[1])
    assert st.overall()["max"] == ch0.max()
    assert store_main(["stats", str(s.path), "--no-progress"]) == 0
    row = capsys.readouterr().out.splitlines()[4].split()
    assert row == ["1", "n/a", "n/a", "n/a", "n/a", "0.00%", "0", "0", "39"]
    assert store.stats(s).to_dict()["mean"][1] is None


def test_histogram_counts_a_given_range_and_refuses_bad_ones(tmp_path):
    x = torch.arange(1 * 11 * 3, dtype=torch.float32).reshape(1, 11, 3) / 4  # 0.0 .. 8.0
    s = write_store(tmp_path / "s", x, labels_for(11), chunk=4)
    counts, edges = store.tools.stats.histogram(s, bins=3, value_range=(1.0, 4.0))
    ref = np.histogram(x.numpy().astype(np.float64), bins=3, range=(1.0, 4.0))
    assert counts.tolist() == ref[0].tolist() == [4, 4, 5] and edges.tolist() == [1, 2, 3, 4]
    # a reversed range was replaced by (low, low + 1); no bin at all gave empty counts
    for kw, err in (
        ({"value_range": (4.0, 1.0)}, "value_range must be (low, high), got (4.0, 1.0)"),
        ({"bins": 0}, "bins must be an int >= 1, got 0"),
        ({"bins": -3}, "bins must be an int >= 1, got -3"),
    ):
        with pytest.raises(store.StoreInputError) as e:
            store.tools.stats.histogram(s, **{"bins": 3, **kw})
        assert str(e.value) == f"histogram: {err}"


# ---- show -----------------------------------------------------------------------------------
def test_show_writes_a_png_of_the_expected_size(tmp_path, stores, capsys):
    png = tmp_path / "grid.png"
    assert (
        store_main(["show", str(stores["f32"]), "--sample", "5", "--view", "2", "-o", str(png)])
        == 0
    )
    fig = store.show(store.open(stores["f32"]), 5, view=2)
    w, h = (fig.get_size_inches() * 100).round().astype(int)
    img = _imread(png)
    assert img.shape[:2] == (h, w)
    assert img[..., :3].var() > 0
    capsys.readouterr()


def test_show_api_tiles_share_one_scale_and_compare_views(stores):
    s = store.open(stores["f32"])
    fig = store.show(s, 7, view=1, channels=2)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert len({im.get_clim() for im in images}) == 1  # one shared colour scale
    np.testing.assert_array_equal(images[0].get_array(), s.read(1, [7])[0, 0].numpy())
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    fig = store.show(s, 7, compare_views=True)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == VIEWS * SHAPE[0]  # rows = views, columns = channels
    # the encoded first element of each row is view * 10000 + 7
    assert [float(im.get_array()[0, 0]) for im in images[:: SHAPE[0]]] == [7, 10007, 20007]


def test_show_scales_colours_by_finite_values_and_marks_the_others(tmp_path, data):
    from matplotlib.colors import to_rgba

    x, y = data
    x = _planted(x)
    s = write_store(tmp_path / "s", x, y)
    fig = store.show(s, 100, compare_views=True)  # views 0..2 of sample 100: two NaN in view 2
    images = [ax.images[0] for ax in fig.axes if ax.images]
    maps = x[:, 100].numpy()  # (views, C, H, W)
    m = float(np.abs(maps[np.isfinite(maps)]).max())
    assert {im.get_clim() for im in images} == {(-m, m)}
    masks = [np.ma.getmaskarray(im.get_array()) for im in images]
    assert sum(int(k.sum()) for k in masks) == 2 and masks[2 * 3 + 1][0, 3]
    assert images[7].get_cmap().get_bad() == pytest.approx(to_rgba("magenta"))
    assert fig._suptitle.get_text().endswith("\nmagenta: 2 values not finite (2 NaN)")
    fig = store.show(s, 0, channels=[2])  # +inf alone in the tile: the rest sets the scale
    (im,) = [ax.images[0] for ax in fig.axes if ax.images]
    rest = x[0, 0, 2].numpy().ravel()[1:]
    assert im.get_clim() == (-float(np.abs(rest).max()), float(np.abs(rest).max()))
    assert fig._suptitle.get_text().endswith("\nmagenta: 1 value not finite (1 +inf)")
    fig.savefig(tmp_path / "x.png")


def test_show_refuses_a_cmap_that_is_no_colormap(tmp_path, data, stores):
    """An unknown cmap failed with matplotlib's ValueError when drawing, or with a KeyError
    where the sample holds a value that is not finite; a Colormap object is taken as a name."""
    from matplotlib import colormaps

    planted = write_store(tmp_path / "s", _planted(data[0]), data[1])
    for s, sample in ((store.open(stores["f32"]), 5), (planted, 0)):
        for bad in ("nope", 5, ["viridis"]):
            with pytest.raises(store.StoreInputError, match="is not a matplotlib colormap"):
                store.show(s, sample, cmap=bad)
        for good in ("magma", colormaps["magma"]):
            (im, *_) = [ax.images[0] for ax in store.show(s, sample, cmap=good).axes if ax.images]
            assert im.get_cmap().name.startswith("magma")


def test_show_title_fits_a_grid_of_few_tiles(tmp_path):
    x = torch.randn(1, 5, 1, 7, 9)  # one channel: a grid of one tile
    s = write_store(tmp_path / "boundary-004-of-a-long-run-name", x, labels_for(5), chunk=4)
    for fig in (store.show(s, 3), store.show(s, 3, compare_views=True)):
        fig.draw_without_rendering()
        box = fig._suptitle.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)


def test_show_errors(tmp_path, stores, capsys):
    p = str(stores["f32"])
    assert store_main(["show", p, "--sample", "117", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sample 117 out of range [0, 117)" in err
    assert err.count("\n") == 1
    assert (
        store_main(["show", p, "--sample", "0", "--view", "3", "-o", str(tmp_path / "x.png")]) == 2
    )
    assert "view 3 out of range" in capsys.readouterr().err
    with pytest.raises(store.StoreInputError, match="channels"):
        store.show(store.open(p), 0, channels=[0, 5])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("channels", ["12", [1.7], [True, False], 2.5, True, np.array([1.5])])
def test_show_refuses_channels_that_are_no_integers(stores, channels):
    # "12" drew channels 1 and 2, [1.7] channel 1, [True, False] channels 1 and 0, True one
    # channel; 2.5 was a TypeError
    with pytest.raises(store.StoreInputError, match="channels"):
        store.show(store.open(stores["f32"]), 0, channels=channels)


def test_show_takes_channels_as_integers_of_any_kind(stores):
    s = store.open(stores["f32"])
    for channels, want in [
        (torch.tensor(2), ["ch 0", "ch 1"]),
        (np.int64(1), ["ch 0"]),
        (torch.tensor([2, 0]), ["ch 2", "ch 0"]),
        (np.array([1]), ["ch 1"]),
        (range(1, 3), ["ch 1", "ch 2"]),
    ]:
        fig = store.show(s, 0, channels=channels)
        assert [a.get_title() for a in fig.axes if a.get_title()] == want


# ---- verify (chunks) --------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [None, "zstd"])
def test_verify_names_a_corrupted_chunk(tmp_path, data, capsys, codec):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y, codec=codec)
    assert store_main(["verify", str(path), "--no-progress"]) == 0
    assert "45 read, every checksum matches" in capsys.readouterr().out
    chunk = path / "activations" / "c" / "1" / "4" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert "BAD" in cap.out and str(chunk) in cap.out
    assert "error: corrupt chunk " + str(chunk) in cap.err
    r = store.verify(store.open(path))
    assert not r.ok and r.chunks_read == VIEWS * 15
    assert [(p.view, p.chunk, p.samples) for p in r.bad_chunks] == [(1, 4, (32, 40))]


@pytest.mark.parametrize(("dtype", "codec"), [("float16", None), ("bfloat16", "zstd")])
def test_verify_counts_values_that_are_not_finite(tmp_path, data, capsys, dtype, codec):
    x, y = data
    path = tmp_path / "s"
    write_store(path, _planted(x), y, dtype=dtype, codec=codec)
    r = store.verify(store.open(path))
    assert r.ok and (r.inf, r.nan, r.nonfinite_chunks) == (3, 2, 3)
    assert store_main(["verify", str(path), "--no-progress"]) == 0  # not a failure
    assert capsys.readouterr().out.splitlines()[3] == (
        "values      5 not finite (3 inf, 2 NaN) in 3 chunk(s); 'python -m store stats' "
        "counts them per channel"
    )
    assert store_main(["verify", str(path), "--no-progress", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["inf"], d["nan"], d["nonfinite_chunks"]) == (3, 2, 3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_count_nonfinite_reads_the_bits_of_every_dtype(dtype):
    from store.layout import count_nonfinite

    big = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38}[dtype]
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, 1.5, big, -big, 1e-40, -1e-40], dtype=getattr(torch, dtype))
    bits = x.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else x.numpy()
    assert count_nonfinite(bits, dtype) == (0, 0)
    y = torch.tensor([inf, -inf, nan, -nan, 1.0, -inf, 3.0], dtype=getattr(torch, dtype))
    for k in range(len(y)):  # each alone, then all
        one = y[k : k + 1]
        b = one.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else one.numpy()
        want = (int(torch.isinf(one).sum()), int(torch.isnan(one).sum()))
        assert count_nonfinite(b, dtype) == want
    b = y.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else y.numpy()
    assert count_nonfinite(b.reshape(7, 1), dtype) == (3, 2)


def test_verify_lists_the_chunks_an_incomplete_store_never_wrote(tmp_path, data, capsys):
    x, y = data
    path = tmp_path / "part"
    w = store.create(path, sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK)
    w.write(0, 0, x[0, : 2 * CHUNK], y[: 2 * CHUNK])  # two whole chunks, then killed
    w.abort()
    assert store_main(["verify", str(path), "--no-progress", "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert not r["ok"] and r["missing"] == [[0, 2 * CHUNK, N]]


def test_verify_says_how_many_missing_ranges_it_does_not_list(tmp_path, capsys):
    # the text and the error named the first 6 ranges and nothing of the others
    x = encoded(num_samples=21, views=9, shape=(2, 3))
    w = store.create(tmp_path / "part", sample_shape=(2, 3), num_samples=21, views=9,
                     chunk_samples=5, dtype="float32")  # fmt: skip
    for v in range(9):
        w.write(v, 0, x[v, :5], labels_for(21)[:5])  # the first chunk of every view, then killed
    w.abort()
    assert store_main(["verify", str(tmp_path / "part"), "--no-progress"]) == 1
    cap = capsys.readouterr()
    shown = "(view, start, stop) [" + ", ".join(f"({v}, 5, 21)" for v in range(6)) + "]"
    assert f"missing     {shown} and 3 more\n" in cap.out
    assert f"chunks were never written, {shown} and 3 more\n" in cap.err


def test_verify_says_how_many_bad_label_chunks_it_does_not_list(tmp_path, capsys):
    # the chunks are listed up to 20 and then '... N more'; the labels' list just ended
    path = tmp_path / "s"
    write_store(path, encoded(num_samples=23, views=1, shape=(2,)), labels_for(23), chunk=1)
    for c in range(23):
        f = path / "labels" / "c" / str(c)
        f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:])
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "labels      23 chunk(s) BAD:" in out and out.count("labels/c/") == 20
    assert "labels/c/19: labels' checksum differs" in out and "\n              ... 3 more\n" in out


def test_plots_without_matplotlib_fail_at_the_start_naming_the_extra(
    tmp_path, stores, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    p = str(stores["f32"])
    hist, png = tmp_path / "h.png", tmp_path / "x.png"
    for argv, what in (
        (["stats", p, "--hist", str(hist), "--no-progress"], "--hist"),
        (["show", p, "--sample", "0", "-o", str(png)], "show"),
    ):
        assert store_main(argv) == 2
        cap = capsys.readouterr()
        assert cap.out == ""  # failed before the stats pass, nothing printed
        assert cap.err == (
            f"error: {what} needs matplotlib: pip install 'prefast[plot]' "
            "(from a checkout: pip install -e '.[plot]')\n"
        )
    assert not hist.exists() and not png.exists()
    with pytest.raises(ModuleNotFoundError, match=r"store\.show needs matplotlib: pip install"):
        store.show(store.open(p), 0)
    assert store_main(["stats", p, "--no-progress"]) == 0  # no plot asked for: no matplotlib


def test_show_to_a_file_type_it_cannot_write_is_one_line(tmp_path, data, capsys):
    x, y = data
    write_store(tmp_path / "s", x, y)
    out = tmp_path / "sample.txt"
    assert store_main(["show", str(tmp_path / "s"), "--sample", "0", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {out}: ") and err.count("\n") == 1, err


def test_show_and_hist_say_the_file_they_wrote_and_refuse_a_folder(
    tmp_path, stores, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    p = str(stores["f32"])
    assert store_main(["show", p, "--sample", "0", "-o", "sample_noext"]) == 0
    assert capsys.readouterr().out == "wrote sample_noext.png\n"
    assert (tmp_path / "sample_noext.png").is_file()
    (tmp_path / "runs").mkdir()
    for argv, err in (
        (["show", p, "--sample", "3", "-o", "runs"], "-o runs: a folder; name the file, e.g. -o "),
        (["stats", p, "--hist", "runs", "--no-progress"], "--hist runs: a folder; name the file"),
        (["stats", p, "--out", "runs", "--no-progress"], "--out runs: a folder; name the file"),
        # a file in a folder that does not exist: refused before the pass, not after it
        (["stats", p, "--out", "no/s.json"], "--out no/s.json: no is not an existing folder"),
        (["stats", p, "--hist", "no/h"], "--hist no/h: no is not an existing folder"),
        (["show", p, "--sample", "3", "-o", "no/x.png"], "-o no/x.png: no is not an existing"),
    ):
        assert store_main(argv) == 2
        cap = capsys.readouterr()
        assert cap.out == ""  # refused before the stats pass
        assert cap.err.startswith(f"error: {err}") and cap.err.count("\n") == 1, cap.err
    # a folder or a file this user may not write (as root the mode bits would not stop it)
    (tmp_path / "locked").mkdir()
    (tmp_path / "old.json").write_text("{}")
    access = os.access
    refused = {tmp_path / "locked", tmp_path / "old.json"}
    monkeypatch.setattr(
        os, "access", lambda f, m: Path(f).absolute() not in refused and access(f, m)
    )
    for argv, err in (
        (["stats", p, "--out", "locked/s.json"], "--out locked/s.json: locked may not be written"),
        (["stats", p, "--out", "old.json"], "--out old.json: old.json may not be written"),
        (["show", p, "--sample", "3", "-o", "locked/x.png"], "-o locked/x.png: locked may not"),
    ):
        assert store_main(argv) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and cap.err.startswith(f"error: {err}"), cap.err
    # on a read-only file system (a mount of data, a container's image) it says so, not
    # 'permission denied'
    statvfs = os.statvfs
    ro = os.statvfs_result((4096,) * 8 + (os.ST_RDONLY, 255))
    monkeypatch.setattr(
        os, "statvfs", lambda f: ro if Path(f).absolute() in refused else statvfs(f)
    )
    assert store_main(["stats", p, "--out", "locked/s.json"]) == 2
    assert capsys.readouterr().err == (
        "error: --out locked/s.json: locked may not be written (a read-only file system; name a "
        "file elsewhere)\n"
    )
    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(os, "access", access)
    assert store_main(["show", p, "--sample", "3", "-o", "new/"]) == 2  # names a folder too
    assert "e.g. -o new/sample3.png" in capsys.readouterr().err
    assert not (tmp_path / "runs.png").exists() and not any((tmp_path / "runs").iterdir())


def test_a_figure_name_whose_png_is_a_folder_is_refused_before_any_work(
    tmp_path, stores, capsys, monkeypatch
):
    # -o out, where out.png is a folder, failed only when saving, after the pass over the store
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(
        "store.tools.inspect.open_complete", lambda p: pytest.fail("the store was opened")
    )
    (tmp_path / "out.png").mkdir()
    out = tmp_path / "out"
    for args, flag, example in (
        (["show", str(stores["f32"]), "--sample", "3", "-o"], "-o", "sample3.png"),
        (["stats", str(stores["f32"]), "--hist"], "--hist", "hist.png"),
    ):
        assert store_main([*args, str(out)]) == 2
        cap = capsys.readouterr()
        assert cap.out == ""
        assert cap.err == (
            f"error: {flag} {out}.png: a folder; name the file, e.g. {flag} {out}.png/{example}\n"
        )
    assert list((tmp_path / "out.png").iterdir()) == []


def test_an_empty_output_name_is_refused_before_any_work(tmp_path, stores, capsys, monkeypatch):
    # stats --out "" (an unset variable) wrote no JSON and exited 0
    monkeypatch.setattr(
        "store.tools.inspect.open_complete", lambda p: pytest.fail("the store was opened")
    )
    monkeypatch.chdir(tmp_path)
    p = str(stores["f32"])
    for args, err in (
        (["stats", p, "--out", ""], "--out: an empty file name; name the file, e.g. stats.json"),
        (["stats", p, "--hist", ""], "--hist: an empty file name; name the file, e.g. hist.png"),
        (["show", p, "--sample", "0", "-o", ""], "-o: an empty file name; name the file, e.g. "),
    ):
        assert store_main(args) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and cap.err.startswith(f"error: {err}"), cap.err
    assert list(tmp_path.iterdir()) == []


def test_verify_reports_a_truncated_chunk(tmp_path, data):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    chunk = path / "activations" / "c" / "0" / "14" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    r = store.verify(store.open(path))
    assert [(p.view, p.chunk) for p in r.bad_chunks] == [(0, 14)]
    assert "expected" in r.bad_chunks[0].reason and "14" in r.errors[0]


# ---- diff -----------------------------------------------------------------------------------
def test_diff_float16_against_float32(stores, capsys):
    a, b = store.open(stores["f32"]), store.open(stores["f16"])
    r = store.diff(a, b)
    assert r.shape == (VIEWS, N, *SHAPE) and r.labels_equal and not r.identical
    assert (r.max_rel <= 2**-11).all() and (r.max_rel > 2**-14).all()
    ref = np.abs(_per_channel(store_data(a)) - _per_channel(store_data(b)))
    np.testing.assert_allclose(r.max_abs, ref.max(1))
    np.testing.assert_allclose(r.mean_abs, ref.mean(1), rtol=1e-9)
    assert store_main(["diff", str(stores["f32"]), str(stores["f16"]), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "float16" in out and "max rel" in out and "the stores differ" in out
    assert store_main(["diff", str(stores["f32"]), str(stores["f32"]), "--no-progress"]) == 0
    assert "identical" in capsys.readouterr().out


def test_diff_matches_values_that_are_not_finite_by_kind(tmp_path, data, capsys):
    x, y = data
    xa = _planted(x)
    xb = xa.clone()
    xb[0, 3, 1, 2, 1] = float("nan")  # +inf in a: another kind
    xb[2, 100, 1, 0, 3] = 0.5  # NaN in a: finite in b
    xb[1, 7, 2, 0, 2] = float("-inf")  # finite in a
    xb[0, 9, 0, 1, 1] += 0.25  # a finite difference
    a = write_store(tmp_path / "a", xa, y)
    b = write_store(tmp_path / "b", xb, y)
    assert store.diff(a, a).identical  # NaN and inf in the same places, the same kinds
    r = store.diff(a, b)
    assert not r.identical
    assert r.nonfinite_a.tolist() == [1, 3, 1] and r.nonfinite_b.tolist() == [1, 2, 2]
    assert r.nonfinite_differ.tolist() == [0, 2, 1]
    ref_a, ref_b = _per_channel(xa.numpy()), _per_channel(xb.numpy())
    both = np.isfinite(ref_a) & np.isfinite(ref_b)
    d = [np.abs(ref_a[c][both[c]] - ref_b[c][both[c]]) for c in range(3)]
    np.testing.assert_allclose(r.max_abs, [0.25, 0, 0])
    np.testing.assert_allclose(r.mean_abs, [k.mean() for k in d], rtol=1e-12)
    assert store_main(["diff", str(a.path), str(b.path), "--no-progress", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["nonfinite_differ"] == [0, 2, 1]
    assert store_main(["diff", str(a.path), str(b.path), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[3] == (
        "values not finite (inf, NaN): 5 in a, 5 in b, 3 where a and b differ; the figures "
        "are over the values finite in both"
    )
    assert lines[-2].split()[-1] == "3" and lines[-1] == "the stores differ"


def test_diff_all_row_weighs_channels_by_the_values_finite_in_both(tmp_path, data, capsys):
    # channel 2 NaN in both stores: no value to compare, so the all row is channel 0's and 1's
    x, y = data
    xa = x.clone()
    xa[:, :, 2] = float("nan")
    xb = xa.clone()
    xb[:, :, 0] += 0.5
    a = write_store(tmp_path / "a", xa, y)
    b = write_store(tmp_path / "b", xb, y)
    r = store.diff(a, b)
    np.testing.assert_allclose(r.mean_abs, [0.5, 0, 0], rtol=1e-6)
    o = r.to_dict()["overall"]
    np.testing.assert_allclose(o["mean_abs"], 0.25, rtol=1e-6)  # not (0.5 + 0 + 0) / 3
    np.testing.assert_allclose(o["mean_rel"], (r.mean_rel[0] + r.mean_rel[1]) / 2, rtol=1e-9)
    assert r.to_dict()["max_abs"][1:] == [0.0, None]  # channel 2: nothing compared
    assert store_main(["diff", str(a.path), str(b.path), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[:3] == ["all", "0.5", "0.25"]
    assert lines[-3].split()[:5] == ["2", "n/a", "n/a", "n/a", "n/a"]
    assert store_main(["diff", str(a.path), str(b.path), "--no-progress", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["mean_rel"][2] is None


def test_diff_with_no_value_finite_in_both_stores_says_n_a(tmp_path, data, capsys):
    x, y = data
    xa = torch.full_like(x, float("nan"))
    a = write_store(tmp_path / "a", xa, y)
    b = write_store(tmp_path / "b", torch.zeros_like(x), y)
    o = store.diff(a, b).to_dict()["overall"]
    assert o == {"max_abs": None, "mean_abs": None, "max_rel": None, "mean_rel": None}
    assert store_main(["diff", str(a.path), str(b.path), "--no-progress"]) == 1
    assert capsys.readouterr().out.splitlines()[-2].split()[:5] == ["all"] + ["n/a"] * 4


def store_data(s: store.ActivationStore) -> np.ndarray:
    return np.stack([s.read(v, np.arange(N)).float().numpy() for v in range(s.views)])


def test_diff_refuses_other_shapes(tmp_path, data, stores, capsys):
    x, y = data
    write_store(tmp_path / "two", x[:2], y)
    assert store_main(["diff", str(stores["f32"]), str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "error: shapes differ" in err and "(3, 117, 3, 5, 4)" in err


# ---- errors shared by the commands ----------------------------------------------------------
def test_missing_and_incomplete_stores(tmp_path, data, capsys):
    x, y = data
    missing = str(tmp_path / "missing")
    for argv in (
        ["stats", missing],
        ["show", missing, "--sample", "0", "-o", str(tmp_path / "x.png")],
        ["verify", missing],
        ["diff", missing, missing],
        ["inspect", missing],
    ):
        assert store_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no such file" in err and err.count("\n") == 1
    w = store.create(tmp_path / "part", sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK)
    w.write(0, 0, x[0, :16], y[:16])
    w.abort()
    part = str(tmp_path / "part")
    assert store_main(["stats", part]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert store_main(["inspect", part]) == 1
    assert "NO - missing (view, start, stop): [[0, 16, 117]" in capsys.readouterr().out
    r = store.verify(store.open(part, partial=True))
    assert not r.ok and r.missing[0] == (0, 16, 117) and r.chunks_read == 2


def test_inspect_ratio_of_an_incomplete_store_counts_only_written_chunks(tmp_path, data):
    from store.tools.inspect import summary

    x, y = data
    w = store.create(tmp_path / "part", sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK)
    w.write(0, 0, x[0, :16], y[:16])  # 2 of 15 chunks of an uncompressed store, then killed
    w.abort()
    assert summary(store.open(tmp_path / "part", partial=True))["ratio"] == 1.0
    # rows written into 6 chunks' files, 1 chunk complete (a write-through run killed): the
    # other files held no written chunk and showed 0.16x
    w = store.create(tmp_path / "rows", sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK)
    rows = np.array([*range(8), 9, 17, 25, 33, 41])
    w.write_rows(0, rows, x[0, rows].numpy(), y[rows].numpy())
    w.abort()
    s = store.open(tmp_path / "rows", partial=True)
    assert [s.chunk_written(0, c) for c in range(6)] == [True] + [False] * 5
    assert summary(s)["ratio"] == 1.0
    w = store.create(tmp_path / "lz4", sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK,
                     codec="lz4")  # fmt: skip
    w.write(0, 0, torch.zeros(24, *SHAPE), y[:24])  # 3 chunks of zeros: compressed well
    w.abort()
    s = store.open(tmp_path / "lz4", partial=True)
    files = sorted((tmp_path / "lz4" / "activations" / "c" / "0").iterdir())
    assert [f.name for f in files] == ["0", "1", "2"]
    stored = sum(f.joinpath("0", "0", "0").stat().st_size for f in files)
    assert summary(s)["ratio"] == 24 * s.layout.sample_bytes / stored > 2
    w = store.create(tmp_path / "none", sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK)
    w.abort()  # nothing written: no ratio
    assert summary(store.open(tmp_path / "none", partial=True))["ratio"] is None


def test_an_incomplete_store_gets_command_line_advice(tmp_path, data, stores, capsys):
    x, y = data
    part = tmp_path / "part"
    w = store.create(part, sample_shape=SHAPE, num_samples=N, chunk_samples=CHUNK)
    w.write(0, 0, x[0, :16], y[:16])  # 2 of 15 chunks, then killed
    w.abort()
    for argv in (
        ["stats", str(part), "--no-progress"],
        ["show", str(part), "--sample", "0", "-o", str(tmp_path / "x.png")],
        ["diff", str(stores["f32"]), str(part), "--no-progress"],
    ):
        assert store_main(argv) == 2
        assert capsys.readouterr().err == (
            f"error: {part}: the store is incomplete (its writer did not finish): 13 of 15 "
            f"chunks missing; 'python -m store inspect {part}' lists them, "
            f"'python -m store verify {part}' checks the chunks that were written\n"
        )
    # prefast verify says the same (it opens the store before reading the checkpoint)
    from prefast.cli import main as prefast_main

    assert prefast_main(["verify", str(part), "--checkpoint", str(tmp_path / "ck.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefast: error: {part}: the store is incomplete") and "13 of 15" in err
    with pytest.raises(store.StoreIncompleteError, match=r"resume=True\) or open it with partial"):
        store.open(part)  # a Python caller keeps the advice for Python


def _edit_record(path: Path, resign: bool, **changes) -> None:
    """Edit the record in zarr.json by hand (``resign``: recompute its checksum too)."""
    f = path / "zarr.json"
    doc = json.loads(f.read_text())
    rec = doc["attributes"]["prefast_store"]
    for k, v in changes.items():
        if isinstance(rec.get("layout"), dict) and k in rec["layout"]:
            rec["layout"][k] = v
        else:
            rec[k] = v
    if resign:
        rec["checksum"] = store.layout.record_checksum(rec)
    f.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("resign", "change", "match"),
    [
        (False, {"num_samples": 10**12}, "attributes fail their checksum"),
        (True, {"num_samples": 10**12}, "bad layout: views * chunks = 375000000000 exceeds"),
        (True, {"num_samples": 2900}, "the record says activations shape"),
        (True, {"sample_shape": [3, 4, 5]}, "the record says activations shape"),
        (True, {"layout": None}, "'layout' must be an object"),
        (True, {"views": "3"}, "views must be an integer"),
        (True, {"format_version": 1}, "older version: rebuild it"),
    ],
)
def test_bad_attributes_are_one_line_errors_in_every_command(
    tmp_path, data, capsys, resign, change, match
):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    _edit_record(path, resign, **change)
    p = str(path)
    for argv in (
        ["inspect", p],
        ["stats", p, "--no-progress"],
        ["verify", p, "--no-progress"],
        ["diff", p, p, "--no-progress"],
        ["show", p, "--sample", "0", "-o", str(tmp_path / "x.png")],
    ):
        # verify fails a store whose record is damaged (exit 1); the others cannot read it
        damaged = match in ("attributes fail their checksum", "the record says activations shape")
        assert store_main(argv) == (1 if damaged and argv[0] == "verify" else 2), argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert match in err, err


def _python_m_store(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m store ARGS`` in a fresh interpreter, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-m", "store", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )


def test_bad_attributes_through_python_m_store(tmp_path, data):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    _edit_record(path, True, layout=None)
    r = _python_m_store("stats", str(path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_verify_catches_a_flipped_label_byte(tmp_path, data, capsys):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    f = path / "labels" / "c" / "3"
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x01
    f.write_bytes(bytes(raw))
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert "labels      1 chunk(s) BAD" in cap.out and str(f) in cap.out
    assert f"error: corrupt labels {f} (samples 24..31)" in cap.err
    assert store_main(["stats", str(path), "--no-progress"]) == 0  # stats reads no labels
    capsys.readouterr()


def test_verify_says_a_label_file_is_missing_rather_than_damaged(tmp_path, data, capsys):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    f = path / "labels" / "c" / "3"
    f.unlink()
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    cap = capsys.readouterr()
    why = "labels are recorded as written but their file is missing"
    assert f"{f}: {why}" in cap.out and "checksum differs" not in cap.out
    assert cap.err == f"error: corrupt labels {f} (samples 24..31): {why}\n"


def test_truncated_table_and_label_chunks_are_one_line_naming_the_file(tmp_path, data, capsys):
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    crc = path / "chunk_crc" / "c" / "1" / "3"
    good = crc.read_bytes()
    crc.write_bytes(b"")
    r = _python_m_store("inspect", str(path))
    assert r.returncode == 2 and r.stdout == ""
    # zarr's concurrent read of the whole table left the other chunks' reads pending, and the
    # interpreter printed them (hundreds of lines) at exit
    assert r.stderr == (
        f"error: {crc}: a chunk of the 'chunk_crc' array has 0 bytes, expected 8 (truncated or "
        "replaced); rebuild the store\n"
    )
    crc.write_bytes(good)
    labels = path / "labels" / "c" / "5"
    labels.write_bytes(labels.read_bytes()[:20])
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert f"labels      cannot be read: {labels}: a chunk of the 'labels' array has 20 bytes" in (
        cap.out
    )
    assert "result      FAILED" in cap.out


def test_to_xarray_without_xarray_points_to_zarr(stores):
    try:
        import xarray  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"s\.zarr_array.*zarr\.open_group"):
            store.open(stores["f32"]).to_xarray()
    else:  # pragma: no cover - xarray is not a dependency
        da = store.open(stores["f32"]).to_xarray()
        assert da.shape == (VIEWS, N, *SHAPE)


def test_importing_store_imports_neither_prefast_nor_matplotlib():
    code = (
        "import sys; import store; import store.tools; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefast', 'matplotlib'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_store_cli_answers_help_and_usage_errors_without_importing_torch():
    """``python -m store --help`` and a usage error are answered without the seconds torch
    and zarr take to import (``import store`` imported them all), and a Ctrl-C in those
    seconds of a real command reaches main's handler (exit 130) rather than interrupting an
    import with a traceback. ``store.open`` and the rest import on first use."""
    code = (
        "import sys\n"
        "from store.__main__ import main\n"
        "for argv in (['--help'], ['diff', '-h'], ['stats', 'S', '--bogus'], [],\n"
        "             ['diff', 'a', 'b', 'c']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'zarr', 'numpy'}))\n"
        "import store\n"
        "print(store.open.__module__, store.StoreLoader.__module__, 'verify' in dir(store))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "unrecognized arguments: --bogus" in out.stderr
    assert "diff reads two stores, got 3 paths" in out.stderr
    assert out.stdout.splitlines()[-2:] == ["[]", "store.reader store.loader True"]


def test_ctrl_c_while_a_command_imports_the_store_ends_without_a_traceback(
    stores, capsys, monkeypatch
):
    """A Ctrl-C while a command's first use imports the store's modules (torch: seconds) is
    the command's stop: one line, exit 130."""
    import builtins

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "store.tools.inspect":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert store_main(["inspect", str(stores["f32"])]) == 130
    assert capsys.readouterr().err == "stopped by SIGINT\n"


@pytest.mark.parametrize(
    ("exc", "rc", "err"),
    [(KeyboardInterrupt, 130, "stopped by SIGINT\n"), (BrokenPipeError, 141, "")],
)
def test_ctrl_c_and_a_closed_stdout_end_without_a_traceback(
    stores, capsys, monkeypatch, exc, rc, err
):
    def stopped(args):
        print("half a table")
        raise exc

    monkeypatch.setitem(store_cli.COMMANDS, "stats", stopped)
    try:
        got = store_main(["stats", str(stores["f32"]), "--no-progress"])
    except BaseException as e:  # a KeyboardInterrupt let through would stop pytest itself
        pytest.fail(f"{type(e).__name__} escaped main")
    assert got == rc
    assert capsys.readouterr().err == err


def test_stats_into_a_closed_pipe_ends_quietly(stores):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as after `| head`
    try:
        r = subprocess.run(
            [sys.executable, "-m", "store", "stats", str(stores["f32"]), "--no-progress"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def test_verify_with_a_checkpoint_points_to_prefast(stores, capsys):
    for extra in (["--checkpoint", "last.pt", "--samples", "4"], ["--checkpoint=last.pt"]):
        assert store_main(["verify", str(stores["f32"]), *extra]) == 2
        cap = capsys.readouterr()
        assert cap.out == ""
        assert cap.err == (
            "error: checking a store against a checkpoint moved to "
            "'prefast verify STORE --checkpoint CK'\n"
        )


def test_progress_bars_only_where_stderr_is_a_terminal(stores, capsys, monkeypatch):
    # stderr redirected to a file or a pipe (2>log, a scheduler) got the bars' carriage-return
    # redraws around the error lines; prefast train and verify already drew them on a terminal only
    p = str(stores["f32"])
    for args in (["verify", p], ["stats", p], ["diff", p, p]):
        assert store_main(args) == 0
        assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert store_main(["verify", p]) == 0
    assert "verify chunks" in capsys.readouterr().err  # on a terminal they are drawn


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_verify_reports_a_chunk_it_may_not_read_and_checks_the_others(
    tmp_path, data, capsys, monkeypatch, codec
):
    # a chunk file the user may not read (a shared folder, chmod; root reads everything, so it
    # is faked): a raw store's verify stopped at it with '[Errno 13] Permission denied' and no
    # report (exit 2), a compressed one's called it a corrupt chunk that 'cannot be decoded'
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y, codec=codec)
    chunk = path / "activations" / "c" / "1" / "4" / "0" / "0" / "0"
    real = Path.read_bytes

    def refused(self):
        if self == chunk:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refused)
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    cap = capsys.readouterr()
    why = "cannot be read: Permission denied; check the file's permissions"
    assert f"45 read, 1 BAD:\n              {chunk}: {why}" in cap.out
    assert cap.err == f"error: unreadable chunk {chunk} (view 1, samples 32..39): {why}\n"
    r = store.verify(store.open(path))
    assert r.chunks_read == VIEWS * 15 and [(p.view, p.chunk) for p in r.bad_chunks] == [(1, 4)]
    chunk = path / "labels" / "c" / "2"  # the labels too: reported, not a stop with exit 2
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert f"labels      cannot be read: {chunk}: Permission denied; check the" in cap.out
    assert cap.err.endswith(f"error: {chunk}: {why}\n")


def _json_keys_documented() -> dict[str, set[str]]:
    """docs/inspecting.md's 'JSON output' list: the command of each entry and the keys named."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "inspecting.md").read_text()
    section = text.split("## JSON output", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^\* `([^`]+)`: (.*?)(?=^\* |\Z)", section, re.M | re.S)
    return {cmd: set(re.findall(r"`([a-z_]+)`", keys)) for cmd, keys in entries}


def _keys(d: dict) -> set[str]:
    """Every key of ``d`` and of the dicts in it (a list's first), but for ``meta`` (what the
    writer recorded) and ``chunks`` (the nested report of verify, documented on its own)."""
    out = set(d)
    for k, v in d.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            v = v[0]
        if isinstance(v, dict) and k not in ("meta", "chunks"):
            out |= _keys(v)
    return out


def test_json_keys_are_those_the_docs_list(tmp_path, data, stores, capsys):
    # the keys of the --json outputs were documented nowhere
    from prefast.cache.folders import list_run_folders
    from prefast.cache.identity import RUN_MARKER
    from prefast.cache.verify import CheckpointReport, SampleCheck

    documented = _json_keys_documented()
    p = str(stores["f32"])
    found: dict[str, dict] = {}
    assert store_main(["inspect", p, "--json"]) == 0
    found["python -m store inspect --json"] = json.loads(capsys.readouterr().out)
    assert store_main(["stats", p, "--out", str(tmp_path / "s.json")]) == 0
    found["python -m store stats --out"] = json.loads((tmp_path / "s.json").read_text())
    capsys.readouterr()
    x, y = data
    run_dir = tmp_path / "cache" / "run-aaaaaaaaaaaa"
    write_store(run_dir / "boundary-001", x, y)
    (run_dir / RUN_MARKER).touch()
    chunk = run_dir / "boundary-001" / "activations" / "c" / "0" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[::-1])  # a bad chunk: its entry's keys
    assert store_main(["verify", str(run_dir / "boundary-001"), "--json"]) == 1
    found["python -m store verify --json"] = json.loads(capsys.readouterr().out)
    assert store_main(["diff", p, str(stores["f16"]), "--json"]) == 1
    found["python -m store diff --json"] = json.loads(capsys.readouterr().out)
    report = CheckpointReport("s", "last.pt", samples=[SampleCheck(0, 3, 1e-4)])
    found["prefast verify --json"] = report.to_dict()
    found["prefast cache list --json"] = list_run_folders(tmp_path / "cache")[0].to_dict()
    capsys.readouterr()
    assert set(documented) == set(found)
    for cmd, d in found.items():
        assert documented[cmd] == _keys(d), cmd


def test_show_refuses_a_dpi_below_1_before_any_work(tmp_path, stores, capsys, monkeypatch):
    # matplotlib refused it after the store was read and the figure drawn: '-o x.png: dpi
    # must be positive'
    monkeypatch.setattr(
        "store.tools.inspect.open_complete", lambda p: pytest.fail("the store was opened")
    )
    for dpi in ("0", "-5"):
        out = str(tmp_path / "x.png")
        assert (
            store_main(["show", str(stores["f32"]), "--sample", "0", "--dpi", dpi, "-o", out]) == 2
        )
        assert capsys.readouterr().err == f"error: --dpi must be >= 1, got {dpi}\n"


def test_show_refuses_a_dpi_whose_picture_is_too_large_before_rendering(tmp_path, stores, capsys):
    # Agg allocated the whole picture: --dpi 10000 took minutes and 10 GB, 30000 a MemoryError
    # traceback
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    rendered: list[int] = []
    args = ["show", str(stores["f32"]), "--sample", "0", "-o", str(tmp_path / "x.png")]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Figure, "savefig", lambda fig, path, dpi: rendered.append(dpi))
        assert store_main([*args, "--dpi", "30000"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --dpi 30000: a ") and "pixel picture is too large" in err
        assert rendered == []
        most = int(err.rsplit("--dpi ", 1)[1])
        assert 100 < most < 30000
        assert store_main([*args, "--dpi", str(most)]) == 0  # the largest it allows
        assert store_main([*args, "--dpi", str(most + 1)]) == 2
    assert rendered == [most]


def test_stats_refuses_bins_out_of_range_before_any_work(tmp_path, stores, capsys, monkeypatch):
    # --bins 100000000 drew 10**8 bars: it never finished
    monkeypatch.setattr(
        "store.tools.inspect.open_complete", lambda p: pytest.fail("the store was opened")
    )
    for bins in ("0", "10001", "100000000"):
        hist = str(tmp_path / "h.png")
        assert store_main(["stats", str(stores["f32"]), "--bins", bins, "--hist", hist]) == 2
        assert capsys.readouterr().err == f"error: --bins must be in [1, 10000], got {bins}\n"


def test_figure_file_types_matplotlib_cannot_write_are_refused_before_any_work(
    tmp_path, stores, capsys, monkeypatch
):
    # found by savefig, after the pass over the store (and for stats after printing it)
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(
        "store.tools.inspect.open_complete", lambda p: pytest.fail("the store was opened")
    )
    s = str(stores["f32"])
    for args, flag, name in (
        (["stats", s, "--hist"], "--hist", "h.txt"),
        (["show", s, "--sample", "0", "-o"], "-o", "x.v2"),
    ):
        out = str(tmp_path / name)
        assert store_main([*args, out]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        fmt = name.rsplit(".", 1)[1]
        assert captured.err.startswith(f"error: {flag} {out}: Format '{fmt}' is not supported (")
        assert "png" in captured.err


def test_an_output_inside_the_store_read_is_refused_before_any_work(tmp_path, data, capsys):
    # stats --out S/zarr.json replaced the store's record: the store was lost
    pytest.importorskip("matplotlib")
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    before = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    for args, flag, out in (
        (["stats", str(path), "--out"], "--out", path / "zarr.json"),
        (["stats", path.as_uri(), "--hist"], "--hist", path / "labels" / "h.png"),
        (["show", str(path), "--sample", "0", "-o"], "-o", path / "activations" / "x.png"),
    ):
        assert store_main([*args, str(out)]) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and cap.err.startswith(f"error: {flag} {out}: inside the store ")
    assert {f: f.read_bytes() for f in path.rglob("*") if f.is_file()} == before
    assert store.open(path).complete


def test_an_output_inside_another_store_is_refused_before_any_work(tmp_path, data, capsys):
    # stats A --out B/zarr.json replaced store B's record: B was lost
    pytest.importorskip("matplotlib")
    x, y = data
    a, b = tmp_path / "a", tmp_path / "b"
    write_store(a, x, y)
    write_store(b, x[:, :9], y[:9], chunk=4)
    before = {f: f.read_bytes() for f in b.rglob("*") if f.is_file()}
    for args, flag, out in (
        (["stats", str(a), "--out"], "--out", b / "zarr.json"),
        (["stats", str(a), "--hist"], "--hist", b / "labels" / "h.png"),
        (["show", str(a), "--sample", "0", "-o"], "-o", b / "x.png"),
    ):
        assert store_main([*args, str(out)]) == 2
        cap = capsys.readouterr()
        assert cap.out == ""
        assert cap.err == (
            f"error: {flag} {out}: inside the store {b}, whose files it would overwrite or "
            "join; name a file elsewhere\n"
        )
    assert {f: f.read_bytes() for f in b.rglob("*") if f.is_file()} == before
    assert store.open(b).num_samples == 9


def test_stats_refuses_out_and_hist_naming_one_file(tmp_path, stores, capsys, monkeypatch):
    # the PNG replaced the JSON, and both 'wrote' lines named it
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(
        "store.tools.inspect.open_complete", lambda p: pytest.fail("the store was opened")
    )
    out = tmp_path / "a.png"
    args = ["stats", str(stores["f32"]), "--out", str(out), "--hist", str(tmp_path / "a")]
    assert store_main(args) == 2
    assert (
        capsys.readouterr().err == f"error: --out and --hist name the same file {out}; name two\n"
    )
    assert not out.exists()


def _no_constants(name: str) -> None:
    raise AssertionError(f"not strict JSON: {name}")


def test_json_outputs_are_strict_where_another_program_wrote_nan_into_meta(tmp_path, data, capsys):
    # create() refuses such a meta now, but a store another program wrote may hold one:
    # inspect --json printed NaN and Infinity, which JSON readers refuse
    from store.layout import CHECKSUM_KEY, record_checksum

    x, y = data
    write_store(tmp_path / "s", x, y, meta={"lr": 0.5, "x": [1.0, 2.0]})
    zj = tmp_path / "s" / "zarr.json"
    d = json.loads(zj.read_text())
    rec = d["attributes"]["prefast_store"]
    rec["meta"] = {"lr": float("nan"), "x": [1.0, float("inf")]}
    rec[CHECKSUM_KEY] = record_checksum(rec)
    zj.write_text(json.dumps(d))
    assert store_main(["inspect", str(tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=_no_constants)
    assert out["meta"] == {"lr": None, "x": [1.0, None]}
    assert store_main(["inspect", str(tmp_path / "s")]) == 0
    assert "meta.lr         nan" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), [1.0, float("inf")]])
def test_create_refuses_a_meta_that_is_not_strict_json(tmp_path, bad):
    # zarr.json got NaN or Infinity, which other zarr readers refuse
    with pytest.raises(
        store.StoreInputError, match=r"field 'meta' must be JSON-able: .*not finite"
    ):
        store.create(tmp_path / "s", num_samples=3, sample_shape=(2,), meta={"a": bad})
    assert not (tmp_path / "s").exists()


def test_verify_fails_a_store_whose_record_or_checksum_table_is_damaged(tmp_path, data, capsys):
    """A store whose zarr.json fails its checksum, or whose checksum table is damaged, made
    verify exit 2, bad input, as for a store that is not there; it is a failed check: exit 1,
    with the damage named."""
    x, y = data
    path = tmp_path / "s"
    write_store(path, x, y)
    record = path / "zarr.json"
    record.write_text(record.read_text().replace('"views": 3', '"views": 4'))
    assert store_main(["verify", str(path), "--no-progress"]) == 1
    assert "attributes fail their checksum" in capsys.readouterr().err
    write_store(tmp_path / "t", x, y)
    table = next(p for p in (tmp_path / "t" / "chunk_crc" / "c").rglob("*") if p.is_file())
    table.write_bytes(table.read_bytes()[:-1] + bytes([table.read_bytes()[-1] ^ 0xFF]))
    assert store_main(["verify", str(tmp_path / "t"), "--no-progress"]) == 1
    assert "table holds values that are no CRC" in capsys.readouterr().err
    assert store_main(["verify", str(tmp_path / "none"), "--no-progress"]) == 2  # still input
