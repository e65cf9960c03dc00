"""The resolved configuration of a training run, validated in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefast.data import DATASETS
from prefast.errors import ConfigError

MODES = ("full", "freezeout", "prefast")
CACHE_TIERS = ("auto", "device", "ram", "zarr")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
CODECS = ("none", "lz4", "zstd")
RECACHE_POLICIES = ("auto", "every", "transitions")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16")
SCALES = ("linear", "squared", "cubic")


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(map(str, allowed))}"
        )


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"--{name.replace('_', '-')}: must be an integer >= {minimum}, got {value!r}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Field names match the CLI flags (``--cache-dir`` is
    ``cache_dir``)."""

    # data
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    download: bool = False
    num_samples: int | None = None  # synthetic only: training-set size
    synthetic_shape: str = "cifar"
    subset: int | None = None  # the paper's setting: a random subset of the training split
    val_size: int = 0
    augment: bool = True
    # model
    model: str = "densenet_bc"
    model_args: dict[str, Any] = field(default_factory=dict)
    # optimisation (reference defaults, DESIGN section 2)
    epochs: int = 100
    batch_size: int = 50
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    # FreezeOut
    mode: str = "prefast"
    t0: float = 0.8
    how_scale: str = "cubic"
    scale_lr: bool = True
    # cache
    cache: str = "auto"
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    codec: str = "none"
    views: int = 1  # README "How many views": more views cost a pass each, no gain measured
    recache_policy: str = "auto"
    cache_batch_size: int | None = None  # None: the training batch size
    cache_memory_fraction: float = 0.5
    # machine
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    sync_bn: bool = False  # torchrun on CUDA: SyncBatchNorm in the trainable units
    dist_timeout: float = 300.0  # seconds a collective may wait for a rank before failing
    # outputs
    metrics: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    eval_batch_size: int = 500
    progress: bool = True

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("mode", self.mode, MODES)
        _choice("cache", self.cache, CACHE_TIERS)
        _choice("cache_dtype", self.cache_dtype, CACHE_DTYPES)
        _choice("codec", self.codec, CODECS)
        _choice("recache_policy", self.recache_policy, RECACHE_POLICIES)
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP)
        _choice("how_scale", self.how_scale, SCALES)
        _choice("synthetic_shape", self.synthetic_shape, ("cifar", "mnist"))
        if not isinstance(self.t0, int | float) or not 0.0 < float(self.t0) <= 1.0:
            raise ConfigError(f"--t0: must be in (0, 1], got {self.t0!r}")
        if self.views < 1:
            raise ConfigError(f"--views: must be >= 1, got {self.views}")
        _positive("views", self.views)
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        if self.cache_batch_size is not None:
            _positive("cache_batch_size", self.cache_batch_size)
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("val_size", self.val_size, minimum=0)
        _positive("seed", self.seed, minimum=0)
        if self.num_samples is not None:
            _positive("num_samples", self.num_samples)
        if self.subset is not None:
            _positive("subset", self.subset)
        if self.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout: must be > 0 seconds, got {self.dist_timeout}")
        if self.base_lr <= 0:
            raise ConfigError(f"--base-lr: must be > 0, got {self.base_lr}")
        if not 0.0 < self.cache_memory_fraction <= 1.0:
            raise ConfigError(
                f"--cache-memory-fraction: must be in (0, 1], got {self.cache_memory_fraction}"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume: needs --checkpoint-dir")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


__all__ = ["CACHE_TIERS", "MODES", "RECACHE_POLICIES", "TrainConfig"]
