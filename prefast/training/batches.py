"""Batches of images for the steps that start at boundary 0 (no cache yet, or none at all).

Epoch ``e`` visits ``epoch_permutation(N, seed, e)`` (this rank's ``rank_part`` of it), the
same order every cache tier's loader follows, with the epoch's fresh augmentation draw
``epoch_key(seed, e)`` (or cached view 0's while the first cache is written through).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from prefast.data import Augment, ImageData, make_batch
from store.order import epoch_permutation, rank_part

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, y, sample ids (host int64)


def image_batches(
    data: ImageData,
    augment: Augment,
    *,
    seed: int,
    epoch: int,
    aug_key: tuple[int, ...],
    start: int,
    batch_size: int,
    iterations: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Iterator[Batch]:
    """This rank's batches ``start .. iterations - 1`` of the epoch: x (B, C, H, W) float32
    and y (B,) on ``device``, and the batch's sample ids on the host. ``aug_key`` keys the
    augmentation draw (the epoch's fresh one, or a cached view's while it is written)."""
    n = len(data)
    order = rank_part(epoch_permutation(n, seed, epoch), rank, world_size)
    aug = augment.params(aug_key, n) if not augment.identity else None
    for k in range(start, iterations):
        idx = order[k * batch_size : (k + 1) * batch_size]
        x, y = make_batch(data, idx, aug, device)
        yield x, y, torch.from_numpy(idx)


__all__ = ["Batch", "image_batches"]
