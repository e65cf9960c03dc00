"""Device, dtypes and autocast: resolved once per run and passed down (nanoGPT style)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import sys
from collections.abc import Callable, Iterator

import torch

import store
import store.layout
from prefast.errors import ConfigError

log = logging.getLogger(__name__)

# cache dtype name -> torch dtype of the tensors a cache holds (the store's own table)
TORCH_DTYPES: dict[str, torch.dtype] = {name: t for name, (_, t) in store.layout.DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` where there is none is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but torch.cuda.is_available() is False")
    try:
        return store.resolve_device(name)
    except store.StoreInputError as e:
        raise ConfigError(f"--device: {e}") from e


@contextlib.contextmanager
def autocast(device: torch.device, amp: str) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``amp == "bf16"``, else nothing."""
    if amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def graph_autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[None]:
    """``autocast`` without its weight cache, which CUDA graph capture does not allow."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def capture_graph(
    fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, amp: str
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn(h)`` captured as a CUDA graph under ``amp``, and its static output (written by each
    replay; capture itself runs nothing, so replay once for this ``h``'s result). ``fn`` runs
    once eagerly first, on a side stream (cuDNN picks its algorithms, the allocator its
    blocks). The graph has its own memory pool, released with the graph and its output. The
    capture is thread-local: other threads (a cache writer's copies) may use the device
    meanwhile."""
    device = h.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), graph_autocast(device, amp):
        fn(h)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with (
        torch.cuda.graph(graph, capture_error_mode="thread_local"),
        graph_autocast(device, amp),
    ):
        out = fn(h)
    return graph, out


class GraphedForward:
    """``fn`` (a no-grad forward whose samples do not interact: eval mode) on batches of at
    most the first call's size, replayed as one CUDA graph captured at that call. A shorter
    batch is padded in the static input (the padding rows are computed and dropped). Each
    call's result is the graph's static output: use it before the next call. Where the
    capture fails, or a batch is larger or of another shape or dtype, ``fn`` runs eagerly
    under ``amp``'s autocast (a capture failure is logged once)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], amp: str) -> None:
        self.fn = fn
        self.amp = amp
        self.replays = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._failed = False

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        n = len(h)
        if self._graph is None and not self._failed and h.device.type == "cuda":
            self._capture(h)
        st = self._static
        if (
            self._graph is None
            or st is None
            or self._out is None
            or n > len(st)
            or h.shape[1:] != st.shape[1:]
            or h.dtype != st.dtype
        ):
            with autocast(h.device, self.amp):
                return self.fn(h)
        st[:n].copy_(h)
        self._graph.replay()
        self.replays += 1
        return self._out[:n]

    def _capture(self, h: torch.Tensor) -> None:
        self._static = h.clone(memory_format=torch.contiguous_format)
        try:
            self._graph, self._out = capture_graph(self.fn, self._static, self.amp)
        except RuntimeError as e:
            self._failed = True
            self._graph = self._static = self._out = None
            log.warning("could not capture a forward as a CUDA graph (%s); it runs eagerly", e)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock readings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's largest allowed)
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top before returning it
_kept = False


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for reuse instead of returning it to the system.

    With its defaults glibc trims the heap (and unmaps large blocks) as soon as a step frees
    its activations, so the next step faults every page back in, zeroed: on a CPU that was
    about 5,000 page faults and a fifth of each step's time for DenseNet-BC-16 on 28x28
    images. Fixed thresholds (``MMAP_THRESHOLD``, ``TRIM_THRESHOLD``) keep up to 256 MiB free
    per arena; the process's peak memory is unchanged. Process-wide and idempotent; True when
    set, False where the C library is not glibc (nothing is changed there)."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        log.debug("allocator: not glibc, left at its defaults")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1
        or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1
    ):
        log.debug("allocator: glibc refused the thresholds, left at its defaults")
        return False
    _kept = True
    log.debug(
        "allocator: glibc keeps freed memory (mmap threshold %d MiB, trim threshold %d MiB)",
        MMAP_THRESHOLD >> 20,
        TRIM_THRESHOLD >> 20,
    )
    return True


__all__ = [
    "TORCH_DTYPES",
    "GraphedForward",
    "autocast",
    "capture_graph",
    "graph_autocast",
    "keep_freed_memory",
    "resolve_device",
    "synchronize",
]
