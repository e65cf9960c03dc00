"""FreezeOut: the per-unit schedule (when each unit freezes, its learning rate), the optimizer
that follows it on the device, and freezing."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefast.freezeout.freezing import (
        TrainablePart,
        freeze_prefix,
        freeze_unit,
        set_train_modes,
    )
    from prefast.freezeout.optim import UnitSGD
    from prefast.freezeout.schedule import (
        MODES,
        SCALES,
        FreezeSchedule,
        ScheduleConfig,
        ideal_saving,
        unit_t,
    )
else:  # imported on first use (store._lazy): the schedule's names need no torch
    from store._lazy import exports

    __getattr__, __dir__ = exports(
        __name__,
        {
            "prefast.freezeout.freezing": (
                "TrainablePart",
                "freeze_prefix",
                "freeze_unit",
                "set_train_modes",
            ),
            "prefast.freezeout.optim": ("UnitSGD",),
            "prefast.freezeout.schedule": (
                "MODES",
                "SCALES",
                "FreezeSchedule",
                "ScheduleConfig",
                "ideal_saving",
                "unit_t",
            ),
        },
    )

__all__ = [
    "MODES",
    "SCALES",
    "FreezeSchedule",
    "ScheduleConfig",
    "TrainablePart",
    "UnitSGD",
    "freeze_prefix",
    "freeze_unit",
    "ideal_saving",
    "set_train_modes",
    "unit_t",
]
