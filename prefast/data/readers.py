"""Readers for torchvision's on-disk layouts (CIFAR pickles, MNIST idx files), parsed
directly and safely, without torchvision's md5 checks; torchvision only downloads, when asked."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import logging
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prefast.data.specs import DatasetSpec, spec_for
from prefast.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path("~/.cache/prefast/data")
# Where the Debian package dataset-fashion-mnist installs the raw idx .gz files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {
    ("cifar10", "train"): tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("cifar10", "test"): ("test_batch",),
    ("cifar100", "train"): ("train",),
    ("cifar100", "test"): ("test",),
}
_CIFAR_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
_IDX_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 0x0803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x0801  # unsigned byte, 1 dimension
_IDX_UBYTE = b"\x00\x00\x08"  # how every unsigned-byte idx file starts
_GZIP_MAGIC = b"\x1f\x8b"

# The only globals a CIFAR pickle needs (a dict of a numpy array and lists); anything else is
# refused rather than executed.
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _how_to_get(name: str) -> str:
    where = f"DIR (default {DEFAULT_DATA_ROOT})"
    if name == "fashion-mnist":
        return (
            "Get it with one of: `apt-get install -y dataset-fashion-mnist` (installs "
            f"{SYSTEM_FASHION_MNIST}, used when no data root is given); `--data-root DIR` "
            "(data_root=DIR) where DIR holds torchvision's layout "
            "(DIR/FashionMNIST/raw/train-images-idx3-ubyte[.gz], ...) or the raw idx .gz files "
            "themselves (DIR/train-images-idx3-ubyte.gz, ...); or `--download` "
            f"(download=True) when online, which fetches into {where}."
        )
    if name in _CIFAR_DIRS:
        layout = f"DIR/{_CIFAR_DIRS[name]}/" + (
            "data_batch_1..5, test_batch" if name == "cifar10" else "train, test"
        )
    else:
        layout = "DIR/MNIST/raw/train-images-idx3-ubyte[.gz], ..."
    return (
        f"Get it with `--data-root DIR` (data_root=DIR) where DIR holds torchvision's layout "
        f"({layout}), or with `--download` (download=True) when online, which fetches into "
        f"{where}."
    )


def _idx_names(split: str) -> tuple[str, str]:
    p = _IDX_PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _expected_files(name: str, split: str, root: Path) -> list[list[Path]]:
    """For each file the split needs, the candidate paths under ``root``, preferred first."""
    if name in _CIFAR_DIRS:
        return [[root / _CIFAR_DIRS[name] / f] for f in _CIFAR_FILES[(name, split)]]
    # the raw idx files directly in DIR only for Fashion-MNIST (the Debian package's layout):
    # MNIST's have the same names, so DIR/MNIST/raw tells the two apart
    dirs = [root / _IDX_DIRS[name] / "raw"] + ([root] if name == "fashion-mnist" else [])
    return [[d / f"{base}{ext}" for d in dirs for ext in ("", ".gz")] for base in _idx_names(split)]


def _locate(name: str, split: str, root: Path) -> tuple[list[Path], list[Path]]:
    """(found, missing): the first existing candidate of each needed file, and for each needed
    file that has none a candidate that is a folder (an unpacker may have made one of the
    file's name), else the preferred path."""
    found, missing = [], []
    for candidates in _expected_files(name, split, root):
        hit = next((p for p in candidates if _is_file(p)), None)
        if hit is None:
            missing.append(next((p for p in candidates if p.is_dir()), candidates[0]))
        else:
            found.append(hit)
    return found, missing


def _is_file(path: Path) -> bool:
    """``path.is_file()``, where a folder on the way this user may not enter is a DataError
    naming it (Python < 3.13 raises PermissionError there; 3.13 answers False, so "missing")."""
    try:
        return path.is_file()
    except PermissionError as exc:
        where = next(
            (p for p in (*reversed(path.parents), path) if not os.access(p, os.X_OK)), path
        )
        raise DataError(
            f"{where}: cannot look inside ({exc.strerror}); check the folder's permissions"
        ) from exc


def _not_a_folder(path: Path) -> bool:
    """True where ``path`` exists and is no folder (a folder above it this user may not enter
    is left to the search for the files, which names it)."""
    try:
        return path.exists() and not path.is_dir()
    except PermissionError:
        return False


def _corrupt(path: Path, what: str) -> DataError:
    """A dataset file that cannot be right, named, with what to do about it."""
    return DataError(
        f"{path}: {what}; the file is truncated or corrupt: delete it and fetch the dataset "
        "again (--download), or put a good copy there"
    )


def _unreadable(path: Path, exc: PermissionError) -> DataError:
    """A file this user may not read: not corrupt, so not to be deleted."""
    return DataError(f"{path}: cannot read ({exc.strerror}); check the file's permissions")


def _read_bytes(path: Path) -> bytes:
    """An idx file's bytes, gunzipped where they are gzip data. The content decides, not the
    name: a browser that unpacks a download keeps its .gz name, and a gzipped copy may have
    lost it; either was refused as corrupt or as a bad magic number."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            return gzip.decompress(raw)
    except PermissionError as exc:
        raise _unreadable(path, exc) from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"cannot read ({exc})") from exc
    if path.suffix == ".gz" and raw[:3] != _IDX_UBYTE:
        raise _corrupt(path, "cannot read (neither gzip data nor an idx file)")
    return raw


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file's uint8 payload, shaped by its header, as a writable array."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise _corrupt(path, f"truncated idx file ({len(raw)} bytes)")
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        raise _corrupt(path, f"bad idx magic number 0x{got:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"truncated idx header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    if len(raw) != header + size:
        raise _corrupt(
            path, f"header says shape {dims} ({header + size} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims).copy()


def _read_idx_split(
    images_path: Path, labels_path: Path, spec: DatasetSpec
) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)  # (N, H, W)
    if len(images) == 0:  # an empty split failed later: a bare ZeroDivisionError in evaluation
        raise _corrupt(images_path, "holds no images")
    if images.shape[1:] != (spec.image_size, spec.image_size):
        raise _corrupt(
            images_path,
            f"images are {images.shape[1:]}, {spec.name} needs {(spec.image_size, spec.image_size)}",
        )
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)  # (N,)
    if len(labels) != len(images):
        raise _corrupt(
            labels_path, f"has {len(labels)} labels but {images_path} has {len(images)} images"
        )
    _check_labels(labels, spec, labels_path)
    return images.reshape(len(images), 1, spec.image_size, spec.image_size), labels


def _check_labels(labels: np.ndarray, spec: DatasetSpec, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise _corrupt(
            path,
            f"labels span [{labels.min()}, {labels.max()}], {spec.name} has "
            f"{spec.num_classes} classes",
        )


def _read_cifar_batch(path: Path, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle: data (N, 3072) uint8 rows of R(1024) G(1024) B(1024), labels (N,)."""
    try:
        with path.open("rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except PermissionError as exc:
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # a malformed pickle can raise nearly anything
        raise _corrupt(path, f"not a readable CIFAR pickle ({exc!r})") from exc
    if not isinstance(obj, dict):
        raise _corrupt(path, f"expected a dict, got {type(obj).__name__}")
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    label_key = _CIFAR_LABEL_KEY[spec.name]
    for key in ("data", label_key):
        if key not in entries:
            raise _corrupt(path, f"no {key!r} entry (has {sorted(map(str, entries))})")
    data = np.asarray(entries["data"])
    labels = np.asarray(entries[label_key])
    pixels = spec.channels * spec.image_size * spec.image_size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise _corrupt(path, f"data must be (N, {pixels}) uint8, got {data.dtype} {data.shape}")
    if len(data) == 0:
        raise _corrupt(path, "holds no images")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise _corrupt(
            path, f"{label_key!r} must be {len(data)} integers, got {labels.dtype} {labels.shape}"
        )
    _check_labels(labels, spec, path)  # before the cast: uint64 above 2**63 would wrap
    return data, labels.astype(np.int64)


def _read_split(name: str, paths: list[Path], spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W) uint8 and labels (N,) int64 from the located files."""
    if name in _CIFAR_DIRS:
        parts = [_read_cifar_batch(p, spec) for p in paths]
        data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([lab for _, lab in parts]) if len(parts) > 1 else parts[0][1]
        images = np.ascontiguousarray(data).reshape(len(data), *spec.shape)
        if not images.flags.writeable:
            images = images.copy()
        return images, labels
    return _read_idx_split(paths[0], paths[1], spec)


def _download(name: str, split: str, root: Path) -> None:
    """Fetch ``name`` into ``root`` in torchvision's layout with torchvision's downloader."""
    import torchvision.datasets as tvd

    classes = {
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
    }
    dataset = classes[name]
    # torchvision puts MNIST-like sets in ROOT/Class/raw: a failed fetch must not leave them
    with _new_folders_go_on_failure(root / dataset.__name__ / "raw"):
        root.mkdir(parents=True, exist_ok=True)
        dataset(root=str(root), train=split == "train", download=True)


def _download_reason(exc: Exception) -> str:
    """The first line of a failed download's message, continued while it ends with a colon:
    torchvision's MNIST-like sets raise "Error downloading FILE:" then, a line each, the
    mirrors tried and their errors, so the first line alone named no reason (not that the
    machine is offline)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    why = lines[:1]
    for line in lines[1:]:
        if not why[-1].endswith(":"):
            break
        why.append(line)
    return " ".join(why)


@contextlib.contextmanager
def _new_folders_go_on_failure(deepest: Path) -> Iterator[None]:
    """Where the body fails, remove the folders down to ``deepest`` that did not exist before
    it and are still empty: a retry or another --data-root should not find an empty tree it
    did not ask for (a folder with a file in it stays)."""
    made = [p for p in (*reversed(deepest.parents), deepest) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in reversed(made):  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def _one_download_at_a_time(root: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder ``root`` (made where missing) while a download
    into it runs: the ranks of a torchrun job, each with ``--download``, fetched the same files
    into the same folder at once. One downloads; the others wait, then find the files. No lock
    file is left behind (the folder itself is locked); where the download fails, the folders
    made for it that are still empty go again."""
    with _new_folders_go_on_failure(root):
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root, os.O_RDONLY)
        except OSError as exc:
            raise DataError(
                f"{root}: cannot make or open the data folder ({exc.strerror})"
            ) from exc
        try:
            _lock_folder(fd, root)
            yield
        finally:
            os.close(fd)  # drops the lock


def _lock_folder(fd: int, root: Path) -> None:
    """An exclusive ``flock`` on ``fd``, the open folder ``root``, waited for where another
    process holds it; none where the file system takes no lock, with a warning."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info("waiting for another process's download into %s", root)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        # NFS takes an exclusive flock only on a file open for writing (EBADF on this
        # folder's descriptor); some file systems take none (ENOLCK, EOPNOTSUPP)
        logger.warning(
            "%s: cannot lock the data folder (%s); downloading without waiting for other "
            "processes (under torchrun, download once before the run)",
            root,
            exc.strerror or exc,
        )


def load_real(
    name: str, split: str, data_root: Path | None, download: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    spec = spec_for(name)
    if data_root is not None and _not_a_folder(data_root):
        # was "split not found: missing FILE/MNIST/raw/...", or "File exists" with --download
        above = next((p for p in data_root.parents[:3] if not _locate(name, split, p)[1]), None)
        give = f"give --data-root {above}" if above else "give the folder that holds it"
        raise DataError(
            f"{data_root}: --data-root (data_root) is a file, not a folder; {give}. "
            f"{_how_to_get(name)}"
        )
    roots = [data_root] if data_root is not None else [DEFAULT_DATA_ROOT.expanduser()]
    if data_root is None and name == "fashion-mnist":
        roots.append(SYSTEM_FASHION_MNIST)
    missing: list[Path] = []
    for root in roots:
        found, missing_here = _locate(name, split, root)
        if not missing_here:
            return (*_read_split(name, found, spec), root)
        missing.extend(missing_here)
    if download:
        root = roots[0]
        with _one_download_at_a_time(root):
            # another process (a torchrun rank) may have fetched it while this one waited
            found, missing_here = _locate(name, split, root)
            if missing_here:
                logger.info("downloading %s (%s) into %s", name, split, root)
                try:
                    _download(name, split, root)
                except Exception as exc:  # network, HTTP, checksum, disk: all end the same way
                    why = _download_reason(exc)
                    raise DataError(
                        f"{name}: download into {root} failed ({type(exc).__name__}: {why}). "
                        f"{_how_to_get(name)}"
                    ) from exc
                found, missing_here = _locate(name, split, root)
        if not missing_here:
            return (*_read_split(name, found, spec), root)
        missing = missing_here
    shown = ", ".join(f"{p} (a folder, not the file)" if p.is_dir() else str(p) for p in missing)
    hint = ""
    if data_root is not None and (above := _layout_above(name, split, data_root)) is not None:
        hint = f" The split is in torchvision's layout under {above}: give --data-root {above}."
    elif data_root is not None and name == "mnist" and _idx_files_directly_in(split, data_root):
        hint = (
            f" The idx files are directly in {data_root}: MNIST's go in "
            f"{data_root / _IDX_DIRS[name] / 'raw'} (Fashion-MNIST's files have the same names, "
            "so only the folder tells the two apart)."
        )
    raise DataError(f"{name} {split} split not found: missing {shown}.{hint} {_how_to_get(name)}")


def _idx_files_directly_in(split: str, root: Path) -> bool:
    """Whether ``root`` itself holds the split's idx files (plain or .gz)."""
    with contextlib.suppress(DataError):  # a folder this user may not enter: no hint
        return all(
            _is_file(root / base) or _is_file(root / f"{base}.gz") for base in _idx_names(split)
        )
    return False


def _layout_above(name: str, split: str, root: Path) -> Path | None:
    """The folder one or two levels above ``root`` that holds the split in torchvision's
    layout, where ``root`` names the dataset's own folder (DIR/cifar-10-batches-py,
    DIR/MNIST/raw) instead of DIR; else None."""
    for above in root.parents[:2]:
        with contextlib.suppress(DataError):  # a folder this user may not enter: no hint
            if not _locate(name, split, above)[1]:
                return above
    return None


__all__ = ["DEFAULT_DATA_ROOT", "SYSTEM_FASHION_MNIST", "load_real"]
