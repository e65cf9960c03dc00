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
