"""Operations a training step dispatches beyond its own computation, per epoch.

On a GPU every tensor operation the training thread issues is a kernel launch or a host op
that costs it microseconds; with ``--compile graphs`` the step's own forward, backward and
update are one replay, so what is left per step is what this counts: the batch's way in
(labels, ids, copies), the meter, the iteration counter, a cache's write-through hand-over.
It trains one small run (PreFast, a cache at every freeze) and counts, for each epoch, the
ATen operations dispatched on the training thread outside ``StepRunner._compute`` (the
step's own work), divided by the epoch's steps; views (which launch nothing) are left out.
Nothing is timed: the counts are the same on every machine for the same torch version.

    python benchmarks/step_ops.py --device cpu --out benchmarks/results/step-ops-cpu.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_json
from prefast import TrainConfig
from prefast.errors import PrefastError
from prefast.training import Trainer


class DispatchedOps(TorchDispatchMode):
    """Records the names of the non-view ATen operations (views launch nothing) dispatched
    inside the ``with`` block while ``active``, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.active = True
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.active and not getattr(func, "is_view", False):
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count(tr: Trainer) -> list[dict[str, Any]]:
    """One row per epoch of ``tr``'s run: the operations per step outside the step's own
    work."""
    rows: list[dict[str, Any]] = []
    mode = DispatchedOps()  # entered for each epoch, paused inside each step's own work
    compute = tr.steps._compute

    @functools.wraps(compute)
    def step_work(*a: Any, **k: Any) -> Any:
        mode.active = False
        try:
            return compute(*a, **k)
        finally:
            mode.active = True

    epoch_fn: Callable[[int], dict[str, Any]] = tr._train_epoch

    def counted_epoch(epoch: int) -> dict[str, Any]:
        mode.names.clear()
        with mode:
            rec = epoch_fn(epoch)
        ops = collections.Counter(mode.names)
        steps = tr.iters_per_epoch
        rows.append({
            "epoch": epoch,
            "steps": steps,
            "ops_per_step": len(mode.names) / steps,
            "cache_boundary": rec["cache_boundary"],
            "frozen_units": rec["frozen_units"],
            "ops": dict(ops.most_common()),
        })  # fmt: skip
        return rec

    tr.steps._compute = step_work  # type: ignore[method-assign]
    tr._train_epoch = counted_epoch  # type: ignore[method-assign]
    tr.run()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'epoch':>5} {'boundary':>8} {'frozen':>6} {'ops/step':>8}  most frequent"]
    for r in rows:
        top = ", ".join(f"{k} {v / r['steps']:.1f}" for k, v in list(r["ops"].items())[:6])
        lines.append(
            f"{r['epoch']:>5} {r['cache_boundary']:>8} {r['frozen_units']:>6} "
            f"{r['ops_per_step']:>8.1f}  {top}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default="ram", choices=("device", "ram", "zarr"))
    p.add_argument("--cache-dir", default=None, help="the zarr tier's folder (a temporary one)")
    p.add_argument("--compile", default="auto", choices=("auto", "none", "graphs"))
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--growth", type=int, default=4)
    p.add_argument("--out", default=None, help="results .json (a .txt table beside it)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:  # --epochs 0, --batch-size 0, --depth 7: one line, not a traceback
            tr = Trainer(config(args, tmp))
        except PrefastError as e:
            p.error(str(e))
        rows = count(tr)
    text = format_table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        write_json(
            out,
            {
                "config": vars(args),
                "rows": rows,
                "environment": environment(torch.device(args.device).type),
            },
        )
        out.with_suffix(".txt").write_text(text + "\n")
        print(f"\nresults: {out}")
    return 0


def config(args: argparse.Namespace, tmp: str) -> TrainConfig:
    """The counted run: a new cache, written through, at every freeze."""
    return TrainConfig(
        dataset="synthetic",
        num_samples=args.num_samples,
        model="densenet_bc",
        model_args={"depth": args.depth, "growth": args.growth},
        epochs=args.epochs,
        batch_size=args.batch_size,
        t0=0.1,  # units freeze from the first epoch on: every later epoch reads a cache
        how_scale="linear",
        mode="prefast",
        cache=args.cache,
        cache_dir=args.cache_dir or str(Path(tmp) / "cache"),
        recache_policy="every",  # a new cache, written through, at every freeze
        device=args.device,
        compile=args.compile,
        augment=False,
        progress=False,
    )


if __name__ == "__main__":
    sys.exit(main())
