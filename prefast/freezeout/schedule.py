"""The FreezeOut schedule (docs/training.md, what a run does): when each unit freezes and its learning rate.

Units have indices ``i = 0 .. num_units - 1``; the head shares index ``num_units`` and gets
``t = 1``, so it never freezes. Unit ``i`` trains for the first fraction
``t_i = scale(t0 + (1 - t0) * i / num_units)`` of all iterations, with its own cosine
learning-rate anneal from ``lr_i(0) = base_lr / t_i`` (``scale_lr``) down to zero at
``max_j_i = t_i * total_iterations``, and is frozen at every iteration ``j > max_j_i``.

Pure Python: no torch needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefast.errors import (
    ScheduleError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    integer,
    shown,
)

MODES = ("full", "freezeout", "prefast")
"""``full``: no freezing, every unit anneals over the whole run; ``freezeout``: freeze and
recompute the frozen prefix; ``prefast``: freeze and cache it (same schedule)."""

_SCALES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "squared": lambda x: x * x,
    "cubic": lambda x: x * x * x,
}
SCALES = tuple(_SCALES)


def _check_t0(t0: object) -> float:
    return check_number("t0", t0, 0, 1, low_open=True, error=ScheduleError)


def _check_scale(how_scale: object) -> Callable[[float], float]:
    check_choice("how_scale", how_scale, SCALES, error=ScheduleError)
    return _SCALES[str(how_scale)]


def _check_count(field: str, value: object) -> int:
    return check_int(field, value, error=ScheduleError)


def unit_t(num_units: int, t0: float, how_scale: str) -> tuple[float, ...]:
    """Fraction of training each unit trains for, the head last (exactly 1.0).

    Returns ``num_units + 1`` values, ``t_i = scale(t0 + (1 - t0) * i / num_units)``,
    non-decreasing in ``i``.
    """
    n = _check_count("num_units", num_units)
    t0 = _check_t0(t0)
    scale = _check_scale(how_scale)
    if scale(t0) <= 0.0:  # underflow (t0 = 1e-120, cubic): unit 0 would start at base_lr / 0
        raise ScheduleError(
            f"t0: {t0!r} is too small for how_scale={how_scale}: the first unit's t underflows "
            "to 0; use a larger t0"
        )
    return (*(scale(t0 + (1.0 - t0) * i / n) for i in range(n)), 1.0)


@dataclass(frozen=True)
class ScheduleConfig:
    """How units freeze.

    Attributes:
        mode: one of `MODES`; ``"full"`` disables freezing (every unit gets t = 1).
        t0: fraction of training the first unit trains for before scaling, in (0, 1].
        how_scale: ``"linear"``, ``"squared"`` or ``"cubic"``; applied to the linear ramp.
        scale_lr: start unit i at ``base_lr / t_i`` instead of ``base_lr``.
        base_lr: learning rate of a unit that trains to the end (the head), > 0.
    """

    mode: str = "freezeout"
    t0: float = 0.8
    how_scale: str = "cubic"
    scale_lr: bool = True
    base_lr: float = 0.1

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES, error=ScheduleError)
        object.__setattr__(self, "t0", _check_t0(self.t0))
        _check_scale(self.how_scale)
        check_bool("scale_lr", self.scale_lr, error=ScheduleError)
        lr = check_number("base_lr", self.base_lr, 0, low_open=True, error=ScheduleError)
        object.__setattr__(self, "base_lr", lr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScheduleConfig:
        """Build from `to_dict` output; missing fields take their defaults."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ScheduleError(f"unknown ScheduleConfig field(s) {unknown}; allowed: {fields}")
        return cls(**data)


class FreezeSchedule:
    """Per-unit freeze points and learning rates for a run of ``total_iterations``.

    Index ``i`` in ``0 .. num_units - 1`` is a unit, ``num_units`` is the head; iterations
    ``j`` are 0-based.

    Attributes:
        config: the `ScheduleConfig`.
        num_units: freezable units (head excluded).
        total_iterations: optimizer steps in the whole run (from the real loader length).
        t: fraction of training per unit, head last (all 1.0 in ``full`` mode).
        max_j: ``t_i * total_iterations`` (float, rounded to 1e-6): unit i is frozen at
            every ``j > max_j[i]``.
        initial_lr: ``lr_i(0)``: ``base_lr / t_i`` if ``scale_lr`` else ``base_lr``.
    """

    def __init__(self, config: ScheduleConfig, num_units: int, total_iterations: int) -> None:
        if not isinstance(config, ScheduleConfig):  # a dict failed with AttributeError 'mode'
            hint = "; ScheduleConfig.from_dict(d) makes one" if isinstance(config, dict) else ""
            raise ScheduleError(
                f"FreezeSchedule takes a ScheduleConfig, got {type(config).__name__}{hint}"
            )
        self.config = config
        # the checked ints from here on: numpy counts made every max_j a numpy float
        self.num_units = num_units = _check_count("num_units", num_units)
        self.total_iterations = total_iterations = _check_count(
            "total_iterations", total_iterations
        )
        if config.mode == "full":
            self.t: tuple[float, ...] = (1.0,) * (num_units + 1)
        else:
            self.t = unit_t(num_units, config.t0, config.how_scale)
        # Rounded to 1e-6 iterations so float noise (0.8333... * 300 = 249.99999999999997)
        # cannot move a freeze by one iteration when t_i * total_iterations is an integer.
        self.max_j: tuple[float, ...] = tuple(round(t * total_iterations, 6) for t in self.t)
        self.initial_lr: tuple[float, ...] = tuple(
            config.base_lr / t if config.scale_lr else config.base_lr for t in self.t
        )
        if not math.isfinite(self.initial_lr[0]):
            if config.base_lr * self.t[0] > 1.0:  # base_lr itself near float's limit
                raise ScheduleError(
                    f"base_lr: {config.base_lr!r} is too large: the first unit's learning rate "
                    f"base_lr / t ({self.t[0]:.3g} at t0={config.t0!r}, "
                    f"how_scale={config.how_scale}) overflows; use a smaller base_lr"
                )
            raise ScheduleError(  # a subnormal t_0 (t0 = 1e-107, cubic)
                f"t0: {config.t0!r} is too small for how_scale={config.how_scale}: the first "
                f"unit's learning rate base_lr / t overflows; use a larger t0"
            )

    def __repr__(self) -> str:
        return (
            f"FreezeSchedule({self.config!r}, num_units={self.num_units}, "
            f"total_iterations={self.total_iterations})"
        )

    @property
    def freezes(self) -> bool:
        """Whether any unit ever freezes (False in ``full`` mode)."""
        return self.config.mode != "full"

    def _check_index(self, i: int) -> int:
        """``i`` as an int (a numpy one too, as the counts), if it is a unit or the head."""
        if integer(i) is None or not 0 <= i <= self.num_units:
            raise ScheduleError(
                f"index i must be an int in 0..{self.num_units} (head = {self.num_units}), "
                f"got {i!r}"
            )
        return int(i)

    @staticmethod
    def _check_iteration(j: int) -> int:
        """``j`` as an int (a numpy one too, as the counts), if it is an iteration."""
        if integer(j) is None or j < 0:
            raise ScheduleError(f"iteration j must be an int >= 0, got {j!r}")
        return int(j)

    def is_frozen(self, i: int, j: int) -> bool:
        """Whether unit ``i`` is frozen at iteration ``j`` (``j > max_j[i]``).

        The head and, in ``full`` mode, every unit are never frozen.
        """
        i, j = self._check_index(i), self._check_iteration(j)
        if i == self.num_units or not self.freezes:
            return False
        return j > self.max_j[i]

    def lr(self, i: int, j: int) -> float:
        """Learning rate of unit (or head) ``i`` at iteration ``j``.

        ``0.5 * lr_i(0) * (1 + cos(pi * j / max_j[i]))``; 0.0 once the unit is frozen.
        """
        if self.is_frozen(i, j):
            return 0.0
        i, j = int(i), int(j)
        # max_j rounds to 0 where t_i * total_iterations < 5e-7: the unit trains at j = 0 only,
        # at lr_i(0) (the ratio's limit), not at cos(0 / 0)
        max_j = self.max_j[i]
        return 0.5 * self.initial_lr[i] * (1.0 + math.cos(math.pi * j / max_j if max_j else 0.0))

    def frozen_count(self, j: int) -> int:
        """How many leading units are frozen at iteration ``j``; the head never counts.

        ``t`` is non-decreasing, so the frozen units always form a prefix.
        """
        j = self._check_iteration(j)
        count = 0
        while count < self.num_units and self.is_frozen(count, j):
            count += 1
        return count

    def freeze_iteration(self, i: int) -> int | None:
        """First iteration at which unit ``i`` is frozen (the first int ``j > max_j[i]``).

        None for the head, in ``full`` mode, and when that iteration is not inside the run
        (``>= total_iterations``).
        """
        i = self._check_index(i)
        if i == self.num_units or not self.freezes:
            return None
        j = math.floor(self.max_j[i]) + 1
        return j if j < self.total_iterations else None

    def freeze_iterations(self) -> list[int | None]:
        """`freeze_iteration` of every unit (head excluded), ``num_units`` entries."""
        return [self.freeze_iteration(i) for i in range(self.num_units)]

    def stretches(self, start: int, end: int) -> list[tuple[int, int]]:
        """Iterations ``start .. end - 1`` cut at every freeze inside them: ``(steps,
        frontier)`` per stretch, in order, the frontier being ``frozen_count`` at its start."""
        start, end = self._check_iteration(start), self._check_iteration(end)
        if end < start:  # gave a stretch of end - start < 0 steps
            raise ScheduleError(f"stretches: end {end} is before start {start}")
        cuts = sorted(
            {it for it in self.freeze_iterations() if it is not None and start < it < end}
        )
        points = [start, *cuts, end]
        return [
            (points[k + 1] - points[k], self.frozen_count(points[k]))
            for k in range(len(points) - 1)
        ]


def _cost_ok(c: object) -> bool:
    """Whether ``c`` is a finite number >= 0 (a numpy one, or a one-element tensor, too); a str
    or None was math.isfinite's TypeError."""
    if isinstance(c, str | bytes | bool):
        return False
    try:
        v = float(c)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v >= 0


def ideal_saving(
    schedule: FreezeSchedule,
    fwd_costs: Sequence[float],
    bwd_costs: Sequence[float],
    frozen_fwd_costs: Sequence[float] | None = None,
) -> dict[str, float]:
    """Ideal compute of full training, FreezeOut and PreFast under ``schedule``.

    A model, not a measurement: it ignores data loading, the cache-writing pass and any
    overhead. With ``J = total_iterations``, ``T_i = min(J, F_i)`` the iterations unit i
    trains (``F_i`` its freeze iteration; ``J`` if it never freezes; the head never does)
    and ``z_i`` its forward once frozen:

    - full training: ``sum_i (fwd_i + bwd_i) * J``;
    - FreezeOut (the frozen prefix is still recomputed forward every iteration):
      ``sum_i (fwd_i + bwd_i) * T_i + z_i * (J - T_i)``;
    - PreFast (a frozen unit costs nothing once frozen): ``sum_i (fwd_i + bwd_i) * T_i``.

    A frozen unit runs in eval mode under no_grad, which costs less than its training
    forward (no batch statistics, nothing saved for backward): 0.55-0.95 of it for
    DenseNet-BC-16's units on a 2-core CPU. Pass that cost as ``frozen_fwd_costs``, or the
    ideal saving over FreezeOut is overstated.

    Args:
        schedule: the freeze schedule.
        fwd_costs: forward cost per iteration of each unit while it trains, the head last
            (``num_units + 1`` entries, any unit such as MACs or seconds).
        bwd_costs: backward cost per iteration, same layout.
        frozen_fwd_costs: forward cost per iteration of each unit once frozen (eval mode,
            no_grad), same layout; ``fwd_costs`` when not given.

    Returns:
        ``full_cost``, ``freezeout_cost``, ``prefast_cost`` (absolute, in the cost unit
        times iterations); ``full`` (1.0), ``freezeout``, ``prefast`` (normalised by the
        full cost); ``freezeout_saving = 1 - freezeout / full``,
        ``prefast_saving = 1 - prefast / full`` and
        ``prefast_vs_freezeout = 1 - prefast / freezeout``.
    """
    if not isinstance(schedule, FreezeSchedule):  # AttributeError 'num_units'
        raise ScheduleError(f"ideal_saving takes a FreezeSchedule, got {type(schedule).__name__}")
    n = schedule.num_units + 1
    if frozen_fwd_costs is None:
        frozen_fwd_costs = fwd_costs
    for field, costs in (
        ("fwd_costs", fwd_costs),
        ("bwd_costs", bwd_costs),
        ("frozen_fwd_costs", frozen_fwd_costs),
    ):
        if not hasattr(costs, "__len__") or isinstance(costs, str):  # a number, a generator
            raise ScheduleError(
                f"{field} must be a sequence of num_units + 1 = {n} numbers, got {shown(costs)}"
            )
        if len(costs) != n:
            raise ScheduleError(
                f"{field} needs num_units + 1 = {n} entries (head last), got {len(costs)}"
            )
        if any(not _cost_ok(c) for c in costs):
            raise ScheduleError(f"{field} must be finite and >= 0, got {shown(list(costs))}")
    total = schedule.total_iterations
    full = freezeout = prefast = 0.0
    for i in range(n):
        f = schedule.freeze_iteration(i)
        trained = total if f is None else min(total, f)
        fwd, bwd, frozen = float(fwd_costs[i]), float(bwd_costs[i]), float(frozen_fwd_costs[i])
        full += (fwd + bwd) * total
        freezeout += (fwd + bwd) * trained + frozen * (total - trained)
        prefast += (fwd + bwd) * trained
    if full <= 0:
        raise ScheduleError("fwd_costs and bwd_costs sum to zero; nothing to compare")
    return {
        "full": 1.0,
        "freezeout": freezeout / full,
        "prefast": prefast / full,
        "full_cost": full,
        "freezeout_cost": freezeout,
        "prefast_cost": prefast,
        "freezeout_saving": 1.0 - freezeout / full,
        "prefast_saving": 1.0 - prefast / full,
        "prefast_vs_freezeout": 1.0 - prefast / freezeout,
    }


__all__ = [
    "MODES",
    "SCALES",
    "FreezeSchedule",
    "ScheduleConfig",
    "ScheduleError",
    "ideal_saving",
    "unit_t",
]
