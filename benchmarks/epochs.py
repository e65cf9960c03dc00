"""Where each variant's epochs went, from a ``compare.py`` result: one Markdown table per t0,
epochs as columns, and for each variant the seconds an epoch took, what the write-through
plan predicted for it (``plan_seconds``), the host's waits for batches, the cache loaders'
own account, the seconds spent measuring the planner's costs (``probe_seconds``), for a cache
written through during the epoch the seconds its hand-over held the training thread and the
rows its catch-up computed, the cache-pass seconds (catch-up and close included) and the
boundary held at the epoch's end (``-``: not recorded by the run's version). No timing: it
reads the records a run wrote (the first round's, where a scenario ran several).

    python benchmarks/epochs.py benchmarks/results/gpu/h200-3495aee/compare-gpu-long.json
    python benchmarks/epochs.py RESULT.json --from-epoch 3     # leave out the first epochs

Below each table, per prefast variant: the epochs a plan predicted, summed, against what they
took (how far the planner's measured costs are from the run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = Callable[[dict[str, Any]], str]


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _loader(rec: dict[str, Any]) -> str:
    """The loaders' own seconds: filling batches (gather and buffers) and issuing copies."""
    ld = rec.get("loader_seconds")
    if not ld:
        return "-"
    return f"{ld['gather'] + ld['buffers'] + ld['copy']:.2f}"


def _written(key: str, fmt: str) -> Row:
    """A field of the account of the cache an epoch wrote through (``-``: none written)."""

    def cell(rec: dict[str, Any]) -> str:
        wt = rec.get("write_through")
        return "-" if not wt else fmt.format(wt[key])

    return cell


ROWS: list[tuple[str, Row]] = [
    ("s", lambda r: _s(r["train_seconds"])),
    ("plan s", lambda r: _s(r.get("plan_seconds"))),
    ("waited s", lambda r: _s(r.get("input_wait_seconds"))),
    ("loader s", _loader),
    ("probe s", lambda r: _s(r.get("probe_seconds"))),
    ("hand-over s", _written("take_seconds", "{:.2f}")),
    ("catch-up rows", _written("catch_up_samples", "{}")),
    ("cache s", lambda r: _s(r.get("cache_build_seconds"))),
    ("boundary", lambda r: str(r["cache_boundary"])),
]


def plan_error(records: list[dict[str, Any]]) -> str | None:
    """The predicted epochs' seconds summed against what they took, or None without any."""
    planned = [r for r in records if r.get("plan_seconds")]
    if not planned:
        return None
    predicted = sum(r["plan_seconds"] for r in planned)
    took = sum(r["train_seconds"] for r in planned)
    first, last = planned[0]["epoch"], planned[-1]["epoch"]
    if first == last:
        span = f"epoch {first}"
    elif last - first + 1 == len(planned):
        span = f"epochs {first}-{last}"
    else:
        span = "epochs " + ", ".join(str(r["epoch"]) for r in planned)
    return (
        f"{span}: the plan predicted {predicted:.2f} s, they took {took:.2f} s "
        f"({took / predicted:.2f}x)"
    )


def tables(result: dict[str, Any], from_epoch: int = 0) -> str:
    """The Markdown tables of a ``compare.py`` result (see the module docstring)."""
    out: list[str] = []
    for name, run in result["runs"].items():
        variants = run["variants"]
        if not variants:
            continue
        epochs = [r["epoch"] for r in variants[0]["records"] if r["epoch"] >= from_epoch]
        out.append(f"### {result.get('scenario', '?')} {name}, per epoch")
        out.append("")
        out.append("| variant | " + " | ".join(str(e) for e in epochs) + " |")
        out.append("|---" * (len(epochs) + 1) + "|")
        notes = []
        for v in variants:
            recs = {r["epoch"]: r for r in v["records"]}
            for label, row in ROWS:
                cells = [row(recs[e]) if e in recs else "" for e in epochs]
                if label != "s" and all(c in ("-", "0", "0.00", "") for c in cells):
                    continue  # a row with nothing to say for this variant
                out.append(f"| {v['variant']} {label} | " + " | ".join(cells) + " |")
            err = plan_error(v["records"])
            if err:
                notes.append(f"- {v['variant']}, {err}")
        out.append("")
        out.extend(notes)
        if notes:
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="a compare.py result (JSON)")
    p.add_argument("--from-epoch", type=int, default=0, help="the first epoch shown")
    args = p.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {args.result}: {e}")
    if not isinstance(result, dict) or "runs" not in result:
        p.error(f"{args.result} is not a compare.py result (no 'runs')")
    sys.stdout.write(tables(result, args.from_epoch) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
