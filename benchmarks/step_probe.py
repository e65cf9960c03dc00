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

    python benchmarks/step_probe.py --device cuda                 # DenseNet-BC-76 k=12, batch 256
    python benchmarks/step_probe.py --device cpu --depth 16 --growth 8 --batch-size 50 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, environment, write_json
from prefast.freezeout import (
    FreezeSchedule,
    ScheduleConfig,
    UnitSGD,
    freeze_prefix,
    set_train_modes,
)
from prefast.models import create_model
from prefast.runtime import synchronize
from prefast.training.step import EpochMeter, StepRunner


def probe(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(
        args.model,
        num_classes=10,
        in_channels=3,
        image_size=32,
        depth=args.depth,
        growth=args.growth,
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n = model.num_units
    bounds = args.boundaries or sorted({0, *model.cut_points, n - 1, n})
    shapes = [(3, 32, 32), *model.boundary_shapes((3, 32, 32))]
    sched = FreezeSchedule(ScheduleConfig(mode="freezeout"), n, 10**6)
    for mode in args.modes:  # checked before any step runs
        base, _, tuned = mode.partition("+")
        if base not in ("none", "graphs", "inductor") or tuned not in ("", "tuned"):
            raise SystemExit(f"--modes: {mode!r} is not none|graphs|inductor[+tuned]")
    rows = []
    for b in bounds:
        for mode in args.modes:
            base, _, tuned = mode.partition("+")
            if device.type != "cuda" and (base == "graphs" or tuned):
                continue
            torch.backends.cudnn.benchmark = bool(tuned)
            fresh = create_model(
                args.model,
                num_classes=10,
                in_channels=3,
                image_size=32,
                depth=args.depth,
                growth=args.growth,
            ).to(device)
            fresh.load_state_dict(model.state_dict())
            if args.channels_last:
                fresh = fresh.to(memory_format=torch.channels_last)
            freeze_prefix(fresh, b)
            set_train_modes(fresh, b)
            opt = UnitSGD(fresh, sched, range(b, n), momentum=0.9, nesterov=True, weight_decay=1e-4)
            runner = StepRunner(fresh, device, args.amp, args.channels_last, base, args.batch_size)
            runner.configure(b, b, opt, None)
            g = torch.Generator().manual_seed(b)
            x = torch.randn((args.batch_size, *shapes[b]), generator=g).to(device)
            y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
            meter = EpochMeter(args.steps * (args.repeats + 1) + args.warmup, device)
            k = 0
            synchronize(device)
            t = time.perf_counter()
            for _ in range(args.warmup):  # warm-up, capture, compilation
                runner.step(x, y, k, k, meter)
                k += 1
            synchronize(device)
            warm = time.perf_counter() - t
            times, issued = [], []
            for _ in range(args.repeats):
                synchronize(device)
                t = time.perf_counter()
                for _ in range(args.steps):
                    runner.step(x, y, k, k, meter)
                    k += 1
                issued.append((time.perf_counter() - t) / args.steps)  # the host's part
                synchronize(device)
                times.append((time.perf_counter() - t) / args.steps)
            meter.check_finite()
            ms = [1e3 * v for v in times]
            rows.append({
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
            })  # fmt: skip
            print(
                f"b={b:>3} {rows[-1]['unit']:>10} {mode:>8}: {rows[-1]['ms_per_step_median']:8.2f} ms/step "
                f"({rows[-1]['ms_per_step_min']:.2f}..{rows[-1]['ms_per_step_max']:.2f}; host "
                f"{rows[-1]['host_ms_per_step_median']:.2f}), warm-up {warm:.2f} s",
                flush=True,
            )
            del runner, opt, fresh
    torch.backends.cudnn.benchmark = False
    return {"config": vars(args), "rows": rows}


def format_table(res: dict[str, Any]) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in res["rows"]))
    by = {(r["boundary"], r["mode"]): r for r in res["rows"]}
    bounds = list(dict.fromkeys(r["boundary"] for r in res["rows"]))
    head = f"{'b':>4} {'unit':>10} " + " ".join(f"{m + ' ms':>12}" for m in modes)
    head += " " + " ".join(f"{m + ' host':>14}" for m in modes)
    if "none" in modes:
        head += " " + " ".join(f"{'none/' + m:>14}" for m in modes if m != "none")
    lines = [head]
    for b in bounds:
        unit = next(r["unit"] for r in res["rows"] if r["boundary"] == b)
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
    return "\n".join(lines)


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
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.amp is None:
        args.amp = "bf16" if cuda else "none"
    if args.channels_last is None:
        args.channels_last = cuda
    res = probe(args)
    res["environment"] = environment()
    out = (
        Path(args.out) if args.out else RESULTS_DIR / f"step-probe-{'gpu' if cuda else 'cpu'}.json"
    )
    write_json(out, res)
    text = format_table(res)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
