"""How many augmented views does a cache need to keep FreezeOut's accuracy?

On Fashion-MNIST (the full 60,000-image training set) this trains ``freezeout`` and ``prefast``
with 1, 2, 4 and 8 cached views, plus both without augmentation (the floor), for several seeds,
and reports the test error's mean and spread per configuration. Runs are appended to a JSONL
file as they finish, so an interrupted study keeps what it measured and ``--resume`` skips them.

    python benchmarks/views.py                              # CPU defaults (hours on 2 cores)
    python benchmarks/views.py --epochs 4 --seeds 0 1 --budget-seconds 3000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import study
from benchmarks.common import RESULTS_DIR


def configs(views: list[int], seeds: list[int], floor: bool) -> list[dict[str, Any]]:
    """Seed-major order, so a study cut short by its budget still covers every variant once."""
    out = []
    for seed in seeds:
        out.append(
            {"name": "freezeout", "mode": "freezeout", "views": 1, "augment": True, "seed": seed}
        )
        for v in views:
            out.append(
                {
                    "name": f"prefast-v{v}",
                    "mode": "prefast",
                    "views": v,
                    "augment": True,
                    "seed": seed,
                }
            )
        if floor:
            out.append(
                {
                    "name": "freezeout-noaug",
                    "mode": "freezeout",
                    "views": 1,
                    "augment": False,
                    "seed": seed,
                }
            )
            out.append(
                {
                    "name": "prefast-noaug",
                    "mode": "prefast",
                    "views": 1,
                    "augment": False,
                    "seed": seed,
                }
            )
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    return study.format_table(summary, 16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    study.add_arguments(
        p, epochs=6, t0=0.8, seeds=[0, 1], cache="ram", out=RESULTS_DIR / "views-fmnist-cpu.json"
    )
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-floor", action="store_true", help="skip the no-augmentation runs")
    args = p.parse_args(argv)
    return study.run(
        args,
        configs(args.views, args.seeds, not args.no_floor),
        # every view count the file holds, also those kept by --resume from earlier calls
        lambda rows: {
            "views": sorted({r["views"] for r in rows if r["mode"] == "prefast" and r["augment"]})
        },
        format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
