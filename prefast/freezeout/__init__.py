"""FreezeOut: the per-unit schedule (when each unit freezes, its learning rate) and freezing."""

from prefast.freezeout.freezing import (
    TrainablePart,
    freeze_prefix,
    freeze_unit,
    make_optimizer,
    set_learning_rates,
    set_train_modes,
)
from prefast.freezeout.schedule import (
    MODES,
    SCALES,
    FreezeSchedule,
    ScheduleConfig,
    ideal_saving,
    unit_t,
)

__all__ = [
    "MODES",
    "SCALES",
    "FreezeSchedule",
    "ScheduleConfig",
    "TrainablePart",
    "freeze_prefix",
    "freeze_unit",
    "ideal_saving",
    "make_optimizer",
    "set_learning_rates",
    "set_train_modes",
    "unit_t",
]
