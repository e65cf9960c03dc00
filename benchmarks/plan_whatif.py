"""The write-through plan a run would make at other tier rates: no training, no device.

A run with ``--recache-policy auto`` logs, once, the per-sample costs it measured (``measured
costs per sample (...): image X us, forward [...] us``) and the rates of its tiers. This
script takes those costs from a run's log, rebuilds the run's schedule from a ``compare.py``
scenario, and plans the rest of the run as the cache manager would (``plan_epochs``, from the
first freeze), once for the device tier and once for ``--tier`` at each ``--read`` x
``--write`` rate (GB/s). It says which boundaries a plan writes in which epoch and its
predicted seconds for the rest of the run, against the device tier's: how far the host
tier's rates, not its code, keep it from the device tier.

    python benchmarks/plan_whatif.py --log benchmarks/results/gpu/h200-3495aee/logs.txt \\
        --read 2.5 5.2 10 --write 0.65 1.78 5

Predictions are the planner's model (docs/training.md, re-caching), not timings.
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import SCENARIOS
from prefast.cache.plan import TRAIN_FACTOR, CostModel, plan_epochs
from prefast.freezeout import FreezeSchedule, ScheduleConfig
from prefast.models import create_model

COSTS = re.compile(
    r"measured costs per sample \(([^)]*)\): image ([0-9.]+) us, forward (\[[^\]]*\]) us"
)
DEVICE_RATE = 100e9  # bytes/s: device-tier reads and writes, as probed on an H200 (~100 GB/s)


def costs_from_log(text: str) -> tuple[float, list[float], str]:
    """(image seconds per sample, each unit's forward seconds per sample, how they were timed)
    from the first ``measured costs`` line of a run's log."""
    m = COSTS.search(text)
    if m is None:
        raise SystemExit(
            "no 'measured costs per sample' line in the log (run with -v at 3495aee or later)"
        )
    fwd = [float(v) * 1e-6 for v in ast.literal_eval(m.group(3))]
    return float(m.group(2)) * 1e-6, fwd, m.group(1)


def plan(
    scenario: str,
    image: float,
    fwd: list[float],
    tier: str,
    read: float,
    write: float,
    train_factor: float = TRAIN_FACTOR,
) -> tuple[list[int], float, float]:
    """(boundary written or held in each epoch from the first freeze's, predicted seconds for
    the rest of the run, the same without any cache) for one tier at the given rates."""
    base: dict[str, Any] = SCENARIOS[scenario].base
    t0 = SCENARIOS[scenario].t0s[0]
    args = base["model_args"]
    model = create_model(base["model"], num_classes=10, in_channels=3, image_size=32, **args)
    if len(fwd) != model.num_units:
        raise SystemExit(
            f"the log has {len(fwd)} unit forwards; the scenario's model has {model.num_units}"
        )
    shapes = model.boundary_shapes((3, 32, 32))
    sample_bytes = [3 * 32 * 32 * 4] + [2 * math.prod(s) for s in shapes]  # fp32 image, fp16 cache
    epochs, batch = base["epochs"], base["batch_size"]
    n = base.get("subset") or base["num_samples"]  # the paper scenario trains on a subset
    total = math.ceil(n / batch) * epochs  # as the trainer counts steps
    ipe = total // epochs
    sched = FreezeSchedule(
        ScheduleConfig(mode="prefast", t0=t0, how_scale=base["how_scale"]), model.num_units, total
    )
    j = min(it for it in sched.freeze_iterations() if it is not None)  # the first freeze
    first, elapsed = divmod(j, ipe)
    cost = CostModel(
        unit_fwd=fwd,
        image=image,
        read_rate={tier: read},
        write_rate={tier: write},
        overlap=True,
        ahead_write_rate={tier: write} if tier != "device" else {},
        train_factor=train_factor,
    )
    p = plan_epochs(
        [sched.stretches(max(e * ipe, j), (e + 1) * ipe) for e in range(first, epochs)],
        batch,
        cost,
        sample_bytes,
        lambda b: tier,
        elapsed=elapsed,
    )
    return p.targets, p.seconds, p.baseline_seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", type=Path, required=True, help="a run's log with its measured costs")
    # the model is rebuilt for 32x32 RGB images: the synthetic CIFAR scenarios (not fmnist)
    cifar = sorted(n for n, sc in SCENARIOS.items() if sc.base["dataset"] == "synthetic")
    p.add_argument("--scenario", default="cifar-gpu-long", choices=cifar)
    p.add_argument("--tier", default="zarr", choices=["ram", "zarr"])
    p.add_argument("--read", type=float, nargs="+", default=[5.2], help="GB/s to the device")
    p.add_argument("--write", type=float, nargs="+", default=[1.78], help="GB/s into the tier")
    p.add_argument(
        "--train-factor",
        type=float,
        default=TRAIN_FACTOR,
        help="a trainable unit's forward and backward in multiples of its forward (the planner "
        f"assumes {TRAIN_FACTOR:g}; a run's epochs before its plan may say otherwise)",
    )
    args = p.parse_args(argv)
    # (nan passes every comparison: a nan rate was planned as if the tier were never read)
    if not all(0 < v < math.inf for v in args.read + args.write):
        p.error("--read and --write take finite rates above 0 GB/s")
    if not 1 <= args.train_factor < math.inf:
        p.error("--train-factor must be >= 1 and finite (a backward is never free)")
    tf = args.train_factor
    try:
        text = args.log.read_text()
    except OSError as e:
        p.error(f"--log: cannot read {args.log}: {e.strerror or e}")
    image, fwd, timed = costs_from_log(text)
    dev, dev_s, none_s = plan(args.scenario, image, fwd, "device", DEVICE_RATE, DEVICE_RATE, tf)
    print(
        f"costs from {args.log} ({timed}); scenario {args.scenario}; training {tf:g}x a "
        f"unit's forward; predicted seconds for the rest of the run from the first freeze (no "
        f"new cache: {none_s:.1f} s)\n"
    )
    print("| tier | read GB/s | write GB/s | boundary by epoch | predicted s | vs device |")
    print("|---|---|---|---|---|---|")
    print(
        f"| device | {DEVICE_RATE / 1e9:.0f} | {DEVICE_RATE / 1e9:.0f} | {dev} | {dev_s:.1f} | 1.00 |"
    )
    for r in args.read:
        for w in args.write:
            got, s, _ = plan(args.scenario, image, fwd, args.tier, r * 1e9, w * 1e9, tf)
            print(f"| {args.tier} | {r:g} | {w:g} | {got} | {s:.1f} | {s / dev_s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
