"""The few places that touch zarr's API, kept together so zarr 3.1 .. 3.x all work; both the
writer and the reader use them."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from store.errors import (
    NotAStoreError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreInputError,
    shown,
)
from store.layout import (
    ACTIVATIONS,
    ATTRS_KEY,
    CHUNK_CRC,
    DEFAULT_LEVELS,
    LABEL_CRC,
    LABELS,
    StoreLayout,
    dimension_names,
)

Location = str | os.PathLike[str]


def location_str(path: Any) -> str:
    """``path`` (a str or an ``os.PathLike`` of one) as a str, else ``StoreInputError``: None
    or an int failed with os.fspath's TypeError, and bytes with one from ``str.startswith``."""
    s = os.fspath(path) if isinstance(path, str | os.PathLike) else None
    if not isinstance(s, str):
        raise StoreInputError(f"path must be a str or a pathlib.Path, got {shown(path)}")
    return s


def as_local(path: Location) -> Path | None:
    """The local filesystem path of a location, or None for a remote URL. A ``file://`` URL is
    read as one (``file:///a%20b`` is ``/a b``, as ``Path.as_uri`` writes it; ``localhost``
    may name the host)."""
    s = location_str(path)
    if s.startswith("file://"):
        rest = s[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        return Path(unquote(rest))
    if "://" in s:
        return None
    return Path(s)


def compressors_for(layout: StoreLayout) -> list[Any] | None:
    if layout.codec is None:
        return None
    level = layout.codec_level if layout.codec_level is not None else DEFAULT_LEVELS[layout.codec]
    if layout.codec == "lz4":
        # Blosc-lz4 is a core zarr v3 codec, so any zarr client can decode it; byte shuffle
        # did not help on activations.
        return [
            BloscCodec(
                cname="lz4", clevel=level, shuffle="noshuffle", typesize=layout.np_dtype.itemsize
            )
        ]
    return [ZstdCodec(level=level)]


def little_endian() -> BytesCodec:
    """The serializer of every array: little-endian bytes, so a raw chunk file is the array a
    memory map reads (explicit, not the host's order)."""
    return BytesCodec(endian="little")


def array_specs(layout: StoreLayout) -> dict[str, dict[str, Any]]:
    """Shape, chunks, dtype, fill value and dimension names of each member array."""
    lay = layout
    return {
        ACTIVATIONS: {
            "shape": (lay.views, lay.num_samples, *lay.sample_shape),
            "chunks": (1, lay.chunk_samples, *lay.sample_shape),
            "dtype": lay.np_dtype,
            "fill_value": 0,
            "dimension_names": ("view", "sample", *dimension_names(len(lay.sample_shape))),
        },
        LABELS: {
            "shape": (lay.num_samples,),
            "chunks": (lay.chunk_samples,),
            "dtype": np.dtype("int64"),
            "fill_value": -1,
            "dimension_names": ("sample",),
        },
        CHUNK_CRC: {
            "shape": (lay.views, lay.num_chunks),
            "chunks": (1, 1),
            "dtype": np.dtype("int64"),
            "fill_value": -1,
            "dimension_names": ("view", "chunk"),
        },
        LABEL_CRC: {
            "shape": (lay.num_chunks,),
            "chunks": (1,),
            "dtype": np.dtype("int64"),
            "fill_value": -1,
            "dimension_names": ("chunk",),
        },
    }


def check_arrays(
    group: zarr.Group, layout: StoreLayout, where: str, complete: bool = True
) -> dict[str, zarr.Array]:
    """The member arrays, after checking that their own metadata agrees with the record (a
    memory map trusts the record's shape, dtype and codec); a disagreement or a missing or
    unreadable array raises ``StoreCorruptError``; a missing one in a store not marked
    complete (its writer makes the arrays just after the record, or was killed between the
    two) raises ``StoreIncompleteError``."""
    out = {}
    for name, spec in array_specs(layout).items():
        try:
            a = group[name]
        except KeyError:
            if not complete:
                raise StoreIncompleteError(
                    f"{where}: the store is incomplete: its '{name}' array is not there (the "
                    "store is being created, or its writer stopped before it made its arrays); "
                    "resume it (store.create(..., resume=True)) or create it again with "
                    "overwrite=True"
                ) from None
            raise StoreCorruptError(f"{where}: the '{name}' array is missing") from None
        except Exception as e:
            raise StoreCorruptError(f"{where}: the '{name}' array cannot be opened: {e!r}") from e
        if not isinstance(a, zarr.Array):
            raise StoreCorruptError(f"{where}: member '{name}' is not an array")
        got = {"shape": tuple(a.shape), "chunks": tuple(a.chunks), "dtype": np.dtype(a.dtype)}
        for field, value in got.items():
            if value != spec[field]:
                raise StoreCorruptError(
                    f"{where}: the record says {name} {field} {spec[field]}, the array has "
                    f"{value}; the attributes or the array metadata were edited: rebuild the store"
                )
        compressed = len(a.compressors) > 0 or len(a.filters) > 0
        raw_expected = name != ACTIVATIONS or layout.codec is None
        if compressed == raw_expected or not isinstance(a.serializer, BytesCodec):
            raise StoreCorruptError(
                f"{where}: the record says {name} codec {layout.codec if name == ACTIVATIONS else None}, "
                f"the array has codecs {[*a.filters, a.serializer, *a.compressors]}; rebuild the store"
            )
        keys = getattr(a.metadata, "chunk_key_encoding", None)  # chunk_file(): 'c/i/j/...'
        if getattr(keys, "name", None) != "default" or getattr(keys, "separator", None) != "/":
            raise StoreCorruptError(f"{where}: the '{name}' array has chunk keys {keys}")
        endian = a.serializer.endian  # None for one-byte dtypes
        if endian is not None and getattr(endian, "value", endian) != "little":
            raise StoreCorruptError(f"{where}: the '{name}' array is not stored little-endian")
        out[name] = a
    return out


# a Blosc frame starts: version, versionlz, flags, typesize, then uint32 nbytes, blocksize, cbytes
BLOSC_HEADER_BYTES = 16


def blosc_compressed(a: zarr.Array) -> bool:
    """Whether the array's chunks are Blosc frames (the ``lz4`` codec)."""
    return any(isinstance(c, BloscCodec) for c in a.compressors)


def check_blosc_frame(f: Path, name: str) -> None:
    """A Blosc-compressed chunk file whose header records more compressed bytes than the file
    holds (cut short) raises ``StoreCorruptError`` naming it: the Blosc decoder does not check
    the frame against the buffer it is given, and reads past its end (garbage values, or a
    segmentation fault for a chunk of megabytes)."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(BLOSC_HEADER_BYTES)
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise StoreCorruptError(f"{f}: {name} is marked written but its file is missing") from None
    if len(head) < BLOSC_HEADER_BYTES:
        raise StoreCorruptError(
            f"{f}: {name} has {size} bytes, fewer than a Blosc header (truncated); rebuild the "
            "store or resume it after deleting this file"
        )
    cbytes = int.from_bytes(head[12:16], "little")
    if cbytes > size:
        raise StoreCorruptError(
            f"{f}: {name} has {size} bytes, its Blosc header records {cbytes} (truncated); "
            "rebuild the store or resume it after deleting this file"
        )


def writable(array: zarr.Array) -> zarr.Array:
    """The array handle with empty-chunk elision off, so every chunk we write has a file."""
    return array.with_config({"write_empty_chunks": True})


def store_arg(path: Location) -> Any:
    local = as_local(path)
    return str(local) if local is not None else os.fspath(path)


def open_group(path: Location, mode: str) -> zarr.Group:
    return zarr.open_group(store_arg(path), mode=mode, zarr_format=3)  # type: ignore[arg-type]


def read_info_dict(group: zarr.Group) -> dict[str, Any] | None:
    d = group.attrs.get(ATTRS_KEY)
    return dict(d) if isinstance(d, dict) else None


def chunk_file(root: Path, array_name: str, key: tuple[int, ...]) -> Path:
    """File of one chunk under zarr v3's default chunk-key encoding ('c/i/j/...')."""
    return root.joinpath(array_name, "c", *(str(k) for k in key))


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The member array ``name`` of a store group."""
    a = group[name]
    if not isinstance(a, zarr.Array):
        raise NotAStoreError(f"{group.store_path}: member '{name}' is not an array")
    return a


def read_int64(a: zarr.Array, where: str, root: Path | None) -> np.ndarray:
    """A whole int64 member array (a table, the labels) of the store at ``where``: from its
    chunk files where the store is local at ``root`` (``_read_local_int64``), else through
    zarr. An unreadable one raises ``StoreCorruptError``."""
    if root is not None:
        return _read_local_int64(a, root)
    try:
        return np.asarray(a[...], dtype=np.int64)
    except Exception as e:
        raise StoreCorruptError(f"{where}: the '{a.basename}' array cannot be read: {e!r}") from e


def _read_local_int64(a: zarr.Array, root: Path) -> np.ndarray:
    """A whole raw int64 member array of the local store at ``root``, read from its chunk
    files: each holds a whole chunk's little-endian values (an edge chunk padded), a missing
    file is a chunk of the fill value. A file of another size raises ``StoreCorruptError``
    naming it. (zarr's own read of the whole array gathers every chunk concurrently; when one
    fails, the others are left pending and the interpreter prints hundreds of lines about
    them at exit.)"""
    shape, chunks = tuple(a.shape), tuple(a.chunks)
    out = np.full(shape, a.fill_value, dtype=np.int64)
    size = math.prod(chunks) * 8  # bytes of a chunk file
    grid = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
    for key in np.ndindex(*grid):
        f = chunk_file(root, a.basename, key)
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            continue
        if len(data) != size:
            raise StoreCorruptError(
                f"{f}: a chunk of the '{a.basename}' array has {len(data)} bytes, expected "
                f"{size} (truncated or replaced); rebuild the store"
            )
        region = tuple(
            slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(key, chunks, shape, strict=True)
        )
        block = np.frombuffer(data, dtype="<i8").reshape(chunks)
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def read_table(a: zarr.Array, where: str, root: Path | None) -> np.ndarray:
    """A whole CRC table as int64 (-1 marks a chunk not yet written), read as ``read_int64``
    does; an unreadable table, or one holding values that are no CRC, raises
    ``StoreCorruptError``."""
    t = read_int64(a, where, root)
    if ((t < -1) | (t >= 2**32)).any():
        raise StoreCorruptError(f"{where}: the '{a.basename}' table holds values that are no CRC")
    return t
