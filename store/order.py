"""The sample-order contract shared by every cache tier and by the image loader.

Epoch ``e`` of a run with seed ``s`` visits the samples in ``epoch_permutation(n, s, e)``;
rank ``r`` of ``w`` takes the disjoint, equal-sized part ``rank_part(order, r, w)``; sample ``i``
reads view ``epoch_views(n, v, s, e)[i]``. All three are pure functions of their arguments
(numpy's PCG64), so any reader, on any machine, reproduces the same batches.
"""

from __future__ import annotations

import numpy as np

from store.errors import StoreInputError, check_bool, check_int

# Distinct streams so the permutation and the view draw never share random numbers.
_PERM_STREAM = 0
_VIEW_STREAM = 1
_CHUNK_STREAM = 2


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    seed, epoch = check_int("seed", seed, 0), check_int("epoch", epoch, 0)
    return np.random.default_rng([seed, epoch, stream])


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Sample indices for one epoch, int64 (num_samples,)."""
    # a negative count gave an empty epoch, a str flag such as "False" a shuffled one
    num_samples = check_int("num_samples", num_samples, 0)
    if not check_bool("shuffle", shuffle):
        return np.arange(num_samples, dtype=np.int64)
    return _rng(seed, epoch, _PERM_STREAM).permutation(num_samples).astype(np.int64)


def rank_part(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s disjoint part of ``order``; every part has ``len(order) // world_size``
    entries (the last ``len(order) % world_size`` entries of the epoch are dropped, a different
    set each epoch when shuffled)."""
    # a bool was taken as rank 1 or one rank, a float failed in numpy's slicing
    rank, world_size = check_int("rank", rank), check_int("world_size", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreInputError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    if world_size == 1:
        return order
    per_rank = len(order) // world_size
    return order[rank : per_rank * world_size : world_size]


def epoch_views(num_samples: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """The view each sample reads in this epoch, int64 (num_samples,), indexed by sample id."""
    # views=2.5 drew views 0 and 1 only; a negative count failed in numpy
    num_samples, views = check_int("num_samples", num_samples, 0), check_int("views", views, 1)
    if views == 1:
        return np.zeros(num_samples, dtype=np.int64)
    return _rng(seed, epoch, _VIEW_STREAM).integers(0, views, size=num_samples, dtype=np.int64)


def chunk_rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator for the streaming reader's chunk order, buffer shuffles and per-chunk views."""
    return _rng(seed, epoch, _CHUNK_STREAM)


__all__ = ["chunk_rng", "epoch_permutation", "epoch_views", "rank_part"]
