"""The FreezeOut schedule against hand-computed values (docs/training.md, what a run does)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from prefast.freezeout.schedule import (
    FreezeSchedule,
    ScheduleConfig,
    ScheduleError,
    ideal_saving,
    unit_t,
)


@pytest.mark.parametrize(
    ("how_scale", "expected"),
    [
        # x_i = 0.5 + 0.5 * i / 3 = 1/2, 2/3, 5/6; head 1
        ("linear", (1 / 2, 2 / 3, 5 / 6, 1.0)),
        ("squared", (1 / 4, 4 / 9, 25 / 36, 1.0)),
        ("cubic", (1 / 8, 8 / 27, 125 / 216, 1.0)),
    ],
)
def test_unit_t_exact(how_scale: str, expected: tuple[float, ...]) -> None:
    t = unit_t(3, 0.5, how_scale)
    assert len(t) == 4
    assert t == pytest.approx(expected, rel=1e-12)
    assert t[-1] == 1.0


def test_unit_t_densenet76_defaults() -> None:
    t = unit_t(39, 0.8, "cubic")
    assert len(t) == 40
    assert t[0] == pytest.approx(0.512, rel=1e-12)
    assert t[13] == pytest.approx((0.8 + 0.2 * 13 / 39) ** 3, rel=1e-12)
    assert t[39] == 1.0
    assert all(a < b for a, b in itertools.pairwise(t))


def test_unit_t_t0_one_is_all_ones() -> None:
    assert unit_t(4, 1.0, "cubic") == (1.0,) * 5


def test_config_defaults_and_round_trip() -> None:
    cfg = ScheduleConfig()
    assert (cfg.mode, cfg.t0, cfg.how_scale, cfg.scale_lr, cfg.base_lr) == (
        "freezeout",
        0.8,
        "cubic",
        True,
        0.1,
    )
    other = ScheduleConfig(mode="prefast", t0=0.6, how_scale="linear", scale_lr=False)
    for c in (cfg, other):
        d = c.to_dict()
        assert ScheduleConfig.from_dict(json.loads(json.dumps(d))) == c
    assert ScheduleConfig.from_dict({"t0": 0.5}) == ScheduleConfig(t0=0.5)
    with pytest.raises(AttributeError):
        cfg.t0 = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"mode": "fast"}, "mode", "freezeout"),
        ({"t0": 0.0}, "t0", "(0, 1]"),
        ({"t0": 1.5}, "t0", "(0, 1]"),
        ({"t0": -0.1}, "t0", "(0, 1]"),
        ({"how_scale": "quartic"}, "how_scale", "cubic"),
        ({"base_lr": 0.0}, "base_lr", "> 0"),
        ({"base_lr": -1.0}, "base_lr", "> 0"),
        ({"base_lr": float("nan")}, "base_lr", "> 0"),
        ({"scale_lr": "yes"}, "scale_lr", "True or False"),
    ],
)
def test_config_validation(kwargs: dict[str, object], field: str, allowed: str) -> None:
    with pytest.raises(ScheduleError) as info:
        ScheduleConfig(**kwargs)  # type: ignore[arg-type]
    assert field in str(info.value)
    assert allowed in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_dict_rejects_unknown_field() -> None:
    with pytest.raises(ScheduleError, match="bogus"):
        ScheduleConfig.from_dict({"bogus": 1})


def test_schedule_attributes_linear() -> None:
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    assert s.t == pytest.approx((1 / 2, 2 / 3, 5 / 6, 1.0))
    assert s.max_j == pytest.approx((50.0, 200 / 3, 250 / 3, 100.0))
    assert s.initial_lr == pytest.approx((0.2, 0.15, 0.12, 0.1))


def test_lr_cosine_values() -> None:
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    # unit 0: max_j = 50, lr0 = 0.2
    assert s.lr(0, 0) == pytest.approx(0.2)
    assert s.lr(0, 25) == pytest.approx(0.1)  # half-way: half of lr0
    assert s.lr(0, 50) == pytest.approx(0.0, abs=1e-15)  # at max_j: zero, not yet frozen
    assert not s.is_frozen(0, 50)
    assert s.lr(0, 51) == 0.0  # frozen
    assert s.is_frozen(0, 51)
    # head: max_j = 100, lr0 = base_lr
    assert s.lr(3, 0) == pytest.approx(0.1)
    assert s.lr(3, 50) == pytest.approx(0.05)
    assert s.lr(3, 99) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.99)))


def test_freeze_iterations() -> None:
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    # max_j = 50, 66.67, 83.33 -> first integer j > max_j
    assert s.freeze_iterations() == [51, 67, 84]
    assert s.freeze_iteration(3) is None  # head
    for i, f in enumerate(s.freeze_iterations()):
        assert f is not None
        assert not s.is_frozen(i, f - 1)
        assert s.is_frozen(i, f)


def test_frozen_count_is_a_prefix() -> None:
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    assert [s.frozen_count(j) for j in (0, 50, 51, 66, 67, 83, 84, 99)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    for j in range(100):
        k = s.frozen_count(j)
        assert all(s.is_frozen(i, j) for i in range(k))
        assert not any(s.is_frozen(i, j) for i in range(k, 4))
        assert not s.is_frozen(3, j)


def test_integer_max_j_is_not_moved_by_float_noise() -> None:
    # t_2 = 0.5 + 0.5 * 2 / 3 = 5 / 6; 5 / 6 * 300 = 250 exactly, but in floats 249.999...
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 300)
    assert s.max_j[2] == 250.0
    assert s.freeze_iteration(2) == 251
    assert not s.is_frozen(2, 250)


def test_unit_that_would_freeze_after_the_run_never_freezes() -> None:
    # t = 0.995 of 100 iterations: max_j = 99.5, first j > 99.5 is 100 == total -> None
    s = FreezeSchedule(ScheduleConfig(t0=0.99, how_scale="linear"), 2, 100)
    assert s.max_j[1] == pytest.approx(99.5)
    assert s.freeze_iterations() == [None, None]
    assert s.frozen_count(99) == 0


@pytest.mark.parametrize("how_scale", ["linear", "squared", "cubic"])
@pytest.mark.parametrize("scale_lr", [True, False])
def test_every_unit_follows_the_design_formulas(how_scale: str, scale_lr: bool) -> None:
    # the schedule (docs/training.md), written out with L = 5 units over J = 37 iterations, t0 = 0.35:
    # t_i = scale(t0 + (1 - t0) i / L), max_j = t_i J, lr_i(0) = base_lr / t_i (scale_lr),
    # lr_i(j) = lr_i(0) (1 + cos(pi j / max_j)) / 2 while j <= max_j, frozen (0) after
    power = {"linear": 1, "squared": 2, "cubic": 3}[how_scale]
    s = FreezeSchedule(
        ScheduleConfig(t0=0.35, how_scale=how_scale, scale_lr=scale_lr, base_lr=0.07), 5, 37
    )
    for i in range(6):
        t = (0.35 + 0.65 * i / 5) ** power
        max_j = t * 37
        lr0 = 0.07 / t if scale_lr else 0.07
        assert s.t[i] == pytest.approx(t, rel=1e-12)
        assert s.max_j[i] == pytest.approx(max_j, abs=1e-6)
        for j in range(37):
            frozen = i < 5 and j > max_j
            assert s.is_frozen(i, j) == frozen
            want = 0.0 if frozen else 0.5 * lr0 * (1 + math.cos(math.pi * j / max_j))
            assert s.lr(i, j) == pytest.approx(want, rel=1e-9, abs=1e-15)
        first = math.floor(max_j) + 1
        assert s.freeze_iteration(i) == (first if i < 5 and first < 37 else None)


def test_a_unit_whose_freeze_point_rounds_to_zero_trains_at_its_initial_lr() -> None:
    # t_0 = 0.001 ** 3 = 1e-9: max_j = 5e-9 rounds to 0; the unit trains at j = 0 only, at
    # lr_0(0) (the cosine's limit), as if max_j were tiny but positive (0 / 0 raised here,
    # and gave UnitSGD a NaN learning rate)
    s = FreezeSchedule(ScheduleConfig(t0=0.001, scale_lr=False), 3, 5)
    assert s.max_j[0] == 0.0
    assert s.lr(0, 0) == 0.1
    assert s.is_frozen(0, 1) and s.lr(0, 1) == 0.0
    assert s.freeze_iterations()[0] == 1


def test_a_t0_whose_scaled_t_underflows_is_refused() -> None:
    # 1e-120 cubed is 0.0 in floats: the first unit would start at base_lr / 0
    with pytest.raises(ScheduleError, match=r"t0: 1e-120 is too small for how_scale=cubic"):
        FreezeSchedule(ScheduleConfig(t0=1e-120), 3, 10)
    assert FreezeSchedule(ScheduleConfig(t0=1e-120, how_scale="linear"), 3, 10).t[0] == 1e-120
    # 1e-107 cubed is subnormal, not 0: base_lr / t overflowed to an infinite learning rate
    # ('the loss is not finite; lower --base-lr', which no --base-lr of use fixed)
    with pytest.raises(ScheduleError, match=r"t0: 1e-107 is too small .* base_lr / t overflows"):
        FreezeSchedule(ScheduleConfig(t0=1e-107), 3, 10)
    assert FreezeSchedule(ScheduleConfig(t0=1e-107, scale_lr=False), 3, 10).initial_lr[0] == 0.1


def test_a_base_lr_whose_scaled_rate_overflows_is_named() -> None:
    # base_lr 1e308 / t 0.125 overflows: the error said "t0: 0.5 is too small ... use a
    # larger t0", which no t0 fixed
    with pytest.raises(
        ScheduleError, match=r"base_lr: 1e\+308 is too large.*use a smaller base_lr"
    ):
        FreezeSchedule(ScheduleConfig(t0=0.5, base_lr=1e308), 3, 10)
    assert FreezeSchedule(ScheduleConfig(t0=0.5, base_lr=1e307), 3, 10).initial_lr[0] == 8e307


def test_densenet76_defaults() -> None:
    s = FreezeSchedule(ScheduleConfig(), 39, 90_000)
    assert s.t[0] == pytest.approx(0.512)
    assert s.max_j[0] == pytest.approx(0.512 * 90_000)
    assert s.initial_lr[0] == pytest.approx(0.1 / 0.512)
    assert s.freeze_iteration(0) == 46_081
    assert s.frozen_count(46_080) == 0
    assert s.frozen_count(46_081) == 1
    # the last unit: t = (0.8 + 0.2 * 38 / 39) ** 3 = 0.98469..., max_j = 88,622.3
    assert s.freeze_iteration(38) == 88_623
    assert s.frozen_count(89_999) == 39


def test_scale_lr_off() -> None:
    s = FreezeSchedule(ScheduleConfig(scale_lr=False, base_lr=0.05), 5, 10)
    assert s.initial_lr == (0.05,) * 6
    assert s.lr(0, 0) == pytest.approx(0.05)


def test_full_mode_never_freezes() -> None:
    s = FreezeSchedule(ScheduleConfig(mode="full"), 4, 20)
    assert s.t == (1.0,) * 5
    assert s.max_j == (20.0,) * 5
    assert s.initial_lr == (0.1,) * 5
    assert s.freeze_iterations() == [None] * 4
    assert all(s.frozen_count(j) == 0 for j in range(20))
    assert not any(s.is_frozen(i, 19) for i in range(5))
    assert s.lr(0, 10) == pytest.approx(0.05)


def test_prefast_and_freezeout_share_the_schedule() -> None:
    a = FreezeSchedule(ScheduleConfig(mode="prefast"), 7, 333)
    b = FreezeSchedule(ScheduleConfig(mode="freezeout"), 7, 333)
    assert a.t == b.t
    assert a.freeze_iterations() == b.freeze_iterations()


@pytest.mark.parametrize(
    ("args", "field"),
    [((3, 0), "total_iterations"), ((0, 10), "num_units"), ((3, 1.5), "total_iterations")],
)
def test_schedule_validation(args: tuple[int, int], field: str) -> None:
    with pytest.raises(ScheduleError, match=field):
        FreezeSchedule(ScheduleConfig(), *args)


def test_a_schedule_takes_a_schedule_config_and_numpy_counts_as_ints() -> None:
    """FreezeSchedule({"t0": 0.5}, ...) failed with AttributeError 'mode', and numpy counts
    were checked but then used as given: every max_j was a numpy float."""
    for bad in ({"t0": 0.5}, None):
        with pytest.raises(ScheduleError, match="FreezeSchedule takes a ScheduleConfig"):
            FreezeSchedule(bad, 3, 10)  # type: ignore[arg-type]
    cfg = ScheduleConfig(t0=0.5, how_scale="linear")
    s = FreezeSchedule(cfg, np.int64(3), np.int32(10))
    assert s.max_j == FreezeSchedule(cfg, 3, 10).max_j == (5.0, 6.666667, 8.333333, 10.0)
    assert {type(m) for m in s.max_j} == {float} and type(s.total_iterations) is int
    json.dumps({"max_j": s.max_j})


def test_query_validation() -> None:
    s = FreezeSchedule(ScheduleConfig(), 3, 10)
    with pytest.raises(ScheduleError, match=r"0\.\.3"):
        s.lr(4, 0)
    with pytest.raises(ScheduleError, match="iteration"):
        s.is_frozen(0, -1)
    with pytest.raises(ScheduleError, match="iteration"):
        s.frozen_count(-1)


def test_ideal_saving_hand_example() -> None:
    # t = 0.5, 0.75, 1.0 over J = 10: max_j = 5, 7.5, 10 -> F = 6, 8, (head) 10
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 2, 10)
    assert s.freeze_iterations() == [6, 8]
    out = ideal_saving(s, fwd_costs=[1, 2, 3], bwd_costs=[2, 4, 6])
    # full = (3 + 6 + 9) * 10
    assert out["full_cost"] == 180
    # freezeout = (1*10 + 2*6) + (2*10 + 4*8) + 9*10
    assert out["freezeout_cost"] == 164
    # prefast = 3*6 + 6*8 + 9*10
    assert out["prefast_cost"] == 156
    assert out["full"] == 1.0
    assert out["freezeout"] == pytest.approx(164 / 180)
    assert out["prefast"] == pytest.approx(156 / 180)
    assert out["freezeout_saving"] == pytest.approx(16 / 180)
    assert out["prefast_saving"] == pytest.approx(24 / 180)
    assert out["prefast_vs_freezeout"] == pytest.approx(8 / 164)


def test_ideal_saving_prices_frozen_units_at_their_frozen_forward() -> None:
    # as the hand example, but a frozen unit's forward (eval, no_grad) costs less than its
    # training forward; the head never freezes, so its frozen cost (99) is never used
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 2, 10)
    out = ideal_saving(s, [1, 2, 3], [2, 4, 6], frozen_fwd_costs=[0.5, 1, 99])
    assert out["full_cost"] == 180
    # freezeout = (3*6 + 0.5*4) + (6*8 + 1*2) + 9*10
    assert out["freezeout_cost"] == 160
    assert out["prefast_cost"] == 156  # unchanged: prefast skips frozen units entirely
    assert out["prefast_vs_freezeout"] == pytest.approx(4 / 160)
    # frozen forwards as dear as training ones: the two-cost form
    same = ideal_saving(s, [1, 2, 3], [2, 4, 6], frozen_fwd_costs=[1, 2, 3])
    assert same == ideal_saving(s, [1, 2, 3], [2, 4, 6])


def test_ideal_saving_full_mode_saves_nothing() -> None:
    s = FreezeSchedule(ScheduleConfig(mode="full"), 2, 10)
    out = ideal_saving(s, [1, 2, 3], [2, 4, 6])
    assert out["freezeout_saving"] == 0.0
    assert out["prefast_saving"] == 0.0


def test_ideal_saving_validation() -> None:
    s = FreezeSchedule(ScheduleConfig(), 2, 10)
    with pytest.raises(ScheduleError, match="fwd_costs needs num_units"):
        ideal_saving(s, [1, 2], [1, 2, 3])
    with pytest.raises(ScheduleError, match="bwd_costs"):
        ideal_saving(s, [1, 2, 3], [1, -2, 3])
    with pytest.raises(ScheduleError, match="frozen_fwd_costs needs num_units"):
        ideal_saving(s, [1, 2, 3], [1, 2, 3], frozen_fwd_costs=[1, 2])
    with pytest.raises(ScheduleError, match="frozen_fwd_costs must be finite"):
        ideal_saving(s, [1, 2, 3], [1, 2, 3], frozen_fwd_costs=[1, float("nan"), 3])


def test_ideal_saving_refuses_what_is_no_schedule_or_no_costs() -> None:
    """A str or None among the costs failed with math.isfinite's TypeError, a number or a
    generator for them with len()'s, and a ScheduleConfig for the schedule with an
    AttributeError."""
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 2, 10)
    with pytest.raises(ScheduleError, match="takes a FreezeSchedule, got ScheduleConfig"):
        ideal_saving(s.config, [1, 2, 3], [2, 4, 6])  # type: ignore[arg-type]
    for bad in (["1", 2, 3], [None, 2, 3], [True, 2, 3]):
        with pytest.raises(ScheduleError, match="fwd_costs must be finite and >= 0"):
            ideal_saving(s, bad, [2, 4, 6])  # type: ignore[arg-type]
    for bad in (3, (c for c in [1, 2, 3]), "123"):
        with pytest.raises(ScheduleError, match=r"bwd_costs must be a sequence of .* 3 numbers"):
            ideal_saving(s, [1, 2, 3], bad)  # type: ignore[arg-type]
    out = ideal_saving(s, np.array([1.0, 2.0, 3.0]), [np.int64(2), np.float32(4), 6])
    assert out["prefast_cost"] == 156 and out["freezeout_cost"] == 164


def test_stretches_cut_a_range_at_its_freezes() -> None:
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    cuts = [it for it in s.freeze_iterations() if it is not None]
    assert len(cuts) == 3 and cuts == sorted(cuts)
    got = s.stretches(0, 100)
    assert [n for n, _ in got] == [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], 100 - cuts[2]]
    assert [f for _, f in got] == [0, 1, 2, 3]
    inside = s.stretches(cuts[0] + 1, cuts[1] + 1)  # one freeze inside, the range's own start
    assert inside == [(cuts[1] - cuts[0] - 1, 1), (1, 2)]
    assert s.stretches(cuts[2], 100) == [(100 - cuts[2], 3)]  # a freeze at the start: no cut


def test_numpy_numbers_are_taken_as_numbers() -> None:
    """t0=np.float32(0.5) or base_lr=np.int64(1) was refused with "t0: must be a finite number
    in (0, 1], got np.float32(0.5)", a value in that range; numpy counts were taken already.
    An int past float's range failed with OverflowError."""
    cfg = ScheduleConfig(t0=np.float32(0.5), how_scale="linear", base_lr=np.int64(1))  # type: ignore[arg-type]
    assert (cfg.t0, cfg.base_lr) == (0.5, 1.0)
    assert type(cfg.t0) is float and type(cfg.base_lr) is float
    assert ScheduleConfig(t0=np.int64(1)).t0 == 1.0  # type: ignore[arg-type]
    assert unit_t(2, np.float32(0.5), "linear") == (0.5, 0.75, 1.0)  # type: ignore[arg-type]
    for bad in (np.bool_(True), np.float64("nan"), np.float32(1.5), np.array([0.5])):
        with pytest.raises(ScheduleError, match="t0: must be a finite number in"):
            ScheduleConfig(t0=bad)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="base_lr: must be a finite number > 0"):
        ScheduleConfig(base_lr=10**400)


def test_stretches_refuse_a_range_that_ends_before_it_starts() -> None:
    # stretches(5, 3) was [(-2, 0)]: a stretch of -2 steps
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    with pytest.raises(ScheduleError, match="stretches: end 3 is before start 5"):
        s.stretches(5, 3)
    with pytest.raises(ScheduleError, match=r"iteration j must be an int >= 0, got 2\.5"):
        s.stretches(0, 2.5)  # type: ignore[arg-type]


def test_queries_take_numpy_integers_as_the_counts_do() -> None:
    """The schedule took numpy counts, but lr(0, np.int64(3)) (a loop over np.arange) was
    refused as 'iteration j must be an int >= 0, got np.int64(3)'."""
    s = FreezeSchedule(ScheduleConfig(t0=0.5, how_scale="linear"), 3, 100)
    for i, j in ((np.int64(0), np.int64(25)), (np.int32(0), np.uint8(51)), (np.int16(3), 50)):
        got = (s.lr(i, j), s.is_frozen(i, j), s.frozen_count(j))  # type: ignore[arg-type]
        assert got == (s.lr(int(i), int(j)), s.is_frozen(int(i), int(j)), s.frozen_count(int(j)))
        assert type(s.lr(i, j)) is float  # type: ignore[arg-type]
    assert s.lr(np.int64(0), np.int64(25)) == pytest.approx(0.1)  # type: ignore[arg-type]
    assert s.freeze_iteration(np.int64(1)) == 67  # type: ignore[arg-type]
    assert s.stretches(np.int64(0), np.int64(100)) == s.stretches(0, 100)  # type: ignore[arg-type]
    assert all(type(v) is int for st in s.stretches(np.int64(0), 100) for v in st)  # type: ignore[arg-type]
    for bad in (np.bool_(True), True, np.float64(3.0), np.int64(-1)):
        with pytest.raises(ScheduleError, match="iteration j must be an int >= 0"):
            s.lr(0, bad)  # type: ignore[arg-type]
    for bad in (np.bool_(True), np.float64(1.0), np.int64(4)):
        with pytest.raises(ScheduleError, match=r"index i must be an int in 0\.\.3"):
            s.lr(bad, 0)  # type: ignore[arg-type]
