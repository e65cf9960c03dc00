"""Models as units plus a head: structure, shapes, composition, init, costs, registry."""

from __future__ import annotations

import doctest
import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import prefast
from prefast.freezeout import set_train_modes
from prefast.models import (
    ModelError,
    UnitModel,
    create_model,
    from_sequential,
    list_models,
    register_model,
    unregister_model,
)
from prefast.models import custom as custom_module
from prefast.models.densenet import densenet_bc

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)

# Tiny configurations of every model, plus a second depth where it is still cheap.
TINY: list[tuple[str, dict[str, Any]]] = [
    ("densenet_bc", {"depth": 16, "growth": 8}),
    ("densenet_bc", {"depth": 22, "growth": 4, "reduction": 0.5}),
    ("densenet_bc", {"depth": 13, "growth": 4, "bottleneck": False}),
    ("wrn", {"depth": 10, "widen": 1}),
    ("wrn", {"depth": 16, "widen": 1}),
    ("vgg", {"depth": 11}),
    ("vgg", {"depth": 16}),
    ("resnet18", {}),
]


def _make(name: str, kwargs: dict[str, Any], shape: tuple[int, ...] = CIFAR) -> UnitModel:
    torch.manual_seed(0)
    return create_model(name, num_classes=7, in_channels=shape[0], image_size=shape[1], **kwargs)


@pytest.fixture(scope="module")
def densenet76() -> UnitModel:
    torch.manual_seed(0)
    return densenet_bc(num_classes=10, depth=76, growth=12)


def test_list_models() -> None:
    assert {"densenet_bc", "wrn", "vgg", "resnet18", "resnet34"} <= set(list_models())


def test_densenet76_units(densenet76: UnitModel) -> None:
    m = densenet76
    assert m.num_units == 39
    assert len(m.unit_names) == 39
    expected = {
        0: "conv1",
        1: "dense1.1",
        12: "dense1.12",
        13: "trans1",
        14: "dense2.1",
        26: "trans2",
        27: "dense3.1",
        38: "dense3.12",
    }
    for i, name in expected.items():
        assert m.unit_names[i] == name
    assert m.cut_points == (1, 14, 27)
    assert m.config == {
        "name": "densenet_bc",
        "num_classes": 10,
        "in_channels": 3,
        "image_size": 32,
        "depth": 76,
        "growth": 12,
        "reduction": 0.5,
        "bottleneck": True,
    }


def test_densenet76_boundary_shapes_cifar(densenet76: UnitModel) -> None:
    m = densenet76
    fp16_kib = {b: math.prod(m.boundary_shape(b, CIFAR)) * 2 / 1024 for b in (1, 13, 14, 27)}
    assert m.boundary_shape(0, CIFAR) == CIFAR
    assert m.boundary_shape(1, CIFAR) == (24, 32, 32)
    assert fp16_kib[1] == 48  # conv1
    assert m.boundary_shape(13, CIFAR) == (168, 32, 32)
    assert fp16_kib[13] == 336  # end of dense1
    assert m.boundary_shape(14, CIFAR) == (84, 16, 16)
    assert fp16_kib[14] == 42  # trans1
    assert m.boundary_shape(27, CIFAR) == (114, 8, 8)
    assert fp16_kib[27] == pytest.approx(14, abs=0.5)  # trans2
    assert m.boundary_shape(39, CIFAR) == (258, 8, 8)


def test_densenet76_mnist_shapes() -> None:
    torch.manual_seed(0)
    m = densenet_bc(num_classes=10, in_channels=1, image_size=28, depth=76, growth=12)
    assert [m.boundary_shape(b, MNIST) for b in m.cut_points] == [
        (24, 28, 28),
        (84, 14, 14),
        (114, 7, 7),
    ]


def test_densenet16_is_tiny() -> None:
    m = _make("densenet_bc", {"depth": 16, "growth": 8})
    assert m.num_units == 9  # conv1, 2 layers, trans1, 2 layers, trans2, 2 layers
    assert m.unit_names == (
        "conv1",
        "dense1.1",
        "dense1.2",
        "trans1",
        "dense2.1",
        "dense2.2",
        "trans2",
        "dense3.1",
        "dense3.2",
    )
    assert m.cut_points == (1, 4, 7)
    assert sum(p.numel() for p in m.parameters()) < 50_000


@pytest.mark.parametrize(("shape"), [CIFAR, MNIST], ids=["cifar", "mnist"])
@pytest.mark.parametrize(("name", "kwargs"), TINY, ids=[f"{n}{k}" for n, k in TINY])
def test_forward_range_composes(name: str, kwargs: dict[str, Any], shape: tuple[int, ...]) -> None:
    m = _make(name, kwargs, shape).eval()
    x = torch.randn(2, *shape)
    n = m.num_units
    with torch.no_grad():
        full = m(x)
        assert full.shape == (2, 7)
        for k in sorted({0, 1, n // 2, n - 1, n, *m.cut_points}):
            h = m.forward_range(x, 0, k)
            assert tuple(h.shape[1:]) == m.boundary_shape(k, shape)
            torch.testing.assert_close(m.forward_head(m.forward_range(h, k, n)), full)
        assert m.forward_range(x, 2, 2) is x


def test_forward_range_validation() -> None:
    m = _make("densenet_bc", {"depth": 16, "growth": 8})
    x = torch.randn(1, *CIFAR)
    for start, stop in [(-1, 2), (3, 2), (0, 10)]:
        with pytest.raises(ValueError, match=f"start={start}, stop={stop}, num_units=9"):
            m.forward_range(x, start, stop)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        m.boundary_shape(10, CIFAR)
    # a str or a float start failed with a TypeError from the comparison or from range()
    for start, stop in [("0", 2), (0.0, 2), (0, 2.0), (True, 2), (None, 2)]:
        with pytest.raises(ModelError, match=f"start={start}, stop={stop}, num_units=9"):
            m.forward_range(x, start, stop)
    h = m.forward_range(x, 0, 1)
    want = m.forward_range(h, 1, 3)
    torch.testing.assert_close(m.forward_range(h, np.int64(1), np.int32(3)), want, rtol=0, atol=0)


def test_cut_points() -> None:
    wrn = _make("wrn", {"depth": 16, "widen": 1})  # n = 2 blocks per group
    assert wrn.num_units == 7
    assert wrn.unit_names[:3] == ("conv1", "block1.1", "block1.2")
    assert wrn.cut_points == (1, 3, 5, 7)
    assert [wrn.boundary_shape(b, CIFAR) for b in wrn.cut_points] == [
        (16, 32, 32),
        (16, 32, 32),
        (32, 16, 16),
        (64, 8, 8),
    ]
    vgg = _make("vgg", {"depth": 16}, MNIST)
    assert vgg.num_units == 13
    assert vgg.unit_names[:3] == ("conv1.1", "conv1.2", "conv2.1")
    assert vgg.cut_points == (2, 4, 7, 10, 13)
    assert [vgg.boundary_shape(b, MNIST) for b in vgg.cut_points] == [
        (64, 14, 14),
        (128, 7, 7),
        (256, 4, 4),
        (512, 2, 2),
        (512, 1, 1),
    ]


def test_boundary_shape_keeps_training_flags() -> None:
    m = _make("densenet_bc", {"depth": 16, "growth": 8}).train()
    m.units[0].eval()  # a frozen unit stays in eval mode
    m.boundary_shape(5, CIFAR)
    m.unit_costs(CIFAR)
    assert not m.units[0].training
    assert all(u.training for u in m.units[1:])
    assert m.training and m.head.training
    assert all(buf.sum() == 0 for name, buf in m.named_buffers() if "running_mean" in name)


@pytest.mark.parametrize(("name", "kwargs"), TINY, ids=[f"{n}{k}" for n, k in TINY])
def test_reference_init(name: str, kwargs: dict[str, Any]) -> None:
    m = _make(name, kwargs)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1)
            assert torch.all(mod.bias == 0)
        elif isinstance(mod, nn.Linear):
            assert mod.bias is not None
            assert torch.all(mod.bias == 0)
        elif isinstance(mod, nn.Conv2d):
            assert mod.bias is None
    # the biggest conv: its empirical std is close to sqrt(2 / (k * k * out))
    conv = max((c for c in m.modules() if isinstance(c, nn.Conv2d)), key=lambda c: c.weight.numel())
    expected = math.sqrt(2.0 / (math.prod(conv.kernel_size) * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert abs(conv.weight.mean().item()) < 0.1 * expected


def test_reference_init_of_layers_without_affine_parameters() -> None:
    """docs/models.md points a model of one's own to reference_init_: one with
    BatchNorm(affine=False) failed with AttributeError: 'NoneType' object has no attribute
    'fill_'."""
    from prefast.models.base import reference_init_

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.BatchNorm2d(2),
                      nn.BatchNorm1d(2, affine=False), nn.Linear(2, 2, bias=False))  # fmt: skip
    m[2].weight.data.fill_(3.0)
    reference_init_(m)
    assert torch.equal(m[2].weight, torch.ones(2)) and m[1].weight is None


def test_deterministic_given_seed() -> None:
    a = _make("wrn", {"depth": 10, "widen": 1})
    b = _make("wrn", {"depth": 10, "widen": 1})
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "kwargs"), TINY, ids=[f"{n}{k}" for n, k in TINY])
def test_unit_costs(name: str, kwargs: dict[str, Any]) -> None:
    m = _make(name, kwargs)
    costs = m.unit_costs(CIFAR)
    assert len(costs) == m.num_units + 1
    assert all(isinstance(c, int) and c > 0 for c in costs)


def test_unit_costs_exact_for_densenet_pieces() -> None:
    m = _make("densenet_bc", {"depth": 16, "growth": 8})
    costs = m.unit_costs(CIFAR)
    # conv1: 3x3, 3 -> 16 channels, 32x32 output
    assert costs[0] == 32 * 32 * 16 * 3 * 9
    # dense1.1: 1x1 16 -> 32, then 3x3 32 -> 8, at 32x32
    assert costs[1] == 32 * 32 * (32 * 16 + 8 * 32 * 9)
    # trans1 gets 16 + 2 * 8 = 32 channels -> 16, 1x1 at 32x32
    assert costs[3] == 32 * 32 * 16 * 32
    # head: Linear(16 + 2 * 8 -> 16 after trans2, + 16 = 32 channels, 7 classes)
    assert costs[-1] == 32 * 7


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("densenet_bc", {"depth": 75}, "depth"),
        ("densenet_bc", {"depth": 4}, "depth"),
        ("densenet_bc", {"depth": 14, "bottleneck": False}, "depth"),
        ("densenet_bc", {"growth": 0}, "growth"),
        ("densenet_bc", {"reduction": 0.0}, "reduction"),
        ("densenet_bc", {"reduction": 1.5}, "reduction"),
        ("wrn", {"depth": 15}, "depth"),
        ("wrn", {"widen": 0}, "widen"),
        ("vgg", {"depth": 17}, "depth"),
        ("vgg", {"depth": 16.0}, "depth"),  # taken, and recorded as 16.0 in the config
        ("vgg", {"width": 2}, "width"),
    ],
)
def test_bad_kwargs(name: str, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelError, match=field):
        create_model(name, num_classes=10, in_channels=3, image_size=32, **kwargs)


def test_bad_depth_message_names_allowed_values() -> None:
    with pytest.raises(ModelError, match=r"6n \+ 4.*16, 22"):
        create_model("densenet_bc", num_classes=10, in_channels=3, image_size=32, depth=75)
    with pytest.raises(ModelError, match=r"11, 13, 16, 19"):
        create_model("vgg", num_classes=10, in_channels=3, image_size=32, depth=17)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError, match=r"densenet_bc.*vgg.*wrn") as info:
        create_model("resnet", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("DenseNet-BC", " did you mean 'densenet_bc'? known models: "),
        ("resnet", " did you mean 'resnet18' or 'resnet34'? known models: "),
        ("vgg16", " did you mean 'vgg'? known models: "),
        ("my_net", " known models: "),
    ],
)
def test_unknown_model_suggests_the_nearest_names(name: str, hint: str) -> None:
    with pytest.raises(ModelError, match=rf"^unknown model '{name}';{re.escape(hint)}densenet_bc"):
        create_model(name, num_classes=10, in_channels=3, image_size=32)


def test_an_unknown_name_says_where_a_model_of_your_own_is_registered() -> None:
    """`prefast verify` (or `prefast train`) run from the shell on a store of a model of one's
    own listed the built-in models only; docs/models.md says to run it from the registering
    script."""
    needle = "; a model of your own must be registered (register_model) in the process that "
    with pytest.raises(ModelError, match=re.escape(needle)):
        create_model("my_net", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ModelError) as info:
        create_model("densenet", num_classes=10, in_channels=3, image_size=32)
    assert "register" not in str(info.value)  # a near miss is a typo: the suggestion is enough


def test_register_model_rejects_duplicate_names() -> None:
    def impostor(**kwargs: Any) -> UnitModel:
        return densenet_bc(num_classes=2, depth=16, growth=4)

    with pytest.raises(ModelError, match=r"already registered \(by prefast.models.densenet."):
        register_model("densenet_bc")(impostor)
    assert register_model("densenet_bc")(densenet_bc) is densenet_bc  # re-registering is fine
    net = create_model("densenet_bc", num_classes=3, in_channels=1, image_size=8, depth=16)
    assert net.config["name"] == "densenet_bc"


def test_register_model_takes_a_redefinition_of_the_same_factory(caplog) -> None:
    """A notebook cell (or a script) that defines and registers a model, run a second time,
    defines a new function of the same name: it replaces the first, rather than failing
    until the user unregisters it. Another function claiming the name is still refused."""
    source = (
        "from prefast.models import register_model, from_sequential\n"
        "from torch import nn\n"
        "@register_model('cell_net')\n"
        "def cell_net(*, num_classes, in_channels, image_size, width=WIDTH):\n"
        "    return from_sequential([nn.Conv2d(in_channels, width, 3, padding=1)],\n"
        "        nn.Sequential(nn.Flatten(), nn.Linear(width * image_size**2, num_classes)),\n"
        "        config={'name': 'cell_net', 'width': width})\n"
    )
    caplog.set_level("INFO", "prefast")
    try:
        for width in (3, 5):  # the cell run twice, edited in between
            exec(source.replace("WIDTH", str(width)), {"__name__": "__main__"})
        assert "replacing the earlier definition" in caplog.text
        model = create_model("cell_net", num_classes=2, in_channels=1, image_size=8)
        assert model.units[0].out_channels == 5

        def cell_net(*, num_classes: int, in_channels: int, image_size: int) -> UnitModel:
            raise AssertionError("never called")

        with pytest.raises(ModelError, match=r"already registered \(by __main__\.cell_net\)"):
            register_model("cell_net")(cell_net)  # same name, another module: refused
    finally:
        unregister_model("cell_net")


def test_register_model_checks_its_name_and_the_factorys_arguments() -> None:
    """Refused at registration, with the fix: a name that is not a str (an int left the
    registry unable to list itself; @register_model without ("name") registered nothing),
    and a factory that cannot take the arguments every run passes (a bare TypeError later)."""

    def wrong(num_classes: int, channels: int, size: int) -> UnitModel:
        raise AssertionError("never called")

    with pytest.raises(ModelError, match=r'got 3; write @register_model\("my_net"\)'):
        register_model(3)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="must be a non-empty string, got <function"):
        register_model(wrong)  # type: ignore[arg-type]
    needle = (
        "register_model('wrong'): the factory must take the keyword arguments num_classes, "
        "in_channels, image_size (a run passes them from the dataset); wrong lacks "
        "in_channels, image_size"
    )
    with pytest.raises(ModelError, match=re.escape(needle)):
        register_model("wrong")(wrong)
    assert "wrong" not in list_models() and all(isinstance(n, str) for n in list_models())


def test_a_factory_whose_config_is_not_strict_json_is_refused_when_it_builds() -> None:
    # a factory that builds its UnitModel itself with clip=inf in its config trained until
    # its first cache, whose store then refused the config as meta
    def clipped(num_classes: int, in_channels: int, image_size: int, clip: float) -> UnitModel:
        units = [nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU()]
        head = nn.Sequential(nn.Flatten(), nn.Linear(4 * image_size**2, num_classes))
        return UnitModel(units, head, ["conv", "relu"], config={"name": "clipped", "clip": clip})

    register_model("clipped")(clipped)
    try:
        assert create_model(
            "clipped", num_classes=3, in_channels=1, image_size=5, clip=1.0
        ).config == {"name": "clipped", "clip": 1.0}
        with pytest.raises(ModelError, match=r"model 'clipped': its config must be JSON-able "
                           r".*no NaN or infinity"):  # fmt: skip
            create_model("clipped", num_classes=3, in_channels=1, image_size=5, clip=math.inf)
    finally:
        unregister_model("clipped")


def test_unit_model_validates_its_parts() -> None:
    units = [nn.Identity(), nn.Identity()]
    with pytest.raises(ValueError, match="unit_names"):
        UnitModel(units, nn.Identity(), ["a"])
    with pytest.raises(ValueError, match="unique"):
        UnitModel(units, nn.Identity(), ["a", "a"])
    with pytest.raises(ValueError, match="transition_after"):
        UnitModel(units, nn.Identity(), ["a", "b"], transition_after=[2])
    m = UnitModel(units, nn.Identity(), ["a", "b"], transition_after=[0], config={"name": "x"})
    assert m.cut_points == (1,)
    assert m.config == {"name": "x"}


def test_unit_model_cut_points_are_plain_ints() -> None:
    """transition_after from numpy gave cut_points of numpy ints, which the model's own
    boundary_shape refused ("boundary b must be an int in 0..2, got np.int64(1)")."""
    units = [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()]
    m = UnitModel(units, nn.Flatten(), ["a", "b"], transition_after=np.array([0, 1]))
    assert m.cut_points == (1, 2) and {type(c) for c in m.cut_points} == {int}
    assert [m.boundary_shape(b, (1, 4, 4)) for b in m.cut_points] == [(2, 4, 4), (2, 4, 4)]
    with pytest.raises(ModelError, match=r"transition_after must hold unit indices .*\['0'\]"):
        UnitModel(units, nn.Flatten(), ["a", "b"], transition_after=["0"])


@pytest.mark.parametrize(("name", "kwargs"), TINY, ids=[f"{n}{k}" for n, k in TINY])
def test_config_is_json_and_rebuilds_the_model(name: str, kwargs: dict[str, Any]) -> None:
    m = _make(name, kwargs)
    config = json.loads(json.dumps(m.config))
    assert config["name"] == name
    assert {k: config[k] for k in kwargs} == kwargs
    rebuilt = create_model(**config)
    assert rebuilt.config == m.config
    assert rebuilt.unit_names == m.unit_names


# ---- parameter counts of the reference's models ----------------------------------------------------
def test_reference_parameter_counts(densenet76: UnitModel) -> None:
    """DenseNet-BC-76 k=12 and WRN-28-10 for 10 classes have the reference's parameter counts
    (docs/models.md)."""
    assert sum(p.numel() for p in densenet76.parameters()) == 486_730
    torch.manual_seed(0)
    wrn = create_model("wrn", num_classes=10, in_channels=3, image_size=32, depth=28, widen=10)
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194


# ---- ResNet-18 / ResNet-34 --------------------------------------------------------------------------
RESNETS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def _torchvision_cifar_resnet(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem: a 3x3 stride-1 conv, no max pool."""
    tv = getattr(torchvision.models, name)(num_classes=num_classes)
    tv.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool = nn.Identity()
    return tv


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_units_cut_points_and_config(name: str) -> None:
    blocks = RESNETS[name]
    m = _make(name, {}, MNIST)
    assert m.num_units == 1 + sum(blocks)
    expected_names = ["conv1"] + [
        f"block{s}.{b}" for s, n in enumerate(blocks, start=1) for b in range(1, n + 1)
    ]
    assert list(m.unit_names) == expected_names
    ends = [1 + sum(blocks[: s + 1]) for s in range(4)]  # boundaries after each stage
    assert m.cut_points == tuple(ends)
    assert m.config == {"name": name, "num_classes": 7, "in_channels": 1, "image_size": 28}


@pytest.mark.parametrize("shape", [CIFAR, MNIST], ids=["cifar", "mnist"])
@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_boundary_shapes(name: str, shape: tuple[int, ...]) -> None:
    blocks = RESNETS[name]
    size = shape[1]
    sizes = [size, (size + 1) // 2, (size + 3) // 4, (size + 7) // 8]  # stride-2 3x3: ceil(H/2)
    expected = [(64, size, size)]  # the stem
    for stage, n in enumerate(blocks):
        expected += [(64 * 2**stage, sizes[stage], sizes[stage])] * n
    m = _make(name, {}, shape)
    shapes = m.boundary_shapes(shape)  # one pass; boundary_shape(b) would rerun units[:b]
    assert shapes == expected
    assert [shapes[b - 1] for b in m.cut_points] == [
        (64, size, size),
        (128, sizes[1], sizes[1]),
        (256, sizes[2], sizes[2]),
        (512, sizes[3], sizes[3]),
    ]
    with torch.no_grad():
        assert m.eval()(torch.zeros(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_parameter_count_matches_torchvision(name: str, in_channels: int) -> None:
    tv = _torchvision_cifar_resnet(name, 10, in_channels)
    ours = create_model(name, num_classes=10, in_channels=in_channels, image_size=32)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())


def test_resnet18_computes_torchvisions_function() -> None:
    """With torchvision's (CIFAR-stem) weights loaded in order, the outputs agree: same blocks,
    same wiring, only the split into units differs."""
    torch.manual_seed(0)
    tv = _torchvision_cifar_resnet("resnet18", 7, 3).eval()
    ours = _make("resnet18", {}).eval()
    theirs = list(tv.state_dict().values())
    mine = ours.state_dict()
    assert [tuple(v.shape) for v in theirs] == [tuple(v.shape) for v in mine.values()]
    ours.load_state_dict(dict(zip(mine, theirs, strict=True)))
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_resnet_rejects_architecture_arguments() -> None:
    with pytest.raises(ModelError, match=r"unknown argument\(s\) \['depth'\]"):
        create_model("resnet18", num_classes=10, in_channels=3, image_size=32, depth=18)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("resnet34", num_classes=0, in_channels=3, image_size=32)


# ---- bring your own model -------------------------------------------------------------------------
def _seq_parts() -> tuple[list[nn.Module], nn.Module]:
    torch.manual_seed(0)
    units: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),  # (4, 28, 28)
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # (6, 14, 14)
        nn.Conv2d(6, 5, 3, stride=2, padding=1),  # (5, 7, 7)
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    return units, head


def test_from_sequential_from_a_list() -> None:
    units, head = _seq_parts()
    m = from_sequential(units, head, cut_points=[2, 3])
    assert isinstance(m, UnitModel) and m.num_units == 3
    assert m.unit_names == ("unit0", "unit1", "unit2")
    assert m.cut_points == (2, 3)
    assert m.config == {
        "name": "custom",
        "unit_names": ["unit0", "unit1", "unit2"],
        "cut_points": [2, 3],
    }
    assert all(a is b for a, b in zip(m.units, units, strict=True)) and m.head is head
    assert m.boundary_shapes(MNIST) == [(4, 28, 28), (6, 14, 14), (5, 7, 7)]
    reference = nn.Sequential(*units, head).eval()
    x = torch.randn(2, *MNIST)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(m.forward_range(x, 0, 2), reference[:2](x), rtol=0, atol=0)


def test_from_sequential_from_a_named_sequential() -> None:
    units, head = _seq_parts()
    seq = nn.Sequential(OrderedDict(stem=units[0], mid=units[1], down=units[2]))
    m = from_sequential(seq, head, cut_points=(1,), config={"name": "tiny", "width": 4})
    assert m.unit_names == ("stem", "mid", "down")
    assert m.cut_points == (1,)
    assert m.config == {"name": "tiny", "width": 4}
    x = torch.randn(2, *MNIST)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), head.eval()(seq.eval()(x)), rtol=0, atol=0)
    # names given explicitly win; a config without a name is "custom"
    m2 = from_sequential(seq, head, unit_names=["a", "b", "c"], config={"width": 4})
    assert m2.unit_names == ("a", "b", "c") and m2.config == {"name": "custom", "width": 4}
    assert from_sequential(nn.Sequential(*units), head).unit_names == ("0", "1", "2")


def test_from_sequential_takes_cut_points_computed_with_numpy() -> None:
    """Cut points from numpy (np.cumsum of the stages' unit counts) were refused as "must be
    boundaries in 1..3, got [np.int64(1), np.int64(3)]", naming boundaries in 1..3."""
    units, head = _seq_parts()
    for cuts in (list(np.cumsum([1, 2])), np.array([1, 3]), torch.tensor([1, 3])):
        m = from_sequential(units, head, cut_points=cuts)
        assert m.cut_points == (1, 3) and m.config["cut_points"] == [1, 3]
        assert {type(c) for c in m.cut_points} == {int}
    with pytest.raises(ModelError, match=r"boundaries in 1\.\.3 .*got \[np.int64\(4\)\]"):
        from_sequential(units, head, cut_points=[np.int64(4)])


def test_from_sequential_is_exported() -> None:
    assert prefast.from_sequential is from_sequential
    assert "from_sequential" in prefast.__all__ and "from_sequential" in prefast.models.__all__


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"units": []}, "units is empty"),
        ({"units": nn.Conv2d(1, 1, 1)}, "units must be a list"),
        ({"units": [nn.ReLU(), "relu"]}, r"units\[1\] must be an nn.Module"),
        ({"head": lambda x: x}, "head must be an nn.Module"),
        ({"unit_names": ["a", "b"]}, "unit_names has 2 names for 3 units"),
        ({"unit_names": ["a", "b", "a"]}, "unit_names must be unique"),
        ({"unit_names": ["a", "", "c"]}, "unit_names must be non-empty strings"),
        ({"unit_names": "abc"}, "unit_names must be a list"),
        ({"cut_points": [0]}, r"cut_points must be boundaries in 1\.\.3"),
        ({"cut_points": [4]}, r"cut_points.*\[4\]"),
        ({"cut_points": [True]}, "cut_points"),
        ({"cut_points": 2}, "cut_points must be a list"),
        ({"config": "custom"}, "config must be a dict"),
        ({"config": {"name": 3}}, r"config\['name'\]"),
        ({"config": {"name": "x", "act": nn.ReLU()}}, "config must be JSON-able"),
        # a store records the config; its writer refuses NaN (it failed at the first cache)
        ({"config": {"name": "x", "clip": float("inf")}}, "no NaN or infinity"),
    ],
)
def test_from_sequential_errors_name_the_field(kwargs: dict[str, Any], needle: str) -> None:
    units, head = _seq_parts()
    args: dict[str, Any] = {"units": units, "head": head, **kwargs}
    with pytest.raises(ModelError, match=needle):
        from_sequential(args.pop("units"), args.pop("head"), **args)


def test_from_sequential_refuses_shared_parameters() -> None:
    units, head = _seq_parts()
    with pytest.raises(ModelError, match=r"units\[3\] shares parameters with units\[0\]"):
        from_sequential([*units, units[0]], head)
    tied = nn.Linear(5, 3)
    tied.weight = units[0][0].weight  # type: ignore[assignment]
    with pytest.raises(ModelError, match=r"head shares parameters with units\[0\]"):
        from_sequential(units, tied)


def test_a_module_shared_by_two_units_is_refused_even_without_parameters() -> None:
    """A Dropout (or a BatchNorm without affine parameters) used in two units has no
    parameters to share, so it was taken: once the first unit froze, set_train_modes put the
    module back in training mode for the second, and the frozen unit (and its cache) kept
    drawing dropout masks."""
    drop = nn.Dropout(0.5)
    units = [nn.Sequential(nn.Conv2d(3, 4, 1), drop), nn.Sequential(nn.Conv2d(4, 4, 1), drop)]
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    with pytest.raises(
        ModelError, match=r"^from_sequential: units\[1\] uses the same Dropout module as units\[0\]"
    ):
        from_sequential(units, head)
    norm = nn.BatchNorm2d(4, affine=False)
    with pytest.raises(ModelError, match=r"^UnitModel: head uses the same BatchNorm2d module"):
        UnitModel(
            [nn.Sequential(nn.Conv2d(3, 4, 1), norm)], nn.Sequential(norm, nn.Flatten()), ["a"]
        )
    # each unit with its own Dropout: the frozen one is deterministic
    units = [
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5)),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.Dropout(0.5)),
    ]
    model = from_sequential(units, head)
    set_train_modes(model, 1)
    x = torch.ones(2, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(model.forward_range(x, 0, 1), model.forward_range(x, 0, 1))


def test_a_unit_model_built_directly_checks_its_units_as_from_sequential_does() -> None:
    """A UnitModel made without from_sequential (a factory may) with one module in two units
    trained until the first of them froze, then failed in the optimizer; a non-module unit
    was torch's TypeError from inside ModuleList."""
    units, head = _seq_parts()
    with pytest.raises(ModelError, match=r"^UnitModel: units\[3\] shares parameters with units\["):
        UnitModel([*units, units[2]], head, ["a", "b", "c", "d"])
    with pytest.raises(ModelError, match=r"^UnitModel: head shares parameters with units\[2\]"):
        UnitModel(units, units[2], ["a", "b", "c"])
    with pytest.raises(ModelError, match=r"^UnitModel: units\[1\] must be an nn.Module, got int"):
        UnitModel([units[0], 3], head, ["a", "b"])  # type: ignore[list-item]
    assert UnitModel(units, head, ["a", "b", "c"]).num_units == 3


@pytest.mark.parametrize("method", ["forward", "forward_range", "forward_head"])
def test_a_unit_model_that_computes_another_function_is_refused(method: str) -> None:
    """Training runs the units and the head one by one (from a cache, the units after its
    boundary): a subclass whose forward differs trained one function and was evaluated on
    another, silently."""

    def doubled(self: UnitModel, *args: Any) -> torch.Tensor:
        return 2 * getattr(UnitModel, method)(self, *args)

    Doubled = type("Doubled", (UnitModel,), {method: doubled})
    units, head = _seq_parts()
    with pytest.raises(ModelError, match=rf"^Doubled overrides UnitModel\.{method}: a run "):
        Doubled(units, head, ["a", "b", "c"])
    # a subclass that adds to the model without changing what it computes is fine
    Named = type("Named", (UnitModel,), {"describe": lambda self: "three units"})
    assert Named(units, head, ["a", "b", "c"]).describe() == "three units"


def test_a_unit_that_returns_a_tuple_is_named_where_a_cache_needs_a_tensor() -> None:
    """The boundary shapes (what a cache allocates) need one tensor per unit: a unit returning
    a tuple is a ModelError naming it, not an AttributeError from inside the probe."""

    class Both(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    m = from_sequential([nn.Conv2d(3, 3, 1), Both()], head, unit_names=["conv", "both"])
    needle = "unit 1 (both) returns a tuple, not a tensor: PreFast caches the activation"
    with pytest.raises(ModelError, match=re.escape(needle)):
        m.boundary_shapes(CIFAR)
    with pytest.raises(ModelError, match=re.escape(needle)):
        m.boundary_shape(2, CIFAR)
    assert m.boundary_shape(1, CIFAR) == CIFAR


class _MergeBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)  # (B, C, 1, 1) -> (B * C,)


class _BatchWide(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : x.shape[0] + 2]  # (B, C, H, W) -> (B, C, min(H, B + 2), W)


class _PerSampleSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2, 3))  # (B, C, H, W) -> (B,)


class _Signs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).long()


@pytest.mark.parametrize(
    ("unit", "needle"),
    [
        (nn.Sequential(nn.AdaptiveAvgPool2d(1), _MergeBatch()),
         "unit 1 (odd): for a batch of 1 it returns shape (3,); PreFast caches the activation "
         "after a unit per sample, so each unit must keep the batch first"),
        (_BatchWide(), "unit 1 (odd): its output per sample is (3, 3, 32) in a batch of 1 but "
                       "(3, 4, 32) in a batch of 2; a cache stores one shape per sample"),
        (_Signs(), "unit 1 (odd) returns torch.int64 activations; a cache stores floating-point"),
        (_PerSampleSum(), "unit 1 (odd): for a batch of 1 it returns shape (1,), 0 dimension(s) "
                          "per sample; a cache stores 1 to 8: return (B, 1) for one value"),
    ],
)  # fmt: skip
def test_a_unit_whose_output_a_cache_cannot_hold_is_named(unit: nn.Module, needle: str) -> None:
    """The shapes a cache allocates came from one dummy sample: a unit that merged the batch
    into its output, or whose per-sample shape followed the batch size, gave a shape that the
    first cache write refused with a StoreInputError naming no unit, in the middle of a run;
    as did one returning (B,), a per-sample shape () that a store does not hold."""
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    m = from_sequential([nn.Conv2d(3, 3, 1), unit, nn.Identity()], head,
                        unit_names=["conv", "odd", "id"])  # fmt: skip
    with pytest.raises(ModelError, match=re.escape(needle)):
        m.boundary_shapes(CIFAR)
    with pytest.raises(ModelError, match=re.escape(needle)):
        m.boundary_shape(3, CIFAR)
    assert m.boundary_shape(1, CIFAR) == CIFAR


def test_a_cache_fingerprint_follows_the_frozen_units_and_the_config() -> None:
    """What a store at boundary b depends on changes its fingerprint: the config, the weights
    and BatchNorm statistics of units[:b]; the units after b do not."""
    from prefast.cache.identity import fingerprint

    data, cache = {"dataset": "synthetic", "samples": 117}, {"dtype": "float32", "views": 1}

    def model(**config: Any) -> UnitModel:
        units, head = _seq_parts()  # seeded: the same weights every call
        return from_sequential(units, head, cut_points=[2], config=config or None)

    base = fingerprint(model(), 2, data, cache)
    assert fingerprint(model(), 2, data, cache) == base
    assert fingerprint(model(), 1, data, cache) != base
    assert fingerprint(model(name="custom", width=5), 2, data, cache) != base
    m = model()
    m.units[2].weight.data[0, 0, 0, 0] += 1  # after the boundary
    assert fingerprint(m, 2, data, cache) == base
    assert fingerprint(m, 3, data, cache) != fingerprint(model(), 3, data, cache)
    m.units[0][1].running_var[1] += 0.5  # a BatchNorm statistic before it
    assert fingerprint(m, 2, data, cache) != base
    m = model()
    m.units[1][0].bias.data[2] -= 1e-6
    assert fingerprint(m, 2, data, cache) != base
    assert fingerprint(model(), 2, {**data, "samples": 118}, cache) != base
    assert fingerprint(model(), 2, data, {**cache, "dtype": "float16"}) != base


def test_a_cache_fingerprint_follows_the_frozen_units_layers() -> None:
    """A layer without weights shapes a cached value too: a model of one's own edited from ReLU
    to GELU before the boundary, with the same config and weights (a resumed run), had the
    fingerprint of the old model's store, which was reused with the old layers' outputs."""
    from prefast.cache.identity import fingerprint

    data, cache = {"dataset": "synthetic", "samples": 117}, {"dtype": "float32", "views": 1}

    def model(act: type[nn.Module] = nn.ReLU, pool: int = 2) -> UnitModel:
        units, head = _seq_parts()
        units[1][1] = act()
        units[1][2] = nn.MaxPool2d(pool)
        return from_sequential(units, head, cut_points=[2])

    base = fingerprint(model(), 2, data, cache)
    assert fingerprint(model(), 2, data, cache) == base
    assert fingerprint(model(nn.GELU), 2, data, cache) != base
    assert fingerprint(model(pool=3), 2, data, cache) != base
    assert fingerprint(model(nn.GELU), 1, data, cache) == fingerprint(model(), 1, data, cache)


def test_register_and_unregister_a_custom_model() -> None:
    def tiny(*, num_classes: int, in_channels: int = 1, image_size: int = 28) -> UnitModel:
        units, head = _seq_parts()
        cfg = {"name": "tiny_byo", "num_classes": num_classes, "in_channels": in_channels,
               "image_size": image_size}  # fmt: skip
        return from_sequential(units, head, config=cfg)

    register_model("tiny_byo")(tiny)
    try:
        m = create_model("tiny_byo", num_classes=3, in_channels=1, image_size=28)
        assert create_model(**m.config).config == m.config  # what `prefast verify` does
    finally:
        unregister_model("tiny_byo")
    assert "tiny_byo" not in list_models()
    with pytest.raises(ModelError, match="'tiny_byo' is not registered"):
        unregister_model("tiny_byo")
    # an unhashable name was a bare TypeError from the lookup
    with pytest.raises(ModelError, match=re.escape("model ['tiny_byo'] is not registered")):
        unregister_model(["tiny_byo"])  # type: ignore[arg-type]


def test_a_factory_that_takes_any_keyword_gets_the_model_arguments() -> None:
    """``def factory(**kw)`` takes any argument: create_model passed none of model_args and
    said "accepted: kw", the name of the catch-all."""

    def any_args(*, num_classes: int, **kw: Any) -> UnitModel:
        units, head = _seq_parts()
        return from_sequential(units, head, config={"name": "any_byo", **kw})

    def fixed(*, num_classes: int, in_channels: int, image_size: int, width: int = 2) -> UnitModel:
        raise AssertionError("never called")

    register_model("any_byo")(any_args)
    register_model("fixed_byo")(fixed)
    try:
        m = create_model("any_byo", num_classes=3, in_channels=1, image_size=28, width=6)
        assert m.config == {"name": "any_byo", "in_channels": 1, "image_size": 28, "width": 6}
        with pytest.raises(
            ModelError, match=r"unknown argument\(s\) \['depth'\]; accepted: width$"
        ):
            create_model("fixed_byo", num_classes=3, in_channels=1, image_size=28, depth=2)
    finally:
        unregister_model("any_byo")
        unregister_model("fixed_byo")


def test_a_factory_argument_without_a_default_that_is_not_given_is_named() -> None:
    """A factory whose own argument has no default, built without it (model_args={}): the
    factory's call failed with a bare TypeError, which the CLI shows as a traceback."""

    def needs_width(
        *, num_classes: int, in_channels: int, image_size: int, width: int
    ) -> UnitModel:
        units, head = _seq_parts()
        return from_sequential(units, head, config={"name": "width_byo", "width": width})

    register_model("width_byo")(needs_width)
    try:
        with pytest.raises(ModelError, match=re.escape(
            "model 'width_byo' needs the argument(s) ['width'], which have no default"
        )):  # fmt: skip
            create_model("width_byo", num_classes=3, in_channels=1, image_size=28)
        m = create_model("width_byo", num_classes=3, in_channels=1, image_size=28, width=2)
        assert m.config == {"name": "width_byo", "width": 2}
    finally:
        unregister_model("width_byo")


def test_create_model_checks_what_a_factory_returns() -> None:
    def not_a_unit_model(**kwargs: Any) -> UnitModel:
        return nn.Sequential(nn.Flatten())  # type: ignore[return-value]

    def unnamed(**kwargs: Any) -> UnitModel:
        return from_sequential(*_seq_parts())  # config name "custom"

    register_model("bad_byo")(not_a_unit_model)
    register_model("unnamed_byo")(unnamed)
    try:
        with pytest.raises(ModelError, match="returned a Sequential, not a UnitModel"):
            create_model("bad_byo", num_classes=3, in_channels=1, image_size=28)
        with pytest.warns(UserWarning, match="its config names 'custom'"):
            create_model("unnamed_byo", num_classes=3, in_channels=1, image_size=28)
    finally:
        unregister_model("bad_byo")
        unregister_model("unnamed_byo")


def test_from_sequential_docstring_example_runs() -> None:
    """The docstring's example registers "my_net" and trains it for an epoch."""
    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(custom_module) if t.name.endswith(".from_sequential")]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    try:
        runner.run(test)
    finally:
        if "my_net" in list_models():
            unregister_model("my_net")
    assert runner.failures == 0 and runner.tries > 0


def test_docs_models_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/models.md's "Bring your own model" code runs as written."""
    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    try:
        exec(compile(code, "docs/models.md", "exec"), {})
    finally:
        if "my_net" in list_models():
            unregister_model("my_net")
    assert capsys.readouterr().out.strip().endswith("(1, 3)")


def test_a_cache_fingerprint_is_the_same_with_sync_batch_norm() -> None:
    """--sync-bn turns every BatchNorm into SyncBatchNorm under torchrun; in eval mode (as a
    frozen unit runs) both compute the same. The fingerprint named the class, so prefast verify,
    which rebuilds the model with BatchNorm2d, reported every store of a --sync-bn run as
    written by another model."""
    from prefast.cache.identity import fingerprint

    data, cache = {"dataset": "synthetic", "samples": 117}, {"dtype": "float32", "views": 1}

    def model() -> UnitModel:
        units, head = _seq_parts()  # units[0] holds a BatchNorm2d
        return from_sequential(units, head, cut_points=[1, 2])

    plain = model()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert fingerprint(synced, 2, data, cache) == fingerprint(plain, 2, data, cache)
    x = torch.randn(3, 1, 8, 8)
    plain.eval()
    synced.eval()
    torch.testing.assert_close(synced.units[0](x), plain.units[0](x))
    wider = model()
    wider.units[0][1].eps = 1e-3  # another setting still tells them apart
    assert fingerprint(wider, 2, data, cache) != fingerprint(plain, 2, data, cache)


def test_numpy_integers_build_the_model_a_plain_int_does() -> None:
    """create_model(num_classes=np.int64(10), ...) and FreezeSchedule(cfg, np.int64(5), ...)
    (from a sweep's np.arange) were refused: 'must be an integer >= 1, got np.int64(10)'.
    They build what the ints do, with a config of plain ints that goes into JSON."""
    from prefast.freezeout import FreezeSchedule, ScheduleConfig

    kw = dict(num_classes=10, in_channels=3, image_size=32, depth=10, growth=4)
    plain = create_model("densenet_bc", **kw)
    numpy = create_model("densenet_bc", **{k: np.int64(v) for k, v in kw.items()})
    assert numpy.config == plain.config and json.loads(json.dumps(numpy.config)) == plain.config
    assert all(type(v) is int for k, v in numpy.config.items() if k in kw)
    a = FreezeSchedule(ScheduleConfig(t0=0.5), np.int64(5), np.uint16(101))
    b = FreezeSchedule(ScheduleConfig(t0=0.5), 5, 101)
    assert (a.num_units, a.total_iterations) == (5, 101) and type(a.num_units) is int
    assert [a.freeze_iteration(i) for i in range(5)] == [b.freeze_iteration(i) for i in range(5)]
    with pytest.raises(ModelError, match=r"must be an integer >= 1, got True"):
        create_model("densenet_bc", **{**kw, "growth": np.bool_(True)})
    # numpy floats and bools too: 'reduction: must be a finite number in (0, 1], got
    # np.float32(0.5)', refused although it is 0.5
    half = create_model("densenet_bc", **kw, reduction=np.float32(0.5), bottleneck=np.bool_(True))
    assert half.config == create_model("densenet_bc", **kw, reduction=0.5).config
    assert type(half.config["reduction"]) is float and half.config["bottleneck"] is True
