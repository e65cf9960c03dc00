"""PreFast: FreezeOut training that precomputes frozen layers' outputs into an activation store.

>>> from prefast import TrainConfig, train
>>> result = train(TrainConfig(dataset="synthetic", num_samples=512, epochs=3, mode="prefast"))
"""

from prefast.config import TrainConfig
from prefast.errors import CacheError, CheckpointError, ConfigError, PrefastError
from prefast.models import UnitModel, create_model, list_models
from prefast.schedule import FreezeSchedule, ScheduleConfig, ideal_saving
from prefast.trainer import Trainer, TrainResult, train

__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "FreezeSchedule",
    "PrefastError",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UnitModel",
    "create_model",
    "ideal_saving",
    "list_models",
    "train",
]
