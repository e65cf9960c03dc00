"""Milliseconds per training step at each cut point, eager against compiled.

A PreFast step trained from boundary ``b`` (frozen and cached below ``b``) runs ``units[b:]``
and the head forward and backward plus the optimizer update. This times that step for every
``b`` in ``--boundaries`` (default: 0, the model's cut points and the last units) with each
``--modes`` entry (``none`` = eager, ``graphs`` = one CUDA graph per step, ``inductor`` =
torch.compile'd units; a ``+tuned`` suffix, e.g. ``graphs+tuned``, runs that mode with
``torch.backends.cudnn.benchmark`` on, so cuDNN picks each convolution's fastest algorithm
during the warm-up), all in one process on one device: warm-up steps first (they include
graph capture and compilation, reported apart), then the median and spread of
``--repeats`` timed rounds of ``--steps`` steps each, synchronised at the round's ends only.

``--write-through device ram zarr`` adds, at each ``b`` below the last unit, the steps of an
epoch that writes the next cache: unit ``b`` frozen too, each step handing its output (the
activation at ``b + 1``) to write-through into an empty cache in each tier (the store is
prepared for row writes first, as a plan's later stores are), each sample once in a shuffled
order, beside the same steps unwritten; the tiers (and the unwritten steps) run in an order
rotated by one at each boundary, so none is always first or last. On CUDA the host tiers' rows
are written on a thread; a round pays for them where they hold the steps back (at most four
batches in flight), and the rows still queued after the last round are timed apart
(``drain_seconds``; ``ms_per_step_with_drain`` spreads them over the timed steps).

    python benchmarks/step_probe.py --device cuda                 # DenseNet-BC-76 k=12, batch 256
    python benchmarks/step_probe.py --device cpu --depth 16 --growth 8 --batch-size 50 --steps 5
    python benchmarks/step_probe.py --device cpu --depth 16 --growth 8 --batch-size 50 \
        --modes none --boundaries 4 8 --write-through device ram zarr
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import store
from benchmarks.common import RESULTS_DIR, environment, write_json
from prefast.cache.build import activation_dtypes
from prefast.cache.write_through import WriteThrough
from prefast.errors import PrefastError
from prefast.freezeout import (
    FreezeSchedule,
    ScheduleConfig,
    UnitSGD,
    freeze_prefix,
    set_train_modes,
)
from prefast.models import UnitModel, create_model
from prefast.runtime import synchronize
from prefast.training.step import WARMUP, EpochMeter, StepRunner

WRITE_THROUGH_TIERS = ("device", "ram", "zarr")
CACHE_DTYPE = "float16"  # prefast train's default --cache-dtype


def _sink(tier: str, shape: tuple[int, ...], n: int, device: torch.device, folder: Path) -> Any:
    """An empty cache of ``n`` samples of ``shape`` in ``tier``, as write-through opens one; the
    store is prepared for row writes first, as the stores a plan writes after its first are
    (``prefast.cache.ahead``)."""
    if tier == "device":
        return store.DeviceCache.empty(n, 1, shape, CACHE_DTYPE, device=device)
    if tier == "ram":
        return store.RamCache.empty(n, 1, shape, CACHE_DTYPE, pin=False)
    writer = store.create(
        folder / "probe-store", sample_shape=shape, num_samples=n, dtype=CACHE_DTYPE, overwrite=True
    )
    writer.prepare_rows()
    return writer


def _model(args: argparse.Namespace, device: torch.device) -> UnitModel:
    """The probed model on ``device`` (32x32 inputs, 10 classes), channels_last where asked."""
    model = create_model(
        args.model,
        num_classes=10,
        in_channels=3,
        image_size=32,
        depth=args.depth,
        growth=args.growth,
    ).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def time_steps(
    args: argparse.Namespace,
    device: torch.device,
    model: UnitModel,
    sched: FreezeSchedule,
    shapes: list[tuple[int, ...]],
    b: int,
    mode: str,
    tier: str | None = None,
    folder: Path | None = None,
) -> dict[str, Any]:
    """One row: steps trained from boundary ``b`` in ``mode``. With ``tier``, unit ``b`` is
    frozen too (frontier ``b + 1``) and each step writes its output, the activation at
    ``b + 1``, through into an empty cache in that tier (``WriteThrough.take``), each sample
    once in a shuffled order, as in an epoch that writes the next cache; ``tier="none"``
    times the same steps without the write, for reference."""
    base, _, tuned = mode.partition("+")
    torch.backends.cudnn.benchmark = bool(tuned)
    n = model.num_units
    f = b if tier is None else b + 1
    fresh = _model(args, device)
    fresh.load_state_dict(model.state_dict())
    freeze_prefix(fresh, f)
    set_train_modes(fresh, f)
    opt = UnitSGD(fresh, sched, range(f, n), momentum=0.9, nesterov=True, weight_decay=1e-4)
    runner = StepRunner(fresh, device, args.amp, args.channels_last, base, args.batch_size)
    total = args.warmup + args.steps * args.repeats
    writer: WriteThrough | None = None
    order = torch.randperm(total * args.batch_size, generator=torch.Generator().manual_seed(b))
    if tier not in (None, "none"):
        if folder is None:
            raise ValueError("a write-through row needs a folder for its store")
        writer = WriteThrough(
            target=f, sink=_sink(tier, shapes[f], len(order), device, folder), tier=tier,
            path=None, fingerprint="step-probe", meta={}, chain=(f,),
            labels=torch.zeros(len(order), dtype=torch.int64), dtype=CACHE_DTYPE, device=device,
            batch_size=args.batch_size, sample_shape=shapes[f],
        )  # fmt: skip
        runner.configure(b, f, opt, None, tap_at=f, tap_fn=writer.take, tap_dtype=writer.dtype)
    else:
        runner.configure(b, f, opt, None)
    g = torch.Generator().manual_seed(b)
    # in the dtype the trainer hands cached batches over in (bfloat16 under --amp bf16)
    dtype = activation_dtypes(model, shapes[0], device, args.amp)[b]
    x = torch.randn((args.batch_size, *shapes[b]), generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    meter = EpochMeter(total, device)
    k = 0

    def step() -> None:
        nonlocal k
        ids = order[k * args.batch_size : (k + 1) * args.batch_size] if writer else None
        runner.step(x, y, k, k, meter, ids=ids)
        k += 1

    try:
        synchronize(device)
        t = time.perf_counter()
        for _ in range(args.warmup):  # warm-up, capture, compilation
            step()
        synchronize(device)
        warm = time.perf_counter() - t
        times, issued = [], []
        for _ in range(args.repeats):
            synchronize(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            issued.append((time.perf_counter() - t) / args.steps)  # the host's part
            synchronize(device)
            times.append((time.perf_counter() - t) / args.steps)
        meter.check_finite()
        # the rows the writer thread still holds after the last round
        drain = writer.wait_written() if writer is not None else 0.0
    finally:
        if writer is not None:
            writer.abort()
    ms = [1e3 * v for v in times]
    row = {
        "boundary": b,
        "unit": model.unit_names[b - 1] if b else "input",
        "mode": mode,
        "ms_per_step_median": statistics.median(ms),
        "ms_per_step_min": min(ms),
        "ms_per_step_max": max(ms),
        # the host's time to launch a step (CUDA: near ms_per_step where the host, not
        # the device, bounds the step; on a CPU the same, since nothing is queued)
        "host_ms_per_step_median": 1e3 * statistics.median(issued),
        "warmup_seconds": warm,
        "captures": runner.captures,
        "capture_seconds": runner.capture_seconds,
        "images_per_second": args.batch_size / (statistics.median(ms) / 1e3),
    }
    if tier is not None:
        # samples whose rows the steps handed over (every step's batch where a tier is written)
        written = int(writer.written.sum()) if writer is not None else 0
        row |= {
            "frontier": f,
            "write_through": tier,
            "samples_written": written,
            "drain_seconds": drain,
            "ms_per_step_with_drain": 1e3
            * (sum(times) * args.steps + drain)
            / (args.steps * args.repeats),
        }
    torch.backends.cudnn.benchmark = False
    return row


def probe(
    args: argparse.Namespace, save: Callable[[dict[str, Any]], object] | None = None
) -> dict[str, Any]:
    """Every row; ``save`` is given the result so far after each row (a probe stopped by a
    time limit keeps what it measured)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    try:
        model = _model(args, device)
    except PrefastError as e:  # --depth 7, --model foo: one line, not a traceback
        raise SystemExit(str(e)) from None
    n = model.num_units
    # each boundary, mode and tier once: one given twice was timed twice, and the tables kept
    # only the second
    bounds = list(dict.fromkeys(args.boundaries or sorted({0, *model.cut_points, n - 1, n})))
    args.modes = list(dict.fromkeys(args.modes))
    args.write_through = list(dict.fromkeys(args.write_through))
    if any(not 0 <= b <= n for b in bounds):
        raise SystemExit(f"--boundaries: each must be in 0..{n} (the model's units), got {bounds}")
    args.boundaries = bounds  # the result's config names the boundaries probed (compile_choice)
    shapes = [(3, 32, 32), *model.boundary_shapes((3, 32, 32))]
    sched = FreezeSchedule(ScheduleConfig(mode="freezeout"), n, 10**6)
    for mode in args.modes:  # checked before any step runs
        base, _, tuned = mode.partition("+")
        if base not in ("none", "graphs", "inductor") or tuned not in ("", "tuned"):
            raise SystemExit(f"--modes: {mode!r} is not none|graphs|inductor[+tuned]")
    if any(m.partition("+")[0] == "graphs" for m in args.modes) and args.warmup <= WARMUP:
        # (checked on any device: the same command would time captures on CUDA)
        raise SystemExit(
            f"--warmup {args.warmup}: a graphs step is captured after {WARMUP} eager steps, so "
            f"the timed rounds would include the capture; give --warmup {WARMUP + 1} or more"
        )
    # graphs and cuDNN autotuning are CUDA's
    modes = [
        m
        for m in args.modes
        if device.type == "cuda" or (m.partition("+")[0] != "graphs" and "+" not in m)
    ]
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        print(_line(row), flush=True)
        if save is not None:
            save({"config": vars(args), "rows": rows, "partial": True})

    with tempfile.TemporaryDirectory(prefix="prefast-step-probe-", dir=args.store_dir) as tmp:
        for i, b in enumerate(bounds):
            for mode in modes:
                add(time_steps(args, device, model, sched, shapes, b, mode))
                # write-through: unit b frozen too, its output written; the same steps unwritten
                for tier in write_through_order(args.write_through, i) if b < n else ():
                    add(time_steps(args, device, model, sched, shapes, b, mode, tier, Path(tmp)))
    return {"config": vars(args), "rows": rows}


def write_through_order(tiers: list[str], i: int) -> list[str]:
    """The write-through rows of the ``i``-th boundary: the unwritten steps (``none``) and each
    tier, rotated by ``i`` (what runs first after the plain steps may pay for their memory)."""
    seq = ["none", *tiers] if tiers else []
    k = i % len(seq) if seq else 0
    return seq[k:] + seq[:k]


def compile_choice(path: str | Path, rc: int) -> str:
    """The ``--compile`` mode for the training that follows a probe (gpu.sh) from the probe's
    JSON at ``path`` and its exit status ``rc``: ``graphs`` where a graphs row was measured at
    every boundary probed, or where the time limit (``timeout``'s 124) stopped the probe after
    graphs ran (the boundaries it did not reach are untried, not failed); ``none`` where the
    probe failed or graphs rows are missing for another reason (graphs may be what failed);
    ``auto`` where it measured nothing to go by (no file, no rows, no graphs mode asked for).
    A ``graphs+tuned`` row is a graphs row (the same capture, cuDNN autotuned)."""
    try:
        res = json.loads(Path(path).read_text())
        rows = [r for r in res["rows"] if "write_through" not in r]
        bounds = set(res["config"]["boundaries"] or ())
        modes = res["config"].get("modes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "auto"
    if modes is not None and not any(str(m).partition("+")[0] == "graphs" for m in modes):
        return "auto"  # graphs not probed (PROBE_MODES="none"): nothing says they fail
    graphed = {r["boundary"] for r in rows if str(r["mode"]).partition("+")[0] == "graphs"}
    if bounds and graphed == bounds:
        return "graphs"
    if rc == 124:
        return "graphs" if graphed else "auto"
    return "none"


def _line(r: dict[str, Any]) -> str:
    wt = f" write-through {r['write_through']:>6}" if "write_through" in r else ""
    if r.get("drain_seconds", 0.0) > 0:
        wt += f" (+{1e3 * r['drain_seconds']:.1f} ms drain after the last round)"
    return (
        f"b={r['boundary']:>3} {r['unit']:>10} {r['mode']:>8}{wt}: "
        f"{r['ms_per_step_median']:8.2f} ms/step ({r['ms_per_step_min']:.2f}.."
        f"{r['ms_per_step_max']:.2f}; host {r['host_ms_per_step_median']:.2f}), warm-up "
        f"{r['warmup_seconds']:.2f} s"
    )


def format_table(res: dict[str, Any]) -> str:
    plain = [r for r in res["rows"] if "write_through" not in r]
    modes = list(dict.fromkeys(r["mode"] for r in plain))
    by = {(r["boundary"], r["mode"]): r for r in plain}
    bounds = list(dict.fromkeys(r["boundary"] for r in plain))
    head = f"{'b':>4} {'unit':>10} " + " ".join(f"{m + ' ms':>12}" for m in modes)
    head += " " + " ".join(f"{m + ' host':>14}" for m in modes)
    if "none" in modes:
        head += " " + " ".join(f"{'none/' + m:>14}" for m in modes if m != "none")
    lines = [head]
    for b in bounds:
        unit = next(r["unit"] for r in plain if r["boundary"] == b)
        cells = [
            f"{by[(b, m)]['ms_per_step_median']:12.2f}" if (b, m) in by else f"{'-':>12}"
            for m in modes
        ]
        line = f"{b:>4} {unit:>10} " + " ".join(cells)
        line += " " + " ".join(
            f"{by[(b, m)].get('host_ms_per_step_median', float('nan')):14.2f}"
            if (b, m) in by
            else f"{'-':>14}"
            for m in modes
        )
        if "none" in modes and (b, "none") in by:
            base = by[(b, "none")]["ms_per_step_median"]
            line += " " + " ".join(
                f"{base / by[(b, m)]['ms_per_step_median']:14.2f}" if (b, m) in by else f"{'-':>14}"
                for m in modes
                if m != "none"
            )
        lines.append(line)
    return "\n".join(lines + _write_through_table(res["rows"]))


def _write_through_table(rows: list[dict[str, Any]]) -> list[str]:
    """The write-through rows: per boundary and mode, the steps unwritten (``none``) and, per
    tier, writing (ms a step, what the write adds, the host's part)."""
    wt = [r for r in rows if "write_through" in r]
    if not wt:
        return []
    tiers = [t for t in dict.fromkeys(r["write_through"] for r in wt) if t != "none"]
    by = {(r["boundary"], r["mode"], r["write_through"]): r for r in wt}
    lines = [
        "",
        "write-through: unit b frozen too, each step writing its output (the activation at b+1)",
        "into a cache in each tier; +ms: over the same steps unwritten (none)",
        f"{'b':>4} {'unit':>10} {'mode':>12} {'none ms':>9}"
        + "".join(f" {t + ' ms':>10} {'+ms':>7} {t + ' host':>10}" for t in tiers),
    ]
    for b, mode in dict.fromkeys((r["boundary"], r["mode"]) for r in wt):
        ref = by.get((b, mode, "none"))
        base = ref["ms_per_step_median"] if ref else float("nan")
        unit = next(r["unit"] for r in wt if r["boundary"] == b)
        line = f"{b:>4} {unit:>10} {mode:>12} {base:9.2f}"
        for t in tiers:
            r = by.get((b, mode, t))
            if r is None:
                line += f" {'-':>10} {'-':>7} {'-':>10}"
                continue
            ms = r["ms_per_step_median"]
            line += f" {ms:10.2f} {ms - base:+7.2f} {r['host_ms_per_step_median']:10.2f}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="densenet_bc")
    p.add_argument("--depth", type=int, default=76)
    p.add_argument("--growth", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=("none", "bf16"), default=None)
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--modes", nargs="+", default=["none", "graphs", "inductor"])
    p.add_argument("--boundaries", type=int, nargs="+", default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--write-through",
        nargs="+",
        default=[],
        choices=WRITE_THROUGH_TIERS,
        metavar="TIER",
        help="also time, at each boundary b below the last unit, steps that freeze unit b too "
        "and write its output into a cache in each of these tiers (device, ram, zarr), beside "
        "the same steps unwritten",
    )
    p.add_argument(
        "--store-dir",
        default=None,
        help="folder for the zarr tier's store (a temporary folder in it; default: the system's)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    # before any step: --steps 0 divided by zero, --repeats 0 took a median of nothing and
    # --batch-size 0 stopped on a loss that is not finite
    for flag, least in (("steps", 1), ("repeats", 1), ("batch_size", 1), ("warmup", 0)):
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be at least {least}")
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:N)")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if args.amp is None:
        args.amp = "bf16" if cuda else "none"
    if args.channels_last is None:
        args.channels_last = cuda
    out = (
        Path(args.out) if args.out else RESULTS_DIR / f"step-probe-{'gpu' if cuda else 'cpu'}.json"
    )
    env = environment(torch.device(args.device).type)
    res = probe(args, lambda partial: write_json(out, partial | {"environment": env}))
    res["environment"] = env
    write_json(out, res)
    text = format_table(res)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
