"""Tiny fake copies of CIFAR-10/100, MNIST and Fashion-MNIST in torchvision's on-disk layouts.

Every pixel encodes its sample, channel and position (:func:`fake_pixels`), so a reader that
mixes up samples, channels, rows or columns is caught. The writers return what a correct
reader must produce: images (N, C, H, W) uint8 and labels (N,) int64 per split. The files
carry no valid md5, so torchvision itself refuses them; prefast's own readers do not check.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_TRAIN = 23  # odd sizes, so CIFAR-10's five train batches are uneven
N_TEST = 7

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
IDX_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10}


@dataclass(frozen=True)
class FakeSplit:
    """What a reader must return: images (N, C, H, W) uint8, labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray


def fake_pixels(n: int, channels: int, size: int, start: int = 0) -> np.ndarray:
    """(n, C, size, size) uint8 with pixel (i, c, y, x) = (7 (start + i) + 50 c + 3 y + x) % 256."""
    i = np.arange(start, start + n).reshape(-1, 1, 1, 1)
    c = np.arange(channels).reshape(1, -1, 1, 1)
    y = np.arange(size).reshape(1, 1, -1, 1)
    x = np.arange(size).reshape(1, 1, 1, -1)
    return ((7 * i + 50 * c + 3 * y + x) % 256).astype(np.uint8)


def fake_labels(n: int, num_classes: int, start: int = 0) -> np.ndarray:
    """(n,) int64 with label i = (3 (start + i) + 1) % num_classes."""
    return (3 * np.arange(start, start + n, dtype=np.int64) + 1) % num_classes


def _fake_split(name: str, split: str, n_train: int, n_test: int) -> FakeSplit:
    channels, size = (3, 32) if name in CIFAR_DIRS else (1, 28)
    n, start = (n_train, 0) if split == "train" else (n_test, n_train)
    return FakeSplit(
        fake_pixels(n, channels, size, start), fake_labels(n, NUM_CLASSES[name], start)
    )


def write_cifar_pickle(path: Path, entries: dict[bytes, object]) -> None:
    """A CIFAR-style pickle (protocol 2, bytes keys, like the original Python 2 files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(entries, f, protocol=2)


def write_fake_cifar(
    root: Path, name: str = "cifar10", n_train: int = N_TRAIN, n_test: int = N_TEST
) -> dict[str, FakeSplit]:
    """Write ``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta) or
    ``root/cifar-100-python`` (train, test, meta); each data row is R(1024) G(1024) B(1024)."""
    out = {s: _fake_split(name, s, n_train, n_test) for s in ("train", "test")}
    folder = Path(root) / CIFAR_DIRS[name]
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    def write(path: Path, split: FakeSplit) -> None:
        entries: dict[bytes, object] = {
            b"batch_label": path.name.encode(),
            label_key: [int(v) for v in split.labels],
            b"data": split.images.reshape(len(split.images), -1),  # (N, 3072)
            b"filenames": [f"img_{i}.png".encode() for i in range(len(split.images))],
        }
        if name == "cifar100":
            entries[b"coarse_labels"] = [int(v) // 5 for v in split.labels]
        write_cifar_pickle(path, entries)

    if name == "cifar10":
        parts = np.array_split(np.arange(n_train), 5)
        for b, rows in enumerate(parts, start=1):
            train = out["train"]
            write(folder / f"data_batch_{b}", FakeSplit(train.images[rows], train.labels[rows]))
        write(folder / "test_batch", out["test"])
        write_cifar_pickle(
            folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]}
        )
    else:
        write(folder / "train", out["train"])
        write(folder / "test", out["test"])
        write_cifar_pickle(folder / "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)]})
    return out


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """An idx file of uint8 ``array``, gzip-compressed when ``path`` ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)


def idx_paths(
    root: Path, name: str, split: str, layout: str = "torchvision", compress: bool = False
) -> tuple[Path, Path]:
    """(images, labels) paths: ``root/MNIST/raw/...`` ("torchvision") or ``root/...`` ("flat")."""
    folder = Path(root) / IDX_DIRS[name] / "raw" if layout == "torchvision" else Path(root)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if compress else ""
    return (
        folder / f"{prefix}-images-idx3-ubyte{ext}",
        folder / f"{prefix}-labels-idx1-ubyte{ext}",
    )


def write_fake_idx(
    root: Path,
    name: str = "mnist",
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    layout: str = "torchvision",
    compress: bool = False,
) -> dict[str, FakeSplit]:
    """Write MNIST or Fashion-MNIST idx files (train and t10k images and labels)."""
    out = {s: _fake_split(name, s, n_train, n_test) for s in ("train", "test")}
    for split, data in out.items():
        images_path, labels_path = idx_paths(root, name, split, layout, compress)
        write_idx(images_path, data.images[:, 0])  # (N, 28, 28)
        write_idx(labels_path, data.labels.astype(np.uint8))
    return out


def write_fake(root: Path, name: str, **kwargs: Any) -> dict[str, FakeSplit]:
    """Write a fake copy of any real dataset in torchvision's default layout; MNIST
    uncompressed, Fashion-MNIST gzip-compressed (torchvision keeps both)."""
    if name in CIFAR_DIRS:
        return write_fake_cifar(root, name, **kwargs)
    kwargs.setdefault("compress", name == "fashion-mnist")
    return write_fake_idx(root, name, **kwargs)


__all__ = [
    "N_TEST",
    "N_TRAIN",
    "FakeSplit",
    "fake_labels",
    "fake_pixels",
    "idx_paths",
    "write_cifar_pickle",
    "write_fake",
    "write_fake_cifar",
    "write_fake_idx",
    "write_idx",
]
