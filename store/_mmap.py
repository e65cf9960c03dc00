"""Chunk files mapped side by side into one reserved range of address space (Linux).

A raw local store whose chunk files are a whole number of pages each can have all of them
mapped next to one another, so that one view is a single array ``(samples, ...)`` over the
files: a shuffled batch is then gathered (reader) or scattered (writer) with one numpy call,
which releases the GIL. ``Region`` reserves the range; ``map_file`` puts a file at an offset
in it and ``unmap`` turns that part back into a hole.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 1, 2, 0x10, 0x20, 0x4000
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in for writing, in one call
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_chunks(
    view: int,
    chunks: list[int],
    map_one: Callable[[int, int], None],
    mapped: np.ndarray,
    pool: Executor | None,
) -> None:
    """``map_one(view, c)`` for each chunk ``c``, setting ``mapped[view, c]`` after each that
    succeeds: on ``pool`` where given and there are several (mapping and faulting pages in are
    the kernel's work, without the GIL; the first failure is raised once all have run), else
    one after another, up to the first failure. A chunk that fails stays unmapped."""
    if pool is None or len(chunks) < 2:
        for c in chunks:
            map_one(view, c)
            mapped[view, c] = True
        return
    futures = [(c, pool.submit(map_one, view, c)) for c in chunks]
    error: BaseException | None = None
    for c, f in futures:
        try:
            f.result()
            mapped[view, c] = True
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


def map_limit() -> int:
    """How many memory maps a process may hold (Linux's ``vm.max_map_count``; its default
    where it cannot be read). Each chunk file mapped is one, and so is each library loaded."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def usable(chunk_bytes: int, chunks: int = 1) -> bool:
    """Whether ``chunks`` chunks of this many bytes can be mapped side by side here: whole
    pages each, and at most half the maps a process may hold (more fail to map, with ENOMEM,
    partway through a read; the other half is left to the libraries and allocator)."""
    return (
        sys.platform.startswith("linux")
        and chunk_bytes > 0
        and chunk_bytes % mmap.PAGESIZE == 0
        and chunks <= map_limit() // 2
    )


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


class Region:
    """One reserved range of address space, unmapped when the last array over it is gone (the
    arrays made from it keep it alive through ``__array_interface__``)."""

    def __init__(self, size: int, shape: tuple[int, ...], typestr: str, writable: bool) -> None:
        self.libc = _libc()
        self.size = size
        addr = self.libc.mmap(
            None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0
        )
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "cannot reserve address space for a store map")
        self.addr = int(addr)
        self.__array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (self.addr, not writable),
            "version": 3,
        }

    def map_file(self, offset: int, length: int, fd: int, writable: bool) -> None:
        """Map ``length`` bytes of file ``fd`` (shared) at ``offset`` into the range."""
        at = self.addr + int(offset)
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        got = self.libc.mmap(at, length, prot, MAP_SHARED | MAP_FIXED, fd, 0)
        if got != at:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    def populate_write(self, offset: int, length: int) -> bool:
        """Fault a mapped part in for writing in one call (False where the kernel cannot: the
        pages are then faulted in by the first writes)."""
        return self.libc.madvise(self.addr + int(offset), int(length), MADV_POPULATE_WRITE) == 0

    def unmap(self, offset: int, length: int) -> None:
        """Turn a mapped part back into reserved, inaccessible address space."""
        self.libc.mmap(
            self.addr + int(offset), int(length), PROT_NONE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0,
        )  # fmt: skip

    def __del__(self) -> None:
        if getattr(self, "addr", 0):
            self.libc.munmap(self.addr, self.size)
            self.addr = 0
