"""The comparison and views benchmarks run end to end (tiny settings; no timing asserted)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
import torch

from benchmarks import compare, fidelity, step_ops, step_probe, views


@pytest.mark.slow
def test_compare_quick_runs_every_variant(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    mine = [tmp_path / "c" / n / "thesis.tex" for n in ("warm-up", "quick-t0.6-prefast-zarr")]
    for f in mine:  # a user's folders under --cache-dir named like the benchmark's
        f.parent.mkdir(parents=True)
        f.write_text("irreplaceable")
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
    prof = res["profile"]
    assert len(prof["fwd_seconds_per_batch"]) == 10  # 9 units + head
    assert len(prof["frozen_fwd_seconds_per_batch"]) == 10
    assert all(t > 0 for t in prof["frozen_fwd_seconds_per_batch"])
    # the ideal is recomputed from the logged profile: frozen units at their frozen forward
    sched = compare.FreezeSchedule(
        compare.ScheduleConfig(t0=0.6, how_scale="cubic"), 9, prof["total_iterations"]
    )
    assert run["ideal"] == pytest.approx(
        compare.ideal_saving(
            sched,
            prof["fwd_seconds_per_batch"],
            prof["bwd_seconds_per_batch"],
            prof["frozen_fwd_seconds_per_batch"],
        )
    )
    assert res["environment"]["versions"]["torch"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert res["warm_up_seconds"] > 0  # every variant ran untimed before the first timed one
    assert res["warm_up_failed"] == []
    assert not any((tmp_path / "c").rglob("zarr.json"))  # each run's stores removed after it
    assert all(f.read_text() == "irreplaceable" for f in mine)
    text = capsys.readouterr().out
    assert "prefast-zarr-lz4" in text and "ideal saving" in text
    assert "frozen units at their eval, no-grad forward" in text


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


def test_fidelity_study_resumes_and_prices_each_variant_against_v1(tmp_path, capsys):
    """Seed 0 of two variants, then --resume with seeds 0 and 1: only seed 1 trains (the
    JSONL grows to 4 runs), and the table prices each variant against prefast-v1."""
    out = tmp_path / "fid.json"
    args = ["--dataset", "synthetic", "--num-samples", "150", "--epochs", "2", "--t0", "0.5",
            "--variants", "freezeout", "prefast-v1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert fidelity.main([*args, "--seeds", "0"]) == 0
    first = out.with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(x)["name"] for x in first] == ["freezeout", "prefast-v1"]
    assert fidelity.main([*args, "--seeds", "0", "1", "--resume"]) == 0
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 4  # seed 0 kept as it was
    res = json.loads(out.read_text())
    assert res["variants"] == {
        "freezeout": ["freezeout", 1, "none"],
        "prefast-v1": ["prefast", 1, "none"],
    }
    by = {s["name"]: s for s in res["summary"]}
    assert by["prefast-v1"]["seeds"] == [0, 1] and by["freezeout"]["runs"] == 2
    assert all(r["commit"] for r in res["runs"])
    table = out.with_suffix(".txt").read_text().splitlines()
    assert table[0].split()[-2:] == ["vs", "v1"]
    v1 = by["prefast-v1"]["train_seconds_mean"]
    assert table[1].split()[-1] == f"{by['freezeout']['train_seconds_mean'] / v1:.3f}"
    assert table[2].split()[-1] == "1.000"
    assert "vs v1" in capsys.readouterr().out


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
    rows = {"write_rows", "write_rows-pwrite", "write_rows-prepared"}
    assert set(r["write_s"]) == {"zarr-path", "write"} | rows
    assert set(r["beside_busy"]) == rows and r["prepare_s"] > 0
    assert all(v["loop_share"] > 0 for v in r["beside_busy"].values())
    assert set(r["breakdown_s"]) == {"ram-fresh", "ram-touched", "map-populate"}
    # one gather thread here (two cores): the loader's default is the same feed
    assert set(r["feed_s"]) == {"ram/1", "zarr/1", "ram/1 x4", "zarr/1 x4"}
    # the host alone: a gather on one thread and on several (two at least), no loader
    assert set(r["gather_s"]) == {"take-buffered", "take-direct", "take-direct/2t"}
    assert set(r["per_batch_us"]) == {
        "caller's thread", "prefetch thread", "caller's thread, 4 a copy", "prefetch thread, 4 a copy"
    }  # fmt: skip
    assert "h2d_s" not in r  # no CUDA here
    assert set(r["beside_work"]) == {"ram", "zarr"}
    for v in r["beside_work"].values():
        assert v["steps_per_batch"] >= 1 and min(v["feed_s"], v["work_s"], v["together_s"]) > 0
    assert "share hidden" in out.with_suffix(".txt").read_text()
    assert all(us > 0 for us in r["per_batch_us"].values())
    assert all(t > 0 for t in [*r["write_s"].values(), *r["feed_s"].values()])
    assert "where a row write's time goes" in out.with_suffix(".txt").read_text()
    assert list(tmp_path.glob("bench-feed-*")) == []  # its stores are removed


def test_bench_feed_times_row_writes_without_gathering_their_rows(tmp_path, monkeypatch):
    """A shuffled batch reaches write_rows as a training step hands it over: its rows already
    side by side. The benchmark gathers every batch's rows before its clock starts (it timed
    a copy of each batch, x[idx], inside the write) and so does the breakdown's RAM scatter."""
    import types

    import numpy as np
    import torch

    import store
    from benchmarks import bench_feed

    events: list[str] = []
    real_shuffled = getattr(bench_feed, "_shuffled", None)
    real_rows = store.StoreWriter.write_rows
    views: list[bool] = []

    def shuffled(*a, **kw):
        events.append("gather")
        assert real_shuffled is not None
        return real_shuffled(*a, **kw)

    def clock() -> float:
        events.append("clock")
        return time.perf_counter()

    def write_rows(self, view, rows, x, labels=None):
        views.append(x._base is not None)  # a slice of the batches gathered ahead, no copy
        return real_rows(self, view, rows, x, labels)

    monkeypatch.setattr(bench_feed, "_shuffled", shuffled, raising=False)
    monkeypatch.setattr(bench_feed, "time", types.SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(store.StoreWriter, "write_rows", write_rows)
    x = torch.arange(100 * 256, dtype=torch.float16).reshape(100, 4, 8, 8) % 1000
    y = torch.arange(100) % 10
    assert bench_feed._write(tmp_path / "s", x, y, "write_rows", 16, 0) >= 0
    assert events == ["gather", "clock", "clock"]  # one gather, before the clock
    assert views == [True] * 7
    got = store.open(tmp_path / "s")
    assert torch.equal(got.read(0, np.arange(100)), x)  # every row where it belongs
    events.clear()
    bench_feed._breakdown(tmp_path / "b", x, 16, 0, 8)
    assert events[0] == "gather" and events.count("gather") == 1


def test_round_order_reverses_every_other_round():
    vs = [compare.Variant(n) for n in ("freezeout", "prefast-ram", "prefast-zarr")]
    names = [[v.name for v in compare.round_order(vs, k)] for k in range(4)]
    assert names[0] == names[2] == ["freezeout", "prefast-ram", "prefast-zarr"]
    assert names[1] == names[3] == ["prefast-zarr", "prefast-ram", "freezeout"]
    assert [v.name for v in vs] == names[0]  # the list given is left as it was


def _fake_run(k: int, pos: int, seconds: list[float], err: float) -> dict:
    return {
        "variant": "prefast-zarr", "round": k, "position": pos, "config": {"seed": 0},
        "records": [{"epoch": e, "train_seconds": s} for e, s in enumerate(seconds)],
        "curve": [{"epoch": e, "train_seconds": sum(seconds[: e + 1]), "test_error": err}
                  for e in range(len(seconds))],
        "train_seconds": sum(seconds), "cache_build_seconds": 0.5 * (k + 1), "test_error": err,
        "process_wall_seconds": 2 * sum(seconds), "cache_bytes": 100 * (k + 1),
        "peak_host_private_bytes": 7 - k, "peak_gpu_bytes": 0,
    }  # fmt: skip


def test_merge_rounds_means_times_and_keeps_each_round():
    a, b = _fake_run(0, 0, [3.0, 1.0], 0.25), _fake_run(1, 2, [5.0, 2.0], 0.75)
    m = compare.merge_rounds([a, b])
    assert m["train_seconds"] == 5.5 and m["cache_build_seconds"] == 0.75
    assert m["test_error"] == 0.5 and m["process_wall_seconds"] == 11.0
    assert m["cache_bytes"] == 200 and m["peak_host_private_bytes"] == 7
    assert [c["train_seconds"] for c in m["curve"]] == [4.0, 5.5]
    assert [(r["round"], r["position"], r["epoch_seconds"]) for r in m["rounds"]] == [
        (0, 0, [3.0, 1.0]),
        (1, 2, [5.0, 2.0]),
    ]
    assert m["records"] is a["records"]  # the first round's records
    one = compare.merge_rounds([a])
    assert m["train_seconds_range"] == [4.0, 7.0]
    assert one["train_seconds"] == 4.0 and one["curve"] == a["curve"]
    assert a["train_seconds"] == 4.0  # the inputs are not changed


def test_compare_rounds_alternate_the_order(tmp_path, capsys, caplog):
    out = tmp_path / "cmp.json"
    rc = compare.main(
        ["--quick", "--num-samples", "150", "--epochs", "2", "--tiers", "ram", "--no-full",
         "--rounds", "2", "--out", str(out), "--no-progress", "--no-plot", "--device", "cpu",
         "-v"]
    )  # fmt: skip
    assert "froze unit 0" in caplog.text  # -v keeps the runs' own log lines
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["rounds"] == 2 and res["warm_up_seconds"] > 0
    fo, pf = res["runs"]["t0=0.6"]["variants"]
    assert (fo["variant"], pf["variant"]) == ("freezeout", "prefast-ram")
    assert [r["position"] for r in fo["rounds"]] == [0, 1]
    assert [r["position"] for r in pf["rounds"]] == [1, 0]
    for v in (fo, pf):
        times = [r["train_seconds"] for r in v["rounds"]]
        assert abs(v["train_seconds"] - sum(times) / 2) < 1e-9
    # the same seed on a CPU: freezeout trains to the same test error in both rounds (prefast
    # may not: its plan follows the costs it measures)
    assert fo["rounds"][0]["test_error"] == fo["rounds"][1]["test_error"]
    assert fo["vs_freezeout_rounds"] == [1.0, 1.0]
    expect = [
        p["train_seconds"] / f["train_seconds"]
        for p, f in zip(pf["rounds"], fo["rounds"], strict=True)
    ]
    assert pf["vs_freezeout_rounds"] == expect
    text = capsys.readouterr().out
    assert "means over 2 rounds" in text and "prefast-ram: " in text and "2nd in its round" in text
    lo, hi = sorted(r["train_seconds"] for r in pf["rounds"])
    assert pf["train_seconds_range"] == [lo, hi] and f"{lo:.1f}-{hi:.1f}" in text
    assert "~: no full run" in text  # vs full and saving/ideal are modelled, and say so


def test_compare_without_matplotlib_warns_at_the_start_and_runs_without_the_plot(
    tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    warned_before_the_runs = []

    def no_runs(sc, args, partial, env):  # the runs monkeypatched away
        warned_before_the_runs.append("no plot will be drawn" in caplog.text)
        return {"runs": {}}

    monkeypatch.setattr(compare, "run_scenario", no_runs)
    monkeypatch.setattr(compare, "format_tables", lambda res: "tables")
    out = tmp_path / "cmp.json"
    assert compare.main(["--quick", "--out", str(out), "--device", "cpu"]) == 0
    assert warned_before_the_runs == [True]
    assert "the plot needs matplotlib: pip install 'prefast[plot]'" in caplog.text
    assert "--no-plot" in caplog.text
    assert out.exists() and not out.with_suffix(".png").exists()
    assert f"results: {out} (+ .txt)" in capsys.readouterr().out
    caplog.clear()
    assert compare.main(["--quick", "--out", str(out), "--device", "cpu", "--no-plot"]) == 0
    assert "matplotlib" not in caplog.text  # no plot asked for: no warning


def test_plan_whatif_plans_each_tier_from_a_runs_logged_costs(tmp_path, capsys):
    import pytest

    from benchmarks import plan_whatif

    # a run's log line (3495aee on an H200): DenseNet-BC-76, 39 units
    fwd = [1.0] * 14 + [0.4] * 13 + [0.2] * 12
    log = tmp_path / "run.log"
    log.write_text(
        "2026-11-27 prefast.cache.manager: iteration 678: measured costs per sample (replayed "
        f"CUDA graphs): image 2.9 us, forward {fwd} us; a training step ...\n"
    )
    rc = plan_whatif.main(["--log", str(log), "--read", "100", "0.5", "--write", "100"])
    assert rc == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")][1:]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[0] for c in cells] == ["device", "zarr", "zarr"]
    dev, same, slow = cells
    # at the device's rates a host tier is no dearer (its reads overlap the device's work)
    assert dev[3].startswith("[0, 4, 9") and float(same[4]) <= float(dev[4])
    assert slow[3] == str([0] * 13)  # reads at 0.5 GB/s never pay: no cache in 13 epochs
    assert float(slow[4]) > float(dev[4])
    # training priced at 4x a forward instead of 3x: every epoch's steps cost more
    assert plan_whatif.main(["--log", str(log), "--write", "100", "--train-factor", "4"]) == 0
    out = capsys.readouterr().out
    row = next(r for r in out.splitlines() if r.startswith("| device |"))
    dear = [c.strip() for c in row.strip("|").split("|")]
    assert "training 4x a unit's forward" in out and float(dear[4]) > float(dev[4])
    with pytest.raises(SystemExit):
        plan_whatif.main(["--log", str(log), "--train-factor", "0.5"])
    assert "--train-factor must be >= 1" in capsys.readouterr().err
    log.write_text("no costs here\n")
    with pytest.raises(SystemExit, match="no 'measured costs"):
        plan_whatif.main(["--log", str(log)])


def test_epochs_tables_each_variants_epochs_and_the_plans_error(tmp_path, capsys):
    from benchmarks import epochs

    def rec(e, s, plan=None, wait=0.5, loader=None, boundary=0, probe=0.0, wt=None):
        return {"epoch": e, "train_seconds": s, "plan_seconds": plan, "input_wait_seconds": wait,
                "loader_seconds": loader, "cache_build_seconds": 0.0, "cache_boundary": boundary,
                "probe_seconds": probe, "write_through": wt}  # fmt: skip

    ld = {"batches": 7, "bytes": 10, "gather": 0.25, "buffers": 0.125, "copy": 0.125,
          "starved": 1.0, "full": 0.0}  # fmt: skip
    wt = {"boundary": 2, "tier": "zarr", "bytes": 640, "take_seconds": 0.125,
          "copy_wait_seconds": 0.0, "scatter_seconds": 0.0, "catch_up_samples": 32,
          "finish_seconds": 0.0625}  # fmt: skip
    result = {
        "scenario": "demo",
        "runs": {"t0=0.6": {"variants": [
            {"variant": "freezeout", "records": [rec(0, 3.0), rec(1, 2.0), rec(2, 1.5)]},
            {"variant": "prefast-zarr", "records": [
                rec(0, 3.0), rec(1, 1.5, plan=1.0, loader=ld, boundary=2, probe=0.25, wt=wt),
                rec(2, 0.75, plan=0.5, loader=ld, boundary=2)]},
        ]}},
    }  # fmt: skip
    text = epochs.tables(result, from_epoch=1)
    assert "| variant | 1 | 2 |" in text and "| 0 |" not in text  # epoch 0 left out
    assert "| freezeout s | 2.00 | 1.50 |" in text
    assert "| prefast-zarr plan s | 1.00 | 0.50 |" in text
    assert "| prefast-zarr loader s | 0.50 | 0.50 |" in text  # gather + buffers + copy
    assert "| prefast-zarr boundary | 2 | 2 |" in text
    assert "| prefast-zarr probe s | 0.25 | 0.00 |" in text
    # the cache epoch 1 wrote through: the training thread's hold, the catch-up's rows
    assert "| prefast-zarr hand-over s | 0.12 | - |" in text
    assert "| prefast-zarr catch-up rows | 32 | - |" in text
    assert "freezeout plan s" not in text and "freezeout boundary" not in text  # nothing to say
    assert "freezeout hand-over s" not in text and "freezeout probe s" not in text
    # epochs 1-2 were predicted at 1.5 s and took 2.25 s
    assert "- prefast-zarr, epochs 1-2: the plan predicted 1.50 s, they took 2.25 s (1.50x)" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert epochs.main([str(path)]) == 0
    assert "| freezeout s | 3.00 | 2.00 | 1.50 |" in capsys.readouterr().out
    path.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        epochs.main([str(path)])
    assert exit_info.value.code == 2
    assert "is not a compare.py result" in capsys.readouterr().err


def test_step_probe_times_each_boundary_and_the_hosts_part(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "8",
            "--steps", "2", "--repeats", "3", "--warmup", "1", "--modes", "none",
            "--boundaries", "0", "5", "--out", str(out)]  # fmt: skip
    assert step_probe.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["boundary"], r["mode"]) for r in rows] == [(0, "none"), (5, "none")]
    for r in rows:
        # the host's part is timed within the same rounds, before their synchronisation
        assert 0 < r["host_ms_per_step_median"] <= r["ms_per_step_median"]
        assert r["ms_per_step_min"] <= r["ms_per_step_median"] <= r["ms_per_step_max"]
    head = out.with_suffix(".txt").read_text().splitlines()[0].split()
    assert head == ["b", "unit", "none", "ms", "none", "host"]


def test_step_probe_hands_cached_batches_over_as_the_trainer_does(tmp_path, monkeypatch):
    """Under --amp bf16 the trainer hands a cached batch to the units after the boundary as
    bfloat16 (the frozen unit's output); the probe timed float32 batches there, so it timed
    steps the trainer no longer runs. It now hands the same dtype; images stay float32."""
    from prefast.training.step import StepRunner

    seen = []
    step = StepRunner.step

    def recorded(self, x, *a, **k):
        seen.append(x.dtype)
        return step(self, x, *a, **k)

    monkeypatch.setattr(StepRunner, "step", recorded)
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "8",
            "--steps", "1", "--repeats", "1", "--warmup", "1", "--modes", "none", "--amp", "bf16",
            "--boundaries", "0", "5", "--out", str(tmp_path / "probe.json")]  # fmt: skip
    assert step_probe.main(argv) == 0
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2  # warm-up and timed, each row


def test_step_probe_records_its_default_boundaries_for_compile_choice(tmp_path, capsys):
    """Without --boundaries the result's config held boundaries None, so compile_choice found
    no boundary probed and chose eager steps ("none") after graphs had run at every one."""
    out = tmp_path / "probe.json"
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "2",
            "--steps", "1", "--repeats", "1", "--warmup", "0", "--modes", "none",
            "--out", str(out)]  # fmt: skip
    assert step_probe.main(argv) == 0
    res = json.loads(out.read_text())
    bounds = [r["boundary"] for r in res["rows"]]
    assert res["config"]["boundaries"] == bounds and bounds[0] == 0 and len(bounds) > 2
    # the same probe as it reads where graphs ran (CUDA): every boundary has a graphs row
    res["config"]["modes"] = ["graphs"]
    for r in res["rows"]:
        r["mode"] = "graphs"
    out.write_text(json.dumps(res))
    assert step_probe.compile_choice(out, 0) == "graphs"


def test_step_probe_times_a_boundary_mode_or_tier_given_twice_once(tmp_path, capsys):
    """--boundaries 5 5, --modes none none or --write-through ram ram timed the same rows twice
    (the JSON held both, the tables only the second)."""
    out = tmp_path / "probe.json"
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "2",
            "--steps", "1", "--repeats", "1", "--warmup", "0", "--modes", "none", "none",
            "--boundaries", "5", "5", "--write-through", "ram", "ram", "--out", str(out)]  # fmt: skip
    assert step_probe.main(argv) == 0
    res = json.loads(out.read_text())
    got = sorted((r["boundary"], r["mode"], r.get("write_through", "")) for r in res["rows"])
    assert got == [(5, "none", ""), (5, "none", "none"), (5, "none", "ram")]
    assert res["config"]["boundaries"] == [5]


@pytest.mark.slow
def test_step_probe_times_steps_writing_through_into_each_tier(tmp_path, capsys):
    out, stores = tmp_path / "probe.json", tmp_path / "stores"
    stores.mkdir()
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "7",
            "--steps", "2", "--repeats", "2", "--warmup", "1", "--modes", "none",
            "--boundaries", "2", "3", "6", "--write-through", "device", "ram", "zarr",
            "--store-dir", str(stores), "--out", str(out)]  # fmt: skip
    assert step_probe.main(argv) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert "partial" not in res  # saved after each row, then complete
    # each boundary's write-through rows in an order rotated by one; b=6 is the last unit's
    # output: nothing above it to freeze and write
    assert [(r["boundary"], r.get("write_through")) for r in rows] == [
        (2, None), (2, "none"), (2, "device"), (2, "ram"), (2, "zarr"),
        (3, None), (3, "device"), (3, "ram"), (3, "zarr"), (3, "none"), (6, None),
    ]  # fmt: skip
    steps = 1 + 2 * 2  # warm-up and timed rounds: each step's batch of 7 written once
    for r in rows[1:5] + rows[6:10]:
        assert r["frontier"] == r["boundary"] + 1 and r["ms_per_step_median"] > 0
        assert r["samples_written"] == (0 if r["write_through"] == "none" else 7 * steps)
        # on the CPU rows are written as they are handed over: nothing is left to drain
        assert r["drain_seconds"] == 0.0
        # so it is the rounds' mean
        lo, hi = r["ms_per_step_min"], r["ms_per_step_max"]
        assert lo * (1 - 1e-9) <= r["ms_per_step_with_drain"] <= hi * (1 + 1e-9)
    assert step_probe.write_through_order([], 3) == []
    assert step_probe.write_through_order(["ram"], 3) == ["ram", "none"]
    assert list(stores.iterdir()) == []  # the store's temporary folder is gone
    text = out.with_suffix(".txt").read_text()
    assert "write-through: unit b frozen too" in text
    line = next(s for s in text.splitlines() if s.split()[:3] == ["2", "dense1.1", "none"])
    assert len(line.split()) == 4 + 3 * 3  # b, unit, mode, none ms; ms, +ms, host per tier


def test_step_probe_stopped_midway_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "probe.json"
    real, calls = step_probe.time_steps, []

    def second_row_stops(*a, **kw):
        calls.append(a[5])  # the boundary
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a time limit's signal would stop it
        return real(*a, **kw)

    monkeypatch.setattr(step_probe, "time_steps", second_row_stops)
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "4",
            "--steps", "1", "--repeats", "1", "--warmup", "1", "--modes", "none",
            "--boundaries", "0", "5", "--out", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        step_probe.main(argv)
    res = json.loads(out.read_text())
    assert res["partial"] is True and [r["boundary"] for r in res["rows"]] == [0]
    assert "commit" in res["environment"]


def test_step_ops_counts_what_a_step_dispatches_beyond_its_own_work(tmp_path, capsys):
    out = tmp_path / "ops.json"
    argv = ["--device", "cpu", "--num-samples", "192", "--batch-size", "32", "--epochs", "3",
            "--out", str(out)]  # fmt: skip
    assert step_ops.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(r["steps"] == 6 for r in rows)
    last = rows[-1]  # reads a cache and writes none (no cache is written in the last epoch)
    assert last["cache_boundary"] > 0
    # the meter takes one copy a step; the iteration counter, the meter's sums and the sample
    # visits are not counted per step any more
    assert last["ops"]["copy_"] == 6
    assert not {"fill_", "argmax", "index_add_", "isfinite", "where"} & set(last["ops"])
    assert last["ops_per_step"] < rows[1]["ops_per_step"]  # epoch 1 writes a cache through
    assert "ops/step" in out.with_suffix(".txt").read_text()


def test_a_results_environment_records_the_commit_it_is_given(monkeypatch):
    """On a lent machine the tree's copy carries a stale .git: PREFAST_COMMIT names the
    commit instead. A --device cpu run names the CPU even where CUDA is visible."""
    import torch

    from benchmarks.common import environment, git_commit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert environment("cuda")["device"]["name"] == "NVIDIA H200"
    monkeypatch.delenv("PREFAST_COMMIT", raising=False)
    own = git_commit()
    assert own != "abc123" and environment()["commit_given"] is False
    monkeypatch.setenv("PREFAST_COMMIT", "abc123")
    env = environment("cpu")
    assert env["commit"] == "abc123" and env["commit_given"] is True
    assert env["device"]["name"].startswith("CPU: ")


# ---- gpu.sh, dry-run on the CPU: every python3 it starts is a stand-in that records its
# arguments and writes what the real script would (no GPU, no timing), except `python3 -c`,
# which runs for real (the script's own checks and its choice of --compile)
_FAKE_PYTHON = r"""#!{python}
import json, os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
if args[0] == "-c":
    if os.environ.get("FAKE_MISSING") and "crc32c" in args[1]:
        sys.exit("ModuleNotFoundError: No module named 'zarr'")
    sys.exit(subprocess.call([{python!r}, *args]))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
name = Path(args[1] if args[0] == "-m" else args[0]).stem
out = Path(args[args.index("--out") + 1]) if "--out" in args else None
if name == "step_probe":
    i = args.index("--boundaries") + 1
    bounds = []
    while i < len(args) and not args[i].startswith("--"):
        bounds.append(int(args[i]))
        i += 1
    cut = os.environ.get("FAKE_PROBE") == "timeout"  # stopped by its time limit after b[0]
    rows = [{{"boundary": b, "mode": "graphs"}} for b in (bounds[:1] if cut else bounds)]
    out.write_text(json.dumps({{"config": {{"boundaries": bounds}}, "rows": rows}}))
    sys.exit(124 if cut else 0)
if out is not None:
    out.write_text("{{}}")
if name == "pytest":
    print("1 passed")
"""


def _gpu_sh(tmp_path, **env):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "python3").write_text(_FAKE_PYTHON.format(python=sys.executable))
    (bin_ / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'name, memory.total'\necho 'Fake GPU, 1 MiB'\n"
    )
    for f in bin_.iterdir():
        f.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    log.write_text("")
    full_env = {
        **os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(out),
        "FAKE_LOG": str(log), "PREFAST_COMMIT": "0" * 40, "PYTHONPATH": str(repo), **env,
    }  # fmt: skip
    r = subprocess.run(
        ["bash", "benchmarks/gpu.sh"], cwd=repo, env=full_env, capture_output=True, text=True
    )
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    return r, out, calls


@pytest.mark.slow
def test_gpu_sh_dry_run_runs_every_stage_and_returns_its_files(tmp_path):
    r, out, calls = _gpu_sh(tmp_path)
    assert r.returncode == 0, r.stderr
    scripts = [c[1] if c[0] == "-m" else c[0].split("/")[-1] for c in calls]
    assert scripts == ["step_probe.py", "compare.py", "epochs.py", "pytest", "bench_feed.py"]
    scenario = calls[1]
    # graphs ran at every boundary probed: the scenario replays graphs, eager FreezeOut beside
    assert scenario[scenario.index("--compile") + 1] == "graphs"
    assert "--eager-baseline" in scenario
    got = sorted(p.name for p in out.iterdir())
    assert got == [
        "bench-feed-gpu.json", "compare-gpu-long.json", "environment.txt", "logs.txt",
        "pytest-gpu.txt", "step-probe-gpu.json",
    ]  # fmt: skip
    assert len(got) <= 8  # what comes back from a lent machine
    assert "commit (given): " + "0" * 40 in (out / "environment.txt").read_text()
    assert "== done" in r.stdout


@pytest.mark.slow
def test_gpu_sh_probe_stopped_by_its_time_limit_still_picks_graphs(tmp_path):
    """A probe that its timeout stopped after graphs ran (exit 124, fewer rows than boundaries)
    tried graphs and saw them work: the scenario still replays graphs (it chose eager steps,
    about 1.9x slower on an H200, so that the scenario outran the budget)."""
    r, _, calls = _gpu_sh(tmp_path, FAKE_PROBE="timeout", STAGES="probe scenario")
    assert r.returncode == 0, r.stderr
    scenario = next(c for c in calls if c[0].endswith("compare.py"))
    assert scenario[scenario.index("--compile") + 1] == "graphs"


def test_gpu_sh_stops_at_once_without_its_packages(tmp_path):
    r, out, calls = _gpu_sh(tmp_path, FAKE_MISSING="1")
    assert r.returncode == 1 and calls == []  # no stage spent the budget failing
    assert "carry the wheels in .whl" in (out / "environment.txt").read_text()
    assert "carry the wheels in .whl" in r.stdout


def test_compile_choice_reads_the_probe_and_how_it_ended(tmp_path):
    path = tmp_path / "probe.json"
    assert step_probe.compile_choice(path, 124) == "auto"  # nothing measured
    rows = [{"boundary": 0, "mode": "graphs"}, {"boundary": 0, "mode": "graphs",
            "write_through": "ram"}]  # fmt: skip
    path.write_text(json.dumps({"config": {"boundaries": [0, 14]}, "rows": rows}))
    assert step_probe.compile_choice(path, 124) == "graphs"  # stopped by its time limit
    assert step_probe.compile_choice(path, 1) == "none"  # failed at b=14: graphs may have
    rows.append({"boundary": 14, "mode": "graphs"})
    path.write_text(json.dumps({"config": {"boundaries": [0, 14]}, "rows": rows}))
    assert step_probe.compile_choice(path, 0) == "graphs"
    path.write_text(json.dumps({"config": {"boundaries": [0]}, "rows": []}))
    assert step_probe.compile_choice(path, 124) == "auto"


def test_eager_baseline_runs_after_every_other_variant():
    """freezeout-eager, the slowest run and a side measurement, comes last: a time limit
    (gpu.sh's budget) cuts it rather than a cache tier."""
    vs = compare.variants_for(
        ("device", "ram", "zarr"), compare.torch.device("cuda"), 4, eager_baseline=True
    )
    assert [v.name for v in vs] == [
        "full", "freezeout", "prefast-device", "prefast-ram", "prefast-zarr", "prefast-zarr-v4",
        "freezeout-eager",
    ]  # fmt: skip
    from prefast.config import CACHE_FIELDS

    over = vs[-1].overrides  # with the cache options' defaults, as freezeout's
    assert {k: over[k] for k in ("mode", "compile")} == {"mode": "freezeout", "compile": "none"}
    assert set(over) == {"mode", "compile", *CACHE_FIELDS}
    assert {k: v for k, v in over.items() if k in CACHE_FIELDS} == {
        k: v for k, v in vs[1].overrides.items() if k != "mode"
    }


@pytest.mark.slow
def test_gpu_sh_probe_starts_only_inside_the_budget(tmp_path):
    """The probe's own time limit (110 s) was not held to the budget: with 5 s left it ran
    anyway, past the deadline. Now no stage starts with under 10 s left."""
    r, out, calls = _gpu_sh(tmp_path, GPU_BUDGET_SECONDS="5")
    assert r.returncode == 0 and calls == []
    assert r.stderr.count("-- skipped") == 4  # probe, scenario, tests, feed
    assert (out / "environment.txt").exists()


def test_step_probe_refuses_a_warm_up_that_would_time_the_graph_capture(tmp_path):
    """A graphs step is captured after two eager steps: with --warmup 2 the first timed round
    held the capture (and the eager steps before it) and reported them as steps."""
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "4",
            "--modes", "none", "graphs", "--warmup", "2", "--boundaries", "0",
            "--out", str(tmp_path / "p.json")]  # fmt: skip
    with pytest.raises(SystemExit, match="--warmup 2: a graphs step is captured after 2 eager"):
        step_probe.main(argv)
    assert not (tmp_path / "p.json").exists()


def test_study_run_that_fails_keeps_the_others_and_lists_it(tmp_path, monkeypatch, capsys):
    """A run that raised ended the study with a traceback: no JSON, no table, and the runs after
    it never trained. It is now listed as failed (exit 1) and the others go on."""
    from benchmarks import study

    real = study.train

    def flaky(cfg):
        if cfg.mode == "prefast" and cfg.seed == 0:
            raise RuntimeError("out of memory")
        return real(cfg)

    monkeypatch.setattr(study, "train", flaky)
    out = tmp_path / "fid.json"
    rc = fidelity.main(
        ["--dataset", "synthetic", "--num-samples", "100", "--epochs", "1", "--depth", "10",
         "--growth", "4", "--variants", "freezeout", "prefast-v1", "--seeds", "0", "1",
         "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert rc == 1
    res = json.loads(out.read_text())
    assert [(r["name"], r["seed"]) for r in res["runs"]] == [
        ("freezeout", 0), ("freezeout", 1), ("prefast-v1", 1)
    ]  # fmt: skip
    assert res["failed"] == [
        {"name": "prefast-v1", "seed": 0, "error": "RuntimeError('out of memory')"}
    ]
    assert (
        "FAILED prefast-v1 seed 0: RuntimeError('out of memory')"
        in out.with_suffix(".txt").read_text()
    )
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 3


def test_study_refuses_a_bad_configuration_before_its_first_run(tmp_path):
    """views.py --views 1 0 trained freezeout and prefast-v1 and then failed on prefast-v0 with
    a ConfigError traceback; the configurations are now checked before any run."""
    out = tmp_path / "views.json"
    with pytest.raises(SystemExit, match="prefast-v0 seed 0: --views: must be an integer >= 1"):
        views.main(
            ["--dataset", "synthetic", "--num-samples", "100", "--epochs", "1", "--views", "1",
             "0", "--no-floor", "--device", "cpu", "--out", str(out)]
        )  # fmt: skip
    assert not out.with_suffix(".jsonl").exists()


@pytest.mark.parametrize("views", ["-1", "0"])
def test_compare_refuses_a_bad_variant_before_it_trains_anything(tmp_path, views):
    """--extra-views -1 trained every other variant and then ended with the trainer's
    ConfigError traceback; every run's configuration is now checked before the profile.
    --extra-views 0 added no variant and said nothing."""
    out = tmp_path / "c.json"
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "ram", "--extra-views", views, "--no-full", "--no-plot", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit, match=rf"prefast-zarr-v{views} \(t0 0.6\): --views: must be"):
        compare.main(argv)
    assert not out.exists() and not out.with_suffix(".partial.json").exists()


@pytest.mark.parametrize(
    ("flags", "msg"),
    [
        (["--subset", "500"], "--subset: 500 exceeds the 100 training images"),
        (["--depth", "7"], "depth: must be an integer >= 10, got 7"),
    ],
)
def test_compare_refuses_data_or_a_model_it_cannot_make_in_one_line(flags, msg, tmp_path):
    """A --subset larger than the data or a --depth the model refuses passed the check of the
    configurations and ended in a ConfigError or ModelError traceback from the profile."""
    out = tmp_path / "c.json"
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--growth", "4", "--tiers",
            "ram", "--no-full", "--no-plot", "--no-progress", "--cache-dir",
            str(tmp_path / "cache"), "--out", str(out), *flags]  # fmt: skip
    with pytest.raises(SystemExit, match=msg) as e:
        compare.main(argv)
    assert isinstance(e.value.code, str)  # a message, not an exception's traceback
    assert not out.exists() and not out.with_suffix(".partial.json").exists()


def test_compile_choice_counts_tuned_graphs_and_needs_graphs_probed(tmp_path):
    """gpu.sh with PROBE_MODES="graphs+tuned" (or "none") probed every boundary without a
    failure, yet the scenario ran eager steps (--compile none): only rows named exactly
    "graphs" counted. A graphs+tuned row is a graphs row; a probe that tried no graphs leaves
    the choice to the trainer (auto)."""
    path = tmp_path / "probe.json"

    def probe(modes, row_modes, rc=0):
        rows = [{"boundary": b, "mode": m} for b in (0, 14) for m in row_modes]
        cfg = {"boundaries": [0, 14], "modes": modes}
        path.write_text(json.dumps({"config": cfg, "rows": rows}))
        return step_probe.compile_choice(path, rc)

    assert probe(["graphs+tuned"], ["graphs+tuned"]) == "graphs"
    assert probe(["none", "graphs+tuned"], ["none", "graphs+tuned"]) == "graphs"
    assert probe(["none"], ["none"]) == "auto"
    assert probe(["inductor"], ["inductor"]) == "auto"
    assert probe(["none", "graphs"], ["none"], rc=1) == "none"  # graphs failed at b=0


def _limits(tmp_path, **env):
    """gpu.sh's dry run with a stand-in ``timeout`` that records each stage's limit: per script
    or module it limits, (its limit in seconds, the seconds left as its stage began)."""
    import re

    bin_ = tmp_path / "bin"
    bin_.mkdir(parents=True)
    log = tmp_path / "timeouts.txt"
    (bin_ / "timeout").write_text(f'#!/bin/sh\necho "$1 $3 $4" >> {log}\nshift\nexec "$@"\n')
    r, _, _ = _gpu_sh(tmp_path, **env)
    assert r.returncode == 0, r.stderr
    left = [int(x) for x in re.findall(r"^== \d\. .*\((\d+) s left\)$", r.stdout, re.M)]
    out = {}
    for line, at_start in zip(log.read_text().splitlines(), left, strict=True):
        t, a, b = line.split()
        out[b if a == "-m" else a.split("/")[-1]] = (int(t), at_start)
    return out


@pytest.mark.slow
def test_gpu_sh_keeps_back_time_only_for_the_stages_it_runs(tmp_path):
    """Each stage's limit kept back what the default later stages need whether they ran or not:
    STAGES="scenario" cut the scenario 70 s before the deadline for tests and feed it would
    not run, and the feed stage left nothing for a named fidelity stage. (Each stage's limit
    is taken within a second or so of its stage's start: 10 s of slack.)"""
    t, left = _limits(tmp_path / "a", STAGES="scenario")["compare.py"]
    assert left - 13 <= t <= left - 3  # 3 s for the files' copy only
    # the probe's own limit (PROBE_TIMEOUT) was held to the deadline only: 600 s took the
    # whole budget, and every later stage was skipped
    got = _limits(tmp_path / "b", STAGES="probe scenario tests feed fidelity", PROBE_TIMEOUT="600")
    t, left = got["step_probe.py"]
    assert left - 230 <= t <= left - 220  # tests 70, feed 27, fidelity 120, copy 3
    t, left = got["compare.py"]
    assert left - 230 <= t <= left - 220  # tests 70, feed 27, fidelity 120, copy 3
    t, left = got["bench_feed.py"]
    assert left - 133 <= t <= left - 123  # fidelity 120, copy 3
    t, left = got["fidelity.py"]
    assert t >= 10 + 100  # its runs' budget, and 100 s for the last run


def test_bench_feed_sizes_the_consumers_python_on_an_epoch_after_the_warm_up(monkeypatch):
    """The consumer's Python per batch was sized on the warm-up epoch, whose first touches ran
    it several times slower than the epochs timed after (on 3,000 samples the Python alone
    took 7x the feed alone, not about as long). Stand-in epochs: 7 s warm, then 1 s."""
    from benchmarks import bench_feed

    epochs = iter([7.0, 1.0])
    monkeypatch.setattr(bench_feed, "_epoch", lambda loader, epoch, device: next(epochs))
    loader = [None] * 5  # 5 batches: 0.2 s a batch once warm, 7 iterations at 35 a second
    steps = bench_feed._steps_like_a_batch(loader, bench_feed.torch.device("cpu"), 35.0)
    assert steps == 7  # not 49, the warm-up's 1.4 s a batch


def test_bench_feed_gather_rates_count_only_the_samples_gathered(monkeypatch):
    """The gathers take whole batches only, but their rates are the epoch's bytes over their
    seconds: 30 samples in batches of 16 gathered 16 and were reported as 30 (at 3,000 and
    batch 256, 6.5 % too fast). Each np.take here costs one tick of a stand-in clock."""
    from benchmarks import bench_feed

    clock = [0.0]
    real_take = bench_feed.np.take

    def take(*a, **k):
        clock[0] += 1.0
        return real_take(*a, **k)

    monkeypatch.setattr(bench_feed.np, "take", take)
    monkeypatch.setattr(bench_feed.time, "perf_counter", lambda: clock[0])
    x = bench_feed.torch.zeros(30, 2, dtype=bench_feed.torch.float16)
    got = bench_feed._gathers(x, 16, 0, threads=1)
    # one batch of 16 gathered: an epoch of 30 samples at that rate
    assert got == {"take-buffered": 30 / 16, "take-direct": 30 / 16}


def test_bench_feed_refuses_fewer_samples_than_a_batch(capsys):
    """--num-samples 100 at the default batch 256 gathered nothing (rates of thousands of
    GB/s) and on CUDA divided by zero after every write had run."""
    from benchmarks import bench_feed

    with pytest.raises(SystemExit):
        bench_feed.main(["--num-samples", "100"])
    assert "--num-samples 100 must be at least --batch-size 256" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--shape", "3", "0"], "--shape: every size must be >= 1, got 3 0"),
        (["--shape", "-1"], "--shape: every size must be >= 1, got -1"),
        (["--device", "gpu"], "--device gpu: not a torch device"),
    ],
)
def test_bench_feed_refuses_a_bad_shape_or_device_in_one_line(argv, msg, tmp_path, capsys):
    """--shape 3 0 ended in store.create's traceback after the data was made, --shape -1 and
    --device gpu in torch's; each is now one line before anything runs."""
    from benchmarks import bench_feed

    with pytest.raises(SystemExit):
        bench_feed.main([*argv, "--num-samples", "300", "--dir", str(tmp_path)])
    assert msg in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_study_trains_a_configuration_and_seed_once(tmp_path):
    """--seeds 0 0 (or --views 1 1) trained the same run twice and counted it as two seeds:
    runs 2, a standard deviation of a run against itself."""
    out = tmp_path / "views.json"
    rc = views.main(
        ["--dataset", "synthetic", "--num-samples", "100", "--epochs", "1", "--depth", "10",
         "--growth", "4", "--views", "1", "1", "--seeds", "0", "0", "--no-floor", "--device",
         "cpu", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["name"], r["seed"]) for r in res["runs"]] == [("freezeout", 0), ("prefast-v1", 0)]
    assert all(s["runs"] == 1 and s["test_error_std"] is None for s in res["summary"])
    assert res["seeds"] == [0]  # the seeds its runs hold, once (it listed [0, 0])


def test_study_resume_refuses_runs_trained_with_other_options(tmp_path):
    """--resume took the JSONL's runs whatever options they trained with: seed 0 at 1 epoch
    and seed 1 at 2 were reported as two seeds of one configuration."""
    out = tmp_path / "fid.json"
    args = ["--dataset", "synthetic", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--variants", "freezeout", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert fidelity.main([*args, "--epochs", "1", "--seeds", "0"]) == 0
    with pytest.raises(SystemExit, match=r"holds freezeout seed 0 trained with other options "
                       r"\(epochs 1, not 2\)"):  # fmt: skip
        fidelity.main([*args, "--epochs", "2", "--seeds", "0", "1", "--resume"])
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 1
    # the same options resume as before
    assert fidelity.main([*args, "--epochs", "1", "--seeds", "0", "1", "--resume"]) == 0
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2


def _stand_in(seconds: float) -> dict[str, Any]:
    """What ``compare.run_variant`` returns for a run of ``seconds``, without training."""
    rec = {"epoch": 0, "train_seconds": seconds, "test_error": 0.5}
    return {
        "train_seconds": seconds, "cache_build_seconds": 0.0, "test_error": 0.5,
        "process_wall_seconds": seconds, "cache_bytes": 0, "peak_host_private_bytes": 0,
        "peak_gpu_bytes": 0, "records": [rec], "curve": [],
    }  # fmt: skip


def _runs_in_turn(times: list[float | None]) -> Any:
    """A stand-in ``compare.run_variant`` whose runs take ``times`` in turn (None: one that
    fails, out of memory)."""
    left = iter(times)

    def fake_run(cfg):
        t = next(left)
        if t is None:
            raise RuntimeError("out of memory")
        return _stand_in(t)

    return fake_run


def test_compare_partial_keeps_finished_t0s_and_failures(tmp_path, monkeypatch):
    """A run cut short kept its finished t0s marked incomplete and without their ratios, and
    left out a variant that failed after the last one to finish. Stand-in runs, no training:
    t0 0.8's prefast-ram fails in round 1, and the run is stopped (Ctrl-C) in round 2."""
    calls = []

    def fake_run(cfg):
        calls.append((cfg.t0, cfg.mode))
        if cfg.t0 == 0.8 and cfg.mode == "prefast":
            if len(calls) == 6:
                raise RuntimeError("disk full")
            raise KeyboardInterrupt
        return _stand_in(2.0 if cfg.mode == "freezeout" else 1.0)

    monkeypatch.setattr(compare, "run_variant", fake_run)
    out = tmp_path / "c.json"
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "ram", "--no-full", "--t0", "0.6", "0.8", "--rounds", "2", "--no-warm-up",
            "--no-plot", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        compare.main(argv)
    assert not out.exists()
    part = json.loads(out.with_suffix(".partial.json").read_text())
    done = part["runs"]["t0=0.6"]
    assert "incomplete" not in done
    assert {v["variant"]: v["vs_freezeout"] for v in done["variants"]} == {
        "freezeout": 1.0, "prefast-ram": 0.5
    }  # fmt: skip
    cut = part["runs"]["t0=0.8"]
    assert cut["incomplete"] is True and [v["variant"] for v in cut["variants"]] == ["freezeout"]
    assert cut["failed"] == [
        {"variant": "prefast-ram", "round": 0, "error": "RuntimeError('disk full')"}
    ]


def test_compare_rounds_ratio_pairs_the_rounds_both_finished(tmp_path, monkeypatch, capsys):
    """With --rounds, vs_freezeout divided a variant's mean over all its rounds by freezeout's
    mean over its own: freezeout failing in round 1 compared prefast's early and late rounds
    with freezeout's late one only. Stand-in runs: the machine slows from round 1 to round 2;
    prefast-ram takes 1 s then 3 s, freezeout fails then takes 4 s: 0.75, not 2/4 = 0.5."""
    # round 1: freezeout, ram; round 2 reversed
    monkeypatch.setattr(compare, "run_variant", _runs_in_turn([None, 1.0, 3.0, 4.0]))
    out = tmp_path / "c.json"
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "ram", "--no-full", "--t0", "0.6", "--rounds", "2", "--no-warm-up",
            "--no-plot", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]  # fmt: skip
    compare.main(argv)
    run = json.loads(out.read_text())["runs"]["t0=0.6"]
    v = {r["variant"]: r for r in run["variants"]}
    assert v["prefast-ram"]["train_seconds"] == 2.0
    assert v["prefast-ram"]["vs_freezeout"] == 0.75
    # the modelled saving vs full too (it took 2 s over 4: 1 - 0.5 x freezeout's share)
    fo_share = 1 - run["ideal"]["freezeout_saving"]
    assert v["prefast-ram"]["saving_vs_full"] == pytest.approx(1 - 0.75 * fo_share)
    assert v["prefast-ram"]["vs_freezeout_shared_rounds"] == 1
    assert v["freezeout"]["vs_freezeout"] == 1.0
    assert "vs freezeout over the 1 rounds both finished" in capsys.readouterr().out


def test_compare_trains_a_t0_or_tier_given_twice_once(tmp_path, monkeypatch):
    """--t0 0.6 0.6 trained every variant twice; the second overwrote the first in the result,
    so half the run's time went to runs it did not report. --tiers ram ram trained prefast-ram
    twice a round and listed it twice, each merged from both runs as if two rounds."""
    calls = []

    def fake_run(cfg):
        calls.append(cfg.mode)
        return _stand_in(1.0)

    monkeypatch.setattr(compare, "run_variant", fake_run)
    out = tmp_path / "c.json"
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "ram", "ram", "--no-full", "--t0", "0.6", "0.6", "--no-warm-up",
            "--no-plot", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]  # fmt: skip
    compare.main(argv)
    assert calls == ["freezeout", "prefast"]
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["t0=0.6"]
    assert [v["variant"] for v in runs["t0=0.6"]["variants"]] == ["freezeout", "prefast-ram"]


def test_compare_refuses_fewer_than_one_round(tmp_path, capsys):
    """--rounds 0 (or -2) ran one round and said nothing of it."""
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--rounds", "0", "--out", str(tmp_path / "c.json")])
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compare_rounds_ratio_to_full_pairs_the_rounds_both_finished(tmp_path, monkeypatch):
    """vs_full divided a variant's mean over all its rounds by full's over its own. Stand-in
    runs: full fails in round 1; prefast-ram takes 1 s then 3 s, full 8 s in round 2: 0.375,
    not 2/8 = 0.25."""
    # full, freezeout, ram; then reversed
    monkeypatch.setattr(compare, "run_variant", _runs_in_turn([None, 2.0, 1.0, 3.0, 4.0, 8.0]))
    out = tmp_path / "c.json"
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "ram", "--t0", "0.6", "--rounds", "2", "--no-warm-up", "--no-plot",
            "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    compare.main(argv)
    v = {r["variant"]: r for r in json.loads(out.read_text())["runs"]["t0=0.6"]["variants"]}
    assert v["prefast-ram"]["vs_full"] == 0.375
    assert v["prefast-ram"]["saving_vs_full"] == 0.625
    assert v["freezeout"]["vs_full"] == 0.5


def test_compare_gives_full_and_freezeout_no_cache_options(tmp_path, monkeypatch):
    """--views, --recache-policy, --cache-dtype and --feature-aug reached the full and freezeout
    runs, which warned of each as an option they do not use; they now reach the prefast
    variants only. Stand-in runs record each variant's config."""
    from prefast.config import unused_options

    seen = {}

    def fake_run(cfg):
        seen[(cfg.mode, cfg.cache)] = cfg
        return _stand_in(1.0)

    monkeypatch.setattr(compare, "run_variant", fake_run)
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "ram", "--t0", "0.6", "--no-warm-up", "--no-plot", "--no-progress",
            "--views", "2", "--recache-policy", "every", "--cache-dtype", "float32",
            "--feature-aug", "shift", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "c.json")]  # fmt: skip
    compare.main(argv)
    assert sorted(seen) == [("freezeout", "auto"), ("full", "auto"), ("prefast", "ram")]
    for mode in ("full", "freezeout"):
        assert unused_options(seen[(mode, "auto")], "cpu", False) == []
    ram = seen[("prefast", "ram")]
    assert (ram.views, ram.recache_policy, ram.cache_dtype, ram.feature_aug) == (
        2, "every", "float32", "shift"
    )  # fmt: skip


@pytest.mark.parametrize(("zarr_s", "words"), [(2.5, "25.0% more"), (1.5, "25.0% less")])
def test_compare_summary_says_more_when_prefast_is_slower(
    tmp_path, monkeypatch, capsys, zarr_s, words
):
    """The summary line said "-25.0% less wall-clock" for a prefast-zarr run slower than
    freezeout's; it now says "25.0% more". Stand-in runs: freezeout 2 s, prefast-zarr 2.5 or 1.5 s."""

    def fake_run(cfg):
        t = 2.0 if cfg.mode == "freezeout" else zarr_s
        return _stand_in(t)

    monkeypatch.setattr(compare, "run_variant", fake_run)
    argv = ["--quick", "--epochs", "1", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--tiers", "zarr", "--no-full", "--t0", "0.6", "--no-warm-up", "--no-plot",
            "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "c.json")]  # fmt: skip
    compare.main(argv)
    out = capsys.readouterr().out
    assert f"prefast-zarr vs freezeout: {words} wall-clock (cache passes 0.0% of its run)" in out
    assert "-25.0%" not in out


@pytest.mark.parametrize("flag", ["--steps", "--repeats", "--batch-size"])
def test_step_probe_refuses_no_steps_no_rounds_or_an_empty_batch(tmp_path, flag, capsys):
    """--steps 0 ended in a ZeroDivisionError, --repeats 0 in a StatisticsError and
    --batch-size 0 in 'the loss is not finite; lower --base-lr', each after the model was
    built; each is now refused at start."""
    out = tmp_path / "p.json"
    argv = ["--device", "cpu", "--depth", "10", "--growth", "4", "--batch-size", "4",
            "--modes", "none", "--boundaries", "0", "--out", str(out), flag, "0"]  # fmt: skip
    with pytest.raises(SystemExit):
        step_probe.main(argv)
    assert f"{flag} must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_plan_whatif_counts_the_paper_scenarios_subset_and_reads_only_cifar_ones(
    tmp_path, monkeypatch, capsys
):
    """--scenario paper planned 50,000 samples an epoch (1,000 steps, not its 2,000-image
    subset's 40), --scenario fmnist (28x28 grey images, no num_samples) ended in a KeyError,
    and a --log that is not there in a FileNotFoundError traceback."""
    from benchmarks import plan_whatif

    totals = []
    real = plan_whatif.FreezeSchedule

    def schedule(cfg, units, total):
        totals.append(total)
        return real(cfg, units, total)

    monkeypatch.setattr(plan_whatif, "FreezeSchedule", schedule)
    plan_whatif.plan("paper", 1e-6, [1e-6] * 9, "zarr", 5e9, 1e9)
    assert totals == [40 * 30]
    log = tmp_path / "run.log"
    log.write_text(
        f"measured costs per sample (eager): image 2.9 us, forward {[1.0] * 9} us; ...\n"
    )
    with pytest.raises(SystemExit):
        plan_whatif.main(["--log", str(log), "--scenario", "fmnist"])
    assert "invalid choice: 'fmnist'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan_whatif.main(["--log", str(tmp_path / "missing.log")])
    assert "--log: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--read", "nan", "--read and --write take finite rates"),
     ("--write", "inf", "--read and --write take finite rates"),
     ("--train-factor", "nan", "--train-factor must be >= 1 and finite")],
)  # fmt: skip
def test_plan_whatif_refuses_a_rate_or_factor_that_is_not_a_finite_number(
    tmp_path, capsys, flag, value, said
):
    """--read nan (or --train-factor nan) passed the checks, as nan compares false, and the
    table planned it: a nan read as a tier never read from, with a prediction to match."""
    from benchmarks import plan_whatif

    log = tmp_path / "run.log"
    log.write_text(f"measured costs per sample (eager): image 2.9 us, forward {[1.0] * 9} us\n")
    with pytest.raises(SystemExit):
        plan_whatif.main(["--log", str(log), "--scenario", "quick", flag, value])
    out = capsys.readouterr()
    assert said in out.err and "| zarr |" not in out.out


def test_step_ops_refuses_a_bad_option_in_one_line(tmp_path, capsys):
    """--epochs 0 ended in the trainer's ConfigError traceback."""
    with pytest.raises(SystemExit):
        step_ops.main(["--device", "cpu", "--epochs", "0", "--out", str(tmp_path / "o.json")])
    assert "--epochs: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_step_ops_and_step_probe_refuse_a_model_they_cannot_build_in_one_line(tmp_path, capsys):
    """--depth 7 (DenseNet-BC needs 10 or more) ended both in the ModelError traceback, and
    step_probe.py --device gpu in torch's RuntimeError; each is now one line."""
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit):
        step_ops.main(["--device", "cpu", "--depth", "7", "--out", str(out)])
    assert "depth: must be an integer >= 10, got 7" in capsys.readouterr().err
    argv = ["--device", "cpu", "--depth", "7", "--modes", "none", "--out", str(out)]
    with pytest.raises(SystemExit, match="depth: must be an integer >= 10, got 7"):
        step_probe.main(argv)
    with pytest.raises(SystemExit):
        step_probe.main(["--device", "gpu", "--modes", "none", "--out", str(out)])
    assert "--device gpu: not a torch device" in capsys.readouterr().err
    assert not out.exists()


def test_study_environment_is_the_one_its_runs_started_with(tmp_path, monkeypatch):
    """A study read its environment after its last run: a commit made while it ran (hours on a
    CPU) was recorded as the tree that ran, beside runs that each recorded the one before."""
    from benchmarks import study

    real = study.train

    def train(cfg):
        monkeypatch.setenv("PREFAST_COMMIT", "after")  # committed while the study runs
        return real(cfg)

    monkeypatch.setenv("PREFAST_COMMIT", "before")
    monkeypatch.setattr(study, "train", train)
    out = tmp_path / "fid.json"
    rc = fidelity.main(
        ["--dataset", "synthetic", "--num-samples", "100", "--epochs", "1", "--depth", "10",
         "--growth", "4", "--variants", "freezeout", "--seeds", "0", "--device", "cpu",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["environment"]["commit"] == "before" == res["runs"][0]["commit"]
    assert len(res["environment"]["loadavg_at_end_1_5_15"]) == 3


def test_bench_feed_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    """bench_feed.py wrote --out only at its end: gpu.sh's feed stage, stopped by its time
    limit, brought back nothing. The results so far are now saved after each part."""
    from benchmarks import bench_feed

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_feed, "_per_batch", stop)
    out = tmp_path / "feed.json"
    with pytest.raises(KeyboardInterrupt):
        bench_feed.main(
            ["--num-samples", "128", "--shape", "4", "8", "8", "--batch-size", "64",
             "--repeats", "1", "--dir", str(tmp_path), "--out", str(out)]
        )  # fmt: skip
    r = json.loads(out.read_text())
    assert r["partial"] is True and r["environment"]["commit"]
    assert set(r["write_s"]) >= {"zarr-path", "write_rows"} and "take-buffered" in r["gather_s"]
    assert "per_batch_us" not in r and r["feed_s"] == {}


def test_views_study_lists_the_view_counts_its_runs_hold(tmp_path):
    """views.py --resume with other --views kept the earlier runs but listed only this call's
    view counts under "views"."""
    out = tmp_path / "views.json"
    args = ["--dataset", "synthetic", "--num-samples", "100", "--epochs", "1", "--depth", "10",
            "--growth", "4", "--seeds", "0", "--no-floor", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert views.main([*args, "--views", "2"]) == 0
    assert views.main([*args, "--views", "1", "--resume"]) == 0
    res = json.loads(out.read_text())
    assert sorted(s["name"] for s in res["summary"]) == ["freezeout", "prefast-v1", "prefast-v2"]
    assert res["views"] == [1, 2]
    assert res["seeds"] == [0]


@pytest.mark.skipif(compare.torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    """--device cuda where there is no CUDA ended in torch's 'Found no NVIDIA driver'
    RuntimeError (compare.py, step_probe.py) or the trainer's ConfigError (the studies), each
    a traceback; each is now one line before anything runs."""
    out = str(tmp_path / "r.json")
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device here"):
        compare.main(["--quick", "--device", "cuda", "--no-plot", "--out", out])
    with pytest.raises(SystemExit):
        step_probe.main(["--device", "cuda", "--depth", "10", "--growth", "4", "--out", out])
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--device: cuda was asked for"):
        fidelity.main(["--device", "cuda", "--dataset", "synthetic", "--num-samples", "100",
                       "--out", out])  # fmt: skip
    assert not (tmp_path / "r.json").exists()


def test_study_resume_drops_a_last_line_cut_short(tmp_path):
    """A study killed while it wrote a run's line left half a JSON object as the JSONL's last
    line; --resume then stopped with a JSONDecodeError traceback. That run now trains again,
    and a bad line before the last still stops the study, naming it."""
    out = tmp_path / "fid.json"
    args = ["--dataset", "synthetic", "--num-samples", "100", "--depth", "10", "--growth", "4",
            "--variants", "freezeout", "--device", "cpu", "--epochs", "1", "--out", str(out)]  # fmt: skip
    assert fidelity.main([*args, "--seeds", "0"]) == 0
    jsonl = out.with_suffix(".jsonl")
    first = jsonl.read_text()
    jsonl.write_text(first + first[: len(first) // 2])  # seed 0 again, cut by a kill
    assert fidelity.main([*args, "--seeds", "0", "1", "--resume"]) == 0
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [(r["name"], r["seed"]) for r in rows] == [("freezeout", 0), ("freezeout", 1)]
    assert json.loads(out.read_text())["summary"][0]["runs"] == 2
    jsonl.write_text("{not json\n" + first)
    with pytest.raises(SystemExit, match=r"fid.jsonl line 1 is not JSON"):
        fidelity.main([*args, "--seeds", "0", "--resume"])


def test_the_full_variant_is_not_warned_about_the_scenarios_schedule():
    # compare.py built full training with the scenario's t0 (and cubic scaling), which a full
    # run does not use: every compare.py run logged '--t0, --how-scale: no effect with --mode
    # full' though the user gave neither
    import torch

    from prefast import TrainConfig
    from prefast.config import unused_options

    full = compare.variants_for(("ram",), torch.device("cpu"))[0]
    assert full.name == "full"
    cfg = TrainConfig(**{"t0": 0.6, "how_scale": "cubic", "scale_lr": False, **full.overrides})
    assert cfg.mode == "full" and unused_options(cfg, "cpu", False) == []
    assert unused_options(cfg.replace(t0=0.6), "cpu", False) != []  # what it was


def test_compare_draws_progress_bars_only_where_stderr_is_a_terminal(tmp_path, monkeypatch, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    seen = []

    def no_runs(sc, args, partial, env):  # the runs monkeypatched away
        seen.append(args.no_progress)
        return {"runs": {}}

    monkeypatch.setattr(compare, "run_scenario", no_runs)
    monkeypatch.setattr(compare, "format_tables", lambda res: "tables")
    argv = ["--quick", "--out", str(tmp_path / "cmp.json"), "--device", "cpu", "--no-plot"]
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert compare.main(argv) == 0
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert compare.main(argv) == 0
    assert compare.main([*argv, "--no-progress"]) == 0
    assert seen == [True, False, True]
