"""Loading a run's splits: ``load_dataset`` for one split, ``load_data`` for a run's train,
test and optional validation sets plus the description a cache fingerprint records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prefast.data.augment import Augment
from prefast.data.images import ImageData, check_seed, is_whole
from prefast.data.readers import load_real
from prefast.data.specs import check_split, spec_for
from prefast.data.synthetic import DEFAULT_TRAIN_SIZE, default_size, synthetic
from prefast.errors import ConfigError, DataError

if TYPE_CHECKING:
    from prefast.config import TrainConfig

logger = logging.getLogger(__name__)


def load_dataset(
    name: str,
    split: str,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
    shape: str = "cifar",
) -> ImageData:
    """Load split ``split`` ("train" or "test") of dataset ``name`` into memory.

    Real datasets are read from ``data_root`` in torchvision's layout (default
    ``~/.cache/prefast/data``; Fashion-MNIST also accepts the raw idx .gz files directly in
    ``data_root`` and, when no root is given, falls back to the system copy in
    ``/usr/share/datasets/fashion-mnist``). Missing files are fetched with torchvision when
    ``download`` is set. ``num_samples`` then keeps a seeded random subset (see
    :meth:`ImageData.subset`).

    "synthetic" generates ``num_samples`` learnable images (default 50,000 train / 10,000
    test) of ``shape`` "cifar" (3x32x32) or "mnist" (1x28x28) from ``seed``; train and test
    share the class prototypes and differ in the per-sample draws.
    """
    spec = spec_for(name, shape)
    check_split(split)
    seed = check_seed(seed)
    if num_samples is not None:
        if not is_whole(num_samples) or num_samples < 1:
            raise DataError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        num_samples = int(num_samples)
    if name == "synthetic":
        n = default_size(split) if num_samples is None else num_samples
        images, labels = synthetic(split, n, seed, shape, spec)
        logger.debug("generated %d synthetic %s %s images (seed %d)", n, shape, split, seed)
        return ImageData(torch.from_numpy(images), torch.from_numpy(labels), spec)

    root = Path(data_root).expanduser() if data_root is not None else None
    images, labels, source = load_real(name, split, root, download)
    data = ImageData(torch.from_numpy(images), torch.from_numpy(labels), spec)
    logger.debug("loaded %s %s: %d images from %s", name, split, len(data), source)
    if num_samples is not None:
        if num_samples > len(data):
            raise DataError(
                f"num_samples={num_samples} exceeds the {len(data)} images of {name} {split}"
            )
        data = data.subset(num_samples, seed)
    return data


@dataclass
class Datasets:
    """A run's splits and the description of its training data (for cache fingerprints)."""

    train: ImageData
    test: ImageData
    val: ImageData | None
    desc: dict[str, Any]


def load_data(cfg: TrainConfig) -> Datasets:
    """The training split (full by default; ``subset`` and ``val_size`` carve it), the test split."""
    kw: dict[str, Any] = {
        "data_root": cfg.data_root,
        "download": cfg.download,
        "seed": cfg.seed,
        "shape": cfg.synthetic_shape,
    }
    if cfg.dataset == "synthetic":
        n = cfg.num_samples if cfg.num_samples is not None else DEFAULT_TRAIN_SIZE
        train = load_dataset("synthetic", "train", num_samples=n, **kw)
        test = load_dataset("synthetic", "test", num_samples=default_size("test", n), **kw)
    else:
        if cfg.num_samples is not None:
            raise ConfigError(
                "--num-samples: only for --dataset synthetic; use --subset N for a subset of a real dataset"
            )
        train = load_dataset(cfg.dataset, "train", **kw)
        test = load_dataset(cfg.dataset, "test", **kw)
    if cfg.subset is not None:
        if cfg.subset > len(train):
            raise ConfigError(f"--subset: {cfg.subset} exceeds the {len(train)} training images")
        train = train.subset(cfg.subset, cfg.seed)
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise ConfigError(
                f"--val-size: {cfg.val_size} leaves no training images (of {len(train)})"
            )
        train, val = train.split_off(cfg.val_size, cfg.seed)
    desc = {
        "dataset": cfg.dataset,
        "synthetic_shape": cfg.synthetic_shape if cfg.dataset == "synthetic" else None,
        "split": "train",
        "num_samples": len(train),
        "subset": cfg.subset,
        "val_size": cfg.val_size,
        "seed": cfg.seed,
        "augment": Augment.from_spec(train.spec, cfg.augment).to_dict(),
    }
    if cfg.dataset == "synthetic" and cfg.subset is not None:
        # the set a subset is drawn from: --num-samples 1000 and 2000 with --subset 500 are
        # other images with one description (and so one cache fingerprint) without it. Only
        # here: the other descriptions, and the fingerprints of their stores, stay as they were
        desc["subset_of"] = n
    return Datasets(train, test, val, desc)


__all__ = ["Datasets", "load_data", "load_dataset"]
