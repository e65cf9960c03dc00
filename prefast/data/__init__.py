"""Image datasets held in memory as uint8 tensors, with seeded, vectorised per-sample augmentation.

Every dataset PreFast trains on fits in host memory, so a split is one contiguous
``(N, C, H, W)`` uint8 tensor plus int64 labels (:class:`ImageData`).

- ``specs``: what each dataset's images look like (:class:`DatasetSpec`).
- ``readers``: torchvision's on-disk layouts, parsed safely; ``synthetic``: generated data.
- ``augment``: seeded crop/flip per sample and :func:`make_batch`.
- ``splits``: :func:`load_dataset` (one split) and :func:`load_data` (a run's splits).
"""

from typing import TYPE_CHECKING

from prefast.errors import DataError

if TYPE_CHECKING:
    from prefast.data.augment import (
        FEATURE_AUG_MODES,
        Augment,
        AugParams,
        FeatureAugment,
        epoch_key,
        feature_key,
        make_batch,
        view_key,
    )
    from prefast.data.images import ImageData
    from prefast.data.readers import DEFAULT_DATA_ROOT, SYSTEM_FASHION_MNIST
    from prefast.data.specs import DATASETS, SHAPES, SPLITS, DatasetSpec, spec_for
    from prefast.data.splits import Datasets, load_data, load_dataset
else:  # imported on first use (store._lazy): the specs need no torch
    from store._lazy import exports

    __getattr__, __dir__ = exports(
        __name__,
        {
            "prefast.data.augment": (
                "FEATURE_AUG_MODES",
                "Augment",
                "AugParams",
                "FeatureAugment",
                "epoch_key",
                "feature_key",
                "make_batch",
                "view_key",
            ),
            "prefast.data.images": ("ImageData",),
            "prefast.data.readers": ("DEFAULT_DATA_ROOT", "SYSTEM_FASHION_MNIST"),
            "prefast.data.specs": ("DATASETS", "SHAPES", "SPLITS", "DatasetSpec", "spec_for"),
            "prefast.data.splits": ("Datasets", "load_data", "load_dataset"),
        },
    )

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_ROOT",
    "FEATURE_AUG_MODES",
    "SHAPES",
    "SPLITS",
    "SYSTEM_FASHION_MNIST",
    "AugParams",
    "Augment",
    "DataError",
    "DatasetSpec",
    "Datasets",
    "FeatureAugment",
    "ImageData",
    "epoch_key",
    "feature_key",
    "load_data",
    "load_dataset",
    "make_batch",
    "spec_for",
    "view_key",
]
