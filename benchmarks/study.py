"""Seed studies (``fidelity.py``, ``views.py``): named configurations trained for several seeds,
each finished run appended to a JSONL file (an interrupted study keeps what it measured and
``--resume`` skips those runs), then each configuration's test error (mean, spread) and
training seconds, as JSON, a text table and on stdout. The scripts differ only in their
configurations, defaults and table columns."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_json
from prefast import TrainConfig, train
from prefast.errors import PrefastError
from prefast.runtime import resolve_device

log = logging.getLogger("study")


def add_arguments(
    p: argparse.ArgumentParser,
    *,
    epochs: int,
    t0: float,
    seeds: Sequence[int],
    cache: str,
    out: Path,
) -> None:
    """The options every study takes: data, model, schedule, device, budget, output; the
    defaults that differ between studies are given."""
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
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--t0", type=float, default=t0)
    p.add_argument("--how-scale", default="cubic")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--cache", default=cache)
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
    p.add_argument("--out", default=str(out))
    p.add_argument(
        "--resume", action="store_true", help="keep finished runs from the .jsonl beside --out"
    )


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration name, in the order first seen: runs, seeds, test error's mean, std,
    min and max, training seconds' mean and std (std None for a single run)."""
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


# An extra column of a study's table: its header and the cell of a summary row.
Column = tuple[str, Callable[[dict[str, Any], list[dict[str, Any]]], str]]


def format_table(summary: list[dict[str, Any]], width: int, extra: Column | None = None) -> str:
    """The summary as a text table: test error in %, its spread, the difference from
    ``freezeout`` in points and the mean training seconds (``width``: the name column)."""
    ref = next((s for s in summary if s["name"] == "freezeout"), None)
    head = (
        f"{'config':>{width}}  {'runs':>4}  {'test error % mean':>17}  {'std':>6}  "
        f"{'min..max':>13}  {'vs freezeout':>12}  {'train s':>8}"
    )
    lines = [head + (f"  {extra[0]:>6}" if extra else "")]
    for s in summary:
        std = f"{100 * s['test_error_std']:.2f}" if s["test_error_std"] is not None else "-"
        delta = f"{100 * (s['test_error_mean'] - ref['test_error_mean']):+.2f} pp" if ref else "-"
        line = (
            f"{s['name']:>{width}}  {s['runs']:>4}  {100 * s['test_error_mean']:>17.2f}  {std:>6}  "
            f"{100 * s['test_error_min']:>5.2f}..{100 * s['test_error_max']:<6.2f}  {delta:>12}  "
            f"{s['train_seconds_mean']:>8.1f}"
        )
        lines.append(line + (f"  {extra[1](s, summary):>6}" if extra else ""))
    return "\n".join(lines)


def _read_runs(path: Path) -> list[dict[str, Any]]:
    """The finished runs in a study's JSONL. A last line cut short (the study killed while it
    wrote it) is dropped with a warning and the file rewritten without it, so the next run's
    line does not join it; a bad line before the last is no cut and stops the study."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise SystemExit(
                    f"--resume: {path} line {i + 1} is not JSON ({e}); "
                    "mend or remove it, or give another --out"
                ) from None
            log.warning("--resume: %s ends in a line cut short; that run trains again", path)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            break
        if not isinstance(row, dict) or "name" not in row or "seed" not in row:
            raise SystemExit(f"--resume: {path} line {i + 1} is no run of a study")
        rows.append(row)
    return rows


def run(
    args: argparse.Namespace,
    configs: list[dict[str, Any]],
    meta: Callable[[list[dict[str, Any]]], dict[str, Any]],
    table: Callable[[list[dict[str, Any]]], str],
) -> int:
    """Train each of ``configs`` (dicts of a ``name``, a ``seed`` and TrainConfig fields laid
    over the options in ``args``) not yet in the JSONL beside ``args.out`` when resuming,
    until ``args.budget_seconds``; then write the JSON (``meta(rows)`` adds the study's own
    keys), the ``table(summary)`` text and print it. A run that fails is logged and listed
    (``failed``; exit status 1) and the others go on; a configuration that TrainConfig refuses
    stops the study before its first run."""
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
        rows = _read_runs(runs_path)
    elif runs_path.exists():
        runs_path.unlink()
    done = {(r["name"], r["seed"]) for r in rows}
    start = time.perf_counter()
    # once, at start: the code the runs below are measured with (a commit made while a study
    # of hours runs is not the tree that ran) and the load before the study's own
    try:
        env = environment(resolve_device(args.device).type)
    except PrefastError as e:  # --device cuda without CUDA: one line, not a traceback
        raise SystemExit(str(e)) from None
    commit = env["commit"]
    base = dict(
        dataset=args.dataset, num_samples=args.num_samples, data_root=args.data_root, subset=args.subset, model=args.model,
        model_args={"depth": args.depth, "growth": args.growth}, epochs=args.epochs, batch_size=args.batch_size,
        t0=args.t0, how_scale=args.how_scale, cache=args.cache, recache_policy=args.recache_policy,
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        progress=False,
    )  # fmt: skip
    # a resumed run trained with other options (--epochs 4 after 2) is no seed of this study
    # (rows from before runs recorded their options cannot be checked)
    for kept in rows:
        old = kept.get("config")
        if old is not None and old != base:
            diff = ", ".join(
                f"{k} {old.get(k)!r}, not {v!r}" for k, v in base.items() if old.get(k) != v
            )
            raise SystemExit(
                f"--resume: {runs_path} holds {kept['name']} seed {kept['seed']} trained with other "
                f"options ({diff}); give the same options, or another --out"
            )
    # every configuration checked before the first trains: one TrainConfig refuses (views.py
    # --views 0) stopped the study with a traceback after the runs before it
    todo: list[tuple[dict[str, Any], TrainConfig]] = []
    for c in configs:
        if (c["name"], c["seed"]) in done:
            continue
        done.add((c["name"], c["seed"]))  # once: --seeds 0 0 or --views 1 1 counted it twice
        fields = {k: v for k, v in c.items() if k != "name"}  # the seed is a TrainConfig field
        try:
            todo.append((c, TrainConfig(**{**base, **fields})))
        except PrefastError as e:
            raise SystemExit(f"{c['name']} seed {c['seed']}: {e}") from None
    failed: list[dict[str, Any]] = []
    for c, cfg in todo:
        if args.budget_seconds is not None and time.perf_counter() - start > args.budget_seconds:
            log.warning(
                "budget of %.0f s spent; stopping before %s seed %d",
                args.budget_seconds,
                c["name"],
                c["seed"],
            )
            break
        log.info("== %s seed %d", c["name"], c["seed"])
        try:
            r = train(cfg)
        except Exception as e:  # one run's failure must not lose the study's table or later runs
            log.exception("%s seed %d failed", c["name"], c["seed"])
            failed.append({"name": c["name"], "seed": c["seed"], "error": repr(e)})
            continue
        row = {
            **c,
            "test_error": r.summary["final_test_error"],
            "best_test_error": r.summary["best_test_error"],
            "train_seconds": r.summary["total_train_seconds"],
            "cache_build_seconds": r.summary["total_cache_build_seconds"],
            "cache_boundary": r.summary["cache_boundary"],
            "curve": [x["test_error"] for x in r.records],
            "commit": commit,
            "config": base,  # the options it trained with, checked by --resume
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
            **meta(rows),
            # every seed the runs hold, once (also those kept by --resume from earlier calls)
            "seeds": sorted({r["seed"] for r in rows}),
            "runs": rows,
            "summary": summary,
            "failed": failed,
            "environment": env | {"loadavg_at_end_1_5_15": list(os.getloadavg())},
        },
    )
    text = "\n".join(
        [table(summary)] + [f"FAILED {f['name']} seed {f['seed']}: {f['error']}" for f in failed]
    )
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out} (runs: {runs_path})")
    return 1 if failed else 0
