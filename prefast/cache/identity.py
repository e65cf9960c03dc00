"""What a cache is: its fingerprint, its provenance, where its store lives, and whether a
store on disk is one this run may reuse (docs/training.md, where the cache lives)."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import store
from prefast.errors import CacheError
from prefast.models import UnitModel
from store import location
from store.writer import clear_store_files

log = logging.getLogger(__name__)

STORE_PREFIX = "boundary-"
TRASH_PREFIX = ".prefast-trash-"  # a store being deleted; what a kill leaves is cleared later
RUN_PREFIX = "run-"  # CACHE_DIR/run-KEY: one folder per set of settings
RUN_MARKER = ".prefast-run"  # written into every run folder this package creates
LOCK_NAME = ".prefast-lock"  # flock-ed by the run using its run folder
LOCK_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what flock(LOCK_NB) raises if held


def update_digest(h: Any, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed ``(name, tensor)`` pairs into the hash ``h``: each name, then the tensor's raw
    bytes (on the host, contiguous)."""
    for name, t in items:
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``module`` (e.g. to compare ranks)."""
    h = hashlib.sha256()
    update_digest(h, sorted(module.state_dict().items()))
    return h.hexdigest()


# the batch norms that compute one function in eval mode (running statistics), as frozen units
# run: --sync-bn turns a model's BatchNorm2d into SyncBatchNorm under torchrun, and a store it
# wrote must keep the fingerprint of the model `prefast verify` rebuilds
_BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
)


def layers(unit: torch.nn.Module) -> list[list[str]]:
    """Each layer of ``unit``: its name, class and settings (``extra_repr``), which shape its
    output beside the weights (a ReLU swapped for a GELU has no weights to tell them apart).
    The batch norms are one class here (``_BATCH_NORMS``)."""
    return [
        [
            name,
            "torch.nn.BatchNorm"
            if type(m) in _BATCH_NORMS
            else f"{type(m).__module__}.{type(m).__qualname__}",
            m.extra_repr(),
        ]
        for name, m in unit.named_modules()
    ]


def fingerprint(
    model: UnitModel,
    boundary: int,
    data_desc: dict[str, Any],
    cache_desc: dict[str, Any],
    *,
    with_layers: bool = True,
) -> str:
    """SHA-256 over what produced a cache: the architecture (the config and the frozen units'
    layers), the boundary, the frozen units' weights and buffers, the data (dataset, split,
    subset, transform) and the cache's views, seeds and dtype. ``with_layers=False``: the
    fingerprint of the stores written before it hashed the layers, which ``prefast verify``
    tells apart from a mismatch."""
    h = hashlib.sha256()
    head: dict[str, Any] = {
        "model": model.config,
        "boundary": boundary,
        "data": data_desc,
        "cache": cache_desc,
    }
    if with_layers:
        head["layers"] = [layers(model.units[i]) for i in range(boundary)]
    h.update(json.dumps(head, sort_keys=True).encode())
    for i in range(boundary):
        update_digest(h, ((f"{i}.{k}", t) for k, t in sorted(model.units[i].state_dict().items())))
    return h.hexdigest()


def provenance(
    model: UnitModel, boundary: int, data_desc: dict[str, Any], cache_desc: dict[str, Any], fp: str
) -> dict[str, Any]:
    """The JSON-able ``meta`` of a store: readable provenance plus the fingerprint."""
    return {
        "model": model.config,
        "boundary": boundary,
        "boundary_unit": model.unit_names[boundary - 1],
        "data": data_desc,
        **cache_desc,
        "fingerprint": fp,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


# keys of a store's meta that are provenance rather than the cache description
PROVENANCE_KEYS = ("model", "boundary", "boundary_unit", "data", "fingerprint", "created")


def store_path(cache_dir: Path | str, boundary: int) -> Path | str:
    """The store of boundary ``boundary`` in a cache folder (a local path or an fsspec URL)."""
    return location.join(cache_dir, f"{STORE_PREFIX}{boundary:03d}")


def delete_store(path: Path | str) -> bool:
    """Delete a store this run made; False where there is none (a folder that is not a store
    is refused). A local store is first renamed into its folder's trash, so a kill mid-delete
    leaves trash, which the run folder's next start clears, never a half-deleted store under
    a store's name. A store folder that holds what the store did not write (a user's file, a
    link) is not: the store's own files go (``store.writer.clear_store_files``), the rest
    stays, with the folder, and a warning names it. A symlink to a store (a user's link to
    another disk) is unlinked; what it points at is never deleted, and a warning says where
    that store still is."""
    if not location.exists(path):
        return False
    local = location.as_local(path)
    if local is None or not location.is_activation_store(local):
        location.remove_store(path)  # a URL's store; anything else is refused there
    elif local.is_symlink():
        target = local.resolve()
        local.unlink()
        log.warning(
            "removed the link %s; the store it pointed to, %s, is left as it is (never "
            "deleted through a link): delete it yourself if it is no longer needed",
            local,
            target,
        )
    elif location.store_files(local)[2]:  # what the store did not write: never deleted
        kept = clear_store_files(local)
        log.warning(
            "removed the store %s; kept its folder for what the store did not write: %s",
            local,
            ", ".join(os.path.relpath(p, local) for p in kept),
        )
    else:
        trash = local.parent / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
        os.rename(local, trash)
        shutil.rmtree(trash)
    return True


def check_cache_dir(cache_dir: Path | str) -> None:
    """A cache folder must be a folder (or not exist yet), and not inside an activation store
    (an easy mix-up with the store path a run prints); a URL's fsspec backend must be
    installed."""
    local = location.as_local(cache_dir)
    if local is None:
        try:
            location.check_reachable(cache_dir)
        except store.StoreError as e:
            raise CacheError(f"--cache-dir: {e}") from None
        return
    if local.exists() and not local.is_dir():
        raise CacheError(f"--cache-dir: {cache_dir} exists and is not a directory")
    for folder in (local, *local.absolute().parents):
        if location.is_activation_store(folder):
            raise CacheError(
                f"--cache-dir: {folder} is an activation store; give a folder outside it (a "
                "run writes its stores to CACHE_DIR/run-KEY/boundary-NNN)"
            )


def open_matching(path: Path | str, fp: str) -> store.ActivationStore | None:
    """The complete store at ``path`` if its fingerprint equals ``fp``, else None (with a log
    line saying why)."""
    if not location.is_store(path):
        return None
    try:
        s = store.open(path)
    except store.StoreError as e:
        log.warning("store %s cannot be reused (%s); rebuilding it", path, e)
        return None
    if s.meta.get("fingerprint") != fp:
        log.warning(
            "store %s was built from other weights or data (fingerprint differs); rebuilding it",
            path,
        )
        return None
    return s


__all__ = [
    "LOCK_BUSY",
    "LOCK_NAME",
    "PROVENANCE_KEYS",
    "RUN_MARKER",
    "RUN_PREFIX",
    "STORE_PREFIX",
    "check_cache_dir",
    "fingerprint",
    "open_matching",
    "provenance",
    "state_digest",
    "store_path",
    "update_digest",
]
