"""CUDA paths: pinned, side-stream prefetching, the device tier, bf16 autocast and channels_last.
Run on a GPU machine with ``pytest -m gpu``; skipped elsewhere."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import store
from prefast import TrainConfig, train
from tests.store_helpers import SHAPE, VIEWS, N, decode, encoded, labels_for, write_store

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tier", ["zarr-raw", "zarr-lz4", "ram-pinned", "device"])
def test_loader_to_cuda_matches_cpu(tmp_path, tier):
    x, y = encoded(), labels_for()
    raw = write_store(tmp_path / "raw", x, y)
    sources = {
        "zarr-raw": raw,
        "zarr-lz4": write_store(tmp_path / "lz4", x, y, codec="lz4"),
        "ram-pinned": store.RamCache.from_store(raw, pin=True),
        "device": store.DeviceCache.from_store(raw, "cuda"),
    }
    src = sources[tier]
    if tier == "ram-pinned":
        assert src.data.is_pinned()
    loader = store.StoreLoader(
        src, batch_size=16, seed=4, device="cuda", prefetch=3, buffer_chunks=2
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for xb, yb in loader:
            assert xb.is_cuda and yb.is_cuda
            codes = xb[:, 0, 0, 0].cpu().numpy().astype(np.int64)
            v, i = codes // 10000, codes % 10000
            assert torch.equal(xb.cpu(), x[v, i])
            assert torch.equal(yb.cpu(), y[i])
            seen.append(i)
        assert sorted(np.concatenate(seen).tolist()) == list(range(N))
    assert VIEWS == 3


@pytest.mark.parametrize("per_copy", [None, 1, 3])
def test_cuda_prefetch_matches_cpu_order(tmp_path, per_copy):
    """Batches copied to the GPU one at a time or in groups (the default for these small
    batches: 8 a copy; 3: a short last group) equal the CPU's, each batch consumed on its
    own stream in turn (as graph warm-ups run on a side stream)."""
    x, y = encoded(), labels_for()
    s = write_store(tmp_path / "raw", x, y, dtype="bfloat16")
    cpu = [(b.clone(), c.clone()) for b, c in store.StoreLoader(s, batch_size=20, seed=1)]
    loader = store.StoreLoader(s, batch_size=20, seed=1, device="cuda", batches_per_copy=per_copy)
    assert loader.batches_per_copy == (per_copy or 8)
    streams = [torch.cuda.current_stream(), torch.cuda.Stream()]
    gpu = []
    it = iter(loader)
    for k in range(len(cpu)):
        with torch.cuda.stream(streams[k % 2]):
            xb, yb = next(it)
            gpu.append(((xb * 1).cpu(), (yb + 0).cpu()))  # read on that stream
    assert next(it, None) is None
    assert len(gpu) == len(cpu) == 6
    for (a, c), (b, d) in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("cache", ["device", "ram", "zarr"])
def test_training_on_cuda_with_bf16_and_channels_last(tmp_path, cache):
    r = train(
        TrainConfig(
            dataset="synthetic",
            num_samples=256,
            model="densenet_bc",
            model_args={"depth": 16, "growth": 8},
            epochs=3,
            batch_size=32,
            t0=0.3,
            how_scale="linear",
            mode="prefast",
            cache=cache,
            cache_dir=str(tmp_path / "c"),
            recache_policy="every",
            views=2,
            device="cuda",
            amp="bf16",
            channels_last=True,
            progress=False,
        )
    )
    assert r.summary["cache_tier"] == cache and r.summary["peak_gpu_bytes"] > 0
    assert np.isfinite(r.losses).all()


def test_parity_on_cuda(tmp_path):
    kw = dict(
        dataset="synthetic", num_samples=96, model="densenet_bc", model_args={"depth": 16, "growth": 8}, epochs=3,
        batch_size=16, t0=0.3, how_scale="linear", augment=False, device="cuda", progress=False,
    )  # fmt: skip
    torch.backends.cudnn.deterministic = True
    ref = train(TrainConfig(**kw, mode="freezeout"))
    got = train(
        TrainConfig(
            **kw,
            mode="prefast",
            cache="zarr",
            cache_dir=str(tmp_path / "c"),
            cache_dtype="float32",
            views=1,
            recache_policy="every",
        )
    )
    torch.testing.assert_close(
        torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5
    )


# ---- launch-free steps and write-through on CUDA ---------------------------------------------------
def _gpu_kw(**over):
    kw = dict(
        dataset="synthetic", num_samples=160, model="densenet_bc", model_args={"depth": 16, "growth": 8},
        epochs=3, batch_size=32, t0=0.3, how_scale="linear", augment=False, device="cuda", progress=False,
        eval_batch_size=512,
    )  # fmt: skip
    kw.update(over)
    return kw


@pytest.mark.parametrize("mode", ["freezeout", "prefast", "prefast-pass"])
def test_cuda_graph_steps_match_eager_steps_in_float32(tmp_path, mode):
    """--compile graphs replays the captured step (and, with cache passes, each pass's frozen
    forward): float32 losses and weights equal the eager run's to the tolerance of
    non-deterministic kernels."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    extra: dict = {"cache": "device", "recache_policy": "every"} if mode != "freezeout" else {}
    if mode == "prefast-pass":
        extra["recache_mode"] = "pass"
        mode = "prefast"
    eager = train(TrainConfig(**_gpu_kw(mode=mode, **extra)))
    graphs = train(TrainConfig(**_gpu_kw(mode=mode, compile="graphs", **extra)))
    assert graphs.records[-1]["step_captures"] > 0
    torch.testing.assert_close(
        torch.tensor(graphs.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5
    )
    for (k, a), b in zip(
        graphs.model.state_dict().items(), eager.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("compile_mode", ["none", "graphs"])
def test_training_steps_never_synchronise_the_host(compile_mode):
    """Within an epoch no step waits for the GPU: torch's sync debug mode raises on any
    implicit synchronisation (.item(), float(), nonzero, blocking copies) in the steps."""
    from prefast.training import Trainer
    from prefast.training.step import EpochMeter

    tr = Trainer(
        TrainConfig(**_gpu_kw(mode="freezeout", compile=compile_mode, epochs=1, num_samples=256))
    )
    tr.steps.configure(0, 0, tr.optimizer, None)
    meter = EpochMeter(8, tr.device)
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    for k in range(3):  # warm-up and capture may synchronise
        tr.steps.step(x, y, k, k, meter)
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():  # "a prototype feature" warning
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")
        for k in range(3, 8):
            tr.steps.step(x, y, k, k, meter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    meter.check_finite()


def test_a_replayed_step_launches_only_its_copies():
    """With graphs, a step outside its graph copies the batch into the graph's inputs and the
    graph's stats into the meter; the iteration counter and the meter's sums happen in the
    graph or at the epoch's end. The losses equal eager steps' from the same start."""
    from benchmarks.step_ops import DispatchedOps
    from prefast.training import Trainer
    from prefast.training.step import EpochMeter

    torch.backends.cudnn.deterministic = True
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    losses = {}
    for mode in ("none", "graphs"):
        tr = Trainer(
            TrainConfig(**_gpu_kw(mode="freezeout", compile=mode, epochs=1, num_samples=256))
        )
        tr.steps.configure(0, 0, tr.optimizer, None)
        meter = EpochMeter(8, tr.device)
        for k in range(8):
            if k < 3:  # graphs: 2 eager warm-up steps, then the capture
                tr.steps.step(x, y, k, k, meter)
                continue
            with DispatchedOps() as ops:
                tr.steps.step(x, y, k, k, meter)
            if mode == "graphs":  # a replay
                assert ops.names == ["copy_", "copy_", "copy_"], ops.names
            else:
                assert "fill_" not in ops.names  # consecutive iterations
        losses[mode] = meter.read().losses
        assert int(tr.steps.j) == 8
        assert len(set(losses[mode])) == 8  # the weights moved every step
    torch.testing.assert_close(
        torch.tensor(losses["graphs"]), torch.tensor(losses["none"]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("cache", ["device", "ram", "zarr"])
@pytest.mark.parametrize("compile_mode", ["none", "graphs"])
def test_write_through_on_cuda_matches_freezeout(tmp_path, caplog, cache, compile_mode):
    """The steps write each new cache (device index_copy, or side-stream copies to pinned
    buffers drained by a writer thread, which the epoch-end catch-up pass uses too): float32
    prefast equals freezeout."""
    import logging

    torch.backends.cudnn.deterministic = True
    # t0 0.5: a boundary freezes mid-epoch, so the epoch's earlier samples need the catch-up
    ref = train(TrainConfig(**_gpu_kw(mode="freezeout", compile=compile_mode, t0=0.5)))
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(
        TrainConfig(
            **_gpu_kw(mode="prefast", compile=compile_mode, t0=0.5),
            cache=cache,
            cache_dir=str(tmp_path / "c"),
            cache_dtype="float32",
            recache_policy="every",
        )
    )
    assert got.summary["cache_boundary"] > 0 and got.summary["total_cache_build_seconds"] >= 0
    assert "computed in a catch-up pass" in caplog.text  # the writes started mid-epoch
    assert "could not capture" not in caplog.text  # with graphs, the catch-up replays one
    # host tiers: the rows leave through the writer thread, which accounts for its time
    assert ("the writer thread waited" in caplog.text) == (cache != "device")
    torch.testing.assert_close(
        torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5
    )


def test_feature_aug_inside_captured_steps_is_reproducible(tmp_path):
    kw = _gpu_kw(mode="prefast", augment=True, cache="device", recache_policy="every",
                 feature_aug="shift+flip", compile="graphs")  # fmt: skip
    torch.backends.cudnn.deterministic = True
    a = train(TrainConfig(**kw))
    b = train(TrainConfig(**kw))
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)


def test_graph_recaptures_reuse_the_pool_while_old_outputs_live():
    """Each reconfiguration drops the step graph and captures a new one into the shared pool,
    while tensors from the old graph (its loss, the gradients) are still referenced."""
    from prefast.freezeout import FreezeSchedule, ScheduleConfig, UnitSGD, freeze_prefix
    from prefast.models import create_model
    from prefast.training.step import EpochMeter, StepRunner

    torch.manual_seed(0)
    model = create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=16, growth=8
    ).cuda()
    n = model.num_units
    sched = FreezeSchedule(ScheduleConfig(mode="freezeout"), n, 10**6)
    runner = StepRunner(model, torch.device("cuda"), "none", False, "graphs", 16)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    meter = EpochMeter(100, torch.device("cuda"))
    held = []
    k = 0
    for f in (0, 0, 1, 2):
        freeze_prefix(model, f)
        opt = UnitSGD(model, sched, range(f, n), momentum=0.9, nesterov=True, weight_decay=1e-4)
        runner.configure(0, f, opt, None)
        for _ in range(4):
            runner.step(x, y, k, k, meter)
            k += 1
        held.append(runner._graph.loss if runner._graph is not None else None)
    torch.cuda.synchronize()
    assert runner.captures == 4 and all(h is not None for h in held)
    meter.check_finite()


@pytest.mark.parametrize("compile_mode", ["none", "graphs"])
def test_stores_prepared_ahead_on_cuda_match_freezeout(tmp_path, monkeypatch, caplog, compile_mode):
    """On CUDA each store a later epoch writes is created and faulted in on a thread ahead of
    it (the plan fixed to write every epoch): float32 prefast still equals freezeout."""
    import logging

    import prefast.cache.manager as M
    from tests.test_ahead import _every_epoch

    monkeypatch.setattr(M, "plan_epochs", _every_epoch)
    torch.backends.cudnn.deterministic = True
    kw = _gpu_kw(epochs=5, compile=compile_mode)
    ref = train(TrainConfig(**{**kw, "mode": "freezeout"}))
    caplog.set_level(logging.INFO, logger="prefast")
    got = train(
        TrainConfig(
            **{**kw, "mode": "prefast"},
            cache="zarr",
            cache_dir=str(tmp_path / "c"),
            cache_dtype="float32",
            recache_policy="auto",
        )
    )
    assert caplog.text.count("faulted in ahead") >= 1
    timed = "measured costs per sample (replayed CUDA graphs)" in caplog.text
    assert timed == (compile_mode == "graphs")
    assert got.summary["cache_boundary"] > 0
    torch.testing.assert_close(
        torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5
    )


def test_unit_forwards_timed_as_replayed_graphs_release_their_memory():
    """The planner's graph-timed forwards: one positive time per unit, units' flags restored,
    and the probe's graphs and their pools gone when it returns."""
    from prefast.cache.probes import measure_unit_forward
    from prefast.models import create_model
    from prefast.runtime import autocast

    torch.manual_seed(0)
    model = create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=16, growth=8
    ).cuda()
    model = model.to(memory_format=torch.channels_last)
    model.train()
    dev = torch.device("cuda")
    x = torch.randn(64, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    with autocast(dev, "bf16"):
        measure_unit_forward(model, x, model.num_units, dev, graphs_amp="bf16")  # warm
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with autocast(dev, "bf16"):
        times = measure_unit_forward(model, x, model.num_units, dev, graphs_amp="bf16")
    torch.cuda.synchronize()
    assert len(times) == model.num_units
    assert all(0 < t < 1 for t in times)
    assert all(u.training for u in model.units)
    assert torch.cuda.memory_allocated() == before


def test_a_graphed_forward_replays_what_the_eager_forward_computes():
    """The catch-up pass's frozen forward as one replayed graph: full and short batches equal
    the eager forward's, a larger batch runs eagerly, and its memory goes with it."""
    from prefast.models import create_model
    from prefast.runtime import GraphedForward, autocast

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=16, growth=8
    ).cuda()
    model.eval()

    def frozen(h):
        return model.forward_range(h, 0, 4).contiguous()

    x = torch.randn(48, 3, 32, 32, device=dev)
    with torch.no_grad():
        with autocast(dev, "bf16"):
            want = frozen(x)
        warm = GraphedForward(frozen, "bf16")  # the libraries' own first-use allocations
        warm(x[:32])
        del warm
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        g = GraphedForward(frozen, "bf16")
        got = [g(x[:32]).clone(), g(x[32:45]).clone()]  # captured at 32; then 13, padded
        assert g.replays == 2
        torch.testing.assert_close(torch.cat(got), want[:45], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(g(x).clone(), want, rtol=2e-2, atol=2e-2)  # 48: eager
        assert g.replays == 2
        del g, got
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_image_batches_never_synchronise_the_host_and_match_the_cpu():
    """The image path (the batches of FreezeOut and of PreFast before its first cache) queues
    its copies without waiting for the GPU, so the host runs ahead of the steps; the batches
    equal the CPU's."""
    from prefast.training import Trainer
    from prefast.training.batches import image_batches

    tr = Trainer(TrainConfig(**_gpu_kw(mode="freezeout", augment=True, num_samples=256)))
    kw = dict(seed=0, epoch=1, aug_key=(0, 1), start=0, batch_size=32, iterations=8, rank=0,
              world_size=1)  # fmt: skip
    cpu_data = tr.data.train.to(torch.device("cpu"))
    want = list(image_batches(cpu_data, tr.augment, device=torch.device("cpu"), **kw))
    list(image_batches(tr.data.train, tr.augment, device=tr.device, **kw))  # warm the caches
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")
        got = list(image_batches(tr.data.train, tr.augment, device=tr.device, **kw))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == len(want) == 8
    for (x, y, ids), (xc, yc, idc) in zip(got, want, strict=True):
        assert x.is_cuda and y.is_cuda
        assert torch.equal(ids, idc) and torch.equal(y.cpu(), yc)
        torch.testing.assert_close(x.cpu(), xc)


def test_device_tier_reads_and_row_writes_never_synchronise_the_host():
    """Reading the device tier (indices and labels go to the GPU) and writing rows into it (the
    device tier's write-through) queue their copies from pinned memory: under sync debug mode
    nothing waits for the GPU, and the values are right."""
    x, y = encoded(), labels_for()
    src = store.DeviceCache.from_tensors(x, y, device="cuda")
    sink = store.DeviceCache.empty(N, VIEWS, SHAPE, torch.float32, device="cuda")
    loader = store.StoreLoader(src, batch_size=16, seed=3, device="cuda", with_indices=True)
    list(loader)  # warm the allocators
    order = np.random.default_rng(0).permutation(N)
    parts = []  # (view, host rows, their samples already on the GPU)
    for v in range(VIEWS):
        for k in range(0, N, 20):
            rows = torch.from_numpy(order[k : k + 20])
            parts.append((v, rows, x[v, rows].cuda()))
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")
        got = [(xb, yb, ids) for xb, yb, ids in loader]
        for v, rows, xb in parts:
            sink.write_rows(v, rows, xb, y[rows])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    seen = []
    for xb, yb, ids in got:
        v, i = decode(xb.cpu())
        assert np.array_equal(i, ids.numpy()) and torch.equal(yb.cpu(), y[ids])
        seen.append(i)
    assert sorted(np.concatenate(seen).tolist()) == list(range(N))
    assert torch.equal(sink.data.cpu(), x) and torch.equal(sink.labels, y)


def test_warm_up_steps_hand_their_outputs_to_the_step_stream(monkeypatch):
    """A warm-up step runs on a side stream; what it returns is read on the step's stream, so
    each output is recorded there (freed, its block waits for those reads even when a
    loader's copy stream is the same pooled stream as the side one)."""
    from prefast.training import Trainer
    from prefast.training.step import EpochMeter

    tr = Trainer(
        TrainConfig(**_gpu_kw(mode="freezeout", compile="graphs", epochs=1, num_samples=256))
    )
    tr.steps.configure(0, 0, tr.optimizer, None)
    meter = EpochMeter(4, tr.device)
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    recorded: list[torch.cuda.Stream] = []
    real = torch.Tensor.record_stream

    def spy(t, stream):
        recorded.append(stream)
        return real(t, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", spy)
    tr.steps.step(x, y, 0, 0, meter)  # the first warm-up step
    assert len(recorded) >= 2  # the loss and the stats
    assert all(s == torch.cuda.current_stream() for s in recorded)


def test_a_cuda_tensor_written_into_a_ram_cache_is_there_when_the_call_returns():
    """write_rows of device rows into host memory: the copy to the host has finished before the
    host scatters it (the GPU is kept busy first, so a copy still queued would show)."""
    cache = store.RamCache.empty(300, 1, (64, 16, 16), "float16")
    x = torch.randn(257, 64, 16, 16, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the copy
    rows = torch.arange(257) + 17
    cache.write_rows(0, rows, x)
    assert torch.equal(cache.data[0, 17:274], x.cpu().half())


def test_the_benchmark_profile_times_units_as_replayed_graphs():
    """compare.py's profile for runs that replay graphs: a positive forward, backward and frozen
    forward per unit and for the head, below the eager calls' (which pay each kernel's
    launch), and the model's grads released."""
    from benchmarks.compare import profile_units, profile_units_graphed
    from prefast.models import create_model

    torch.manual_seed(0)
    model = create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=16, growth=8
    ).cuda()
    dev = torch.device("cuda")
    x = torch.randn(64, 3, 32, 32, device=dev)
    fwd, bwd, frozen = profile_units_graphed(model, x, dev, "bf16")
    n = model.num_units + 1
    assert len(fwd) == len(bwd) == len(frozen) == n
    assert all(0 < t < 1 for t in fwd + frozen) and all(0 <= t < 1 for t in bwd)
    assert all(p.grad is None for p in model.parameters())
    eager = profile_units(model, x, dev, "bf16")
    assert sum(fwd) + sum(bwd) < sum(eager[0]) + sum(eager[1])


def test_write_through_waits_until_its_queued_rows_are_in_a_host_cache():
    """wait_written on CUDA with a host tier: every row handed over is in the sink when it
    returns, though the copies were queued behind ~0.1 s of GPU work (step_probe times it).
    Four batches: no take() waits for a free staging slot."""
    from prefast.cache.write_through import WriteThrough

    n, shape = 250, (8, 4, 4)
    sink = store.RamCache.empty(n, 1, shape, "float16")
    wt = WriteThrough(
        target=1, sink=sink, tier="ram", path=None, fingerprint="t", meta={}, chain=(1,),
        labels=torch.zeros(n, dtype=torch.int64), dtype="float16", device=torch.device("cuda"),
        batch_size=64, sample_shape=shape,
    )  # fmt: skip
    try:
        x = torch.randn(n, *shape, device="cuda")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
        torch.cuda._sleep(200_000_000)
        for s in range(0, n, 64):
            ids = order[s : s + 64]
            wt.take(x[ids.cuda()], ids)
        assert wt.wait_written() > 0
        assert torch.equal(sink.data[0], x.cpu().half())
    finally:
        wt.abort()


def test_a_row_given_twice_on_the_host_keeps_its_last_sample_in_a_cuda_tier():
    # index_copy_ with repeated indices keeps an undefined source on a GPU
    cache = store.DeviceCache.empty(4, 1, (64,), dtype="float32", device="cuda")
    rows = np.array([1] * 500 + [0, 2, 3])
    x = torch.arange(503, dtype=torch.float32, device="cuda")[:, None].expand(503, 64)
    cache.write_rows(0, rows, x)
    assert cache.data[0, :, 0].tolist() == [500.0, 499.0, 501.0, 502.0]
    assert bool((cache.data[0, 1] == 499.0).all())


def test_a_checkpoints_generator_states_restore_the_cuda_draws():
    """A checkpoint saved the CPU, numpy and Python generators only: a model's own dropout on
    a GPU drew other masks after --resume than the run it continues."""
    from prefast.training.checkpoint import rng_state, set_rng_state

    torch.cuda.manual_seed_all(3)
    torch.rand(5, device="cuda")
    saved = rng_state(torch.device("cuda"))
    expected = torch.rand(7, device="cuda")
    torch.cuda.manual_seed_all(4)  # a resumed process seeds afresh
    set_rng_state(saved, torch.device("cuda"))
    assert torch.equal(torch.rand(7, device="cuda"), expected)
