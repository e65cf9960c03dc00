"""The comparison and views benchmarks run end to end (tiny settings; no timing asserted)."""

from __future__ import annotations

import json

from benchmarks import compare, views


def test_compare_quick_runs_every_variant(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc = compare.main(
        ["--quick", "--num-samples", "300", "--epochs", "2", "--tiers", "ram", "zarr", "zarr-lz4",
         "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    run = res["runs"]["t0=0.6"]
    names = [v["variant"] for v in run["variants"]]
    assert names == ["full", "freezeout", "prefast-ram", "prefast-zarr", "prefast-zarr-lz4"]
    for v in run["variants"]:
        assert v["train_seconds"] > 0 and 0 <= v["test_error"] <= 1 and len(v["curve"]) == 2
    assert run["variants"][1]["vs_freezeout"] == 1.0
    assert 0 < run["ideal"]["freezeout_saving"] < run["ideal"]["prefast_saving"] < 1
    assert len(res["profile"]["fwd_seconds_per_batch"]) == 10  # 9 units + head
    assert res["environment"]["versions"]["torch"]
    assert out.with_suffix(".png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "prefast-zarr-lz4" in text and "ideal saving" in text


def test_views_study_writes_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "views.json"
    rc = views.main(
        ["--dataset", "synthetic", "--num-samples", "200", "--epochs", "2", "--batch-size", "50", "--t0", "0.5",
         "--views", "1", "2", "--seeds", "0", "1", "--no-floor", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    by = {s["name"]: s for s in res["summary"]}
    assert set(by) == {"freezeout", "prefast-v1", "prefast-v2"}
    assert all(s["runs"] == 2 and s["test_error_std"] is not None for s in by.values())
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 6
    assert "prefast-v2" in capsys.readouterr().out


def test_bench_feed_times_every_write_path_and_feed(tmp_path, capsys):
    from benchmarks import bench_feed

    out = tmp_path / "feed.json"
    # (4, 8, 8) fp16: 512-byte samples, chunks of whole pages, so the row map and the
    # map-populate part run; the bench itself checks every written store against the data
    assert bench_feed.main(
        ["--num-samples", "600", "--shape", "4", "8", "8", "--batch-size", "64", "--repeats", "1",
         "--dir", str(tmp_path), "--out", str(out)]
    ) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert set(r["write_s"]) == {"zarr-path", "write", "write_rows", "write_rows-pwrite"}
    assert set(r["beside_busy"]) == {"write_rows", "write_rows-pwrite"}
    assert all(v["loop_share"] > 0 for v in r["beside_busy"].values())
    assert set(r["breakdown_s"]) == {"ram-fresh", "ram-touched", "map-populate"}
    assert set(r["feed_s"]) >= {"ram/1", "zarr/1"}
    assert all(t > 0 for t in [*r["write_s"].values(), *r["feed_s"].values()])
    assert "where a row write's time goes" in out.with_suffix(".txt").read_text()
    assert list(tmp_path.glob("bench-feed-*")) == []  # its stores are removed
