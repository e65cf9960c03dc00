"""Training with full, FreezeOut and PreFast (FreezeOut + cached frozen-prefix outputs).

One step at iteration ``j`` of epoch ``e``, batch ``k``:

1. Units with ``j > max_j_i`` freeze (``prefast.freezeout.freeze_unit``): the frontier ``f``
   moves forward. In ``prefast`` mode the cache boundary ``b <= f`` may move too
   (``CacheManager.on_freeze``).
2. The batch is samples ``epoch_permutation(N, seed, e)[k*B:(k+1)*B]``: images when ``b == 0``,
   else cached activations (view ``epoch_views(N, V, seed, e)[i]``) through ``StoreLoader``.
3. ``units[b:f]`` run forward-only under no_grad; ``units[f:]`` and the head train.

With augmentation off and an fp32 cache, ``prefast`` and ``freezeout`` therefore see the same
batches and compute the same losses and weights to float tolerance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prefast import interrupt
from prefast.cache.identity import check_cache_dir, state_digest
from prefast.cache.manager import CacheManager
from prefast.config import TrainConfig, cli_flag, switch_flag, unused_options
from prefast.data import (
    Augment,
    DatasetSpec,
    FeatureAugment,
    ImageData,
    epoch_key,
    feature_key,
    load_data,
    make_batch,
)
from prefast.distributed import DistContext
from prefast.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    ModelError,
    PrefastError,
    integer,
)
from prefast.freezeout import (
    FreezeSchedule,
    ScheduleConfig,
    TrainablePart,
    UnitSGD,
    freeze_prefix,
    freeze_unit,
    set_train_modes,
)
from prefast.models import UnitModel, create_model
from prefast.monitor import PeakMemory, Stopwatch, peak_device_bytes
from prefast.paths import check_writable_dir, check_writable_file, remove_made_dirs
from prefast.runtime import autocast, keep_freed_memory, resolve_device
from prefast.training.batches import Batch, image_batches
from prefast.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    RESUMABLE_FIELDS,
    RESUME_ENTRIES,
    checkpoint_load_reason,
    load_checkpoint_file,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_dict_mismatch,
)
from prefast.training.metrics import MetricsSink, config_path
from prefast.training.step import EpochMeter, StepRunner, check_graphs
from store import location
from store.tiers import to_device

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10  # steps between progress-bar updates


def build_model(cfg: TrainConfig, spec: DatasetSpec) -> UnitModel:
    """The run's model, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return create_model(
        cfg.model,
        num_classes=spec.num_classes,
        in_channels=spec.channels,
        image_size=spec.image_size,
        **cfg.model_args,
    )


def check_model_fits(model: UnitModel, name: str, spec: DatasetSpec) -> None:
    """Raise ``ModelError`` unless ``model`` maps one of the dataset's images to
    ``(1, num_classes)`` logits: a factory that ignores ``in_channels`` or ``image_size`` fails
    here with one line instead of in the first step, and one that ignores ``num_classes``
    (more logits than classes trained silently; fewer failed with a bare IndexError); and
    unless it maps a batch of 2 to 2 rows of logits."""
    shape = (spec.channels, spec.image_size, spec.image_size)
    hint = (
        f"does its factory build for in_channels={spec.channels}, "
        f"image_size={spec.image_size} and num_classes={spec.num_classes}?"
    )
    try:
        with model._probe():  # eval mode, no_grad, zero images; training flags restored
            # float32, as make_batch gives the images: in the parameters' dtype, a model made
            # .double() passed here and failed at its first step
            out = model(model._dummy(shape).float())
            # a unit or head that reduces over the batch (mean(dim=0) for mean(dim=1)) maps one
            # image to one row too: it failed in the first step, in the loss, with torch's
            # "Expected input batch_size (1) to match target batch_size (50)"
            rows = _rows_of_two(model, shape) if _shape_of(out) == (1, spec.num_classes) else 2
    except torch.cuda.OutOfMemoryError:  # a RuntimeError too, not the model's fault
        raise
    except (RuntimeError, ValueError) as e:  # torch's shape errors; a model's own checks
        msg = " ".join(str(e).split())
        raise ModelError(
            f"model {name!r} does not run on {spec.name}'s {'x'.join(map(str, shape))} images "
            f"({msg}); {hint}"
        ) from e
    got = _shape_of(out)
    if got != (1, spec.num_classes):
        raise ModelError(
            f"model {name!r}: its output for one {spec.name} image is {got}, not logits of "
            f"shape (1, {spec.num_classes}) for the dataset's {spec.num_classes} classes; {hint}"
        )
    if rows != 2:
        raise ModelError(
            f"model {name!r}: for a batch of 2 {spec.name} images it returns {rows}; each unit "
            "and the head must keep the batch first, (B, ...) in and out, and return one row "
            "of logits per image"
        )


def _shape_of(out: object) -> tuple[int, ...] | str:
    return tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__


def _rows_of_two(model: UnitModel, shape: tuple[int, ...]) -> int | str:
    """2 where ``model`` maps a batch of 2 images to 2 rows of logits, else what it returns,
    naming the first unit (or the head) whose tensor output does not hold the batch of 2."""
    out = model(model._dummy(shape, 2).float())
    if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == 2:
        return 2
    h: Any = model._dummy(shape, 2).float()
    for i, part in enumerate([*model.units, model.head]):
        h = part(h)
        if isinstance(h, torch.Tensor) and (h.dim() == 0 or h.shape[0] != 2):
            where = "the head" if i == model.num_units else f"unit {i} ({model.unit_names[i]})"
            return f"shape {tuple(h.shape)} from {where}"
    return str(_shape_of(out))


@dataclass
class TrainResult:
    """What a run produced: per-epoch records, the summary, and where things are."""

    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # per step
    model: UnitModel | None = None


class Trainer:
    """Runs one configuration: ``Trainer(cfg)`` loads the data, builds the model and takes the
    cache folder's lock; ``run()`` trains, returns a ``TrainResult`` and releases what the run
    holds. A Trainer runs once. One that is not run holds the cache folder (a second run with
    these settings is refused) until ``close()``; ``with Trainer(cfg) as t:`` closes it. The
    global random generators the run seeds (torch's) or sets (a resume: numpy's, Python's)
    are as the caller left them once it ends, fails or is closed."""

    def __init__(self, cfg: TrainConfig) -> None:
        if not isinstance(cfg, TrainConfig):
            # a dict (a saved --metrics config) failed with AttributeError 'keep_freed_memory'
            hint = (
                "; TrainConfig.from_dict(d) makes one from a dict" if isinstance(cfg, dict) else ""
            )
            raise ConfigError(
                f"train and Trainer take a TrainConfig, got {type(cfg).__name__}{hint}"
            )
        self.cfg = cfg
        self._closed = False
        if cfg.keep_freed_memory:
            keep_freed_memory()
        self.dist = DistContext.from_env(resolve_device(cfg.device).type, cfg.dist_timeout)
        # the run seeds torch's generators (the model's initialisation) and a resume sets
        # numpy's and Python's: the caller's are put back when the run ends
        self._caller_rng = _global_rng_state(self.dist.device)
        self.cache: CacheManager | None = None
        self._made_dirs: list[Path] = []  # output folders this start created
        try:
            self._set_up(cfg)
        except BaseException:
            try:
                self._close(failed=True)
            finally:
                remove_made_dirs(self._made_dirs)  # a refused start leaves no empty folders
            raise

    def _close(self, failed: bool) -> None:
        """Release what the run holds: the cache (the run folder's lock, a temporary folder)
        and the process group (a process that exits without destroying it may abort). A stop
        requested with ``interrupt.request_stop`` was this run's: forgotten, so that the next
        ``train`` in the process (a notebook's re-run) does not stop at its first step."""
        self._closed = True
        try:
            if self.cache is not None:
                self.cache.close(failed)
        finally:
            interrupt.clear()
            try:
                self.dist.shutdown()
            finally:
                _set_global_rng_state(self._caller_rng)

    def close(self) -> None:
        """Release what a Trainer that was not run holds (the cache folder's lock, a temporary
        cache folder, the process group); ``run()`` does this itself. Closing twice is fine."""
        if not self._closed:
            self._close(failed=False)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_up(self, cfg: TrainConfig) -> None:
        """Everything the run needs before its first epoch; on failure ``__init__`` closes
        what was opened."""
        # before any data is loaded or any step runs
        # as the steps do, but before the data is loaded and the model built
        check_graphs(cfg.compile, self.dist.device)
        self.dist.on_main("checking the run's outputs", lambda: check_outputs(cfg, self._made_dirs))
        if self.dist.is_main:
            for line in unused_options(cfg, self.dist.device.type, self.dist.enabled):
                log.warning("%s", line)
        self.device = self.dist.device
        self.progress = cfg.progress and self.dist.is_main
        failed = None
        try:
            self.data = load_data(cfg)
        except PrefastError as e:  # e.g. a --data-root on each node's own disk, one lacking it
            failed = e
        self.dist.share_refusal(failed, "loading the data", DataError)
        self.model = build_model(cfg, self.data.train.spec).to(self.device)
        check_model_fits(self.model, cfg.model, self.data.train.spec)
        if cfg.mode != "full" and not any(p.requires_grad for p in self.model.head.parameters()):
            # every unit freezes before the run ends; the steps after the last freeze would
            # have nothing to train (the backward failed there, near the end of the run)
            raise ModelError(
                f"model {cfg.model!r}: its head has no trainable parameters; the head trains "
                f"alone once every unit has frozen (--mode {cfg.mode}): give it one, e.g. the "
                "classifier's Linear"
            )
        if cfg.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn: needs CUDA (SyncBatchNorm does not run on the CPU)")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = Augment.from_spec(self.data.train.spec, cfg.augment)
        views = cfg.views
        # outside prefast mode unused_options has named --views already (no cache, no views)
        if cfg.mode == "prefast" and cfg.views > 1 and self.augment.identity:
            log.warning(
                "--views %d without augmentation would store %d identical copies; using 1 view",
                cfg.views,
                cfg.views,
            )
            views = 1
        n = len(self.data.train)
        # --batch-size is per rank; every rank reads N // world_size samples an epoch
        self.samples_per_rank = n // self.dist.world_size
        if self.samples_per_rank < 1:
            raise ConfigError(
                f"--nproc-per-node: {self.dist.world_size} ranks for {n} training image(s): "
                "each rank needs one at least; start at most "
                f"{n} rank(s) or train on more images"
            )
        self.iters_per_epoch = math.ceil(self.samples_per_rank / cfg.batch_size)
        self.total_iterations = cfg.epochs * self.iters_per_epoch
        self.schedule = FreezeSchedule(
            ScheduleConfig(
                mode=cfg.mode,
                t0=cfg.t0,
                how_scale=cfg.how_scale,
                scale_lr=cfg.scale_lr,
                base_lr=cfg.base_lr,
            ),
            self.model.num_units,
            self.total_iterations,
        )
        self.optimizer = self._make_optimizer(range(self.model.num_units))
        self.frontier = 0
        # the iteration at which each unit froze (None: not yet); a resume with another
        # --epochs changes the schedule, whose freeze iterations the units frozen before
        # it did not follow
        self.froze_at: list[int | None] = [None] * self.model.num_units
        self.ddp: torch.nn.Module | None = None  # DistributedDataParallel over the trainable part
        compile_mode = cfg.compile
        if compile_mode == "auto":  # graphs measured 1.3-4.2x faster per step on an H200
            compile_mode = (
                "graphs" if self.device.type == "cuda" and not self.dist.enabled else "none"
            )
        elif compile_mode == "graphs" and self.dist.enabled:
            log.warning("--compile graphs: not under torchrun (DDP); running eager steps")
            compile_mode = "none"
        self.feature_aug = FeatureAugment.from_spec(
            self.data.train.spec, cfg.feature_aug, enabled=cfg.augment
        )
        self.steps = StepRunner(
            self.model,
            self.device,
            cfg.amp,
            cfg.channels_last,
            compile_mode,
            cfg.batch_size,
            self.feature_aug,
        )
        if self.device.type == "cuda":
            # The image path stays on the device: uint8 CIFAR is 150 MB, and make_batch then
            # gathers, crops and flips there (full and freezeout must not be input-bound).
            self.data.train = self.data.train.to(self.device)
            self.data.test = self.data.test.to(self.device)
            if self.data.val is not None:
                self.data.val = self.data.val.to(self.device)
        self.cache = (
            CacheManager(
                cfg,
                self.model,
                self.data,
                self.augment,
                views,
                self.schedule,
                self.dist,
                self.progress,
                # as the steps run (resolved above: eager under torchrun, whatever --compile)
                graphs=self.steps.mode == "graphs",
            )
            if cfg.mode == "prefast"
            else None
        )
        self.start_epoch = 0
        # seconds --resume spent checking or rebuilding the cache, counted in the first epoch
        self.resume_cache_seconds = 0.0
        self._cache_state: tuple[Any, Any] | None = None  # --resume's, restored in run()
        self.epoch = 0  # the epoch under way
        self.iteration = 0  # steps done, all epochs together
        self._checkpoint_epochs: int | None = None  # epochs the checkpoint on disk holds
        self.result = TrainResult()
        self.dist.barrier("start-up")

    def _make_optimizer(self, units: range) -> UnitSGD:
        return UnitSGD(
            self.model,
            self.schedule,
            units,
            momentum=self.cfg.momentum,
            nesterov=self.cfg.nesterov,
            weight_decay=self.cfg.weight_decay,
        )

    @property
    def boundary(self) -> int:
        return self.cache.boundary if self.cache is not None else 0

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train (from the checkpoint with ``resume``), then release the cache folder and the
        process group; the result's ``model`` is the trained model, in eval mode."""
        if self._closed:
            # a second run trained the trained model again without its cache, appending its
            # epochs to the first run's records
            raise PrefastError(
                "Trainer.run: this Trainer has run or was closed already (a Trainer runs "
                "once); make a new one, Trainer(cfg), or call train(cfg)"
            )
        cfg = self.cfg
        failed = False
        metrics: MetricsSink | None = None
        peak: PeakMemory | None = None
        try:
            # a refused resume releases the run folder too (a library caller may try again)
            if cfg.resume:
                self._load_checkpoint()
            metrics = MetricsSink(
                cfg.metrics if self.dist.is_main else None, cfg.to_dict(), self.result.records
            )
            self._restore_cache()
            peak = PeakMemory().start()
            set_train_modes(self.model, self.frontier)
            self._wrap_trainable()
            epochs = tqdm(
                range(self.start_epoch, cfg.epochs),
                desc=f"{cfg.mode} {cfg.model}",
                unit="epoch",
                disable=not self.progress,
                initial=self.start_epoch,
                total=cfg.epochs,
            )
            for epoch in epochs:
                self.epoch = epoch
                peak.reset()
                peak_device_bytes(self.device, reset=True)
                rec = self._train_epoch(epoch)
                self._sync_buffers()
                test_loss, test_err = self.evaluate(self.data.test)
                rec.update(test_loss=test_loss, test_error=test_err)
                if self.data.val is not None:
                    val_loss, val_err = self.evaluate(self.data.val)
                    rec.update(val_loss=val_loss, val_error=val_err)
                rec.update(
                    peak_host_private_bytes=peak.peak(),
                    peak_gpu_bytes=peak_device_bytes(self.device),
                )
                if self.dist.enabled:
                    rec.update(self._check_ranks_agree(epoch))
                self.result.records.append(rec)
                metrics.write(rec)
                epochs.set_postfix(
                    loss=f"{rec['train_loss']:.3f}",
                    test_err=f"{test_err:.4f}",
                    frozen=self.frontier,
                )
                planned = rec["plan_seconds"]
                log.info(
                    "epoch %d: train loss %.4f acc %.4f, test error %.4f%s, %.2f s (%scache "
                    "%.2f s, waiting for batches %.2f s), frozen %d, boundary %d",
                    epoch,
                    rec["train_loss"],
                    rec["train_accuracy"],
                    test_err,
                    f", val error {rec['val_error']:.4f}" if "val_error" in rec else "",
                    rec["train_seconds"],
                    "" if planned is None else f"the plan predicted {planned:.2f} s, ",
                    rec["cache_build_seconds"],
                    rec["input_wait_seconds"],
                    self.frontier,
                    rec["cache_boundary"],
                )
                if not math.isfinite(test_loss):
                    # the epoch's last update made the weights diverge: the loss checked before
                    # each step never sees it, so a last epoch's ended as a success (its error
                    # from NaN logits), and an earlier epoch's checkpoint held NaN weights
                    raise FloatingPointError(
                        f"iteration {self.iteration - 1}: the test loss after this step is not "
                        f"finite (the weights diverged); {self._divergence_remedy()}"
                    )
                self._save_checkpoint(epoch + 1)
            self.result.summary = self._summary()
            metrics.write(self.result.summary)
            if self.cache is not None:
                self.cache.release_superseded()  # the run is done; no checkpoint needs them
        except (interrupt.Stopped, KeyboardInterrupt) as e:
            failed = True
            if metrics is not None:
                with contextlib.suppress(OSError):  # a full disk must not hide the stop
                    metrics.write(self._stopped_record(e))
            raise
        except BaseException as e:
            failed = True
            if metrics is not None and isinstance(e, Exception):
                with contextlib.suppress(OSError):  # a full disk must not hide the error
                    metrics.write(self._failed_record(e))
            raise
        finally:
            if peak is not None:
                peak.stop()
            if metrics is not None:
                metrics.close()
            self._close(failed)
        # eval mode throughout: the model said model.training False while its head and
        # trainable units were left training, so result.model(x) updated their BatchNorm
        # statistics (the model drifted from the one the summary evaluated)
        self.result.model = self.model.eval()
        return self.result

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """(x, y, sample ids) of this rank's batches from ``start`` on, from the current source."""
        if self.cache is not None and self.cache.boundary > 0:
            return self.cache.batches(epoch, start)
        return image_batches(
            self.data.train,
            self.augment,
            seed=self.cfg.seed,
            epoch=epoch,
            aug_key=self.cache.image_aug_key(epoch)
            if self.cache is not None
            else epoch_key(self.cfg.seed, epoch),
            start=start,
            batch_size=self.cfg.batch_size,
            iterations=self.iters_per_epoch,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
        )

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        watch = Stopwatch(self.device)
        # a resumed run's first epoch carries the seconds spent reopening or rebuilding its cache
        watch.seconds, resumed = self.resume_cache_seconds, self.resume_cache_seconds
        self.resume_cache_seconds = 0.0
        cache_before = (self.cache.seconds if self.cache is not None else 0.0) - resumed
        probe_before = self.cache.probe_seconds if self.cache is not None else 0.0
        captures_before = self.steps.captures
        meter = EpochMeter(self.iters_per_epoch, self.device, self._divergence_remedy())
        visited: list[torch.Tensor] = []  # this rank's batches' sample ids, counted at the end
        j = epoch * self.iters_per_epoch
        bar = tqdm(
            total=self.iters_per_epoch,
            desc=f"epoch {epoch}",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        # this epoch's feature-space augmentation of cached samples, every sample's row
        fa_rows = None
        if self.cache is not None and not self.feature_aug.identity:
            shift, flips = self.feature_aug.draws(
                feature_key(self.cfg.seed, epoch), len(self.data.train)
            )
            fa_rows = (shift.to(self.device), flips.to(self.device))
        with watch:
            if self.cache is not None:
                self._advance_frontier(j)  # the freezes due at the epoch's first step, first
                self.cache.begin_epoch(epoch, self.frontier)  # a cache to write through, or not
            batches = self._batches(epoch, 0)
            self._configure_steps()
            k = 0
            waited = 0.0  # host seconds spent waiting for the next batch (a starved step)
            try:
                while k < self.iters_per_epoch:
                    interrupt.check()  # a stop asked for from outside: here, between steps
                    j = epoch * self.iters_per_epoch + k
                    if self._advance_frontier(j):
                        batches.close()  # type: ignore[attr-defined]
                        batches = self._batches(epoch, k)  # the same batch k, from the new source
                    t = time.perf_counter()
                    h, y, ids = next(batches)
                    waited += time.perf_counter() - t
                    visited.append(ids)
                    aug = None
                    if fa_rows is not None and self.boundary > 0:  # a batch read from a cache
                        sel = to_device(ids, self.device)
                        aug = (fa_rows[0][sel], fa_rows[1][sel])
                    self.dist.run("a training step", self.steps.step, h, y, j, k, meter, aug, ids)
                    k += 1
                    self.iteration = j + 1
                    if k % PROGRESS_EVERY == 0 or k == self.iters_per_epoch:
                        bar.update(k - bar.n)  # a count only: reading the loss would sync
            finally:
                batches.close()  # type: ignore[attr-defined]
                bar.close()
            if self.cache is not None:
                self.cache.end_epoch(epoch)  # the cache written this epoch takes over
        totals = meter.read()  # raises on a non-finite loss, naming its iteration
        self.result.losses.extend(totals.losses)
        loss_sum, correct_f, seen_f = self.dist.sum(
            [totals.loss_sum, float(totals.correct), float(totals.seen)],
            "combining the epoch's loss",
        )
        # this rank's visits per sample (an epoch has at least one step)
        visits = torch.bincount(torch.cat(visited), minlength=len(self.data.train)).to(torch.int32)
        if self.dist.enabled:
            visits = self.dist.run("combining the epoch's sample visits", _all_reduce_int, visits)
        cur = self.cache.cache if self.cache is not None else None
        loader = self.cache.take_loader_stats() if self.cache is not None else None
        return {
            "epoch": epoch,
            "iterations": (epoch + 1) * self.iters_per_epoch,
            "train_loss": loss_sum / max(seen_f, 1),
            "train_accuracy": correct_f / max(seen_f, 1),
            "samples_seen": int((visits > 0).sum()),  # distinct samples, all ranks together
            "samples_seen_twice": int((visits > 1).sum()),
            "train_seconds": watch.seconds,
            "input_wait_seconds": waited,
            # where the cache loaders' time went (None: every batch came from the images)
            "loader_seconds": loader.as_dict() if loader is not None and loader.batches else None,
            "cache_build_seconds": (self.cache.seconds if self.cache is not None else 0.0)
            - cache_before,
            # of which: --resume reopening (checks) or rebuilding the cache before the epoch
            "resume_cache_seconds": resumed,
            # measuring the planner's costs (unit forwards, tier rates): part of the epoch
            "probe_seconds": (self.cache.probe_seconds if self.cache is not None else 0.0)
            - probe_before,
            # the cache the epoch's steps wrote through, where one was completed at its end
            "write_through": self.cache.take_write_through_account()
            if self.cache is not None
            else None,
            # the write-through plan's prediction for this epoch (None: no plan covers it)
            "plan_seconds": self.cache.predicted_seconds(epoch) if self.cache is not None else None,
            "frozen_units": self.frontier,
            "cache_boundary": self.boundary,
            "cache_tier": cur.tier if cur is not None else None,
            "cache_bytes": cur.nbytes if cur is not None else 0,
            "lr_head": self.schedule.lr(self.model.num_units, min(j, self.total_iterations - 1)),
            # CUDA graphs captured by the epoch's steps (each epoch captures its own: the first
            # configure drops the graph), as a resumed run counts them too
            "step_captures": self.steps.captures - captures_before,
        }

    def _configure_steps(self) -> None:
        w = self.cache.writing if self.cache is not None else None
        self.steps.configure(
            self.boundary,
            self.frontier,
            self.optimizer,
            self.ddp,
            tap_at=w.target if w is not None else 0,
            tap_fn=self.cache.take if w is not None and self.cache is not None else None,
            tap_dtype=w.dtype if w is not None else None,
        )

    def _advance_frontier(self, j: int) -> bool:
        """Freeze what the schedule says at iteration j; in prefast mode re-cache when the policy
        says so. True when the batch source changed."""
        f = self.schedule.frozen_count(j)
        if f <= self.frontier:
            return False
        for i in range(self.frontier, f):
            freeze_unit(self.model, self.optimizer, i, j)
            self.froze_at[i] = j
        # under torchrun each rank's last step updated its own BatchNorm statistics: the
        # frozen units keep rank 0's, as the checkpoint will, before any cache pass uses them
        self._sync_buffers(self.model.units[self.frontier : f])
        self.frontier = f
        self._wrap_trainable()  # the trainable set changed
        moved = self.cache.on_freeze(j, f) if self.cache is not None else False
        self._configure_steps()
        return moved

    # ---- the trainable part under DistributedDataParallel ----------------------------------------
    def _wrap_trainable(self) -> None:
        """(Re-)wrap units[frontier:] and the head in DDP: the set of trainable parameters changes
        whenever units freeze, and the frozen prefix stays out of gradient synchronisation."""
        if not self.dist.enabled:
            return
        from torch.nn.parallel import DistributedDataParallel

        part = TrainablePart(self.model, self.frontier)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = self.dist.run(
            "wrapping the trainable units in DistributedDataParallel",
            lambda: DistributedDataParallel(part, device_ids=ids),
        )

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, data: ImageData) -> tuple[float, float]:
        """(mean loss, error) of the model on ``data``, in eval mode; under torchrun each rank
        evaluates every world_size-th sample and the sums are combined. Sums stay on the
        device until the end (no per-batch sync). Every module's training flag is restored
        after: during the run the frozen units stay in eval mode and the others train, and
        after it the returned model stays in eval mode (set_train_modes here put its head and
        last units back in train mode, and its next call then updated their BatchNorm
        statistics)."""
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        n = len(data)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        mine = np.arange(self.dist.rank, n, self.dist.world_size)
        starts = range(0, len(mine), self.cfg.eval_batch_size)
        # the whole model's forward over the test set (and the validation set) after each
        # epoch: a minute or more on a CPU for a large model
        bar = tqdm(
            total=len(starts),
            desc="evaluating",
            unit="batch",
            disable=not self.progress,
            leave=False,
        )
        try:
            with torch.no_grad(), autocast(self.device, self.cfg.amp):
                for s in starts:
                    interrupt.check()
                    idx = mine[s : s + self.cfg.eval_batch_size]
                    x, y = make_batch(data, idx, None, self.device)
                    if self.cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out = self.model(x).float()
                    total += F.cross_entropy(out, y, reduction="sum").double()
                    correct += (out.argmax(1) == y).sum()
                    bar.update(1)  # a count only: reading the sums would sync
        finally:
            bar.close()
            for m, flag in flags:  # parents before children: each module ends with its own
                m.train(flag)
        t, c = self.dist.sum([float(total), float(correct)], "combining the evaluation")
        return t / n, 1.0 - c / n

    def _divergence_remedy(self) -> str:
        """What a loss that is not finite asks to change: --base-lr, and --t0 too where the
        learning-rate scaling starts the first unit far above it (base_lr / t_0: 1e4 x base_lr
        for --t0 0.05 cubic), which no --base-lr of use tames."""
        first = self.schedule.initial_lr[0]
        base = self.cfg.base_lr
        if first <= 10 * base:
            return "lower --base-lr"
        return (
            f"lower --base-lr, or raise --t0 (the first unit starts at {first:.3g}, "
            f"{first / base:.3g} x --base-lr, as --scale-lr divides it by t_0) or give "
            "--no-scale-lr"
        )

    # ---- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return Path(self.cfg.checkpoint_dir) / CHECKPOINT_NAME if self.cfg.checkpoint_dir else None

    def _save_checkpoint(self, next_epoch: int) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        if self.dist.is_main:
            save_checkpoint(
                path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": self.cfg.to_dict(),
                    "epoch": next_epoch,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "frontier": self.frontier,
                    "freeze_iterations": list(self.froze_at),
                    "cache": self.cache.checkpoint_state() if self.cache is not None else None,
                    "cache_plan": self.cache.plan_state() if self.cache is not None else None,
                    "cache_seconds": self.cache.seconds if self.cache is not None else 0.0,
                    "records": self.result.records,
                    "losses": self.result.losses,
                    "rng": rng_state(self.device),
                },
            )
        if self._checkpoint_epochs is None and self.dist.is_main:
            _warn_unless_resumable(path)
        self._checkpoint_epochs = next_epoch
        if self.cache is not None:
            self.cache.release_superseded()  # the checkpoint names the current store now

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            raise ConfigError("--resume: needs --checkpoint-dir")
        state, failed = None, None
        try:
            if path.is_symlink() and not path.exists():
                # taken as no checkpoint yet, the run started over and its first save replaced
                # the link to the run's checkpoint (on a disk not mounted, say)
                raise CheckpointError(
                    f"--resume: {path} is a link to {os.readlink(path)}, which is not there (a "
                    "disk not mounted?): make it reachable, or delete the link to start afresh"
                )
            state = self._read_checkpoint(path) if path.exists() else None
        except PrefastError as e:
            # a refusal of this rank's own (its file is damaged, or another run's: a
            # --checkpoint-dir on each node's own disk): every rank stops with it
            failed = e
        self.dist.share_refusal(failed, "reading the checkpoint", CheckpointError)
        self._agree_on_checkpoint(
            path, None if state is None else (int(state["epoch"]), state_digest(self.model))
        )
        if state is None:
            # --resume is always safe to type: a run killed before its first checkpoint
            # starts over
            log.warning("--resume: no checkpoint at %s yet; starting from the beginning", path)
            return
        self.frontier = int(state["frontier"])
        freeze_prefix(self.model, self.frontier)
        self.froze_at = _froze_at(state.get("freeze_iterations"), self.frontier, self.schedule)
        self.optimizer = self._make_optimizer(range(self.frontier, self.model.num_units))
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = self.epoch = self._checkpoint_epochs = int(state["epoch"])
        self.iteration = self.start_epoch * self.iters_per_epoch
        if self.start_epoch > self.cfg.epochs:
            raise CheckpointError(
                f"--resume: the checkpoint at {path} has {self.start_epoch} epochs done, more "
                f"than --epochs {self.cfg.epochs}; give --epochs {self.start_epoch} or more"
            )
        self.result.records = list(state["records"])
        self._warn_other_world_size(path)
        self.result.losses = list(state["losses"])
        set_rng_state(state["rng"], self.device)
        if self.cache is not None:
            self.cache.seconds = float(state.get("cache_seconds", 0.0))
            # reopened or rebuilt once the metrics file holds the checkpoint's epochs
            # (_restore_cache): a stop or a failure there is that file's last line
            self._cache_state = (state["cache"], state.get("cache_plan"))
        log.info("resumed from %s at epoch %d (frontier %d)", path, self.start_epoch, self.frontier)

    def _warn_other_world_size(self, path: Path) -> None:
        """Say so where the checkpoint's epochs were trained by another number of ranks: with
        --batch-size per rank, the resumed epochs take other global batches and another count
        of steps (the FreezeOut schedule follows it), so the run does not end as an
        uninterrupted one would."""
        if not self.result.records or not self.dist.is_main or self.start_epoch >= self.cfg.epochs:
            return  # (a finished run only prints its summary)
        was = int(self.result.records[-1].get("world_size") or 1)
        now = self.dist.world_size
        if was == now:
            return
        batch = self.cfg.batch_size
        log.warning(
            "--resume: the checkpoint at %s was trained by %d rank(s), this run has %d: "
            "--batch-size is per rank, so from epoch %d a step trains on %d samples (was %d) "
            "and an epoch has %d steps, with the FreezeOut schedule following the new count; "
            "the result is not that of an uninterrupted run (start it with %d rank(s) to "
            "continue as it was)",
            path,
            was,
            now,
            self.start_epoch,
            batch * now,
            batch * was,
            self.iters_per_epoch,
            was,
        )

    def _restore_cache(self) -> None:
        """--resume: reuse the checkpoint's store or rebuild the cache (its seconds go into the
        first resumed epoch), then take the recorded plan."""
        if self._cache_state is None or self.cache is None:
            return
        info, plan = self._cache_state
        self._cache_state = None
        if info is not None:
            # a finished run only reports: its cache is not opened, checked or rebuilt
            with Stopwatch(self.device) as watch:
                self.cache.restore(info, load=self.start_epoch < self.cfg.epochs)
            # the wall-clock of the checks or the rebuild (the rebuild's passes also went
            # into cache.seconds: the first epoch counts the difference once)
            self.resume_cache_seconds = watch.seconds
        # after the cache: rebuilding it must not touch the recorded costs
        self.cache.restore_plan(plan)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """The checkpoint at ``path``, checked against this run's settings and loaded into the
        model; a CheckpointError where it cannot be resumed from."""
        state = load_checkpoint_file(path, "--resume", needs=RESUME_ENTRIES)
        try:
            saved = TrainConfig.from_dict(state["config"])
        except ConfigError as e:  # a setting this version does not have: a newer version's
            raise CheckpointError(
                f"--resume: the checkpoint at {path} was made by another version of prefast: {e}"
            ) from None
        diff = _differences(saved, self.cfg)
        if diff:
            raise CheckpointError(
                f"--resume: the checkpoint at {path} was made with other settings: "
                + ", ".join(diff)
                + "; give them as the checkpoint has them, or start afresh in another "
                "--checkpoint-dir"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # a model of one's own, edited since: other layers or shapes
            raise CheckpointError(
                f"--resume: the checkpoint at {path} holds the weights of another model than "
                f"{self.cfg.model!r} builds now ({state_dict_mismatch(e)}); resume with the "
                "model the run started with, or start afresh in another --checkpoint-dir"
            ) from None
        return state

    def _agree_on_checkpoint(self, path: Path, found: tuple[int, str] | None) -> None:
        """Under torchrun, refuse a resume where the ranks do not read one checkpoint (a
        --checkpoint-dir on each node's own disk: one rank resumed while another started over,
        or read an older run's). Every rank raises the same error, before any rank restores
        its cache (a collective the others would not join)."""
        if not self.dist.enabled:
            return
        seen = self.dist.all_gather_object(found, "comparing the ranks' checkpoints")
        if len(set(seen)) == 1:
            return
        each = ", ".join(
            f"rank {r}: " + ("none" if f is None else f"{f[0]} epoch(s) done, weights {f[1][:8]}")
            for r, f in enumerate(seen)
        )
        raise CheckpointError(
            f"--resume: the ranks do not read the same checkpoint at {path} ({each}); "
            "--checkpoint-dir must be one folder every rank sees (a shared file system)"
        )

    # ---- summaries and ranks ---------------------------------------------------------------------
    def _stopped_record(self, e: interrupt.Stopped | KeyboardInterrupt) -> dict[str, Any]:
        """The metrics file's last record where the run was stopped from outside: by what,
        where, and what ``--resume`` continues from (the summary record is left out)."""
        signum = e.signum if isinstance(e, interrupt.Stopped) else signal.SIGINT
        return {"stopped": True, "signal": signal.Signals(signum).name, **self._where()}

    def _failed_record(self, e: Exception) -> dict[str, Any]:
        """The metrics file's last record where the run failed: the error, and where."""
        return {"failed": True, "error": f"{type(e).__name__}: {e}", **self._where()}

    def _where(self) -> dict[str, Any]:
        """Where a run that did not finish ended, and what ``--resume`` continues from."""
        path = self._checkpoint_path()
        saved = self._checkpoint_epochs if path is not None and path.is_file() else None
        return {
            "epoch": self.epoch,  # the epoch under way (epochs_done where between epochs)
            "iteration": self.iteration,  # steps done, all epochs together
            "epochs_done": len(self.result.records),  # the epoch records above
            # what --resume continues from: fewer epochs than epochs_done where the last save
            # failed (a full disk)
            "checkpoint": str(path) if saved else None,
            "checkpoint_epochs": saved,
        }

    def _summary(self) -> dict[str, Any]:
        recs = self.result.records
        last = recs[-1] if recs else {}
        boundary, tier, kept = (
            self.cache.ended_with() if self.cache is not None else (0, None, None)
        )
        return {
            "summary": True,
            "mode": self.cfg.mode,
            "model": self.model.config,
            "dataset": self.cfg.dataset,
            "train_samples": len(self.data.train),
            "epochs": self.cfg.epochs,
            "iterations": self.total_iterations,
            "total_train_seconds": sum(r["train_seconds"] for r in recs),
            "total_cache_build_seconds": sum(r["cache_build_seconds"] for r in recs),
            # records restored from a checkpoint of an older version may lack it
            "total_probe_seconds": sum(r.get("probe_seconds", 0.0) for r in recs),
            "final_test_error": last.get("test_error"),
            "final_test_loss": last.get("test_loss"),
            "best_test_error": min((r["test_error"] for r in recs), default=None),
            # with --val-size: the held-out training images' error (None without)
            "final_val_error": last.get("val_error"),
            "final_val_loss": last.get("val_loss"),
            "best_val_error": min((r["val_error"] for r in recs if "val_error" in r), default=None),
            # the epoch a user would keep, chosen on the held-out images (the first of equals),
            # and its test error: best_test_error is chosen on the test set itself
            **_at_best_val(recs),
            "frozen_units": self.frontier,
            "num_units": self.model.num_units,
            # as they froze: after a resume with another --epochs, the schedule's own gave
            # the new schedule's iterations for units frozen before the resume, and numbers
            # for units the run ended before freezing (a resume with --epochs cut to the
            # epochs done)
            "freeze_iterations": list(self.froze_at),
            "cache_boundary": boundary,
            "cache_tier": tier,
            "cache_path": kept,
            "peak_host_private_bytes": max((r["peak_host_private_bytes"] for r in recs), default=0),
            "peak_gpu_bytes": max((r["peak_gpu_bytes"] for r in recs), default=0),
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }

    def _sync_buffers(self, modules: Iterable[torch.nn.Module] | None = None) -> None:
        """Rank 0's BatchNorm statistics on every rank (of ``modules``; default: the model).
        DDP syncs buffers at the start of each forward, so after the last step each rank holds
        its own update; evaluation, checkpoints and the next epoch use rank 0's, as the next
        forward would, and so do units as they freeze (they leave DDP)."""
        if not self.dist.enabled:
            return
        for m in [self.model] if modules is None else modules:
            for b in m.buffers():
                self.dist.broadcast_tensor(b, src=0, what="sharing BatchNorm statistics")

    def _check_ranks_agree(self, epoch: int) -> dict[str, Any]:
        """Every rank must hold the same weights after an epoch; a divergence is an error."""
        digests = self.dist.all_gather_object(
            state_digest(self.model), "comparing the ranks' weights"
        )
        if len(set(digests)) != 1:
            raise DistributedError(
                f"after epoch {epoch} the ranks hold different weights: {digests}"
            )
        return {
            "world_size": self.dist.world_size,
            "ranks_in_sync": True,
            "weights_sha256": digests[0],
        }


def _froze_at(saved: Any, frontier: int, schedule: FreezeSchedule) -> list[int | None]:
    """The iteration at which each unit froze, of a checkpoint whose first ``frontier`` units
    are frozen: as it recorded them, else (a checkpoint of an earlier version, or an entry
    that is not one int per frozen unit) as ``schedule`` has them."""
    n = schedule.num_units
    ok = (
        isinstance(saved, list)
        and len(saved) == n
        and all(integer(v) is not None and v >= 0 for v in saved[:frontier])
    )
    if not ok:
        saved = schedule.freeze_iterations()
    return [saved[i] if i < frontier else None for i in range(n)]


def _at_best_val(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """``best_val_epoch`` and ``test_error_at_best_val`` of epoch records (None without
    ``--val-size``)."""
    with_val = [r for r in recs if r.get("val_error") is not None]
    best = min(with_val, key=lambda r: r["val_error"], default=None)
    return {
        "best_val_epoch": best["epoch"] if best else None,
        "test_error_at_best_val": best["test_error"] if best else None,
    }


def check_outputs(cfg: TrainConfig, made: list[Path] | None = None) -> None:
    """Every path the run will write, checked before it starts (one clear error, not a
    traceback after an epoch). The folders it creates are added to ``made``."""
    if cfg.metrics:
        _check_metrics_apart(cfg)  # before the folders below are made
        check_writable_file(cfg.metrics, "--metrics", made)
        config = config_path(cfg.metrics)
        try:  # a folder there failed the run with a bare "[Errno 21] Is a directory" at its start
            check_writable_file(config, "--metrics")
        except ConfigError as e:
            raise ConfigError(
                f"{e} (the run saves its config beside the metrics file, as {config.name})"
            ) from None
    if cfg.checkpoint_dir:
        ck = check_writable_dir(cfg.checkpoint_dir, "--checkpoint-dir", made)
        if (ck / CHECKPOINT_NAME).is_dir():
            raise ConfigError(f"--checkpoint-dir: {ck / CHECKPOINT_NAME} is a directory")
        if not cfg.resume and os.path.lexists(ck / CHECKPOINT_NAME):  # a link to nothing too
            # a forgotten --resume replaced it at the new run's first epoch: hours of training
            raise ConfigError(
                f"--checkpoint-dir: {ck / CHECKPOINT_NAME} holds an earlier run's checkpoint; "
                "--resume continues that run (a finished one prints its summary), or delete "
                "the file or give another --checkpoint-dir to start afresh"
            )
    if cfg.mode == "prefast" and cfg.cache_dir:
        check_cache_dir(cfg.cache_dir)  # a URL's backend, a folder not inside a store
        local = location.as_local(cfg.cache_dir)
        if local is not None:
            check_writable_dir(local, "--cache-dir", made)


def _check_metrics_apart(cfg: TrainConfig) -> None:
    """Refuse a ``--metrics`` file that is a folder or file the run writes otherwise: the
    checkpoint replaced the metrics file at the first epoch's end (the run printed ``metrics:
    D/last.pt``, which held no metrics), and a ``--metrics`` that was ``--checkpoint-dir`` or
    ``--cache-dir`` failed the run with ``[Errno 21] Is a directory`` (exit 1)."""
    assert cfg.metrics is not None
    taken: list[tuple[Path | None, str]] = []
    if cfg.checkpoint_dir:
        ck = Path(cfg.checkpoint_dir)
        taken += [
            (ck, "--checkpoint-dir"),
            (ck / CHECKPOINT_NAME, "the checkpoint of --checkpoint-dir"),
        ]
        if cfg.mode == "prefast" and not cfg.cache_dir:
            taken.append((ck / "cache", "the cache folder (CHECKPOINT_DIR/cache)"))
    if cfg.mode == "prefast" and cfg.cache_dir:
        taken.append((location.as_local(cfg.cache_dir), "--cache-dir"))
    metrics = os.path.realpath(cfg.metrics)
    for path, what in taken:
        if path is not None and os.path.realpath(path) == metrics:
            raise ConfigError(
                f"--metrics: {cfg.metrics} is {what}, which the run writes itself; give "
                "the metrics another file name (such as metrics.jsonl in that folder)"
            )


def _all_reduce_int(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(torch.int64)
    dist.all_reduce(t)
    return t


def _global_rng_state(device: torch.device) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """The global generators' states: torch's CPU one, numpy's and Python's, and every CUDA
    device's where the run is on CUDA or CUDA is in use already (``torch.manual_seed`` reseeds
    them all; reading them otherwise would initialise CUDA for a CPU run)."""
    on_cuda = device.type == "cuda" or torch.cuda.is_initialized()
    return rng_state(), torch.cuda.get_rng_state_all() if on_cuda else None


def _set_global_rng_state(state: tuple[dict[str, Any], list[torch.Tensor] | None]) -> None:
    """Put back what ``_global_rng_state`` read."""
    host, cuda = state
    set_rng_state(host)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def train(cfg: TrainConfig) -> TrainResult:
    """Train one configuration (see ``TrainConfig``); the library entry point of ``prefast train``."""
    return Trainer(cfg).run()


def _warn_unless_resumable(path: Path) -> None:
    """Read a run's first checkpoint back as ``--resume`` does (tensors and plain containers
    only): a model of one's own whose state holds other objects (a ``get_extra_state`` that
    returns one) saves, but its resume is refused, which the run should say now, not then."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the refusal --resume would meet
        log.warning(
            "%s cannot be resumed from: it holds objects other than tensors and plain "
            "containers (%s), which --resume refuses to load; a model of your own must keep "
            "its state in tensors, numbers and strings",
            path,
            checkpoint_load_reason(e),
        )


def _differences(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """Each setting other than a resumable one that ``cfg`` gives otherwise than the checkpoint's
    config ``saved``: its flag and value as the checkpoint has them, then the value now
    (``--t0 0.6 (now 0.5)``, ``--no-augment (now left out)``, ``--subset left out (now 2000)``);
    the model arguments' own flags (``--depth``, ``--growth``) where ``model_args`` differ."""
    defaults = TrainConfig()
    out = []
    for k, v in saved.to_dict().items():
        now = getattr(cfg, k)
        if k in RESUMABLE_FIELDS or now == v:
            continue
        if k == "cache_dir" and _same_folder(v, now):
            continue
        if k == "model_args":
            for m in sorted(set(v) | set(now)):
                # as JSON: a tuple is the list the config's JSON holds (a config reloaded
                # from --metrics' m.config.json was refused, '--widths [4, 4] (now [4, 4])')
                if _as_json(v.get(m)) != _as_json(now.get(m)):
                    out.append(_setting(cli_flag(m), v.get(m), now.get(m)))
        elif isinstance(default := getattr(defaults, k), bool):  # --no-augment, --channels-last
            flag = switch_flag(k, default)
            given = v != default
            out.append(f"{flag} (now left out)" if given else f"{flag} left out (now given)")
        else:
            out.append(_setting(cli_flag(k), v, now))
    return out


def _same_folder(saved: str | None, now: str | None) -> bool:
    """Whether two --cache-dir values name one folder: ``runs/cache/`` and ``runs/cache``, a
    relative path and the absolute one it resolves to from the working directory (a resume
    given either was refused as another setting), ``s3://b/c/`` and ``s3://b/c``."""
    if saved is None or now is None:
        return saved is now
    a, b = location.as_local(saved), location.as_local(now)
    if a is None or b is None:  # URLs: alike but for trailing slashes
        return a is None and b is None and saved.rstrip("/") == now.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _setting(flag: str, saved: Any, now: Any) -> str:
    """``--t0 0.6 (now 0.5)``; ``left out`` for a value not given (None)."""

    def shown(v: Any) -> str:
        return shlex.quote(v) if isinstance(v, str) else json.dumps(v, default=str)

    was = f"{flag} left out" if saved is None else f"{flag} {shown(saved)}"
    return f"{was} (now {'left out' if now is None else shown(now)})"


__all__ = ["TrainResult", "Trainer", "build_model", "check_model_fits", "train"]
