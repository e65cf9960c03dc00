"""Checking output paths at start-up, so a run never fails at its first checkpoint, metrics
line or cache write because a folder is a file, missing and uncreatable, or read-only."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from prefast.errors import ConfigError

# the checkpoint's file in --checkpoint-dir (here, not beside the checkpoint code, which
# imports torch: the CLI's stop line names it where a stop cut torch's import short)
CHECKPOINT_NAME = "last.pt"


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable_dir(
    path: str | os.PathLike[str], flag: str, made: list[Path] | None = None
) -> Path:
    """``path`` as a folder that exists (it is created if missing) and takes new files. The
    folders this creates are added to ``made``, for ``remove_made_dirs`` on a refused start."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag}: {p} exists and is not a directory")
    missing = []
    q = p.absolute()
    while not q.exists() and not q.is_symlink() and q != q.parent:
        missing.append(q)
        q = q.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot create {p}: {_reason(e)}") from None
    if made is not None:
        made.extend(missing)
    try:
        fd, name = tempfile.mkstemp(prefix=".prefast-write-test-", dir=p)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write into {p}: {_reason(e)}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return p


def check_writable_file(
    path: str | os.PathLike[str], flag: str, made: list[Path] | None = None
) -> Path:
    """``path`` as a file that can be written: not a folder, in a writable folder (created if
    missing, and added to ``made`` as ``check_writable_dir`` does), and writable itself when
    it exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag}: {p} is a directory; give a file name")
    # a link is written through: its target's folder must take the file (a link whose target's
    # folder was gone passed, and the run failed at its first metrics line)
    real = Path(os.path.realpath(p))
    if real.is_symlink():
        raise ConfigError(f"{flag}: {p} is a symbolic link that leads back to itself")
    check_writable_dir(real.parent, flag, made)
    if real.exists():
        try:
            with open(real, "a"):
                pass
        except OSError as e:
            raise ConfigError(f"{flag}: cannot write {p}: {_reason(e)}") from None
    return p


def remove_made_dirs(made: list[Path]) -> None:
    """Remove the folders in ``made`` (``check_writable_dir``'s) that are still empty, the
    deepest first: a refused start leaves no empty --checkpoint-dir or --cache-dir behind.
    A folder holding anything, put there by the run or by anyone else, is left as it is."""
    for d in sorted(set(made), key=lambda d: len(d.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only ever removes an empty folder


__all__ = ["CHECKPOINT_NAME", "check_writable_dir", "check_writable_file", "remove_made_dirs"]
