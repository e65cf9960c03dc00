"""Summaries of a store for people: what is cached, how big, whether it is whole."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
from typing import Any

from store import _zarr
from store.errors import StoreIncompleteError
from store.layout import ACTIVATIONS
from store.reader import ActivationStore, check_opened
from store.reader import open as open_store


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _written_chunk_bytes(s: ActivationStore) -> tuple[int, int]:
    """(uncompressed bytes, bytes on disk; -1 for a remote store) of the activation chunks
    written. An incomplete store may hold files of chunks not written yet (a raw store takes
    rows into its chunk files, which may have been created ahead): only the written ones
    count."""
    lay = s.layout
    root = _zarr.as_local(s.path)
    rest = (0,) * len(lay.sample_shape)
    raw = disk = 0
    for v in range(lay.views):
        for c in range(lay.num_chunks):
            if not s.chunk_written(v, c):
                continue
            c0, c1 = lay.chunk_range(c)
            raw += (c1 - c0) * lay.sample_bytes
            if root is not None:
                with contextlib.suppress(OSError):  # a missing file: verify reports it
                    disk += _zarr.chunk_file(root, ACTIVATIONS, (v, c, *rest)).stat().st_size
    return raw, disk if root is not None else -1


def summary(s: ActivationStore) -> dict[str, Any]:
    """A JSON-able description of a store."""
    check_opened(s, "store.summary")
    lay = s.layout
    stored = s.nbytes_stored()
    raw_written, stored_written = _written_chunk_bytes(s)
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
        # compression of the activations: uncompressed / stored bytes of the chunks written
        "ratio": (raw_written / stored_written) if stored_written > 0 and raw_written > 0 else None,
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
        ("views", d["views"]),
        ("samples", f"{d['samples']} of shape {tuple(d['sample_shape'])}"),
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
    rows.extend(provenance_rows(d["meta"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def describe_model(m: dict[str, Any]) -> str:
    """``meta.model`` in one line: ``densenet_bc (depth=16, ...; num_classes=10, ...)``."""
    common = ("num_classes", "in_channels", "image_size")
    args = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name" and k not in common)
    io = ", ".join(f"{k}={m[k]}" for k in common if k in m)
    return f"{m.get('name', '?')} ({args}{'; ' if args and io else ''}{io})"


def describe_dataset(d: dict[str, Any]) -> str:
    """``meta.dataset`` in one line: the dataset, split, samples and augmentation."""
    parts = [str(d.get("dataset", "?"))]
    if d.get("synthetic_shape"):
        parts[0] += f" ({d['synthetic_shape']}-shaped)"
    parts.append(f"{d.get('split', 'train')} split")
    if d.get("num_samples") is not None:
        parts.append(f"{d['num_samples']} samples")
    if d.get("subset"):
        parts.append(f"seeded subset of {d['subset']}")
    if d.get("val_size"):
        parts.append(f"{d['val_size']} held out for validation")
    aug = d.get("augment")
    if isinstance(aug, dict):
        kinds = ([f"random crop (pad {aug['pad']})"] if aug.get("pad") else []) + (
            ["horizontal flip"] if aug.get("flip") else []
        )
        parts.append("augment: " + (" + ".join(kinds) if kinds else "none"))
    return ", ".join(parts)


def provenance_rows(meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """Readable rows for the provenance ``prefast train`` records (model, boundary, dataset,
    views, seed, dtype, fingerprint, created); any other key as compact JSON."""
    m = dict(meta)
    rows: list[tuple[str, Any]] = []
    model = m.pop("model", None)
    if isinstance(model, dict):
        rows.append(("meta.model", describe_model(model)))
    elif model is not None:
        rows.append(("meta.model", model))
    if "boundary" in m:
        unit = m.pop("boundary_unit", None)
        b = m.pop("boundary")
        rows.append(("meta.boundary", f"{b} (after unit {unit})" if unit else b))
    data = m.pop("data", None)
    if isinstance(data, dict):
        rows.append(("meta.dataset", describe_dataset(data)))
        if "seed" in data:
            rows.append(("meta.seed", data["seed"]))
    elif data is not None:
        rows.append(("meta.data", _compact(data)))
    if "views" in m:
        views = m.pop("views")
        seed = m.pop("view_seed", None)
        rows.append(
            (
                "meta.views",
                f"{views} per sample" + (f" (view seed {seed})" if seed is not None else ""),
            )
        )
    for k in ("dtype", "fingerprint", "created"):
        if k in m:
            v = m.pop(k)
            rows.append(
                (
                    f"meta.{k}",
                    v[:16] + "..."
                    if k == "fingerprint" and isinstance(v, str) and len(v) > 19
                    else v,
                )
            )
    for k, v in sorted(m.items()):
        rows.append((f"meta.{k}", v if not isinstance(v, dict | list) else _compact(v)))
    return rows


def _compact(v: Any) -> str:
    import json

    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 100 else s[:97] + "..."


def strict_json(value: Any) -> Any:
    """``value`` with every float that is not finite as None, for ``json.dumps(...,
    allow_nan=False)``: Python writes NaN and Infinity, which are not JSON. A store's meta may
    hold them where another program wrote the store."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def open_complete(path: str) -> ActivationStore:
    """``store.open(path)`` for the command lines (``python -m store``, ``prefast verify``):
    ``store.open``'s error for an incomplete store is advice for Python callers
    (``resume=True``, ``partial=True``); this one says what a command-line user can do."""
    s = open_store(path, partial=True)
    if not s.complete:
        # the ranges start at a chunk's first sample: ceil(samples / chunk_samples) chunks each
        missing = sum(
            -(-(stop - start) // s.chunk_samples) for _, start, stop in s.missing_ranges()
        )
        q = shlex.quote(path)
        raise StoreIncompleteError(
            f"{path}: the store is incomplete (its writer did not finish): {missing} of "
            f"{s.views * s.num_chunks} chunks missing; 'python -m store inspect {q}' lists "
            f"them, 'python -m store verify {q}' checks the chunks that were written"
        )
    return s


__all__ = [
    "describe_dataset",
    "describe_model",
    "format_summary",
    "open_complete",
    "provenance_rows",
    "strict_json",
    "summary",
]
