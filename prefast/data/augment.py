"""Seeded, vectorised per-sample augmentation (random crop + horizontal flip) and batches.

Augmentation is a pure function of a key and the sample index. :meth:`Augment.params` draws
the crop offsets and flips of *all* samples at once from one seeded generator, so sample
``i``'s augmentation depends only on ``(key, i)``, never on which batch it lands in or in
what order. The trainer keys cached view ``v`` with :func:`view_key` ``(seed, 0, v)`` and the
fresh draw of epoch ``e`` with :func:`epoch_key` ``(seed, 1, e)``.

:func:`make_batch` gathers the uint8 rows, moves them to the device, then random-crops and
flips every sample at once with advanced indexing and normalises in float: no DataLoader
workers and no PIL in the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prefast.data.images import ImageData, is_whole
from prefast.data.specs import DatasetSpec
from prefast.errors import DataError
from store.tiers import to_device

# Last word of every augmentation seed sequence. It keeps the augmentation draws apart from
# store.order's streams, which seed with [seed, epoch, 0..2] (SeedSequence pads with zeros,
# so (seed, 0, view) alone would equal the epoch-0 permutation stream for view 0).
_AUG_STREAM = 0x41_5547  # "AUG"


def view_key(seed: int, view: int) -> tuple[int, int, int]:
    """Augmentation key of cached view ``view``: ``(seed, 0, view)``."""
    return (seed, 0, view)


def epoch_key(seed: int, epoch: int) -> tuple[int, int, int]:
    """Augmentation key of the fresh per-epoch draw of epoch ``epoch``: ``(seed, 1, epoch)``."""
    return (seed, 1, epoch)


def feature_key(seed: int, epoch: int) -> tuple[int, int, int]:
    """Key of epoch ``epoch``'s feature-space augmentation of cached samples: ``(seed, 2, epoch)``."""
    return (seed, 2, epoch)


@dataclass(frozen=True, eq=False)
class AugParams:
    """Per-sample augmentation of a whole split, indexed by sample id.

    ``offsets`` (N, 2) int64 holds each sample's crop origin (dy, dx) in the zero-padded image,
    in [0, 2 * pad]; (pad, pad) is no shift. ``flips`` (N,) bool flips horizontally after the
    crop.
    """

    pad: int
    offsets: torch.Tensor
    flips: torch.Tensor

    def __len__(self) -> int:
        return len(self.flips)

    @property
    def identity(self) -> bool:
        """True when no sample is shifted or flipped."""
        return (self.pad == 0 or bool((self.offsets == self.pad).all())) and not bool(
            self.flips.any()
        )


def _check_fields(owner: str, pad: object, flip: object) -> None:
    """``pad`` a whole number >= 0 (1.5 drew offsets past the padding and failed in F.pad; True
    padded one pixel), ``flip`` a bool (the string "no" flipped)."""
    if not is_whole(pad) or pad < 0:  # type: ignore[operator]
        raise DataError(f"{owner}.pad must be an integer >= 0, got {pad!r}")
    if not isinstance(flip, bool | np.bool_):
        raise DataError(f"{owner}.flip must be True or False, got {flip!r}")


@dataclass(frozen=True)
class Augment:
    """Random crop (zero padding ``pad``, then crop back) and random horizontal flip."""

    pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        _check_fields("Augment", self.pad, self.flip)
        object.__setattr__(self, "pad", int(self.pad))
        object.__setattr__(self, "flip", bool(self.flip))

    @classmethod
    def from_spec(cls, spec: DatasetSpec, enabled: bool = True) -> Augment:
        """The spec's standard augmentation, or the identity when not ``enabled``."""
        return cls(pad=spec.pad, flip=spec.flip) if enabled else cls()

    @property
    def identity(self) -> bool:
        return self.pad == 0 and not self.flip

    def params(self, key: Sequence[int], num_samples: int) -> AugParams:
        """Draw every sample's crop offset and flip at once from a generator seeded by ``key``.

        Sample ``i``'s draw depends only on ``(key, i)``: a longer ``num_samples`` extends the
        draws without changing the first ones.
        """
        if not is_whole(num_samples) or num_samples < 0:
            raise DataError(f"num_samples must be an integer >= 0, got {num_samples!r}")
        num_samples = int(num_samples)
        if not key or any(not is_whole(k) or k < 0 for k in key):
            raise DataError(
                f"augmentation key must be non-empty non-negative integers, got {list(key)}"
            )
        key = [int(k) for k in key]
        if self.identity:
            offsets = np.zeros((num_samples, 2), dtype=np.int64)
            flips = np.zeros(num_samples, dtype=bool)
        else:
            rng = np.random.default_rng([*key, _AUG_STREAM])
            high = [2 * self.pad + 1, 2 * self.pad + 1, 2 if self.flip else 1]
            draws = rng.integers(0, high, size=(num_samples, 3), dtype=np.int64)  # (N, 3)
            offsets = np.ascontiguousarray(draws[:, :2])  # (N, 2) dy, dx
            flips = draws[:, 2].astype(bool)  # (N,)
        return AugParams(self.pad, torch.from_numpy(offsets), torch.from_numpy(flips))

    def to_dict(self) -> dict[str, Any]:
        return {"pad": self.pad, "flip": self.flip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Augment:
        unknown = set(d) - {"pad", "flip"}
        if unknown:
            raise DataError(f"Augment: unknown fields {sorted(unknown)}; allowed: ['flip', 'pad']")
        return cls(pad=d.get("pad", 0), flip=d.get("flip", False))  # checked as given


def _crop_flip(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int
) -> torch.Tensor:
    """Crop each sample of ``x`` (B, C, H, W) at its offset in the zero-padded image, then flip.

    One gather for the whole batch: output pixel (y, x) of sample b reads padded pixel
    (dy_b + y, dx_b + x), or (dy_b + y, dx_b + W - 1 - x) when b is flipped.
    """
    b, c, h, w = x.shape
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p), zeros outside
    wp = w + 2 * pad
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    rows = offsets[:, 0:1] + ys  # (B, H)
    cols = offsets[:, 1:2] + torch.where(flips[:, None], w - 1 - xs, xs)  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)  # (B, 1, H*W)
    # every size spelled out: a -1 is ambiguous for an empty batch (B = 0)
    out = x.reshape(b, c, (h + 2 * pad) * wp).gather(2, flat.expand(b, c, h * w))  # (B, C, H*W)
    return out.view(b, c, h, w)


FEATURE_AUG_MODES: tuple[str, ...] = ("none", "shift", "shift+flip")


@dataclass(frozen=True)
class FeatureAugment:
    """Augmentation of cached activations in feature space (docs/training.md, augmentation and views).

    Once a sample's frozen-prefix output is cached, every later epoch would train on the same
    augmented view. This draws, per (epoch, sample), a shift of the image-space crop range
    ``[-pad, pad]`` and (``flip``) a horizontal flip, and applies them to the feature map that
    enters the trainable units: the shift is scaled by the map's stride (``pad / stride``
    feature pixels, half rounded up, zero padding, whole pixels), so a sample moves the same
    way at every boundary. Both are approximations: a shift is exact only away from borders
    and pooling phase, a flip only for flip-symmetric frozen filters whose every downsampling
    is 2x2 pooling of an even-sized map (DenseNet; VGG on 32x32 images). A stride-2
    convolution (ResNet, WRN) or pooling an odd-sized map (VGG's 7x7 on 28x28 images) samples
    the flipped image one pixel off: there the flip is off even for symmetric filters.
    """

    pad: int = 0
    flip: bool = False
    image_size: int = 32

    def __post_init__(self) -> None:
        _check_fields("FeatureAugment", self.pad, self.flip)
        if not is_whole(self.image_size) or self.image_size < 1:
            raise DataError(
                f"FeatureAugment.image_size must be an integer >= 1, got {self.image_size!r}"
            )
        object.__setattr__(self, "pad", int(self.pad))
        object.__setattr__(self, "flip", bool(self.flip))

    @classmethod
    def from_spec(cls, spec: DatasetSpec, mode: str, enabled: bool = True) -> FeatureAugment:
        """``mode`` in FEATURE_AUG_MODES; the identity when image augmentation is off."""
        if mode not in FEATURE_AUG_MODES:
            raise DataError(f"--feature-aug: {mode!r} is not one of {', '.join(FEATURE_AUG_MODES)}")
        if not enabled or mode == "none":
            return cls(image_size=spec.image_size)
        return cls(
            pad=spec.pad, flip=spec.flip and mode == "shift+flip", image_size=spec.image_size
        )

    @property
    def identity(self) -> bool:
        return self.pad == 0 and not self.flip

    def draws(self, key: Sequence[int], num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample's (shift (N, 2) int64 in [-pad, pad], flip (N,) bool) for ``key``:
        sample ``i``'s draw depends only on ``(key, i)``."""
        p = Augment(pad=self.pad, flip=self.flip).params(key, num_samples)
        return p.offsets - self.pad, p.flips

    def pad_at(self, size: int) -> int:
        """Feature pixels of shift range on a ``size`` x ``size`` map."""
        stride = max(1, self.image_size // max(size, 1))
        return int(self.pad / stride + 0.5) if self.pad else 0

    def apply(self, h: torch.Tensor, shift: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """``h`` (B, C, H, W) shifted and flipped per sample; ``shift`` (B, 2) int64 and
        ``flips`` (B,) bool on h's device (rows of ``draws``). Device ops only (no sync)."""
        if self.identity or h.dim() != 4:
            return h
        q = self.pad_at(int(h.shape[-1]))
        if q == 0 and not self.flip:
            return h
        # scale the image-space shift to this map: round(s * q / pad), halves away from zero so
        # that s and -s move by opposite amounts (rounding halves up moved the crops right and
        # down on average), then offsets in [0, 2q]
        if q == 0:  # no shift range on this map (or none at all: pad 0, flips only)
            offsets = torch.zeros_like(shift)
        else:
            mag = torch.div(shift.abs() * (2 * q) + self.pad, 2 * self.pad, rounding_mode="floor")
            offsets = shift.sign() * mag + q
        fl = flips if self.flip else torch.zeros_like(flips)
        return _crop_flip(h, offsets, fl, q)


@lru_cache(maxsize=64)
def _norm_consts(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each (C, 1, 1) fp32 on ``device``, with x_norm = x_uint8 * scale + bias
    (made once per device: read-only, shared by every batch)."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(-1, 1, 1)
    bias = (-m / s).to(torch.float32).view(-1, 1, 1)
    return scale.to(device), bias.to(device)


def _as_index(indices: np.ndarray | torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    """Indices as a CPU int64 tensor (B,), range-checked against ``n`` samples."""
    if isinstance(indices, torch.Tensor):
        # a float tensor was truncated (0.7 -> sample 0) and a bool mask read as ids 0 and 1
        if indices.numel() and (
            indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool
        ):
            raise DataError(f"indices must be integers, got dtype {indices.dtype}")
        idx = indices.detach().to("cpu", torch.int64)
    else:
        arr = np.asarray(indices)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"indices must be integers, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        idx = torch.from_numpy(arr)
    if idx.dim() != 1:
        raise DataError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise DataError(f"indices must be in [0, {n}), got [{int(idx.min())}, {int(idx.max())}]")
    return idx


def make_batch(
    data: ImageData,
    indices: np.ndarray | torch.Tensor | Sequence[int],
    aug: AugParams | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised, augmented batch of samples ``indices``: x (B, C, H, W) ``dtype``, y (B,)
    int64, both on ``device``.

    ``aug`` holds the parameters of every sample of ``data`` (from :meth:`Augment.params`);
    each sample gets its own row, so the result does not depend on batch composition. None
    means no augmentation.
    """
    device = torch.device(device)
    idx = _as_index(indices, len(data))  # (B,) CPU
    if aug is not None and len(aug) != len(data):
        raise DataError(f"augmentation parameters cover {len(aug)} samples, data has {len(data)}")
    src = data.images
    x = to_device(src[to_device(idx, src.device)], device)  # (B, C, H, W) uint8
    y = to_device(data.labels[to_device(idx, data.labels.device)], device)  # (B,) int64
    if aug is not None and (aug.pad > 0 or bool(aug.flips.any())):
        offsets = to_device(aug.offsets[idx], device)  # (B, 2)
        flips = to_device(aug.flips[idx], device)  # (B,)
        x = _crop_flip(x, offsets, flips, aug.pad)  # (B, C, H, W) uint8
    scale, bias = _norm_consts(data.spec.mean, data.spec.std, device)
    out = x.to(torch.float32).mul_(scale).add_(bias)  # (B, C, H, W) fp32
    return out.to(dtype), y


__all__ = [
    "FEATURE_AUG_MODES",
    "AugParams",
    "Augment",
    "FeatureAugment",
    "epoch_key",
    "feature_key",
    "make_batch",
    "view_key",
]
