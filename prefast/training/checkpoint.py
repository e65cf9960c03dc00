"""Checkpoints: what one holds, written atomically, read back safely.

A checkpoint is a dict of tensors and plain containers only (the RNG states as tensors and
tuples), so it loads with ``torch.load(..., weights_only=True)``: a crafted file cannot run
code. It is written to a temporary file and renamed over the previous one, so a crash leaves
the previous checkpoint intact. Reading it checks each record's CRC-32 first, so a checkpoint
damaged on disk is refused rather than loaded with changed weights.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefast.config import RESUMABLE_FIELDS
from prefast.errors import CheckpointError
from prefast.paths import CHECKPOINT_NAME
from store.errors import naming

# The layout of a checkpoint's dict; a version of prefast that changes what a checkpoint holds
# (or how) raises it, so a checkpoint of a newer layout is refused by name, not misread.
# Checkpoints written before it was stamped hold the layout of format 1.
CHECKPOINT_FORMAT = 1
# what a run resumes from (``load_checkpoint_file(..., needs=RESUME_ENTRIES)``)
RESUME_ENTRIES = (
    "config", "epoch", "model", "optimizer", "frontier", "cache", "records", "losses", "rng"
)  # fmt: skip
_TMP_TAG = "prefast-"  # in a temporary checkpoint's name: .last.pt.prefast-XXXXXXXX.tmp
_TMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # its 8 characters of its own


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The torch (CPU, and the CUDA ``device``'s the run trains on), numpy and Python
    generators' states as tensors and plain containers."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # legacy MT19937 tuple
    return {
        "torch": torch.get_rng_state(),
        # a model's own dropout on a GPU draws from its device's generator; under torchrun
        # rank 0 saves its own device's, which every rank's equals (one seed, the same draws)
        "cuda": torch.cuda.get_rng_state(device)
        if device is not None and device.type == "cuda"
        else None,
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved; the CUDA generator's state goes to ``device``, the
    one this process trains on (under torchrun each rank's own GPU). A checkpoint from a CPU
    run, or from before CUDA's was saved, leaves it as seeded."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if device is not None and device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda.cpu(), device)
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].cpu().numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file of a fresh, unique name in the
    same folder (never a name a user's file could have), flushed to disk, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
        _sync_folder(path.parent)  # the rename too, so a power cut keeps the new checkpoint
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave the previous checkpoint only
        # torch.save's zip writer, closed after a write failed past its first bytes, raises
        # "unexpected pos 64 vs 0" (a RuntimeError, a traceback) in place of that OSError
        failed = e.__context__ if isinstance(e, RuntimeError) else e
        if isinstance(failed, BaseException) and not isinstance(failed, Exception):
            # a stop (a second Ctrl-C, SIGTERM) that came during a write stays a stop, not a
            # RuntimeError traceback and a "failed" metrics line
            raise failed from None
        if isinstance(failed, OSError) and failed.errno is not None and failed.filename is None:
            # a full disk names the file whose write filled it, not a bare "[Errno 28] ..."
            raise naming(failed, path) from failed
        if isinstance(failed, OSError):
            raise failed from None
        raise
    # what a run killed mid-save left: names only _create_temporary makes
    leftover = re.compile(rf"\.{re.escape(path.name)}\.{_TMP_TAG}[{_TMP_CHARS}]{{8}}\.tmp")
    for p in path.parent.iterdir():
        if leftover.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file of a fresh name next to ``path``, opened for writing, with the permissions
    any file this process creates gets (0o666 less the umask: tempfile.mkstemp's 0o600 left
    the checkpoint readable by its owner only). The name's characters come from the system's
    generator, so the run's own random draws are not touched."""
    for _ in range(100):
        tag = "".join(secrets.choice(_TMP_CHARS) for _ in range(8))
        tmp = path.parent / f".{path.name}.{_TMP_TAG}{tag}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a temporary checkpoint next to {path}")


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk (where the file system lets a folder be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_load_reason(e: BaseException) -> str:
    """The one informative line of a failed ``torch.load(weights_only=True)``; torch's own
    message spans many lines and suggests turning the protection off."""
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    if m:
        return m.group(1).strip()[:160]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "weights_only" not in ln]
    return (lines[0] if lines else type(e).__name__)[:160]


def state_dict_mismatch(e: RuntimeError) -> str:
    """What a failed ``load_state_dict`` says differs, on one line: torch's first line only
    introduces the list (``Error(s) in loading state_dict for UnitModel:``), the first entry
    says what differs."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:240]


def _damaged_record(path: Path | str) -> str | None:
    """The first record of the checkpoint's zip archive whose bytes do not match the CRC-32
    torch.save recorded for them (a bit flipped on disk or in a copy), else None: torch.load
    never checks them, and loads damaged weights or numbers silently. A record saved without
    a CRC (``torch.serialization.set_crc32_options(False)`` records 0) is not checked, and a
    file that does not open as a zip archive is left to torch.load to refuse."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return None
    with z:
        for info in z.infolist():
            if info.CRC == 0:
                continue
            try:
                with z.open(info) as f:  # zipfile compares the CRC-32 as it reads the end
                    while f.read(1 << 22):
                        pass
            except (zipfile.BadZipFile, EOFError, ValueError):
                return info.filename
    return None


def load_checkpoint_file(
    path: Path | str, what: str, needs: tuple[str, ...] = ("config", "model")
) -> dict[str, Any]:
    """A training checkpoint's contents, holding at least the entries ``needs``. Loaded with
    ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code;
    anything else is refused, as is a checkpoint of another layout (``CHECKPOINT_FORMAT``) or
    one whose records do not match their CRC-32."""
    if Path(path).is_dir():  # a run's --checkpoint-dir, given for the file it holds
        inside = Path(path) / CHECKPOINT_NAME
        hint = (
            f"give {inside}"
            if inside.is_file()
            else f"a run's --checkpoint-dir holds {CHECKPOINT_NAME}"
        )
        raise CheckpointError(f"{what}: {path} is a folder, not a checkpoint file; {hint}")
    if not Path(path).is_file():
        raise CheckpointError(f"{what}: no checkpoint at {path}")
    damaged = _damaged_record(path)
    if damaged is not None:
        raise CheckpointError(
            f"{what}: refusing {path}: damaged: its record {damaged} does not match the "
            "checksum it was written with (a bit changed on disk or in a copy)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a truncated or foreign file
        raise CheckpointError(
            f"{what}: refusing {path}: damaged (truncated?), or not a checkpoint of tensors "
            f"and plain containers ({checkpoint_load_reason(e)})"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(
            f"{what}: {path} is not a prefast training checkpoint (no 'config' and 'model' entries)"
        )
    fmt = state.get("format", 1)
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{what}: {path} is a checkpoint of format {fmt!r}, written by another version of "
            f"prefast; this version reads format {CHECKPOINT_FORMAT}"
        )
    missing = [k for k in needs if k not in state]
    if missing:
        raise CheckpointError(
            f"{what}: {path} lacks the entries {', '.join(missing)}: written by another "
            "version of prefast, or not by a training run"
        )
    for key in needs:
        kind, described = _ENTRY_TYPES.get(key, (object, ""))
        value = state[key]
        negative = isinstance(value, int) and value < 0
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or negative)):
            raise CheckpointError(
                f"{what}: {path}: its entry {key!r} is {type(value).__name__} "
                f"{_shown(value)}, not {described}: the file was edited or not written by "
                "prefast; start afresh in another --checkpoint-dir"
            )
    return state


# what each entry a run reads must be (a file edited by hand gave a traceback where it is used)
_ENTRY_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "config": (dict, "a dict of settings"),
    "model": (dict, "a dict of tensors"),
    "optimizer": (dict, "an optimizer's state dict"),
    "epoch": (int, "a whole number of epochs, 0 or more"),
    "frontier": (int, "a unit index, 0 or more"),
    "cache": ((dict, type(None)), "a dict or None"),
    "records": (list, "a list of epoch records"),
    "losses": (list, "a list of losses"),
    "rng": (dict, "a dict of generator states"),
}


def _shown(value: Any) -> str:
    """``value`` in a message: short, one line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "RESUMABLE_FIELDS",
    "RESUME_ENTRIES",
    "checkpoint_load_reason",
    "load_checkpoint_file",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "state_dict_mismatch",
]
