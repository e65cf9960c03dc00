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
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, environment, git_commit, write_json
from prefast import TrainConfig, train

log = logging.getLogger("fidelity")

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


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in by.items():
        errs = [r["test_error"] for r in rs]
        secs = [r["train_seconds"] for r in rs]
        out.append({
            "name": name,
            "runs": len(rs),
            "seeds": [r["seed"] for r in rs],
            "test_error_mean": statistics.fmean(errs),
            "test_error_std": statistics.stdev(errs) if len(errs) > 1 else None,
            "test_error_min": min(errs),
            "test_error_max": max(errs),
            "train_seconds_mean": statistics.fmean(secs),
            "train_seconds_std": statistics.stdev(secs) if len(secs) > 1 else None,
        })  # fmt: skip
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    ref = next((s for s in summary if s["name"] == "freezeout"), None)
    lines = [
        f"{'config':>22}  {'runs':>4}  {'test error % mean':>17}  {'std':>6}  {'min..max':>13}  {'vs freezeout':>12}  {'train s':>8}  {'vs v1':>6}"
    ]
    v1 = next((s for s in summary if s["name"] == "prefast-v1"), None)
    for s in summary:
        std = f"{100 * s['test_error_std']:.2f}" if s["test_error_std"] is not None else "-"
        delta = f"{100 * (s['test_error_mean'] - ref['test_error_mean']):+.2f} pp" if ref else "-"
        price = f"{s['train_seconds_mean'] / v1['train_seconds_mean']:.3f}" if v1 else "-"
        lines.append(
            f"{s['name']:>22}  {s['runs']:>4}  {100 * s['test_error_mean']:>17.2f}  {std:>6}  "
            f"{100 * s['test_error_min']:>5.2f}..{100 * s['test_error_max']:<6.2f}  {delta:>12}  "
            f"{s['train_seconds_mean']:>8.1f}  {price:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument(
        "--num-samples", type=int, default=None, help="synthetic only: training-set size"
    )
    p.add_argument(
        "--data-root", default=None, help="dataset folder (default: the system Fashion-MNIST)"
    )
    p.add_argument(
        "--subset",
        type=int,
        default=None,
        help="train on a subset (default: the full training set)",
    )
    p.add_argument("--model", default="densenet_bc")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--growth", type=int, default=8)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--t0", type=float, default=0.6)
    p.add_argument("--how-scale", default="cubic")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default="auto")
    p.add_argument("--recache-policy", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", default="auto", choices=("auto", "none", "graphs", "inductor"))
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="start no new run after this many seconds",
    )
    p.add_argument("--out", default=str(RESULTS_DIR / "fidelity-fmnist-cpu.json"))
    p.add_argument(
        "--resume", action="store_true", help="keep finished runs from the .jsonl beside --out"
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("prefast").setLevel(logging.WARNING)
    logging.getLogger("store").setLevel(logging.WARNING)
    out = Path(args.out)
    runs_path = out.with_suffix(".jsonl")
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.resume and runs_path.exists():
        rows = [json.loads(x) for x in runs_path.read_text().splitlines() if x.strip()]
    elif runs_path.exists():
        runs_path.unlink()
    done = {(r["name"], r["seed"]) for r in rows}
    start = time.perf_counter()
    commit = git_commit()  # once, at start: the code the runs below are measured with
    base = dict(
        dataset=args.dataset, num_samples=args.num_samples, data_root=args.data_root, subset=args.subset, model=args.model,
        model_args={"depth": args.depth, "growth": args.growth}, epochs=args.epochs, batch_size=args.batch_size,
        t0=args.t0, how_scale=args.how_scale, cache=args.cache, recache_policy=args.recache_policy,
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        progress=False,
    )  # fmt: skip
    for c in configs(args.variants, args.seeds):
        if (c["name"], c["seed"]) in done:
            continue
        if args.budget_seconds is not None and time.perf_counter() - start > args.budget_seconds:
            log.warning(
                "budget of %.0f s spent; stopping before %s seed %d",
                args.budget_seconds,
                c["name"],
                c["seed"],
            )
            break
        cfg = TrainConfig(
            **{
                **base,
                "mode": c["mode"],
                "views": c["views"],
                "feature_aug": c["feature_aug"],
                "seed": c["seed"],
            }
        )
        log.info("== %s seed %d", c["name"], c["seed"])
        r = train(cfg)
        row = {
            **c,
            "test_error": r.summary["final_test_error"],
            "best_test_error": r.summary["best_test_error"],
            "train_seconds": r.summary["total_train_seconds"],
            "cache_build_seconds": r.summary["total_cache_build_seconds"],
            "cache_boundary": r.summary["cache_boundary"],
            "curve": [x["test_error"] for x in r.records],
            "commit": commit,
        }
        rows.append(row)
        with runs_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("   test error %.4f, %.1f s", row["test_error"], row["train_seconds"])
    summary = summarize(rows)
    write_json(
        out,
        {
            "config": base,
            # every variant the file holds, also those kept by --resume from earlier calls
            "variants": {n: VARIANTS[n] for n in dict.fromkeys(r["name"] for r in rows)},
            "seeds": args.seeds,
            "runs": rows,
            "summary": summary,
            "environment": environment(),
        },
    )
    text = format_table(summary)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out} (runs: {runs_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
