"""Command line: ``python -m store inspect PATH [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

import store
from store.inspect import format_summary, summary

EXAMPLES = """examples:
  python -m store inspect runs/fmnist/cache/b13
  python -m store inspect runs/fmnist/cache/b13 --json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m store",
        description="Inspect PreFast activation stores.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser(
        "inspect", help="summary of a store: shape, dtype, codec, bytes, completeness, provenance"
    )
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            s = store.open(args.path, partial=True)
            d = summary(s)
            print(json.dumps(d, indent=2) if args.json else format_summary(d))
            return 0 if s.complete else 1
    except store.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
