"""Feature-space augmentation of cached samples: seeded per (epoch, sample), scaled by the
map's stride, applied only to batches read from a cache."""

from __future__ import annotations

import pytest
import torch

from prefast import TrainConfig, train
from prefast.data import DataError, DatasetSpec, FeatureAugment, feature_key, spec_for
from prefast.models import UnitModel, create_model

CIFAR = spec_for("cifar10")  # pad 4, flips
MNIST = spec_for("mnist")  # pad 2, no flips


def test_draws_depend_only_on_key_and_sample():
    fa = FeatureAugment.from_spec(CIFAR, "shift+flip")
    a_shift, a_flip = fa.draws(feature_key(0, 3), 50)
    b_shift, b_flip = fa.draws(feature_key(0, 3), 77)  # longer: the first 50 unchanged
    assert torch.equal(a_shift, b_shift[:50]) and torch.equal(a_flip, b_flip[:50])
    c_shift, _ = fa.draws(feature_key(0, 4), 50)
    assert not torch.equal(a_shift, c_shift)
    assert (
        int(a_shift.min()) >= -4 and int(a_shift.max()) <= 4 and a_flip.any() and not a_flip.all()
    )


def test_shift_range_scales_with_the_stride():
    fa = FeatureAugment.from_spec(CIFAR, "shift")
    assert [fa.pad_at(s) for s in (32, 16, 8, 4)] == [4, 2, 1, 1]
    fm = FeatureAugment.from_spec(spec_for("fashion-mnist"), "shift")
    assert [fm.pad_at(s) for s in (28, 14, 7)] == [2, 1, 1]
    assert not FeatureAugment.from_spec(MNIST, "shift+flip").flip  # mnist is never flipped


def test_apply_shifts_with_zero_padding_and_flips():
    fa = FeatureAugment.from_spec(CIFAR, "shift+flip")
    h = torch.arange(3 * 2 * 8 * 8, dtype=torch.float32).view(3, 2, 8, 8)  # 8x8: stride 4, 1 px
    shift = torch.tensor([[4, 0], [0, -4], [0, 0]])
    flips = torch.tensor([False, False, True])
    out = fa.apply(h, shift, flips)
    # sample 0: down by one row in the crop, i.e. content moves up one row, zeros enter below
    assert torch.equal(out[0, :, :-1], h[0, :, 1:]) and not out[0, :, -1].any()
    # sample 1: content moves right one column, zeros enter on the left
    assert torch.equal(out[1, :, :, 1:], h[1, :, :, :-1]) and not out[1, :, :, 0].any()
    assert torch.equal(out[2], h[2].flip(-1))


@pytest.mark.parametrize(
    ("spec", "size"), [(CIFAR, 16), (CIFAR, 8), (spec_for("fashion-mnist"), 7)]
)
def test_opposite_image_shifts_move_the_map_by_opposite_amounts(spec, size):
    """Every image-space shift s is scaled to the map as -(the scaling of -s): the feature
    shifts average to zero as the image crops do (halves rounded up moved them right)."""
    fa = FeatureAugment.from_spec(spec, "shift")
    p, c = fa.pad, size // 2
    s = torch.arange(-p, p + 1)
    h = torch.zeros(len(s), 1, size, size)
    h[:, :, c, c] = 1.0  # one lit pixel in the middle
    out = fa.apply(
        h, torch.stack([torch.zeros_like(s), s], 1), torch.zeros(len(s), dtype=torch.bool)
    )
    moved = [c - int(o[0, c].nonzero()[0]) for o in out]  # the crop's offset in feature pixels
    assert moved == [-m for m in reversed(moved)]
    q = fa.pad_at(size)
    expected = {16: [-2, -2, -1, -1, 0, 1, 1, 2, 2], 8: [-1, -1, -1, 0, 0, 0, 1, 1, 1]}
    assert moved == expected.get(size, [-1, -1, 0, 1, 1]) and max(moved) == q


def test_flip_only_feature_augmentation_flips_without_shifting():
    """A dataset that flips but does not crop (pad 0): only the flips apply (the shift scaling
    divided by the pad: a ZeroDivisionError)."""
    spec = DatasetSpec("flip-only", 1, 8, 10, (0.5,), (0.25,), pad=0, flip=True)
    fa = FeatureAugment.from_spec(spec, "shift+flip")
    shift, flips = fa.draws(feature_key(0, 1), 64)
    assert not shift.any() and flips.any() and not flips.all()
    shift = shift[:2]
    h = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = fa.apply(h, shift, torch.tensor([True, False]))
    assert torch.equal(out[0], h[0].flip(-1)) and torch.equal(out[1], h[1])


@pytest.mark.parametrize(("mode", "enabled"), [("none", True), ("shift+flip", False)])
def test_none_and_no_augmentation_are_the_identity(mode, enabled):
    fa = FeatureAugment.from_spec(CIFAR, mode, enabled=enabled)
    h = torch.randn(2, 3, 8, 8)
    assert (
        fa.identity
        and fa.apply(h, torch.ones(2, 2, dtype=torch.int64), torch.ones(2, dtype=torch.bool)) is h
    )


def test_unknown_mode_names_the_flag():
    with pytest.raises(DataError, match="--feature-aug"):
        FeatureAugment.from_spec(CIFAR, "rotate")


TINY = dict(dataset="synthetic", num_samples=96, model="densenet_bc", model_args={"depth": 16, "growth": 8},
            epochs=3, batch_size=16, t0=0.3, how_scale="linear", seed=0, device="cpu", progress=False,
            eval_batch_size=256)  # fmt: skip


def test_feature_aug_changes_only_cached_training():
    base = dict(TINY, mode="prefast", cache="ram", recache_policy="every")
    plain = train(TrainConfig(**base))
    aug = train(TrainConfig(**base, feature_aug="shift+flip"))
    again = train(TrainConfig(**base, feature_aug="shift+flip"))
    first_cached = next(k for k, r in enumerate(plain.records) if r["cache_boundary"] > 0)
    steps_before = first_cached * 6  # 96 / 16 steps an epoch; epochs before any cache agree
    assert plain.losses[:steps_before] == aug.losses[:steps_before]
    assert plain.losses != aug.losses  # once samples come from the cache, they move
    assert aug.losses == again.losses  # seeded: reproducible
    fo = dict(TINY, mode="freezeout")
    assert (
        train(TrainConfig(**fo)).losses == train(TrainConfig(**fo, feature_aug="shift+flip")).losses
    )


def _symmetric_prefix(name: str, **kw) -> UnitModel:
    """A model in eval mode whose every conv filter is its own mirror image."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3, image_size=32, **kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    return model


@pytest.mark.parametrize(
    ("name", "kw", "boundary", "exact"),
    [
        ("densenet_bc", {"depth": 10, "growth": 4}, 5, True),  # 32 -> 16 -> 8 by 2x2 pooling
        ("wrn", {"depth": 10, "widen": 1}, 3, False),  # 32 -> 16 by a stride-2 convolution
    ],
)
def test_flip_of_the_map_is_the_flip_of_the_image_only_after_even_pooling(
    name, kw, boundary, exact
):
    """What the docs say of the feature-space flip: for flip-symmetric filters it is the flip
    of the image where every downsampling is 2x2 pooling of an even-sized map; a stride-2
    convolution samples the flipped image one pixel off."""
    model = _symmetric_prefix(name, **kw)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        of_flipped = model.forward_range(x.flip(-1), 0, boundary)
        flipped = model.forward_range(x, 0, boundary).flip(-1)
    assert torch.allclose(of_flipped, flipped, atol=1e-5) == exact
