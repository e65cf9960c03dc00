"""The training step: UnitSGD equals torch's SGD with FreezeOut's per-unit learning rates, the
epoch meter sums on the device and names a diverging iteration, and --compile validates."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks.step_ops import DispatchedOps
from prefast import ConfigError, TrainConfig, train
from prefast.freezeout import FreezeSchedule, ScheduleConfig, UnitSGD
from prefast.models import create_model
from prefast.training.step import EpochMeter, StepRunner, step_stats


def _model():
    torch.manual_seed(0)
    return create_model(
        "densenet_bc", num_classes=10, in_channels=3, image_size=16, depth=10, growth=4
    )


@pytest.mark.parametrize("nesterov", [True, False])
def test_unit_sgd_equals_torch_sgd_with_per_unit_learning_rates(nesterov):
    a = _model()
    b = copy.deepcopy(a)
    sched = FreezeSchedule(
        ScheduleConfig(mode="freezeout", t0=0.5, how_scale="cubic"), a.num_units, 40
    )
    groups = [
        {"params": list(u.parameters()), "unit": i}
        for i, u in enumerate(a.units)
        if list(u.parameters())
    ] + [{"params": list(a.head.parameters()), "unit": a.num_units}]
    ref = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-4)
    got = UnitSGD(b, sched, range(b.num_units), momentum=0.9, nesterov=nesterov, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    j_dev = torch.zeros((), dtype=torch.int64)
    for j in range(7):
        x = torch.randn((5, 3, 16, 16), generator=g)
        y = torch.randint(0, 10, (5,), generator=g)
        for m in (a, b):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        for grp in ref.param_groups:
            grp["lr"] = sched.lr(grp["unit"], j)
        ref.step()
        j_dev.fill_(j)
        got.step(j_dev)
        expected = torch.tensor([sched.lr(i, j) for i in range(b.num_units + 1)])
        torch.testing.assert_close(got.lrs, expected, rtol=1e-6, atol=0)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_unit_sgd_learning_rate_where_a_freeze_point_rounds_to_zero():
    """t0 = 0.001 cubed is 1e-9: unit 0's max_j (1e-9 * 5) rounds to 0. It trains at j = 0 at
    lr_0(0), as schedule.lr says; 0 / 0 on the device gave it a NaN learning rate (a NaN loss
    from the next step on)."""
    m = _model()
    sched = FreezeSchedule(ScheduleConfig(t0=0.001, scale_lr=False), m.num_units, 5)
    opt = UnitSGD(m, sched, range(m.num_units), momentum=0.9, nesterov=True, weight_decay=0.0)
    for j in range(3):
        opt.update_lrs(torch.tensor(j))
        expected = torch.tensor([sched.lr(i, j) for i in range(m.num_units + 1)])
        torch.testing.assert_close(opt.lrs, expected, rtol=1e-6, atol=0)
    opt.update_lrs(torch.tensor(0))
    assert float(opt.lrs[0]) == pytest.approx(0.1)


def test_unit_sgd_leaves_parameters_the_model_fixed_alone():
    """A model of one's own may fix some parameters (requires_grad=False), in a unit or in the
    head: they get no gradient, and the step updates the others instead of refusing."""
    from torch import nn

    from prefast.models import from_sequential

    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    unit[0].bias.requires_grad_(False)
    head[2].weight.requires_grad_(False)
    m = from_sequential([unit], head)
    fixed = [unit[0].bias.clone(), head[2].weight.clone()]
    trained = [unit[0].weight.clone(), head[2].bias.clone()]
    sched = FreezeSchedule(ScheduleConfig(mode="freezeout", t0=0.5), m.num_units, 10)
    opt = UnitSGD(m, sched, range(m.num_units), momentum=0.9, nesterov=True, weight_decay=1e-4)
    F.cross_entropy(m(torch.randn(2, 3, 8, 8)), torch.tensor([1, 2])).backward()
    opt.step(torch.zeros((), dtype=torch.int64))
    assert torch.equal(unit[0].bias, fixed[0]) and torch.equal(head[2].weight, fixed[1])
    assert not torch.equal(unit[0].weight, trained[0])
    assert not torch.equal(head[2].bias, trained[1])


def test_unit_sgd_drops_frozen_units_and_round_trips_its_state():
    m = _model()
    sched = FreezeSchedule(ScheduleConfig(), m.num_units, 10)
    opt = UnitSGD(m, sched, range(m.num_units), momentum=0.9, nesterov=True, weight_decay=0.0)
    m(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step(torch.tensor(0))
    opt.drop(0)
    assert 0 not in opt.units and m.num_units in opt.units
    other = UnitSGD(m, sched, range(1, m.num_units), momentum=0.9, nesterov=True, weight_decay=0.0)
    other.load_state_dict(opt.state_dict())
    for i in other.units:
        for x, y in zip(other.buffers[i], opt.buffers[i], strict=True):
            assert torch.equal(x, y) and x.abs().sum() > 0
    with pytest.raises(ValueError, match="other units"):
        UnitSGD(
            m, sched, range(m.num_units), momentum=0.9, nesterov=True, weight_decay=0.0
        ).load_state_dict(opt.state_dict())


def test_epoch_meter_keeps_step_stats_and_names_the_first_bad_iteration():
    meter = EpochMeter(5, torch.device("cpu"))
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    assert step_stats(torch.tensor(1.5), out, y).tolist() == [1.5, 2.0]
    for k, (j, loss, n) in enumerate([(10, 1.5, 3), (11, 0.5, 2)]):
        meter.add(k, j, step_stats(torch.tensor(loss), out[:n], y[:n]), n)
    totals = meter.read()
    assert totals.seen == 5 and totals.correct == 3  # 2 of 3, then 1 of 2
    assert totals.loss_sum == 1.5 * 3 + 0.5 * 2
    assert totals.losses == [1.5, 0.5, 0.0, 0.0, 0.0]  # steps not recorded read 0
    for k, (j, loss) in enumerate([(12, float("nan")), (13, float("inf"))], start=2):
        meter.add(k, j, step_stats(torch.tensor(loss), out, y), 3)
    with pytest.raises(FloatingPointError, match="iteration 12"):
        meter.read()


def test_a_step_hands_the_meter_one_device_operation():
    meter = EpochMeter(2, torch.device("cpu"))
    stats = step_stats(torch.tensor(0.25), torch.eye(3), torch.tensor([0, 1, 0]))
    with DispatchedOps() as ops:
        meter.add(0, 7, stats, 3)
    assert ops.names == ["copy_"]
    assert meter.read().correct == 2


def test_the_step_keeps_the_iteration_counter_itself():
    """Each step adds 1 to the device's iteration after its update, so a consecutive step sets
    nothing and a jump (a resumed run, a new epoch's loop) sets it once; the learning rates the
    update used are the schedule's at the step's own iteration."""
    m = _model()
    sched = FreezeSchedule(
        ScheduleConfig(mode="freezeout", t0=0.5, how_scale="cubic"), m.num_units, 40
    )
    opt = UnitSGD(m, sched, range(m.num_units), momentum=0.9, nesterov=True, weight_decay=0.0)
    runner = StepRunner(m, torch.device("cpu"), "none", False, "none", 4)
    runner.configure(0, 0, opt, None)
    meter = EpochMeter(4, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    x = torch.randn((4, 3, 16, 16), generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    for k, j in enumerate([3, 4, 5, 21]):
        with DispatchedOps() as ops:
            runner.step(x, y, j, k, meter)
        assert ops.names.count("fill_") == (j in (3, 21))  # the first step and the jump
        assert int(runner.j) == j + 1
        expected = torch.tensor([sched.lr(i, j) for i in range(m.num_units + 1)])
        torch.testing.assert_close(opt.lrs, expected, rtol=1e-6, atol=0)
    assert meter.read().seen == 16


def test_a_diverging_run_stops_naming_the_iteration():
    cfg = TrainConfig(dataset="synthetic", num_samples=64, model="densenet_bc",
                      model_args={"depth": 10, "growth": 4}, epochs=1, batch_size=16, base_lr=1e30,
                      mode="full", device="cpu", progress=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"iteration \d+: the loss is not finite"):
        train(cfg)


def test_graphs_need_cuda_and_unknown_modes_are_refused():
    m = _model()
    with pytest.raises(ConfigError, match="--compile graphs"):
        StepRunner(m, torch.device("cpu"), "none", False, "graphs", 8)
    with pytest.raises(ConfigError, match="--compile"):
        StepRunner(m, torch.device("cpu"), "none", False, "turbo", 8)


def test_graphs_off_cuda_are_refused_before_the_data_is_loaded(monkeypatch, tmp_path):
    """`prefast train --compile graphs` on a CPU was refused only after the data was loaded
    and the model built (minutes on a large dataset); and nothing is written."""
    import prefast.training.trainer as T

    def loaded(cfg):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(T, "load_data", loaded)
    cfg = TrainConfig(dataset="synthetic", num_samples=64, model_args={"depth": 10, "growth": 4},
                      epochs=1, compile="graphs", device="cpu", progress=False,
                      metrics=str(tmp_path / "m.jsonl"))  # fmt: skip
    with pytest.raises(ConfigError, match="--compile graphs: CUDA graphs need a CUDA device"):
        train(cfg)
    assert not (tmp_path / "m.jsonl").exists()


def test_a_graphed_forward_runs_eagerly_off_cuda():
    """Off CUDA nothing is captured: every call is the forward itself, under the amp asked."""
    from prefast.runtime import GraphedForward

    seen = []

    def fn(h):
        seen.append(torch.is_autocast_enabled("cpu"))
        return h * 2 + 1

    g = GraphedForward(fn, "bf16")
    x = torch.arange(7.0).reshape(7, 1)
    assert torch.equal(g(x), x * 2 + 1) and torch.equal(g(x[:3]), x[:3] * 2 + 1)
    assert g.replays == 0 and seen == [True, True]
    assert torch.equal(GraphedForward(fn, "none")(x), x * 2 + 1) and seen[-1] is False


def test_compile_auto_is_eager_on_the_cpu():
    from prefast.training import Trainer

    cfg = TrainConfig(dataset="synthetic", num_samples=32, model="densenet_bc",
                      model_args={"depth": 10, "growth": 4}, epochs=1, batch_size=16,
                      device="cpu", progress=False)  # fmt: skip
    assert cfg.compile == "auto"
    assert Trainer(cfg).steps.mode == "none"


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_inductor_compiles_every_unit_whose_class_many_units_share(monkeypatch, caplog):
    """The units of a model share their class's forward and each compiles for its own input
    shape: past torch._dynamo's recompile limit (8) the later units ran eagerly, with a
    warning, so --compile inductor timed a mostly eager step. Dynamo with its eager backend
    (no C++ compiler, fast) hits the same limit."""
    import logging

    import torch._dynamo
    from torch import nn
    from torch._dynamo.utils import counters

    from prefast.models import from_sequential

    class Grow(nn.Module):  # a DenseNet layer in miniature: one more channel than its input
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, torch.relu(self.conv(x))], 1)

    cfg = torch._dynamo.config
    for name, default in (("recompile_limit", 8), ("accumulated_recompile_limit", 256)):
        old = name.replace("recompile_limit", "cache_size_limit")  # older torch's names
        # torch's defaults; restored afterwards
        monkeypatch.setattr(cfg, name if hasattr(cfg, name) else old, default)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    units = [nn.Conv2d(1, 2, 3, padding=1)] + [Grow(c) for c in range(2, 13)]  # 11 share Grow
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(13, 3))
    model = from_sequential(units, head)
    runner = StepRunner(model, torch.device("cpu"), "none", False, "inductor", batch_size=4)
    h = torch.randn(4, 1, 5, 5)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for u in runner._units:
            h = u(h)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 12  # conv, 11 shapes
    torch._dynamo.reset()


def test_unit_sgd_refuses_bad_hyperparameters_and_units():
    """A NaN or negative momentum or weight decay trained to NaN weights, nesterov="no" was
    Nesterov's, unit -1 trained the last unit at the head's learning rate and unit 99 was an
    IndexError."""
    from prefast.freezeout.schedule import ScheduleError

    m = _model()
    sched = FreezeSchedule(ScheduleConfig(), m.num_units, 10)
    ok = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    for field, bad, match in [
        ("momentum", float("nan"), "momentum: must be a finite number >= 0"),
        ("momentum", -0.5, "momentum: must be a finite number >= 0"),
        ("momentum", "0.9", "momentum: must be a finite number >= 0"),
        ("weight_decay", -1.0, "weight_decay: must be a finite number >= 0"),
        ("nesterov", "no", "nesterov: must be True or False"),
    ]:
        with pytest.raises(ScheduleError, match=match):
            UnitSGD(m, sched, range(m.num_units), **{**ok, field: bad})
    n = m.num_units
    for units in ([-1, 0], [n], [0.0]):
        with pytest.raises(ScheduleError, match=rf"units must be indices in 0\.\.{n - 1}"):
            UnitSGD(m, sched, units, **ok)
    opt = UnitSGD(m, sched, [torch.tensor(1), 2], **{**ok, "momentum": 0.0, "nesterov": False})
    assert opt.units == [1, 2, n] and opt.momentum == 0.0
