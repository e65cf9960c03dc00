"""On-disk layout of an activation store: names, dtypes, codecs and the layout record.

A store is a plain Zarr v3 group::

    PATH/zarr.json          group; attributes["prefast_store"] = StoreInfo.to_dict()
    PATH/activations/       (views, samples, *sample_shape), chunks (1, chunk_samples, ...)
    PATH/labels/            (samples,) int64, chunks (chunk_samples,)
    PATH/chunk_crc/         (views, num_chunks) int64, chunks (1, 1); -1 = chunk not written,
                            else the CRC-32C of the chunk's samples (one file per chunk, so
                            separate processes can mark disjoint chunks without a race); the
                            marker is written last, after the chunk's data
    PATH/label_crc/         (num_chunks,) int64, chunks (1,); the CRC-32C of each chunk's
                            labels, written with view 0's chunk, before its marker

Every array carries ``dimension_names`` (activations: view, sample, channel, y, x for 3-d
samples, else dim_k), so ``xarray.open_zarr(path, consolidated=False, zarr_format=3)`` opens
a store. ``bfloat16`` is stored as its raw 16-bit words (``uint16``) with the dtype recorded
here. The record itself carries a CRC-32C of its canonical JSON (``checksum``), checked at
open. Checksums are CRC-32C (Castagnoli) from the ``crc32c`` package, hardware-accelerated and
released from the GIL: about 16 GB/s on one core, so verifying a chunk costs far less than
reading it from disk or decoding it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch

from store.errors import StoreCorruptError, StoreFormatError, StoreInputError, check_int, shown

FORMAT_NAME = "prefast.activation-store"
# 2: CRC-32C chunk checksums (1 had zlib CRC-32), label_crc, the record's checksum,
# dimension_names on every array.
FORMAT_VERSION = 2
ATTRS_KEY = "prefast_store"
ACTIVATIONS = "activations"
LABELS = "labels"
CHUNK_CRC = "chunk_crc"
LABEL_CRC = "label_crc"
CHECKSUM_KEY = "checksum"

# Bounds past which a layout is taken for a damaged record rather than a store: they keep a
# forged size from turning into a huge allocation (the CRC tables are read whole at open).
MAX_SAMPLES = 2**40
MAX_VIEWS = 2**16
MAX_SAMPLE_DIMS = 8
MAX_DIM = 2**31
MAX_CHUNK_BYTES = 2**31  # one chunk is decoded whole in memory
MAX_TABLE_ENTRIES = 2**26  # views * num_chunks: the chunk_crc table, one file per entry

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024  # ~8 MiB of uncompressed samples per chunk
# A batch copied by several threads (the loader's gather, the writer's row scatter) is split
# only into parts of at least this many bytes: below it, handing a part to a thread costs
# more than copying it (on a 2-core machine a 0.26 MB gather took 82 us on one thread and
# 328 us split in two; a 0.26 MB row scatter 261 us and 383 us).
MIN_PART_BYTES = 1 << 20


def part_count(nbytes: int, workers: int) -> int:
    """How many threads copy a batch of ``nbytes``: up to ``workers``, each part at least
    ``MIN_PART_BYTES`` (1 where the batch is smaller)."""
    return max(1, min(workers, nbytes // MIN_PART_BYTES))


# dtype name -> (numpy dtype on disk, torch dtype in memory)
DTYPES: dict[str, tuple[np.dtype[Any], torch.dtype]] = {
    "float16": (np.dtype("float16"), torch.float16),
    "bfloat16": (np.dtype("uint16"), torch.bfloat16),
    "float32": (np.dtype("float32"), torch.float32),
}
CODECS: tuple[str | None, ...] = (None, "lz4", "zstd")
DEFAULT_LEVELS = {"lz4": 5, "zstd": 1}
# the levels each codec takes: Blosc's clevel 0..9 (lz4), zstd's -(2**17)..22
CODEC_LEVELS = {"lz4": (0, 9), "zstd": (-(2**17), 22)}


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if not isinstance(value, str | None) or value not in allowed:
        raise StoreInputError(f"{name}={value!r} is not one of {list(allowed)}")


def dimension_names(sample_ndim: int) -> tuple[str, ...]:
    """Names of a sample's axes: channel, y, x for (C, H, W) samples, else dim_0, dim_1, ..."""
    if sample_ndim == 3:
        return ("channel", "y", "x")
    return tuple(f"dim_{k}" for k in range(sample_ndim))


PAGE_BYTES = 4096


def default_chunk_samples(sample_shape: tuple[int, ...], dtype: str, num_samples: int) -> int:
    """Samples per chunk so that one chunk holds about 8 MiB uncompressed, evened out over the
    chunks: a raw chunk file is always written whole, so the last chunk's padding (fewer than
    one sample per chunk) would otherwise cost up to a chunk of disk per view."""
    _check_choice("dtype", dtype, tuple(DTYPES))
    sample_bytes = math.prod(sample_shape) * DTYPES[dtype][0].itemsize
    target = max(1, min(num_samples, round(DEFAULT_CHUNK_BYTES / max(sample_bytes, 1))))
    chunks = -(-num_samples // target)
    cs = max(1, -(-num_samples // chunks))
    # a whole number of 4 KiB pages per chunk where that costs a few samples at most: the
    # reader then maps all chunks side by side and gathers a batch in one call
    step = PAGE_BYTES // math.gcd(sample_bytes, PAGE_BYTES) if sample_bytes else 1
    aligned = -(-cs // step) * step
    return aligned if aligned <= num_samples and aligned - cs <= max(8, cs // 16) else cs


def as_shape(shape: Any) -> tuple[int, ...]:
    """``sample_shape`` checked (1 to ``MAX_SAMPLE_DIMS`` integers, each in [1, ``MAX_DIM``])
    and made a tuple of ints; anything else raises ``StoreInputError``."""
    if isinstance(shape, str | bytes) or not hasattr(shape, "__iter__"):
        raise StoreInputError(f"sample_shape must be a sequence of integers, got {shape!r}")
    shape = tuple(shape)
    if not 1 <= len(shape) <= MAX_SAMPLE_DIMS:
        raise StoreInputError(
            f"sample_shape must have 1 to {MAX_SAMPLE_DIMS} dimensions, got {shape!r}"
        )
    for d in shape:
        check_int("sample_shape", d, 1, MAX_DIM)
    return tuple(int(d) for d in shape)


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
        object.__setattr__(self, "sample_shape", as_shape(self.sample_shape))
        check_int("num_samples", self.num_samples, 1, MAX_SAMPLES)
        check_int("views", self.views, 1, MAX_VIEWS)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("codec", self.codec, CODECS)
        if self.codec is None and self.codec_level is not None:
            raise StoreInputError("codec_level is only meaningful with codec='lz4' or 'zstd'")
        if self.codec is not None and self.codec_level is not None:
            # one out of range was taken, and every chunk write failed in the background
            # with Blosc's 'error during blosc compression: -10'
            check_int(
                f"codec_level for codec={self.codec!r}", self.codec_level, *CODEC_LEVELS[self.codec]
            )
        check_int("chunk_samples", self.chunk_samples, 1, MAX_SAMPLES)
        # numpy integers pass the checks; the record is JSON and holds Python ints
        for name in ("num_samples", "views", "chunk_samples", "codec_level"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))
        if self.chunk_samples * self.sample_bytes > MAX_CHUNK_BYTES:
            raise StoreInputError(
                f"chunk_samples={self.chunk_samples}: a chunk of "
                f"{self.chunk_samples * self.sample_bytes} bytes exceeds {MAX_CHUNK_BYTES}"
            )
        if self.views * self.num_chunks > MAX_TABLE_ENTRIES:
            raise StoreInputError(
                f"views * chunks = {self.views * self.num_chunks} exceeds {MAX_TABLE_ENTRIES}; "
                "use larger chunks"
            )

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
    def from_dict(cls, d: Any, path: str = "") -> StoreLayout:
        """The layout of a record; a malformed one raises ``StoreFormatError`` naming the field."""
        where = f"{path}: " if path else ""
        if not isinstance(d, Mapping):
            raise StoreFormatError(f"{where}attribute 'layout' must be an object, got {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise StoreFormatError(f"{where}unknown layout fields {sorted(unknown)}")
        missing = known - set(d)
        if missing:
            raise StoreFormatError(f"{where}layout fields {sorted(missing)} are missing")
        if not isinstance(d["sample_shape"], list):
            raise StoreFormatError(
                f"{where}layout field 'sample_shape' must be a list, got {d['sample_shape']!r}"
            )
        try:
            return cls(**d)
        except StoreInputError as e:
            raise StoreFormatError(f"{where}bad layout: {e}") from None


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
        """The record, its ``checksum`` (of everything else) included."""
        d = {
            "format": self.format,
            "format_version": self.format_version,
            "layout": self.layout.to_dict(),
            "meta": self.meta,
            "complete": self.complete,
            "created": self.created,
            "completed": self.completed,
        }
        d[CHECKSUM_KEY] = record_checksum(d)
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> StoreInfo:
        """Parse and check a record: format, version, checksum, then every field's type.
        Raises ``StoreFormatError`` (malformed, other version) or ``StoreCorruptError`` (the
        checksum differs: edited or damaged), each one line naming the path and field."""
        if not isinstance(d, Mapping):
            raise StoreFormatError(f"{path}: attribute '{ATTRS_KEY}' must be an object")
        if d.get("format") != FORMAT_NAME:
            raise StoreFormatError(
                f"{path}: attribute 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            if isinstance(version, int) and not isinstance(version, bool):
                hint = (
                    "the store was written by an older version: rebuild it (prefast rebuilds "
                    "its caches automatically)"
                    if version < FORMAT_VERSION
                    else "the store was written by a newer version of prefast: read it with "
                    "that version, or rebuild it with this one"
                )
            else:
                hint = "rebuild the store with this version of prefast"
            raise StoreFormatError(
                f"{path}: format_version {version!r} is not supported (this code reads version "
                f"{FORMAT_VERSION}); {hint}"
            )
        got = d.get(CHECKSUM_KEY)
        want = record_checksum(d)
        if got != want:
            raise StoreCorruptError(
                f"{path}: the store's attributes fail their checksum (recorded {got!r}, computed "
                f"{want!r}): zarr.json was edited or damaged; rebuild the store"
            )
        layout = StoreLayout.from_dict(d.get("layout"), path)
        meta, complete, created, completed = (
            d.get("meta"),
            d.get("complete"),
            d.get("created"),
            d.get("completed"),
        )
        for name in ("meta", "complete", "created"):
            if name not in d:  # said "has a bad value None"
                raise StoreFormatError(f"{path}: attribute '{name}' is missing")
        if not isinstance(meta, dict):
            raise StoreFormatError(f"{path}: attribute 'meta' has a bad value {meta!r}")
        if not isinstance(complete, bool):
            raise StoreFormatError(f"{path}: attribute 'complete' has a bad value {complete!r}")
        if not isinstance(created, str):
            raise StoreFormatError(f"{path}: attribute 'created' has a bad value {created!r}")
        if not (completed is None or isinstance(completed, str)):
            raise StoreFormatError(f"{path}: attribute 'completed' has a bad value {completed!r}")
        return cls(
            layout=layout, meta=dict(meta), complete=complete, created=created, completed=completed
        )


def canonical_json(value: Any) -> str:
    """The one JSON text of a JSON-able value: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def record_checksum(d: Mapping[str, Any]) -> str:
    """``crc32c:xxxxxxxx`` of the canonical JSON of a record without its checksum field."""
    body = {k: v for k, v in d.items() if k != CHECKSUM_KEY}
    try:
        text = canonical_json(body)
    except (TypeError, ValueError):  # not JSON-able: cannot be a record we wrote
        return "unavailable"
    return f"crc32c:{crc32c.crc32c(text.encode()):08x}"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of ``json.loads`` whose keys differ: JSON keys are strings, so the keys 1
    and "1" of one dict are both written as "1", and only the last one's value was kept."""
    out = dict(pairs)
    if len(out) < len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"two keys of one dict are both {dup!r} in JSON (keys become strings)")
    return out


def json_meta(meta: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
    """``meta`` as it reads back from zarr.json (tuples become lists): JSON-able or an error."""
    if meta is not None and not isinstance(meta, Mapping):
        raise StoreInputError(f"{where}field 'meta' must be a dict, got {shown(meta)}")
    try:  # key order kept: people read it (store inspect)
        # strict JSON: zarr.json with NaN or Infinity in it is not JSON to other readers
        text = json.dumps(dict(meta or {}), allow_nan=False)
        out = json.loads(text, object_pairs_hook=_unique_keys)
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and "not JSON compliant" in str(e):
            e = ValueError("a float that is not finite (NaN or infinity) is not JSON")
        raise StoreInputError(f"{where}field 'meta' must be JSON-able: {e}") from None
    return dict(out)


def check_write(
    where: str,
    views: int,
    num_samples: int,
    sample_shape: tuple[int, ...],
    view: int,
    start: int,
    x: Any,
) -> tuple[int, int, int]:
    """Validate a ``write(view, start, x)`` against a store's or cache's shape; returns the
    view and start as Python ints (a numpy uint8 start of 250 plus a batch of 10 wrapped to
    4, and the batch was dropped; a 0-d integer tensor is taken, as a read takes it) and the
    batch length. Errors name the field."""
    view = check_int(f"{where}field 'view'", view)
    start = check_int(f"{where}field 'start'", start)
    if not isinstance(x, torch.Tensor | np.ndarray):  # a list had no .shape: AttributeError
        raise StoreInputError(
            f"{where}field 'x' must be a tensor or numpy array, got {type(x).__name__}"
        )
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
    if isinstance(x, np.ndarray) and x.dtype.itemsize > 8:  # torch's TypeError otherwise
        raise StoreInputError(
            f"{where}field 'x': numpy dtype {x.dtype} has no torch counterpart; pass "
            "x.astype(numpy.float64)"
        )
    return view, start, n


def batch_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A checked batch (``check_write``) as a tensor, sharing a numpy array's memory where it
    can: numpy calls an array with a negative stride on a length-1 axis (``x[::-1][:1]``)
    contiguous and keeps it, and torch refuses such an array, so it is copied first."""
    if isinstance(x, np.ndarray) and min(x.strides, default=0) < 0:
        x = x.copy()
    return torch.as_tensor(x)


def check_labels(where: str, labels: Any, n: int) -> np.ndarray:
    """A batch's labels as int64 (n,), checked: ``n`` integers, each >= 0 (class indices), as
    every sink takes them; otherwise ``StoreInputError`` naming the field."""
    lab = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if lab.shape == (0,) and n == 0:  # numpy makes [] float64: no labels for no samples
        return lab.astype(np.int64)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise StoreInputError(
            f"{where}field 'labels' must be {n} integers, got shape {lab.shape} dtype {lab.dtype}"
        )
    if lab.size and int(lab.min()) < 0:
        k = int(np.argmax(lab < 0))
        raise StoreInputError(
            f"{where}field 'labels' must be >= 0 (class indices), got {int(lab[k])} at position {k}"
        )
    if lab.size and int(lab.max()) > np.iinfo(np.int64).max:  # uint64: would wrap to < 0
        k = int(np.argmax(lab > np.iinfo(np.int64).max))
        raise StoreInputError(
            f"{where}field 'labels' must fit in int64 (class indices), got {int(lab[k])} at "
            f"position {k}"
        )
    return lab.astype(np.int64)


def chunk_crc(data: np.ndarray) -> int:
    """CRC-32C of an array's bytes in memory order: a chunk's samples (samples beyond the
    array's end excluded) or its labels. Releases the GIL."""
    return int(crc32c.crc32c(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data))


# stored dtype -> (signed, unsigned integer view, exponent mask, sign bit)
_FLOAT_BITS: dict[str, tuple[type[np.integer[Any]], type[np.integer[Any]], int, int]] = {
    "float16": (np.int16, np.uint16, 0x7C00, 0x8000),
    "bfloat16": (np.int16, np.uint16, 0x7F80, 0x8000),
    "float32": (np.int32, np.uint32, 0x7F800000, 0x80000000),
}


def count_nonfinite(data: np.ndarray, dtype: str) -> tuple[int, int]:
    """(inf, NaN) among ``data``'s values, stored as ``dtype`` (bfloat16 as uint16 bits). A
    value is +inf or +NaN when its bits, read as a signed integer, are at least the exponent
    mask, -inf or -NaN when, read as an unsigned one, they are at least sign bit | exponent
    mask: two max-reductions at memory speed decide a chunk that holds none."""
    signed, unsigned, exp, sign = _FLOAT_BITS[dtype]
    flat = np.ascontiguousarray(data).reshape(-1)
    if flat.size == 0:
        return 0, 0
    # two reductions at memory speed decide a clean chunk (nearly every one)
    if int(flat.view(signed).max()) < exp and int(flat.view(unsigned).max()) < (sign | exp):
        return 0, 0
    mag = flat.view(unsigned) & (sign - 1)  # the bits without the sign
    return int((mag == exp).sum()), int((mag > exp).sum())


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
    "CHECKSUM_KEY",
    "CHUNK_CRC",
    "CODECS",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LABELS",
    "LABEL_CRC",
    "StoreInfo",
    "StoreLayout",
    "canonical_json",
    "check_labels",
    "check_write",
    "chunk_crc",
    "count_nonfinite",
    "default_chunk_samples",
    "dimension_names",
    "json_meta",
    "merge_ranges",
    "record_checksum",
    "unwritten_ranges",
]
