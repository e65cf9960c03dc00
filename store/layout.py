"""On-disk layout of an activation store: names, dtypes, codecs and the layout record.

A store is a plain Zarr v3 group::

    PATH/zarr.json          group; attributes["prefast_store"] = StoreInfo.to_dict()
    PATH/activations/       (views, samples, *sample_shape), chunks (1, chunk_samples, ...)
    PATH/labels/            (samples,) int64, chunks (chunk_samples,)
    PATH/chunk_crc/         (views, num_chunks) int64, chunks (1, 1); -1 = chunk not written,
                            else the CRC-32 of the chunk's decoded bytes (one file per chunk,
                            so separate processes can mark disjoint chunks without a race)

``bfloat16`` is stored as its raw 16-bit words (``uint16``) with the dtype recorded here.
The checksum helpers live here too: the writer records ``chunk_crc`` of every chunk, readers
and ``store.tools.verify`` check it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from store.errors import StoreFormatError, StoreInputError

FORMAT_NAME = "prefast.activation-store"
FORMAT_VERSION = 1
ATTRS_KEY = "prefast_store"
ACTIVATIONS = "activations"
LABELS = "labels"
CHUNK_CRC = "chunk_crc"

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024  # ~8 MiB of uncompressed samples per chunk

# dtype name -> (numpy dtype on disk, torch dtype in memory)
DTYPES: dict[str, tuple[np.dtype[Any], torch.dtype]] = {
    "float16": (np.dtype("float16"), torch.float16),
    "bfloat16": (np.dtype("uint16"), torch.bfloat16),
    "float32": (np.dtype("float32"), torch.float32),
}
CODECS: tuple[str | None, ...] = (None, "lz4", "zstd")
DEFAULT_LEVELS = {"lz4": 5, "zstd": 1}


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise StoreInputError(f"{name}={value!r} is not one of {list(allowed)}")


def default_chunk_samples(sample_shape: tuple[int, ...], dtype: str, num_samples: int) -> int:
    """Samples per chunk so that one chunk holds about 8 MiB uncompressed, evened out over the
    chunks: a raw chunk file is always written whole, so the last chunk's padding (fewer than
    one sample per chunk) would otherwise cost up to a chunk of disk per view."""
    _check_choice("dtype", dtype, tuple(DTYPES))
    sample_bytes = math.prod(sample_shape) * DTYPES[dtype][0].itemsize
    target = max(1, min(num_samples, round(DEFAULT_CHUNK_BYTES / max(sample_bytes, 1))))
    chunks = -(-num_samples // target)
    return max(1, -(-num_samples // chunks))


@dataclass(frozen=True)
class StoreLayout:
    """Shape, dtype and chunking of a store; validated on construction."""

    num_samples: int
    views: int
    sample_shape: tuple[int, ...]
    dtype: str = "float16"
    codec: str | None = None
    codec_level: int | None = None
    chunk_samples: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_shape", tuple(int(d) for d in self.sample_shape))
        if self.num_samples < 1:
            raise StoreInputError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.views < 1:
            raise StoreInputError(f"views must be >= 1, got {self.views}")
        if not self.sample_shape or any(d < 1 for d in self.sample_shape):
            raise StoreInputError(
                f"sample_shape must be non-empty and positive, got {self.sample_shape}"
            )
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("codec", self.codec, CODECS)
        if self.codec is None and self.codec_level is not None:
            raise StoreInputError("codec_level is only meaningful with codec='lz4' or 'zstd'")
        if self.chunk_samples < 1:
            raise StoreInputError(f"chunk_samples must be >= 1, got {self.chunk_samples}")

    @property
    def np_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the bytes on disk (uint16 for bfloat16)."""
        return DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.sample_shape) * self.np_dtype.itemsize

    @property
    def num_chunks(self) -> int:
        """Chunks per view."""
        return -(-self.num_samples // self.chunk_samples)

    @property
    def raw_bytes(self) -> int:
        """Uncompressed bytes of all views."""
        return self.views * self.num_samples * self.sample_bytes

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Sample range [start, stop) of a chunk."""
        start = chunk * self.chunk_samples
        return start, min(start + self.chunk_samples, self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_shape"] = list(self.sample_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreLayout:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise StoreFormatError(f"unknown layout fields {sorted(unknown)}")
        return cls(**{**d, "sample_shape": tuple(d["sample_shape"])})


@dataclass(frozen=True)
class StoreInfo:
    """Everything the group's attributes record about a store."""

    layout: StoreLayout
    meta: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    created: str = ""
    completed: str | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "layout": self.layout.to_dict(),
            "meta": self.meta,
            "complete": self.complete,
            "created": self.created,
            "completed": self.completed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str = "") -> StoreInfo:
        if d.get("format") != FORMAT_NAME:
            raise StoreFormatError(
                f"{path}: attribute 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{path}: format_version {version!r} is not supported (this code reads version "
                f"{FORMAT_VERSION}); rebuild the store with this version of prefast"
            )
        return cls(
            layout=StoreLayout.from_dict(d["layout"]),
            meta=dict(d.get("meta") or {}),
            complete=bool(d.get("complete", False)),
            created=str(d.get("created", "")),
            completed=d.get("completed"),
        )


def check_write(
    where: str,
    views: int,
    num_samples: int,
    sample_shape: tuple[int, ...],
    view: int,
    start: int,
    x: Any,
) -> int:
    """Validate a ``write(view, start, x)`` against a store's or cache's shape; returns the
    batch length. Errors name the field."""
    if not 0 <= view < views:
        raise StoreInputError(f"{where}field 'view'={view} out of range [0, {views})")
    if tuple(x.shape[1:]) != sample_shape:
        raise StoreInputError(
            f"{where}field 'x' has sample shape {tuple(x.shape[1:])}, expected {sample_shape}"
        )
    n = int(x.shape[0])
    if start < 0 or start + n > num_samples:
        raise StoreInputError(
            f"{where}field 'start': samples [{start}, {start + n}) outside [0, {num_samples})"
        )
    if not (
        x.dtype.is_floating_point
        if isinstance(x, torch.Tensor)
        else np.issubdtype(x.dtype, np.floating)
    ):
        raise StoreInputError(
            f"{where}field 'x': expected a floating-point batch, got dtype {x.dtype}"
        )
    return n


def chunk_crc(data: np.ndarray) -> int:
    """CRC-32 of a chunk's decoded bytes (samples beyond the array's end excluded)."""
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1).data)


def unwritten_ranges(crcs: np.ndarray, layout: StoreLayout) -> list[tuple[int, int, int]]:
    """Merged (view, start, stop) sample ranges of the chunks that ``crcs`` (views, num_chunks)
    int64 marks as not written."""
    pairs = [(int(v), int(c)) for v, c in zip(*np.nonzero(crcs < 0), strict=True)]
    return merge_ranges(pairs, layout)


def merge_ranges(
    views_chunks: list[tuple[int, int]], layout: StoreLayout
) -> list[tuple[int, int, int]]:
    """Turn (view, chunk) pairs into sorted, merged (view, start, stop) sample ranges."""
    out: list[tuple[int, int, int]] = []
    for v, c in sorted(views_chunks):
        start, stop = layout.chunk_range(c)
        if out and out[-1][0] == v and out[-1][2] == start:
            out[-1] = (v, out[-1][1], stop)
        else:
            out.append((v, start, stop))
    return out


__all__ = [
    "ACTIVATIONS",
    "ATTRS_KEY",
    "CHUNK_CRC",
    "CODECS",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LABELS",
    "StoreInfo",
    "StoreLayout",
    "check_write",
    "chunk_crc",
    "default_chunk_samples",
    "merge_ranges",
    "unwritten_ranges",
]
