"""Verifying a store: every written chunk is read afresh and compared with the CRC-32C recorded
when it was written (``store.layout.chunk_crc``), so are the labels of every labelled chunk,
and chunks never written are listed. The store's attributes were already checked by
``store.open`` (their checksum and their agreement with the arrays).

Checking a store against the training checkpoint that produced it (fingerprint and
recomputation through the frozen prefix) needs the model, so it lives in ``prefast``:
``prefast verify STORE --checkpoint CK``.

While a chunk's values are in memory, ``verify`` also counts those that are not finite (inf,
NaN; the writer stores them as given). It does not fail the store for them: they are what the
model produced. The test costs two integer max-reductions per chunk (a value is +inf or +NaN
when its bits, read as a signed integer, are at least the exponent mask; -inf or -NaN when,
read as an unsigned one, they are at least sign bit | exponent mask); only a chunk that holds
some is counted value by value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from store import _zarr
from store.errors import StoreCorruptError, StoreInputError, check_bool
from store.layout import ACTIVATIONS, LABELS, count_nonfinite
from store.reader import ActivationStore, check_opened


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk that could not be read or whose bytes differ from what was written."""

    view: int
    chunk: int
    samples: tuple[int, int]  # [start, stop)
    file: str
    reason: str
    unreadable: bool = False  # the file could not be read (permissions), not damaged


@dataclass
class VerifyReport:
    """What ``verify`` found; ``ok`` is True when nothing failed."""

    path: str
    dtype: str
    chunks_read: int = 0
    bad_chunks: list[ChunkProblem] = field(default_factory=list)
    bad_label_chunks: list[ChunkProblem] = field(default_factory=list)
    missing: list[tuple[int, int, int]] = field(default_factory=list)  # (view, start, stop)
    labels_unreadable: str | None = None  # why the labels could not be read at all
    errors: list[str] = field(default_factory=list)  # one line per failure
    # values that are not finite in the chunks that passed their check (not a failure)
    inf: int = 0
    nan: int = 0
    nonfinite_chunks: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def values_line(self) -> str | None:
        """What the chunks hold that is not finite; None where every value read is finite."""
        if not (self.inf or self.nan):
            return None
        return (
            f"{self.inf + self.nan} not finite ({self.inf} inf, {self.nan} NaN) in "
            f"{self.nonfinite_chunks} chunk(s); 'python -m store stats' counts them per channel"
        )

    def format(self) -> str:
        lines = [f"store       {self.path} ({self.dtype})"]
        if self.bad_chunks:
            lines.append(
                f"chunks      {self.chunks_read} read, {len(self.bad_chunks)} BAD:"
                + "".join(f"\n              {p.file}: {p.reason}" for p in self.bad_chunks[:20])
                + (
                    f"\n              ... {len(self.bad_chunks) - 20} more"
                    if len(self.bad_chunks) > 20
                    else ""
                )
            )
        else:
            lines.append(f"chunks      {self.chunks_read} read, every checksum matches")
        if self.labels_unreadable is not None:
            lines.append(f"labels      cannot be read: {self.labels_unreadable}")
        elif self.bad_label_chunks:
            lines.append(
                f"labels      {len(self.bad_label_chunks)} chunk(s) BAD:"
                + "".join(
                    f"\n              {p.file}: {p.reason}" for p in self.bad_label_chunks[:20]
                )
                + (
                    f"\n              ... {len(self.bad_label_chunks) - 20} more"
                    if len(self.bad_label_chunks) > 20
                    else ""
                )
            )
        else:
            lines.append("labels      every checksum matches")
        if self.missing:
            lines.append(f"missing     (view, start, stop) {_first(self.missing)}")
        if self.values_line() is not None:
            lines.append(f"values      {self.values_line()}")
        lines.append("result      " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def _first(ranges: list[tuple[int, int, int]], most: int = 6) -> str:
    """The first ``most`` ranges, and how many more there are (the list was cut silently)."""
    more = len(ranges) - most
    return f"{ranges[:most]}" + (f" and {more} more" if more > 0 else "")


def check_chunks(
    s: ActivationStore,
    report: VerifyReport,
    progress: bool = False,
    between: Callable[[], None] | None = None,
) -> None:
    """Decode every written chunk and compare it with its recorded CRC; count the values that
    are not finite in those that pass. ``between`` is called before each chunk (it may raise
    to stop the check)."""
    from tqdm.auto import tqdm

    report.missing = s.missing_ranges()
    if report.missing:
        report.errors.append(
            f"{s.path}: chunks were never written, (view, start, stop) {_first(report.missing)}"
        )
    total = s.views * s.num_chunks
    with tqdm(
        total=total, desc="verify chunks", unit="chunk", disable=not progress, leave=False
    ) as bar:
        for v in range(s.views):
            for c in range(s.num_chunks):
                if between is not None:
                    between()
                bar.update(1)
                if not s.chunk_written(v, c):
                    continue
                name = s.chunk_path(ACTIVATIONS, c, v)
                report.chunks_read += 1
                unreadable = None
                try:
                    good, data = s._verify_chunk(v, c)
                    reason = "checksum differs from the one recorded when it was written"
                except StoreCorruptError as e:
                    # a compressed chunk's read error comes wrapped, as one it cannot decode
                    good, reason = False, str(e).removeprefix(name + ": ")
                    if isinstance(e.__cause__, OSError):
                        unreadable = e.__cause__
                except OSError as e:  # a raw chunk's file
                    good, unreadable = False, e
                if unreadable is not None:
                    reason = f"cannot be read: {_why_unreadable(unreadable)}"
                if good:
                    inf, nan = count_nonfinite(data, s.dtype_name)
                    report.inf += inf
                    report.nan += nan
                    report.nonfinite_chunks += bool(inf or nan)
                else:
                    report.bad_chunks.append(
                        ChunkProblem(
                            v, c, s.layout.chunk_range(c), name, reason, unreadable is not None
                        )
                    )
    for p in report.bad_chunks:
        report.errors.append(
            f"{'unreadable' if p.unreadable else 'corrupt'} chunk {p.file} (view {p.view}, samples {p.samples[0]}..{p.samples[1] - 1}): {p.reason}"
        )


def _why_unreadable(e: OSError) -> str:
    """Why a chunk's file could not be read, with what to check where it is its permissions."""
    return f"{e.strerror or e}" + (
        "; check the file's permissions" if isinstance(e, PermissionError) else ""
    )


def check_labels(s: ActivationStore, report: VerifyReport) -> None:
    """Read the labels afresh and compare every labelled chunk with its recorded CRC."""
    try:
        bad = s.verify_labels()
    except StoreCorruptError as e:
        report.labels_unreadable = str(e)
        report.errors.append(str(e))
        return
    except OSError as e:  # a label chunk's file the user may not read
        why = _why_unreadable(e)
        report.labels_unreadable = f"{e.filename}: {why}"
        report.errors.append(f"{e.filename}: cannot be read: {why}")
        return
    local = _zarr.as_local(s.path) is not None
    for c in bad:
        file = s.chunk_path(LABELS, c)
        p = ChunkProblem(
            0,
            c,
            s.layout.chunk_range(c),
            file,
            # a missing file reads as zeros, which fail the checksum too: say which it is
            "labels are recorded as written but their file is missing"
            if local and not os.path.exists(file)
            else "labels' checksum differs from the one recorded when they were written",
        )
        report.bad_label_chunks.append(p)
        report.errors.append(
            f"corrupt labels {p.file} (samples {p.samples[0]}..{p.samples[1] - 1}): {p.reason}"
        )


def verify(
    s: ActivationStore, progress: bool = False, between: Callable[[], None] | None = None
) -> VerifyReport:
    """Read and CRC-check every chunk and the labels of ``s``. Failures (corrupt or missing
    chunks, corrupt labels) are collected in ``report.errors``; ``report.ok`` is True when
    there are none. ``between`` is called before each chunk is read: an exception it raises
    (a stop asked for) ends the check there, so a check of a large store can be stopped."""
    check_opened(s, "store.verify")
    progress = check_bool("progress", progress)
    if between is not None and not callable(between):
        raise StoreInputError(f"between must be callable or None, got {type(between).__name__}")
    report = VerifyReport(path=s.path, dtype=s.dtype_name)
    check_chunks(s, report, progress, between)
    check_labels(s, report)
    return report


__all__ = ["ChunkProblem", "VerifyReport", "verify"]
