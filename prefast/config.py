"""The resolved configuration of a training run, validated in one place.

Every field carries its CLI help and group in ``metadata``; ``prefast.cli`` generates the
``prefast train`` flags from them, so a field and its flag cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefast.data.specs import DATASETS, SHAPES, spec_for
from prefast.errors import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    shown,
)
from prefast.freezeout.schedule import MODES, SCALES

CACHE_TIERS = ("auto", "device", "ram", "zarr")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
CODECS = ("none", "lz4", "zstd")
RECACHE_POLICIES = ("auto", "every", "transitions")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16")
# The models prefast.models registers (the CLI's --model help names them before torch loads).
BUILTIN_MODELS = ("densenet_bc", "resnet18", "resnet34", "vgg", "wrn")

# Fields that may differ between a checkpoint's config and the resuming run's (none of them
# shapes a cached value, so none is in a cache folder's run key either). --dist-timeout and
# --eval-batch-size shape no training step: a resume whose ranks time out checking a large
# store needs a longer --dist-timeout, and one on a smaller GPU a smaller --eval-batch-size.
RESUMABLE_FIELDS = frozenset(
    {
        "resume",
        "progress",
        "metrics",
        "checkpoint_dir",
        "epochs",
        "device",
        "data_root",
        "download",
        "keep_freed_memory",
        "dist_timeout",
        "eval_batch_size",
    }
)

MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed takes
# create_model's own arguments: set from --model and the dataset, never from model_args
_NOT_MODEL_ARGS = ("name", "num_classes", "in_channels", "image_size")
MAX_DIST_TIMEOUT = 1e9  # seconds (about 31 years): a timedelta, and c10d's milliseconds, hold it

# field name -> allowed values (checked in __post_init__ and offered as CLI choices)
CHOICES: dict[str, tuple[Any, ...]] = {
    "dataset": DATASETS,
    "synthetic_shape": SHAPES,
    "mode": MODES,
    "how_scale": SCALES,
    "cache": CACHE_TIERS,
    "cache_dtype": CACHE_DTYPES,
    "codec": CODECS,
    "recache_policy": RECACHE_POLICIES,
    "device": DEVICES,
    "amp": AMP,
    "compile": ("auto", "none", "graphs", "inductor"),
    "feature_aug": ("none", "shift", "shift+flip"),
    "recache_mode": ("write-through", "pass"),
}


def opt(default: Any, group: str, help: str, *, cli: bool = True) -> Any:
    """A config field with its CLI group and help text (``%(default)s`` allowed in help)."""
    return field(default=default, metadata={"group": group, "help": help, "cli": cli})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Field names match the CLI flags (``--cache-dir`` is
    ``cache_dir``)."""

    # data
    dataset: str = opt("fashion-mnist", "data", "training data (default %(default)s)")
    data_root: str | None = opt(
        None,
        "data",
        "folder with the dataset in torchvision's layout (default ~/.cache/prefast/data; "
        "Fashion-MNIST then also /usr/share/datasets/fashion-mnist)",
    )
    download: bool = opt(
        False, "data", "download a missing dataset with torchvision (needs a network)"
    )
    num_samples: int | None = opt(
        None,
        "data",
        "synthetic: training-set size (default 50000; the test set is a fifth of it, 256 to 10000)",
    )
    synthetic_shape: str = opt(
        "cifar", "data", "synthetic: 3x32x32 (cifar) or 1x28x28 (mnist) (default %(default)s)"
    )
    subset: int | None = opt(
        None, "data", "train on a seeded random subset of N images (the paper used 2000)"
    )
    val_size: int = opt(0, "data", "hold out N training images for validation (default 0)")
    augment: bool = opt(True, "data", "turn off random crop/flip augmentation")
    # model
    model: str = opt("densenet_bc", "model", "a registered model (default %(default)s)")
    model_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"group": "model", "help": "the model's own arguments", "cli": False},
    )
    # optimisation (the reference implementation's defaults)
    epochs: int = opt(100, "optimisation", "epochs (default %(default)s)")
    batch_size: int = opt(
        50, "optimisation", "batch size per rank under torchrun (default %(default)s)"
    )
    base_lr: float = opt(0.1, "optimisation", "learning rate of the head (default %(default)s)")
    momentum: float = opt(0.9, "optimisation", "SGD momentum (default %(default)s)")
    weight_decay: float = opt(
        1e-4, "optimisation", "weight decay on all parameters (default %(default)s)"
    )
    nesterov: bool = opt(True, "optimisation", "plain momentum instead of Nesterov's")
    # FreezeOut
    mode: str = opt(
        "prefast",
        "FreezeOut",
        "full: no freezing; freezeout: freeze and recompute; prefast: freeze and cache (default %(default)s)",
    )
    t0: float = opt(
        0.8,
        "FreezeOut",
        "fraction of training when the first unit freezes, before scaling (default %(default)s)",
    )
    how_scale: str = opt("cubic", "FreezeOut", "scaling of the freeze ramp (default %(default)s)")
    scale_lr: bool = opt(True, "FreezeOut", "do not scale each unit's initial lr by 1/t_i")
    # cache
    cache: str = opt(
        "auto",
        "cache (prefast mode)",
        "where cached activations live; auto: device if it fits, else ram, else zarr; a cache "
        "larger than the free memory of the tier asked for goes to the next (default %(default)s)",
    )
    cache_dir: str | None = opt(
        None,
        "cache (prefast mode)",
        "folder or fsspec URL for zarr stores (default: CHECKPOINT_DIR/cache, else a temporary folder)",
    )
    cache_dtype: str = opt(
        "float16", "cache (prefast mode)", "dtype of cached activations (default %(default)s)"
    )
    codec: str = opt(
        "none",
        "cache (prefast mode)",
        "zarr compression (default %(default)s: memory-mapped reads)",
    )
    # README "How many views": more views cost a pass each, no gain measured
    feature_aug: str = opt(
        "none",
        "cache (prefast mode)",
        "augment cached samples in feature space each epoch: a shift scaled from the image "
        "crop, and a flip where the dataset flips (default %(default)s)",
    )
    views: int = opt(
        1,
        "cache (prefast mode)",
        "augmented views cached per sample, one drawn per epoch (default %(default)s)",
    )
    recache_policy: str = opt(
        "auto",
        "cache (prefast mode)",
        "auto: move the boundary when the measured saving pays; every freeze; or transitions only (default %(default)s)",
    )
    recache_mode: str = opt(
        "write-through",
        "cache (prefast mode)",
        "how a new cache is written: by the training steps from the freeze to the epoch's "
        "end, plus a catch-up pass over the epoch's earlier samples (write-through; falls back "
        "to passes where rows cannot be written: compressed or remote stores, several views, "
        "torchrun), or by a separate pass at the freeze (pass) (default %(default)s)",
    )
    cache_batch_size: int | None = opt(
        None, "cache (prefast mode)", "batch size of cache passes (default: --batch-size)"
    )
    cache_memory_fraction: float = opt(
        0.5,
        "cache (prefast mode)",
        "auto tier: the share of free device / host memory a cache may take (default %(default)s)",
    )
    # machine
    seed: int = opt(
        0,
        "machine",
        "seed of the model, order, augmentation and views, of the --subset and --val-size "
        "draws, and of the synthetic data (default %(default)s)",
    )
    device: str = opt(
        "auto", "machine", "auto: cuda when available, else cpu (default %(default)s)"
    )
    amp: str = opt(
        "none",
        "machine",
        "bf16 autocast, for CUDA; on the CPU it applies too, and changes the numbers "
        "(default %(default)s)",
    )
    channels_last: bool = opt(
        False, "machine", "channels_last memory format, for CUDA (on the CPU it applies too)"
    )
    compile: str = opt(
        "auto",
        "machine",
        "run each training step as a captured CUDA graph (graphs, CUDA only), with "
        "torch.compile'd units (inductor), or eagerly (none); auto: graphs on one CUDA "
        "device, none on the CPU and under torchrun (default %(default)s)",
    )
    sync_bn: bool = opt(
        False, "machine", "under torchrun on CUDA: SyncBatchNorm in the trainable units"
    )
    dist_timeout: float = opt(
        300.0, "machine", "seconds a rank waits for the others before failing (default %(default)s)"
    )
    keep_freed_memory: bool = opt(
        True,
        "machine",
        "leave the C allocator at its defaults (default: with glibc, memory a step frees is "
        "kept for the next step instead of being returned to the system and faulted back in)",
    )
    # outputs
    metrics: str | None = opt(
        None,
        "outputs",
        "JSONL file, one record per epoch and a summary; the config is saved beside it",
    )
    checkpoint_dir: str | None = opt(None, "outputs", "save a checkpoint every epoch here")
    resume: bool = opt(False, "outputs", "continue from --checkpoint-dir")
    eval_batch_size: int = opt(500, "outputs", "batch size of evaluation (default %(default)s)")
    progress: bool = opt(
        True, "outputs", "no progress bars (shown only where stderr is a terminal)"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            plain = _plain(value)
            if plain is not value:
                object.__setattr__(self, f.name, plain)
        for name, allowed in CHOICES.items():
            check_choice(cli_flag(name), getattr(self, name), allowed)
        if not isinstance(self.model, str) or not self.model:
            # None or ["densenet_bc"] passed until the model was built, after the data loaded
            raise ConfigError(
                f"--model: must be a registered model's name, e.g. 'densenet_bc', got "
                f"{self.model!r}"
            )
        check_number("--t0", self.t0, 0.0, 1.0, low_open=True)
        for name in ("views", "epochs", "batch_size", "eval_batch_size"):
            check_int(cli_flag(name), getattr(self, name))
        for name in ("num_samples", "subset", "cache_batch_size"):
            if getattr(self, name) is not None:
                check_int(cli_flag(name), getattr(self, name))
        for f in dataclasses.fields(self):
            if f.type == "bool":  # a str such as "no" would be truthy: augment="no" augmented
                check_bool(f.name, getattr(self, f.name))
        check_int("--val-size", self.val_size, minimum=0)
        # torch.manual_seed takes 64 bits: a larger seed failed in the model's build
        check_int("--seed", self.seed, minimum=0, maximum=MAX_SEED)
        # under torchrun it becomes a timedelta, which ends near 8.6e13 s (an OverflowError)
        check_number("--dist-timeout", self.dist_timeout, 0.0, MAX_DIST_TIMEOUT, low_open=True)
        check_number("--base-lr", self.base_lr, 0.0, low_open=True)
        check_number("--momentum", self.momentum, 0.0, 1.0)
        check_number("--weight-decay", self.weight_decay, 0.0)
        check_number("--cache-memory-fraction", self.cache_memory_fraction, 0.0, 1.0, low_open=True)
        for f in dataclasses.fields(self):
            if f.type == "float":  # checked above: a finite int or float
                # t0=1 and t0=1.0 are equal configs, but their JSON ("1", "1.0") differed, and
                # with it their hash and their cache folder's run key (a library run with
                # weight_decay=0 resumed with --weight-decay 0 looked in another run folder)
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        if self.nesterov and self.momentum == 0:
            raise ConfigError(
                "--momentum: Nesterov momentum needs --momentum > 0 (or --no-nesterov)"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume: needs --checkpoint-dir")
        if not isinstance(self.model_args, dict):
            raise ConfigError(f"model_args: must be a dict, got {self.model_args!r}")
        for k, v in self.model_args.items():
            # the config goes into JSON (--metrics, a zarr cache's run key) and checkpoints:
            # an array or an object there failed in the run (a TypeError at the first zarr
            # cache, a checkpoint --resume refused as damaged)
            try:
                json.dumps(v, allow_nan=False, sort_keys=True)  # as the run key hashes it
            except (TypeError, ValueError):
                raise ConfigError(
                    f"model_args: {k!r} must be JSON-able (numbers, strings, bools, None, and "
                    f"lists, tuples or dicts of them; no NaN or infinity), got {shown(v)}"
                ) from None
        # a copy: a dict the caller changes afterwards (a sweep's loop) changed the config
        object.__setattr__(self, "model_args", copy.deepcopy(self.model_args))
        # create_model(model, num_classes=..., in_channels=..., image_size=..., **model_args):
        # these names (and a key that is no name) failed there with a TypeError, after the data
        # had loaded
        taken = [k for k in self.model_args if not isinstance(k, str) or k in _NOT_MODEL_ARGS]
        if taken:
            raise ConfigError(
                f"model_args: {', '.join(map(repr, taken))} cannot be given: model_args are "
                "the factory's own keyword arguments (e.g. depth, growth); num_classes, "
                "in_channels and image_size come from the dataset, and the model's name is "
                "--model"
            )
        for name in ("data_root", "cache_dir", "metrics", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"{cli_flag(name)}: must be a path, got {value!r}")
            if value is not None and not os.fspath(value).strip():
                # "" meant no file for --metrics and --checkpoint-dir but the working folder
                # for --cache-dir (and for the cache of --checkpoint-dir ''): refused alike
                raise ConfigError(
                    f"{cli_flag(name)}: an empty path; leave the option out for its default"
                )
            if value is not None:
                # kept as a str: the config goes into JSON (--metrics) and checkpoints, which
                # --resume loads with weights_only=True (a pathlib.Path is refused there).
                # "~" is the home folder, as the start-up checks take it: a quoted "~/runs"
                # or --metrics=~/m.jsonl (no shell expands that) was checked, and created, in
                # the home folder, but written to a folder named "~" in the working directory
                expanded = os.path.expanduser(os.fspath(value))
                if expanded != value:
                    object.__setattr__(self, name, expanded)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __hash__(self) -> int:
        # the generated hash failed on model_args (a dict): a config as a dict key or in a
        # set raised TypeError; equal configs have equal JSON
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config of ``d``, a dict of fields as ``to_dict()`` makes (or a part of one:
        missing fields take their defaults); an unknown field is a ``ConfigError``."""
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"TrainConfig.from_dict: needs a dict of config fields, got {type(d).__name__}"
            )
        _check_field_names(d)
        return cls(**dict(d))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, validated as a new config; an unknown field is a
        ``ConfigError``."""
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)


def _check_field_names(names: Iterable[Any]) -> None:
    """Raise ``ConfigError`` naming the entries of ``names`` that are no config field (with the
    field each may have meant: ``epoch`` -> ``epochs``)."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(str(n), known, n=1)
            if close:
                hints.append(f"{n!r} -> {close[0]!r}")
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(f"unknown config fields {unknown}{hint}")


def _plain(value: Any) -> Any:
    """A numpy scalar (a sweep's ``np.linspace`` value, ``np.int64`` from ``np.arange``) as
    the Python number it holds, also among ``model_args``' values: the config goes into JSON
    and into checkpoints, which ``--resume`` loads with ``weights_only=True`` (it refuses
    numpy scalars: the run could not be resumed)."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, dict):
        plain = {k: _plain(v) for k, v in value.items()}
        return value if all(plain[k] is v for k, v in value.items()) else plain
    if isinstance(value, (list, tuple)):  # a model argument's list (widths=list(np.arange(3)))
        items = [_plain(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            return items
        return value._make(items) if hasattr(value, "_make") else tuple(items)
    return value


def cli_flag(name: str) -> str:
    """The ``prefast train`` flag of config field (or model argument) ``name``."""
    return "--" + name.replace("_", "-")


def switch_flag(name: str, default: bool) -> str:
    """The flag that turns bool field ``name`` away from its ``default``: ``--channels-last``
    for one off by default, ``--no-augment`` for one on."""
    return "--no-" + name.replace("_", "-") if default else cli_flag(name)


# the options of --mode prefast's cache, which full and freezeout runs do not use
CACHE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.metadata.get("group") == "cache (prefast mode)"
)


def unused_options(cfg: TrainConfig, device_type: str, distributed: bool) -> list[str]:
    """One line for each option set away from its default that this run will not use (the
    run goes on; the trainer logs them as warnings). ``device_type`` is the resolved device's
    (``cpu``/``cuda``); ``distributed`` says whether the run is under torchrun."""
    defaults = TrainConfig()
    changed = [n for n in CACHE_FIELDS if getattr(cfg, n) != getattr(defaults, n)]
    out = []
    if cfg.mode != "prefast" and changed:
        flags = ", ".join(cli_flag(n) for n in changed)
        out.append(f"{flags}: no effect with --mode {cfg.mode} (they apply to --mode prefast)")
    elif cfg.mode == "prefast":
        if cfg.feature_aug != "none" and not cfg.augment:
            out.append("--feature-aug: no effect with --no-augment")
        elif (
            cfg.feature_aug == "shift+flip" and not spec_for(cfg.dataset, cfg.synthetic_shape).flip
        ):
            name = cfg.dataset if cfg.dataset != "synthetic" else "synthetic (mnist shape)"
            out.append(
                f"--feature-aug shift+flip: {name} is not flipped in training, so only the "
                "shift applies (as --feature-aug shift)"
            )
        if cfg.cache == "device" and device_type == "cpu":
            out.append("--cache device: on the CPU the device is host memory, as --cache ram")
        if cfg.cache != "auto" and cfg.cache_memory_fraction != defaults.cache_memory_fraction:
            # an explicit tier takes all of its free memory (choose_tier)
            out.append(
                f"--cache-memory-fraction: no effect with --cache {cfg.cache} (it sizes --cache "
                "auto's choice)"
            )
    if cfg.mode == "full":  # every unit trains to the end: t_i = 1, no freeze, lr unscaled
        schedule = [
            switch_flag(n, True) if isinstance(getattr(defaults, n), bool) else cli_flag(n)
            for n in ("t0", "how_scale", "scale_lr")
            if getattr(cfg, n) != getattr(defaults, n)
        ]
        if schedule:
            out.append(
                f"{', '.join(schedule)}: no effect with --mode full (no unit freezes; they "
                "apply to --mode freezeout and prefast)"
            )
    if cfg.sync_bn and not distributed:
        out.append("--sync-bn: no effect outside torchrun")
    if cfg.dist_timeout != defaults.dist_timeout and not distributed:
        out.append("--dist-timeout: no effect outside torchrun")
    if cfg.synthetic_shape != defaults.synthetic_shape and cfg.dataset != "synthetic":
        out.append(f"--synthetic-shape: no effect with --dataset {cfg.dataset}")
    if cfg.dataset == "synthetic":
        read = [
            cli_flag(n)
            for n in ("data_root", "download")
            if getattr(cfg, n) != getattr(defaults, n)
        ]
        if read:
            out.append(
                f"{', '.join(read)}: no effect with --dataset synthetic (generated, not read)"
            )
    return out


__all__ = [
    "BUILTIN_MODELS",
    "CACHE_TIERS",
    "CHOICES",
    "MODES",
    "RECACHE_POLICIES",
    "TrainConfig",
    "cli_flag",
    "switch_flag",
    "unused_options",
]
