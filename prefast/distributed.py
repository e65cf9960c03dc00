"""Running under PyTorch's own distributed engine (torchrun + DistributedDataParallel).

``DistContext.from_env()`` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and starts the process group (nccl on CUDA, gloo on CPU) with a
timeout, so a rank that dies makes the others fail with ``DistributedError`` instead of
hanging. Without those variables it is a single process and every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from prefast.errors import (
    ConfigError,
    DistributedError,
    PrefastError,
    RefusedByRankZero,
    env_int,
)
from store.errors import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in the job: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 300.0
    initialized_here: bool = False
    # the ranks on this machine, which share its host memory (torchrun's LOCAL_WORLD_SIZE;
    # every rank where it is not set)
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str, timeout_s: float = 300.0) -> DistContext:
        """Join the job torchrun started, or describe a single process. ``device`` is the
        resolved device kind ("cpu" or "cuda"); on CUDA each rank takes ``cuda:LOCAL_RANK``."""
        world = env_int("WORLD_SIZE", 1, minimum=1)
        rank = env_int("RANK", 0, minimum=0)
        local = env_int("LOCAL_RANK", rank, minimum=0)
        local_world = env_int("LOCAL_WORLD_SIZE", world, minimum=1)
        if rank >= world:  # failed in the first epoch, as a store's or a loader's rank check
            raise ConfigError(
                f"RANK={rank} in the environment is not below WORLD_SIZE={world}: torchrun "
                "sets both; unset them to train in one process"
            )
        dev = torch.device(device)
        if dev.type == "cuda" and world > 1:
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        ctx = cls(rank, world, dev, timeout_s, local_world_size=max(1, min(local_world, world)))
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
            except (ValueError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0][:200]
                raise DistributedError(
                    f"rank {rank}: could not join the process group of {world} ranks "
                    f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {first}"
                ) from e
            ctx.initialized_here = True
            log.info(
                "rank %d of %d joined the process group (%s, timeout %.0f s)",
                rank,
                world,
                backend,
                timeout_s,
            )
        return ctx

    # ---- collectives, each turning a backend failure into one clear error -------------------
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:
            if not _is_comm_failure(e):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.rank}: {what} failed: another rank died or the process group timed out "
                f"(--dist-timeout {self.timeout_s:.0f} s): {first}"
            ) from e

    def barrier(self, what: str = "barrier") -> None:
        if self.enabled:
            with self._collective(what):
                dist.barrier()

    def broadcast_object(self, obj: Any, what: str = "broadcast") -> Any:
        """Rank 0's ``obj`` on every rank (decisions must not diverge between ranks)."""
        if not self.enabled:
            return obj
        box = [obj]
        with self._collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any, what: str = "all_gather") -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float], what: str = "all_reduce") -> list[float]:
        """Elementwise sum over ranks (float64 on the collective's device)."""
        if not self.enabled:
            return values
        t = torch.tensor(
            values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        with self._collective(what):
            dist.all_reduce(t)
        return t.tolist()

    def broadcast_tensor(self, t: torch.Tensor, src: int, what: str = "broadcast") -> None:
        """In place; a contiguous 16-bit float tensor travels as its bytes (exact; gloo and
        NCCL take uint8, neither takes int16)."""
        if not self.enabled:
            return
        if t.dtype in (torch.float16, torch.bfloat16) and t.is_contiguous() and t.dim():
            t = t.view(torch.uint8)
        with self._collective(what):
            dist.broadcast(t, src=src)

    def on_main(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only (None on the others), which wait for it to finish. Where it
        refuses the run (a PrefastError or StoreError: bad input), rank 0 raises that error
        and every other rank raises RefusedByRankZero quoting it, rather than failing at its
        next collective as if rank 0 had died."""
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                out = fn()
            except (PrefastError, StoreError) as e:
                self.broadcast_object(" ".join(str(e).split()) or type(e).__name__, what)
                raise
            self.broadcast_object(None, what)
            return out
        refusal = self.broadcast_object(None, what)
        if refusal is not None:
            raise RefusedByRankZero(f"rank {self.rank}: stopped, rank 0 refused the run: {refusal}")
        return None

    def share_refusal(
        self, failed: Exception | None, what: str, error: type[PrefastError] = PrefastError
    ) -> None:
        """Where a rank refused the run on its own (``failed``: bad input only it met, e.g. a
        store it does not see), it raises that error and every other rank raises ``error``
        quoting it, rather than failing at its next collective as if that rank had died.
        Every rank calls this at the same point; it returns where none refused."""
        if not self.enabled:
            if failed is not None:
                raise failed
            return
        mine = " ".join(str(failed).split()) or type(failed).__name__ if failed else None
        refused = [(r, why) for r, why in enumerate(self.all_gather_object(mine, what)) if why]
        if failed is not None:
            raise failed
        if refused:
            r, why = refused[0]
            raise error(f"rank {self.rank}: stopped, rank {r} refused the run: {why}")

    def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (e.g. a DDP step) with communication failures turned into
        DistributedError; other errors pass through unchanged."""
        with self._collective(what):
            return fn(*args)

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.initialized_here = False


_COMM_MARKERS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "closed",
    "peer",
    "socket",
    "broken pipe",
)


def _is_comm_failure(e: RuntimeError) -> bool:
    """A backend's communication failure (as opposed to an error of the step itself)."""
    if isinstance(e, dist.DistError):
        return True
    msg = str(e).lower()
    return any(m in msg for m in _COMM_MARKERS)


__all__ = ["DistContext", "DistributedError"]
