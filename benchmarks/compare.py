"""PreFast against FreezeOut and full training, and the cache tiers against each other.

One process, one run: every variant trains the same data, model, schedule and seed in turn,
and one table reports training wall-clock (evaluation excluded), its ratio to freezeout and
to full, the final test error, cache-pass seconds, cache bytes, peak private host memory and
peak GPU memory. The schedule's ideal saving comes from a per-unit forward/backward time
profile measured on this device, and each mode's saving is shown as a fraction of it.

    python benchmarks/compare.py --scenario quick            # < 3 min on 2 CPU cores
    python benchmarks/compare.py --scenario fmnist           # Fashion-MNIST, 60,000 images
    python benchmarks/compare.py --scenario cifar-synthetic  # synthetic CIFAR, 50,000 images
    python benchmarks/compare.py --scenario paper            # 2,000-image subset, RAM/GPU cache

Results: ``benchmarks/results/compare-<scenario>-<device>.json`` and ``.png`` (test error
against wall-clock seconds, one line per variant).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, environment, write_json
from prefast import TrainConfig, train
from prefast.cache.probes import _replayed
from prefast.config import CACHE_FIELDS
from prefast.data import load_data
from prefast.errors import PrefastError
from prefast.freezeout import FreezeSchedule, ScheduleConfig, ideal_saving
from prefast.models import UnitModel
from prefast.monitor import rss_anon_bytes, synchronize
from prefast.training import build_model
from store.tools.viz import require_matplotlib

log = logging.getLogger("compare")
MIB = 2**20


# ---- scenarios -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    name: str
    base: dict[str, Any]
    t0s: tuple[float, ...] = (0.8,)
    tiers: tuple[str, ...] = ("ram", "zarr", "zarr-lz4")
    note: str = ""
    full: bool = True  # include full training (no freezing) as a variant


SCENARIOS = {
    "quick": Scenario(
        "quick",
        dict(
            dataset="synthetic",
            num_samples=2000,
            model="densenet_bc",
            model_args={"depth": 16, "growth": 8},
            epochs=3,
            batch_size=50,
            how_scale="cubic",
            views=1,
        ),
        t0s=(0.6,),
        note="tiny: exercises every variant; timings mean little",
    ),
    "fmnist": Scenario(
        "fmnist",
        dict(
            dataset="fashion-mnist",
            model="densenet_bc",
            model_args={"depth": 16, "growth": 8},
            epochs=8,
            batch_size=50,
            how_scale="cubic",
            views=1,
        ),
        t0s=(0.6,),
        note="real data, all 60,000 training images, DenseNet-BC-16 k=8 sized for 2 CPU cores",
    ),
    "cifar-synthetic": Scenario(
        "cifar-synthetic",
        dict(
            dataset="synthetic",
            num_samples=50_000,
            model="densenet_bc",
            model_args={"depth": 16, "growth": 8},
            epochs=6,
            batch_size=50,
            how_scale="cubic",
            views=1,
        ),
        t0s=(0.6, 0.8),
        note="CIFAR-shaped synthetic data at full 50,000-image scale, DenseNet-BC-16 k=8 sized for 2 CPU cores",
    ),
    "cifar-gpu": Scenario(
        "cifar-gpu",
        dict(
            dataset="synthetic",
            num_samples=50_000,
            model="densenet_bc",
            model_args={"depth": 76, "growth": 12},
            epochs=3,
            batch_size=256,
            how_scale="cubic",
            amp="bf16",
            channels_last=True,
            views=1,
        ),
        t0s=(0.6, 0.8),
        tiers=("device", "ram", "zarr", "zarr-lz4"),
        note="DenseNet-BC-76 k=12, synthetic CIFAR at 50,000 images, bf16 autocast, channels_last, batch 256, one view",
    ),
    "cifar-gpu-long": Scenario(
        "cifar-gpu-long",
        dict(
            dataset="synthetic",
            num_samples=50_000,
            model="densenet_bc",
            model_args={"depth": 76, "growth": 12},
            epochs=16,
            batch_size=256,
            how_scale="cubic",
            amp="bf16",
            channels_last=True,
            views=1,
        ),
        t0s=(0.6,),
        tiers=("device", "ram", "zarr"),
        full=False,
        note="DenseNet-BC-76 k=12, synthetic CIFAR 50,000 images, bf16, channels_last, batch 256, "
        "16 epochs, t0 0.6 cubic: freezeout and prefast on every tier in one run (~8 min on one "
        "H100/H200; --full adds full training)",
    ),
    "paper": Scenario(
        "paper",
        dict(
            dataset="synthetic",
            num_samples=50_000,
            subset=2000,
            model="densenet_bc",
            model_args={"depth": 16, "growth": 8},
            epochs=30,
            batch_size=50,
            how_scale="cubic",
            views=1,
        ),
        t0s=(0.6,),
        tiers=("device", "ram", "zarr"),
        note="the paper's setting: a 2,000-image subset with the GPU/RAM cache (and the store, for comparison)",
    ),
}


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def variants_for(
    tiers: tuple[str, ...],
    device: torch.device,
    extra_views: int | None = None,
    full: bool = True,
    eager_baseline: bool = False,
) -> list[Variant]:
    # full training has no freeze schedule: the scenario's t0, how_scale and scale_lr would
    # only be named in the run's warning of options it does not use
    defaults = TrainConfig()
    unscheduled = {n: getattr(defaults, n) for n in ("t0", "how_scale", "scale_lr")}
    # nor a cache: --views, --recache-policy, --cache-dtype and --feature-aug are the prefast
    # variants' (full and freezeout warned of each as an option they do not use)
    uncached = {n: getattr(defaults, n) for n in CACHE_FIELDS}
    out = [Variant("full", {"mode": "full", **unscheduled, **uncached})] if full else []
    out.append(Variant("freezeout", {"mode": "freezeout", **uncached}))
    for t in tiers:
        if t == "device" and device.type != "cuda":
            continue
        if t == "zarr-lz4":
            out.append(
                Variant("prefast-zarr-lz4", {"mode": "prefast", "cache": "zarr", "codec": "lz4"})
            )
        elif t == "zarr-pass":  # re-caching by separate passes at the freezes
            out.append(
                Variant(
                    "prefast-zarr-pass",
                    {"mode": "prefast", "cache": "zarr", "recache_mode": "pass"},
                )
            )
        elif t == "zarr-zstd":
            out.append(
                Variant("prefast-zarr-zstd", {"mode": "prefast", "cache": "zarr", "codec": "zstd"})
            )
        else:
            out.append(Variant(f"prefast-{t}", {"mode": "prefast", "cache": t}))
    if extra_views is not None:  # 0 too: refused with the other variants' settings
        out.append(
            Variant(
                f"prefast-zarr-v{extra_views}",
                {"mode": "prefast", "cache": "zarr", "views": extra_views},
            )
        )
    if eager_baseline:
        # the same freezeout with eager steps: what --compile saves. Last: the slowest run
        # and a side measurement, the first a time limit should cut (gpu.sh), not a tier
        out.append(Variant("freezeout-eager", {"mode": "freezeout", "compile": "none", **uncached}))
    return out


# ---- the measured profile and the ideal saving -------------------------------------------------
def profile_units(
    model: UnitModel, x: torch.Tensor, device: torch.device, amp: str, repeats: int = 5
) -> tuple[list[float], list[float], list[float]]:
    """Seconds per batch of each unit's (and the head's, last) forward and backward in train
    mode, and of its forward once frozen (eval mode, under no_grad, as FreezeOut runs a frozen
    unit), median over ``repeats``; the backward of unit 0 computes no input gradient."""
    model.train()
    n = model.num_units + 1
    fwd: list[list[float]] = [[] for _ in range(n)]
    bwd: list[list[float]] = [[] for _ in range(n)]
    frozen: list[list[float]] = [[] for _ in range(n)]
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if amp == "bf16"
        else contextlib.nullcontext
    )

    def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
        synchronize(device)
        t = time.perf_counter()
        out = fn(*args)
        synchronize(device)
        return time.perf_counter() - t, out

    for _ in range(repeats + 1):  # the first round warms up
        h = x
        for i in range(n):
            module = model.units[i] if i < model.num_units else model.head
            inp = h.detach().requires_grad_(i > 0)
            with ctx():
                tf, out = timed(module, inp)
            tb, _ = timed(out.backward, torch.ones_like(out))
            module.eval()
            with torch.no_grad(), ctx():
                tz, _ = timed(module, h)
            module.train()
            fwd[i].append(tf)
            bwd[i].append(tb)
            frozen[i].append(tz)
            h = out.detach()
    model.zero_grad(set_to_none=True)

    def medians(costs: list[list[float]]) -> list[float]:
        return [statistics.median(v[1:]) for v in costs]

    return medians(fwd), medians(bwd), medians(frozen)


def profile_units_graphed(
    model: UnitModel, x: torch.Tensor, device: torch.device, amp: str, repeats: int = 5
) -> tuple[list[float], list[float], list[float]]:
    """``profile_units`` for a run whose steps replay CUDA graphs: each unit's training forward,
    its forward and backward together, and its frozen forward are each captured as a graph and
    timed as a replay (``prefast.cache.probes._replayed``), the median over ``repeats`` rounds
    as in ``profile_units``; backward is their difference.
    Timed eagerly, one call at a time, a unit costs its kernels' launches (~0.5-0.9 ms per
    DenseNet-BC-76 unit on an H200, whatever its size), which the replayed steps do not pay."""
    model.train()
    fwd, bwd, frozen = [], [], []
    h = x
    for i in range(model.num_units + 1):
        module = model.units[i] if i < model.num_units else model.head

        def forward(t: torch.Tensor, module: torch.nn.Module = module, i: int = i) -> torch.Tensor:
            return module(t.detach().requires_grad_(i > 0))

        def forward_backward(
            t: torch.Tensor, module: torch.nn.Module = module, i: int = i
        ) -> torch.Tensor:
            module.zero_grad(set_to_none=True)  # the capture allocates the grads in its pool
            out = module(t.detach().requires_grad_(i > 0))
            out.backward(torch.ones_like(out))
            return out

        tf, out = _replayed(forward, h, device, amp, repeats, statistics.median)
        tfb, _ = _replayed(forward_backward, h, device, amp, repeats, statistics.median)
        module.eval()
        with torch.no_grad():
            tz, _ = _replayed(module, h, device, amp, repeats, statistics.median)
        module.train()
        fwd.append(tf)
        bwd.append(max(tfb - tf, 0.0))
        frozen.append(tz)
        h = out.detach()
    model.zero_grad(set_to_none=True)
    return fwd, bwd, frozen


def schedule_ideal(
    cfg: TrainConfig,
    num_units: int,
    total_iterations: int,
    fwd: list[float],
    bwd: list[float],
    frozen: list[float],
) -> dict[str, float]:
    sched = FreezeSchedule(
        ScheduleConfig(
            mode="freezeout",
            t0=cfg.t0,
            how_scale=cfg.how_scale,
            scale_lr=cfg.scale_lr,
            base_lr=cfg.base_lr,
        ),
        num_units,
        total_iterations,
    )
    return ideal_saving(sched, fwd, bwd, frozen)


# ---- running --------------------------------------------------------------------------------------
def round_order(variants: list[Variant], k: int) -> list[Variant]:
    """The order of round ``k``: as listed in even rounds, reversed in odd ones, so over an
    even number of rounds every variant runs as often early in the process as late (what runs
    first pays start-up effects, and a machine's speed drifts)."""
    return list(variants) if k % 2 == 0 else list(reversed(variants))


def paired_ratio(rounds: list[dict[str, Any]], fo_rounds: dict[int, float]) -> tuple[float, int]:
    """A variant's mean time over freezeout's, both over the rounds where both finished (a round
    that failed for one of them would compare a mean over other rounds, early ones against
    late ones), and how many rounds those are; over all rounds of each where none is shared."""
    shared = [x for x in rounds if x["round"] in fo_rounds]
    if not shared:
        mine = sum(x["train_seconds"] for x in rounds) / len(rounds)
        return mine / (sum(fo_rounds.values()) / len(fo_rounds)), 0
    mine = sum(x["train_seconds"] for x in shared) / len(shared)
    return mine / (sum(fo_rounds[x["round"]] for x in shared) / len(shared)), len(shared)


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's results over its rounds: times and test error are means over the rounds
    (the per-epoch curve too), peaks are maxima; config, summary and records are the first
    round's, and ``rounds`` keeps each round's own figures."""
    first = runs[0]
    n = len(runs)
    out = dict(first)
    out["rounds"] = [
        {
            "round": r["round"],
            "position": r["position"],
            "train_seconds": r["train_seconds"],
            "cache_build_seconds": r["cache_build_seconds"],
            "test_error": r["test_error"],
            "epoch_seconds": [e["train_seconds"] for e in r["records"]],
        }
        for r in runs
    ]
    for key in ("train_seconds", "cache_build_seconds", "test_error", "process_wall_seconds"):
        out[key] = sum(r[key] for r in runs) / n
    out["train_seconds_range"] = [
        min(r["train_seconds"] for r in runs),
        max(r["train_seconds"] for r in runs),
    ]
    for key in ("cache_bytes", "peak_host_private_bytes", "peak_gpu_bytes"):
        out[key] = max(r[key] for r in runs)
    if n > 1 and all(len(r["curve"]) == len(first["curve"]) for r in runs):
        out["curve"] = [
            {
                "epoch": c["epoch"],
                "train_seconds": sum(r["curve"][i]["train_seconds"] for r in runs) / n,
                "test_error": sum(r["curve"][i]["test_error"] for r in runs) / n,
            }
            for i, c in enumerate(first["curve"])
        ]
    return out


def run_variant(cfg: TrainConfig) -> dict[str, Any]:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    baseline = rss_anon_bytes()
    t = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t
    s = result.summary
    elapsed, curve = 0.0, []
    for r in result.records:
        elapsed += r["train_seconds"]
        curve.append({"train_seconds": elapsed, "test_error": r["test_error"], "epoch": r["epoch"]})
    out = {
        "config": cfg.to_dict(),
        "summary": s,
        "records": result.records,
        "curve": curve,
        "train_seconds": s["total_train_seconds"],
        "cache_build_seconds": s["total_cache_build_seconds"],
        "test_error": s["final_test_error"],
        "cache_bytes": max((r["cache_bytes"] for r in result.records), default=0),
        "peak_host_private_bytes": s["peak_host_private_bytes"],
        "host_baseline_bytes": baseline,
        "peak_gpu_bytes": s["peak_gpu_bytes"],
        "process_wall_seconds": wall,
    }
    del result
    gc.collect()
    return out


def warm_up(
    base: dict[str, Any],
    variants: list[Variant],
    num_train: int,
    cache_root: Path,
) -> tuple[float, list[dict[str, Any]]]:
    """Untimed: each variant's configuration for two epochs of four batches, before the first
    timed run. What a process does first pays its start-up (cuDNN's algorithm choice, the
    allocator's and the page cache's first growth, graph pools, the store's thread pools);
    without this, the first variant of round 1, freezeout, paid it alone (its epoch 0 ran
    0.4-0.7 s slower than the same epoch of the variants after it on an H200). Returns the
    seconds it took and the variants that failed (the timed runs go on without them)."""
    t = time.perf_counter()
    small = {"epochs": 2, "subset": min(num_train, 4 * int(base["batch_size"]))}
    failed = []
    for var in variants:
        over = run_overrides(var, cache_root, f"warm-up-{var.name}")
        log.info("warm-up (untimed): %s", var.name)
        try:
            train(TrainConfig(**{**base, **over, **small}))
        except Exception as e:  # the timed run of the same variant will fail and say so too
            log.exception("warm-up of %s failed", var.name)
            failed.append({"variant": var.name, "error": repr(e)})
        finally:
            settle(over.get("cache_dir"))
    gc.collect()
    seconds = time.perf_counter() - t
    log.info("warm-up took %.1f s", seconds)
    return seconds, failed


def run_overrides(var: Variant, cache_root: Path, name: str) -> dict[str, Any]:
    """The config changes of one run of ``var``; a zarr run's stores go to a new folder under
    ``cache_root``, made here so that ``settle`` removes only what this benchmark made (never
    a folder of the user's under ``--cache-dir``)."""
    over = dict(var.overrides)
    if over.get("cache") == "zarr":
        cache_root.mkdir(parents=True, exist_ok=True)
        over["cache_dir"] = tempfile.mkdtemp(prefix=f"{name}-", dir=cache_root)
    return over


def settle(cache_dir: str | None) -> None:
    """After a variant, untimed: remove its stores (``cache_dir`` from ``run_overrides``)
    and write the kernel's dirty pages back, so the next variant neither finds them nor pays
    for their write-back."""
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if hasattr(os, "sync"):
        os.sync()


def run_scenario(
    sc: Scenario,
    args: argparse.Namespace,
    partial_path: Path | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
        else "cpu"
    )
    base = dict(sc.base)
    for k in (
        "epochs",
        "batch_size",
        "num_samples",
        "subset",
        "views",
        "recache_policy",
        "amp",
        "cache_dtype",
        "compile",
        "feature_aug",
    ):
        v = getattr(args, k)
        if v is not None:
            base[k] = v
    if args.depth is not None or args.growth is not None:
        base["model_args"] = {
            **base["model_args"],
            **({"depth": args.depth} if args.depth else {}),
            **({"growth": args.growth} if args.growth else {}),
        }
    if args.channels_last:
        base["channels_last"] = True
    base.update(device=device.type, seed=args.seed, progress=not args.no_progress)
    # each t0 once: --t0 0.6 0.6 trained every variant twice and kept the second in one key
    t0s = tuple(dict.fromkeys(args.t0)) if args.t0 else sc.t0s
    # each tier once: --tiers ram ram trained prefast-ram twice a round, merged as two rounds
    tiers = tuple(dict.fromkeys(args.tiers)) if args.tiers else sc.tiers
    cache_root = Path(args.cache_dir) if args.cache_dir else Path("/tmp/prefast-bench-cache")
    full = (sc.full or args.full) and not args.no_full
    variants = variants_for(
        tiers, device, args.extra_views, full=full, eager_baseline=args.eager_baseline
    )
    # every run's configuration checked before the profile: one the trainer refuses
    # (--recache-policy x, --extra-views -1) failed in the warm-up of every variant, and then
    # the timed runs ended with a traceback
    for t0 in t0s:
        for var in variants:
            try:
                TrainConfig(**{**base, "t0": t0, **var.overrides})
            except PrefastError as e:
                raise SystemExit(f"{var.name} (t0 {t0}): {e}") from None

    # The profile: per-unit forward/backward on this device, one training batch.
    probe = TrainConfig(**{**base, "mode": "freezeout"})
    try:  # the data and the model the configurations name (--subset 5000 of 2,000, --depth 7)
        data = load_data(probe)
        model = build_model(probe, data.train.spec).to(device)
    except PrefastError as e:
        raise SystemExit(str(e)) from None
    if probe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    from prefast.data import make_batch

    idx = torch.arange(min(probe.batch_size, len(data.train))).numpy()
    x, _ = make_batch(data.train, idx, None, device)
    if probe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    method = "eager"
    if device.type == "cuda" and probe.compile in ("auto", "graphs"):  # the steps replay graphs
        try:
            fwd, bwd, frozen = profile_units_graphed(model, x, device, probe.amp)
            method = "graphs"
        except Exception:  # the profile only prices the ideal: never lose the run over it
            log.exception("the profile as replayed graphs failed; timing units eagerly")
    if method == "eager":
        fwd, bwd, frozen = profile_units(model, x, device, probe.amp)
    len_train = len(data.train)
    iters = math.ceil(len_train / probe.batch_size) * probe.epochs
    del model, data, x
    log.info(
        "profile per batch (ms): fwd %s, bwd %s, frozen fwd %s",
        *([round(v * 1e3, 2) for v in costs] for costs in (fwd, bwd, frozen)),
    )

    warm_up_seconds = 0.0
    warm_up_failed: list[dict[str, Any]] = []
    if not args.no_warm_up:
        warm_up_seconds, warm_up_failed = warm_up(base, variants, len_train, cache_root)

    runs: dict[str, Any] = {}
    partial: dict[str, Any] | None = (
        {
            "scenario": sc.name,
            "device": str(device),
            "base_config": base,
            "runs": {},
            "environment": env,
        }
        if partial_path
        else None
    )
    rounds = max(1, args.rounds)
    for t0 in t0s:
        failed: list[dict[str, Any]] = []
        ideal = schedule_ideal(
            TrainConfig(**{**base, "t0": t0}), len(fwd) - 1, iters, fwd, bwd, frozen
        )
        done: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        table: list[dict[str, Any]] = []
        for rnd in range(rounds):
            for pos, var in enumerate(round_order(variants, rnd)):
                over = run_overrides(var, cache_root, f"{sc.name}-t{t0}-{var.name}")
                cfg = TrainConfig(**{**base, "t0": t0, **over})
                log.info("== %s t0=%s round %d/%d: %s", sc.name, t0, rnd + 1, rounds, var.name)
                try:
                    r = run_variant(cfg)
                except Exception as e:  # one variant's failure must not lose the others' numbers
                    log.exception("variant %s failed", var.name)
                    failed.append({"variant": var.name, "round": rnd, "error": repr(e)})
                    r = None
                finally:
                    settle(over.get("cache_dir"))
                if r is not None:
                    r.update(variant=var.name, round=rnd, position=pos)
                    done[var.name].append(r)
                    table = [merge_rounds(done[v.name]) for v in variants if done[v.name]]
                if partial is not None and partial_path is not None:  # survives a run cut short
                    partial["runs"][f"t0={t0}"] = {
                        "t0": t0,
                        "ideal": ideal,
                        "variants": table,
                        "failed": failed,
                        "incomplete": True,
                    }
                    write_json(partial_path, partial)
        ref = {r["variant"]: r["train_seconds"] for r in table}
        if "freezeout" not in ref:
            raise RuntimeError(f"the freezeout baseline failed: {failed}")
        fo_rounds = {x["round"]: x["train_seconds"] for x in done["freezeout"]}
        full_rounds = {x["round"]: x["train_seconds"] for x in done.get("full", [])}
        for r in table:
            r["vs_freezeout"], r["vs_freezeout_shared_rounds"] = paired_ratio(
                r["rounds"], fo_rounds
            )
            # each round's own ratio (rounds alternate the order: see round_order)
            r["vs_freezeout_rounds"] = [
                x["train_seconds"] / fo_rounds[x["round"]] if x["round"] in fo_rounds else None
                for x in r["rounds"]
            ]
            # over the rounds both finished, as vs_freezeout; without a full run, the saving vs
            # full comes from the time vs freezeout's and freezeout's ideal share
            if "full" in ref:
                r["vs_full"] = paired_ratio(r["rounds"], full_rounds)[0]
                r["saving_vs_full"] = 1 - r["vs_full"]
            else:
                r["vs_full"] = None
                r["saving_vs_full"] = 1 - r["vs_freezeout"] * (1 - ideal["freezeout_saving"])
            r["cache_share"] = r["cache_build_seconds"] / max(r["train_seconds"], 1e-9)
            kind = (
                "freezeout"
                if r["variant"] == "freezeout"
                else "prefast"
                if r["variant"].startswith("prefast")
                else None
            )
            ideal_s = ideal.get(f"{kind}_saving") if kind else None
            r["ideal_saving_vs_full"] = ideal_s
            r["fraction_of_ideal"] = (r["saving_vs_full"] / ideal_s) if ideal_s else None
        runs[f"t0={t0}"] = {"t0": t0, "ideal": ideal, "variants": table, "failed": failed}
        if partial is not None and partial_path is not None:  # this t0 done, ratios and all
            partial["runs"][f"t0={t0}"] = runs[f"t0={t0}"]
            write_json(partial_path, partial)
    return {
        "scenario": sc.name,
        "note": sc.note,
        "device": str(device),
        "base_config": base,
        "rounds": rounds,
        "warm_up_seconds": warm_up_seconds,
        "warm_up_failed": warm_up_failed,
        "profile": {
            "fwd_seconds_per_batch": fwd,
            "bwd_seconds_per_batch": bwd,
            "frozen_fwd_seconds_per_batch": frozen,
            "method": method,
            "batch_size": probe.batch_size,
            "total_iterations": iters,
        },
        "runs": runs,
    }


# ---- reporting --------------------------------------------------------------------------------------
def _nth(position: int) -> str:
    """A variant's place in its round's order, for the reader: 1st, 2nd, 3rd, 4th ..."""
    n = position + 1
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n if n < 20 else n % 10, 'th') } in its round"


def _mib(b: int) -> str:
    return f"{b / MIB:,.0f}" if b else "-"


def format_tables(res: dict[str, Any]) -> str:
    lines = []
    # results from before the profile timed frozen forwards priced them as training forwards
    frozen = (
        "frozen units at their eval, no-grad forward"
        if res.get("profile", {}).get("frozen_fwd_seconds_per_batch")
        else "frozen units at their training forward"
    )
    timed_as = (
        "replayed graphs" if res.get("profile", {}).get("method") == "graphs" else "eager calls"
    )
    for key, run in res["runs"].items():
        ideal = run["ideal"]
        lines.append(
            f"\n{res['scenario']} {key} on {res['device']}: ideal saving vs full from the measured profile "
            f"({frozen}, timed as {timed_as}): freezeout {ideal['freezeout_saving']:.1%}, prefast "
            f"{ideal['prefast_saving']:.1%} (prefast vs freezeout {ideal['prefast_vs_freezeout']:.1%})"
        )
        head = [
            "variant",
            "train s",
            "vs freezeout",
            "vs full",
            "test err",
            "cache s",
            "cache MiB",
            "host peak MiB",
            "GPU peak MiB",
            "saving/ideal",
        ]
        several = res.get("rounds", 1) > 1
        if several:
            head.insert(2, "min-max s")
        # without a full run, full's time is modelled (freezeout's / (1 - its ideal saving))
        modelled = not any(r["variant"] == "full" for r in run["variants"])
        mark = "~" if modelled else ""
        rows = []
        for r in run["variants"]:
            frac = r["fraction_of_ideal"]
            vs_full = f"{r['vs_full']:.3f}" if r.get("vs_full") is not None else "-"
            if modelled:
                vs_full = f"~{1 - r['saving_vs_full']:.3f}"
            row = [
                r["variant"], f"{r['train_seconds']:.1f}", f"{r['vs_freezeout']:.3f}", vs_full,
                f"{r['test_error']:.4f}", f"{r['cache_build_seconds']:.1f}", _mib(r["cache_bytes"]),
                _mib(r["peak_host_private_bytes"]), _mib(r["peak_gpu_bytes"]),
                f"{mark}{frac:.2f}" if frac is not None else "-",
            ]  # fmt: skip
            if several:
                lo, hi = r.get("train_seconds_range") or (r["train_seconds"], r["train_seconds"])
                row.insert(2, f"{lo:.1f}-{hi:.1f}")
            rows.append(row)
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        for row in rows:
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if modelled:
            lines.append(
                "~: no full run; full's time is modelled from freezeout's and the profile's ideal "
                "(freezeout's saving/ideal is 1 by construction)"
            )
        for f in run.get("failed", []):
            where = f" (round {f['round'] + 1})" if "round" in f else ""
            lines.append(f"FAILED {f['variant']}{where}: {f['error']}")
        if res.get("rounds", 1) > 1:
            lines.append(
                f"times are means over {res['rounds']} rounds, the order reversed in every "
                "other round; each round's time vs freezeout's in that round:"
            )
            for r in run["variants"]:
                if r["variant"] == "freezeout":
                    continue
                per = ", ".join(
                    f"{x:.3f} ({_nth(q['position'])})"
                    for x, q in zip(r["vs_freezeout_rounds"], r["rounds"], strict=True)
                    if x is not None
                )
                shared = r.get("vs_freezeout_shared_rounds", res["rounds"])
                if shared < res["rounds"]:
                    per += f"; vs freezeout over the {shared} rounds both finished"
                lines.append(f"  {r['variant']}: {per}")
        v = {r["variant"]: r for r in run["variants"]}
        if "prefast-zarr" in v and "prefast-ram" in v:
            lines.append(
                f"target zarr/ram wall-clock <= 1.05: {v['prefast-zarr']['train_seconds'] / v['prefast-ram']['train_seconds']:.3f}"
            )
        if "prefast-zarr" in v:
            lines.append(
                f"prefast-zarr vs freezeout: {_less_or_more(v['prefast-zarr']['vs_freezeout'])} wall-clock"
                f" (cache passes {v['prefast-zarr']['cache_share']:.1%} of its run)"
            )
        if "prefast-device" in v:
            lines.append(
                f"prefast-device vs freezeout: {_less_or_more(v['prefast-device']['vs_freezeout'])} wall-clock"
                f" (cache passes {v['prefast-device']['cache_share']:.1%} of its run)"
            )
        if "freezeout-eager" in v:
            e = v["freezeout-eager"]["train_seconds"]
            lines.append(
                "speed-up over eager freezeout: "
                + ", ".join(f"{k} {e / r['train_seconds']:.2f}x" for k, r in v.items())
            )
        if "prefast-zarr" in v and "prefast-device" in v:
            lines.append(
                f"prefast-zarr / prefast-device wall-clock: "
                f"{v['prefast-zarr']['train_seconds'] / v['prefast-device']['train_seconds']:.3f}"
            )
    return "\n".join(lines)


def _less_or_more(ratio: float) -> str:
    """A time ratio against freezeout in words: 0.8 is "20.0% less", 1.25 "25.0% more"."""
    return f"{1 - ratio:.1%} less" if ratio <= 1 else f"{ratio - 1:.1%} more"


def plot_wanted(no_plot: bool) -> bool:
    """Whether to draw the plot: asked for, and matplotlib imports. Checked at start-up: without
    matplotlib a run trained every variant and then crashed drawing their curves. A missing
    matplotlib is a warning, not a failure: the results are worth more than their picture."""
    if no_plot:
        return False
    try:
        require_matplotlib("the plot")
    except ImportError as e:
        log.warning("%s; no plot will be drawn (--no-plot skips it without this warning)", e)
        return False
    return True


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    runs = list(res["runs"].values())
    fig = Figure(figsize=(6 * len(runs), 4.2))
    for k, run in enumerate(runs):
        ax = fig.add_subplot(1, len(runs), k + 1)
        for r in run["variants"]:
            xs = [c["train_seconds"] for c in r["curve"]]
            ys = [100 * c["test_error"] for c in r["curve"]]
            ax.plot(xs, ys, marker="o", label=r["variant"])
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{res['scenario']}, t0={run['t0']} ({res['device']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="quick")
    p.add_argument("--quick", action="store_true", help="same as --scenario quick")
    p.add_argument("--t0", type=float, nargs="+", default=None)
    p.add_argument(
        "--tiers",
        nargs="+",
        choices=("device", "ram", "zarr", "zarr-pass", "zarr-lz4", "zarr-zstd"),
        default=None,
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--growth", type=int, default=None)
    p.add_argument(
        "--views",
        type=int,
        default=None,
        help="cached views for the prefast variants (speed scenarios use 1)",
    )
    p.add_argument(
        "--extra-views",
        type=int,
        default=None,
        help="add a prefast-zarr variant with this many views",
    )
    p.add_argument("--recache-policy", default=None)
    p.add_argument("--cache-dtype", default=None)
    p.add_argument("--amp", choices=("none", "bf16"), default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", choices=("auto", "none", "graphs", "inductor"), default=None)
    p.add_argument("--feature-aug", choices=("none", "shift", "shift+flip"), default=None)
    p.add_argument(
        "--full", action="store_true", help="add full training where a scenario omits it"
    )
    p.add_argument(
        "--no-full",
        action="store_true",
        help="leave full training out (ratios to full then come from the profile's ideal)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the prefast variants' stores go (default /tmp/prefast-bench-cache)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/compare-<scenario>-<device>.json)",
    )
    p.add_argument(
        "--eager-baseline",
        action="store_true",
        help="add freezeout with eager steps (--compile none) to the run",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, the order reversed in every other round "
        "(times are means; each round's ratios are listed)",
    )
    p.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the untimed warm-up of every variant (two epochs of four batches) before "
        "the first timed run",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="keep the runs' own log lines (freezes, plans, cache moves, write-through costs)",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:  # (it ran one round for --rounds 0 or -2, saying nothing)
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.quick:
        args.scenario = "quick"
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    quiet = logging.INFO if args.verbose else logging.WARNING
    logging.getLogger("prefast").setLevel(quiet)
    logging.getLogger("store").setLevel(quiet)
    draw = plot_wanted(args.no_plot)
    dev = (
        "gpu"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    out = Path(args.out) if args.out else RESULTS_DIR / f"compare-{args.scenario}-{dev}.json"
    # recorded before the run: the tree that runs (a commit made meanwhile is not it) and the
    # load before the benchmark's own
    env = environment("cuda" if dev == "gpu" else "cpu")
    env["loadavg_at_start_1_5_15"] = env["loadavg_1_5_15"]
    # bars only where stderr is a terminal, as prefast train draws them: in a log file
    # (`2>&1 | tee log`) every redraw was a carriage return and cursor-up codes
    args.no_progress = args.no_progress or not sys.stderr.isatty()
    res = run_scenario(SCENARIOS[args.scenario], args, out.with_suffix(".partial.json"), env)
    res["environment"] = env | {"loadavg_at_end_1_5_15": list(os.getloadavg())}
    write_json(out, res)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    text = format_tables(res)
    print(text)
    out.with_suffix(".txt").write_text(text.lstrip("\n") + "\n")
    if draw:
        plot(res, out.with_suffix(".png"))
    print(f"\nresults: {out} (+ .txt{', .png' if draw else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
