"""The store benchmark's tiny version runs end to end (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_store.py"
VARIANTS = ("raw", "lz4", "zstd", "ram")


@pytest.mark.slow
def test_bench_store_quick(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    work = tmp_path / "stores"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--dir", str(work)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]

    # The table goes to stdout, one row per variant.
    for heading in ("variant", "write GB/s", "read samples/s", "peak RssAnon MiB", "targets:"):
        assert heading in r.stdout
    for label in ("raw store (mmap)", "lz4 store (stream)", "zstd store (stream)", "RamCache"):
        assert label in r.stdout

    res = json.loads(out.read_text())
    assert res["config"]["num_samples"] == 3000
    assert res["environment"]["commit"]
    assert res["environment"]["versions"]["torch"]
    assert set(res["variants"]) == set(VARIANTS)
    for name in VARIANTS:
        v = res["variants"][name]
        read = v["read"]
        assert read["samples_per_s"]["median"] > 0
        assert read["gb_per_s"]["median"] > 0
        assert read["peak_rss_anon"] > 0
        assert [ep["samples"] for ep in read["epochs"]] == [3000, 3000]  # warm-up + 1 timed
        if name == "ram":
            assert "write" not in v
            assert read["ram_cache_bytes"] == res["config"]["array_bytes"]
        else:
            assert v["write"]["gb_per_s"]["median"] > 0
            assert len(v["write"]["seconds"]["values"]) == 1  # the warm-up write is not timed
            assert v["write"]["codec"] == (None if name == "raw" else name)
            assert v["write"]["disk_bytes"] > 0
            assert v["write"]["compression_ratio"] > 0
    # one untimed round, then the timed round in the reverse order
    writes = [
        ln.split("write ")[1].split(":")[0] for ln in r.stderr.splitlines() if " write " in ln
    ]
    assert writes == ["raw", "lz4", "zstd", "zstd 1/1", "lz4 1/1", "raw 1/1"]
    assert res["variants"]["raw"]["read"]["memory_mapped"]
    assert res["variants"]["lz4"]["read"]["streaming"]
    assert res["checksums_ok"]
    assert len(res["targets"]) == 2
    checks = res["comparisons"]["checks"]
    assert checks["first_epoch_ratio"] > 0 and checks["later_epoch_ratio"] > 0
    assert "chunk checksums, raw store" in r.stdout
    ds = res["comparisons"]["dataset"]
    assert set(ds["samples_per_s"]) == {"StoreLoader", "DataLoader"}
    assert all(v > 0 for v in ds["samples_per_s"].values())
    assert "DataLoader over ActivationDataset" in r.stdout

    # The stores are deleted unless --keep.
    assert not work.exists() or not any(work.iterdir())


def test_bench_store_refuses_a_bad_option_in_one_line_before_it_writes(tmp_path: Path) -> None:
    """--num-samples 0 ended in a ValueError traceback, and --chunk-samples 0 was taken as the
    default by the benchmark's own sizes but refused by store.create in a traceback after the
    data was generated; each is now one line, before anything is made."""
    from benchmarks import bench_store

    out, work = tmp_path / "r.json", tmp_path / "stores"
    for flag, msg in (
        ("--num-samples", "--num-samples must be >= 1, got 0"),
        ("--chunk-samples", "--chunk-samples must be >= 1, got 0"),
        ("--torch-threads", "--torch-threads must be >= 1, got 0"),
    ):
        argv = [flag, "0", "--out", str(out), "--dir", str(work)]
        with pytest.raises(SystemExit, match=msg):
            bench_store.main(argv)
    assert not out.exists() and not work.exists()
