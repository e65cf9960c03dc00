"""Temporary cache folders (a run with neither ``--cache-dir`` nor ``--checkpoint-dir``).

A run removes its temporary folder when it ends, fails or is stopped. A process that is
killed (SIGKILL, the kernel's out-of-memory killer, a torchrun rank stopped by its agent)
cannot, and its folder may hold gigabytes of activations under a random name no later run
reuses. So each folder carries an owner record (host, boot, process id namespace, process id
and start time), and a run that may need a temporary folder first removes those whose owner
is gone: folders named ``prefast-cache-*`` directly in the temporary directory, owned by this
user, holding a record of this host, boot and process id namespace whose process no longer
runs (or is another process that took over its id), or a record of this host written before
this machine last booted (no process survives a reboot). A folder without a readable record,
or written in another process id namespace (a container sharing this /tmp and host name: its
ids mean other processes here), or under another boot since this one started (another
machine of the same name sharing the folder), is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from store.errors import naming

log = logging.getLogger(__name__)

PREFIX = "prefast-cache-"
OWNER_NAME = ".prefast-owner"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id")


def _boot_time() -> float | None:
    """When this machine booted, in seconds since the epoch (Linux), or None."""
    for line in (_read("/proc/stat") or "").splitlines():
        if line.startswith("btime "):
            with contextlib.suppress(ValueError):
                return float(line.split()[1])
    return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5), after pid and comm


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record() -> dict[str, Any]:
    """What identifies this process to a later run on the same machine."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "pid": pid,
        "start": _start_time(pid),
    }


def owner_gone(rec: dict[str, Any], written: float | None = None) -> bool:
    """Whether the process that wrote ``rec`` (at ``written``, seconds since the epoch, where
    known) has certainly ended (False when in doubt)."""
    if rec.get("host") != socket.gethostname():
        return False  # a folder another machine shares with this one
    pid = rec.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    boot = _boot_id()
    if boot is None or rec.get("boot") != boot:
        booted = _boot_time()
        # written before this boot: its process ended with the boot it ran in. Else another
        # boot or unknown: ids may mean anything (a 60 s margin for clocks set at boot)
        return (
            boot is not None
            and booted is not None
            and written is not None
            and written < booted - 60
        )
    ns = _pid_namespace()
    if ns is None or rec.get("pidns") != ns:
        return False  # another container's ids: not what this one sees
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive (another user's process), or unknown
    start = _start_time(pid)
    return isinstance(rec.get("start"), str) and start is not None and start != rec["start"]


def make_temp_dir() -> Path:
    """A new temporary cache folder with this process's owner record (``sweep`` first, at a
    run's start, removes those of owners that are gone)."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    tmp = path / (OWNER_NAME + ".tmp")
    try:
        tmp.write_text(json.dumps(owner_record()))
        tmp.replace(path / OWNER_NAME)  # whole or absent
    except BaseException as e:
        # without its record no sweep would ever remove the folder (a full disk): it goes now
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
            raise naming(e, tmp) from e
        raise
    return path


def remove(path: Path | str) -> None:
    """Remove a temporary cache folder, its owner record last: a removal cut short (a second
    Ctrl-C, a kill) leaves the record, so a later ``sweep`` still knows the folder for ours.
    Errors are ignored (what cannot be removed stays, and the record with it: a later
    ``sweep`` tries again)."""
    path = Path(path)
    try:
        children = list(path.iterdir())
    except OSError:
        return
    for child in children:
        if child.name == OWNER_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
    with contextlib.suppress(OSError):
        if any(p.name != OWNER_NAME for p in path.iterdir()):
            return  # without its record the folder was nobody's: never swept, kept for good
        (path / OWNER_NAME).unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


def sweep(root: Path | str | None = None) -> list[Path]:
    """Remove the temporary cache folders in ``root`` (default: the temporary directory) whose
    owner is gone; returns them."""
    base = Path(root if root is not None else tempfile.gettempdir())
    removed = []
    try:
        candidates = sorted(base.glob(PREFIX + "*"))
    except OSError:
        return []
    for d in candidates:
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            record = d / OWNER_NAME
            rec = json.loads(record.read_text())
            written = record.stat().st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and owner_gone(rec, written):
            remove(d)
            if d.exists():  # the removal failed (files not ours to remove)
                continue
            removed.append(d)
            log.warning(
                "removed %s, the temporary cache folder of a run that ended without removing "
                "it (process %s)",
                d,
                rec.get("pid"),
            )
    return removed


__all__ = [
    "OWNER_NAME",
    "PREFIX",
    "make_temp_dir",
    "owner_gone",
    "owner_record",
    "remove",
    "sweep",
]
