"""Device, dtypes and autocast: resolved once per run and passed down (nanoGPT style)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import store
import store.layout
from prefast.errors import ConfigError

# cache dtype name -> torch dtype of the tensors a cache holds (the store's own table)
TORCH_DTYPES: dict[str, torch.dtype] = {name: t for name, (_, t) in store.layout.DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` where there is none is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but torch.cuda.is_available() is False")
    return store.resolve_device(name)


@contextlib.contextmanager
def autocast(device: torch.device, amp: str) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``amp == "bf16"``, else nothing."""
    if amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock readings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["TORCH_DTYPES", "autocast", "resolve_device", "synchronize"]
