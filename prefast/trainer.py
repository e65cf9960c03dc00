"""Training with full, FreezeOut and PreFast (FreezeOut + cached frozen-prefix outputs).

One step at iteration ``j`` of epoch ``e``, batch ``k``:

1. Units with ``j > max_j_i`` freeze (eval mode, no gradient, out of the optimizer): the
   frontier ``f`` moves forward. In ``prefast`` mode the cache boundary ``b <= f`` may move too:
   a cache pass writes ``units[0:b']``'s output (from the images, or incrementally from the
   current cache) and the superseded cache is deleted.
2. The batch is samples ``epoch_permutation(N, seed, e)[k*B:(k+1)*B]``: images when ``b == 0``,
   else cached activations (view ``epoch_views(N, V, seed, e)[i]``) through ``StoreLoader``.
3. ``units[b:f]`` run forward-only under no_grad; ``units[f:]`` and the head train.

With augmentation off and an fp32 cache, ``prefast`` and ``freezeout`` therefore see the same
batches and compute the same losses and weights to float tolerance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import store
from prefast.caching import (
    Cache,
    CostModel,
    PassSpec,
    build_cache,
    check_cache_dir,
    choose_tier,
    fingerprint,
    measure_store_rates,
    measure_tier_rates,
    measure_unit_forward,
    open_matching,
    plan_boundaries,
    plan_boundary,
    provenance,
    store_path,
)
from prefast.config import TrainConfig
from prefast.data import Augment, ImageData, epoch_key, load_dataset, make_batch
from prefast.distributed import DistContext, DistributedError
from prefast.errors import CheckpointError, ConfigError
from prefast.models import UnitModel, create_model
from prefast.monitor import PeakMemory, Stopwatch, peak_device_bytes, synchronize
from prefast.schedule import FreezeSchedule, ScheduleConfig
from store import location
from store.order import epoch_permutation, rank_part

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
# Fields that may differ between a checkpoint's config and the resuming run's.
RESUMABLE_FIELDS = {
    "resume",
    "progress",
    "metrics",
    "checkpoint_dir",
    "epochs",
    "device",
    "data_root",
    "download",
}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but torch.cuda.is_available() is False")
    return store.resolve_device(name)


@contextlib.contextmanager
def autocast(device: torch.device, amp: str) -> Iterator[None]:
    if amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


@dataclass
class Datasets:
    train: ImageData
    test: ImageData
    val: ImageData | None
    desc: dict[str, Any]


def load_data(cfg: TrainConfig) -> Datasets:
    """The training split (full by default; ``subset`` and ``val_size`` carve it), the test split."""
    kw: dict[str, Any] = {
        "data_root": cfg.data_root,
        "download": cfg.download,
        "seed": cfg.seed,
        "shape": cfg.synthetic_shape,
    }
    if cfg.dataset == "synthetic":
        n = cfg.num_samples if cfg.num_samples is not None else 50_000
        train = load_dataset("synthetic", "train", num_samples=n, **kw)
        test = load_dataset("synthetic", "test", num_samples=min(10_000, max(256, n // 5)), **kw)
    else:
        if cfg.num_samples is not None:
            raise ConfigError(
                "--num-samples: only for --dataset synthetic; use --subset N for a subset of a real dataset"
            )
        train = load_dataset(cfg.dataset, "train", **kw)
        test = load_dataset(cfg.dataset, "test", **kw)
    if cfg.subset is not None:
        if cfg.subset > len(train):
            raise ConfigError(f"--subset: {cfg.subset} exceeds the {len(train)} training images")
        train = train.subset(cfg.subset, cfg.seed)
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise ConfigError(
                f"--val-size: {cfg.val_size} leaves no training images (of {len(train)})"
            )
        train, val = train.split_off(cfg.val_size, cfg.seed)
    desc = {
        "dataset": cfg.dataset,
        "synthetic_shape": cfg.synthetic_shape if cfg.dataset == "synthetic" else None,
        "split": "train",
        "num_samples": len(train),
        "subset": cfg.subset,
        "val_size": cfg.val_size,
        "seed": cfg.seed,
        "augment": Augment.from_spec(train.spec, cfg.augment).to_dict(),
    }
    return Datasets(train, test, val, desc)


def build_model(cfg: TrainConfig, spec: Any) -> UnitModel:
    torch.manual_seed(cfg.seed)
    return create_model(
        cfg.model,
        num_classes=spec.num_classes,
        in_channels=spec.channels,
        image_size=spec.image_size,
        **cfg.model_args,
    )


@dataclass
class TrainResult:
    """What a run produced: per-epoch records, the summary, and where things are."""

    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # per step
    model: UnitModel | None = None


class Trainer:
    """Runs one configuration; ``run()`` trains and returns a ``TrainResult``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = DistContext.from_env(resolve_device(cfg.device).type, cfg.dist_timeout)
        self.device = self.dist.device
        self.progress = cfg.progress and self.dist.is_main
        self.data = load_data(cfg)
        self.model = build_model(cfg, self.data.train.spec).to(self.device)
        if cfg.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn: needs CUDA (SyncBatchNorm does not run on the CPU)")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = Augment.from_spec(self.data.train.spec, cfg.augment)
        self.views = cfg.views
        if cfg.views > 1 and self.augment.identity:
            log.warning(
                "--views %d without augmentation would store %d identical copies; using 1 view",
                cfg.views,
                cfg.views,
            )
            self.views = 1
        n = len(self.data.train)
        # --batch-size is per rank; every rank reads N // world_size samples an epoch
        self.samples_per_rank = n // self.dist.world_size
        if self.samples_per_rank < 1:
            raise ConfigError(
                f"--nproc-per-node: {self.dist.world_size} ranks for {n} training images"
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
        self.ddp: torch.nn.Module | None = None  # DistributedDataParallel over the trainable part
        self.cache: Cache | None = None
        self.cost: CostModel | None = None
        self._auto_plan: dict[int, int] | None = None  # iteration -> boundary (auto policy)
        self.cache_seconds = 0.0
        self._superseded: list[Cache] = []
        self._tmp_cache_dir: Path | None = None
        self.cache_dir = self._resolve_cache_dir()
        self.input_shape = tuple(self.data.train.images.shape[1:])
        # bytes per sample at each boundary: the fp32 image at 0, the cache dtype after
        cache_itemsize = torch.tensor([], dtype=_cache_dtype(cfg)).element_size()
        self.sample_bytes = [math.prod(self.input_shape) * 4] + [
            math.prod(shape) * cache_itemsize
            for shape in boundary_shapes(self.model, self.input_shape, self.device)
        ]
        self.start_epoch = 0
        self.result = TrainResult()
        if cfg.mode == "prefast" and self.cache_dir is not None and self.dist.is_main:
            check_cache_dir(self.cache_dir, self.model.config)
        self.dist.barrier("start-up")

    # ---- setup helpers ------------------------------------------------------------------
    def _resolve_cache_dir(self) -> Path | str | None:
        if self.cfg.mode != "prefast":
            return None
        if self.cfg.cache_dir is not None:
            # a local Path (a file:// URL included), else the fsspec URL as given
            return location.as_local(self.cfg.cache_dir) or self.cfg.cache_dir
        if self.cfg.checkpoint_dir is not None:
            return Path(self.cfg.checkpoint_dir) / "cache"
        return None  # a temporary directory is made if the zarr tier is used

    def _zarr_dir(self) -> Path | str:
        if self.cache_dir is None:
            # one folder for all ranks (on one node; several nodes need a shared --cache-dir)
            made = tempfile.mkdtemp(prefix="prefast-cache-") if self.dist.is_main else None
            self._tmp_cache_dir = Path(self.dist.broadcast_object(made, "sharing the cache folder"))
            self.cache_dir = self._tmp_cache_dir
        location.make_dirs(self.cache_dir)
        return self.cache_dir

    def _make_optimizer(self, units: range) -> torch.optim.Optimizer:
        groups = [
            {
                "params": list(self.model.units[i].parameters()),
                "unit": i,
                "lr": self.schedule.lr(i, 0),
            }
            for i in units
        ]
        groups.append(
            {
                "params": list(self.model.head.parameters()),
                "unit": self.model.num_units,
                "lr": self.schedule.lr(self.model.num_units, 0),
            }
        )
        groups = [g for g in groups if g["params"]]
        return torch.optim.SGD(
            groups,
            lr=self.cfg.base_lr,
            momentum=self.cfg.momentum,
            nesterov=self.cfg.nesterov,
            weight_decay=self.cfg.weight_decay,
        )

    # ---- freezing ------------------------------------------------------------------------
    def _freeze_unit(self, i: int, j: int) -> None:
        """The one place a unit freezes: eval mode, no gradient, out of the optimizer."""
        unit = self.model.units[i]
        unit.eval()
        unit.requires_grad_(False)
        params = {id(p) for p in unit.parameters()}
        for p in unit.parameters():
            self.optimizer.state.pop(p, None)
        self.optimizer.param_groups = [g for g in self.optimizer.param_groups if g["unit"] != i]
        assert not any(id(p) in params for g in self.optimizer.param_groups for p in g["params"])
        log.info("iteration %d: froze unit %d (%s)", j, i, self.model.unit_names[i])

    def _apply_frozen_prefix(self, f: int) -> None:
        for u in self.model.units[:f]:
            u.eval()
            u.requires_grad_(False)

    def _set_train_modes(self) -> None:
        for i, u in enumerate(self.model.units):
            u.train(i >= self.frontier)
        self.model.head.train()

    # ---- cache -----------------------------------------------------------------------------
    def _cache_desc(self) -> dict[str, Any]:
        return {"views": self.views, "view_seed": self.cfg.seed, "dtype": self.cfg.cache_dtype}

    def _fingerprint(self, b: int) -> str:
        return fingerprint(self.model, b, self.data.desc, self._cache_desc())

    def _pass_spec(self) -> PassSpec:
        return PassSpec(
            train=self.data.train,
            augment=self.augment,
            views=self.views,
            seed=self.cfg.seed,
            dtype=self.cfg.cache_dtype,
            codec=None if self.cfg.codec == "none" else self.cfg.codec,
            batch_size=self.cfg.cache_batch_size or self.cfg.batch_size,
            amp=self.cfg.amp,
            channels_last=self.cfg.channels_last,
        )

    def _cache_nbytes(self, b: int) -> int:
        return len(self.data.train) * self.views * self.sample_bytes[b]

    def _tier_for(self, b: int) -> str:
        return choose_tier(
            self.cfg.cache, self._cache_nbytes(b), self.device, self.cfg.cache_memory_fraction
        )

    def _measure_costs(self, j: int) -> CostModel:
        """Per-sample costs measured now on this device (DESIGN section 4)."""
        idx = np.arange(min(self.cfg.batch_size, len(self.data.train)))
        aug = (
            self.augment.params(epoch_key(self.cfg.seed, 0), len(self.data.train))
            if not self.augment.identity
            else None
        )
        times = []
        for _ in range(3):
            t = time.perf_counter()
            x, _ = make_batch(self.data.train, idx, aug, self.device)
            synchronize(self.device)
            times.append(time.perf_counter() - t)
        image = sorted(times)[1] / len(idx)  # median of 3
        with autocast(self.device, self.cfg.amp):
            unit_fwd = measure_unit_forward(self.model, x, self.model.num_units, self.device)
        shape = self.model.boundary_shape(max(1, self.frontier), self.input_shape)
        rates = measure_tier_rates(shape, self.cfg.cache_dtype, self.device, self.cfg.batch_size)
        if self.cfg.cache in ("zarr", "auto") and any(
            self._tier_for(b) == "zarr" for b in range(1, self.model.num_units + 1)
        ):
            rates["zarr"] = measure_store_rates(
                self.device,
                self._zarr_dir(),
                shape,
                self.cfg.cache_dtype,
                None if self.cfg.codec == "none" else self.cfg.codec,
                self.cfg.batch_size,
            )
        else:
            rates["zarr"] = rates["ram"]
        write = {k: v[0] for k, v in rates.items()}
        read = {k: v[1] for k, v in rates.items()}
        cost = CostModel(unit_fwd=unit_fwd, image=image, read_rate=read, write_rate=write)
        log.info(
            "iteration %d: measured costs per sample: image %.1f us, forward %s us, read MB/s %s, write MB/s %s",
            j,
            image * 1e6,
            [round(t * 1e6, 1) for t in unit_fwd],
            {k: round(v / 1e6) for k, v in read.items()},
            {k: round(v / 1e6) for k, v in write.items()},
        )
        return cost

    def _planned_boundary(self, j: int) -> int:
        """The policy's boundary, decided on rank 0 (costs and free memory differ between ranks;
        decisions must not)."""
        plan = self._plan_on_this_rank(j) if self.dist.is_main else None
        return int(self.dist.broadcast_object(plan, "sharing the re-caching decision"))

    def _plan_on_this_rank(self, j: int) -> int:
        b = self.cache.boundary if self.cache is not None else 0
        policy = self.cfg.recache_policy
        if policy != "auto":
            return plan_boundary(policy, b, self.frontier, self.model.cut_points)
        if self.frontier <= b:
            return b
        if self._auto_plan is None or j not in self._auto_plan:
            # Plan the rest of the run once, from costs measured now (DESIGN section 4).
            if self.cost is None:
                self.cost = self._measure_costs(j)
            events = self._freeze_events(j)
            bounds = plan_boundaries(
                events,
                self.total_iterations,
                self.cfg.batch_size,
                len(self.data.train) // self.dist.world_size,  # each rank's share of a pass
                self.views,
                self.cost,
                self.sample_bytes,
                self._tier_for,
                boundary=b,
                tier=self.cache.tier if self.cache is not None else None,
            )
            self._auto_plan = {it: bb for (it, _), bb in zip(events, bounds, strict=True)}
            log.info("iteration %d: re-caching plan (iteration: boundary) %s", j, self._auto_plan)
        return max(b, self._auto_plan[j])

    def _freeze_events(self, j: int) -> list[tuple[int, int]]:
        """(iteration, frontier) of every freeze from iteration j on, the current one first."""
        its = sorted(
            {it for it in self.schedule.freeze_iterations() if it is not None and it >= j} | {j}
        )
        return [(it, self.schedule.frozen_count(it)) for it in its]

    def _recache(self, b_new: int, j: int) -> None:
        prev = self.cache
        tier = self.dist.broadcast_object(
            self._tier_for(b_new) if self.dist.is_main else None, "sharing the cache tier"
        )
        path = store_path(self._zarr_dir(), b_new) if tier == "zarr" else None
        fp = self._fingerprint(b_new)
        meta = self.dist.broadcast_object(
            provenance(self.model, b_new, self.data.desc, self._cache_desc(), fp)
            if self.dist.is_main
            else None,
            "sharing the store's provenance",
        )
        # A cache pass from a compressed or remote store reads it chunk by chunk; from the
        # images or an in-memory tier it is a plain gather.
        cache = build_cache(
            self.model,
            b_new,
            prev,
            self._pass_spec(),
            tier,
            path,
            self.device,
            fp,
            meta,
            self.progress,
            self.dist,
        )
        self.cache_seconds += cache.build_seconds
        if self.cost is not None and tier == "zarr":
            self.cost.write_rate["zarr"] = cache.write_rate
        self.cache = cache
        if prev is not None:
            if prev.tier == "zarr" and self.cfg.checkpoint_dir is not None:
                # The last checkpoint may still name this store: delete it once the next
                # checkpoint names its successor.
                self._superseded.append(prev)
            else:
                prev.delete(remove_files=self.dist.is_main)  # superseded: its successor is complete
        log.info(
            "iteration %d: cache boundary %d -> %d (%s)",
            j,
            prev.boundary if prev else 0,
            b_new,
            tier,
        )

    def _restore_cache(self, info: dict[str, Any]) -> None:
        """On resume: reuse the checkpoint's store when its fingerprint matches, else rebuild."""
        b = int(info["boundary"])
        fp = self._fingerprint(b)
        path = info.get("path") or None
        if info.get("tier") == "zarr" and path is not None:
            s = open_matching(path, fp)
            if s is not None:
                self.cache = Cache(b, "zarr", s, fp, path, meta=s.meta)
                log.info("resume: reusing store %s (fingerprint matches)", path)
                return
        log.info(
            "resume: rebuilding the cache at boundary %d (%s tier not reusable)",
            b,
            info.get("tier"),
        )
        self._recache(b, -1)

    # ---- batches ---------------------------------------------------------------------------
    def _image_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.data.train)
        order = rank_part(
            epoch_permutation(n, self.cfg.seed, epoch), self.dist.rank, self.dist.world_size
        )
        aug = (
            self.augment.params(epoch_key(self.cfg.seed, epoch), n)
            if not self.augment.identity
            else None
        )
        bs = self.cfg.batch_size
        for k in range(start, self.iters_per_epoch):
            idx = order[k * bs : (k + 1) * bs]
            x, y = make_batch(self.data.train, idx, aug, self.device)
            yield x, y, torch.from_numpy(idx)

    def _cache_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        assert self.cache is not None
        loader = store.StoreLoader(
            self.cache.source,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            device=self.device,
            # On a CPU device a prefetch thread competes with the compute threads for the same
            # cores; on CUDA it overlaps the host gather and copy with the GPU's work.
            prefetch=2 if self.device.type == "cuda" else 0,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            with_indices=True,
        )
        loader.set_epoch(epoch, start_batch=start)
        with loader:
            for x, y, ids in loader:
                yield x.float(), y, ids

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y, sample ids) of this rank's batches from ``start`` on, from the current source."""
        return (
            self._cache_batches(epoch, start)
            if self.cache is not None
            else self._image_batches(epoch, start)
        )

    # ---- the trainable part under DistributedDataParallel ----------------------------------------
    def _wrap_trainable(self) -> None:
        """(Re-)wrap units[frontier:] and the head in DDP: the set of trainable parameters changes
        whenever units freeze, and the frozen prefix stays out of gradient synchronisation."""
        if not self.dist.enabled:
            return
        from torch.nn.parallel import DistributedDataParallel

        part = _TrainablePart(self.model, self.frontier)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = self.dist.run(
            "wrapping the trainable units in DistributedDataParallel",
            lambda: DistributedDataParallel(part, device_ids=ids),
        )

    # ---- one step ------------------------------------------------------------------------------
    def _step(self, h: torch.Tensor, y: torch.Tensor, j: int) -> tuple[float, int]:
        for g in self.optimizer.param_groups:
            g["lr"] = self.schedule.lr(g["unit"], j)
        b = self.cache.boundary if self.cache is not None else 0
        f = self.frontier
        if self.cfg.channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.amp):
            if f > b:
                with torch.no_grad():
                    h = self.model.forward_range(h, b, f)
            if self.ddp is not None:
                out = self.ddp(h)  # gradients of units[f:] and the head are averaged over ranks
            else:
                out = self.model.forward_head(self.model.forward_range(h, f, self.model.num_units))
            loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = (out.argmax(1) == y).sum()
        return float(loss.detach()) * len(y), int(correct)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, data: ImageData) -> tuple[float, float]:
        """(mean loss, error) of the model on ``data``, in eval mode; under torchrun each rank
        evaluates every world_size-th sample and the sums are combined."""
        self.model.eval()
        total, correct, n = 0.0, 0, len(data)
        mine = np.arange(self.dist.rank, n, self.dist.world_size)
        with torch.no_grad(), autocast(self.device, self.cfg.amp):
            for s in range(0, len(mine), self.cfg.eval_batch_size):
                x, y = make_batch(data, mine[s : s + self.cfg.eval_batch_size], None, self.device)
                if self.cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = self.model(x).float()
                total += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
        self._set_train_modes()
        total, correct_f = self.dist.sum([total, float(correct)], "combining the evaluation")
        return total / n, 1.0 - correct_f / n

    # ---- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return Path(self.cfg.checkpoint_dir) / CHECKPOINT_NAME if self.cfg.checkpoint_dir else None

    def _save_checkpoint(self, next_epoch: int) -> None:
        path = self._checkpoint_path()
        if path is None or not self.dist.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = None
        if self.cache is not None:
            cache = {
                "boundary": self.cache.boundary,
                "tier": self.cache.tier,
                "path": str(self.cache.path) if self.cache.path else None,
                "fingerprint": self.cache.fingerprint,
            }
        state = {
            "config": self.cfg.to_dict(),
            "epoch": next_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "frontier": self.frontier,
            "cache": cache,
            "cache_seconds": self.cache_seconds,
            "records": self.result.records,
            "losses": self.result.losses,
            "rng": rng_state(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
        for c in self._superseded:
            c.delete(remove_files=True)
        self._superseded.clear()

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        assert path is not None
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        state = load_checkpoint_file(path, "--resume")
        saved = TrainConfig.from_dict(state["config"])
        diff = [
            k
            for k, v in saved.to_dict().items()
            if k not in RESUMABLE_FIELDS and getattr(self.cfg, k) != v
        ]
        if diff:
            raise CheckpointError(
                f"--resume: the checkpoint at {path} was made with other settings: "
                + ", ".join(f"--{k.replace('_', '-')}" for k in diff)
            )
        self.model.load_state_dict(state["model"])
        self.frontier = int(state["frontier"])
        self._apply_frozen_prefix(self.frontier)
        self.optimizer = self._make_optimizer(range(self.frontier, self.model.num_units))
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.cache_seconds = float(state.get("cache_seconds", 0.0))
        self.result.records = list(state["records"])
        self.result.losses = list(state["losses"])
        set_rng_state(state["rng"])
        if state["cache"] is not None and self.cfg.mode == "prefast":
            self._restore_cache(state["cache"])
        log.info("resumed from %s at epoch %d (frontier %d)", path, self.start_epoch, self.frontier)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.resume:
            self._load_checkpoint()
        metrics_file = None
        if cfg.metrics and self.dist.is_main:
            mpath = Path(cfg.metrics)
            mpath.parent.mkdir(parents=True, exist_ok=True)
            (mpath.parent / (mpath.stem + ".config.json")).write_text(
                json.dumps(cfg.to_dict(), indent=2) + "\n"
            )
            metrics_file = open(mpath, "a" if cfg.resume else "w")  # noqa: SIM115
        peak = PeakMemory().start()
        self._set_train_modes()
        self._wrap_trainable()
        try:
            epochs = tqdm(
                range(self.start_epoch, cfg.epochs),
                desc=f"{cfg.mode} {cfg.model}",
                unit="epoch",
                disable=not self.progress,
                initial=self.start_epoch,
                total=cfg.epochs,
            )
            for epoch in epochs:
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
                if metrics_file is not None:
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                epochs.set_postfix(
                    loss=f"{rec['train_loss']:.3f}",
                    test_err=f"{test_err:.4f}",
                    frozen=self.frontier,
                )
                log.info(
                    "epoch %d: train loss %.4f acc %.4f, test error %.4f, %.2f s (cache %.2f s), frozen %d, boundary %d",
                    epoch,
                    rec["train_loss"],
                    rec["train_accuracy"],
                    test_err,
                    rec["train_seconds"],
                    rec["cache_build_seconds"],
                    self.frontier,
                    rec["cache_boundary"],
                )
                self._save_checkpoint(epoch + 1)
            self.result.summary = self._summary()
            if metrics_file is not None:
                metrics_file.write(json.dumps(self.result.summary) + "\n")
            for c in self._superseded:  # the run is done; no checkpoint needs them
                c.delete(remove_files=self.dist.is_main)
            self._superseded.clear()
        finally:
            peak.stop()
            if metrics_file is not None:
                metrics_file.close()
            self._cleanup()
            self.dist.shutdown()
        self.result.model = self.model
        return self.result

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        watch = Stopwatch(self.device)
        cache_before = self.cache_seconds
        loss_sum, correct, seen = 0.0, 0, 0
        visits = torch.zeros(
            len(self.data.train), dtype=torch.int32
        )  # this rank's visits per sample
        with watch:
            batches = self._batches(epoch, 0)
            k = 0
            try:
                while k < self.iters_per_epoch:
                    j = epoch * self.iters_per_epoch + k
                    if self._advance_frontier(j):
                        batches.close()  # type: ignore[attr-defined]
                        batches = self._batches(epoch, k)  # the same batch k, from the new source
                    h, y, ids = next(batches)
                    visits.index_add_(0, ids, torch.ones(len(ids), dtype=torch.int32))
                    ls, c = self.dist.run("a training step", self._step, h, y, j)
                    if not math.isfinite(ls):
                        raise FloatingPointError(
                            f"iteration {j}: the loss is {ls}; lower --base-lr"
                        )
                    self.result.losses.append(ls / len(y))
                    loss_sum += ls
                    correct += c
                    seen += len(y)
                    k += 1
            finally:
                batches.close()  # type: ignore[attr-defined]
        loss_sum, correct_f, seen_f = self.dist.sum(
            [loss_sum, float(correct), float(seen)], "combining the epoch's loss"
        )
        if self.dist.enabled:
            visits = self.dist.run("combining the epoch's sample visits", _all_reduce_int, visits)
        return {
            "epoch": epoch,
            "iterations": (epoch + 1) * self.iters_per_epoch,
            "train_loss": loss_sum / max(seen_f, 1),
            "train_accuracy": correct_f / max(seen_f, 1),
            "samples_seen": int((visits > 0).sum()),  # distinct samples, all ranks together
            "samples_seen_twice": int((visits > 1).sum()),
            "train_seconds": watch.seconds,
            "cache_build_seconds": self.cache_seconds - cache_before,
            "frozen_units": self.frontier,
            "cache_boundary": self.cache.boundary if self.cache is not None else 0,
            "cache_tier": self.cache.tier if self.cache is not None else None,
            "cache_bytes": self.cache.nbytes if self.cache is not None else 0,
            "lr_head": self.schedule.lr(self.model.num_units, min(j, self.total_iterations - 1)),
        }

    def _advance_frontier(self, j: int) -> bool:
        """Freeze what the schedule says at iteration j; in prefast mode re-cache when the policy
        says so. True when the batch source changed."""
        f = self.schedule.frozen_count(j)
        if f <= self.frontier:
            return False
        for i in range(self.frontier, f):
            self._freeze_unit(i, j)
        self.frontier = f
        self._wrap_trainable()  # the trainable set changed
        if self.cfg.mode != "prefast":
            return False
        b_new = self._planned_boundary(j)
        if b_new > (self.cache.boundary if self.cache is not None else 0):
            self._recache(b_new, j)
            return True
        return False

    def _summary(self) -> dict[str, Any]:
        recs = self.result.records
        last = recs[-1] if recs else {}
        out = {
            "summary": True,
            "mode": self.cfg.mode,
            "model": self.model.config,
            "dataset": self.cfg.dataset,
            "train_samples": len(self.data.train),
            "epochs": self.cfg.epochs,
            "iterations": self.total_iterations,
            "total_train_seconds": sum(r["train_seconds"] for r in recs),
            "total_cache_build_seconds": sum(r["cache_build_seconds"] for r in recs),
            "final_test_error": last.get("test_error"),
            "final_test_loss": last.get("test_loss"),
            "best_test_error": min((r["test_error"] for r in recs), default=None),
            "frozen_units": self.frontier,
            "num_units": self.model.num_units,
            "freeze_iterations": self.schedule.freeze_iterations(),
            "cache_boundary": self.cache.boundary if self.cache is not None else 0,
            "cache_tier": self.cache.tier if self.cache is not None else None,
            "cache_path": str(self.cache.path)
            if self.cache is not None
            and self.cache.path is not None
            and self._tmp_cache_dir is None
            else None,
            "peak_host_private_bytes": max((r["peak_host_private_bytes"] for r in recs), default=0),
            "peak_gpu_bytes": max((r["peak_gpu_bytes"] for r in recs), default=0),
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }
        return out

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank. DDP syncs buffers at the start of each
        forward, so after the last step each rank holds its own update; evaluation, checkpoints
        and the next epoch use rank 0's, as the next forward would."""
        if not self.dist.enabled:
            return
        for b in self.model.buffers():
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

    def _cleanup(self) -> None:
        if self._tmp_cache_dir is not None:
            self.dist.barrier("finishing with the temporary cache")
            if self.cache is not None:
                self.cache.delete(remove_files=self.dist.is_main)
                self.cache = None
            if self.dist.is_main:
                shutil.rmtree(self._tmp_cache_dir, ignore_errors=True)


def boundary_shapes(
    model: UnitModel, input_shape: tuple[int, ...], device: torch.device
) -> list[tuple[int, ...]]:
    """Per-sample output shape after units[0:b] for b = 1..num_units, from one eval-mode pass
    of a single dummy sample (training flags restored)."""
    flags = [m.training for m in model.modules()]
    shapes = []
    try:
        model.eval()
        with torch.no_grad():
            h = torch.zeros((1, *input_shape), device=device)
            for u in model.units:
                h = u(h)
                shapes.append(tuple(h.shape[1:]))
    finally:
        for m, f in zip(model.modules(), flags, strict=True):
            m.training = f
    return shapes


class _TrainablePart(torch.nn.Module):
    """units[frontier:] and the head as one module (shared, not copied), for DDP."""

    def __init__(self, model: UnitModel, frontier: int) -> None:
        super().__init__()
        self.trainable_units = torch.nn.ModuleList(model.units[frontier:])
        self.head = model.head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for u in self.trainable_units:
            h = u(h)
        return self.head(h)


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python generators' states as tensors and plain containers, so a
    checkpoint loads with ``torch.load(..., weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # legacy MT19937 tuple
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].cpu().numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def checkpoint_load_reason(e: BaseException) -> str:
    """The one informative line of a failed ``torch.load(weights_only=True)``; torch's own
    message spans many lines and suggests turning the protection off."""
    import re

    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    if m:
        return m.group(1).strip()[:160]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "weights_only" not in ln]
    return (lines[0] if lines else type(e).__name__)[:160]


def load_checkpoint_file(path: Path | str, what: str) -> dict[str, Any]:
    """A training checkpoint's contents. Loaded with ``weights_only=True``: tensors and plain
    containers only, so a crafted file cannot run code; anything else is refused."""
    if not Path(path).is_file():
        raise CheckpointError(f"{what}: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a truncated or foreign file
        raise CheckpointError(
            f"{what}: refusing {path}: not a checkpoint of tensors and plain containers "
            f"({checkpoint_load_reason(e)})"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(
            f"{what}: {path} is not a prefast training checkpoint (no 'config' and 'model' entries)"
        )
    return state


def _all_reduce_int(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(torch.int64)
    dist.all_reduce(t)
    return t


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, for comparing ranks."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        cfg.cache_dtype
    ]


def train(cfg: TrainConfig) -> TrainResult:
    """Train one configuration (see ``TrainConfig``); the library entry point of ``prefast train``."""
    return Trainer(cfg).run()


__all__ = ["TrainResult", "Trainer", "load_checkpoint_file", "load_data", "train"]
