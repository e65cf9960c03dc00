"""Learnable synthetic images of any size, CIFAR- or MNIST-shaped, from a seed."""

from __future__ import annotations

import numpy as np

from prefast.data.specs import SPLITS, DatasetSpec
from prefast.errors import DataError

_SYNTH_STREAM = 0x53_594E  # "SYN": last word of the generator seeds

DEFAULT_TRAIN_SIZE = 50_000


def default_size(split: str, train_size: int = DEFAULT_TRAIN_SIZE) -> int:
    """Samples in a synthetic split: ``train_size`` for train; for test a fifth of it, at
    least 256 and at most 10,000 (10,000 for the default 50,000)."""
    if split == "train":
        return train_size
    return min(10_000, max(256, train_size // 5))


_SYNTH_BLOCK = 1024  # samples per seeded block; fixed so generation is prefix-stable
_SYNTH_SHIFT = 3  # max translation of the class prototype, pixels
_SYNTH_CONTRASTS = 8  # contrast levels, evenly spaced in [0.5, 1.5]
_SYNTH_CLUTTER = 2048  # smooth background patterns shared by all samples
_SYNTH_CLUTTER_AMP = 48.0  # clutter std, grey levels
_SYNTH_NOISE = 64  # per-pixel uniform noise width, grey levels
_SYNTH_AMP = {"cifar": 24.0, "mnist": 32.0}  # prototype std at contrast 1, grey levels


def _smooth_fields(
    rng: np.random.Generator, n: int, channels: int, size: int, cells: int
) -> np.ndarray:
    """``n`` smooth random fields (n, C, size, size) fp32, zero mean per channel, unit std:
    a cells x cells Gaussian grid blurred up to size x size with a Gaussian kernel."""
    centers = (np.arange(cells) + 0.5) * size / cells
    pos = np.arange(size) + 0.5
    width = size / cells
    basis = np.exp(-0.5 * ((pos[:, None] - centers[None, :]) / width) ** 2)  # (size, cells)
    basis = (basis / basis.sum(axis=1, keepdims=True)).astype(np.float32)
    z = rng.standard_normal((n, channels, cells, cells), dtype=np.float32)
    # basis @ z @ basis.T, one term at a time: a matmul's BLAS kernel, and with it the order
    # of its sums and their float32 rounding, depends on the CPU, so one seed drew other
    # pixels on another machine (a rank of another node); products and sums of arrays are
    # rounded the same everywhere
    rows = np.zeros((n, channels, size, cells), dtype=np.float32)
    for i in range(cells):
        rows += basis[:, i, None] * z[:, :, i, None, :]
    fields = np.zeros((n, channels, size, size), dtype=np.float32)
    for j in range(cells):
        fields += rows[:, :, :, j, None] * basis[:, j]
    fields -= fields.mean(axis=(2, 3), keepdims=True)  # zero mean per channel
    fields /= fields.std(axis=(1, 2, 3), keepdims=True)
    return fields


def synthetic(
    split: str, num_samples: int, seed: int, shape: str, spec: DatasetSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images (N, C, H, W) uint8 and balanced-ish labels (N,) int64.

    A sample of class k is k's smooth random prototype at a random contrast and a random
    translation of up to 3 pixels, plus one of 2,048 smooth clutter patterns and uniform
    per-pixel noise. Prototypes and clutter depend only on ``seed``; the per-sample draws also
    on the split, in blocks of 1,024 samples, so a longer dataset extends a shorter one.
    """
    c, h = spec.channels, spec.image_size
    k, s = spec.num_classes, 2 * _SYNTH_SHIFT + 1
    pixels = c * h * h
    shared = np.random.default_rng([seed, _SYNTH_STREAM, 0])
    protos = _smooth_fields(shared, k, c, h + 2 * _SYNTH_SHIFT, 6)  # (K, C, H+2s, W+2s)
    shifted = np.stack(
        [protos[:, :, dy : dy + h, dx : dx + h] for dy in range(s) for dx in range(s)], axis=1
    )  # (K, S*S, C, H, W)
    contrasts = np.linspace(0.5, 1.5, _SYNTH_CONTRASTS, dtype=np.float32) * _SYNTH_AMP[shape]
    # Every (class, shift, contrast) image, pre-rounded: row (k * S*S + shift) * levels + level.
    table = np.rint(shifted[:, :, None] * contrasts[:, None, None, None]).astype(np.int16)
    table = table.reshape(-1, pixels)  # (K * S*S * levels, C*H*W)
    clutter_fp = _smooth_fields(shared, _SYNTH_CLUTTER, c, h, 8) * _SYNTH_CLUTTER_AMP
    clutter = np.rint(clutter_fp).astype(np.int16).reshape(_SYNTH_CLUTTER, pixels)

    split_tag = 1 + SPLITS.index(split)
    blocks = -(-num_samples // _SYNTH_BLOCK)
    try:
        flat = np.empty((blocks * _SYNTH_BLOCK, pixels), dtype=np.uint8)
        labels = np.empty(blocks * _SYNTH_BLOCK, dtype=np.int64)
    except (MemoryError, ValueError) as e:  # ValueError: more elements than numpy indexes
        raise DataError(
            f"num_samples={num_samples} (--num-samples): {num_samples} synthetic {c}x{h}x{h} "
            f"{split} images take {num_samples * (pixels + 8) / 1e9:.3g} GB of memory, more "
            f"than this machine can allocate ({e}); ask for fewer"
        ) from None
    acc = np.empty((_SYNTH_BLOCK, pixels), dtype=np.int16)  # grey levels before clipping
    offset = 128 - _SYNTH_NOISE // 2
    for b in range(blocks):
        rng = np.random.default_rng([seed, _SYNTH_STREAM, split_tag, b])
        y = rng.integers(0, k, _SYNTH_BLOCK)
        shift = rng.integers(0, s * s, _SYNTH_BLOCK)
        level = rng.integers(0, _SYNTH_CONTRASTS, _SYNTH_BLOCK)
        np.take(table, (y * s * s + shift) * _SYNTH_CONTRASTS + level, axis=0, out=acc)
        acc += clutter[rng.integers(0, _SYNTH_CLUTTER, _SYNTH_BLOCK)]
        acc += rng.integers(0, _SYNTH_NOISE, (_SYNTH_BLOCK, pixels), dtype=np.uint8)
        acc += offset
        np.clip(acc, 0, 255, out=acc)
        rows = slice(b * _SYNTH_BLOCK, (b + 1) * _SYNTH_BLOCK)
        flat[rows] = acc
        labels[rows] = y
    return flat[:num_samples].reshape(num_samples, c, h, h), labels[:num_samples]


__all__ = ["DEFAULT_TRAIN_SIZE", "default_size", "synthetic"]
