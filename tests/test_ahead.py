"""Stores created ahead of the epoch that writes them (``prefast.cache.ahead``)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import store
from prefast import train
from prefast.cache.ahead import AheadStore
from prefast.cache.manager import CacheManager
from prefast.cache.plan import EpochPlan
from prefast.models import from_sequential
from tests.test_trainer import _weights, tiny

SHAPE = (4, 8, 8)  # float32: 1 KiB a sample, chunks of whole pages


def _maker(path, fail: bool = False):
    def create() -> store.StoreWriter:
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return store.create(
            path, sample_shape=SHAPE, num_samples=50, dtype="float32", chunk_samples=16
        )

    return create


def test_a_store_prepared_ahead_is_written_with_the_provenance_given_when_taken(tmp_path):
    path = tmp_path / "boundary-003"
    fake = SimpleNamespace(_ahead=AheadStore(3, path, _maker(path)))
    w = CacheManager._take_ahead(fake, 3, "zarr", {"boundary": 3, "fingerprint": "f"})
    assert fake._ahead is None
    assert w is not None and w._row_map is not None and w._row_map.mapped.all()
    x = torch.randn((50, *SHAPE))
    y = torch.arange(50) % 10
    with w:
        order = np.random.default_rng(0).permutation(50)
        for i in range(0, 50, 17):
            idx = order[i : i + 17]
            w.write_rows(0, idx, x[idx], y[idx])
    s = store.open(path)
    assert s.complete and s.info.meta == {"boundary": 3, "fingerprint": "f"}
    assert torch.equal(s.read(0, np.arange(50)), x) and torch.equal(s.labels, y)
    assert [p.name for p in tmp_path.iterdir()] == ["boundary-003"]


def test_a_store_prepared_ahead_for_another_boundary_or_tier_is_deleted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prefast")
    for target, tier in [(4, "zarr"), (3, "ram")]:
        path = tmp_path / "boundary-003"
        fake = SimpleNamespace(_ahead=AheadStore(3, path, _maker(path)))
        assert CacheManager._take_ahead(fake, target, tier, {"boundary": target}) is None
        assert fake._ahead is None
        assert list(tmp_path.iterdir()) == []  # deleted, no trash left
    assert "prepared ahead for boundary 3 is not used: boundary 3 is written (ram tier)" in (
        caplog.text
    )
    assert CacheManager._take_ahead(SimpleNamespace(_ahead=None), 3, "zarr", {}) is None


def test_a_store_that_could_not_be_prepared_ahead_is_made_when_written(tmp_path, caplog):
    path = tmp_path / "boundary-002"
    ahead = AheadStore(2, path, _maker(path, fail=True))
    assert ahead.take({"boundary": 2}) is None
    assert "preparing the store at" in caplog.text and "No space left" in caplog.text
    assert list(tmp_path.iterdir()) == []


def _every_epoch(segments, batch_size, cost, sample_bytes, tier_of, boundary=0, **_):
    """A stand-in planner: every epoch writes the frontier of its first stretch past the
    boundary held, from that stretch on."""
    targets, starts, b = [], [], boundary
    for segs in segments:
        done, t, start = 0, b, 0
        for steps, f in segs:
            if f > b:
                t, start = f, done
                break
            done += steps
        targets.append(t)
        starts.append(start)
        b = t
    return EpochPlan(targets, starts, 1.0, 2.0)


def test_a_run_where_host_and_device_overlap_prepares_each_store_an_epoch_ahead(
    tmp_path, monkeypatch, caplog
):
    """The store each epoch writes is created and faulted in on a thread from the epoch
    before, and given its provenance when its writing starts (overlap forced on the CPU, the
    plan fixed): the run equals one that creates each store as it writes it, and the run
    folder holds only the last store."""
    import prefast.cache.manager as M

    monkeypatch.setattr(M, "plan_epochs", _every_epoch)
    kw = dict(mode="prefast", epochs=5, augment=False, cache="zarr", cache_dtype="float32",
              codec="none", recache_policy="auto")  # fmt: skip
    ref = train(tiny(**kw, cache_dir=str(tmp_path / "a")))
    measure = M.CacheManager._measure_costs

    def overlapping(self, j, frontier):
        c = measure(self, j, frontier)
        c.overlap = True  # as on CUDA: host work runs beside the device's
        return c

    monkeypatch.setattr(M.CacheManager, "_measure_costs", overlapping)
    caplog.set_level(logging.INFO, logger="prefast")
    caplog.clear()  # the reference run's lines, where an earlier test left INFO on
    got = train(tiny(**kw, cache_dir=str(tmp_path / "b")))
    msgs = [r.getMessage() for r in caplog.records]
    ahead = [m for m in msgs if "faulted in ahead" in m]
    written = [m for m in msgs if "through the training steps" in m]
    assert len(written) == 3 and len(ahead) == 2  # epochs 1, 2, 3; the first at its plan
    assert ahead[0].startswith("boundary ") and not any("not used" in m for m in msgs)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses))
    torch.testing.assert_close(_weights(got.model), _weights(ref.model))
    assert got.summary["cache_boundary"] == ref.summary["cache_boundary"] > 1
    a, b = store.open(ref.summary["cache_path"]), store.open(got.summary["cache_path"])
    assert a.complete and b.complete
    assert {k: b.meta[k] for k in ("boundary", "fingerprint")} == {
        k: a.meta[k] for k in ("boundary", "fingerprint")
    }
    idx = np.arange(a.num_samples)
    assert torch.equal(a.read(0, idx), b.read(0, idx))
    (run_dir,) = (tmp_path / "b").iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert names - {".prefast-run", ".prefast-lock"} == {Path(got.summary["cache_path"]).name}


def test_a_probe_leaves_the_time_paid_ahead_out_of_a_rate(monkeypatch):
    """A fake clock: each round takes 0.375 s, 0.25 s of it paid ahead in a run; 1 MB a round
    (binary fractions: the sums are exact)."""
    from prefast.cache import probes

    now = [0.0]
    ahead = [0.0]
    monkeypatch.setattr(probes.time, "perf_counter", lambda: now[0])

    def round_(k: int) -> int:
        now[0] += 0.375
        ahead[0] += 0.25
        return 1_000_000

    cpu = torch.device("cpu")
    # on the clock 0.125 s a round: eight rounds reach the steady second, 2 s were off it
    assert probes._steady(round_, cpu, lambda: ahead[0]) == (8_000_000, 1.0, 2.0)
    # everything on the clock: three rounds, 3 MB in 1.125 s
    assert probes._steady_rate(round_, cpu) == pytest.approx(3e6 / 1.125)
    # a shorter limit (a short run): one round reaches 0.25 s, two 0.5 s
    assert probes._steady_rate(round_, cpu, seconds=0.25) == pytest.approx(1e6 / 0.375)
    assert probes._steady_rate(round_, cpu, seconds=0.5) == pytest.approx(2e6 / 0.75)
    # the limit never drops the counted round: at least one after the warm-up
    assert probes._steady(round_, cpu, seconds=0.0) == (1_000_000, 0.375, 0.0)


def test_free_device_memory_counts_the_blocks_torch_holds_unused(monkeypatch):
    """On a 16 GiB GPU the driver sees 1 GiB free, while torch holds 6 GiB reserved of which
    2 GiB are in use (a superseded cache freed into its cache): 5 GiB are free for a new
    cache. The CUDA queries are faked on the CPU."""
    from prefast.cache import probes

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    free_device, free_host = probes.free_memory(torch.device("cuda"))
    assert free_device == 5 * gib and free_host > 0
    assert probes.free_memory(torch.device("cpu"))[0] == 0


def test_a_replayed_probe_hands_back_its_output_detached(monkeypatch):
    """compare.py's graphed profile replays a unit's training forward, then its forward and
    backward: the first's output copy must not keep the captured autograd graph (and its
    parameters' gradient-accumulation nodes, made on the capture stream) alive. The capture
    is faked on the CPU: it runs the function once, as a capture records it."""
    from prefast.cache import probes

    class Replay:
        def replay(self) -> None:
            pass

    monkeypatch.setattr(probes, "capture_graph", lambda fn, h, amp: (Replay(), fn(h)))
    layer = torch.nn.Linear(3, 2)
    h = torch.ones(4, 3)
    seconds, out = probes._replayed(layer, h, torch.device("cpu"), "none", 2)
    assert seconds >= 0
    torch.testing.assert_close(out, layer(h).detach())
    assert out.grad_fn is None and not out.requires_grad


def test_a_stop_asked_for_during_the_probes_stops_at_their_next_round(tmp_path, monkeypatch):
    # Ctrl-C or SIGTERM during the planner's probes waited for all of them (seconds each)
    from prefast import interrupt
    from prefast.cache import probes

    rounds = []

    def round_(k: int) -> int:
        rounds.append(k)
        if k == 2:
            interrupt.request_stop()
        return 1  # never steady by bytes: only the 100 s limit would end it

    cpu = torch.device("cpu")
    try:
        with pytest.raises(interrupt.Stopped):
            probes._steady(round_, cpu, seconds=100.0)
        assert rounds == [0, 1, 2]
        with pytest.raises(interrupt.Stopped):  # the store probe: its stores are removed
            probes.measure_store_rates(cpu, tmp_path, SHAPE, "float16", None, 8, seconds=100.0)
        assert list(tmp_path.iterdir()) == []
        model = from_sequential([torch.nn.Linear(3, 3), torch.nn.ReLU()], torch.nn.Identity())
        interrupt.request_stop()
        with pytest.raises(interrupt.Stopped):
            probes.measure_unit_forward(model, torch.zeros(4, 3), 2, cpu)
    finally:
        interrupt.clear()


def test_a_probe_tier_holds_at_most_the_runs_samples(tmp_path, monkeypatch):
    """Up to 64 batches and the byte cap, at most max_samples (the run's cache), at least two
    batches; the store probe creates its stores that size (the warm-up a quarter of it)."""
    from prefast.cache import probes

    assert probes._probe_samples(100, 8, 1 << 20, None) == 512  # 64 batches of 8
    assert probes._probe_samples(100, 8, 10_000, None) == 100  # the byte cap
    assert probes._probe_samples(100, 8, 1 << 20, 77) == 77  # the run's samples
    assert probes._probe_samples(100, 8, 1 << 20, 5) == 16  # at least two batches
    sizes = []
    create = store.create

    def spy(path, **kw):
        sizes.append(kw["num_samples"])
        return create(path, **kw)

    monkeypatch.setattr(probes.store, "create", spy)
    cpu = torch.device("cpu")
    r = probes.measure_store_rates(cpu, tmp_path, SHAPE, "float16", None, 8, max_samples=77)
    assert r.write > 0 and r.read > 0
    assert sizes[0] == 19 and set(sizes[1:]) == {77}  # the warm-up: 77 // 4
    got = probes.measure_tier_rates(SHAPE, "float16", cpu, 8, ("ram",), 0.05, max_samples=77)
    assert set(got) == {"ram"} and min(got["ram"]) > 0


def test_the_store_probe_prepares_each_store_when_asked(tmp_path, monkeypatch):
    calls = []
    prepare = store.StoreWriter.prepare_rows

    def spy(self):
        calls.append(self.path)
        return prepare(self)

    monkeypatch.setattr(store.StoreWriter, "prepare_rows", spy)
    from prefast.cache.probes import measure_store_rates

    cpu = torch.device("cpu")
    r = measure_store_rates(cpu, tmp_path, SHAPE, "float16", None, batch=8)
    assert r.write > 0 and r.read > 0 and r.ahead_write is None and calls == []
    r = measure_store_rates(cpu, tmp_path, SHAPE, "float16", None, 8, prepared=True)
    assert len(calls) >= 2  # the warm-up store and one timed
    # the same rounds: the plain rate counts the preparing, the ahead rate leaves it out
    assert r.ahead_write is not None and r.ahead_write > r.write > 0 and r.read > 0
    assert list(tmp_path.iterdir()) == []  # the probe's stores are gone


def test_the_plan_prices_stores_of_later_epochs_at_the_prepared_rate():
    from prefast.cache.plan import CostModel, plan_epochs

    def cost(**ahead) -> CostModel:
        return CostModel(unit_fwd=[1e-3] * 4, image=1e-4, read_rate={"zarr": 1e9},
                         write_rate={"zarr": 1e3}, overlap=True, ahead_write_rate=ahead)  # fmt: skip

    kw = dict(batch_size=10, sample_bytes=[4000, 1000, 1000, 1000, 1000], tier_of=lambda b: "zarr")
    # frontier 3 throughout: writes at 1 kB/s never pay; prepared at 1 GB/s they do, from
    # the second epoch on (the first epoch's store is made as it is written)
    assert plan_epochs([[(10, 3)]] * 4, cost=cost(), **kw).targets == [0, 0, 0, 0]
    assert plan_epochs([[(10, 3)]] * 4, cost=cost(zarr=1e9), **kw).targets == [0, 3, 3, 3]
    c = cost(zarr=1e9)
    assert c.write("zarr", 1000, ahead=True) == 1e-6 and c.write("zarr", 1000) == 1.0
    assert cost().write("zarr", 1000, ahead=True) == 1.0  # no prepared rate: the plain one


def test_a_half_made_store_prepared_ahead_is_left_with_a_warning(tmp_path, caplog):
    path = tmp_path / "boundary-002"

    def half_made() -> store.StoreWriter:
        path.mkdir()
        (path / "partial").write_bytes(b"x")  # not a store yet: never deleted
        raise OSError(errno.ENOSPC, "No space left on device")

    assert AheadStore(2, path, half_made).take({}) is None
    assert (path / "partial").read_bytes() == b"x"
    assert "could not delete the store prepared ahead" in caplog.text
