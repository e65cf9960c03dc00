"""Command line: ``python -m store {inspect,stats,show,verify,diff} ...``.

Exit codes: 0 success; 1 a failed check (an incomplete store for ``inspect``, a failed
``verify``, stores that differ for ``diff``); 2 bad input (a missing store, a sample index out
of range), reported as one ``error: ...`` line on stderr; 130 stopped by Ctrl-C; 141 stdout
closed by its reader (``| head``), quietly. Checking a store against a training
checkpoint needs the model and moved to ``prefast verify STORE --checkpoint CK``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the store's modules (and torch, zarr) are imported in the commands, where main handles a
# Ctrl-C: --help and a usage error are answered without them
import store

EXAMPLES = """examples:
  python -m store inspect runs/fmnist/cache/run-KEY/boundary-003
  python -m store inspect runs/fmnist/cache/run-KEY/boundary-003 --json
  python -m store stats runs/fmnist/cache/run-KEY/boundary-003 --out stats.json --hist hist.png
  python -m store show runs/fmnist/cache/run-KEY/boundary-003 --sample 0 -o sample0.png
  python -m store show runs/fmnist/cache/run-KEY/boundary-003 --sample 0 --compare-views --channels 6 -o views.png
  python -m store verify runs/fmnist/cache/run-KEY/boundary-003
  python -m store diff /tmp/a-float32 /tmp/b-float16
"""


NO_PROGRESS = "no progress bars (shown only where stderr is a terminal)"
STORE_PATH = "the store: its folder (a boundary-NNN of a prefast cache folder) or fsspec URL"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m store",
        description="Inspect, check and compare PreFast activation stores.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command")

    ins = sub.add_parser(
        "inspect", help="summary of a store: shape, dtype, codec, bytes, completeness, provenance"
    )
    ins.add_argument("path", help=STORE_PATH)
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")

    st = sub.add_parser(
        "stats",
        help="per-channel mean, std, min, max and zero fraction (one streaming pass)",
    )
    st.add_argument("path", help=STORE_PATH)
    st.add_argument("--view", type=int, default=None, help="one view (default: all views)")
    st.add_argument("--out", default=None, help="also write the statistics as JSON here")
    st.add_argument(
        "--hist",
        default=None,
        help="write a PNG: value histogram and per-channel mean/std/range (.png is added to a "
        "name without a suffix; a folder is refused)",
    )
    st.add_argument(
        "--bins", type=int, default=100, help="histogram bins, 1 to 10000 (default %(default)s)"
    )
    st.add_argument("--no-progress", dest="progress", action="store_false", help=NO_PROGRESS)

    sh = sub.add_parser("show", help="a PNG grid of one sample's activation maps")
    sh.add_argument("path", help=STORE_PATH)
    sh.add_argument("--sample", type=int, required=True, help="sample index")
    sh.add_argument("--view", type=int, default=0, help="view to draw (default 0)")
    sh.add_argument(
        "--channels",
        type=int,
        default=None,
        help="draw the first N channels (default: up to 64, or 8 with --compare-views)",
    )
    sh.add_argument("--compare-views", action="store_true", help="rows = views, columns = channels")
    sh.add_argument(
        "--dpi",
        type=int,
        default=100,
        help="resolution of the PNG, dots per inch (default %(default)s)",
    )
    sh.add_argument(
        "-o",
        "--out",
        required=True,
        help="PNG file to write (.png is added to a name without a suffix; a folder is refused)",
    )

    ve = sub.add_parser(
        "verify",
        help="CRC-check every chunk (against a training checkpoint: prefast verify)",
    )
    ve.add_argument("path", help=STORE_PATH)
    ve.add_argument("--json", action="store_true", help="print the report as JSON")
    ve.add_argument("--no-progress", dest="progress", action="store_false", help=NO_PROGRESS)

    di = sub.add_parser("diff", help="per-channel differences of store B against store A")
    di.add_argument("a", metavar="A", help="the store compared against (a folder or URL)")
    di.add_argument("b", metavar="B", help="the store compared with A")
    di.add_argument("--json", action="store_true", help="print the report as JSON")
    di.add_argument("--no-progress", dest="progress", action="store_false", help=NO_PROGRESS)
    return p


def _json(d: object) -> str:
    """Strict JSON (a float that is not finite, in a meta another program wrote, as null)."""
    from store.tools.inspect import strict_json

    return json.dumps(strict_json(d), indent=2, allow_nan=False)


def _inspect(args: argparse.Namespace) -> int:
    from store.tools.inspect import format_summary, summary

    s = store.open(args.path, partial=True)
    d = summary(s)
    print(_json(d) if args.json else format_summary(d))
    return 0 if s.complete else 1


def _refuse_folder(path: str, flag: str, example: str) -> None:
    """An output file given as a folder (existing, or ending in a separator) is refused before
    any work, with ``example`` as a file name in it; so is a file in a folder that does not
    exist, or that this user may not write (found at the end, it would waste the pass over the
    store)."""
    if not path:  # --out "$UNSET": no file at all
        raise store.StoreInputError(f"{flag}: an empty file name; name the file, e.g. {example}")
    if path.endswith(("/", os.sep)) or Path(path).is_dir():
        raise store.StoreInputError(
            f"{flag} {path}: a folder; name the file, e.g. {flag} {Path(path) / example}"
        )
    folder = Path(path).parent
    if not folder.is_dir():
        raise store.StoreInputError(f"{flag} {path}: {folder} is not an existing folder")
    target = Path(path) if Path(path).exists() else folder
    if not os.access(target, os.W_OK):
        why = "permission denied"
        with contextlib.suppress(OSError):
            if os.statvfs(target).f_flag & os.ST_RDONLY:
                why = "a read-only file system; name a file elsewhere"
        raise store.StoreInputError(f"{flag} {path}: {target} may not be written ({why})")


def _refuse_inside(path: str, store_path: str, flag: str) -> None:
    """An output file inside the store read, or inside any other activation store, is refused
    before any work: ``--out S/zarr.json`` replaced the store's record, and any other file
    there is taken for part of the store."""
    from store import _zarr
    from store.location import is_activation_store

    root = _zarr.as_local(store_path)
    target = Path(path).resolve()
    if root is not None and target.is_relative_to(root.resolve()):
        raise store.StoreInputError(
            f"{flag} {path}: inside the store {store_path}, whose files it would overwrite or "
            "join; name a file elsewhere"
        )
    for folder in target.parents:
        if is_activation_store(folder):
            raise store.StoreInputError(
                f"{flag} {path}: inside the store {folder}, whose files it would overwrite or "
                "join; name a file elsewhere"
            )


def _figure_path(path: str, flag: str, example: str) -> str:
    """The file a figure goes to, checked before any work: ``path``, with ``.png`` added to a
    name without a suffix (what savefig would do; made explicit so that 'wrote' names the
    file). A folder is refused rather than given a picture whose name the user never chose."""
    _refuse_folder(path, flag, example)
    p = Path(path)
    if p.suffix:
        return path
    out = str(p.with_name(p.name + ".png"))
    _refuse_folder(out, flag, example)  # NAME.png may be a folder too
    return out


MAX_PIXELS = 2**28  # of a figure: 1 GiB as RGBA, what Agg allocates before it draws


def _save(fig: Any, path: str, flag: str, **kw: Any) -> None:
    dpi = kw.get("dpi", fig.dpi)
    w, h = fig.get_size_inches()
    if w * dpi * h * dpi > MAX_PIXELS:
        # refused before rendering: Agg would allocate it whole (minutes and GBs, or a
        # MemoryError traceback)
        most = int((MAX_PIXELS / (w * h)) ** 0.5)
        raise store.StoreInputError(
            f"--dpi {dpi}: a {w * dpi:.0f} x {h * dpi:.0f} pixel picture is too large; "
            f"this one allows at most --dpi {most}"
        )
    try:
        with _writing(path):
            fig.savefig(path, **kw)
    except ValueError as e:  # a file type matplotlib cannot write
        raise store.StoreInputError(f"{flag} {path}: {e}") from None


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """An output file written in the block: a write that fails (a full disk) is an OSError
    naming the file, which a failed write's own does not ('[Errno 28] No space left on
    device'), and the half-written file goes, so nothing reads it as whole. A file that
    could not be opened is left as it was, and so is a link or anything that is no file."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:  # not opened: nothing written
            raise
        if os.path.isfile(path) and not os.path.islink(path):  # not /dev/stdout, a link, a pipe
            with contextlib.suppress(OSError):
                os.unlink(path)
        from store.errors import naming

        raise naming(e, path) from e


def _need_matplotlib(what: str) -> None:
    """Checked before any work: without matplotlib a command fails at the start, not after
    a pass over the store."""
    from store.tools.viz import require_matplotlib

    try:
        require_matplotlib(what)
    except ImportError as e:
        raise store.StoreInputError(str(e)) from None


def _check_format(path: str, flag: str) -> None:
    """A file type matplotlib cannot write (``-o x.txt``) is refused before any work, in
    savefig's words, rather than after the pass over the store."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix[1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise store.StoreInputError(
            f"{flag} {path}: Format '{fmt}' is not supported (supported formats: "
            f"{', '.join(sorted(supported))})"
        )


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars only where stderr is a terminal: in a log file or a pipe each redraw is
    a carriage return around the lines that matter (as ``prefast`` does)."""
    return bool(args.progress) and sys.stderr.isatty()


def _finite_range(st: store.ChannelStats) -> tuple[float, float]:
    """The histogram's range: the finite values' min..max (0..1 when there are none)."""
    o = st.overall()
    lo, hi = o["min"], o["max"]
    return (lo, hi) if lo == lo and hi == hi else (0.0, 1.0)  # NaN: no finite value


# one bar each in a panel about 400 pixels wide: 10000 take half a minute to draw, 10**8 never
# finished
MAX_BINS = 10_000


def _stats(args: argparse.Namespace) -> int:
    from store.tools.inspect import open_complete
    from store.tools.stats import format_stats, histogram, plot_stats

    if not 1 <= args.bins <= MAX_BINS:
        raise store.StoreInputError(f"--bins must be in [1, {MAX_BINS}], got {args.bins}")
    # an empty name is refused, not taken for no file
    hist = _figure_path(args.hist, "--hist", "hist.png") if args.hist is not None else None
    if hist:
        _need_matplotlib("--hist")
        _check_format(hist, "--hist")
    if args.out is not None:
        _refuse_folder(args.out, "--out", "stats.json")
    if args.out and hist and Path(args.out).resolve() == Path(hist).resolve():
        # the picture would replace the JSON just written
        raise store.StoreInputError(f"--out and --hist name the same file {hist}; name two")
    for out, flag in ((args.out, "--out"), (hist, "--hist")):
        if out:
            _refuse_inside(out, args.path, flag)
    s = open_complete(args.path)
    st = store.stats(s, args.view, progress=_bars(args))
    print(format_stats(st))
    if args.out:
        with _writing(args.out):
            Path(args.out).write_text(_json(st.to_dict()) + "\n")
        print(f"wrote {args.out}")
    if hist:
        counts, edges = histogram(s, args.bins, _finite_range(st), args.view, _bars(args))
        unit = s.meta.get("boundary_unit")
        title = f"{Path(s.path).name}" + (f" (after {unit})" if unit else "")
        title += f", views {list(st.views)}"
        _save(plot_stats(st, counts, edges, title), hist, "--hist")
        print(f"wrote {hist}")
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.dpi < 1:
        raise store.StoreInputError(f"--dpi must be >= 1, got {args.dpi}")
    out = _figure_path(args.out, "-o", f"sample{args.sample}.png")
    _need_matplotlib("show")
    _check_format(out, "-o")
    _refuse_inside(out, args.path, "-o")
    from store.tools.inspect import open_complete

    s = open_complete(args.path)
    fig = store.show(s, args.sample, args.view, args.channels, args.compare_views)
    _save(fig, out, "-o", dpi=args.dpi)
    print(f"wrote {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    # an incomplete store is verified too: its chunks never written are among the failures
    try:
        s = store.open(args.path, partial=True)
    except store.StoreCorruptError as damaged:
        # its record fails its checksum, or a checksum table is damaged: the check failed
        # (exit 1, as for a damaged chunk), where exit 2 said the input was bad
        print(f"error: {' '.join(str(damaged).split())}", file=sys.stderr)
        return 1
    r = store.verify(s, progress=_bars(args))
    print(_json(r.to_dict()) if args.json else r.format())
    for e in r.errors:
        print(f"error: {e}", file=sys.stderr)
    return 0 if r.ok else 1


def _diff(args: argparse.Namespace) -> int:
    from store.tools.inspect import open_complete

    r = store.diff(open_complete(args.a), open_complete(args.b), progress=_bars(args))
    print(_json(r.to_dict()) if args.json else r.format())
    return 0 if r.identical else 1


CHECKPOINT_MOVED = (
    "checking a store against a checkpoint moved to 'prefast verify STORE --checkpoint CK'"
)
COMMANDS = {"inspect": _inspect, "stats": _stats, "show": _show, "verify": _verify, "diff": _diff}


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null so that the interpreter's flush of what is
    left in sys.stdout at exit does not fail again (the recipe of the Python docs, signal
    module, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's captured stdout)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def extra_paths_message(command: str | None, taken: list[str | None], extra: list[str]) -> str:
    """The error for arguments the parser did not take: where they are all positional after a
    command's store path(s), a shell glob (``run-*/boundary-*``) matched several stores, and
    argparse's own ``unrecognized arguments: B`` named only the stores after the first."""
    if command is None or any(a.startswith("-") for a in extra) or None in taken:
        return f"unrecognized arguments: {' '.join(extra)}"
    paths = [*(str(p) for p in taken), *extra]
    want = "two stores" if len(taken) == 2 else "one store"
    return (
        f"{command} reads {want}, got {len(paths)} paths: {', '.join(paths)} (a glob such as "
        f"run-*/boundary-* that matched several stores?); name {want}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"] and any(
        a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv
    ):
        print(f"error: {CHECKPOINT_MOVED}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(
            extra_paths_message(
                args.command,
                [args.a, args.b] if args.command == "diff" else [getattr(args, "path", None)],
                extra,
            )
        )
    if args.command is None:  # a bare `python -m store`: what it can do, not a dest's name
        parser.error(  # prints the usage first
            "give a command: inspect (what is in a store), stats (per-channel statistics), show "
            "(pictures of a sample), verify (every chunk's checksum) or diff (two stores)"
        )
    try:
        rc = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return rc
    except BrokenPipeError:
        # stdout's reader has gone (`python -m store stats S | head -5`): end quietly. 141 is
        # what the shell reports for a tool that SIGPIPE ends (cat, grep, seq), 128 + SIGPIPE,
        # as 130 is for Ctrl-C: `set -o pipefail` scripts that tolerate a closed pipe expect it,
        # and 0 would claim an output that nobody read was delivered.
        _stdout_to_devnull()
        return 128 + 13  # SIGPIPE (no signal.SIGPIPE on Windows)
    except KeyboardInterrupt:
        print("stopped by SIGINT", file=sys.stderr)
        return 128 + 2  # SIGINT
    except (store.StoreError, OSError) as e:
        # OSError: an output file that cannot be written
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
