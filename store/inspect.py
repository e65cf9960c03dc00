"""Summaries of a store for people: what is cached, how big, whether it is whole."""

from __future__ import annotations

import os
from typing import Any

from store.reader import ActivationStore


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def summary(s: ActivationStore) -> dict[str, Any]:
    """A JSON-able description of a store."""
    lay = s.layout
    stored = s.nbytes_stored()
    return {
        "path": os.fspath(s.path),
        "format_version": s.info.format_version,
        "shape": [lay.views, lay.num_samples, *lay.sample_shape],
        "views": lay.views,
        "samples": lay.num_samples,
        "sample_shape": list(lay.sample_shape),
        "dtype": lay.dtype,
        "codec": lay.codec or "none",
        "codec_level": lay.codec_level,
        "chunk_samples": lay.chunk_samples,
        "chunks_per_view": lay.num_chunks,
        "chunks": lay.views * lay.num_chunks,
        "bytes_per_sample": lay.sample_bytes,
        "bytes_raw": lay.raw_bytes,
        "bytes_on_disk": stored,
        "ratio": (lay.raw_bytes / stored) if stored > 0 else None,
        "complete": s.complete,
        "missing": [list(r) for r in s.missing_ranges()],
        "memory_mapped": s.memory_mapped,
        "created": s.info.created,
        "completed": s.info.completed,
        "meta": s.meta,
    }


def format_summary(d: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    ratio = f"{d['ratio']:.2f}x" if d["ratio"] else "n/a"
    rows = [
        ("path", d["path"]),
        ("format version", d["format_version"]),
        ("shape", "(views, samples, *sample) = " + str(tuple(d["shape"]))),
        ("dtype", d["dtype"]),
        (
            "codec",
            d["codec"] + (f" (level {d['codec_level']})" if d["codec_level"] is not None else ""),
        ),
        (
            "chunking",
            f"{d['chunk_samples']} samples/chunk, {d['chunks_per_view']} chunks/view, {d['chunks']} total",
        ),
        ("bytes/sample", _human(d["bytes_per_sample"])),
        ("bytes raw", _human(d["bytes_raw"])),
        (
            "bytes on disk",
            _human(d["bytes_on_disk"]) if d["bytes_on_disk"] >= 0 else "n/a (remote)",
        ),
        ("ratio", ratio),
        ("reader", "memory-mapped" if d["memory_mapped"] else "chunk streaming"),
        (
            "complete",
            "yes" if d["complete"] else f"NO - missing (view, start, stop): {d['missing'][:6]}",
        ),
        ("created", d["created"] + (f", completed {d['completed']}" if d["completed"] else "")),
    ]
    for k, v in sorted(d["meta"].items()):
        rows.append((f"meta.{k}", v if not isinstance(v, dict | list) else _compact(v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _compact(v: Any) -> str:
    import json

    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 100 else s[:97] + "..."


__all__ = ["format_summary", "summary"]
