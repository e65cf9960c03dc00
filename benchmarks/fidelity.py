"""Fidelity at long schedules: does PreFast keep FreezeOut's test error once augmentation stops
at the first cache, and what does each remedy cost?

Trains, for several seeds, ``freezeout`` and ``prefast`` with 1 cached view, 1 view plus each
feature-space augmentation (``--feature-aug shift``, ``shift+flip``) and 4 cached views, and
reports each variant's test error (mean +- std over seeds) and training wall-clock. Runs are
appended to a JSONL file as they finish, so an interrupted study keeps what it measured and
``--resume`` skips them.

    python benchmarks/fidelity.py                           # Fashion-MNIST, 15 epochs (CPU: hours)
    python benchmarks/fidelity.py --dataset synthetic --num-samples 50000 --depth 76 --growth 12 \
        --epochs 16 --batch-size 256 --amp bf16 --channels-last --device cuda --out ...gpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import study
from benchmarks.common import RESULTS_DIR

# name -> (mode, views, feature_aug)
VARIANTS: dict[str, tuple[str, int, str]] = {
    "freezeout": ("freezeout", 1, "none"),
    "prefast-v1": ("prefast", 1, "none"),
    "prefast-v1-shift": ("prefast", 1, "shift"),
    "prefast-v1-shift+flip": ("prefast", 1, "shift+flip"),
    "prefast-v4": ("prefast", 4, "none"),
}


def configs(names: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Seed-major order, so a study cut short by its budget still covers every variant once."""
    out = []
    for seed in seeds:
        for name in names:
            mode, views, fa = VARIANTS[name]
            out.append(
                {"name": name, "mode": mode, "views": views, "feature_aug": fa, "seed": seed}
            )
    return out


def _vs_v1(s: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    """A variant's training seconds against prefast-v1's (the price of a remedy)."""
    v1 = next((x for x in summary if x["name"] == "prefast-v1"), None)
    return f"{s['train_seconds_mean'] / v1['train_seconds_mean']:.3f}" if v1 else "-"


def format_table(summary: list[dict[str, Any]]) -> str:
    return study.format_table(summary, 22, ("vs v1", _vs_v1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    study.add_arguments(
        p, epochs=15, t0=0.6, seeds=[0, 1, 2], cache="auto",
        out=RESULTS_DIR / "fidelity-fmnist-cpu.json",
    )  # fmt: skip
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    args = p.parse_args(argv)
    return study.run(
        args,
        configs(args.variants, args.seeds),
        # every variant the file holds, also those kept by --resume from earlier calls
        lambda rows: {"variants": {n: VARIANTS[n] for n in dict.fromkeys(r["name"] for r in rows)}},
        format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
