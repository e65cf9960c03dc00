"""The few places that touch zarr's API, kept together so zarr 3.1 .. 3.x all work; both the
writer and the reader use them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from store.errors import NotAStoreError
from store.layout import ATTRS_KEY, CHUNK_CRC, DEFAULT_LEVELS, StoreLayout

Location = str | os.PathLike[str]


def as_local(path: Location) -> Path | None:
    """The local filesystem path of a location, or None for a remote URL."""
    s = os.fspath(path)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    if "://" in s:
        return None
    return Path(s)


def compressors_for(layout: StoreLayout) -> list[Any] | None:
    if layout.codec is None:
        return None
    level = layout.codec_level if layout.codec_level is not None else DEFAULT_LEVELS[layout.codec]
    if layout.codec == "lz4":
        # Blosc-lz4 is a core zarr v3 codec, so any zarr client can decode it; byte shuffle
        # did not help on activations (DESIGN section 5).
        return [
            BloscCodec(
                cname="lz4", clevel=level, shuffle="noshuffle", typesize=layout.np_dtype.itemsize
            )
        ]
    return [ZstdCodec(level=level)]


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


def read_chunk_crcs(group: zarr.Group) -> np.ndarray:
    """The (views, num_chunks) int64 CRC table; -1 marks a chunk not yet written."""
    return np.asarray(array(group, CHUNK_CRC)[...])
