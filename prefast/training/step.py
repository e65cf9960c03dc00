"""One training step of the trainable part, launched without waiting for the device.

A step at iteration ``j`` from the activation ``h`` at boundary ``b`` with frontier ``f``:
``units[b:f]`` forward under no_grad (frozen, not cached), ``units[f:]`` and the head forward,
cross-entropy, backward, ``UnitSGD.step``. Loss and accuracy are summed on the device in
``EpochMeter`` and read once per epoch (or every few steps for a progress bar), so no step
blocks the host; a non-finite loss records its iteration on the device and is reported at the
next read.

Three ways to run it (``--compile``):

- ``none``: eager PyTorch.
- ``graphs`` (CUDA): the whole step is captured in a CUDA graph per (boundary, frontier, batch
  shape) and replayed; the batch is copied into the graph's static input first. A new
  configuration runs ``WARMUP`` eager steps (real training steps, on a side stream) and is then
  captured; a batch of another shape (an epoch's short last batch) runs eagerly.
- ``inductor``: every unit and the head are ``torch.compile``d once and reused in every
  configuration, so a moving frontier does not recompile the model.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefast.data import FeatureAugment
from prefast.errors import ConfigError
from prefast.freezeout.optim import UnitSGD
from prefast.models import UnitModel
from prefast.runtime import autocast, graph_autocast

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "graphs", "inductor")
WARMUP = 2  # eager steps of a new configuration before it is captured


class EpochMeter:
    """Loss, accuracy and per-step losses of an epoch, accumulated on the device."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.losses = torch.zeros(steps, dtype=torch.float32, device=device)  # mean loss per step
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # iteration, or -1
        self.seen = 0  # samples, counted on the host

    @torch.no_grad()
    def add(
        self, k: int, j: torch.Tensor, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Record step ``k`` of the epoch (iteration ``j``, a device scalar): ``loss`` is the
        batch's mean loss, ``out`` its logits."""
        lf = loss.detach().float()
        self.losses[k] = lf
        self.loss_sum += lf.double() * len(y)
        self.correct += (out.detach().argmax(1) == y).sum()
        bad = ~torch.isfinite(lf)
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), j, self.first_bad))
        self.seen += len(y)

    def check_finite(self) -> None:
        """Raise FloatingPointError naming the first iteration with a non-finite loss (a host
        sync: call it where the host waits anyway)."""
        bad = int(self.first_bad)
        if bad >= 0:
            raise FloatingPointError(f"iteration {bad}: the loss is not finite; lower --base-lr")

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.seen, 1)


Aug = tuple[torch.Tensor, torch.Tensor]  # feature augmentation rows: shift (B, 2), flip (B,)
# boundary, frontier, batch shape, augmented, tapped boundary (0: none)
GraphKey = tuple[int, int, tuple[int, ...], bool, int]
Tap = Callable[[torch.Tensor, torch.Tensor], None]  # (activation at the tapped boundary, ids)


@dataclass
class _Graph:
    key: GraphKey
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static input (B, *shape at b)
    y: torch.Tensor  # static labels (B,)
    aug: Aug | None  # static feature-augmentation rows
    loss: torch.Tensor  # static outputs
    out: torch.Tensor
    tapped: torch.Tensor | None  # the activation at the tapped boundary (a static output)


class StepRunner:
    """Runs training steps of ``model`` with ``optimizer`` (see the module docstring). The
    trainer calls ``configure`` whenever the boundary, the frontier or the optimizer changes."""

    def __init__(
        self,
        model: UnitModel,
        device: torch.device,
        amp: str,
        channels_last: bool,
        compile_mode: str,
        batch_size: int,
        feature_aug: FeatureAugment | None = None,
    ) -> None:
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"--compile: {compile_mode!r} is not one of {', '.join(COMPILE_MODES)}"
            )
        if compile_mode == "graphs" and device.type != "cuda":
            raise ConfigError(
                "--compile graphs: CUDA graphs need a CUDA device; use none or inductor"
            )
        self.model = model
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.mode = compile_mode
        self.batch_size = batch_size  # only full batches are captured
        self.feature_aug = feature_aug
        self.j = torch.zeros((), dtype=torch.int64, device=device)  # the iteration, on the device
        self.boundary = 0
        self.frontier = 0
        self.optimizer: UnitSGD | None = None
        self.ddp: nn.Module | None = None
        self.tap_at = 0  # boundary whose activation goes to tap_fn (write-through); 0: none
        self.tap_fn: Tap | None = None
        self._graph: _Graph | None = None
        self._eager_steps = 0  # eager steps of the current configuration
        self._pool = torch.cuda.graph_pool_handle() if compile_mode == "graphs" else None
        # A one-op graph kept for the runner's life: it holds the shared pool open. Without it,
        # dropping the last step graph leaves the pool unowned while tensors allocated in it
        # (the gradients) live on, and the next capture into it fails an allocator assert.
        self._keeper: torch.cuda.CUDAGraph | None = None
        self._side: torch.cuda.Stream | None = None  # eager warm-up steps run here
        self.capture_seconds = 0.0
        self.captures = 0
        # inductor: one compiled callable per unit and the head, built once, reused everywhere
        self._units: list[Callable[[torch.Tensor], torch.Tensor]] = list(model.units)
        self._head: Callable[[torch.Tensor], torch.Tensor] = model.head
        if compile_mode == "inductor":
            self._units = [torch.compile(u, dynamic=False) for u in model.units]
            self._head = torch.compile(model.head, dynamic=False)

    def configure(
        self,
        boundary: int,
        frontier: int,
        optimizer: UnitSGD,
        ddp: nn.Module | None,
        tap_at: int = 0,
        tap_fn: Tap | None = None,
    ) -> None:
        """The step's shape changed (a freeze, a new cache, a new optimizer, a DDP wrap, a cache
        to write through). ``tap_at`` in (boundary, frontier]: every step hands its activation
        there to ``tap_fn`` with the batch's sample ids."""
        if tap_at and not boundary < tap_at <= frontier:
            raise ConfigError(f"write-through boundary {tap_at} is not in ({boundary}, {frontier}]")
        self.boundary, self.frontier, self.optimizer, self.ddp = boundary, frontier, optimizer, ddp
        self.tap_at, self.tap_fn = (tap_at, tap_fn) if tap_fn is not None else (0, None)
        if self._graph is not None:
            self._graph = None  # its memory returns to the shared pool
        self._eager_steps = 0

    # ---- the forward of the trainable part ------------------------------------------------
    def _forward(
        self, h: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, the activation at ``tap_at`` or None)."""
        b, f, n = self.boundary, self.frontier, self.model.num_units
        tapped = None
        if self.channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        if f > b:
            with torch.no_grad():
                for i in range(b, f):
                    h = self._units[i](h)
                    if i + 1 == self.tap_at:
                        tapped = h  # clean: before any feature augmentation
        if aug is not None and self.feature_aug is not None:
            # the cached sample's fresh augmentation for this epoch, where training starts
            h = self.feature_aug.apply(h, *aug)
            if self.channels_last and h.dim() == 4:
                h = h.contiguous(memory_format=torch.channels_last)
        if self.ddp is not None:
            out: torch.Tensor = self.ddp(h)  # gradients of units[f:] and the head averaged
            return out, tapped
        for i in range(f, n):
            h = self._units[i](h)
        return self._head(h), tapped

    def _compute(
        self, x: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward, loss, backward and update; (loss, logits, tapped activation)."""
        if self.optimizer is None:
            raise RuntimeError("StepRunner.configure() was never called")
        with (
            autocast(self.device, self.amp)
            if self.mode != "graphs"
            else graph_autocast(self.device, self.amp)
        ):
            out, tapped = self._forward(x, aug)
            loss = F.cross_entropy(out, y)
        loss.backward()
        self.optimizer.step(self.j)
        return loss, out, tapped

    # ---- one step ---------------------------------------------------------------------------
    def step(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        j: int,
        k: int,
        meter: EpochMeter,
        aug: Aug | None = None,
        ids: torch.Tensor | None = None,
    ) -> None:
        """Train on batch ``(h, y)`` at iteration ``j`` (step ``k`` of the epoch); ``aug``: the
        batch's feature-augmentation rows (cached batches only); ``ids``: its sample ids (host
        int64), needed when a boundary is tapped."""
        self.j.fill_(j)  # a kernel with j as its argument: no copy, no sync
        if self.mode == "graphs" and self.ddp is None:
            loss, out, tapped = self._graphed(h, y, aug)
        else:
            if self.optimizer is not None:
                self.optimizer.zero_grad()
            loss, out, tapped = self._compute(h, y, aug)
        if self.tap_fn is not None and tapped is not None:
            if ids is None:
                raise RuntimeError("a tapped step needs the batch's sample ids")
            self.tap_fn(tapped, ids)
        meter.add(k, self.j, loss, out, y)

    def _graphed(
        self, h: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        key: GraphKey = (
            self.boundary,
            self.frontier,
            tuple(h.shape),
            aug is not None,
            self.tap_at,
        )
        g = self._graph
        if g is not None and g.key == key:
            g.x.copy_(h)
            g.y.copy_(y)
            if g.aug is not None and aug is not None:
                g.aug[0].copy_(aug[0])
                g.aug[1].copy_(aug[1])
            g.graph.replay()
            return g.loss, g.out, g.tapped
        if g is None and self._eager_steps >= WARMUP and h.shape[0] == self.batch_size:
            return self._capture(key, h, y, aug)
        # warm-up steps of a new configuration, or a batch of another shape (the last of an
        # epoch): eager, on a side stream as CUDA graph capture wants for warm-up
        return self._eager_on_side_stream(h, y, aug)

    def _eager_on_side_stream(
        self, h: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.optimizer is None:
            raise RuntimeError("StepRunner.configure() was never called")
        s = self._side_stream()
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), _quiet_stream_mismatch():
            self.optimizer.zero_grad()
            loss, out, tapped = self._compute(h, y, aug)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self._eager_steps += 1
        return loss, out, tapped

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(
        self, key: GraphKey, h: torch.Tensor, y: torch.Tensor, aug: Aug | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.optimizer is None:
            raise RuntimeError("StepRunner.configure() was never called")
        t = time.perf_counter()
        x_static = h.detach().clone()
        y_static = y.detach().clone()
        aug_static = (aug[0].clone(), aug[1].clone()) if aug is not None else None
        self.optimizer.zero_grad()  # gradients are allocated inside the graph's pool
        if self._keeper is None:
            self._keeper = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._keeper, pool=self._pool, capture_error_mode="thread_local"):
                self._kept = torch.zeros(1, device=self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's and the cache writer's threads keep copying on their own
        # streams while this thread captures (their calls are not part of the capture)
        with (
            torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            _quiet_stream_mismatch(),
        ):
            loss, out, tapped = self._compute(x_static, y_static, aug_static)
        self._graph = _Graph(key, graph, x_static, y_static, aug_static, loss, out, tapped)
        graph.replay()  # capture records the work; replaying runs this step
        self.capture_seconds += time.perf_counter() - t
        self.captures += 1
        log.debug(
            "captured the step for boundary %d, frontier %d, batch %s in %.1f ms",
            key[0],
            key[1],
            key[2],
            1e3 * (time.perf_counter() - t),
        )
        return loss, out, tapped


@contextlib.contextmanager
def _quiet_stream_mismatch() -> Iterator[None]:
    """Autograd warns when a gradient-accumulation node made on one stream (an eager warm-up
    step on the side stream) meets a backward on another (the capture stream). Warm-up,
    capture and replay are ordered by stream waits, so here the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
        yield


__all__ = ["COMPILE_MODES", "EpochMeter", "StepRunner"]
