"""The run's structured outputs: one JSON record per epoch and a summary in a JSONL file,
with the run's config (defaults filled in) saved beside it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from store.errors import naming
from store.tools.inspect import strict_json


def config_path(metrics: str | os.PathLike[str]) -> Path:
    """Where the config of a run with metrics file ``metrics`` is saved: ``STEM.config.json``
    beside it."""
    p = Path(metrics)
    return p.parent / (p.stem + ".config.json")


class MetricsSink:
    """Writes JSON lines to ``path`` (``None``: discards them), with ``STEM.config.json``
    beside it holding the config. The file starts with ``records`` (a resumed run's epochs,
    as its checkpoint holds them), so a resume after a crash never repeats an epoch's line.

    A write that fails (a full disk) raises an ``OSError`` naming the file and leaves no part
    of its line: each line goes to the file unbuffered, so nothing is left over for ``close``
    to fail on again. The file is not emptied before a resumed run's records are written:
    they are written over the same lines the file holds, then what follows them is cut, so a
    resume on a full disk leaves the file as it was."""

    def __init__(
        self, path: str | None, config: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        self.path = Path(path) if path else None
        self._f: IO[bytes] | None = None
        self._end = 0  # the length of the lines written
        self._keep = 0  # what a failed write leaves of the file: its lines until all are written
        self._regular = False
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config_file = config_path(self.path)
        try:
            _write_whole(config_file, json.dumps(config, indent=2) + "\n")
        except OSError as e:
            raise naming(e, config_file) from e
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o666)
        except OSError as e:
            raise naming(e, self.path) from e
        self._f = os.fdopen(fd, "wb", buffering=0)
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)  # not a pipe or a terminal
        self._keep = os.fstat(fd).st_size if self._regular else 0
        try:
            for r in records:
                self.write(r)
            try:
                self._cut(self._end)  # the lines of epochs after the checkpoint, a failure's
            except OSError as e:
                raise naming(e, self.path) from e
        except BaseException:
            self.close()
            raise
        self._keep = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        line = (json.dumps(strict_json(record), allow_nan=False) + "\n").encode()
        try:
            rest = memoryview(line)
            while rest:
                rest = rest[self._f.write(rest) :]
        except OSError as e:
            with contextlib.suppress(OSError):  # no half line for a reader to choke on
                self._cut(max(self._end, self._keep))
            raise naming(e, self.path) from e
        self._end += len(line)

    def _cut(self, size: int) -> None:
        """End the file at ``size`` bytes, and write on from there."""
        if self._f is not None and self._regular:
            self._f.truncate(size)
            self._f.seek(size)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to the file ``path`` whole or not at all: to a fresh name beside it,
    renamed over it, so a failed write (a resume on a full disk) leaves the file as it was.
    A link, or anything but a file, there is written through as before."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["MetricsSink", "config_path"]
