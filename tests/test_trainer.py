"""Training modes, cache tiers, views, re-caching, resume, parity and the CLI's errors."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import store
from prefast import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    PrefastError,
    TrainConfig,
    train,
)
from prefast.cache.plan import CostModel, choose_tier, plan_boundaries, plan_boundary
from prefast.cli import main
from prefast.models import (
    UnitModel,
    create_model,
    from_sequential,
    register_model,
    unregister_model,
)
from prefast.training import Trainer, TrainResult
from prefast.training.step import StepRunner

TINY = dict(
    dataset="synthetic",
    num_samples=96,
    model="densenet_bc",
    model_args={"depth": 16, "growth": 8},
    epochs=3,
    batch_size=16,
    t0=0.3,
    how_scale="linear",
    seed=0,
    device="cpu",
    progress=False,
    eval_batch_size=256,
)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the parity test -----------------------------------------------------------------------------
@pytest.mark.parametrize("recache_mode", ["write-through", "pass"])
def test_prefast_from_fp32_zarr_cache_equals_freezeout(tmp_path, caplog, recache_mode):
    caplog.set_level(logging.INFO, logger="prefast")
    ref = train(tiny(mode="freezeout", augment=False, epochs=5))
    caplog.clear()
    got = train(
        tiny(
            mode="prefast",
            epochs=5,
            recache_mode=recache_mode,
            augment=False,
            cache="zarr",
            cache_dir=str(tmp_path / "cache"),
            cache_dtype="float32",
            codec="none",
            views=1,
            recache_policy="every",
        )
    )
    moves = [r for r in caplog.records if "cache boundary" in r.getMessage()]
    assert len(moves) >= 2, "the boundary must move at least twice"
    assert (
        got.summary["frozen_units"] >= 3
        and ref.summary["frozen_units"] == got.summary["frozen_units"]
    )
    assert got.summary["cache_tier"] == "zarr"
    if recache_mode == "pass":  # a pass at every freeze: the boundary follows the frontier
        assert got.summary["cache_boundary"] == got.summary["frozen_units"]
    else:  # each new cache is written by one epoch's steps and serves from the next
        assert 0 < got.summary["cache_boundary"] < got.summary["frozen_units"]
        assert any("through the training steps" in r.getMessage() for r in caplog.records)
        # unit 0 freezes at iteration 10 (epoch 1, step 4): its cache is written from there
        # and the epoch's first 4 steps' samples by a catch-up pass, exactly as well
        msgs = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("epoch 1, step 4: writing the cache at boundary 1") for m in msgs)
        assert any("64 samples no writing step visited" in m for m in msgs)
    assert len(got.losses) == len(ref.losses) == 30
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))
    torch.testing.assert_close(_weights(got.model), _weights(ref.model))
    # only the newest store is left, in the run's folder: superseded ones were deleted
    (run_dir,) = (tmp_path / "cache").iterdir()
    assert run_dir.name.startswith("run-")
    stores = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    assert stores == [f"boundary-{got.summary['cache_boundary']:03d}"]
    assert got.summary["cache_path"] == str(run_dir / stores[0])


def test_write_through_from_mid_epoch_stores_the_cached_view(tmp_path, caplog):
    """The first cache starts mid-epoch (unit 0 freezes at epoch 1, step 2): the steps from
    there write their samples, a catch-up pass the epoch's first two steps' samples, and the
    batches switch to the cached view's augmentation, so every row of every later store is the
    frozen prefix's output on that view, whichever wrote it."""
    from prefast.data import Augment, epoch_key, load_data, make_batch, view_key

    caplog.set_level(logging.INFO, logger="prefast")
    cfg = tiny(
        mode="prefast",
        epochs=4,
        augment=True,
        cache="zarr",
        cache_dir=str(tmp_path / "cache"),
        cache_dtype="float32",
        codec="none",
        recache_policy="every",
    )
    r = train(cfg)
    msgs = [m.getMessage() for m in caplog.records]
    assert any(m.startswith("epoch 1, step 2: writing the cache at boundary 1") for m in msgs)
    assert any(m.startswith("epoch 2, step 0: writing the cache at boundary 3") for m in msgs)
    assert r.summary["cache_boundary"] == 3
    train_data = load_data(cfg).train
    view = Augment.from_spec(train_data.spec, True).params(view_key(cfg.seed, 0), len(train_data))
    idx = torch.arange(len(train_data))
    x, _ = make_batch(train_data, idx, view, "cpu")
    r.model.eval()
    with torch.no_grad():
        want = r.model.forward_range(x, 0, 3)
    s = store.open(r.summary["cache_path"])
    try:
        got = s.read(0, idx.numpy())
    finally:
        s.close()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the first epoch's augmentation (not the cached view) would not match
    first = Augment.from_spec(train_data.spec, True).params(epoch_key(cfg.seed, 1), len(train_data))
    x0, _ = make_batch(train_data, idx, first, "cpu")
    with torch.no_grad():
        assert not torch.allclose(r.model.forward_range(x0, 0, 3), want, rtol=1e-4, atol=1e-4)


def test_write_through_catch_up_runs_at_the_given_batch_and_counts_the_steps_rows(caplog):
    """The catch-up pass computes the samples no step wrote in batches of the run's size (a
    larger batch is slower per sample on a CPU), and the epoch's log line counts the bytes the
    steps handed over."""
    from prefast.cache.write_through import WriteThrough

    class Sink:
        supports_rows = True

        def __init__(self):
            self.rows = torch.full((23, 2, 3), -1.0)

        def write_rows(self, view, idx, x, labels):
            self.rows[torch.as_tensor(idx)] = x.float()

        def close(self):
            pass

    sink = Sink()
    caplog.set_level(logging.INFO, logger="prefast")
    w = WriteThrough(
        target=2, sink=sink, tier="ram", path=None, fingerprint="f", meta={}, chain=(2,),
        labels=torch.arange(23) % 3, dtype="float32", device=torch.device("cpu"),
        batch_size=5, sample_shape=(2, 3), catch_up_batch=4,
    )  # fmt: skip
    visited = torch.tensor([3, 11, 0, 19, 7, 22, 15], dtype=torch.int64)
    w.take(visited[:, None, None].expand(7, 2, 3).float(), visited)
    sizes = []

    def compute(idx):
        sizes.append(len(idx))
        return torch.as_tensor(idx, dtype=torch.float32)[:, None, None].expand(len(idx), 2, 3)

    cache = w.finish(compute, lambda: sink.rows)
    assert sizes == [4, 4, 4, 4]  # the 16 unvisited samples, 4 at a time
    assert torch.equal(sink.rows[:, 1, 2], torch.arange(23, dtype=torch.float32))
    assert cache.boundary == 2
    (line,) = [r.getMessage() for r in caplog.records if "handed over" in r.getMessage()]
    assert w.take_bytes == 7 * 6 * 4 and "catch-up of 16 samples" in line


def test_write_through_catch_up_shows_a_progress_bar(tmp_path, capsys):
    """The catch-up pass computes up to an epoch's samples through the new frozen units, a
    cache pass in all but name: it had no bar (the step bar had closed, the epoch bar stood)."""
    from prefast.cache.write_through import WriteThrough

    class Sink:
        supports_rows = True

        def write_rows(self, view, idx, x, labels):
            pass

        def close(self):
            pass

    def finish(progress: bool) -> str:
        w = WriteThrough(
            target=2, sink=Sink(), tier="ram", path=None, fingerprint="f", meta={}, chain=(2,),
            labels=torch.arange(23) % 3, dtype="float32", device=torch.device("cpu"),
            batch_size=5, sample_shape=(2, 3), catch_up_batch=4, progress=progress,
        )  # fmt: skip
        w.finish(lambda idx: torch.zeros(len(idx), 2, 3), lambda: torch.zeros(23, 2, 3))
        return capsys.readouterr().err

    err = finish(progress=True)
    assert "cache catch-up at boundary 2 (ram):   0%" in err and "0/23" in err
    assert "catch-up" not in finish(progress=False)
    # a run hands its bars' setting over: unit 0 freezes at epoch 1, step 4, and the epoch's
    # first 4 steps' 64 samples are caught up at its end
    train(tiny(mode="prefast", epochs=2, cache="ram", recache_policy="every", progress=True))
    err = capsys.readouterr().err
    assert "cache catch-up at boundary 1 (ram):   0%" in err and "0/64" in err


@pytest.mark.parametrize(
    ("tier", "dtype", "batch_size"),
    [("ram", "float32", 16), ("device", "bfloat16", 16), ("zarr", "float16", 64)],
)
def test_every_row_written_through_is_the_frozen_prefix_output_at_odd_sizes(
    tmp_path, monkeypatch, tier, dtype, batch_size
):
    """33 samples: batches of 16 leave a last batch of one sample, and a batch of 64 is larger
    than the dataset (one step an epoch). Each cache written through, when it takes over, holds
    for every sample and label what the frozen units give in eval mode, hop by hop along its
    chain, each hop rounded to the cache dtype (to a rounding of that dtype)."""
    from prefast.cache.manager import CacheManager
    from prefast.data import Augment, load_data, make_batch, view_key

    taken = []
    end_epoch = CacheManager.end_epoch

    def snapshot(self, epoch):
        moved = end_epoch(self, epoch)
        if moved:
            c, n = self.cache, len(self.data.train)
            taken.append((c.chain, c.source.read(0, np.arange(n)).clone(), c.source.labels))
        return moved

    monkeypatch.setattr(CacheManager, "end_epoch", snapshot)
    cfg = tiny(
        mode="prefast", num_samples=33, batch_size=batch_size, epochs=4 if batch_size < 33 else 6,
        cache=tier, cache_dtype=dtype, cache_dir=str(tmp_path / "c"), recache_policy="every",
    )  # fmt: skip
    r = train(cfg)
    assert r.summary["cache_tier"] in (tier, "ram")  # --cache device on the CPU: host memory
    assert len(taken) >= 1 and all(x["samples_seen"] == 33 for x in r.records)
    wt = [x["write_through"] for x in r.records if x["write_through"]]
    assert len(wt) == len(taken)
    train_data = load_data(cfg).train
    view = Augment.from_spec(train_data.spec, True).params(view_key(cfg.seed, 0), 33)
    x, _ = make_batch(train_data, np.arange(33), view, "cpu")
    r.model.eval()
    eps = torch.finfo(getattr(torch, dtype)).eps
    for chain, got, labels in taken:
        h, b0 = x, 0
        with torch.no_grad():
            for b in chain:
                h, b0 = r.model.forward_range(h.float(), b0, b).to(got.dtype), b
        assert got.dtype == getattr(torch, dtype) and got.shape == h.shape
        # in 16 bits a value the steps computed a bit apart from this batch-of-33 forward can
        # round to the neighbouring step after two hops: a rounding step of the largest value
        atol = 1e-5 if dtype == "float32" else eps * float(h.float().abs().max())
        torch.testing.assert_close(got.float(), h.float(), rtol=2 * eps, atol=atol)
        assert torch.equal(labels.cpu(), train_data.labels.cpu())


# ---- modes and tiers -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "freezeout"])
def test_modes_train_and_freeze_as_scheduled(mode):
    r = train(tiny(mode=mode))
    assert len(r.records) == 3 and all(torch.isfinite(torch.tensor(r.losses)))
    # each epoch visits every one of the 96 samples once
    assert [(x["samples_seen"], x["samples_seen_twice"]) for x in r.records] == [(96, 0)] * 3
    if mode == "full":
        assert r.summary["frozen_units"] == 0
        assert all(p.requires_grad for p in r.model.parameters())
    else:
        n = r.summary["frozen_units"]
        assert n == 9  # t0 = 0.3 linear: the last unit freezes at t = 0.922
        assert all(not p.requires_grad for u in r.model.units[:n] for p in u.parameters())
        assert all(not u.training for u in r.model.units[:n])
    assert all(p.requires_grad for p in r.model.head.parameters())


@pytest.mark.parametrize(
    ("tier", "codec", "dtype"),
    [
        ("device", "none", "float16"),
        ("ram", "none", "bfloat16"),
        ("zarr", "none", "float16"),
        ("zarr", "lz4", "float16"),
    ],
)
def test_each_cache_tier_trains(tmp_path, tier, codec, dtype):
    r = train(
        tiny(
            mode="prefast",
            cache=tier,
            codec=codec,
            cache_dtype=dtype,
            cache_dir=str(tmp_path / "c"),
            recache_policy="transitions",
            views=2,
        )
    )
    assert r.summary["cache_tier"] == tier
    assert r.summary["cache_boundary"] in r.model.cut_points
    rec = [x for x in r.records if x["cache_tier"] == tier]
    assert rec and rec[-1]["cache_bytes"] > 0
    # the batches switch source mid-epoch and still visit every sample once
    assert all(x["samples_seen"] == 96 and x["samples_seen_twice"] == 0 for x in r.records)
    assert torch.isfinite(torch.tensor(r.losses)).all()
    if tier == "zarr":
        s = store.open(r.summary["cache_path"])
        assert (
            s.views == 2 and s.num_samples == 96 and s.codec == (None if codec == "none" else codec)
        )
        assert s.meta["boundary"] == r.summary["cache_boundary"] and s.meta["model"]["depth"] == 16
        assert s.meta["fingerprint"] and s.meta["data"]["dataset"] == "synthetic"


@pytest.mark.parametrize("recache_mode", ["write-through", "pass"])
def test_a_compressed_store_takes_over_at_an_epochs_end(tmp_path, caplog, recache_mode):
    """A compressed store is read in its own chunk order, not the epoch's permutation: a cache
    due mid-epoch (the first freeze comes at step 5 of 6) is built and read from the epoch's
    end, so every epoch still visits each sample once (it visited 13 twice in epoch 0)."""
    caplog.set_level(logging.INFO, logger="prefast")
    kw = dict(mode="prefast", cache="zarr", codec="lz4", recache_policy="every", t0=0.25)
    r = train(tiny(**kw, recache_mode=recache_mode, cache_dir=str(tmp_path / "c")))
    assert [(x["samples_seen"], x["samples_seen_twice"]) for x in r.records] == [(96, 0)] * 3
    assert [x["cache_boundary"] for x in r.records] == [1, 5, 5]  # none built in the last epoch
    said = [rec.getMessage() for rec in caplog.records]
    assert any("boundary 1 is cached at the end of epoch 0" in m for m in said)
    assert any("is not cached (the last epoch: no later one would read it)" in m for m in said)
    assert any("end of epoch 0: cache boundary 0 -> 1 (zarr)" in m for m in said)
    assert store.open(r.summary["cache_path"]).meta["boundary"] == 5


def test_the_start_up_line_names_every_reason_for_cache_passes(tmp_path, caplog):
    # it named the first only: a user who dropped --views 2 still got passes, from the codec
    caplog.set_level(logging.INFO, logger="prefast")
    train(tiny(mode="prefast", cache="zarr", codec="lz4", views=2, epochs=2,
               cache_dir=str(tmp_path / "c")))  # fmt: skip
    said = [x.getMessage() for x in caplog.records if x.getMessage().startswith("re-caching:")]
    assert said == [
        "re-caching: separate cache passes (--views 2: each view is its own pass over the "
        "images; --codec lz4: compressed chunks are written whole)"
    ]


@pytest.mark.parametrize(
    ("tier", "fraction", "written"), [("ram", 0.5, "ram"), ("auto", 1e-12, "zarr")]
)
def test_a_codec_sends_only_store_caches_to_passes(tmp_path, caplog, tier, fraction, written):
    """--codec zstd compresses stores, which then take no rows: with --cache auto a cache that
    goes to the store is made by a pass (compressed), one in RAM is written through; with
    --cache ram the codec is ignored, with a warning."""
    caplog.set_level(logging.INFO, logger="prefast")
    r = train(
        tiny(
            mode="prefast",
            cache=tier,
            codec="zstd",
            cache_dir=str(tmp_path / "c"),
            recache_policy="every",
            cache_memory_fraction=fraction,
        )
    )
    said = [x.getMessage() for x in caplog.records]
    assert any("re-caching: write-through" in m for m in said), said
    assert r.summary["cache_tier"] == written
    if written == "zarr":
        assert any("which takes no rows (--codec zstd" in m for m in said), said
        assert not any("written through" in m for m in said), said
        assert store.open(r.summary["cache_path"]).codec == "zstd"
    else:
        assert any("the ram tier ignores it" in m for m in said), said
        assert any("(ram, written through)" in m for m in said), said


@pytest.mark.parametrize(
    ("requested", "device", "free_device", "free_host", "tier"),
    [
        ("ram", "cpu", 0, 100, "ram"),  # fits all of the memory: kept, whatever the fraction
        ("ram", "cpu", 0, 99, "zarr"),
        ("device", "cuda", 100, 0, "device"),
        ("device", "cuda", 99, 100, "ram"),
        ("device", "cuda", 99, 99, "zarr"),
        ("device", "cpu", 0, 100, "device"),  # a CPU's device memory is host memory
        ("device", "cpu", 10**9, 99, "zarr"),
        ("zarr", "cuda", 10**9, 10**9, "zarr"),
        ("auto", "cuda", 199, 10**9, "ram"),  # auto: within the fraction (0.5)
    ],
)
def test_an_explicit_tier_the_cache_cannot_fit_falls_to_the_next(
    requested, device, free_device, free_host, tier
):
    assert choose_tier(requested, 100, device, 0.5, free_device, free_host) == tier


def test_a_ram_cache_larger_than_the_free_memory_goes_to_a_store(tmp_path, monkeypatch, caplog):
    """--cache ram whose cache would not fit the host's free memory: allocating it failed
    with a bare RuntimeError, or the process was killed for memory, after the epochs before
    it. The cache goes to a store instead, said once per boundary, to the same result."""
    import prefast.cache.manager as M

    kw = dict(mode="prefast", cache_dtype="float32", recache_policy="every", epochs=3)
    ref = train(tiny(**kw, cache="zarr", cache_dir=str(tmp_path / "ref")))
    monkeypatch.setattr(M, "free_memory", lambda device: (0, 1000))
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(tiny(**kw, cache="ram", cache_dir=str(tmp_path / "c")))
    said = [r.getMessage() for r in caplog.records]
    warned = [m for m in said if m.startswith("--cache ram: the cache at boundary")]
    assert "more than the 1e-06 GB of host memory free now; it goes to the store" in warned[0]
    # said once for each cache made, not for every boundary a plan looks at
    made = [int(m.split("-> ")[1].split()[0]) for m in said if "cache boundary" in m]
    assert [int(m.split()[6]) for m in warned] == made and made, said
    assert got.summary["cache_tier"] == "zarr"
    assert store.open(got.summary["cache_path"]).num_samples == 96
    assert got.losses == ref.losses


def test_a_ram_cache_that_goes_to_a_store_says_the_codec_applies(tmp_path, monkeypatch, caplog):
    """--cache ram --codec zstd said the codec was ignored; a cache too large for RAM went to
    a store compressed with it, and no line said so."""
    import prefast.cache.manager as M

    monkeypatch.setattr(M, "free_memory", lambda device: (0, 1000))
    caplog.set_level(logging.INFO, logger="prefast")
    # every move caches: a timed plan on a loaded machine may find no cache pays, and make none
    got = train(tiny(mode="prefast", cache="ram", codec="zstd", recache_policy="every",
                     cache_dir=str(tmp_path / "c")))  # fmt: skip
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--codec zstd applies to stores only: the ram tier ignores it (a "
                            "cache too large for that memory goes to a store, which uses it)")
               for m in said), said  # fmt: skip
    warned = [m for m in said if m.startswith("--cache ram: the cache at boundary")]
    assert warned and all(
        m.endswith("store (on disk), compressed with --codec zstd instead") for m in warned
    )
    assert store.open(got.summary["cache_path"]).codec == "zstd"
    # said once for each cache made: not again by the pass a write-through falls back to, nor
    # at the freeze of a cache made at the epoch's end (or never: a later one replaced it)
    made = [int(m.split("-> ")[1].split()[0]) for m in said if "cache boundary" in m]
    assert [int(m.split()[6]) for m in warned] == made and len(made) > 1, said


def test_a_cache_written_from_an_epochs_second_step_says_first_step(caplog):
    caplog.set_level(logging.INFO, logger="prefast")
    train(tiny(mode="prefast", cache="ram", recache_policy="every", t0=0.4, batch_size=32))
    said = [r.getMessage() for r in caplog.records if "writing the cache" in r.getMessage()]
    assert said and said[0].startswith("epoch 1, step 1: writing the cache at boundary"), said
    assert said[0].endswith("; the epoch's first step's samples at its end"), said


def _cgroup(root: Path, rel: str, files: dict[str, str]) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_host_memory_counts_a_memory_cgroups_limit(tmp_path):
    """A container, a SLURM job or a systemd unit limits memory with a cgroup, which
    /proc/meminfo does not show: the headroom is the least of each level's limit less its
    usage, page cache the kernel drops first (inactive files) not counted as used."""
    from prefast.monitor import cgroup_memory_headroom

    mib = 1 << 20
    # cgroup v2: the job's group (300 MiB limit, 250 used of which 100 inactive page cache)
    # under a parent with no limit ("max")
    v2 = tmp_path / "v2"
    _cgroup(v2, "", {"cgroup.controllers": "cpu memory", "memory.max": "max"})
    _cgroup(v2, "job", {"memory.max": "max", "memory.current": str(900 * mib)})
    _cgroup(v2, "job/step", {"memory.max": str(300 * mib), "memory.current": str(250 * mib),
                             "memory.stat": f"anon 1\ninactive_file {100 * mib}\n"})  # fmt: skip
    (tmp_path / "cg2").write_text("0::/job/step\n")
    assert cgroup_memory_headroom(str(tmp_path / "cg2"), str(v2)) == 150 * mib
    # a parent nearer its own limit wins
    (v2 / "job" / "memory.max").write_text(str(1000 * mib))
    assert cgroup_memory_headroom(str(tmp_path / "cg2"), str(v2)) == 100 * mib
    # cgroup v1 (a path the container cannot see: its own group is the mount's root); "no
    # limit" is written as a number near 2**63
    v1 = tmp_path / "v1"
    _cgroup(v1, "memory", {"memory.limit_in_bytes": str(200 * mib),
                           "memory.usage_in_bytes": str(190 * mib),
                           "memory.stat": f"inactive_file 0\ntotal_inactive_file {40 * mib}\n"})  # fmt: skip
    (tmp_path / "cg1").write_text("5:cpu:/x\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_memory_headroom(str(tmp_path / "cg1"), str(v1)) == 50 * mib
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_memory_headroom(str(tmp_path / "cg1"), str(v1)) is None
    # no cgroup file, or none with memory
    assert cgroup_memory_headroom(str(tmp_path / "none"), str(v1)) is None


def test_cache_auto_goes_to_the_store_where_a_cgroup_leaves_little_memory(tmp_path, monkeypatch):
    """--cache auto in a job whose memory cgroup has 1 MiB left: the store, not RAM that the
    host has free but the job may not take."""
    import prefast.monitor as mon

    v2 = tmp_path / "v2"
    _cgroup(v2, "", {"cgroup.controllers": "memory", "memory.max": str(101 << 20),
                     "memory.current": str(100 << 20)})  # fmt: skip
    (tmp_path / "cg").write_text("0::/\n")
    monkeypatch.setattr(mon, "PROC_CGROUP", str(tmp_path / "cg"))
    monkeypatch.setattr(mon, "CGROUP_ROOT", str(v2))
    assert mon.available_host_bytes() == 1 << 20
    r = train(tiny(mode="prefast", cache="auto", recache_policy="every",
                   cache_dir=str(tmp_path / "c")))  # fmt: skip
    assert r.summary["cache_tier"] == "zarr"


def test_views_are_distinct_augmentations(tmp_path):
    r = train(
        tiny(
            mode="prefast",
            cache="zarr",
            cache_dir=str(tmp_path / "c"),
            recache_policy="every",
            views=3,
            cache_dtype="float32",
        )
    )
    s = store.open(r.summary["cache_path"])
    a, b = s.read(0, range(96)), s.read(1, range(96))
    assert s.views == 3 and not torch.equal(a, b)


def test_transitions_policy_only_moves_to_cut_points(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prefast")
    r = train(tiny(mode="prefast", cache="ram", recache_policy="transitions"))
    bounds = [
        int(m.getMessage().split("->")[1].split()[0])
        for m in caplog.records
        if "cache boundary" in m.getMessage()
    ]
    assert bounds and set(bounds) <= set(r.model.cut_points)


def test_auto_policy_plans_the_cheapest_boundaries():
    cost = CostModel(
        unit_fwd=[1e-3] * 4, image=1e-4, read_rate={"ram": 1e9}, write_rate={"ram": 1e9}
    )
    kw = dict(batch_size=50, num_samples=100, views=1, cost=cost, tier_of=lambda b: "ram")
    small = [4000, 1000, 1000, 1000, 1000]  # read/write 1 us per sample past the images
    # one event, frontier 3: a pass costs 100 * (image + 3 ms + 1 us) = 0.31 s; it saves
    # 3.1 ms per sample still to train: not worth it for 50 samples, worth it for 500
    assert plan_boundaries([(0, 3)], 1, sample_bytes=small, **kw).bounds == [0]
    assert plan_boundaries([(0, 3)], 10, sample_bytes=small, **kw).bounds == [3]
    # two events: with a cheap boundary 1, caching it first and moving on later is cheapest
    assert plan_boundaries([(0, 1), (2, 3)], 20, sample_bytes=small, **kw).bounds == [1, 3]
    # with an expensive boundary 1 (1 ms to read or write a sample) it is skipped: the plan
    # waits for frontier 3, which a greedy look at event 0 alone would not know is coming
    big1 = [4000, 10**6, 1000, 1000, 1000]
    assert plan_boundaries([(0, 1), (2, 3)], 20, sample_bytes=big1, **kw).bounds == [0, 3]
    # an existing cache is kept when moving does not pay
    assert plan_boundaries(
        [(5, 4)], 6, sample_bytes=small, boundary=3, tier="ram", **kw
    ).bounds == [3]
    assert plan_boundary("every", 0, 3, (1,)) == 3
    assert plan_boundary("transitions", 0, 3, (1, 4)) == 1
    assert plan_boundary("transitions", 1, 3, (1, 4)) == 1


def _followed(plan, events, total, ipe, kw, chunked):
    """Seconds of a run that follows a pass-mode ``plan`` as CacheManager does, step by step:
    a move from or to a ``chunked`` store asked for inside an epoch is made by one pass at the
    epoch's end (none after the last), reading the current cache until then."""
    cost, sb, tiers = kw["cost"], kw["sample_bytes"], kw["tiers"]
    n, batch = kw["num_samples"], kw["batch_size"]
    asked = {it: b for (it, _), b in zip(events, plan, strict=True)}
    frontier_at = dict(events)
    read_b, held, frontier, seconds = 0, 0, 0, 0.0

    def read(b):
        return cost.image if b == 0 else cost.read(tiers[b], sb[b])

    def one_pass(b0, b1):
        return n * (read(b0) + cost.fwd(b0, b1) + cost.write(tiers[b1], sb[b1]))

    for j in range(events[0][0], total):
        if j % ipe == 0 and held > read_b:  # the end of the epoch before
            seconds += one_pass(read_b, held)
            read_b = held
        if j in asked:
            frontier = frontier_at[j]
            b = max(held, asked[j])
            waits = j % ipe and ((read_b and tiers[read_b] in chunked) or tiers[b] in chunked)
            if b > held and waits:
                held = b
            elif b > held:
                seconds += one_pass(read_b, b)
                read_b = held = b
        tier = tiers[read_b] if read_b else None
        seconds += batch * cost.step(read(read_b), 0.0, tier, read_b, max(read_b, frontier))
    return seconds


def test_the_pass_plan_prices_a_move_to_a_chunked_store_at_the_epochs_end():
    """With --codec or a remote --cache-dir, a cache due mid-epoch is made at the epoch's end
    (none in the last epoch): the plan prices it so, and follows the cheapest run there is."""
    cost = CostModel(
        unit_fwd=[1e-3] * 4, image=1e-4, read_rate={"zarr": 1e9}, write_rate={"zarr": 1e9}
    )
    small = [4000, 1000, 1000, 1000, 1000]  # 1 us to read or write a sample past the images
    kw = dict(batch_size=10, num_samples=100, views=1, cost=cost, sample_bytes=small,
              tier_of=lambda b: "zarr")  # fmt: skip
    chunked = frozenset({"zarr"})
    # frontier 3 at step 5 of epoch 0 (of 2, 10 steps each): a pass costs 100 x 3.101 ms =
    # 310.1 ms and saves 3.099 ms a sample: made now it saves 150 samples (464.9 ms), made at
    # the epoch's end only epoch 1's 100 (309.9 ms), less than the pass
    assert plan_boundaries([(5, 3)], 20, **kw).bounds == [3]  # a raw store: switched now
    assert plan_boundaries([(5, 3)], 20, iters_per_epoch=10, **kw).bounds == [3]
    assert plan_boundaries([(5, 3)], 20, iters_per_epoch=10, chunked=chunked, **kw).bounds == [0]
    # with 3 epochs the one made at epoch 0's end pays: it is asked for at the freeze
    assert plan_boundaries([(5, 3)], 30, iters_per_epoch=10, chunked=chunked, **kw).bounds == [3]
    # any plan followed as the manager does costs at least what the planner's choice costs
    rng = np.random.default_rng(0)
    for _ in range(150):
        units = int(rng.integers(1, 4))
        tiers = [str(t) for t in rng.choice(["ram", "zarr"], units + 1)]
        c = CostModel(unit_fwd=list(rng.choice([1e-5, 1e-3, 3e-3], units)), image=1e-4,
                      read_rate={"ram": 1e9, "zarr": float(rng.choice([1e6, 1e8]))},
                      write_rate={"ram": 1e9, "zarr": float(rng.choice([1e6, 1e8]))},
                      overlap=bool(rng.integers(2)))  # fmt: skip
        sb = [int(v) for v in rng.integers(100, 10_000, units + 1)]
        ipe, epochs = int(rng.integers(2, 6)), int(rng.integers(1, 4))
        total = ipe * epochs
        its = sorted(int(i) for i in rng.choice(total, min(3, total), replace=False))
        fronts = sorted(int(f) for f in rng.integers(1, units + 1, len(its)))
        events = list(zip(its, fronts, strict=True))
        k = dict(batch_size=5, num_samples=int(rng.integers(5, 60)), views=1, cost=c,
                 sample_bytes=sb, tier_of=tiers.__getitem__)  # fmt: skip
        priced = plan_boundaries(events, total, iters_per_epoch=ipe, chunked=chunked, **k)
        got = priced.bounds
        sim = {**k, "tiers": tiers}
        plans: list[list[int]] = [[0]]  # every plan, after a leading 0: boundaries only grow
        for _, f in events:
            plans = [[*p, b] for p in plans for b in range(p[-1], max(p[-1], f) + 1)]
        plans = [p[1:] for p in plans]
        cheapest = min(_followed(p, events, total, ipe, sim, chunked) for p in plans)
        assert _followed(got, events, total, ipe, sim, chunked) == pytest.approx(cheapest)
        # and predicts what following it costs, and what holding no cache would
        assert priced.seconds == pytest.approx(cheapest)
        held = [0] * len(events)
        assert priced.baseline_seconds == pytest.approx(
            _followed(held, events, total, ipe, sim, chunked)
        )


def test_write_through_plan_writes_when_the_saved_steps_pay_for_the_writes():
    from prefast.cache.plan import plan_epochs

    def cost(write_rate: float, overlap: bool = False) -> CostModel:
        return CostModel(unit_fwd=[1e-3] * 4, image=1e-4, read_rate={"ram": 1e9},
                         write_rate={"ram": write_rate}, overlap=overlap)  # fmt: skip

    small = [4000, 1000, 1000, 1000, 1000]  # 1 us to read or write a sample past the images
    kw = dict(batch_size=10, sample_bytes=small, tier_of=lambda b: "ram")
    # frontier 3 from epoch 0 on, 3 epochs of 10 steps: writing 3 in epoch 0 (1 us per
    # sample extra) saves 3 ms of frozen forward per sample in epochs 1 and 2
    p = plan_epochs([[(10, 3)]] * 3, cost=cost(1e9), **kw)
    assert p.targets == [3, 3, 3] and p.seconds < p.baseline_seconds
    # the last epoch never writes: nothing would read it
    assert plan_epochs([[(10, 3)]], cost=cost(1e9), **kw).targets == [0]
    # writes slower than the forward they save (1 GB/s -> 1 kB/s): no cache
    assert plan_epochs([[(10, 3)]] * 3, cost=cost(1e3), **kw).targets == [0, 0, 0]
    # a frontier known to reach 3 in epoch 1 and 1 in epoch 0: write 1 first only if it pays
    # before 3 can be written; here it does (two epochs at boundary 1 before 3 serves)
    p = plan_epochs([[(10, 1)], [(10, 3)], [(10, 3)], [(10, 3)]], cost=cost(1e9), **kw)
    assert p.targets[:2] == [1, 3]
    assert len(p.epoch_seconds) == 4 and sum(p.epoch_seconds) == pytest.approx(p.seconds)
    # epoch 3 reads the cache at 3: 100 samples at read 1 us + 3 x (1 ms) of training
    assert p.epoch_seconds[3] == pytest.approx(100 * 3.001e-3)
    # a frontier that reaches 3 after 4 steps of epoch 0: write 3 from step 4 and the first
    # 4 steps' samples in a catch-up pass, rather than an epoch later
    p = plan_epochs([[(4, 0), (6, 3)], [(10, 3)], [(10, 3)]], cost=cost(1e9), **kw)
    assert p.targets == [3, 3, 3] and p.starts == [4, 0, 0]
    # the catch-up is priced: with 4 steps of an epoch under way (elapsed) and 6 left, per
    # sample: writing steps 6.101 ms (image 0.1 + forward 3 + train 3 + write 0.001), catch-up
    # 3.101 ms (image + forward + write), steps from the cache at 3 3.001 ms
    p = plan_epochs([[(6, 3)], [(10, 3)], [(10, 3)]], cost=cost(1e9), elapsed=4, **kw)
    assert p.targets == [3, 3, 3] and p.starts == [0, 0, 0]
    assert p.seconds == pytest.approx(60 * 6.101e-3 + 40 * 3.101e-3 + 200 * 3.001e-3)
    # ... broken down by epoch: the writing epoch carries its steps and its catch-up pass
    assert p.epoch_seconds == pytest.approx(
        [60 * 6.101e-3 + 40 * 3.101e-3, 100 * 3.001e-3, 100 * 3.001e-3]
    )
    # ... and declined when it costs more than waiting for the next epoch
    p = plan_epochs([[(6, 3)], [(10, 3)], [(10, 3)]], cost=cost(1e9), elapsed=1000, **kw)
    assert p.targets == [0, 3, 3]
    # a store that takes no rows (compressed, remote) is made by a pass when its stretch
    # begins, which no step overlaps: on CUDA (steps cost max(host, device)) a 5 ms write
    # hides behind a 6 ms step but not in a pass (image 0.1 + forward 3 + write 5 ms a sample)
    slow = CostModel(unit_fwd=[1e-3] * 4, image=1e-4, read_rate={"zarr": 1e9},
                     write_rate={"zarr": 2e5}, overlap=True)  # fmt: skip
    kz = dict(batch_size=10, sample_bytes=small, tier_of=lambda b: "zarr", cost=slow)
    assert plan_epochs([[(10, 3)]] * 2, **kz).targets == [3, 3]
    p = plan_epochs([[(10, 3)]] * 2, pass_tiers=frozenset({"zarr"}), num_samples=100, **kz)
    assert p.targets == [0, 0] and p.seconds == pytest.approx(200 * 6e-3)
    # ... and where it pays (1 ms writes), the pass and the steps after it are what is priced:
    # a pass due mid-epoch is made at the epoch's end (a store read a chunk at a time is not
    # read from the middle of an epoch), so the epoch's later steps still read the images
    fast = CostModel(unit_fwd=[1e-3] * 4, image=1e-4, read_rate={"zarr": 1e9},
                     write_rate={"zarr": 1e6}, overlap=True)  # fmt: skip
    kf = dict(pass_tiers=frozenset({"zarr"}), num_samples=100, **{**kz, "cost": fast})
    p = plan_epochs([[(4, 0), (6, 3)], [(10, 3)], [(10, 3)]], **kf)
    assert p.targets[1:] == [3, 3]
    # 40 samples from the images with nothing frozen (4 units trained: 12 ms), 60 with 3 frozen
    # (6 ms), the pass (0.1 + 3 + 1 ms a sample), 200 samples from the cache (3 ms of training,
    # the read hidden); the pass at epoch 0's end or epoch 1's start costs the same
    assert p.seconds == pytest.approx(40 * 12e-3 + 60 * 6e-3 + 100 * 4.1e-3 + 200 * 3e-3)
    # a pass at an epoch's first step is made then, and that epoch reads it
    p = plan_epochs([[(10, 3)], [(10, 3)], [(10, 3)]], **kf)
    assert p.targets == [3, 3, 3] and p.starts == [0, 0, 0]
    assert p.seconds == pytest.approx(100 * 4.1e-3 + 300 * 3e-3)
    # nothing is made in the last epoch, whose cache would never be read: a frontier that
    # reaches 3 only there leaves the plan without a cache, however much it would save
    p = plan_epochs([[(10, 0)], [(1, 0), (99, 3)]], **kf)
    assert p.targets == [0, 0] and p.seconds == p.baseline_seconds
    # on CUDA a step costs max(host, device): a host read cheaper than the device's forward is
    # hidden, so reading the cache costs nothing extra over the images
    c = cost(1e9, overlap=True)
    assert c.step(5e-3, 0.0, "ram", 1, 3) == c.step(0.0, 0.0, "ram", 1, 3)
    assert cost(1e9).step(5e-3, 0.0, "ram", 1, 3) > cost(1e9).step(0.0, 0.0, "ram", 1, 3)


@pytest.mark.parametrize(("tier", "memory", "stores"), [("zarr", [], 1), ("ram", [{"ram"}], 0)])
def test_the_planner_probes_only_the_tiers_a_cache_can_go_to(
    tmp_path, monkeypatch, tier, memory, stores
):
    import prefast.cache.manager as M

    calls: dict[str, list] = {"memory": [], "store": []}
    memory_rates, store_rates = M.measure_tier_rates, M.measure_store_rates

    limits = []

    def spy_memory(*a, **k):
        calls["memory"].append(set(a[4]))
        limits.append(k)
        return memory_rates(*a, **k)

    def spy_store(*a, **k):
        calls["store"].append({n: k[n] for n in ("flush", "prepared")})
        limits.append({n: k[n] for n in ("seconds", "max_samples")})
        return store_rates(*a, **k)

    monkeypatch.setattr(M, "measure_tier_rates", spy_memory)
    monkeypatch.setattr(M, "measure_store_rates", spy_store)
    if tier == "ram":  # as if the rest of the run were long: the steady limit holds
        monkeypatch.setattr(M, "PROBE_SHARE", 1e9)
    r = train(tiny(mode="prefast", cache=tier, cache_dir=str(tmp_path / "c"), epochs=4))
    assert calls["memory"] == memory
    assert calls["store"] == [{"flush": True, "prepared": False}] * stores  # a CPU run
    # where the plan makes a cache (a loaded machine's timings may leave it none), its tier
    assert r.summary["cache_tier"] in (tier, None)
    # each probe's tier holds at most the run's samples; its time is 1 % of the rest of a
    # run of a few seconds, at most the steady limit
    (lim,) = limits
    assert lim["max_samples"] == r.summary["train_samples"]
    if tier == "ram":
        assert lim["seconds"] == M.STEADY_SECONDS
    else:  # the share, not the steady limit: a few seconds' run is ~0.05 s (more on a loaded
        # machine, which once gave 0.1 s and more; never near the 1 s of the steady limit)
        assert 0 < lim["seconds"] < M.STEADY_SECONDS / 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_planner_times_the_units_on_input_laid_out_as_the_steps_take_it(
    monkeypatch, caplog, channels_last
):
    import prefast.cache.manager as M

    seen = []
    real = M.measure_unit_forward

    def spy(model, x, stop, device, **kw):
        seen.append((x.shape[1], x.is_contiguous(memory_format=torch.channels_last), kw))
        return real(model, x, stop, device, **kw)

    monkeypatch.setattr(M, "measure_unit_forward", spy)
    caplog.set_level(logging.INFO, logger="prefast")
    train(tiny(mode="prefast", cache="ram", epochs=4, channels_last=channels_last))
    # eager on a CPU (no graphs to replay), once per run, in the steps' memory format
    assert seen == [(3, channels_last, {"graphs_amp": None})]
    assert caplog.text.count("measured costs per sample (eager)") == 1
    assert "a training step from the input priced at" in caplog.text


def test_unit_forwards_are_timed_as_replayed_graphs_only_on_cuda():
    from prefast.cache.probes import measure_unit_forward
    from prefast.models import create_model

    model = create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=16, growth=8
    )
    x = torch.randn(5, 3, 32, 32)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        measure_unit_forward(model, x, model.num_units, torch.device("cpu"), graphs_amp="none")
    model.train()
    times = measure_unit_forward(model, x, 3, torch.device("cpu"))
    assert len(times) == model.num_units and all(t > 0 for t in times[:3])
    assert times[3:] == [0.0] * (model.num_units - 3)  # units from `stop` on are not timed
    assert all(u.training for u in model.units)  # flags restored


def test_auto_policy_in_a_run_keeps_parity_with_freezeout(tmp_path):
    ref = train(tiny(mode="freezeout", augment=False, epochs=6))
    got = train(
        tiny(
            mode="prefast",
            augment=False,
            epochs=6,
            cache="ram",
            cache_dtype="float32",
            recache_policy="auto",
        )
    )
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))


def test_each_epoch_records_what_the_write_through_plan_predicted_for_it(monkeypatch, caplog):
    import prefast.cache.manager as M

    made = []
    real = M.plan_epochs

    def spy(segments, *a, **kw):
        p = real(segments, *a, **kw)
        made.append((len(segments), kw.get("elapsed", 0), p))
        return p

    monkeypatch.setattr(M, "plan_epochs", spy)
    caplog.set_level(logging.INFO, logger="prefast")
    r = train(tiny(mode="prefast", cache="ram", epochs=6, recache_policy="auto"))
    assert len(made) == 1  # one plan, at the first freeze, for the rest of the run
    left, elapsed, plan = made[0]
    first = 6 - left  # the epoch the plan was made in
    assert 0 < first < 6 and elapsed > 0 and len(plan.epoch_seconds) == left
    got = [x["plan_seconds"] for x in r.records]
    # none before the plan, nor for the epoch under way when it was made (only part of it)
    assert got[: first + 1] == [None] * (first + 1)
    assert got[first + 1 :] == pytest.approx(plan.epoch_seconds[1:])
    assert all(g > 0 for g in got[first + 1 :])
    assert f"(the plan predicted {got[-1]:.2f} s, cache" in caplog.text
    # a fixed policy makes no prediction
    fixed = train(tiny(mode="prefast", cache="ram", epochs=4, recache_policy="every"))
    assert [x["plan_seconds"] for x in fixed.records] == [None] * 4


def test_epochs_record_the_planners_probes_and_each_cache_written_through(monkeypatch):
    import prefast.cache.manager as M

    def slow(real):
        def measure(*a, **kw):
            time.sleep(0.05)  # a probe known to take at least this long
            return real(*a, **kw)

        return measure

    monkeypatch.setattr(M, "measure_unit_forward", slow(M.measure_unit_forward))
    monkeypatch.setattr(M, "measure_tier_rates", slow(M.measure_tier_rates))
    r = train(tiny(mode="prefast", cache="ram", epochs=6, recache_policy="auto"))
    probes = [x["probe_seconds"] for x in r.records]
    # the costs and the RAM tier's rates are measured once, in the epoch of the first freeze
    first = next(x["epoch"] for x in r.records if x["frozen_units"] > 0)
    assert probes[first] >= 0.1 and probes[:first] + probes[first + 1 :] == [0.0] * 5
    assert r.summary["total_probe_seconds"] == pytest.approx(sum(probes))
    assert probes[first] < r.records[first]["train_seconds"]  # part of the epoch's time
    written = [(x["epoch"], x["write_through"]) for x in r.records if x["write_through"]]
    assert written  # the plan writes at least one cache
    prev = 0
    for x in r.records:  # an account where, and only where, an epoch's end moved the boundary
        wt = x["write_through"]
        assert (wt is not None) == (x["cache_boundary"] != prev)
        prev = x["cache_boundary"]
        if wt is None:
            continue
        assert (wt["boundary"], wt["tier"]) == (x["cache_boundary"], "ram")
        per_sample = x["cache_bytes"] // 96
        # every sample once: handed over by a step, or computed by the catch-up
        assert wt["bytes"] + wt["catch_up_samples"] * per_sample == x["cache_bytes"]
        assert wt["take_seconds"] > 0 and wt["copy_wait_seconds"] == 0.0  # rows on this thread


# ---- metrics, checkpoints, resume ---------------------------------------------------------------------
def test_metrics_jsonl_and_config(tmp_path):
    m = tmp_path / "run" / "metrics.jsonl"
    train(tiny(mode="prefast", cache="ram", recache_policy="every", metrics=str(m)))
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["summary"] is True
    for k in (
        "epoch", "iterations", "train_loss", "train_accuracy", "test_loss", "test_error", "train_seconds",
        "cache_build_seconds", "frozen_units", "cache_boundary", "cache_tier", "cache_bytes",
        "peak_host_private_bytes", "peak_gpu_bytes", "input_wait_seconds", "plan_seconds",
        "probe_seconds", "write_through",
    ):  # fmt: skip
        assert k in lines[0], k
    for x in lines[:3]:  # the host's waits for batches are part of the epoch's time
        assert 0 < x["input_wait_seconds"] < x["train_seconds"]
    # the loader's own account: none while batches come from the images, then one pass
    assert lines[0]["loader_seconds"] is None and lines[1]["loader_seconds"] is None
    ld = lines[2]["loader_seconds"]
    assert ld["batches"] == 6 and ld["bytes"] == lines[2]["cache_bytes"]  # 96 samples, 1 view
    assert 0 < ld["gather"] < lines[2]["train_seconds"] and ld["copy"] == 0.0
    assert lines[2]["iterations"] == 18 and lines[2]["cache_tier"] == "ram"
    assert lines[-1]["total_train_seconds"] == pytest.approx(
        sum(x["train_seconds"] for x in lines[:3])
    )
    cfg = json.loads((tmp_path / "run" / "metrics.config.json").read_text())
    assert TrainConfig.from_dict(cfg) == tiny(
        mode="prefast", cache="ram", recache_policy="every", metrics=str(m)
    )


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ("ck/last.pt", "is the checkpoint of --checkpoint-dir"),  # replaced by the checkpoint
        ("ck", "is --checkpoint-dir"),  # [Errno 21] Is a directory, exit 1
        ("ck/../ck/cache", "is the cache folder (CHECKPOINT_DIR/cache)"),
        ("cd", "is --cache-dir"),
    ],
)
def test_metrics_that_the_run_writes_otherwise_is_refused(tmp_path, metrics, needle, capsys):
    cache_dir = ["--cache-dir", "cd"] if metrics == "cd" else []
    args = ["train", *SYN, "--synthetic-shape", "mnist", "--num-samples", "8", "--model",
            "densenet_bc", "--depth", "10", "--growth", "4", "--epochs", "1", "--batch-size",
            "8", "--device", "cpu", "--no-progress", "-q", "--checkpoint-dir",
            str(tmp_path / "ck"), "--metrics", str(tmp_path / metrics),
            *[str(tmp_path / a) if a == "cd" else a for a in cache_dir]]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefast: error: --metrics: {tmp_path / metrics} {needle}"), err
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made


def test_metrics_whose_config_file_cannot_be_written_is_refused(tmp_path, capsys):
    # a folder where the config goes (m.config.json beside m.jsonl) passed the start-up check;
    # the run failed as it began, "[Errno 21] Is a directory: ...", exit 1
    (tmp_path / "m.config.json").mkdir()
    args = ["train", *SYN, "--synthetic-shape", "mnist", "--num-samples", "8", "--model",
            "densenet_bc", "--depth", "10", "--growth", "4", "--epochs", "1", "--batch-size",
            "8", "--device", "cpu", "--no-progress", "-q", "--metrics", str(tmp_path / "m.jsonl")]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"prefast: error: --metrics: {tmp_path / 'm.config.json'} is a directory; give a file "
        "name (the run saves its config beside the metrics file, as m.config.json)\n"
    )
    assert not (tmp_path / "m.jsonl").exists()


def test_metrics_through_a_link_whose_target_folder_is_gone(tmp_path):
    """--metrics a link into a folder that was removed: the start-up check passed and the run
    failed at its start with '[Errno 2] No such file or directory', exit 1; the target's
    folder is now created as a missing --metrics folder is. A link that leads back to itself
    is refused at start-up."""
    from prefast.paths import check_writable_file

    link = tmp_path / "m.jsonl"
    link.symlink_to(tmp_path / "gone" / "m.jsonl")
    train(tiny(mode="full", epochs=1, metrics=str(link)))
    assert len((tmp_path / "gone" / "m.jsonl").read_text().splitlines()) == 2
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^--metrics: .*/a is a symbolic link that leads "):
        check_writable_file(tmp_path / "a", "--metrics")


@pytest.mark.parametrize("epochs", [1, 2])
def test_metrics_stay_strict_json_when_the_weights_diverge(tmp_path, epochs):
    # one step per epoch: the step's loss is finite, its update is not, so the epoch's test
    # loss is NaN; the record said NaN (not JSON) before the next epoch stopped the run, and a
    # run of one epoch ended as a success (exit 0, its test error from NaN logits)
    m = tmp_path / "m.jsonl"
    ck = tmp_path / "ck"
    cfg = tiny(mode="full", num_samples=13, base_lr=1e30, epochs=epochs, metrics=str(m),
               checkpoint_dir=str(ck))  # fmt: skip
    with pytest.raises(FloatingPointError, match="iteration 0: the test loss after this step"):
        train(cfg)
    assert not (ck / "last.pt").exists()  # no checkpoint of NaN weights

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the metrics")

    line, last = m.read_text().splitlines()  # epoch 0, then the failed run's closing line
    rec = json.loads(line, parse_constant=refuse)
    assert rec["epoch"] == 0 and rec["iterations"] == 1 and rec["test_loss"] is None
    assert 0 < rec["train_loss"] < 10  # finite: its step ran on finite weights
    end = json.loads(last, parse_constant=refuse)
    assert end["failed"] is True and end["error"].startswith("FloatingPointError: iteration 0")
    assert end["error"].endswith("is not finite (the weights diverged); lower --base-lr")


def test_a_loss_that_diverges_from_a_tiny_t0_names_t0(tmp_path):
    # --t0 1e-3 (linear here): unit 0 starts at base_lr / 1e-3; the error said only 'lower
    # --base-lr', which no --base-lr of use fixed
    from prefast.training.step import EpochMeter

    trainer = Trainer(tiny(mode="freezeout", t0=1e-3))
    remedy = trainer._divergence_remedy()
    assert remedy == (
        "lower --base-lr, or raise --t0 (the first unit starts at 100, 1e+03 x --base-lr, as "
        "--scale-lr divides it by t_0) or give --no-scale-lr"
    )
    meter = EpochMeter(2, torch.device("cpu"), remedy)
    meter.add(0, 7, torch.tensor([float("nan"), 0.0]), 4)
    with pytest.raises(FloatingPointError, match=r"^iteration 7: the loss is not finite; lower"):
        meter.read()
    for kw in ({"t0": 0.5}, {"t0": 1e-3, "scale_lr": False}, {"t0": 1e-3, "mode": "full"}):
        assert Trainer(tiny(**{"mode": "freezeout", **kw}))._divergence_remedy() == (
            "lower --base-lr"
        ), kw


class _Crash(Exception):
    pass


def _crash_in_third_epoch(monkeypatch, cfg: TrainConfig) -> None:
    """Train ``cfg`` until its third evaluation, which raises: two epochs' checkpoints done."""
    real_eval = Trainer.evaluate
    calls = {"n": 0}

    def crash(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Crash
        return real_eval(self, data)

    monkeypatch.setattr(Trainer, "evaluate", crash)
    with pytest.raises(_Crash):
        train(cfg)
    monkeypatch.setattr(Trainer, "evaluate", real_eval)


def test_resume_continues_to_the_same_result(tmp_path, monkeypatch, caplog):
    kw = dict(
        mode="prefast",
        cache="zarr",
        cache_dtype="float32",
        recache_policy="every",
        augment=True,
        views=2,
    )
    ref = train(tiny(**kw, cache_dir=str(tmp_path / "ref-cache")))
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(ck)))
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(tiny(**kw, checkpoint_dir=str(ck), resume=True))
    assert any("reusing store" in r.getMessage() for r in caplog.records)
    assert len(got.records) == 3
    assert got.losses == ref.losses
    torch.testing.assert_close(_weights(got.model), _weights(ref.model), rtol=0, atol=0)


def test_resume_rebuilds_a_ram_cache_of_augmented_images_to_the_same_result(
    tmp_path, monkeypatch, caplog
):
    """A RAM cache is not kept: --resume rebuilds it from the checkpoint's frozen units, and
    must store the view the uninterrupted run cached (its first cache's), not the resumed
    epoch's augmentation."""
    kw = dict(mode="prefast", cache="ram", cache_dtype="float32", recache_policy="every",
              num_samples=40, model_args={"depth": 10, "growth": 4})  # fmt: skip
    ref = train(tiny(**kw, augment=True))
    assert ref.records[1]["cache_boundary"] > 0  # cached before the crash
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, augment=True, checkpoint_dir=str(ck)))
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(tiny(**kw, augment=True, checkpoint_dir=str(ck), resume=True))
    assert any("rebuilding the cache" in r.getMessage() for r in caplog.records)
    assert got.losses == ref.losses
    torch.testing.assert_close(_weights(got.model), _weights(ref.model), rtol=0, atol=0)


def test_a_checkpoints_cache_plan_is_followed_only_where_it_was_made_for(tmp_path):
    """The auto policy's plan and costs survive a checkpoint (weights_only: plain containers);
    on resume they are taken for the same epochs and device, dropped for another --epochs."""
    kw = dict(mode="prefast", cache="ram", recache_policy="auto", epochs=3)
    made = Trainer(tiny(**kw)).cache
    assert made.plan_state() is None  # nothing planned yet
    made.cost = CostModel([1e-3, 2e-3], 5e-4, {"ram": 1e9}, {"ram": 2e9}, ahead_write_rate={})
    made._probe_shape = (8, 7, 7)
    made._epoch_plan = {1: (5, 2), 2: (8, 2)}
    made._epoch_predicted = {2: 0.25}
    path = tmp_path / "plan.pt"
    torch.save({"plan": made.plan_state()}, path)
    state = torch.load(path, weights_only=True)["plan"]
    again = Trainer(tiny(**kw)).cache
    again.restore_plan(state)
    assert again.cost == made.cost
    assert again._probe_shape == (8, 7, 7)
    assert again._epoch_plan == {1: (5, 2), 2: (8, 2)}
    assert again._auto_plan is None
    assert again.predicted_seconds(2) == 0.25
    longer = Trainer(tiny(**{**kw, "epochs": 4})).cache
    longer.restore_plan(state)
    assert longer.cost is None and longer._epoch_plan is None
    assert longer.predicted_seconds(2) is None
    # another version's costs: a field it dropped is ignored, one it lacks means planning anew
    newer = Trainer(tiny(**kw)).cache
    newer.restore_plan({**state, "cost": {**state["cost"], "gone": 1.0}})
    assert newer.cost == made.cost
    older = Trainer(tiny(**kw)).cache
    older.restore_plan({**state, "cost": {k: v for k, v in state["cost"].items() if k != "image"}})
    assert older.cost is None and older._epoch_plan is None


def test_resume_rebuilds_a_cache_whose_fingerprint_differs(tmp_path, monkeypatch, caplog):
    kw = dict(mode="prefast", cache="zarr", recache_policy="every", epochs=3)
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(ck)))
    state = torch.load(ck / "last.pt", weights_only=True)
    path = Path(state["cache"]["path"])
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    attrs = dict(g.attrs["prefast_store"])
    attrs["meta"] = {**attrs["meta"], "fingerprint": "0" * 64}
    from store.layout import CHECKSUM_KEY, record_checksum

    attrs[CHECKSUM_KEY] = record_checksum(attrs)  # a valid record of other weights
    g.attrs["prefast_store"] = attrs
    caplog.set_level(logging.INFO, logger="prefast")
    train(tiny(**kw, checkpoint_dir=str(ck), resume=True))
    assert any("fingerprint differs" in r.getMessage() for r in caplog.records)
    assert any("rebuilding the cache" in r.getMessage() for r in caplog.records)


def test_a_stop_during_the_resume_store_check_stops_there(tmp_path, monkeypatch):
    """--resume reads the checkpoint's whole store to check it, with no stop check: a SIGTERM
    waited for the read of every chunk (tens of GB: past a scheduler's grace period). A stop
    asked for now ends the check at the next chunk."""
    from prefast import interrupt

    kw = dict(mode="prefast", cache="zarr", recache_policy="every", epochs=3, views=3)
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(ck)))
    path = Path(torch.load(ck / "last.pt", weights_only=True)["cache"]["path"])
    s = store.open(path)
    chunks = s.views * s.num_chunks
    s.close()
    assert chunks >= 3
    read = []
    verify_chunk = store.ActivationStore._verify_chunk

    def reading(self, view, chunk):
        read.append((view, chunk))
        if len(read) == 2:
            interrupt.request_stop()  # as the CLI's SIGTERM handler does
        return verify_chunk(self, view, chunk)

    monkeypatch.setattr(store.ActivationStore, "_verify_chunk", reading)
    with pytest.raises(interrupt.Stopped):
        train(tiny(**kw, checkpoint_dir=str(ck), resume=True))
    assert len(read) == 2  # not all of them
    monkeypatch.setattr(store.ActivationStore, "_verify_chunk", verify_chunk)
    stopped_between = []

    def between():
        stopped_between.append(1)
        if len(stopped_between) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.verify(store.open(path), between=between)
    assert store.verify(store.open(path), between=lambda: None).ok
    with pytest.raises(store.StoreInputError, match="between must be callable"):
        store.verify(store.open(path), between=3)  # type: ignore[arg-type]


def test_resume_rebuilds_a_store_with_a_damaged_chunk(tmp_path, monkeypatch, caplog):
    kw = dict(mode="prefast", cache="zarr", recache_policy="every", epochs=3)
    ref = train(tiny(**kw, cache_dir=str(tmp_path / "ref-cache")))
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(ck)))
    path = Path(torch.load(ck / "last.pt", weights_only=True)["cache"]["path"])
    s = store.open(path)
    chunk = Path(s.chunk_path("activations", s.num_chunks - 1, 0))
    s.close()
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0xFF  # one flipped byte: the store still opens, the chunk fails its CRC
    chunk.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(tiny(**kw, checkpoint_dir=str(ck), resume=True))
    assert any("fails its checks" in r.getMessage() for r in caplog.records)
    assert any("rebuilding the cache" in r.getMessage() for r in caplog.records)
    assert got.losses == ref.losses
    assert store.verify(store.open(path)).ok  # rebuilt in place: a later resume reuses it


def test_resume_counts_the_cache_rebuild_in_its_first_epoch(tmp_path, monkeypatch, caplog):
    """A ram cache is rebuilt on resume, before the first resumed epoch: those seconds are the
    run's too (they were in no record, so the summary's cache seconds left them out)."""
    from prefast.cache.manager import CacheManager

    kw = dict(mode="prefast", cache="ram", recache_policy="every", epochs=3)
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(ck)))
    hops = len(torch.load(ck / "last.pt", weights_only=True)["cache"]["chain"])  # to rebuild
    real_build = CacheManager._build

    def slow_build(self, *a, **k):
        time.sleep(0.25)
        return real_build(self, *a, **k)

    monkeypatch.setattr(CacheManager, "_build", slow_build)
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(tiny(**kw, checkpoint_dir=str(ck), resume=True))
    assert any("rebuilding the cache" in r.getMessage() for r in caplog.records)
    first, second, third = got.records
    assert first["resume_cache_seconds"] == second["resume_cache_seconds"] == 0.0
    assert third["resume_cache_seconds"] >= 0.25 * hops
    assert third["cache_build_seconds"] >= third["resume_cache_seconds"]
    assert third["train_seconds"] >= third["resume_cache_seconds"]
    assert got.summary["total_cache_build_seconds"] >= third["resume_cache_seconds"]


def test_a_resume_stopped_while_it_rebuilds_its_cache_ends_the_metrics_file(tmp_path, monkeypatch):
    """A --resume stopped (or failing) while it rebuilt its cache stopped before the metrics
    file was opened: the file still ended with the earlier run's last line, not this stop."""
    from prefast import interrupt
    from prefast.cache.manager import CacheManager

    metrics = tmp_path / "m.jsonl"
    kw = dict(mode="prefast", cache="ram", recache_policy="every", epochs=3, metrics=str(metrics))
    ck = tmp_path / "ck"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(ck)))
    assert json.loads(metrics.read_text().splitlines()[-1])["failed"]

    def stopped(self, *a, **k):
        raise interrupt.Stopped(signal.SIGINT)

    monkeypatch.setattr(CacheManager, "_build", stopped)
    with pytest.raises(interrupt.Stopped):
        train(tiny(**kw, checkpoint_dir=str(ck), resume=True))
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines[:-1]] == [0, 1]  # the checkpoint's epochs, then the stop
    assert lines[-1] == {
        "stopped": True, "signal": "SIGINT", "epoch": 2, "iteration": lines[-1]["iteration"],
        "epochs_done": 2, "checkpoint": str(ck / "last.pt"), "checkpoint_epochs": 2,
    }  # fmt: skip


def test_a_copied_run_folder_resumes_from_its_own_stores(tmp_path, monkeypatch, caplog):
    """A checkpoint records where its stores were written. A copy of the --checkpoint-dir,
    resumed to train longer, read the original's store (outside its own run folder, unlocked)
    and deleted it as it moved on, and left the original's superseded stores alone while its
    own copies stayed: it now reads and deletes the stores of its own run folder only."""
    import shutil

    kw = dict(mode="prefast", cache="zarr", recache_policy="every", epochs=3)
    a, b = tmp_path / "a", tmp_path / "b"
    _crash_in_third_epoch(monkeypatch, tiny(**kw, checkpoint_dir=str(a)))
    state = torch.load(a / "last.pt", weights_only=True)
    held = Path(state["cache"]["path"])  # a/cache/run-KEY/boundary-001
    assert held.parent.parent == a / "cache"
    # a store superseded after the checkpoint, its deletion not done yet
    shutil.copytree(held, held.parent / "boundary-002")
    state["cache"]["superseded"] = [str(held.parent / "boundary-002")]
    torch.save(state, a / "last.pt")
    shutil.copytree(a, b)
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(tiny(**{**kw, "epochs": 5}, checkpoint_dir=str(b), resume=True))
    mine = b / "cache" / held.parent.name
    said = [r.getMessage() for r in caplog.records]
    assert (
        f"resume: reusing store {mine / 'boundary-001'} (fingerprint matches, every chunk checked)"
        in said
    )
    assert f"resume: deleted superseded store {mine / 'boundary-002'}" in said
    assert not (mine / "boundary-002").exists() and not (mine / "boundary-001").exists()
    assert got.summary["cache_path"] == str(mine / f"boundary-{got.summary['cache_boundary']:03d}")
    assert sorted(p.name for p in held.parent.iterdir() if p.name.startswith("boundary-")) == [
        "boundary-001",
        "boundary-002",
    ]  # the original's stores, untouched
    assert store.verify(store.open(held)).ok


def test_a_resume_with_other_epochs_reports_the_iterations_units_froze_at(tmp_path, monkeypatch):
    """The summary's freeze_iterations came from the schedule of the resumed run's --epochs:
    the units frozen before the resume were reported at the new schedule's iterations, and a
    resume with --epochs cut to the epochs done reported iterations for units that never froze."""
    import shutil

    kw = dict(mode="freezeout", epochs=4, num_samples=64, model_args={"depth": 10, "growth": 4},
              checkpoint_dir=str(tmp_path / "ck"))  # fmt: skip
    before = Trainer(tiny(**kw))
    planned = before.schedule.freeze_iterations()  # 4 epochs of 4 steps
    before.close()
    assert planned == [5, 7, 9, 11, 13, 15]
    _crash_in_third_epoch(monkeypatch, tiny(**kw))
    assert torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["frontier"] == 2
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "ck", cut)
    longer = train(tiny(**{**kw, "epochs": 6}, resume=True))
    # units 0 and 1 froze at 5 and 7; the rest at the 6-epoch schedule's (8, 11, 13, 16, 19, 22)
    assert longer.summary["freeze_iterations"] == [5, 7, 13, 16, 19, 22]
    again = train(tiny(**{**kw, "epochs": 6}, resume=True))  # the finished run, reported again
    assert again.summary["freeze_iterations"] == [5, 7, 13, 16, 19, 22]
    done = train(tiny(**{**kw, "epochs": 2, "checkpoint_dir": str(cut)}, resume=True))
    assert done.summary["frozen_units"] == 2
    assert done.summary["freeze_iterations"] == [5, 7, None, None, None, None]


@pytest.mark.parametrize("tier", ["ram", "zarr"])
def test_resuming_a_finished_run_reports_it_without_touching_the_cache(tmp_path, caplog, tier):
    kw = dict(mode="prefast", cache=tier, recache_policy="every", checkpoint_dir=str(tmp_path))
    done = train(tiny(**kw))
    assert done.summary["cache_boundary"] > 0
    caplog.set_level(logging.INFO, logger="prefast")
    again = train(tiny(**kw, resume=True))
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "rebuilding" in m or "reusing store" in m], said
    assert again.records == done.records
    keys = ("cache_boundary", "cache_tier", "cache_path", "final_test_error")
    assert {k: again.summary[k] for k in keys} == {k: done.summary[k] for k in keys}
    assert (done.summary["cache_path"] is not None) == (tier == "zarr")
    with pytest.raises(CheckpointError, match="has 3 epochs done, more than --epochs 2"):
        train(tiny(**{**kw, "epochs": 2}, resume=True))
    # the refusal released the run folder's lock: the same settings run again in this process
    assert train(tiny(**kw, resume=True)).records == done.records


def test_a_run_that_keeps_no_store_leaves_no_run_folder(tmp_path):
    """A RAM cache, and a refused resume, leave the cache folder as they found it; a kept
    store keeps its run folder."""
    c = tmp_path / "c"
    train(tiny(mode="prefast", cache="ram", recache_policy="every", cache_dir=str(c)))
    assert list(c.iterdir()) == []  # the folder given stays
    ram = tmp_path / "ram"
    train(tiny(mode="prefast", cache="ram", recache_policy="every", checkpoint_dir=str(ram)))
    assert sorted(p.name for p in ram.iterdir()) == ["last.pt"]  # no empty cache/ beside it
    kw = dict(mode="prefast", cache="zarr", recache_policy="every", cache_dir=str(c),
              checkpoint_dir=str(tmp_path / "k"))  # fmt: skip
    kept = train(tiny(**kw)).summary["cache_path"]
    (run_dir,) = c.iterdir()
    assert Path(kept).parent == run_dir
    with pytest.raises(CheckpointError, match="other settings: --t0"):
        train(tiny(**{**kw, "t0": 0.9}, resume=True))
    assert list(c.iterdir()) == [run_dir]  # the refused run's own folder is gone


def test_a_trainer_whose_set_up_fails_releases_the_run_folder(tmp_path, monkeypatch):
    """A failure after the cache folder is locked (here the ranks' start-up meeting) releases
    the lock and the process group before the error leaves the constructor."""
    from prefast.distributed import DistContext
    from prefast.errors import DistributedError
    from prefast.training import trainer as T

    cfg = tiny(mode="prefast", cache="zarr", cache_dir=str(tmp_path / "cache"))
    real, shut = DistContext.barrier, []

    def fail_start_up(self, what="barrier"):
        if what == "start-up":
            raise DistributedError("rank 0: start-up failed")
        return real(self, what)

    monkeypatch.setattr(DistContext, "barrier", fail_start_up)
    monkeypatch.setattr(DistContext, "shutdown", lambda self: shut.append(1))
    with pytest.raises(DistributedError, match="start-up failed"):
        T.Trainer(cfg)
    assert shut == [1]
    monkeypatch.setattr(DistContext, "barrier", real)
    T.Trainer(cfg).cache.close()  # the same settings take the folder again


def test_a_run_without_resume_refuses_to_replace_a_checkpoint(tmp_path, capsys):
    # a forgotten --resume overwrote the earlier run's last.pt at its first epoch
    ck = tmp_path / "ck"
    train(tiny(epochs=1, checkpoint_dir=str(ck)))
    before = (ck / "last.pt").read_bytes()
    argv = ["train", *SYN, "--depth", "16", "--growth", "8", "--epochs", "1",
            "--batch-size", "16", "--t0", "0.3", "--how-scale", "linear", "--device", "cpu",
            "--no-progress", "-q", "--checkpoint-dir", str(ck)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"prefast: error: --checkpoint-dir: {ck / 'last.pt'} holds an earlier run's checkpoint; "
        "--resume continues that run (a finished one prints its summary), or delete the file "
        "or give another --checkpoint-dir to start afresh\n"
    )
    assert (ck / "last.pt").read_bytes() == before
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoint"):
        train(tiny(epochs=1, checkpoint_dir=str(ck)))
    r = train(tiny(epochs=1, checkpoint_dir=str(ck), resume=True))  # the finished run
    assert len(r.records) == 1 and (ck / "last.pt").read_bytes() == before


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path, capsys):
    ck = tmp_path / "ck"
    train(tiny(mode="freezeout", epochs=1, checkpoint_dir=str(ck)))
    args = ["train", "--dataset", "synthetic", "--num-samples", "96", "--depth", "16", "--growth", "8", "--epochs", "1",
            "--batch-size", "16", "--t0", "0.5", "--how-scale", "linear", "--mode", "freezeout", "--device", "cpu",
            "--no-progress", "-q", "--eval-batch-size", "256", "--checkpoint-dir", str(ck), "--resume"]  # fmt: skip
    assert main(args) == 2
    assert "other settings: --t0 0.3 (now 0.5); give them as" in capsys.readouterr().err
    deeper = list(args)
    deeper[args.index("--depth") + 1] = "22"  # a model argument: named by its own flag
    assert main(deeper) == 2
    err = capsys.readouterr().err
    assert "settings: --depth 16 (now 22), --t0 0.3 (now 0.5)" in err, err
    assert "model-args" not in err, err


def test_resume_takes_the_cache_dir_however_it_is_spelled(tmp_path, monkeypatch):
    """``--cache-dir runs/cache/`` resumed as ``runs/cache``, or as the absolute path it
    resolves to, is the same folder (each was refused as another setting); another folder
    is still refused, naming both."""
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"
    cfg = tiny(epochs=1, cache="zarr", checkpoint_dir=str(ck), cache_dir="runs/cache/")
    first = train(cfg)
    for spelled in ("runs/cache", str(tmp_path / "runs" / "cache"), "./runs//cache/"):
        got = train(cfg.replace(epochs=1, resume=True, cache_dir=spelled))
        assert got.records == first.records, spelled
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match=r"--cache-dir runs/cache/ \(now other\)"):
        train(cfg.replace(resume=True, cache_dir="other"))
    from prefast.training.trainer import _same_folder

    assert _same_folder("s3://b/c/", "s3://b/c") and not _same_folder("s3://b/c", "s3://b/d")
    assert not _same_folder(None, "runs/cache") and _same_folder(None, None)
    assert not _same_folder("s3://b/runs/cache", "runs/cache")


def test_a_resume_may_wait_longer_for_its_ranks_and_evaluate_in_smaller_batches(tmp_path):
    """--dist-timeout and --eval-batch-size shape no training step: a resume whose ranks time
    out checking a large store, or that evaluates on a smaller GPU, may change them (they were
    refused as other settings, so such a run could not be resumed at all)."""
    ck = tmp_path / "ck"
    first = train(tiny(mode="freezeout", epochs=1, checkpoint_dir=str(ck)))
    again = tiny(mode="freezeout", epochs=2, checkpoint_dir=str(ck), resume=True)
    got = train(again.replace(dist_timeout=900.0, eval_batch_size=40))
    assert got.records[0] == first.records[0] and len(got.records) == 2


def test_resume_names_a_model_of_ones_own_edited_since_the_checkpoint(tmp_path):
    """A registered model whose layers changed since the checkpoint (same name and settings)
    is refused as a CheckpointError naming the checkpoint and what differs, not a RuntimeError
    of torch's spanning a line per tensor."""

    def factory(width):
        def build(*, num_classes, in_channels=3, image_size=32):
            unit = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
            head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
            )
            return from_sequential([unit], head, config={"name": "edited"})

        return build

    ck = tmp_path / "ck"
    cfg = tiny(model="edited", model_args={}, mode="freezeout", epochs=1, checkpoint_dir=str(ck))
    register_model("edited")(factory(8))
    try:
        train(cfg)
    finally:
        unregister_model("edited")
    register_model("edited")(factory(16))
    try:
        with pytest.raises(CheckpointError) as e:
            train(cfg.replace(epochs=2, resume=True))
    finally:
        unregister_model("edited")
    assert str(e.value).startswith(
        f"--resume: the checkpoint at {ck / 'last.pt'} holds the weights of another model than "
        "'edited' builds now (Error(s) in loading state_dict for UnitModel: size mismatch for "
        "units.0.0.weight: copying a param with shape torch.Size([8, 3, 3, 3]) from checkpoint"
    ), e.value
    assert "\n" not in str(e.value)


def test_a_config_reloaded_from_its_json_resumes_a_run_with_tuple_model_arguments(tmp_path):
    """The config's JSON (--metrics' m.config.json) holds a tuple model argument as a list:
    resuming with the config reloaded from it was refused, '--widths [4, 4] (now [4, 4])'."""

    def wt(*, num_classes, in_channels=3, image_size=32, widths=(4,)):
        units, c = [], in_channels
        for k in widths:
            units.append(nn.Sequential(nn.Conv2d(c, k, 3, padding=1), nn.ReLU()))
            c = k
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        return from_sequential(units, head, config={"name": "wt", "widths": list(widths)})

    register_model("wt")(wt)
    try:
        cfg = tiny(model="wt", model_args={"widths": (4, 4)}, mode="freezeout", epochs=1,
                   checkpoint_dir=str(tmp_path), metrics=str(tmp_path / "m.jsonl"))  # fmt: skip
        train(cfg)
        saved = json.loads((tmp_path / "m.config.json").read_text())
        again = TrainConfig.from_dict(saved).replace(resume=True, epochs=2)
        assert again.model_args == {"widths": [4, 4]}
        assert len(train(again).records) == 2
        with pytest.raises(CheckpointError, match=r"--widths \[4, 4\] \(now \[4, 8\]\)"):
            train(again.replace(model_args={"widths": [4, 8]}, epochs=3))
    finally:
        unregister_model("wt")


def test_a_resume_refusal_names_switches_by_their_own_flags(tmp_path, capsys):
    """A switch that differs is named by the flag the user types (--no-augment, not a bare
    --augment, which the CLI does not have), with which side gave it; an option left out on
    one side says so."""
    ck = tmp_path / "ck"
    train(tiny(mode="freezeout", epochs=1, augment=False, checkpoint_dir=str(ck)))
    args = ["train", "--dataset", "synthetic", "--num-samples", "96", "--depth", "16", "--growth", "8",
            "--epochs", "1", "--batch-size", "16", "--t0", "0.3", "--how-scale", "linear", "--mode",
            "freezeout", "--device", "cpu", "--no-progress", "-q", "--eval-batch-size", "256",
            "--checkpoint-dir", str(ck), "--resume"]  # fmt: skip
    assert main([*args, "--no-nesterov", "--momentum", "0", "--subset", "48"]) == 2
    err = capsys.readouterr().err
    assert (
        "other settings: --subset left out (now 48), --no-augment (now left out), "
        "--momentum 0.9 (now 0.0), --no-nesterov left out (now given); give them"
    ) in err, err
    assert main([*args, "--no-augment"]) == 0


def test_resume_names_a_checkpoint_of_another_version_instead_of_failing_in_it(tmp_path):
    # a checkpoint another version wrote (an entry less, a setting more, another layout)
    # failed with a KeyError or a bare "unknown config fields"
    from prefast.training.checkpoint import CHECKPOINT_NAME

    ck = tmp_path / "ck"
    first = train(tiny(mode="freezeout", epochs=1, checkpoint_dir=str(ck)))
    path = ck / CHECKPOINT_NAME
    good = torch.load(path, weights_only=True)
    assert good["format"] == 1
    older = {k: v for k, v in good.items() if k not in ("format", "rng", "losses")}
    newer = {**good, "config": {**good["config"], "warmup_epochs": 2}}
    later = {**good, "format": 2}
    again = tiny(mode="freezeout", epochs=2, checkpoint_dir=str(ck), resume=True)
    for state, needle in [
        (older, "lacks the entries losses, rng: written by another version of prefast"),
        (newer, r"made by another version of prefast: unknown config fields \['warmup_epochs'\]"),
        (later, "a checkpoint of format 2, written by another version of prefast; this version"),
    ]:
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=needle):
            train(again)
    torch.save({k: v for k, v in good.items() if k != "format"}, path)  # before the stamp
    assert train(again).records[0] == first.records[0]


# ---- the CLI -----------------------------------------------------------------------------------------------
def test_cli_documented_command_runs(tmp_path, capsys):
    args = [
        "train", "--dataset", "synthetic", "--num-samples", "512", "--model", "densenet_bc", "--depth", "16",
        "--growth", "8", "--epochs", "3", "--batch-size", "32", "--t0", "0.3", "--how-scale", "linear",
        "--mode", "prefast", "--cache", "zarr", "--cache-dir", str(tmp_path / "c"), "--cache-dtype", "float32",
        "--views", "1", "--no-augment", "--seed", "0", "--device", "cpu", "--metrics", str(tmp_path / "out.jsonl"),
        "--no-progress", "-q",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prefast densenet_bc on synthetic (512 images, 3 epochs): test error" in out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_cli_summary_counts_one_epoch_and_one_image(capsys):
    from prefast.cli import _print_summary

    summary = {
        "mode": "freezeout", "model": {"name": "vgg"}, "dataset": "synthetic", "train_samples": 1,
        "epochs": 1, "final_test_error": 0.5, "total_train_seconds": 1.0,
        "total_cache_build_seconds": 0.0, "frozen_units": 0, "num_units": 3,
    }  # fmt: skip
    _print_summary(summary)
    assert (
        "freezeout vgg on synthetic (1 image, 1 epoch): test error 0.5000"
        in capsys.readouterr().out
    )


SYN = ["--dataset", "synthetic", "--num-samples", "64"]
BAD = [
    ([*SYN, "--model", "resnet9000"], "resnet9000"),
    (["--dataset", "imagenet"], "--dataset"),
    ([*SYN, "--t0", "1.5"], "--t0"),
    ([*SYN, "--t0", "0"], "--t0"),
    ([*SYN, "--views", "0"], "--views"),
    ([*SYN[:2], "--num-samples", "0"], "--num-samples"),
    (["--dataset", "cifar10", "--num-samples", "10"], "--num-samples"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "--data-root"),
    ([*SYN, "--subset", "100"], "--subset"),
    (
        [*SYN, "--model", "resnet18"],
        "'resnet18' got unknown argument(s) ['depth', 'growth']; it takes none",
    ),
    ([*SYN, "--model", "wrn"], "'wrn' got unknown argument(s) ['growth']; accepted: depth, widen"),
]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "0.1"], "arguments: --lr 0.1 (--lr: did you mean --base-lr?)"),
        (
            ["--batchsize=8", "--cache-dri", "x"],
            "(--batchsize: did you mean --batch-size?; --cache-dri: did you mean --cache-dir?)",
        ),
        (["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1"),
    ],
)
def test_cli_names_the_option_an_unknown_one_was_likely_meant_for(extra, needle, capsys):
    # argparse said only 'unrecognized arguments: --lr 0.1'
    with pytest.raises(SystemExit) as e:
        main(["train", *SYN, *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("prefast: error: ") and err.count("\n") == 1
    assert err.rstrip().endswith(needle), err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--checkpoint", "x"], "(--checkpoint: did you mean --checkpoint-dir?)"),
        (["--eval", "5"], "(--eval: did you mean --eval-batch-size?)"),
        (["--epoch", "3"], "(--epoch: did you mean --epochs?)"),
        (["--cache-d", "x"], "(--cache-d: did you mean --cache-dir or --cache-dtype?)"),
    ],
)
def test_cli_refuses_an_abbreviated_option(extra, needle, capsys):
    # argparse took the start of a long option as the option: --checkpoint (prefast verify's
    # flag, a file) was --checkpoint-dir, --eval 5 was --eval-batch-size 5, without a word
    with pytest.raises(SystemExit) as e:
        main(["train", *SYN, *extra, "--epochs", "0"])  # taken: refused, not trained
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("prefast: error: unrecognized arguments: ")
    assert err.rstrip().endswith(needle), err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--dataset", "fashion_mnist"], "; did you mean 'fashion-mnist'?"),
        (["--dataset", "CIFAR-10"], "; did you mean 'cifar10'?"),
        (["--recache-mode", "write_through"], "; did you mean 'write-through'?"),
        (
            ["--dataset", "fmnist"],
            "is not one of cifar10, cifar100, mnist, fashion-mnist, synthetic",
        ),
    ],
)
def test_cli_names_the_choice_a_misspelt_value_was_meant_for(extra, needle, capsys):
    # a value that differs from a choice in case and separators only was refused with the list
    assert main(["train", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefast: error: ") and err.count("\n") == 1
    assert err.rstrip().endswith(needle), err


@pytest.mark.parametrize(("extra", "needle"), BAD)
def test_cli_bad_input_is_one_line_and_exit_2(extra, needle, capsys):
    base = [
        "train",
        "--depth",
        "16",
        "--growth",
        "8",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "-q",
    ]
    assert main(base + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefast: error:") and needle in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_a_store_write_that_fails_is_a_failed_run_exit_1(tmp_path, monkeypatch, capsys):
    """A full disk while a cache is written fails the run (exit 1), not its input (exit 2):
    raised by the store, or by write-through quoting the store's error."""
    import errno

    from prefast.cache.write_through import WriteThrough
    from prefast.errors import CacheError

    full = OSError(errno.ENOSPC, "No space left on device")
    args = ["train", *SYN, "--depth", "16", "--growth", "8", "--epochs", "2", "--t0", "0.3",
            "--device", "cpu", "--no-progress", "-q", "--mode", "prefast", "--cache", "zarr",
            "--recache-policy", "every", "--cache-dir", str(tmp_path / "c")]  # fmt: skip

    def no_space(self, view, rows, x, y=None):
        raise store.StoreWriteError("boundary-002: writing rows of view 0 failed") from full

    real = store.StoreWriter.write_rows
    monkeypatch.setattr(store.StoreWriter, "write_rows", no_space)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()  # (a log line of the stores left)
    assert err[-1].startswith("prefast: error:") and "writing rows of view 0 failed" in err[-1]

    def raised_by_the_writer_thread(self, *args):
        raise CacheError("writing the cache at boundary 2 failed") from store.StoreWriteError("x")

    monkeypatch.setattr(store.StoreWriter, "write_rows", real)
    monkeypatch.setattr(WriteThrough, "finish", raised_by_the_writer_thread)
    assert main([*args, "--cache-dir", str(tmp_path / "d")]) == 1
    assert "writing the cache at boundary 2 failed" in capsys.readouterr().err


def test_cli_a_full_disk_says_to_free_space_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """A full disk ended the run with the errno's words alone ('[Errno 28] No space left on
    device: ...'); the line now says to free space and how to go on: --resume where a
    checkpoint was saved, else run again. A store's write error caused by it says so too."""
    import argparse
    import errno

    import prefast.training.trainer as trainer_mod
    from prefast.cli import _if_full

    real, calls = trainer_mod.save_checkpoint, []

    def full_disk(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", full_disk)
    ck = tmp_path / "ck"
    args = ["train", *SYN, "--depth", "10", "--growth", "4", "--epochs", "2", "--device", "cpu",
            "--no-progress", "-q", "--mode", "freezeout", "--checkpoint-dir", str(ck)]  # fmt: skip
    assert main(args) == 1
    assert capsys.readouterr().err == (
        f"prefast: error: [Errno 28] No space left on device: '{ck / 'last.pt'}'; free space "
        "on that disk ('prefast cache list' shows the stores runs kept); --resume then "
        "continues from the last epoch's checkpoint\n"
    )
    assert main([*args, "--resume"]) == 0  # space freed
    assert torch.load(ck / "last.pt", weights_only=True)["epoch"] == 2

    cause = OSError(errno.EDQUOT, "Disk quota exceeded")
    try:
        try:
            raise store.StoreWriteError("boundary-002: writing rows failed") from cause
        except store.StoreWriteError as e:
            raise CacheError("writing the cache at boundary 2 failed") from e
    except CacheError as e:
        chained = e
    plain = argparse.Namespace(command="train", checkpoint_dir=None)
    assert _if_full(chained, plain) == (
        "; free space on that disk ('prefast cache list' shows the stores runs kept), then run "
        "again"
    )
    assert _if_full(OSError(errno.EIO, "Input/output error"), plain) == ""


def test_cli_out_of_gpu_or_host_memory_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    """CUDA running out of memory (a batch too large for the GPU) ended the run with a
    traceback and torch's paragraph on allocator settings; it is one line with the way on, and
    the metrics file ends with the failure. Other RuntimeErrors still show their trace."""

    def oom(self, epoch):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 "
            "GiB of which 1.06 GiB is free. Of the allocated memory 75.2 GiB is allocated by "
            "PyTorch. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
        )

    monkeypatch.setattr(Trainer, "_train_epoch", oom)
    metrics = tmp_path / "m.jsonl"
    args = ["train", *SYN, "--epochs", "1", "--device", "cpu", "--no-progress", "-q",
            "--metrics", str(metrics)]  # fmt: skip
    assert main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "prefast: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB); a "
        "smaller --batch-size or --eval-batch-size, or --cache ram or zarr, needs less"
    )
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["failed"] and last["error"].startswith("OutOfMemoryError: CUDA out of memory.")

    def host(self, epoch):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 60000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(Trainer, "_train_epoch", host)
    assert main([*args, "--metrics", str(tmp_path / "h.jsonl")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("prefast: error: out of host memory ([enforce fail at alloc_cpu.cpp")
    assert line.endswith(
        "; a smaller --batch-size or --eval-batch-size, or --cache zarr, needs less"
    )

    def other(self, epoch):
        raise RuntimeError("a shape mismatch")

    monkeypatch.setattr(Trainer, "_train_epoch", other)
    with pytest.raises(RuntimeError, match="a shape mismatch"):
        main([*args, "--metrics", str(tmp_path / "n.jsonl")])


def test_a_stop_requested_with_no_signal_is_refused_as_it_is_asked():
    """request_stop(0) was taken, and the run then failed where it stopped, with a ValueError
    from the signal module naming nothing of the call."""
    from prefast import interrupt

    for bad in (0, 999, "TERM", None):
        with pytest.raises(PrefastError, match=r"request_stop: .* is not a signal"):
            interrupt.request_stop(bad)  # type: ignore[arg-type]
        assert interrupt.requested() is None
    interrupt.request_stop(signal.SIGINT)
    assert interrupt.requested() == signal.SIGINT
    interrupt.clear()


def test_a_requested_stop_stops_the_run_before_its_next_step(tmp_path, monkeypatch):
    from prefast import interrupt

    steps = {"n": 0}
    real = Trainer._train_epoch

    def count(self, epoch):
        step = self.steps.step

        def counted(*a):
            steps["n"] += 1
            if steps["n"] == 3:
                interrupt.request_stop()  # as the CLI's SIGTERM handler does
            return step(*a)

        self.steps.step = counted
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", count)
    try:
        with pytest.raises(interrupt.Stopped, match="stopped by SIGTERM"):
            train(tiny(mode="prefast", cache="zarr", checkpoint_dir=str(tmp_path)))
    finally:
        interrupt.clear()
    assert steps["n"] == 3  # the step under way finished; no fourth began
    assert not (tmp_path / "last.pt").exists()


def _ended_then_resumed(tmp_path, monkeypatch, cache, on_step):
    """Train with ``on_step(n)`` called before step n (from 1), which ends the run; then
    resume it with plain steps. (What ended it, the metrics lines then, the checkpoint.)"""
    from prefast import interrupt

    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    cfg = dict(mode="prefast", cache=cache, checkpoint_dir=str(ck), metrics=str(metrics))
    steps = {"n": 0}
    real = StepRunner.step

    def hooked(self, *a):
        steps["n"] += 1
        on_step(steps["n"])
        return real(self, *a)

    monkeypatch.setattr(StepRunner, "step", hooked)
    try:
        with pytest.raises(BaseException) as ended:
            train(tiny(**cfg))
    finally:
        interrupt.clear()
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r.get("epoch") for r in lines[:-1]] == [0]
    monkeypatch.setattr(StepRunner, "step", real)
    train(tiny(**cfg, resume=True))
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r.get("epoch") for r in resumed] == [0, 1, 2, None] and resumed[-1]["summary"]
    assert not any("stopped" in r or "failed" in r for r in resumed)  # the end line dropped
    return ended.value, lines, ck / "last.pt"


def test_a_stopped_runs_metrics_end_with_where_it_stopped_and_a_resume_drops_it(
    tmp_path, monkeypatch
):
    """A stopped run's metrics file ended with its last epoch's record, as a crashed one's
    does: nothing said the run had stopped, where, or what --resume continues from."""
    from prefast import interrupt

    def stop(n):
        if n == 9:  # epoch 1's third step (6 steps an epoch): it runs, the next does not
            interrupt.request_stop(signal.SIGINT)

    ended, lines, ck = _ended_then_resumed(tmp_path, monkeypatch, "zarr", stop)
    assert isinstance(ended, interrupt.Stopped)
    assert lines[-1] == {
        "stopped": True,
        "signal": "SIGINT",
        "epoch": 1,
        "iteration": 9,
        "epochs_done": 1,
        "checkpoint": str(ck),
        "checkpoint_epochs": 1,
    }


def test_a_failed_runs_metrics_end_with_the_error_and_a_resume_drops_it(tmp_path, monkeypatch):
    """A failed run's metrics file ended with its last epoch's record: a reader could not
    tell a failed run from one still running, nor see the error."""

    def fail(n):
        if n == 10:  # epoch 1's fourth step (6 steps an epoch)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ended, lines, ck = _ended_then_resumed(tmp_path, monkeypatch, "ram", fail)
    assert isinstance(ended, RuntimeError)
    assert lines[-1] == {
        "failed": True,
        "error": "RuntimeError: CUDA error: an illegal memory access was encountered",
        "epoch": 1,
        "iteration": 9,
        "epochs_done": 1,
        "checkpoint": str(ck),
        "checkpoint_epochs": 1,
    }


def test_each_epochs_step_captures_are_its_own_and_a_resume_counts_them_alike(
    tmp_path, monkeypatch
):
    """step_captures counted the run's captures so far, where every other epoch field is the
    epoch's own: a resumed run, whose count starts at 0, wrote other values than the run never
    interrupted. Here each configuration counts as one capture (a CUDA graph's, on a GPU)."""
    from prefast import interrupt

    configure = StepRunner.configure

    def counted(self, *a, **k):
        configure(self, *a, **k)
        self.captures += 1

    monkeypatch.setattr(StepRunner, "configure", counted)

    def captures(sub, **kw):
        metrics = tmp_path / sub / "m.jsonl"
        cfg = dict(mode="freezeout", checkpoint_dir=str(tmp_path / sub), metrics=str(metrics))
        train(tiny(**cfg, **kw))
        return [r["step_captures"] for r in map(json.loads, metrics.read_text().splitlines()[:-1])]

    whole = captures("whole")
    assert whole == [1, 5, 6]  # the epoch's start, then one per freeze (none in epoch 0)
    step = StepRunner.step

    def stop_in_epoch_1(self, h, y, j, *a):
        if j == 8:  # epoch 1 (6 steps an epoch): this step runs, the next does not
            interrupt.request_stop()
        return step(self, h, y, j, *a)

    monkeypatch.setattr(StepRunner, "step", stop_in_epoch_1)
    try:
        with pytest.raises(interrupt.Stopped):
            captures("resumed")
    finally:
        interrupt.clear()
    monkeypatch.setattr(StepRunner, "step", step)
    assert captures("resumed", resume=True) == whole


def test_a_signal_the_process_ignores_stays_ignored_during_a_run(monkeypatch):
    """`prefast train ... &` in a shell script starts with SIGINT ignored, so that a Ctrl-C
    meant for the script leaves it running; prefast's handler replaced that and stopped it."""
    import prefast.training

    seen = {}

    def record_handlers(cfg):
        seen.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
        raise ConfigError("enough")

    monkeypatch.setattr(prefast.training, "train", record_handlers)
    was = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["train", *SYN, "--no-progress", "-q"]) == 2
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, was)
    assert seen[signal.SIGINT] is signal.SIG_IGN
    assert seen[signal.SIGTERM] not in (signal.SIG_IGN, signal.SIG_DFL)  # prefast's own


def test_a_stop_requested_from_python_ends_with_its_run(tmp_path):
    """A notebook stops a run with request_stop(), then runs the cell again: the request was
    the first run's, and the second trains."""
    from prefast import interrupt

    cfg = tiny(mode="prefast", cache="zarr", cache_dir=str(tmp_path / "c"), epochs=1)
    try:
        interrupt.request_stop()
        with pytest.raises(interrupt.Stopped):
            train(cfg)
        assert interrupt.requested() is None
        assert len(train(cfg).losses) == 6
    finally:
        interrupt.clear()


def test_the_stop_line_offers_resume_only_where_a_checkpoint_exists(tmp_path, monkeypatch, capsys):
    import signal

    import prefast.training
    from prefast import interrupt

    def stopped(cfg):
        raise interrupt.Stopped(signal.SIGTERM)

    monkeypatch.setattr(prefast.training, "train", stopped)
    args = ["train", *SYN, "--checkpoint-dir", str(tmp_path), "--no-progress", "-q"]
    assert main(args) == 128 + signal.SIGTERM  # stopped before the first epoch's checkpoint
    assert capsys.readouterr().err.strip() == "prefast: stopped by SIGTERM"
    (tmp_path / "last.pt").write_bytes(b"")
    assert main(args) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == (
        "prefast: stopped by SIGTERM; --resume continues from the last epoch's checkpoint"
    )


def test_the_stop_line_where_a_second_signal_cut_the_training_imports_short(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C twice as the run starts: the second stops it at once, inside torch's import;
    the stop line then imported prefast.training for the checkpoint's name, which imported the
    half-initialised torch again: a traceback, exit 1 (or a crash, -11), not 'stopped', 130."""
    import prefast.training
    from prefast import interrupt

    def stopped(cfg):
        raise interrupt.Stopped(signal.SIGINT)

    monkeypatch.setattr(prefast.training, "train", stopped)
    monkeypatch.setitem(sys.modules, "prefast.training.checkpoint", None)  # its import fails
    (tmp_path / "last.pt").write_bytes(b"")
    args = ["train", *SYN, "--checkpoint-dir", str(tmp_path), "--resume", "--no-progress", "-q"]
    assert main(args) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == (
        "prefast: stopped by SIGINT; --resume continues from the last epoch's checkpoint"
    )


@pytest.mark.parametrize(("flag", "info"), [("-q", False), ("-v", True)])
def test_quiet_and_verbose_apply_where_logging_is_configured_already(caplog, flag, info):
    """prefast.cli.main from Python (docs/models.md), in a process whose logging is set up (a
    notebook, an earlier main call): basicConfig does nothing there, -q still hid no INFO line
    and -v showed none under a WARNING root; the loggers' levels are restored after."""
    root = logging.getLogger()
    was, prefast_was = root.level, logging.getLogger("prefast").level  # another test's, maybe
    root.setLevel(logging.WARNING if info else logging.INFO)  # the process's own choice
    args = ["train", *SYN, "--model", "densenet_bc", "--depth", "10", "--growth", "4",
            "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress", flag]  # fmt: skip
    try:
        assert main(args) == 0
    finally:
        root.setLevel(was)
    said = [r for r in caplog.records if r.name.startswith("prefast") and r.levelno == logging.INFO]
    assert bool(said) == info
    assert logging.getLogger("prefast").level == prefast_was


@pytest.mark.parametrize("flags", [["-q", "-v"], ["-v", "--quiet"], ["-qv"]])
def test_quiet_and_verbose_together_are_refused(flags, capsys):
    # -q won: warnings only, and the -v given with it was dropped without a word
    with pytest.raises(SystemExit) as e:
        main(["train", *SYN, *flags, "--epochs", "0"])  # taken: refused, not trained
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "not allowed with argument" in err and "--quiet" in err and "--verbose" in err, err


@pytest.mark.parametrize("terminal", [False, True], ids=["log-file", "terminal"])
def test_progress_bars_show_only_on_a_terminal(capsys, monkeypatch, terminal):
    """prefast train with stderr in a file (a scheduler's log, a pipe to tee): the bars'
    redraws were carriage returns and cursor-up codes around every log line there."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    args = ["train", *SYN, "--synthetic-shape", "mnist", "--num-samples", "37", "--model",
            "densenet_bc", "--depth", "10", "--growth", "4", "--epochs", "1", "--batch-size",
            "8", "--mode", "freezeout", "--device", "cpu", "-q"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("\r" in err) == terminal
    # the epoch's bar, drawn at its start (37 images in 5 steps of 8; later redraws depend on
    # the time the steps take)
    assert ("0/5 [00:00<?, ?step/s]" in err) == terminal


def test_the_stopping_line_goes_above_the_progress_bars_on_a_terminal(monkeypatch):
    """The first Ctrl-C's line was written straight to fd 2, glued to the end of a progress
    bar on a terminal ('... 0/3 [00:04<?, ?epoch/s]prefast: stopping ...')."""
    import io

    from tqdm.auto import tqdm

    from prefast import cli, interrupt

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = tqdm(total=3, desc="bar", file=term, ncols=40)
    try:
        bar.update(1)
        cli._on_signal(signal.SIGINT, None)
        assert interrupt.requested() == signal.SIGINT
    finally:
        bar.close()
        interrupt.clear()
    line = "prefast: stopping at the next step (again to stop at once)"
    out = term.getvalue()
    before, after = out.split(f"\r{' ' * 40}\r{line}\n")  # the bar cleared, then the line
    assert before.startswith("\rbar:") and after.startswith("\rbar:  33%")  # then the bar again


def test_a_second_stop_signal_while_a_line_is_logged_stops_at_once(monkeypatch, capsys):
    """A second Ctrl-C or SIGTERM that came while a log line was written above the bars was
    taken by tqdm's logging handler, which catches every exception but KeyboardInterrupt: a
    '--- Logging error ---' traceback, and the run went on to its next safe point."""
    from tqdm.contrib.logging import logging_redirect_tqdm
    from tqdm.std import tqdm

    from prefast import cli, interrupt

    def second_signal(cls, *args, **kwargs):  # the signal arrives as the line is written
        cli._on_signal(signal.SIGTERM, None)

    log = logging.getLogger("prefast.test_second_signal")
    interrupt.request_stop(signal.SIGTERM)  # the first one
    try:
        monkeypatch.setattr(tqdm, "write", classmethod(second_signal))
        with logging_redirect_tqdm(loggers=[log]), pytest.raises(interrupt.Stopped) as stop:
            log.warning("a line")
    finally:
        interrupt.clear()
    assert stop.value.signum == signal.SIGTERM
    assert "Logging error" not in capsys.readouterr().err


def test_verbose_adds_prefasts_details_not_every_librarys_debug_lines(tmp_path):
    """-v gave 47 lines of other packages' debug output (numcodecs registering each codec,
    zarr.group, asyncio) among prefast's 6 details in a 2-epoch run."""
    args = ["train", *SYN, "--synthetic-shape", "mnist", "--num-samples", "37", "--model",
            "densenet_bc", "--depth", "10", "--growth", "4", "--epochs", "2", "--batch-size",
            "8", "--t0", "0.3", "--mode", "prefast", "--cache", "zarr", "--cache-dir",
            str(tmp_path), "--device", "cpu", "--no-progress", "-v"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run(
        [sys.executable, "-m", "prefast", *args], env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    debug = [line.split(":")[0] for line in p.stderr.splitlines() if line.startswith("DEBUG ")]
    assert "DEBUG store.writer" in debug and "DEBUG prefast.models.registry" in debug
    assert {d.split()[1].split(".")[0] for d in debug} == {"prefast", "store"}, debug


@pytest.mark.parametrize("closed", [1, 2])
def test_a_run_started_with_stdout_or_stderr_closed_trains(tmp_path, closed):
    """A daemon's or a scheduler's `>&-` / `2>&-`: Python has sys.stdout or sys.stderr None,
    and prefast train failed with an AttributeError, exit 1 (with stderr closed, before its
    first epoch: the progress bars' terminal check)."""
    m = tmp_path / "m.jsonl"
    args = ["train", *SYN, "--synthetic-shape", "mnist", "--num-samples", "8", "--depth", "10",
            "--growth", "4", "--epochs", "1", "--batch-size", "8", "--mode", "full",
            "--device", "cpu", "--metrics", str(m)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run(
        [sys.executable, "-m", "prefast", *args],
        env=env,
        stdout=subprocess.PIPE if closed == 2 else None,
        stderr=subprocess.PIPE if closed == 1 else None,
        preexec_fn=lambda: os.close(closed),
        text=True,
    )
    assert p.returncode == 0, p.stdout or p.stderr
    assert len(m.read_text().splitlines()) == 2  # the epoch and the summary
    if closed == 2:
        assert p.stdout.startswith("full densenet_bc on synthetic (8 images, 1 epoch)")
    else:
        assert "INFO prefast.training.trainer: epoch 0: train loss" in p.stderr


def test_a_bare_prefast_names_its_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prefast") and "{train,verify,cache}" in err
    assert err.strip().endswith("prefast: error: give a command: train (train a model), verify "
                                "(check a cache store) or cache (list or remove run folders)")  # fmt: skip


def test_a_bare_prefast_cache_names_its_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prefast cache") and "cache_command" not in err
    assert err.strip().endswith("prefast: error: give a command: list (the run folders in a "
                                "cache folder) or remove (delete run folders)")  # fmt: skip


def test_a_stopped_run_names_the_stores_it_leaves_in_its_cache_folder(
    tmp_path, monkeypatch, caplog
):
    from prefast import interrupt

    real = Trainer._save_checkpoint

    def then_stop(self, next_epoch):
        real(self, next_epoch)
        if next_epoch == 2:
            interrupt.request_stop()

    monkeypatch.setattr(Trainer, "_save_checkpoint", then_stop)
    caplog.set_level(logging.WARNING, logger="prefast")
    try:
        with pytest.raises(interrupt.Stopped):
            train(tiny(mode="prefast", cache="zarr", recache_policy="every",
                       checkpoint_dir=str(tmp_path)))  # fmt: skip
    finally:
        interrupt.clear()
    (run_dir,) = (tmp_path / "cache").iterdir()
    names = sorted(p.name for p in run_dir.glob("boundary-*"))
    said = [r.getMessage() for r in caplog.records if "keeps" in r.getMessage()]
    assert names and len(said) == 1
    head, rest = said[0].split(" store(s), ")
    assert head == f"{run_dir} keeps {len(names)}" and float(rest.split(" MB")[0]) > 0
    assert rest.split(" MB ")[1] == (
        f"({', '.join(names)}): --resume reuses a complete one, the next start removes an "
        f"unfinished one; 'prefast cache remove {run_dir}' frees the space"
    )


def test_a_config_path_that_is_not_a_path_is_refused():
    with pytest.raises(ConfigError, match="--cache-dir: must be a path, got 5"):
        tiny(cache_dir=5)
    tiny(cache_dir=Path("c"), checkpoint_dir="k")  # a str or a Path: fine
    # "" meant no file for --metrics and --checkpoint-dir, but the working folder for
    # --cache-dir and for the cache of --checkpoint-dir '' (a ./cache beside the run)
    for name, flag in (("metrics", "--metrics"), ("cache_dir", "--cache-dir"),
                       ("checkpoint_dir", "--checkpoint-dir"), ("data_root", "--data-root")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{flag}: an empty path; leave the option out"):
            tiny(**{name: " " if name == "data_root" else ""})


def test_outputs_under_a_tilde_go_to_the_home_folder(tmp_path, monkeypatch, capsys):
    """--metrics=~/m.jsonl (no shell expands a ~ after '='), a quoted "~/ck", or a config
    from Python: the start-up checks created the folders in the home folder, and the run then
    wrote its metrics, checkpoint and cache into a folder named '~' in the working directory."""
    import prefast.training
    from prefast import interrupt

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cfg = tiny(
        epochs=1,
        cache="zarr",
        metrics="~/m/x.jsonl",
        checkpoint_dir="~/ck",
        cache_dir=Path("~/c"),
        data_root="~/data",
    )
    assert (cfg.metrics, cfg.checkpoint_dir, cfg.cache_dir, cfg.data_root) == (
        f"{home}/m/x.jsonl",
        f"{home}/ck",
        f"{home}/c",
        f"{home}/data",
    )
    train(cfg)
    assert not (work / "~").exists()
    assert len((home / "m" / "x.jsonl").read_text().splitlines()) == 2  # an epoch, the summary
    assert (home / "ck" / "last.pt").is_file()
    assert (home / "c").is_dir()

    # the stop line's --resume hint looks for the checkpoint there too
    def stopped(cfg):
        raise interrupt.Stopped(signal.SIGTERM)

    monkeypatch.setattr(prefast.training, "train", stopped)
    args = ["train", *SYN, "--checkpoint-dir=~/ck", "--resume", "--no-progress", "-q"]
    assert main(args) == 128 + signal.SIGTERM
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--resume continues from the last epoch's checkpoint")
    )


@pytest.mark.parametrize("field", ["augment", "progress", "download", "keep_freed_memory"])
def test_a_switch_that_is_not_a_bool_is_refused(field):
    # from Python a switch is a field: "no" or 0 must not pass for False (a str is truthy)
    with pytest.raises(ConfigError, match=f"^{field}: must be True or False, got 'no'$"):
        tiny(**{field: "no"})
    assert getattr(tiny(**{field: False}), field) is False


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        # torch.manual_seed takes 64 bits: a larger seed was a bare ValueError ("Overflow when
        # unpacking long long") from the model's build, a traceback from prefast train
        ("seed", 2**64, r"--seed: must be an integer in \[0, 18446744073709551615\], got"),
        # under torchrun a timedelta: an OverflowError traceback as the ranks joined
        ("dist_timeout", 1e14, r"--dist-timeout: must be a finite number in \(0, 1e\+09\]"),
    ],
)
def test_a_value_too_large_for_what_uses_it_is_refused_up_front(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value})
    assert TrainConfig(seed=2**64 - 1, dist_timeout=1e9).seed == 2**64 - 1


@pytest.mark.parametrize("model", [None, ["densenet_bc"], "", 5])
def test_a_model_that_is_no_name_is_refused(model):
    # None, 5 or a list passed the config and failed once the data had loaded (a list with a
    # bare TypeError, unhashable type)
    with pytest.raises(ConfigError, match=r"^--model: must be a registered model's name, e\.g\. "
                       rf"'densenet_bc', got {re.escape(repr(model))}$"):  # fmt: skip
        TrainConfig(model=model)
    with pytest.raises(ModelError, match=r"^unknown model"):
        create_model(model, num_classes=10, in_channels=3, image_size=32)


@pytest.mark.parametrize("key", ["num_classes", "in_channels", "image_size", "name", 3])
def test_model_args_that_create_model_sets_itself_are_refused(key):
    # model_args={"num_classes": 100} was a bare TypeError ("create_model() got multiple
    # values for keyword argument 'num_classes'") once the data had loaded
    with pytest.raises(ConfigError, match=rf"^model_args: {key!r} cannot be given: .* come "
                       "from the dataset, and the model's name is --model$"):  # fmt: skip
        TrainConfig(model_args={"depth": 16, key: 5})
    assert TrainConfig(model_args={"depth": 16, "growth": 8}).model_args["growth"] == 8


def test_from_dict_and_replace_refuse_what_is_no_config_field_by_name():
    cfg = TrainConfig(epochs=3, model_args={"depth": 16})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict({"epochs": 3, "model_args": {"depth": 16}}) == cfg  # defaults
    # replace(epoch=...) was a bare TypeError; from_dict(None) too, and from_dict of a list of
    # pairs called each pair an unknown field
    for call in (lambda: cfg.replace(epoch=5), lambda: TrainConfig.from_dict({"epoch": 5})):
        with pytest.raises(ConfigError, match=r"^unknown config fields \['epoch'\] \(did you "
                           r"mean 'epoch' -> 'epochs'\?\)$"):  # fmt: skip
            call()
    for bad in (None, [("epochs", 3)]):
        with pytest.raises(ConfigError, match="from_dict: needs a dict of config fields, got"):
            TrainConfig.from_dict(bad)
    assert cfg.replace(epochs=5).epochs == 5


def test_a_number_field_given_as_an_int_is_the_config_of_its_float():
    # t0=1 and --t0 1 (1.0) were equal configs with other JSON, so another hash and another
    # cache folder: a library run with weight_decay=0 resumed with --weight-decay 0 lost its store
    from prefast.cache.manager import run_key

    ints = TrainConfig(t0=1, base_lr=2, momentum=1, weight_decay=0, cache_memory_fraction=1,
                       dist_timeout=7)  # fmt: skip
    floats = TrainConfig(t0=1.0, base_lr=2.0, momentum=1.0, weight_decay=0.0,
                         cache_memory_fraction=1.0, dist_timeout=7.0)  # fmt: skip
    assert json.dumps(ints.to_dict()) == json.dumps(floats.to_dict())
    assert hash(ints) == hash(floats) and len({ints, floats}) == 1
    assert run_key(ints) == run_key(floats)
    assert type(ints.t0) is float and ints.replace(weight_decay=3).weight_decay == 3.0


def test_a_trainer_runs_once_and_one_not_run_is_closed_to_free_its_cache_folder(tmp_path):
    cfg = tiny(mode="prefast", epochs=2, cache="zarr", cache_dir=str(tmp_path))
    t = Trainer(cfg)
    result = t.run()
    assert len(result.records) == 2 and len(result.losses) == 2 * 6  # 96 images, batch 16
    # a second run() trained the trained model again, without its cache, and appended its
    # records to the first run's (4 records, 24 losses)
    with pytest.raises(PrefastError, match=r"^Trainer.run: this Trainer has run or was closed"):
        t.run()
    assert len(result.records) == 2
    # a Trainer never run kept the cache folder's lock for the life of the process: every
    # later run with its settings was refused as "another prefast run ... (pid <this one>)"
    idle = Trainer(cfg)
    with pytest.raises(CacheError, match=rf"this process \(pid {os.getpid()}\) is using .* "
                       r"already: .* a Trainer made with them has neither run nor been closed"):  # fmt: skip
        train(cfg)
    idle.close()
    idle.close()  # twice: fine
    with pytest.raises(PrefastError, match="has run or was closed already"):
        idle.run()
    with Trainer(cfg) as t:
        assert t.model.num_units == 9
    assert train(cfg).summary["epochs"] == 2


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws() -> list[float]:
    """Three draws from each of torch's, numpy's and Python's global generators."""
    return [
        *torch.rand(3).tolist(),
        *np.random.rand(3).tolist(),
        *(random.random() for _ in range(3)),
    ]


def test_a_run_leaves_the_callers_random_generators_as_it_found_them(tmp_path, monkeypatch):
    """A run seeds torch's global generator with --seed (the model's initialisation), and a
    resume sets numpy's and Python's from the checkpoint: after every run a caller's next draws
    were the same (a random search drawing its settings with torch.rand drew one setting for
    every run after the first). Each generator is now as the caller left it: after a run, a
    resumed run, and a start that failed after the model was built."""
    _seed_all(123)
    expected = _draws()
    cfg = tiny(mode="freezeout", epochs=1, checkpoint_dir=str(tmp_path))
    _seed_all(123)
    train(cfg)
    assert _draws() == expected
    _seed_all(123)
    train(cfg.replace(epochs=2, resume=True))
    assert _draws() == expected

    def refuse(*args: object) -> None:
        raise ModelError("refused")

    monkeypatch.setattr("prefast.training.trainer.check_model_fits", refuse)
    _seed_all(123)
    with pytest.raises(ModelError, match="refused"):
        Trainer(tiny(mode="freezeout", epochs=1))
    assert _draws() == expected


def test_paths_given_as_path_objects_write_metrics_and_resume(tmp_path):
    """A notebook passes pathlib.Paths: the metrics' config is JSON, and --resume loads the
    checkpoint it wrote (weights_only refuses a pickled Path)."""
    cfg = tiny(mode="freezeout", epochs=1, checkpoint_dir=tmp_path, metrics=tmp_path / "m.jsonl")
    assert cfg.checkpoint_dir == str(tmp_path) and cfg.metrics == str(tmp_path / "m.jsonl")
    first = train(cfg)
    again = train(cfg.replace(resume=True))  # finished: reports the same summary
    assert again.summary["final_test_error"] == first.summary["final_test_error"]
    assert json.loads((tmp_path / "m.config.json").read_text())["checkpoint_dir"] == str(tmp_path)


def test_numpy_numbers_from_a_sweep_are_plain_and_the_run_resumes(tmp_path):
    """A sweep over np.linspace / np.arange hands numpy scalars to TrainConfig; kept as they
    were, they went into the checkpoint, and --resume refused it (weights_only loads no numpy
    scalar): 'damaged (truncated?)'."""
    cfg = tiny(mode="freezeout", epochs=np.int64(1), t0=np.float64(0.3), augment=np.bool_(True),
               model_args={"depth": np.int64(16), "growth": 8}, checkpoint_dir=str(tmp_path))  # fmt: skip
    assert [type(v) for v in (cfg.epochs, cfg.t0, cfg.augment, cfg.model_args["depth"])] == [
        int,
        float,
        bool,
        int,
    ]
    assert (cfg.epochs, cfg.t0, cfg.model_args) == (1, 0.3, {"depth": 16, "growth": 8})
    first = train(cfg)
    again = train(cfg.replace(resume=True))  # finished: reports the same summary
    assert again.summary["final_test_error"] == first.summary["final_test_error"]


def test_numpy_numbers_in_a_model_arguments_list_are_plain(tmp_path):
    """A model of one's own taking a list (widths=list(np.arange(...))): its numpy scalars
    stayed, so --metrics failed (JSON) and --resume refused the checkpoint as damaged."""
    from prefast.config import TrainConfig

    cfg = TrainConfig(model_args={"widths": list(np.arange(8, 10)), "pair": (np.float32(0.5), 1)})
    assert cfg.model_args == {"widths": [8, 9], "pair": (0.5, 1)}
    assert {type(v) for v in cfg.model_args["widths"]} == {int}
    assert type(cfg.model_args["pair"][0]) is float
    json.dumps(cfg.to_dict())
    torch.save(cfg.to_dict(), tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["model_args"] == cfg.model_args


@pytest.mark.parametrize(
    "value, shown",
    [
        (np.arange(3), "an array of shape (3,)"),
        (nn.ReLU, "<class "),
        (float("nan"), "nan"),
        ({1: 2, "b": 3}, "{1: 2, 'b': 3}"),
    ],
)
def test_model_arguments_that_are_no_json_are_refused_by_name(value, shown):
    """model_args go into JSON (--metrics, a zarr cache's run key) and checkpoints: an array
    or a class was taken, and the run failed with a TypeError traceback at its first zarr
    cache, or wrote a checkpoint that --resume refused as damaged."""
    with pytest.raises(ConfigError, match=rf"^model_args: 'widths' must be JSON-able .*, got "
                       rf"{re.escape(shown)}"):  # fmt: skip
        TrainConfig(model_args={"depth": 16, "widths": value})


def test_model_arguments_are_the_configs_own():
    """A frozen config held the caller's dict: a sweep that changed it after making the
    config changed that config (every config of the sweep trained the last depth)."""
    args = {"depth": 16, "widths": [8, 9]}
    cfg = TrainConfig(model_args=args)
    args["depth"] = 40
    args["widths"].append(10)
    assert cfg.model_args == {"depth": 16, "widths": [8, 9]}


def test_configs_are_hashable():
    """A frozen dataclass, yet hash() failed on its model_args dict: a sweep's results keyed
    by config (or a set of configs) raised TypeError: unhashable type: 'dict'."""
    a = TrainConfig(epochs=3, model_args={"depth": 16, "pair": (1, 2)})
    b = TrainConfig.from_dict(a.to_dict())
    results = {a: 1}
    assert results[b] == 1 and hash(a) == hash(b)
    assert len({a, b, a.replace(epochs=4)}) == 2


def test_train_refuses_what_is_no_config():
    """train(dict) (a saved m.config.json, say) failed with AttributeError: 'dict' object has
    no attribute 'keep_freed_memory'."""
    with pytest.raises(ConfigError, match=r"^train and Trainer take a TrainConfig, got dict; "
                       r"TrainConfig.from_dict\(d\) makes one from a dict$"):  # fmt: skip
        train({"dataset": "synthetic"})
    with pytest.raises(ConfigError, match=r"^train and Trainer take a TrainConfig, got str$"):
        Trainer("m.config.json")


def test_the_returned_model_is_in_eval_mode_throughout():
    """result.model said model.training False while its head and the units still training
    were in train mode: result.model(x) updated their BatchNorm statistics, and the model
    then gave another test error than the summary's."""
    result = train(tiny(mode="freezeout", epochs=1, t0=0.9))
    model = result.model
    assert not any(m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_evaluation_shows_a_progress_bar(capsys):
    """Evaluating the whole model on the test set after each epoch takes a minute or more on
    a CPU for a large model: it had no bar."""
    for progress in (True, False):
        with Trainer(tiny(mode="freezeout", eval_batch_size=10, progress=progress)) as t:
            n = -(-len(t.data.test) // 10)
            t.evaluate(t.data.test)
        err = capsys.readouterr().err
        assert ("evaluating:   0%" in err and f"0/{n} [" in err) == progress
        assert ("evaluating" in err) == progress


def test_evaluation_restores_each_modules_mode_during_and_after_the_run():
    """Evaluation runs in eval mode and puts every module back as it was: during the run the
    frozen units stay in eval mode and the others train; after it, evaluating again left the
    returned model's head and last units in train mode (they set the run's modes)."""
    t = Trainer(tiny(mode="freezeout", epochs=2, t0=0.5))
    real_eval, seen = t.evaluate, []

    def evaluate(data):
        seen.append(([u.training for u in t.model.units], t.model.head.training, t.frontier))
        out = real_eval(data)
        assert [u.training for u in t.model.units] == seen[-1][0]
        assert t.model.head.training == seen[-1][1]
        return out

    t.evaluate = evaluate
    result = t.run()
    frozen = [f for *_, f in seen]
    assert frozen[0] < len(seen[0][0]) and frozen[-1] > 0  # some units train, some froze
    for units, head, f in seen:
        assert units == [i >= f for i in range(len(units))] and head
    assert real_eval(t.data.test) == (
        result.records[-1]["test_loss"],
        result.records[-1]["test_error"],
    )
    assert not any(m.training for m in result.model.modules())


def test_runs_with_other_settings_share_a_cache_dir_apart(tmp_path, capsys):
    """Another model, or other settings, in the same --cache-dir: each run keeps its stores in
    its own run folder, and neither replaces the other's."""
    base = ["train", "--dataset", "synthetic", "--num-samples", "64", "--epochs", "4", "--batch-size", "16",
            "--t0", "0.3", "--how-scale", "linear", "--mode", "prefast", "--cache", "zarr", "--recache-policy", "every",
            "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--no-progress", "-q"]  # fmt: skip
    assert main([*base, "--depth", "16", "--growth", "8"]) == 0
    first = capsys.readouterr().out
    assert main([*base, "--depth", "16", "--growth", "6"]) == 0
    second = capsys.readouterr().out
    paths = [
        line.split()[2] for line in (first + second).splitlines() if line.startswith("cache store:")
    ]
    assert len(paths) == 2 and Path(paths[0]).parent != Path(paths[1]).parent
    for p in paths:  # both stores are still there and still open
        assert store.open(p).meta["model"]["growth"] in (6, 8)
    assert sorted(store.open(p).meta["model"]["growth"] for p in paths) == [6, 8]


def test_a_second_run_with_the_same_settings_is_refused_at_start_up(tmp_path):
    cfg = tiny(mode="prefast", cache="zarr", cache_dir=str(tmp_path / "c"))
    first = Trainer(cfg)  # holds the run folder's lock until it closes
    try:  # in this process; another one's is "another prefast run with the same settings"
        with pytest.raises(CacheError, match=r"this process \(pid \d+\) is using .* already"):
            Trainer(cfg)
    finally:
        first.close()
    Trainer(cfg).close()  # free again once the first let go


def test_cache_dir_as_a_file_url_is_the_local_folder(tmp_path):
    r = train(
        tiny(
            mode="prefast",
            cache="zarr",
            cache_dir=f"file://{tmp_path}/c",
            epochs=4,
            recache_policy="every",
        )
    )
    path = Path(r.summary["cache_path"])
    assert path.parent.parent == tmp_path / "c" and path.is_dir()
    assert store.open(path).memory_mapped


def test_cache_dir_at_an_fsspec_url(tmp_path, capsys):
    from prefast.cli import _print_summary
    from store import location

    url = "memory://prefast-trainer-test/cache"
    r = train(tiny(mode="prefast", cache="zarr", cache_dir=url, recache_policy="every"))
    path = r.summary["cache_path"]
    _print_summary(r.summary)  # no inspect command for a store that ends with the process
    said = capsys.readouterr().out
    assert f"cache store: {path}  (in this process's memory only" in said
    assert "python -m store inspect" not in said
    (run_dir,) = location.children(url)
    assert path == f"{run_dir}/boundary-{r.summary['cache_boundary']:03d}"
    s = store.open(path)
    assert s.complete and not s.memory_mapped and s.num_samples == 96
    assert location.children(run_dir) == [path]  # superseded stores were deleted
    # another model's run works apart in the same folder (policy every: the auto plan may well
    # make no cache, its probes timed on a loaded machine, and then the run keeps no folder)
    other = train(
        tiny(mode="prefast", cache="zarr", cache_dir=url, model_args={"depth": 16, "growth": 6},
             recache_policy="every")
    )  # fmt: skip
    assert len(location.children(url)) == 2 and store.open(path).complete
    assert other.summary["cache_path"] != path


# ---- models beyond DenseNet: your own, ResNet-18 ------------------------------------------------------
def _byo_cnn(*, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 8):
    """A three-unit CNN of one's own, as docs/models.md shows it."""

    def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    units = [conv(in_channels, width), conv(width, width), conv(width, 2 * width, stride=2)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
    config = {"name": "byo_cnn", "num_classes": num_classes, "in_channels": in_channels,
              "image_size": image_size, "width": width}  # fmt: skip
    return from_sequential(units, head, cut_points=[1, 3], config=config)


@pytest.fixture
def byo_cnn():
    register_model("byo_cnn")(_byo_cnn)
    try:
        yield "byo_cnn"
    finally:
        unregister_model("byo_cnn")


def test_a_model_of_your_own_trains_in_freezeout_and_prefast(byo_cnn, tmp_path):
    kw = dict(model=byo_cnn, model_args={"width": 6}, epochs=1, augment=False, recache_mode="pass")
    ref = train(tiny(mode="freezeout", **kw))
    got = train(
        tiny(
            mode="prefast",
            cache="zarr",
            cache_dir=str(tmp_path / "c"),
            cache_dtype="float32",
            recache_policy="every",
            **kw,
        )
    )
    assert isinstance(ref.model, UnitModel) and ref.model.num_units == 3
    assert ref.summary["frozen_units"] == got.summary["frozen_units"] == 3  # t = 0.3, 0.53, 0.77
    assert got.summary["cache_boundary"] == 3 and got.summary["model"]["width"] == 6
    assert store.open(got.summary["cache_path"]).meta["model"] == got.model.config
    assert len(got.losses) == 6
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))


def _flat_cnn(*, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 5):
    """A model given layer by layer, as an ``nn.Sequential``'s children: the activations are
    units of their own and work in place on the previous unit's output, and the units hold
    BatchNorm and dropout."""
    units = [
        nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width)),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width)),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Sequential(nn.Dropout(0.25), nn.Conv2d(width, width, 3, padding=1)),
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    config = {"name": "flat_cnn", "num_classes": num_classes, "in_channels": in_channels,
              "image_size": image_size, "width": width}  # fmt: skip
    return from_sequential(units, head, cut_points=[2, 4], config=config)


@pytest.mark.parametrize(
    ("tier", "recache_mode"), [("ram", "write-through"), ("ram", "pass"), ("zarr", "write-through")]
)
def test_a_model_of_your_own_from_an_fp32_cache_equals_freezeout(
    tmp_path, monkeypatch, tier, recache_mode
):
    """Exactness for a model of one's own: same losses and weights (BatchNorm statistics too)
    as FreezeOut, and a frozen unit's weights and statistics stay as they were at its freeze.
    Written through the steps, a cache took the activation after the in-place LeakyReLU that
    follows its boundary, so the next epochs applied it twice."""
    from prefast.training import trainer

    at_freeze: list[dict[int, dict[str, torch.Tensor]]] = []

    real_freeze_unit = trainer.freeze_unit

    def freeze_unit(model, optimizer, i, j):
        real_freeze_unit(model, optimizer, i, j)
        at_freeze[-1][i] = {k: v.clone() for k, v in model.units[i].state_dict().items()}

    monkeypatch.setattr(trainer, "freeze_unit", freeze_unit)
    register_model("flat_cnn")(_flat_cnn)
    try:
        kw = dict(model="flat_cnn", model_args={}, num_samples=77, epochs=4, augment=False)
        at_freeze.append({})
        ref = train(tiny(mode="freezeout", **kw))
        at_freeze.append({})
        got = train(
            tiny(
                mode="prefast",
                cache=tier,
                cache_dir=str(tmp_path / "c"),
                cache_dtype="float32",
                recache_policy="every",
                recache_mode=recache_mode,
                **kw,
            )
        )
    finally:
        unregister_model("flat_cnn")
    assert ref.summary["frozen_units"] == got.summary["frozen_units"] == 5
    assert got.summary["cache_tier"] == tier
    if recache_mode == "write-through":  # the caches were written by the steps
        assert 0 < got.summary["cache_boundary"] < 5
    assert len(got.losses) == len(ref.losses) == 20
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))
    torch.testing.assert_close(_weights(got.model), _weights(ref.model))
    for run, frozen in zip((ref, got), at_freeze, strict=True):
        assert sorted(frozen) == [0, 1, 2, 3, 4]
        for i, state in frozen.items():
            torch.testing.assert_close(run.model.units[i].state_dict(), state, rtol=0, atol=0)
    # the BatchNorm statistics did move while the units trained
    assert ref.model.units[0][1].num_batches_tracked > 0


def _fixed_cnn(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
               classes: int = 10, channels: int = 3):  # fmt: skip
    """A factory that ignores num_classes and in_channels, as a hurried notebook's may."""
    unit = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    return from_sequential([unit], head, config={"name": "fixed_cnn", "classes": classes,
                                                "channels": channels})  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"classes": 100}, "its output for one synthetic image is (1, 100), not logits of shape "
                           "(1, 10) for the dataset's 10 classes; does its factory build for "
                           "in_channels=3, image_size=32 and num_classes=10?"),
        ({"classes": 5}, "is (1, 5), not logits of shape (1, 10)"),
        ({"channels": 1}, "does not run on synthetic's 3x32x32 images (Given groups=1"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["freezeout", "prefast"])
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(args, needle, mode):
    register_model("fixed_cnn")(_fixed_cnn)
    try:
        with pytest.raises(ModelError, match=re.escape(needle)) as e:
            train(tiny(model="fixed_cnn", model_args=args, mode=mode, epochs=1))
        assert str(e.value).startswith("model 'fixed_cnn'")
    finally:
        unregister_model("fixed_cnn")


class _MeanOverBatch(nn.Module):
    """A unit with a slip: the mean over dim 0 (the batch) where dim 1 was meant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0, keepdim=True)


@pytest.mark.parametrize("mode", ["freezeout", "prefast"])
def test_a_model_that_does_not_keep_the_batch_is_refused_before_training(mode):
    """One image in, one row out: the check passed such a model, and the first step failed in
    the loss with torch's 'Expected input batch_size (1) to match target batch_size (16)' (and
    --mode prefast blamed the cache, naming freezeout as the way out)."""

    def reduced(*, num_classes: int, in_channels: int = 3, image_size: int = 32):
        units = [nn.Conv2d(in_channels, 4, 3, padding=1), _MeanOverBatch()]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        return from_sequential(units, head, unit_names=["conv", "pool"], config={"name": "red"})

    register_model("red")(reduced)
    try:
        with pytest.raises(ModelError, match=re.escape(
            "model 'red': for a batch of 2 synthetic images it returns shape (1, 4, 32, 32) "
            "from unit 1 (pool); each unit and the head must keep the batch first"
        )):  # fmt: skip
            train(tiny(model="red", model_args={}, mode=mode, epochs=1))
    finally:
        unregister_model("red")


class _ChecksChannels(nn.Module):
    """A unit that checks its input itself, as many models do, with a ValueError."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.conv.in_channels:
            raise ValueError(f"expected {self.conv.in_channels} channels, got {x.shape[1]}")
        out: torch.Tensor = self.conv(x)
        return out


def test_a_model_that_refuses_the_data_with_a_value_error_is_refused_before_training():
    """Only a RuntimeError (torch's shape errors) became the one-line ModelError; a model
    that checks its input itself with a ValueError showed a traceback."""

    def checked(*, num_classes: int, in_channels: int = 3, image_size: int = 32):
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        return from_sequential([_ChecksChannels(1)], head, config={"name": "checked"})

    register_model("checked")(checked)
    try:
        with pytest.raises(ModelError, match=re.escape(
            "model 'checked' does not run on synthetic's 3x32x32 images (expected 1 channels, "
            "got 3); does its factory build for in_channels=3"
        )):  # fmt: skip
            train(tiny(model="checked", model_args={}, mode="freezeout", epochs=1))
    finally:
        unregister_model("checked")


class _WithSpare(nn.Module):
    """``inner`` plus a layer built but never called."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


@pytest.mark.parametrize(("where", "needle"), [("unit", "unit 1 (pool)"), ("head", "the head")])
def test_a_parameter_the_forward_never_uses_is_named(where, needle):
    """The first step failed with "unit 1 has parameters without a gradient; was backward()
    run?", which names neither the layer nor the fix."""

    def factory(*, num_classes: int, in_channels: int = 3, image_size: int = 32):
        pool: nn.Module = nn.AvgPool2d(2)
        head: nn.Module = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
        )
        if where == "unit":
            pool = _WithSpare(pool)
        else:
            head = _WithSpare(head)
        units = [nn.Conv2d(in_channels, 4, 3, padding=1), pool, nn.Conv2d(4, 4, 3)]
        names = ["conv", "pool", "conv2"]
        return from_sequential(units, head, unit_names=names, config={"name": "spare"})

    register_model("spare")(factory)
    try:
        msg = f"{needle}: parameter spare.weight got no gradient: its forward does not use it."
        with pytest.raises(ModelError, match=re.escape(msg)):
            train(tiny(model="spare", model_args={}, mode="freezeout", epochs=1))
    finally:
        unregister_model("spare")


class _Float64Conv(nn.Module):
    """A float64 convolution: it takes float64 (``cast=False``) or casts its input."""

    def __init__(self, c_in: int, cast: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3, padding=1).double()
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x.double() if self.cast else x)
        return out


class _ToFloat32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@pytest.mark.parametrize("recache_mode", ["pass", "write-through"])
def test_a_model_that_computes_in_float64_trains_from_a_cache(tmp_path, recache_mode):
    """Units that return float64: a cached batch was handed to the unit after its boundary as
    float32, which a float64 convolution refused ("Input type (float) and bias type (double)
    should be the same") at the first step after a freeze, where freezeout trains. It is
    handed over in the dtype the unit before it returns (rounded to the cache's float32)."""
    from prefast.cache.build import activation_dtypes

    def factory(*, num_classes: int, in_channels: int = 3, image_size: int = 32):
        units = [_Float64Conv(in_channels, cast=True), _Float64Conv(4, cast=False), _ToFloat32()]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        return from_sequential(units, head, config={"name": "f64_cnn"})

    register_model("f64_cnn")(factory)
    try:
        model = create_model("f64_cnn", num_classes=10, in_channels=3, image_size=32)
        f32, f64 = torch.float32, torch.float64
        assert activation_dtypes(model, (3, 32, 32), torch.device("cpu"), "none") == (
            f32, f64, f64, f32,
        )  # fmt: skip
        kw = dict(model="f64_cnn", model_args={}, epochs=2, num_samples=64, augment=False)
        ref = train(tiny(mode="freezeout", **kw))
        got = train(
            tiny(
                mode="prefast", cache="ram", cache_dtype="float32", recache_policy="every",
                recache_mode=recache_mode, **kw,
            )
        )  # fmt: skip
    finally:
        unregister_model("f64_cnn")
    assert ref.summary["frozen_units"] == got.summary["frozen_units"] == 3
    assert got.summary["cache_boundary"] >= 1
    assert len(got.losses) == len(ref.losses) == 8
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))
    torch.testing.assert_close(_weights(got.model), _weights(ref.model))


@pytest.mark.parametrize("mode", ["freezeout", "prefast"])
def test_a_model_in_float64_is_refused_before_training(mode):
    """A model made .double() passed the start-up check, which fed it zeros in its parameters'
    dtype, and its first step failed on the float32 images with a bare RuntimeError."""

    def doubled(*, num_classes: int, in_channels: int = 3, image_size: int = 32):
        units = [nn.Conv2d(in_channels, 4, 3, padding=1), nn.Conv2d(4, 4, 1)]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        return from_sequential(units, head, config={"name": "doubled"}).double()

    register_model("doubled")(doubled)
    try:
        with pytest.raises(ModelError, match=re.escape(
            "model 'doubled' does not run on synthetic's 3x32x32 images (Input type (float) and "
            "bias type (double) should be the same)"
        )):  # fmt: skip
            train(tiny(model="doubled", model_args={}, mode=mode, epochs=1))
    finally:
        unregister_model("doubled")


def test_a_head_without_trainable_parameters_is_refused_before_training():
    """The head trains alone after the last freeze: one with nothing to train failed there,
    near the end of the run, with torch's 'does not require grad'."""

    def factory(*, num_classes: int, in_channels: int = 3, image_size: int = 32):
        units = [nn.Conv2d(in_channels, 4, 3, padding=1), nn.Conv2d(4, num_classes, 1)]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return from_sequential(units, head, config={"name": "headless"})

    register_model("headless")(factory)
    try:
        with pytest.raises(ModelError, match=r"^model 'headless': its head has no trainable "):
            train(tiny(model="headless", model_args={}, mode="freezeout", epochs=1))
        assert train(tiny(model="headless", model_args={}, mode="full", epochs=1)).losses
    finally:
        unregister_model("headless")


# ResNet-18 costs ~100x densenet-16 per sample (0.45 GMAC at 28x28): on this CPU a step of 16
# took ~2 s and evaluating the 256 synthetic test images ~5 s. So: MNIST-shaped inputs, 32
# training images in batches of 8 (still 8 iterations, the freeze pattern below), 32 test images.
RESNET = dict(
    model="resnet18",
    model_args={},
    num_samples=32,
    batch_size=8,
    synthetic_shape="mnist",
    epochs=2,
    augment=False,
    recache_mode="pass",  # two short epochs: caches at the freezes, not an epoch later
)


@pytest.fixture
def few_test_images(monkeypatch):
    """32 synthetic test images instead of at least 256."""
    from prefast.data import splits

    monkeypatch.setattr(splits, "default_size", lambda split, train_size=0: 32)


@pytest.mark.usefixtures("few_test_images")
@pytest.mark.parametrize("mode", ["full", "freezeout", "prefast"])
def test_resnet18_trains_in_every_mode(mode, tmp_path):
    cache = dict(cache="zarr", cache_dir=str(tmp_path / "c"), recache_policy="transitions")
    r = train(tiny(mode=mode, **RESNET, **(cache if mode == "prefast" else {})))
    assert len(r.losses) == 8 and torch.isfinite(torch.tensor(r.losses)).all()
    assert r.summary["model"] == {
        "name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28
    }  # fmt: skip
    # t0 = 0.3 linear over 8 iterations: units 0-7 freeze at j = 3, 4, 4, 5, 5, 6, 7, 7
    assert r.summary["frozen_units"] == (0 if mode == "full" else 8)
    if mode == "prefast":
        assert r.summary["cache_tier"] == "zarr"
        assert r.summary["cache_boundary"] in r.model.cut_points  # 3, 5 or 7
        assert store.open(r.summary["cache_path"]).meta["model"]["name"] == "resnet18"


@pytest.mark.usefixtures("few_test_images")
def test_resnet18_prefast_from_fp32_zarr_cache_equals_freezeout(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prefast")
    ref = train(tiny(mode="freezeout", **RESNET))
    caplog.clear()
    got = train(
        tiny(
            mode="prefast",
            cache="zarr",
            cache_dir=str(tmp_path / "cache"),
            cache_dtype="float32",
            codec="none",
            views=1,
            recache_policy="every",
            **RESNET,
        )
    )
    moves = [r for r in caplog.records if "cache boundary" in r.getMessage()]
    assert len(moves) >= 2, "the boundary must move at least twice"
    assert got.summary["frozen_units"] == ref.summary["frozen_units"] == 8
    assert got.summary["cache_boundary"] == 8 and got.summary["cache_tier"] == "zarr"
    assert len(got.losses) == len(ref.losses) == 8
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))
    torch.testing.assert_close(_weights(got.model), _weights(ref.model))


@pytest.mark.usefixtures("few_test_images")
def test_cli_trains_resnet18(capsys):
    args = ["train", "--dataset", "synthetic", "--synthetic-shape", "mnist", "--num-samples", "16",
            "--model", "resnet18", "--epochs", "1", "--batch-size", "8", "--mode", "freezeout",
            "--t0", "0.3", "--device", "cpu", "--no-progress", "-q"]  # fmt: skip
    assert main(args) == 0
    assert "freezeout resnet18 on synthetic (16 images, 1 epoch)" in capsys.readouterr().out


def test_cli_help_examples_fit_together():
    """The examples of prefast train --help and prefast verify --help: the FreezeOut and full
    runs 'of the same schedule' trained DenseNet-BC-76 against the PreFast example's 40, and
    verify's --checkpoint runs/fmnist/last.pt was written by none of them."""
    import shlex

    from prefast import cli

    def commands(text: str) -> list[list[str]]:
        lines = text.replace("\\\n", " ").splitlines()
        return [shlex.split(x)[1:] for x in lines if x.strip().startswith("prefast ")]

    parser = cli.build_parser()
    train = [cli.config_from_args(parser.parse_args(c)) for c in commands(cli.TRAIN_EXAMPLES)]
    first, freezeout, full = train[:3]
    own = ("mode", "cache", "cache_dir", "metrics", "checkpoint_dir")
    for other, mode in ((freezeout, "freezeout"), (full, "full")):
        assert other.mode == mode
        assert other.replace(**{k: getattr(first, k) for k in own}) == first
    assert first.checkpoint_dir is not None and first.cache_dir is not None
    for c in commands(cli.VERIFY_EXAMPLES):
        v = parser.parse_args(c)
        assert v.checkpoint == f"{first.checkpoint_dir}/last.pt"
        assert v.path.startswith(f"{first.cache_dir}/run-")


def test_cli_model_help_lists_the_registered_models(byo_cnn, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL one of byo_cnn, densenet_bc, resnet18, resnet34, vgg, wrn" in help_text
    assert "resnet18, resnet34: fixed, no --depth" in help_text


def test_cli_answers_help_and_usage_errors_without_importing_torch():
    """--help and a wrong flag take milliseconds, not the seconds torch takes to import, and a
    Ctrl-C in those seconds of a real run reaches prefast's handler (a clean stop, exit 130)
    rather than interrupting an import with a traceback."""
    code = (
        "import sys\n"
        "from prefast.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--bogus'], ['verify', '-h'],\n"
        "             ['train', '--t0', '2', '--no-progress']):\n"
        "    try:\n"
        "        print('exit', main(argv))\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--model MODEL" in out.stdout and "unrecognized arguments: --bogus" in out.stderr
    assert "prefast: error: --t0: must be a finite number in (0, 1], got 2.0" in out.stderr
    assert "exit 2" in out.stdout
    assert out.stdout.splitlines()[-1] == "[]"


def test_builtin_model_names_are_the_registered_builtins():
    """The CLI names the built-in models from prefast.config.BUILTIN_MODELS without loading
    the registry; the list must be what prefast.models registers."""
    from prefast.config import BUILTIN_MODELS
    from prefast.models import registry

    builtin = {
        name
        for name in registry.list_models()
        if registry._REGISTRY[name].__module__ in {
            "prefast.models.densenet", "prefast.models.resnet", "prefast.models.vgg",
            "prefast.models.wrn",
        }
    }  # fmt: skip
    assert sorted(BUILTIN_MODELS) == sorted(builtin) == list(BUILTIN_MODELS)


@pytest.mark.parametrize("package", ["prefast", "prefast.data", "prefast.freezeout", "store"])
def test_lazy_exports_match_the_type_checking_imports(package):
    """Each lazily exporting package lists its names twice: in the TYPE_CHECKING imports (for
    mypy) and in the table store._lazy imports them from. Both must agree with __all__, and
    every name must resolve to the object its module defines."""
    import ast
    import importlib

    mod = importlib.import_module(package)
    tree = ast.parse(Path(mod.__file__).read_text())
    guarded = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    typed = {
        (i.module, a.name) for i in guarded.body if isinstance(i, ast.ImportFrom) for a in i.names
    }
    eager = {(i.module, a.name) for i in tree.body if isinstance(i, ast.ImportFrom) for a in i.names
             if i.module not in ("__future__", "typing", "store._lazy")}  # fmt: skip
    call = next(
        n for n in ast.walk(guarded) if isinstance(n, ast.Call) and ast.unparse(n.func) == "exports"
    )
    table = {(m, name) for m, names in ast.literal_eval(call.args[1]).items() for name in names}
    assert typed == table
    assert sorted(name for _, name in typed | eager) == sorted(mod.__all__)
    for module, name in table:
        assert getattr(mod, name) is getattr(importlib.import_module(module), name)
        assert name in dir(mod)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        mod.no_such_name  # noqa: B018
    # not a module name: hasattr and getattr with a default answer, as for any module
    for odd in ("a.b", "", "1x", ".models"):
        assert not hasattr(mod, odd)
        assert getattr(mod, odd, None) is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_keep_freed_memory_stops_the_heap_being_returned_after_every_step():
    """Three 8 MiB blocks freed together leave 24 MiB at the heap's top: glibc's defaults give
    them back to the system and the next 'step' faults every page in again; once
    ``keep_freed_memory`` has run they are reused."""
    from prefast.runtime import keep_freed_memory

    def faults_per_round() -> float:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            blocks = [np.ones(8 << 20, dtype=np.uint8) for _ in range(3)]
            del blocks
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    faults_per_round()  # the first round grows the heap
    assert faults_per_round() < 100  # ~1,000 here with the defaults (the heap is trimmed)


def test_keep_freed_memory_is_asked_for_by_the_config(monkeypatch):
    import prefast.training.trainer as T

    calls = []
    monkeypatch.setattr(T, "keep_freed_memory", lambda: calls.append(1) or True)
    T.Trainer(tiny(mode="freezeout", keep_freed_memory=False))
    assert calls == []
    T.Trainer(tiny(mode="freezeout"))
    assert calls == [1]


def test_options_a_run_will_not_use_are_named():
    from prefast.config import unused_options

    assert unused_options(TrainConfig(), "cpu", False) == []
    assert unused_options(TrainConfig(mode="freezeout", seed=3, augment=False), "cpu", False) == []
    lines = unused_options(
        TrainConfig(mode="freezeout", cache="zarr", codec="lz4", views=3, sync_bn=True),
        "cuda",
        False,
    )
    assert lines == [
        "--cache, --codec, --views: no effect with --mode freezeout (they apply to --mode prefast)",
        "--sync-bn: no effect outside torchrun",
    ]
    assert unused_options(TrainConfig(sync_bn=True), "cuda", True) == []
    # full training freezes nothing: the schedule's options were taken without a word
    full = TrainConfig(mode="full", t0=0.6, how_scale="linear", scale_lr=False)
    assert unused_options(full, "cpu", False) == [
        "--t0, --how-scale, --no-scale-lr: no effect with --mode full (no unit freezes; they "
        "apply to --mode freezeout and prefast)"
    ]
    assert unused_options(TrainConfig(mode="freezeout", t0=0.6), "cpu", False) == []
    # --dist-timeout was taken silently by a run that starts no process group
    assert unused_options(TrainConfig(dist_timeout=60.0), "cpu", False) == [
        "--dist-timeout: no effect outside torchrun"
    ]
    assert unused_options(TrainConfig(dist_timeout=60.0), "cpu", True) == []
    # an explicit tier takes all of its free memory: the fraction sizes auto's choice only
    assert unused_options(TrainConfig(cache="ram", cache_memory_fraction=0.2), "cpu", False) == [
        "--cache-memory-fraction: no effect with --cache ram (it sizes --cache auto's choice)"
    ]
    assert unused_options(TrainConfig(cache_memory_fraction=0.2), "cpu", False) == []
    assert unused_options(TrainConfig(feature_aug="shift", augment=False), "cuda", False) == [
        "--feature-aug: no effect with --no-augment"
    ]
    assert unused_options(TrainConfig(dataset="mnist", feature_aug="shift+flip"), "cpu", False) == [
        "--feature-aug shift+flip: mnist is not flipped in training, so only the shift applies"
        " (as --feature-aug shift)"
    ]
    mnist_shaped = TrainConfig(
        dataset="synthetic", synthetic_shape="mnist", feature_aug="shift+flip"
    )
    assert unused_options(mnist_shaped, "cpu", False)[0].startswith(
        "--feature-aug shift+flip: synthetic (mnist shape) is not flipped"
    )
    for flipped in ("fashion-mnist", "cifar10", "synthetic"):
        cfg = TrainConfig(dataset=flipped, feature_aug="shift+flip")
        assert unused_options(cfg, "cpu", False) == []
    assert unused_options(TrainConfig(dataset="mnist", feature_aug="shift"), "cpu", False) == []
    assert unused_options(TrainConfig(cache="device"), "cpu", False) == [
        "--cache device: on the CPU the device is host memory, as --cache ram"
    ]
    assert unused_options(TrainConfig(cache="device"), "cuda", False) == []
    assert unused_options(TrainConfig(synthetic_shape="mnist"), "cpu", False) == [
        "--synthetic-shape: no effect with --dataset fashion-mnist"
    ]
    assert (
        unused_options(TrainConfig(dataset="synthetic", synthetic_shape="mnist"), "cpu", False)
        == []
    )


def test_the_trainer_warns_of_an_unused_option(caplog):
    with caplog.at_level(logging.WARNING, logger="prefast"):
        train(tiny(mode="freezeout", cache="ram", epochs=1))
    assert "--cache: no effect with --mode freezeout" in caplog.text


@pytest.mark.parametrize(("codec", "passes"), [("lz4", {"zarr"}), ("none", set())])
def test_the_write_through_plan_prices_a_store_that_takes_no_rows_as_a_pass(
    tmp_path, monkeypatch, codec, passes
):
    """--cache auto with a codec: caches that go to RAM or the device are written through, those
    that go to a store are made by passes; the plan is told which (here every cache goes to
    the store: it may take almost no host memory)."""
    import prefast.cache.manager as M

    seen: list[dict] = []
    real = M.plan_epochs

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(M, "plan_epochs", spy)
    train(tiny(mode="prefast", cache="auto", codec=codec, cache_memory_fraction=1e-9,
               recache_policy="auto", epochs=4, cache_dir=str(tmp_path)))  # fmt: skip
    assert seen and all(k["pass_tiers"] == passes and k["num_samples"] == 96 for k in seen)


def test_views_without_augmentation_outside_prefast_mode_are_named_once(caplog):
    """--views 3 --no-augment --mode freezeout was named twice: as unused, then as 'would store
    3 identical copies; using 1 view', though that mode stores nothing."""
    with (
        caplog.at_level(logging.WARNING, logger="prefast"),
        Trainer(tiny(mode="freezeout", views=3, augment=False)),
    ):
        pass
    said = [r.getMessage() for r in caplog.records if "--views" in r.getMessage()]
    assert said == ["--views: no effect with --mode freezeout (they apply to --mode prefast)"]
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="prefast"),
        Trainer(tiny(mode="prefast", cache="ram", views=3, augment=False)),
    ):
        pass
    said = [r.getMessage() for r in caplog.records if "--views" in r.getMessage()]
    assert said == ["--views 3 without augmentation would store 3 identical copies; using 1 view"]


def test_epoch_metrics_count_every_sample_once():
    """The epoch's train loss is the mean over samples (a short last batch weighs by its size,
    not as a whole batch), and the test loss and error are over the whole test set where
    the evaluation batch divides it unevenly (256 images in batches of 100) and the
    held-out images fit in one batch (10 in one of 100)."""
    from prefast.data import make_batch

    t = Trainer(tiny(mode="freezeout", num_samples=53, val_size=10, epochs=1, eval_batch_size=100))
    data = t.data
    result = t.run()
    (rec,) = result.records
    sizes = [16, 16, 11]  # 43 training images after the 10 held out
    assert len(result.losses) == 3 and rec["samples_seen"] == 43
    assert rec["train_loss"] == pytest.approx(np.dot(result.losses, sizes) / 43, rel=1e-12)
    for split, name in ((data.test, "test"), (data.val, "val")):
        x, y = make_batch(split, np.arange(len(split)), None, "cpu")
        with torch.no_grad():
            out = result.model(x)
        assert rec[f"{name}_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
        assert rec[f"{name}_error"] == 1 - (out.argmax(1) == y).sum().item() / len(split)
    assert len(data.test) == 256 and len(data.val) == 10
    assert result.summary["final_test_error"] == rec["test_error"]
    assert result.summary["final_val_loss"] == rec["val_loss"]


def test_a_failed_checkpoint_save_says_the_checkpoint_holds_fewer_epochs(tmp_path, monkeypatch):
    """A save that fails (a full disk) after its epoch's record: the failed line said two
    epochs done next to the checkpoint, which holds one, so it named the wrong resume point."""
    import prefast.training.trainer as trainer_mod

    real = trainer_mod.save_checkpoint
    calls = {"n": 0}

    def full_disk(path, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        real(path, state)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", full_disk)
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    with pytest.raises(OSError, match="No space"):
        train(tiny(epochs=3, metrics=str(metrics), checkpoint_dir=str(ck)))
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert (last["failed"], last["epochs_done"]) == (True, 2)
    assert (last["checkpoint"], last["checkpoint_epochs"]) == (str(ck / "last.pt"), 1)
    assert torch.load(ck / "last.pt", weights_only=True)["epoch"] == 1


class _FullDisk:
    """A metrics file on a disk that fills: each write puts half its bytes down, then fails."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, b) -> int:
        self.f.write(b[: len(b) // 2])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_metrics_write_on_a_full_disk_names_the_file_and_leaves_no_half_line(
    tmp_path, monkeypatch
):
    """A metrics line that fails to write (a full disk) raised a bare '[Errno 28] No space
    left on device', left half a line in the file, and left it buffered: closing the file
    failed again, and that bare error replaced the run's own (a checkpoint's that named its
    file). It names the file now, the file ends with its last whole line, and close is quiet."""
    from prefast.training.metrics import MetricsSink

    path = tmp_path / "m.jsonl"
    sink = MetricsSink(str(path), {"seed": 0})
    sink.write({"epoch": 0})
    sink._f = _FullDisk(sink._f)
    with pytest.raises(OSError, match=r"No space left on device: '.*m\.jsonl'") as raised:
        sink.write({"epoch": 1, "train_loss": 2.5})
    assert raised.value.errno == 28
    sink.close()  # nothing left over to write
    assert path.read_text() == '{"epoch": 0}\n'

    # a run whose checkpoint save fails, then its failed line: the save's error stands
    import prefast.training.trainer as trainer_mod

    def full_disk(path, state):
        sink = trainer_mod.MetricsSink.last
        sink._f = _FullDisk(sink._f)
        raise OSError(28, "No space left on device", str(path))

    class Sink(MetricsSink):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            Sink.last = self

    monkeypatch.setattr(trainer_mod, "MetricsSink", Sink)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", full_disk)
    metrics, ck = tmp_path / "run.jsonl", tmp_path / "ck"
    with pytest.raises(OSError, match=r"No space left on device: '.*last\.pt'"):
        train(tiny(epochs=1, metrics=str(metrics), checkpoint_dir=str(ck)))
    lines = metrics.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0


def test_a_resume_on_a_full_disk_leaves_the_metrics_file_as_it_was(tmp_path, monkeypatch):
    """A resumed run emptied the metrics file before writing its checkpoint's records into
    it: on a disk still full the file was left empty (or half a line). The records are
    written over the lines the file holds, then the lines after them are cut."""
    import prefast.training.metrics as metrics_mod

    path = tmp_path / "m.jsonl"
    before = '{"epoch": 0}\n{"epoch": 1}\n{"failed": true}\n'
    path.write_text(before)
    real = metrics_mod.os.fdopen
    monkeypatch.setattr(metrics_mod.os, "fdopen", lambda *a, **k: _FullDisk(real(*a, **k)))
    with pytest.raises(OSError, match=r"No space left on device: '.*m\.jsonl'"):
        metrics_mod.MetricsSink(str(path), {}, [{"epoch": 0}, {"epoch": 1}])
    assert path.read_text() == before
    monkeypatch.setattr(metrics_mod.os, "fdopen", real)  # space freed: the resume goes on
    with metrics_mod.MetricsSink(str(path), {}, [{"epoch": 0}, {"epoch": 1}]) as sink:
        sink.write({"epoch": 2})
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n'
    with metrics_mod.MetricsSink(str(path), {}):  # a new run starts the file afresh
        pass
    assert path.read_text() == ""


def test_a_resume_on_a_full_disk_leaves_the_config_file_as_it_was(tmp_path, monkeypatch):
    """The config beside the metrics file was rewritten in place: opening it emptied it, so a
    resume on a disk still full left it empty. It is written to a fresh name and renamed."""
    import errno
    import pathlib

    import prefast.training.metrics as metrics_mod

    path = tmp_path / "m.jsonl"
    config = metrics_mod.config_path(path)
    config.write_text('{"epochs": 2}\n')
    real = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        open(self, "w").close()  # the file is opened (and so emptied), then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: '.*m\.config\.json'"):
        metrics_mod.MetricsSink(str(path), {"epochs": 3})
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert config.read_text() == '{"epochs": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.config.json"]  # no temporary left
    with metrics_mod.MetricsSink(str(path), {"epochs": 3}):  # space freed
        pass
    assert json.loads(config.read_text()) == {"epochs": 3}


class _Note:  # an object a model keeps as its extra state: not a tensor or plain container
    def __init__(self, text: str) -> None:
        self.text = text


class _NotedReLU(nn.ReLU):
    def get_extra_state(self):
        return _Note("kept")

    def set_extra_state(self, state) -> None:
        pass


def test_a_checkpoint_that_resume_would_refuse_is_named_when_first_saved(tmp_path, caplog):
    """A model of one's own whose get_extra_state returns an object saved without a word, and
    only --resume, after a crash, said it could not load it."""

    def noted(*, num_classes, in_channels=3, image_size=32):
        unit = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), _NotedReLU())
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        return from_sequential([unit], head, config={"name": "noted"})

    ck = tmp_path / "ck"
    cfg = tiny(model="noted", model_args={}, mode="freezeout", epochs=2, checkpoint_dir=str(ck))
    register_model("noted")(noted)
    try:
        with caplog.at_level(logging.WARNING, logger="prefast"):
            train(cfg)
        said = [r.getMessage() for r in caplog.records if "cannot be resumed" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(f"{ck / 'last.pt'} cannot be resumed from")
        assert "_Note" in said[0], said
        with pytest.raises(CheckpointError, match="refusing"):
            train(cfg.replace(epochs=3, resume=True))
    finally:
        unregister_model("noted")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefast"):  # a plain model: no such line
        train(tiny(mode="freezeout", epochs=1, checkpoint_dir=str(tmp_path / "plain")))
    assert not [r for r in caplog.records if "cannot be resumed" in r.getMessage()]


def test_a_cache_pass_rates_its_store_writes_without_its_forward(tmp_path, monkeypatch):
    """A pass's write rate, which the planner takes for the store's, was its bytes over the
    whole pass: forwards and reads counted as writing. A fake clock: each forward takes 10 s,
    each reading of the clock 1 ms."""
    import math
    import types

    import prefast.cache.build as build
    from prefast.cache.build import PassSpec, build_cache
    from prefast.data import Augment, load_data
    from prefast.distributed import DistContext
    from prefast.training import build_model

    clock = {"t": 0.0}

    def perf_counter() -> float:
        clock["t"] += 1e-3
        return clock["t"]

    monkeypatch.setattr(build, "time", types.SimpleNamespace(perf_counter=perf_counter))
    cfg = TrainConfig(dataset="synthetic", num_samples=37, model_args={"depth": 16, "growth": 8})
    data = load_data(cfg)
    model = build_model(cfg, data.train.spec)
    model.units[0].eval().requires_grad_(False)
    model.units[0].register_forward_hook(lambda *a: clock.__setitem__("t", clock["t"] + 10.0))
    spec = PassSpec(data.train, Augment.from_spec(data.train.spec), views=1, seed=0,
                    dtype="float32", codec=None, batch_size=16, amp="none", channels_last=False)  # fmt: skip
    cache = build_cache(
        model, 1, None, spec, "zarr", tmp_path / "s", torch.device("cpu"), "fp", {}, False,
        DistContext(),
    )  # fmt: skip
    nbytes = 37 * math.prod(model.boundary_shape(1, (3, 32, 32))) * 4  # float32
    assert cache.build_seconds > 30  # three batches' forwards
    assert cache.write_rate == pytest.approx(nbytes / 4e-3)  # three writes and the close

    class RankZeroOfTwo(DistContext):  # a RAM cache's pass on rank 0 of two
        def broadcast_tensor(self, t, src, what="broadcast"):
            pass

    # chunks of 10: rank 0 computes chunks 0 and 2 (20 of the 37 samples), a write each
    monkeypatch.setattr(build.store.layout, "default_chunk_samples", lambda *a: 10)
    cache = build_cache(
        model, 1, None, spec, "ram", None, torch.device("cpu"), "fp", {}, False,
        RankZeroOfTwo(rank=0, world_size=2),
    )  # fmt: skip
    # this rank's 20 samples, not the cache's 37 (the planner prices a rank's share)
    assert cache.write_rate == pytest.approx(nbytes * 20 / 37 / 3e-3)  # two writes, the close


def test_a_refused_start_leaves_no_empty_folders_it_made(tmp_path):
    """A start refused after the output folders were checked (here: no CIFAR-10 files under
    --data-root) left the empty --checkpoint-dir, --cache-dir and --metrics folders it had
    created. They are now removed, deepest first; folders that were there before stay, with
    what they hold."""
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    cfg = TrainConfig(
        dataset="cifar10", data_root=str(tmp_path / "no-data"), mode="prefast", epochs=1,
        checkpoint_dir=str(keep / "run" / "ck"), cache_dir=str(tmp_path / "a" / "b" / "cache"),
        metrics=str(tmp_path / "m" / "metrics.jsonl"), progress=False,
    )  # fmt: skip
    with pytest.raises(DataError):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def amp_freezeout() -> TrainResult:
    return train(tiny(mode="freezeout", augment=False, epochs=4, amp="bf16"))


@pytest.mark.parametrize("recache_mode", ["write-through", "pass"])
def test_prefast_under_amp_equals_freezeout_from_a_float16_cache(
    tmp_path, recache_mode, amp_freezeout
):
    """Under --amp bf16 a frozen unit returns bfloat16, but cached batches were handed to the
    units after the boundary as float32: DenseNet's concatenations then ran in float32 where
    freezeout's ran in bfloat16, and the losses differed by up to ~1e-3. They are handed over
    in the dtype the steps compute there, and a float16 cache (which holds bfloat16 values
    exactly) gives freezeout's losses and weights."""
    from prefast.cache.build import activation_dtypes
    from prefast.models import create_model

    model = create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=16, growth=8
    )
    assert activation_dtypes(model, (3, 32, 32), torch.device("cpu"), "none") == (
        torch.float32,
    ) * (model.num_units + 1)
    dtypes = activation_dtypes(model, (3, 32, 32), torch.device("cpu"), "bf16")
    assert dtypes == (torch.float32,) + (torch.bfloat16,) * model.num_units
    assert all(m.training for m in model.modules())  # the probe restored the flags
    ref = amp_freezeout
    got = train(
        tiny(
            mode="prefast", epochs=4, amp="bf16", recache_mode=recache_mode, augment=False,
            cache="zarr", cache_dir=str(tmp_path / "cache"), cache_dtype="float16",
            recache_policy="every",
        )
    )  # fmt: skip
    assert got.summary["cache_boundary"] >= 2
    assert got.losses == ref.losses
    for k, v in _weights(ref.model).items():
        assert torch.equal(_weights(got.model)[k], v), k


def test_a_checkpoint_link_to_nothing_is_refused_not_taken_for_no_checkpoint(tmp_path):
    """last.pt linked to a checkpoint on a disk that is not mounted counted as no checkpoint:
    --resume started the run over (with a warning) and its first save replaced the link, and
    a run without --resume replaced it too. Both are now refused, naming the link's target."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.pt").symlink_to(tmp_path / "unmounted" / "last.pt")
    with pytest.raises(CheckpointError, match=r"is a link to .*unmounted/last\.pt, which is not"):
        train(tiny(mode="freezeout", epochs=1, checkpoint_dir=str(ck), resume=True))
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoint"):
        train(tiny(mode="freezeout", epochs=1, checkpoint_dir=str(ck)))
    assert (ck / "last.pt").is_symlink() and sorted(p.name for p in ck.iterdir()) == ["last.pt"]
