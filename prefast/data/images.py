"""One split of a dataset held in memory as a contiguous uint8 tensor plus int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prefast.data.specs import DatasetSpec
from prefast.errors import DataError

# Last words of the seed sequences that draw subsets and held-out splits: streams of their
# own, apart from augmentation's and store.order's.
_SUBSET_STREAM = 0x53_5542  # "SUB"
_SPLIT_STREAM = 0x53_504C  # "SPL"


@dataclass(eq=False)
class ImageData:
    """One split in memory: ``images`` (N, C, H, W) uint8 contiguous, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"images must be a (N, C, H, W) uint8 tensor, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if tuple(self.images.shape[1:]) != self.spec.shape:
            raise DataError(
                f"images have shape {tuple(self.images.shape[1:])} per sample, "
                f"dataset {self.spec.name!r} needs {self.spec.shape}"
            )
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise DataError(f"labels must be ({len(self.images)},), got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            dtype = self.labels.dtype
            # a complex label lost its imaginary part in the cast (1+5j became class 1)
            if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise DataError(f"labels must be integers, got {dtype}")
            self.labels = self.labels.to(torch.int64)
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.spec.num_classes
        ):
            raise DataError(
                f"labels must be in [0, {self.spec.num_classes}), got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageData:
        """The same split with images and labels on ``device`` (itself when already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return ImageData(self.images.to(device), self.labels.to(device), self.spec)

    def _take(self, indices: np.ndarray) -> ImageData:
        idx = torch.from_numpy(indices).to(self.images.device)
        return ImageData(self.images[idx], self.labels[idx], self.spec)

    def subset(self, n: int, seed: int) -> ImageData:
        """A seeded random subset of ``n`` samples, kept in dataset order."""
        if not is_whole(n) or not 1 <= n <= len(self):
            raise DataError(f"subset size must be an integer in [1, {len(self)}], got {n!r}")
        n = int(n)
        perm = np.random.default_rng([check_seed(seed), _SUBSET_STREAM]).permutation(len(self))
        return self._take(np.sort(perm[:n]))

    def split_off(self, n: int, seed: int) -> tuple[ImageData, ImageData]:
        """Split off ``n`` seeded random samples (e.g. a validation set): ``(rest, held_out)``.

        Both parts keep dataset order; they are disjoint and together hold every sample.
        """
        if not is_whole(n) or not 1 <= n < len(self):
            raise DataError(f"held-out size must be an integer in [1, {len(self) - 1}], got {n!r}")
        n = int(n)
        perm = np.random.default_rng([check_seed(seed), _SPLIT_STREAM]).permutation(len(self))
        return self._take(np.sort(perm[n:])), self._take(np.sort(perm[:n]))


def is_whole(value: object) -> bool:
    """An int or a numpy integer, not a bool: sizes and seeds (a float was truncated, 1.5
    drawing seed 1's data, or failed in numpy with a bare TypeError)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_seed(seed: int) -> int:
    if not is_whole(seed) or seed < 0:
        raise DataError(f"seeds must be integers >= 0, got {seed!r}")
    return int(seed)


__all__ = ["ImageData", "check_seed", "is_whole"]
