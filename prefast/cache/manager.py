"""What the trainer asks of the cache: where the boundary is, when it moves, the batches it
serves, and what a checkpoint records of it.

``CacheManager`` owns the run's cache: its folder, the current ``Cache``, the planner's
decisions, superseded stores that a checkpoint may still name, and the clean-up at the end.
The trainer owns the frontier and tells the manager when units freeze (``on_freeze``).

Stores live in ``CACHE_DIR/run-KEY/boundary-NNN`` (``CACHE_DIR`` is ``--cache-dir``,
``CHECKPOINT_DIR/cache`` or a temporary folder). ``KEY`` hashes every setting that shapes the
stored values, so runs with other settings sharing one ``--cache-dir`` work apart and never
replace each other's stores; a second run with the same settings at the same time is refused
at start-up (a lock in the run folder). A superseded store is renamed into the run folder's
trash before it is deleted, so a kill mid-delete leaves no half-store behind; trash, and
stores of interrupted rate probes, are cleared at the next start. Only folders this package
created and marked are ever deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import store
from prefast import interrupt
from prefast.cache.ahead import AheadStore
from prefast.cache.build import (
    Cache,
    PassSpec,
    activation_dtypes,
    build_cache,
    frozen_forward,
)
from prefast.cache.folders import (
    blocked_store_names,
    clear_leftovers,
    entry_sizes,
    lock_holder,
    open_lock_file,
    remove_if_unused,
    write_lock_holder,
)
from prefast.cache.identity import (
    LOCK_BUSY,
    LOCK_NAME,
    RUN_MARKER,
    RUN_PREFIX,
    STORE_PREFIX,
    check_cache_dir,
    delete_store,
    fingerprint,
    open_matching,
    provenance,
    store_path,
)
from prefast.cache.plan import (
    CostModel,
    choose_tier,
    plan_boundaries,
    plan_boundary,
    plan_epochs,
    steps_seconds,
)
from prefast.cache.probes import (
    STEADY_SECONDS,
    free_memory,
    measure_store_rates,
    measure_tier_rates,
    measure_unit_forward,
)
from prefast.cache.scratch import make_temp_dir
from prefast.cache.scratch import remove as remove_temp_dir
from prefast.cache.scratch import sweep as sweep_temp_dirs
from prefast.cache.write_through import WriteThrough
from prefast.config import RESUMABLE_FIELDS, TrainConfig
from prefast.data import Augment, Datasets, epoch_key, make_batch, view_key
from prefast.distributed import DistContext
from prefast.errors import CacheError
from prefast.freezeout import FreezeSchedule
from prefast.models import UnitModel
from prefast.runtime import TORCH_DTYPES, autocast, synchronize
from store import location

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, y, sample ids (host int64)

# A tier probe (its writes, then its reads) runs for at most this share of the time the run
# has left when it is planned (predicted with no new cache), and at most STEADY_SECONDS.
PROBE_SHARE = 0.01
# Settings that do not shape cached values: those a resumed run may change, and the folder.
_NOT_IN_RUN_KEY = RESUMABLE_FIELDS | {"cache_dir"}


def _mb_per_s(rates: dict[str, float]) -> dict[str, int]:
    """Bytes/s by tier as whole MB/s, for the log."""
    return {k: round(v / 1e6) for k, v in rates.items()}


def run_key(cfg: TrainConfig) -> str:
    """12 hex digits of a SHA-256 over the settings that shape a run's cached values."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_RUN_KEY}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class CacheManager:
    """The cache of one ``prefast`` run (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: UnitModel,
        data: Datasets,
        augment: Augment,
        views: int,
        schedule: FreezeSchedule,
        dist: DistContext,
        progress: bool,
        graphs: bool = False,
    ) -> None:
        self.cfg = cfg
        self.graphs = graphs  # the steps replay CUDA graphs: compute is timed the same way
        self.model = model
        self.data = data
        self.augment = augment
        self.views = views
        self.schedule = schedule
        self.dist = dist
        self.device = dist.device
        self.progress = progress
        self.cache: Cache | None = None  # the cache the batches are read from
        # the boundary of a cache due mid-epoch, built and read from the epoch's end (0: none;
        # ``_recache``)
        self._next = 0
        self.seconds = 0.0  # spent building caches, all passes of the run
        # spent measuring what the planner needs (unit forwards, tier rates), the whole run
        self.probe_seconds = 0.0
        self._written: dict[str, Any] | None = None  # the account of the cache written last
        self.cost: CostModel | None = None
        self._probe_shape: tuple[int, ...] = ()  # sample shape the tier rates are probed with
        self._auto_plan: dict[int, int] | None = None  # iteration -> boundary (auto policy)
        # epoch -> (iteration its steps start writing at, boundary written) (auto policy)
        self._epoch_plan: dict[int, tuple[int, int]] | None = None
        # epoch -> the plan's predicted seconds of that whole epoch (auto write-through)
        self._epoch_predicted: dict[int, float] = {}
        self._writing: WriteThrough | None = None
        self._recorded: dict[str, Any] | None = None  # a finished run's checkpoint cache
        self._ahead: AheadStore | None = None  # the next store, being prepared (CUDA)
        self.iters_per_epoch = schedule.total_iterations // cfg.epochs
        self._superseded: list[Cache] = []
        self.loader_stats = store.LoaderStats()  # the epoch's loaders so far (take_loader_stats)
        self._tmp_dir: Path | None = None
        self._lock_fd: int | None = None
        self.cache_dir = self._resolve_cache_dir()
        self.run_dir: Path | str | None = None
        self.input_shape = tuple(data.train.images.shape[1:])
        # the sample shape at each boundary, found once now: finding it runs the units (in
        # eval mode, flags restored), which must not happen beside training on another thread
        self.shapes = [self.input_shape, *model.boundary_shapes(self.input_shape)]
        # and the dtype the steps compute it in, which cached batches are handed over in
        self.act_dtypes = activation_dtypes(model, self.input_shape, self.device, cfg.amp)
        # bytes per sample at each boundary: the fp32 image at 0, the cache dtype after
        itemsize = torch.tensor([], dtype=TORCH_DTYPES[cfg.cache_dtype]).element_size()
        self.sample_bytes = [math.prod(self.input_shape) * 4] + [
            math.prod(shape) * itemsize for shape in self.shapes[1:]
        ]
        if self.cache_dir is not None:
            # claim the run folder now: a second run with the same settings is refused at
            # start-up, not at its first cache
            self._open_run_dir(self.cache_dir)
        elif self.dist.is_main:
            # the temporary folders killed runs left: now, not in a timed epoch at the first
            # cache (their removal may take a while)
            sweep_temp_dirs()
        if cfg.codec != "none" and cfg.cache in ("ram", "device"):
            log.warning(
                "--codec %s applies to stores only: the %s tier ignores it (a cache too large "
                "for that memory goes to a store, which uses it)",
                cfg.codec,
                cfg.cache,
            )
        self.write_through, why = self._write_through_applies()
        log.info(
            "re-caching: %s",
            "write-through (the training steps write the next cache)"
            if self.write_through
            else f"separate cache passes ({why})",
        )

    def _write_through_applies(self) -> tuple[bool, str]:
        """Whether the next cache can be written by the training steps, else why not. With
        ``--cache auto``, a cache that goes to a store that takes no rows is made by a pass
        (``_open_write_through``), the others are written through."""
        if self.cfg.recache_mode == "pass":
            return False, "--recache-mode pass"
        whys = []  # every reason, so that removing one does not reveal the next by surprise
        if self.views > 1:
            whys.append(f"--views {self.views}: each view is its own pass over the images")
        if self.cfg.cache == "zarr" and (why := self._store_rows_refusal()):
            whys.append(why)
        if self.dist.enabled:
            whys.append("under torchrun the ranks fill separate parts of a cache")
        return not whys, "; ".join(whys)

    def _store_rows_refusal(self) -> str:
        """Why this run's stores take whole chunks only ('' where they take rows)."""
        if self.cfg.codec != "none":
            return f"--codec {self.cfg.codec}: compressed chunks are written whole"
        if self.cache_dir is not None and location.as_local(self.cache_dir) is None:
            return "a remote --cache-dir takes whole chunks only"
        return ""

    # ---- where stores live --------------------------------------------------------------------
    def _resolve_cache_dir(self) -> Path | str | None:
        if self.cfg.cache_dir is not None:
            # a local Path (a file:// URL included), else the fsspec URL as given
            return location.as_local(self.cfg.cache_dir) or self.cfg.cache_dir
        if self.cfg.checkpoint_dir is not None:
            return Path(self.cfg.checkpoint_dir) / "cache"
        return None  # a temporary directory is made if the zarr tier is used

    def _zarr_dir(self) -> Path | str:
        """The run folder stores go to (made on first use when there is no --cache-dir)."""
        if self.run_dir is None:
            # one folder for all ranks (on one node; several nodes need a shared --cache-dir)
            made = str(make_temp_dir()) if self.dist.is_main else None
            self._tmp_dir = Path(self.dist.broadcast_object(made, "sharing the cache folder"))
            self.cache_dir = self._tmp_dir
            self._open_run_dir(self._tmp_dir)
        if self.run_dir is None:  # _open_run_dir always sets it
            raise CacheError("no run folder for the cache")
        return self.run_dir

    def _open_run_dir(self, cache_dir: Path | str) -> None:
        """Make (or reopen) ``CACHE_DIR/run-KEY``, lock it, and clear what an interrupted run
        left in it. Rank 0 does the work; the other ranks wait for it."""
        run_dir = location.join(cache_dir, RUN_PREFIX + run_key(self.cfg))
        self.dist.on_main(
            "opening the cache folder", lambda: self._make_run_dir(cache_dir, run_dir)
        )
        self.run_dir = run_dir

    def _make_run_dir(self, cache_dir: Path | str, run_dir: Path | str) -> None:
        """Rank 0's part of ``_open_run_dir``."""
        check_cache_dir(cache_dir)
        try:
            location.make_dirs(run_dir)
        except OSError as e:
            raise CacheError(f"--cache-dir: cannot create {run_dir}: {e.strerror or e}") from None
        local = location.as_local(run_dir)
        if local is not None:
            with _permission_as_cache_error():
                self._lock_fd = _take_run_dir(local)
                try:
                    clear_leftovers(local)  # only where the marker says the folder is ours
                    self._refuse_blocked_store_names(local)
                except BaseException:
                    os.close(self._lock_fd)  # a run started again in this process is not refused
                    self._lock_fd = None
                    raise
        else:
            log.warning(
                "%s: object stores have no locks; run one prefast run with these settings "
                "per --cache-dir at a time",
                run_dir,
            )

    def _refuse_blocked_store_names(self, run_dir: Path) -> None:
        """Refuse now a run folder where a store this run may write cannot be (a user's
        files under its name), rather than when the run reaches that boundary."""
        if self.cfg.cache not in ("zarr", "auto"):
            return
        blocked = blocked_store_names(run_dir, range(1, len(self.shapes)))
        if blocked:
            raise CacheError(
                f"--cache-dir: {', '.join(map(str, blocked))} "
                f"{'holds' if len(blocked) == 1 else 'hold'} what is not an activation store, "
                "under the name this run writes a boundary's store to; move it out of the run "
                "folder or use another --cache-dir"
            )

    def _discard(self, cache: Cache) -> None:
        """Release a superseded cache and delete its store. A local store is first renamed into
        the run folder's trash: a kill mid-delete leaves trash, which the next start clears,
        never a half-deleted store under a store's name. Under torchrun only rank 0 deletes."""
        path = cache.path
        cache.release()
        if cache.tier != "zarr" or path is None or not self.dist.is_main:
            return
        if delete_store(path):
            log.debug("deleted superseded store %s", path)

    # ---- the current cache ----------------------------------------------------------------------
    @property
    def boundary(self) -> int:
        return self.cache.boundary if self.cache is not None else 0

    @property
    def _held(self) -> int:
        """The boundary of the newest cache, read now or due at the epoch's end (0: none):
        what a new cache must go past."""
        return max(self.boundary, self._next)

    def _held_tier(self) -> str | None:
        """The tier of the cache at ``_held`` (one due at the epoch's end: the tier it will
        go to)."""
        if self._next > self.boundary:
            return self._tier_for(self._next)
        return self.cache.tier if self.cache is not None else None

    @property
    def kept_path(self) -> str | None:
        """The current store's location when it outlives the run (not in a temporary folder)."""
        c = self.cache
        if c is None or c.path is None or self._tmp_dir is not None:
            return None
        return str(c.path)

    def _cache_desc(self) -> dict[str, Any]:
        return {"views": self.views, "view_seed": self.cfg.seed, "dtype": self.cfg.cache_dtype}

    def _fingerprint(self, b: int) -> str:
        return fingerprint(self.model, b, self.data.desc, self._cache_desc())

    def _pass_spec(self) -> PassSpec:
        cfg = self.cfg
        return PassSpec(
            train=self.data.train,
            augment=self.augment,
            views=self.views,
            seed=cfg.seed,
            dtype=cfg.cache_dtype,
            codec=None if cfg.codec == "none" else cfg.codec,
            batch_size=cfg.cache_batch_size or cfg.batch_size,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            graphs=self.graphs,
            act_dtypes=self.act_dtypes,
        )

    def _cache_nbytes(self, b: int) -> int:
        return len(self.data.train) * self.views * self.sample_bytes[b]

    def _free_memory(self) -> tuple[int, int]:
        """(free device bytes, host bytes this rank may take) now: under torchrun every rank
        holds a whole copy of a RAM cache (build_cache), and the ranks of this machine share
        its host memory; each has a device of its own."""
        free_device, free_host = free_memory(self.device)
        return free_device, free_host // self.dist.local_world_size

    def _tier_for(self, b: int, building: bool = False) -> str:
        """The tier a cache at ``b`` goes to now; ``building``: one is made there now (an
        explicit --cache whose memory it does not fit says so: ``_say_tier``; plans ask of
        every boundary)."""
        free_device, host = self._free_memory()
        tier = choose_tier(
            self.cfg.cache,
            self._cache_nbytes(b),
            self.device.type,
            self.cfg.cache_memory_fraction,
            free_device,
            host,
        )
        if building:
            self._say_tier(b, tier, (free_device, host))
        return tier

    def _say_tier(self, b: int, tier: str, free: tuple[int, int] | None = None) -> None:
        """Warn where the cache made now at ``b`` goes to another tier than an explicit --cache
        (``free``: the memory figures it was chosen by; by default, those of now). Said where
        a cache is made, once: not for a cache asked for and made later, or never."""
        if tier != self.cfg.cache != "auto":
            free_device, host = free or self._free_memory()
            nbytes = self._cache_nbytes(b)
            on_gpu = self.cfg.cache == "device" and self.device.type == "cuda"
            log.warning(
                "--cache %s: the cache at boundary %d takes %.3g GB, more than the %.3g GB of "
                "%s memory free now; it goes to the %s instead",
                self.cfg.cache,
                b,
                nbytes / 1e9,
                (free_device if on_gpu else host) / 1e9,
                "GPU" if on_gpu else "host",
                "host's RAM"
                if tier == "ram"
                else "store (on disk)"
                + (
                    f", compressed with --codec {self.cfg.codec}"
                    if self.cfg.codec != "none"
                    else ""
                ),
            )

    # ---- deciding ---------------------------------------------------------------------------------
    def on_freeze(self, j: int, frontier: int) -> bool:
        """Units froze at iteration ``j`` (the frontier is now ``frontier``): in pass mode, move
        the boundary now if the policy says so (at the epoch's end where a store read a chunk
        at a time is read or made: ``_recache``); in write-through mode, start writing the next
        cache from this step on if the plan says so (``begin_epoch``/``end_epoch``). True when
        the batch source changed."""
        if self.write_through:
            changed = self._start_writing(j, frontier)
            self._prepare_ahead(j)
            return changed
        b_new = self._planned_boundary(j, frontier)
        if b_new > self._held:
            return self._recache(b_new, j)
        return False

    def _planned_boundary(self, j: int, frontier: int) -> int:
        """The policy's boundary, decided on rank 0 (costs and free memory differ between ranks;
        decisions must not)."""
        if self.dist.enabled and self.cfg.recache_policy == "auto":
            # rank 0's plan may probe the store tier in the run folder (an explicit --cache
            # ram or device goes to a store where it does not fit that memory): where that
            # folder is a temporary one made on first use, it is made (and shared) on every
            # rank now, not by rank 0 alone inside the plan, where its broadcast met this one
            # (the other ranks took the folder's name for the boundary)
            self._zarr_dir()
        plan = self._plan_on_this_rank(j, frontier) if self.dist.is_main else None
        return int(self.dist.broadcast_object(plan, "sharing the re-caching decision"))

    def _plan_on_this_rank(self, j: int, frontier: int) -> int:
        b = self._held
        policy = self.cfg.recache_policy
        if policy != "auto":
            return plan_boundary(policy, b, frontier, self.model.cut_points)
        if frontier <= b:
            return b
        if self._auto_plan is None or j not in self._auto_plan:
            # Plan the rest of the run once, from costs measured now (docs/training.md, re-caching).
            if self.cost is None:
                self.cost = self._measure_costs(j, frontier)
            events = self._freeze_events(j)
            tiers = self._plan_tiers(j)
            plan = plan_boundaries(
                events,
                self.schedule.total_iterations,
                self.cfg.batch_size,
                len(self.data.train) // self.dist.world_size,  # each rank's share of a pass
                self.views,
                self.cost,
                self.sample_bytes,
                tiers.__getitem__,
                boundary=b,
                tier=self._held_tier(),
                iters_per_epoch=self.iters_per_epoch,
                # a move from or to a store read or made a chunk at a time waits for the
                # epoch's end (_recache)
                chunked=frozenset({"zarr"} if self._store_rows_refusal() else ()),
            )
            self._auto_plan = {it: bb for (it, _), bb in zip(events, plan.bounds, strict=True)}
            log.info(
                "iteration %d: re-caching plan (iteration: boundary) %s: predicted %.1f s for "
                "the rest of the run against %.1f s without a new cache",
                j,
                self._auto_plan,
                plan.seconds,
                plan.baseline_seconds,
            )
        return max(b, self._auto_plan[j])

    # ---- write-through: a new cache per epoch, written by the steps ----------------------------
    def begin_epoch(self, epoch: int, frontier: int) -> int | None:
        """In write-through mode: the boundary this epoch's steps write a new cache at from its
        first step (None: nothing, or not yet: ``on_freeze`` may start one later in the epoch).
        The trainer taps the step's activation there (``take``)."""
        if not self.write_through:
            return None
        if self._writing is None:
            self._start_writing(epoch * self.iters_per_epoch, frontier)
        self._prepare_ahead(epoch * self.iters_per_epoch)
        return self._writing.target if self._writing is not None else None

    def _prepare_ahead(self, j: int) -> None:
        """Where the host works beside the device (``cost.overlap``: CUDA), create the store
        the plan writes next (``--recache-policy auto``), if its writing starts after
        iteration ``j`` and within the next epoch, and fault its files in on a thread now,
        while the device trains: the steps that write it then only copy rows (``AheadStore``).
        One process only (ranks write chunks, not rows). A store the plan no longer writes
        when its epoch comes is deleted."""
        if (
            self._ahead is not None
            or self._epoch_plan is None
            or self.cost is None
            or not self.cost.overlap
            or self.dist.world_size > 1
        ):
            return
        epoch = j // self.iters_per_epoch
        held = self._writing.target if self._writing is not None else self._held
        nxt = [
            t
            for e, (start, t) in sorted(self._epoch_plan.items())
            if start > j and t > held and e <= epoch + 1 and e < self.cfg.epochs - 1
        ]
        if not nxt or self._tier_for(nxt[0]) != "zarr" or self._store_rows_refusal():
            return
        target = nxt[0]
        path = store_path(self._zarr_dir(), target)
        self._ahead = AheadStore(target, path, lambda: self._create_store(target, path, None))
        log.debug("iteration %d: preparing the store of boundary %d ahead, on a thread", j, target)

    def _take_ahead(self, target: int, tier: str, meta: dict[str, Any]) -> Any:
        """The writer prepared ahead for ``target`` in the store, given ``meta``; None where
        none was prepared, or one for another boundary or where the cache now goes to another
        tier (that store is deleted)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead.target != target or tier != "zarr":
            log.info(
                "the store prepared ahead for boundary %d is not used: boundary %d is written "
                "(%s tier)",
                ahead.target,
                target,
                tier,
            )
            ahead.drop()
            return None
        return ahead.take(meta)

    def _start_writing(self, j: int, frontier: int) -> bool:
        """Open the cache the plan writes from iteration ``j`` on, if any (one per epoch; never
        in the last epoch, whose cache nobody would read). The samples the epoch's earlier
        steps visited are computed at its end (``WriteThrough.finish``). True when the batch
        source changed: a pass where the tier takes no rows, or the first cache, whose image
        batches switch to the cached view's augmentation."""
        epoch, step = divmod(j, self.iters_per_epoch)
        if self._writing is not None or epoch >= self.cfg.epochs - 1:
            return False
        target = self._epoch_target(j, frontier)
        if target <= self._held:
            return False
        w = self._open_write_through(target)
        if w is None:  # this tier's sink cannot take rows: one pass, now
            return self._recache(target, j)
        self._writing = w
        log.info(
            "epoch %d, step %d: writing the cache at boundary %d (%s, %s) through the training "
            "steps%s",
            epoch,
            step,
            target,
            self.model.unit_names[target - 1],
            w.tier,
            (f"; the epoch's first {_steps_of(step)} samples at its end" if step else ""),
        )
        return self.boundary == 0

    @property
    def writing(self) -> WriteThrough | None:
        return self._writing

    def image_aug_key(self, epoch: int) -> tuple[int, int, int]:
        """The augmentation key of the epoch's image batches: the epoch's fresh draw, except
        while the first cache is written from the images: then the cached view's, so what is
        stored is what was trained on."""
        if self._writing is not None and self.boundary == 0:
            return view_key(self.cfg.seed, 0)
        return epoch_key(self.cfg.seed, epoch)

    def take(self, h: torch.Tensor, ids: torch.Tensor) -> None:
        """A step's activations at the boundary being written, for samples ``ids``."""
        if self._writing is not None:
            self._writing.take(h, ids)

    def end_epoch(self, epoch: int) -> bool:
        """Finish the cache written this epoch, or build the one due since a step of it
        (``_recache``), and switch to it. True when the source changed."""
        w = self._writing
        if w is None:
            return self._build_next(epoch)
        self._writing = None
        prev = self.cache
        t = time.perf_counter()
        try:
            cache = w.finish(self._rows_computer(prev, w.target), self._source_opener(w))
        except BaseException:
            w.abort()
            raise
        self.seconds += time.perf_counter() - t  # the finish (missing rows, close); writes overlap
        self._written = w.account()
        self._next = 0  # one due at a lower boundary: superseded by the one written through
        self.cache = cache
        self._retire(prev)
        log.info(
            "end of epoch %d: cache boundary %d -> %d (%s, written through)",
            epoch,
            prev.boundary if prev else 0,
            cache.boundary,
            cache.tier,
        )
        return True

    def _build_next(self, epoch: int) -> bool:
        """Build the cache due since a step of this epoch, if one is (``_recache``), and switch
        to it; none in the last epoch, whose cache nobody would read."""
        b_new, self._next = self._next, 0
        if b_new <= self.boundary or epoch >= self.cfg.epochs - 1:
            return False
        self._switch(b_new, f"end of epoch {epoch}")
        return True

    def _epoch_target(self, j: int, frontier: int) -> int:
        """The boundary to start writing at iteration ``j`` (the boundary held: nothing now)."""
        b, policy = self._held, self.cfg.recache_policy
        if frontier <= b:
            return b
        if policy != "auto":
            return plan_boundary(policy, b, frontier, self.model.cut_points)
        epoch = j // self.iters_per_epoch
        if self._epoch_plan is None or epoch not in self._epoch_plan:
            self._epoch_plan = self._plan_epochs(j, frontier)
        start, target = self._epoch_plan[epoch]
        return max(b, min(frontier, target)) if start <= j else b

    def _plan_epochs(self, j: int, frontier: int) -> dict[int, tuple[int, int]]:
        """The write-through plan from iteration ``j`` to the end: epoch -> (iteration at which
        its steps start writing, boundary written; the boundary held when nothing is)."""
        b = self._held
        if self.cost is None:
            self.cost = self._measure_costs(j, frontier)
        epoch, elapsed = divmod(j, self.iters_per_epoch)
        epochs = list(range(epoch, self.cfg.epochs))
        tiers = self._plan_tiers(j)
        plan = plan_epochs(
            [self._epoch_segments(e, j) for e in epochs],
            self.cfg.batch_size,
            self.cost,
            self.sample_bytes,
            tiers.__getitem__,
            boundary=b,
            tier=self._held_tier(),
            elapsed=elapsed,
            # a store that takes no rows is made by a pass (_open_write_through)
            pass_tiers=frozenset({"zarr"} if self._store_rows_refusal() else ()),
            num_samples=len(self.data.train),
        )
        out = {
            e: ((j if e == epoch else e * self.iters_per_epoch) + start, target)
            for e, start, target in zip(epochs, plan.starts, plan.targets, strict=True)
        }
        if len(plan.epoch_seconds) == len(epochs):  # whole epochs only: not the one under way
            self._epoch_predicted.update(
                (e, sec)
                for e, sec in zip(epochs, plan.epoch_seconds, strict=True)
                if e > epoch or elapsed == 0
            )
        moves = {e: t for e, (_, t) in out.items() if t != b}
        starts = {e: it for e, (it, t) in out.items() if t != b and it % self.iters_per_epoch}
        log.info(
            "iteration %d: write-through plan (epoch: boundary written) %s%s: predicted %.1f s "
            "for the rest of the run against %.1f s without a new cache (costs measured now, "
            "per sample: image %.1f us, reads MB/s %s, writes MB/s %s, into stores prepared "
            "ahead %s)",
            j,
            _compact_moves(moves),
            f", mid-epoch starts (epoch: iteration) {starts}" if starts else "",
            plan.seconds,
            plan.baseline_seconds,
            self.cost.image * 1e6,
            _mb_per_s(self.cost.read_rate),
            _mb_per_s(self.cost.write_rate),
            _mb_per_s(self.cost.ahead_write_rate) or "-",
        )
        return out

    def _epoch_segments(self, epoch: int, j: int = 0) -> list[tuple[int, int]]:
        """``(steps, frontier)`` stretches of an epoch from iteration ``j`` on, in order."""
        ipe = self.iters_per_epoch
        return self.schedule.stretches(max(epoch * ipe, j), (epoch + 1) * ipe)

    def _open_write_through(self, target: int) -> WriteThrough | None:
        cfg, n = self.cfg, len(self.data.train)
        tier = self._tier_for(target)
        if tier == "zarr" and (why := self._store_rows_refusal()):
            # the pass (_recache) says where its cache goes, when it is made
            log.info(
                "boundary %d goes to the store, which takes no rows (%s): a cache pass", target, why
            )
            return None
        self._say_tier(target, tier)
        shape = self.shapes[target]
        fp = self._fingerprint(target)
        meta = provenance(self.model, target, self.data.desc, self._cache_desc(), fp)
        path = store_path(self._zarr_dir(), target) if tier == "zarr" else None
        sink: Any
        ahead = self._take_ahead(target, tier, meta)
        if ahead is not None:
            sink = ahead
        elif tier == "zarr":
            sink = self._create_store(target, path, meta)  # type: ignore[arg-type]
        elif tier == "device":
            sink = store.DeviceCache.empty(
                n, 1, shape, cfg.cache_dtype, device=self.device, meta=meta
            )
        else:
            sink = store.RamCache.empty(n, 1, shape, cfg.cache_dtype, pin=False, meta=meta)
        if not getattr(sink, "supports_rows", False):
            log.info(
                "the %s sink at boundary %d takes whole chunks only: a cache pass", tier, target
            )
            sink.abort()
            return None
        prev_chain = self.cache.chain if self.cache is not None else ()
        return WriteThrough(
            target=target,
            sink=sink,
            tier=tier,
            path=path,
            fingerprint=fp,
            meta=meta,
            chain=(*prev_chain, target),
            labels=self.data.train.labels.cpu(),
            dtype=cfg.cache_dtype,
            device=self.device,
            batch_size=cfg.batch_size,
            sample_shape=shape,
            catch_up_batch=cfg.cache_batch_size or cfg.batch_size,
            progress=self.progress,
        )

    def _create_store(
        self, target: int, path: Path | str, meta: dict[str, Any] | None
    ) -> store.StoreWriter:
        """A new store for a cache written through at ``target`` (one view, replacing a store
        of this run's left at ``path``)."""
        return store.create(
            path,
            sample_shape=self.shapes[target],
            num_samples=len(self.data.train),
            views=1,
            dtype=self.cfg.cache_dtype,
            meta=meta,
            overwrite=True,
        )

    def _rows_computer(self, prev: Cache | None, target: int) -> Any:
        """``indices -> activations at target`` for samples no step visited: from the previous
        cache, or the images with the cached view's augmentation; the frozen units run as in
        a cache pass (``frozen_forward``: a replayed graph where the steps replay graphs)."""
        cfg, train = self.cfg, self.data.train
        b0 = prev.boundary if prev is not None else 0
        aug = (
            None
            if self.augment.identity
            else self.augment.params(view_key(cfg.seed, 0), len(train))
        )
        forward = frozen_forward(self.model, b0, target, cfg.channels_last, cfg.amp, self.graphs)

        def compute(idx: np.ndarray) -> torch.Tensor:
            flags = [u.training for u in self.model.units]
            try:
                for u in self.model.units[:target]:
                    u.eval()
                with torch.no_grad(), autocast(self.device, cfg.amp):
                    if prev is None:
                        h, _ = make_batch(train, idx, aug, self.device)
                    else:
                        h = prev.source.read(0, idx).to(self.device).to(self.act_dtypes[b0])
                    return forward(h)
            finally:
                for u, f in zip(self.model.units, flags, strict=True):
                    u.train(f)

        return compute

    def _source_opener(self, w: WriteThrough) -> Any:
        if w.tier == "zarr":
            return lambda: store.open(w.path)  # type: ignore[arg-type]
        return lambda: w.sink

    def _retire(self, prev: Cache | None) -> None:
        """A superseded cache: kept until the next checkpoint names its successor (zarr with
        checkpoints), else released now."""
        if prev is None:
            return
        if prev.tier == "zarr" and self.cfg.checkpoint_dir is not None:
            self._superseded.append(prev)
        else:
            self._discard(prev)

    def _freeze_events(self, j: int) -> list[tuple[int, int]]:
        """(iteration, frontier) of every freeze from iteration j on, the current one first."""
        its = sorted(
            {it for it in self.schedule.freeze_iterations() if it is not None and it >= j} | {j}
        )
        return [(it, self.schedule.frozen_count(it)) for it in its]

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        """Count the block's seconds in ``probe_seconds``. The device's queued steps finish
        first (the probes wait for them anyway): their time is the steps', not the probe's."""
        synchronize(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.probe_seconds += time.perf_counter() - t

    def _measure_costs(self, j: int, frontier: int) -> CostModel:
        """Per-sample compute costs measured now on this device (docs/training.md, re-caching); the tiers'
        rates are measured when a plan first needs them (``_plan_tiers``)."""
        with self._probing():
            return self._measure_compute(j, frontier)

    def _measure_compute(self, j: int, frontier: int) -> CostModel:
        cfg, train = self.cfg, self.data.train
        idx = np.arange(min(cfg.batch_size, len(train)))
        aug = (
            None
            if self.augment.identity
            else self.augment.params(epoch_key(cfg.seed, 0), len(train))
        )
        times = []
        x = torch.empty(0)
        for _ in range(3):
            t = time.perf_counter()
            x, _ = make_batch(train, idx, aug, self.device)
            synchronize(self.device)
            times.append(time.perf_counter() - t)
        image = sorted(times)[1] / len(idx)  # median of 3
        if cfg.channels_last and x.dim() == 4:  # as the steps see their input
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, cfg.amp):
            unit_fwd = measure_unit_forward(
                self.model,
                x,
                self.model.num_units,
                self.device,
                graphs_amp=cfg.amp if self.graphs else None,
            )
        self._probe_shape = self.shapes[max(1, frontier)]
        cost = CostModel(
            unit_fwd=unit_fwd,
            image=image,
            read_rate={},
            write_rate={},
            overlap=self.device.type == "cuda",  # loader threads read while the GPU computes
        )
        log.info(
            "iteration %d: measured costs per sample (%s): image %.1f us, forward %s us; a "
            "training step from the input priced at %.2f ms per batch of %d",
            j,
            "replayed CUDA graphs" if self.graphs else "eager",
            image * 1e6,
            [round(t * 1e6, 2) for t in unit_fwd],
            1e3 * cost.step(image, 0.0, None, 0, 0) * cfg.batch_size,
            cfg.batch_size,
        )
        return cost

    def _probe_limits(self, j: int) -> tuple[float, int]:
        """(seconds, samples) of a tier probe planned at iteration ``j``: its writes and its
        reads each run for at most STEADY_SECONDS, or PROBE_SHARE of the rest of the run's
        predicted time with no new cache where that is less (a short run: the probe is then
        not the larger part of what it decides about); its tier holds at most the samples of
        this rank's cache."""
        cost = self.cost
        if cost is None:
            raise CacheError("probe limits asked for before the costs were measured")
        b = self.boundary
        read = cost.image if b == 0 else 0.0  # a held cache's read rate may be the one probed
        segments = [
            seg
            for e in range(j // self.iters_per_epoch, self.cfg.epochs)
            for seg in self._epoch_segments(e, j)
        ]
        rest = steps_seconds(segments, self.cfg.batch_size, cost, read, 0.0, None, b)
        samples = len(self.data.train) // self.dist.world_size
        return min(STEADY_SECONDS, PROBE_SHARE * rest), max(1, samples)

    def _plan_tiers(self, j: int) -> list[str]:
        """The tier of a cache at each boundary as a plan sees it (asked once per plan at
        iteration ``j``: free memory moves), after measuring the rates of those tiers and the
        held cache's tier that are not measured yet: a tier no cache can go to is never probed
        (``--cache zarr`` probes the store only, ``--cache device`` the device only)."""
        if self.cost is None:
            raise CacheError("tier rates asked for before the costs were measured")
        tiers = [self._tier_for(b) for b in range(len(self.sample_bytes))]
        needed = set(tiers[1:]) | ({self.cache.tier} if self.cache is not None else set())
        missing = needed - set(self.cost.read_rate)
        if not missing:
            return tiers
        with self._probing():
            self._measure_rates(self.cost, j, missing)
        return tiers

    def _measure_rates(self, cost: CostModel, j: int, missing: set[str]) -> None:
        """Measure the read and write rates of the tiers in ``missing`` into ``cost``."""
        cfg = self.cfg
        rates: dict[str, tuple[float, float]] = {}
        seconds, samples = self._probe_limits(j)
        memory = missing & {"ram", "device"}
        if memory:
            rates |= measure_tier_rates(
                self._probe_shape,
                cfg.cache_dtype,
                self.device,
                cfg.batch_size,
                memory,
                seconds=seconds,
                max_samples=samples,
            )
        if "zarr" in missing:
            got = measure_store_rates(
                self.device,
                self._zarr_dir(),
                self._probe_shape,
                cfg.cache_dtype,
                None if cfg.codec == "none" else cfg.codec,
                cfg.batch_size,
                # where host and device share the cores (a CPU run), the kernel's writeback
                # of a cache runs on the training's cores (fmnist: an epoch writing a 2.26 GB
                # store took 56.9 s on disk, 49.0 s on tmpfs, for the same 2.4 s of writes)
                flush=not cost.overlap,
                # where the stores of later epochs are prepared ahead (_prepare_ahead), the
                # steps writing them only copy: priced apart from a store made as it is written
                prepared=cost.overlap and self.dist.world_size == 1,
                seconds=seconds,
                max_samples=samples,
            )
            rates["zarr"] = (got.write, got.read)
            if got.ahead_write is not None:
                cost.ahead_write_rate["zarr"] = got.ahead_write
        for tier, (write, read) in rates.items():
            cost.write_rate[tier] = write
            cost.read_rate[tier] = read
        log.debug(
            "measured rates (MB/s, write/read): %s; writes into stores prepared ahead: %s "
            "(probes of at most %.2f s and %d samples each)",
            {k: (round(w / 1e6), round(r / 1e6)) for k, (w, r) in rates.items()},
            _mb_per_s(cost.ahead_write_rate) or "-",
            seconds,
            samples,
        )

    # ---- building ---------------------------------------------------------------------------------
    def _recache(self, b_new: int, j: int) -> bool:
        """One cache pass to ``b_new`` now, and the batches switch to it; mid-epoch where the
        cache read now or the new one is a store read a chunk at a time (compressed or
        remote), at the epoch's end instead (``end_epoch``): such a store is read in its own
        chunk order, not the epoch's sample permutation, so the rest of the epoch would visit
        some samples twice and others not at all. True when the batch source changed."""
        epoch, step = divmod(j, self.iters_per_epoch)
        tier = self.dist.broadcast_object(
            self._tier_for(b_new) if self.dist.is_main else None, "sharing the cache tier"
        )
        streamed = tier == "zarr" and bool(self._store_rows_refusal())
        if step and (streamed or _chunk_streamed(self.cache)):
            self._next = b_new
            why = (
                f"--codec {self.cfg.codec}" if self.cfg.codec != "none" else "a remote --cache-dir"
            )
            log.info(
                "iteration %d: boundary %d %s: a store read a chunk at a time (%s) "
                "visits the samples in its own order, so a switch mid-epoch would repeat some "
                "and skip others",
                j,
                b_new,
                f"is cached at the end of epoch {epoch}"
                if epoch < self.cfg.epochs - 1
                else "is not cached (the last epoch: no later one would read it)",
                why,
            )
            return False
        if self.dist.is_main:
            self._say_tier(b_new, tier)
        self._switch(b_new, f"iteration {j}", tier)
        return True

    def _switch(self, b_new: int, when: str, tier: str | None = None) -> None:
        """Build the cache at ``b_new`` by a pass (``_build``), read from it on, retire the old
        one, and log the move as of ``when``."""
        prev = self.cache
        self.cache = self._build(b_new, prev, tier)
        self._retire(prev)
        log.info(
            "%s: cache boundary %d -> %d (%s)",
            when,
            prev.boundary if prev else 0,
            b_new,
            self.cache.tier,
        )

    def _build(self, b_new: int, prev: Cache | None, tier: str | None = None) -> Cache:
        """One cache pass to boundary ``b_new`` from ``prev`` (or the images), into ``tier``
        (default: the one the policy picks now)."""
        if tier is None:
            tier = self.dist.broadcast_object(
                self._tier_for(b_new, building=True) if self.dist.is_main else None,
                "sharing the cache tier",
            )
        path = store_path(self._zarr_dir(), b_new) if tier == "zarr" else None
        fp = self._fingerprint(b_new)
        meta = self.dist.broadcast_object(
            provenance(self.model, b_new, self.data.desc, self._cache_desc(), fp)
            if self.dist.is_main
            else None,
            "sharing the store's provenance",
        )
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
        self.seconds += cache.build_seconds
        if self.cost is not None and tier == "zarr":
            self.cost.write_rate["zarr"] = cache.write_rate
        return cache

    # ---- batches ----------------------------------------------------------------------------------
    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """This rank's batches of the epoch from batch ``start`` on, read from the cache:
        x (B, *sample_shape) on the device in the dtype the steps compute the activation in
        (``act_dtypes``: what the unit before the boundary returns, float32 or bfloat16 under
        ``--amp bf16`` for the built-in models), y (B,) on the device, ids
        (B,) on the host."""
        if self.cache is None:
            raise RuntimeError("CacheManager.batches() before any cache was built")
        dtype = self.act_dtypes[self.cache.boundary]
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
        try:
            with loader:
                for x, y, ids in loader:
                    yield x.to(dtype), y, ids
        finally:
            self.loader_stats.add(loader.stats)

    def predicted_seconds(self, epoch: int) -> float | None:
        """The write-through plan's predicted seconds of the whole of ``epoch`` (its steps and
        catch-up pass, from the costs measured for the plan), for comparing with what the
        epoch took; None where no plan covers the whole epoch (before the plan, the epoch it
        was made in, other policies)."""
        return self._epoch_predicted.get(epoch)

    def take_write_through_account(self) -> dict[str, Any] | None:
        """The account of the cache written through since the last call (``WriteThrough.
        account``), or None where none was completed since."""
        written, self._written = self._written, None
        return written

    def take_loader_stats(self) -> store.LoaderStats:
        """Where the loaders spent their time since the last call (the trainer's epoch)."""
        stats, self.loader_stats = self.loader_stats, store.LoaderStats()
        return stats

    # ---- checkpoints and the end of the run -------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any] | None:
        """What a checkpoint records of the cache (None before the first cache)."""
        c = self.cache
        if c is None:
            return None
        return {
            "boundary": c.boundary,
            "tier": c.tier,
            "path": str(c.path) if c.path else None,
            "fingerprint": c.fingerprint,
            "chain": list(c.chain),
            # deleted once the checkpoint is written (release_superseded); a run killed
            # before that deletes them on --resume (restore)
            "superseded": [str(s.path) for s in self._superseded if s.path is not None],
        }

    def plan_state(self) -> dict[str, Any] | None:
        """What a checkpoint records of the auto policy's plan (None before one is made): the
        costs it was made from and its decisions, for the epochs and device it was made for.
        A resumed run follows them rather than a plan made from new timings, which may
        cache other boundaries and so train from other values."""
        if self.cost is None and self._epoch_plan is None and self._auto_plan is None:
            return None
        return {
            "epochs": self.cfg.epochs,
            "iters_per_epoch": self.iters_per_epoch,
            "device": self.device.type,
            "cost": dataclasses.asdict(self.cost) if self.cost is not None else None,
            "probe_shape": list(self._probe_shape),
            "epoch_plan": None
            if self._epoch_plan is None
            else {e: [s, t] for e, (s, t) in self._epoch_plan.items()},
            "auto_plan": None if self._auto_plan is None else dict(self._auto_plan),
            "epoch_predicted": dict(self._epoch_predicted),
        }

    def restore_plan(self, info: dict[str, Any] | None) -> None:
        """On resume: take the plan a checkpoint recorded (``plan_state``). One made for
        another number of epochs or another device is dropped, and the rest of the run is
        planned anew from new measurements, as is one of a checkpoint that has none."""
        if not info:
            return
        made_for = (int(info["epochs"]), int(info["iters_per_epoch"]), str(info["device"]))
        now = (self.cfg.epochs, self.iters_per_epoch, self.device.type)
        if made_for != now:
            log.info(
                "resume: the checkpoint's cache plan was made for %d epochs of %d steps on %s; "
                "the rest of the run is planned anew",
                *made_for,
            )
            return
        cost = info.get("cost")
        if cost is not None:
            known = {f.name for f in dataclasses.fields(CostModel)}
            try:  # a checkpoint of another version may lack a field, or carry an old one
                self.cost = CostModel(**{k: v for k, v in cost.items() if k in known})
            except TypeError as e:
                log.info(
                    "resume: the checkpoint's cache plan cannot be read (%s); planning anew", e
                )
                return
        self._probe_shape = tuple(int(d) for d in info.get("probe_shape") or ())
        epoch_plan = info.get("epoch_plan")
        self._epoch_plan = (
            None
            if epoch_plan is None
            else {int(e): (int(s), int(t)) for e, (s, t) in epoch_plan.items()}
        )
        auto_plan = info.get("auto_plan")
        self._auto_plan = (
            None if auto_plan is None else {int(j): int(b) for j, b in auto_plan.items()}
        )
        self._epoch_predicted = {
            int(e): float(sec) for e, sec in (info.get("epoch_predicted") or {}).items()
        }
        log.info("resume: following the checkpoint's cache plan (no new measurements)")

    def restore(self, info: dict[str, Any], load: bool = True) -> None:
        """On resume: reuse the checkpoint's store when its fingerprint matches, else rebuild it
        along the chain of boundaries the run went through (the same bits as the original).
        ``load=False`` (a finished run, resumed to report it): only remember what the
        checkpoint names (``ended_with``). Either way the stores the checkpoint records as
        superseded are deleted: a run killed after the checkpoint was written, before it
        deleted them, would otherwise leave them in the run folder for good."""
        self._delete_recorded_superseded(info)
        info = {**info, "path": self._own_store_path(info)}
        if not load:
            self._recorded = info
            return
        b = int(info["boundary"])
        chain = tuple(int(c) for c in info.get("chain") or (b,))
        if not chain or chain[-1] != b or list(chain) != sorted(set(chain)):
            raise CacheError(f"--resume: the checkpoint's cache chain {list(chain)} is not valid")
        fp = self._fingerprint(b)
        path = info.get("path") or None
        if info.get("tier") == "zarr" and path is not None:
            s = self._reusable_store(path, fp)
            if s is not None:
                self.cache = Cache(b, "zarr", s, fp, path, meta=s.meta, chain=chain)
                log.info(
                    "resume: reusing store %s (fingerprint matches, every chunk checked)", path
                )
                return
        log.info(
            "resume: rebuilding the cache at boundary %d through %s (%s tier not reusable)",
            b,
            list(chain),
            info.get("tier"),
        )
        cache: Cache | None = None
        for hop in chain:
            nxt = self._build(hop, cache)
            if cache is not None:
                self._discard(cache)
            cache = nxt
        self.cache = cache

    def _own_store_path(self, info: dict[str, Any]) -> str | None:
        """Where the store a checkpoint's cache ``info`` names is now: this run folder's store
        of its boundary. The checkpoint records where it was written, which is another run
        folder's where the --checkpoint-dir holding it was moved or copied (a copy, resumed to
        train on, read the original's store outside its own folder, unlocked, and deleted it
        when it moved on; a moved one rebuilt the store it had)."""
        path = info.get("path")
        if not path or self.run_dir is None:
            return path or None
        return str(store_path(self.run_dir, int(info["boundary"])))

    def _reusable_store(self, path: Path | str, fp: str) -> store.ActivationStore | None:
        """The checkpoint's store at ``path``, open, where it matches ``fp`` and every chunk
        passes its checksum, else None. Under torchrun rank 0 alone reads it through and the
        others follow its decision: each rank read the whole store, and ranks that decided
        apart would have met in different collectives (one reusing, one rebuilding)."""
        s = self.dist.on_main(
            "checking the checkpoint's store",
            lambda: m if (m := open_matching(path, fp)) and self._verified(m, path) else None,
        )
        reuse = self.dist.broadcast_object(
            s is not None if self.dist.is_main else None, "sharing whether the store is reused"
        )
        failed = None
        if reuse and not self.dist.is_main:
            s = open_matching(path, fp)
            if s is None:
                failed = CacheError(
                    f"rank {self.dist.rank}: --resume: cannot open {path}, the store rank 0 "
                    "reuses; --cache-dir must be on a filesystem every rank sees"
                )
        if reuse:  # a rank that cannot open it stops every rank, naming it
            try:
                self.dist.share_refusal(failed, "opening the reused store", CacheError)
            except CacheError:
                if s is not None:
                    s.close()
                raise
        return s

    def _delete_recorded_superseded(self, info: dict[str, Any]) -> None:
        """Delete the stores of this run folder that a checkpoint ``info`` lists as superseded,
        found by their names in this run folder (the checkpoint's folder may have been moved
        or copied since: ``_own_store_path``); never the one it names, nor anything outside
        the run folder."""
        if self.run_dir is None or not self.dist.is_main:
            return
        names = {f"{STORE_PREFIX}{b:03d}": b for b in range(1, self.model.num_units + 1)}
        for p in info.get("superseded") or ():
            b = names.get(str(p).rstrip("/").rsplit("/", 1)[-1])  # a local path or a URL
            if b is None or b == int(info["boundary"]):
                continue
            own = store_path(self.run_dir, b)
            if delete_store(own):
                log.info("resume: deleted superseded store %s", own)

    def _verified(self, s: store.ActivationStore, path: Path | str) -> bool:
        """Whether every chunk and label of the store a checkpoint names passes its checksum,
        read now: a damaged chunk found only when an epoch reads it would stop every resume
        at the same place, where a store rebuilt now costs one pass."""
        t = time.perf_counter()
        # a stop asked for ends the check (a large store's took its whole read first)
        report = store.verify(s, progress=self.progress, between=interrupt.check)
        if report.ok:
            log.debug("resume: checked store %s in %.2f s", path, time.perf_counter() - t)
            return True
        s.close()
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        log.warning(
            "resume: store %s fails its checks: %s%s; rebuilding it", path, report.errors[0], more
        )
        return False

    def ended_with(self) -> tuple[int, str | None, str | None]:
        """(boundary, tier, path of the store kept after the run) of the cache the run ended
        with: the one held, else the one the checkpoint of a finished run names."""
        if self.cache is not None or self._recorded is None:
            return self.boundary, self.cache.tier if self.cache else None, self.kept_path
        info = self._recorded
        path = info.get("path")
        kept = (
            str(path)
            if info.get("tier") == "zarr"
            and path
            and self._tmp_dir is None
            and location.exists(path)
            else None
        )
        return int(info["boundary"]), info.get("tier"), kept

    def release_superseded(self) -> None:
        """Delete the stores no checkpoint names any more (after a checkpoint, or at the end)."""
        for c in self._superseded:
            self._discard(c)
        self._superseded.clear()

    def close(self, failed: bool = False) -> None:
        """Release the run folder's lock; remove the temporary cache folder, if one was made
        (a kept --cache-dir stays). Under torchrun the ranks meet first, unless the run
        ``failed`` (a peer may be gone, or waiting in another collective); rank 0 removes the
        folder even where that meeting fails, after a failure every rank does, and a failed
        run's own error is not replaced by one of the clean-up's."""
        try:
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                if self._writing is not None:  # stopped mid-epoch: the new cache stays incomplete
                    writing, self._writing = self._writing, None
                    writing.abort()
                if self._ahead is not None:  # prepared for an epoch that did not come
                    ahead, self._ahead = self._ahead, None
                    ahead.drop()
            if self._tmp_dir is not None:
                try:
                    if not failed:
                        self.dist.barrier("finishing with the temporary cache")
                finally:
                    if self.cache is not None:
                        self.cache.release()
                        self.cache = None
                    # after a failure every rank removes it (they share one node): a rank
                    # still writing when rank 0 stopped would otherwise make parts of it
                    # again, without the owner record a later sweep needs
                    if self.dist.is_main or failed:
                        remove_temp_dir(self._tmp_dir)
        finally:
            if self._lock_fd is not None:
                local = location.as_local(self.run_dir) if self.run_dir is not None else None
                if local is not None:  # rank 0 holds the lock: nothing kept, no folder left
                    remove_if_unused(local)
                    _drop_lock_of_unmarked(local, self._lock_fd)
                    if self.cfg.cache_dir is None and self._tmp_dir is None:
                        # CHECKPOINT_DIR/cache, made for this run: gone too where now empty
                        with contextlib.suppress(OSError):
                            local.parent.rmdir()
                    if failed and self._tmp_dir is None:
                        _say_what_stays(local)
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)  # closing drops the flock
                self._lock_fd = None


def _chunk_streamed(cache: Cache | None) -> bool:
    """Whether ``cache`` is a store read a whole chunk at a time (compressed or remote), in
    its own order rather than the epoch's sample permutation (``store.sampling``)."""
    s = cache.source if cache is not None else None
    return isinstance(s, store.ActivationStore) and not s.memory_mapped


def _compact_moves(moves: dict[int, int]) -> dict[int, int]:
    """Only the epochs where the written boundary changes."""
    out: dict[int, int] = {}
    last = None
    for e, t in sorted(moves.items()):
        if t != last:
            out[e] = t
        last = t
    return out


LOCK_PATIENCE = 0.5  # seconds a start waits for a run folder's lock before it is refused


def _lock_run_dir(run_dir: Path) -> int:
    """An exclusive ``flock`` on ``run_dir/.prefast-lock`` for the life of the run (the kernel
    drops it when the process dies). Raises CacheError naming the holder when taken."""
    path = run_dir / LOCK_NAME
    try:
        fd = open_lock_file(run_dir, create=True)
    except OSError as e:
        raise CacheError(f"--cache-dir: cannot write {path}: {e.strerror or e}") from None
    try:
        # ``prefast cache list`` and ``remove`` see whether a run is using the folder by taking
        # a shared lock for an instant: a start at that instant waits it out, not refused
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in LOCK_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
    except OSError as e:
        pid, removing = lock_holder(fd)
        holder = f" (pid {pid})" if pid else ""
        os.close(fd)
        if e.errno in LOCK_BUSY and removing:
            raise CacheError(
                f"--cache-dir: {run_dir}, the folder of a run with these settings, is being "
                f"deleted by prefast cache remove (pid {pid}); start again when it has finished"
            ) from None
        if e.errno in LOCK_BUSY and pid == os.getpid():
            raise CacheError(
                f"--cache-dir: this process (pid {pid}) is using {run_dir} already: another "
                "run with the same settings is under way in it, or a Trainer made with them "
                "has neither run nor been closed (Trainer.close() releases it)"
            ) from None
        if e.errno in LOCK_BUSY:
            raise CacheError(
                f"--cache-dir: another prefast run with the same settings is using {run_dir}"
                f"{holder}; wait for it to finish or use another --cache-dir"
            ) from None
        raise
    write_lock_holder(fd)
    return fd


@contextlib.contextmanager
def _permission_as_cache_error() -> Iterator[None]:
    """A run folder, or an entry in it, that this user may not read or enter (a shared cache
    folder) is a CacheError naming it, not a bare PermissionError."""
    try:
        yield
    except PermissionError as e:
        raise CacheError(
            f"--cache-dir: cannot read {e.filename}: {e.strerror or e}; check its permissions "
            "or use another --cache-dir"
        ) from None


def _take_run_dir(run_dir: Path) -> int:
    """Claim ``run_dir`` and lock it (``_claim_run_dir``, ``_lock_run_dir``). A lock taken on a
    lock file that is gone (``prefast cache remove``, or the end of a run that kept nothing,
    deleted the folder between this run's open and its flock) guards nothing: the folder is
    made and claimed again, and the new lock file locked."""
    for _ in range(3):
        _claim_run_dir(run_dir)
        fd = _lock_run_dir(run_dir)
        if os.fstat(fd).st_nlink > 0:
            return fd
        os.close(fd)
        run_dir.mkdir(parents=True, exist_ok=True)
    raise CacheError(f"--cache-dir: {run_dir} keeps being removed while this run starts")


def _drop_lock_of_unmarked(run_dir: Path, fd: int) -> None:
    """Delete the lock file of a run folder prefast did not make (no marker: nothing left in
    it is cleared later, so the lock file stayed there for good), where it is still the file
    locked as ``fd``: never a file put under its name meanwhile. A run that opened it before
    this and locks it then finds it unlinked, and makes it anew (``_take_run_dir``)."""
    if (run_dir / RUN_MARKER).is_file():
        return
    path = run_dir / LOCK_NAME
    with contextlib.suppress(OSError):
        st, held = path.lstat(), os.fstat(fd)
        if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
            path.unlink()


def _steps_of(n: int) -> str:
    """``step's`` or ``N steps'``: whose samples."""
    return "step's" if n == 1 else f"{n} steps'"


def _say_what_stays(run_dir: Path) -> None:
    """After a failed or stopped run, name the stores it leaves in its kept cache folder (a
    --resume reuses them; an unfinished one is removed at the folder's next start)."""
    with contextlib.suppress(OSError):
        stores = sorted(p for p in run_dir.iterdir() if p.name.startswith(STORE_PREFIX))
        if stores:
            sizes, _ = entry_sizes(run_dir)
            size = sum(sizes.get(p.name, 0) for p in stores)
            log.warning(
                "%s keeps %d store(s), %.1f MB (%s): --resume reuses a complete one, the next "
                "start removes an unfinished one; 'prefast cache remove %s' frees the space",
                run_dir,
                len(stores),
                size / 1e6,
                ", ".join(p.name for p in stores),
                shlex.quote(str(run_dir)),  # a command to copy: a space must not split it
            )


def _claim_run_dir(run_dir: Path) -> None:
    """Mark ``run_dir`` as this package's where it is: new or empty (a folder that carries the
    marker already is). A folder of the same name with someone else's files in it stays
    unmarked: it is used, but nothing in it is ever cleared (``clear_leftovers``)."""
    marker = run_dir / RUN_MARKER
    if marker.is_file():
        return
    if any(run_dir.iterdir()):
        log.warning(
            "%s exists and was not made by prefast (no %s in it): its stores are written there, "
            "but nothing left in it is cleared",
            run_dir,
            RUN_MARKER,
        )
        return
    marker.touch()


__all__ = ["CacheManager"]
