"""Command line: ``prefast train``, ``prefast verify`` and ``prefast cache list|remove`` (also
``python -m prefast``).

The ``train`` flags are generated from ``TrainConfig``'s fields (their help and group live in
the field metadata), so a config field always has its flag. Bad input of any kind is one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import select
import shlex
import signal
import sys
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from prefast import interrupt
from prefast.config import BUILTIN_MODELS, CHOICES, TrainConfig, cli_flag, switch_flag

TRAIN_EXAMPLES = """examples:
  # Fashion-MNIST (Debian package dataset-fashion-mnist), PreFast with a zarr cache
  prefast train --dataset fashion-mnist --model densenet_bc --depth 40 --growth 12 \\
      --epochs 10 --mode prefast --cache zarr --cache-dir runs/fmnist/cache \\
      --checkpoint-dir runs/fmnist --metrics runs/fmnist/metrics.jsonl

  # the same model and schedule without the cache (FreezeOut), and without freezing (full)
  prefast train --dataset fashion-mnist --depth 40 --growth 12 --epochs 10 --mode freezeout
  prefast train --dataset fashion-mnist --depth 40 --growth 12 --epochs 10 --mode full

  # synthetic CIFAR-shaped data, tiny and fast
  prefast train --dataset synthetic --num-samples 512 --model densenet_bc --depth 16 --growth 8 \\
      --epochs 3 --batch-size 32 --t0 0.3 --how-scale linear --mode prefast --cache zarr \\
      --cache-dir /tmp/c --cache-dtype float32 --views 1 --no-augment --seed 0 --device cpu

  # ResNet-18 (CIFAR stem: 3x3 conv, no max pool) on CIFAR-10; docs/models.md lists the models
  prefast train --dataset cifar10 --data-root ~/data --model resnet18 --mode prefast --cache ram

  # the paper's setting: a 2,000-image CIFAR-10 subset, t0 = 0.6
  prefast train --dataset cifar10 --data-root ~/data --subset 2000 --t0 0.6 --mode prefast --cache ram
"""

CACHE_EXAMPLES = """examples:
  # the run folders in a cache folder: size, stores, what produced them, whether a run uses them
  prefast cache list runs/fmnist/cache

  # delete run folders (prefast's, and not in use); --dry-run says what would go
  prefast cache remove runs/fmnist/cache/run-* --dry-run
"""

VERIFY_EXAMPLES = """examples:
  prefast verify runs/fmnist/cache/run-KEY/boundary-003 --checkpoint runs/fmnist/last.pt --samples 16
  prefast verify runs/fmnist/cache/run-KEY/boundary-003 --checkpoint runs/fmnist/last.pt --json
"""

# Model arguments with flags of their own (they go into TrainConfig.model_args).
MODEL_FLAGS = {
    "depth": "model depth (densenet_bc: 6n+4, default 76; wrn: 6n+4, default 16; vgg: 11/13/16/19; "
    "resnet18, resnet34: fixed, no --depth)",
    "growth": "densenet_bc growth rate (default 12)",
    "widen": "wrn widening factor (default 4)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prefast: error: ...`` and exit code 2, and no
    abbreviated long options: ``prefast train --checkpoint last.pt`` (``prefast verify``'s
    flag) was taken as ``--checkpoint-dir last.pt``, ``--eval 5`` as ``--eval-batch-size 5``;
    an unknown option is refused with the one it was likely meant for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message += _did_you_mean(self, message.split(": ", 1)[1].split())
        sys.stderr.write(f"prefast: error: {' '.join(message.split())}\n")
        sys.exit(2)


def _options(p: argparse.ArgumentParser) -> set[str]:
    """The long options of ``p`` and of every subcommand's parser below it."""
    out: set[str] = set()
    for a in p._actions:
        out.update(o for o in a.option_strings if o.startswith("--"))
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out |= _options(sp)
    return out


def _did_you_mean(p: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`` (did you mean --base-lr?)`` for the unknown options close to a known one (a typo, an
    option of another tool, the start of one: ``--eval`` for ``--eval-batch-size``), else ''.
    Unrecognized arguments are reported by the top parser, which does not know the
    subcommand: every subcommand's options are candidates, but not the option itself (``prefast
    train --checkpoint``, ``prefast verify``'s, is meant as ``--checkpoint-dir``)."""
    import difflib

    known = sorted(_options(p))
    hints = []
    for u in unknown:
        if u.startswith("--"):
            name = u.split("=", 1)[0]
            others = [k for k in known if k != name]
            close = [k for k in others if k.startswith(name)]
            if not close or len(close) > 3:
                close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
            if close:
                hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def _base_type(tp: Any) -> Any:
    """``int`` for ``int | None`` and the like."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _model_names() -> list[str]:
    """The built-in models, and those registered so far where the registry is loaded (a script
    that registers its own model, then builds the parser); the registry imports torch, so a
    plain ``prefast --help`` does not load it."""
    registry = sys.modules.get("prefast.models.registry")
    registered = registry.list_models() if registry is not None else []
    return sorted({*BUILTIN_MODELS, *registered})


def _add_train_args(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        g = groups.get(meta["group"])
        if g is None:
            g = groups[meta["group"]] = p.add_argument_group(meta["group"])
        flag = cli_flag(f.name)
        tp = _base_type(hints[f.name])
        if tp is bool:
            on = f.default is True
            g.add_argument(
                switch_flag(f.name, on),
                dest=f.name,
                action="store_false" if on else "store_true",
                help=meta["help"],
            )
            continue
        kw: dict[str, Any] = {
            "dest": f.name,
            "type": tp,
            "default": f.default,
            "help": meta["help"],
        }
        if f.name in CHOICES:
            kw["metavar"] = "{" + ",".join(map(str, CHOICES[f.name])) + "}"
        if f.name == "model":  # read when the parser is built: models registered by then show
            kw["help"] = f"one of {', '.join(_model_names())} (default %(default)s; docs/models.md)"
        g.add_argument(flag, **kw)
        if f.name == "model":
            for name, help_text in MODEL_FLAGS.items():
                g.add_argument("--" + name, type=int, default=None, help=help_text)
    # one or the other: -q -v logged warnings only, without a word on the -v
    out = p.add_argument_group("logging").add_mutually_exclusive_group()
    out.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    out.add_argument(
        "-v", "--verbose", action="store_true", help="log details (layouts, probe rates)"
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``prefast train`` arguments."""
    fields = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.metadata.get("cli", True)
    }
    model_args = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    return TrainConfig(model_args=model_args, **fields)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="prefast", description="FreezeOut training with precomputed frozen-layer outputs."
    )
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser(
        "train",
        help="train a model (full, freezeout or prefast)",
        description="Train an image classifier with full training, FreezeOut, or PreFast.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_args(t)
    v = sub.add_parser(
        "verify",
        help="check a cache store against a training checkpoint (recomputes samples)",
        description="Check every chunk's checksum, the store's fingerprint against the "
        "checkpoint's frozen weights, and recompute samples through the frozen units.",
        epilog=VERIFY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("path", help="the store (a boundary-NNN folder of a cache dir)")
    v.add_argument(
        "--checkpoint",
        required=True,
        help="a prefast train checkpoint (last.pt), or the --checkpoint-dir holding it",
    )
    v.add_argument(
        "--samples", type=int, default=16, help="samples recomputed per view (default %(default)s)"
    )
    v.add_argument(
        "--seed", type=int, default=0, help="seed of the sample choice (default %(default)s)"
    )
    v.add_argument(
        "--device",
        default="cpu",
        help="device for the recomputation: cpu, cuda or auto (default %(default)s)",
    )
    v.add_argument(
        "--data-root",
        default=None,
        help="where the training images are now (default: the checkpoint's --data-root)",
    )
    v.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative tolerance (default: the dtype's rounding x 4, float16's for a float32 store on CUDA with TF32; see prefast.cache.verify)",
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (shown only where stderr is a terminal)",
    )
    c = sub.add_parser(
        "cache",
        help="list or remove the run folders in a cache folder",
        description="A run keeps its last store in CACHE_DIR/run-KEY, one folder per set of "
        "settings: list them, and remove those no longer needed.",
        epilog=CACHE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cs = c.add_subparsers(dest="cache_command", parser_class=_Parser)
    cl = cs.add_parser(
        "list",
        help="the run folders: size, stores, what produced them, whether a run is using them",
    )
    cl.add_argument(
        "paths", nargs="+", metavar="PATH", help="a cache folder (or a run-KEY folder in one)"
    )
    cl.add_argument("--json", action="store_true", help="print the list as JSON")
    cr = cs.add_parser(
        "remove",
        help="delete run folders that prefast made and no run is using",
        description="Delete run-KEY folders with their stores. A folder prefast did not make, "
        "or one a run is using, is refused, and then nothing is removed. What prefast did not "
        "write in a run folder (a file, a link, a folder that is no store) stays, and the "
        "folder with it. A checkpoint whose store was removed still resumes: the store is "
        "rebuilt.",
    )
    cr.add_argument("paths", nargs="+", metavar="RUN_DIR", help="a run-KEY folder")
    cr.add_argument(
        "-n", "--dry-run", action="store_true", help="say what would be removed, remove nothing"
    )
    return p


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print_summary(summary: dict[str, Any]) -> None:
    err = summary.get("final_test_error")
    val = summary.get("final_val_error")
    val_text = f", val error {val:.4f}" if val is not None else ""
    print(
        f"{summary['mode']} {summary['model']['name']} on {summary['dataset']} "
        f"({_count(summary['train_samples'], 'image')}, "
        f"{_count(summary['epochs'], 'epoch')}): test error {err:.4f}{val_text}, train {summary['total_train_seconds']:.1f} s "
        f"(cache passes {summary['total_cache_build_seconds']:.1f} s), frozen {summary['frozen_units']}/{summary['num_units']} units"
    )
    path = summary.get("cache_path")
    if path and str(path).startswith("memory://"):  # gone with this process
        print(f"cache store: {path}  (in this process's memory only: gone now)")
    elif path:
        # quoted for the shell: a folder with a space broke the command copied from here
        print(f"cache store: {path}  (inspect: python -m store inspect {shlex.quote(str(path))})")
    elif summary.get("cache_tier"):
        print(
            f"cache: boundary {summary['cache_boundary']} in the {summary['cache_tier']} tier (not kept after the run)"
        )


def _bars_shown(progress: bool) -> bool:
    """Progress bars only where stderr is a terminal: in a log file (a scheduler's, a pipe to
    tee) each redraw was a carriage return and cursor-up codes around every log line."""
    return progress and sys.stderr is not None and sys.stderr.isatty()


def _train(args: argparse.Namespace, rank: int) -> int:
    cfg = config_from_args(args)  # bad values are refused before torch is imported
    if cfg.progress and not _bars_shown(cfg.progress):
        cfg = dataclasses.replace(cfg, progress=False)
    from prefast.training import train

    result = train(cfg)
    if rank != 0:
        return 0
    _print_summary(result.summary)
    if cfg.metrics:
        print(f"metrics: {cfg.metrics}")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _cache(args: argparse.Namespace) -> int:
    from prefast.cache import folders
    from prefast.errors import CacheError

    if args.cache_command == "list":
        found = folders.unique([r for path in args.paths for r in folders.list_run_folders(path)])
        if args.json:
            print(json.dumps([r.to_dict() for r in found], indent=2))
            return 0
        for r in found:
            state = [] if r.ours or r.unreadable else ["not made by prefast"]
            if r.unreadable:
                state.append(f"not readable: {r.unreadable}")
            if r.user is not None:
                who = "being removed by prefast cache remove," if r.removing else "in use by"
                state.append(f"{who} pid {r.user}" if r.user else "in use")
            when = folders.iso_time(r.modified)[:16].replace("T", " ") + " UTC"
            print(f"{r.path}  {_mb(r.nbytes)}, last written {when}"
                  + (f" ({'; '.join(state)})" if state else ""))  # fmt: skip
            for st in r.stores:
                done = {True: "complete", False: "incomplete", None: "not a readable store"}
                print(f"  {st.name}  {_mb(st.nbytes)}  {done[st.complete]}  {st.what}")
        total = sum(r.nbytes for r in found)
        print(f"{len(found)} run folder(s), {_mb(total)}")
        for path in args.paths:  # a --checkpoint-dir given: its default cache folder is inside
            if not found and Path(path, "cache").is_dir():
                print(
                    f"(a run with --checkpoint-dir {path} keeps its stores in {Path(path, 'cache')})"
                )
        return 0
    try:
        runs = folders.unique(
            [folders.check_removable(path) for path in args.paths]
        )  # all, before any goes
    except CacheError as e:
        if len(args.paths) == 1:
            raise
        raise CacheError(f"{e}; none of the {len(args.paths)} folders named was removed") from None
    for r in runs:
        # the size of what goes: what stays (a user's file) was counted as freed
        freed, keep = folders.removal_plan(r.path)
        if args.dry_run:
            kept = f"; would keep {r.path} for what prefast did not write: {', '.join(keep)}"
            print(f"would remove {r.path} ({_mb(freed)}){kept if keep else ''}")
            continue
        left = folders.remove_run_folder(r.path)
        kept = f"; kept {r.path} for what prefast did not write: {', '.join(left)}" if left else ""
        print(f"removed {r.path} ({_mb(freed)}){kept}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from prefast.cache.verify import verify_against_checkpoint
    from store.tools.inspect import open_complete

    s = open_complete(args.path)
    r = verify_against_checkpoint(
        s,
        args.checkpoint,
        samples=args.samples,
        seed=args.seed,
        device=args.device,
        rtol=args.rtol,
        progress=_bars_shown(args.progress),
        data_root=args.data_root,
    )
    print(json.dumps(r.to_dict(), indent=2) if args.json else r.format())
    for e in r.all_errors:
        print(f"prefast: {e}", file=sys.stderr)
    return 0 if r.ok else 1


def _to_devnull(fd: int) -> None:
    """Point file descriptor ``fd`` at /dev/null: writes to it, and the flush of what Python
    holds for it, then succeed (the Python docs' "Note on SIGPIPE")."""
    null = os.open(os.devnull, os.O_WRONLY)
    if null == fd:  # fd was closed: /dev/null took its number, the lowest free one
        return
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _off_a_hung_up_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that hung up: every
    write to one fails (EIO), so the progress bars' next redraw failed the run, and the stop's
    last line its exit code, where the stop should end it cleanly. A zero-byte write tells:
    it fails on such a terminal only."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError as e:
            if e.errno == errno.EIO:
                _to_devnull(fd)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (a ``| head`` that has its lines): poll
    reports POLLERR on the write end of such a pipe (a zero-byte write does not fail there)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's captured stdout)
        return False
    p = select.poll()
    p.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in p.poll(0))


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    """The first SIGTERM, SIGHUP or Ctrl-C asks the run to stop at its next safe point; a
    second one stops it at once."""
    if interrupt.requested() is not None:
        raise interrupt.StoppedAtOnce(signum)
    interrupt.request_stop(signum)
    if signum == signal.SIGHUP:
        _off_a_hung_up_terminal()
    line = "prefast: stopping at the next step (again to stop at once)"
    tqdm_std = sys.modules.get("tqdm.std")
    # a hung-up terminal (SIGHUP) fails the write: the stop must not fail with it
    with contextlib.suppress(OSError, ValueError):
        if tqdm_std is not None and _bars_shown(True):  # above the bars, not glued to one
            tqdm_std.tqdm.write(line, file=sys.stderr)
        else:
            os.write(2, (line + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "verify":  # a glob (run-*/boundary-*) that matched several stores
            from store.__main__ import extra_paths_message

            parser.error(extra_paths_message("verify", [args.path], extra))
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:  # a bare `prefast`: what it can do, not only what is missing
        parser.print_usage(sys.stderr)
        parser.error(
            "give a command: train (train a model), verify (check a cache store) or cache "
            "(list or remove run folders)"
        )
    if args.command == "cache" and args.cache_command is None:  # argparse named its dest
        cache = next(
            a.choices["cache"] for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        )
        cache.print_usage(sys.stderr)
        cache.error(
            "give a command: list (the run folders in a cache folder) or remove (delete run "
            "folders)"
        )
    world = 1
    if args.command == "train":
        from prefast.errors import ConfigError, env_int

        try:  # torchrun's; a bad value was a ValueError traceback here
            world = env_int("WORLD_SIZE", 1, minimum=1)
            env_int("RANK", 0, minimum=0)
        except ConfigError as e:
            print(f"prefast: error: {e}", file=sys.stderr)
            return 2
    if (
        args.command != "train"  # verify: Ctrl-C, SIGTERM, SIGHUP act at once, as usual
        or threading.current_thread() is not threading.main_thread()  # handlers: main thread
        or world > 1  # torchrun's agent stops its ranks itself
    ):
        return _main(args)
    interrupt.clear()
    # A signal the process was started ignoring stays ignored, as Python leaves such a SIGINT
    # alone: `prefast train ... &` in a shell script ignores Ctrl-C meant for the script
    previous = {
        s: signal.signal(s, _on_signal)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: a closed terminal
        if signal.getsignal(s) is not signal.SIG_IGN
    }
    try:
        return _main(args)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        interrupt.clear()


@contextlib.contextmanager
def _log_level(level: int, names: tuple[str, ...]) -> Iterator[None]:
    """The loggers ``names`` at ``level`` inside the block, their own levels restored after."""
    loggers = [logging.getLogger(n) for n in names]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, was in zip(loggers, previous, strict=True):
            lg.setLevel(was)


def _main(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0")) if args.command == "train" else 0  # checked: main
    quiet = getattr(args, "quiet", False) or rank != 0
    # Under torchrun only rank 0 logs progress; the others report warnings and errors.
    level = (
        logging.WARNING
        if quiet
        else logging.DEBUG
        if getattr(args, "verbose", False)
        else logging.INFO
    )
    logging.basicConfig(
        # -v is prefast's and store's details (their loggers' level is set below), not the
        # debug lines of every library they use (numcodecs registering codecs, zarr, asyncio)
        level=max(level, logging.INFO),
        format=(
            "%(levelname)s %(name)s: %(message)s"
            if rank == 0
            else f"rank {rank}: %(levelname)s %(name)s: %(message)s"
        ),
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    from prefast.errors import DistributedError, PrefastError

    def store_errors(name: str) -> tuple[type[BaseException], ...]:
        # Looked up, not imported: the store package imports torch (seconds), and where it was
        # never imported, nothing raised can be one of its errors (prefast train --t0 2).
        module = sys.modules.get("store.errors")
        return (getattr(module, name),) if module else ()

    def one_line_errors() -> tuple[type[BaseException], ...]:
        return (PrefastError, *store_errors("StoreError"))

    # basicConfig does nothing where the process has configured logging already (a notebook,
    # an earlier main() call): -q and -v set the level of prefast's and store's loggers,
    # for this call
    with _log_level(level, ("prefast", "store")):
        try:
            with logging_redirect_tqdm():  # log lines above the progress bars, not through them
                if args.command == "verify":
                    return _verify(args)
                if args.command == "cache":
                    return _cache(args)
                return _train(args, rank)
        except one_line_errors() as e:
            # One line, no trace. Exit 1 where the run failed rather than its input: a rank died or
            # timed out, or writing a store failed (a full disk); else bad input (or a store that
            # fails its checks), exit 2.
            print(f"prefast: error: {' '.join(str(e).split())}{_if_full(e, args)}", file=sys.stderr)
            written = store_errors("StoreWriteError")
            failed = isinstance(e, (DistributedError, *written)) or isinstance(e.__cause__, written)
            return 1 if failed else 2
        except (RuntimeError, MemoryError) as e:
            torch = sys.modules.get("torch")  # where torch was never imported, nothing it raised
            text = " ".join(str(e).split())
            if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
                where, less = "GPU", "--cache ram or zarr"
            elif isinstance(e, MemoryError) or "DefaultCPUAllocator: can't allocate" in text:
                where, less = "host", "--cache zarr"
            else:
                raise
            # Memory ran out (a batch, the model or a cache too large for it): torch's first
            # sentences, not its paragraph on allocator settings; exit 1.
            said = ". ".join(text.split(". ")[:2]).rstrip(".") or type(e).__name__
            print(
                f"prefast: error: out of {where} memory ({said}); a smaller --batch-size or "
                f"--eval-batch-size, or {less}, needs less",
                file=sys.stderr,
            )
            return 1
        except (OSError, FloatingPointError) as e:
            if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
                # stdout's reader has gone (`prefast cache list D | head -1`): end quietly, with
                # the shell's code for a tool that SIGPIPE ends, as python -m store does
                _to_devnull(sys.stdout.fileno())
                return 128 + signal.SIGPIPE
            # The machine or the run failed (a full disk, a diverging loss): one line, exit 1.
            print(f"prefast: error: {' '.join(str(e).split())}{_if_full(e, args)}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, interrupt.Stopped) as e:
            # Stopped from outside: one line, the shell's code for the signal (130: Ctrl-C).
            signum = e.signum if isinstance(e, interrupt.Stopped) else signal.SIGINT
            # not from prefast.training: a second signal may have cut its import of torch
            # short, and importing it again failed with a traceback (or a crash)
            from prefast.paths import CHECKPOINT_NAME

            ck = getattr(args, "checkpoint_dir", None)
            hint = (
                "; --resume continues from the last epoch's checkpoint"
                if ck and (Path(ck).expanduser() / CHECKPOINT_NAME).is_file()
                else ""
            )
            print(f"prefast: stopped by {signal.Signals(signum).name}{hint}", file=sys.stderr)
            return 128 + signum


def _if_full(e: BaseException, args: argparse.Namespace) -> str:
    """What to do where ``e`` is (or was caused by) a full disk or quota, else '': the
    errno's words alone left the user to work out that freeing space and resuming would do."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return ""
    from prefast.paths import CHECKPOINT_NAME

    ck = getattr(args, "checkpoint_dir", None)
    if ck and (Path(ck).expanduser() / CHECKPOINT_NAME).is_file():
        then = "; --resume then continues from the last epoch's checkpoint"
    else:
        then = ", then run again"
    kept = " ('prefast cache list' shows the stores runs kept)" if args.command == "train" else ""
    return f"; free space on that disk{kept}{then}"


def _exit_at_once(signum: int, frame: types.FrameType | None) -> None:
    os._exit(128 + signum)


def _open_closed_std_streams() -> None:
    """Point a closed stdout or stderr (a daemon's or a scheduler's ``>&-``) at /dev/null.
    Python then has ``sys.stdout``/``sys.stderr`` None, and the progress bars' terminal check
    and the last flush failed with an AttributeError, exit 1 (before the first epoch where
    stderr was closed); and the first file the run opened took the free descriptor, so
    whatever writes to descriptor 2 (the stop line, a library's warning) went into it."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            _to_devnull(fd)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115


def entry() -> NoReturn:
    """``main`` as a program (the ``prefast`` command, ``python -m prefast``). A stopped run
    has cleaned up when ``main`` returns, but the interpreter then spends a second or more in
    torch's exit handlers: an impatient second Ctrl-C there interrupted them with a traceback.
    It now ends the process at once with exit code 130."""
    _open_closed_std_streams()
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what main printed went to a reader that has gone (`| head`)
        _to_devnull(sys.stdout.fileno())
        code = code or 128 + signal.SIGPIPE
    except (OSError, ValueError):  # nothing more to say
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _exit_at_once)
    sys.exit(code)


if __name__ == "__main__":
    entry()
