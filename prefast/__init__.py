"""PreFast: FreezeOut training that precomputes frozen layers' outputs into an activation store.

>>> from prefast import TrainConfig, train
>>> cfg = TrainConfig(dataset="synthetic", num_samples=256, model_args={"depth": 16, "growth": 8},
...                   epochs=3, t0=0.6, mode="prefast", progress=False)
>>> result = train(cfg)  # result.summary["final_test_error"], result.model: the trained model
>>> len(result.records), result.summary["frozen_units"]
(3, 9)

The packages follow the data flow: ``data`` (datasets, augmentation) -> ``models`` (units and
a head) -> ``freezeout`` (the schedule, freezing) -> ``cache`` (the frozen prefix's outputs in
a store, RAM or device memory) -> ``training`` (the run loop). The ``store`` package beside this
one holds the activation store itself and imports nothing from here.
"""

from typing import TYPE_CHECKING

from prefast.errors import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    ModelError,
    PrefastError,
    ScheduleError,
)

if TYPE_CHECKING:
    from prefast.config import TrainConfig
    from prefast.freezeout import FreezeSchedule, ScheduleConfig, ideal_saving
    from prefast.models import UnitModel, create_model, from_sequential, list_models
    from prefast.training import Trainer, TrainResult, train
else:  # imported on first use (store._lazy): the CLI answers --help without torch
    from store._lazy import exports

    __getattr__, __dir__ = exports(
        __name__,
        {
            "prefast.config": ("TrainConfig",),
            "prefast.freezeout": ("FreezeSchedule", "ScheduleConfig", "ideal_saving"),
            "prefast.models": ("UnitModel", "create_model", "from_sequential", "list_models"),
            "prefast.training": ("Trainer", "TrainResult", "train"),
        },
    )

__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "FreezeSchedule",
    "ModelError",
    "PrefastError",
    "ScheduleConfig",
    "ScheduleError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UnitModel",
    "create_model",
    "from_sequential",
    "ideal_saving",
    "list_models",
    "train",
]
